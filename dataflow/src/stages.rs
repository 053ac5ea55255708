//! One small function per dataflow stage. [`crate::build`] is the only place that wires them.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use differential_dataflow::{AsCollection, VecCollection};
use dongflow_records::{Coord, DeliveryEvent, Id, Millis, RiderEvent};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::core::OkErr;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::Stream;

use crate::districts::{DistrictId, DistrictIndex, UNASSIGNED};
use crate::types::{
    Change, Contribution, DeliveryBrief, DeliveryRow, Diff, DistrictCounts, OptionalPoint,
    RiderRow, Snapshot, Time,
};
use crate::upsert::{
    give_back_map, keep_updates, upsert, Ignored, Seed, SnapshotSlot, UpdateStash, UpsertCounters,
    UpsertRule, UpsertState,
};

/// District counts, arranged by district.
pub type CountsTrace = TraceAgent<ValSpine<DistrictId, DistrictCounts, Time, Diff>>;

/// An event with the district of its point (rider location, delivery pickup), when it has one.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Enriched<E> {
    /// The event.
    pub event: E,
    /// The district of the event's point; `None` when the event has no point.
    pub district: Option<DistrictId>,
}

/// Events that carry a point to be placed in a district.
pub trait Located {
    /// The point, if the event has one.
    fn point(&self) -> Option<Coord>;
}

impl Located for RiderEvent {
    fn point(&self) -> Option<Coord> {
        self.location
    }
}

impl Located for DeliveryEvent {
    fn point(&self) -> Option<Coord> {
        self.pickup
    }
}

/// Enrichment: looks up each event's point in the district index, on the worker that read it.
///
/// ```
/// use dongflow_dataflow::{districts::DistrictIndex, stages::enrich_with_district};
/// use dongflow_records::{Coord, RiderEvent, RiderStatus};
/// use timely::dataflow::operators::{ToStream, Capture, capture::Extract};
/// use std::sync::Arc;
///
/// let index = Arc::new(DistrictIndex::builtin_seoul());
/// let expected = index.id_of("1168000000"); // 강남구
/// let rx = timely::example(move |scope| {
///     let at = Some(Coord { lat: 37.5089, lon: 127.0631 }); // 코엑스
///     let e = RiderEvent { rider_id: "r-1".into(), status: RiderStatus::OnShift, rider_type: None, location: at, ts: 1 };
///     enrich_with_district(vec![e].to_stream(scope).container::<Vec<_>>(), index).capture()
/// });
/// let out: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).collect();
/// assert_eq!(out[0].district, expected);
/// ```
pub fn enrich_with_district<'s, E: Located + Clone + 'static>(
    events: Stream<'s, Time, Vec<E>>,
    index: Arc<DistrictIndex>,
) -> Stream<'s, Time, Vec<Enriched<E>>> {
    events.map(move |event| {
        let district = event.point().map(|p| index.lookup(p));
        Enriched { event, district }
    })
}

/// The rider upsert rule, which is also the rider snapshot stage (CONTRACT section 3): the state of
/// a rider is its snapshot, its [`RiderRow`] with its active deliveries, so that each rider is held
/// once, in one map entry. Rider events change the row; the delivery upsert's active deliveries,
/// sent to the worker that owns their rider, change the list. For every time it sends on each
/// rider whose snapshot changed (the rider changelog, which the serving view also reads), and the
/// change in what the rider adds to its district's counts. A ping that stays in its district
/// changes the snapshot and no count.
///
/// The active deliveries of a rider with no state (never seen, or forgotten once idle) wait in
/// [`RiderExtra`] until the rider has one.
#[derive(Debug)]
pub struct RiderRule;

/// What the rider stage keeps beside the riders: the active deliveries of riders it holds no
/// state of (sorted by id, never empty). Rare: a delivery assigned to a rider before its first
/// event, or that outlives its rider's idle time to live.
#[derive(Debug, Default)]
pub struct RiderExtra {
    waiting: FxHashMap<Id, Vec<DeliveryBrief>>,
}

impl RiderExtra {
    /// How many riders' deliveries wait here.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Whether none do.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// What the rider stage sends on: a rider's changed snapshot, or a change in the counts.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RiderOut {
    /// The rider's snapshot after the time; `None` once it is off shift.
    Snapshot(Change<Id, Arc<Snapshot>>),
    /// A change in what the rider adds to its district's counts.
    Counts(((DistrictId, Contribution), Time, Diff)),
}

