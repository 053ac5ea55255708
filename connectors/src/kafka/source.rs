//! [`KafkaSource`]: one timely worker's share of the input topics.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};

use super::producer::DeadLetterHeaders;
use super::quiet::Quiet;
use super::{Input, KafkaConfig, KafkaError, KafkaMetrics, Producer, StartAt, TopicWatch};
use crate::events::{decode_delivery, decode_rider};
use crate::source::{EventSource, Polled};
use crate::{DeliveryEvent, RiderEvent};

/// An input partition.
type PartitionKey = (Input, i32);

/// How often read positions are committed to the group (for lag tools).
const COMMIT_EVERY: Duration = Duration::from_secs(5);
/// How often read positions are published to the metrics.
const PUBLISH_EVERY: Duration = Duration::from_millis(250);

/// Reads partition `p` of each input topic when `p mod workers == worker` (global worker indices
/// across all processes), decodes, and sends bad records to the dead-letter topic.
pub struct KafkaSource {
    consumer: BaseConsumer<Quiet>,
    config: KafkaConfig,
    worker: usize,
    workers: usize,
    watch: Arc<TopicWatch>,
    seen_generation: u64,
    assigned: [i32; 2],
    next: BTreeMap<(Input, i32), i64>,
    resume: HashMap<(String, i32), i64>,
    /// `(start, end)` offsets at start of this source's partitions, once a broker has answered.
    at_start: Option<Vec<(PartitionKey, (i64, i64))>>,
    caught_up: bool,
    producer: Arc<Producer>,
    metrics: Arc<KafkaMetrics>,
    last_commit: Instant,
    last_publish: Instant,
    last_error_log: Option<Instant>,
}

impl std::fmt::Debug for KafkaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource")
            .field("worker", &self.worker)
            .field("workers", &self.workers)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl KafkaSource {
    /// The source of global worker `worker` of `workers`.
    pub fn new(
        config: &KafkaConfig,
        worker: usize,
        workers: usize,
        watch: Arc<TopicWatch>,
        producer: Arc<Producer>,
        metrics: Arc<KafkaMetrics>,
    ) -> Result<Self, KafkaError> {
        let consumer: BaseConsumer<Quiet> = config
            .brokers
            .configure(
                ClientConfig::new()
                    // Offsets are committed under this group for lag tools only. The source never
                    // subscribes, so it never joins the group: no rebalances, no eviction when slow.
                    .set("group.id", &config.group_id)
                    // Commits happen every few seconds from the positions this source tracks itself.
                    .set("enable.auto.commit", "false")
                    .set("enable.auto.offset.store", "false")
                    // Where to go when a stored position no longer exists (retention removed it).
                    .set(
                        "auto.offset.reset",
                        match config.start {
                            StartAt::Earliest => "earliest",
                            StartAt::Latest => "latest",
                        },
                    )
                    // End of partition is not an event here; readiness uses the watch's end offsets.
                    .set("enable.partition.eof", "false")
                    // A caught-up fetch waits at most this long for new records. Some brokers answer an
                    // empty fetch only at its deadline (librdkafka's mock cluster does), which with the
                    // default 500 ms would hold a new record back that long; an idle consumer pays with
                    // about 100 empty fetches a second per broker.
                    .set("fetch.wait.max.ms", "10"),
            )
            .create_with_context(Quiet::default())?;
        Ok(Self {
            consumer,
            config: config.clone(),
            worker,
            workers: workers.max(1),
            watch,
            seen_generation: u64::MAX,
            assigned: [0; 2],
            next: BTreeMap::new(),
            resume: HashMap::new(),
            at_start: None,
            caught_up: false,
            producer,
            metrics,
            last_commit: Instant::now(),
            // The first poll publishes at once.
            last_publish: Instant::now()
                .checked_sub(PUBLISH_EVERY)
                .unwrap_or_else(Instant::now),
            last_error_log: None,
        })
    }

    /// Starts the given partitions at the given offsets (from a checkpoint) instead of the
    /// configured start.
    pub fn resume_from(mut self, offsets: HashMap<(String, i32), i64>) -> Self {
        self.resume = offsets;
        self
    }

    fn topic(&self, input: Input) -> &str {
        self.config.inputs()[input as usize]
    }

    /// Takes up partitions that appeared since the last look.
    fn sync_assignment(&mut self) {
        let generation = self.watch.generation();
        if generation == self.seen_generation {
            return;
        }
        self.seen_generation = generation;
        let topology = self.watch.topology();
        let mut tpl = TopicPartitionList::new();
        for input in Input::ALL {
            let topic = self.config.inputs()[input as usize].to_owned();
            let from = self.assigned[input as usize];
            for p in from..topology.partitions[input as usize] {
                if p as usize % self.workers != self.worker {
                    continue;
                }
                let offset = match self.resume.get(&(topic.clone(), p)) {
                    Some(&o) => {
                        self.next.insert((input, p), o);
                        Offset::Offset(o)
                    }
                    None if self.config.start == StartAt::Latest => Offset::End,
                    None => Offset::Beginning,
                };
                if let Err(e) = tpl.add_partition_offset(&topic, p, offset) {
                    tracing::error!("cannot assign {topic}/{p}: {e}");
                }
            }
            self.assigned[input as usize] =
                self.assigned[input as usize].max(topology.partitions[input as usize]);
        }
        if tpl.count() > 0 {
            let names: Vec<String> = tpl
                .elements()
                .iter()
                .map(|e| format!("{}/{}", e.topic(), e.partition()))
                .collect();
            match self.consumer.incremental_assign(&tpl) {
                Ok(()) => tracing::info!(
                    "worker {} of {} reads {}",
                    self.worker,
                    self.workers,
                    names.join(", ")
                ),
                Err(e) => tracing::error!(
                    "worker {} cannot read {}: {e}",
                    self.worker,
                    names.join(", ")
                ),
            }
        }
        if topology.reached && self.at_start.is_none() {
            let mine = topology
                .at_start
                .into_iter()
                .filter(|((_, p), _)| *p as usize % self.workers == self.worker)
                .collect();
            self.at_start = Some(mine);
        }
    }

    fn update_caught_up(&mut self) {
        if self.caught_up {
            return;
        }
        let Some(at_start) = &self.at_start else {
            return;
        };
        self.caught_up = self.config.start == StartAt::Latest && self.resume.is_empty()
            || at_start.iter().all(|&(key, (low, end))| {
                end <= low || self.next.get(&key).is_some_and(|&n| n >= end)
            });
    }

    fn publish(&mut self) {
        if self.last_publish.elapsed() >= PUBLISH_EVERY {
            self.last_publish = Instant::now();
            for (&(input, p), &next) in &self.next {
                self.metrics.update_partition(
                    self.config.inputs()[input as usize],
                    p,
                    |progress| {
                        if progress.next != Some(next) {
                            progress.read_now();
                        }
                        progress.next = Some(next);
                    },
                );
            }
        }
        if self.last_commit.elapsed() >= COMMIT_EVERY && !self.next.is_empty() {
            self.last_commit = Instant::now();
            let mut tpl = TopicPartitionList::new();
            for (&(input, p), &next) in &self.next {
                let _ = tpl.add_partition_offset(self.topic(input), p, Offset::Offset(next));
            }
            // Asynchronous: the worker never waits for the group coordinator.
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                self.metrics.commit_failures.fetch_add(1, Ordering::Relaxed);
                tracing::debug!("offset commit failed: {e}");
            }
        }
    }
}

