//! Queries: typed requests from the HTTP side, answered by the workers from their arrangements at
//! one `as_of` time that every worker has completed, and merged into one consistent answer.
//!
//! Consistency rests on two facts. `as_of` is the least time every worker has completed (each
//! worker publishes its probe's frontier), so no update at or before it is still on its way. And
//! while a query is in flight its `as_of` is registered as a hold: workers never compact their traces
//! beyond the oldest hold, so each of them reads exactly the state at `as_of`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::Thread;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
use dongflow_connectors::Id;
use dongflow_dataflow::districts::DistrictId;
use dongflow_dataflow::types::{DistrictCounts, RiderPosition, Snapshot, SnapshotCore, Time};
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
    /// The engine is stopping or stopped.
    #[error("engine is shut down")]
    ShutDown,
    /// A worker did not answer in time.
    #[error("a worker did not answer within {0:?}")]
    Timeout(Duration),
}

/// A read of one worker's arrangements.
#[derive(Clone, Debug)]
pub(crate) enum Peek {
    /// Counts of one district, or of all with `None`.
    Counts(Option<DistrictId>),
    /// Snapshots of these riders.
    Snapshots(Vec<Id>),
    /// Ids of the riders on shift in a district.
    RiderIds(DistrictId),
    /// Sizes of the worker's state.
    Sizes,
}

/// One worker's part of an answer.
#[derive(Debug)]
pub(crate) enum PeekResult {
    Counts(Vec<(DistrictId, DistrictCounts)>),
    /// Join outputs and positions of the riders asked for that this worker holds.
    Snapshots(Vec<(Id, SnapshotCore)>, Vec<(Id, RiderPosition)>),
    RiderIds(Vec<Id>),
    Sizes(StateSizes),
}

/// How much state the workers hold, summed over workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StateSizes {
    /// Riders known to the rider upsert (on shift or not).
    pub riders: usize,
    /// Deliveries known to the delivery upsert, tombstones included.
    pub deliveries: usize,
    /// Updates held in the snapshot arrangement.
    pub snapshot_updates: usize,
    /// Updates held in the rider positions arrangement.
    pub position_updates: usize,
    /// Updates held in the district counts arrangement.
    pub count_updates: usize,
    /// Updates held in the riders-by-district arrangement.
    pub by_district_updates: usize,
}

impl std::ops::AddAssign for StateSizes {
    fn add_assign(&mut self, o: Self) {
        self.riders += o.riders;
        self.deliveries += o.deliveries;
        self.snapshot_updates += o.snapshot_updates;
        self.position_updates += o.position_updates;
        self.count_updates += o.count_updates;
        self.by_district_updates += o.by_district_updates;
    }
}

/// A peek sent to a worker, with the time to read at and where to reply.
#[derive(Debug)]
pub(crate) struct PeekRequest {
    pub peek: Peek,
    pub as_of: Time,
    pub reply: Sender<PeekResult>,
}

/// What the workers and the query side of one process share.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Per worker: the greatest time it has completed (0: none yet).
    pub completed: Vec<AtomicU64>,
    /// `as_of` times of queries in flight, with their number.
    holds: Mutex<BTreeMap<Time, usize>>,
    /// Per worker: where to send peeks.
    pub peeks: Vec<Sender<PeekRequest>>,
    /// Per worker: its thread, to wake it when a peek arrives.
    pub threads: Mutex<Vec<Option<Thread>>>,
    /// Set when the engine is asked to stop.
    pub stop: AtomicBool,
    /// How long a query waits for a worker.
    pub timeout: Duration,
}

impl Shared {
    pub fn new(workers: usize, timeout: Duration) -> (Arc<Self>, Vec<Receiver<PeekRequest>>) {
        let (senders, receivers) = (0..workers).map(|_| crossbeam_channel::unbounded()).unzip();
        let shared = Self {
            completed: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            holds: Mutex::new(BTreeMap::new()),
            peeks: senders,
            threads: Mutex::new(vec![None; workers]),
            stop: AtomicBool::new(false),
            timeout,
        };
        (Arc::new(shared), receivers)
    }

