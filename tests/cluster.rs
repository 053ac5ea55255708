//! Two processes of two workers each on loopback (run here as two timely cluster members in one
//! test process): every rider and district gives the same answer from both processes, equal to the
//! model's, whichever process holds the key.

mod common;

use std::time::{Duration, Instant};

use common::{builtin, Model, MultiSource, Scenario};
use dongflow::demo::partition_of;
use dongflow::engine::{now_ms, ClusterSpec};
use dongflow::http::{App, HttpServer};
use dongflow::{Engine, EngineConfig};
use dongflow_connectors::source::{ChannelSource, EventSource};
use dongflow_connectors::Id;
use serde_json::Value;

const PROCESSES: usize = 2;
const WORKERS: usize = 2;
const PARTITIONS: usize = 8;

/// The engines of the cluster; dropping it (also when a check fails) asks every process to stop
/// before waiting for any, as a timely cluster only finishes together.
struct Cluster(Vec<Engine>);

impl Drop for Cluster {
    fn drop(&mut self) {
        self.0.iter().for_each(|e| e.handle().request_stop());
        self.0.clear();
    }
}

fn get(agent: &ureq::Agent, url: &str) -> (u16, Value) {
    let mut r = agent.get(url).call().expect("request goes through");
    let status = r.status().as_u16();
    (status, r.body_mut().read_json().expect("json"))
}

fn without_as_of(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        obj.remove("as_of");
    }
    v
}

#[test]
fn every_key_answers_alike_from_every_process() {
    let index = builtin();
    let addresses: Vec<String> = (0..PROCESSES)
        .map(|_| format!("127.0.0.1:{}", common::kafka::free_port()))
        .collect();
    // Partition p is read by global worker p % 4, which is process (p % 4) / 2, local worker (p % 4) % 2.
    let mut senders = Vec::new();
    let mut receivers: Vec<Vec<Vec<ChannelSource>>> = (0..PROCESSES)
        .map(|_| (0..WORKERS).map(|_| Vec::new()).collect())
        .collect();
    for p in 0..PARTITIONS {
        let (tx, rx) = crossbeam_channel::unbounded();
        senders.push(tx);
        let global = p % (PROCESSES * WORKERS);
        receivers[global / WORKERS][global % WORKERS].push(ChannelSource::new(rx));
    }
    // Each process blocks in start until the other has connected: start them side by side.
    let starts: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(process, locals)| {
            let mut config = EngineConfig::new(WORKERS, index.clone());
            config.cluster = Some(ClusterSpec {
                process,
                addresses: addresses.clone(),
            });
            let sources: Vec<Box<dyn EventSource>> = locals
                .into_iter()
                .map(|s| Box::new(MultiSource(s)) as Box<dyn EventSource>)
                .collect();
            std::thread::spawn(move || Engine::start(config, sources).expect("engine starts"))
        })
        .collect();
    let engines = Cluster(
        starts
            .into_iter()
            .map(|s| s.join().expect("start thread"))
            .collect(),
    );
    let servers: Vec<HttpServer> = engines
        .0
        .iter()
        .map(|e| {
            HttpServer::start("127.0.0.1:0", App::new(e.handle(), index.clone()), 2).expect("binds")
        })
        .collect();
    let urls: Vec<String> = servers
        .iter()
        .map(|s| format!("http://{}", s.addr()))
        .collect();

    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    // A district feed on each process, followed through every round.
    let feeds: Vec<common::sse::Feed> = urls
        .iter()
        .map(|u| common::sse::Feed::open(u, "/v1/districts/changes", None))
        .collect();
    let mut fed: Vec<common::sse::Districts> = feeds.iter().map(|_| Default::default()).collect();
    let mut scenario = Scenario::new(5, &index, 20, 40);
    let mut model = Model::default();
    for round in 0..4 {
        let events: Vec<_> = (0..200).map(|_| scenario.next_event()).collect();
        let mut batches = vec![Vec::new(); PARTITIONS];
        for e in &events {
            model.apply(&index, e);
            batches[partition_of(e, PARTITIONS)].push(e.clone());
        }
        for (tx, batch) in senders.iter().zip(batches) {
            tx.send(batch).expect("worker alive");
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while senders.iter().any(|s| !s.is_empty()) {
            assert!(Instant::now() < deadline, "input not taken");
            std::thread::sleep(Duration::from_millis(1));
        }
        let taken = now_ms();
        while engines.0.iter().any(|e| e.handle().as_of() < taken) {
            assert!(Instant::now() < deadline, "as_of did not move");
            std::thread::sleep(Duration::from_millis(1));
        }

        // Every district, from both processes, equal to each other and to the model.
        let counts = model.counts();
        let answers: Vec<Value> = urls
            .iter()
            .map(|u| without_as_of(get(&agent, &format!("{u}/v1/districts")).1))
            .collect();
        assert_eq!(answers[0], answers[1], "round {round}");
        // Each process's feed, applied to its first snapshot, is its plain answer.
        for ((feed, state), url) in feeds.iter().zip(&mut fed).zip(&urls) {
            common::sse::follow_until_plain(feed, state, &common::Client::at(url.clone()));
            assert_eq!(
                state.by_code,
                common::sse::by_code(&answers[0]["districts"]),
                "the feed of {url}, round {round}"
            );
        }
        let codes: Vec<&str> = answers[0]["districts"]
            .as_array()
            .expect("districts")
            .iter()
            .filter_map(|d| d["code"].as_str())
            .collect();
        let mut want: Vec<&str> = counts.keys().map(|d| index.code(*d)).collect();
        want.sort();
        assert_eq!(codes, want, "round {round}");
        for (d, c) in &counts {
            let code = index.code(*d);
            for u in &urls {
                let (status, body) = get(&agent, &format!("{u}/v1/districts/{code}"));
                assert_eq!(status, 200);
                assert_eq!(
                    body["riders_on_shift"].as_u64(),
                    Some(c.riders_on_shift),
                    "{code} from {u}"
                );
                assert_eq!(
                    body["active_deliveries"].as_u64(),
                    Some(c.active_deliveries),
                    "{code} from {u}"
                );
                assert_eq!(
                    body["waiting_deliveries"].as_u64(),
                    Some(c.waiting_deliveries),
                    "{code} from {u}"
                );
            }
            let riders: Vec<Value> = urls
                .iter()
                .map(|u| without_as_of(get(&agent, &format!("{u}/v1/districts/{code}/riders")).1))
                .collect();
            assert_eq!(riders[0], riders[1], "riders of {code}");
        }
        // Every rider, from both processes.
        let snapshots = model.snapshots();
        for r in 0..20 {
            let id = Id::from(format!("r-{r}"));
            let answers: Vec<(u16, Value)> = urls
                .iter()
                .map(|u| get(&agent, &format!("{u}/v1/riders/{id}")))
                .collect();
            let want = if snapshots.contains_key(&id) {
                200
            } else {
                404
            };
            assert_eq!((answers[0].0, answers[1].0), (want, want), "{id}");
            assert_eq!(
                without_as_of(answers[0].1.clone()),
                without_as_of(answers[1].1.clone()),
                "{id}"
            );
            if let Some(s) = snapshots.get(&id) {
                assert_eq!(
                    answers[0].1["updated_ts"].as_u64(),
                    Some(s.updated_ts()),
                    "{id}"
                );
                assert_eq!(
                    answers[0].1["deliveries"].as_array().map(Vec::len),
                    Some(s.deliveries.len()),
                    "{id}"
                );
            }
        }
    }
    drop(servers);
    drop(engines);
}
