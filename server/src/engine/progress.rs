//! How far the inputs have come: what each worker pushed, which sources caught up (everywhere in
//! the cluster), and where a stop falls.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use dongflow_dataflow::types::Time;

/// Progress of the inputs, for waiting until everything fed has been processed.
#[derive(Debug)]
pub(crate) struct InputProgress {
    /// Per worker: the latest time at which it pushed events.
    pub(crate) pushed: Vec<AtomicU64>,
    /// Per worker: whether its source has ended.
    pub(crate) ended: Vec<AtomicBool>,
    /// Events pushed into the dataflow, all workers.
    pub(crate) events: AtomicU64,
    /// Per worker of every process (by global index): the time of its last push when its source
    /// first said it had caught up (0: not yet), as the marks every worker broadcasts through the
    /// dataflow tell. Readiness and the changelog's reconciling wait for the whole cluster's input, not this process's
    /// alone.
    pub(crate) caught_up_everywhere: Vec<AtomicU64>,
    /// The time of the checkpoint taken at a clean stop (0: not stopping yet).
    pub(crate) final_at: AtomicU64,
    /// Workers done with their part of the final checkpoint.
    pub(crate) final_done: AtomicUsize,
}

impl InputProgress {
    /// Nothing pushed yet by `workers` workers of a cluster of `everywhere` workers.
    pub(crate) fn new(workers: usize, everywhere: usize) -> Self {
        Self {
            pushed: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            ended: (0..workers).map(|_| AtomicBool::new(false)).collect(),
            events: AtomicU64::new(0),
            caught_up_everywhere: (0..everywhere).map(|_| AtomicU64::new(0)).collect(),
            final_at: AtomicU64::new(0),
            final_done: AtomicUsize::new(0),
        }
    }

    /// Records a stop of the cluster at `at`; an earlier one wins (no worker has reached either
    /// yet, see [`super::worker::STOP_MARGIN`]).
    pub(crate) fn stop_at(&self, at: Time) {
        let _ = self
            .final_at
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |now| {
                (now == 0 || at < now).then_some(at)
            });
    }

    /// The latest time pushed when the last source of the cluster caught up with what it had at
    /// start: once that time is complete, the state is current. `None` until every source of every
    /// process has caught up.
    pub(crate) fn caught_up_through(&self) -> Option<Time> {
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

/// What an output attached to the workers may ask of the input's progress.
#[derive(Clone, Debug)]
pub struct CaughtUp(pub(crate) Arc<InputProgress>);

impl CaughtUp {
    /// The latest time pushed when the last source of the cluster caught up with what it had at
    /// start: once that time is complete, the state is current. `None` until then.
    pub fn through(&self) -> Option<Time> {
        self.0.caught_up_through()
    }
}
