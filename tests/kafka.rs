//! End to end through real brokers: a seeded scenario with bad records in it is produced to the
//! input topics, `dongflow run -w 2` reads them, and the changelog topics (latest record per key)
//! must equal the plain model, the dead-letter topic must hold exactly the bad records with their
//! headers, and HTTP must show what the changelog shows.

#[path = "kafka/clusters.rs"]
mod clusters;
mod common;
#[path = "kafka/crashes.rs"]
mod crashes;
#[path = "kafka/secure.rs"]
mod secure;

use std::collections::BTreeMap;
use std::time::Duration;

use common::kafka::{eventually, free_port, produce, Broker, Dongflow, Reader, Record, Tansu};
use common::{builtin, Model, Scenario};
use dongflow::render::{DistrictView, RiderView};
use dongflow_connectors::simulator::SimEvent;
use dongflow_dataflow::districts::DistrictIndex;
use serde_json::Value;

const PARTITIONS: i32 = 4;

/// Topic names of one test, unique so that tests never see each other's records.
struct Topics {
    riders: String,
    deliveries: String,
    districts: String,
    snapshots: String,
    dlq: String,
}

impl Topics {
    fn new(test: &str) -> Topics {
        let tag = format!("{test}-{}", std::process::id());
        Topics {
            riders: format!("riders-{tag}"),
            deliveries: format!("deliveries-{tag}"),
            districts: format!("district-changelog-{tag}"),
            snapshots: format!("rider-changelog-{tag}"),
            dlq: format!("dlq-{tag}"),
        }
    }

    fn args<'a>(&'a self, brokers: &'a str, state: &'a str) -> Vec<&'a str> {
        self.args_with(brokers, state, "2")
    }

    /// The arguments of a run that resumes from the newest checkpoint in `state`.
    fn resume_args<'a>(
        &'a self,
        brokers: &'a str,
        state: &'a str,
        workers: &'a str,
    ) -> Vec<&'a str> {
        let mut args = self.args_with(brokers, state, workers);
        if let Some(start) = args.iter_mut().find(|a| **a == "earliest") {
            *start = "checkpoint";
        }
        args
    }

    fn args_with<'a>(&'a self, brokers: &'a str, state: &'a str, workers: &'a str) -> Vec<&'a str> {
        vec![
            "--brokers",
            brokers,
            "-w",
            workers,
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
            &self.riders,
            "--start-from",
            "earliest",
            "--state-dir",
            state,
        ]
    }
}