impl RiderRule {
    /// The row after `e`, by CONTRACT section 3: ordered by `ts`, and a field the event does not
    /// name keeps its last known value.
    pub fn apply_row(
        current: Option<&RiderRow>,
        e: Enriched<RiderEvent>,
    ) -> Result<RiderRow, Ignored> {
        if current.is_some_and(|c| e.event.ts < c.ts) {
            return Err(Ignored::Stale);
        }
        let (location, district) = match (e.event.location, current) {
            (Some(at), _) => (Some(at).into(), e.district.unwrap_or(UNASSIGNED)),
            (None, Some(c)) => (c.location, c.district),
            (None, None) => (OptionalPoint::NONE, UNASSIGNED),
        };
        Ok(RiderRow {
            status: e.event.status,
            rider_type: e
                .event
                .rider_type
                .or_else(|| current.and_then(|c| c.rider_type.clone())),
            location,
            district,
            ts: e.event.ts,
        })
    }

    /// Whether a rider in this row may be forgotten once idle, and if so its `ts`: off shift, it
    /// shows nothing, and a new shift starts it again (without the type and location it last
    /// had, once forgotten).
    pub fn idle_row(row: &RiderRow) -> Option<Millis> {
        (!row.status.on_shift()).then_some(row.ts)
    }

    /// The snapshot a rider shows: only while it is on shift.
    fn shown(state: Option<&Arc<Snapshot>>) -> Option<&Arc<Snapshot>> {
        state.filter(|s| s.rider.status.on_shift())
    }
}

impl UpsertRule for RiderRule {
    type Event = Enriched<RiderEvent>;
    type State = Arc<Snapshot>;
    type Saved = RiderRow;
    type Side = DeliveryBrief;
    type Out = RiderOut;
    type Extra = RiderExtra;

    fn id(event: &Self::Event) -> &Id {
        &event.event.rider_id
    }

    fn ts(event: &Self::Event) -> Millis {
        event.event.ts
    }

    fn apply(current: Option<&Arc<Snapshot>>, e: Self::Event) -> Result<Arc<Snapshot>, Ignored> {
        let rider = Self::apply_row(current.map(|s| &s.rider), e)?;
        let deliveries = current.map(|s| s.deliveries.clone()).unwrap_or_default();
        Ok(Arc::new(Snapshot { rider, deliveries }))
    }

    fn is_tombstone(_: &Arc<Snapshot>) -> bool {
        false
    }

    fn idle(state: &Arc<Snapshot>) -> Option<Millis> {
        Self::idle_row(&state.rider)
    }

    fn save(state: &Arc<Snapshot>) -> RiderRow {
        state.rider.clone()
    }

    /// A checkpoint keeps riders alone; their active deliveries come back from the delivery
    /// upsert's own seeds, through the side input.
    fn load(rider: RiderRow) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            rider,
            deliveries: Box::default(),
        })
    }

    fn adopt(state: &mut Arc<Snapshot>, id: &Id, extra: &mut RiderExtra) {
        if let Some(deliveries) = extra.waiting.remove(id) {
            Arc::make_mut(state).deliveries = deliveries.into_boxed_slice();
        }
    }

    fn release(id: Id, state: Arc<Snapshot>, extra: &mut RiderExtra) {
        if !state.deliveries.is_empty() {
            extra.waiting.insert(id, state.deliveries.to_vec());
        }
        give_back_map(&mut extra.waiting);
    }

    fn apply_side(
        state: Option<&mut Arc<Snapshot>>,
        id: &Id,
        updates: Vec<(DeliveryBrief, Diff)>,
        extra: &mut RiderExtra,
    ) {
        let mut deliveries = match &state {
            Some(s) => s.deliveries.to_vec(),
            None => extra.waiting.remove(id).unwrap_or_default(),
        };
        // Retractions (of the value held) before insertions, so that a replaced value is not lost.
        for (brief, _) in updates.iter().filter(|(_, d)| *d < 0) {
            deliveries.retain(|held| held != brief);
        }
        for (brief, _) in updates.into_iter().filter(|(_, d)| *d > 0) {
            let at = deliveries.partition_point(|held| held.delivery_id < brief.delivery_id);
            deliveries.insert(at, brief);
        }
        match state {
            Some(s) => {
                let rider = s.rider.clone();
                *s = Arc::new(Snapshot {
                    rider,
                    deliveries: deliveries.into_boxed_slice(),
                });
            }
            None if deliveries.is_empty() => give_back_map(&mut extra.waiting),
            None => {
                extra.waiting.insert(id.clone(), deliveries);
            }
        }
    }

    fn emit(
        id: &Id,
        old: Option<&Arc<Snapshot>>,
        new: Option<&Arc<Snapshot>>,
        time: Time,
        out: &mut Vec<RiderOut>,
    ) {
        let (was, is) = (Self::shown(old), Self::shown(new));
        let (before, after) = (was.map(|s| s.counted()), is.map(|s| s.counted()));
        if before != after {
            let counts = |counted: Option<(DistrictId, usize)>, sign: Diff| {
                counted
                    .into_iter()
                    .flat_map(|(d, n)| Contribution::of_rider(d, n))
                    .map(move |(k, n)| RiderOut::Counts((k, time, sign * n as Diff)))
            };
            out.extend(counts(before, -1).chain(counts(after, 1)));
        }
        if was != is {
            out.push(RiderOut::Snapshot(Change {
                key: id.clone(),
                value: is.cloned(),
                time,
            }));
        }
    }
}

