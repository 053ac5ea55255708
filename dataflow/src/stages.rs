//! One small function per dataflow stage. [`crate::build`] is the only place that wires them.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use differential_dataflow::VecCollection;
use dongflow_records::{Coord, DeliveryEvent, Id, Millis, RiderEvent};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, InputCapability};
use timely::dataflow::Stream;

use crate::districts::{DistrictId, DistrictIndex, UNASSIGNED};
use crate::types::{
    Change, Contribution, DeliveryRow, Diff, DistrictCounts, JoinSide, RiderCore, RiderPart,
    RiderPosition, RiderRow, Snapshot, SnapshotCore, Time,
};
use crate::upsert::{Ignored, UpsertRule};

/// Rider snapshots without positions (the join's output), arranged by rider id.
pub type SnapshotTrace = TraceAgent<ValSpine<Id, SnapshotCore, Time, Diff>>;
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

/// The rider upsert rule: state is the [`RiderRow`]; visible while on shift.
#[derive(Debug)]
pub struct RiderRule;

impl UpsertRule for RiderRule {
    type Event = Enriched<RiderEvent>;
    type State = RiderRow;
    type Row = RiderPart;

    fn id(event: &Self::Event) -> &Id {
        &event.event.rider_id
    }

    fn apply(current: Option<&RiderRow>, e: Self::Event) -> Result<RiderRow, Ignored> {
        if current.is_some_and(|c| e.event.ts < c.ts) {
            return Err(Ignored::Stale);
        }
        let (location, district) = match (e.event.location, current) {
            (Some(at), _) => (Some(at), e.district.unwrap_or(UNASSIGNED)),
            (None, Some(c)) => (c.location, c.district),
            (None, None) => (None, UNASSIGNED),
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

    fn rows(state: &RiderRow) -> impl Iterator<Item = RiderPart> {
        let parts = state.status.on_shift().then(|| {
            [
                RiderPart::Core(state.core()),
                RiderPart::Position(state.position()),
            ]
        });
        parts.into_iter().flatten()
    }

    fn is_tombstone(_: &RiderRow) -> bool {
        false
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
    pub fn visible(&self) -> Option<DeliveryRow> {
        match self {
            DeliveryState::Live(row) if row.is_active() || row.is_waiting() => Some(row.clone()),
            _ => None,
        }
    }
}

/// The delivery upsert rule: terminal states absorb every later event; visible while active or waiting.
#[derive(Debug)]
pub struct DeliveryRule;

impl UpsertRule for DeliveryRule {
    type Event = Enriched<DeliveryEvent>;
    type State = DeliveryState;
    type Row = DeliveryRow;

    fn id(event: &Self::Event) -> &Id {
        &event.event.delivery_id
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
        let keep = |new: Option<Id>, old: fn(&DeliveryRow) -> &Option<Id>| {
            new.or_else(|| current.and_then(|c| old(c).clone()))
        };
        let (pickup, pickup_district) = match (ev.pickup, current) {
            (Some(at), _) => (Some(at), e.district.unwrap_or(UNASSIGNED)),
            (None, Some(c)) => (c.pickup, c.pickup_district),
            (None, None) => (None, UNASSIGNED),
        };
        Ok(DeliveryState::Live(DeliveryRow {
            status: ev.status,
            delivery_type: keep(ev.delivery_type, |c| &c.delivery_type),
            pickup,
            pickup_district,
            dropoff: ev.dropoff.or_else(|| current.and_then(|c| c.dropoff)),
            rider_id: keep(ev.rider_id, |c| &c.rider_id),
            vehicle: keep(ev.vehicle, |c| &c.vehicle),
            ts: ev.ts,
        }))
    }

    fn rows(state: &DeliveryState) -> impl Iterator<Item = DeliveryRow> {
        state.visible().into_iter()
    }

    fn is_tombstone(state: &DeliveryState) -> bool {
        matches!(state, DeliveryState::Ended { .. })
    }
}

/// Riders' slowly changing parts, keyed by rider id.
pub type RiderCores<'s> = VecCollection<'s, Time, (Id, RiderCore), Diff>;
/// Riders' positions, keyed by rider id.
pub type RiderPositions<'s> = VecCollection<'s, Time, (Id, RiderPosition), Diff>;

/// Splits riders on shift into the slowly changing part (status, type, district), which the join
/// and the counts use, and the position (location, ts), which changes with every ping. A ping that
/// stays in its district changes only the position: the join and the counts do no work for it.
///
/// ```
/// use dongflow_dataflow::stages::split_riders;
/// use dongflow_dataflow::types::{RiderCore, RiderPart, RiderPosition};
/// use dongflow_records::{Id, RiderStatus};
/// use differential_dataflow::input::Input;
/// use timely::dataflow::operators::{Capture, capture::Extract};
///
/// let (cores, positions) = timely::example(|scope| {
///     let core = RiderCore { status: RiderStatus::OnShift, rider_type: None, district: 2 };
///     let position = RiderPosition { location: None, ts: 7 };
///     let id: Id = "r-1".into();
///     let parts = scope.new_collection_from(vec![(id.clone(), RiderPart::Core(core)), (id, RiderPart::Position(position))]).1;
///     let (cores, positions) = split_riders(parts);
///     (cores.inner.capture(), positions.inner.capture())
/// });
/// let cores: Vec<_> = cores.extract().into_iter().flat_map(|(_, v)| v).collect();
/// let positions: Vec<_> = positions.extract().into_iter().flat_map(|(_, v)| v).collect();
/// assert_eq!((cores.len(), cores[0].0 .1.district), (1, 2));
/// assert_eq!((positions.len(), positions[0].0 .1.ts), (1, 7));
/// ```
pub fn split_riders<'s>(
    riders: VecCollection<'s, Time, (Id, RiderPart), Diff>,
) -> (RiderCores<'s>, RiderPositions<'s>) {
    let cores = riders.clone().flat_map(|(id, part)| match part {
        RiderPart::Core(core) => Some((id, core)),
        RiderPart::Position(_) => None,
    });
    let positions = riders.flat_map(|(id, part)| match part {
        RiderPart::Position(position) => Some((id, position)),
        RiderPart::Core(_) => None,
    });
    (cores, positions)
}

/// The join input: riders on shift and active deliveries, both keyed by rider id.
///
/// ```
/// use dongflow_dataflow::stages::join_inputs;
/// use dongflow_dataflow::types::{DeliveryRow, JoinSide, RiderCore};
/// use dongflow_records::DeliveryStatus;
/// use differential_dataflow::input::Input;
/// use timely::dataflow::operators::{Capture, capture::Extract};
///
/// let rx = timely::example(|scope| {
///     let riders = scope.new_collection_from(Vec::<(dongflow_records::Id, RiderCore)>::new()).1;
///     let d = |status, rider: Option<&str>| ("d-1".into(), DeliveryRow { status, delivery_type: None, pickup: None,
///         pickup_district: 0, dropoff: None, rider_id: rider.map(Into::into), vehicle: None, ts: 1 });
///     // Only the assigned delivery with a rider joins; the waiting one does not.
///     let deliveries = scope.new_collection_from(vec![d(DeliveryStatus::Assigned, Some("r-1")), d(DeliveryStatus::Waiting, None)]).1;
///     join_inputs(riders, deliveries).inner.capture()
/// });
/// let out: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).collect();
/// assert_eq!(out.len(), 1);
/// assert!(matches!(&out[0].0, (r, JoinSide::Delivery(_)) if r == "r-1"));
/// ```
pub fn join_inputs<'s>(
    riders: VecCollection<'s, Time, (Id, RiderCore), Diff>,
    deliveries: VecCollection<'s, Time, (Id, DeliveryRow), Diff>,
) -> VecCollection<'s, Time, (Id, JoinSide), Diff> {
    let active = deliveries.flat_map(|(delivery_id, row)| {
        let rider = row.active_for()?.clone();
        Some((rider, JoinSide::Delivery(row.brief(delivery_id))))
    });
    riders
        .map(|(id, row)| (id, JoinSide::Rider(row)))
        .concat(active)
}

