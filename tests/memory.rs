//! Memory regression: the heap a 2-worker engine holds for 20,000 riders on shift and 4,000 active
//! deliveries, and what 100,000 ended deliveries (remembered for the terminal ttl) add to it,
//! counted by an instrumented allocator, stay under bounds, so that neither figure can silently
//! double. The bounds are generous, about twice what the engine holds today (docs/testing.md says
//! how much); the benchmark, not this test, tracks the targets. One test in this binary, so that
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
const ENDED: usize = 100_000;
/// Heap bytes the engine may hold for the riders and active deliveries.
const BOUND: i64 = 12 << 20;
/// Heap bytes one remembered ended delivery may add.
const ENDED_BOUND: i64 = 128;

#[test]
fn twenty_thousand_riders_stay_under_the_memory_bound() {
    let held = |ended| {
        let limit = Duration::from_secs(120);
        let held = heap_held(GLOBAL, 2, RIDERS, DELIVERIES, ended, &builtin(), limit);
        // The state is all there: a bound met by an engine that lost riders would prove nothing.
        assert_eq!(
            (held.riders_on_shift, held.active_deliveries),
            (RIDERS as u64, DELIVERIES as u64)
        );
        assert_eq!(held.deliveries_held, DELIVERIES + ended);
        held.heap_bytes
    };
    let heap = held(0);
    let per_ended = (held(ENDED) - heap) / ENDED as i64;
    eprintln!(
        "heap {heap} bytes for {RIDERS} riders and {DELIVERIES} deliveries ({} B per rider); {per_ended} B per ended delivery",
        heap / RIDERS as i64
    );
    assert!(
        heap < BOUND,
        "the engine holds {heap} bytes of heap for {RIDERS} riders, over the bound of {BOUND}"
    );
    assert!(
        per_ended < ENDED_BOUND,
        "a remembered ended delivery holds {per_ended} bytes of heap, over the bound of {ENDED_BOUND}"
    );
}
