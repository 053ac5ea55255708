//! Cluster restart figures on hosts of their own (root, iproute2 and tansu needed):
//! `cargo run --release --example cluster_restart -- [RIDERS] [DELIVERIES] [RUNS]`.
//!
//! Two network namespaces on a bridge, tansu listening on the bridge's address, RIDERS riders on
//! shift and DELIVERIES active deliveries produced (defaults: 1M and 200k). A cluster of 2
//! processes × 2 workers, one in each namespace with its own state dir, builds the state from the
//! earliest offsets, publishes every rider and writes a scheduled checkpoint. Then RUNS times, in
//! turn:
//! - `kill -9` of process 1 (process 0 exits 1 by itself), and a restart of both: time from spawn
//!   to each process's first answer for a rider (stale), until both answer `/readyz` 200, and
//!   until their changelog is reconciled with the state (with the rider records written again);
//! - one process `-w 2` restoring the same checkpoint (both parts copied into one state dir, as a
//!   shared folder restores any shape), also as after a kill: the same times; then `kill -9`.
//!
//! Prints JSON: medians (min, max), records read at ready, peak RSS.

#[path = "../tests/common/netns.rs"]
#[allow(dead_code)] // the link cuts are for the tests
mod netns;

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{copy_dir, dir_bytes, produce, ready, stats, Run, Topics};
use dongflow_connectors::simulator::fixed_state;

const PROCESSES: usize = 2;
const TIMELY_PORT: u16 = 7000;
const HTTP_PORT: u16 = 8080;
const TANSU_PORT: u16 = 9092;

/// Tansu on the bridge's address, killed on drop.
struct Tansu(Child);

