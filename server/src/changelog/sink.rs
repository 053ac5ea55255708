//! The changelog outputs of every worker: its share of both topics, each change written once its
//! time is complete, through its [`Clearing`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use dongflow_connectors::Id;
use dongflow_dataflow::build::Changelogs;
use dongflow_dataflow::districts::{DistrictId, DistrictIndex};
use dongflow_dataflow::types::{Change, DistrictCounts, Snapshot, Time};
use dongflow_dataflow::upsert::owner;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::Stream;

use super::{
    write_districts, write_riders, ChangelogSink, Cleared, ClearedTopic, Clearing,
    ClearingProgress, HeldBy, HeldKey, HeldKeys, HeldKeysSource,
};
use crate::engine::{CaughtUp, OutputWorker, Outputs};
use crate::render::Fingerprint;

/// Both changelog topics, attached to every worker by the composition root.
#[derive(Debug)]
pub struct ChangelogOutputs {
    /// Where records go.
    pub sink: Arc<dyn ChangelogSink>,
    /// The map, for codes.
    pub index: Arc<DistrictIndex>,
    /// What the topics held when this run began, once read, for a run that cannot trust them to
    /// hold its state; `None` writes straight through.
    pub held: Option<HeldKeysSource>,
    /// How far the workers have reconciled the topics with their state.
    pub progress: Arc<ClearingProgress>,
    /// How far the sink operators have handed their changes to the sink.
    pub handed: Arc<Handed>,
}

/// How far every changelog sink operator of a process has handed its changes over to the
/// [`ChangelogSink`]: with the producer's delivery reports, it tells a checkpoint writer when the
/// changelog holds every change of a time (see `pipeline::cut_source`).
#[derive(Debug, Default)]
pub struct Handed {
    /// Per sink operator: every change of a time before this has been handed over.
    sinks: Mutex<Vec<Arc<AtomicU64>>>,
}

impl Handed {
    /// A new sink operator's progress, 0 until it hands anything over.
    fn register(&self) -> Arc<AtomicU64> {
        let sink = Arc::new(AtomicU64::new(0));
        self.sinks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sink.clone());
        sink
    }

    /// Whether there are sink operators and each has handed over every change of `time` and
    /// earlier.
    pub fn through(&self, time: Time) -> bool {
        let sinks = self.sinks.lock().unwrap_or_else(|e| e.into_inner());
        !sinks.is_empty() && sinks.iter().all(|s| s.load(Ordering::Acquire) > time)
    }
}

impl Outputs for ChangelogOutputs {
    /// Writes the worker's changelog streams as their times complete, but for the changes at or
    /// before `at.published`; see [`Clearing`] for what a run with held keys does until caught up.
    fn attach(&self, streams: &Changelogs<'_>, at: &OutputWorker) {
        let topics = WorkerTopics {
            sink: self.sink.clone(),
            index: self.index.clone(),
            published: at.published,
            me: Writer {
                worker: at.worker,
                workers: at.workers,
            },
        };
        self.op(topics.clone(), at, "district(s)")
            .attach(&streams.districts, "Sink: DistrictChangelog");
        self.op(topics, at, "rider(s)")
            .attach(&streams.riders, "Sink: RiderChangelog");
    }
}

impl ChangelogOutputs {
    /// One topic's sink operator for the worker `at`, with a clearing of its own.
    fn op<K: std::hash::Hash + Eq + Clone, V>(
        &self,
        topics: WorkerTopics,
        at: &OutputWorker,
        what: &'static str,
    ) -> SinkOp<K, V> {
        SinkOp {
            topics,
            clearing: Clearing::new(self.held.clone(), self.progress.clone()),
            caught_up: at.caught_up.clone(),
            handed: self.handed.register(),
            what,
        }
    }
}

/// Which worker of how many writes a key.
#[derive(Clone, Copy, Debug)]
pub struct Writer {
    /// This worker's index in the whole cluster.
    pub worker: usize,
    /// Workers in the whole cluster.
    pub workers: usize,
}

impl Writer {
    /// `key`, if this worker writes it (its owner by the dataflow's exchange).
    fn claim<K: differential_dataflow::hashable::Hashable<Output = u64>>(
        self,
        key: K,
    ) -> HeldBy<K> {
        match owner(&key, self.workers) == self.worker {
            true => HeldBy::Me(key),
            false => HeldBy::Other,
        }
    }
}

/// One worker's changelog topics: both the district and the rider topic, told apart by their
/// keys and values.
#[derive(Clone, Debug)]
pub struct WorkerTopics {
    /// Where records go.
    pub sink: Arc<dyn ChangelogSink>,
    /// The map, for codes.
    pub index: Arc<DistrictIndex>,
    /// Changes at or before this time are in the changelog already.
    pub published: Time,
    /// This worker.
    pub me: Writer,
}

