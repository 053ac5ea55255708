//! One small function per dataflow stage. [`crate::build`] is the only place that wires them.

use std::cell::Cell;
use std::collections::hash_map::Entry;
use std::collections::BTreeMap;
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::implementations::{ValBuilder, ValSpine};
use differential_dataflow::{AsCollection, Hashable, VecCollection};
use dongflow_records::{Coord, DeliveryEvent, Id, Millis, RiderEvent};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::builder_rc::OperatorBuilder;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::generic::OutputBuilder;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::{Capability, InputCapability};
use timely::dataflow::Stream;

use crate::districts::{DistrictId, DistrictIndex, UNASSIGNED};
use crate::types::{
    Change, Contribution, DeliveryBrief, DeliveryRow, Diff, DistrictCounts, RiderCore, RiderPart,
    RiderPosition, RiderRow, Snapshot, Time,
};
use crate::upsert::{give_back_buffer, give_back_map, Ignored, UpsertRule};

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

    fn ts(event: &Self::Event) -> Millis {
        event.event.ts
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

    /// A rider off shift may be forgotten once idle: it shows nothing, and a new shift starts it
    /// again (without the type and location it last had, once forgotten).
    fn idle(state: &RiderRow) -> Option<Millis> {
        (!state.status.on_shift()).then_some(state.ts)
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
        fn keep<T: Clone>(new: Option<T>, old: Option<&Option<T>>) -> Option<T> {
            new.or_else(|| old.and_then(Clone::clone))
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
            rider_id: keep(ev.rider_id, current.map(|c| &c.rider_id)),
            vehicle: keep(ev.vehicle, current.map(|c| &c.vehicle)),
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

/// The stage's output: the rider changelog, and what riders on shift add to the district counts.
pub struct RiderSnapshots<'s> {
    /// For every complete time, each rider whose snapshot changed, with its full snapshot, or
    /// `None` once it is off shift.
    pub changes: Stream<'s, Time, Vec<Change<Id, Arc<Snapshot>>>>,
    /// What each rider on shift adds to its district's counts (see [`Contribution::of_rider`]).
    pub contributions: VecCollection<'s, Time, (DistrictId, Contribution), Diff>,
}

/// The rider snapshots of CONTRACT section 3, materialized once: each rider's latest core and
/// position (from the rider upsert) and its active deliveries (from the delivery upsert, sent to the
/// worker that owns the rider), held in one map entry per rider. For every complete time it emits
/// each rider whose snapshot changed (the rider changelog, which the serving view also reads) and
/// the change in what the rider adds to its district's counts.
///
/// A ping that stays in its district changes only the position: one map update, one output record,
/// and no count update. The rider input is already partitioned by rider id (the upsert's exchange
/// hashes the id as this stage's delivery exchange does), so it needs no exchange of its own.
/// `held` reports how many riders the stage holds (on shift, or with active deliveries).
///
/// ```
/// use dongflow_dataflow::stages::rider_snapshots;
/// use dongflow_dataflow::types::{Contribution, DeliveryRow, RiderCore, RiderPart, RiderPosition};
/// use dongflow_records::{DeliveryStatus, Id, RiderStatus};
/// use differential_dataflow::input::Input;
/// use timely::dataflow::operators::{Capture, capture::Extract};
///
/// let (changes, contributions) = timely::example(|scope| {
///     let core = RiderCore { status: RiderStatus::OnShift, rider_type: None, district: 3 };
///     let position = RiderPosition { location: None, ts: 5 };
///     let id = Id::from("r-1");
///     let riders = scope.new_collection_from(vec![(id.clone(), RiderPart::Core(core)), (id, RiderPart::Position(position))]).1;
///     let d = |id: &str| (Id::from(id), DeliveryRow { status: DeliveryStatus::PickedUp,
///         pickup_district: 0, rider_id: Some("r-1".into()), vehicle: None, ts: 9 });
///     let deliveries = scope.new_collection_from(vec![d("d-2"), d("d-1")]).1;
///     let out = rider_snapshots(riders, deliveries, Default::default());
///     (out.changes.capture(), out.contributions.inner.capture())
/// });
/// let changes: Vec<_> = changes.extract().into_iter().flat_map(|(_, v)| v).collect();
/// let snapshot = changes[0].value.as_ref().expect("on shift");
/// let ids: Vec<_> = snapshot.deliveries.iter().map(|d| d.delivery_id.as_str()).collect();
/// assert_eq!((changes.len(), snapshot.rider.district, snapshot.rider.ts, ids), (1, 3, 5, vec!["d-1", "d-2"]));
/// let mut contributions: Vec<_> = contributions.extract().into_iter().flat_map(|(_, v)| v).map(|(c, _, n)| (c, n)).collect();
/// contributions.sort();
/// assert_eq!(contributions, vec![((3, Contribution::OnShift), 1), ((3, Contribution::Delivering), 1), ((3, Contribution::Active), 2)]);
/// ```
pub fn rider_snapshots<'s>(
    riders: VecCollection<'s, Time, (Id, RiderPart), Diff>,
    deliveries: VecCollection<'s, Time, (Id, DeliveryRow), Diff>,
    held: Rc<Cell<usize>>,
) -> RiderSnapshots<'s> {
    type Update<D> = (D, Time, Diff);
    let active = deliveries.flat_map(|(delivery_id, row)| {
        let rider = row.active_for()?.clone();
        Some((rider, row.brief(delivery_id)))
    });
    let mut builder = OperatorBuilder::new("Snapshots: Riders".to_owned(), riders.inner.scope());
    let mut riders_in = builder.new_input(riders.inner, Pipeline);
    // Each active delivery goes to the worker that owns its rider (the same hash as the upsert's).
    let by_rider = Exchange::new(|((rider, _), _, _): &Update<(Id, DeliveryBrief)>| rider.hashed());
    let mut briefs_in = builder.new_input(active.inner, by_rider);
    let (changes_out, changes) = builder.new_output::<Vec<Change<Id, Arc<Snapshot>>>>();
    let (counts_out, contributions) =
        builder.new_output::<Vec<Update<(DistrictId, Contribution)>>>();
    let mut changes_out = OutputBuilder::from(changes_out);
    let mut counts_out = OutputBuilder::from(counts_out);
    builder.build(move |initial| {
        // Output goes only at the times of input: the stage holds no capability of its own.
        drop(initial);
        let mut pending: BTreeMap<Time, Pending> = BTreeMap::new();
        let mut riders = Riders::default();
        move |frontiers| {
            let mut changes_out = changes_out.activate();
            let mut counts_out = counts_out.activate();
            riders_in.for_each(|cap, data| {
                for (update, time, diff) in data.drain(..) {
                    Pending::at(&mut pending, &cap, time)
                        .riders
                        .push((update, diff));
                }
            });
            briefs_in.for_each(|cap, data| {
                for (update, time, diff) in data.drain(..) {
                    Pending::at(&mut pending, &cap, time)
                        .briefs
                        .push((update, diff));
                }
            });
            let mut largest = 0;
            while let Some(first) = pending.first_entry() {
                let time = *first.key();
                if frontiers.iter().any(|f| f.less_equal(&time)) {
                    break;
                }
                let Pending {
                    changes_cap,
                    counts_cap,
                    riders: parts,
                    briefs,
                } = first.remove();
                // Retractions (of the value held) before insertions, so that a replaced value is
                // not lost.
                for ((id, part), _) in parts.iter().filter(|(_, d)| *d < 0) {
                    riders.touch(id).retract(part);
                }
                for ((rider, brief), _) in briefs.iter().filter(|(_, d)| *d < 0) {
                    riders.touch(rider).remove_delivery(brief);
                }
                for ((id, part), _) in parts.into_iter().filter(|(_, d)| *d > 0) {
                    riders.touch(&id).insert(part);
                }
                for ((rider, brief), _) in briefs.into_iter().filter(|(_, d)| *d > 0) {
                    riders.touch(&rider).add_delivery(brief);
                }
                largest = largest.max(riders.work.len());
                let mut changes: Vec<Change<Id, Arc<Snapshot>>> =
                    Vec::with_capacity(riders.work.len());
                let mut counts: Vec<Update<(DistrictId, Contribution)>> = Vec::new();
                riders.settle(|id, value, before, after| {
                    if before != after {
                        let was = before
                            .into_iter()
                            .flat_map(|(d, n)| Contribution::of_rider(d, n));
                        let is = after
                            .into_iter()
                            .flat_map(|(d, n)| Contribution::of_rider(d, n));
                        counts.extend(was.map(|(k, n)| (k, time, -(n as Diff))));
                        counts.extend(is.map(|(k, n)| (k, time, n as Diff)));
                    }
                    // A rider off shift before and after (only its deliveries changed) has no
                    // snapshot to change.
                    if value.is_some() || before.is_some() {
                        changes.push(Change {
                            key: id,
                            value,
                            time,
                        });
                    }
                });
                if !changes.is_empty() {
                    changes_out
                        .session(&changes_cap)
                        .give_container(&mut changes);
                }
                if !counts.is_empty() {
                    counts_out.session(&counts_cap).give_container(&mut counts);
                }
            }
            // A restore or a catch-up applies one large time; the steady state, small ones.
            give_back_buffer(&mut riders.work, largest);
            give_back_map(&mut riders.held);
            held.set(riders.held.len());
        }
    });
    RiderSnapshots {
        changes,
        contributions: contributions.as_collection(),
    }
}

