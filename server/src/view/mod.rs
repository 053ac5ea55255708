//! The serving view: every process keeps the latest district counts and rider snapshots in plain
//! maps, applied one complete dataflow time at a time, so that HTTP answers are map reads on the
//! request's own thread, never a round trip to the workers.
//!
//! - **Fed by the dataflow.** The per-time changes that also go to the changelog (one final value or
//!   removal per key and time, see `stages::changes_per_time`) are sent to the first worker of
//!   every process, which hands each complete time to the process's [`ViewApplier`] thread. Every
//!   process thus holds all keys, and answers any key without asking another process.
//! - **Consistent.** Changes are buffered until the feed's frontier passes their time; each
//!   frontier step makes one new version in O(changes), the old version untouched (the counts and
//!   the riders by district in persistent maps; the riders' snapshots in one map that every version
//!   shares, each value marked with the version that wrote it: [`versions`]) and publishes it with one
//!   atomic store. Changes at the frontier's own time are applied ahead to the next version,
//!   unpublished until that time completes. A read loads one version: exactly the input up to one
//!   `as_of`, which never goes back.
//! - **One view type, two sources.** The live view is fed by the dataflow ([`feed`]). Until it is
//!   ready, a stale view of the same type answers ([`StaleView`]): filled from the restored
//!   checkpoint ([`ServingView::seed`], the dataflow's own rules applied to its state) plus the
//!   changelog records written after the checkpoint's cut, or from the changelog alone, then
//!   following the changelog. `stale` is a property of a view's contents, not a code path: every
//!   answer is read and rendered the same way.

use std::sync::{Arc, Mutex, MutexGuard};

use arc_swap::ArcSwap;

use dongflow_connectors::Id;
use dongflow_dataflow::districts::DistrictId;
use dongflow_dataflow::types::{Change, DistrictCounts, Snapshot, Time};
use serde::{Deserialize, Serialize};

use crate::query::{Answer, AnswerBody, Query};
use crate::recovery::Restored;

mod feed;
pub mod history;
mod riders;
mod seed;
mod stale;
mod versions;

pub use feed::{attach_view, ViewApplier, ViewFeed};
use history::{History, Recorded, Version};
use riders::Riders;
use seed::{rider_changes, CheckpointRiders};
pub use stale::{StaleSource, StaleView};

/// One change to the view: a district's counts or a rider's snapshot at a time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, PartialOrd)]
pub enum ViewChange {
    /// A district's counts (`None`: all zero).
    District(Change<DistrictId, DistrictCounts>),
    /// A rider's snapshot (`None`: off shift).
    Rider(Change<Id, Arc<Snapshot>>),
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

/// A persistent hash map with a fast hash (FxHash, as the dataflow's state uses), for the view's
/// maps keyed by district (a few hundred entries). The riders themselves are in
/// [`riders::Riders`].
type FastMap<K, V> =
    imbl::GenericHashMap<K, V, rustc_hash::FxBuildHasher, imbl::shared_ptr::DefaultSharedPtr>;

/// One version of the view: everything at one `as_of`. Cloning is O(1) (persistent maps share
/// their structure), so each complete time makes a new version without copying the old one.
#[derive(Clone, Debug, Default)]
struct Maps {
    /// The dataflow time the maps reflect exactly; 0 before the first complete time.
    as_of: Time,
    /// Whether the contents come from the changelog (and a checkpoint) rather than the live state.
    stale: bool,
    /// Districts with any nonzero count.
    districts: imbl::OrdMap<DistrictId, DistrictCounts>,
    /// Riders on shift, and by district.
    riders: Riders,
}

impl Maps {
    /// The next version, for the writer to change.
    fn next_version(&self) -> Maps {
        Maps {
            riders: self.riders.next_version(),
            ..self.clone()
        }
    }

