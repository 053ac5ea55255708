//! Restart figures through a real broker:
//! `cargo run --release --example kafka_restart -- BOOTSTRAP [RIDERS] [DELIVERIES] [RUNS]`.
//!
//! Produces RIDERS rider and DELIVERIES delivery events (one each: riders on shift, active
//! deliveries) to fresh topics with 4 partitions, runs the `dongflow` binary beside this example
//! (`target/release/dongflow run -w 2`) from the earliest offsets until ready with every rider
//! published, and stops it cleanly (the last checkpoint). Then, RUNS times each:
//! - a restart from the checkpoint: time from process start to the first answer for a rider (stale,
//!   from the checkpoint's view) and to `/readyz` 200;
//! - a restart with an empty state dir that replays the input topics from the beginning: time to
//!   `/readyz` 200;
//! - a restart from a copy of the checkpoint without its publishing mark, as after a crash: time to
//!   the first answer, to `/readyz` 200, and until the changelog is reconciled with the state (what
//!   it lacks written again, what a crashed run may have left beyond the state tombstoned), with
//!   the rider records that took; that run is then killed (`kill -9`), and its restart timed the
//!   same way.
//!
//! Prints JSON: checkpoint size, medians (min, max), peak RSS of the processes.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{copy_dir, dir_bytes, produce, ready, stats, Run, Topics, PARTITIONS};
use dongflow_connectors::simulator::{fixed_state, SimEvent};

