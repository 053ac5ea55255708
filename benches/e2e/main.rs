//! dongflow's end-to-end benchmark: every headline figure in one command, beside its ceiling or
//! baseline measured in the same run, written to one JSON file and one SVG chart.
//!
//! `cargo bench --bench e2e` (all sections, 3 runs each); `cargo bench --bench e2e -- --help`.
//!
//! - [`inmem`]: the engine fed from memory on 1 and 2 workers, the single-threaded `HashMap`
//!   [`baseline`] on the same events, and memory per live rider and active delivery (each size in
//!   a process of its own).
//! - [`kafka_tp`]: Kafka throughput against tansu, beside a bare consumer reading the same topics.
//! - [`live`]: `dongflow run` on the embedded broker at fixed input rates: freshness probes, and
//!   queries under load from the closed-loop [`load`] generator.
//! - [`push`]: the push feeds beside 1-second polling (event to client), and the engine's CPU
//!   with a [`crowd`] of feed clients beside one of pollers.
//! - [`chart`], [`progress`]: the SVG chart, the progress display.

mod baseline;
mod chart;
mod crowd;
mod inmem;
mod kafka_tp;
mod live;
mod load;
mod progress;
mod push;
mod rss;
mod soak;

#[path = "../../tests/common/event_count.rs"]
mod event_count;
#[path = "../../tests/common/heap.rs"]
mod heap_common;
#[allow(dead_code)]
#[path = "../../tests/common/kafka.rs"]
mod kafka_common;

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use dongflow_dataflow::districts::DistrictIndex;
use serde::Serialize;
use serde_json::{json, Value};

use chart::{Bar, Panel, BLUE, GREEN, GREY, ORANGE};
use progress::Progress;

/// A figure over several runs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

impl Stats {
    pub fn of(values: &[f64]) -> Stats {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| !x.is_nan()).collect();
        if v.is_empty() {
            return Stats {
                median: f64::NAN,
                min: f64::NAN,
                max: f64::NAN,
            };
        }
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 {
            v[v.len() / 2]
        } else {
            (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
        };
        Stats {
            median,
            min: v[0],
            max: v[v.len() - 1],
        }
    }

    fn text(&self, unit: &str) -> String {
        if self.min == self.max {
            format!("{}{unit}", chart::short(self.median))
        } else {
            format!(
                "{}{unit} ({}–{})",
                chart::short(self.median),
                chart::short(self.min),
                chart::short(self.max)
            )
        }
    }
}

const USAGE: &str = "\
dongflow end-to-end benchmark

usage: cargo bench --bench e2e -- [options]

  --only LIST          sections to run, comma-separated (default: all):
                       inmem, memory, rss, kafka, freshness, queries, push, soak
  --runs N             runs of every figure; medians are reported (default 3)
  --out DIR            where e2e.json and e2e.svg go (default target/e2e)
  --events N           in-memory events (default 2000000)
  --riders N           simulated riders (default 100000)
  --kafka-events N     events produced to tansu (default 1000000)
  --rates LIST         freshness input rates in events/s (default 10000,50000,100000)
  --feed-rates LIST    push feed input rates in events/s (default 10000,50000)
  --query-rate N       input rate while queries are measured (default 50000)
  --soak-seconds N     how long the soak runs, a fifth of it warm-up (default 600)
  --districts FILE     map of the live runs (default: the real Seoul map from
                       $DONGFLOW_DISTRICTS_DIR or ../shared/data/districts, else built-in)
  --quick              small sizes and one run: a smoke test of the benchmark itself

Kafka throughput needs tansu (cargo install tansu --locked --features dynostore,libsql);
without it that section is skipped and says so.";

