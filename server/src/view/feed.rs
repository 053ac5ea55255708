//! The live view's feed: the dataflow's per-time changes sent to the first worker of every
//! process, which hands each complete time to the process's [`ViewApplier`] thread.

use std::collections::BTreeMap;
use std::sync::Arc;

use dongflow_dataflow::build::Changelogs;
use dongflow_dataflow::types::Time;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::vec::Map;
use timely::dataflow::operators::Concat;

use super::{ServingView, ViewChange};

/// Complete times (and changes applied ahead) the view thread may have queued.
const VIEW_QUEUE: usize = 256;

/// What the leading worker hands the thread that applies it.
#[derive(Debug)]
enum Fed {
    /// Changes of the earliest time not yet complete, to apply ahead ([`ServingView::prepare`]).
    Ahead(Vec<ViewChange>),
    /// The rest of the changes of the times up to `as_of`, all complete now.
    Complete(Vec<ViewChange>, Time),
}

/// The thread of a process that applies complete times to its serving view, off the workers: a
/// worker only hands over what it received, so applying never holds up the dataflow. It ends
/// once every [`ViewFeed`] is dropped (the workers have stopped).
#[derive(Debug)]
pub struct ViewApplier {
    feed: Option<ViewFeed>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where a process's leading worker sends complete times.
#[derive(Clone, Debug)]
pub struct ViewFeed(crossbeam_channel::Sender<Fed>);

impl ViewApplier {
    /// Starts the thread that applies to `view`.
    pub fn start(view: Arc<ServingView>) -> std::io::Result<Self> {
        // Bounded: when the view thread is this far behind, the leading worker waits for it
        // (answers would be that stale anyway) instead of queueing without limit. It queues times,
        // not records, and coalesces what is queued into one version, so it rarely fills.
        let (tx, rx) = crossbeam_channel::bounded::<Fed>(VIEW_QUEUE);
        let thread = std::thread::Builder::new()
            .name("dongflow-view".into())
            .spawn(move || {
                let mut next: Option<Fed> = None;
                while let Some(fed) = next.take().or_else(|| rx.recv().ok()) {
                    match fed {
                        Fed::Ahead(changes) => view.prepare(changes),
                        Fed::Complete(mut changes, mut as_of) => {
                            // Completions queued up meanwhile become one version: fewer, larger
                            // steps. Changes applied ahead wait for the version before them.
                            while let Ok(more) = rx.try_recv() {
                                match more {
                                    Fed::Complete(more, later) => {
                                        changes.extend(more);
                                        as_of = later;
                                    }
                                    ahead => {
                                        next = Some(ahead);
                                        break;
                                    }
                                }
                            }
                            view.advance(changes, as_of);
                        }
                    }
                }
            })?;
        Ok(Self {
            feed: Some(ViewFeed(tx)),
            thread: Some(thread),
        })
    }

    /// The feed for the leading worker (the thread ends once every copy is dropped).
    pub fn take_feed(&mut self) -> Option<ViewFeed> {
        self.feed.take()
    }

    /// Waits until everything fed has been applied.
    pub fn join(mut self) {
        self.feed = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Feeds a process's serving view from the dataflow's per-time changes: every change goes to the
/// first worker of every process (one copy per process, moved, not cloned, within one), which
/// hands the changes of each complete time to the process's [`ViewApplier`]. Every worker builds the
/// same operators, as timely requires; only leaders hold a `feed`.
pub fn attach_view(
    streams: &Changelogs<'_>,
    feed: Option<ViewFeed>,
    workers: usize,
    processes: usize,
) {
    let districts = streams.districts.clone().map(ViewChange::District);
    let riders = streams.riders.clone().map(ViewChange::Rider);
    let leader = move |process: usize| (process * workers) as u64;
    let to_leaders = districts.concat(riders).flat_map(move |change| {
        // One copy per process; the last one is the change itself.
        let copies = (1..processes).map({
            let change = change.clone();
            move |p| (p, change.clone())
        });
        copies.chain(std::iter::once((0, change)))
    });
    let mut pending: BTreeMap<Time, Vec<ViewChange>> = BTreeMap::new();
    let mut published: Time = 0;
    to_leaders.sink(
        Exchange::new(move |(p, _): &(usize, ViewChange)| leader(*p)),
        "Serve: View",
        move |(input, frontier)| {
            input.for_each(|_, changes| {
                for (_, change) in changes.drain(..) {
                    pending.entry(change.time()).or_default().push(change);
                }
            });
            let Some(feed) = &feed else {
                return;
            };
            // Every time before the frontier is complete: no change for it is still on its way.
            // An empty frontier (the dataflow has finished) completes every time.
            let (rest, as_of) = match frontier.frontier().first() {
                Some(&next) => (pending.split_off(&next), next.saturating_sub(1)),
                None => (
                    BTreeMap::new(),
                    pending
                        .keys()
                        .next_back()
                        .copied()
                        .unwrap_or(0)
                        .max(published),
                ),
            };
            // `split_off` left the complete times in `pending` and returned the rest.
            let done = std::mem::replace(&mut pending, rest);
            if as_of > published || !done.is_empty() {
                published = published.max(as_of);
                // The applier is gone only when the process is stopping.
                let _ = feed
                    .0
                    .send(Fed::Complete(done.into_values().flatten().collect(), as_of));
            }
            // Every time before the frontier has gone: the frontier's own changes can be applied
            // ahead, to be shown when it completes.
            if let Some(early) = frontier
                .frontier()
                .first()
                .and_then(|next| pending.remove(next))
            {
                let _ = feed.0.send(Fed::Ahead(early));
            }
        },
    );
}
