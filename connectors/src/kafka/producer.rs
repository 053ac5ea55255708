//! The process's one producer, for dead letters and the changelog topics.
//!
//! It is idempotent (no duplicates or reordering when librdkafka retries), never gives up on a
//! record while the broker is away, and counts every delivery and failure by output.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::{KafkaError as RdError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientContext, Message as _};

use super::quiet::Quiet;
use super::{ClientSettings, KafkaError, KafkaMetrics};

/// What a record is, for counting.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
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

/// Counts deliveries and failures as librdkafka reports them, and notes where changelog records
/// landed.
pub struct Counting {
    metrics: Arc<KafkaMetrics>,
    quiet: Quiet,
    landed: Landed,
    dead_letters: DeadLetters,
}

/// The dead letters sent and not yet acknowledged, by sequence number: a checkpoint must not pass
/// a bad record whose dead letter could still be lost ([`Producer::dead_letters_sent`]).
#[derive(Debug, Default)]
struct DeadLetters {
    /// The next sequence number.
    next: std::sync::atomic::AtomicU64,
    /// Sent, not yet acknowledged (delivered or refused for good).
    pending: Mutex<std::collections::BTreeSet<u64>>,
}

impl DeadLetters {
    fn sent(&self) -> u64 {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let seq = self.next.fetch_add(1, Ordering::AcqRel);
        pending.insert(seq);
        seq
    }

    fn acknowledged(&self, seq: u64) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.remove(&seq);
    }

    /// Every dead letter before this sequence number is acknowledged.
    fn acknowledged_before(&self) -> u64 {
        let pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending
            .first()
            .copied()
            .unwrap_or_else(|| self.next.load(Ordering::Acquire))
    }
}

/// The record header that carries a changelog tombstone's `as_of` (a value carries it in its JSON).
pub const AS_OF_HEADER: &str = "as_of";

/// What a record's delivery report needs: its kind in the low two bits, the dataflow time of a
/// changelog record above them (time is milliseconds, far below 2^62).
fn opaque(kind: OutputKind, as_of: u64) -> usize {
    ((as_of as usize) << 2) | kind as usize
}

/// Where this producer's changelog records landed, per partition: enough to say, for a checkpoint
/// of dataflow time `T`, an offset per partition before which no record of a later time lies
/// ([`Producer::changelog_cut`]). Kept only once asked for ([`Producer::track_changelog`]): without
/// checkpoints nobody asks for a cut, and the times would pile up. The records in flight are
/// always counted: they are at most what the producer's queue holds.
#[derive(Debug, Default)]
struct Landed {
    tracking: AtomicBool,
    partitions: Mutex<HashMap<(OutputKind, i32), PartitionLanded>>,
    /// Changelog records sent and not yet delivered or refused, by dataflow time.
    in_flight: Mutex<BTreeMap<u64, usize>>,
}

#[derive(Debug, Default)]
struct PartitionLanded {
    /// The offset after the last record delivered.
    end: i64,
    /// The first offset delivered of each time after the last cut.
    first_of: BTreeMap<u64, i64>,
}