/// The state of one delivery: live, or ended (terminal, kept only to absorb late events).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DeliveryState {
    /// Not terminal yet.
    Live(DeliveryRow),
    /// `DELIVERED` or `CANCELLED` at `ts`.
    Ended {
        /// `ts` of the terminal event.
        ts: Millis,
    },
}

impl DeliveryState {
    /// The row downstream sees: live deliveries that are active or waiting.
    pub fn visible(&self) -> Option<&DeliveryRow> {
        match self {
            DeliveryState::Live(row) if row.is_active() || row.is_waiting() => Some(row),
            _ => None,
        }
    }
}

/// The delivery upsert rule: terminal states absorb every later event; visible while active or
/// waiting, as the changes of a collection of rows by delivery id.
#[derive(Debug)]
pub struct DeliveryRule;

impl UpsertRule for DeliveryRule {
    type Event = Enriched<DeliveryEvent>;
    type State = DeliveryState;
    type Saved = DeliveryState;
    type Side = ();
    type Out = ((Id, DeliveryRow), Time, Diff);
    type Extra = ();

    fn id(event: &Self::Event) -> &Id {
        &event.event.delivery_id
    }

    fn ts(event: &Self::Event) -> Millis {
        event.event.ts
    }

    fn apply(current: Option<&DeliveryState>, e: Self::Event) -> Result<DeliveryState, Ignored> {
        let current = match current {
            Some(DeliveryState::Ended { .. }) => return Err(Ignored::AfterTerminal),
            Some(DeliveryState::Live(row)) if e.event.ts < row.ts => return Err(Ignored::Stale),
            Some(DeliveryState::Live(row)) => Some(row),
            None => None,
        };
        let ev = e.event;
        if ev.status.is_terminal() {
            return Ok(DeliveryState::Ended { ts: ev.ts });
        }
        /// A field the event does not name keeps its last known value.
        fn keep<T: Clone>(new: Option<T>, old: Option<Option<&T>>) -> Option<T> {
            new.or_else(|| old.flatten().cloned())
        }
        // The last known pickup point counts through its district alone.
        let pickup_district = match (ev.pickup, current) {
            (Some(_), _) => e.district.unwrap_or(UNASSIGNED),
            (None, Some(c)) => c.pickup_district,
            (None, None) => UNASSIGNED,
        };
        Ok(DeliveryState::Live(DeliveryRow {
            status: ev.status,
            pickup_district,
            rider_id: keep(ev.rider_id, current.map(|c| c.rider_id.get())).into(),
            vehicle: keep(ev.vehicle, current.map(|c| c.vehicle.as_ref())),
            ts: ev.ts,
        }))
    }

    fn is_tombstone(state: &DeliveryState) -> bool {
        matches!(state, DeliveryState::Ended { .. })
    }

    fn save(state: &DeliveryState) -> DeliveryState {
        state.clone()
    }

    fn load(state: DeliveryState) -> DeliveryState {
        state
    }

    fn emit(
        id: &Id,
        old: Option<&DeliveryState>,
        new: Option<&DeliveryState>,
        time: Time,
        out: &mut Vec<Self::Out>,
    ) {
        let (was, is) = (
            old.and_then(DeliveryState::visible),
            new.and_then(DeliveryState::visible),
        );
        if was != is {
            out.extend(was.map(|row| ((id.clone(), row.clone()), time, -1)));
            out.extend(is.map(|row| ((id.clone(), row.clone()), time, 1)));
        }
    }
}

/// The rider stage's output: the rider changelog, and what riders on shift add to the district
/// counts.
pub struct RiderSnapshots<'s> {
    /// For every complete time, each rider whose snapshot changed, with its full snapshot, or
    /// `None` once it is off shift.
    pub changes: Stream<'s, Time, Vec<Change<Id, Arc<Snapshot>>>>,
    /// What each rider on shift adds to its district's counts (see [`Contribution::of_rider`]).
    pub contributions: VecCollection<'s, Time, (DistrictId, Contribution), Diff>,
}

