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
    /// Another process no longer holds the requested time (its traces moved on): ask again.
    #[error("as_of {0} is older than what is kept")]
    TooOld(Time),
    /// Another process of the cluster could not be asked.
    #[error("peer {url}: {message}")]
    Peer {
        /// The peer's base URL.
        url: String,
        /// What went wrong.
        message: String,
    },
}

/// A read of one worker's arrangements.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Peek {
    /// Counts of one district, or of all with `None`.
    Counts(Option<DistrictId>),
    /// Snapshots of these riders.
    Snapshots(Vec<Id>),
    /// Ids of the riders on shift in a district.
    RiderIds(DistrictId),
    /// Sizes of the worker's state.
    Sizes,
}

/// One worker's (or one process's) part of an answer.
#[derive(Debug, Serialize, Deserialize)]
pub enum PeekResult {
    /// District counts.
    Counts(Vec<(DistrictId, DistrictCounts)>),
    /// Join outputs and positions of the riders asked for that this worker holds.
    Snapshots(Vec<(Id, SnapshotCore)>, Vec<(Id, RiderPosition)>),
    /// Rider ids.
    RiderIds(Vec<Id>),
    /// State sizes.
    Sizes(StateSizes),
}

/// How much state the workers hold, summed over workers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
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
    /// History kept behind `as_of` for reads by other processes (ms).
    retain_ms: Time,
    /// The compaction frontier last handed to the workers: no read may ask for an older time.
    since: AtomicU64,
    /// The other processes of the cluster, once known.
    peers: std::sync::OnceLock<Peers>,
}

/// A read asked of another process: one peek at one time.
#[derive(Debug, Serialize, Deserialize)]
pub struct RemotePeek {
    /// The time to read at.
    pub as_of: Time,
    /// What to read.
    pub peek: Peek,
}

/// The other processes of a cluster, asked over HTTP for their parts of an answer.
#[derive(Debug)]
struct Peers {
    urls: Vec<String>,
    agent: ureq::Agent,
}

impl Peers {
    /// Asks every peer in parallel for its part of `peek` at `as_of`.
    fn fan_out(&self, peek: &Peek, as_of: Time) -> Result<Vec<PeekResult>, QueryError> {
        let request = RemotePeek {
            as_of,
            peek: peek.clone(),
        };
        std::thread::scope(|scope| {
            let asks: Vec<_> = self
                .urls
                .iter()
                .map(|url| {
                    let request = &request;
                    scope.spawn(move || self.ask(url, request))
                })
                .collect();
            asks.into_iter()
                .map(|ask| ask.join().unwrap_or_else(|_| Err(QueryError::ShutDown)))
                .collect()
        })
    }

    fn ask(&self, url: &str, request: &RemotePeek) -> Result<PeekResult, QueryError> {
        let peer = |message: String| QueryError::Peer {
            url: url.to_string(),
            message,
        };
        let mut response = self
            .agent
            .post(&format!("{url}/internal/v1/peek"))
            .send_json(request)
            .map_err(|e| peer(e.to_string()))?;
        match response.status().as_u16() {
            200 => response
                .body_mut()
                .read_json()
                .map_err(|e| peer(e.to_string())),
            409 => Err(QueryError::TooOld(request.as_of)),
            status => Err(peer(format!(
                "status {status}: {}",
                response.body_mut().read_to_string().unwrap_or_default()
            ))),
        }
    }
}