impl ClearedTopic<DistrictId, DistrictCounts> for WorkerTopics {
    fn held<'a>(&self, keys: &'a HeldKeys) -> &'a [HeldKey] {
        &keys.districts
    }
    fn fingerprint(&self, value: &DistrictCounts) -> u64 {
        value.fingerprint()
    }
    /// A code the map does not know is no one's: worker 0 clears it.
    fn owner_of(&self, held: &str) -> HeldBy<DistrictId> {
        match self.index.id_of(held) {
            Some(id) => self.me.claim(id),
            None if self.me.worker == 0 => HeldBy::MeUnknown,
            None => HeldBy::Other,
        }
    }
    fn write(&self, changes: &[Change<DistrictId, DistrictCounts>]) {
        write_districts(&*self.sink, &self.index, changes, self.published);
    }
    fn tombstone(&self, held: &str, as_of: Time) {
        self.sink.district(held, None, as_of);
    }
}

impl ClearedTopic<Id, Arc<Snapshot>> for WorkerTopics {
    fn held<'a>(&self, keys: &'a HeldKeys) -> &'a [HeldKey] {
        &keys.riders
    }
    fn fingerprint(&self, value: &Arc<Snapshot>) -> u64 {
        value.fingerprint()
    }
    fn owner_of(&self, held: &str) -> HeldBy<Id> {
        self.me.claim(Id::from(held))
    }
    fn write(&self, changes: &[Change<Id, Arc<Snapshot>>]) {
        write_riders(&*self.sink, &self.index, changes, self.published);
    }
    fn tombstone(&self, held: &str, as_of: Time) {
        self.sink.rider(held, None, as_of);
    }
}

/// One changelog stream's sink operator.
struct SinkOp<K, V> {
    topics: WorkerTopics,
    clearing: Clearing<K, V>,
    caught_up: CaughtUp,
    /// Every change of a time before this has been handed to the sink (or folded by the clearing).
    handed: Arc<AtomicU64>,
    what: &'static str,
}

impl<K, V> SinkOp<K, V>
where
    K: differential_dataflow::hashable::Hashable<Output = u64>
        + std::hash::Hash
        + Eq
        + Clone
        + 'static,
    V: Clone + 'static,
    WorkerTopics: ClearedTopic<K, V>,
{
    fn attach(mut self, stream: &Stream<'_, Time, Vec<Change<K, V>>>, name: &str) {
        let me = self.topics.me;
        // Pipeline: the changelog streams are already partitioned by key, so each key is written
        // by one worker, in time order.
        stream
            .clone()
            .sink(Pipeline, name, move |(input, frontier)| {
                let mut batches = Vec::new();
                input.for_each(|_, changes| batches.push(std::mem::take(changes)));
                debug_assert!(batches
                    .iter()
                    .flatten()
                    .all(|c| owner(&c.key, me.workers) == me.worker));
                let complete = |t: Time| !frontier.less_equal(&t);
                let through = self.caught_up.through();
                let cleared = self
                    .clearing
                    .offer(batches, through, complete, &self.topics);
                log_cleared(cleared, self.what, me);
                let before = frontier.frontier().iter().min().copied();
                self.handed
                    .fetch_max(before.unwrap_or(Time::MAX), Ordering::Release);
            });
    }
}

fn log_cleared(cleared: Option<Cleared>, what: &str, me: Writer) {
    let Some(c) = cleared else { return };
    if c == Cleared::default() {
        return;
    }
    tracing::info!(
        "worker {}: changelog reconciled with the caught-up state: {} {what} written, {} \
         unchanged (not written again), {} the state lacks tombstoned",
        me.worker,
        c.written,
        c.unchanged,
        c.tombstoned
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_held_rider_has_one_owner_and_unknown_codes_go_to_worker_0() {
        struct Nowhere;
        impl std::fmt::Debug for Nowhere {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("Nowhere")
            }
        }
        impl ChangelogSink for Nowhere {
            fn district(&self, _: &str, _: Option<&[u8]>, _: Time) {}
            fn rider(&self, _: &str, _: Option<&[u8]>, _: Time) {}
        }
        let index = Arc::new(DistrictIndex::builtin_seoul());
        let workers = 3;
        let topics = |worker| WorkerTopics {
            sink: Arc::new(Nowhere),
            index: index.clone(),
            published: 0,
            me: Writer { worker, workers },
        };
        let rider_owns = |w, id: &str| {
            ClearedTopic::<Id, Arc<Snapshot>>::owner_of(&topics(w), id) == HeldBy::Me(Id::from(id))
        };
        let district_owns = |w, code: &str| {
            ClearedTopic::<DistrictId, DistrictCounts>::owner_of(&topics(w), code) != HeldBy::Other
        };
        let mut riders_per_worker = vec![0; workers];
        for i in 0..300 {
            let id = format!("r-{i}");
            let owners: Vec<usize> = (0..workers).filter(|w| rider_owns(*w, &id)).collect();
            assert_eq!(owners.len(), 1, "{id}: {owners:?}");
            assert_eq!(owners[0], owner(&Id::from(id.as_str()), workers));
            riders_per_worker[owners[0]] += 1;
        }
        assert!(
            riders_per_worker.iter().all(|n| *n > 50),
            "{riders_per_worker:?}"
        );
        for id in 0..index.len() as DistrictId {
            let code = index.code(id);
            let owners: Vec<usize> = (0..workers).filter(|w| district_owns(*w, code)).collect();
            assert_eq!(owners, [owner(&id, workers)], "{code}");
        }
        let owners: Vec<usize> = (0..workers)
            .filter(|w| district_owns(*w, "9999999999"))
            .collect();
        assert_eq!(owners, [0], "a code the map does not know");
    }
}