/// The active deliveries by rider: what joins each rider's snapshot ([`RiderRule`]'s side input).
pub fn active_deliveries<'s>(
    deliveries: VecCollection<'s, Time, (Id, DeliveryRow), Diff>,
) -> VecCollection<'s, Time, (Id, DeliveryBrief), Diff> {
    deliveries.flat_map(|(delivery_id, row)| {
        let rider = row.active_for()?.clone();
        Some((rider, row.brief(delivery_id)))
    })
}

/// The rider stage (an upsert by [`RiderRule`]) with its output split into the rider changelog and
/// the riders' contributions to the counts.
///
/// ```
/// use dongflow_dataflow::stages::{active_deliveries, rider_snapshots, Enriched};
/// use dongflow_dataflow::types::{Contribution, DeliveryRow};
/// use dongflow_dataflow::upsert::UpsertState;
/// use dongflow_records::{DeliveryStatus, Id, RiderEvent, RiderStatus};
/// use differential_dataflow::input::Input;
/// use timely::dataflow::operators::{Capture, ToStream, capture::Extract};
/// use timely::dataflow::operators::generic::operator::empty;
///
/// let (changes, contributions) = timely::example(|scope| {
///     let start = RiderEvent { rider_id: "r-1".into(), status: RiderStatus::ShiftStarted, rider_type: None, location: None, ts: 5 };
///     let events = vec![Enriched { event: start, district: Some(3) }].to_stream(scope).container::<Vec<_>>();
///     let d = |id: &str| (Id::from(id), DeliveryRow { status: DeliveryStatus::PickedUp,
///         pickup_district: 0, rider_id: Some("r-1".into()).into(), vehicle: None, ts: 9 });
///     let deliveries = scope.new_collection_from(vec![d("d-2"), d("d-1")]).1;
///     let state = UpsertState::shared(1000);
///     let out = rider_snapshots(events, empty(scope), active_deliveries(deliveries), state, Default::default(), Default::default());
///     (out.changes.capture(), out.contributions.inner.capture())
/// });
/// let changes: Vec<_> = changes.extract().into_iter().flat_map(|(_, v)| v).collect();
/// let snapshot = changes[0].value.as_ref().expect("on shift");
/// let ids: Vec<_> = snapshot.deliveries.iter().map(|d| d.delivery_id.as_str()).collect();
/// assert_eq!((changes.len(), snapshot.rider.ts, ids), (1, 5, vec!["d-1", "d-2"]));
/// let mut contributions: Vec<_> = contributions.extract().into_iter().flat_map(|(_, v)| v).map(|(c, _, n)| (c, n)).collect();
/// contributions.sort();
/// // The location is unknown: the rider counts in the unassigned district.
/// let u = dongflow_dataflow::districts::UNASSIGNED;
/// assert_eq!(contributions, vec![((u, Contribution::OnShift), 1), ((u, Contribution::Delivering), 1), ((u, Contribution::Active), 2)]);
/// ```
pub fn rider_snapshots<'s>(
    events: Stream<'s, Time, Vec<Enriched<RiderEvent>>>,
    seeds: Stream<'s, Time, Vec<Seed<RiderRow>>>,
    active: VecCollection<'s, Time, (Id, DeliveryBrief), Diff>,
    state: Rc<RefCell<UpsertState<RiderRule>>>,
    counters: Arc<UpsertCounters>,
    snapshots: Rc<SnapshotSlot<RiderRow>>,
) -> RiderSnapshots<'s> {
    let name = "Upsert: Riders";
    let out = upsert::<RiderRule>(
        events,
        seeds,
        active.inner,
        name,
        state,
        counters,
        snapshots,
    );
    let (changes, contributions) = out.ok_err(|out| match out {
        RiderOut::Snapshot(change) => Ok(change),
        RiderOut::Counts(update) => Err(update),
    });
    RiderSnapshots {
        changes,
        contributions: contributions.as_collection(),
    }
}

/// What each waiting delivery adds to the counts of the district it is picked up in.
///
/// ```
/// use dongflow_dataflow::stages::waiting_contributions;
/// use dongflow_dataflow::types::{Contribution, DeliveryRow};
/// use dongflow_records::DeliveryStatus;
/// use differential_dataflow::input::Input;
/// use timely::dataflow::operators::{Capture, capture::Extract};
///
/// let rx = timely::example(|scope| {
///     let d = |id: &str, status, pickup_district| (id.into(), DeliveryRow { status,
///         pickup_district, rider_id: None.into(), vehicle: None, ts: 1 });
///     let deliveries = scope.new_collection_from(vec![
///         d("d-1", DeliveryStatus::Waiting, 6),
///         d("d-2", DeliveryStatus::Assigned, 9),
///     ]).1;
///     waiting_contributions(deliveries).inner.capture()
/// });
/// let out: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).map(|(d, _, r)| (d, r)).collect();
/// assert_eq!(out, vec![((6, Contribution::Waiting), 1)]);
/// ```
pub fn waiting_contributions<'s>(
    deliveries: VecCollection<'s, Time, (Id, DeliveryRow), Diff>,
) -> VecCollection<'s, Time, (DistrictId, Contribution), Diff> {
    deliveries.flat_map(|(_, row)| {
        row.waiting_in()
            .map(|district| (district, Contribution::Waiting))
    })
}

