//! Figures of a live engine: `dongflow run -w 2` as a process of its own, on the embedded broker
//! (librdkafka's mock cluster, in this process), while the simulator's events are produced into it
//! at a fixed rate.
//!
//! - **Freshness**: probe riders' pings, produced with the wall clock as `ts`, and the time until
//!   `GET /v1/riders/{probe}` shows that `ts`, measured from outside the engine.
//! - **Queries under load**: point queries and all-districts from the closed-loop load generator.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use dongflow_connectors::kafka::generate::{generate, GenerateConfig, Produced};
use dongflow_connectors::kafka::{EmbeddedBroker, TopicSpec};
use dongflow_connectors::simulator::SimConfig;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord};

use crate::load;
use crate::progress::Progress;

/// Partitions of every topic of the live runs.
const PARTITIONS: i32 = 4;
const TOPICS: [&str; 5] = [
    "rider-events",
    "delivery-events",
    "district-changelog",
    "rider-changelog",
    "dongflow-dlq",
];

/// The district map the engine runs on.
#[derive(Clone, Debug)]
pub struct Map {
    /// `--districts FILE`; `None`: the built-in map.
    pub file: Option<PathBuf>,
    /// Every district code of the map.
    pub codes: Vec<String>,
}

/// A broker, an engine process on it, and the simulator producing into it at a fixed rate.
pub struct Live {
    _broker: EmbeddedBroker,
    bootstrap: String,
    child: Child,
    pub http: std::net::SocketAddr,
    ingest: Option<(Arc<AtomicBool>, JoinHandle<Produced>)>,
    _dir: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Live {
    /// Starts the broker and `dongflow run -w WORKERS` on it, waits until it is ready, then
    /// produces `riders` riders' events at `rate` events/s.
    pub fn start(map: &Map, workers: usize, riders: usize, rate: u64, tag: &str) -> Live {
        let mut live = Live::spawn(map, workers, PARTITIONS, tag, |_, _, _| {});
        let stop = Arc::new(AtomicBool::new(false));
        let config = GenerateConfig {
            brokers: live.bootstrap.as_str().into(),
            rider_topic: TOPICS[0].into(),
            delivery_topic: TOPICS[1].into(),
            rate,
            events: None,
            duration: None,
        };
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let sim = SimConfig {
                riders,
                seed: 7,
                start_ts: now_ms(),
            };
            generate(sim, &config, &flag, |_| {}).expect("events produced")
        });
        live.ingest = Some((stop, thread));
        live
    }

    /// Starts the broker with `partitions` a topic, has `backlog` fill its input topics (given
    /// the bootstrap address and the rider and delivery topics), then starts `dongflow run -w
    /// WORKERS` on it from the earliest offsets and waits until it is ready.
    pub fn spawn(
        map: &Map,
        workers: usize,
        partitions: i32,
        tag: &str,
        backlog: impl FnOnce(&str, &str, &str),
    ) -> Live {
        let specs: Vec<TopicSpec> = TOPICS
            .iter()
            .map(|t| TopicSpec::new(t, partitions))
            .collect();
        let broker = EmbeddedBroker::start(&specs).expect("embedded broker");
        let bootstrap = broker.bootstrap();
        backlog(&bootstrap, TOPICS[0], TOPICS[1]);
        // The embedded broker keeps about 5 MB a partition: a backlog beyond it would be read in
        // part, and the run would wait for events it can never read.
        let trimmed = broker.trimmed(&specs[..2]).expect("watermarks");
        assert!(
            trimmed.is_empty(),
            "the backlog overflowed partitions {trimmed:?}"
        );
        let dir = std::env::temp_dir().join(format!("dongflow-e2e-{}-{tag}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let log = std::fs::File::create(dir.join("dongflow.log")).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_dongflow"));
        command
            .args(["run", "--brokers", &bootstrap, "--http", "127.0.0.1:0"])
            .args(["-w", &workers.to_string()])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--start-from", "earliest"]);
        if let Some(file) = &map.file {
            command.arg("--districts").arg(file);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .expect("dongflow starts");
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("HTTP: http://") {
                    let _ = tx.send(url.trim_end_matches('/').to_owned());
                }
            }
        });
        let http = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("dongflow prints its HTTP address")
            .parse()
            .expect("an address");
        let live = Live {
            _broker: broker,
            bootstrap,
            child,
            http,
            ingest: None,
            _dir: TempDir(dir),
        };
        live.wait_for("/readyz", Duration::from_secs(600));
        live
    }

    fn agent() -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into()
    }

    /// Waits until `path` answers 200.
    fn wait_for(&self, path: &str, limit: Duration) {
        let agent = Self::agent();
        let url = format!("http://{}{path}", self.http);
        let deadline = Instant::now() + limit;
        while !agent
            .get(&url)
            .call()
            .is_ok_and(|r| r.status().as_u16() == 200)
        {
            assert!(Instant::now() < deadline, "timed out waiting for {path}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Peak resident memory of the engine process so far.
    pub fn peak_rss(&self) -> u64 {
        crate::inmem::peak_rss(&self.child.id().to_string())
    }

    /// Stops producing; returns how many events were produced.
    pub fn stop(mut self) -> u64 {
        let produced = self.ingest.take().map_or(0, |(stop, thread)| {
            stop.store(true, Ordering::Relaxed);
            thread.join().map_or(0, |p| p.sent)
        });
        let _ = self.child.kill();
        let _ = self.child.wait();
        produced
    }

    /// Probes freshness for `duration`, one probe every `every`: returns each probe's time from
    /// produce to visible over HTTP, in µs, sorted.
    pub fn freshness(&self, duration: Duration, every: Duration, progress: &Progress) -> Vec<u32> {
        let mut probes = Probes::start(self);
        let agent = Self::agent();
        let started = Instant::now();
        let mut samples = Vec::new();
        let mut k = 0;
        while started.elapsed() < duration {
            wait_until(started + every * k as u32);
            let (probe, ts) = probes.ping(k);
            k += 1;
            let sent = Instant::now();
            let limit = sent + Duration::from_secs(10);
            while self
                .updated_ts(&agent, &probes.ids[probe])
                .is_none_or(|t| t < ts)
                && Instant::now() < limit
            {
                std::thread::sleep(Duration::from_micros(500));
                probes.producer.poll(Duration::ZERO);
            }
            samples.push(micros(sent.elapsed()));
            if k.is_multiple_of(20) {
                progress.update(&format!(
                    "{k} probes, last {:.1} ms",
                    f64::from(samples[samples.len() - 1]) / 1000.0
                ));
            }
        }
        samples.sort_unstable();
        samples
    }

    /// `updated_ts` of rider `id`, once it is on shift.
    fn updated_ts(&self, agent: &ureq::Agent, id: &str) -> Option<u64> {
        let mut r = agent
            .get(&format!("http://{}/v1/riders/{id}", self.http))
            .call()
            .ok()?;
        if r.status().as_u16() != 200 {
            return None;
        }
        let v: serde_json::Value = r.body_mut().read_json().ok()?;
        v.get("updated_ts")?.as_u64()
    }

    /// For `duration`, a probe ping every `every` (the probes in turn, so that each moves less
    /// often than once a second): each ping's time from produced to received, by a client of
    /// `GET /v1/riders/{probe}/changes` and by a client polling `GET /v1/riders/{probe}` once a
    /// second, as a dashboard does. Returns (feed, polling) latencies in µs, sorted.
    pub fn feed_and_poll(
        &self,
        duration: Duration,
        every: Duration,
        progress: &Progress,
    ) -> (Vec<u32>, Vec<u32>) {
        let mut probes = Probes::start(self);
        let stop = Arc::new(AtomicBool::new(false));
        // Per probe: (ts, when a client received it), as they come.
        type Seen = Arc<std::sync::Mutex<Vec<(u64, Instant)>>>;
        let (fed, polled): (Vec<Seen>, Vec<Seen>) = probes
            .ids
            .iter()
            .map(|_| (Seen::default(), Seen::default()))
            .unzip();
        for (i, id) in probes.ids.iter().enumerate() {
            let url = format!("http://{}/v1/riders/{id}/changes", self.http);
            let (sink, flag) = (fed[i].clone(), stop.clone());
            std::thread::spawn(move || follow_feed(&url, &sink, &flag));
            let sink = polled[i].clone();
            let (flag, phase) = (
                stop.clone(),
                Duration::from_secs(1) * i as u32 / PROBES as u32,
            );
            let (http, id) = (self.http, id.clone());
            std::thread::spawn(move || {
                let (agent, started) = (Self::agent(), Instant::now() + phase);
                let url = format!("http://{http}/v1/riders/{id}");
                for k in 0.. {
                    wait_until(started + Duration::from_secs(k));
                    if flag.load(Ordering::Relaxed) {
                        return;
                    }
                    let ts = agent.get(&url).call().ok().and_then(|mut r| {
                        let v: serde_json::Value = r.body_mut().read_json().ok()?;
                        v.get("updated_ts")?.as_u64()
                    });
                    if let Some(ts) = ts {
                        lock(&sink).push((ts, Instant::now()));
                    }
                }
            });
        }
        let mut sent: Vec<(usize, u64, Instant)> = Vec::new();
        let started = Instant::now();
        let mut k = 0;
        while started.elapsed() < duration {
            wait_until(started + every * k as u32);
            let (probe, ts) = probes.ping(k);
            sent.push((probe, ts, Instant::now()));
            k += 1;
            if k.is_multiple_of(20) {
                progress.update(&format!("{k} pings to the feed and polling clients"));
            }
        }
        // The last pings reach the pollers within their next poll.
        let latency = |seen: &[Seen], probe: usize, ts: u64, at: Instant| {
            lock(&seen[probe])
                .iter()
                .find(|(t, _)| *t >= ts)
                .map(|(_, received)| micros(received.saturating_duration_since(at)))
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline
            && !sent.iter().all(|&(p, ts, at)| {
                latency(&fed, p, ts, at).is_some() && latency(&polled, p, ts, at).is_some()
            })
        {
            std::thread::sleep(Duration::from_millis(50));
            probes.producer.poll(Duration::ZERO);
        }
        stop.store(true, Ordering::Relaxed);
        let collect = |seen: &[Seen]| {
            let mut v: Vec<u32> = sent
                .iter()
                .map(|&(p, ts, at)| latency(seen, p, ts, at).unwrap_or(u32::MAX))
                .collect();
            v.sort_unstable();
            v
        };
        (collect(&fed), collect(&polled))
    }

    /// The engine's CPU over `duration`, in cores (user and system time from `/proc`).
    pub fn cpu(&self, duration: Duration) -> f64 {
        let process = procfs::process::Process::new(self.child.id() as i32).expect("the engine");
        let ticks = || process.stat().map_or(0.0, |s| (s.utime + s.stime) as f64);
        let clock_ticks = procfs::ticks_per_second() as f64;
        let (before, started) = (ticks(), Instant::now());
        std::thread::sleep(duration);
        (ticks() - before) / clock_ticks / started.elapsed().as_secs_f64()
    }

    /// The engine process's id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The sum of the engine's `/metrics` samples whose line starts with `series` (a name, or a
    /// name with the opening of its labels).
    pub fn metric(&self, series: &str) -> Option<f64> {
        let mut r = Self::agent()
            .get(&format!("http://{}/metrics", self.http))
            .call()
            .ok()?;
        let text = r.body_mut().read_to_string().ok()?;
        let values = text
            .lines()
            .filter(|l| l.starts_with(series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        Some(values.sum())
    }

    /// Input records not read yet by the engine, over all partitions (its
    /// `dongflow_consumer_lag_records`): near zero while ingest keeps up with the producer.
    pub fn consumer_lag(&self) -> Option<f64> {
        self.metric("dongflow_consumer_lag_records{")
    }

    /// Runs the load generator against `paths` for `duration`.
    pub fn load(
        &self,
        paths: Vec<String>,
        connections: usize,
        duration: Duration,
    ) -> load::LoadResult {
        load::run(self.http, Arc::new(paths), connections, 1, duration).expect("load run")
    }
}

/// The map at `file` (with the contract's default properties), or the built-in one.
pub fn map(file: Option<&Path>) -> Map {
    let index = match file {
        Some(f) => {
            dongflow_dataflow::districts::DistrictIndex::from_geojson_file(f, "adm_cd2", "adm_nm")
                .expect("the district map loads")
        }
        None => dongflow_dataflow::districts::DistrictIndex::builtin_seoul(),
    };
    Map {
        file: file.map(Path::to_path_buf),
        codes: index.districts().iter().map(|d| d.code.clone()).collect(),
    }
}

/// Probe riders near the city hall, each ping with the wall clock as `ts`, produced at once.
struct Probes {
    producer: BaseProducer,
    ids: Vec<String>,
    last_ts: u64,
}

/// Probe riders of a measurement.
const PROBES: usize = 8;

impl Probes {
    /// Starts every probe's shift and waits until the engine shows each.
    fn start(live: &Live) -> Probes {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &live.bootstrap)
            // Each probe goes out at once: the figure is the engine's, not a producer's batching.
            .set("linger.ms", "0")
            .create()
            .expect("probe producer");
        let probes = Probes {
            producer,
            ids: (0..PROBES).map(|i| format!("probe-{i}")).collect(),
            last_ts: now_ms(),
        };
        for i in 0..PROBES {
            probes.send(i, "SHIFT_STARTED", probes.last_ts);
        }
        let agent = Live::agent();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !probes
            .ids
            .iter()
            .all(|id| live.updated_ts(&agent, id).is_some())
        {
            assert!(Instant::now() < deadline, "probe riders never showed");
            std::thread::sleep(Duration::from_millis(10));
        }
        probes
    }

    fn send(&self, probe: usize, status: &str, ts: u64) {
        let id = &self.ids[probe];
        let value = format!(
            r#"{{"rider_id":"{id}","status":"{status}","location":{{"lat":37.5665,"lon":126.978}},"ts":{ts}}}"#
        );
        self.producer
            .send(BaseRecord::to(TOPICS[0]).key(id).payload(&value))
            .map_err(|(e, _)| e)
            .expect("probe sent");
        self.producer.poll(Duration::ZERO);
    }

    /// Ping `k`: probe `k % PROBES` goes `ON_SHIFT` with a new `ts`; returns the probe and `ts`.
    fn ping(&mut self, k: usize) -> (usize, u64) {
        let ts = now_ms().max(self.last_ts + 1);
        self.last_ts = ts;
        let probe = k % PROBES;
        self.send(probe, "ON_SHIFT", ts);
        (probe, ts)
    }
}

fn wait_until(at: Instant) {
    if let Some(wait) = at.checked_duration_since(Instant::now()) {
        std::thread::sleep(wait);
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Reads a rider feed, keeping each event's `updated_ts` and when it came, until `stop`.
fn follow_feed(url: &str, sink: &std::sync::Mutex<Vec<(u64, Instant)>>, stop: &AtomicBool) {
    // No overall timeout: the stream stays open for the whole measurement.
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let Ok(response) = agent.get(url).call() else {
        return;
    };
    let reader = BufReader::new(response.into_body().into_reader());
    for line in reader.lines().map_while(Result::ok) {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        let ts = serde_json::from_str::<serde_json::Value>(data)
            .ok()
            .and_then(|v| v.get("updated_ts")?.as_u64());
        if let Some(ts) = ts {
            lock(sink).push((ts, Instant::now()));
        }
    }
}
