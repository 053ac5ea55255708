//! What the examples that run the `dongflow` binary against a broker share: fresh topics, a bulk
//! producer, a child process with its log and HTTP API, medians.
//! (A folder without `main.rs`, so that cargo does not take it for an example of its own.)

#![allow(dead_code)] // each example uses a part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dongflow_connectors::kafka::generate::send_event;
use dongflow_connectors::kafka::{create_topics, TopicSpec};
use dongflow_connectors::simulator::SimEvent;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, Producer};

pub const PARTITIONS: i32 = 4;

/// A run's topics, named after `prefix` and this process's id.
pub struct Topics {
    pub riders: String,
    pub deliveries: String,
    pub districts: String,
    pub snapshots: String,
    pub dlq: String,
}

impl Topics {
    /// Creates the topics (`PARTITIONS` each, changelogs compacted).
    pub fn create(bootstrap: &str, prefix: &str) -> Topics {
        let tag = std::process::id();
        let t = Topics {
            riders: format!("{prefix}-riders-{tag}"),
            deliveries: format!("{prefix}-deliveries-{tag}"),
            districts: format!("{prefix}-districts-{tag}"),
            snapshots: format!("{prefix}-snapshots-{tag}"),
            dlq: format!("{prefix}-dlq-{tag}"),
        };
        let specs = [
            TopicSpec::new(&t.riders, PARTITIONS),
            TopicSpec::new(&t.deliveries, PARTITIONS),
            TopicSpec::compacted(&t.districts, PARTITIONS),
            TopicSpec::compacted(&t.snapshots, PARTITIONS),
            TopicSpec::new(&t.dlq, PARTITIONS),
        ];
        create_topics(&bootstrap.into(), &specs, Duration::from_secs(30)).expect("topics");
        t
    }