struct Options {
    /// Small sizes, one run: the targets are not judged.
    quick: bool,
    sections: Vec<String>,
    runs: usize,
    out: PathBuf,
    events: usize,
    riders: usize,
    kafka_events: u64,
    rates: Vec<u64>,
    feed_rates: Vec<u64>,
    query_rate: u64,
    districts: Option<PathBuf>,
    memory_fleets: Vec<usize>,
    probe_time: Duration,
    load_time: Duration,
    soak_time: Duration,
}

/// Every section, in the order they run.
const SECTIONS: [&str; 8] = [
    "inmem",
    "memory",
    "rss",
    "kafka",
    "freshness",
    "queries",
    "push",
    "soak",
];

fn default_districts() -> Option<PathBuf> {
    let dir = std::env::var("DONGFLOW_DISTRICTS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/districts")
        });
    let file = dir.join("seoul-admdong.geojson");
    file.is_file().then_some(file)
}

fn parse_options() -> Result<Options, String> {
    let mut o = Options {
        quick: false,
        sections: SECTIONS.map(String::from).to_vec(),
        runs: 3,
        out: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/e2e"),
        events: 2_000_000,
        riders: 100_000,
        kafka_events: 1_000_000,
        rates: vec![10_000, 50_000, 100_000],
        feed_rates: vec![10_000, 50_000],
        query_rate: 50_000,
        districts: default_districts(),
        memory_fleets: vec![100_000, 1_000_000],
        probe_time: Duration::from_secs(15),
        load_time: Duration::from_secs(8),
        soak_time: Duration::from_secs(600),
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        let number = |s: String| s.parse::<u64>().map_err(|e| format!("{s}: {e}"));
        match arg.as_str() {
            // cargo bench passes --bench to every benchmark binary.
            "--bench" => {}
            "--help" | "-h" => return Err(String::new()),
            "--only" => o.sections = value("--only")?.split(',').map(String::from).collect(),
            "--runs" => o.runs = number(value("--runs")?)?.max(1) as usize,
            "--out" => o.out = value("--out")?.into(),
            "--events" => o.events = number(value("--events")?)? as usize,
            "--riders" => o.riders = number(value("--riders")?)? as usize,
            "--kafka-events" => o.kafka_events = number(value("--kafka-events")?)?,
            "--rates" => {
                o.rates = value("--rates")?
                    .split(',')
                    .map(|r| number(r.to_owned()))
                    .collect::<Result<_, _>>()?
            }
            "--feed-rates" => {
                o.feed_rates = value("--feed-rates")?
                    .split(',')
                    .map(|r| number(r.to_owned()))
                    .collect::<Result<_, _>>()?
            }
            "--query-rate" => o.query_rate = number(value("--query-rate")?)?,
            "--soak-seconds" => {
                o.soak_time = Duration::from_secs(number(value("--soak-seconds")?)?.max(10))
            }
            "--districts" => o.districts = Some(value("--districts")?.into()),
            "--quick" => {
                o.quick = true;
                o.runs = 1;
                o.events = 200_000;
                o.riders = 20_000;
                o.kafka_events = 50_000;
                o.rates = vec![10_000];
                o.feed_rates = vec![10_000];
                o.query_rate = 10_000;
                o.memory_fleets = vec![20_000];
                o.probe_time = Duration::from_secs(3);
                o.load_time = Duration::from_secs(2);
                o.soak_time = Duration::from_secs(30);
            }
            other => return Err(format!("unknown option {other}")),
        }
    }
    for s in &o.sections {
        if !SECTIONS.contains(&s.as_str()) {
            return Err(format!("unknown section {s}"));
        }
    }
    Ok(o)
}

