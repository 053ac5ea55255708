//! The push feeds' section: how soon a change reaches a client of `GET /v1/riders/{id}/changes`
//! beside a client polling once a second, and the engine's CPU with a thousand feed clients
//! beside a thousand pollers.

use std::time::Duration;

use serde_json::{json, Value};

use crate::chart::{self, Bar, Panel, GREY, ORANGE};
use crate::crowd::{Crowd, Kind};
use crate::load::quantile_ms;
use crate::progress::Progress;
use crate::{live, Options, Stats};

/// Clients of each kind while the engine's CPU is measured.
const CLIENTS: usize = 1_000;

/// Per run: p50, p99 and max of one way of getting changes.
#[derive(Default)]
struct Latencies {
    p50: Vec<f64>,
    p99: Vec<f64>,
    max: Vec<f64>,
}

impl Latencies {
    fn push(&mut self, sorted_us: &[u32]) {
        self.p50.push(quantile_ms(sorted_us, 0.5));
        self.p99.push(quantile_ms(sorted_us, 0.99));
        self.max.push(quantile_ms(sorted_us, 1.0));
    }

    fn json(&self) -> Value {
        json!({"p50_ms": Stats::of(&self.p50), "p99_ms": Stats::of(&self.p99), "max_ms": Stats::of(&self.max)})
    }

