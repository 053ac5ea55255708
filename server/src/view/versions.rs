//! The changed riders of every view version in one map: each key's latest value, and the older
//! values that versions still held may read.
//!
//! A persistent map makes a version by copying the nodes on each changed key's path, and every copy
//! adds a reference to each value and child it holds; dropping the old version takes them away
//! again. Under steady input that was most of the view thread's work (docs/bench/README.md). Here a
//! change writes one entry: the value with the number of the version that wrote it. A version reads
//! the newest value of a number no greater than its own. Each version holds a [`Pin`]; once no
//! version below some number is held, the values hidden under a newer one at or below it are
//! dropped when their key is written again, when a new version is shown
//! ([`Versions::prune`]), or when a version is made ([`Versions::forget_gone`], a shard at a time).
//!
//! Readers lock one shard for reading while they look up one key; the one writer locks one shard
//! for writing while it writes one key (or sweeps the shard), so neither waits for long.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard, Weak};

use dongflow_connectors::Id;
use dongflow_dataflow::types::Snapshot;
use rustc_hash::FxBuildHasher;
use smallvec::SmallVec;

/// Shards of the map, each behind its own lock.
const SHARDS: usize = 64;

/// Room a shard keeps for the older values of this many keys, used or not.
const KEEP_ROOM: usize = 64;

/// A rider's value as some version sees it: its snapshot, or `None` once gone.
pub(super) type Value = Option<Arc<Snapshot>>;

/// One value of a key, with the version that wrote it.
#[derive(Debug)]
struct Entry {
    version: u64,
    value: Value,
}

/// The values before a key's latest one, newest first: one without an allocation of its own (a key
/// written once since the oldest version held, the usual case).
type Older = SmallVec<[Entry; 1]>;

/// The value that version `at` reads among a key's latest value and the ones before it (newest
/// first), if it was written by then.
fn read_at<'a>(latest: &'a Entry, older: Option<&'a Older>, at: u64) -> Option<&'a Value> {
    if latest.version <= at {
        return Some(&latest.value);
    }
    let older = older?.iter().find(|e| e.version <= at)?;
    Some(&older.value)
}

/// Drops from the values before a key's latest one (newest first) what no version from `floor` on
/// reads: everything under the newest value at or below `floor`. Says whether any is left.
fn prune(latest: &Entry, older: &mut Older, floor: u64) -> bool {
    if latest.version <= floor {
        older.clear();
    } else if let Some(first) = older.iter().position(|e| e.version <= floor) {
        older.truncate(first + 1);
    }
    !older.is_empty()
}

/// A version's hold on the values it reads.
#[derive(Debug)]
pub(super) struct Pin(u64);

/// One shard: each key's latest value, and for the keys written lately the values before it that
/// older versions may still read (few keys, so the large map holds 16 bytes a key beside the id).
#[derive(Debug, Default)]
struct Shard {
    latest: HashMap<Id, Entry, FxBuildHasher>,
    older: HashMap<Id, Older, FxBuildHasher>,
}

impl Shard {
    fn at(&self, id: &Id, at: u64) -> Option<&Value> {
        read_at(self.latest.get(id)?, self.older.get(id), at)
    }

    /// Drops the older values that no version from `floor` on reads.
    fn prune(&mut self, floor: u64) {
        let Shard { latest, older } = self;
        older.retain(|id, kept| latest.get(id).is_some_and(|e| prune(e, kept, floor)));
        // A large version (a catch-up's) leaves room for all it changed: it goes once unused.
        if older.capacity() > 4 * older.len().max(KEEP_ROOM) {
            older.shrink_to(2 * older.len());
        }
    }
}

/// The map shared by every version of one view.
#[derive(Debug)]
pub(super) struct Versions {
    shards: Box<[RwLock<Shard>]>,
    /// Every version made, while it may be held.
    pins: Mutex<Vec<Weak<Pin>>>,
    /// The shard [`Versions::forget_gone`] looks at next.
    next_sweep: Mutex<usize>,
}

impl Default for Versions {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
            pins: Mutex::default(),
            next_sweep: Mutex::default(),
        }
    }
}