fn main() {
    // A memory measurement runs in a process of its own, so that its peak RSS is its own.
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--memory-point") {
        let n = |i: usize| args.get(i).and_then(|s| s.parse().ok()).unwrap_or(0);
        let index = Arc::new(DistrictIndex::builtin_seoul());
        let point = inmem::memory_point(n(2), n(3), n(4), &index);
        println!("{}", serde_json::to_string(&point).expect("json"));
        return;
    }
    let o = match parse_options() {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return;
        }
        Err(e) => {
            eprintln!("e2e: {e}\n\n{USAGE}");
            std::process::exit(2);
        }
    };
    let has = |s: &str| o.sections.iter().any(|x| x == s);
    let tansu = if has("kafka") {
        kafka_common::tansu_binary()
    } else {
        None
    };
    let steps = usize::from(has("inmem")) * (1 + 3 * o.runs)
        + usize::from(has("memory")) * o.memory_fleets.len() * 3 * o.runs
        + usize::from(has("rss")) * 3 * o.runs
        + usize::from(tansu.is_some()) * (2 + 3 * o.runs)
        + usize::from(has("freshness")) * o.rates.len() * o.runs
        + usize::from(has("queries")) * o.runs
        + usize::from(has("push")) * o.feed_rates.len() * o.runs
        + usize::from(has("soak"));
    let progress = Progress::new(steps);
    let mut report = json!({
        "machine": {
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "os": std::env::consts::OS,
            "arch": std::env::consts::ARCH,
        },
        "runs": o.runs,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
    });
    let mut rows: Vec<[String; 3]> = Vec::new();
    let mut panels: Vec<Panel> = Vec::new();
    if has("inmem") {
        in_memory(&o, &progress, &mut report, &mut rows, &mut panels);
    }
    if has("kafka") {
        match &tansu {
            Some(binary) => kafka(&o, binary, &progress, &mut report, &mut rows, &mut panels),
            None => {
                report["kafka"] = json!({"skipped": "tansu is not installed"});
            }
        }
    }
    let map = live::map(o.districts.as_deref());
    let map_name = match &o.districts {
        Some(f) => format!(
            "{} ({} districts)",
            f.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned()),
            map.codes.len()
        ),
        None => format!("built-in ({} districts)", map.codes.len()),
    };
    if has("freshness") {
        freshness(
            &o,
            &map,
            &map_name,
            &progress,
            &mut report,
            &mut rows,
            &mut panels,
        );
    }
    if has("queries") {
        queries(
            &o,
            &map,
            &map_name,
            &progress,
            &mut report,
            &mut rows,
            &mut panels,
        );
    }
    if has("push") {
        push::section(
            &o,
            &map,
            &map_name,
            &progress,
            &mut report,
            &mut rows,
            &mut panels,
        );
    }
    if has("memory") {
        memory(&o, &progress, &mut report, &mut rows, &mut panels);
    }
    if has("rss") {
        rss::section(&o, &map, &progress, &mut report, &mut rows, &mut panels);
    }
    if has("soak") {
        // After the memory section, whose bytes per ended delivery it sets aside.
        soak::section(
            &o,
            &map,
            &map_name,
            &progress,
            &mut report,
            &mut rows,
            &mut panels,
        );
    }
    std::fs::create_dir_all(&o.out).expect("output dir");
    let json_path = o.out.join("e2e.json");
    let svg_path = o.out.join("e2e.svg");
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&report).expect("json") + "\n",
    )
    .expect("write e2e.json");
    let cores = report["machine"]["cores"].as_u64().unwrap_or(0);
    let footnote = format!(
        "Bars: median of {} runs; whiskers: min to max. {cores} cores, shared. Dashed: target. `cargo bench --bench e2e`",
        o.runs
    );
    std::fs::write(
        &svg_path,
        chart::svg("dongflow end-to-end benchmark", &footnote, &panels),
    )
    .expect("write e2e.svg");
    println!("\n| figure | result (median, min–max) | target |\n|---|---|---|");
    for [figure, result, target] in &mut rows {
        if o.quick && !target.is_empty() {
            // The targets hold for the full sizes and rates, not for a smoke run's.
            if let Some((goal, _)) = target.split_once(": ") {
                *target = format!("{goal}: not judged (--quick)");
            }
        }
        println!("| {figure} | {result} | {target} |");
    }
    println!("\n{}\n{}", json_path.display(), svg_path.display());
}

