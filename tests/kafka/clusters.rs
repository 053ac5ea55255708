//! Clusters whose processes keep their own state dirs (CONTRACT section 7): a restart of the same
//! shape restores every process from its own part of one checkpoint, agreed through the dataflow,
//! and reads only what came after it; a clean stop of every process leaves a checkpoint the next
//! start restores without reading anything again; readiness means the whole cluster's input;
//! a process that loses a peer answers `/readyz` 503 and exits 1 within 5 s.

use std::time::Instant;

use super::*;

/// The processes of one cluster: each with its own state dir, HTTP port and timely port.
pub(crate) struct Cluster {
    processes: Vec<Option<Dongflow>>,
    http: Vec<String>,
    dirs: Vec<String>,
    hostfile: String,
    peers: String,
    /// The network namespace of each process, when they have hosts of their own.
    netns: Option<Vec<String>>,
}

impl Cluster {
    /// Ports reserved for `n` processes (no parallel test can take them) and a state dir for each
    /// under `state`.
    pub(crate) fn new(state: &str, n: usize) -> Cluster {
        let hosts: String = (0..n)
            .map(|_| format!("127.0.0.1:{}\n", free_port()))
            .collect();
        let http: Vec<String> = (0..n)
            .map(|_| format!("127.0.0.1:{}", free_port()))
            .collect();
        Self::with_addresses(state, &hosts, http, None)
    }

    /// A process on each host of `net`, binding that host's own address (its ports are its own:
    /// nothing else is in its namespace).
    pub(crate) fn in_namespaces(state: &str, net: &common::netns::Net, n: usize) -> Cluster {
        let hosts: String = (0..n).map(|p| format!("{}:7000\n", net.ip(p))).collect();
        let http = (0..n).map(|p| format!("{}:8080", net.ip(p))).collect();
        let netns = (0..n).map(|p| net.namespace(p)).collect();
        Self::with_addresses(state, &hosts, http, Some(netns))
    }

    fn with_addresses(
        state: &str,
        hosts: &str,
        http: Vec<String>,
        netns: Option<Vec<String>>,
    ) -> Cluster {
        std::fs::create_dir_all(state).expect("state dir");
        let hostfile = std::path::Path::new(state).join("hosts");
        std::fs::write(&hostfile, hosts).expect("hostfile");
        let peers = http
            .iter()
            .map(|h| format!("http://{h}"))
            .collect::<Vec<_>>()
            .join(",");
        Cluster {
            processes: http.iter().map(|_| None).collect(),
            dirs: (0..http.len())
                .map(|p| format!("{state}/process-{p}"))
                .collect(),
            http,
            hostfile: hostfile.to_string_lossy().into_owned(),
            peers,
            netns,
        }
    }

    /// Starts every process (`--start-from checkpoint`), each on its own state dir, and waits
    /// until each serves HTTP (a cluster process serves once all have joined).
    pub(crate) fn start(&mut self, t: &Topics, bootstrap: &str, workers: &str) {
        let n = self.processes.len().to_string();
        for p in 0..self.processes.len() {
            let process = p.to_string();
            let mut args = t.resume_args(bootstrap, &self.dirs[p], workers);
            args.extend([
                "-n",
                &n,
                "-p",
                &process,
                "-h",
                &self.hostfile,
                "--http-peers",
                &self.peers,
                "--checkpoint-interval",
                "200ms",
            ]);
            self.processes[p] = Some(match &self.netns {
                Some(netns) => Dongflow::start_in(&netns[p], &self.http[p], &args),
                None => Dongflow::start_at(&self.http[p], &args),
            });
        }
        for addr in &self.http {
            eventually(Duration::from_secs(60), "the process to serve HTTP", || {
                std::net::TcpStream::connect(addr).ok()
            });
        }
    }

    fn process(&self, p: usize) -> &Dongflow {
        self.processes[p].as_ref().expect("running")
    }

    fn url(&self, p: usize) -> String {
        format!("http://{}", self.http[p])
    }

    fn len(&self) -> usize {
        self.processes.len()
    }

    /// Records read from the input topics, over every process.
    fn records_read(&self) -> f64 {
        (0..self.len()).map(|p| records_read(&self.url(p))).sum()
    }

