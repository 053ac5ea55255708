//! The heap an engine holds for a fixed state (`fixed_state`: riders on shift, active deliveries;
//! `ended_deliveries`: deliveries remembered after their end),
//! counted by the caller's instrumented allocator: one measurement for the memory regression test
//! (`tests/memory.rs`) and the benchmark's memory section (`benches/e2e/inmem.rs`).

use std::alloc::System;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dongflow::demo::partition_of;
use dongflow::{AnswerBody, Engine, EngineConfig, Query};
use dongflow_connectors::simulator::{ended_deliveries, fixed_state};
use dongflow_connectors::source::{EventSource, VecSource};
use dongflow_dataflow::districts::DistrictIndex;
use stats_alloc::{Region, StatsAlloc};

/// What the engine held once its state settled.
#[derive(Debug)]
pub struct Held {
    /// Heap allocated and not freed since the engine started.
    pub heap_bytes: i64,
    /// Riders on shift and active deliveries the engine counts then: the whole state, or the
    /// figure would prove nothing.
    pub riders_on_shift: u64,
    pub active_deliveries: u64,
    /// Deliveries the delivery upsert holds, ended ones included.
    pub deliveries_held: usize,
}

/// Builds `riders` riders on shift, `deliveries` active deliveries and `ended` ended deliveries in
/// an engine of `workers` workers, waits (at most `limit`) until its input is in and its arrangements have stopped
/// changing, and says how much heap it holds then.
pub fn heap_held(
    alloc: &'static StatsAlloc<System>,
    workers: usize,
    riders: usize,
    deliveries: usize,
    ended: usize,
    index: &Arc<DistrictIndex>,
    limit: Duration,
) -> Held {
    let sources: Vec<Box<dyn EventSource>> = (0..workers)
        .map(|w| {
            // Made as they are taken: the input never sits in memory.
            let mine = fixed_state(riders, deliveries)
                .chain(ended_deliveries(ended))
                .filter(move |e| partition_of(e, workers) == w);
            Box::new(VecSource::from_events(mine)) as Box<dyn EventSource>
        })
        .collect();
    let region = Region::new(alloc);
    let engine =
        Engine::start(EngineConfig::new(workers, index.clone()), sources).expect("engine starts");
    let deadline = Instant::now() + limit;
    while !engine.handle().drained() {
        assert!(
            Instant::now() < deadline,
            "the engine did not take its input"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Steady state: the arrangements have finished merging what the burst left.
    let mut last = engine.handle().sizes().expect("sizes");
    let mut still = 0;
    while still < 5 {
        assert!(Instant::now() < deadline, "the state never settled");
        std::thread::sleep(Duration::from_millis(100));
        let now = engine.handle().sizes().expect("sizes");
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    let change = region.change();
    let heap_bytes = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
    let counts = match engine.handle().query(&Query::Districts).map(|a| a.body) {
        Ok(AnswerBody::Districts(d)) => d,
        other => panic!("no districts answer: {other:?}"),
    };
    let held = Held {
        heap_bytes,
        deliveries_held: engine.handle().sizes().expect("sizes").deliveries,
        riders_on_shift: counts.iter().map(|(_, c)| c.riders_on_shift).sum(),
        active_deliveries: counts.iter().map(|(_, c)| c.active_deliveries).sum(),
    };
    engine.stop();
    held
}