/// "met" or "missed" beside a target.
fn verdict(met: bool, target: &str) -> String {
    format!("{target}: {}", if met { "met" } else { "missed" })
}

fn in_memory(
    o: &Options,
    progress: &Progress,
    report: &mut Value,
    rows: &mut Vec<[String; 3]>,
    panels: &mut Vec<Panel>,
) {
    let index = Arc::new(DistrictIndex::builtin_seoul());
    progress.step("in-memory: simulating the events");
    let events = inmem::simulator_events(o.riders, o.events);
    progress.done(&format!("{} events of {} riders", events.len(), o.riders));
    let (mut w1, mut w2, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let (mut w2_over_w1, mut w1_over_base, mut w2_over_base) = (Vec::new(), Vec::new(), Vec::new());
    for run in 1..=o.runs {
        let rate = |(r, _): &(f64, inmem::Outcome)| format!("{} events/s", chart::short(*r));
        let (r1, c1) = progress.timed(
            &format!("in-memory: engine -w 1, run {run}"),
            || inmem::engine_run(&events, 1, &index),
            rate,
        );
        let (r2, c2) = progress.timed(
            &format!("in-memory: engine -w 2, run {run}"),
            || inmem::engine_run(&events, 2, &index),
            rate,
        );
        let (rb, cb) = progress.timed(
            &format!("in-memory: HashMap baseline, run {run}"),
            || inmem::baseline_run(&events, &index),
            rate,
        );
        assert_eq!(c1, cb, "-w 1 and the baseline disagree");
        assert_eq!(c2, cb, "-w 2 and the baseline disagree");
        w1.push(r1);
        w2.push(r2);
        base.push(rb);
        w2_over_w1.push(r2 / r1);
        w1_over_base.push(r1 / rb);
        w2_over_base.push(r2 / rb);
    }
    let (s1, s2, sb) = (Stats::of(&w1), Stats::of(&w2), Stats::of(&base));
    let (scale, w1_vs_base, vs_base) = (
        Stats::of(&w2_over_w1),
        Stats::of(&w1_over_base),
        Stats::of(&w2_over_base),
    );
    report["in_memory"] = json!({
        "events": events.len(),
        "riders": o.riders,
        "map": "built-in (25 districts)",
        "engine_w1_events_per_s": s1,
        "engine_w2_events_per_s": s2,
        "baseline_events_per_s": sb,
        "w2_over_w1": scale,
        "w1_over_baseline": w1_vs_base,
        "w2_over_baseline": vs_base,
        "answers_equal_to_baseline": "every district's counts and 2,000 riders' snapshots, every run",
    });
    rows.push([
        "in-memory, engine `-w 1`".into(),
        s1.text(" events/s"),
        String::new(),
    ]);
    rows.push([
        "in-memory, engine `-w 2`".into(),
        s2.text(" events/s"),
        verdict(s2.median >= 1e6, "≥ 1M events/s"),
    ]);
    rows.push([
        "`-w 2` over `-w 1` (same run)".into(),
        scale.text("×"),
        verdict(scale.median >= 1.7, "≥ 1.7×"),
    ]);
    rows.push([
        "single-threaded HashMap baseline".into(),
        sb.text(" events/s"),
        String::new(),
    ]);
    rows.push([
        "engine `-w 1` over the baseline (same run)".into(),
        w1_vs_base.text("×"),
        verdict(w1_vs_base.median >= 0.9, "≥ 0.9×"),
    ]);
    rows.push([
        "engine `-w 2` over the baseline (same run)".into(),
        vs_base.text("×"),
        verdict(vs_base.median >= 1.5, "≥ 1.5×"),
    ]);
    panels.push(Panel {
        title: "In-memory throughput".into(),
        unit: "events/s".into(),
        bars: vec![
            Bar::new("engine\n-w 1", s1, BLUE),
            Bar::new("engine\n-w 2", s2, BLUE),
            Bar::new("HashMap\nbaseline", sb, GREY),
        ],
        target: Some((1e6, "target -w 2: 1M/s".into())),
        log: false,
    });
}

fn kafka(
    o: &Options,
    binary: &std::path::Path,
    progress: &Progress,
    report: &mut Value,
    rows: &mut Vec<[String; 3]>,
    panels: &mut Vec<Panel>,
) {
    progress.step("kafka: starting tansu (sqlite storage)");
    let broker = kafka_common::Tansu::start(binary.to_path_buf(), kafka_common::free_port());
    progress.done(&broker.bootstrap());
    progress.step(&format!("kafka: producing {} events", o.kafka_events));
    let inputs = kafka_tp::produce(&broker.bootstrap(), o.kafka_events, o.riders, progress);
    progress.done(&format!(
        "{} events/s (tansu's write rate)",
        chart::short(inputs.produce_rate)
    ));
    let (mut bare, mut w1, mut w2, mut r1, mut r2) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut per_event = 0.0;
    for run in 1..=o.runs {
        let c = progress.timed(
            &format!("kafka: bare consumer (ceiling), run {run}"),
            || kafka_tp::bare_consumer(&inputs, progress),
            |c| format!("{} events/s", chart::short(*c)),
        );
        let of_ceiling = |(e, _): &(f64, f64)| {
            format!("{} events/s, {:.2} of the ceiling", chart::short(*e), e / c)
        };
        let (e1, written) = progress.timed(
            &format!("kafka: engine -w 1, run {run}"),
            || kafka_tp::engine(&inputs, 1, run, progress),
            of_ceiling,
        );
        let (e2, _) = progress.timed(
            &format!("kafka: engine -w 2, run {run}"),
            || kafka_tp::engine(&inputs, 2, run, progress),
            of_ceiling,
        );
        per_event = written;
        bare.push(c);
        w1.push(e1);
        w2.push(e2);
        r1.push(e1 / c);
        r2.push(e2 / c);
    }
    let (sc, s1, s2) = (Stats::of(&bare), Stats::of(&w1), Stats::of(&w2));
    let (q1, q2) = (Stats::of(&r1), Stats::of(&r2));
    report["kafka"] = json!({
        "broker": "tansu, sqlite storage, on the same machine",
        "events": o.kafka_events,
        "partitions_per_topic": kafka_tp::PARTITIONS,
        "produce_events_per_s": inputs.produce_rate.round(),
        "bare_consumer_events_per_s": sc,
        "engine_w1_events_per_s": s1,
        "engine_w2_events_per_s": s2,
        "w1_over_ceiling": q1,
        "w2_over_ceiling": q2,
        "changelog_records_per_event": (per_event * 1000.0).round() / 1000.0,
    });
    rows.push([
        "Kafka (tansu): bare consumer, the ceiling".into(),
        sc.text(" events/s"),
        String::new(),
    ]);
    rows.push([
        "Kafka: engine `-w 1` over the ceiling".into(),
        format!("{} ({})", q1.text("×"), s1.text(" events/s")),
        verdict(q1.median >= 0.7, "≥ 0.70×"),
    ]);
    rows.push([
        "Kafka: engine `-w 2` over the ceiling".into(),
        format!("{} ({})", q2.text("×"), s2.text(" events/s")),
        verdict(q2.median >= 0.7, "≥ 0.70×"),
    ]);
    panels.push(Panel {
        title: "Kafka throughput (tansu)".into(),
        unit: "events/s".into(),
        bars: vec![
            Bar::new("bare\nconsumer", sc, GREY),
            Bar::new("engine\n-w 1", s1, BLUE),
            Bar::new("engine\n-w 2", s2, BLUE),
        ],
        target: Some((sc.median * 0.7, "target: 0.7 × ceiling".into())),
        log: false,
    });
}

fn freshness(
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
    for &rate in &o.rates {
        let (mut p50, mut p99, mut max, mut achieved, mut samples) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), 0);
        for run in 1..=o.runs {
            progress.step(&format!(
                "freshness at {} events/s, run {run}",
                chart::short(rate as f64)
            ));
            let live = live::Live::start(map, 2, o.riders, rate, &format!("fresh-{rate}-{run}"));
            let started = std::time::Instant::now();
            // The state fills up before the figures count.
            std::thread::sleep(Duration::from_secs(3));
            let s = live.freshness(o.probe_time, Duration::from_millis(50), progress);
            let produced = live.stop() as f64 / started.elapsed().as_secs_f64();
            let q = |x| load::quantile_ms(&s, x);
            progress.done(&format!(
                "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} probes; {} events/s produced)",
                q(0.5),
                q(0.99),
                q(1.0),
                s.len(),
                chart::short(produced)
            ));
            p50.push(q(0.5));
            p99.push(q(0.99));
            max.push(q(1.0));
            achieved.push(produced);
            samples += s.len();
        }
        let (s50, s99, smax) = (Stats::of(&p50), Stats::of(&p99), Stats::of(&max));
        out.push(json!({
            "rate_events_per_s": rate,
            "produced_events_per_s": Stats::of(&achieved),
            "probes": samples,
            "p50_ms": s50,
            "p99_ms": s99,
            "max_ms": smax,
        }));
        let target = if rate == 50_000 {
            verdict(s99.median <= 50.0, "p99 ≤ 50 ms")
        } else {
            String::new()
        };
        rows.push([
            format!(
                "freshness at {}/s: p50 / p99 / max",
                chart::short(rate as f64)
            ),
            format!(
                "{:.1} / {:.1} ({:.1}–{:.1}) / {:.1} ms",
                s50.median, s99.median, s99.min, s99.max, smax.median
            ),
            target,
        ]);
        bars.push(Bar::new(
            format!("{}/s\np99", chart::short(rate as f64)),
            s99,
            ORANGE,
        ));
    }
    report["freshness"] = json!({
        "engine": "dongflow run -w 2, its own process, embedded broker in the benchmark's process",
        "map": map_name,
        "riders": o.riders,
        "probe": "a probe rider's ON_SHIFT with the wall clock as ts, produced with linger.ms=0; polled every 0.5 ms on GET /v1/riders/{id} until updated_ts shows it",
        "rates": out,
    });
    panels.push(Panel {
        title: "Freshness: produce → HTTP answer".into(),
        unit: "ms (p99)".into(),
        bars,
        target: Some((50.0, "target at 50k/s: 50 ms".into())),
        log: true,
    });
}

