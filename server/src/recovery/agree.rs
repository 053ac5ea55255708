//! Which checkpoint a cluster restores when each process keeps its own state dir.
//!
//! A checkpoint is consistent only as a whole: every worker's state and every partition's offset at
//! one time. A process sees only its own parts, so before the engine starts the processes tell each
//! other, through a one-round timely dataflow over the cluster's own addresses, the times they can
//! restore; each then restores the newest time all of them have (or none, all alike).
//!
//! Each process then also gets the other processes' parts of that checkpoint, through a second
//! round of the same kind, and writes them into its own state dir: the checkpoint is then whole
//! on every process, so each seeds its stale view from all of it and reads only the changelog
//! written after its cut (its own part alone would leave the view to read the whole changelog,
//! which grows with every restart that republishes until the broker compacts it), and the next
//! restart may take any shape.

use std::cell::RefCell;
use std::path::Path;
use std::rc::Rc;

use dongflow_dataflow::types::Time;
use thiserror::Error;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::input::Handle as InputHandle;
use timely::dataflow::operators::vec::{Broadcast, Input};

use super::checkpoint::{
    add_parts, load, log_restoring, own_files, usable, CheckpointError, Restored, Shape, Usable,
};
use crate::report::Chain;

/// Why the cluster could not agree on a checkpoint.
#[derive(Debug, Error)]
pub enum AgreeError {
    /// The processes could not connect.
    #[error("cannot connect to the cluster's other processes")]
    Connect(#[from] crate::cluster::ConnectError),
    /// Timely could not start the agreement's worker.
    #[error("cannot start the agreement's worker: {0}")]
    Timely(String),
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
    let offered: Vec<(Time, bool)> = candidates.iter().map(|u| (u.time, u.whole)).collect();
    let (agreed, offers) = agree(shape.process, addresses, &offered)?;
    let Some(time) = agreed else {
        tracing::info!(
            "no checkpoint every process of the cluster can restore (this one has {}): the \
             cluster starts from the earliest offsets",
            describe(&times)
        );
        return Ok(None);
    };
    tracing::info!("the cluster restores checkpoint {time}, the newest every process has");
    let whole_everywhere = heard_whole(&offers, time);
    let restored = if whole_everywhere {
        match loaded {
            Some(r) if r.time == time => r,
            _ => load(state_dir, Usable { time, whole: true }, shape)
                .map_err(|source| AgreeError::Load { time, source })?,
        }
    } else {
        share_parts(state_dir, time, shape.process, addresses)?;
        load(state_dir, Usable { time, whole: true }, shape)
            .map_err(|source| AgreeError::Load { time, source })?
    };
    log_restoring(&restored);
    Ok(Some(restored))
}

/// Gives every other process this one's part of checkpoint `time` and adds theirs to
/// `state_dir`, through a dataflow of one worker per process.
fn share_parts(
    state_dir: &Path,
    time: Time,
    process: usize,
    addresses: &[String],
) -> Result<(), AgreeError> {
    let started = std::time::Instant::now();
    let load_error = |source| AgreeError::Load { time, source };
    let mine: Vec<Chunk> = own_files(state_dir, time, process)
        .map_err(load_error)?
        .into_iter()
        .flat_map(|(name, bytes)| {
            // Pieces of a bounded size, so that no one message of the dataflow is huge.
            let pieces: Vec<Vec<u8>> = match bytes.len() {
                0 => vec![Vec::new()],
                _ => bytes.chunks(CHUNK).map(<[u8]>::to_vec).collect(),
            };
            pieces
                .into_iter()
                .enumerate()
                .map(move |(i, piece)| (process, name.clone(), i, piece))
        })
        .collect();
    let heard = exchange(process, addresses, mine)?;
    let mut files: std::collections::BTreeMap<String, Vec<(usize, Vec<u8>)>> = Default::default();
    for (from, name, i, piece) in heard {
        if from != process {
            files.entry(name).or_default().push((i, piece));
        }
    }
    let files: Vec<(String, Vec<u8>)> = files
        .into_iter()
        .map(|(name, mut pieces)| {
            pieces.sort_by_key(|(i, _)| *i);
            (name, pieces.into_iter().flat_map(|(_, p)| p).collect())
        })
        .collect();
    let bytes: usize = files.iter().map(|(_, b)| b.len()).sum();
    add_parts(state_dir, time, &files).map_err(load_error)?;
    tracing::info!(
        "checkpoint {time}: the other processes' parts added to this state dir ({bytes} bytes in \
         {:?}); it is whole here",
        started.elapsed()
    );
    Ok(())
}

/// How large the pieces of a shared checkpoint file are.
const CHUNK: usize = 1 << 22;

/// A piece of a checkpoint file: the process whose part it is, the file's name, the piece's
/// index, its bytes.
type Chunk = (usize, String, usize, Vec<u8>);

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

/// A process and the checkpoint times it can restore, each with whether it holds every
/// process's part of it.
type Offer = (usize, Vec<(Time, bool)>);

/// Tells every process of the cluster this one's checkpoint times (each with whether it is whole
/// here) and hears theirs; returns the newest time every process has, and what each offered.
pub fn agree(
    process: usize,
    addresses: &[String],
    mine: &[(Time, bool)],
) -> Result<(Option<Time>, Vec<Offer>), AgreeError> {
    let heard = exchange(process, addresses, vec![(process, mine.to_vec())])?;
    let times: Vec<(usize, Vec<Time>)> = heard
        .iter()
        .map(|(p, offered)| (*p, offered.iter().map(|(t, _)| *t).collect()))
        .collect();
    Ok((newest_common(addresses.len(), &times), heard))
}

/// Whether every process offered `time` whole.
fn heard_whole(offers: &[Offer], time: Time) -> bool {
    offers
        .iter()
        .all(|(_, offered)| offered.contains(&(time, true)))
}

/// Sends `mine` to every process of the cluster and returns what every process sent (this one's
/// too), through a dataflow of one worker per process over the cluster's own addresses.
fn exchange<D>(process: usize, addresses: &[String], mine: Vec<D>) -> Result<Vec<D>, AgreeError>
where
    D: timely::ExchangeData + Clone + Send + Sync,
{
    let (builders, others) = crate::cluster::connect(process, addresses, 1)?;
    let mine = std::sync::Mutex::new(Some(mine));
    let guards = timely::execute::execute_from(
        builders,
        others,
        timely::WorkerConfig::default(),
        move |worker| {
            let mut input = InputHandle::<Time, D>::new();
            let heard: Rc<RefCell<Vec<D>>> = Rc::default();
            let sink = heard.clone();
            worker.dataflow::<Time, _, _>(|scope| {
                scope.input_from(&mut input).broadcast().sink(
                    Pipeline,
                    "exchange",
                    move |(data, _)| {
                        data.for_each(|_, batch| sink.borrow_mut().append(batch));
                    },
                );
            });
            let sending = mine.lock().unwrap_or_else(|e| e.into_inner()).take();
            for item in sending.into_iter().flatten() {
                input.send(item);
            }
            drop(input);
            while worker.step_or_park(None) {}
            heard.take()
        },
    )
    .map_err(AgreeError::Timely)?;
    let mut heard = Vec::new();
    for result in guards.join() {
        heard = result.map_err(|_| AgreeError::Failed)?;
    }
    Ok(heard)
}

/// The newest time in every process's list; `None` unless all `processes` were heard.
fn newest_common(processes: usize, heard: &[(usize, Vec<Time>)]) -> Option<Time> {
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