    fn holds(&self) -> MutexGuard<'_, BTreeMap<Time, usize>> {
        // A poisoned lock only means a query thread panicked mid-update; the map is still usable.
        self.holds.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The least time every worker has completed; 0 when some worker has completed none.
    pub fn as_of(&self) -> Time {
        self.completed
            .iter()
            .map(|c| c.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    /// The frontier up to which workers may compact: never beyond a query in flight.
    pub fn compaction_frontier(&self) -> Time {
        let holds = self.holds();
        let as_of = self.as_of();
        holds
            .keys()
            .next()
            .map_or(as_of, |&oldest| oldest.min(as_of))
    }

    fn hold(&self) -> Result<Time, QueryError> {
        let mut holds = self.holds();
        let as_of = self.as_of();
        if as_of == 0 {
            return Err(QueryError::NotReady);
        }
        *holds.entry(as_of).or_insert(0) += 1;
        Ok(as_of)
    }

    fn release(&self, as_of: Time) {
        let mut holds = self.holds();
        if let Some(n) = holds.get_mut(&as_of) {
            *n -= 1;
            if *n == 0 {
                holds.remove(&as_of);
            }
        }
    }

    fn wake(&self) {
        let threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
        threads.iter().flatten().for_each(Thread::unpark);
    }

    /// Sends `peek` to every worker and gathers their parts.
    fn fan_out(&self, peek: Peek, as_of: Time) -> Result<Vec<PeekResult>, QueryError> {
        if self.stop.load(Ordering::Acquire) {
            return Err(QueryError::ShutDown);
        }
        let (reply, replies) = crossbeam_channel::bounded(self.peeks.len());
        for worker in &self.peeks {
            let request = PeekRequest {
                peek: peek.clone(),
                as_of,
                reply: reply.clone(),
            };
            worker.send(request).map_err(|_| QueryError::ShutDown)?;
        }
        drop(reply);
        self.wake();
        let deadline = std::time::Instant::now() + self.timeout;
        (0..self.peeks.len())
            .map(|_| {
                replies.recv_deadline(deadline).map_err(|e| match e {
                    crossbeam_channel::RecvTimeoutError::Timeout => {
                        QueryError::Timeout(self.timeout)
                    }
                    crossbeam_channel::RecvTimeoutError::Disconnected => QueryError::ShutDown,
                })
            })
            .collect()
    }

    /// Answers a query at the current `as_of`, holding compaction back while it runs.
    pub fn query(&self, query: &Query) -> Result<Answer, QueryError> {
        let as_of = self.hold()?;
        let body = self.answer(query, as_of);
        self.release(as_of);
        Ok(Answer { as_of, body: body? })
    }

    /// The sizes of every worker's state, summed.
    pub fn sizes(&self) -> Result<StateSizes, QueryError> {
        let mut total = StateSizes::default();
        for part in self.fan_out(Peek::Sizes, 0)? {
            if let PeekResult::Sizes(s) = part {
                total += s;
            }
        }
        Ok(total)
    }

    fn answer(&self, query: &Query, as_of: Time) -> Result<AnswerBody, QueryError> {
        Ok(match query {
            Query::District(d) => {
                let counts = counts(self.fan_out(Peek::Counts(Some(*d)), as_of)?);
                AnswerBody::District(counts.first().map(|(_, c)| *c).unwrap_or_default())
            }
            Query::Districts => {
                AnswerBody::Districts(counts(self.fan_out(Peek::Counts(None), as_of)?))
            }
            Query::Rider(id) => {
                let found = snapshots(self.fan_out(Peek::Snapshots(vec![id.clone()]), as_of)?);
                AnswerBody::Rider(found.into_iter().next().map(|(_, s)| s))
            }
            Query::RidersOf(d) => {
                let mut ids = Vec::new();
                for part in self.fan_out(Peek::RiderIds(*d), as_of)? {
                    if let PeekResult::RiderIds(mut part) = part {
                        ids.append(&mut part);
                    }
                }
                let found = if ids.is_empty() {
                    Vec::new()
                } else {
                    snapshots(self.fan_out(Peek::Snapshots(ids), as_of)?)
                };
                AnswerBody::Riders(found)
            }
        })
    }
}

fn counts(parts: Vec<PeekResult>) -> Vec<(DistrictId, DistrictCounts)> {
    let mut all: Vec<_> = parts
        .into_iter()
        .flat_map(|p| match p {
            PeekResult::Counts(c) => c,
            _ => Vec::new(),
        })
        .collect();
    all.sort_by_key(|(d, _)| *d);
    all
}

/// Joins the workers' join outputs with the positions read at the same `as_of`, by rider id.
fn snapshots(parts: Vec<PeekResult>) -> Vec<(Id, Snapshot)> {
    let mut cores = Vec::new();
    let mut positions = std::collections::HashMap::new();
    for part in parts {
        if let PeekResult::Snapshots(c, p) = part {
            cores.extend(c);
            positions.extend(p);
        }
    }
    cores.sort_by(|a, b| a.0.cmp(&b.0));
    cores
        .into_iter()
        .filter_map(|(id, core)| {
            // A rider on shift always has a position; its absence would be a torn read, so it is
            // left out rather than invented.
            let position = positions.remove(&id)?;
            Some((id, Snapshot::compose(core, position)))
        })
        .collect()
}