/// One route's figures over the runs.
#[derive(Default)]
struct RouteRuns {
    p50: Vec<f64>,
    p99: Vec<f64>,
    rate: Vec<f64>,
    /// Share of answers with status 200 (last run).
    ok_share: f64,
    /// Input records not yet read right after the load.
    lag: Vec<f64>,
}

fn queries(
    o: &Options,
    map: &live::Map,
    map_name: &str,
    progress: &Progress,
    report: &mut Value,
    rows: &mut Vec<[String; 3]>,
    panels: &mut Vec<Panel>,
) {
    let connections = 8;
    let routes: [(&str, Vec<String>); 3] = [
        (
            "rider",
            (1..=o.riders)
                .map(|i| format!("/v1/riders/r-{i}"))
                .collect(),
        ),
        (
            "district",
            map.codes
                .iter()
                .map(|c| format!("/v1/districts/{c}"))
                .collect(),
        ),
        ("all districts", vec!["/v1/districts".to_owned()]),
    ];
    let mut results: Vec<RouteRuns> = routes.iter().map(|_| RouteRuns::default()).collect();
    let mut peak = Vec::new();
    for run in 1..=o.runs {
        progress.step(&format!(
            "queries under {} events/s, run {run}",
            chart::short(o.query_rate as f64)
        ));
        let live = live::Live::start(map, 2, o.riders, o.query_rate, &format!("query-{run}"));
        std::thread::sleep(Duration::from_secs(3));
        let mut summary = Vec::new();
        for (i, (name, paths)) in routes.iter().enumerate() {
            progress.update(name);
            let r = live.load(paths.clone(), connections, o.load_time);
            // Whether ingest kept up while queries had the machine: the backlog right after.
            let lag = live.consumer_lag().unwrap_or(f64::NAN);
            summary.push(format!(
                "{name} p99 {:.2} ms at {}/s, input lag {lag:.0}",
                r.quantile_ms(0.99),
                chart::short(r.requests_per_s)
            ));
            results[i].lag.push(lag);
            let total = (r.ok + r.not_ok).max(1) as f64;
            results[i].p50.push(r.quantile_ms(0.5));
            results[i].p99.push(r.quantile_ms(0.99));
            results[i].rate.push(r.requests_per_s);
            results[i].ok_share = r.ok as f64 / total;
        }
        peak.push(live.peak_rss() as f64);
        live.stop();
        progress.done(&summary.join("; "));
    }
    let mut out = serde_json::Map::new();
    let mut bars = Vec::new();
    for ((name, _), runs) in routes.iter().zip(&results) {
        let (s50, s99, srps) = (
            Stats::of(&runs.p50),
            Stats::of(&runs.p99),
            Stats::of(&runs.rate),
        );
        out.insert(
            name.to_string(),
            json!({"p50_ms": s50, "p99_ms": s99, "requests_per_s": srps, "share_200": runs.ok_share,
                   "input_lag_after_records": Stats::of(&runs.lag)}),
        );
        let target = match *name {
            "all districts" => verdict(s99.median <= 5.0, "p99 ≤ 5 ms"),
            _ => verdict(
                s99.median <= 1.0 && srps.median >= 30_000.0,
                "p99 ≤ 1 ms, ≥ 30k/s",
            ),
        };
        rows.push([
            format!("query `{name}` under load: p50 / p99, requests/s"),
            format!(
                "{:.2} / {} ms, {}",
                s50.median,
                s99.text(""),
                srps.text("/s")
            ),
            target,
        ]);
        bars.push(Bar::new(format!("{name}\np99"), s99, GREEN));
    }
    report["queries"] = json!({
        "engine": "dongflow run -w 2, its own process, embedded broker in the benchmark's process",
        "map": map_name,
        "ingest_events_per_s": o.query_rate,
        "load": format!("closed loop, {connections} keep-alive connections, 1 client thread, {} s per route", o.load_time.as_secs()),
        "routes": out,
        "engine_peak_rss_bytes": Stats::of(&peak),
    });
    panels.push(Panel {
        title: format!("Queries at {}/s ingest", chart::short(o.query_rate as f64)),
        unit: "ms (p99)".into(),
        bars,
        target: Some((1.0, "target points: 1 ms".into())),
        log: true,
    });
}

