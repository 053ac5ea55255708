//! Ids whose state is terminal, remembered by id and expiry alone until their time to live runs out.
//!
//! A delivered or cancelled delivery must be remembered (CONTRACT section 3: a late event cannot
//! bring it back), but nothing of its row is ever shown again. So the upsert keeps it here instead
//! of in its map of states: one `(expiry, id)` pair in a queue in expiry order (in blocks of a
//! fixed size), and a 4-byte position in a hash index over that queue. Expiry pops the queue's front; lookup hashes the id and
//! compares the ids at the positions the index gives.

use std::collections::VecDeque;

use dongflow_records::Id;
use hashbrown::hash_table::Entry;
use hashbrown::HashTable;

use crate::table::hash;
use crate::types::Time;

/// Entries per block of the queue.
const BLOCK: usize = 1024;

/// A queue in blocks of [`BLOCK`] entries, each allocated at its full size once: it never holds
/// the up to twice the room of a queue that doubles, and it gives a block back as soon as its last
/// entry leaves.
#[derive(Debug, Default)]
struct Blocks {
    blocks: VecDeque<Vec<(Time, Id)>>,
    /// Entries of the front block that have left.
    head: usize,
    len: usize,
}

impl Blocks {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, at: usize) -> &(Time, Id) {
        let at = self.head + at;
        &self.blocks[at / BLOCK][at % BLOCK]
    }

    fn front(&self) -> Option<&(Time, Id)> {
        (self.len > 0).then(|| self.get(0))
    }

    fn push_back(&mut self, entry: (Time, Id)) {
        match self.blocks.back_mut() {
            Some(last) if last.len() < BLOCK => last.push(entry),
            _ => {
                let mut block = Vec::with_capacity(BLOCK);
                block.push(entry);
                self.blocks.push_back(block);
            }
        }
        self.len += 1;
    }

    /// Takes the front entry out; its place keeps an empty id (no allocation) until its block
    /// goes.
    fn pop_front(&mut self) -> Option<(Time, Id)> {
        let front = self.blocks.front_mut().filter(|_| self.len > 0)?;
        let (time, id) = &mut front[self.head];
        let taken = (*time, std::mem::take(id));
        self.head += 1;
        self.len -= 1;
        if self.head == BLOCK || self.len == 0 {
            self.blocks.pop_front();
            self.head = 0;
        }
        Some(taken)
    }

    fn iter(&self) -> impl Iterator<Item = &(Time, Id)> {
        self.blocks.iter().flatten().skip(self.head)
    }
}

/// The terminal ids of one upsert operator on one worker.
#[derive(Debug, Default)]
pub struct Tombstones {
    /// `(expiry time, id)`, in the order they were remembered (which is expiry order while the
    /// dataflow time only grows).
    queue: Blocks,
    /// How many entries have left the queue's front since the set began, modulo 2^32: the index
    /// holds positions counted the same way, so that popping the front moves nothing. Four bytes
    /// a position, where a queue holds far fewer than 2^32 ids.
    popped: u32,
    /// Queue positions (modulo 2^32), found by the hash of the id at each.
    index: HashTable<u32>,
}

/// The entry of `queue` at position `at`, with `popped` entries gone from its front.
fn at(queue: &Blocks, popped: u32, at: u32) -> &(Time, Id) {
    queue.get(at.wrapping_sub(popped) as usize)
}

impl Tombstones {
    /// The number of ids remembered.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.queue.len() == 0
    }

    /// Whether `id` is remembered.
    pub fn contains(&self, id: &Id) -> bool {
        if self.is_empty() {
            // An upsert whose ids never end (riders) asks this for every event: no hash then.
            return false;
        }
        let (queue, popped) = (&self.queue, self.popped);
        self.index
            .find(hash(id), |&p| at(queue, popped, p).1 == *id)
            .is_some()
    }

    /// Remembers `id` until `expires`; an id already remembered keeps its first expiry (a terminal
    /// state absorbs every later event, so it cannot end twice).
    pub fn insert(&mut self, expires: Time, id: Id) {
        let position = self.popped.wrapping_add(self.queue.len() as u32);
        let (queue, popped) = (&self.queue, self.popped);
        let entry = self.index.entry(
            hash(&id),
            |&p| at(queue, popped, p).1 == id,
            |&p| hash(&at(queue, popped, p).1),
        );
        if let Entry::Vacant(vacant) = entry {
            vacant.insert(position);
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
            if let Ok(entry) = self.index.find_entry(hash(&id), |&p| p == front) {
                entry.remove();
            }
            self.popped = self.popped.wrapping_add(1);
            forgotten += 1;
        }
        if self.index.capacity() > 4 * self.queue.len().max(64) {
            // A burst of ends has expired: give the index's room back rather than hold it for
            // good (the queue gives its blocks back as they empty).
            let (queue, popped) = (&self.queue, self.popped);
            self.index
                .shrink_to(2 * queue.len(), |&p| hash(&at(queue, popped, p).1));
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

    /// Against a plain map over a random sequence of inserts and expiries (the queue crossing
    /// its blocks), from a fresh set and from one whose positions wrap around 2^32 on the way.
    #[test]
    fn agrees_with_a_map() {
        agrees_from(0);
        agrees_from(u32::MAX - 5_000);
    }

    fn agrees_from(popped: u32) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut set = Tombstones {
            popped,
            ..Tombstones::default()
        };
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
        // The positions did wrap, when they started near the end.
        assert!(popped == 0 || set.popped < popped, "{}", set.popped);
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
