//! Helpers of `dongflow demo` and `generate` (simulator settings, the stop signal), and the rule
//! that routes in-process events to workers the way Kafka partitions would (by id).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use differential_dataflow::hashable::Hashable;
use dongflow_connectors::simulator::{SimConfig, SimEvent};

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

/// Simulator settings whose clock starts at `start_ts` (ms since the epoch): the same seed and
/// start give the same events.
pub fn sim_config(riders: usize, seed: u64, start_ts: u64) -> SimConfig {
    SimConfig {
        riders,
        seed,
        start_ts,
    }
}

/// A stop flag set by Ctrl-C / SIGTERM. SIGHUP is not a stop: it re-reads the HTTP tokens.
pub fn stop_on_signal() -> Arc<AtomicBool> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        if let Err(e) = signal_hook::flag::register(signal, stop.clone()) {
            tracing::warn!(
                "cannot watch signal {signal}: {e}; it will not stop the process cleanly"
            );
        }
    }
    stop
}