impl Tansu {
    fn start(host: &str, dir: &Path) -> Tansu {
        std::fs::create_dir_all(dir).expect("tansu dir");
        let url = format!("tcp://{host}:{TANSU_PORT}");
        let log = std::fs::File::create(dir.join("tansu.log")).expect("tansu log");
        let child = Command::new(std::env::var("TANSU").unwrap_or_else(|_| "tansu".into()))
            .current_dir(dir)
            .args(["broker", "--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("tansu starts (cargo install tansu --locked --features dynostore,libsql)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((host, TANSU_PORT)).is_err() {
            assert!(Instant::now() < deadline, "tansu never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        Tansu(child)
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The cluster's fixed shape: addresses, hostfile, state dirs.
struct Shape<'a> {
    net: &'a netns::Net,
    hostfile: PathBuf,
    peers: String,
    dirs: Vec<PathBuf>,
}

impl Shape<'_> {
    fn http(&self, p: usize) -> String {
        format!("{}:{HTTP_PORT}", self.net.ip(p))
    }

    /// Every process, each in its namespace.
    fn start(&self, bin: &Path, bootstrap: &str, t: &Topics, from: &str, every: &str) -> Vec<Run> {
        (0..PROCESSES)
            .map(|p| {
                let mut args = t.run_args(bootstrap, "cluster", &self.dirs[p], from);
                let process = p.to_string();
                let n = PROCESSES.to_string();
                let hostfile = self.hostfile.to_string_lossy();
                args.extend(
                    [
                        "-n",
                        &n,
                        "-p",
                        &process,
                        "-h",
                        &hostfile,
                        "--http-peers",
                        &self.peers,
                        "--checkpoint-interval",
                        every,
                    ]
                    .map(str::to_owned),
                );
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", &self.net.namespace(p)])
                    .arg(bin);
                Run::spawn(command, &args, &self.http(p))
            })
            .collect()
    }
}

fn checkpoint_time(r: &Run) -> f64 {
    r.metric("dongflow_checkpoint_last_time_seconds")
}

fn records_read(r: &Run) -> f64 {
    r.metric("dongflow_kafka_records_read_total")
}

/// Seconds from the process's start until its changelog is reconciled with its caught-up state.
fn reconciled(r: &Run) -> f64 {
    r.until("the changelog reconciled", Duration::from_secs(1800), |r| {
        r.sample("dongflow_changelog_unreconciled_topics") == Some(0.0)
    })
    .as_secs_f64()
}

fn riders_published(r: &Run) -> f64 {
    r.metric("dongflow_output_records_written_total{output=\"rider_changelog\"}")
}

/// The time a process's log says it restored.
fn restored(log: &str) -> String {
    log.lines()
        .find_map(|l| l.split("restoring checkpoint ").nth(1))
        .and_then(|rest| rest.split([' ', ':']).next())
        .unwrap_or("none")
        .to_owned()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let number =
        |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (riders, deliveries, runs) = (number(1, 1_000_000), number(2, 200_000), number(3, 3));
    let bin = common::dongflow_binary();
    let net = netns::Net::create(PROCESSES).expect("network namespaces (run as root)");
    let tag = std::process::id();
    let root = std::env::temp_dir().join(format!("dongflow-cluster-restart-{tag}"));
    // Tansu resolves its storage path against its working dir.
    let _tansu = Tansu::start(&net.host_ip(), &root.join("tansu"));
    let bootstrap = format!("{}:{TANSU_PORT}", net.host_ip());
    let t = Topics::create(&bootstrap, "cluster");
    let events: Vec<_> = fixed_state(riders, deliveries).collect();
    let produce_rate = produce(&bootstrap, &t, &events);
    drop(events);
    eprintln!(
        "produced {} events at {produce_rate:.0}/s",
        riders + deliveries
    );

    let hostfile = root.join("hosts");
    let hosts: String = (0..PROCESSES)
        .map(|p| format!("{}:{TIMELY_PORT}\n", net.ip(p)))
        .collect();
    std::fs::write(&hostfile, hosts).expect("hostfile");
    let shape = Shape {
        net: &net,
        hostfile,
        peers: (0..PROCESSES)
            .map(|p| format!("http://{}:{HTTP_PORT}", net.ip(p)))
            .collect::<Vec<_>>()
            .join(","),
        dirs: (0..PROCESSES)
            .map(|p| root.join(format!("process-{p}")))
            .collect(),
    };
    let long = Duration::from_secs(1800);
    let mut peak_rss = [0u64; PROCESSES + 1];

    // The first run builds the state, publishes every rider, and writes a checkpoint after that.
    let cluster = shape.start(&bin, &bootstrap, &t, "earliest", "20s");
    for r in &cluster {
        r.until("the first run to be ready", long, ready);
    }
    let first_ready = cluster[0].started.elapsed();
    cluster[0].until("every rider published", long, |_| {
        cluster.iter().map(riders_published).sum::<f64>() >= riders as f64
    });
    let before: Vec<f64> = cluster.iter().map(checkpoint_time).collect();
    for (r, before) in cluster.iter().zip(&before) {
        r.until("a checkpoint after publishing", long, |r| {
            checkpoint_time(r) > *before
        });
    }
    eprintln!("first run ready after {first_ready:?}");

    let probe = format!("/v1/riders/r-{}", riders / 2);
    let first_answer = |r: &Run| {
        let mut stale = false;
        let at = r.until("a first answer", long, |r| {
            r.get(&probe).is_some_and(|(s, body)| {
                stale = body.contains("\"stale\":true");
                s == 200
            })
        });
        (at.as_secs_f64(), stale)
    };
    let mut fail_stop = vec![];
    let (mut cluster_answer, mut cluster_ready, mut cluster_read) = (vec![], vec![], vec![]);
    let (mut single_answer, mut single_ready, mut single_read) = (vec![], vec![], vec![]);
    let (mut cluster_reconciled, mut cluster_written) = (vec![], vec![]);
    let (mut single_reconciled, mut single_written) = (vec![], vec![]);
    let mut all_stale = true;
    let mut times = vec![];
    let mut cluster = cluster;
    for i in 0..runs {
        // kill -9 of process 1; process 0 sees it and exits 1 by itself.
        let mut running = cluster.into_iter();
        let (survivor, victim) = (running.next().expect("p0"), running.next().expect("p1"));
        peak_rss[0] = peak_rss[0].max(survivor.peak_rss());
        peak_rss[1] = peak_rss[1].max(victim.peak_rss());
        let killed = Instant::now();
        victim.kill();
        let (code, log) = survivor.exit_code(Duration::from_secs(10));
        assert_eq!(code, Some(1), "process 0 exits 1:\n{log}");
        fail_stop.push(killed.elapsed().as_secs_f64());
        let changelogs = [t.districts.as_str(), t.snapshots.as_str()];
        eprintln!(
            "broker settled in {:?}",
            common::settle(&bootstrap, &changelogs)
        );

        // The single process first (the cluster's parts are as the kill left them).
        let single_dir = root.join(format!("single-{i}"));
        for dir in &shape.dirs {
            copy_dir(dir, &single_dir, &|_| true);
        }
        let mut args = t.run_args(&bootstrap, "single", &single_dir, "checkpoint");
        args.extend(["--checkpoint-interval".to_owned(), "1h".to_owned()]);
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &net.namespace(0)]).arg(&bin);
        let single = Run::spawn(command, &args, &shape.http(0));
        let (answered, stale) = first_answer(&single);
        all_stale &= stale;
        let ready_at = single.until("the single process ready", long, ready);
        single_answer.push(answered);
        single_ready.push(ready_at.as_secs_f64());
        single_read.push(records_read(&single));
        single_reconciled.push(reconciled(&single));
        single_written.push(riders_published(&single));
        peak_rss[2] = peak_rss[2].max(single.peak_rss());
        let log = single.kill();
        times.push(restored(&log));
        eprintln!(
            "broker settled in {:?}",
            common::settle(&bootstrap, &changelogs)
        );
        eprintln!("single {i}: first answer {answered:.3} s (stale {stale}), ready {ready_at:?}");
        let _ = std::fs::remove_dir_all(&single_dir);

        let restarted = shape.start(&bin, &bootstrap, &t, "checkpoint", "1h");
        let answers: Vec<(f64, bool)> = restarted.iter().map(first_answer).collect();
        for r in &restarted {
            r.until("the cluster ready", long, ready);
        }
        let ready_at = restarted[0].started.elapsed();
        let answered = answers.iter().map(|a| a.0).fold(0.0, f64::max);
        all_stale &= answers.iter().all(|a| a.1);
        cluster_answer.push(answered);
        cluster_ready.push(ready_at.as_secs_f64());
        cluster_read.push(restarted.iter().map(records_read).sum::<f64>());
        let reconciled_at = restarted.iter().map(reconciled).fold(0.0, f64::max);
        cluster_reconciled.push(reconciled_at);
        cluster_written.push(restarted.iter().map(riders_published).sum::<f64>());
        let logs: Vec<String> = restarted.iter().map(Run::log).collect();
        if std::env::var_os("CLUSTER_RESTART_LOG").is_some() {
            eprintln!("{}", logs.join("\n"));
        }
        times.extend(logs.iter().map(|l| restored(l)));
        eprintln!("cluster {i}: first answers {answers:?}, both ready {ready_at:?}");
        cluster = restarted;
    }
    for r in cluster {
        r.kill();
    }
    times.dedup();
    assert_eq!(times.len(), 1, "every restart restored one time: {times:?}");
    // The restored checkpoint, whole in each state dir once the processes shared their parts.
    let checkpoint_bytes = dir_bytes(&shape.dirs[0].join(format!("checkpoint-{:0>20}", times[0])));
    if std::env::var_os("CLUSTER_RESTART_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }
    let out = serde_json::json!({
        "riders": riders,
        "active_deliveries": deliveries,
        "cluster": "2 processes x 2 workers, a network namespace each",
        "single": "1 process x 2 workers",
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "produce_events_per_s": produce_rate.round(),
        "checkpoint_bytes": checkpoint_bytes,
        "restored_time": times[0],
        "first_run_ready_s": first_ready.as_secs_f64(),
        "fail_stop_exit_after_kill_s": stats(fail_stop),
        "cluster_first_rider_answer_s": stats(cluster_answer),
        "cluster_ready_s": stats(cluster_ready),
        "cluster_records_read_at_ready": stats(cluster_read),
        "single_first_rider_answer_s": stats(single_answer),
        "single_ready_s": stats(single_ready),
        "single_records_read_at_ready": stats(single_read),
        "cluster_changelog_reconciled_s": stats(cluster_reconciled),
        "cluster_rider_records_written_again": cluster_written,
        "single_changelog_reconciled_s": stats(single_reconciled),
        "single_rider_records_written_again": single_written,
        "first_answers_were_stale": all_stale,
        "peak_rss_bytes": { "process_0": peak_rss[0], "process_1": peak_rss[1], "single": peak_rss[2] },
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
