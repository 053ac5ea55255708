//! The one place where the stages are wired into the dataflow.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use differential_dataflow::operators::arrange::Arranged;
use differential_dataflow::AsCollection;
use dongflow_records::{DeliveryEvent, Id, RiderEvent};
use timely::dataflow::operators::generic::operator::empty;
use timely::dataflow::Stream;

use crate::districts::DistrictId;
use crate::districts::DistrictIndex;
use crate::stages::{
    active_deliveries, changes_per_time, count_by_district, enrich_with_district, rider_snapshots,
    waiting_contributions, CountsTrace, DeliveryRule, DeliveryState, RiderRule,
};
use crate::types::{Change, DistrictCounts, RiderRow, Snapshot, Time};
use crate::upsert::{upsert, Seed, SnapshotSlot, UpsertCounters, UpsertState};

/// Default time a terminal delivery is remembered: 6 hours of dataflow time.
pub const DEFAULT_TERMINAL_TTL_MS: Time = 6 * 3600 * 1000;

/// Default time a rider off shift is remembered with its last type and location: a day of dataflow
/// time, so that a rider who ends a shift at night and starts one the next morning is known.
pub const DEFAULT_RIDER_TTL_MS: Time = 24 * 3600 * 1000;

/// The per-worker state the dataflow keeps outside its arrangements, shared with the worker loop
/// (for checkpoints and seeding).
#[derive(Clone, Debug)]
pub struct WorkerState {
    /// Latest rider per id, as its snapshot.
    pub riders: Rc<RefCell<UpsertState<RiderRule>>>,
    /// Latest delivery per id, terminal ones as tombstones.
    pub deliveries: Rc<RefCell<UpsertState<DeliveryRule>>>,
    /// Checkpoint requests to the rider upsert, and its snapshots.
    pub rider_snapshots: Rc<SnapshotSlot<RiderRow>>,
    /// Checkpoint requests to the delivery upsert, and its snapshots.
    pub delivery_snapshots: Rc<SnapshotSlot<DeliveryState>>,
}

impl WorkerState {
    /// Empty state; terminal deliveries are remembered for `terminal_ttl` ms, riders off shift for
    /// `rider_ttl` ms after their last event (`None`: for good).
    pub fn new(terminal_ttl: Time, rider_ttl: Option<Time>) -> Self {
        let riders = UpsertState::shared(terminal_ttl);
        riders.borrow_mut().forget_idle_after(rider_ttl);
        Self {
            riders,
            deliveries: UpsertState::shared(terminal_ttl),
            rider_snapshots: Rc::default(),
            delivery_snapshots: Rc::default(),
        }
    }
}

/// Counters of the upserts, shared by every worker of a process.
#[derive(Clone, Debug, Default)]
pub struct DataflowCounters {
    /// Rider events.
    pub riders: Arc<UpsertCounters>,
    /// Delivery events.
    pub deliveries: Arc<UpsertCounters>,
}

/// What the dataflow offers to queries and sinks.
pub struct Outputs<'s> {
    /// Rider snapshots per time, partitioned by rider id; `None` when the rider's shift ended.
    pub riders: Stream<'s, Time, Vec<Change<Id, Arc<Snapshot>>>>,
    /// District counts by district.
    pub counts: Arranged<'s, CountsTrace>,
}

/// The dataflow's inputs.
pub struct Inputs<'s> {
    /// Rider events.
    pub riders: Stream<'s, Time, Vec<RiderEvent>>,
    /// Delivery events.
    pub deliveries: Stream<'s, Time, Vec<DeliveryEvent>>,
    /// A checkpoint's riders, as a restart brings them back (each worker gives a share).
    pub rider_seeds: Stream<'s, Time, Vec<Seed<RiderRow>>>,
    /// A checkpoint's deliveries, the same way.
    pub delivery_seeds: Stream<'s, Time, Vec<Seed<DeliveryState>>>,
}

impl<'s> Inputs<'s> {
    /// Event inputs without seeds (a start from nothing).
    pub fn unseeded(
        riders: Stream<'s, Time, Vec<RiderEvent>>,
        deliveries: Stream<'s, Time, Vec<DeliveryEvent>>,
    ) -> Self {
        use timely::dataflow::operators::generic::operator::empty;
        let scope = riders.scope();
        Self {
            riders,
            deliveries,
            rider_seeds: empty(scope),
            delivery_seeds: empty(scope),
        }
    }
}

