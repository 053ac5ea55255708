//! Reconciling the changelog topics with a state that cannot trust them: see [`Clearing`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use differential_dataflow::hashable::Hashable;
use dongflow_dataflow::types::{Change, Time};
use serde::{Deserialize, Serialize};

#[cfg(doc)]
use crate::render::Fingerprint;

/// A key the changelog topics held a value for (its latest record not a tombstone) when this run
/// began reading them, with the [`Fingerprint`] of that value (`None`: its latest record could not
/// be read back, so it is always written again).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeldKey {
    /// The record key: a district code or a rider id.
    pub key: String,
    /// What its value renders, hashed.
    pub fingerprint: Option<u64>,
}

/// What the changelog topics held when this run began reading them: what earlier runs published.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeldKeys {
    /// District codes.
    pub districts: Vec<HeldKey>,
    /// Rider ids.
    pub riders: Vec<HeldKey>,
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

/// A held key as the dataflow's exchange carries it to the worker that writes it: the dataflow
/// key it names, with the fingerprint of its held value, or a record key the state can never hold
/// (a code the map does not know), which worker 0 tombstones.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Held<K> {
    /// A dataflow key and the [`HeldKey::fingerprint`] of its held value.
    Key(K, Option<u64>),
    /// A record key no state can hold.
    Foreign(String),
}

impl<K: Hashable<Output = u64>> Held<K> {
    /// Where the exchange sends it: the hash the changes of its key are exchanged by, so that a
    /// key's held value and its changes meet at one worker; foreign keys all at worker 0.
    pub fn route(&self) -> u64 {
        match self {
            Held::Key(key, _) => key.hashed(),
            Held::Foreign(_) => 0,
        }
    }
}

/// One changelog topic as a worker's [`Clearing`] sees it.
pub trait ClearedTopic<K, V> {
    /// What a value renders, hashed (see [`Fingerprint`]).
    fn fingerprint(&self, value: &V) -> u64;
    /// Writes changes (a `None` value is a tombstone), in the order given.
    fn write(&self, changes: &[Change<K, V>]);
    /// Writes a tombstone for the record key `held`, at dataflow time `as_of`.
    fn tombstone(&self, held: &str, as_of: Time);
}

/// One worker's writes to one changelog topic, and the reconciling of what earlier runs left there
/// with this run's state.
///
/// A run that does not restore a checkpoint marked at a clean stop cannot trust the changelog to
/// hold its state: a run that crashed after the restored checkpoint may have written more than
/// it (or lost records in flight), and a run before the state dir was emptied may have left keys
/// the replay never changes again. So until the state has caught up with the input (a complete
/// time, not a passing one) and the held keys are known (read by the stale view, and brought to
/// the worker that writes each by the dataflow's exchange), each worker folds its changes per key
/// instead of writing them; then it writes, per key it was given, the final value where it differs
/// from the held one (by [`Fingerprint`]), and a tombstone for each held key its state lacks. A
/// changelog that already holds the state (a restart after a kill, with nothing new) is not
/// written again, and one that does not never goes back to the older checkpoint's values on the
/// way. From then on, writes go straight through. Given no held key, a worker writes straight
/// through as soon as all have arrived.
pub struct Clearing<K, V> {
    stage: Stage<K, V>,
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

/// What a worker's clearing of one topic wrote.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cleared {
    /// Final values and tombstones of the keys this run changed, where the changelog differed.
    pub written: usize,
    /// Keys whose held value was already this run's final one: not written again.
    pub unchanged: usize,
    /// Held keys the caught-up state lacks, tombstoned.
    pub tombstoned: usize,
}

/// The held keys one worker was given.
struct Owned<K> {
    /// By dataflow key, with the fingerprint of the held value.
    keys: HashMap<K, Option<u64>>,
    /// Record keys the state can never hold (a code the map does not know).
    foreign: Vec<String>,
}

