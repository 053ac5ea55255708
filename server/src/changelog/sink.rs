//! The changelog outputs of every worker: its share of both topics, each change written once its
//! time is complete, through its [`Clearing`].

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use differential_dataflow::hashable::Hashable;
use dongflow_connectors::Id;
use dongflow_dataflow::build::Changelogs;
use dongflow_dataflow::districts::{DistrictId, DistrictIndex};
use dongflow_dataflow::types::{Change, DistrictCounts, Snapshot, Time};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::input::Handle as InputHandle;
use timely::dataflow::operators::vec::Input;
use timely::dataflow::Stream;
use timely::ExchangeData;

use super::{
    write_districts, write_riders, ChangelogSink, Cleared, ClearedTopic, Clearing,
    ClearingProgress, Held, HeldKeys, HeldKeysSource,
};
use crate::engine::{CaughtUp, OutputFeed, OutputWorker, Outputs};
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
    /// The held keys enter through inputs of the sink operators, which the worker feeds.
    fn attach(&self, streams: &Changelogs<'_>, at: &OutputWorker) -> Box<dyn OutputFeed> {
        let topics = WorkerTopics {
            sink: self.sink.clone(),
            index: self.index.clone(),
            published: at.published,
            me: Writer {
                worker: at.worker,
                workers: at.workers,
            },
        };
        let scope = streams.districts.scope();
        let mut inputs = HeldInputs {
            districts: InputHandle::new(),
            riders: InputHandle::new(),
        };
        let (districts_held, riders_held) = (
            scope.input_from(&mut inputs.districts),
            scope.input_from(&mut inputs.riders),
        );
        self.op(topics.clone(), at, "district(s)").attach(
            &streams.districts,
            districts_held,
            "Sink: DistrictChangelog",
        );
        let me = topics.me;
        self.op(topics, at, "rider(s)").attach(
            &streams.riders,
            riders_held,
            "Sink: RiderChangelog",
        );
        Box::new(HeldFeed {
            source: self.held.clone(),
            index: self.index.clone(),
            me,
            inputs,
            given: false,
        })
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
            clearing: Clearing::new(self.held.is_some(), self.progress.clone()),
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

/// A worker's inputs of held keys: once the stale view has read them, the worker gives its share
/// at time 0 and advances both inputs to 1. Every held key is in once the sinks' frontier of held
/// keys is past 0 and not empty: a frontier that goes from 0 to empty means inputs closed without
/// giving (the worker stopped first), and the changelog is then not reconciled (not marked clean).
/// The exchange takes each held key to the worker whose sink writes its key.
struct HeldFeed {
    /// `None`: nothing to reconcile; the inputs advance at once.
    source: Option<HeldKeysSource>,
    index: Arc<DistrictIndex>,
    me: Writer,
    inputs: HeldInputs,
    given: bool,
}

struct HeldInputs {
    districts: InputHandle<Time, Held<DistrictId>>,
    riders: InputHandle<Time, Held<Id>>,
}

impl Writer {
    /// Whether this worker gives the held record key `key`: every process's stale view reads the
    /// whole changelog, so each holds every held key, and the workers of the cluster split them
    /// by a hash of the record key (any rule that gives each key to one worker will do: the
    /// exchange then takes it where it is written).
    fn gives(self, key: &str) -> bool {
        rustc_hash::FxBuildHasher.hash_one(key) % self.workers.max(1) as u64 == self.worker as u64
    }
}

impl HeldInputs {
    /// Gives `me`'s share of `keys`.
    fn give(&mut self, keys: &HeldKeys, index: &DistrictIndex, me: Writer) {
        for h in keys.districts.iter().filter(|h| me.gives(&h.key)) {
            let held = match index.id_of(&h.key) {
                Some(id) => Held::Key(id, h.fingerprint),
                None => Held::Foreign(h.key.clone()),
            };
            self.districts.send(held);
        }
        for h in keys.riders.iter().filter(|h| me.gives(&h.key)) {
            self.riders
                .send(Held::Key(Id::from(h.key.as_str()), h.fingerprint));
        }
    }
}

impl OutputFeed for HeldFeed {
    fn feed(&mut self) {
        if self.given {
            return;
        }
        if let Some(source) = &self.source {
            let Some(keys) = source.get() else { return };
            self.inputs.give(&keys, &self.index, self.me);
        }
        // Past time 0: this worker has given all it will. Not closed, which a stop does.
        self.inputs.districts.advance_to(1);
        self.inputs.riders.advance_to(1);
        self.given = true;
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
    fn fingerprint(&self, value: &DistrictCounts) -> u64 {
        value.fingerprint()
    }
    fn write(&self, changes: &[Change<DistrictId, DistrictCounts>]) {
        write_districts(&*self.sink, &self.index, changes, self.published);
    }
    fn tombstone(&self, held: &str, as_of: Time) {
        self.sink.district(held, None, as_of);
    }
}

impl ClearedTopic<Id, Arc<Snapshot>> for WorkerTopics {
    fn fingerprint(&self, value: &Arc<Snapshot>) -> u64 {
        value.fingerprint()
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
    K: ExchangeData + Hashable<Output = u64> + std::hash::Hash + Eq + Clone,
    V: ExchangeData + Clone,
    WorkerTopics: ClearedTopic<K, V>,
{
    fn attach<'s>(
        mut self,
        stream: &Stream<'s, Time, Vec<Change<K, V>>>,
        held: Stream<'s, Time, Vec<Held<K>>>,
        name: &str,
    ) {
        let me = self.topics.me;
        // A key's changes and its held value meet at one worker, both exchanged by the key's
        // hash. The changes are partitioned by that hash upstream already, so they stay on their
        // worker, each key written by one worker in time order.
        let changes_by_key = Exchange::new(|c: &Change<K, V>| c.key.hashed());
        let held_by_key = Exchange::new(|h: &Held<K>| h.route());
        stream
            .clone()
            .binary_frontier::<_, CapacityContainerBuilder<Vec<()>>, _, _, _, _>(
                held,
                changes_by_key,
                held_by_key,
                name,
                // A sink: it never sends, so it keeps no capability.
                |_, _| {
                    move |(input, frontier), (held, held_frontier), _| {
                        held.for_each(|_, keys| self.clearing.hold(keys.drain(..)));
                        // Every worker has given its held keys (see `HeldFeed`).
                        if !held_frontier.is_empty() && !held_frontier.less_equal(&0) {
                            self.clearing.all_held();
                        }
                        let mut batches = Vec::new();
                        input.for_each(|_, changes| batches.push(std::mem::take(changes)));
                        let complete = |t: Time| !frontier.less_equal(&t);
                        let through = self.caught_up.through();
                        let cleared = self
                            .clearing
                            .offer(batches, through, complete, &self.topics);
                        log_cleared(cleared, self.what, me);
                        let before = frontier.frontier().iter().min().copied();
                        self.handed
                            .fetch_max(before.unwrap_or(Time::MAX), Ordering::Release);
                    }
                },
            );
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
    use std::collections::BTreeMap;

    use dongflow_dataflow::types::Contribution;

    use super::*;
    use crate::changelog::HeldKey;
    use crate::engine::progress_caught_up_at;

    /// Per (district topic?, key), each record written: (a value, not a tombstone?, its time).
    type Records = BTreeMap<(bool, String), Vec<(bool, Time)>>;

    /// Every record written.
    #[derive(Debug, Default)]
    struct Recording(Mutex<Records>);

    impl ChangelogSink for Recording {
        fn district(&self, code: &str, value: Option<&[u8]>, as_of: Time) {
            let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let record = (value.is_some(), as_of);
            all.entry((true, code.to_owned())).or_default().push(record);
        }
        fn rider(&self, rider_id: &str, value: Option<&[u8]>, as_of: Time) {
            let mut all = self.0.lock().unwrap_or_else(|e| e.into_inner());
            let record = (value.is_some(), as_of);
            all.entry((false, rider_id.to_owned()))
                .or_default()
                .push(record);
        }
    }

    fn counts(waiting: u64) -> DistrictCounts {
        let mut counts = DistrictCounts::default();
        counts.add(Contribution::Waiting, waiting);
        counts
    }

    /// Three workers; the changes enter at worker 0 (the sink's exchange takes each key to its
    /// writer), the held keys are given in shares by every worker. Each held key must be judged
    /// by the worker that writes its key: a held value meeting its key's changes on another
    /// worker would be tombstoned there and written again here.
    #[test]
    fn held_keys_meet_their_keys_changes_at_one_worker_and_each_is_cleared_once() {
        let index = Arc::new(DistrictIndex::builtin_seoul());
        let code = |d: DistrictId| index.code(d).to_owned();
        // Held: districts 0..12 with 1 waiting, a code the map does not know, riders r-0..r-99.
        // The state: districts 6..12 with 1 waiting (unchanged), 12..18 with 2 (new); no rider.
        let codes: std::collections::BTreeSet<String> = (0..18).map(code).collect();
        assert_eq!(codes.len(), 18, "the map has 18 districts");
        let mut held = HeldKeys::default();
        for d in 0..12 {
            held.districts.push(HeldKey {
                key: code(d),
                fingerprint: Some(counts(1).fingerprint()),
            });
        }
        held.districts.push(HeldKey {
            key: "9999999999".to_owned(),
            fingerprint: Some(1),
        });
        for r in 0..100 {
            held.riders.push(HeldKey {
                key: format!("r-{r}"),
                fingerprint: Some(1),
            });
        }
        let held = Arc::new(held);
        let recording = Arc::new(Recording::default());
        let progress = Arc::new(ClearingProgress::default());
        let outputs = Arc::new(ChangelogOutputs {
            sink: recording.clone(),
            index: index.clone(),
            held: Some(HeldKeysSource(Arc::new(move || Some(held.clone())))),
            progress: progress.clone(),
            handed: Arc::default(),
        });
        let workers = 3;
        let done = progress.clone();
        timely::execute(timely::Config::process(workers), move |worker| {
            let (mut districts_in, riders_in, mut feed) = sinks(worker, &outputs, workers);
            if worker.index() == 0 {
                districts_in.advance_to(3);
                for d in 6..18 {
                    let value = Some(counts(if d < 12 { 1 } else { 2 }));
                    districts_in.send(Change {
                        key: d,
                        value,
                        time: 3,
                    });
                }
            }
            drop((districts_in, riders_in));
            step_until_cleared(worker, &mut *feed, &done);
        })
        .expect("timely");

        assert_eq!(progress.uncleared(), 0, "every worker's topics cleared");
        let all = recording.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut expected = BTreeMap::new();
        for d in 0..6 {
            expected.insert((true, code(d)), vec![(false, 5)]);
        }
        for d in 12..18 {
            expected.insert((true, code(d)), vec![(true, 3)]);
        }
        expected.insert((true, "9999999999".to_owned()), vec![(false, 5)]);
        for r in 0..100 {
            expected.insert((false, format!("r-{r}")), vec![(false, 5)]);
        }
        assert_eq!(*all, expected);
    }

    /// Until the stale view has read the held keys, no worker clears, however long the state has
    /// been caught up: what it would write again or tombstone is not known yet.
    #[test]
    fn no_worker_clears_before_the_held_keys_are_read() {
        let index = Arc::new(DistrictIndex::builtin_seoul());
        let read = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = Arc::new(HeldKeys {
            districts: vec![HeldKey {
                key: index.code(1).to_owned(),
                fingerprint: Some(counts(1).fingerprint()),
            }],
            riders: Vec::new(),
        });
        let r = read.clone();
        let source = HeldKeysSource(Arc::new(move || {
            r.load(Ordering::Acquire).then(|| held.clone())
        }));
        let recording = Arc::new(Recording::default());
        let progress = Arc::new(ClearingProgress::default());
        let outputs = Arc::new(ChangelogOutputs {
            sink: recording.clone(),
            index: index.clone(),
            held: Some(source),
            progress: progress.clone(),
            handed: Arc::default(),
        });
        let workers = 2;
        let barrier = Arc::new(std::sync::Barrier::new(workers));
        let (rec, prog) = (recording.clone(), progress.clone());
        timely::execute(timely::Config::process(workers), move |worker| {
            let (mut districts_in, riders_in, mut feed) = sinks(worker, &outputs, workers);
            if worker.index() == 0 {
                districts_in.advance_to(3);
                for d in [1, 2] {
                    let value = Some(counts(1));
                    districts_in.send(Change {
                        key: d,
                        value,
                        time: 3,
                    });
                }
            }
            // Time 5, the caught-up time, completes; the held keys are still being read.
            districts_in.advance_to(10);
            let mut riders_in = riders_in;
            riders_in.advance_to(10);
            for _ in 0..200 {
                feed.feed();
                worker.step();
            }
            barrier.wait();
            if worker.index() == 0 {
                assert_eq!(prog.uncleared(), 4, "no topic of any worker cleared");
                let written = rec.0.lock().unwrap_or_else(|e| e.into_inner()).len();
                assert_eq!(written, 0, "nothing written before the held keys are known");
                read.store(true, Ordering::Release);
            }
            barrier.wait();
            drop((districts_in, riders_in));
            step_until_cleared(worker, &mut *feed, &prog);
        })
        .expect("timely");
        assert_eq!(progress.uncleared(), 0);
        let all = recording.0.lock().unwrap_or_else(|e| e.into_inner());
        let expected: Records = [((true, index.code(2).to_owned()), vec![(true, 3)])].into();
        assert_eq!(
            *all, expected,
            "district 1 held as it is: only district 2 written"
        );
    }

    /// Changes to the changelog streams from test inputs.
    type ChangeInputs = (
        InputHandle<Time, Change<DistrictId, DistrictCounts>>,
        InputHandle<Time, Change<Id, Arc<Snapshot>>>,
        Box<dyn OutputFeed>,
    );

    /// `outputs` attached to a worker of `workers` whose inputs caught up at time 5, fed by the
    /// inputs returned.
    fn sinks(
        worker: &mut timely::worker::Worker,
        outputs: &ChangelogOutputs,
        workers: usize,
    ) -> ChangeInputs {
        let mut districts_in = InputHandle::new();
        let mut riders_in = InputHandle::new();
        let at = OutputWorker {
            worker: worker.index(),
            workers,
            published: 0,
            caught_up: progress_caught_up_at(5),
        };
        let feed = worker.dataflow::<Time, _, _>(|scope| {
            let streams = Changelogs {
                districts: scope.input_from(&mut districts_in),
                riders: scope.input_from(&mut riders_in),
            };
            outputs.attach(&streams, &at)
        });
        (districts_in, riders_in, feed)
    }

    /// Feeds and steps a worker until every worker's topics are cleared (each clears only once
    /// every worker has given its held keys, so none stops early), then lets the dataflow end.
    fn step_until_cleared(
        worker: &mut timely::worker::Worker,
        feed: &mut dyn OutputFeed,
        progress: &ClearingProgress,
    ) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while progress.uncleared() > 0 {
            assert!(std::time::Instant::now() < deadline, "not cleared in 60 s");
            feed.feed();
            worker.step();
        }
    }

    /// A stop before the stale view has read the held keys closes their inputs: that must not
    /// count as every held key in, or the clearing would write the whole state, tombstone nothing,
    /// and the stop would be marked clean over keys the state lacks.
    #[test]
    fn a_stop_before_the_held_keys_are_read_clears_nothing() {
        let index = Arc::new(DistrictIndex::builtin_seoul());
        let recording = Arc::new(Recording::default());
        let progress = Arc::new(ClearingProgress::default());
        let outputs = Arc::new(ChangelogOutputs {
            sink: recording.clone(),
            index,
            held: Some(HeldKeysSource(Arc::new(|| None))),
            progress: progress.clone(),
            handed: Arc::default(),
        });
        let workers = 2;
        timely::execute(timely::Config::process(workers), move |worker| {
            let (mut districts_in, riders_in, mut feed) = sinks(worker, &outputs, workers);
            districts_in.advance_to(3);
            districts_in.send(Change {
                key: worker.index() as DistrictId,
                value: Some(counts(1)),
                time: 3,
            });
            for _ in 0..50 {
                feed.feed();
                worker.step();
            }
            // The stop: every input closes, the held keys never read.
            drop((districts_in, riders_in, feed));
            while worker.step() {}
        })
        .expect("timely");
        assert_eq!(progress.uncleared(), 4, "no topic cleared");
        assert_eq!(progress.whole_from(), None, "the changelog is not whole");
        let all = recording.0.lock().unwrap_or_else(|e| e.into_inner());
        assert!(all.is_empty(), "nothing written: {all:?}");
    }
}