fn memory(
    o: &Options,
    progress: &Progress,
    report: &mut Value,
    rows: &mut Vec<[String; 3]>,
    panels: &mut Vec<Panel>,
) {
    let point = |riders: usize, deliveries: usize, ended: usize| -> inmem::MemoryPoint {
        let out = Command::new(std::env::current_exe().expect("own path"))
            .args([
                "--memory-point",
                &riders.to_string(),
                &deliveries.to_string(),
                &ended.to_string(),
            ])
            .output()
            .expect("memory measurement runs");
        assert!(
            out.status.success(),
            "memory measurement failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("memory point JSON")
    };
    let mut out = Vec::new();
    let mut bars = Vec::new();
    for &riders in &o.memory_fleets {
        let deliveries = riders / 5;
        // As many ended deliveries as riders: a few hours of a platform's orders per rider on shift.
        let ended = riders;
        let (mut per_rider, mut per_delivery, mut per_ended, mut rss) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for run in 1..=o.runs {
            progress.step(&format!(
                "memory: {} riders on shift, run {run}",
                chart::short(riders as f64)
            ));
            let alone = point(riders, 0, 0);
            assert_eq!(alone.riders_on_shift, riders as u64);
            progress.done(&format!(
                "{} heap bytes",
                chart::short(alone.heap_bytes as f64)
            ));
            progress.step(&format!(
                "memory: and {} active deliveries, run {run}",
                chart::short(deliveries as f64)
            ));
            let both = point(riders, deliveries, 0);
            assert_eq!(both.active_deliveries, deliveries as u64);
            progress.done(&format!(
                "{} heap bytes, peak RSS {}B",
                chart::short(both.heap_bytes as f64),
                chart::short(both.peak_rss_bytes as f64)
            ));
            progress.step(&format!(
                "memory: and {} ended deliveries, run {run}",
                chart::short(ended as f64)
            ));
            let remembered = point(riders, deliveries, ended);
            assert_eq!(remembered.deliveries_held, deliveries + ended);
            progress.done(&format!(
                "{} heap bytes",
                chart::short(remembered.heap_bytes as f64)
            ));
            per_rider.push(alone.heap_bytes as f64 / riders as f64);
            per_delivery.push((both.heap_bytes - alone.heap_bytes) as f64 / deliveries as f64);
            per_ended.push((remembered.heap_bytes - both.heap_bytes) as f64 / ended as f64);
            rss.push(both.peak_rss_bytes as f64);
        }
        let (sr, sd, se, srss) = (
            Stats::of(&per_rider),
            Stats::of(&per_delivery),
            Stats::of(&per_ended),
            Stats::of(&rss),
        );
        out.push(json!({
            "riders_on_shift": riders,
            "active_deliveries": deliveries,
            "heap_bytes_per_rider": sr,
            "heap_bytes_per_active_delivery": sd,
            "ended_deliveries": ended,
            "heap_bytes_per_ended_delivery": se,
            "peak_rss_bytes": srss,
        }));
        let size = chart::short(riders as f64);
        rows.push([
            format!("memory at {size} riders: heap bytes per live rider"),
            sr.text(" B"),
            verdict(sr.median <= 250.0, "≤ 250 B"),
        ]);
        rows.push([
            format!("memory at {size} riders: heap bytes per active delivery"),
            sd.text(" B"),
            verdict(sd.median <= 160.0, "≤ 160 B"),
        ]);
        rows.push([
            format!("memory at {size} riders: heap bytes per remembered ended delivery"),
            se.text(" B"),
            verdict(se.median <= 64.0, "≤ 64 B"),
        ]);
        rows.push([
            format!(
                "memory at {size} riders + {} deliveries: peak RSS",
                chart::short(deliveries as f64)
            ),
            srss.text("B"),
            String::new(),
        ]);
        bars.push(Bar::new(format!("per rider\n{size}"), sr, BLUE));
        bars.push(Bar::new(format!("per delivery\n{size}"), sd, GREEN));
        bars.push(Bar::new(format!("per ended\n{size}"), se, GREEN));
    }
    report["memory"] = json!({
        "engine": "-w 2, fed from memory; the state only (one SHIFT_STARTED per rider, one ASSIGNED per delivery, CREATED then DELIVERED per ended delivery)",
        "what": "heap the engine holds (allocator statistics: upsert state, arrangements, the serving view) divided by the records; a delivery's bytes are the heap added by the deliveries; an ended delivery's, the heap added by the ended ones",
        "fleets": out,
    });
    panels.push(Panel {
        title: "Memory per live record".into(),
        unit: "heap bytes".into(),
        bars,
        target: Some((250.0, "target: 250 B".into())),
        log: false,
    });
}
