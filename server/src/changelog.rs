//! The changelog topics of CONTRACT section 5: each changed district and rider, per dataflow
//! time, rendered exactly as HTTP shows it, with `as_of`; and the clearing of keys that earlier
//! runs left there and this run's state lacks ([`Clearing`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dongflow_connectors::kafka::{OutputKind, Producer};
use dongflow_connectors::Id;
use dongflow_dataflow::districts::{DistrictId, DistrictIndex};
use dongflow_dataflow::types::{Change, DistrictCounts, Snapshot, Time};
use dongflow_dataflow::upsert::owner;
use serde::Serialize;

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
    changes: &[Change<Id, Snapshot>],
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

/// The keys the changelog topics held a value for (their latest record not a tombstone) when this
/// run began reading them: what earlier runs published.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldKeys {
    /// District codes.
    pub districts: Vec<String>,
    /// Rider ids.
    pub riders: Vec<String>,
}

/// Says the changelog's [`HeldKeys`] once they are read, `None` until then.
#[derive(Clone)]
pub struct HeldKeysSource(pub Arc<dyn Fn() -> Option<Arc<HeldKeys>> + Send + Sync>);

impl HeldKeysSource {
    /// The held keys, once read.
    pub fn get(&self) -> Option<Arc<HeldKeys>> {
        (self.0)()
    }
}

impl std::fmt::Debug for HeldKeysSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.get() {
            Some(_) => "HeldKeysSource(read)",
            None => "HeldKeysSource(reading)",
        })
    }
}

/// One changelog topic as a worker's [`Clearing`] sees it.
pub trait ClearedTopic<K, V> {
    /// This topic's part of the held keys.
    fn held<'a>(&self, keys: &'a HeldKeys) -> &'a [String];
    /// The dataflow key of the record key `held`; `None` if the state can never hold it.
    fn key_of(&self, held: &str) -> Option<K>;
    /// Whether this worker writes the record key `held` (its owner, by the dataflow's exchange).
    fn owns(&self, held: &str) -> bool;
    /// Writes one complete time's changes.
    fn write(&self, changes: &[Change<K, V>]);
    /// Writes a tombstone for the record key `held`, at dataflow time `as_of`.
    fn tombstone(&self, held: &str, as_of: Time);
}

/// One worker's writes to one changelog topic, and the clearing of the keys that earlier runs
/// left there and this run's state lacks.
///
/// A run that does not restore a checkpoint marked at a clean stop publishes its state again. A
/// key the changelog holds and that state lacks would keep its old value, since the replay may
/// never change it again. Such a key comes from a run that crashed after the restored checkpoint,
/// or from a run before the state dir was emptied. So each worker notes which keys its writes
/// leave present, learns the held keys it owns (once the stale view has read them all), and
/// once the state has caught up with the input (a complete time, not a passing one), tombstones
/// the held keys absent then. Writes never wait: a key this run wrote and the view read back is
/// either present (kept) or absent (tombstoned again, which changes nothing).
pub struct Clearing<K> {
    stage: Stage<K>,
    progress: Arc<ClearingProgress>,
}

/// How far a process's workers have cleared their changelog topics.
#[derive(Debug, Default)]
pub struct ClearingProgress {
    /// Workers' topics not cleared yet: a stop before then is not clean.
    uncleared: AtomicU64,
    /// The latest time through which a topic's state was complete when it was cleared: from
    /// then on, once none is uncleared, the changelog holds exactly this run's state.
    through: AtomicU64,
}

impl ClearingProgress {
    /// Workers' topics not cleared yet.
    pub fn uncleared(&self) -> u64 {
        self.uncleared.load(Ordering::Acquire)
    }

    /// The time from which the changelog holds exactly the process's state at every complete time
    /// (keeping its latest record per key), once every topic is cleared; `None` before.
    pub fn whole_from(&self) -> Option<Time> {
        (self.uncleared() == 0).then(|| self.through.load(Ordering::Acquire))
    }
}

enum Stage<K> {
    /// Noting the keys present, until the held keys are known and the state has caught up.
    Noting {
        present: std::collections::HashSet<K>,
        source: HeldKeysSource,
        /// The held keys this worker owns, once known.
        owned: Option<Vec<String>>,
    },
    /// Cleared, or nothing to clear: writes go straight through.
    Done,
}

impl<K: std::hash::Hash + Eq + Clone> Clearing<K> {
    /// Clears the keys `held` will say; `None` clears nothing (the changelog holds the restored
    /// state).
    pub fn new(held: Option<HeldKeysSource>, progress: Arc<ClearingProgress>) -> Self {
        let stage = match held {
            Some(source) => {
                progress.uncleared.fetch_add(1, Ordering::AcqRel);
                Stage::Noting {
                    present: Default::default(),
                    source,
                    owned: None,
                }
            }
            None => Stage::Done,
        };
        Self { stage, progress }
    }

