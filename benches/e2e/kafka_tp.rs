//! Kafka throughput against tansu: a pre-produced topic pair read by a bare rdkafka consumer (the
//! ceiling) and by the engine (`-w 1`, `-w 2`) until it has caught up and the broker has
//! acknowledged every changelog record.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dongflow::pipeline::{Pipeline, PipelineConfig};
use dongflow::EngineConfig;
use dongflow_connectors::kafka::generate::{generate, GenerateConfig};
use dongflow_connectors::kafka::{create_topics, KafkaConfig, StartAt, TopicSpec};
use dongflow_connectors::simulator::SimConfig;
use dongflow_dataflow::districts::DistrictIndex;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::progress::Progress;

/// Partitions of each input topic.
pub const PARTITIONS: i32 = 4;

/// The input topics, filled once.
pub struct Inputs {
    pub bootstrap: String,
    pub topics: [String; 2],
    pub events: u64,
    /// How fast they were produced (tansu's write rate).
    pub produce_rate: f64,
}

/// Creates the input topics and produces `events` simulator events of `riders` riders.
pub fn produce(bootstrap: &str, events: u64, riders: usize, progress: &Progress) -> Inputs {
    let tag = std::process::id();
    let topics = [
        format!("bench-riders-{tag}"),
        format!("bench-deliveries-{tag}"),
    ];
    let specs: Vec<TopicSpec> = topics
        .iter()
        .map(|t| TopicSpec::new(t, PARTITIONS))
        .collect();
    create_topics(&bootstrap.into(), &specs, Duration::from_secs(30)).expect("topics");
    let started = Instant::now();
    let produced = generate(
        SimConfig {
            riders,
            seed: 42,
            start_ts: 1_764_000_000_000,
        },
        &GenerateConfig {
            brokers: bootstrap.into(),
            rider_topic: topics[0].clone(),
            delivery_topic: topics[1].clone(),
            rate: 0,
            events: Some(events),
            duration: None,
        },
        &AtomicBool::new(false),
        |sent| progress.update(&format!("{sent} of {events} events produced")),
    )
    .expect("produced");
    assert_eq!(produced.failed, 0, "the broker refused events");
    Inputs {
        bootstrap: bootstrap.to_owned(),
        topics,
        events,
        produce_rate: produced.sent as f64 / started.elapsed().as_secs_f64(),
    }
}

/// Reads every input record with a plain consumer; returns records/s.
pub fn bare_consumer(inputs: &Inputs, progress: &Progress) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &inputs.bootstrap)
        .set("group.id", "dongflow-bench-bare")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in &inputs.topics {
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(t, p, Offset::Beginning)
                .expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let started = Instant::now();
    let mut n = 0u64;
    while n < inputs.events {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => {
                n += 1;
                if n.is_multiple_of(50_000) {
                    progress.update(&format!("{n} of {} read", inputs.events));
                }
            }
            Some(Err(e)) => eprintln!("bare consumer: {e}"),
            None => {}
        }
    }
    inputs.events as f64 / started.elapsed().as_secs_f64()
}

/// Runs the engine from the earliest offsets until it has caught up and every changelog record
/// is acknowledged; returns events/s and changelog records written per input event.
pub fn engine(inputs: &Inputs, workers: usize, run: usize, progress: &Progress) -> (f64, f64) {
    let index = Arc::new(DistrictIndex::builtin_seoul());
    let tag = format!("{}-w{workers}-{run}", std::process::id());
    let config = PipelineConfig {
        engine: EngineConfig::new(workers, index),
        kafka: KafkaConfig {
            brokers: inputs.bootstrap.as_str().into(),
            group_id: format!("dongflow-bench-{tag}"),
            rider_topic: inputs.topics[0].clone(),
            delivery_topic: inputs.topics[1].clone(),
            dead_letter_topic: format!("bench-dlq-{tag}"),
            start: StartAt::Earliest,
        },
        district_changelog_topic: format!("bench-district-changelog-{tag}"),
        rider_changelog_topic: format!("bench-rider-changelog-{tag}"),
        create_outputs: true,
        state_dir: None,
        checkpoint_interval: Duration::from_secs(10),
        restore: None,
    };
    let started = Instant::now();
    let pipeline = Pipeline::start(config).expect("pipeline");
    let mut last = Instant::now();
    while !(pipeline.handle().caught_up() && pipeline.producer_in_flight() == 0) {
        std::thread::sleep(Duration::from_millis(1));
        if last.elapsed() > Duration::from_millis(500) {
            last = Instant::now();
            progress.update(&format!(
                "{} of {} events in",
                pipeline.handle().events_in(),
                inputs.events
            ));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(
        pipeline.handle().events_in(),
        inputs.events,
        "every event went in"
    );
    let metrics = pipeline.kafka_metrics();
    let written: u64 = metrics.delivered[1..]
        .iter()
        .map(|n| n.load(Ordering::Relaxed))
        .sum();
    pipeline.stop(Duration::from_secs(60));
    (
        inputs.events as f64 / secs,
        written as f64 / inputs.events as f64,
    )
}