    /// Applies one change; with `record`, says what it recorded, for feeds (a copy of the counts,
    /// or another reference to the snapshot).
    fn apply(&mut self, change: ViewChange, record: bool) -> Option<Recorded> {
        match change {
            ViewChange::District(c) => {
                match c.value {
                    Some(counts) => {
                        self.districts.insert(c.key, counts);
                    }
                    None => {
                        self.districts.remove(&c.key);
                    }
                }
                record.then_some(Recorded::District(c.key, c.value))
            }
            ViewChange::Rider(c) => {
                let recorded = record.then(|| Recorded::Rider(c.key.clone(), c.value.clone()));
                self.riders.set(c.key, c.value);
                recorded
            }
        }
    }
}

/// The writer's side of a view: the next version while changes are applied ahead to it, and what
/// they changed, for the history.
#[derive(Debug, Default)]
struct Writing {
    next: Option<Maps>,
    recorded: Vec<Recorded>,
    /// Some change of `next` was applied while no feed had asked for versions, so `recorded`
    /// does not hold all of them (recording every change of a restored checkpoint that no feed
    /// reads cost more than applying it).
    unrecorded: bool,
}

impl Writing {
    /// Applies `changes` to `next`, recording them when the history is recorded.
    fn apply(
        &mut self,
        next: &mut Maps,
        changes: impl IntoIterator<Item = ViewChange>,
        record: bool,
    ) {
        self.unrecorded |= !record;
        for change in changes {
            self.recorded.extend(next.apply(change, record));
        }
    }
}

/// The latest complete state, shared by the worker that applies it and the threads that read it.
///
/// Readers load the current version with one atomic operation, never waiting for the writer to
/// finish a version. Reading a rider's snapshot locks one of 64 shards of the riders for that one
/// lookup, as the writer does for one write, so a reader waits at most for one key's write (or for
/// another reader paused inside its lookup).
#[derive(Debug)]
pub struct ServingView {
    maps: ArcSwap<Maps>,
    /// Serialises writers, and holds the next version while changes of a time not yet complete
    /// are applied ahead to it (see [`ServingView::prepare`]).
    writer: Mutex<Writing>,
    /// Recent versions, for push feeds (recorded once a feed subscribes).
    history: Mutex<History>,
    /// Says each new version's `as_of` to the feeds waiting for one.
    notify: tokio::sync::watch::Sender<Time>,
}

impl ServingView {
    fn with(maps: Maps) -> Arc<Self> {
        Arc::new(Self {
            maps: ArcSwap::from_pointee(maps),
            writer: Mutex::default(),
            history: Mutex::default(),
            notify: tokio::sync::watch::Sender::new(0),
        })
    }

    /// An empty live view (no state yet).
    pub fn new() -> Arc<Self> {
        Self::with(Maps::default())
    }

    /// An empty stale view: its answers say `stale: true`.
    pub fn new_stale() -> Arc<Self> {
        Self::with(Maps {
            stale: true,
            ..Maps::default()
        })
    }

    /// Lets the contents go: it answers nothing from now on, and its history is forgotten.
    pub fn release(&self) {
        let mut writing = self.write();
        *writing = Writing::default();
        let stale = self.maps.load().stale;
        self.history().clear(0);
        self.maps.store(Arc::new(Maps {
            stale,
            ..Maps::default()
        }));
        self.notify.send_replace(0);
    }

    fn history(&self) -> MutexGuard<'_, History> {
        self.history.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes on every new version from now on, and records versions for [`ServingView::since`]
    /// from the current one on.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Time> {
        let rx = self.notify.subscribe();
        let mut history = self.history();
        history.record_from(self.as_of());
        rx
    }

    /// The versions after `as_of` that changed anything, oldest first; `None` when the view no
    /// longer holds all of them (see [`history`]).
    pub fn since(&self, as_of: Time) -> Option<Vec<Arc<Version>>> {
        self.history().since(as_of)
    }

    /// Versions and changes held for feeds.
    pub fn held(&self) -> (usize, usize) {
        self.history().held()
    }

    /// Whether the view's contents come from the changelog (and a checkpoint).
    pub fn stale(&self) -> bool {
        self.maps.load().stale
    }

    /// Every district and rider the view holds, each as `district` or `rider` says.
    pub fn entries<D, R>(
        &self,
        district: impl Fn(DistrictId, &DistrictCounts) -> D,
        rider: impl Fn(&Id, &Snapshot) -> R,
    ) -> (Vec<D>, Vec<R>) {
        let maps = self.maps.load();
        let districts = maps
            .districts
            .iter()
            .map(|(d, c)| district(*d, c))
            .collect();
        let riders = maps.riders.iter().map(|(r, s)| rider(&r, &s)).collect();
        (districts, riders)
    }