/// A time's input to [`rider_snapshots`], with a capability for each output.
struct Pending {
    changes_cap: Capability<Time>,
    counts_cap: Capability<Time>,
    riders: Vec<((Id, RiderPart), Diff)>,
    briefs: Vec<((Id, DeliveryBrief), Diff)>,
}

impl Pending {
    /// The pending input of `time`, made on its first update.
    fn at<'a>(
        pending: &'a mut BTreeMap<Time, Pending>,
        cap: &InputCapability<Time>,
        time: Time,
    ) -> &'a mut Pending {
        pending.entry(time).or_insert_with(|| Pending {
            changes_cap: cap.delayed(&time, 0),
            counts_cap: cap.delayed(&time, 1),
            riders: Vec::new(),
            briefs: Vec::new(),
        })
    }
}

/// What [`rider_snapshots`] holds of one rider between times: its snapshot while it is on shift
/// (shared with the serving view, which holds the same allocation), and otherwise its active
/// deliveries (they join it when its shift starts). Sixteen bytes: a rider off shift with active
/// deliveries is rare, and its list is boxed so that every other entry stays small.
#[derive(Debug)]
enum HeldRider {
    /// On shift and settled: its snapshot.
    OnShift(Arc<Snapshot>),
    /// Off shift and settled, with active deliveries (never empty). Boxed on purpose (one more
    /// allocation for a rare entry): a bare `Vec` would make every entry 32 bytes.
    #[allow(clippy::box_collection)]
    OffShift(Box<Vec<DeliveryBrief>>),
    /// The time being applied changes the rider: its parts are in `Riders::work` at this index.
    Touched(usize),
}

