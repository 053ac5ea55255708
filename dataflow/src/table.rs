//! The upsert's map of states by id, copied for a checkpoint a few shards at a time.
//!
//! A checkpoint needs every state as it was at one dataflow time. Copying a whole map at once
//! pauses the worker for as long as the copy takes (tens of milliseconds at a million ids), so the
//! map is split into [`SHARDS`] hash tables by bits of the id's hash, and a copy walks them
//! a few at a time between the operator's other work ([`Table::copy_some`]). Until the walk has
//! passed a shard, the first change to an id in it (an update, an insert, a removal) first puts the
//! id's state as it was into the copy and marks the id as handled, so the walk skips it: the copy
//! is the map at the time it began, whatever changed during the walk.

use std::hash::BuildHasher;

use dongflow_records::Id;
use hashbrown::hash_table::Entry;
use hashbrown::HashTable;
use rustc_hash::{FxBuildHasher, FxHashSet};

/// How many hash tables the map is split into.
pub const SHARDS: usize = 256;

/// How many shards a call of [`Table::give_back_room`] looks at.
const LOOK_AT: usize = 8;

/// The hash an id is found by, in these tables and in the tombstones' index.
pub(crate) fn hash(id: &Id) -> u64 {
    FxBuildHasher.hash_one(id)
}

/// The shard of a hash: bits 48 to 55, which neither part of a hash table's use of the hash
/// touches (the bucket comes from the low bits, the tag byte that groups are matched by from the
/// top seven): taken from either, every id of a shard would share it and the table would compare
/// every id of a group.
fn shard_of(hash: u64) -> usize {
    (hash >> 48) as usize & (SHARDS - 1)
}

/// What a copy keeps of a value.
pub trait Copied {
    /// The part copied.
    type Copy;
    /// A copy of that part.
    fn copied(&self) -> Self::Copy;
}

/// A copy under way: the shards before `cursor` are copied, and of the later ones, the ids in
/// `handled` (changed since the copy began, their earlier value in `out` if they had one).
#[derive(Debug)]
struct Copying<C> {
    cursor: usize,
    handled: FxHashSet<Id>,
    out: Vec<(Id, C)>,
}

/// Values by id, in shards.
#[derive(Debug)]
pub struct Table<V: Copied> {
    shards: Vec<HashTable<(Id, V)>>,
    len: usize,
    copy: Option<Copying<V::Copy>>,
    /// The shard [`Table::give_back_room`] looks at next.
    next_to_shrink: usize,
}

impl<V: Copied> Default for Table<V> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| HashTable::new()).collect(),
            len: 0,
            copy: None,
            next_to_shrink: 0,
        }
    }
}

impl<V: Copied> Table<V> {
    /// The number of ids held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no id is held.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The value of `id`.
    pub fn get(&self, id: &Id) -> Option<&V> {
        let h = hash(id);
        self.shards[shard_of(h)]
            .find(h, |(k, _)| k == id)
            .map(|(_, v)| v)
    }

    /// Every id with its value.
    pub fn iter(&self) -> impl Iterator<Item = (&Id, &V)> {
        self.shards.iter().flatten().map(|(k, v)| (k, v))
    }

    /// Returns the room a burst left in the next few shards, if they hold far fewer ids than they
    /// have room for: called often, it looks at every shard in turn without walking them all each
    /// time.
    pub fn give_back_room(&mut self, keep: usize) {
        for _ in 0..LOOK_AT {
            let shard = &mut self.shards[self.next_to_shrink];
            self.next_to_shrink = (self.next_to_shrink + 1) % SHARDS;
            let len = shard.len();
            if shard.capacity() > 4 * len.max(keep) {
                shard.shrink_to(2 * len, |(k, _)| hash(k));
            }
        }
    }

    /// Before the first change to `id` during a copy, in a shard the copy has not passed: its
    /// value as it was goes into the copy.
    fn before_change(&mut self, shard: usize, h: u64, id: &Id) {
        let Some(copy) = &mut self.copy else {
            return;
        };
        if shard < copy.cursor || copy.handled.contains(id) {
            return;
        }
        copy.handled.insert(id.clone());
        if let Some((k, v)) = self.shards[shard].find(h, |(k, _)| k == id) {
            copy.out.push((k.clone(), v.copied()));
        }
    }

