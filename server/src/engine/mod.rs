//! The engine: timely workers running the dataflow, each fed by its own source, publishing how much
//! state it holds between steps and compacting its traces as time moves on.
//!
//! - [`progress`]: how far the inputs have come, here and everywhere in the cluster;
//! - [`worker`]: one worker's dataflow and loop.
//!
//! The engine answers queries from its serving view; its other outputs (the changelog topics) are
//! attached by the composition root ([`crate::pipeline`]) through [`Outputs`], and what must
//! happen before anything is published through [`EngineConfig::before_publishing`].

mod progress;
mod worker;

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dongflow_connectors::source::EventSource;
use dongflow_dataflow::build::Changelogs;
use dongflow_dataflow::districts::DistrictIndex;
use dongflow_dataflow::types::Time;
use dongflow_dataflow::DataflowCounters;
use thiserror::Error;
use timely::WorkerConfig;

pub use progress::CaughtUp;
use progress::InputProgress;
use worker::{WorkerLoop, WorkerSlot};

use crate::query::{Answer, Query, QueryError, Shared, StateSizes};
use crate::recovery::{Restored, WorkerPart};
use crate::view::{ServingView, ViewApplier};

/// How the engine runs.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Timely worker threads in this process.
    pub workers: usize,
    /// The district map.
    pub districts: Arc<DistrictIndex>,
    /// How long terminal deliveries are remembered (dataflow ms).
    pub terminal_ttl: Time,
    /// How long a rider off shift is remembered after its last event (dataflow ms; `None`: for
    /// good).
    pub rider_ttl: Option<Time>,
    /// The most events a worker takes from its source per step.
    pub max_batch: usize,
    /// The most batches a worker keeps in the dataflow before taking more input.
    pub max_in_flight: usize,
    /// How long an idle worker parks before it advances time again.
    pub idle_park: Duration,
    /// The timely cluster this process belongs to; `None` for a single process.
    pub cluster: Option<ClusterSpec>,
    /// What the composition root attaches to every worker's dataflow (the changelog topics);
    /// `None` attaches nothing.
    pub outputs: Option<Arc<dyn Outputs>>,
    /// Run once in this process when every process of the cluster has connected (so has loaded
    /// its checkpoint), before any worker can publish: the changelog marks go then.
    pub before_publishing: Option<Hook>,
    /// Checkpoints: every `interval` ms of dataflow time (and once more at a clean stop), each
    /// worker hands its part to `parts`. `None` takes none.
    pub checkpoint: Option<CheckpointSettings>,
    /// A checkpoint to start from: each worker seeds the ids it owns.
    pub restore: Option<Arc<Restored>>,
    /// Whether the changelog already holds the restored state (a clean stop published it, and
    /// nothing since; see [`Restored::published`]). It is then shown downstream at the
    /// checkpoint's own time, and the outputs are told that everything at that time is published
    /// ([`OutputWorker::published`]); otherwise it is shown at the restart's time.
    pub restore_published: bool,
}

/// How often checkpoints are taken and where their parts go.
#[derive(Clone, Debug)]
pub struct CheckpointSettings {
    /// Dataflow ms between checkpoints; they fall on multiples of it, the same in every process.
    pub interval: Time,
    /// The writer's inbox.
    pub parts: crossbeam_channel::Sender<WorkerPart>,
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
            rider_ttl: Some(dongflow_dataflow::build::DEFAULT_RIDER_TTL_MS),
            max_batch: 200_000,
            max_in_flight: 2,
            idle_park: Duration::from_millis(1),
            cluster: None,
            outputs: None,
            before_publishing: None,
            checkpoint: None,
            restore: None,
            restore_published: false,
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

/// Something the composition root asks the engine to do once, at a moment the engine knows (see
/// [`EngineConfig::before_publishing`]).
#[derive(Clone)]
pub struct Hook(pub Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for Hook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hook")
    }
}

/// Outputs a composition root attaches to every worker's dataflow, each worker its share: the
/// changelog topics. The engine knows nothing of what they write or how.
pub trait Outputs: Send + Sync + std::fmt::Debug {
    /// Attaches this output to one worker's changelog streams; returns what the worker feeds it.
    fn attach(&self, streams: &Changelogs<'_>, at: &OutputWorker) -> Box<dyn OutputFeed>;
}

/// Inputs an output added to a worker's dataflow (what an earlier run left in the changelog, say),
/// fed by the worker each round: every worker must advance or close every input, or the
/// dataflow's frontier stops.
pub trait OutputFeed {
    /// Gives what is ready to the output's inputs, or closes them.
    fn feed(&mut self);
}

/// The worker an output is attached to.
#[derive(Clone, Debug)]
pub struct OutputWorker {
    /// Its index in the whole cluster (the streams hold the keys the dataflow's exchange sends
    /// it).
    pub worker: usize,
    /// Workers in the whole cluster.
    pub workers: usize,
    /// Changes at or before this time are in the outputs already (a restored state a clean stop
    /// published; 0: none).
    pub published: Time,
    /// When the state has caught up with the input.
    pub caught_up: CaughtUp,
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

/// A running engine; dropping it stops the workers.
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

/// Wall-clock time in ms since the Unix epoch: the ingest time that stamps batches.
pub use dongflow_connectors::now_ms;

impl Engine {
    /// Starts `config.workers` workers in this process, worker `i` reading `sources[i]`.
    pub fn start(
        mut config: EngineConfig,
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
        let progress = Arc::new(InputProgress::new(workers, everywhere));
        let counters = DataflowCounters::default();
        // Each worker holds the restored checkpoint only until it has given its share: the
        // configuration lives as long as the workers, the checkpoint need not.
        let restore = config.restore.take();
        let slots: Mutex<Vec<Option<WorkerSlot>>> = Mutex::new(
            sources
                .into_iter()
                .map(|source| {
                    Some(WorkerSlot {
                        source,
                        restore: restore.clone(),
                    })
                })
                .collect(),
        );
        drop(restore);
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
        let connected = std::sync::Barrier::new(workers);
        let guards =
            timely::execute::execute_from(builders, others, worker_config(), move |worker| {
                // Global worker index = process * workers + local index.
                let index = worker.index() % workers;
                // Workers run once every process of the cluster is connected, so every process has
                // loaded its checkpoint (and seen its marks) by now: what must happen before any
                // worker here can publish happens now.
                if index == 0 {
                    if let Some(Hook(before)) = &config.before_publishing {
                        before();
                    }
                }
                connected.wait();
                crate::priority::yield_to_queries();
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
    /// dataflow, into the outputs and the view).
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

/// A [`CaughtUp`] of a one-worker cluster whose source caught up at `at`, for tests of outputs.
#[cfg(test)]
pub(crate) fn progress_caught_up_at(at: Time) -> CaughtUp {
    let progress = progress::InputProgress::new(1, 1);
    progress.caught_up_everywhere[0].store(at, std::sync::atomic::Ordering::Release);
    CaughtUp(Arc::new(progress))
}
