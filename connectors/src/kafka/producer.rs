//! The process's one producer, for dead letters and the changelog topics.
//!
//! It is idempotent (no duplicates or reordering when librdkafka retries), never gives up on a
//! record while the broker is away, and counts every delivery and failure by output.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::ClientContext;

use super::quiet::Quiet;
use super::{ClientSettings, KafkaError, KafkaMetrics};

/// What a record is, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// A rejected input record.
    DeadLetter = 0,
    /// A district changelog record.
    DistrictChangelog = 1,
    /// A rider changelog record.
    RiderChangelog = 2,
}

impl OutputKind {
    /// Every kind, in index order.
    pub const ALL: [OutputKind; 3] = [
        OutputKind::DeadLetter,
        OutputKind::DistrictChangelog,
        OutputKind::RiderChangelog,
    ];

    /// A label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            OutputKind::DeadLetter => "dead_letter",
            OutputKind::DistrictChangelog => "district_changelog",
            OutputKind::RiderChangelog => "rider_changelog",
        }
    }

    fn from_index(i: usize) -> OutputKind {
        OutputKind::ALL
            .get(i)
            .copied()
            .unwrap_or(OutputKind::DeadLetter)
    }
}

/// Counts deliveries and failures as librdkafka reports them.
pub struct Counting {
    metrics: Arc<KafkaMetrics>,
    quiet: Quiet,
}

impl ClientContext for Counting {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.quiet.log(level, fac, log_message);
    }

    fn error(&self, error: RdError, reason: &str) {
        self.quiet.error(&error, reason);
    }
}

impl ProducerContext for Counting {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, kind: usize) {
        let kind = OutputKind::from_index(kind);
        match result {
            Ok(_) => {
                self.metrics.delivered[kind as usize].fetch_add(1, Ordering::Relaxed);
                if kind == OutputKind::DeadLetter {
                    self.metrics.dead_lettered.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err((e, message)) => {
                // librdkafka has already retried everything retriable (the timeout is infinite),
                // so this is a permanent refusal: count it and say so.
                self.metrics.failed[kind as usize].fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    output = kind.label(),
                    topic = rdkafka::Message::topic(message),
                    "the broker refused a record for good: {e}"
                );
            }
        }
    }
}

/// The producer. Share it (`Arc`) between the workers of a process.
pub struct Producer {
    inner: ThreadedProducer<Counting>,
    metrics: Arc<KafkaMetrics>,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer").finish_non_exhaustive()
    }
}

/// Headers of a dead letter (CONTRACT section 4).
#[derive(Clone, Debug)]
pub struct DeadLetterHeaders<'a> {
    /// Why the record was rejected (the error's message).
    pub error: &'a str,
    /// The short reason label, as counted in metrics.
    pub reason: &'a str,
    /// Where the record was read.
    pub source_topic: &'a str,
    /// Its partition.
    pub source_partition: i32,
    /// Its offset.
    pub source_offset: i64,
}

impl Producer {
    /// A producer for `brokers`. It connects lazily: brokers that are down now are retried.
    pub fn new(brokers: &ClientSettings, metrics: Arc<KafkaMetrics>) -> Result<Self, KafkaError> {
        let mut config = ClientConfig::new();
        config
            // No duplicates and no reordering when a send is retried (CONTRACT section 5).
            .set("enable.idempotence", "true")
            // Never drop a record because the broker was away for a while: retried until delivered.
            .set("message.timeout.ms", "0")
            // Large batches: the changelog is about as many records as the input, and a broker
            // takes them far more cheaply in big requests. 100 ms is small against the view's
            // freshness (HTTP answers from the live state, not from the changelog).
            .set("linger.ms", "100")
            // Bounds memory while the broker is away; a full queue slows the workers instead.
            .set("queue.buffering.max.messages", "1000000")
            .set("queue.buffering.max.kbytes", "1048576")
            .set("batch.num.messages", "10000")
            // Keys go to the partition Kafka's Java clients choose (murmur2 of the key), so
            // Kafka Streams and ksqlDB applications can read the changelogs co-partitioned.
            .set("partitioner", "murmur2_random")
            // Changelog values are repetitive JSON: lz4 makes them several times smaller on the
            // wire and on the broker's disk for little CPU (docs/bench/compression.md).
            .set("compression.type", "lz4");
        // The process's own choices for these brokers (the embedded broker's longer linger), under
        // the user's properties, which `configure` applies last.
        for (key, value) in brokers.producer_defaults() {
            config.set(key, value);
        }
        let inner: ThreadedProducer<Counting> = brokers
            .configure(&mut config)
            .create_with_context(Counting {
                metrics: metrics.clone(),
                quiet: Quiet::default(),
            })?;
        Ok(Self { inner, metrics })
    }

    /// Sends one record (`value: None` is a tombstone), waiting while the queue is full.
    pub fn send(&self, kind: OutputKind, topic: &str, key: &[u8], value: Option<&[u8]>) {
        self.send_with(kind, topic, Some(key), value, None);
    }

