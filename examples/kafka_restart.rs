//! Restart figures through a real broker:
//! `cargo run --release --example kafka_restart -- BOOTSTRAP [RIDERS] [DELIVERIES] [RUNS]`.
//!
//! Produces RIDERS rider and DELIVERIES delivery events (one each: riders on shift, active
//! deliveries) to fresh topics with 4 partitions, runs the `dongflow` binary beside this example
//! (`target/release/dongflow run -w 2`) from the earliest offsets until ready with every rider
//! published, and stops it cleanly (the last checkpoint). Then, RUNS times each:
//! - a restart from the checkpoint: time from process start to the first answer for a rider (stale,
//!   from the checkpoint's view) and to `/readyz` 200;
//! - a restart with an empty state dir that replays the input topics from the beginning: time to
//!   `/readyz` 200;
//! - a restart from a copy of the checkpoint without its publishing mark, as after a crash: time to
//!   the first answer, to `/readyz` 200, and until every rider is published again (the changelog
//!   read back first, to clear what a crashed run may have left).
//!
//! Prints JSON: checkpoint size, medians (min, max), peak RSS of the processes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dongflow_connectors::kafka::{create_topics, TopicSpec};
use dongflow_connectors::simulator::{fixed_state, SimEvent};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

const PARTITIONS: i32 = 4;

struct Topics {
    riders: String,
    deliveries: String,
    districts: String,
    snapshots: String,
    dlq: String,
}

fn produce(bootstrap: &str, topics: &Topics, events: &[SimEvent]) -> f64 {
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
        let topic = match event {
            SimEvent::Rider(_) => &topics.riders,
            SimEvent::Delivery(_) => &topics.deliveries,
        };
        let payload = event.encode();
        let key = event.key().as_bytes().to_vec();
        let mut record = BaseRecord::to(topic).key(&key[..]).payload(&payload[..]);
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(600))
        .expect("every event delivered");
    events.len() as f64 / started.elapsed().as_secs_f64()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

struct Run {
    child: Child,
    /// The process's log, each line with the seconds since it started.
    log: std::sync::Arc<std::sync::Mutex<String>>,
    http: String,
    started: Instant,
    agent: ureq::Agent,
}

impl Run {
    fn start(bin: &Path, bootstrap: &str, t: &Topics, state: &Path, from: &str) -> Run {
        let http = format!("127.0.0.1:{}", free_port());
        let state = state.to_string_lossy().into_owned();
        let args = [
            "run",
            "--brokers",
            bootstrap,
            "-w",
            "2",
            "--rider-topic",
            &t.riders,
            "--delivery-topic",
            &t.deliveries,
            "--district-changelog-topic",
            &t.districts,
            "--rider-changelog-topic",
            &t.snapshots,
            "--dead-letter-topic",
            &t.dlq,
            "--group-id",
            &t.riders,
            "--state-dir",
            &state,
            "--checkpoint-interval",
            "1h",
            "--start-from",
            from,
            "--http",
            &http,
        ];
        let started = Instant::now();
        let mut child = Command::new(bin)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dongflow starts");
        // Read as it comes, so that a full pipe never holds the process up.
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
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
            http,
            started,
            agent,
        }
    }

    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut r = self
            .agent
            .get(&format!("http://{}{path}", self.http))
            .call()
            .ok()?;
        Some((r.status().as_u16(), r.body_mut().read_to_string().ok()?))
    }

    /// Time from process start until `f` holds, polled every 5 ms.
    fn until(&self, what: &str, limit: Duration, mut f: impl FnMut(&Run) -> bool) -> Duration {
        loop {
            if f(self) {
                return self.started.elapsed();
            }
            assert!(
                self.started.elapsed() < limit,
                "timed out waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn metric(&self, name: &str) -> f64 {
        self.get("/metrics")
            .and_then(|(_, text)| {
                text.lines()
                    .find(|l| l.starts_with(name))?
                    .rsplit_once(' ')?
                    .1
                    .parse()
                    .ok()
            })
            .unwrap_or(0.0)
    }

    /// Peak resident memory of the process so far, in bytes.
    fn peak_rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmHWM:"))?.to_owned();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            })
            .map_or(0, |kb| kb * 1024)
    }

    /// SIGTERM, then waits for the exit (the last checkpoint is written on the way out).
    fn terminate(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let status = self.child.wait().expect("exit");
        let log = self.log.lock().unwrap_or_else(|e| e.into_inner()).clone();
        assert!(status.success(), "dongflow exited with {status}:\n{log}");
        log
    }
}

fn ready(r: &Run) -> bool {
    r.get("/readyz").is_some_and(|(s, _)| s == 200)
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    let round = |x: f64| (x * 1000.0).round() / 1000.0;
    serde_json::json!({
        "median": round(v[v.len() / 2]),
        "min": round(v[0]),
        "max": round(v[v.len() - 1]),
    })
}

