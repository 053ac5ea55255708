//! The engine: timely workers running the dataflow, each fed by its own source, publishing how much
//! state it holds between steps and compacting its traces as time moves on.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use differential_dataflow::trace::TraceReader;
use dongflow_connectors::source::{EventSource, Polled};
use dongflow_dataflow::build::{changelogs, Changelogs};
use dongflow_dataflow::districts::DistrictIndex;
use dongflow_dataflow::stages::{CountsTrace, SnapshotTrace};
use dongflow_dataflow::trace_size::trace_len;
use dongflow_dataflow::types::{Change, Time};
use dongflow_dataflow::upsert::owner;
use dongflow_dataflow::{build, DataflowCounters, WorkerState};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::input::Handle as InputHandle;
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::Probe;
use timely::dataflow::Stream;
use timely::progress::frontier::AntichainRef;
use timely::WorkerConfig;

use crate::changelog::{
    ChangelogSink, Cleared, ClearedTopic, Clearing, ClearingProgress, HeldKeysSource, WorkerTopics,
    Writer,
};
use crate::query::{Answer, Query, QueryError, Shared, StateSizes};
use crate::recovery::{retract_published, Restored, WorkerPart};
use crate::view::{attach_view, ServingView, ViewApplier, ViewFeed};

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Timely worker threads in this process.
    pub workers: usize,
    /// The district map.
    pub districts: Arc<DistrictIndex>,
    /// How long terminal deliveries are remembered (dataflow ms).
    pub terminal_ttl: Time,
    /// The most events a worker takes from its source per step.
    pub max_batch: usize,
    /// The most batches a worker keeps in the dataflow before taking more input.
    pub max_in_flight: usize,
    /// How long an idle worker parks before it advances time again.
    pub idle_park: Duration,
    /// The timely cluster this process belongs to; `None` for a single process.
    pub cluster: Option<ClusterSpec>,
    /// Where the changelog goes; `None` writes none.
    pub changelog: Option<Arc<dyn ChangelogSink>>,
    /// Checkpoints: every `interval` ms of dataflow time (and once more at a clean stop), each
    /// worker hands its part to `parts`. `None` takes none.
    pub checkpoint: Option<CheckpointSettings>,
    /// A checkpoint to start from: each worker seeds the ids it owns.
    pub restore: Option<Arc<Restored>>,
    /// Whether the changelog already holds the restored state (a clean stop published it, and
    /// nothing since; see [`Restored::published`]). It is then shown downstream at the
    /// checkpoint's own time and not published again; otherwise it is shown at the restart's
    /// time, and the changelog is reconciled with it once caught up (see [`Clearing`]), so that a
    /// changelog that lost records in a crash is made whole.
    pub restore_published: bool,
    /// The keys the changelog held at start, with their values' fingerprints, once read: once the
    /// state has caught up, each worker writes what differs of the keys it owns and tombstones
    /// the held keys the state lacks (see [`Clearing`]). `None` writes straight through (the
    /// changelog holds the restored state).
    pub changelog_held: Option<HeldKeysSource>,
}

/// How often checkpoints are taken and where their parts go.
#[derive(Clone, Debug)]
pub struct CheckpointSettings {
    /// Dataflow ms between checkpoints; they fall on multiples of it, the same in every process.
    pub interval: Time,
    /// The writer's inbox.
    pub parts: crossbeam_channel::Sender<WorkerPart>,
    /// The state dir: its changelog marks are retracted before anything is published.
    pub state_dir: std::path::PathBuf,
}

/// A timely cluster of several processes with the same number of workers each.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// This process's index.
    pub process: usize,
    /// `host:port` of every process, in process order.
    pub addresses: Vec<String>,
}

impl EngineConfig {
    /// Defaults for `workers` threads over `districts`.
    pub fn new(workers: usize, districts: Arc<DistrictIndex>) -> Self {
        Self {
            workers: workers.max(1),
            districts,
            terminal_ttl: dongflow_dataflow::build::DEFAULT_TERMINAL_TTL_MS,
            max_batch: 200_000,
            max_in_flight: 2,
            idle_park: Duration::from_millis(1),
            cluster: None,
            changelog: None,
            checkpoint: None,
            restore: None,
            restore_published: false,
            changelog_held: None,
        }
    }
}

