//! Restart figures without a broker: `cargo run --release --example restart_figures -- [RIDERS] [DELIVERIES]`.
//!
//! Builds a state of RIDERS riders on shift and DELIVERIES active deliveries (`-w 2`), stops
//! cleanly (which writes the last checkpoint), then compares two ways back to the same state:
//! loading the checkpoint and seeding the workers (and, before that, the stale view seeded from
//! it), and replaying every input event. Prints JSON.
//! The replay here reads from memory, the fastest a replay can be; a broker only adds to it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use dongflow::demo::partition;
use dongflow::engine::CheckpointSettings;
use dongflow::recovery::{load_latest, Writer};
use dongflow::view::ServingView;
use dongflow::{Engine, EngineConfig, Query};
use dongflow_connectors::simulator::{fixed_state, SimEvent};
use dongflow_connectors::source::{EventSource, VecSource};
use dongflow_dataflow::districts::DistrictIndex;

const WORKERS: usize = 2;

fn sources(events: Vec<SimEvent>) -> Vec<Box<dyn EventSource>> {
    partition(events, WORKERS)
        .into_iter()
        .map(|p| Box::new(VecSource::new(p)) as Box<dyn EventSource>)
        .collect()
}

/// This process's resident memory now (`VmRSS`), in bytes.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Waits until the engine answers all districts with every rider counted.
fn wait_complete(engine: &Engine, riders: u64) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(answer) = engine.handle().query(&Query::Districts) {
            if let dongflow::AnswerBody::Districts(counts) = answer.body {
                let on_shift: u64 = counts.iter().map(|(_, c)| c.riders_on_shift).sum();
                if on_shift == riders {
                    return started.elapsed();
                }
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let riders = args.first().copied().unwrap_or(1_000_000);
    let deliveries = args.get(1).copied().unwrap_or(200_000);
    let index = Arc::new(DistrictIndex::builtin_seoul());
    let dir = std::env::temp_dir().join(format!("dongflow-restart-figures-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);

    // 1. Build the state, then stop cleanly: the last checkpoint is written.
    let writer = Writer::start(dir.clone(), 0, 1, WORKERS).expect("writer");
    let mut config = EngineConfig::new(WORKERS, index.clone());
    config.checkpoint = Some(CheckpointSettings {
        interval: 3_600_000,
        parts: writer.sender(),
    });
    let started = Instant::now();
    let engine =
        Engine::start(config, sources(fixed_state(riders, deliveries).collect())).expect("engine");
    wait_complete(&engine, riders as u64);
    let build = started.elapsed();
    engine.stop();
    let report = writer.finish().expect("a checkpoint was written");

    // 2. Back from the checkpoint.
    let started = Instant::now();
    let restored = Arc::new(load_latest(&dir).expect("the checkpoint loads"));
    let load = started.elapsed();
    // What a restarting process answers (stale) first: the stale view seeded from the checkpoint.
    let view = ServingView::new_stale();
    let seeding = Instant::now();
    view.seed(&restored);
    let seed = seeding.elapsed();
    view.advance([], restored.time);
    let applied = seeding.elapsed() - seed;
    assert_eq!(view.riders(), riders, "the stale view has every rider");
    let first_stale = started.elapsed();
    drop(view);
    let mut config = EngineConfig::new(WORKERS, index.clone());
    config.restore = Some(restored);
    let engine = Engine::start(config, sources(Vec::new())).expect("engine");
    wait_complete(&engine, riders as u64);
    let restore_total = started.elapsed();
    // Resident memory with the restored state live (the example holds no checkpoint itself).
    let rss_restored = rss_bytes();
    engine.stop();

    // 3. Back by replaying every event.
    let started = Instant::now();
    let engine = Engine::start(
        EngineConfig::new(WORKERS, index),
        sources(fixed_state(riders, deliveries).collect()),
    )
    .expect("engine");
    wait_complete(&engine, riders as u64);
    let replay = started.elapsed();
    engine.stop();
    // DONGFLOW_KEEP_CHECKPOINT=1 keeps the checkpoint, to profile a restore on its own.
    match std::env::var_os("DONGFLOW_KEEP_CHECKPOINT") {
        Some(_) => eprintln!("checkpoint kept in {}", dir.display()),
        None => {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    let out = serde_json::json!({
        "riders": riders,
        "active_deliveries": deliveries,
        "workers": WORKERS,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "build_state_s": build.as_secs_f64(),
        "checkpoint_bytes": report.bytes,
        "checkpoint_write_s": report.write.as_secs_f64(),
        "checkpoint_worker_pause_ms": report.pause.as_secs_f64() * 1000.0,
        "restore_load_s": load.as_secs_f64(),
        "restore_first_stale_answer_s": first_stale.as_secs_f64(),
        "stale_seed_s": seed.as_secs_f64(),
        "stale_publish_s": applied.as_secs_f64(),
        "restore_until_complete_s": restore_total.as_secs_f64(),
        "rss_once_restored_bytes": rss_restored,
        "replay_until_complete_s": replay.as_secs_f64(),
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