/// The incremental join of riders with their active deliveries into rider snapshots, arranged by
/// rider id. A rider's group is its row (when on shift) and its deliveries; a group without a rider
/// has no snapshot.
///
/// ```
/// use dongflow_dataflow::stages::{join_inputs, join_riders_deliveries};
/// use dongflow_dataflow::types::{DeliveryRow, RiderCore};
/// use dongflow_records::{DeliveryStatus, RiderStatus};
/// use differential_dataflow::input::Input;
/// use timely::dataflow::operators::{Capture, capture::Extract};
///
/// let rx = timely::example(|scope| {
///     let rider = RiderCore { status: RiderStatus::OnShift, rider_type: None, district: 0 };
///     let riders = scope.new_collection_from(vec![("r-1".into(), rider)]).1;
///     let d = |id: &str| (id.into(), DeliveryRow { status: DeliveryStatus::PickedUp, delivery_type: None, pickup: None,
///         pickup_district: 0, dropoff: None, rider_id: Some("r-1".into()), vehicle: None, ts: 9 });
///     let deliveries = scope.new_collection_from(vec![d("d-2"), d("d-1")]).1;
///     join_riders_deliveries(join_inputs(riders, deliveries)).as_collection(|k, v| (k.clone(), v.clone())).inner.capture()
/// });
/// let out: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).collect();
/// let snapshot = &out[0].0 .1;
/// assert_eq!(snapshot.deliveries.iter().map(|d| d.delivery_id.as_str()).collect::<Vec<_>>(), ["d-1", "d-2"]);
/// ```
pub fn join_riders_deliveries<'s>(
    sides: VecCollection<'s, Time, (Id, JoinSide), Diff>,
) -> Arranged<'s, SnapshotTrace> {
    sides
        .arrange_by_key_named("Arrange: JoinSidesByRider")
        .reduce_abelian::<_, ValBuilder<Id, SnapshotCore, Time, Diff>, ValSpine<Id, SnapshotCore, Time, Diff>, _, _>(
            "Reduce: SnapshotsByRider",
            |_rider, input, output| {
                // Values arrive sorted: the rider (if on shift) first, then deliveries by id.
                let mut sides = input.iter().filter(|(_, diff)| *diff > 0).map(|(side, _)| *side);
                if let Some(JoinSide::Rider(row)) = sides.next() {
                    let deliveries = sides
                        .filter_map(|s| match s {
                            JoinSide::Delivery(brief) => Some(brief.clone()),
                            JoinSide::Rider(_) => None,
                        })
                        .collect();
                    output.push((SnapshotCore { rider: row.clone(), deliveries }, 1));
                }
            },
            |buffer, key, updates| {
                buffer.clear();
                buffer.extend(updates.drain(..).map(|(v, t, r)| ((key.clone(), v), t, r)));
            },
        )
}