/// The shard of an id: bits 48 to 53 of its hash, which neither part of a hash table's use of the
/// hash touches (the bucket comes from the low bits, the tag byte that groups are matched by from the
/// top seven): taken from either, every id of a shard would share it.
fn shard_of(id: &Id) -> usize {
    use std::hash::BuildHasher;
    (FxBuildHasher.hash_one(id) >> 48) as usize % SHARDS
}

impl Versions {
    fn read(&self, id: &Id) -> RwLockReadGuard<'_, Shard> {
        self.shards[shard_of(id)]
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn write_shard(&self, shard: usize) -> RwLockWriteGuard<'_, Shard> {
        self.shards[shard]
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A hold for version `version`.
    pub(super) fn pin(&self, version: u64) -> Arc<Pin> {
        let pin = Arc::new(Pin(version));
        let mut pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        pins.retain(|p| p.strong_count() > 0);
        pins.push(Arc::downgrade(&pin));
        pin
    }

    /// The oldest version still held, if any.
    pub(super) fn floor(&self) -> Option<u64> {
        let pins = self.pins.lock().unwrap_or_else(|e| e.into_inner());
        pins.iter().filter_map(|p| Some(p.upgrade()?.0)).min()
    }

    /// The value of `id` that version `at` reads; `None` if it was not written by then.
    pub(super) fn get(&self, id: &Id, at: u64) -> Option<Value> {
        self.read(id).at(id, at).cloned()
    }

    /// Whether version `at` reads a value of `id`.
    pub(super) fn has(&self, id: &Id, at: u64) -> bool {
        self.read(id).at(id, at).is_some()
    }

    /// The newest value written of `id`, by any version.
    pub(super) fn latest(&self, id: &Id) -> Option<Value> {
        self.read(id).latest.get(id).map(|e| e.value.clone())
    }

    /// Writes `value` as version `version`'s value of `id` (the newest version: only the writer's
    /// next one writes), dropping what no version from `floor` on reads.
    pub(super) fn write(&self, id: &Id, value: Value, version: u64, floor: u64) {
        let mut shard = self.write_shard(shard_of(id));
        let Shard { latest, older } = &mut *shard;
        match latest.get_mut(id) {
            Some(entry) if entry.version == version => entry.value = value,
            Some(entry) => {
                let before = std::mem::replace(entry, Entry { version, value });
                let kept = older.entry(id.clone()).or_default();
                kept.insert(0, before);
                if !prune(entry, kept, floor) {
                    older.remove(id);
                }
            }
            None => {
                latest.insert(id.clone(), Entry { version, value });
            }
        }
    }

    /// Drops, in every shard, the values that no version from `floor` on reads (only the keys
    /// written lately have any).
    pub(super) fn prune(&self, floor: u64) {
        for shard in self.shards.iter() {
            let held = !shard
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .older
                .is_empty();
            if held {
                shard
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .prune(floor);
            }
        }
    }

    /// Looks at the next shard: drops what no version from `floor` on reads there, and the keys
    /// that every such version reads as gone where `gone_for_good` says so (not hiding anything
    /// under them).
    pub(super) fn forget_gone(&self, floor: u64, gone_for_good: impl Fn(&Id) -> bool) {
        let next = {
            let mut next = self.next_sweep.lock().unwrap_or_else(|e| e.into_inner());
            let shard = *next;
            *next = (shard + 1) % SHARDS;
            shard
        };
        let mut shard = self.write_shard(next);
        shard.prune(floor);
        let Shard { latest, older } = &mut *shard;
        latest.retain(|id, entry| {
            let gone = entry.version <= floor && entry.value.is_none() && !older.contains_key(id);
            !(gone && gone_for_good(id))
        });
    }

    /// Whether no key has a value.
    pub(super) fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| {
            s.read()
                .unwrap_or_else(|e| e.into_inner())
                .latest
                .is_empty()
        })
    }

    /// Every key that version `at` reads a snapshot of, with it.
    pub(super) fn all_at(&self, at: u64) -> Vec<(Id, Arc<Snapshot>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.read().unwrap_or_else(|e| e.into_inner());
            out.extend(shard.latest.iter().filter_map(|(id, e)| {
                let value = read_at(e, shard.older.get(id), at)?;
                Some((id.clone(), value.clone()?))
            }));
        }
        out
    }
}

