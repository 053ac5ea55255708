//! The binary as a user meets it: exit codes of CONTRACT section 1, one clear line for bad input,
//! and a demo that serves HTTP and stops cleanly on SIGTERM.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Client;

fn dongflow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dongflow"))
}

#[test]
fn bad_arguments_exit_2_with_one_clear_line() {
    let cases: [(&[&str], &str); 7] = [
        (
            &["run", "--districts", "/no/such/map.geojson"],
            "cannot read district file /no/such/map.geojson",
        ),
        (
            &["run", "--checkpoint-interval", "0s"],
            "`0s` must be more than zero",
        ),
        (
            &["run", "--terminal-ttl", "0"],
            "`0` must be more than zero",
        ),
        // The demo is one process: timely's cluster flags are not among its options.
        (&["demo", "-n", "2"], "unexpected argument '-n'"),
        (
            &["demo", "--districts", "Cargo.toml"],
            "district file is not valid JSON",
        ),
        (&["run", "-w", "0"], "0 is not in 1..=1024"),
        (
            &["run", "--checkpoint-interval", "soon"],
            "is not a duration",
        ),
    ];
    for (args, message) in cases {
        let out = dongflow().args(args).output().expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Kafka properties, token files, TLS files and the HTTP address are checked before anything
/// starts: each bad one is exit 2 with one line, and a secret never shows in it.
#[test]
fn kafka_and_http_options_are_checked_before_anything_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let taken = taken.local_addr().expect("addr").to_string();
    let cases: Vec<(Vec<&str>, &str)> =
        vec![
        (
            vec!["run", "-X", "enable.idempotence=false"],
            "Kafka property `enable.idempotence` cannot be set: the producer must be idempotent",
        ),
        (
            vec!["run", "-X", "isolation.level=read_uncommitted"],
            "Kafka property `isolation.level` cannot be set",
        ),
        (
            vec!["demo", "-X", "enable.auto.commit=true"],
            "Kafka property `enable.auto.commit` cannot be set",
        ),
        (
            vec!["generate", "--brokers", "127.0.0.1:1", "-X", "partitioner=random"],
            "Kafka property `partitioner` cannot be set",
        ),
        (
            vec!["run", "-X", "no.such.property=1"],
            "Kafka property `no.such.property`",
        ),
        (vec!["run", "-X", "linger.ms"], "-X: expected KEY=VALUE"),
        (
            vec!["generate", "--start-ts", "soon"],
            "--start-ts <MS|now>': `soon` is neither `now` nor milliseconds since the Unix epoch",
        ),
        (
            vec![
                "run",
                "-X",
                "sasl.password=hunter2",
                "-X",
                "security.protocol=CARRIER_PIGEON",
            ],
            "Kafka property `security.protocol`",
        ),
        (
            vec!["run", "--kafka-config-file", "/no/such/client.properties"],
            "cannot read Kafka config file /no/such/client.properties",
        ),
        (
            vec!["run", "--http-token-file", "/no/such/tokens"],
            "cannot read token file /no/such/tokens",
        ),
        (
            vec!["run", "--http-tls-cert", "Cargo.toml"],
            "--http-tls-key",
        ),
        (
            vec![
                "run",
                "--http-tls-cert",
                "Cargo.toml",
                "--http-tls-key",
                "Cargo.toml",
            ],
            "cannot read certificate from Cargo.toml",
        ),
        (vec!["run", "--http", "notanaddr"], "cannot listen on notanaddr"),
        (vec!["run", "--http", &taken], "cannot listen on"),
    ];
    for (args, message) in cases {
        let out = dongflow().args(&args).output().expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        if !message.starts_with("--") {
            // clap's own errors add a usage line; ours are one line.
            assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        }
        assert!(!stderr.contains("hunter2"), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// An error's causes are each said once: a state dir that cannot be made exits 1 with one line.
#[test]
fn a_state_dir_that_cannot_be_made_is_one_line_naming_its_cause_once() {
    let out = dongflow()
        .args([
            "run",
            "--http",
            "127.0.0.1:0",
            "--state-dir",
            "Cargo.toml/state",
        ])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.starts_with("dongflow: "))
        .expect("the error line");
    assert_eq!(
        line,
        "dongflow: starting the engine: the state dir cannot be used: Cargo.toml/state: Not a directory (os error 20)"
    );
}

#[test]
fn help_exits_0() {
    let out = dongflow().args(["run", "--help"]).output().expect("runs");
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--hostfile"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("--terminal-ttl"));
    // `demo` takes -h for help and has no cluster flags; both say where the map comes from.
    for help in ["-h", "--help"] {
        let out = dongflow().args(["demo", help]).output().expect("runs");
        assert_eq!(out.status.code(), Some(0));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            !text.contains("--hostfile") && !text.contains("--processes"),
            "{text}"
        );
        assert!(text.contains("builtin:seoul-dongs"), "{text}");
    }
}

#[test]
fn cluster_arguments_are_checked() {
    let cases: [(&[&str], &str); 3] = [
        (&["run", "-n", "2"], "needs --hostfile"),
        (&["run", "-n", "2", "-p", "2"], "is not below --processes"),
        (
            &["run", "-n", "2", "-h", "/no/such/hostfile"],
            "cannot read hostfile",
        ),
    ];
    for (args, message) in cases {
        let out = dongflow().args(args).output().expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(message), "{args:?}: {stderr}");
    }
}

/// Starts the binary, returns it with the lines it printed up to its HTTP URL, and the URL.
/// A `dongflow` child killed when dropped: a test that fails leaves no process behind to slow the
/// tests after it.
struct Spawned(std::process::Child);

impl std::ops::Deref for Spawned {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Spawned {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(
    args: &[&str],
) -> (
    Spawned,
    Vec<String>,
    String,
    std::thread::JoinHandle<Vec<String>>,
) {
    let mut child = dongflow()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("starts");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    let mut seen = Vec::new();
    let url = lines
        .by_ref()
        .map_while(Result::ok)
        .find_map(|l| {
            seen.push(l.clone());
            l.strip_prefix("HTTP: ")
                .and_then(|r| r.split_whitespace().next())
                .map(str::to_string)
        })
        .expect("it prints its HTTP URL");
    // Keep reading stdout so that the child never blocks on a full pipe.
    let reader = std::thread::spawn(move || lines.map_while(Result::ok).collect());
    (
        Spawned(child),
        seen,
        url.trim_end_matches('/').to_string(),
        reader,
    )
}

fn sigterm_exits_0(mut child: Spawned) {
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(killed.success());
    let status = child.wait().expect("exits");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn run_without_brokers_starts_the_embedded_broker() {
    let (child, printed, url, _reader) = start(&["run", "--http", "127.0.0.1:0"]);
    assert!(
        printed
            .iter()
            .any(|l| l.starts_with("Kafka: 127.0.0.1:") && l.ends_with("(embedded)")),
        "prints the embedded broker's address: {printed:?}"
    );
    let client = Client::at(url);
    assert_eq!(client.json("/healthz").0, 200);
    sigterm_exits_0(child);
}

#[test]
fn demo_serves_http_and_stops_cleanly_on_sigterm() {
    let (child, printed, url, reader) = start(&[
        "demo",
        "--http",
        "127.0.0.1:0",
        "--riders",
        "300",
        "--rate",
        "3000",
    ]);
    assert!(
        printed.iter().any(|l| l.starts_with("Kafka: 127.0.0.1:")),
        "the demo prints its broker's address: {printed:?}"
    );
    // The demo's map is Seoul's 425 dongs, shipped in the binary.
    assert!(
        printed.iter().any(|l| l.contains(", 425 districts, ")),
        "the demo runs on the shipped map of Seoul's dongs: {printed:?}"
    );
    let client = Client::at(url);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = client.json("/v1/districts");
        if status == 200 && body["districts"].as_array().is_some_and(|d| !d.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "no districts: {status} {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (status, yeoksam) = client.json("/v1/districts/1168064000");
    assert_eq!(status, 200, "{yeoksam}");
    assert_eq!(yeoksam["name"], "서울특별시 강남구 역삼1동", "{yeoksam}");
    sigterm_exits_0(child);
    assert!(!reader.join().expect("reader").is_empty());
}

/// The embedded broker keeps about 5 MB of each partition and does not compact: the demo's
/// changelog topics are spread over enough partitions that a demo keeps them whole. Here the demo
/// runs at five times its default rate until its rider changelog holds more than four partitions
/// could (the demo's earlier layout lost its first records after about 70,000 a partition), and no
/// partition of either changelog has lost a record: a reader from offset 0 gets every key's latest.
#[test]
fn the_demo_keeps_its_changelog_topics_whole() {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let (child, printed, _url, reader) =
        start(&["demo", "--http", "127.0.0.1:0", "--rate", "10000"]);
    let bootstrap = printed
        .iter()
        .find_map(|l| l.strip_prefix("Kafka: ")?.split_whitespace().next())
        .expect("the demo prints its broker's address")
        .to_owned();
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("a client");
    let partitions = |topic: &str| {
        let metadata = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .expect("metadata");
        metadata.topics()[0].partitions().len() as i32
    };
    let watermarks = |topic: &str| -> Vec<(i64, i64)> {
        (0..partitions(topic))
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(5))
                    .expect("watermarks")
            })
            .collect()
    };
    // More than the old layout held: four partitions of about 70,000 rider records each.
    let needed = 4 * 80_000;
    // A bound, not a duration: the loop ends as soon as enough is written (a loaded machine that
    // runs other tests beside this one writes more slowly).
    let deadline = Instant::now() + Duration::from_secs(480);
    loop {
        let riders = watermarks("rider-changelog");
        let written: i64 = riders.iter().map(|(_, high)| high).sum();
        for topic in ["rider-changelog", "district-changelog"] {
            let lost: Vec<_> = watermarks(topic)
                .into_iter()
                .enumerate()
                .filter(|(_, (low, _))| *low > 0)
                .collect();
            assert!(
                lost.is_empty(),
                "{topic} lost its first records after {written} rider records: {lost:?}"
            );
        }
        if written >= needed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {written} rider changelog records in 480 s"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    sigterm_exits_0(child);
    let printed = reader.join().expect("reader");
    assert!(
        !printed.iter().any(|l| l.starts_with("note: ")),
        "the demo said its broker dropped records: {printed:?}"
    );
}

/// `generate` without `--brokers` writes `TOPIC<TAB>JSON` lines; the same `--seed` gives the same
/// events (the simulated clock starts at a fixed epoch), another seed others; `--start-ts` moves the
/// clock, `now` to the wall clock.
#[test]
fn generate_is_reproducible_with_a_seed() {
    let run = |seed: &str, start: &[&str]| {
        let out = dongflow()
            .args([
                "generate", "--events", "300", "--riders", "50", "--seed", seed,
            ])
            .args(start)
            .output()
            .expect("runs");
        assert_eq!(out.status.code(), Some(0));
        String::from_utf8(out.stdout).expect("UTF-8")
    };
    let first_ts = |out: &str| -> u64 {
        let json = out
            .lines()
            .next()
            .and_then(|l| l.split_once('\t'))
            .expect("a line")
            .1;
        let event: serde_json::Value = serde_json::from_str(json).expect("JSON");
        event["ts"].as_u64().expect("ts")
    };
    let first = run("7", &[]);
    assert_eq!(first.lines().count(), 300);
    for line in first.lines() {
        let (topic, json) = line.split_once('\t').expect("TOPIC<TAB>JSON");
        assert!(
            topic == "rider-events" || topic == "delivery-events",
            "{line}"
        );
        let event: serde_json::Value = serde_json::from_str(json).expect("JSON");
        assert!(
            event["ts"]
                .as_u64()
                .is_some_and(|ts| ts >= 1_767_225_600_000),
            "{line}"
        );
    }
    // 2026-01-01T00:00:00Z, plus the simulator's first steps.
    let start = 1_767_225_600_000;
    assert!(
        (start..start + 60_000).contains(&first_ts(&first)),
        "{}",
        first_ts(&first)
    );
    assert_eq!(run("7", &[]), first, "the same seed gives the same events");
    assert_ne!(run("8", &[]), first, "another seed gives other events");
    let later = run("7", &["--start-ts", "1767225660000"]);
    assert_eq!(
        first_ts(&later) - first_ts(&first),
        60_000,
        "the same events a minute later"
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    let now = first_ts(&run("7", &["--start-ts", "now"]));
    assert!(now.abs_diff(now_ms) < 60_000, "{now} is not now ({now_ms})");
}