/// Why the engine could not start.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The number of sources differs from the number of workers.
    #[error("{sources} sources given for {workers} workers")]
    SourceCount {
        /// Sources given.
        sources: usize,
        /// Workers configured.
        workers: usize,
    },
    /// Timely could not start its workers.
    #[error("cannot start workers: {0}")]
    Timely(String),
    /// The processes of the cluster could not connect.
    #[error("cannot connect to the cluster's other processes")]
    Connect(#[from] crate::cluster::ConnectError),
    /// A thread of the engine could not start.
    #[error("cannot start a thread")]
    Thread(#[from] std::io::Error),
}

/// Progress of the inputs, for waiting until everything fed has been processed.
#[derive(Debug)]
struct InputProgress {
    /// Per worker: the latest time at which it pushed events.
    pushed: Vec<AtomicU64>,
    /// Per worker: whether its source has ended.
    ended: Vec<AtomicBool>,
    /// Events pushed into the dataflow, all workers.
    events: AtomicU64,
    /// Per worker of every process (by global index): the time of its last push when its source
    /// first said it had caught up (0: not yet), as the marks every worker broadcasts through the
    /// dataflow tell. Readiness and clearing wait for the whole cluster's input, not this process's
    /// alone.
    caught_up_everywhere: Vec<AtomicU64>,
    /// The time of the checkpoint taken at a clean stop (0: not stopping yet).
    final_at: AtomicU64,
    /// Workers done with their part of the final checkpoint.
    final_done: std::sync::atomic::AtomicUsize,
    /// How far the workers have cleared their changelog topics of what earlier runs left (see
    /// [`Clearing`]).
    changelog_clearing: Arc<ClearingProgress>,
}

impl InputProgress {
    /// Records a stop of the cluster at `at`; an earlier one wins (no worker has reached either
    /// yet, see [`STOP_MARGIN`]).
    fn stop_at(&self, at: Time) {
        let _ = self
            .final_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now == 0 || at < now).then_some(at)
            });
    }

    /// The latest time pushed when the last source of the cluster caught up with what it had at
    /// start: once that time is complete, the state is current. `None` until every source of every
    /// process has caught up.
    fn caught_up_through(&self) -> Option<Time> {
        let mut latest = 0;
        for mark in &self.caught_up_everywhere {
            let t = mark.load(Ordering::Acquire);
            if t == 0 {
                return None;
            }
            latest = latest.max(t);
        }
        Some(latest)
    }
}

/// What the rest of the process may hold of a running engine: queries, progress and counters.
/// Cheap to clone; every clone talks to the same workers.
#[derive(Clone)]
pub struct EngineHandle {
    shared: Arc<Shared>,
    view: Arc<ServingView>,
    progress: Arc<InputProgress>,
    counters: DataflowCounters,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("workers", &self.shared.sizes.len())
            .finish()
    }
}

/// A running engine. It dereferences to its [`EngineHandle`]; dropping it stops the workers.
pub struct Engine {
    handle: EngineHandle,
    guards: Option<timely::communication::WorkerGuards<()>>,
    applier: Option<ViewApplier>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.handle.fmt(f)
    }
}

/// Records' worth of merging an arrangement does per scheduling when it has nothing else to do.
const IDLE_MERGE_EFFORT: isize = 1_000;

/// Timely's worker settings: arrangements keep merging while idle (at [`IDLE_MERGE_EFFORT`]), so
/// that after a burst their batches come together and retracted updates are let go, instead of
/// waiting for the next input to do that work.
fn worker_config() -> WorkerConfig {
    let mut config = WorkerConfig::default();
    let differential =
        differential_dataflow::Config::default().idle_merge_effort(Some(IDLE_MERGE_EFFORT));
    differential_dataflow::configure(&mut config, &differential);
    config
}

/// How much lower than the rest of the process the workers (and the checkpoint writer) run, as a
/// nice value.
const WORKER_NICE: i32 = 5;

/// Lowers the calling thread's scheduling priority by [`WORKER_NICE`]: for the workers and the
/// checkpoint writer. When every core is busy, the HTTP threads, the view thread and the Kafka
/// clients then go first and the workers take the rest: an answer waits less for a core, while the
/// workers, which take larger batches when they fall behind, catch up in their next step. At 50k
/// events/s under a query load, the point queries' p99 was 1.3–2.8 ms at the same priority and
/// 0.6–1 ms at +5; at +10 the input lagged after a query load; freshness without queries did not
/// change beyond the noise (README, Performance).
pub(crate) fn yield_to_queries() {
    #[cfg(target_os = "linux")]
    {
        let tid = rustix::thread::gettid();
        let result = rustix::process::getpriority_process(Some(tid)).and_then(|nice| {
            rustix::process::setpriority_process(Some(tid), (nice + WORKER_NICE).min(19))
        });
        if let Err(e) = result {
            tracing::debug!("worker priority unchanged: {e}");
        }
    }
}