/// What a rider counts in: its district and number of active deliveries, while it is on shift.
type Counted = Option<(DistrictId, usize)>;

/// A rider that the time being applied changes: its parts, and what it counted before.
#[derive(Debug)]
struct Work {
    id: Id,
    counted_before: Counted,
    core: Option<RiderCore>,
    position: Option<RiderPosition>,
    /// Active deliveries, sorted by id.
    deliveries: Vec<DeliveryBrief>,
}

/// The riders of one worker, and the work of the time being applied.
#[derive(Debug, Default)]
struct Riders {
    held: FxHashMap<Id, HeldRider>,
    work: Vec<Work>,
}

impl Riders {
    /// The parts of rider `id`, taken out of its entry the first time the current time changes it.
    fn touch(&mut self, id: &Id) -> &mut Work {
        let next = self.work.len();
        let entry = self.held.entry(id.clone());
        let held = match entry {
            Entry::Occupied(held) => held.into_mut(),
            Entry::Vacant(vacant) => {
                self.work.push(Work::new(id.clone(), Vec::new()));
                vacant.insert(HeldRider::Touched(next));
                return &mut self.work[next];
            }
        };
        let work = match held {
            HeldRider::Touched(at) => return &mut self.work[*at],
            HeldRider::OnShift(s) => Work {
                id: id.clone(),
                counted_before: Some(s.counted()),
                core: Some(s.rider.core()),
                position: Some(s.rider.position()),
                deliveries: s.deliveries.to_vec(),
            },
            HeldRider::OffShift(deliveries) => Work::new(id.clone(), std::mem::take(deliveries)),
        };
        *held = HeldRider::Touched(next);
        self.work.push(work);
        &mut self.work[next]
    }