    /// Writes complete times' changes, given in time order. `clear_after` is the time through
    /// which the state must be complete before the held keys it lacks are tombstoned (`None`:
    /// not known yet); `complete` says whether a time is complete. Returns how many keys were
    /// tombstoned, once.
    pub fn offer<V>(
        &mut self,
        batches: Vec<Vec<Change<K, V>>>,
        clear_after: Option<Time>,
        complete: impl Fn(Time) -> bool,
        topic: &impl ClearedTopic<K, V>,
    ) -> Option<usize> {
        let mut cleared = None;
        if let Stage::Noting { source, owned, .. } = &mut self.stage {
            if owned.is_none() {
                if let Some(keys) = source.get() {
                    let mine: Vec<String> = topic
                        .held(&keys)
                        .iter()
                        .filter(|k| topic.owns(k))
                        .cloned()
                        .collect();
                    *owned = Some(mine);
                }
            }
            if owned.as_ref().is_some_and(Vec::is_empty) {
                cleared = Some(self.clear(topic, 0));
            }
        }
        for batch in batches {
            if let Stage::Noting { present, owned, .. } = &mut self.stage {
                let time = batch.first().map(|c| c.time);
                let due = clear_after.is_some_and(|t| time.is_some_and(|time| time > t));
                if due && owned.is_some() {
                    cleared = Some(self.clear(topic, clear_after.unwrap_or(0)));
                } else {
                    for change in &batch {
                        match change.value {
                            Some(_) => present.insert(change.key.clone()),
                            None => present.remove(&change.key),
                        };
                    }
                }
            }
            topic.write(&batch);
        }
        if let Stage::Noting { owned: Some(_), .. } = &self.stage {
            if let Some(through) = clear_after.filter(|t| complete(*t)) {
                cleared = Some(self.clear(topic, through));
            }
        }
        cleared
    }

    /// Tombstones the owned held keys the state lacks, whose state is complete `through` a time
    /// (the tombstones' time).
    fn clear<V>(&mut self, topic: &impl ClearedTopic<K, V>, through: Time) -> usize {
        let Stage::Noting {
            present,
            owned: Some(owned),
            ..
        } = std::mem::replace(&mut self.stage, Stage::Done)
        else {
            return 0;
        };
        let mut n = 0;
        for key in owned {
            if topic.key_of(&key).is_none_or(|k| !present.contains(&k)) {
                topic.tombstone(&key, through);
                n += 1;
            }
        }
        self.progress.through.fetch_max(through, Ordering::AcqRel);
        self.progress.uncleared.fetch_sub(1, Ordering::AcqRel);
        n
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
    fn held<'a>(&self, keys: &'a HeldKeys) -> &'a [String] {
        &keys.districts
    }
    fn key_of(&self, held: &str) -> Option<DistrictId> {
        self.index.id_of(held)
    }
    /// A code the map does not know is no one's: worker 0 clears it.
    fn owns(&self, held: &str) -> bool {
        match self.index.id_of(held) {
            Some(id) => owner(&id, self.me.workers) == self.me.worker,
            None => self.me.worker == 0,
        }
    }
    fn write(&self, changes: &[Change<DistrictId, DistrictCounts>]) {
        write_districts(&*self.sink, &self.index, changes, self.published);
    }
    fn tombstone(&self, held: &str, as_of: Time) {
        self.sink.district(held, None, as_of);
    }
}