/// Wall-clock time in ms since the Unix epoch: the ingest time that stamps batches.
pub use dongflow_connectors::now_ms;

impl Engine {
    /// Starts `config.workers` workers in this process, worker `i` reading `sources[i]`.
    pub fn start(
        config: EngineConfig,
        sources: Vec<Box<dyn EventSource>>,
    ) -> Result<Engine, EngineError> {
        let workers = config.workers;
        if sources.len() != workers {
            return Err(EngineError::SourceCount {
                sources: sources.len(),
                workers,
            });
        }
        let shared = Shared::new(workers);
        let everywhere = workers * config.cluster.as_ref().map_or(1, |c| c.addresses.len());
        let progress = Arc::new(InputProgress {
            pushed: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            ended: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            events: AtomicU64::new(0),
            caught_up_everywhere: (0..everywhere).map(|_| AtomicU64::new(0)).collect(),
            final_at: AtomicU64::new(0),
            final_done: std::sync::atomic::AtomicUsize::new(0),
            changelog_clearing: Arc::default(),
        });
        let counters = DataflowCounters::default();
        let slots: Mutex<Vec<Option<WorkerSlot>>> = Mutex::new(
            sources
                .into_iter()
                .map(|source| Some(WorkerSlot { source }))
                .collect(),
        );
        let (builders, others) = match &config.cluster {
            None => timely::CommunicationConfig::Process(workers)
                .try_build()
                .map_err(EngineError::Timely)?,
            Some(c) => crate::cluster::connect(c.process, &c.addresses, workers)?,
        };
        let view = ServingView::new();
        let mut applier = ViewApplier::start(view.clone())?;
        // The first worker of this process feeds the view.
        let feed = Mutex::new(applier.take_feed());
        let (shared2, progress2, counters2) = (shared.clone(), progress.clone(), counters.clone());
        let retracted = std::sync::Barrier::new(workers);
        let guards =
            timely::execute::execute_from(builders, others, worker_config(), move |worker| {
                // Global worker index = process * workers + local index.
                let index = worker.index() % workers;
                // Workers run once every process of the cluster is connected, so every process has
                // loaded its checkpoint (and seen its marks) by now. Before any worker here can
                // publish, the marks go: from now on the changelog may hold more than a checkpoint.
                if index == 0 {
                    if let Some(settings) = &config.checkpoint {
                        retract_marks(&settings.state_dir);
                    }
                }
                retracted.wait();
                yield_to_queries();
                let slot = slots.lock().unwrap_or_else(|e| e.into_inner())[index].take();
                let Some(slot) = slot else { return };
                let feed = match index {
                    0 => feed.lock().unwrap_or_else(|e| e.into_inner()).take(),
                    _ => None,
                };
                let mut w = WorkerLoop::new(
                    worker,
                    slot,
                    &config,
                    shared2.clone(),
                    progress2.clone(),
                    &counters2,
                    feed,
                );
                w.run(worker);
            })
            .map_err(EngineError::Timely)?;
        Ok(Engine {
            handle: EngineHandle {
                shared,
                view,
                progress,
                counters,
            },
            guards: Some(guards),
            applier: Some(applier),
        })
    }

    /// A handle for queries and progress, to give to other threads.
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// Stops the workers and waits for them. In a cluster, every process must be asked to stop
    /// (see [`EngineHandle::request_stop`]): workers finish only when all inputs everywhere close.
    /// Returns whether every worker ended normally (then everything pushed went through the
    /// dataflow, into the changelog sink and the view) and cleared the changelog of what earlier
    /// runs left (see [`Clearing`]).
    pub fn stop(mut self) -> bool {
        self.shutdown()
    }

    fn shutdown(&mut self) -> bool {
        self.handle.request_stop();
        let mut clean = true;
        if let Some(guards) = self.guards.take() {
            for result in guards.join() {
                if let Err(e) = result {
                    tracing::error!("worker failed: {e}");
                    clean = false;
                }
            }
        }
        // The workers are gone, and with them the feed: the view applies what is left.
        if let Some(applier) = self.applier.take() {
            applier.join();
        }
        let uncleared = self.handle.progress.changelog_clearing.uncleared();
        if uncleared > 0 {
            tracing::warn!(
                "the changelog was not yet cleared of what earlier runs left ({uncleared} \
                 worker topics): a restart publishes the state again"
            );
            clean = false;
        }
        clean
    }
}