    /// Settles every rider the current time changed: its new snapshot (`None`: off shift) and
    /// what it counted before and counts now, each in `finish`.
    fn settle(&mut self, mut finish: impl FnMut(Id, Option<Arc<Snapshot>>, Counted, Counted)) {
        for work in self.work.drain(..) {
            let Work {
                id,
                counted_before,
                core,
                position,
                deliveries,
            } = work;
            let (snapshot, off_shift) = match (core, position) {
                (Some(core), Some(position)) => {
                    let s = Snapshot::compose(core, position, deliveries);
                    (Some(Arc::new(s)), Vec::new())
                }
                _ => (None, deliveries),
            };
            let counted = snapshot.as_deref().map(Snapshot::counted);
            let settled = match &snapshot {
                Some(s) => Some(HeldRider::OnShift(s.clone())),
                None if off_shift.is_empty() => None,
                None => Some(HeldRider::OffShift(Box::new(off_shift))),
            };
            match settled {
                None => {
                    self.held.remove(&id);
                }
                Some(settled) => {
                    if let Some(entry) = self.held.get_mut(&id) {
                        *entry = settled;
                    }
                }
            }
            finish(id, snapshot, counted_before, counted);
        }
    }
}

impl Work {
    /// The work of a rider off shift (no core or position held, counted nowhere) with these
    /// active deliveries.
    fn new(id: Id, deliveries: Vec<DeliveryBrief>) -> Work {
        Work {
            id,
            counted_before: None,
            core: None,
            position: None,
            deliveries,
        }
    }

    /// Removes `part` if it is the one held.
    fn retract(&mut self, part: &RiderPart) {
        match part {
            RiderPart::Core(core) => self.core = self.core.take().filter(|held| held != core),
            RiderPart::Position(p) => self.position = self.position.take().filter(|held| held != p),
        }
    }

    /// Holds `part`.
    fn insert(&mut self, part: RiderPart) {
        match part {
            RiderPart::Core(core) => self.core = Some(core),
            RiderPart::Position(position) => self.position = Some(position),
        }
    }

    /// Removes an active delivery.
    fn remove_delivery(&mut self, brief: &DeliveryBrief) {
        self.deliveries.retain(|held| held != brief);
    }