/// One bad record of each kind of CONTRACT section 4, for both inputs, with the reason expected.
fn bad_records(t: &Topics) -> Vec<(Record, &'static str)> {
    let rider =
        |value: &[u8], reason| (Record::new(&t.riders, Some(b"r-bad"), Some(value)), reason);
    let delivery = |value: &[u8], reason| {
        (
            Record::new(&t.deliveries, Some(b"d-bad"), Some(value)),
            reason,
        )
    };
    vec![
        rider(br#"{"rider_id": "r-1", "status": "#, "malformed_json"),
        rider(b"[1, 2, 3]", "malformed_json"),
        rider(b"\xff\xfe not utf-8", "malformed_json"),
        (Record::new(&t.riders, Some(b"r-1"), None), "malformed_json"),
        rider(br#"{"rider_id": "r-1", "status": "ON_SHIFT"}"#, "missing_field"),
        rider(br#"{"status": "ON_SHIFT", "ts": 5}"#, "missing_field"),
        rider(br#"{"rider_id": 17, "status": "ON_SHIFT", "ts": 5}"#, "wrong_type"),
        rider(br#"{"rider_id": "r-1", "status": "ON_SHIFT", "ts": "soon"}"#, "wrong_type"),
        rider(br#"{"rider_id": "", "status": "ON_SHIFT", "ts": 5}"#, "empty_id"),
        rider(br#"{"rider_id": "r-1", "status": "NAPPING", "ts": 5}"#, "unknown_status"),
        rider(
            br#"{"rider_id": "r-1", "status": "ON_SHIFT", "ts": 5, "location": {"lat": 137.5, "lon": 127.0}}"#,
            "out_of_range",
        ),
        delivery(br#"{"delivery_id": "d-1", "status": "ASSIGNED""#, "malformed_json"),
        delivery(br#"{"delivery_id": "d-1", "ts": 5}"#, "missing_field"),
        delivery(br#"{"delivery_id": "d-1", "status": 3, "ts": 5}"#, "wrong_type"),
        delivery(br#"{"delivery_id": "d-1", "status": "TELEPORTED", "ts": 5}"#, "unknown_status"),
        delivery(
            br#"{"delivery_id": "d-1", "status": "CREATED", "ts": 5, "pickup": {"lat": 37.5, "lon": 227.0}}"#,
            "out_of_range",
        ),
        (Record::new(&t.deliveries, None, Some(b"no key, no JSON")), "malformed_json"),
    ]
}

/// The scenario: good events (with stale, duplicate and late ones) and bad records between them.
struct Input {
    records: Vec<Record>,
    bad: Vec<(Record, &'static str)>,
    expected_riders: BTreeMap<String, Value>,
    expected_districts: BTreeMap<String, Value>,
}

fn scenario(t: &Topics, index: &DistrictIndex, seed: u64, events: usize) -> Input {
    scenario_in_parts(t, index, seed, &[events])
        .pop()
        .expect("one part")
}

/// One scenario cut in parts of `sizes` events: each part's records, and the model's answers after
/// it (of every part up to it).
fn scenario_in_parts(t: &Topics, index: &DistrictIndex, seed: u64, sizes: &[usize]) -> Vec<Input> {
    let mut scenario = Scenario::new(seed, index, 60, 150);
    let mut model = Model::default();
    let bad = bad_records(t);
    let events: usize = sizes.iter().sum();
    let every = events / bad.len();
    let mut parts = Vec::new();
    let mut i = 0;
    for size in sizes {
        let mut records = Vec::new();
        for _ in 0..*size {
            let e = scenario.next_event();
            model.apply(index, &e);
            let topic = match e {
                SimEvent::Rider(_) => &t.riders,
                SimEvent::Delivery(_) => &t.deliveries,
            };
            records.push(Record::new(
                topic,
                Some(e.key().as_bytes()),
                Some(&e.encode()),
            ));
            if i % every == 0 {
                if let Some((r, _)) = bad.get(i / every) {
                    records.push(r.clone());
                }
            }
            i += 1;
        }
        parts.push(Input {
            records,
            bad: bad.clone(),
            expected_riders: model_riders(index, &model),
            expected_districts: model_districts(index, &model),
        });
    }
    parts
}

fn model_riders(index: &DistrictIndex, model: &Model) -> BTreeMap<String, Value> {
    model
        .snapshots()
        .iter()
        .map(|(id, s)| {
            let v = serde_json::to_value(RiderView::new(index, id, s)).expect("json");
            (id.to_string(), v)
        })
        .collect()
}

fn model_districts(index: &DistrictIndex, model: &Model) -> BTreeMap<String, Value> {
    model
        .counts()
        .iter()
        .map(|(d, c)| {
            let v = serde_json::to_value(DistrictView::new(index, *d, c)).expect("json");
            (index.code(*d).to_owned(), v)
        })
        .collect()
}

/// Every metric the dashboard and the alerting rules of docs/operations use (the engine's own and
/// the process metrics; `up` and node_exporter's are Prometheus' and the host's) is one the engine
/// exports.
fn check_operations_docs_name_real_metrics(metrics: &str) {
    let exported: std::collections::BTreeSet<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/operations");
    let mut used = 0;
    for file in ["dashboard.json", "alerts.yml"] {
        let text = std::fs::read_to_string(docs.join(file)).expect("docs/operations file");
        if file.ends_with(".json") {
            let _: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
        }
        let names = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("dongflow_"));
        for name in names {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|f| exported.contains(f)))
                .unwrap_or(name);
            assert!(
                exported.contains(family),
                "{file} uses {name}, which /metrics does not export"
            );
            used += 1;
        }
    }
    assert!(
        used > 20,
        "the dashboard and the rules use the engine's metrics"
    );
}

/// The first few keys where `got` and `want` differ, with both values.
fn differences(got: &BTreeMap<String, Value>, want: &BTreeMap<String, Value>) -> String {
    let keys: std::collections::BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    let differ: Vec<String> = keys
        .into_iter()
        .filter(|k| got.get(*k) != want.get(*k))
        .take(3)
        .map(|k| format!("{k}: got {:?}, want {:?}", got.get(k), want.get(k)))
        .collect();
    if differ.is_empty() {
        "equal".into()
    } else {
        differ.join("; ")
    }
}

/// A changelog value without its `as_of`, which the model cannot know. A value that is not an
/// object (a test's garbled record, read as a string) is kept as it is: it equals no answer.
fn without_as_of(map: BTreeMap<String, Value>) -> BTreeMap<String, Value> {
    map.into_iter()
        .map(|(k, mut v)| {
            if !v.is_object() {
                return (k, v);
            }
            let as_of = v.as_object_mut().and_then(|o| o.remove("as_of"));
            assert!(
                as_of.is_some_and(|a| a.as_u64().is_some_and(|a| a > 0)),
                "every changelog value has an as_of: {v}"
            );
            (k, v)
        })
        .collect()
}

struct Outputs {
    districts: Reader,
    riders: Reader,
    dlq: Reader,
}

impl Outputs {
    fn new(bootstrap: &str, t: &Topics) -> Outputs {
        Outputs {
            districts: Reader::new(bootstrap, &t.districts, PARTITIONS),
            riders: Reader::new(bootstrap, &t.snapshots, PARTITIONS),
            dlq: Reader::new(bootstrap, &t.dlq, PARTITIONS),
        }
    }

    /// Reads every changelog record published so far.
    fn read_to_end(&mut self, bootstrap: &str) {
        for reader in [&mut self.districts, &mut self.riders, &mut self.dlq] {
            reader.read_to_end(bootstrap);
        }
    }

    fn poll(&mut self) {
        self.districts.poll(Duration::from_millis(50));
        self.riders.poll(Duration::from_millis(50));
        self.dlq.poll(Duration::from_millis(50));
    }

    /// Waits until the changelogs rebuild the model's answer and every bad record is dead-lettered;
    /// if they never do, says which keys differ.
    fn wait_for(&mut self, input: &Input) {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            self.poll();
            let riders = without_as_of(self.riders.latest());
            let districts = without_as_of(self.districts.latest());
            if riders == input.expected_riders
                && districts == input.expected_districts
                && self.dlq.records.len() >= input.bad.len()
            {
                return;
            }
            if std::time::Instant::now() > deadline {
                panic!(
                    "changelogs never equal to the model: riders {}, districts {}, {} of {} dead letters",
                    differences(&riders, &input.expected_riders),
                    differences(&districts, &input.expected_districts),
                    self.dlq.records.len(),
                    input.bad.len()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Every dead letter is one bad record, unchanged, with headers that point at where it was read.
fn check_dead_letters(bootstrap: &str, t: &Topics, input: &Input, dlq: &[Record]) {
    assert_eq!(
        dlq.len(),
        input.bad.len(),
        "exactly the bad records are dead-lettered"
    );
    let mut sources = BTreeMap::new();
    for topic in [&t.riders, &t.deliveries] {
        let mut reader = Reader::new(bootstrap, topic, PARTITIONS);
        eventually(Duration::from_secs(30), "the input topic read back", || {
            reader.poll(Duration::from_millis(100));
            (reader.records.len() >= input.records.iter().filter(|r| &r.topic == topic).count())
                .then_some(())
        });
        for r in reader.records {
            sources.insert((r.topic.clone(), r.partition, r.offset), r);
        }
    }
    let mut reasons: Vec<&str> = Vec::new();
    for letter in dlq {
        let topic = letter.header("source_topic").expect("source_topic header");
        let partition: i32 = letter
            .header("source_partition")
            .expect("source_partition")
            .parse()
            .expect("number");
        let offset: i64 = letter
            .header("source_offset")
            .expect("source_offset")
            .parse()
            .expect("number");
        let source = &sources[&(topic.to_owned(), partition, offset)];
        assert_eq!(
            (&letter.key, &letter.value),
            (&source.key, &source.value),
            "a dead letter is its record, unchanged"
        );
        assert!(
            !letter.header("error").unwrap_or_default().is_empty(),
            "an error header says why"
        );
        reasons.push(letter.header("error_reason").expect("error_reason header"));
    }
    let mut expected: Vec<&str> = input.bad.iter().map(|(_, r)| *r).collect();
    expected.sort_unstable();
    reasons.sort_unstable();
    assert_eq!(reasons, expected);
}

/// HTTP shows what the changelog shows: every district, and a sample of riders.
fn check_http_matches(http: &str, outputs: &Outputs) {
    let client = common::Client::at(http.to_owned());
    let (status, body) = client.json("/v1/districts");
    assert_eq!(status, 200);
    let from_http = by_code(&body["districts"]);
    assert_eq!(from_http, without_as_of(outputs.districts.latest()));
    for (id, snapshot) in without_as_of(outputs.riders.latest()).into_iter().take(20) {
        let (status, mut body) = client.json(&format!("/v1/riders/{id}"));
        assert_eq!(status, 200);
        let o = body.as_object_mut().expect("object");
        o.remove("as_of");
        o.remove("stale");
        assert_eq!(body, snapshot);
    }
}

/// `/metrics` counts what the outputs hold: every bad record by reason, every record read, every
/// changelog record written; and consumer lag falls to zero.
fn check_metrics(http: &str, input: &Input, outputs: &Outputs) {
    let client = common::Client::at(http.to_owned());
    let text = eventually(Duration::from_secs(30), "metrics that add up", || {
        let (status, _, text) = client.get("/metrics");
        assert_eq!(status, 200);
        let lags: Vec<f64> = text
            .lines()
            .filter(|l| l.starts_with("dongflow_consumer_lag_records{"))
            .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
            .collect();
        let written = |output: &str| {
            common::sample(
                &text,
                &format!("dongflow_output_records_written_total{{output=\"{output}\"}}"),
            )
        };
        let settled = lags.len() == 2 * PARTITIONS as usize
            && lags.iter().all(|l| *l == 0.0)
            && written("district_changelog") == Some(outputs.districts.records.len() as f64)
            && written("rider_changelog") == Some(outputs.riders.records.len() as f64);
        settled.then_some(text)
    });
    common::check_prometheus_text(&text);
    for reason in dongflow_connectors::DecodeError::REASONS {
        let expected = input.bad.iter().filter(|(_, r)| *r == reason).count() as f64;
        let series = format!("dongflow_events_invalid_total{{reason=\"{reason}\"}}");
        assert_eq!(common::sample(&text, &series), Some(expected), "{series}");
    }
    assert_eq!(
        common::sample(&text, "dongflow_dead_letters_total"),
        Some(input.bad.len() as f64)
    );
    assert_eq!(
        common::sample(&text, "dongflow_kafka_records_read_total"),
        Some(input.records.len() as f64)
    );
    assert_eq!(
        common::sample(&text, "dongflow_kafka_brokers_reachable"),
        Some(1.0)
    );
}

/// Lag as standard tools compute it (each partition's end offset minus the offset committed to
/// `--group-id`, read back with a Kafka client) equals `dongflow_consumer_lag_records`, partition by
/// partition, once the engine has read everything: the committed offsets are its read positions.
fn check_group_lag(bootstrap: &str, t: &Topics, http: &str) {
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::{Offset, TopicPartitionList};
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", &t.riders)
        .set("enable.auto.commit", "false")
        .create()
        .expect("a consumer of the group");
    let client = common::Client::at(http.to_owned());
    let timeout = Duration::from_secs(5);
    let mut last = String::new();
    eventually(
        Duration::from_secs(30),
        "the group's lag equal to the engine's",
        || {
            let mut tpl = TopicPartitionList::new();
            for topic in [&t.riders, &t.deliveries] {
                for p in 0..PARTITIONS {
                    tpl.add_partition(topic, p);
                }
            }
            let committed = consumer.committed_offsets(tpl, timeout).ok()?;
            let (_, _, text) = client.get("/metrics");
            let mut differ = Vec::new();
            for e in committed.elements() {
                let (_, end) = consumer
                    .fetch_watermarks(e.topic(), e.partition(), timeout)
                    .ok()?;
                let series = format!(
                    "dongflow_consumer_lag_records{{partition=\"{}\",topic=\"{}\"}}",
                    e.partition(),
                    e.topic()
                );
                let group_lag = match e.offset() {
                    Offset::Offset(c) => Some((end - c) as f64),
                    _ => None,
                };
                let engine_lag = common::sample(&text, &series);
                if group_lag.is_none() || group_lag != engine_lag {
                    differ.push(format!(
                        "{series}: group {group_lag:?}, engine {engine_lag:?}"
                    ));
                }
            }
            last = differ.join("; ");
            differ.is_empty().then_some(())
        },
    );
    assert!(last.is_empty(), "{last}");
}

fn end_to_end(broker: &Broker, test: &str) {
    let index = builtin();
    let t = Topics::new(test);
    let input = scenario(&t, &index, 7, 6_000);
    broker.create(&[&t.riders, &t.deliveries], PARTITIONS);
    if matches!(broker, Broker::Embedded(_)) {
        // The mock cluster cannot create topics through the admin API; real brokers can.
        broker.create(&[&t.districts, &t.snapshots, &t.dlq], PARTITIONS);
    }
    let bootstrap = broker.bootstrap();
    // A third before the engine starts (a backlog), the rest in chunks while it runs, so that keys
    // change over many dataflow times and riders end shifts (tombstones).
    let (backlog, live) = input.records.split_at(input.records.len() / 3);
    produce(&bootstrap, backlog);
    let state = std::env::temp_dir().join(format!("dongflow-state-{test}-{}", std::process::id()));
    let state = state.to_string_lossy().into_owned();
    let dongflow = Dongflow::run(&t.args(&bootstrap, &state));
    let mut outputs = Outputs::new(&bootstrap, &t);
    for chunk in live.chunks(250) {
        produce(&bootstrap, chunk);
        outputs.poll();
    }
    outputs.wait_for(&input);
    let tombstones = outputs
        .riders
        .records
        .iter()
        .filter(|r| r.value.is_none())
        .count();
    eprintln!(
        "{} riders and {} districts expected; {} rider records ({tombstones} tombstones), {} district records",
        input.expected_riders.len(),
        input.expected_districts.len(),
        outputs.riders.records.len(),
        outputs.districts.records.len()
    );
    check_dead_letters(&bootstrap, &t, &input, &outputs.dlq.records);
    // CONTRACT section 8: keys partitioned as Kafka's Java clients do.
    secure::check_java_partitioning(&outputs.districts.records, PARTITIONS);
    secure::check_java_partitioning(&outputs.riders.records, PARTITIONS);
    secure::check_java_partitioning(&outputs.dlq.records, PARTITIONS);
    check_http_matches(&dongflow.http, &outputs);
    check_metrics(&dongflow.http, &input, &outputs);
    check_group_lag(&bootstrap, &t, &dongflow.http);
    assert!(!input.expected_riders.is_empty() && !input.expected_districts.is_empty());
    assert!(tombstones > 0, "shift ends show as tombstones");
    assert_eq!(dongflow.terminate(), Some(0), "SIGTERM is a clean stop");
}

#[test]
fn input_topics_created_after_start() {
    let broker = Broker::embedded();
    let index = builtin();
    let t = Topics::new("late-topics");
    let input = scenario(&t, &index, 11, 1_500);
    broker.create(&[&t.districts, &t.snapshots, &t.dlq], PARTITIONS);
    let bootstrap = broker.bootstrap();
    let state = std::env::temp_dir().join(format!("dongflow-state-late-{}", std::process::id()));
    let dongflow = Dongflow::run(&t.args(&bootstrap, &state.to_string_lossy()));
    eventually(
        Duration::from_secs(30),
        "a log line about the missing topic",
        || dongflow.log().contains("does not exist yet").then_some(()),
    );
    let client = common::Client::at(dongflow.http.clone());
    assert_eq!(
        client.json("/healthz").0,
        200,
        "a missing topic is not a crash"
    );
    broker.create(&[&t.riders, &t.deliveries], PARTITIONS);
    produce(&bootstrap, &input.records);
    let mut outputs = Outputs::new(&bootstrap, &t);
    outputs.wait_for(&input);
    assert!(dongflow.log().contains("now exists"));
    assert_eq!(dongflow.terminate(), Some(0));
}

#[test]
fn broker_down_at_start_then_up() {
    let Some(binary) = common::kafka::tansu_binary() else {
        return;
    };
    let index = builtin();
    let t = Topics::new("broker-late");
    let input = scenario(&t, &index, 13, 1_500);
    let port = free_port();
    let bootstrap = format!("127.0.0.1:{port}");
    let state =
        std::env::temp_dir().join(format!("dongflow-state-broker-late-{}", std::process::id()));
    let dongflow = Dongflow::run(&t.args(&bootstrap, &state.to_string_lossy()));
    eventually(
        Duration::from_secs(30),
        "a log line about the unreachable broker",
        || {
            dongflow
                .log()
                .contains("cannot reach the Kafka brokers")
                .then_some(())
        },
    );
    let client = common::Client::at(dongflow.http.clone());
    assert_eq!(
        client.json("/healthz").0,
        200,
        "a broker that is down is not a crash"
    );
    assert_eq!(
        client.json("/readyz").0,
        503,
        "not ready before the inputs were seen"
    );
    let _tansu = Tansu::start(binary, port);
    common::kafka::create_on(&bootstrap, &[&t.riders, &t.deliveries], PARTITIONS);
    produce(&bootstrap, &input.records);
    let mut outputs = Outputs::new(&bootstrap, &t);
    outputs.wait_for(&input);
    check_dead_letters(&bootstrap, &t, &input, &outputs.dlq.records);
    assert_eq!(dongflow.terminate(), Some(0));
}

#[test]
fn embedded_broker_end_to_end() {
    end_to_end(&Broker::embedded(), "embedded");
}

#[test]
fn tansu_end_to_end() {
    let Some(broker) = Broker::tansu() else {
        return;
    };
    end_to_end(&broker, "tansu");
}

/// An embedded broker with every topic of a test created, and a seeded scenario for it.
struct Fixture {
    broker: Broker,
    t: Topics,
    input: Input,
    bootstrap: String,
    state: String,
}

impl Fixture {
    fn embedded(test: &str, seed: u64, events: usize) -> Fixture {
        let broker = Broker::embedded();
        let t = Topics::new(test);
        let input = scenario(&t, &builtin(), seed, events);
        broker.create(
            &[&t.riders, &t.deliveries, &t.districts, &t.snapshots, &t.dlq],
            PARTITIONS,
        );
        let bootstrap = broker.bootstrap();
        Fixture {
            broker,
            t,
            input,
            bootstrap,
            state: state_dir(test),
        }
    }
}

fn state_dir(test: &str) -> String {
    let dir = std::env::temp_dir().join(format!("dongflow-state-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir.to_string_lossy().into_owned()
}

/// Whether a checkpoint directory in `dir` holds a file whose name ends with `suffix`.
fn has_checkpoint_file(dir: &str, suffix: &str) -> bool {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| {
            std::fs::read_dir(e.path())
                .into_iter()
                .flatten()
                .flatten()
                .any(|f| f.file_name().to_string_lossy().ends_with(suffix))
        })
}

fn has_checkpoint(dir: &str) -> bool {
    has_checkpoint_file(dir, ".manifest.json")
}

/// Whether a checkpoint in `dir` is marked as published by a clean stop.
fn has_changelog_mark(dir: &str) -> bool {
    has_checkpoint_file(dir, ".published.json")
}

/// Rider changelog records this run has had acknowledged.
fn rider_records_written(http: &str) -> f64 {
    records_written(http, "rider_changelog")
}

/// Records written to one output, by `/metrics` (-1 when it says none).
fn records_written(http: &str, output: &str) -> f64 {
    let (_, _, text) = common::Client::at(http.to_owned()).get("/metrics");
    let name = format!("dongflow_output_records_written_total{{output=\"{output}\"}}");
    common::sample(&text, &name).unwrap_or(-1.0)
}

/// Waits until the process is ready and its changelog reconciled with its state (`/metrics`).
fn reconciled(http: &str) {
    ready(http);
    eventually(Duration::from_secs(60), "the changelog reconciled", || {
        let (_, _, text) = common::Client::at(http.to_owned()).get("/metrics");
        (common::sample(&text, "dongflow_changelog_unreconciled_topics") == Some(0.0)).then_some(())
    });
}

fn records_read(http: &str) -> f64 {
    let (_, _, text) = common::Client::at(http.to_owned()).get("/metrics");
    common::sample(&text, "dongflow_kafka_records_read_total").unwrap_or(-1.0)
}

fn ready(http: &str) {
    let client = common::Client::at(http.to_owned());
    eventually(Duration::from_secs(60), "/readyz 200", || {
        (client.json("/readyz").0 == 200).then_some(())
    });
}

/// A clean stop writes a checkpoint; a restart with another `-w` resumes from it, reading only
/// what came after, and ends with the same answers as the model.
#[test]
fn restarts_resume_from_the_checkpoint_with_other_worker_counts() {
    let Fixture {
        broker: _broker, // kept alive for the whole test
        t,
        input,
        bootstrap,
        state,
    } = Fixture::embedded("restart", 17, 4_000);
    let (first, second) = input.records.split_at(input.records.len() * 3 / 5);
    produce(&bootstrap, first);

    let mut args = t.args_with(&bootstrap, &state, "2");
    args.extend(["--checkpoint-interval", "200ms"]);
    *args.iter_mut().find(|a| **a == "earliest").expect("start") = "checkpoint";
    let run = Dongflow::run(&args);
    ready(&run.http);
    assert_eq!(records_read(&run.http), first.len() as f64);
    // The checkpoints show in /metrics: a recent one, of some size, and no failed write.
    let client = common::Client::at(run.http.clone());
    eventually(Duration::from_secs(30), "a checkpoint in /metrics", || {
        let (_, _, text) = client.get("/metrics");
        let bytes = common::sample(&text, "dongflow_checkpoint_last_bytes")?;
        let age = common::sample(&text, "dongflow_checkpoint_age_seconds")?;
        let failures = common::sample(&text, "dongflow_checkpoint_write_failures_total");
        assert_eq!(failures, Some(0.0));
        (bytes > 0.0 && (0.0..30.0).contains(&age)).then_some(())
    });
    let (_, _, text) = client.get("/metrics");
    check_operations_docs_name_real_metrics(&text);
    assert_eq!(run.terminate(), Some(0));
    assert!(
        has_checkpoint(&state),
        "a clean stop leaves a checkpoint in {state}"
    );
    assert!(
        has_changelog_mark(&state),
        "a clean stop marks its checkpoint's changelog as published"
    );

    produce(&bootstrap, second);
    let mut args = t.args_with(&bootstrap, &state, "1");
    args.extend(["--checkpoint-interval", "200ms"]);
    *args.iter_mut().find(|a| **a == "earliest").expect("start") = "checkpoint";
    let run = Dongflow::run(&args);
    let mut outputs = Outputs::new(&bootstrap, &t);
    outputs.wait_for(&input);
    assert!(
        run.log().contains("restoring checkpoint"),
        "the restart says where it resumes"
    );
    assert!(
        run.log().contains("not published again"),
        "the changelog of a clean stop is not published again: {}",
        run.log()
    );
    assert_eq!(
        records_read(&run.http),
        second.len() as f64,
        "the restart reads only what came after the checkpoint"
    );
    check_http_matches(&run.http, &outputs);
    assert_eq!(run.terminate(), Some(0));

    // And back to two workers, with nothing new: the state alone gives the same answers, and
    // nothing is published (the changelog holds it all already).
    let args = t.resume_args(&bootstrap, &state, "2");
    let run = Dongflow::run(&args);
    ready(&run.http);
    assert_eq!(records_read(&run.http), 0.0);
    check_http_matches(&run.http, &outputs);
    check_http_equals_model(&run.http, &input);
    assert_eq!(rider_records_written(&run.http), 0.0);
    assert_eq!(run.terminate(), Some(0));
    outputs.read_to_end(&bootstrap);
    assert_eq!(
        without_as_of(outputs.riders.latest()),
        input.expected_riders
    );
    assert_eq!(
        without_as_of(outputs.districts.latest()),
        input.expected_districts
    );
}

/// A run that restores a clean stop's checkpoint retracts its mark before it publishes: killed
/// after publishing, it leaves a changelog that may hold more than the checkpoint, so the next
/// restart from that checkpoint publishes the restored state again, and ends equal to the model.
#[test]
fn a_run_killed_after_a_clean_stop_reconciles_the_changelog_with_the_restored_state() {
    let Fixture {
        broker: _broker,
        t,
        input,
        bootstrap,
        state,
    } = Fixture::embedded("remark", 41, 4_000);
    let (first, second) = input.records.split_at(input.records.len() / 2);
    produce(&bootstrap, first);
    // One checkpoint an hour: every restart below restores the clean stop's checkpoint.
    let mut args = t.resume_args(&bootstrap, &state, "2");
    args.extend(["--checkpoint-interval", "1h"]);
    let run = Dongflow::run(&args);
    ready(&run.http);
    assert_eq!(run.terminate(), Some(0));
    assert!(has_changelog_mark(&state), "marked at the clean stop");

    produce(&bootstrap, second);
    let run = Dongflow::run(&args);
    ready(&run.http);
    assert!(run.log().contains("not published again"), "{}", run.log());
    assert!(
        !has_changelog_mark(&state),
        "the mark goes before publishing"
    );
    assert_eq!(records_read(&run.http), second.len() as f64);
    let client = common::Client::at(run.http.clone());
    eventually(Duration::from_secs(60), "the second half published", || {
        let _ = client.json("/readyz");
        (rider_records_written(&run.http) > 0.0).then_some(())
    });
    drop(run); // kill -9: no clean stop, no mark

    let run = Dongflow::run(&args);
    reconciled(&run.http);
    assert!(
        run.log().contains("reconciled with its state"),
        "the changelog is reconciled with the restored state: {}",
        run.log()
    );
    let mut outputs = Outputs::new(&bootstrap, &t);
    outputs.wait_for(&input);
    check_http_equals_model(&run.http, &input);
    drop(run); // killed again, nothing new since

    // The changelog holds the state the replay rebuilds: nothing is written again.
    let run = Dongflow::run(&args);
    reconciled(&run.http);
    check_http_equals_model(&run.http, &input);
    assert_eq!(
        (
            rider_records_written(&run.http),
            records_written(&run.http, "district_changelog")
        ),
        (0.0, 0.0),
        "a changelog that holds the state is not written again: {}",
        run.log()
    );
    outputs.wait_for(&input);
    assert_eq!(run.terminate(), Some(0));
}

/// A run that publishes its state from scratch (no checkpoint here: the state dir was emptied)
/// first tombstones what earlier runs left in the changelog and its state lacks. Otherwise a
/// rider only an earlier or crashed run saw would stay on shift in the changelog for good.
#[test]
fn a_run_publishing_from_scratch_clears_what_earlier_runs_left_in_the_changelog() {
    let Fixture {
        broker: _broker,
        t,
        input,
        bootstrap,
        state,
    } = Fixture::embedded("leftover", 43, 2_000);
    let index = builtin();
    let quiet_district = (0..index.len() as u16)
        .map(|id| index.code(id).to_owned())
        .find(|code| !input.expected_districts.contains_key(code))
        .expect("a district the scenario leaves empty");
    let on_shift = |id: &str| format!(r#"{{"rider_id":"{id}","status":"ON_SHIFT","as_of":1}}"#);
    let counts = r#"{"riders_on_shift":7,"as_of":1}"#;
    let leftovers = [
        (
            &t.snapshots,
            "r-left-behind".to_owned(),
            on_shift("r-left-behind"),
        ),
        (
            &t.snapshots,
            "r-also-left".to_owned(),
            on_shift("r-also-left"),
        ),
        (&t.districts, quiet_district.clone(), counts.to_owned()),
        (&t.districts, "0000000000".to_owned(), counts.to_owned()),
    ];
    let records: Vec<Record> = leftovers
        .iter()
        .map(|(topic, key, value)| Record::new(topic, Some(key.as_bytes()), Some(value.as_bytes())))
        .collect();
    produce(&bootstrap, &records);
    produce(&bootstrap, &input.records);

    let run = Dongflow::run(&t.args(&bootstrap, &state));
    let mut outputs = Outputs::new(&bootstrap, &t);
    outputs.wait_for(&input);
    for (_, key, _) in &leftovers {
        let tombstoned = outputs
            .riders
            .records
            .iter()
            .chain(&outputs.districts.records)
            .any(|r| r.key.as_deref() == Some(key.as_bytes()) && r.value.is_none());
        assert!(tombstoned, "{key} tombstoned");
    }
    assert!(run.log().contains("the state lacks tombstoned"));
    check_http_equals_model(&run.http, &input);
    assert_eq!(run.terminate(), Some(0));
}

/// A changelog topic whose records were all removed (as retention or delete-records leave it: low
/// watermark == high watermark; here tansu's store is edited while it is down, the way Kafka's
/// retention moves a partition's log start) counts as read: the changelog's view loads, the
/// clearing runs, and the clean stop is marked. A changelog value that is not JSON is cleared too.
#[test]
fn an_emptied_changelog_partition_counts_as_read() {
    let Some(mut broker) = Broker::tansu() else {
        return;
    };
    let sqlite = std::process::Command::new("sqlite3")
        .arg("-version")
        .output();
    if !sqlite.is_ok_and(|o| o.status.success()) {
        assert!(
            std::env::var("DONGFLOW_REQUIRE_TANSU").as_deref() != Ok("1"),
            "DONGFLOW_REQUIRE_TANSU=1 but no sqlite3 to edit tansu's store (apt-get install sqlite3)"
        );
        eprintln!("SKIPPED: sqlite3 is not installed (apt-get install sqlite3)");
        return;
    }
    let t = Topics::new("emptied");
    let input = scenario(&t, &builtin(), 47, 1_500);
    broker.create(
        &[&t.riders, &t.deliveries, &t.districts, &t.snapshots, &t.dlq],
        PARTITIONS,
    );
    let bootstrap = broker.bootstrap();
    let leftover = |topic: &str, key: &str, value: &str| {
        Record::new(topic, Some(key.as_bytes()), Some(value.as_bytes()))
    };
    let mut earlier = vec![
        leftover(
            &t.snapshots,
            "r-left-behind",
            r#"{"rider_id":"r-left-behind","as_of":1}"#,
        ),
        leftover(&t.snapshots, "r-garbled", "not json {"),
    ];
    for i in 0..40 {
        earlier.push(leftover(
            &t.districts,
            &format!("99{i:08}"),
            r#"{"as_of":1}"#,
        ));
    }
    produce(&bootstrap, &earlier);
    // Every record of the district changelog goes, as retention would take them.
    let Broker::Tansu(tansu) = &mut broker else {
        unreachable!()
    };
    tansu.down();
    let partitions = format!(
        "(select tp.id from topition tp join topic t on t.id = tp.topic where t.name = '{}')",
        t.districts
    );
    let sql = format!(
        "delete from header where topition in {partitions}; \
         delete from record where topition in {partitions}; \
         update watermark set low = high where topition in {partitions}; \
         select count(*) from watermark where low = high and high > 0 and topition in {partitions};"
    );
    let emptied = std::process::Command::new("sqlite3")
        .arg(tansu.dir().join("tansu.db"))
        .arg(&sql)
        .output()
        .expect("sqlite3 runs (Debian package sqlite3)");
    assert!(emptied.status.success(), "{emptied:?}");
    let count: u32 = String::from_utf8_lossy(&emptied.stdout)
        .trim()
        .parse()
        .expect("a count");
    assert!(count > 0, "no partition holding records was emptied");
    tansu.up();

    // No input yet, so nothing new reaches the emptied partitions: the view must load from what
    // fetch answers say is there, not wait for records.
    let state = state_dir("emptied");
    let run = Dongflow::run(&t.args(&bootstrap, &state));
    eventually(
        Duration::from_secs(30),
        "the changelog's view loaded",
        || {
            run.log()
                .contains("stale view: 2 changelog records loaded")
                .then_some(())
        },
    );
    produce(&bootstrap, &input.records);
    let mut outputs = Outputs::new(&bootstrap, &t);
    outputs.wait_for(&input);
    eventually(Duration::from_secs(30), "the leftovers cleared", || {
        outputs.riders.poll(Duration::from_millis(50));
        let tombstoned = |key: &str| {
            outputs
                .riders
                .records
                .iter()
                .any(|r| r.key.as_deref() == Some(key.as_bytes()) && r.value.is_none())
        };
        (tombstoned("r-left-behind") && tombstoned("r-garbled")).then_some(())
    });
    let log = run.log();
    assert!(log.contains("the state lacks tombstoned"), "{log}");
    check_http_equals_model(&run.http, &input);
    let log = run.stderr.clone();
    assert_eq!(run.terminate(), Some(0));
    eventually(Duration::from_secs(10), "the clean stop marked", || {
        let log = log.lock().unwrap_or_else(|e| e.into_inner());
        log.contains("changelog complete and marked").then_some(())
    });
}

/// A rider changelog value as the engine writes it: on shift in `code`, at `as_of`.
fn rider_value(id: &str, code: &str, as_of: u64) -> String {
    serde_json::json!({
        "rider_id": id, "status": "ON_SHIFT", "rider_type": null, "location": null,
        "district": {"code": code, "name": code}, "deliveries": [], "updated_ts": 1,
        "as_of": as_of,
    })
    .to_string()
}

/// A district changelog value as the engine writes it: one rider on shift, at `as_of`.
fn district_value(code: &str, as_of: u64) -> String {
    serde_json::json!({
        "code": code, "name": code, "riders_on_shift": 1, "riders_delivering": 0,
        "riders_idle": 1, "active_deliveries": 0, "waiting_deliveries": 0, "pressure": 0.0,
        "as_of": as_of,
    })
    .to_string()
}

/// When the live state is ready before the stale view has read everything, the view still reads
/// to the end of what the changelog held (the clearing learns every key it held, tombstones and
/// later records included), then lets its contents go without ever answering.
#[test]
fn the_stale_view_says_its_keys_when_the_live_state_is_ready_first() {
    let broker = Broker::embedded();
    let t = Topics::new("keysonly");
    broker.create(&[&t.districts, &t.snapshots], PARTITIONS);
    let bootstrap = broker.bootstrap();
    let index = builtin();
    let (a, b) = (index.code(0).to_owned(), index.code(1).to_owned());
    let record = |topic: &str, key: &str, value: Option<String>| {
        Record::new(
            topic,
            Some(key.as_bytes()),
            value.as_deref().map(str::as_bytes),
        )
    };
    let mut records = Vec::new();
    for i in 0..2_000 {
        let id = format!("r-{i}");
        records.push(record(&t.snapshots, &id, Some(rider_value(&id, &a, 1))));
    }
    for i in 0..1_000 {
        records.push(record(&t.snapshots, &format!("r-{}", 2 * i), None));
    }
    records.push(record(&t.districts, &a, Some(district_value(&a, 1))));
    records.push(record(&t.districts, &b, Some(district_value(&b, 1))));
    records.push(record(&t.districts, &b, None));
    produce(&bootstrap, &records);

    // Live from the start: the view never answers, and still says the keys, even when asked to
    // let go (as HTTP asks once the live state is ready) before it has read them.
    let view = changelog_view(&bootstrap, &t, true);
    view.release();
    let held = eventually(Duration::from_secs(30), "the held keys", || {
        assert!(
            view.answer(&dongflow::Query::Districts).is_none(),
            "a view released at load never answers"
        );
        view.held_keys()
    });
    let mut expected: Vec<String> = (0..1_000).map(|i| format!("r-{}", 2 * i + 1)).collect();
    expected.sort();
    assert_eq!(names(&held.riders), expected);
    assert_eq!(names(&held.districts), [a]);
    assert!(
        held.riders.iter().all(|h| h.fingerprint.is_some()),
        "every value read back"
    );
    eventually(Duration::from_secs(10), "the contents let go", || {
        (view.as_of() == 0).then_some(())
    });
    view.stop();
}

/// The record keys of held keys, sorted.
fn names(held: &[dongflow::changelog::HeldKey]) -> Vec<String> {
    let mut keys: Vec<String> = held.iter().map(|h| h.key.clone()).collect();
    keys.sort();
    keys
}

/// The stale view of `t`'s changelog topics, with no checkpoint, reading at once, with the live
/// state ready (`live`) or never.
fn changelog_view(
    bootstrap: &str,
    t: &Topics,
    live: bool,
) -> std::sync::Arc<dongflow::view::StaleView> {
    let source = dongflow::view::StaleSource {
        brokers: bootstrap.into(),
        district_topic: t.districts.clone(),
        rider_topic: t.snapshots.clone(),
        index: builtin(),
        restored: None,
        reconciles: true,
    };
    dongflow::view::StaleView::start(source, move || live).expect("view starts")
}

/// A changelog value that cannot be read back is counted and skipped, not read as a deletion: the
/// key keeps its earlier value, and a key with nothing readable is still held (so that clearing
/// replaces it).
#[test]
fn an_undecodable_changelog_value_is_counted_not_read_as_a_deletion() {
    let broker = Broker::embedded();
    let t = Topics::new("garbled");
    broker.create(&[&t.districts, &t.snapshots], PARTITIONS);
    let bootstrap = broker.bootstrap();
    let code = builtin().code(0).to_owned();
    let record = |key: &str, value: &str| {
        Record::new(&t.snapshots, Some(key.as_bytes()), Some(value.as_bytes()))
    };
    produce(
        &bootstrap,
        &[
            record("r-1", &rider_value("r-1", &code, 5)),
            record("r-1", "\u{1}garbled"),
            record("r-2", "not json {"),
            record("r-3", r#"{"rider_id": "r-3", "as_of": 6}"#),
        ],
    );
    let view = changelog_view(&bootstrap, &t, false);
    let held = eventually(Duration::from_secs(30), "the view loaded", || {
        view.held_keys()
    });
    assert_eq!(names(&held.riders), ["r-1", "r-2", "r-3"]);
    assert!(
        held.riders.iter().all(|h| h.fingerprint.is_none()),
        "a key whose latest value cannot be read is always written again: {held:?}"
    );
    assert_eq!(view.undecodable(), 3);
    let rider = |id: &str| {
        view.answer(&dongflow::Query::Rider(id.into()))
            .map(|a| a.body)
    };
    let Some(dongflow::AnswerBody::Rider(Some(r1))) = rider("r-1") else {
        panic!("r-1 keeps its value");
    };
    assert_eq!(r1.rider.district, 0);
    assert_eq!(rider("r-2"), Some(dongflow::AnswerBody::Rider(None)));
    let answer = view.answer(&dongflow::Query::Districts).expect("answers");
    assert_eq!((answer.as_of, answer.stale), (5, true));
    view.stop();
}

/// kill -9 at random moments while events arrive, restarts with the same state dir (and changing
/// worker counts): nothing lost, nothing counted twice.
#[test]
fn crashes_lose_nothing() {
    let Some(broker) = Broker::tansu() else {
        return;
    };
    crash_test(&broker, "crash");
}

fn crash_test(broker: &Broker, test: &str) {
    use rand::{Rng, SeedableRng};
    let index = builtin();
    let t = Topics::new(test);
    let input = scenario(&t, &index, 19, 6_000);
    broker.create(&[&t.riders, &t.deliveries], PARTITIONS);
    let bootstrap = broker.bootstrap();
    let state = state_dir(test);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(23);
    let chunks: Vec<&[Record]> = input.records.chunks(300).collect();
    // Kill after these chunks (at least three kills), then run to the end.
    let mut kills: Vec<usize> = (0..3)
        .map(|_| rng.random_range(1..chunks.len() - 1))
        .collect();
    kills.sort_unstable();
    let mut produced = 0;
    for (round, &kill_after) in kills.iter().chain([&chunks.len()]).enumerate() {
        let workers = if round % 2 == 0 { "2" } else { "1" };
        let mut args = t.resume_args(&bootstrap, &state, workers);
        args.extend(["--checkpoint-interval", "300ms"]);
        let run = Dongflow::run(&args);
        while produced < kill_after.min(chunks.len()) {
            produce(&bootstrap, chunks[produced]);
            produced += 1;
        }
        if round < kills.len() {
            // Let it work a random while (sometimes past a checkpoint, sometimes not), then kill -9.
            let wait = Duration::from_millis(rng.random_range(0..900));
            let until = std::time::Instant::now() + wait;
            while std::time::Instant::now() < until {
                std::thread::yield_now();
            }
            drop(run); // SIGKILL
        } else {
            let mut outputs = Outputs::new(&bootstrap, &t);
            outputs.wait_for(&input);
            check_http_matches(&run.http, &outputs);
            check_metrics_dead_letters_at_least(&outputs, &input);
            assert_eq!(run.terminate(), Some(0));
        }
    }
}

/// After crashes a bad record may be dead-lettered again (its offset was not checkpointed yet),
/// never lost.
fn check_metrics_dead_letters_at_least(outputs: &Outputs, input: &Input) {
    assert!(outputs.dlq.records.len() >= input.bad.len());
}

/// Where a restarted process's stale answers come from in [`stale_until_ready`].
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StaleFrom {
    /// The changelog topics read back: the restart has no checkpoint (its state dir is emptied).
    Changelog,
    /// The restored checkpoint: the changelog topics cannot be read either.
    Checkpoint,
}

/// While a restarted process cannot catch up (here: an input partition has lost its leader), it
/// answers from the changelog it published before (`stale: true`, the records' `as_of`) and
/// `/readyz` is 503; once it has caught up, answers are live again.
#[test]
fn answers_are_stale_from_the_changelog_until_the_live_state_is_ready() {
    stale_until_ready("stale", 29, StaleFrom::Changelog);
}

/// As above, but the changelog cannot be read either: the restored checkpoint answers (`stale:
/// true`, the checkpoint's `as_of`), with the values that were published before.
#[test]
fn answers_are_stale_from_the_checkpoint_until_the_live_state_is_ready() {
    stale_until_ready("stalecp", 37, StaleFrom::Checkpoint);
}

/// A fatal producer error (the embedded broker refuses the engine's first changelog write with a
/// sequence an idempotent producer cannot recover from) stops the process with exit 1 and one
/// clear line, instead of a changelog that stops silently while `/readyz` stays 200.
#[test]
fn a_fatal_producer_error_stops_the_process_with_exit_1() {
    let Fixture {
        broker,
        t,
        input,
        bootstrap,
        state,
    } = Fixture::embedded("fatal", 43, 1_000);
    produce(&bootstrap, &input.records);
    let embedded = broker.as_embedded();
    embedded.fail_produce_requests(&[
        rdkafka::types::RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
    ]);
    let started = std::time::Instant::now();
    let mut run = Dongflow::run(&t.args(&bootstrap, &state));
    let code = eventually(Duration::from_secs(60), "the process to exit", || {
        run.exited()
    });
    assert_eq!(code, Some(1), "{}", run.log());
    let log = run.log();
    let last = log.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("dongflow: the Kafka producer failed for good (")
            && last.contains("supervisor restarts"),
        "{log}"
    );
    eprintln!("exited 1 {:?} after the start", started.elapsed());
}

/// `--terminal-ttl`: a delivered delivery is remembered that long (late events for it are ignored),
/// then forgotten, so that an event for the same id starts a new delivery.
#[test]
fn terminal_ttl_says_how_long_an_ended_delivery_is_remembered() {
    let broker = Broker::embedded();
    let t = Topics::new("ttl");
    broker.create(
        &[&t.riders, &t.deliveries, &t.districts, &t.snapshots, &t.dlq],
        PARTITIONS,
    );
    let bootstrap = broker.bootstrap();
    let state = state_dir("ttl");
    let mut args = t.args(&bootstrap, &state);
    // Long enough that the late event below is processed well within it, even on a busy machine.
    args.extend(["--terminal-ttl", "10s"]);
    let run = Dongflow::run(&args);
    ready(&run.http);
    let client = common::Client::at(run.http.clone());
    // 코엑스, in 강남구 (1168000000) on the built-in map.
    let delivery = |id: &str, status: &str, ts: u64| {
        let value = format!(
            r#"{{"delivery_id":"{id}","status":"{status}","pickup":{{"lat":37.5089,"lon":127.0631}},"ts":{ts}}}"#
        );
        Record::new(&t.deliveries, Some(id.as_bytes()), Some(value.as_bytes()))
    };
    let metric = |series: &str| {
        let (_, _, text) = client.get("/metrics");
        common::sample(&text, series).unwrap_or(0.0)
    };
    let waiting = || client.json("/v1/districts/1168000000").1["waiting_deliveries"].as_u64();
    let applied = r#"dongflow_events_applied_total{kind="delivery"}"#;
    let after_terminal = r#"dongflow_events_after_terminal_total{kind="delivery"}"#;
    let expired = r#"dongflow_tombstones_expired_total{kind="delivery"}"#;
    let ts = 1_764_000_000_000;
    produce(
        &bootstrap,
        &[
            delivery("d-1", "WAITING", ts),
            delivery("d-1", "DELIVERED", ts + 1),
        ],
    );
    eventually(Duration::from_secs(30), "both events applied", || {
        (metric(applied) == 2.0).then_some(())
    });
    // Within the ttl a later event is ignored: the delivery stays ended.
    produce(&bootstrap, &[delivery("d-1", "WAITING", ts + 2)]);
    eventually(Duration::from_secs(30), "the late event ignored", || {
        (metric(after_terminal) == 1.0).then_some(())
    });
    assert_eq!(waiting(), Some(0));
    // After it, the delivery is forgotten as the engine's time passes.
    eventually(
        Duration::from_secs(60),
        "the ended delivery forgotten",
        || (metric(expired) == 1.0).then_some(()),
    );
    produce(&bootstrap, &[delivery("d-1", "WAITING", ts + 3)]);
    eventually(Duration::from_secs(30), "d-1 waiting again", || {
        (waiting() == Some(1)).then_some(())
    });
    assert_eq!(run.terminate(), Some(0));
}

/// `--rider-ttl`: a rider off shift is remembered that long with its last type and location, then
/// forgotten; a late ping of it is still stale and cannot start a shift.
#[test]
fn rider_ttl_forgets_a_rider_off_shift_and_its_late_pings_stay_stale() {
    let broker = Broker::embedded();
    let t = Topics::new("rider-ttl");
    broker.create(
        &[&t.riders, &t.deliveries, &t.districts, &t.snapshots, &t.dlq],
        PARTITIONS,
    );
    let bootstrap = broker.bootstrap();
    let state = state_dir("rider-ttl");
    let mut args = t.args(&bootstrap, &state);
    args.extend(["--rider-ttl", "3s"]);
    let run = Dongflow::run(&args);
    ready(&run.http);
    let client = common::Client::at(run.http.clone());
    // 코엑스, in 강남구 (1168000000) on the built-in map.
    let rider = |id: &str, status: &str, ts: u64, located: bool| {
        let known = match located {
            true => r#""rider_type":"CONNECT","location":{"lat":37.5089,"lon":127.0631},"#,
            false => "",
        };
        let value = format!(r#"{{"rider_id":"{id}","status":"{status}",{known}"ts":{ts}}}"#);
        Record::new(&t.riders, Some(id.as_bytes()), Some(value.as_bytes()))
    };
    let metric = |series: &str| {
        let (_, _, text) = client.get("/metrics");
        common::sample(&text, series).unwrap_or(0.0)
    };
    let shown = || {
        let (status, body) = client.json("/v1/riders/r-1");
        let district = body["district"]["code"].as_str().map(str::to_owned);
        (
            status,
            district,
            body["rider_type"].as_str().map(str::to_owned),
        )
    };
    let stale = r#"dongflow_events_stale_total{kind="rider"}"#;
    let forgotten = r#"dongflow_idle_forgotten_total{kind="rider"}"#;
    let ts = 1_764_000_000_000;
    // Off shift for a moment: the next shift keeps the type and location it had.
    produce(
        &bootstrap,
        &[
            rider("r-1", "SHIFT_STARTED", ts, true),
            rider("r-1", "SHIFT_ENDED", ts + 1, false),
            rider("r-1", "SHIFT_STARTED", ts + 2, false),
        ],
    );
    let known = (
        200,
        Some("1168000000".to_owned()),
        Some("CONNECT".to_owned()),
    );
    eventually(Duration::from_secs(30), "r-1 on shift in 강남구", || {
        (shown() == known).then_some(())
    });
    produce(&bootstrap, &[rider("r-1", "SHIFT_ENDED", ts + 3, false)]);
    eventually(Duration::from_secs(30), "r-1 off shift", || {
        (shown().0 == 404).then_some(())
    });
    // Forgotten as the engine's time passes, with no other event coming.
    eventually(Duration::from_secs(60), "r-1 forgotten", || {
        (metric(forgotten) == 1.0).then_some(())
    });
    // A late ping of the forgotten rider is stale, as it was while the rider was held.
    let before = metric(stale);
    produce(&bootstrap, &[rider("r-1", "ON_SHIFT", ts + 2, true)]);
    eventually(Duration::from_secs(30), "the late ping ignored", || {
        (metric(stale) == before + 1.0).then_some(())
    });
    assert_eq!(shown().0, 404, "a late ping starts no shift");
    // A new shift starts anew: without the forgotten type and location.
    produce(&bootstrap, &[rider("r-1", "SHIFT_STARTED", ts + 10, false)]);
    eventually(Duration::from_secs(30), "r-1 on shift, unassigned", || {
        (shown() == (200, Some("unassigned".to_owned()), None)).then_some(())
    });
    assert_eq!(run.terminate(), Some(0));
}

/// CONTRACT section 7: while `/readyz` is 503, every `/v1` answer is 503 or `stale: true`, also at a
/// first start over empty changelog topics, where no stale view holds anything. The inputs cannot
/// be read at first (no partition has a leader), so the live state exists but cannot catch up.
#[test]
fn no_answer_says_live_before_ready_at_a_first_start() {
    let Fixture {
        broker,
        t,
        input,
        bootstrap,
        state,
    } = Fixture::embedded("first-start", 41, 3_000);
    produce(&bootstrap, &input.records);
    let embedded = broker.as_embedded();
    let leaderless = [&t.riders, &t.deliveries];
    for topic in leaderless {
        for p in 0..PARTITIONS {
            embedded.set_leader(topic, p, None).expect("leader-less");
        }
    }
    let run = Dongflow::run(&t.args(&bootstrap, &state));
    let client = common::Client::at(run.http.clone());
    let rider = input
        .expected_riders
        .keys()
        .next()
        .expect("a rider")
        .clone();
    let paths = [
        "/v1/districts".to_owned(),
        "/v1/districts/1168000000".to_owned(),
        "/v1/districts/1168000000/riders".to_owned(),
        format!("/v1/riders/{rider}"),
    ];
    let mut before_ready = 0;
    while before_ready < 200 {
        for path in &paths {
            let (status, body) = client.json(path);
            assert_eq!(client.json("/readyz").0, 503, "nothing can be read yet");
            assert!(
                status == 503 || (status != 500 && body["stale"] == Value::Bool(true)),
                "{path} before ready: {status} {body}"
            );
            before_ready += 1;
        }
    }
    for topic in leaderless {
        for p in 0..PARTITIONS {
            embedded.set_leader(topic, p, Some(1)).expect("leader back");
        }
    }
    // From the restart of the partitions on, each answer taken while `/readyz` still says 503
    // must be stale or 503 too; after it says 200, answers are live.
    loop {
        let answers: Vec<(u16, Value)> = paths.iter().map(|p| client.json(p)).collect();
        if client.json("/readyz").0 == 200 {
            break;
        }
        for (status, body) in answers {
            assert!(
                status == 503 || (status != 500 && body["stale"] == Value::Bool(true)),
                "before ready: {status} {body}"
            );
        }
    }
    check_http_equals_model(&run.http, &input);
    for path in &paths {
        let (status, body) = client.json(path);
        assert_eq!(
            (status, &body["stale"]),
            (200, &Value::Bool(false)),
            "{path}"
        );
    }
    assert_eq!(run.terminate(), Some(0));
}

fn stale_until_ready(name: &str, seed: u64, from: StaleFrom) {
    let Fixture {
        broker,
        t,
        input,
        bootstrap,
        state,
    } = Fixture::embedded(name, seed, 6_000);
    let (first, rest) = input.records.split_at(3_000);
    produce(&bootstrap, first);
    let args = t.resume_args(&bootstrap, &state, "2");
    let run = Dongflow::run(&args);
    ready(&run.http);
    let client = common::Client::at(run.http.clone());
    let mut published = Outputs::new(&bootstrap, &t);
    eventually(
        Duration::from_secs(60),
        "the changelog to show the live view",
        || {
            published.poll();
            let (_, body) = client.json("/v1/districts");
            let live: BTreeMap<String, Value> = body["districts"]
                .as_array()?
                .iter()
                .map(|d| (d["code"].as_str().unwrap_or_default().to_owned(), d.clone()))
                .collect();
            (live == without_as_of(published.districts.latest())).then_some(())
        },
    );
    assert_eq!(run.terminate(), Some(0));
    published.read_to_end(&bootstrap);
    let districts_before = published.districts.latest();
    let riders_before = published.riders.latest();
    let as_of_before = districts_before
        .values()
        .filter_map(|v| v["as_of"].as_u64())
        .max();

    produce(&bootstrap, rest);
    let embedded = broker.as_embedded();
    // No input partition can be read: the live state cannot catch up at all.
    let leaderless = [&t.riders, &t.deliveries];
    for topic in leaderless {
        for p in 0..PARTITIONS {
            embedded.set_leader(topic, p, None).expect("leader-less");
        }
    }
    // The checkpoint variant restarts onto new, empty changelog topics, so that only the
    // checkpoint has the state (leader-less changelog partitions would crash the mock broker).
    let fresh = (
        format!("{}-new", t.districts),
        format!("{}-new", t.snapshots),
    );
    let mut args = args.clone();
    let checkpoint_time = match from {
        StaleFrom::Changelog => {
            std::fs::remove_dir_all(&state).expect("state dir emptied");
            None
        }
        StaleFrom::Checkpoint => {
            for a in args.iter_mut() {
                if *a == t.districts {
                    *a = &fresh.0;
                } else if *a == t.snapshots {
                    *a = &fresh.1;
                }
            }
            newest_checkpoint(&state)
        }
    };
    let started = std::time::Instant::now();
    let run = Dongflow::run(&args);
    let client = common::Client::at(run.http.clone());
    let mut stale_answers = 0;
    let mut first_stale: Option<Duration> = None;
    eventually(Duration::from_secs(60), "stale answers", || {
        assert_eq!(
            client.json("/readyz").0,
            503,
            "not ready while a partition cannot be read"
        );
        let (status, body) = client.json("/v1/districts");
        if status != 200 || body["stale"] != Value::Bool(true) {
            return None;
        }
        // The records' as_of: never older than before the restart.
        assert!(
            body["as_of"].as_u64() >= as_of_before,
            "the records' as_of: {body}"
        );
        if first_stale.is_none() && from == StaleFrom::Checkpoint {
            // The checkpoint's time, or that of the restored state published to the new topics
            // if the view read them after it was.
            assert!(
                body["as_of"].as_u64() >= checkpoint_time,
                "at least the checkpoint's time: {body}"
            );
        }
        assert_eq!(
            by_code(&body["districts"]),
            without_as_of(districts_before.clone())
        );
        for (id, value) in riders_before.iter().take(10) {
            let (status, rider) = client.json(&format!("/v1/riders/{id}"));
            assert_eq!(status, 200);
            let mut expected = value.clone();
            expected["stale"] = Value::Bool(true);
            expected["as_of"] = rider["as_of"].clone();
            assert_eq!(rider, expected);
        }
        let code = districts_before.keys().next().expect("a district");
        let (status, one) = client.json(&format!("/v1/districts/{code}"));
        assert_eq!((status, &one["stale"]), (200, &Value::Bool(true)));
        let (status, riders) = client.json(&format!("/v1/districts/{code}/riders"));
        assert_eq!((status, &riders["stale"]), (200, &Value::Bool(true)));
        stale_answers += 1;
        first_stale.get_or_insert(started.elapsed());
        (stale_answers >= 3).then_some(())
    });
    eprintln!("first stale answer ({from:?}) {first_stale:?} after the process was started");
    // A push feed opened now follows the stale view, then the live one with a fresh snapshot.
    let feed = common::sse::Feed::open(&run.http, "/v1/districts/changes", None);
    let first = feed.next();
    assert_eq!(
        (first.kind.as_str(), &first.data["stale"]),
        ("snapshot", &Value::Bool(true))
    );
    assert_eq!(
        by_code(&first.data["districts"]),
        without_as_of(districts_before.clone())
    );
    for topic in leaderless {
        for p in 0..PARTITIONS {
            embedded.set_leader(topic, p, Some(1)).expect("leader back");
        }
    }
    ready(&run.http);
    let mut last = first.id;
    let live = eventually(Duration::from_secs(60), "a live snapshot", || {
        let e = feed.next();
        assert!(e.id >= last, "as_of went back: {:?} after {last:?}", e.id);
        last = e.id;
        (e.kind == "snapshot" && e.data["stale"] == Value::Bool(false)).then_some(e)
    });
    assert!(live.data["districts"].is_array());
    check_http_equals_model(&run.http, &input);
    let topics = match from {
        // The replay clears the riders whose whole shift fell in the first part: they are in the
        // changelog, and the caught-up state lacks them.
        StaleFrom::Changelog => (t.districts.clone(), t.snapshots.clone()),
        // The new changelog topics are not the ones the checkpoint's changelog went to: the
        // restored state is published to them again.
        StaleFrom::Checkpoint => {
            assert!(
                run.log().contains("reconciled with its state"),
                "other changelog topics: {}",
                run.log()
            );
            fresh.clone()
        }
    };
    let mut riders = Reader::new(&bootstrap, &topics.1, PARTITIONS);
    let mut districts = Reader::new(&bootstrap, &topics.0, PARTITIONS);
    eventually(
        Duration::from_secs(60),
        "the changelog equal to the model",
        || {
            riders.poll(Duration::from_millis(50));
            districts.poll(Duration::from_millis(50));
            (without_as_of(riders.latest()) == input.expected_riders
                && without_as_of(districts.latest()) == input.expected_districts)
                .then_some(())
        },
    );
    assert_eq!(client.json("/v1/districts").1["stale"], Value::Bool(false));
    assert_eq!(run.terminate(), Some(0));
}

/// A list of district objects by code.
fn by_code(list: &Value) -> BTreeMap<String, Value> {
    list.as_array()
        .expect("districts")
        .iter()
        .map(|d| (d["code"].as_str().expect("code").to_owned(), d.clone()))
        .collect()
}

/// The time of the newest checkpoint in `state`.
fn newest_checkpoint(state: &str) -> Option<u64> {
    std::fs::read_dir(state)
        .expect("state dir")
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .to_str()?
                .strip_prefix("checkpoint-")?
                .parse()
                .ok()
        })
        .max()
}

/// Every district and every rider the model has, over HTTP, live.
fn check_http_equals_model(http: &str, input: &Input) {
    let client = common::Client::at(http.to_owned());
    let (status, body) = client.json("/v1/districts");
    assert_eq!((status, &body["stale"]), (200, &Value::Bool(false)));
    let from_http = by_code(&body["districts"]);
    assert_eq!(from_http, input.expected_districts);
    for (id, snapshot) in &input.expected_riders {
        let (status, mut body) = client.json(&format!("/v1/riders/{id}"));
        assert_eq!(status, 200);
        let o = body.as_object_mut().expect("object");
        o.remove("as_of");
        assert_eq!(o.remove("stale"), Some(Value::Bool(false)));
        assert_eq!(&body, snapshot);
    }
}

/// A checkpoint written by a cluster of two processes (one worker each, one state dir) restores
/// into a single process with two workers, which then reads on from the checkpointed offsets. And
/// fail-stop: when one process is killed, the other exits 1 within 5 s instead of going on frozen.
#[test]
fn a_cluster_checkpoint_restores_into_one_process() {
    let Fixture {
        broker: _broker, // kept alive for the whole test
        t,
        input,
        bootstrap,
        state,
    } = Fixture::embedded("cluster", 31, 3_000);
    let (first, second) = input.records.split_at(2_000);
    produce(&bootstrap, first);

    std::fs::create_dir_all(&state).expect("state dir");
    let hostfile = std::path::Path::new(&state).join("hosts");
    std::fs::write(
        &hostfile,
        format!("127.0.0.1:{}\n127.0.0.1:{}\n", free_port(), free_port()),
    )
    .expect("hostfile");
    let hostfile = hostfile.to_string_lossy().into_owned();
    let http: Vec<String> = (0..2)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let peers = format!("http://{},http://{}", http[0], http[1]);
    let processes: Vec<Dongflow> = (0..2)
        .map(|p| {
            let process = p.to_string();
            let mut args = t.args_with(&bootstrap, &state, "1");
            args.extend([
                "-n",
                "2",
                "-p",
                &process,
                "-h",
                &hostfile,
                "--http-peers",
                &peers,
            ]);
            args.extend(["--checkpoint-interval", "200ms"]);
            Dongflow::start_at(&http[p], &args)
        })
        .collect();
    for addr in &http {
        // A cluster process serves once both have joined.
        eventually(Duration::from_secs(60), "the process to serve HTTP", || {
            std::net::TcpStream::connect(addr).ok()
        });
    }
    // Readiness means the whole input: when either process first says ready, both have read
    // every record there was at start, its own partitions and the other's.
    let clients: Vec<common::Client> = processes
        .iter()
        .map(|p| common::Client::at(p.http.clone()))
        .collect();
    let mut seen_ready = [false; 2];
    eventually(Duration::from_secs(60), "both processes ready", || {
        for (p, client) in clients.iter().enumerate() {
            if !seen_ready[p] && client.json("/readyz").0 == 200 {
                seen_ready[p] = true;
                let read: f64 = processes.iter().map(|q| records_read(&q.http)).sum();
                assert_eq!(
                    read,
                    first.len() as f64,
                    "process {p} says ready before the cluster read its input"
                );
            }
        }
        (seen_ready == [true, true]).then_some(())
    });
    // Both processes have read everything: wait for a checkpoint taken after that, complete with
    // both processes' parts, then take the cluster down hard.
    eventually(
        Duration::from_secs(60),
        "a complete cluster checkpoint after the input",
        || {
            let read: f64 = processes.iter().map(|p| records_read(&p.http)).sum();
            let complete = processes.iter().all(|p| p.log().contains("checkpoint"))
                && read == first.len() as f64;
            complete.then_some(())
        },
    );
    let written = |p: &Dongflow| p.log().matches("written:").count();
    let before: Vec<usize> = processes.iter().map(written).collect();
    eventually(
        Duration::from_secs(30),
        "two more checkpoints on each process",
        || {
            processes
                .iter()
                .zip(&before)
                .all(|(p, b)| written(p) >= b + 2)
                .then_some(())
        },
    );
    // Fail-stop: kill -9 one process; the other says so and exits 1 within 5 s, with one line.
    let mut processes = processes;
    let mut survivor = processes.remove(0);
    let killed_at = std::time::Instant::now();
    drop(processes); // SIGKILL process 1
    let code = eventually(Duration::from_secs(5), "the survivor to exit", || {
        survivor.exited()
    });
    let log = survivor.log();
    assert_eq!(code, Some(1), "{log}");
    assert!(
        log.contains("dongflow: lost a peer of the timely cluster")
            && log.contains("a supervisor restarts every process"),
        "{log}"
    );
    eprintln!(
        "the survivor exited 1 {:?} after its peer was killed",
        killed_at.elapsed()
    );
    drop(survivor);

    produce(&bootstrap, second);
    let args = t.resume_args(&bootstrap, &state, "2");
    let run = Dongflow::run(&args);
    let mut outputs = Outputs::new(&bootstrap, &t);
    outputs.wait_for(&input);
    check_http_matches(&run.http, &outputs);
    assert!(
        run.log().contains("restoring checkpoint"),
        "the single process resumes the cluster's checkpoint"
    );
    assert!(
        records_read(&run.http) < input.records.len() as f64,
        "the restart does not read everything again"
    );
    assert_eq!(run.terminate(), Some(0));
}