impl Landed {
    /// A changelog record of time `as_of` is on its way.
    fn sent(&self, as_of: u64) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        *in_flight.entry(as_of).or_default() += 1;
    }

    /// A changelog record of time `as_of` is delivered or refused for good (or was never sent).
    fn settled(&self, as_of: u64) {
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = in_flight.get_mut(&as_of) {
            *n -= 1;
            if *n == 0 {
                in_flight.remove(&as_of);
            }
        }
    }

    fn note(&self, kind: OutputKind, as_of: u64, partition: i32, offset: i64) {
        if !self.tracking.load(Ordering::Relaxed) {
            return;
        }
        let mut partitions = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let p = partitions.entry((kind, partition)).or_default();
        p.end = p.end.max(offset + 1);
        p.first_of.entry(as_of).or_insert(offset);
    }
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

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let kind = OutputKind::from_index(opaque & 3);
        // Delivered or refused for good: either way nothing more will come of it.
        match kind {
            OutputKind::DeadLetter => self.dead_letters.acknowledged((opaque >> 2) as u64),
            _ => self.landed.settled((opaque >> 2) as u64),
        }
        match result {
            Ok(message) => {
                if kind != OutputKind::DeadLetter {
                    let (partition, offset) = (message.partition(), message.offset());
                    self.landed
                        .note(kind, (opaque >> 2) as u64, partition, offset);
                }
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
                landed: Landed::default(),
                dead_letters: DeadLetters::default(),
            })?;
        Ok(Self { inner, metrics })
    }

    /// Sends one record (`value: None` is a tombstone), waiting while the queue is full.
    pub fn send(&self, kind: OutputKind, topic: &str, key: &[u8], value: Option<&[u8]>) {
        self.send_with(kind, topic, Some(key), value, None, 0);
    }

    /// Sends one changelog record of dataflow time `as_of`, waiting while the queue is full. A
    /// tombstone (`value: None`) carries its time in the [`AS_OF_HEADER`] header, so that a reader
    /// that starts from a checkpoint's cut can tell an old tombstone from a new one.
    pub fn send_changelog(
        &self,
        kind: OutputKind,
        topic: &str,
        key: &[u8],
        value: Option<&[u8]>,
        as_of: u64,
    ) {
        let headers = value.is_none().then(|| {
            OwnedHeaders::new().insert(Header {
                key: AS_OF_HEADER,
                value: Some(&as_of.to_string()),
            })
        });
        self.send_with(kind, topic, Some(key), value, headers, as_of);
    }

    /// How many dead letters have been sent so far (a sequence number for
    /// [`Producer::dead_letters_acknowledged`]).
    pub fn dead_letters_sent(&self) -> u64 {
        self.inner
            .context()
            .dead_letters
            .next
            .load(Ordering::Acquire)
    }

    /// Whether every one of the first `sent` dead letters has been acknowledged by the broker
    /// (delivered, or refused for good and counted).
    pub fn dead_letters_acknowledged(&self, sent: u64) -> bool {
        self.inner.context().dead_letters.acknowledged_before() >= sent
    }

    /// Whether every changelog record of dataflow time `time` or earlier sent so far has been
    /// delivered or refused for good: a checkpoint of
    /// `time` whose changelog records could still be lost by a crash must not say that the
    /// changelog reflects it.
    pub fn changelog_landed_through(&self, time: u64) -> bool {
        let landed = &self.inner.context().landed;
        let in_flight = landed.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.range(..=time).next().is_none()
    }

    /// Starts noting where changelog records land, for [`Producer::changelog_cut`].
    pub fn track_changelog(&self) {
        self.inner
            .context()
            .landed
            .tracking
            .store(true, Ordering::Relaxed);
    }

    /// For a checkpoint of dataflow time `time`: per changelog partition this producer has
    /// delivered to since [`Producer::track_changelog`], an offset before which no record of a time
    /// after `time` lies (the first such record delivered, else the end of what was delivered: a
    /// record still in flight lands after everything delivered to its partition). Records of
    /// `time` or earlier may lie after it. Cuts are asked for in time order; what only earlier
    /// cuts needed is forgotten.
    pub fn changelog_cut(&self, time: u64) -> Vec<(OutputKind, i32, i64)> {
        let landed = &self.inner.context().landed;
        let mut partitions = landed.partitions.lock().unwrap_or_else(|e| e.into_inner());
        let mut cut = Vec::new();
        for (&(kind, partition), p) in partitions.iter_mut() {
            let later = p.first_of.range(time + 1..).map(|(_, o)| *o).min();
            cut.push((kind, partition, later.unwrap_or(p.end).min(p.end)));
            p.first_of = p.first_of.split_off(&(time + 1));
        }
        cut.sort();
        cut
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
        let seq = self.inner.context().dead_letters.sent();
        self.send_with(OutputKind::DeadLetter, topic, key, value, Some(h), seq);
    }

    fn send_with(
        &self,
        kind: OutputKind,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: Option<OwnedHeaders>,
        as_of: u64,
    ) {
        let mut record: BaseRecord<'_, [u8], [u8], usize> =
            BaseRecord::with_opaque_to(topic, opaque(kind, as_of));
        if let Some(k) = key {
            record = record.key(k);
        }
        if let Some(v) = value {
            record = record.payload(v);
        }
        if let Some(h) = headers {
            record = record.headers(h);
        }
        if kind != OutputKind::DeadLetter {
            self.inner.context().landed.sent(as_of);
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
                    // Never sent: counted as failed, and not waited for.
                    match kind {
                        OutputKind::DeadLetter => {
                            self.inner.context().dead_letters.acknowledged(as_of)
                        }
                        _ => self.inner.context().landed.settled(as_of),
                    }
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

    /// A producer to an embedded broker with one topic of one partition (the broker lives as long
    /// as the first half of the pair).
    fn producer_to(topic: &str) -> (EmbeddedBroker, Producer) {
        let broker = EmbeddedBroker::start(&[TopicSpec::new(topic, 1)]).expect("mock cluster");
        let metrics = Arc::new(KafkaMetrics::default());
        let producer =
            Producer::new(&broker.bootstrap().as_str().into(), metrics).expect("producer");
        (broker, producer)
    }

    /// A dead letter counts as acknowledged only once the broker has it.
    #[test]
    fn dead_letters_are_waited_for_until_acknowledged() {
        let (_broker, producer) = producer_to("dlq");
        assert!(producer.dead_letters_acknowledged(producer.dead_letters_sent()));
        let headers = DeadLetterHeaders {
            error: "malformed JSON",
            reason: "malformed_json",
            source_topic: "riders",
            source_partition: 0,
            source_offset: 7,
        };
        producer.dead_letter("dlq", None, Some(b"{"), &headers);
        let sent = producer.dead_letters_sent();
        assert_eq!(sent, 1);
        // Still lingering in the producer (100 ms): not acknowledged.
        assert!(!producer.dead_letters_acknowledged(sent));
        producer.flush(Duration::from_secs(10)).expect("delivered");
        assert!(producer.dead_letters_acknowledged(sent));
    }

    /// A changelog time has landed once every record of it and of earlier times is delivered.
    #[test]
    fn a_changelog_time_lands_once_its_records_are_delivered() {
        let (_broker, producer) = producer_to("log");
        let kind = OutputKind::RiderChangelog;
        assert!(
            producer.changelog_landed_through(u64::MAX),
            "nothing sent yet"
        );
        producer.send_changelog(kind, "log", b"b", None, 10);
        producer.send_changelog(kind, "log", b"c", Some(b"1"), 20);
        // Still lingering in the producer (100 ms): times 10 and later have not landed.
        assert!(producer.changelog_landed_through(9));
        assert!(!producer.changelog_landed_through(10));
        assert!(!producer.changelog_landed_through(u64::MAX));
        producer.flush(Duration::from_secs(10)).expect("delivered");
        assert!(producer.changelog_landed_through(u64::MAX));
    }

    /// A cut at time `T` is the first offset of a later time, or the end of what was delivered;
    /// a tombstone carries its time in a header.
    #[test]
    fn a_changelog_cut_is_where_later_times_begin() {
        let (broker, producer) = producer_to("log");
        let kind = OutputKind::DistrictChangelog;
        producer.send_changelog(kind, "log", b"a", Some(b"1"), 5);
        producer.track_changelog();
        let send = |key: &[u8], time| producer.send_changelog(kind, "log", key, Some(b"1"), time);
        send(b"a", 10);
        send(b"b", 10);
        send(b"c", 20);
        producer.flush(Duration::from_secs(10)).expect("delivered");
        // Offset 0 went before tracking began: only what came after is known.
        assert_eq!(producer.changelog_cut(10), [(kind, 0, 3)]);
        assert_eq!(producer.changelog_cut(20), [(kind, 0, 4)]);
        // A late record of an earlier time moves the end; no later time is there.
        producer.send_changelog(kind, "log", b"d", None, 15);
        producer.flush(Duration::from_secs(10)).expect("delivered");
        assert_eq!(producer.changelog_cut(20), [(kind, 0, 5)]);
        use rdkafka::consumer::{BaseConsumer, Consumer};
        use rdkafka::message::Headers;
        let consumer: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap())
            .set("group.id", "cut-test")
            .create()
            .expect("consumer");
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset("log", 0, rdkafka::Offset::Offset(4))
            .expect("partition");
        consumer.assign(&tpl).expect("assigned");
        let deadline = Instant::now() + Duration::from_secs(30);
        let m = loop {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                break m;
            }
            assert!(Instant::now() < deadline, "the tombstone was not read back");
        };
        assert_eq!(m.payload(), None);
        let header = m
            .headers()
            .and_then(|h| h.iter().find(|h| h.key == AS_OF_HEADER));
        assert_eq!(header.and_then(|h| h.value), Some(&b"15"[..]));
    }
}