/// The district counts of CONTRACT section 3, arranged by district.
///
/// ```
/// use dongflow_dataflow::stages::count_by_district;
/// use dongflow_dataflow::types::Contribution::*;
/// use differential_dataflow::input::Input;
/// use timely::dataflow::operators::{Capture, capture::Extract};
///
/// let rx = timely::example(|scope| {
///     let c = scope.new_collection_from(vec![(7, OnShift), (7, OnShift), (7, Delivering), (7, Active), (7, Waiting)]).1;
///     count_by_district(c).as_collection(|k, v| (*k, *v)).inner.capture()
/// });
/// let out: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).collect();
/// let counts = out[0].0 .1;
/// assert_eq!((counts.riders_on_shift, counts.riders_idle(), counts.pressure()), (2, 1, 1.0));
/// ```
pub fn count_by_district<'s>(
    contributions: VecCollection<'s, Time, (DistrictId, Contribution), Diff>,
) -> Arranged<'s, CountsTrace> {
    contributions
        .arrange_by_key_named("Arrange: ContributionsByDistrict")
        .reduce_abelian::<_, ValBuilder<DistrictId, DistrictCounts, Time, Diff>, ValSpine<DistrictId, DistrictCounts, Time, Diff>, _, _>(
            "Reduce: CountsByDistrict",
            |_district, input, output| {
                let mut counts = DistrictCounts::default();
                for (kind, n) in input {
                    counts.add(**kind, u64::try_from(*n).unwrap_or(0));
                }
                if !counts.is_zero() {
                    output.push((counts, 1));
                }
            },
            |buffer, key, updates| {
                buffer.clear();
                buffer.extend(updates.drain(..).map(|(v, t, r)| ((*key, v), t, r)));
            },
        )
}

