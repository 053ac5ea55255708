//! What compression saves on the changelog: `cargo run --release --example compression -- [EVENTS]`.
//!
//! Runs the engine on the embedded broker over EVENTS simulated events (default 200,000; Seoul,
//! 20,000 riders), reads back every record it wrote to both changelog topics, then produces exactly
//! those records again with each codec librdkafka was built with, with the engine producer's own
//! batching (linger 100 ms, 10,000 records a batch), and reports from librdkafka's statistics the
//! bytes sent to the broker, per record and against no compression, and the CPU time the process
//! spent producing and flushing them. Prints JSON.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dongflow::pipeline::{Pipeline, PipelineConfig};
use dongflow::EngineConfig;
use dongflow_connectors::kafka::generate::{generate, GenerateConfig};
use dongflow_connectors::kafka::{EmbeddedBroker, KafkaConfig, StartAt, TopicSpec};
use dongflow_connectors::simulator::SimConfig;
use dongflow_dataflow::districts::DistrictIndex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer, ProducerContext};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

const PARTITIONS: i32 = 4;

/// Keeps the latest statistics librdkafka reported.
#[derive(Default)]
struct Stats(Mutex<Option<Statistics>>);

impl ClientContext for Stats {
    fn stats(&self, statistics: Statistics) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(statistics);
    }
}

impl ProducerContext for Stats {
    type DeliveryOpaque = ();
    fn delivery(&self, _: &rdkafka::message::DeliveryResult<'_>, _: ()) {}
}

/// CPU seconds this process has used so far (user and system, every thread).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after its closing parenthesis.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat(5), at 100 ticks a second on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// A record's key and value (`None`: a tombstone).
type KeyValue = (Vec<u8>, Option<Vec<u8>>);

/// Every record of `topic`, read from the beginning to its end offsets.
fn read_all(bootstrap: &str, topic: &str) -> Vec<KeyValue> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "dongflow-compression")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    let mut left = 0i64;
    for p in 0..PARTITIONS {
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        left += high - low;
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("partition");
    }
    consumer.assign(&tpl).expect("assign");
    let mut out = Vec::new();
    while left > 0 {
        if let Some(Ok(m)) = consumer.poll(Duration::from_secs(5)) {
            out.push((
                m.key().unwrap_or_default().to_vec(),
                m.payload().map(<[u8]>::to_vec),
            ));
            left -= 1;
        }
    }
    out
}

/// Produces `records` to `topic` with `codec`: bytes sent, CPU seconds the process spent; `None`
/// if librdkafka was built without the codec.
fn produce(bootstrap: &str, topic: &str, codec: &str, records: &[KeyValue]) -> Option<(u64, f64)> {
    let producer: BaseProducer<Stats> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("compression.type", codec)
        .set("enable.idempotence", "true")
        .set("linger.ms", "100")
        .set("batch.num.messages", "10000")
        .set("queue.buffering.max.messages", "1000000")
        .set("statistics.interval.ms", "100")
        .create_with_context(Stats::default())
        .ok()?;
    let started = cpu_seconds();
    for (key, value) in records {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(topic).key(&key[..]);
        if let Some(v) = value {
            record = record.payload(&v[..]);
        }
        while let Err((_, back)) = producer.send(record) {
            record = back;
            producer.poll(Duration::from_millis(5));
        }
    }
    producer.flush(Duration::from_secs(60)).expect("flushed");
    let seconds = cpu_seconds() - started;
    // The statistics after the flush count every byte sent.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut sent = 0;
    while Instant::now() < deadline {
        producer.poll(Duration::from_millis(150));
        let s = producer
            .context()
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(s) = s.as_ref() {
            sent = s.brokers.values().map(|b| b.txbytes).sum();
            if s.msg_cnt == 0 && s.txmsgs as usize >= records.len() {
                break;
            }
        }
    }
    Some((sent, seconds))
}

fn main() {
    let events: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(200_000);
    let index = Arc::new(DistrictIndex::builtin_seoul());
    let topics = [
        TopicSpec::new("rider-events", PARTITIONS),
        TopicSpec::new("delivery-events", PARTITIONS),
        TopicSpec::compacted("district-changelog", PARTITIONS),
        TopicSpec::compacted("rider-changelog", PARTITIONS),
        TopicSpec::new("dongflow-dlq", PARTITIONS),
        TopicSpec::new("codec-target", PARTITIONS),
    ];
    let broker = EmbeddedBroker::start(&topics).expect("embedded broker");
    let bootstrap = broker.bootstrap();
    let kafka = KafkaConfig {
        brokers: bootstrap.as_str().into(),
        group_id: "dongflow-compression".into(),
        rider_topic: "rider-events".into(),
        delivery_topic: "delivery-events".into(),
        dead_letter_topic: "dongflow-dlq".into(),
        start: StartAt::Earliest,
    };
    let stop = AtomicBool::new(false);
    let sim = SimConfig {
        riders: 20_000,
        ..SimConfig::default()
    };
    let produced = generate(
        sim,
        &GenerateConfig {
            brokers: kafka.brokers.clone(),
            rider_topic: kafka.rider_topic.clone(),
            delivery_topic: kafka.delivery_topic.clone(),
            rate: 0,
            events: Some(events),
            duration: None,
        },
        &stop,
        |_| {},
    )
    .expect("events produced");
    let pipeline = Pipeline::start(PipelineConfig {
        engine: EngineConfig::new(2, index),
        kafka,
        district_changelog_topic: "district-changelog".into(),
        rider_changelog_topic: "rider-changelog".into(),
        create_outputs: false,
        state_dir: None,
        checkpoint_interval: Duration::from_secs(3600),
        restore: None,
    })
    .expect("engine");
    let deadline = Instant::now() + Duration::from_secs(300);
    while !pipeline.handle().ready() {
        assert!(Instant::now() < deadline, "the engine did not catch up");
        std::thread::sleep(Duration::from_millis(50));
    }
    pipeline.stop(Duration::from_secs(30));
    let mut records = Vec::new();
    for topic in ["rider-changelog", "district-changelog"] {
        records.extend(read_all(&bootstrap, topic));
    }
    let value_bytes: usize = records
        .iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
        .sum();
    let mut results = Vec::new();
    let mut baseline = None;
    for codec in ["none", "lz4", "zstd", "snappy", "gzip"] {
        let Some((sent, seconds)) = produce(&bootstrap, "codec-target", codec, &records) else {
            eprintln!("{codec}: not built into librdkafka");
            continue;
        };
        let base = *baseline.get_or_insert(sent);
        results.push(serde_json::json!({
            "codec": codec,
            "bytes_sent": sent,
            "bytes_per_record": sent as f64 / records.len() as f64,
            "of_uncompressed": sent as f64 / base as f64,
            "cpu_seconds": seconds,
        }));
    }
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "input_events": produced.sent,
            "changelog_records": records.len(),
            "changelog_key_and_value_bytes": value_bytes,
            "codecs": results,
        }))
        .expect("json")
    );
}
