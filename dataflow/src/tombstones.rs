//! Ids whose state is terminal, remembered by id and expiry alone until their time to live runs out.
//!
//! A delivered or cancelled delivery must be remembered (CONTRACT section 3: a late event cannot
//! bring it back), but nothing of its row is ever shown again. So the upsert keeps it here instead
//! of in its map of states: one `(expiry, id)` pair in a queue in expiry order, and an 8-byte
//! position in a hash index over that queue. Expiry pops the queue's front; lookup hashes the id and
//! compares the ids at the positions the index gives.

use std::collections::VecDeque;

use dongflow_records::Id;
use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use crate::table::hash;
use crate::types::Time;

/// The terminal ids of one upsert operator on one worker.
#[derive(Debug, Default)]
pub struct Tombstones {
    /// `(expiry time, id)`, in the order they were remembered (which is expiry order while the
    /// dataflow time only grows).
    queue: VecDeque<(Time, Id)>,
    /// How many entries have left the queue's front since the set began: the index holds absolute
    /// positions, so that popping the front moves nothing.
    popped: u64,
    /// Absolute queue positions, found by the hash of the id at each.
    index: HashTable<u64>,
}

impl Tombstones {
    /// The number of ids remembered.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Whether `id` is remembered.
    pub fn contains(&self, id: &Id) -> bool {
        if self.queue.is_empty() {
            // An upsert whose ids never end (riders) asks this for every event: no hash then.
            return false;
        }
        let (queue, popped) = (&self.queue, self.popped);
        self.index
            .find(hash(id), |&at| queue[(at - popped) as usize].1 == *id)
            .is_some()
    }

    /// Remembers `id` until `expires`; an id already remembered keeps its first expiry (a terminal
    /// state absorbs every later event, so it cannot end twice).
    pub fn insert(&mut self, expires: Time, id: Id) {
        let at = self.popped + self.queue.len() as u64;
        let (queue, popped) = (&self.queue, self.popped);
        let entry = self.index.entry(
            hash(&id),
            |&at| queue[(at - popped) as usize].1 == id,
            |&at| hash(&queue[(at - popped) as usize].1),
        );
        if let Entry::Vacant(vacant) = entry {
            vacant.insert(at);
            self.queue.push_back((expires, id));
        }
    }

    /// Forgets the ids whose expiry is at or before `now`, and says how many.
    ///
    /// An id remembered out of expiry order (seeded from a checkpoint behind a later one) waits for
    /// the ones before it: it is forgotten late, never early.
    pub fn expire(&mut self, now: Time) -> u64 {
        let mut forgotten = 0;
        while self.queue.front().is_some_and(|(at, _)| *at <= now) {
            let Some((_, id)) = self.queue.pop_front() else {
                break;
            };
            let front = self.popped;
            if let Ok(entry) = self.index.find_entry(hash(&id), |&at| at == front) {
                entry.remove();
            }
            self.popped += 1;
            forgotten += 1;
        }
        if self.queue.capacity() > 4 * self.queue.len().max(64) {
            // A burst of ends has expired: give its room back rather than hold it for good.
            self.queue.shrink_to(2 * self.queue.len());
            let (queue, popped) = (&self.queue, self.popped);
            self.index.shrink_to(2 * queue.len(), |&at| {
                hash(&queue[(at - popped) as usize].1)
            });
        }
        forgotten
    }

    /// Every remembered id with its expiry, in the order they expire.
    pub fn iter(&self) -> impl Iterator<Item = &(Time, Id)> {
        self.queue.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use std::collections::HashMap;

    #[test]
    fn remembers_until_expiry_then_forgets() {
        let mut set = Tombstones::default();
        set.insert(10, "d-1".into());
        set.insert(20, "d-2".into());
        set.insert(30, "d-1".into()); // already remembered: keeps its expiry
        assert_eq!(set.len(), 2);
        assert!(set.contains(&"d-1".into()) && !set.contains(&"d-3".into()));
        assert_eq!(set.expire(9), 0);
        assert_eq!(set.expire(10), 1);
        assert!(!set.contains(&"d-1".into()) && set.contains(&"d-2".into()));
        assert_eq!(set.expire(100), 1);
        assert!(set.is_empty());
    }

    /// Against a plain map over a random sequence of inserts and expiries.
    #[test]
    fn agrees_with_a_map() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut set = Tombstones::default();
        let mut model: HashMap<Id, Time> = HashMap::new();
        let mut now: Time = 0;
        for _ in 0..20_000 {
            now += rng.random_range(0..3);
            if rng.random_bool(0.1) {
                set.expire(now);
                model.retain(|_, at| *at > now);
            }
            let id: Id = format!("d-{}", rng.random_range(0..3_000)).into();
            set.insert(now + 50, id.clone());
            model.entry(id).or_insert(now + 50);
            assert_eq!(set.len(), model.len());
        }
        for i in 0..3_000 {
            let id: Id = format!("d-{i}").into();
            assert_eq!(set.contains(&id), model.contains_key(&id), "{id}");
        }
        let mut listed: Vec<(Time, Id)> = set.iter().cloned().collect();
        let mut expected: Vec<(Time, Id)> = model.into_iter().map(|(id, at)| (at, id)).collect();
        listed.sort();
        expected.sort();
        assert_eq!(listed, expected);
    }
}
