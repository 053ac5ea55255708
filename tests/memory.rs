//! Memory regression: the heap a 2-worker engine holds for 20,000 riders on shift and 4,000 active
//! deliveries, counted by an instrumented allocator, stays under a bound, so that the figure cannot
//! silently double. The bound is generous, about twice what the engine holds today (docs/testing.md
//! says how much); the benchmark, not this test, tracks the target. One test in this binary, so that
//! nothing else allocates meanwhile.

mod common;

use std::alloc::System;
use std::time::{Duration, Instant};

use common::builtin;
use dongflow::demo::partition_of;
use dongflow::{AnswerBody, Engine, EngineConfig, Query};
use dongflow_connectors::simulator::fixed_state;
use dongflow_connectors::source::{EventSource, VecSource};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const RIDERS: usize = 20_000;
const DELIVERIES: usize = 4_000;
/// Heap bytes the engine may hold for that state.
const BOUND: i64 = 50 << 20;

#[test]
fn twenty_thousand_riders_stay_under_the_memory_bound() {
    let index = builtin();
    let workers = 2;
    let sources: Vec<Box<dyn EventSource>> = (0..workers)
        .map(|w| {
            let mine =
                fixed_state(RIDERS, DELIVERIES).filter(move |e| partition_of(e, workers) == w);
            Box::new(VecSource::from_events(mine)) as Box<dyn EventSource>
        })
        .collect();
    let region = Region::new(GLOBAL);
    let engine = Engine::start(EngineConfig::new(workers, index), sources).expect("engine starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !engine.drained() {
        assert!(
            Instant::now() < deadline,
            "the engine did not take its input"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    // Steady state: the arrangements have finished merging what the burst left.
    let mut last = engine.sizes().expect("sizes");
    let mut still = 0;
    while still < 5 {
        assert!(Instant::now() < deadline, "the state never settled");
        std::thread::sleep(Duration::from_millis(100));
        let now = engine.sizes().expect("sizes");
        still = if now == last { still + 1 } else { 0 };
        last = now;
    }
    let change = region.change();
    let heap = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
    // The state is all there: a bound met by an engine that lost riders would prove nothing.
    let counts = match engine.query(&Query::Districts).map(|a| a.body) {
        Ok(AnswerBody::Districts(d)) => d,
        other => panic!("no districts answer: {other:?}"),
    };
    let on_shift: u64 = counts.iter().map(|(_, c)| c.riders_on_shift).sum();
    let active: u64 = counts.iter().map(|(_, c)| c.active_deliveries).sum();
    assert_eq!((on_shift, active), (RIDERS as u64, DELIVERIES as u64));
    eprintln!(
        "heap {heap} bytes for {RIDERS} riders and {DELIVERIES} deliveries ({} B per rider)",
        heap / RIDERS as i64
    );
    assert!(
        heap < BOUND,
        "the engine holds {heap} bytes of heap for {RIDERS} riders, over the bound of {BOUND}"
    );
    engine.stop();
}
