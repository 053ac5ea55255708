//! Counters of the Kafka edges, shared by every worker of a process and read by `/metrics`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::DecodeError;

/// Where one input partition stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionProgress {
    /// The next offset this process will read (`None`: nothing read yet).
    pub next: Option<i64>,
    /// The partition's end offset when last asked (`None`: not known yet).
    pub end: Option<i64>,
    /// The partition's start offset when last asked.
    pub start: Option<i64>,
    /// When this process last read the partition (milliseconds since the Unix epoch): took a
    /// record from it, or saw its end offset reached; at first, when it first saw the partition.
    /// `None`: not seen yet.
    pub read_at_ms: Option<u64>,
}

impl PartitionProgress {
    /// Notes that the partition was read just now.
    pub fn read_now(&mut self) {
        self.read_at_ms = Some(crate::now_ms());
    }

    /// Records the broker has that this process has not read yet.
    pub fn lag(&self) -> Option<i64> {
        let end = self.end?;
        let next = self.next.or(self.start)?;
        Some((end - next).max(0))
    }
}

/// The counters. Every field is cheap to bump from any thread.
#[derive(Debug, Default)]
pub struct KafkaMetrics {
    /// Input records read, good and bad.
    pub consumed: AtomicU64,
    /// Rejected input records, by [`DecodeError::REASONS`] index.
    pub invalid: [AtomicU64; DecodeError::REASONS.len()],
    /// Rejected records delivered to the dead-letter topic.
    pub dead_lettered: AtomicU64,
    /// Records that could not be delivered, by [`crate::kafka::OutputKind`] index.
    pub failed: [AtomicU64; 3],
    /// Records delivered, by [`crate::kafka::OutputKind`] index.
    pub delivered: [AtomicU64; 3],
    /// Times a send found the producer's queue full and waited for the broker.
    pub queue_full_waits: AtomicU64,
    /// Offset commits the broker refused.
    pub commit_failures: AtomicU64,
    /// Whether the last metadata request reached a broker.
    pub brokers_reachable: AtomicBool,
    /// Per input topic and partition: read position and end offset.
    pub partitions: Mutex<BTreeMap<(String, i32), PartitionProgress>>,
    /// The producer's fatal error, once it had one (librdkafka has at most one per producer: it
    /// sends nothing more after it).
    fatal: Mutex<Option<String>>,
}

impl KafkaMetrics {
    /// Counts one rejected record.
    pub fn count_invalid(&self, error: &DecodeError) {
        let reason = error.reason();
        if let Some(i) = DecodeError::REASONS.iter().position(|r| *r == reason) {
            self.invalid[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records the producer's fatal error (librdkafka has at most one per producer); returns
    /// whether this is the first time it is seen.
    pub fn record_fatal(&self, reason: &str) -> bool {
        let mut fatal = self.fatal.lock().unwrap_or_else(|e| e.into_inner());
        if fatal.is_some() {
            return false;
        }
        *fatal = Some(reason.to_owned());
        true
    }

    /// Fatal producer errors so far: 0 or 1.
    pub fn fatal_errors(&self) -> u64 {
        u64::from(self.fatal_error().is_some())
    }

    /// The first fatal producer error, if there was one: the process must stop.
    pub fn fatal_error(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Rejected records so far, per reason label.
    pub fn invalid_by_reason(&self) -> Vec<(&'static str, u64)> {
        DecodeError::REASONS
            .iter()
            .zip(&self.invalid)
            .map(|(r, n)| (*r, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// A copy of the per-partition progress.
    pub fn partitions(&self) -> BTreeMap<(String, i32), PartitionProgress> {
        self.partitions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies `f` to the progress of one partition.
    pub fn update_partition(
        &self,
        topic: &str,
        partition: i32,
        f: impl FnOnce(&mut PartitionProgress),
    ) {
        let mut map = self.partitions.lock().unwrap_or_else(|e| e.into_inner());
        f(map.entry((topic.to_owned(), partition)).or_default());
    }
}
