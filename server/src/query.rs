//! Queries and answers: typed requests from the HTTP side, answered from the serving view
//! ([`crate::view`]) at one consistent `as_of`; and what the query side shares with the workers
//! (their completed times, and the sizes of their state as they publish them).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::Thread;

use dongflow_connectors::Id;
use dongflow_dataflow::districts::DistrictId;
use dongflow_dataflow::types::{DistrictCounts, Snapshot, Time};
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// What a client asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Query {
    /// One district's counts.
    District(DistrictId),
    /// Every district with any nonzero count.
    Districts,
    /// One rider's snapshot.
    Rider(Id),
    /// The snapshots of the riders on shift in a district.
    RidersOf(DistrictId),
}

/// The answer to a [`Query`], all of it at `as_of`.
#[derive(Clone, Debug, PartialEq)]
pub struct Answer {
    /// The dataflow time the answer reflects.
    pub as_of: Time,
    /// Whether it comes from a restored checkpoint rather than the live state.
    pub stale: bool,
    /// The data.
    pub body: AnswerBody,
}

/// The data of an [`Answer`].
#[derive(Clone, Debug, PartialEq)]
pub enum AnswerBody {
    /// One district (zeros when it has no activity).
    District(DistrictCounts),
    /// Districts with activity, sorted by id (code order).
    Districts(Vec<(DistrictId, DistrictCounts)>),
    /// One rider's snapshot, if the rider is on shift.
    Rider(Option<Snapshot>),
    /// Snapshots sorted by rider id.
    Riders(Vec<(Id, Snapshot)>),
}

/// Why a query has no answer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum QueryError {
    /// No time is complete yet: the engine has no state to show.
    #[error("no state yet")]
    NotReady,
    /// The live state is still catching up with its input and no stale view is loaded yet.
    #[error("the live state is catching up and no stale view is loaded yet")]
    CatchingUp,
    /// The engine is stopping or stopped.
    #[error("engine is shut down")]
    ShutDown,
}

/// How much state the workers hold, summed over workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSizes {
    /// Riders known to the rider upsert (on shift or not).
    pub riders: usize,
    /// Deliveries known to the delivery upsert, tombstones included.
    pub deliveries: usize,
    /// Riders held by the rider stage: with a state (as `riders`), or with active deliveries that
    /// wait for one.
    pub snapshot_riders: usize,
    /// Updates held in the district counts arrangement.
    pub count_updates: usize,
}

impl std::ops::AddAssign for StateSizes {
    fn add_assign(&mut self, o: Self) {
        self.riders += o.riders;
        self.deliveries += o.deliveries;
        self.snapshot_riders += o.snapshot_riders;
        self.count_updates += o.count_updates;
    }
}

/// What the workers and the query side of one process share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Per worker: the greatest time it has completed (0: none yet).
    pub completed: Vec<AtomicU64>,
    /// Per worker: the sizes of its state, as it last published them (every loop round).
    pub sizes: Vec<Mutex<StateSizes>>,
    /// Per worker: its thread, to wake it when the engine stops.
    pub threads: Mutex<Vec<Option<Thread>>>,
    /// Set when the engine is asked to stop.
    pub stop: AtomicBool,
}

impl Shared {
    pub fn new(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            completed: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            sizes: (0..workers).map(|_| Mutex::default()).collect(),
            threads: Mutex::new(vec![None; workers]),
            stop: AtomicBool::new(false),
        })
    }

    /// The least time every worker has completed; 0 when some worker has completed none. Traces
    /// are compacted up to it: no read of the workers' arrangements asks for an older time.
    pub fn as_of(&self) -> Time {
        self.completed
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    /// The sizes of every worker's state, summed, as the workers last published them.
    pub fn sizes(&self) -> Result<StateSizes, QueryError> {
        if self.stop.load(Ordering::Acquire) {
            return Err(QueryError::ShutDown);
        }
        let mut total = StateSizes::default();
        for worker in &self.sizes {
            total += *worker.lock().unwrap_or_else(|e| e.into_inner());
        }
        Ok(total)
    }
}