/// What each snapshot and each waiting delivery adds to its district's counts.
///
/// ```
/// use dongflow_dataflow::stages::{contributions, join_inputs, join_riders_deliveries};
/// use dongflow_dataflow::types::{Contribution, DeliveryRow, RiderCore};
/// use dongflow_records::{DeliveryStatus, Id, RiderStatus};
/// use differential_dataflow::input::Input;
/// use timely::dataflow::operators::{Capture, capture::Extract};
///
/// let rx = timely::example(|scope| {
///     let rider = RiderCore { status: RiderStatus::OnShift, rider_type: None, district: 4 };
///     let riders = scope.new_collection_from(vec![(Id::from("r-1"), rider)]).1;
///     let d = |id: &str, status, rider: Option<&str>, pickup_district| (id.into(), DeliveryRow { status, delivery_type: None,
///         pickup: None, pickup_district, dropoff: None, rider_id: rider.map(Into::into), vehicle: None, ts: 1 });
///     let deliveries = scope.new_collection_from(vec![
///         d("d-1", DeliveryStatus::PickedUp, Some("r-1"), 9),
///         d("d-2", DeliveryStatus::Waiting, None, 6),
///     ]).1;
///     let snapshots = join_riders_deliveries(join_inputs(riders, deliveries.clone()));
///     contributions(snapshots, deliveries).inner.capture()
/// });
/// let mut out: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).map(|(d, _, r)| (d, r)).collect();
/// out.sort();
/// // The rider counts where it is (4); the waiting delivery where it is picked up (6).
/// assert_eq!(out, vec![
///     ((4, Contribution::OnShift), 1), ((4, Contribution::Delivering), 1), ((4, Contribution::Active), 1),
///     ((6, Contribution::Waiting), 1),
/// ]);
/// ```
pub fn contributions<'s>(
    snapshots: Arranged<'s, SnapshotTrace>,
    deliveries: VecCollection<'s, Time, (Id, DeliveryRow), Diff>,
) -> VecCollection<'s, Time, (DistrictId, Contribution), Diff> {
    let riders = snapshots.flat_map_ref(|_rider, snapshot| {
        Contribution::of_rider(snapshot.rider.district, snapshot.deliveries.len())
    });
    let waiting = deliveries.flat_map(|(_, row)| {
        row.waiting_in()
            .map(|district| (district, Contribution::Waiting))
    });
    riders.concat(waiting)
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