    /// `dongflow run` arguments for these topics: `-w 2`, the group `group`, the state dir `state`,
    /// starting from `from`.
    pub fn run_args(&self, bootstrap: &str, group: &str, state: &Path, from: &str) -> Vec<String> {
        [
            "run",
            "--brokers",
            bootstrap,
            "-w",
            "2",
            "--rider-topic",
            &self.riders,
            "--delivery-topic",
            &self.deliveries,
            "--district-changelog-topic",
            &self.districts,
            "--rider-changelog-topic",
            &self.snapshots,
            "--dead-letter-topic",
            &self.dlq,
            "--group-id",
            group,
            "--state-dir",
            &state.to_string_lossy(),
            "--start-from",
            from,
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

/// Waits until the broker has taken in everything sent to `topics` (a process killed with a
/// backlog of produce requests leaves the broker busy for a while): their end offsets unchanged
/// over a second. Returns how long that took.
pub fn settle(bootstrap: &str, topics: &[&str]) -> Duration {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "settle")
        .create()
        .expect("consumer");
    let ends = || -> Vec<i64> {
        topics
            .iter()
            .flat_map(|t| (0..PARTITIONS).map(move |p| (*t, p)))
            .map(|(t, p)| {
                consumer
                    .fetch_watermarks(t, p, Duration::from_secs(60))
                    .map_or(-1, |(_, high)| high)
            })
            .collect()
    };
    let started = Instant::now();
    let mut last = ends();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = ends();
        if now == last {
            return started.elapsed();
        }
        last = now;
    }
}

/// Produces `events` to their topics; returns events per second.
pub fn produce(bootstrap: &str, topics: &Topics, events: &[SimEvent]) -> f64 {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // Large batches: this is a bulk load.
        .set("linger.ms", "50")
        .set("batch.size", "4000000")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    let started = Instant::now();
    for event in events {
        send_event(&producer, event, &topics.riders, &topics.deliveries).expect("event sent");
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(600))
        .expect("every event delivered");
    events.len() as f64 / started.elapsed().as_secs_f64()
}

/// The `dongflow` binary beside the running example (`target/release/dongflow`).
pub fn dongflow_binary() -> PathBuf {
    let bin = std::env::current_exe()
        .expect("own path")
        .parent()
        .and_then(Path::parent)
        .expect("target/release")
        .join("dongflow");
    assert!(
        bin.exists(),
        "build the binary first: cargo build --release"
    );
    bin
}

/// A port nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A `dongflow` process, its log and its HTTP API.
pub struct Run {
    child: Child,
    /// The process's log, each line with the seconds since it started.
    log: Arc<Mutex<String>>,
    http: String,
    pub started: Instant,
    agent: ureq::Agent,
}

impl Run {
    /// Starts `command` (the binary, or `ip netns exec NS` and the binary) with `args` and
    /// `--http http`.
    pub fn spawn(mut command: Command, args: &[String], http: &str) -> Run {
        let started = Instant::now();
        // Extra arguments for every run, for experiments (`DONGFLOW_EXTRA_ARGS="-X key=value"`).
        let extra = std::env::var("DONGFLOW_EXTRA_ARGS").unwrap_or_default();
        let mut child = command
            .args(args)
            .args(extra.split_whitespace())
            .args(["--http", http])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dongflow starts");
        // Read as it comes, so that a full pipe never holds the process up.
        let log = Arc::new(Mutex::new(String::new()));
        let (err, sink) = (child.stderr.take().expect("stderr"), log.clone());
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                let stamped = format!("{:8.3} {line}\n", started.elapsed().as_secs_f64());
                sink.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push_str(&stamped);
            }
        });
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(5)))
            .build()
            .into();
        Run {
            child,
            log,
            http: http.to_owned(),
            started,
            agent,
        }
    }

    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut r = self
            .agent
            .get(&format!("http://{}{path}", self.http))
            .call()
            .ok()?;
        Some((r.status().as_u16(), r.body_mut().read_to_string().ok()?))
    }

    /// Time from process start until `f` holds, polled every 5 ms.
    pub fn until(&self, what: &str, limit: Duration, mut f: impl FnMut(&Run) -> bool) -> Duration {
        loop {
            if f(self) {
                return self.started.elapsed();
            }
            assert!(
                self.started.elapsed() < limit,
                "timed out waiting for {what}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A counter's value, 0 until `/metrics` shows it.
    pub fn metric(&self, name: &str) -> f64 {
        self.sample(name).unwrap_or(0.0)
    }

    /// One sample of `/metrics`, `None` while the process does not answer or does not show it.
    pub fn sample(&self, name: &str) -> Option<f64> {
        self.get("/metrics").and_then(|(_, text)| {
            text.lines()
                .find(|l| l.starts_with(name))?
                .rsplit_once(' ')?
                .1
                .parse()
                .ok()
        })
    }

    /// Peak resident memory of the process so far, in bytes.
    pub fn peak_rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kb| kb * 1024)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// SIGTERM, then waits for the exit (the last checkpoint is written on the way out).
    pub fn terminate(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("exit");
        let log = self.log();
        assert!(status.success(), "dongflow exited with {status}:\n{log}");
        log
    }

    /// `kill -9`, as a crash.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log()
    }

    /// Waits for an exit the process makes by itself; returns its code.
    pub fn exit_code(mut self, limit: Duration) -> (Option<i32>, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status.code(), self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the process did not exit:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

pub fn ready(r: &Run) -> bool {
    r.get("/readyz").is_some_and(|(s, _)| s == 200)
}

/// Median, min and max, in the figures' JSON form.
pub fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    serde_json::json!({
        "median": round(v[v.len() / 2]),
        "min": round(v[0]),
        "max": round(v[v.len() - 1]),
    })
}

pub fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Copies the files of `from` whose names `keep` accepts into `to`, merging folders.
pub fn copy_dir(from: &Path, to: &Path, keep: &dyn Fn(&str) -> bool) {
    std::fs::create_dir_all(to).expect("state dir copy");
    for e in std::fs::read_dir(from).expect("state dir").flatten() {
        let (path, name) = (e.path(), e.file_name());
        if path.is_dir() {
            copy_dir(&path, &to.join(&name), keep);
        } else if keep(&name.to_string_lossy()) {
            std::fs::copy(&path, to.join(&name)).expect("checkpoint file copied");
        }
    }
}
