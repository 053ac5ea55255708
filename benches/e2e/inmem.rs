//! In-memory figures: the engine fed straight from memory (no broker) on 1 and 2 workers, the
//! single-threaded `HashMap` baseline on the same events, and the engine's memory per live rider
//! and per active delivery.

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dongflow::demo::partition;
use dongflow::{AnswerBody, Engine, EngineConfig, Query};
use dongflow_connectors::simulator::{SimConfig, SimEvent, Simulator};
use dongflow_connectors::source::{EventSource, VecSource};
use dongflow_connectors::Id;
use dongflow_dataflow::districts::{DistrictId, DistrictIndex};
use dongflow_dataflow::types::{DistrictCounts, Snapshot};
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

use crate::baseline::Baseline;
use crate::heap_common::heap_held;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// The simulator's events for `riders` riders (seed 42), the first `n` of them.
pub fn simulator_events(riders: usize, n: usize) -> Vec<SimEvent> {
    Simulator::new(SimConfig {
        riders,
        seed: 42,
        start_ts: 1_764_000_000_000,
    })
    .take(n)
    .collect()
}

fn districts_of(engine: &Engine) -> Vec<(DistrictId, DistrictCounts)> {
    match engine.handle().query(&Query::Districts).map(|a| a.body) {
        Ok(AnswerBody::Districts(d)) => d,
        other => panic!("no districts answer: {other:?}"),
    }
}

/// Riders compared between the engine and the baseline: `r-1` to `r-SAMPLE`.
const SAMPLE: usize = 2_000;

/// What a run ends with: every district's counts, and the snapshots of the sampled riders.
#[derive(Debug, PartialEq)]
pub struct Outcome {
    pub districts: Vec<(DistrictId, DistrictCounts)>,
    pub snapshots: Vec<Option<Snapshot>>,
}

fn sample_ids() -> impl Iterator<Item = Id> {
    (1..=SAMPLE).map(|i| Id::from(format!("r-{i}")))
}

/// Runs `events` through a fresh engine of `workers` workers until every district count is
/// complete; returns events/s and what the engine answers then.
pub fn engine_run(
    events: &[SimEvent],
    workers: usize,
    index: &Arc<DistrictIndex>,
) -> (f64, Outcome) {
    let sources: Vec<Box<dyn EventSource>> = partition(events.iter().cloned(), workers)
        .into_iter()
        .map(|p| Box::new(VecSource::new(p)) as Box<dyn EventSource>)
        .collect();
    let started = Instant::now();
    let engine =
        Engine::start(EngineConfig::new(workers, index.clone()), sources).expect("engine starts");
    while !engine.handle().drained() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let rate = events.len() as f64 / started.elapsed().as_secs_f64();
    let outcome = Outcome {
        districts: districts_of(&engine),
        snapshots: sample_ids()
            .map(
                |id| match engine.handle().query(&Query::Rider(id)).map(|a| a.body) {
                    Ok(AnswerBody::Rider(s)) => s,
                    other => panic!("no rider answer: {other:?}"),
                },
            )
            .collect(),
    };
    engine.stop();
    (rate, outcome)
}

/// Runs `events` through the baseline; returns events/s and what it holds then.
pub fn baseline_run(events: &[SimEvent], index: &Arc<DistrictIndex>) -> (f64, Outcome) {
    let started = Instant::now();
    let mut baseline = Baseline::new(index.clone());
    for e in events {
        baseline.apply(e);
    }
    let rate = events.len() as f64 / started.elapsed().as_secs_f64();
    let outcome = Outcome {
        districts: baseline.districts(),
        snapshots: sample_ids().map(|id| baseline.snapshot(&id)).collect(),
    };
    (rate, outcome)
}

/// What one memory measurement found (run in a process of its own).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct MemoryPoint {
    pub riders: usize,
    pub deliveries: usize,
    /// Ended deliveries, remembered for the terminal ttl.
    pub ended: usize,
    /// Deliveries the delivery upsert holds, ended ones included.
    pub deliveries_held: usize,
    /// Heap the engine holds once the state is complete.
    pub heap_bytes: i64,
    /// Peak resident memory of the whole process.
    pub peak_rss_bytes: u64,
    pub riders_on_shift: u64,
    pub active_deliveries: u64,
}

/// Peak resident memory so far (`VmHWM`) of process `pid` (`"self"`: this one).
pub fn peak_rss(pid: &str) -> u64 {
    status_bytes(pid, "VmHWM:")
}

/// A memory figure of `/proc/PID/status` (`field` with its colon, e.g. `"VmRSS:"`), in bytes.
pub fn status_bytes(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(field))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// Builds a state of `riders` riders on shift, `deliveries` active deliveries and `ended` ended
/// deliveries in a 2-worker engine, waits until its arrangements have stopped changing, and measures the heap it holds and
/// the process's peak RSS.
pub fn memory_point(
    riders: usize,
    deliveries: usize,
    ended: usize,
    index: &Arc<DistrictIndex>,
) -> MemoryPoint {
    // No time limit that a slow machine could hit: the benchmark reports how long it takes.
    let held = heap_held(
        GLOBAL,
        2,
        riders,
        deliveries,
        ended,
        index,
        Duration::from_secs(24 * 3600),
    );
    MemoryPoint {
        riders,
        deliveries,
        ended,
        deliveries_held: held.deliveries_held,
        heap_bytes: held.heap_bytes,
        peak_rss_bytes: peak_rss("self"),
        riders_on_shift: held.riders_on_shift,
        active_deliveries: held.active_deliveries,
    }
}