    fn write(&self) -> MutexGuard<'_, Writing> {
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
        let mut next = writing
            .next
            .take()
            .unwrap_or_else(|| current.next_version());
        // Held no longer than needed: once shown, the next version lets go of what this one hid.
        drop(current);
        let record = self.history().recording();
        writing.apply(&mut next, changes, record);
        let recorded = std::mem::take(&mut writing.recorded);
        let unrecorded = std::mem::take(&mut writing.unrecorded);
        next.as_of = as_of;
        // Held and shown under the history's lock, which a feed subscribes under: a feed either
        // subscribed before (and finds this version held) or sees these maps as its start.
        let mut history = self.history();
        if history.recording() {
            match unrecorded {
                // A feed subscribed while this version was applied ahead unrecorded: it cannot be
                // resumed across this version, so nothing before it is offered (a fresh snapshot).
                true => history.clear(as_of),
                false => history.push(Version::of(recorded, as_of)),
            }
        }
        self.maps.store(Arc::new(next));
        drop(history);
        // What the version before hid is let go as soon as no reader holds that version.
        self.maps.load().riders.let_go();
        self.notify.send_replace(as_of);
    }

    /// Applies changes of the earliest time not yet complete to the next version, without showing
    /// them: the next [`ServingView::advance`] does, once their time is complete. Every earlier time
    /// must have been advanced through (each key changes once per time, so the order of changes
    /// within a time does not matter). A large time, such as a restored checkpoint, is thus applied
    /// while the dataflow still works on it, instead of after.
    pub fn prepare(&self, changes: impl IntoIterator<Item = ViewChange>) {
        self.ahead(|writing, next, record| writing.apply(next, changes, record));
    }

    /// Changes the next version with `f` (given whether the history records).
    fn ahead(&self, f: impl FnOnce(&mut Writing, &mut Maps, bool)) {
        let mut writing = self.write();
        let mut next = writing
            .next
            .take()
            .unwrap_or_else(|| self.maps.load().next_version());
        let record = self.history().recording();
        f(&mut writing, &mut next, record);
        writing.next = Some(next);
    }

    /// Applies a restored checkpoint, at its time, to the next version like
    /// [`ServingView::prepare`]: into a view without riders as its base, answered from the
    /// checkpoint's rows (see [`seed`]), else as changes. Its riders are not recorded for feeds
    /// (a feed that subscribed meanwhile gets a fresh snapshot).
    pub fn seed(&self, restored: &Arc<Restored>) {
        let (riders, districts) = CheckpointRiders::of(restored);
        self.ahead(|writing, next, record| {
            match next.riders.is_blank() {
                true => {
                    next.riders.fill(riders);
                    writing.unrecorded = true;
                }
                false => writing.apply(next, rider_changes(&riders, restored.time), record),
            }
            writing.apply(next, districts, record);
        });
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
            // A snapshot made from a checkpoint's row is this answer's own: not copied again.
            Query::Rider(id) => AnswerBody::Rider(maps.riders.get(id).map(Arc::unwrap_or_clone)),
            Query::RidersOf(d) => AnswerBody::Riders(
                maps.riders
                    .of_district(*d)
                    .map(|(id, s)| (id.clone(), Arc::unwrap_or_clone(s)))
                    .collect(),
            ),
        };
        Some(Answer {
            as_of: maps.as_of,
            stale: maps.stale,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recovery::Restored;
    use dongflow_connectors::{Coord, DeliveryStatus, RiderStatus};
    use dongflow_dataflow::stages::DeliveryState;
    use dongflow_dataflow::types::{DeliveryBrief, DeliveryRow, RiderRow};
    use dongflow_dataflow::upsert::StateSnapshot;

    fn rider(status: RiderStatus, district: DistrictId, ts: u64) -> RiderRow {
        RiderRow {
            status,
            rider_type: None,
            location: Some(Coord {
                lat: 37.5,
                lon: 127.0,
            })
            .into(),
            district,
            ts,
        }
    }

    fn delivery(status: DeliveryStatus, rider: Option<&str>, pickup: DistrictId) -> DeliveryState {
        DeliveryState::Live(DeliveryRow {
            status,
            pickup_district: pickup,
            rider_id: rider.map(Id::from).into(),
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
            value: value.map(Arc::new),
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
    fn changes_are_recorded_only_for_feeds_and_a_version_applied_unrecorded_is_not_resumed() {
        let view = ServingView::new();
        view.advance([rider_change("r-1", Some(snapshot(3, &[])), 10)], 10);
        assert_eq!(view.held(), (0, 0), "nothing recorded before a feed asks");
        // A time applied ahead before any feed asked, then a feed subscribes before it completes.
        view.prepare([rider_change("r-2", Some(snapshot(3, &[])), 11)]);
        let _feed = view.subscribe();
        view.advance([rider_change("r-3", Some(snapshot(4, &[])), 11)], 11);
        assert_eq!(
            view.since(10),
            None,
            "version 11 lacks r-2's change: a feed at 10 gets a fresh snapshot"
        );
        assert_eq!(view.since(11).map(|v| v.len()), Some(0));
        // Recorded from then on, whole.
        view.prepare([rider_change("r-1", None, 12)]);
        view.advance([rider_change("r-2", Some(snapshot(4, &[])), 12)], 12);
        let since = view.since(11).expect("held");
        assert_eq!(since.len(), 1);
        assert_eq!(since[0].riders.len(), 2, "{:?}", since[0]);
    }

    #[test]
    fn a_stale_view_seeded_from_a_checkpoint_has_its_snapshots_and_counts() {
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
                ..StateSnapshot::default()
            },
            deliveries: StateSnapshot {
                time: 500,
                entries: deliveries,
                expiry: Vec::new(),
                ..StateSnapshot::default()
            },
            offsets: Default::default(),
            published: None,
            cut: None,
            partial: false,
        };
        let view = ServingView::new_stale();
        assert_eq!(
            view.answer(&Query::Districts),
            None,
            "nothing before it is seeded"
        );
        view.seed(&Arc::new(restored));
        view.advance([], 500);
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
        view.release();
        assert_eq!(view.answer(&Query::Districts), None);
    }
}