fn dir_bytes(dir: &Path) -> u64 {
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

/// Copies a state dir, but for its publishing marks: a checkpoint as a crash leaves it.
fn copy_unmarked(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("state dir copy");
    for e in std::fs::read_dir(from).expect("state dir").flatten() {
        let (path, name) = (e.path(), e.file_name());
        if path.is_dir() {
            copy_unmarked(&path, &to.join(&name));
        } else if !name.to_string_lossy().ends_with(".published.json") {
            std::fs::copy(&path, to.join(&name)).expect("checkpoint file copied");
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bootstrap = args
        .get(1)
        .expect("usage: kafka_restart BOOTSTRAP [RIDERS] [DELIVERIES] [RUNS]");
    let number =
        |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (riders, deliveries, runs) = (number(2, 1_000_000), number(3, 200_000), number(4, 3));
    let bin: PathBuf = std::env::current_exe()
        .expect("own path")
        .parent()
        .and_then(Path::parent)
        .expect("target/release")
        .join("dongflow");
    assert!(
        bin.exists(),
        "build the binary first: cargo build --release"
    );
    let tag = std::process::id();
    let t = Topics {
        riders: format!("restart-riders-{tag}"),
        deliveries: format!("restart-deliveries-{tag}"),
        districts: format!("restart-districts-{tag}"),
        snapshots: format!("restart-snapshots-{tag}"),
        dlq: format!("restart-dlq-{tag}"),
    };
    let specs = [
        TopicSpec::new(&t.riders, PARTITIONS),
        TopicSpec::new(&t.deliveries, PARTITIONS),
        TopicSpec::compacted(&t.districts, PARTITIONS),
        TopicSpec::compacted(&t.snapshots, PARTITIONS),
        TopicSpec::new(&t.dlq, PARTITIONS),
    ];
    create_topics(&bootstrap.as_str().into(), &specs, Duration::from_secs(30)).expect("topics");
    let events: Vec<SimEvent> = fixed_state(riders, deliveries).collect();
    let produce_rate = produce(bootstrap, &t, &events);
    drop(events);
    eprintln!(
        "produced {} events at {produce_rate:.0}/s",
        riders + deliveries
    );

    let root = std::env::temp_dir().join(format!("dongflow-kafka-restart-{tag}"));
    let state = root.join("state");
    let long = Duration::from_secs(1800);
    let mut peak_rss = 0;

    // The first run builds the state and publishes every rider, then stops: the last checkpoint.
    let run = Run::start(&bin, bootstrap, &t, &state, "earliest");
    let first_ready = run.until("the first run to be ready", long, ready);
    run.until("every rider published", long, |r| {
        r.metric("dongflow_output_records_written_total{output=\"rider_changelog\"}")
            >= riders as f64
    });
    peak_rss = peak_rss.max(run.peak_rss());
    run.terminate();
    let checkpoint_bytes = dir_bytes(&state);
    eprintln!("first run ready after {first_ready:?}; checkpoint {checkpoint_bytes} bytes");

    let probe = format!("/v1/riders/r-{}", riders / 2);
    let (mut first_answer, mut restore_ready, mut replay_ready) = (vec![], vec![], vec![]);
    let (mut crash_answer, mut crash_ready, mut crash_published) = (vec![], vec![], vec![]);
    let mut first_answer_stale = true;
    for i in 0..runs {
        let run = Run::start(&bin, bootstrap, &t, &state, "checkpoint");
        let mut stale = false;
        let answered = run.until("a first answer", long, |r| {
            r.get(&probe).is_some_and(|(s, body)| {
                stale = body.contains("\"stale\":true");
                s == 200
            })
        });
        first_answer_stale &= stale;
        let ready_after = run.until("ready after the restore", long, ready);
        eprintln!(
            "restore {i}: at ready, producer queue-full waits {}, changelog records written {}",
            run.metric("dongflow_producer_queue_full_waits_total"),
            run.metric("dongflow_output_records_written_total{output=\"rider_changelog\"}")
        );
        peak_rss = peak_rss.max(run.peak_rss());
        let log = run.terminate();
        if std::env::var_os("KAFKA_RESTART_LOG").is_some() {
            eprintln!("{log}");
        }
        eprintln!("restore {i}: first answer {answered:?} (stale {stale}), ready {ready_after:?}");
        first_answer.push(answered.as_secs_f64());
        restore_ready.push(ready_after.as_secs_f64());

        let fresh = root.join(format!("replay-{i}"));
        let run = Run::start(&bin, bootstrap, &t, &fresh, "earliest");
        let ready_after = run.until("ready after the replay", long, ready);
        peak_rss = peak_rss.max(run.peak_rss());
        run.terminate();
        eprintln!("replay {i}: ready {ready_after:?}");
        replay_ready.push(ready_after.as_secs_f64());

        let unmarked = root.join(format!("unmarked-{i}"));
        copy_unmarked(&state, &unmarked);
        let run = Run::start(&bin, bootstrap, &t, &unmarked, "checkpoint");
        let answered = run.until("a first answer", long, |r| {
            r.get(&probe).is_some_and(|(s, _)| s == 200)
        });
        let ready_after = run.until("ready after the unmarked restore", long, ready);
        let published = run.until("every rider published again", long, |r| {
            r.metric("dongflow_output_records_written_total{output=\"rider_changelog\"}")
                >= riders as f64
        });
        peak_rss = peak_rss.max(run.peak_rss());
        let log = run.terminate();
        assert!(log.contains("its state is republished"), "{log}");
        eprintln!(
            "unmarked restore {i}: first answer {answered:?}, ready {ready_after:?}, every rider \
             published again {published:?}"
        );
        crash_answer.push(answered.as_secs_f64());
        crash_ready.push(ready_after.as_secs_f64());
        crash_published.push(published.as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&root);
    let out = serde_json::json!({
        "riders": riders,
        "active_deliveries": deliveries,
        "workers": 2,
        "partitions": PARTITIONS,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "produce_events_per_s": produce_rate.round(),
        "checkpoint_bytes": checkpoint_bytes,
        "first_run_ready_s": first_ready.as_secs_f64(),
        "restore_first_rider_answer_s": stats(first_answer),
        "restore_first_answer_was_stale": first_answer_stale,
        "restore_ready_s": stats(restore_ready),
        "replay_ready_s": stats(replay_ready),
        "unmarked_restore_first_rider_answer_s": stats(crash_answer),
        "unmarked_restore_ready_s": stats(crash_ready),
        "unmarked_restore_republished_s": stats(crash_published),
        "peak_rss_bytes": peak_rss,
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
