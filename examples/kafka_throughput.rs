//! Kafka end to end against a broker that is already running:
//! `cargo run --release --example kafka_throughput -- BOOTSTRAP [EVENTS] [RUNS]`.
//!
//! Produces EVENTS simulator events (100k riders) to fresh input topics with 4 partitions, then,
//! RUNS times: reads them with a bare rdkafka consumer (the ceiling), and runs the engine with
//! `-w 1` and `-w 2` from the earliest offsets until it has caught up and the broker has
//! acknowledged every changelog record. Prints one JSON object with medians, min and max.

use std::sync::atomic::AtomicBool;
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

const PARTITIONS: i32 = 4;

fn bare_consumer(bootstrap: &str, topics: &[&str], events: u64) -> f64 {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", "dongflow-bench-bare")
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(t, p, Offset::Beginning)
                .expect("partition");
        }
    }
    consumer.assign(&tpl).expect("assign");
    let started = Instant::now();
    let mut n = 0u64;
    while n < events {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(_)) => n += 1,
            Some(Err(e)) => eprintln!("bare consumer: {e}"),
            None => {}
        }
    }
    events as f64 / started.elapsed().as_secs_f64()
}

/// Events/s, and changelog records written per input event.
fn engine(
    bootstrap: &str,
    topics: &[String; 2],
    workers: usize,
    run: usize,
    events: u64,
) -> (f64, f64) {
    let index = Arc::new(DistrictIndex::builtin_seoul());
    let tag = format!("{}-w{workers}-{run}", std::process::id());
    let config = PipelineConfig {
        engine: EngineConfig::new(workers, index),
        kafka: KafkaConfig {
            brokers: bootstrap.to_owned(),
            group_id: format!("dongflow-bench-{tag}"),
            rider_topic: topics[0].clone(),
            delivery_topic: topics[1].clone(),
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
    while !(pipeline.caught_up() && pipeline.producer_in_flight() == 0) {
        std::thread::sleep(Duration::from_millis(1));
    }
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(pipeline.events_in(), events, "every event went in");
    let metrics = pipeline.kafka_metrics();
    let written: u64 = metrics.delivered[1..]
        .iter()
        .map(|n| n.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    pipeline.stop(Duration::from_secs(60));
    (events as f64 / secs, written as f64 / events as f64)
}

fn stats(mut v: Vec<f64>) -> serde_json::Value {
    v.sort_by(f64::total_cmp);
    serde_json::json!({"median": v[v.len() / 2].round(), "min": v[0].round(), "max": v[v.len() - 1].round()})
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bootstrap = args
        .get(1)
        .expect("usage: kafka_throughput BOOTSTRAP [EVENTS] [RUNS]");
    let events: u64 = args
        .get(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let runs: usize = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(3);
    let tag = std::process::id();
    let topics = [
        format!("bench-riders-{tag}"),
        format!("bench-deliveries-{tag}"),
    ];
    let specs: Vec<TopicSpec> = topics
        .iter()
        .map(|t| TopicSpec::new(t, PARTITIONS))
        .collect();
    create_topics(bootstrap, &specs, Duration::from_secs(30)).expect("topics");
    let started = Instant::now();
    let produced = generate(
        SimConfig {
            riders: 100_000,
            seed: 42,
            start_ts: 1_764_000_000_000,
        },
        &GenerateConfig {
            brokers: bootstrap.clone(),
            rider_topic: topics[0].clone(),
            delivery_topic: topics[1].clone(),
            rate: 0,
            events: Some(events),
            duration: None,
        },
        &AtomicBool::new(false),
        |_| {},
    )
    .expect("produced");
    let produce_rate = produced.sent as f64 / started.elapsed().as_secs_f64();
    eprintln!("produced {} events at {produce_rate:.0}/s", produced.sent);
    let names = [topics[0].as_str(), topics[1].as_str()];
    let (mut ceiling, mut w1, mut w2) = (Vec::new(), Vec::new(), Vec::new());
    let mut per_event = 0.0;
    for run in 0..runs {
        ceiling.push(bare_consumer(bootstrap, &names, events));
        let (rate, written) = engine(bootstrap, &topics, 1, run, events);
        w1.push(rate);
        per_event = written;
        w2.push(engine(bootstrap, &topics, 2, run, events).0);
        eprintln!(
            "run {run}: ceiling {:.0}/s, -w1 {:.0}/s, -w2 {:.0}/s",
            ceiling[run], w1[run], w2[run]
        );
    }
    let ratio = |v: &[f64]| {
        let mut r: Vec<f64> = v.iter().zip(&ceiling).map(|(a, c)| a / c).collect();
        r.sort_by(f64::total_cmp);
        (r[r.len() / 2] * 1000.0).round() / 1000.0
    };
    let out = serde_json::json!({
        "events": events,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "produce_events_per_s": produce_rate.round(),
        "bare_consumer_events_per_s": stats(ceiling.clone()),
        "engine_w1_events_per_s": stats(w1.clone()),
        "engine_w2_events_per_s": stats(w2.clone()),
        "w1_over_ceiling": ratio(&w1),
        "w2_over_ceiling": ratio(&w2),
        "changelog_records_per_event": (per_event * 1000.0).round() / 1000.0,
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
