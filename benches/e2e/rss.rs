//! Resident memory from outside, per rider and per delivery: a `dongflow run -w 2` process started
//! on a backlog (one `SHIFT_STARTED` per rider, then one `ASSIGNED` per delivery to a random rider)
//! and caught up with it; its RSS read from `/proc` once it is ready and has settled (the free
//! memory given back). The slope between fleet sizes is what one more rider (or delivery) costs
//! as a container's memory limit sees it: heap, allocator retention, buffers and all.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::chart::{self, Bar, Panel, GREEN, ORANGE};
use crate::kafka_common::{eventually, produce, Record};
use crate::progress::Progress;
use crate::{live, verdict, Options, Stats};

/// The two fleets whose difference gives the per-rider figure, and the deliveries assigned on top
/// of the larger one.
fn sizes(o: &Options) -> ([usize; 2], usize) {
    match o.quick {
        true => ([10_000, 30_000], 10_000),
        false => ([100_000, 300_000], 100_000),
    }
}

/// A point inside Seoul, spread over the city by `i`.
fn somewhere(i: usize) -> (f64, f64) {
    let (a, b) = ((i * 7_919) % 1_000, (i * 104_729) % 1_000);
    (
        37.48 + 0.12 * a as f64 / 1_000.0,
        126.90 + 0.20 * b as f64 / 1_000.0,
    )
}

/// One `SHIFT_STARTED` per rider and one `ASSIGNED` per delivery, to a rider picked by a fixed
/// stride.
fn backlog(
    bootstrap: &str,
    riders_topic: &str,
    deliveries_topic: &str,
    riders: usize,
    deliveries: usize,
) {
    let ts = 1_764_000_000_000u64;
    let mut records = Vec::with_capacity(riders + deliveries);
    for i in 0..riders {
        let (lat, lon) = somewhere(i);
        let id = format!("r-{i}");
        let value = format!(
            r#"{{"rider_id":"{id}","status":"SHIFT_STARTED","rider_type":"CONNECT","location":{{"lat":{lat:.5},"lon":{lon:.5}}},"ts":{ts}}}"#
        );
        records.push(Record::new(
            riders_topic,
            Some(id.as_bytes()),
            Some(value.as_bytes()),
        ));
    }
    for i in 0..deliveries {
        let (lat, lon) = somewhere(i + riders);
        let id = format!("d-{i}");
        let rider = (i * 48_271) % riders;
        let value = format!(
            r#"{{"delivery_id":"{id}","status":"ASSIGNED","delivery_type":"FOOD","pickup":{{"lat":{lat:.5},"lon":{lon:.5}}},"rider_id":"r-{rider}","vehicle":"MOTORCYCLE","ts":{ts}}}"#
        );
        records.push(Record::new(
            deliveries_topic,
            Some(id.as_bytes()),
            Some(value.as_bytes()),
        ));
    }
    produce(bootstrap, &records);
}

/// RSS of a process that caught up with `riders` riders and `deliveries` deliveries, once ready
/// and settled, and its peak.
fn caught_up(
    o: &Options,
    map: &live::Map,
    riders: usize,
    deliveries: usize,
    run: usize,
) -> (u64, u64) {
    let tag = format!("rss-{riders}-{deliveries}-{run}");
    // Enough partitions that the embedded broker keeps the whole backlog (about 5 MB each).
    let partitions = ((riders + deliveries) / 20_000).max(4) as i32;
    let live = live::Live::spawn(map, 2, partitions, &tag, |bootstrap, r, d| {
        backlog(bootstrap, r, d, riders, deliveries)
    });
    let applied = (riders + deliveries) as f64;
    eventually(Duration::from_secs(600), "the backlog applied", || {
        (live.metric("dongflow_events_applied_total{") == Some(applied)).then_some(())
    });
    // Settled: the changelog written and acknowledged, the batches of the catch-up freed and the
    // free memory given back (the engine looks every `memory::EVERY`, and gives it back once caught
    // up and its changelog acknowledged, or `memory::SETTLE_LIMIT` after catching up). A
    // benchmark's pacing: RSS is read once it has not moved for three such periods.
    let pid = live.pid().to_string();
    let mut last = crate::inmem::status_bytes(&pid, "VmRSS:");
    let (settle, still) = (
        Instant::now() + o.probe_time + dongflow::memory::SETTLE_LIMIT,
        3 * dongflow::memory::EVERY,
    );
    let mut since = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = crate::inmem::status_bytes(&pid, "VmRSS:");
        if now.abs_diff(last) as f64 / last.max(1) as f64 >= 0.005 {
            since = Instant::now();
        }
        last = now;
        if since.elapsed() > still || Instant::now() > settle {
            break;
        }
    }
    let peak = live.peak_rss();
    live.stop();
    (last, peak)
}

