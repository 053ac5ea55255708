//! One in-memory throughput run, for profiling: `cargo run --release --example throughput --
//! WORKERS RIDERS EVENTS [MAX_BATCH MAX_IN_FLIGHT]`, or `baseline` for WORKERS to run the
//! benchmark's single-threaded `HashMap` baseline on the same events instead.
//!
//! Under callgrind, `--toggle-collect=*Baseline*apply*` (baseline) or `--separate-threads=yes`
//! (engine: the worker and view threads apart from the simulator on the main thread) count only
//! the work being compared.

use std::time::{Duration, Instant};

use dongflow::demo::partition;
use dongflow::{Engine, EngineConfig};
use dongflow_connectors::simulator::{SimConfig, SimEvent, Simulator};
use dongflow_connectors::source::{EventSource, VecSource};
use dongflow_dataflow::districts::DistrictIndex;

#[path = "../benches/e2e/baseline.rs"]
#[allow(dead_code)]
mod baseline;

fn arg(i: usize, default: usize) -> usize {
    std::env::args()
        .nth(i)
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let on_baseline = std::env::args().nth(1).as_deref() == Some("baseline");
    let (workers, riders, n) = (arg(1, 1), arg(2, 100_000), arg(3, 1_000_000));
    let events: Vec<SimEvent> = Simulator::new(SimConfig {
        riders,
        seed: 42,
        start_ts: 1_764_000_000_000,
    })
    .take(n)
    .collect();
    let index = std::sync::Arc::new(DistrictIndex::builtin_seoul());
    if on_baseline {
        let started = Instant::now();
        let mut model = baseline::Baseline::new(index);
        for e in &events {
            model.apply(e);
        }
        let elapsed = started.elapsed();
        println!(
            "baseline, {n} events: {:.0} events/s ({elapsed:?}, {} districts)",
            n as f64 / elapsed.as_secs_f64(),
            model.districts().len()
        );
        return;
    }
    let parts = partition(events, workers);
    let sources = parts
        .into_iter()
        .map(|p| Box::new(VecSource::new(p)) as Box<dyn EventSource>)
        .collect();
    let mut config = EngineConfig::new(workers, index);
    config.max_batch = arg(4, config.max_batch);
    config.max_in_flight = arg(5, config.max_in_flight);
    let started = Instant::now();
    let engine = Engine::start(config, sources).expect("engine starts");
    while !engine.handle().drained() {
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = started.elapsed();
    println!(
        "{workers} workers, {n} events: {:.0} events/s ({elapsed:?})",
        n as f64 / elapsed.as_secs_f64()
    );
    engine.stop();
}
