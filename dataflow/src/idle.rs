//! States that are forgotten once idle for a time to live of their own: a rider whose shift ended
//! and that no event changed since.
//!
//! An idle state shows no rows, so forgetting it changes nothing downstream; what is lost is what
//! the state remembered for a later event (a rider's last known type and location). What must not
//! be lost is the rule that a late event is stale (CONTRACT section 3): a late ping of a forgotten
//! rider would otherwise find no state and start a shift. So the upsert keeps one number per
//! worker, the newest `ts` of any state it forgot ([`Idle::forgotten_through`]), and an event for
//! an id it does not hold with a lower `ts` is stale. A state is forgotten only once its own `ts`
//! is behind the dataflow's time, so that number stays behind the clock: only an event later than
//! the time to live (and older than every forgotten state's last event) can be refused for it.
//!
//! The queue holds `(time it became idle, id)` in time order; an entry whose id changed since is
//! dropped when it comes up, so no map of its own is needed.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use dongflow_records::{Id, Millis};

use crate::types::Time;

/// The idle ids of one upsert operator on one worker, and how late events of forgotten ids are
/// recognized.
#[derive(Debug, Default)]
pub struct Idle {
    /// `(dataflow time the state became idle, id)`, in the order they became idle.
    queue: VecDeque<(Time, Id)>,
    /// Entries that came due while their state's `ts` was ahead of the dataflow's time, by that
    /// `ts`: looked at again once the time has passed it.
    ahead: BinaryHeap<Reverse<(Millis, Time, Id)>>,
    /// How long an idle state is kept, in dataflow time (ms); `None`: for good.
    ttl: Option<Time>,
    /// The newest `ts` of a forgotten state: an event of an id not held with a lower `ts` is stale.
    pub forgotten_through: Millis,
}

impl Idle {
    /// Idle states kept for `ttl` ms (`None`: never forgotten).
    pub fn new(ttl: Option<Time>) -> Self {
        Self {
            queue: VecDeque::new(),
            ahead: BinaryHeap::new(),
            ttl,
            forgotten_through: 0,
        }
    }

    /// Notes that `id` became idle at `since`.
    pub fn push(&mut self, since: Time, id: Id) {
        if self.ttl.is_some() {
            self.queue.push_back((since, id));
        }
    }

    /// The next id idle since `ttl` before `now` or longer, taken off the queue (whether it is
    /// still idle is the caller's to check).
    pub fn pop_due(&mut self, now: Time) -> Option<(Time, Id)> {
        let ttl = self.ttl?;
        if let Some((since, _)) = self.queue.front() {
            if since.saturating_add(ttl) <= now {
                return self.queue.pop_front();
            }
        }
        match self.ahead.peek() {
            Some(Reverse((ts, _, _))) if *ts <= now => {
                self.ahead.pop().map(|Reverse((_, since, id))| (since, id))
            }
            _ => None,
        }
    }

    /// Keeps a due entry whose state's `ts` is ahead of the dataflow's time until the time has
    /// passed that `ts`.
    pub fn wait_for_clock(&mut self, ts: Millis, since: Time, id: Id) {
        self.ahead.push(Reverse((ts, since, id)));
    }

    /// Notes that a state whose last event had `ts` was forgotten.
    pub fn forgot(&mut self, ts: Millis) {
        self.forgotten_through = self.forgotten_through.max(ts);
    }

    /// Whether an event with `ts` for an id that is not held is stale: older than a forgotten
    /// state's last event.
    pub fn is_late(&self, ts: Millis) -> bool {
        ts < self.forgotten_through
    }

    /// The entries held, each as `(time it became idle, id)`.
    pub fn iter(&self) -> impl Iterator<Item = (Time, &Id)> {
        let ahead = self
            .ahead
            .iter()
            .map(|Reverse((_, since, id))| (*since, id));
        self.queue
            .iter()
            .map(|(since, id)| (*since, id))
            .chain(ahead)
    }

    /// The number of entries held (ids that changed since included, until they come up).
    pub fn len(&self) -> usize {
        self.queue.len() + self.ahead.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty() && self.ahead.is_empty()
    }

    /// Returns the queue's room once a burst of entries has left it.
    pub fn give_back_room(&mut self) {
        if self.queue.capacity() > 4 * self.queue.len().max(64) {
            self.queue.shrink_to(2 * self.queue.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_come_due_after_the_ttl_in_order() {
        let mut idle = Idle::new(Some(100));
        idle.push(10, "r-1".into());
        idle.push(20, "r-2".into());
        assert_eq!(idle.pop_due(109), None);
        assert_eq!(idle.pop_due(110), Some((10, "r-1".into())));
        assert_eq!(idle.pop_due(110), None);
        assert_eq!(idle.pop_due(500), Some((20, "r-2".into())));
        assert!(idle.is_empty());
    }

    #[test]
    fn an_entry_waiting_for_the_clock_comes_due_once_the_time_has_passed_its_ts() {
        let mut idle = Idle::new(Some(100));
        idle.wait_for_clock(900, 10, "r-1".into());
        idle.push(20, "r-2".into());
        assert_eq!(idle.len(), 2);
        assert_eq!(idle.pop_due(500), Some((20, "r-2".into())));
        assert_eq!(idle.pop_due(899), None);
        assert_eq!(idle.pop_due(900), Some((10, "r-1".into())));
        assert!(idle.is_empty());
    }

    #[test]
    fn without_a_ttl_nothing_is_queued_or_due() {
        let mut idle = Idle::new(None);
        idle.push(10, "r-1".into());
        assert!(idle.is_empty());
        assert_eq!(idle.pop_due(Time::MAX), None);
    }

    #[test]
    fn only_events_older_than_a_forgotten_state_are_late() {
        let mut idle = Idle::new(Some(100));
        assert!(!idle.is_late(0));
        idle.forgot(50);
        idle.forgot(30);
        assert!(idle.is_late(49));
        assert!(!idle.is_late(50), "an equal ts applies, as for a held id");
    }
}