    /// The value of `id`, to change.
    pub fn get_mut(&mut self, id: &Id) -> Option<&mut V> {
        let h = hash(id);
        let shard = shard_of(h);
        self.before_change(shard, h, id);
        self.shards[shard]
            .find_mut(h, |(k, _)| k == id)
            .map(|(_, v)| v)
    }

    /// Sets the value of `id`, and returns the one it had.
    pub fn insert(&mut self, id: Id, value: V) -> Option<V> {
        let h = hash(&id);
        let shard = shard_of(h);
        self.before_change(shard, h, &id);
        match self.shards[shard].entry(h, |(k, _)| *k == id, |(k, _)| hash(k)) {
            Entry::Occupied(mut entry) => Some(std::mem::replace(&mut entry.get_mut().1, value)),
            Entry::Vacant(entry) => {
                entry.insert((id, value));
                self.len += 1;
                None
            }
        }
    }

    /// Removes `id`, and returns its value.
    pub fn remove(&mut self, id: &Id) -> Option<V> {
        let h = hash(id);
        let shard = shard_of(h);
        self.before_change(shard, h, id);
        let entry = self.shards[shard].find_entry(h, |(k, _)| k == id).ok()?;
        let ((_, value), _) = entry.remove();
        self.len -= 1;
        Some(value)
    }

    /// Begins a copy of every id and value as they are now.
    pub fn begin_copy(&mut self) {
        self.copy = Some(Copying {
            cursor: 0,
            handled: FxHashSet::default(),
            out: Vec::with_capacity(self.len),
        });
    }

    /// Copies whole shards until about `budget` ids are copied; returns the copy once every shard
    /// is. `None` while no copy is under way or it is not done yet.
    pub fn copy_some(&mut self, budget: usize) -> Option<Vec<(Id, V::Copy)>> {
        let copy = self.copy.as_mut()?;
        let start = copy.out.len();
        while copy.cursor < SHARDS && copy.out.len() - start < budget {
            let handled = &copy.handled;
            // Most copies see no change during them: no lookup then.
            let copied = self.shards[copy.cursor]
                .iter()
                .filter(|(k, _)| handled.is_empty() || !handled.contains(k))
                .map(|(k, v)| (k.clone(), v.copied()));
            copy.out.extend(copied);
            copy.cursor += 1;
        }
        if copy.cursor < SHARDS {
            return None;
        }
        self.copy.take().map(|copy| copy.out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;

    impl Copied for u32 {
        type Copy = u32;
        fn copied(&self) -> u32 {
            *self
        }
    }

    /// Against a plain map: random inserts, updates and removals, with copies begun at random
    /// moments and walked a little at a time in between; each copy equals the map when it began.
    #[test]
    fn a_copy_is_the_map_when_it_began_whatever_changes_during_it() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        let mut table: Table<u32> = Table::default();
        let mut model: BTreeMap<Id, u32> = BTreeMap::new();
        let mut began: Option<BTreeMap<Id, u32>> = None;
        let mut copies = 0;
        for step in 0..200_000u32 {
            let id: Id = format!("r-{}", rng.random_range(0..5_000)).into();
            match rng.random_range(0..10) {
                0..=5 => {
                    assert_eq!(
                        table.insert(id.clone(), step),
                        model.insert(id.clone(), step)
                    );
                }
                6 => {
                    if let Some(v) = table.get_mut(&id) {
                        *v += 1;
                    }
                    if let Some(v) = model.get_mut(&id) {
                        *v += 1;
                    }
                }
                7 => assert_eq!(table.remove(&id), model.remove(&id)),
                8 if began.is_none() && rng.random_bool(0.01) => {
                    table.begin_copy();
                    began = Some(model.clone());
                }
                _ => {
                    if let Some(copied) = table.copy_some(rng.random_range(1..200)) {
                        let expected = began.take().expect("a copy was begun");
                        let copied: BTreeMap<Id, u32> = copied.into_iter().collect();
                        assert_eq!(copied, expected, "step {step}");
                        copies += 1;
                    }
                }
            }
            assert_eq!(table.len(), model.len());
            assert_eq!(table.get(&id), model.get(&id));
        }
        assert!(copies > 10, "{copies} copies");
        let all: BTreeMap<Id, u32> = table.iter().map(|(k, v)| (k.clone(), *v)).collect();
        assert_eq!(all, model);
    }
}