impl Pin {
    /// The version held.
    pub(super) fn version(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use dongflow_connectors::RiderStatus;
    use dongflow_dataflow::types::RiderRow;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    fn snapshot(n: u16) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            rider: RiderRow {
                status: RiderStatus::OnShift,
                rider_type: None,
                location: None.into(),
                district: n,
                ts: 1,
            },
            deliveries: Box::default(),
        })
    }

    /// How many values `id` holds, newest first.
    fn depth(versions: &Versions, id: &Id) -> usize {
        let shard = versions.read(id);
        let latest = usize::from(shard.latest.contains_key(id));
        latest + shard.older.get(id).map_or(0, |o| o.len())
    }

    impl Versions {
        fn all_keys(&self) -> usize {
            self.shards
                .iter()
                .map(|s| s.read().expect("not poisoned").latest.len())
                .sum()
        }
    }

    /// What each key is as one version reads it: a district, or gone.
    type Model = BTreeMap<u32, Option<u16>>;

    fn seen(value: Option<Value>) -> Option<Option<u16>> {
        value.map(|v| v.map(|s| s.rider.district))
    }

    /// Against a copy of the map per version: random writes (values and gones) by the newest
    /// version, versions made and let go in any order, sweeps that may forget gone keys; every
    /// version still held reads exactly what was written by it. Keys 0..10 hide something below
    /// (never forgotten), the others do not.
    #[test]
    fn every_held_version_reads_what_was_written_by_it() {
        let mut rng = SmallRng::seed_from_u64(7);
        let (mut pruned, mut forgotten) = (0, 0);
        for _ in 0..150 {
            let versions = Versions::default();
            let mut model: Model = BTreeMap::new();
            let mut version = 0;
            let mut newest = versions.pin(version);
            let mut held: Vec<(Arc<Pin>, Model)> = Vec::new();
            for _ in 0..rng.random_range(1..300) {
                match rng.random_range(0..10) {
                    0..=5 => {
                        let key = rng.random_range(0..40u32);
                        let value = rng.random_bool(0.7).then(|| rng.random_range(0..100));
                        let floor = held.iter().map(|(p, _)| p.version()).min();
                        let floor = floor.unwrap_or(version);
                        let id = Id::from(format!("r-{key}"));
                        let before = depth(&versions, &id);
                        versions.write(&id, value.map(snapshot), version, floor);
                        pruned += usize::from(depth(&versions, &id) <= before);
                        model.insert(key, value);
                    }
                    6 | 7 => {
                        held.push((newest, model.clone()));
                        version += 1;
                        newest = versions.pin(version);
                    }
                    8 if !held.is_empty() => {
                        held.remove(rng.random_range(0..held.len()));
                    }
                    _ => {
                        let floor = versions.floor().unwrap_or(version);
                        let before = versions.all_keys();
                        versions.prune(floor);
                        for _ in 0..SHARDS {
                            versions.forget_gone(floor, |id| {
                                id.trim_start_matches("r-").parse::<u32>().expect("a key") >= 10
                            });
                        }
                        // A gone key that hides nothing, which no held version reads otherwise,
                        // may be forgotten: read as never written, it answers the same.
                        forgotten += before - versions.all_keys();
                    }
                }
                for (pin, model) in held
                    .iter()
                    .chain(std::iter::once(&(newest.clone(), model.clone())))
                {
                    for key in 0..40u32 {
                        let id = Id::from(format!("r-{key}"));
                        let got = seen(versions.get(&id, pin.version()));
                        let expected = model.get(&key).copied();
                        let same = match (got, expected) {
                            (a, b) if a == b => true,
                            // Forgotten: a key that hides nothing reads as never written.
                            (None, Some(None)) => key >= 10,
                            _ => false,
                        };
                        assert!(
                            same,
                            "version {} key {key}: {got:?} != {expected:?}",
                            pin.version()
                        );
                    }
                }
            }
        }
        assert!(
            pruned > 100 && forgotten > 100,
            "{pruned} pruned, {forgotten} forgotten"
        );
    }
}