impl EngineHandle {
    /// Asks the workers to stop, without waiting: the request goes to every process of the
    /// cluster through the dataflow, and at one time agreed there every worker stops taking input,
    /// takes a last checkpoint (when checkpointing) and finishes.
    pub fn request_stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        let threads = self
            .shared
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        threads
            .iter()
            .flatten()
            .for_each(std::thread::Thread::unpark);
    }

    /// The live serving view (push feeds follow its versions).
    pub fn view(&self) -> Arc<ServingView> {
        self.view.clone()
    }

    /// Answers a query from the serving view, at one consistent `as_of`.
    pub fn query(&self, query: &Query) -> Result<Answer, QueryError> {
        if self.shared.stop.load(Ordering::Acquire) && self.shared.as_of() == 0 {
            return Err(QueryError::ShutDown);
        }
        self.view.answer(query).ok_or(QueryError::NotReady)
    }

    /// The latest complete time the serving view reflects (0: none yet).
    pub fn as_of(&self) -> Time {
        self.view.as_of()
    }

    /// Whether every source has ended and everything pushed has been processed.
    pub fn drained(&self) -> bool {
        let p = &self.progress;
        p.ended.iter().all(|e| e.load(Ordering::Acquire))
            && p.pushed
                .iter()
                .map(|t| t.load(Ordering::Acquire))
                .max()
                .unwrap_or(0)
                <= self.as_of()
    }

    /// Whether every source has caught up with what it had at start, and the dataflow has taken all
    /// of that in: the live state is current.
    pub fn caught_up(&self) -> bool {
        // Asked on every HTTP request: no allocation.
        self.progress
            .caught_up_through()
            .is_some_and(|latest| latest <= self.as_of())
    }

    /// Whether the live state is ready (`/readyz`): it exists, and it has taken in what the sources
    /// had when they started.
    pub fn ready(&self) -> bool {
        self.as_of() > 0 && self.caught_up()
    }

    /// The time from which the changelog holds exactly this process's state at every complete
    /// time, once its workers have cleared what earlier runs left there (see [`Clearing`]);
    /// `None` before.
    pub fn changelog_whole_from(&self) -> Option<Time> {
        self.progress.changelog_clearing.whole_from()
    }

    /// Workers' changelog topics not yet reconciled with the caught-up state (see [`Clearing`]).
    pub fn changelog_unreconciled(&self) -> u64 {
        self.progress.changelog_clearing.uncleared()
    }

    /// The time of the checkpoint taken at a clean stop (0: not stopping).
    pub fn final_checkpoint_at(&self) -> Time {
        self.progress.final_at.load(Ordering::Acquire)
    }

    /// Whether the cluster is stopping: some process was asked to, and every process stops at the
    /// time the dataflow told them ([`EngineHandle::final_checkpoint_at`]).
    pub fn stopping(&self) -> bool {
        self.final_checkpoint_at() > 0
    }

    /// Events pushed into the dataflow so far.
    pub fn events_in(&self) -> u64 {
        self.progress.events.load(Ordering::Relaxed)
    }

    /// How much state the workers hold.
    pub fn sizes(&self) -> Result<StateSizes, QueryError> {
        self.shared.sizes()
    }

    /// The upsert counters (applied, stale, after terminal, expired).
    pub fn counters(&self) -> &DataflowCounters {
        &self.counters
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

/// Deletes the state dir's changelog marks, saying so.
fn retract_marks(state_dir: &std::path::Path) {
    match retract_published(state_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!("{n} changelog mark(s) retracted: this run publishes on"),
        Err(e) => tracing::error!(
            "cannot retract a changelog mark ({e}): a restart from that checkpoint would not \
             publish its state again; delete it by hand"
        ),
    }
}

/// Writes the dataflow's changelog streams to `topics` as their times complete, but for the
/// changes at or before its `published`; once the state has caught up, tombstones the held keys
/// this worker owns and its state lacks (see [`Clearing`]).
fn attach_changelog(
    streams: &Changelogs<'_>,
    topics: WorkerTopics,
    held: Option<HeldKeysSource>,
    progress: &Arc<InputProgress>,
) {
    let district_sink = ChangelogSinkOp {
        topics: topics.clone(),
        clearing: Clearing::new(held.clone(), progress.changelog_clearing.clone()),
        progress: progress.clone(),
        what: "district(s)",
    };
    district_sink.attach(&streams.districts, "Sink: DistrictChangelog");
    let rider_sink = ChangelogSinkOp {
        topics,
        clearing: Clearing::new(held, progress.changelog_clearing.clone()),
        progress: progress.clone(),
        what: "rider(s)",
    };
    rider_sink.attach(&streams.riders, "Sink: RiderChangelog");
}

/// One changelog stream's sink operator.
struct ChangelogSinkOp<K, V> {
    topics: WorkerTopics,
    clearing: Clearing<K, V>,
    progress: Arc<InputProgress>,
    what: &'static str,
}

impl<K, V> ChangelogSinkOp<K, V>
where
    K: differential_dataflow::hashable::Hashable<Output = u64>
        + std::hash::Hash
        + Eq
        + Clone
        + 'static,
    V: Clone + 'static,
    WorkerTopics: ClearedTopic<K, V>,
{
    fn attach(mut self, stream: &Stream<'_, Time, Vec<Change<K, V>>>, name: &str) {
        let me = self.topics.me;
        // Pipeline: the changelog streams are already partitioned by key, so each key is written
        // by one worker, in time order.
        stream
            .clone()
            .sink(Pipeline, name, move |(input, frontier)| {
                let mut batches = Vec::new();
                input.for_each(|_, changes| batches.push(std::mem::take(changes)));
                debug_assert!(batches
                    .iter()
                    .flatten()
                    .all(|c| owner(&c.key, me.workers) == me.worker));
                let complete = |t: Time| !frontier.less_equal(&t);
                let through = self.progress.caught_up_through();
                let cleared = self
                    .clearing
                    .offer(batches, through, complete, &self.topics);
                log_cleared(cleared, self.what, me);
            });
    }
}

fn log_cleared(cleared: Option<Cleared>, what: &str, me: Writer) {
    let Some(c) = cleared else { return };
    if c == Cleared::default() {
        return;
    }
    tracing::info!(
        "worker {}: changelog reconciled with the caught-up state: {} {what} written, {} \
         unchanged (not written again), {} the state lacks tombstoned",
        me.worker,
        c.written,
        c.unchanged,
        c.tombstoned
    );
}

struct WorkerSlot {
    source: Box<dyn EventSource>,
}

/// Next offset per `(topic, partition, offset)`, as sources report them.
type Offsets = Vec<(String, i32, i64)>;

/// One worker's loop: poll the source, push, step, publish progress, answer peeks, compact.
struct WorkerLoop {
    index: usize,
    slot: WorkerSlot,
    riders_in: InputHandle<Time, dongflow_connectors::RiderEvent>,
    deliveries_in: InputHandle<Time, dongflow_connectors::DeliveryEvent>,
    /// Where this worker tells every worker of the cluster, once each, that its source has caught
    /// up and (the first of each process) that a stop was asked for.
    control_in: InputHandle<Time, Control>,
    /// Whether it has said that its source caught up.
    caught_up_sent: bool,
    /// Whether it has passed on this process's stop request.
    stop_sent: bool,
    /// The time through which this worker has received every control message (see
    /// [`attach_control`]): its inputs go at most [`STOP_MARGIN`] beyond it.
    control_through: Rc<Cell<Time>>,
    probe: ProbeHandle<Time>,
    snapshots: SnapshotTrace,
    /// How many riders the rider changelog stage holds.
    changelog_riders: Rc<Cell<usize>>,
    counts: CountsTrace,
    state: WorkerState,
    shared: Arc<Shared>,
    progress: Arc<InputProgress>,
    max_batch: usize,
    max_in_flight: usize,
    idle_park: Duration,
    compacted: Time,
    workers: usize,
    global_index: usize,
    checkpoint: Option<CheckpointSettings>,
    /// The checkpoint time the upserts were asked for and have not both delivered yet.
    pending: Option<Time>,
    last_checkpoint: Time,
    final_sent: bool,
    /// Source positions after each poll that took records, by the time they were pushed at.
    offsets_log: VecDeque<(Time, Offsets)>,
    /// The latest positions at or before the last checkpoint.
    positions_base: Offsets,
}

/// What workers tell every worker of the cluster, through the dataflow, so that no process needs a
/// shared folder or its peers' HTTP to know it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
enum Control {
    /// A worker's source has caught up with what it had at start; the time of its last push then.
    CaughtUp {
        /// Global worker index.
        worker: usize,
        /// The time of its last push.
        at: Time,
    },
    /// A process was asked to stop: the whole cluster stops at this message's time plus
    /// [`STOP_MARGIN`], with a last checkpoint at that time on every process.
    Stop,
}

/// How far past a stop request's time the cluster's last checkpoint falls. No worker's inputs go
/// more than this beyond the time through which it has received every control message, so every
/// worker learns of a stop before its inputs pass the stop's checkpoint time: the stop's checkpoint
/// is cut at one time everywhere, whichever process was asked and however late the others hear.
const STOP_MARGIN: Time = 250;

/// Every control message goes to every worker: caught-up marks into
/// [`InputProgress::caught_up_everywhere`], a stop into [`InputProgress::final_at`] (the earliest
/// stop wins); `through` learns the time through which every message has arrived.
fn attach_control(
    messages: Stream<'_, Time, Vec<Control>>,
    progress: Arc<InputProgress>,
    through: Rc<Cell<Time>>,
) {
    use timely::dataflow::operators::vec::Broadcast;
    messages
        .broadcast()
        .sink(Pipeline, "control", move |(input, frontier)| {
            input.for_each(|time, messages| {
                for message in messages.drain(..) {
                    match message {
                        Control::CaughtUp { worker, at } => {
                            if let Some(mark) = progress.caught_up_everywhere.get(worker) {
                                mark.fetch_max(at, Ordering::AcqRel);
                            }
                        }
                        Control::Stop => {
                            if let Some(at) = time.least() {
                                progress.stop_at(at + STOP_MARGIN);
                            }
                        }
                    }
                }
            });
            // Drained first: every message before the frontier has been seen.
            let next = frontier.frontier().iter().next().copied();
            through.set(next.map_or(Time::MAX, |t| t.saturating_sub(1)));
        });
}

impl WorkerLoop {
    fn new(
        worker: &mut timely::worker::Worker,
        slot: WorkerSlot,
        config: &EngineConfig,
        shared: Arc<Shared>,
        progress: Arc<InputProgress>,
        counters: &DataflowCounters,
        view_feed: Option<ViewFeed>,
    ) -> Self {
        let mut riders_in = InputHandle::new();
        let mut deliveries_in = InputHandle::new();
        let mut control_in = InputHandle::new();
        let control_through: Rc<Cell<Time>> = Rc::default();
        let probe = ProbeHandle::new();
        let state = WorkerState::new(config.terminal_ttl);
        let processes = config.cluster.as_ref().map_or(1, |c| c.addresses.len());
        let total = config.workers * processes;
        let global_index = worker.index();
        // The time the restored state is shown at: the checkpoint's own when the changelog holds
        // it already (so it is not published again), else now (so that the changelog's `as_of`
        // never goes back behind records a crashed run published after the checkpoint).
        let seeded_at = config
            .restore
            .as_ref()
            .map(|restored| match config.restore_published {
                true => restored.time,
                false => now_ms(),
            });
        if let (Some(restored), Some(at)) = (&config.restore, seeded_at) {
            // Each worker seeds the ids whose events the upserts' exchange sends to it.
            let mine = |id: &dongflow_connectors::Id| owner(id, total) == global_index;
            state
                .riders
                .borrow_mut()
                .restore(&restored.riders, at, mine);
            state
                .deliveries
                .borrow_mut()
                .restore(&restored.deliveries, at, mine);
            // The restored state goes in at `at`, like input pushed then: neither caught up nor
            // drained before the view has passed it.
            progress.pushed[worker.index() % config.workers].fetch_max(at, Ordering::Release);
        }
        let districts = config.districts.clone();
        let changelog_riders: Rc<Cell<usize>> = Rc::default();
        let (snapshots, counts) = worker.dataflow::<Time, _, _>(|scope| {
            let riders = scope.input_from(&mut riders_in);
            let deliveries = scope.input_from(&mut deliveries_in);
            attach_control(
                scope.input_from(&mut control_in),
                progress.clone(),
                control_through.clone(),
            );
            let out = build(riders, deliveries, districts.clone(), &state, counters);
            let streams = changelogs(&out, changelog_riders.clone());
            if let Some(sink) = &config.changelog {
                let published = match config.restore_published {
                    true => seeded_at.unwrap_or(0),
                    false => 0,
                };
                let topics = WorkerTopics {
                    sink: sink.clone(),
                    index: districts,
                    published,
                    me: Writer {
                        worker: global_index,
                        workers: total,
                    },
                };
                attach_changelog(&streams, topics, config.changelog_held.clone(), &progress);
            }
            // Every worker builds the view's feed; the first of each process holds its end.
            attach_view(&streams, view_feed, config.workers, processes);
            // One probe behind every queried arrangement: its frontier says which times are complete.
            out.snapshots.stream.clone().probe_with(&probe);
            out.positions.inner.clone().probe_with(&probe);
            out.counts.stream.clone().probe_with(&probe);
            (out.snapshots.trace, out.counts.trace)
        });
        if let Some(at) = seeded_at {
            // Input goes in after the restored state, never at its time: the changes at that time
            // are the restored state alone.
            riders_in.advance_to(at + 1);
            deliveries_in.advance_to(at + 1);
            control_in.advance_to(at + 1);
        }
        let index = worker.index() % config.workers;
        shared.threads.lock().unwrap_or_else(|e| e.into_inner())[index] =
            Some(std::thread::current());
        Self {
            index,
            slot,
            riders_in,
            deliveries_in,
            control_in,
            caught_up_sent: false,
            stop_sent: false,
            control_through,
            probe,
            snapshots,
            changelog_riders,
            counts,
            state,
            shared,
            progress,
            max_batch: config.max_batch,
            max_in_flight: config.max_in_flight,
            idle_park: config.idle_park,
            compacted: 0,
            workers: config.workers,
            global_index,
            checkpoint: config.checkpoint.clone(),
            pending: None,
            last_checkpoint: config.restore.as_ref().map_or(0, |r| r.time),
            final_sent: false,
            offsets_log: VecDeque::new(),
            positions_base: config.restore.as_ref().map_or_else(Vec::new, |r| {
                r.offsets
                    .iter()
                    .map(|((t, p), o)| (t.clone(), *p, *o))
                    .collect()
            }),
        }
    }

    fn run(&mut self, worker: &mut timely::worker::Worker) {
        let mut riders = Vec::new();
        let mut deliveries = Vec::new();
        let mut ended = false;
        // Times of batches pushed but not yet complete. Taking more input only while few are in
        // flight keeps the dataflow from facing many times per key at once (which costs reduce
        // dearly) and keeps answers fresh; the source buffers meanwhile.
        let mut in_flight: VecDeque<Time> = VecDeque::new();
        loop {
            // Stopping once the cluster has agreed when (not when this process was asked).
            let stopping = self.progress.final_at.load(Ordering::Acquire) > 0;
            if stopping
                && (self.checkpoint.is_none()
                    || (self.final_sent
                        && self.progress.final_done.load(Ordering::Acquire) >= self.workers))
            {
                break;
            }
            // Every worker advances every input to the wall clock, or the frontier would stop; the
            // data inputs no further than STOP_MARGIN past the control messages seen.
            let wall = now_ms();
            let heard = self.control_through.get().saturating_add(STOP_MARGIN);
            let now = wall.min(heard).max(*self.riders_in.time());
            // Input is taken only at the wall clock's time (a tombstone's ttl counts from it):
            // while the control messages lag (at start, or behind a slow peer), none is taken.
            let held_back = heard < wall;
            // Asked before the inputs pass the time, so no upsert can have gone beyond it.
            self.request_checkpoint(now, stopping, held_back);
            self.riders_in.advance_to(now);
            self.deliveries_in.advance_to(now);
            self.control_in
                .advance_to(wall.max(*self.control_in.time()));
            if !self.stop_sent && self.index == 0 && self.shared.stop.load(Ordering::Acquire) {
                self.stop_sent = true;
                self.control_in.send(Control::Stop);
            }
            while in_flight.front().is_some_and(|t| !self.probe.less_equal(t)) {
                in_flight.pop_front();
            }
            let polled = if ended {
                Polled::Ended
            } else if stopping || held_back || in_flight.len() >= self.max_in_flight {
                Polled::Idle
            } else {
                self.slot
                    .source
                    .poll(self.max_batch, &mut riders, &mut deliveries)
            };
            let n = (riders.len() + deliveries.len()) as u64;
            if polled == Polled::Data && self.checkpoint.is_some() {
                self.offsets_log
                    .push_back((now, self.slot.source.positions()));
            }
            if n > 0 {
                self.riders_in.send_batch(&mut riders);
                self.deliveries_in.send_batch(&mut deliveries);
                riders.clear();
                deliveries.clear();
                self.progress.events.fetch_add(n, Ordering::Relaxed);
                self.progress.pushed[self.index].fetch_max(now, Ordering::Release);
                if in_flight.back() != Some(&now) {
                    in_flight.push_back(now);
                }
            }
            if !self.caught_up_sent && self.slot.source.caught_up() {
                let last = self.progress.pushed[self.index].load(Ordering::Acquire);
                self.caught_up_sent = true;
                self.control_in.send(Control::CaughtUp {
                    worker: self.global_index,
                    at: last.max(1),
                });
            }
            if polled == Polled::Ended && !ended {
                ended = true;
                self.progress.ended[self.index].store(true, Ordering::Release);
            }
            if polled == Polled::Data {
                worker.step();
            } else {
                worker.step_or_park(Some(self.idle_park));
            }
            self.collect_checkpoint();
            self.publish_completed();
            self.publish_sizes();
            self.compact();
        }
    }

    /// Asks the upserts for their state at the next checkpoint time, once `now` reaches it (a
    /// scheduled one not while input is held back: its time would not be the wall clock's).
    fn request_checkpoint(&mut self, now: Time, stopping: bool, held_back: bool) {
        let Some(settings) = &self.checkpoint else {
            return;
        };
        if self.pending.is_some() || self.final_sent {
            return;
        }
        let at = if stopping {
            let at = self.progress.final_at.load(Ordering::Acquire);
            if at > now {
                return;
            }
            if at <= self.last_checkpoint {
                // This worker's last part is already at or past the stop time: nothing newer
                // can be cut consistently, so the last scheduled checkpoint stands.
                self.final_sent = true;
                self.progress.final_done.fetch_add(1, Ordering::AcqRel);
                return;
            }
            at
        } else {
            if held_back {
                return;
            }
            let due = now - now % settings.interval.max(1);
            if due <= self.last_checkpoint {
                return;
            }
            due
        };
        self.state.rider_snapshots.requested.set(Some(at));
        self.state.delivery_snapshots.requested.set(Some(at));
        self.pending = Some(at);
        self.last_checkpoint = at;
    }

    /// Hands this worker's part to the writer once both upserts have taken their snapshot.
    fn collect_checkpoint(&mut self) {
        let (Some(at), Some(settings)) = (self.pending, &self.checkpoint) else {
            return;
        };
        let ready = self.state.rider_snapshots.taken.borrow().is_some()
            && self.state.delivery_snapshots.taken.borrow().is_some();
        if !ready {
            return;
        }
        let riders = self.state.rider_snapshots.taken.borrow_mut().take();
        let deliveries = self.state.delivery_snapshots.taken.borrow_mut().take();
        let (Some((riders, p1)), Some((deliveries, p2))) = (riders, deliveries) else {
            return;
        };
        // The offsets of the last poll pushed at or before the checkpoint's time.
        while self.offsets_log.front().is_some_and(|(t, _)| *t <= at) {
            if let Some((_, p)) = self.offsets_log.pop_front() {
                self.positions_base = p;
            }
        }
        let part = WorkerPart {
            time: at,
            worker: self.global_index,
            riders,
            deliveries,
            offsets: self.positions_base.clone(),
            pause: p1 + p2,
        };
        match settings.parts.try_send(part) {
            Ok(()) => {}
            Err(crossbeam_channel::TrySendError::Full(_)) => {
                tracing::warn!(
                    "the checkpoint writer is two checkpoints behind; checkpoint {at} skipped"
                )
            }
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => {
                tracing::warn!("checkpoint writer gone; part {at} dropped")
            }
        }
        self.pending = None;
        if self.shared.stop.load(Ordering::Acquire)
            && at == self.progress.final_at.load(Ordering::Acquire)
        {
            self.final_sent = true;
            self.progress.final_done.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// Publishes the greatest time this worker's probe says is complete.
    fn publish_completed(&self) {
        let frontier = self.probe.with_frontier(|f| f.as_option().copied());
        if let Some(next) = frontier {
            self.shared.completed[self.index].fetch_max(next.saturating_sub(1), Ordering::Release);
        }
    }

    /// Says how much state this worker holds, for `/metrics` (a few counters: cheap every round).
    fn publish_sizes(&mut self) {
        let sizes = StateSizes {
            riders: self.state.riders.borrow().len(),
            deliveries: self.state.deliveries.borrow().len(),
            snapshot_updates: trace_len(&self.snapshots),
            changelog_riders: self.changelog_riders.get(),
            count_updates: trace_len(&self.counts),
        };
        *self.shared.sizes[self.index]
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = sizes;
    }

    /// Lets the traces forget history no query can ask for any more, so memory stays bounded.
    fn compact(&mut self) {
        // Nothing reads the traces at an older time: answers come from the serving view.
        let frontier = self.shared.as_of();
        if frontier > self.compacted {
            self.compacted = frontier;
            let f = [frontier];
            let f = AntichainRef::new(&f);
            // Logical: times before the oldest possible query may be merged together.
            // Physical: batches may be merged across those times, so the spine stays small.
            self.snapshots.set_logical_compaction(f);
            self.snapshots.set_physical_compaction(f);
            self.counts.set_logical_compaction(f);
            self.counts.set_physical_compaction(f);
        }
    }
}