    /// Adds an active delivery, keeping them sorted by id.
    fn add_delivery(&mut self, brief: DeliveryBrief) {
        let at = self
            .deliveries
            .partition_point(|held| held.delivery_id < brief.delivery_id);
        self.deliveries.insert(at, brief);
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
///         pickup_district, rider_id: None, vehicle: None, ts: 1 });
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
    use dongflow_records::{DeliveryStatus, Label, RiderStatus};

    /// The per-rider entries stay small: a layout change that grows them shows here first (the
    /// memory benchmark and `tests/memory.rs` show what it costs).
    #[test]
    fn held_entries_are_small() {
        assert_eq!(std::mem::size_of::<HeldRider>(), 16);
        assert_eq!(std::mem::size_of::<Option<Label>>(), 8);
        assert!(
            std::mem::size_of::<RiderRow>() <= 56,
            "{}",
            std::mem::size_of::<RiderRow>()
        );
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

#[cfg(test)]
mod snapshot_stage_tests {
    use super::*;
    use differential_dataflow::input::Input;
    use dongflow_records::{DeliveryStatus, RiderStatus};
    use std::sync::mpsc;
    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::{Capture, Probe};

    type Out = (
        Vec<(Time, Vec<Change<Id, Arc<Snapshot>>>)>,
        Vec<(Time, Vec<((DistrictId, Contribution), Time, Diff)>)>,
    );

    fn core(district: DistrictId) -> RiderPart {
        RiderPart::Core(RiderCore {
            status: RiderStatus::OnShift,
            rider_type: None,
            district,
        })
    }

    fn position(ts: Millis) -> RiderPart {
        RiderPart::Position(RiderPosition { location: None, ts })
    }

    fn assigned() -> DeliveryRow {
        DeliveryRow {
            status: DeliveryStatus::Assigned,
            pickup_district: 0,
            rider_id: Some("r-1".into()),
            vehicle: None,
            ts: 1,
        }
    }

    /// Runs the stage over five times of input on `workers` workers; returns its outputs and the
    /// riders it holds at the end.
    fn run(workers: usize) -> (Out, usize) {
        let (changes_tx, changes_rx) = mpsc::channel();
        let (counts_tx, counts_rx) = mpsc::channel();
        let (held_tx, held_rx) = mpsc::channel();
        let config = timely::Config::process(workers);
        timely::execute(config, move |worker| {
            let held: Rc<Cell<usize>> = Rc::default();
            let (changes_tx, counts_tx) = (changes_tx.clone(), counts_tx.clone());
            let (mut riders, mut deliveries, probe) = worker.dataflow::<Time, _, _>(|scope| {
                let (riders_in, riders) = scope.new_collection::<(Id, RiderPart), Diff>();
                let (deliveries_in, deliveries) = scope.new_collection::<(Id, DeliveryRow), Diff>();
                let out = rider_snapshots(riders, deliveries, held.clone());
                let (probe, changes) = out.changes.probe();
                changes.capture_into(changes_tx);
                out.contributions.inner.capture_into(counts_tx);
                (riders_in, deliveries_in, probe)
            });
            if worker.index() == 0 {
                let r: Id = "r-1".into();
                let d: Id = "d-1".into();
                // 0: a delivery assigned to a rider who is not on shift yet.
                deliveries.insert((d.clone(), assigned()));
                // 1: the rider starts its shift in district 3; the delivery joins it.
                deliveries.advance_to(1);
                riders.advance_to(1);
                riders.insert((r.clone(), core(3)));
                riders.insert((r.clone(), position(10)));
                // 2: it moves to district 5.
                deliveries.advance_to(2);
                riders.advance_to(2);
                riders.remove((r.clone(), core(3)));
                riders.remove((r.clone(), position(10)));
                riders.insert((r.clone(), core(5)));
                riders.insert((r.clone(), position(20)));
                // 3: its shift ends with the delivery still active.
                deliveries.advance_to(3);
                riders.advance_to(3);
                riders.remove((r.clone(), core(5)));
                riders.remove((r.clone(), position(20)));
                // 4: the delivery ends: nothing is held any more.
                deliveries.advance_to(4);
                riders.advance_to(4);
                deliveries.remove((d, assigned()));
            }
            deliveries.advance_to(5);
            riders.advance_to(5);
            deliveries.flush();
            riders.flush();
            worker.step_while(|| probe.less_than(&5));
            held_tx.send(held.get()).expect("receiver");
        })
        .expect("runs");
        let held = held_rx.try_iter().sum();
        ((changes_rx.extract(), counts_rx.extract()), held)
    }

    #[test]
    fn a_snapshot_follows_its_rider_and_deliveries_and_is_forgotten_when_both_end() {
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
            // Nothing at 0 (not on shift) or at 4 (the delivery of a rider off shift).
            assert_eq!(
                shown,
                vec![(1, Some((3, 1))), (2, Some((5, 1))), (3, None)],
                "{workers} workers"
            );
            let mut net: BTreeMap<(DistrictId, Contribution), Diff> = BTreeMap::new();
            let mut at_2: BTreeMap<(DistrictId, Contribution), Diff> = BTreeMap::new();
            for (k, t, n) in counts.into_iter().flat_map(|(_, v)| v) {
                *net.entry(k).or_default() += n;
                if t <= 2 {
                    *at_2.entry(k).or_default() += n;
                }
            }
            at_2.retain(|_, n| *n != 0);
            net.retain(|_, n| *n != 0);
            let in_5 = [
                Contribution::OnShift,
                Contribution::Delivering,
                Contribution::Active,
            ];
            let expected: BTreeMap<_, _> = in_5.into_iter().map(|k| ((5, k), 1)).collect();
            assert_eq!(
                at_2, expected,
                "{workers} workers: counted in district 5 at 2"
            );
            assert!(
                net.is_empty(),
                "{workers} workers: nothing counted at the end: {net:?}"
            );
            assert_eq!(held, 0, "{workers} workers");
        }
    }
}
