//! The changelog topics of CONTRACT section 5: each changed district and rider, per dataflow
//! time, rendered exactly as HTTP shows it, with `as_of`.
//!
//! - [`sink`]: the outputs attached to every worker (its share of both topics, as times complete);
//! - [`clearing`]: for a run that cannot trust the topics to hold its state, their reconciling with
//!   it once caught up: only what differs is written, and the keys earlier runs left there and this
//!   run's state lacks are tombstoned.
//!
//! Reading the topics back is the stale view's ([`crate::view::StaleView`]); it says what they held
//! ([`HeldKeys`]).

mod clearing;
mod sink;

use std::sync::Arc;

use dongflow_connectors::kafka::{OutputKind, Producer};
use dongflow_connectors::Id;
use dongflow_dataflow::districts::{DistrictId, DistrictIndex};
use dongflow_dataflow::types::{Change, DistrictCounts, Snapshot, Time};
use serde::Serialize;

pub use clearing::{
    Cleared, ClearedTopic, Clearing, ClearingProgress, Held, HeldKey, HeldKeys, HeldKeysSource,
};
pub use sink::{ChangelogOutputs, Handed, WorkerTopics, Writer};

use crate::render::{DistrictView, RiderView};

/// A changelog value: the object's own fields and `as_of`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Changelogged<T> {
    /// The object's own fields.
    #[serde(flatten)]
    pub value: T,
    /// The dataflow time of the change.
    pub as_of: Time,
}

/// Where changelog records go, each with its dataflow time. `value: None` is a tombstone.
pub trait ChangelogSink: Send + Sync + std::fmt::Debug {
    /// A district record, keyed by district code.
    fn district(&self, code: &str, value: Option<&[u8]>, as_of: Time);
    /// A rider record, keyed by rider id.
    fn rider(&self, rider_id: &str, value: Option<&[u8]>, as_of: Time);
}

/// The changelog sink of a Kafka producer.
#[derive(Debug)]
pub struct KafkaChangelog {
    /// The process's producer.
    pub producer: Arc<Producer>,
    /// `--district-changelog-topic`.
    pub district_topic: String,
    /// `--rider-changelog-topic`.
    pub rider_topic: String,
}

impl ChangelogSink for KafkaChangelog {
    fn district(&self, code: &str, value: Option<&[u8]>, as_of: Time) {
        self.producer.send_changelog(
            OutputKind::DistrictChangelog,
            &self.district_topic,
            code.as_bytes(),
            value,
            as_of,
        );
    }

    fn rider(&self, rider_id: &str, value: Option<&[u8]>, as_of: Time) {
        self.producer.send_changelog(
            OutputKind::RiderChangelog,
            &self.rider_topic,
            rider_id.as_bytes(),
            value,
            as_of,
        );
    }
}

fn to_json<T: Serialize>(value: T, as_of: Time) -> Option<Vec<u8>> {
    match serde_json::to_vec(&Changelogged { value, as_of }) {
        Ok(bytes) => Some(bytes),
        Err(e) => {
            tracing::error!("cannot render a changelog record: {e}");
            None
        }
    }
}

/// Writes district changes, but for those at or before `published` (already in the changelog).
pub fn write_districts(
    sink: &dyn ChangelogSink,
    index: &DistrictIndex,
    changes: &[Change<DistrictId, DistrictCounts>],
    published: Time,
) {
    for change in changes.iter().filter(|c| c.time > published) {
        let value = change
            .value
            .as_ref()
            .and_then(|counts| to_json(DistrictView::new(index, change.key, counts), change.time));
        sink.district(index.code(change.key), value.as_deref(), change.time);
    }
}

/// Writes rider changes, but for those at or before `published` (already in the changelog).
pub fn write_riders(
    sink: &dyn ChangelogSink,
    index: &DistrictIndex,
    changes: &[Change<Id, Arc<Snapshot>>],
    published: Time,
) {
    for change in changes.iter().filter(|c| c.time > published) {
        let value = change
            .value
            .as_ref()
            .and_then(|s| to_json(RiderView::new(index, &change.key, s), change.time));
        sink.rider(&change.key, value.as_deref(), change.time);
    }
}
