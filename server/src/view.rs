//! The serving view: every process keeps the latest district counts and rider snapshots in plain
//! maps, applied one complete dataflow time at a time, so that HTTP answers are map reads on the
//! request's own thread, never a round trip to the workers.
//!
//! - **Fed by the dataflow.** The per-time changes that also go to the changelog (one final value or
//!   removal per key and time, see `stages::changes_per_time`) are sent to the first worker of
//!   every process, which hands each complete time to the process's [`ViewApplier`] thread. Every
//!   process thus holds all keys, and answers any key without asking another process.
//! - **Consistent.** Changes are buffered until the feed's frontier passes their time; each
//!   frontier step makes one new version of the maps (persistent maps: O(changes), the old version
//!   untouched) and publishes it with one atomic store. Changes at the frontier's own time are
//!   applied ahead to the next version, unpublished until that time completes. A read loads one
//!   version: exactly the input up to one `as_of`, which never goes back, and it never waits.
//! - **A checkpoint's view.** [`CheckpointView`] indexes a restored checkpoint's upsert state and
//!   answers from it (`stale`) the snapshots and counts the dataflow will compute from it, so a
//!   restarting process answers as soon as it has loaded its checkpoint, before the dataflow has
//!   taken the state in.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

use dongflow_connectors::Id;
use dongflow_dataflow::build::Changelogs;
use dongflow_dataflow::districts::DistrictId;
use dongflow_dataflow::stages::DeliveryState;
use dongflow_dataflow::types::{Change, DeliveryBrief, DistrictCounts, Snapshot, Time};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Concat;

use crate::checkpoint::Restored;
use crate::query::{Answer, AnswerBody, Query};

/// One change to the view: a district's counts or a rider's snapshot at a time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, PartialOrd)]
pub enum ViewChange {
    /// A district's counts (`None`: all zero).
    District(Change<DistrictId, DistrictCounts>),
    /// A rider's snapshot (`None`: off shift).
    Rider(Change<Id, Snapshot>),
}

impl ViewChange {
    /// The dataflow time of the change.
    pub fn time(&self) -> Time {
        match self {
            ViewChange::District(c) => c.time,
            ViewChange::Rider(c) => c.time,
        }
    }
}

/// One version of the view: everything at one `as_of`. Cloning is O(1) (persistent maps share
/// their structure), so each complete time makes a new version without copying the old one.
#[derive(Clone, Debug, Default)]
struct Maps {
    /// The dataflow time the maps reflect exactly; 0 before the first complete time.
    as_of: Time,
    /// Districts with any nonzero count.
    districts: imbl::OrdMap<DistrictId, DistrictCounts>,
    /// Riders on shift.
    riders: imbl::HashMap<Id, Arc<Snapshot>>,
    /// Riders on shift by district, sorted by id.
    by_district: imbl::HashMap<DistrictId, imbl::OrdSet<Id>>,
}

impl Maps {
    fn apply(&mut self, change: ViewChange) {
        match change {
            ViewChange::District(c) => match c.value {
                Some(counts) => {
                    self.districts.insert(c.key, counts);
                }
                None => {
                    self.districts.remove(&c.key);
                }
            },
            ViewChange::Rider(c) => {
                let new_district = c.value.as_ref().map(|s| s.rider.district);
                let old = match c.value {
                    Some(snapshot) => self.riders.insert(c.key.clone(), Arc::new(snapshot)),
                    None => self.riders.remove(&c.key),
                };
                let old_district = old.map(|s| s.rider.district);
                // Most changes are pings within a district: the district's list stays as it is.
                if old_district == new_district {
                    return;
                }
                if let Some(district) = old_district {
                    if let Some(set) = self.by_district.get_mut(&district) {
                        set.remove(&c.key);
                        if set.is_empty() {
                            self.by_district.remove(&district);
                        }
                    }
                }
                if let Some(district) = new_district {
                    self.by_district.entry(district).or_default().insert(c.key);
                }
            }
        }
    }
}

/// The latest complete state, shared by the worker that applies it and the threads that read it.
///
/// Readers load the current version with one atomic operation and never wait: not for the writer,
/// and not for another reader that the scheduler has paused (which, with a reader-writer lock,
/// would hold up the writer and so every reader queued behind it).
#[derive(Debug, Default)]
pub struct ServingView {
    maps: ArcSwap<Maps>,
    /// Serialises writers, and holds the next version while changes of a time not yet complete
    /// are applied ahead to it (see [`ServingView::prepare`]).
    writer: Mutex<Option<Maps>>,
}

