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
        let specs: Vec<TopicSpec> = TOPICS
            .iter()
            .map(|t| TopicSpec::new(t, PARTITIONS))
            .collect();
        let broker = EmbeddedBroker::start(&specs).expect("embedded broker");
        let bootstrap = broker.bootstrap();
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
        let mut live = Live {
            _broker: broker,
            bootstrap,
            child,
            http,
            ingest: None,
            _dir: TempDir(dir),
        };
        live.wait_for("/readyz", Duration::from_secs(60));
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
        const PROBES: usize = 8;
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            // Each probe goes out at once: the figure is the engine's, not a producer's batching.
            .set("linger.ms", "0")
            .create()
            .expect("probe producer");
        let agent = Self::agent();
        let send = |id: &str, status: &str, ts: u64| {
            let value = format!(
                r#"{{"rider_id":"{id}","status":"{status}","location":{{"lat":37.5665,"lon":126.978}},"ts":{ts}}}"#
            );
            producer
                .send(BaseRecord::to(TOPICS[0]).key(id).payload(&value))
                .map_err(|(e, _)| e)
                .expect("probe sent");
            producer.poll(Duration::ZERO);
        };
        // `updated_ts` of a probe rider, once it is on shift.
        let seen = |id: &str| -> Option<u64> {
            let mut r = agent
                .get(&format!("http://{}/v1/riders/{id}", self.http))
                .call()
                .ok()?;
            if r.status().as_u16() != 200 {
                return None;
            }
            let v: serde_json::Value = r.body_mut().read_json().ok()?;
            v.get("updated_ts")?.as_u64()
        };
        let ids: Vec<String> = (0..PROBES).map(|i| format!("probe-{i}")).collect();
        let mut last_ts = now_ms();
        for id in &ids {
            send(id, "SHIFT_STARTED", last_ts);
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ids.iter().all(|id| seen(id).is_some()) {
            assert!(Instant::now() < deadline, "probe riders never showed");
            std::thread::sleep(Duration::from_millis(10));
        }
        let started = Instant::now();
        let mut samples = Vec::new();
        let mut k = 0;
        while started.elapsed() < duration {
            let slot = started + every * k as u32;
            if let Some(wait) = slot.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let id = &ids[k % PROBES];
            k += 1;
            let ts = now_ms().max(last_ts + 1);
            last_ts = ts;
            let sent = Instant::now();
            send(id, "ON_SHIFT", ts);
            let limit = sent + Duration::from_secs(10);
            while seen(id).is_none_or(|t| t < ts) && Instant::now() < limit {
                std::thread::sleep(Duration::from_micros(500));
                producer.poll(Duration::ZERO);
            }
            samples.push(sent.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
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

    /// Input records not read yet by the engine, over all partitions (its
    /// `dongflow_consumer_lag_records`): near zero while ingest keeps up with the producer.
    pub fn consumer_lag(&self) -> Option<f64> {
        let mut r = Self::agent()
            .get(&format!("http://{}/metrics", self.http))
            .call()
            .ok()?;
        let text = r.body_mut().read_to_string().ok()?;
        let lags = text
            .lines()
            .filter(|l| l.starts_with("dongflow_consumer_lag_records{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
        Some(lags.sum())
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