impl<K> Default for Owned<K> {
    fn default() -> Self {
        Owned {
            keys: HashMap::new(),
            foreign: Vec::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> Owned<K> {
    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.foreign.is_empty()
    }
}

enum Stage<K, V> {
    /// Folding this run's changes per key, until the held keys are all in and the state has
    /// caught up.
    Holding {
        pending: HashMap<K, Change<K, V>>,
        /// The held keys given so far.
        owned: Owned<K>,
        /// Whether every held key has arrived.
        all_in: bool,
    },
    /// Cleared, or nothing to clear: writes go straight through.
    Done,
}

impl<K: std::hash::Hash + Eq + Clone, V> Clearing<K, V> {
    /// With `held`, reconciles the changelog with the held keys it will be given ([`hold`]);
    /// without, clears nothing (the changelog holds the restored state).
    ///
    /// [`hold`]: Clearing::hold
    pub fn new(held: bool, progress: Arc<ClearingProgress>) -> Self {
        let stage = match held {
            true => {
                progress.uncleared.fetch_add(1, Ordering::AcqRel);
                Stage::Holding {
                    pending: Default::default(),
                    owned: Owned::default(),
                    all_in: false,
                }
            }
            false => Stage::Done,
        };
        Self { stage, progress }
    }

    /// Takes held keys the exchange brought to this worker (ignored once cleared).
    pub fn hold(&mut self, held: impl IntoIterator<Item = Held<K>>) {
        let Stage::Holding { owned, .. } = &mut self.stage else {
            return;
        };
        for h in held {
            match h {
                Held::Key(key, fingerprint) => {
                    owned.keys.insert(key, fingerprint);
                }
                Held::Foreign(key) => owned.foreign.push(key),
            }
        }
    }

    /// Says that every held key has been given.
    pub fn all_held(&mut self) {
        if let Stage::Holding { all_in, .. } = &mut self.stage {
            *all_in = true;
        }
    }

    /// Takes complete times' changes, given in time order. `clear_after` is the time through
    /// which the state must be complete before the held keys are reconciled with it (`None`: not
    /// known yet); `complete` says whether a time is complete. Returns what the clearing wrote,
    /// once.
    pub fn offer(
        &mut self,
        batches: Vec<Vec<Change<K, V>>>,
        clear_after: Option<Time>,
        complete: impl Fn(Time) -> bool,
        topic: &impl ClearedTopic<K, V>,
    ) -> Option<Cleared> {
        let mut cleared = None;
        if let Stage::Holding {
            owned,
            all_in: true,
            ..
        } = &self.stage
        {
            if owned.is_empty() {
                cleared = Some(self.clear(topic, 0));
            }
        }
        for batch in batches {
            if let Stage::Holding {
                pending, all_in, ..
            } = &mut self.stage
            {
                let time = batch.first().map(|c| c.time);
                let due = clear_after.is_some_and(|t| time.is_some_and(|time| time > t));
                if !(due && *all_in) {
                    for change in batch {
                        pending.insert(change.key.clone(), change);
                    }
                    continue;
                }
                cleared = Some(self.clear(topic, clear_after.unwrap_or(0)));
            }
            topic.write(&batch);
        }
        if let Stage::Holding { all_in: true, .. } = &self.stage {
            if let Some(through) = clear_after.filter(|t| complete(*t)) {
                cleared = Some(self.clear(topic, through));
            }
        }
        cleared
    }

    /// Writes the folded changes where the changelog differs, and tombstones the held keys given
    /// that the state lacks, whose state is complete `through` a time (the tombstones' time).
    fn clear(&mut self, topic: &impl ClearedTopic<K, V>, through: Time) -> Cleared {
        let Stage::Holding {
            pending,
            owned: Owned { mut keys, foreign },
            ..
        } = std::mem::replace(&mut self.stage, Stage::Done)
        else {
            return Cleared::default();
        };
        let mut out = Vec::with_capacity(pending.len());
        let mut unchanged = 0;
        for (key, change) in pending {
            let held = keys.remove(&key);
            match (&change.value, held) {
                (Some(v), Some(Some(fp))) if topic.fingerprint(v) == fp => unchanged += 1,
                // Gone again, and never in the changelog: nothing to remove.
                (None, None) => {}
                _ => out.push(change),
            }
        }
        let written = out.len();
        let tombstoned = keys.len() + foreign.len();
        out.extend(keys.into_keys().map(|key| Change {
            key,
            value: None,
            time: through,
        }));
        out.sort_by_key(|c| c.time);
        topic.write(&out);
        for key in &foreign {
            topic.tombstone(key, through);
        }
        self.progress.through.fetch_max(through, Ordering::AcqRel);
        self.progress.uncleared.fetch_sub(1, Ordering::AcqRel);
        Cleared {
            written,
            unchanged,
            tombstoned,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;

    /// A topic of `u32` keys and values (a value is its own fingerprint) that logs what is
    /// written.
    #[derive(Default)]
    struct Logged(RefCell<Vec<String>>);

    impl ClearedTopic<u32, u64> for Logged {
        fn fingerprint(&self, value: &u64) -> u64 {
            *value
        }
        fn write(&self, changes: &[Change<u32, u64>]) {
            for c in changes {
                let value = c.value.map_or("null".to_owned(), |v| v.to_string());
                self.0
                    .borrow_mut()
                    .push(format!("{}={value}@{}", c.key, c.time));
            }
        }
        fn tombstone(&self, held: &str, as_of: Time) {
            self.0
                .borrow_mut()
                .push(format!("{held}=null@{as_of} (foreign)"));
        }
    }

    impl Logged {
        /// What was written, in order.
        fn take(&self) -> Vec<String> {
            self.0.take()
        }

        /// What was written, sorted (a clearing writes the keys of one time in hash order).
        fn take_sorted(&self) -> Vec<String> {
            let mut log = self.0.take();
            log.sort();
            log
        }
    }

    fn change(key: u32, value: Option<u64>, time: Time) -> Change<u32, u64> {
        Change { key, value, time }
    }

    /// Held keys with their values (`None`: unreadable); a key that is no number is foreign.
    fn held(keys: &[(&str, Option<u64>)]) -> Vec<Held<u32>> {
        keys.iter()
            .map(|(k, v)| match k.parse() {
                Ok(k) => Held::Key(k, *v),
                Err(_) => Held::Foreign((*k).to_owned()),
            })
            .collect()
    }

    #[test]
    fn without_held_keys_changes_are_written_at_once() {
        let uncleared = Arc::new(ClearingProgress::default());
        let mut clearing = Clearing::new(false, uncleared.clone());
        let topic = Logged::default();
        let cleared = clearing.offer(vec![vec![change(1, Some(1), 5)]], None, |_| true, &topic);
        assert_eq!((cleared, topic.take()), (None, vec!["1=1@5".to_owned()]));
        assert_eq!(uncleared.uncleared(), 0);
    }

    #[test]
    fn the_catch_up_is_folded_and_only_what_the_changelog_lacks_is_written_once_complete() {
        let uncleared = Arc::new(ClearingProgress::default());
        let mut clearing = Clearing::new(true, uncleared.clone());
        assert_eq!(uncleared.uncleared(), 1);
        let topic = Logged::default();
        // Folded while the held keys are read, caught up or not.
        let first = vec![change(2, Some(20), 5), change(4, Some(40), 5)];
        let cleared = clearing.offer(vec![first], Some(9), |_| true, &topic);
        assert_eq!(cleared, None, "the held keys are not known yet");
        assert_eq!(topic.take(), Vec::<String>::new());

        // Held: 2 (then gone), 4 (another value), 6 (the same value), 12 (unreadable), 14 (not
        // in this run's state), 10x (not a key the state can hold). 8 is new. They arrive in
        // parts; until all are in, nothing is written, the time complete or not.
        clearing.hold(held(&[("2", Some(20)), ("4", Some(41)), ("6", Some(60))]));
        let cleared = clearing.offer(Vec::new(), Some(9), |_| true, &topic);
        assert_eq!(cleared, None, "not all held keys are in");
        clearing.hold(held(&[("10x", Some(1)), ("12", None), ("14", Some(1))]));
        clearing.all_held();
        let second = vec![
            change(2, None, 7),
            change(8, Some(80), 7),
            change(12, Some(12), 7),
        ];
        let cleared = clearing.offer(vec![second], Some(9), |t| t < 7, &topic);
        assert_eq!(cleared, None, "not before the caught-up time is complete");
        assert_eq!(topic.take(), Vec::<String>::new());

        // Time 9 completes.
        let third = vec![change(6, Some(60), 8)];
        let cleared = clearing.offer(vec![third], Some(9), |t| t <= 9, &topic);
        assert_eq!(
            cleared,
            Some(Cleared {
                written: 4,
                unchanged: 1,
                tombstoned: 2
            })
        );
        assert_eq!(
            topic.take_sorted(),
            [
                "10x=null@9 (foreign)",
                "12=12@7",
                "14=null@9",
                "2=null@7",
                "4=40@5",
                "8=80@7"
            ]
        );
        assert_eq!(uncleared.uncleared(), 0);
        assert_eq!(uncleared.whole_from(), Some(9));

        // From then on, straight through, the same value or not.
        let cleared = clearing.offer(
            vec![vec![change(6, Some(60), 10)]],
            Some(9),
            |_| true,
            &topic,
        );
        assert_eq!((cleared, topic.take()), (None, vec!["6=60@10".to_owned()]));
    }

    #[test]
    fn a_key_back_at_its_held_value_after_the_catch_up_is_not_written() {
        let mut clearing = Clearing::new(true, Arc::default());
        clearing.hold(held(&[("2", Some(5))]));
        clearing.all_held();
        let topic = Logged::default();
        let batches = vec![vec![change(2, Some(6), 3)], vec![change(2, Some(5), 4)]];
        let cleared = clearing.offer(batches, Some(4), |t| t <= 4, &topic);
        assert_eq!(
            cleared,
            Some(Cleared {
                written: 0,
                unchanged: 1,
                tombstoned: 0
            })
        );
        assert_eq!(topic.take(), Vec::<String>::new());
    }

    #[test]
    fn a_change_after_the_caught_up_time_comes_after_the_clearing() {
        let mut clearing = Clearing::new(true, Arc::default());
        clearing.hold(held(&[("2", Some(9)), ("4", Some(1))]));
        clearing.all_held();
        let topic = Logged::default();
        // The caught-up time is 9; a batch of time 10 arrives before its completion is seen.
        let batches = vec![vec![change(4, Some(1), 8)], vec![change(2, Some(2), 10)]];
        let cleared = clearing.offer(batches, Some(9), |_| false, &topic);
        assert_eq!(
            cleared,
            Some(Cleared {
                written: 0,
                unchanged: 1,
                tombstoned: 1
            })
        );
        // The clearing at 9 (4 unchanged, 2 lacking), then the time-10 change.
        assert_eq!(topic.take(), ["2=null@9", "2=2@10"]);
    }

    #[test]
    fn given_no_held_key_a_worker_is_done_once_all_are_in() {
        let uncleared = Arc::new(ClearingProgress::default());
        let mut clearing = Clearing::new(true, uncleared.clone());
        let topic = Logged::default();
        let cleared = clearing.offer(vec![vec![change(2, Some(2), 1)]], None, |_| false, &topic);
        assert_eq!(cleared, None, "held keys may still arrive");
        assert_eq!(topic.take(), Vec::<String>::new());
        clearing.all_held();
        let cleared = clearing.offer(vec![vec![change(3, Some(3), 2)]], None, |_| false, &topic);
        assert_eq!(
            cleared,
            Some(Cleared {
                written: 1,
                unchanged: 0,
                tombstoned: 0
            }),
            "nothing held to reconcile: done, caught up or not"
        );
        assert_eq!(uncleared.uncleared(), 0);
        assert_eq!(topic.take(), ["2=2@1", "3=3@2"]);
    }
}