    /// Checkpoints each process has written so far.
    fn written(&self) -> Vec<usize> {
        (0..self.len())
            .map(|p| self.process(p).log().matches("written:").count())
            .collect()
    }

    /// Waits until every process has written `more` checkpoints beyond `before`.
    fn wait_for_checkpoints(&self, before: &[usize], more: usize) {
        eventually(
            Duration::from_secs(60),
            "checkpoints on every process",
            || {
                self.written()
                    .iter()
                    .zip(before)
                    .all(|(now, b)| *now >= b + more)
                    .then_some(())
            },
        );
    }

    /// Polls every process's `/readyz` until each has said 200; at that moment, each one's first
    /// `/v1/districts` must hold `districts`.
    fn wait_ready_holding(&self, districts: &BTreeMap<String, Value>) {
        let mut ready = vec![false; self.len()];
        eventually(Duration::from_secs(60), "every process ready", || {
            for (p, seen) in ready.iter_mut().enumerate() {
                let client = common::Client::at(self.url(p));
                if !*seen && client.json("/readyz").0 == 200 {
                    *seen = true;
                    let (status, body) = client.json("/v1/districts");
                    assert_eq!((status, &body["stale"]), (200, &Value::Bool(false)));
                    let got = by_code(&body["districts"]);
                    assert!(
                        got == *districts,
                        "process {p} said ready without the whole input: {}",
                        differences(&got, districts)
                    );
                }
            }
            ready.iter().all(|r| *r).then_some(())
        });
    }

    /// Each process's answers equal the model's (and so each other's).
    fn check_equals_model(&self, input: &Input) {
        for p in 0..self.len() {
            check_http_equals_model(&self.url(p), input);
        }
    }

    /// `kill -9` of process `victim`; every other process answers `/readyz` 503 and exits 1 within
    /// 5 s, saying why in one line.
    fn kill_one(&mut self, victim: usize) {
        drop(self.processes[victim].take());
        self.fail_stop(victim, false);
    }

    /// The link of process `victim`'s host cut: every process (the victim too, which reaches no
    /// peer either) exits 1 within 5 s, the others answering `/readyz` 503 before.
    fn cut_one(&mut self, victim: usize, net: &common::netns::Net) {
        net.cut(victim);
        self.fail_stop(victim, true);
        net.mend(victim);
    }

    /// Waits for every process but a killed `victim` (every process when `cut`) to exit 1 within 5
    /// s with the fail-stop line, each reachable one having answered `/readyz` 503 before.
    fn fail_stop(&mut self, victim: usize, cut: bool) {
        let lost = Instant::now();
        let stopping: Vec<usize> = (0..self.len()).filter(|p| cut || *p != victim).collect();
        let mut saw_503 = vec![false; self.len()];
        let codes = eventually(Duration::from_secs(5), "the processes to exit", || {
            let mut codes = Vec::new();
            for p in &stopping {
                let process = self.processes[*p].as_mut().expect("running");
                match process.exited() {
                    Some(code) => codes.push(code),
                    None if *p != victim => {
                        saw_503[*p] |= readyz_status(&self.http[*p]) == Some(503)
                    }
                    None => {}
                }
            }
            (codes.len() == stopping.len()).then_some(codes)
        });
        eprintln!("the processes exited {:?} after the fault", lost.elapsed());
        for p in &stopping {
            let log = self.process(*p).log();
            assert!(
                log.contains("dongflow: lost a peer of the timely cluster")
                    && log.contains("a supervisor restarts every process"),
                "process {p}: {log}"
            );
            assert!(
                *p == victim || saw_503[*p],
                "process {p} said 503 before it exited"
            );
        }
        assert!(codes.iter().all(|c| *c == Some(1)), "{codes:?}");
        self.processes.iter_mut().for_each(|p| *p = None);
    }

