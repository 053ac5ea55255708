//! `dongflow demo` and the in-process simulator feed: the simulator's events routed to the workers
//! the way Kafka partitions would be (by id), at a steady rate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use differential_dataflow::hashable::Hashable;
use dongflow_connectors::simulator::{SimConfig, SimEvent, Simulator};
use dongflow_connectors::source::{ChannelSource, EventSource};

use crate::engine::now_ms;

/// The partition (of `parts`) an event goes to: by the hash of its id, as a Kafka producer keyed by
/// id would place it. Every in-process feed uses this one rule.
pub fn partition_of(e: &SimEvent, parts: usize) -> usize {
    (e.key().hashed() % parts.max(1) as u64) as usize
}

/// Splits events into `parts` partitions by [`partition_of`], keeping their order within each.
pub fn partition(events: impl IntoIterator<Item = SimEvent>, parts: usize) -> Vec<Vec<SimEvent>> {
    let mut out = vec![Vec::new(); parts.max(1)];
    for e in events {
        out[partition_of(&e, parts)].push(e);
    }
    out
}

/// The sending ends of the workers' channel sources, one per worker.
pub type Feeds = Vec<Sender<Vec<SimEvent>>>;

/// One channel source per worker, and the senders that feed them.
pub fn channel_sources(workers: usize) -> (Feeds, Vec<Box<dyn EventSource>>) {
    (0..workers)
        .map(|_| {
            // Bounded: a producer faster than the engine waits instead of filling memory.
            let (tx, rx) = crossbeam_channel::bounded(64);
            (tx, Box::new(ChannelSource::new(rx)) as Box<dyn EventSource>)
        })
        .unzip()
}

/// Runs the simulator into `senders` at `rate` events/s (0: as fast as the engine takes them) until
/// `stop` is set or `limit` events have been sent. Returns the number of events sent.
pub fn feed(
    sim: SimConfig,
    rate: u64,
    limit: Option<u64>,
    senders: &[Sender<Vec<SimEvent>>],
    stop: &AtomicBool,
) -> u64 {
    const TICK: Duration = Duration::from_millis(10);
    let mut simulator = Simulator::new(sim);
    let started = Instant::now();
    let mut sent = 0u64;
    let limit = limit.unwrap_or(u64::MAX);
    while !stop.load(Ordering::Relaxed) && sent < limit {
        // How many events are due by now at `rate`; as fast as possible means a batch per tick.
        let due = if rate == 0 {
            sent + 10_000
        } else {
            (started.elapsed().as_secs_f64() * rate as f64) as u64
        };
        let n = due.saturating_sub(sent).min(limit - sent);
        if n == 0 {
            std::thread::sleep(TICK);
            continue;
        }
        let mut batches: Vec<Vec<SimEvent>> = vec![Vec::new(); senders.len()];
        for _ in 0..n {
            let e = simulator.next_event();
            let w = partition_of(&e, senders.len());
            batches[w].push(e);
        }
        for (tx, batch) in senders.iter().zip(batches) {
            if !batch.is_empty() && tx.send(batch).is_err() {
                return sent;
            }
        }
        sent += n;
    }
    sent
}

/// Simulator settings starting at the current wall-clock time.
pub fn sim_config(riders: usize, seed: u64) -> SimConfig {
    SimConfig {
        riders,
        seed,
        start_ts: now_ms(),
    }
}

/// A stop flag set by Ctrl-C / SIGTERM.
pub fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // If a handler is already installed (tests), the flag simply never fires.
    let _ = ctrlc::set_handler(move || flag.store(true, Ordering::SeqCst));
    stop
}
