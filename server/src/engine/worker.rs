//! One worker: its dataflow (the stages of `dongflow_dataflow::build`, the control messages, the
//! outputs the composition root attaches, the view's feed) and its loop: poll the source, push,
//! step, cut checkpoint parts, publish progress and sizes, compact.

use std::cell::Cell;
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use differential_dataflow::trace::TraceReader;
use dongflow_connectors::source::{EventSource, Polled};
use dongflow_dataflow::build::changelogs;
use dongflow_dataflow::build::Inputs;
use dongflow_dataflow::stages::CountsTrace;
use dongflow_dataflow::trace_size::trace_len;
use dongflow_dataflow::types::Time;
use dongflow_dataflow::{build, DataflowCounters, WorkerState};
use serde::{Deserialize, Serialize};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::input::Handle as InputHandle;
use timely::dataflow::operators::vec::Input;
use timely::dataflow::operators::Probe;
use timely::dataflow::Stream;
use timely::progress::frontier::AntichainRef;

use super::progress::{CaughtUp, InputProgress};
use super::{now_ms, CheckpointSettings, EngineConfig, OutputFeed, OutputWorker};
use crate::query::{Shared, StateSizes};
use crate::recovery::{Restored, WorkerPart};
use crate::view::{attach_view, ViewFeed};

pub(crate) struct WorkerSlot {
    pub(crate) source: Box<dyn EventSource>,
    /// The checkpoint to restore, taken when the worker starts.
    pub(crate) restore: Option<Arc<Restored>>,
}

/// Next offset per `(topic, partition, offset)`, as sources report them.
type Offsets = Vec<(String, i32, i64)>;

/// One worker's loop: poll the source, push, step, cut checkpoint parts, publish progress, compact.
pub(crate) struct WorkerLoop {
    index: usize,
    slot: WorkerSlot,
    riders_in: InputHandle<Time, dongflow_connectors::RiderEvent>,
    deliveries_in: InputHandle<Time, dongflow_connectors::DeliveryEvent>,
    /// Where this worker tells every worker of the cluster, once each, that its source has caught
    /// up and (the first of each process) that a stop was asked for.
    control_in: InputHandle<Time, Control>,
    /// Whether it has said that its source caught up.
    /// The outputs' own inputs, fed each round.
    output_feeds: Vec<Box<dyn OutputFeed>>,
    caught_up_sent: bool,
    /// Whether it has passed on this process's stop request.
    stop_sent: bool,
    /// The time through which this worker has received every control message (see
    /// [`attach_control`]): its inputs go at most [`STOP_MARGIN`] beyond it.
    control_through: Rc<Cell<Time>>,
    probe: ProbeHandle<Time>,
    /// How many riders the rider changelog stage holds.
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
pub(crate) const STOP_MARGIN: Time = 250;

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
    pub(crate) fn new(
        worker: &mut timely::worker::Worker,
        mut slot: WorkerSlot,
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
        let state = WorkerState::new(config.terminal_ttl, config.rider_ttl);
        let processes = config.cluster.as_ref().map_or(1, |c| c.addresses.len());
        let total = config.workers * processes;
        let global_index = worker.index();
        // The time the restored state is shown at: the checkpoint's own when the changelog holds
        // it already (so it is not published again), else now (so that the changelog's `as_of`
        // never goes back behind records a crashed run published after the checkpoint).
        let restore = slot.restore.take();
        if let Some(restored) = &restore {
            // Late events of riders that the checkpoint's run forgot stay stale here, whichever
            // worker held them then.
            let through = restored.riders.forgotten_through;
            state.riders.borrow_mut().set_forgotten_through(through);
        }
        let seeded_at = restore
            .as_ref()
            .map(|restored| match config.restore_published {
                true => restored.time,
                false => now_ms(),
            });
        let mut rider_seeds = InputHandle::new();
        let mut delivery_seeds = InputHandle::new();
        let districts = config.districts.clone();
        let mut output_feeds = Vec::new();
        let counts = worker.dataflow::<Time, _, _>(|scope| {
            let inputs = Inputs {
                riders: scope.input_from(&mut riders_in),
                deliveries: scope.input_from(&mut deliveries_in),
                rider_seeds: scope.input_from(&mut rider_seeds),
                delivery_seeds: scope.input_from(&mut delivery_seeds),
            };
            attach_control(
                scope.input_from(&mut control_in),
                progress.clone(),
                control_through.clone(),
            );
            let out = build(inputs, districts.clone(), &state, counters);
            let streams = changelogs(&out);
            if let Some(outputs) = &config.outputs {
                let published = match config.restore_published {
                    true => seeded_at.unwrap_or(0),
                    false => 0,
                };
                let at = OutputWorker {
                    worker: global_index,
                    workers: total,
                    published,
                    caught_up: CaughtUp(progress.clone()),
                };
                output_feeds.push(outputs.attach(&streams, &at));
            }
            // Every worker builds the view's feed; the first of each process holds its end.
            attach_view(&streams, view_feed, config.workers, processes);
            // One probe behind every queried arrangement: its frontier says which times are complete.
            out.riders.probe_with(&probe);
            out.counts.stream.clone().probe_with(&probe);
            out.counts.trace
        });
        if let (Some(restored), Some(at)) = (&restore, seeded_at) {
            // Each worker gives a share of the checkpoint at `at`, of the cluster's workers when
            // every process holds it whole, else of its process's; the upserts' exchange takes
            // every id to the worker that owns it, whatever shape wrote the checkpoint.
            let local = worker.index() % config.workers;
            let (share, shares) = match restored.partial {
                true => (local, config.workers),
                false => (global_index, total),
            };
            rider_seeds.advance_to(at);
            delivery_seeds.advance_to(at);
            rider_seeds.send_batch(&mut restored.riders.seeds(share, shares).collect());
            delivery_seeds.send_batch(&mut restored.deliveries.seeds(share, shares).collect());
            // The restored state goes in at `at`, like input pushed then: neither caught up nor
            // drained before the view has passed it.
            progress.pushed[local].fetch_max(at, Ordering::Release);
        }
        // Seeds come once: closing their inputs lets the upserts apply events after them.
        drop((rider_seeds, delivery_seeds));
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
            output_feeds,
            caught_up_sent: false,
            stop_sent: false,
            control_through,
            probe,
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
            last_checkpoint: restore.as_ref().map_or(0, |r| r.time),
            final_sent: false,
            offsets_log: VecDeque::new(),
            positions_base: restore.as_ref().map_or_else(Vec::new, |r| {
                r.offsets
                    .iter()
                    .map(|((t, p), o)| (t.clone(), *p, *o))
                    .collect()
            }),
        }
    }

    pub(crate) fn run(&mut self, worker: &mut timely::worker::Worker) {
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
            for feed in &mut self.output_feeds {
                feed.feed();
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
        let riders = self.state.riders.borrow();
        let sizes = StateSizes {
            riders: riders.len(),
            deliveries: self.state.deliveries.borrow().len(),
            snapshot_riders: riders.len() + riders.extra().len(),
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
            self.counts.set_logical_compaction(f);
            self.counts.set_physical_compaction(f);
        }
    }
}
