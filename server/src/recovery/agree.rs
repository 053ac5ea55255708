//! Which checkpoint a cluster restores when each process keeps its own state dir.
//!
//! A checkpoint is consistent only as a whole: every worker's state and every partition's offset at
//! one time. A process sees only its own parts, so before the engine starts the processes tell each
//! other, through a one-round timely dataflow over the cluster's own addresses, the times they can
//! restore; each then restores the newest time all of them have (or none, all alike).

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use dongflow_dataflow::types::Time;
use thiserror::Error;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::input::Handle as InputHandle;
use timely::dataflow::operators::vec::{Broadcast, Input};

use super::checkpoint::{load, log_restoring, usable, CheckpointError, Restored, Shape, Usable};
use crate::report::Chain;

/// Why the cluster could not agree on a checkpoint.
#[derive(Debug, Error)]
pub enum AgreeError {
    /// Timely could not connect the processes.
    #[error("cannot connect the cluster: {0}")]
    Connect(String),
    /// A process of the cluster failed while they agreed.
    #[error("a process of the cluster failed while the processes agreed on a checkpoint")]
    Failed,
    /// The agreed checkpoint could not be loaded here.
    #[error("the cluster agreed on checkpoint {time}, which this process cannot load")]
    Load {
        /// The agreed time.
        time: Time,
        /// Why it cannot.
        source: CheckpointError,
    },
}

/// The checkpoint this process restores, if any: the newest usable one of `state_dir` for a single
/// process; in a cluster (`addresses` of every process), the newest time every process can restore.
pub fn restore(
    state_dir: &Path,
    shape: Shape,
    addresses: Option<&[String]>,
) -> Result<Option<Restored>, AgreeError> {
    let mut candidates = usable(state_dir, shape);
    // The newest that loads is loaded before agreeing: one whose files fail their checksums is not
    // offered to the cluster, which could not go back on its choice.
    let mut loaded = None;
    while let Some(newest) = candidates.first().copied() {
        match load(state_dir, newest, shape) {
            Ok(r) => {
                loaded = Some(r);
                break;
            }
            Err(e) => {
                tracing::warn!("skipping checkpoint {}: {}", newest.time, Chain(&e));
                candidates.remove(0);
            }
        }
    }
    let Some(addresses) = addresses else {
        if let Some(r) = &loaded {
            log_restoring(r);
        }
        return Ok(loaded);
    };
    let times: Vec<Time> = candidates.iter().map(|u| u.time).collect();
    let agreed = agree(shape.process, addresses, &times)?;
    let Some(time) = agreed else {
        tracing::info!(
            "no checkpoint every process of the cluster can restore (this one has {}): the \
             cluster starts from the earliest offsets",
            describe(&times)
        );
        return Ok(None);
    };
    tracing::info!("the cluster restores checkpoint {time}, the newest every process has");
    let restored = match loaded {
        Some(r) if r.time == time => r,
        _ => {
            let which = candidates
                .iter()
                .find(|u| u.time == time)
                .copied()
                .unwrap_or(Usable { time, whole: false });
            load(state_dir, which, shape).map_err(|source| AgreeError::Load { time, source })?
        }
    };
    log_restoring(&restored);
    Ok(Some(restored))
}

fn describe(times: &[Time]) -> String {
    match times {
        [] => "none".to_owned(),
        _ => times
            .iter()
            .map(Time::to_string)
            .collect::<Vec<_>>()
            .join(", "),
    }
}

/// A process and the checkpoint times it can restore.
type Offer = (usize, Vec<Time>);

/// Tells every process of the cluster this one's checkpoint times and hears theirs, through a
/// dataflow of one worker per process; returns the newest time every process has.
pub fn agree(
    process: usize,
    addresses: &[String],
    mine: &[Time],
) -> Result<Option<Time>, AgreeError> {
    let config = timely::Config {
        communication: timely::CommunicationConfig::Cluster {
            threads: 1,
            process,
            addresses: addresses.to_vec(),
            report: false,
            zerocopy: false,
        },
        worker: timely::WorkerConfig::default(),
    };
    let mine = mine.to_vec();
    let guards = timely::execute(config, move |worker| {
        let mut input = InputHandle::<Time, Offer>::new();
        let heard: Rc<RefCell<Vec<Offer>>> = Rc::default();
        let sink = heard.clone();
        worker.dataflow::<Time, _, _>(|scope| {
            scope.input_from(&mut input).broadcast().sink(
                Pipeline,
                "checkpoint times",
                move |(data, _)| {
                    data.for_each(|_, batch| sink.borrow_mut().append(batch));
                },
            );
        });
        input.send((worker.index(), mine.clone()));
        drop(input);
        while worker.step_or_park(None) {}
        heard.take()
    })
    .map_err(AgreeError::Connect)?;
    let mut heard = Vec::new();
    for result in guards.join() {
        heard = result.map_err(|_| AgreeError::Failed)?;
    }
    Ok(newest_common(addresses.len(), &heard))
}

/// The newest time in every process's list; `None` unless all `processes` were heard.
fn newest_common(processes: usize, heard: &[Offer]) -> Option<Time> {
    let mut lists: Vec<&Vec<Time>> = Vec::new();
    for p in 0..processes {
        lists.push(&heard.iter().find(|(q, _)| *q == p)?.1);
    }
    let (first, rest) = lists.split_first()?;
    first
        .iter()
        .copied()
        .filter(|t| rest.iter().all(|l| l.contains(t)))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_time_every_process_has_is_chosen() {
        let heard = vec![(1, vec![300, 200, 100]), (0, vec![400, 300, 200])];
        assert_eq!(newest_common(2, &heard), Some(300));
        assert_eq!(newest_common(2, &[(0, vec![400]), (1, vec![300])]), None);
        assert_eq!(newest_common(2, &[(0, vec![400])]), None, "one unheard");
        assert_eq!(newest_common(3, &heard), None);
        assert_eq!(newest_common(2, &[(0, vec![]), (1, vec![])]), None);
    }
}
