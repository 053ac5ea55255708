//! Dataflow throughput from an in-memory source: simulator events (100k riders, the simulator's
//! realistic mix) partitioned by id over the workers, pushed through the whole dataflow until the
//! district counts are complete, on 1 and 2 workers. After the timed runs, a memory report: heap
//! bytes held by the engine per live rider plus active delivery.
//!
//! `cargo bench --bench dataflow_throughput` (DONGFLOW_BENCH_EVENTS and DONGFLOW_BENCH_RIDERS
//! override the size).

use std::alloc::System;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use dongflow::demo::partition;
use dongflow::{AnswerBody, Engine, EngineConfig, Query};
use dongflow_connectors::simulator::{SimConfig, SimEvent, Simulator};
use dongflow_connectors::source::{EventSource, VecSource};
use dongflow_dataflow::districts::DistrictIndex;
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn events(riders: usize, n: usize) -> Vec<SimEvent> {
    Simulator::new(SimConfig {
        riders,
        seed: 42,
        start_ts: 1_764_000_000_000,
    })
    .take(n)
    .collect()
}

/// Splits events over workers by id, as Kafka partitions keyed by id would.
fn sources(events: &[SimEvent], workers: usize) -> Vec<Box<dyn EventSource>> {
    partition(events.iter().cloned(), workers)
        .into_iter()
        .map(|p| Box::new(VecSource::new(p)) as Box<dyn EventSource>)
        .collect()
}

/// Runs the events through a fresh engine; returns the time until everything is complete.
fn run(
    sources: Vec<Box<dyn EventSource>>,
    workers: usize,
    index: &std::sync::Arc<DistrictIndex>,
) -> (Duration, Engine) {
    let started = Instant::now();
    let engine =
        Engine::start(EngineConfig::new(workers, index.clone()), sources).expect("engine starts");
    while !engine.drained() {
        std::thread::sleep(Duration::from_micros(200));
    }
    (started.elapsed(), engine)
}

fn throughput(c: &mut Criterion, events: &[SimEvent], index: &std::sync::Arc<DistrictIndex>) {
    let mut group = c.benchmark_group("dataflow_throughput");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(30));
    group.throughput(Throughput::Elements(events.len() as u64));
    for workers in [1, 2] {
        group.bench_with_input(
            BenchmarkId::new("workers", workers),
            &workers,
            |b, &workers| {
                b.iter_custom(|iters| {
                    (0..iters)
                        .map(|_| run(sources(events, workers), workers, index).0)
                        .sum()
                });
            },
        );
    }
    group.finish();
}

/// Heap held by a drained engine (2 workers), per live record: riders on shift, active and waiting
/// deliveries. Fixed costs (buffers sized by the batch, not by the state) are taken out by measuring
/// two fleet sizes and dividing the difference in heap by the difference in live records.
fn memory(index: &std::sync::Arc<DistrictIndex>, fleets: [usize; 2], events_per_rider: usize) {
    let workers = 2;
    let mut points = Vec::new();
    for riders in fleets {
        let events = events(riders, riders * events_per_rider);
        // The input is built before counting starts: only what the engine allocates is counted.
        let input = sources(&events, workers);
        let region = Region::new(GLOBAL);
        let (elapsed, engine) = run(input, workers, index);
        let change = region.change();
        let held = change.bytes_allocated as i64 - change.bytes_deallocated as i64;
        let answer = engine.query(&Query::Districts).expect("answer");
        let AnswerBody::Districts(counts) = answer.body else {
            unreachable!("districts answer")
        };
        let on_shift: u64 = counts.iter().map(|(_, c)| c.riders_on_shift).sum();
        let active: u64 = counts.iter().map(|(_, c)| c.active_deliveries).sum();
        let waiting: u64 = counts.iter().map(|(_, c)| c.waiting_deliveries).sum();
        let sizes = engine.sizes().expect("sizes");
        let records = on_shift + active + waiting;
        println!(
            "{}",
            serde_json::json!({
                "bench": "dataflow_memory",
                "workers": workers,
                "riders": riders,
                "events": events.len(),
                "events_per_s": (events.len() as f64 / elapsed.as_secs_f64()).round(),
                "riders_on_shift": on_shift,
                "active_deliveries": active,
                "waiting_deliveries": waiting,
                "riders_known": sizes.riders,
                "deliveries_known": sizes.deliveries,
                "trace_updates": {
                    "snapshots": sizes.snapshot_updates,
                    "changelog_riders": sizes.changelog_riders,
                    "counts": sizes.count_updates,
                },
                "engine_heap_bytes": held,
                "heap_bytes_per_live_record": held / records.max(1) as i64,
            })
        );
        points.push((held, records));
        engine.stop();
    }
    let (h0, r0) = points[0];
    let (h1, r1) = points[1];
    let marginal = (h1 - h0) as f64 / (r1 as f64 - r0 as f64).max(1.0);
    println!(
        "{}",
        serde_json::json!({"bench": "dataflow_memory_marginal", "fleets": fleets, "bytes_per_live_record": marginal.round()})
    );
}

fn main() {
    let riders = env_or("DONGFLOW_BENCH_RIDERS", 100_000);
    let n = env_or("DONGFLOW_BENCH_EVENTS", 2_000_000);
    let index = std::sync::Arc::new(DistrictIndex::builtin_seoul());
    let events = events(riders, n);
    let mut c = Criterion::default().configure_from_args();
    throughput(&mut c, &events, &index);
    c.final_summary();
    drop(events);
    memory(&index, [riders / 2, riders], 20);
}