    fn text(&self) -> String {
        let (p50, p99, max) = (
            Stats::of(&self.p50),
            Stats::of(&self.p99),
            Stats::of(&self.max),
        );
        format!(
            "{:.1} / {:.1} ({:.1}–{:.1}) / {:.1} ms",
            p50.median, p99.median, p99.min, p99.max, max.median
        )
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
    let mut out = Vec::new();
    let mut bars = Vec::new();
    let (mut idle, mut fed, mut polled) = (Vec::new(), Vec::new(), Vec::new());
    let (mut point_p50, mut point_p99) = (Vec::new(), Vec::new());
    // What the clients received in their CPU window: the load the figure is for.
    let (mut feed_events, mut poll_answers) = (Vec::new(), Vec::new());
    let riders: Vec<String> = (1..=o.riders)
        .map(|i| format!("/v1/riders/r-{i}"))
        .collect();
    let window = o.probe_time.min(Duration::from_secs(10));
    for (r, &rate) in o.feed_rates.iter().enumerate() {
        let (mut feed, mut poll) = (Latencies::default(), Latencies::default());
        for run in 1..=o.runs {
            progress.step(&format!(
                "push feeds at {} events/s, run {run}",
                chart::short(rate as f64)
            ));
            let live = live::Live::start(map, 2, o.riders, rate, &format!("push-{rate}-{run}"));
            // The state fills up before the figures count.
            std::thread::sleep(Duration::from_secs(3));
            let (f, p) = live.feed_and_poll(o.probe_time, Duration::from_millis(100), progress);
            feed.push(&f);
            poll.push(&p);
            let mut summary = format!(
                "feed p99 {:.1} ms, 1 s polling p99 {:.1} ms ({} pings)",
                quantile_ms(&f, 0.99),
                quantile_ms(&p, 0.99),
                f.len()
            );
            // CPU at the first rate only: the clients' cost does not depend on the input's.
            if r == 0 {
                progress.update("engine CPU, no clients");
                idle.push(live.cpu(window));
                progress.update(&format!("engine CPU, {CLIENTS} feed clients"));
                let crowd = Crowd::start(live.http, "/v1/districts/changes", CLIENTS, Kind::Feed);
                let before = crowd.received.load(std::sync::atomic::Ordering::Relaxed);
                fed.push(live.cpu(window));
                feed_events.push(
                    (crowd.received.load(std::sync::atomic::Ordering::Relaxed) - before) as f64
                        / window.as_secs_f64(),
                );
                // Point queries one at a time (a closed loop on one connection) beside the feeds.
                progress.update(&format!("point queries beside {CLIENTS} feed clients"));
                let q = live.load(riders.clone(), 1, window);
                point_p50.push(q.quantile_ms(0.5));
                point_p99.push(q.quantile_ms(0.99));
                drop(crowd);
                progress.update(&format!("engine CPU, {CLIENTS} pollers"));
                let every = Duration::from_secs(1);
                let crowd = Crowd::start(live.http, "/v1/districts", CLIENTS, Kind::Poll(every));
                let before = crowd.received.load(std::sync::atomic::Ordering::Relaxed);
                polled.push(live.cpu(window));
                poll_answers.push(
                    (crowd.received.load(std::sync::atomic::Ordering::Relaxed) - before) as f64
                        / window.as_secs_f64(),
                );
                drop(crowd);
                summary += &format!(
                    "; point query p99 {:.2} ms beside the feeds; CPU {:.2} idle, {:.2} with feeds, {:.2} with pollers",
                    point_p99[point_p99.len() - 1],
                    idle[idle.len() - 1],
                    fed[fed.len() - 1],
                    polled[polled.len() - 1]
                );
            }
            live.stop();
            progress.done(&summary);
        }
        out.push(json!({
            "rate_events_per_s": rate,
            "feed": feed.json(),
            "polling_1s": poll.json(),
        }));
        let at = chart::short(rate as f64);
        rows.push([
            format!("event → rider feed client at {at}/s: p50 / p99 / max"),
            feed.text(),
            String::new(),
        ]);
        rows.push([
            format!("event → client polling every 1 s at {at}/s: p50 / p99 / max"),
            poll.text(),
            String::new(),
        ]);
        bars.push(Bar::new(
            format!("{at}/s\nfeed"),
            Stats::of(&feed.p99),
            ORANGE,
        ));
        bars.push(Bar::new(
            format!("{at}/s\npoll 1 s"),
            Stats::of(&poll.p99),
            GREY,
        ));
    }
    let (idle, fed, polled) = (Stats::of(&idle), Stats::of(&fed), Stats::of(&polled));
    if let Some(&rate) = o.feed_rates.first() {
        rows.push([
            format!(
                "engine CPU at {}/s: no clients / {CLIENTS} district feeds / {CLIENTS} pollers of `/v1/districts` (1 s)",
                chart::short(rate as f64)
            ),
            format!(
                "{:.2} / {:.2} / {:.2} cores",
                idle.median, fed.median, polled.median
            ),
            String::new(),
        ]);
    }
    let (p50, p99) = (Stats::of(&point_p50), Stats::of(&point_p99));
    if let Some(&rate) = o.feed_rates.first() {
        rows.push([
            format!(
                "point query beside {CLIENTS} district feed clients at {}/s: p50 / p99",
                chart::short(rate as f64)
            ),
            format!("{:.2} / {} ms", p50.median, p99.text("")),
            crate::verdict(p99.median <= 2.0, "p99 ≤ 2 ms"),
        ]);
    }
    report["push"] = json!({
        "engine": "dongflow run -w 2, its own process, embedded broker in the benchmark's process",
        "map": map_name,
        "riders": o.riders,
        "probe": "a probe rider's ON_SHIFT every 100 ms (8 probes in turn), produced with linger.ms=0; the time until a client of GET /v1/riders/{probe}/changes receives it, and until a client polling GET /v1/riders/{probe} once a second sees it",
        "rates": out,
        "cpu_cores": {
            "rate_events_per_s": o.feed_rates.first(),
            "window_s": window.as_secs_f64(),
            "no_clients": idle,
            "district_feed_clients": fed,
            "pollers_1s_all_districts": polled,
            "clients": CLIENTS,
            "feed_events_received_per_s": Stats::of(&feed_events),
            "poll_answers_received_per_s": Stats::of(&poll_answers),
        },
        "point_query_beside_feed_clients_ms": {"p50": p50, "p99": p99, "load": "closed loop, 1 connection, random riders"},
    });
    panels.push(Panel {
        title: "Changes: produce → client, push feed vs 1 s polling".into(),
        unit: "ms (p99)".into(),
        bars,
        target: None,
        log: true,
    });
}