/// `dongflow run -w 2` on the topics, from `from`, with no scheduled checkpoint.
fn start(bin: &Path, bootstrap: &str, t: &Topics, state: &Path, from: &str) -> Run {
    let mut args = t.run_args(bootstrap, &t.riders, state, from);
    args.extend(["--checkpoint-interval".to_owned(), "1h".to_owned()]);
    let http = format!("127.0.0.1:{}", common::free_port());
    Run::spawn(Command::new(bin), &args, &http)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let bootstrap = args
        .get(1)
        .expect("usage: kafka_restart BOOTSTRAP [RIDERS] [DELIVERIES] [RUNS]");
    let number =
        |i: usize, default: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(default);
    let (riders, deliveries, runs) = (number(2, 1_000_000), number(3, 200_000), number(4, 3));
    let bin = common::dongflow_binary();
    let tag = std::process::id();
    let t = Topics::create(bootstrap, "restart");
    let events: Vec<SimEvent> = fixed_state(riders, deliveries).collect();
    let produce_rate = produce(bootstrap, &t, &events);
    drop(events);
    eprintln!(
        "produced {} events at {produce_rate:.0}/s",
        riders + deliveries
    );

    let root = std::env::temp_dir().join(format!("dongflow-kafka-restart-{tag}"));
    let state = root.join("state");
    let long = Duration::from_secs(1800);
    let mut peak_rss = 0;

    // The first run builds the state and publishes every rider, then stops: the last checkpoint.
    let run = start(&bin, bootstrap, &t, &state, "earliest");
    let first_ready = run.until("the first run to be ready", long, ready);
    run.until("every rider published", long, |r| {
        r.metric("dongflow_output_records_written_total{output=\"rider_changelog\"}")
            >= riders as f64
    });
    peak_rss = peak_rss.max(run.peak_rss());
    run.terminate();
    let checkpoint_bytes = dir_bytes(&state);
    eprintln!("first run ready after {first_ready:?}; checkpoint {checkpoint_bytes} bytes");

    let probe = format!("/v1/riders/r-{}", riders / 2);
    let (mut first_answer, mut restore_ready, mut replay_ready) = (vec![], vec![], vec![]);
    let (mut crash_answer, mut crash_ready, mut crash_published) = (vec![], vec![], vec![]);
    let mut crash_rewritten = Vec::new();
    let (mut killed_answer, mut killed_ready) = (vec![], vec![]);
    let mut first_answer_stale = true;
    for i in 0..runs {
        let run = start(&bin, bootstrap, &t, &state, "checkpoint");
        let mut stale = false;
        let answered = run.until("a first answer", long, |r| {
            r.get(&probe).is_some_and(|(s, body)| {
                stale = body.contains("\"stale\":true");
                s == 200
            })
        });
        first_answer_stale &= stale;
        let ready_after = run.until("ready after the restore", long, ready);
        eprintln!(
            "restore {i}: at ready, producer queue-full waits {}, changelog records written {}",
            run.metric("dongflow_producer_queue_full_waits_total"),
            run.metric("dongflow_output_records_written_total{output=\"rider_changelog\"}")
        );
        peak_rss = peak_rss.max(run.peak_rss());
        let log = run.terminate();
        if std::env::var_os("KAFKA_RESTART_LOG").is_some() {
            eprintln!("{log}");
        }
        eprintln!("restore {i}: first answer {answered:?} (stale {stale}), ready {ready_after:?}");
        first_answer.push(answered.as_secs_f64());
        restore_ready.push(ready_after.as_secs_f64());

        let fresh = root.join(format!("replay-{i}"));
        let run = start(&bin, bootstrap, &t, &fresh, "earliest");
        let ready_after = run.until("ready after the replay", long, ready);
        peak_rss = peak_rss.max(run.peak_rss());
        run.terminate();
        eprintln!("replay {i}: ready {ready_after:?}");
        replay_ready.push(ready_after.as_secs_f64());

        let unmarked = root.join(format!("unmarked-{i}"));
        copy_dir(&state, &unmarked, &|name| {
            !name.ends_with(".published.json")
        });
        let run = start(&bin, bootstrap, &t, &unmarked, "checkpoint");
        let answered = run.until("a first answer", long, |r| {
            r.get(&probe).is_some_and(|(s, _)| s == 200)
        });
        let ready_after = run.until("ready after the unmarked restore", long, ready);
        let published = run.until("the changelog reconciled", long, |r| {
            r.sample("dongflow_changelog_unreconciled_topics") == Some(0.0)
        });
        let rewritten =
            run.metric("dongflow_output_records_written_total{output=\"rider_changelog\"}");
        peak_rss = peak_rss.max(run.peak_rss());
        let log = run.kill();
        assert!(log.contains("reconciled with its state"), "{log}");
        eprintln!(
            "unmarked restore {i}: first answer {answered:?}, ready {ready_after:?}, changelog \
             reconciled {published:?} ({rewritten} rider records written again)"
        );
        crash_rewritten.push(rewritten);
        crash_answer.push(answered.as_secs_f64());
        crash_ready.push(ready_after.as_secs_f64());
        crash_published.push(published.as_secs_f64());

        // That run was killed (`kill -9`) once it had reconciled the changelog: its restart.
        let run = start(&bin, bootstrap, &t, &unmarked, "checkpoint");
        let answered = run.until("a first answer after the kill", long, |r| {
            r.get(&probe).is_some_and(|(s, _)| s == 200)
        });
        let ready_after = run.until("ready after the kill", long, ready);
        peak_rss = peak_rss.max(run.peak_rss());
        let log = run.terminate();
        if std::env::var_os("KAFKA_RESTART_LOG").is_some() {
            eprintln!("{log}");
        }
        eprintln!("restart after kill -9 {i}: first answer {answered:?}, ready {ready_after:?}");
        killed_answer.push(answered.as_secs_f64());
        killed_ready.push(ready_after.as_secs_f64());
    }
    let _ = std::fs::remove_dir_all(&root);
    let out = serde_json::json!({
        "riders": riders,
        "active_deliveries": deliveries,
        "workers": 2,
        "partitions": PARTITIONS,
        "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        "produce_events_per_s": produce_rate.round(),
        "checkpoint_bytes": checkpoint_bytes,
        "first_run_ready_s": first_ready.as_secs_f64(),
        "restore_first_rider_answer_s": stats(first_answer),
        "restore_first_answer_was_stale": first_answer_stale,
        "restore_ready_s": stats(restore_ready),
        "replay_ready_s": stats(replay_ready),
        "unmarked_restore_first_rider_answer_s": stats(crash_answer),
        "unmarked_restore_ready_s": stats(crash_ready),
        "unmarked_restore_reconciled_s": stats(crash_published),
        "unmarked_restore_rider_records_written": crash_rewritten,
        "killed_restart_first_rider_answer_s": stats(killed_answer),
        "killed_restart_ready_s": stats(killed_ready),
        "peak_rss_bytes": peak_rss,
    });
    println!("{}", serde_json::to_string_pretty(&out).expect("json"));
}