impl ServingView {
    /// An empty live view (no state yet).
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn write(&self) -> MutexGuard<'_, Option<Maps>> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The dataflow time the view reflects; 0 before the first complete time.
    pub fn as_of(&self) -> Time {
        self.maps.load().as_of
    }

    /// Riders on shift in the view.
    pub fn riders(&self) -> usize {
        self.maps.load().riders.len()
    }

    /// Applies every change of the times up to `as_of` (all of them complete) and moves to `as_of`,
    /// as one new version. An `as_of` behind the view's is ignored, so the view never goes back.
    /// Changes applied ahead with [`ServingView::prepare`] are part of it.
    pub fn advance(&self, changes: impl IntoIterator<Item = ViewChange>, as_of: Time) {
        let mut writing = self.write();
        let current = self.maps.load_full();
        if as_of < current.as_of {
            return;
        }
        let mut next = writing.take().unwrap_or_else(|| Maps::clone(&current));
        for change in changes {
            next.apply(change);
        }
        next.as_of = as_of;
        self.maps.store(Arc::new(next));
    }

    /// Applies changes of the earliest time not yet complete to the next version, without showing
    /// them: the next [`ServingView::advance`] does, once their time is complete. Every earlier time
    /// must have been advanced through (each key changes once per time, so the order of changes
    /// within a time does not matter). A large time, such as a restored checkpoint, is thus applied
    /// while the dataflow still works on it, instead of after.
    pub fn prepare(&self, changes: impl IntoIterator<Item = ViewChange>) {
        let mut writing = self.write();
        let next = writing.get_or_insert_with(|| Maps::clone(&self.maps.load_full()));
        for change in changes {
            next.apply(change);
        }
    }

    /// The answer to `query` at the view's `as_of`; `None` before the first complete time.
    pub fn answer(&self, query: &Query) -> Option<Answer> {
        let maps = self.maps.load();
        if maps.as_of == 0 {
            return None;
        }
        let body = match query {
            Query::District(d) => {
                AnswerBody::District(maps.districts.get(d).copied().unwrap_or_default())
            }
            Query::Districts => {
                AnswerBody::Districts(maps.districts.iter().map(|(d, c)| (*d, *c)).collect())
            }
            Query::Rider(id) => AnswerBody::Rider(maps.riders.get(id).map(|s| (**s).clone())),
            Query::RidersOf(d) => AnswerBody::Riders(
                maps.by_district
                    .get(d)
                    .into_iter()
                    .flatten()
                    .filter_map(|id| Some((id.clone(), (**maps.riders.get(id)?).clone())))
                    .collect(),
            ),
        };
        Some(Answer {
            as_of: maps.as_of,
            stale: false,
            body,
        })
    }
}

/// A restored checkpoint's state, indexed to answer queries (`stale`) while the dataflow takes the
/// same state in: the snapshots and counts the dataflow will compute from it (CONTRACT section 3),
/// computed directly. Nothing changes it after it is built, so it needs no persistent maps: plain
/// indexes over the checkpoint's own rows (its riders are sorted by id, see
/// [`Restored::riders`]), and snapshots made when asked.
#[derive(Debug)]
struct Frozen {
    restored: Arc<Restored>,
    /// Districts with any nonzero count.
    districts: BTreeMap<DistrictId, DistrictCounts>,
    /// Riders on shift.
    on_shift: usize,
    /// Active deliveries per rider on shift, sorted by id.
    active: HashMap<Id, Vec<DeliveryBrief>>,
    /// Riders on shift by district: positions in `restored.riders.entries`, so sorted by id.
    by_district: HashMap<DistrictId, Vec<usize>>,
}

