//! Memory regression: the heap a 2-worker engine holds for 20,000 riders on shift and 4,000 active
//! deliveries, counted by an instrumented allocator, stays under a bound, so that the figure cannot
//! silently double. The bound is generous, about twice what the engine holds today (docs/testing.md
//! says how much); the benchmark, not this test, tracks the target. One test in this binary, so that
//! nothing else allocates meanwhile.

mod common;

use std::alloc::System;
use std::time::Duration;

use common::builtin;
use common::heap::heap_held;
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const RIDERS: usize = 20_000;
const DELIVERIES: usize = 4_000;
/// Heap bytes the engine may hold for that state.
const BOUND: i64 = 50 << 20;

#[test]
fn twenty_thousand_riders_stay_under_the_memory_bound() {
    let held = heap_held(
        GLOBAL,
        2,
        RIDERS,
        DELIVERIES,
        &builtin(),
        Duration::from_secs(120),
    );
    let heap = held.heap_bytes;
    // The state is all there: a bound met by an engine that lost riders would prove nothing.
    assert_eq!(
        (held.riders_on_shift, held.active_deliveries),
        (RIDERS as u64, DELIVERIES as u64)
    );
    eprintln!(
        "heap {heap} bytes for {RIDERS} riders and {DELIVERIES} deliveries ({} B per rider)",
        heap / RIDERS as i64
    );
    assert!(
        heap < BOUND,
        "the engine holds {heap} bytes of heap for {RIDERS} riders, over the bound of {BOUND}"
    );
}