/// Wires the dataflow: enrich, upsert, rider snapshots, count, arrange.
///
/// ```
/// use dongflow_dataflow::{build, build::{changelogs, Inputs}, districts::DistrictIndex, DataflowCounters, WorkerState};
/// use dongflow_records::{Coord, DeliveryEvent, RiderEvent, RiderStatus};
/// use timely::dataflow::operators::{capture::Extract, vec::Input, Capture, Probe};
/// use std::sync::Arc;
///
/// let (tx, rx) = std::sync::mpsc::channel();
/// timely::execute_directly(move |worker| {
///     let index = Arc::new(DistrictIndex::builtin_seoul());
///     let coex = index.id_of("1168000000").unwrap(); // 강남구
///     let state = WorkerState::new(1_000, None);
///     let (mut riders, mut deliveries, probe) = worker.dataflow::<u64, _, _>(|scope| {
///         let (riders, rider_stream) = scope.new_input::<RiderEvent>();
///         let (deliveries, delivery_stream) = scope.new_input::<DeliveryEvent>();
///         let inputs = Inputs::unseeded(rider_stream, delivery_stream);
///         let out = build(inputs, index.clone(), &state, &DataflowCounters::default());
///         let (probe, _) = out.counts.stream.clone().probe();
///         changelogs(&out).districts.capture_into(tx.clone());
///         (riders, deliveries, probe)
///     });
///     let at = Some(Coord { lat: 37.5089, lon: 127.0631 });
///     riders.send(RiderEvent { rider_id: "r-1".into(), status: RiderStatus::ShiftStarted, rider_type: None, location: at, ts: 1 });
///     riders.advance_to(1);
///     deliveries.advance_to(1);
///     worker.step_while(|| probe.less_than(&1));
/// });
/// let changes: Vec<_> = rx.extract().into_iter().flat_map(|(_, v)| v).collect();
/// let coex = DistrictIndex::builtin_seoul().id_of("1168000000").unwrap();
/// let counts = changes[0].value.expect("nonzero counts");
/// assert_eq!((changes.len(), changes[0].key), (1, coex));
/// assert_eq!((counts.riders_on_shift, counts.riders_idle()), (1, 1));
/// ```
pub fn build<'s>(
    inputs: Inputs<'s>,
    districts: Arc<DistrictIndex>,
    state: &WorkerState,
    counters: &DataflowCounters,
) -> Outputs<'s> {
    let riders = enrich_with_district(inputs.riders, districts.clone());
    let deliveries = enrich_with_district(inputs.deliveries, districts);
    let deliveries = upsert::<DeliveryRule>(
        deliveries,
        inputs.delivery_seeds,
        empty(riders.scope()),
        "Upsert: Deliveries",
        state.deliveries.clone(),
        counters.deliveries.clone(),
        state.delivery_snapshots.clone(),
    )
    .as_collection();
    let snapshots = rider_snapshots(
        riders,
        inputs.rider_seeds,
        active_deliveries(deliveries.clone()),
        state.riders.clone(),
        counters.riders.clone(),
        state.rider_snapshots.clone(),
    );
    let contributions = snapshots
        .contributions
        .concat(waiting_contributions(deliveries));
    Outputs {
        riders: snapshots.changes,
        counts: count_by_district(contributions),
    }
}

/// The changelog streams of CONTRACT section 5, wired on demand (only when something writes them).
pub struct Changelogs<'s> {
    /// District counts per time; `None` when a district's counts all became zero.
    pub districts: Stream<'s, Time, Vec<Change<DistrictId, DistrictCounts>>>,
    /// Rider snapshots per time; `None` when the rider's shift ended.
    pub riders: Stream<'s, Time, Vec<Change<Id, Arc<Snapshot>>>>,
}

/// Wires the changelog streams onto the outputs of [`build`].
pub fn changelogs<'s>(outputs: &Outputs<'s>) -> Changelogs<'s> {
    let counts = outputs
        .counts
        .clone()
        .as_collection(|district, counts| (*district, *counts));
    Changelogs {
        districts: changes_per_time(counts, "Changelog: Districts"),
        riders: outputs.riders.clone(),
    }
}