impl Frozen {
    /// One pass over the deliveries and one over the riders: the riders are sorted by id already,
    /// so a rider is found by binary search and each district's list comes out sorted.
    fn build(restored: Arc<Restored>) -> Frozen {
        let mut districts: BTreeMap<DistrictId, DistrictCounts> = BTreeMap::new();
        let mut active: HashMap<Id, Vec<DeliveryBrief>> = HashMap::new();
        for (id, state) in &restored.deliveries.entries {
            let DeliveryState::Live(row) = state else {
                continue;
            };
            if row.is_waiting() {
                districts
                    .entry(row.pickup_district)
                    .or_default()
                    .waiting_deliveries += 1;
            }
            if let (true, Some(rider)) = (row.is_active(), &row.rider_id) {
                active
                    .entry(rider.clone())
                    .or_default()
                    .push(DeliveryBrief {
                        delivery_id: id.clone(),
                        status: row.status,
                        vehicle: row.vehicle.clone(),
                        ts: row.ts,
                    });
            }
        }
        let entries = &restored.riders.entries;
        debug_assert!(
            entries.is_sorted_by(|a, b| a.0 <= b.0),
            "a restored checkpoint's riders are sorted by id"
        );
        let mut by_district: HashMap<DistrictId, Vec<usize>> = HashMap::new();
        let mut on_shift = 0;
        for (i, (id, row)) in entries.iter().enumerate() {
            if !row.status.on_shift() {
                continue;
            }
            on_shift += 1;
            let n = active.get_mut(id).map_or(0, |list| {
                list.sort_by(|a, b| a.delivery_id.cmp(&b.delivery_id));
                list.len() as u64
            });
            let counts = districts.entry(row.district).or_default();
            counts.riders_on_shift += 1;
            counts.active_deliveries += n;
            counts.riders_delivering += u64::from(n > 0);
            by_district.entry(row.district).or_default().push(i);
        }
        // Deliveries of riders who are not on shift count nowhere: they are never asked for, as
        // only riders on shift are found.
        // Every district entry was made by counting something: none is all zero.
        Frozen {
            restored,
            districts,
            on_shift,
            active,
            by_district,
        }
    }

    /// Where rider `id` is in the entries, if on shift.
    fn find(&self, id: &Id) -> Option<usize> {
        let entries = &self.restored.riders.entries;
        let i = entries.binary_search_by(|(e, _)| e.cmp(id)).ok()?;
        entries[i].1.status.on_shift().then_some(i)
    }

    fn snapshot(&self, i: usize) -> (Id, Snapshot) {
        let (id, row) = &self.restored.riders.entries[i];
        let deliveries = self.active.get(id).cloned().unwrap_or_default();
        let rider = row.clone();
        (id.clone(), Snapshot { rider, deliveries })
    }

    fn answer(&self, query: &Query) -> AnswerBody {
        match query {
            Query::District(d) => {
                AnswerBody::District(self.districts.get(d).copied().unwrap_or_default())
            }
            Query::Districts => {
                AnswerBody::Districts(self.districts.iter().map(|(d, c)| (*d, *c)).collect())
            }
            Query::Rider(id) => AnswerBody::Rider(self.find(id).map(|i| self.snapshot(i).1)),
            Query::RidersOf(d) => AnswerBody::Riders(
                self.by_district
                    .get(d)
                    .into_iter()
                    .flatten()
                    .map(|&i| self.snapshot(i))
                    .collect(),
            ),
        }
    }
}

/// The view of a restored checkpoint, answering with `stale: true` and the checkpoint's time as
/// `as_of` once [`CheckpointView::fill`] has indexed it, until the live state takes over and
/// [`CheckpointView::clear`] lets it go.
#[derive(Debug, Default)]
pub struct CheckpointView {
    frozen: arc_swap::ArcSwapOption<Frozen>,
    /// Set once filled, and kept after it is let go.
    filled: std::sync::atomic::AtomicBool,
}