    /// Sends a rejected input record unchanged, with its dead-letter headers.
    pub fn dead_letter(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &DeadLetterHeaders<'_>,
    ) {
        let partition = headers.source_partition.to_string();
        let offset = headers.source_offset.to_string();
        let h = OwnedHeaders::new()
            .insert(Header {
                key: "error",
                value: Some(headers.error),
            })
            .insert(Header {
                key: "error_reason",
                value: Some(headers.reason),
            })
            .insert(Header {
                key: "source_topic",
                value: Some(headers.source_topic),
            })
            .insert(Header {
                key: "source_partition",
                value: Some(&partition),
            })
            .insert(Header {
                key: "source_offset",
                value: Some(&offset),
            });
        self.send_with(OutputKind::DeadLetter, topic, key, value, Some(h));
    }

    fn send_with(
        &self,
        kind: OutputKind,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
    ) {
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topic, kind as usize);
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        let mut waiting_since: Option<Instant> = None;
        loop {
            match self.inner.send(record) {
                Ok(()) => return,
                Err((RdError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    // The broker is slower than we are (or away): wait for room, never drop.
                    record = back;
                    self.metrics
                        .queue_full_waits
                        .fetch_add(1, Ordering::Relaxed);
                    let since = *waiting_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(10) {
                        tracing::warn!(
                            topic,
                            "producer queue full for 10 s: is the broker reachable?"
                        );
                        waiting_since = Some(Instant::now());
                    }
                    self.inner.poll(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    self.metrics.failed[kind as usize].fetch_add(1, Ordering::Relaxed);
                    tracing::error!(topic, output = kind.label(), "cannot send a record: {e}");
                    return;
                }
            }
        }
    }

    /// Waits until every record sent so far is delivered, or `timeout` passes.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)?;
        Ok(())
    }

    /// The end offset (high watermark) of every partition of `topic`, as `(topic, partition,
    /// end)`.
    pub fn end_offsets(
        &self,
        topic: &str,
        timeout: Duration,
    ) -> Result<Vec<(String, i32, i64)>, KafkaError> {
        let client = self.inner.client();
        let metadata = client.fetch_metadata(Some(topic), timeout)?;
        let mut ends = Vec::new();
        for t in metadata.topics().iter().filter(|t| t.name() == topic) {
            if let Some(e) = t.error() {
                return Err(rdkafka::error::KafkaError::MetadataFetch(e.into()).into());
            }
            for p in t.partitions() {
                let (_, high) = client.fetch_watermarks(topic, p.id(), timeout)?;
                ends.push((topic.to_owned(), p.id(), high));
            }
        }
        Ok(ends)
    }

    /// librdkafka's fatal error, if the producer had one. The producer sends nothing after it (an
    /// idempotent producer that can no longer promise order or once-ness stops for good), so the
    /// process must stop; a supervisor restarts it and the restart publishes its state again.
    /// Recorded in the metrics the first time it is seen.
    pub fn fatal_error(&self) -> Option<String> {
        let (code, reason) = self.inner.client().fatal_error()?;
        let reason = format!("{reason} ({code:?})");
        if self.metrics.record_fatal(&reason) {
            tracing::error!("the Kafka producer failed for good: {reason}");
        }
        Some(reason)
    }

    /// Records sent but not yet delivered.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::kafka::{EmbeddedBroker, TopicSpec};
    use rdkafka::types::RDKafkaRespErr;

    /// The broker refuses the first produce request with a sequence it did not expect: an
    /// idempotent producer can then no longer promise order, and librdkafka stops it for good. The
    /// error is seen, kept and counted once; the record is not reported delivered.
    #[test]
    fn a_fatal_producer_error_is_seen_and_counted_once() {
        let broker = EmbeddedBroker::start(&[TopicSpec::new("out", 1)]).expect("mock cluster");
        broker.fail_produce_requests(&[
            RDKafkaRespErr::RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER,
        ]);
        let metrics = Arc::new(KafkaMetrics::default());
        let producer =
            Producer::new(&broker.bootstrap().as_str().into(), metrics.clone()).expect("producer");
        assert_eq!(producer.fatal_error(), None);
        producer.send(OutputKind::RiderChangelog, "out", b"r-1", Some(b"{}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        let reason = loop {
            if let Some(reason) = producer.fatal_error() {
                break reason;
            }
            assert!(Instant::now() < deadline, "no fatal error reported");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(reason.contains("sequence"), "{reason}");
        assert_eq!(metrics.fatal_error().as_deref(), Some(reason.as_str()));
        assert!(producer.fatal_error().is_some());
        assert_eq!(metrics.fatal_errors(), 1);
        let _ = producer.flush(Duration::from_secs(2));
        assert_eq!(
            metrics.delivered[OutputKind::RiderChangelog as usize].load(Ordering::Relaxed),
            0
        );
    }
}