/// The changelog of a collection that holds at most one value per key: for every complete time,
/// each key that changed with its final value, or `None` when it has no value any more. Emitted
/// in time order once the time is complete, so a key's records come out in `time` order.
///
/// The input must already be partitioned by key (the outputs of arrangements and of joins on
/// arrangements are): every key is then handled by one worker, always the same.
///
/// ```
/// use dongflow_dataflow::stages::changes_per_time;
/// use differential_dataflow::input::Input;
/// use timely::dataflow::operators::{Capture, capture::Extract};
///
/// let rx = timely::example(|scope| {
///     // At time 0: key 7 is 1, key 8 is 2. At time 1: key 7 becomes 5, key 8 goes away.
///     let updates = vec![((7u32, 1u64), 0, 1isize), ((8, 2), 0, 1), ((7, 1), 1, -1), ((7, 5), 1, 1), ((8, 2), 1, -1)];
///     let collection = differential_dataflow::AsCollection::as_collection(
///         timely::dataflow::operators::ToStream::to_stream(updates, scope));
///     changes_per_time(collection, "Changes").capture()
/// });
/// let out: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).map(|c| (c.key, c.value, c.time)).collect();
/// assert_eq!(out, vec![(7, Some(1), 0), (8, Some(2), 0), (7, Some(5), 1), (8, None, 1)]);
/// ```
pub fn changes_per_time<'s, K, V>(
    updates: VecCollection<'s, Time, (K, V), Diff>,
    name: &str,
) -> Stream<'s, Time, Vec<Change<K, V>>>
where
    K: timely::ExchangeData + Ord,
    V: timely::ExchangeData + Ord,
{
    updates.inner.unary_frontier(Pipeline, name, |_, _| {
        let mut stash: UpdateStash<(K, V)> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|cap, data| keep_updates(&mut stash, &cap, data));
            while let Some(entry) = stash.first_entry() {
                let time = *entry.key();
                if frontier.less_equal(&time) {
                    break;
                }
                let (cap, mut updates) = entry.remove();
                differential_dataflow::consolidation::consolidate(&mut updates);
                let mut changes: Vec<Change<K, V>> = Vec::new();
                for ((key, value), diff) in updates {
                    if changes.last().is_none_or(|c| c.key != key) {
                        changes.push(Change {
                            key,
                            value: None,
                            time,
                        });
                    }
                    if diff > 0 {
                        if let Some(last) = changes.last_mut() {
                            last.value = Some(value);
                        }
                    }
                }
                output.session(&cap).give_container(&mut changes);
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dongflow_records::{DeliveryStatus, Label, RiderStatus};

    /// The per-rider entries stay small: a layout change that grows them shows here first (the
    /// memory benchmark and `tests/memory.rs` show what it costs).
    #[test]
    fn held_entries_are_small() {
        assert_eq!(std::mem::size_of::<<RiderRule as UpsertRule>::State>(), 8);
        assert_eq!(std::mem::size_of::<Option<Label>>(), 4);
        assert!(std::mem::size_of::<Snapshot>() <= 64);
        assert_eq!(std::mem::size_of::<DeliveryState>(), 32);
        assert_eq!(std::mem::size_of::<RiderRow>(), 32);
        assert_eq!(std::mem::size_of::<DeliveryBrief>(), 32);
    }

    fn rider(
        ts: u64,
        status: RiderStatus,
        rider_type: Option<&str>,
        at: Option<(f64, DistrictId)>,
    ) -> Enriched<RiderEvent> {
        Enriched {
            event: RiderEvent {
                rider_id: "r-1".into(),
                status,
                rider_type: rider_type.map(Into::into),
                location: at.map(|(lat, _)| Coord { lat, lon: 127.0 }),
                ts,
            },
            district: at.map(|(_, d)| d),
        }
    }

    fn delivery(ts: u64, status: DeliveryStatus, rider: Option<&str>) -> Enriched<DeliveryEvent> {
        Enriched {
            event: DeliveryEvent {
                delivery_id: "d-1".into(),
                status,
                delivery_type: None,
                pickup: None,
                dropoff: None,
                rider_id: rider.map(Into::into),
                vehicle: None,
                ts,
            },
            district: None,
        }
    }

    #[test]
    fn rider_rule_orders_by_ts_and_keeps_last_known_fields() {
        let start = RiderRule::apply_row(
            None,
            rider(
                10,
                RiderStatus::ShiftStarted,
                Some("CONNECT"),
                Some((37.5, 3)),
            ),
        )
        .expect("applies");
        assert_eq!(
            (
                start.district,
                start
                    .rider_type
                    .as_ref()
                    .map(ToString::to_string)
                    .as_deref()
            ),
            (3, Some("CONNECT"))
        );
        // A later ping without rider type or location keeps both.
        let ping = RiderRule::apply_row(Some(&start), rider(20, RiderStatus::OnShift, None, None))
            .expect("applies");
        assert_eq!(
            (
                ping.district,
                ping.rider_type.as_ref().map(ToString::to_string).as_deref(),
                ping.ts
            ),
            (3, Some("CONNECT"), 20)
        );
        // Lower ts: stale. Equal ts: applies (the later arrival wins).
        assert_eq!(
            RiderRule::apply_row(Some(&ping), rider(19, RiderStatus::ShiftEnded, None, None)),
            Err(Ignored::Stale)
        );
        let end = RiderRule::apply_row(Some(&ping), rider(20, RiderStatus::ShiftEnded, None, None))
            .expect("applies");
        let shown =
            |row: &RiderRow| RiderRule::shown(Some(&RiderRule::load(row.clone()))).is_some();
        assert!(!shown(&end), "a rider off shift is not visible");
        assert!(shown(&ping));
        // A location outside every district moves the rider to unassigned.
        let away = RiderRule::apply_row(
            Some(&ping),
            rider(30, RiderStatus::OnShift, None, Some((35.0, UNASSIGNED))),
        );
        assert_eq!(away.map(|r| r.district), Ok(UNASSIGNED));
    }

    #[test]
    fn delivery_rule_terminal_absorbs_and_reassignment_replaces() {
        let created =
            DeliveryRule::apply(None, delivery(1, DeliveryStatus::Created, None)).expect("applies");
        assert!(created.visible().is_some_and(|r| r.is_waiting()));
        // ASSIGNED without a rider is neither waiting nor active: not visible.
        let assigned =
            DeliveryRule::apply(Some(&created), delivery(2, DeliveryStatus::Assigned, None))
                .expect("applies");
        assert_eq!(assigned.visible(), None);
        let a = DeliveryRule::apply(
            Some(&assigned),
            delivery(3, DeliveryStatus::Assigned, Some("r-1")),
        )
        .expect("applies");
        let b = DeliveryRule::apply(Some(&a), delivery(4, DeliveryStatus::Assigned, Some("r-2")))
            .expect("applies");
        assert_eq!(
            b.visible().and_then(|r| r.rider_id.get().cloned()),
            Some("r-2".into())
        );
        // Later events without rider_id keep the last one.
        let picked = DeliveryRule::apply(Some(&b), delivery(5, DeliveryStatus::PickedUp, None))
            .expect("applies");
        assert_eq!(
            picked.visible().and_then(|r| r.rider_id.get().cloned()),
            Some("r-2".into())
        );
        let done = DeliveryRule::apply(Some(&picked), delivery(6, DeliveryStatus::Delivered, None))
            .expect("applies");
        assert!(DeliveryRule::is_tombstone(&done));
        assert_eq!(done.visible(), None);
        for late in [
            delivery(5, DeliveryStatus::PickedUp, None),
            delivery(99, DeliveryStatus::Waiting, None),
        ] {
            assert_eq!(
                DeliveryRule::apply(Some(&done), late),
                Err(Ignored::AfterTerminal)
            );
        }
        assert_eq!(
            DeliveryRule::apply(Some(&picked), delivery(4, DeliveryStatus::Cancelled, None)),
            Err(Ignored::Stale)
        );
    }
}

#[cfg(test)]
mod snapshot_stage_tests {
    use super::*;
    use differential_dataflow::input::Input;
    use dongflow_records::{DeliveryStatus, RiderStatus};
    use std::sync::mpsc;
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::generic::operator::empty;
    use timely::dataflow::operators::vec::Input as _;
    use timely::dataflow::operators::{Capture, Probe};

    type Out = (
        Vec<(Time, Vec<Change<Id, Arc<Snapshot>>>)>,
        Vec<(Time, Vec<((DistrictId, Contribution), Time, Diff)>)>,
    );

    fn rider(status: RiderStatus, ts: Millis, district: DistrictId) -> Enriched<RiderEvent> {
        let location = Some(Coord {
            lat: 37.5,
            lon: 127.0,
        });
        let event = RiderEvent {
            rider_id: "r-1".into(),
            status,
            rider_type: None,
            location,
            ts,
        };
        Enriched {
            event,
            district: Some(district),
        }
    }

    fn assigned() -> DeliveryRow {
        DeliveryRow {
            status: DeliveryStatus::Assigned,
            pickup_district: 0,
            rider_id: Some("r-1".into()).into(),
            vehicle: None,
            ts: 1,
        }
    }

    type RiderInput = timely::dataflow::operators::vec::input::Handle<Time, Enriched<RiderEvent>>;
    type DeliveryInput = differential_dataflow::input::InputSession<Time, (Id, DeliveryRow), Diff>;

    /// The rider stage over `state`, with its rider event and delivery row inputs.
    fn stage<'s>(
        scope: timely::dataflow::Scope<'s, Time>,
        state: Rc<RefCell<UpsertState<RiderRule>>>,
    ) -> (RiderInput, DeliveryInput, RiderSnapshots<'s>) {
        let (riders_in, riders) = scope.new_input::<Enriched<RiderEvent>>();
        let (deliveries_in, deliveries) = scope.new_collection::<(Id, DeliveryRow), Diff>();
        let active = active_deliveries(deliveries);
        let out = rider_snapshots(
            riders,
            empty(scope),
            active,
            state,
            Arc::default(),
            Rc::default(),
        );
        (riders_in, deliveries_in, out)
    }

    /// Runs the stage over seven times of input on `workers` workers, riders off shift forgotten
    /// after 5 ms; returns its outputs and the riders it holds at the end (with a state, or with
    /// deliveries waiting for one).
    fn run(workers: usize) -> (Out, usize) {
        let (changes_tx, changes_rx) = mpsc::channel();
        let (counts_tx, counts_rx) = mpsc::channel();
        let (held_tx, held_rx) = mpsc::channel();
        let config = timely::Config::process(workers);
        timely::execute(config, move |worker| {
            let state = UpsertState::<RiderRule>::shared(1_000);
            state.borrow_mut().forget_idle_after(Some(5));
            let st = state.clone();
            let (changes_tx, counts_tx) = (changes_tx.clone(), counts_tx.clone());
            let (mut riders, mut deliveries, probe) = worker.dataflow::<Time, _, _>(|scope| {
                let (riders, deliveries, out) = stage(scope, st);
                let (probe, changes) = out.changes.probe();
                changes.capture_into(changes_tx);
                out.contributions.inner.capture_into(counts_tx);
                (riders, deliveries, probe)
            });
            let (d1, d2): (Id, Id) = ("d-1".into(), "d-2".into());
            let steps = [
                // A delivery assigned to a rider with no state yet: it waits for the rider.
                (0, None, Some((d1.clone(), 1))),
                // The rider starts its shift in district 3; the delivery joins it.
                (10, Some(rider(RiderStatus::ShiftStarted, 10, 3)), None),
                // It moves to district 5.
                (20, Some(rider(RiderStatus::OnShift, 20, 5)), None),
                // Its shift ends with the delivery still active.
                (30, Some(rider(RiderStatus::ShiftEnded, 30, 5)), None),
                // The rider is forgotten (idle for 5 ms); its delivery ends.
                (40, None, Some((d1, -1))),
                // A delivery is assigned to the forgotten rider: it waits for it.
                (50, None, Some((d2, 1))),
                // A new shift in district 7 takes it up.
                (60, Some(rider(RiderStatus::ShiftStarted, 60, 7)), None),
            ];
            for (time, event, delivery) in steps {
                riders.advance_to(time);
                deliveries.advance_to(time);
                if worker.index() > 0 {
                    continue;
                }
                riders.send_batch(&mut event.into_iter().collect());
                if let Some((id, diff)) = delivery {
                    deliveries.update((id, assigned()), diff);
                }
            }
            riders.advance_to(70);
            deliveries.advance_to(70);
            deliveries.flush();
            worker.step_while(|| probe.less_than(&70));
            let state = state.borrow();
            held_tx
                .send(state.len() + state.extra().len())
                .expect("receiver");
        })
        .expect("runs");
        let held = held_rx.try_iter().sum();
        ((changes_rx.extract(), counts_rx.extract()), held)
    }

    /// The rider events of later times are in before a time's side updates are: each update joins
    /// the snapshot of its own time, not a later one.
    #[test]
    fn side_updates_that_come_late_join_their_own_time() {
        let (tx, rx) = mpsc::channel();
        timely::execute_directly(move |worker| {
            let state = UpsertState::<RiderRule>::shared(1_000);
            let (mut riders, mut deliveries, probe) = worker.dataflow::<Time, _, _>(|scope| {
                let (riders, deliveries, out) = stage(scope, state);
                let (probe, changes) = out.changes.probe();
                changes.capture_into(tx);
                (riders, deliveries, probe)
            });
            riders.advance_to(10);
            riders.send(rider(RiderStatus::ShiftStarted, 10, 3));
            riders.advance_to(20);
            riders.send(rider(RiderStatus::OnShift, 20, 5));
            riders.advance_to(30);
            riders.flush();
            deliveries.advance_to(15);
            deliveries.flush();
            // The rider events of 10 and 20 are complete, and so is 10; the deliveries of 15 are
            // not yet, so 20 must wait for them.
            for _ in 0..20 {
                worker.step();
            }
            assert!(
                probe.less_equal(&15),
                "time 20 waits for the deliveries of 15"
            );
            deliveries.insert(("d-1".into(), assigned()));
            deliveries.advance_to(30);
            deliveries.flush();
            worker.step_while(|| probe.less_than(&30));
        });
        let changes: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).collect();
        let shown: Vec<_> = changes
            .iter()
            .map(|c| {
                (
                    c.time,
                    c.value
                        .as_ref()
                        .map(|s| (s.rider.district, s.deliveries.len())),
                )
            })
            .collect();
        let expected = vec![(10, Some((3, 0))), (15, Some((3, 1))), (20, Some((5, 1)))];
        assert_eq!(shown, expected);
    }

    #[test]
    fn a_snapshot_follows_its_rider_and_deliveries_and_deliveries_wait_for_their_rider() {
        for workers in [1, 3] {
            let ((changes, counts), held) = run(workers);
            let changes: Vec<_> = changes.into_iter().flat_map(|(_, v)| v).collect();
            let shown: Vec<_> = changes
                .iter()
                .map(|c| {
                    let v = c
                        .value
                        .as_ref()
                        .map(|s| (s.rider.district, s.deliveries.len()));
                    (c.time, v)
                })
                .collect();
            // Nothing at 0, 40 or 50: the deliveries of a rider off shift or with no state.
            let expected = vec![
                (10, Some((3, 1))),
                (20, Some((5, 1))),
                (30, None),
                (60, Some((7, 1))),
            ];
            assert_eq!(shown, expected, "{workers} workers");
            let mut net: BTreeMap<(DistrictId, Contribution), Diff> = BTreeMap::new();
            let mut at_20: BTreeMap<(DistrictId, Contribution), Diff> = BTreeMap::new();
            for (k, t, n) in counts.into_iter().flat_map(|(_, v)| v) {
                *net.entry(k).or_default() += n;
                if t <= 20 {
                    *at_20.entry(k).or_default() += n;
                }
            }
            at_20.retain(|_, n| *n != 0);
            net.retain(|_, n| *n != 0);
            let kinds = [
                Contribution::OnShift,
                Contribution::Delivering,
                Contribution::Active,
            ];
            let in_district =
                |d| -> BTreeMap<_, _> { kinds.into_iter().map(|k| ((d, k), 1)).collect() };
            assert_eq!(at_20, in_district(5), "{workers} workers: at 20");
            assert_eq!(net, in_district(7), "{workers} workers: at the end");
            assert_eq!(held, 1, "{workers} workers: the rider alone");
        }
    }
}