/// The rider changelog: for every complete time, each rider whose snapshot changed, with its full
/// snapshot (the join's output joined with the rider's position), or `None` once it is off shift.
///
/// Positions change with nearly every event and never touch the join or the counts, so they are not
/// arranged: this stage keeps, per rider on shift, its latest snapshot core and position, and a ping
/// costs one map update and one output record. Both inputs are partitioned by rider id with the
/// same hash (the upsert's exchange, the join's arrangement), so each rider's parts meet on the
/// worker that owns it without another exchange. `held` reports how many riders the stage holds.
///
/// ```
/// use dongflow_dataflow::stages::{join_inputs, join_riders_deliveries, rider_changes};
/// use dongflow_dataflow::types::{DeliveryRow, RiderCore, RiderPosition};
/// use dongflow_records::{Id, RiderStatus};
/// use differential_dataflow::input::Input;
/// use timely::dataflow::operators::{Capture, capture::Extract};
///
/// let rx = timely::example(|scope| {
///     let core = RiderCore { status: RiderStatus::OnShift, rider_type: None, district: 3 };
///     let cores = scope.new_collection_from(vec![(Id::from("r-1"), core)]).1;
///     let deliveries = scope.new_collection_from(Vec::<(Id, DeliveryRow)>::new()).1;
///     let positions = scope.new_collection_from(vec![(Id::from("r-1"), RiderPosition { location: None, ts: 5 })]).1;
///     let snapshots = join_riders_deliveries(join_inputs(cores, deliveries));
///     rider_changes(snapshots, positions, Default::default()).capture()
/// });
/// let out: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).collect();
/// assert_eq!(out.len(), 1);
/// let snapshot = out[0].value.as_ref().expect("on shift");
/// assert_eq!((snapshot.rider.district, snapshot.rider.ts), (3, 5));
/// ```
pub fn rider_changes<'s>(
    snapshots: Arranged<'s, SnapshotTrace>,
    positions: RiderPositions<'s>,
    held: Rc<Cell<usize>>,
) -> Stream<'s, Time, Vec<Change<Id, Snapshot>>> {
    /// A time's updates to the two parts, with a capability for its output.
    struct Pending {
        cap: Capability<Time>,
        cores: Vec<((Id, SnapshotCore), Diff)>,
        positions: Vec<((Id, RiderPosition), Diff)>,
    }
    /// What the stage holds of one rider.
    struct Parts {
        core: Option<SnapshotCore>,
        position: Option<RiderPosition>,
        /// The last time that changed it, so that it is output once per time.
        touched_at: Time,
    }
    /// The rider's parts, noting `id` in `touched` the first time it changes at `time`.
    fn parts<'a>(
        riders: &'a mut FxHashMap<Id, Parts>,
        touched: &mut Vec<Id>,
        id: Id,
        time: Time,
    ) -> &'a mut Parts {
        let parts = riders.entry(id.clone()).or_insert(Parts {
            core: None,
            position: None,
            touched_at: Time::MAX,
        });
        if parts.touched_at != time {
            parts.touched_at = time;
            touched.push(id);
        }
        parts
    }
    let cores = snapshots.as_collection(|id, core| (id.clone(), core.clone()));
    // Pipeline on both inputs: they are already partitioned by rider id (see above).
    cores.inner.binary_frontier(
        positions.inner,
        Pipeline,
        Pipeline,
        "Changelog: Riders",
        move |_, _| {
            let mut pending: BTreeMap<Time, Pending> = BTreeMap::new();
            let mut riders: FxHashMap<Id, Parts> = FxHashMap::default();
            let mut touched: Vec<Id> = Vec::new();
            move |(cores, cores_frontier), (positions, positions_frontier), output| {
                fn entry<'a>(
                    pending: &'a mut BTreeMap<Time, Pending>,
                    cap: &InputCapability<Time>,
                    time: Time,
                ) -> &'a mut Pending {
                    pending.entry(time).or_insert_with(|| Pending {
                        cap: cap.delayed(&time, 0),
                        cores: Vec::new(),
                        positions: Vec::new(),
                    })
                }
                cores.for_each(|cap, data| {
                    for (update, time, diff) in data.drain(..) {
                        entry(&mut pending, &cap, time).cores.push((update, diff));
                    }
                });
                positions.for_each(|cap, data| {
                    for (update, time, diff) in data.drain(..) {
                        entry(&mut pending, &cap, time)
                            .positions
                            .push((update, diff));
                    }
                });
                while let Some(first) = pending.first_entry() {
                    let time = *first.key();
                    if cores_frontier.less_equal(&time) || positions_frontier.less_equal(&time) {
                        break;
                    }
                    let Pending {
                        cap,
                        cores,
                        positions,
                    } = first.remove();
                    // Retractions (of the value held) before insertions, so that a replaced
                    // value is not lost.
                    for ((id, core), _) in cores.iter().filter(|(_, d)| *d < 0) {
                        let p = parts(&mut riders, &mut touched, id.clone(), time);
                        p.core = p.core.take().filter(|held| held != core);
                    }
                    for ((id, position), _) in positions.iter().filter(|(_, d)| *d < 0) {
                        let p = parts(&mut riders, &mut touched, id.clone(), time);
                        p.position = p.position.take().filter(|held| held != position);
                    }
                    for ((id, core), _) in cores.into_iter().filter(|(_, d)| *d > 0) {
                        parts(&mut riders, &mut touched, id, time).core = Some(core);
                    }
                    for ((id, position), _) in positions.into_iter().filter(|(_, d)| *d > 0) {
                        parts(&mut riders, &mut touched, id, time).position = Some(position);
                    }
                    let mut changes: Vec<Change<Id, Snapshot>> = Vec::with_capacity(touched.len());
                    for id in touched.drain(..) {
                        let value = match riders.get(&id) {
                            Some(Parts {
                                core: Some(core),
                                position: Some(position),
                                ..
                            }) => Some(Snapshot::compose(core.clone(), *position)),
                            Some(Parts {
                                core: None,
                                position: None,
                                ..
                            }) => {
                                riders.remove(&id);
                                None
                            }
                            _ => None,
                        };
                        changes.push(Change {
                            key: id,
                            value,
                            time,
                        });
                    }
                    output.session(&cap).give_container(&mut changes);
                }
                held.set(riders.len());
            }
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
    type Stash<K, V> = BTreeMap<Time, (Capability<Time>, Vec<((K, V), Diff)>)>;
    updates.inner.unary_frontier(Pipeline, name, |_, _| {
        let mut stash: Stash<K, V> = BTreeMap::new();
        move |(input, frontier), output| {
            input.for_each(|cap, data| {
                for (kv, time, diff) in data.drain(..) {
                    stash
                        .entry(time)
                        .or_insert_with(|| (cap.delayed(&time, 0), Vec::new()))
                        .1
                        .push((kv, diff));
                }
            });
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
    use dongflow_records::{DeliveryStatus, RiderStatus};

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
        let start = RiderRule::apply(
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
            (start.district, start.rider_type.as_deref()),
            (3, Some("CONNECT"))
        );
        // A later ping without rider type or location keeps both.
        let ping = RiderRule::apply(Some(&start), rider(20, RiderStatus::OnShift, None, None))
            .expect("applies");
        assert_eq!(
            (ping.district, ping.rider_type.as_deref(), ping.ts),
            (3, Some("CONNECT"), 20)
        );
        // Lower ts: stale. Equal ts: applies (the later arrival wins).
        assert_eq!(
            RiderRule::apply(Some(&ping), rider(19, RiderStatus::ShiftEnded, None, None)),
            Err(Ignored::Stale)
        );
        let end = RiderRule::apply(Some(&ping), rider(20, RiderStatus::ShiftEnded, None, None))
            .expect("applies");
        assert_eq!(
            RiderRule::rows(&end).next(),
            None,
            "a rider off shift is not visible"
        );
        assert_eq!(RiderRule::rows(&ping).count(), 2, "core and position");
        // A location outside every district moves the rider to unassigned.
        let away = RiderRule::apply(
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
        assert_eq!(b.visible().and_then(|r| r.rider_id), Some("r-2".into()));
        // Later events without rider_id keep the last one.
        let picked = DeliveryRule::apply(Some(&b), delivery(5, DeliveryStatus::PickedUp, None))
            .expect("applies");
        assert_eq!(
            picked.visible().and_then(|r| r.rider_id),
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