pub fn section(
    o: &Options,
    map: &live::Map,
    progress: &Progress,
    report: &mut Value,
    rows: &mut Vec<[String; 3]>,
    panels: &mut Vec<Panel>,
) {
    let ([small, large], deliveries) = sizes(o);
    let (mut per_rider, mut per_delivery, mut runs) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=o.runs {
        let measure = |riders: usize, deliveries: usize| {
            progress.timed(
                &format!(
                    "rss: dongflow run -w 2 caught up with {riders} riders, {deliveries} deliveries, run {run}"
                ),
                || caught_up(o, map, riders, deliveries, run),
                |(rss, peak)| {
                    format!(
                        "RSS {}B (peak {}B)",
                        chart::short(*rss as f64),
                        chart::short(*peak as f64)
                    )
                },
            )
        };
        let (a, a_peak) = measure(small, 0);
        let (b, b_peak) = measure(large, 0);
        let (c, c_peak) = measure(large, deliveries);
        let rider = (b as f64 - a as f64) / (large - small) as f64;
        let delivery = (c as f64 - b as f64) / deliveries as f64;
        per_rider.push(rider);
        per_delivery.push(delivery);
        runs.push(json!({
            "rss_bytes": [a, b, c],
            "peak_rss_bytes": [a_peak, b_peak, c_peak],
            "rss_bytes_per_rider": rider,
            "rss_bytes_per_delivery": delivery,
        }));
    }
    let (rider, delivery) = (Stats::of(&per_rider), Stats::of(&per_delivery));
    rows.push([
        format!(
            "RSS per live rider on shift, from outside (`dongflow run -w 2` caught up, {} → {} riders)",
            chart::short(small as f64),
            chart::short(large as f64)
        ),
        format!("{:.0} B ({:.0}–{:.0})", rider.median, rider.min, rider.max),
        judged(&rider, 500.0),
    ]);
    rows.push([
        format!(
            "RSS per active delivery, from outside ({} `ASSIGNED` on {} riders)",
            chart::short(deliveries as f64),
            chart::short(large as f64)
        ),
        format!(
            "{:.0} B ({:.0}–{:.0})",
            delivery.median, delivery.min, delivery.max
        ),
        judged(&delivery, 320.0),
    ]);
    report["rss"] = json!({
        "engine": "dongflow run -w 2 on the embedded broker, started on a backlog from the earliest offsets; RSS read from /proc once every event is applied and RSS has settled",
        "riders": [small, large],
        "deliveries": deliveries,
        "rss_bytes_per_rider": rider,
        "rss_bytes_per_delivery": delivery,
        "runs": runs,
    });
    panels.push(Panel {
        title: "RSS from outside, per rider and per delivery".into(),
        unit: "B".into(),
        bars: vec![
            Bar::new("per rider", rider, GREEN),
            Bar::new("per delivery", delivery, ORANGE),
        ],
        target: Some((500.0, "target: 500 B per rider".into())),
        log: false,
    });
}

/// The verdict on a per-entry RSS figure against `target` bytes. The figure is a difference of
/// two processes' RSS, mostly what the allocator kept after the catch-up: when a run gives no
/// growth at all, the step is within the spread between runs, and the figure judges nothing.
fn judged(figure: &Stats, target: f64) -> String {
    let goal = format!("≤ {target:.0} B");
    if figure.min <= 0.0 {
        format!("{goal}: not resolved (a run measured no growth: the step is within the spread of runs)")
    } else {
        verdict(figure.median <= target, &goal)
    }
}