impl EventSource for KafkaSource {
    fn poll(
        &mut self,
        max: usize,
        riders: &mut Vec<RiderEvent>,
        deliveries: &mut Vec<DeliveryEvent>,
    ) -> Polled {
        self.sync_assignment();
        let mut taken = 0;
        while taken < max {
            let message = match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(m)) => m,
                Some(Err(e)) => {
                    // Transport errors and the like: librdkafka reconnects by itself.
                    if self
                        .last_error_log
                        .is_none_or(|t| t.elapsed() > Duration::from_secs(10))
                    {
                        tracing::warn!("worker {}: Kafka consumer: {e}", self.worker);
                        self.last_error_log = Some(Instant::now());
                    }
                    break;
                }
            };
            let input = if message.topic() == self.config.rider_topic {
                Input::Riders
            } else {
                Input::Deliveries
            };
            let payload = message.payload().unwrap_or_default();
            let decoded = match input {
                Input::Riders => decode_rider(payload).map(|e| riders.push(e)),
                Input::Deliveries => decode_delivery(payload).map(|e| deliveries.push(e)),
            };
            if let Err(error) = decoded {
                self.metrics.count_invalid(&error);
                let text = error.to_string();
                self.producer.dead_letter(
                    &self.config.dead_letter_topic,
                    message.key(),
                    message.payload(),
                    &DeadLetterHeaders {
                        error: &text,
                        reason: error.reason(),
                        source_topic: message.topic(),
                        source_partition: message.partition(),
                        source_offset: message.offset(),
                    },
                );
            }
            self.next
                .insert((input, message.partition()), message.offset() + 1);
            taken += 1;
        }
        self.metrics
            .consumed
            .fetch_add(taken as u64, Ordering::Relaxed);
        self.update_caught_up();
        self.publish();
        if taken > 0 {
            Polled::Data
        } else {
            Polled::Idle
        }
    }

    fn caught_up(&self) -> bool {
        self.caught_up
    }

    fn positions(&self) -> Vec<(String, i32, i64)> {
        self.next
            .iter()
            .map(|(&(input, p), &o)| (self.topic(input).to_owned(), p, o))
            .collect()
    }
}