impl Shared {
    pub fn new(
        workers: usize,
        timeout: Duration,
        retain_ms: Time,
    ) -> (Arc<Self>, Vec<Receiver<PeekRequest>>) {
        let (senders, receivers) = (0..workers).map(|_| crossbeam_channel::unbounded()).unzip();
        let shared = Self {
            completed: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            holds: Mutex::new(BTreeMap::new()),
            peeks: senders,
            threads: Mutex::new(vec![None; workers]),
            stop: AtomicBool::new(false),
            timeout,
            retain_ms,
            since: AtomicU64::new(0),
            peers: std::sync::OnceLock::new(),
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

    /// The frontier up to which workers may compact: `retain_ms` behind `as_of`, and never beyond a
    /// query in flight.
    pub fn compaction_frontier(&self) -> Time {
        let holds = self.holds();
        let frontier = self.as_of().saturating_sub(self.retain_ms);
        let frontier = holds
            .keys()
            .next()
            .map_or(frontier, |&oldest| oldest.min(frontier));
        self.since
            .fetch_max(frontier, Ordering::AcqRel)
            .max(frontier)
    }

    /// Registers a hold on `as_of` for a read asked by another process, if the traces still hold
    /// that time. Returns false when `as_of` is older than what the workers keep.
    pub fn hold_at(&self, as_of: Time) -> bool {
        let mut holds = self.holds();
        if as_of < self.since.load(Ordering::Acquire) {
            return false;
        }
        *holds.entry(as_of).or_insert(0) += 1;
        true
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

    /// Releases a hold taken by [`Shared::hold_at`] or a query.
    pub fn release(&self, as_of: Time) {
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

    /// Sets the base URLs of the other processes of the cluster (once).
    pub fn set_peers(&self, urls: Vec<String>, timeout: Duration) {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(timeout))
            .build()
            .into();
        let _ = self.peers.set(Peers { urls, agent });
    }

    /// Answers a query at the current `as_of`, holding compaction back while it runs. When another
    /// process has already let that time go, the query is asked again at a newer `as_of`.
    pub fn query(&self, query: &Query) -> Result<Answer, QueryError> {
        let mut attempt = 0;
        loop {
            let as_of = self.hold()?;
            let body = self.answer(query, as_of);
            self.release(as_of);
            match body {
                Err(QueryError::TooOld(_)) if attempt < 5 => attempt += 1,
                body => return Ok(Answer { as_of, body: body? }),
            }
        }
    }

    /// This process's part of a read asked by another process: held at `as_of` (if still kept),
    /// answered once this process has completed `as_of`.
    pub fn serve_remote(&self, request: RemotePeek) -> Result<PeekResult, QueryError> {
        let RemotePeek { as_of, peek } = request;
        if !self.hold_at(as_of) {
            return Err(QueryError::TooOld(as_of));
        }
        let deadline = std::time::Instant::now() + self.timeout;
        let result = loop {
            if self.as_of() >= as_of {
                break self.fan_out(peek, as_of).map(merge);
            }
            if std::time::Instant::now() >= deadline {
                break Err(QueryError::Timeout(self.timeout));
            }
            // The cluster's frontier reaches every process within milliseconds.
            std::thread::sleep(Duration::from_micros(200));
        };
        self.release(as_of);
        result
    }

    /// This process's workers' parts and, in a cluster, the other processes' parts.
    fn gather(&self, peek: Peek, as_of: Time) -> Result<Vec<PeekResult>, QueryError> {
        let mut parts = self.fan_out(peek.clone(), as_of)?;
        if let Some(peers) = self.peers.get() {
            parts.extend(peers.fan_out(&peek, as_of)?);
        }
        Ok(parts)
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
                let counts = counts(self.gather(Peek::Counts(Some(*d)), as_of)?);
                AnswerBody::District(counts.first().map(|(_, c)| *c).unwrap_or_default())
            }
            Query::Districts => {
                AnswerBody::Districts(counts(self.gather(Peek::Counts(None), as_of)?))
            }
            Query::Rider(id) => {
                let found = snapshots(self.gather(Peek::Snapshots(vec![id.clone()]), as_of)?);
                AnswerBody::Rider(found.into_iter().next().map(|(_, s)| s))
            }
            Query::RidersOf(d) => {
                let mut ids = Vec::new();
                for part in self.gather(Peek::RiderIds(*d), as_of)? {
                    if let PeekResult::RiderIds(mut part) = part {
                        ids.append(&mut part);
                    }
                }
                let found = if ids.is_empty() {
                    Vec::new()
                } else {
                    snapshots(self.gather(Peek::Snapshots(ids), as_of)?)
                };
                AnswerBody::Riders(found)
            }
        })
    }
}

/// Concatenates the parts of one kind of peek into one part.
fn merge(parts: Vec<PeekResult>) -> PeekResult {
    let mut parts = parts.into_iter();
    let Some(mut first) = parts.next() else {
        return PeekResult::RiderIds(Vec::new());
    };
    for part in parts {
        match (&mut first, part) {
            (PeekResult::Counts(a), PeekResult::Counts(b)) => a.extend(b),
            (PeekResult::Snapshots(a, p), PeekResult::Snapshots(b, q)) => {
                a.extend(b);
                p.extend(q);
            }
            (PeekResult::RiderIds(a), PeekResult::RiderIds(b)) => a.extend(b),
            (PeekResult::Sizes(a), PeekResult::Sizes(b)) => *a += b,
            _ => {}
        }
    }
    first
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
