//! Soak: a steady fleet at a steady rate for several minutes, the engine's RSS sampled from
//! outside, and its growth after warm-up reported with and without the ended deliveries it
//! remembers (which grow by design until the terminal ttl starts forgetting them).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::chart::{self, Bar, Panel, ORANGE};
use crate::progress::Progress;
use crate::{live, verdict, Options, Stats};

/// Riders of the soak's fleet and its input rate (events/s): the figures of the soak.
const RIDERS: usize = 30_000;
const RATE: u64 = 10_000;
/// How often RSS is sampled.
const EVERY: Duration = Duration::from_secs(5);

/// One sample: seconds since the engine was ready, its RSS, the deliveries it holds.
#[derive(Clone, Copy, Debug, serde::Serialize)]
struct Sample {
    at_s: f64,
    rss_bytes: u64,
    deliveries_held: f64,
}

/// The least-squares slope of `y` over `x`.
fn slope(points: &[(f64, f64)]) -> f64 {
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(a, b), (x, y)| (a + x / n, b + y / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), (x, y)| {
        (num + (x - mx) * (y - my), den + (x - mx) * (x - mx))
    });
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}

pub fn section(
    o: &Options,
    map: &live::Map,
    map_name: &str,
    progress: &Progress,
    report: &mut Value,
    rows: &mut Vec<[String; 3]>,
    panels: &mut Vec<Panel>,
) {
    // What one remembered ended delivery costs, from this run's memory section if it ran.
    let per_ended = report["memory"]["fleets"][0]["heap_bytes_per_ended_delivery"]["median"]
        .as_f64()
        .filter(|b| b.is_finite());
    progress.step(&format!(
        "soak: {} riders at {}/s for {} s",
        chart::short(RIDERS as f64),
        chart::short(RATE as f64),
        o.soak_time.as_secs()
    ));
    let live = live::Live::start(map, 2, RIDERS, RATE, "soak");
    let pid = live.pid();
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < o.soak_time {
        samples.push(Sample {
            at_s: started.elapsed().as_secs_f64(),
            rss_bytes: crate::inmem::status_bytes(&pid.to_string(), "VmRSS:"),
            deliveries_held: live
                .metric("dongflow_state_entries{state=\"deliveries\"}")
                .unwrap_or(f64::NAN),
        });
        // A benchmark's pacing, not a test's wait: the next sample is due at a fixed step.
        let next = EVERY * samples.len() as u32;
        std::thread::sleep(next.saturating_sub(started.elapsed()));
    }
    let produced = live.stop();
    // Warm-up: the first fifth (2 of 10 minutes), while the fleet fills and buffers reach size.
    let warm = o.soak_time.as_secs_f64() / 5.0;
    let window: Vec<Sample> = samples.iter().copied().filter(|s| s.at_s >= warm).collect();
    let (first, last) = (window[0], window[window.len() - 1]);
    let growth = (last.rss_bytes as f64 - first.rss_bytes as f64) / first.rss_bytes as f64;
    let ended = last.deliveries_held - first.deliveries_held;
    let accounted = per_ended.map(|b| {
        (last.rss_bytes as f64 - first.rss_bytes as f64 - ended * b) / first.rss_bytes as f64
    });
    let per_minute = 60.0
        * slope(
            &window
                .iter()
                .map(|s| (s.at_s, s.rss_bytes as f64))
                .collect::<Vec<_>>(),
        );
    progress.done(&format!(
        "RSS {}B to {}B after warm-up ({:+.1}%), {:+.0} deliveries held",
        chart::short(first.rss_bytes as f64),
        chart::short(last.rss_bytes as f64),
        100.0 * growth,
        ended
    ));
    let minutes = (o.soak_time.as_secs_f64() - warm) / 60.0;
    rows.push([
        format!(
            "soak ({}, {} riders, {}/s): RSS growth over the last {minutes:.1} min",
            map_name,
            chart::short(RIDERS as f64),
            chart::short(RATE as f64)
        ),
        format!(
            "{:+.1}% ({}B/min)",
            100.0 * growth,
            chart::short(per_minute)
        ),
        String::new(),
    ]);
    if let Some(net) = accounted {
        rows.push([
            "soak: RSS growth, the ended deliveries' heap set aside".into(),
            format!("{:+.1}%", 100.0 * net),
            verdict(net <= 0.10, "≤ +10%"),
        ]);
    }
    let growth_stats = Stats::of(&[100.0 * growth]);
    report["soak"] = json!({
        "engine": "dongflow run -w 2 on the embedded broker, the simulator producing at a fixed rate",
        "riders": RIDERS,
        "rate": RATE,
        "seconds": o.soak_time.as_secs(),
        "warm_up_seconds": warm,
        "events_produced": produced,
        "rss_growth_after_warm_up": growth,
        "rss_slope_bytes_per_minute": per_minute,
        "deliveries_held_added": ended,
        "heap_bytes_per_ended_delivery": per_ended,
        "rss_growth_net_of_ended_deliveries": accounted,
        "samples": samples,
    });
    panels.push(Panel {
        title: format!("Soak: RSS growth after warm-up ({minutes:.1} min)"),
        unit: "%".into(),
        bars: vec![Bar::new("RSS", growth_stats, ORANGE)],
        target: Some((10.0, "target: +10%".into())),
        log: false,
    });
}