    /// The checkpoint each process restored and the records before its offsets (the whole
    /// checkpoint's), from its log.
    fn restored(&self) -> Vec<(u64, f64)> {
        (0..self.len())
            .map(|p| {
                let log = self.process(p).log();
                let line = log
                    .lines()
                    .find(|l| l.contains("restoring checkpoint"))
                    .unwrap_or_else(|| panic!("process {p} restored no checkpoint: {log}"));
                let after = line.split("restoring checkpoint ").nth(1).expect("time");
                let time = after
                    .split(|c: char| !c.is_ascii_digit())
                    .next()
                    .and_then(|t| t.parse().ok())
                    .expect("a time");
                let records = line
                    .split(" records before them")
                    .next()
                    .and_then(|l| l.rsplit('(').next())
                    .and_then(|n| n.parse().ok())
                    .expect("records before the offsets");
                // Every process has the whole checkpoint by then: the processes share their parts.
                assert!(!line.contains("(this process's part)"), "{line}");
                (time, records)
            })
            .collect()
    }
}

/// `/readyz`'s status at `addr`, or `None` when the process is gone (or goes) before it answers.
fn readyz_status(addr: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: dongflow\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// A cluster of `n` processes, one worker each, each with its own state dir: `kill -9` of one while
/// input arrives; the others fail-stop; a restart of all restores one checkpoint, agreed by all,
/// reads only what came after it, and ends equal to the model on every process.
fn a_cluster_restores_its_own_dirs_after_a_kill(n: usize, test: &str, seed: u64) {
    let broker = Broker::embedded();
    let cluster = Cluster::new(&state_dir(test), n);
    restores_after_a_fault(&broker, cluster, test, seed, |c, victim| c.kill_one(victim));
}

/// Fresh topics for `test` and a scenario in parts of `sizes`: the first part produced before
/// `cluster` starts (readiness means all of it, on every process), the second in steps while each
/// process checkpoints on its own disk, until every process has written two more.
fn started_with_checkpoints(
    broker: &Broker,
    cluster: &mut Cluster,
    test: &str,
    seed: u64,
    sizes: &[usize],
) -> (Topics, String, Vec<Input>) {
    let t = Topics::new(test);
    broker.create(
        &[&t.riders, &t.deliveries, &t.districts, &t.snapshots, &t.dlq],
        PARTITIONS,
    );
    let bootstrap = broker.bootstrap();
    let parts = scenario_in_parts(&t, &builtin(), seed, sizes);
    produce(&bootstrap, &parts[0].records);
    cluster.start(&t, &bootstrap, "1");
    cluster.wait_ready_holding(&parts[0].expected_districts);
    let before = cluster.written();
    for chunk in parts[1].records.chunks(100) {
        produce(&bootstrap, chunk);
    }
    cluster.wait_for_checkpoints(&before, 2);
    (t, bootstrap, parts)
}

/// The scenario of [`a_cluster_restores_its_own_dirs_after_a_kill`] on `cluster`, with `fault`
/// instead of the kill.
fn restores_after_a_fault(
    broker: &Broker,
    mut cluster: Cluster,
    test: &str,
    seed: u64,
    fault: impl FnOnce(&mut Cluster, usize),
) {
    let n = cluster.len();
    let (t, bootstrap, parts) =
        started_with_checkpoints(broker, &mut cluster, test, seed, &[1_500, 600, 600]);
    // More arrives, and one process dies mid-stream, at a moment the seed picks.
    let victim = (seed as usize) % n;
    let (arriving, later) = parts[2].records.split_at(300);
    produce(&bootstrap, arriving);
    fault(&mut cluster, victim);
    produce(&bootstrap, later);

    cluster.start(&t, &bootstrap, "1");
    cluster.wait_ready_holding(&parts[2].expected_districts);
    cluster.check_equals_model(&parts[2]);
    let restored = cluster.restored();
    let time = restored[0].0;
    assert!(
        restored.iter().all(|r| *r == restored[0]),
        "one checkpoint, whole, on every process: {restored:?}"
    );
    for p in 0..n {
        let log = cluster.process(p).log();
        assert!(
            log.contains("the other processes' parts added to this state dir")
                && log.contains("reading the changelog after its cut"),
            "process {p} got the other parts and read only the changelog's tail: {log}"
        );
    }
    let produced: usize = parts.iter().map(|p| p.records.len()).sum();
    let before_offsets = restored[0].1;
    assert!(before_offsets >= parts[0].records.len() as f64);
    assert_eq!(
        cluster.records_read(),
        produced as f64 - before_offsets,
        "the restart reads only what came after the checkpoint"
    );
    // A clean stop of every process, in any order: the first SIGTERM stops the whole cluster at
    // one time, whose checkpoint the next start restores without reading anything again.
    let order: Vec<usize> = (0..n).rev().collect();
    for p in order {
        if let Some(process) = cluster.processes[p].take() {
            assert_eq!(process.terminate(), Some(0));
        }
    }
    cluster.start(&t, &bootstrap, "1");
    cluster.wait_ready_holding(&parts[2].expected_districts);
    cluster.check_equals_model(&parts[2]);
    let restored = cluster.restored();
    assert!(restored
        .iter()
        .all(|(t, _)| *t == restored[0].0 && *t > time));
    assert_eq!(cluster.records_read(), 0.0, "nothing read again");
    for p in 0..n {
        assert!(
            cluster
                .process(p)
                .log()
                .contains("written at a clean stop with its changelog published"),
            "process {p}"
        );
    }
    for p in cluster.processes.iter_mut() {
        if let Some(process) = p.take() {
            process.terminate();
        }
    }
}

#[test]
fn two_processes_with_their_own_state_dirs_restore_after_a_kill_and_a_clean_stop() {
    a_cluster_restores_its_own_dirs_after_a_kill(2, "own-dirs-2", 41);
}

#[test]
fn three_processes_with_their_own_state_dirs_restore_after_a_kill_and_a_clean_stop() {
    a_cluster_restores_its_own_dirs_after_a_kill(3, "own-dirs-3", 43);
}

/// The same on hosts of their own (a network namespace per process, the broker on the bridge), with
/// one host's link cut instead of a kill.
#[test]
fn a_cluster_on_hosts_of_its_own_fail_stops_on_a_cut_link_and_restores() {
    let Some(net) = common::netns::Net::create(2) else {
        return;
    };
    let Some(binary) = common::kafka::tansu_binary() else {
        return;
    };
    let tansu = Broker::Tansu(Tansu::start_on(binary, &net.host_ip(), free_port()));
    let cluster = Cluster::in_namespaces(&state_dir("netns"), &net, 2);
    restores_after_a_fault(&tansu, cluster, "netns", 47, |c, victim| {
        c.cut_one(victim, &net)
    });
}

/// A process killed while the cluster stops cleanly (SIGTERM to one process, `kill -9` of the
/// other at once, before the last checkpoint can be complete): the survivor exits within 5 s
/// rather than waiting for its lost peer, and the next start restores one time every process has,
/// reads only what came after it, and holds the whole input.
#[test]
fn a_peer_killed_during_a_clean_stop_leaves_a_checkpoint_the_cluster_restores() {
    let broker = Broker::embedded();
    let test = "stop-kill";
    let mut cluster = Cluster::new(&state_dir(test), 2);
    let (t, bootstrap, parts) =
        started_with_checkpoints(&broker, &mut cluster, test, 53, &[1_500, 600]);
    let asked = Instant::now();
    let _ = std::process::Command::new("/usr/bin/kill")
        .args(["-TERM", &cluster.process(0).pid().to_string()])
        .status();
    drop(cluster.processes[1].take());
    let code = eventually(Duration::from_secs(5), "the survivor to exit", || {
        cluster.processes[0].as_mut().expect("running").exited()
    });
    eprintln!(
        "the survivor exited {code:?} {:?} after the stop",
        asked.elapsed()
    );
    cluster.processes[0] = None;

    cluster.start(&t, &bootstrap, "1");
    cluster.wait_ready_holding(&parts[1].expected_districts);
    cluster.check_equals_model(&parts[1]);
    let restored = cluster.restored();
    assert!(
        restored.iter().all(|r| *r == restored[0]),
        "one checkpoint, whole, on every process: {restored:?}"
    );
    let produced: usize = parts.iter().map(|p| p.records.len()).sum();
    let before_offsets = restored[0].1;
    assert_eq!(
        cluster.records_read(),
        produced as f64 - before_offsets,
        "the restart reads only what came after the checkpoint"
    );
    for p in cluster.processes.iter_mut() {
        if let Some(process) = p.take() {
            assert_eq!(process.terminate(), Some(0));
        }
    }
}