impl CheckpointView {
    /// An empty view: it answers nothing until filled.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Indexes `restored` and answers from it from then on.
    pub fn fill(&self, restored: Arc<Restored>) {
        self.frozen.store(Some(Arc::new(Frozen::build(restored))));
        self.filled
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether it has been filled (it may have been let go since).
    pub fn filled(&self) -> bool {
        self.filled.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Lets the checkpoint go (the live state has taken over).
    pub fn clear(&self) {
        self.frozen.store(None);
    }

    /// The checkpoint's time once filled; 0 before (and after it is let go).
    pub fn as_of(&self) -> Time {
        self.frozen.load().as_ref().map_or(0, |f| f.restored.time)
    }

    /// Riders on shift in the view.
    pub fn riders(&self) -> usize {
        self.frozen.load().as_ref().map_or(0, |f| f.on_shift)
    }

    /// The answer to `query` from the checkpoint, `stale`; `None` unless filled.
    pub fn answer(&self, query: &Query) -> Option<Answer> {
        let frozen = self.frozen.load_full()?;
        Some(Answer {
            as_of: frozen.restored.time,
            stale: true,
            body: frozen.answer(query),
        })
    }
}

/// What the leading worker hands the thread that applies it.
#[derive(Debug)]
enum Fed {
    /// Changes of the earliest time not yet complete, to apply ahead ([`ServingView::prepare`]).
    Ahead(Vec<ViewChange>),
    /// The rest of the changes of the times up to `as_of`, all complete now.
    Complete(Vec<ViewChange>, Time),
}

/// The thread of a process that applies complete times to its serving view, off the workers: a
/// worker only hands over what it received, so applying never holds up the dataflow. It ends
/// once every [`ViewFeed`] is dropped (the workers have stopped).
#[derive(Debug)]
pub struct ViewApplier {
    feed: Option<ViewFeed>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where a process's leading worker sends complete times.
#[derive(Clone, Debug)]
pub struct ViewFeed(crossbeam_channel::Sender<Fed>);

impl ViewApplier {
    /// Starts the thread that applies to `view`.
    pub fn start(view: Arc<ServingView>) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::unbounded::<Fed>();
        let thread = std::thread::Builder::new()
            .name("dongflow-view".into())
            .spawn(move || {
                let mut next: Option<Fed> = None;
                while let Some(fed) = next.take().or_else(|| rx.recv().ok()) {
                    match fed {
                        Fed::Ahead(changes) => view.prepare(changes),
                        Fed::Complete(mut changes, mut as_of) => {
                            // Completions queued up meanwhile become one version: fewer, larger
                            // steps. Changes applied ahead wait for the version before them.
                            while let Ok(more) = rx.try_recv() {
                                match more {
                                    Fed::Complete(more, later) => {
                                        changes.extend(more);
                                        as_of = later;
                                    }
                                    ahead => {
                                        next = Some(ahead);
                                        break;
                                    }
                                }
                            }
                            view.advance(changes, as_of);
                        }
                    }
                }
            })?;
        Ok(Self {
            feed: Some(ViewFeed(tx)),
            thread: Some(thread),
        })
    }

    /// The feed for the leading worker (the thread ends once every copy is dropped).
    pub fn take_feed(&mut self) -> Option<ViewFeed> {
        self.feed.take()
    }

    /// Waits until everything fed has been applied.
    pub fn join(mut self) {
        self.feed = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Feeds a process's serving view from the dataflow's per-time changes: every change goes to the
/// first worker of every process (one copy per process, moved, not cloned, within one), which
/// hands the changes of each complete time to the process's [`ViewApplier`]. Every worker builds the
/// same operators, as timely requires; only leaders hold a `feed`.
pub fn attach_view(
    streams: &Changelogs<'_>,
    feed: Option<ViewFeed>,
    workers: usize,
    processes: usize,
) {
    let districts = streams.districts.clone().map(ViewChange::District);
    let riders = streams.riders.clone().map(ViewChange::Rider);
    let leader = move |process: usize| (process * workers) as u64;
    let to_leaders = districts.concat(riders).flat_map(move |change| {
        // One copy per process; the last one is the change itself.
        let copies = (1..processes).map({
            let change = change.clone();
            move |p| (p, change.clone())
        });
        copies.chain(std::iter::once((0, change)))
    });
    let mut pending: BTreeMap<Time, Vec<ViewChange>> = BTreeMap::new();
    let mut published: Time = 0;
    to_leaders.sink(
        Exchange::new(move |(p, _): &(usize, ViewChange)| leader(*p)),
        "Serve: View",
        move |(input, frontier)| {
            input.for_each(|_, changes| {
                for (_, change) in changes.drain(..) {
                    pending.entry(change.time()).or_default().push(change);
                }
            });
            let Some(feed) = &feed else {
                return;
            };
            // Every time before the frontier is complete: no change for it is still on its way.
            // An empty frontier (the dataflow has finished) completes every time.
            let (rest, as_of) = match frontier.frontier().first() {
                Some(&next) => (pending.split_off(&next), next.saturating_sub(1)),
                None => (
                    BTreeMap::new(),
                    pending
                        .keys()
                        .next_back()
                        .copied()
                        .unwrap_or(0)
                        .max(published),
                ),
            };
            // `split_off` left the complete times in `pending` and returned the rest.
            let done = std::mem::replace(&mut pending, rest);
            if as_of > published || !done.is_empty() {
                published = published.max(as_of);
                // The applier is gone only when the process is stopping.
                let _ = feed
                    .0
                    .send(Fed::Complete(done.into_values().flatten().collect(), as_of));
            }
            // Every time before the frontier has gone: the frontier's own changes can be applied
            // ahead, to be shown when it completes.
            if let Some(early) = frontier
                .frontier()
                .first()
                .and_then(|next| pending.remove(next))
            {
                let _ = feed.0.send(Fed::Ahead(early));
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use dongflow_connectors::{Coord, DeliveryStatus, RiderStatus};
    use dongflow_dataflow::types::{DeliveryRow, RiderRow};
    use dongflow_dataflow::upsert::StateSnapshot;

    fn rider(status: RiderStatus, district: DistrictId, ts: u64) -> RiderRow {
        RiderRow {
            status,
            rider_type: None,
            location: Some(Coord {
                lat: 37.5,
                lon: 127.0,
            }),
            district,
            ts,
        }
    }

    fn delivery(status: DeliveryStatus, rider: Option<&str>, pickup: DistrictId) -> DeliveryState {
        DeliveryState::Live(DeliveryRow {
            status,
            delivery_type: None,
            pickup: None,
            pickup_district: pickup,
            dropoff: None,
            rider_id: rider.map(Id::from),
            vehicle: None,
            ts: 5,
        })
    }

    fn snapshot(district: DistrictId, deliveries: &[&str]) -> Snapshot {
        Snapshot {
            rider: rider(RiderStatus::OnShift, district, 1),
            deliveries: deliveries
                .iter()
                .map(|d| DeliveryBrief {
                    delivery_id: Id::from(*d),
                    status: DeliveryStatus::Assigned,
                    vehicle: None,
                    ts: 5,
                })
                .collect(),
        }
    }

    fn rider_change(id: &str, value: Option<Snapshot>, time: Time) -> ViewChange {
        ViewChange::Rider(Change {
            key: Id::from(id),
            value,
            time,
        })
    }

    fn ids(answer: Option<Answer>) -> Vec<String> {
        match answer.map(|a| a.body) {
            Some(AnswerBody::Riders(r)) => r.into_iter().map(|(id, _)| id.to_string()).collect(),
            other => panic!("not a rider list: {other:?}"),
        }
    }

    #[test]
    fn the_view_moves_one_complete_time_at_a_time_and_never_back() {
        let view = ServingView::new();
        assert_eq!(
            view.answer(&Query::Districts),
            None,
            "no state before the first time"
        );
        view.advance(
            [
                rider_change("r-2", Some(snapshot(3, &[])), 10),
                rider_change("r-1", Some(snapshot(3, &["d-1"])), 10),
                ViewChange::District(Change {
                    key: 3,
                    value: Some(DistrictCounts {
                        riders_on_shift: 2,
                        ..DistrictCounts::default()
                    }),
                    time: 10,
                }),
            ],
            12,
        );
        let a = view.answer(&Query::Districts).expect("state");
        assert_eq!((a.as_of, a.stale), (12, false));
        assert_eq!(ids(view.answer(&Query::RidersOf(3))), ["r-1", "r-2"]);
        // r-1 moves to district 4, r-2 ends its shift, district 3 empties.
        view.advance(
            [
                rider_change("r-1", Some(snapshot(4, &[])), 13),
                rider_change("r-2", None, 14),
                ViewChange::District(Change {
                    key: 3,
                    value: None,
                    time: 14,
                }),
            ],
            14,
        );
        assert_eq!(ids(view.answer(&Query::RidersOf(3))), Vec::<String>::new());
        assert_eq!(ids(view.answer(&Query::RidersOf(4))), ["r-1"]);
        assert_eq!(
            view.answer(&Query::Rider("r-2".into())).map(|a| a.body),
            Some(AnswerBody::Rider(None))
        );
        assert_eq!(
            view.answer(&Query::District(3)).map(|a| a.body),
            Some(AnswerBody::District(DistrictCounts::default()))
        );
        // An older time is ignored: as_of never goes back.
        view.advance([rider_change("r-9", Some(snapshot(4, &[])), 11)], 11);
        assert_eq!(view.as_of(), 14);
        assert_eq!(view.riders(), 1);
    }

    #[test]
    fn changes_applied_ahead_show_only_when_their_time_completes() {
        let view = ServingView::new();
        view.advance([rider_change("r-1", Some(snapshot(3, &[])), 10)], 10);
        view.prepare([rider_change("r-2", Some(snapshot(3, &[])), 11)]);
        view.prepare([rider_change("r-1", None, 11)]);
        assert_eq!(view.as_of(), 10);
        assert_eq!(ids(view.answer(&Query::RidersOf(3))), ["r-1"], "not yet");
        view.advance([rider_change("r-3", Some(snapshot(4, &[])), 11)], 11);
        assert_eq!(view.as_of(), 11);
        assert_eq!(ids(view.answer(&Query::RidersOf(3))), ["r-2"]);
        assert_eq!(ids(view.answer(&Query::RidersOf(4))), ["r-3"]);
        assert_eq!(view.riders(), 2);
        // The next version starts from the one shown.
        view.advance([], 12);
        assert_eq!(view.riders(), 2);
    }

    #[test]
    fn a_checkpoint_view_computes_snapshots_and_counts_from_the_upsert_state() {
        let riders = vec![
            (Id::from("r-1"), rider(RiderStatus::OnShift, 1, 7)),
            (Id::from("r-2"), rider(RiderStatus::ShiftStarted, 1, 7)),
            (Id::from("r-3"), rider(RiderStatus::ShiftEnded, 2, 7)),
            (Id::from("r-4"), rider(RiderStatus::OnShift, 2, 7)),
        ];
        let deliveries = vec![
            // Two active deliveries of r-1, listed out of order.
            (
                Id::from("d-2"),
                delivery(DeliveryStatus::PickedUp, Some("r-1"), 9),
            ),
            (
                Id::from("d-1"),
                delivery(DeliveryStatus::Assigned, Some("r-1"), 9),
            ),
            // Active, but its rider is off shift: counted nowhere.
            (
                Id::from("d-3"),
                delivery(DeliveryStatus::Assigned, Some("r-3"), 9),
            ),
            // Waiting deliveries count where they are picked up.
            (Id::from("d-4"), delivery(DeliveryStatus::Created, None, 2)),
            (
                Id::from("d-5"),
                delivery(DeliveryStatus::Waiting, Some("r-4"), 2),
            ),
            // Ended: nothing.
            (Id::from("d-6"), DeliveryState::Ended { ts: 3 }),
        ];
        let restored = Restored {
            time: 500,
            riders: StateSnapshot {
                time: 500,
                entries: riders,
                expiry: Vec::new(),
            },
            deliveries: StateSnapshot {
                time: 500,
                entries: deliveries,
                expiry: Vec::new(),
            },
            offsets: Default::default(),
            published: None,
        };
        let view = CheckpointView::new();
        assert_eq!(
            view.answer(&Query::Districts),
            None,
            "nothing before it is filled"
        );
        view.fill(Arc::new(restored));
        let all = view.answer(&Query::Districts).expect("filled");
        assert_eq!((all.as_of, all.stale), (500, true));
        let counts = |on, delivering, active, waiting| DistrictCounts {
            riders_on_shift: on,
            riders_delivering: delivering,
            active_deliveries: active,
            waiting_deliveries: waiting,
        };
        assert_eq!(
            all.body,
            AnswerBody::Districts(vec![(1, counts(2, 1, 2, 0)), (2, counts(1, 0, 0, 2))])
        );
        let Some(AnswerBody::Rider(Some(r1))) =
            view.answer(&Query::Rider("r-1".into())).map(|a| a.body)
        else {
            panic!("r-1 is on shift");
        };
        let listed: Vec<&str> = r1
            .deliveries
            .iter()
            .map(|d| d.delivery_id.as_str())
            .collect();
        assert_eq!(listed, ["d-1", "d-2"]);
        assert_eq!(
            view.answer(&Query::Rider("r-3".into())).map(|a| a.body),
            Some(AnswerBody::Rider(None))
        );
        assert_eq!(ids(view.answer(&Query::RidersOf(1))), ["r-1", "r-2"]);
        view.clear();
        assert_eq!(view.answer(&Query::Districts), None);
    }
}
