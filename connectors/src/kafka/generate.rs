//! `dongflow generate --brokers`: the simulator's events produced to the input topics, keyed by id.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::producer::{BaseProducer, BaseRecord, DeliveryResult, Producer as _, ProducerContext};
use rdkafka::ClientContext;

use super::{ClientSettings, KafkaError};
use crate::simulator::{SimConfig, SimEvent, Simulator};

/// What to produce and how fast.
#[derive(Clone, Debug)]
pub struct GenerateConfig {
    /// Bootstrap servers and the user's client properties.
    pub brokers: ClientSettings,
    /// Topic of rider events.
    pub rider_topic: String,
    /// Topic of delivery events.
    pub delivery_topic: String,
    /// Events per second; 0 is as fast as the broker takes them.
    pub rate: u64,
    /// Stop after this many events.
    pub events: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
}

/// What a run produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Produced {
    /// Events handed to the producer.
    pub sent: u64,
    /// Events the broker refused.
    pub failed: u64,
}

struct CountFailures(Arc<AtomicU64>);

impl ClientContext for CountFailures {}

impl ProducerContext for CountFailures {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            if self.0.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::error!("the broker refused an event: {e}");
            }
        }
    }
}

/// Sends `event` to its topic (`rider_topic` or `delivery_topic`, by its kind), keyed by its id;
/// while librdkafka's queue is full, serves delivery reports until there is room.
pub fn send_event<C: ProducerContext<DeliveryOpaque = ()>>(
    producer: &BaseProducer<C>,
    event: &SimEvent,
    rider_topic: &str,
    delivery_topic: &str,
) -> Result<(), RdError> {
    let topic = match event {
        SimEvent::Rider(_) => rider_topic,
        SimEvent::Delivery(_) => delivery_topic,
    };
    let payload = event.encode();
    let key = event.key().as_bytes();
    let mut record = BaseRecord::to(topic).key(key).payload(&payload[..]);
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                // The broker is behind: serve delivery reports until there is room.
                record = back;
                producer.poll(Duration::from_millis(1));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Produces the simulator's events until the limit, the duration or `stop`; `progress` is called
/// about every 100 ms with the events sent so far. Waits for every event to be delivered.
pub fn generate(
    sim: SimConfig,
    config: &GenerateConfig,
    stop: &AtomicBool,
    mut progress: impl FnMut(u64),
) -> Result<Produced, KafkaError> {
    let failed = Arc::new(AtomicU64::new(0));
    let producer: BaseProducer<CountFailures> = config
        .brokers
        .configure(
            ClientConfig::new()
                // Throughput over latency: fill large batches for a few ms.
                .set("linger.ms", "20")
                .set("batch.num.messages", "50000")
                .set("batch.size", "4000000")
                // Room for a second or two of events at full speed.
                .set("queue.buffering.max.messages", "1000000")
                .set("queue.buffering.max.kbytes", "1048576"),
        )
        .create_with_context(CountFailures(failed.clone()))?;
    let mut simulator = Simulator::new(sim);
    let started = Instant::now();
    let mut last_progress = Instant::now();
    let limit = config.events.unwrap_or(u64::MAX);
    let mut sent = 0u64;
    while sent < limit
        && !stop.load(Ordering::Relaxed)
        && config.duration.is_none_or(|d| started.elapsed() < d)
    {
        if config.rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / config.rate as f64);
            if let Some(early) = due.checked_sub(started.elapsed()) {
                // Ahead of the rate: serve delivery reports, then sleep until the next event is
                // due (polling with a timeout would spin through the reports instead).
                producer.poll(Duration::ZERO);
                std::thread::sleep(early.min(Duration::from_millis(5)));
                continue;
            }
        }
        let event = simulator.next_event();
        send_event(
            &producer,
            &event,
            &config.rider_topic,
            &config.delivery_topic,
        )?;
        sent += 1;
        if sent.is_multiple_of(4096) {
            producer.poll(Duration::ZERO);
            if last_progress.elapsed() >= Duration::from_millis(100) {
                last_progress = Instant::now();
                progress(sent);
            }
        }
    }
    while producer.in_flight_count() > 0 && !stop.load(Ordering::Relaxed) {
        producer.poll(Duration::from_millis(100));
        progress(sent);
    }
    producer.flush(Duration::from_secs(30))?;
    progress(sent);
    Ok(Produced {
        sent,
        failed: failed.load(Ordering::Relaxed),
    })
}