impl ClearedTopic<Id, Snapshot> for WorkerTopics {
    fn held<'a>(&self, keys: &'a HeldKeys) -> &'a [String] {
        &keys.riders
    }
    fn key_of(&self, held: &str) -> Option<Id> {
        Some(Id::from(held))
    }
    fn owns(&self, held: &str) -> bool {
        owner(&Id::from(held), self.me.workers) == self.me.worker
    }
    fn write(&self, changes: &[Change<Id, Snapshot>]) {
        write_riders(&*self.sink, &self.index, changes, self.published);
    }
    fn tombstone(&self, held: &str, as_of: Time) {
        self.sink.rider(held, None, as_of);
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::sync::OnceLock;

    use super::*;

    /// A topic of `u32` keys that logs what is written, owning the even keys.
    #[derive(Default)]
    struct Logged(RefCell<Vec<String>>);

    impl ClearedTopic<u32, u64> for Logged {
        fn held<'a>(&self, keys: &'a HeldKeys) -> &'a [String] {
            &keys.riders
        }
        fn key_of(&self, held: &str) -> Option<u32> {
            held.parse().ok()
        }
        fn owns(&self, held: &str) -> bool {
            held.trim_end_matches('x')
                .parse::<u32>()
                .is_ok_and(|k| k % 2 == 0)
        }
        fn write(&self, changes: &[Change<u32, u64>]) {
            for c in changes {
                let value = c.value.map_or("null".to_owned(), |v| v.to_string());
                self.0
                    .borrow_mut()
                    .push(format!("{}={value}@{}", c.key, c.time));
            }
        }
        fn tombstone(&self, held: &str, _as_of: Time) {
            self.0.borrow_mut().push(format!("{held}=null (cleared)"));
        }
    }

    impl Logged {
        fn take(&self) -> Vec<String> {
            let mut log = self.0.take();
            // Tombstones of one clearing come in hash order.
            log.sort_by_key(|l| !l.ends_with("(cleared)"));
            log
        }
    }

    fn change(key: u32, value: Option<u64>, time: Time) -> Change<u32, u64> {
        Change { key, value, time }
    }

    /// A source whose keys appear when the test sets them.
    fn later() -> (HeldKeysSource, Arc<OnceLock<Arc<HeldKeys>>>) {
        let cell: Arc<OnceLock<Arc<HeldKeys>>> = Arc::default();
        let c = cell.clone();
        (HeldKeysSource(Arc::new(move || c.get().cloned())), cell)
    }

    fn held(keys: &[&str]) -> Arc<HeldKeys> {
        Arc::new(HeldKeys {
            districts: Vec::new(),
            riders: keys.iter().map(|k| (*k).to_owned()).collect(),
        })
    }

    #[test]
    fn without_held_keys_changes_are_written_at_once() {
        let uncleared = Arc::new(ClearingProgress::default());
        let mut clearing = Clearing::new(None, uncleared.clone());
        let topic = Logged::default();
        let cleared = clearing.offer(vec![vec![change(1, Some(1), 5)]], None, |_| true, &topic);
        assert_eq!((cleared, topic.take()), (None, vec!["1=1@5".to_owned()]));
        assert_eq!(uncleared.uncleared(), 0);
    }

    #[test]
    fn held_keys_the_caught_up_state_lacks_are_tombstoned_once_it_is_complete() {
        let uncleared = Arc::new(ClearingProgress::default());
        let (source, cell) = later();
        let mut clearing = Clearing::new(Some(source), uncleared.clone());
        assert_eq!(uncleared.uncleared(), 1);
        let topic = Logged::default();
        // Writes go at once, while the held keys are read.
        let first = vec![change(2, Some(20), 5), change(4, Some(40), 5)];
        let cleared = clearing.offer(vec![first], Some(9), |_| true, &topic);
        assert_eq!(cleared, None, "the held keys are not known yet");
        assert_eq!(topic.take(), ["2=20@5", "4=40@5"]);

        // Held: 2 (set, then gone), 4 (set), 6 and 8 (not set before the clearing), 10 (not a
        // key the state can hold); 3 is another worker's.
        cell.set(held(&["2", "3", "4", "6", "8", "10x"]))
            .expect("set once");
        let second = vec![change(2, None, 7), change(8, Some(80), 7)];
        let cleared = clearing.offer(vec![second], Some(9), |t| t < 7, &topic);
        assert_eq!(cleared, None, "not before the caught-up time is complete");
        assert_eq!(topic.take(), ["2=null@7", "8=80@7"]);

        // Time 9 completes with no change of this worker's: the state lacks 2, 6 and 10x.
        let cleared = clearing.offer(Vec::new(), Some(9), |t| t <= 9, &topic);
        assert_eq!(cleared, Some(3));
        let mut log = topic.take();
        log.sort();
        assert_eq!(
            log,
            ["10x=null (cleared)", "2=null (cleared)", "6=null (cleared)"]
        );
        assert_eq!(uncleared.uncleared(), 0);

        // From then on, straight through.
        let cleared = clearing.offer(
            vec![vec![change(6, Some(6), 10)]],
            Some(9),
            |_| true,
            &topic,
        );
        assert_eq!((cleared, topic.take()), (None, vec!["6=6@10".to_owned()]));
    }

    #[test]
    fn a_change_after_the_caught_up_time_comes_after_the_clearing() {
        let (source, cell) = later();
        cell.set(held(&["2", "4"])).expect("set once");
        let mut clearing = Clearing::new(Some(source), Arc::default());
        let topic = Logged::default();
        // The caught-up time is 9; a batch of time 10 arrives before its completion is seen.
        let batches = vec![vec![change(4, Some(1), 8)], vec![change(2, Some(2), 10)]];
        let cleared = clearing.offer(batches, Some(9), |_| false, &topic);
        assert_eq!(cleared, Some(1));
        // In the order written: the time-8 change, the clearing, then the time-10 change.
        assert_eq!(topic.0.take(), ["4=1@8", "2=null (cleared)", "2=2@10"]);
    }

    #[test]
    fn with_no_held_key_of_its_own_a_worker_is_done_at_once() {
        let uncleared = Arc::new(ClearingProgress::default());
        let (source, cell) = later();
        cell.set(held(&["3", "5"])).expect("set once");
        let mut clearing = Clearing::new(Some(source), uncleared.clone());
        let topic = Logged::default();
        let cleared = clearing.offer(vec![vec![change(2, Some(2), 1)]], None, |_| false, &topic);
        assert_eq!(
            cleared,
            Some(0),
            "nothing it owns to clear, caught up or not"
        );
        assert_eq!(uncleared.uncleared(), 0);
        assert_eq!(topic.take(), ["2=2@1"]);
    }

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
        let rider_owns = |w, id: &str| ClearedTopic::<Id, Snapshot>::owns(&topics(w), id);
        let district_owns =
            |w, code: &str| ClearedTopic::<DistrictId, DistrictCounts>::owns(&topics(w), code);
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
