//! `GET /metrics`: the process's figures in Prometheus' text format (0.0.4), encoded by the
//! `prometheus` crate.
//!
//! Two kinds of family: the HTTP request counters and latency histograms live in a [`Registry`]
//! of their own; everything else is counted where it happens (atomics of the
//! engine, the Kafka edges, the checkpoint writer and the changelog reader, in their own crates
//! and modules, which need no metrics library) or in `/proc` (the process metrics) and read into
//! families at each scrape ([`Scrape`]). Every name starts with `dongflow_` (CONTRACT section 6).

use std::time::Duration;

use dongflow_connectors::kafka::{KafkaMetrics, OutputKind};
use hyper::StatusCode;
use prometheus::core::Collector;
use prometheus::proto::MetricFamily;
use prometheus::{Counter, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::App;
use crate::recovery::WriteStatus;
use dongflow_connectors::now_ms;

/// The content type of the text format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Latency histogram bucket bounds, in seconds: point queries answer in tens of microseconds, so
/// the low end is finer than the client libraries' defaults.
const BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// The families kept in a registry: requests by route and status, and latency by route.
pub struct HttpMetrics {
    registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        // The names, labels and buckets are constants; the library refuses only invalid ones.
        let requests = IntCounterVec::new(
            Opts::new(
                "dongflow_http_requests_total",
                "HTTP requests by route and status.",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "dongflow_http_request_duration_seconds",
                "HTTP request latency by route.",
            )
            .buckets(BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        let registry = Registry::new();
        registry
            .register(Box::new(requests.clone()))
            .expect("registered once");
        registry
            .register(Box::new(latency.clone()))
            .expect("registered once");
        HttpMetrics {
            registry,
            requests,
            latency,
        }
    }
}

impl HttpMetrics {
    /// Counts one answered request.
    pub fn observe(&self, route: &'static str, status: StatusCode, elapsed: Duration) {
        self.requests
            .with_label_values(&[route, status.as_str()])
            .inc();
        self.latency
            .with_label_values(&[route])
            .observe(elapsed.as_secs_f64());
    }
}

/// The families read at one scrape from where their figures are kept.
#[derive(Default)]
struct Scrape {
    families: Vec<MetricFamily>,
}

/// One sample: its label values (in the order of the family's label names) and its value.
type Sample<V> = (Vec<String>, V);

fn one<V>(value: V) -> Vec<Sample<V>> {
    vec![(Vec::new(), value)]
}

impl Scrape {
    /// A counter family read from elsewhere (the value is the count so far).
    fn counter(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        samples: Vec<Sample<u64>>,
    ) -> prometheus::Result<()> {
        let family = IntCounterVec::new(Opts::new(name, help), labels)?;
        for (values, value) in samples {
            family.get_metric_with_label_values(&values)?.inc_by(value);
        }
        self.families.extend(family.collect());
        Ok(())
    }

    /// A counter of seconds, without labels.
    fn seconds_counter(&mut self, name: &str, help: &str, seconds: f64) -> prometheus::Result<()> {
        let counter = Counter::new(name, help)?;
        counter.inc_by(seconds);
        self.families.extend(counter.collect());
        Ok(())
    }

    /// A gauge family.
    fn gauge(
        &mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        samples: Vec<Sample<f64>>,
    ) -> prometheus::Result<()> {
        let family = GaugeVec::new(Opts::new(name, help), labels)?;
        for (values, value) in samples {
            family.get_metric_with_label_values(&values)?.set(value);
        }
        self.families.extend(family.collect());
        Ok(())
    }
}

/// The whole `/metrics` text.
pub fn text(app: &App) -> prometheus::Result<String> {
    let mut scrape = Scrape::default();
    engine(&mut scrape, app)?;
    build(&mut scrape)?;
    if let Some(status) = &app.checkpoints {
        checkpoints(&mut scrape, status)?;
    }
    if let Some(kafka) = &app.kafka {
        self::kafka(&mut scrape, kafka)?;
    }
    if let Some(c) = &app.changelog {
        scrape.gauge(
            "dongflow_changelog_unreconciled_topics",
            "Workers' changelog topics whose changes are held back until the caught-up state is compared with what the changelog held at start (after a restart without a clean stop's mark); 0 once the changelog holds exactly this run's state.",
            &[],
            one(c.uncleared() as f64),
        )?;
    }
    if let Some(b) = &app.stale {
        scrape.counter(
            "dongflow_changelog_undecodable_records_total",
            "Changelog records read back at start whose value was not JSON (skipped, not deletions).",
            &[],
            one(b.undecodable()),
        )?;
    }
    feeds(&mut scrape, app)?;
    let mut families = app.metrics.registry.gather();
    // A family with no samples (a partition-less input, say) is not written: the format has no
    // room for one.
    families.extend(
        scrape
            .families
            .into_iter()
            .filter(|f| !f.get_metric().is_empty()),
    );
    families.sort_by(|a, b| a.name().cmp(b.name()));
    prometheus::TextEncoder::new().encode_to_string(&families)
}

/// The push feeds: clients, events, folding, and the versions the views hold for them.
fn feeds(scrape: &mut Scrape, app: &App) -> prometheus::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let f = &app.feeds;
    scrape.gauge(
        "dongflow_feed_clients",
        "Push feed connections open.",
        &[],
        one(f.open.load(Relaxed) as f64),
    )?;
    scrape.counter(
        "dongflow_feed_events_total",
        "Push feed events sent, by event.",
        &["event"],
        vec![
            (vec!["snapshot".into()], f.snapshots.load(Relaxed)),
            (vec!["changes".into()], f.changes.load(Relaxed)),
        ],
    )?;
    scrape.counter(
        "dongflow_feed_folded_versions_total",
        "Versions a slow feed client received folded into a later event (latest value per key).",
        &[],
        one(f.folded.load(Relaxed)),
    )?;
    scrape.counter(
        "dongflow_feed_resnapshots_total",
        "Snapshots sent because the view no longer held every version a client had not read.",
        &[],
        one(f.resnapshots.load(Relaxed)),
    )?;
    let mut held = vec![(vec!["live".to_owned()], app.engine.view().held())];
    if let Some(stale) = app.stale.as_ref().and_then(|s| s.serving()) {
        held.push((vec!["stale".to_owned()], stale.held()));
    }
    scrape.gauge(
        "dongflow_feed_held_changes",
        "Changes the serving views hold for push feeds to resume from, by view.",
        &["view"],
        held.into_iter().map(|(l, (_, c))| (l, c as f64)).collect(),
    )?;
    Ok(())
}

fn engine(scrape: &mut Scrape, app: &App) -> prometheus::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    let engine = &app.engine;
    let c = engine.counters();
    let kinds = [("rider", &c.riders), ("delivery", &c.deliveries)];
    scrape.counter(
        "dongflow_events_consumed_total",
        "Events taken into the dataflow.",
        &[],
        one(engine.events_in()),
    )?;
    let per_kind = |f: &dyn Fn(&dongflow_dataflow::upsert::UpsertCounters) -> u64| {
        kinds
            .iter()
            .map(|(k, c)| (vec![k.to_string()], f(c)))
            .collect()
    };
    let upserts: [(&str, &str, Vec<Sample<u64>>); 5] = [
        (
            "dongflow_events_applied_total",
            "Events applied to their id's state.",
            per_kind(&|c| c.applied.load(Relaxed)),
        ),
        (
            "dongflow_events_stale_total",
            "Events ignored because their ts was older than their id's latest (or, for an id not \
             held, than a forgotten one's).",
            per_kind(&|c| c.stale.load(Relaxed)),
        ),
        (
            "dongflow_events_after_terminal_total",
            "Events ignored because their delivery had ended.",
            per_kind(&|c| c.after_terminal.load(Relaxed)),
        ),
        (
            "dongflow_tombstones_expired_total",
            "Ended deliveries forgotten after their time to live.",
            per_kind(&|c| c.expired.load(Relaxed)),
        ),
        (
            "dongflow_idle_forgotten_total",
            "Riders off shift forgotten after their time to live.",
            per_kind(&|c| c.forgotten.load(Relaxed)),
        ),
    ];
    for (name, help, samples) in upserts {
        scrape.counter(name, help, &["kind"], samples)?;
    }
    scrape.gauge(
        "dongflow_ready",
        "1 when /readyz answers 200.",
        &[],
        one(f64::from(u8::from(super::ready(app)))),
    )?;
    let as_of = engine.as_of();
    // Seconds, as Prometheus' conventions want (promtool flags a `_milliseconds` unit).
    scrape.gauge(
        "dongflow_as_of_seconds",
        "The latest dataflow time every worker has completed (seconds since the Unix epoch; 0 before the first).",
        &[],
        one(as_of as f64 / 1000.0),
    )?;
    let age = if as_of == 0 {
        f64::NAN
    } else {
        now_ms().saturating_sub(as_of) as f64 / 1000.0
    };
    scrape.gauge(
        "dongflow_frontier_age_seconds",
        "Now minus the latest complete as_of: how fresh answers are.",
        &[],
        one(age),
    )?;
    if let Ok(sizes) = engine.sizes() {
        let labelled = |pairs: &[(&str, usize)]| {
            pairs
                .iter()
                .map(|(label, n)| (vec![label.to_string()], *n as f64))
                .collect()
        };
        scrape.gauge(
            "dongflow_state_entries",
            "Ids held in the upsert state (ended deliveries included until they expire), and riders held by the rider stage (with a state, or with active deliveries that wait for one).",
            &["state"],
            labelled(&[
                ("riders", sizes.riders),
                ("deliveries", sizes.deliveries),
                ("snapshot_riders", sizes.snapshot_riders),
            ]),
        )?;
        scrape.gauge(
            "dongflow_arrangement_updates",
            "Updates held in each arrangement that feeds the serving view.",
            &["arrangement"],
            labelled(&[("counts", sizes.count_updates)]),
        )?;
    }
    Ok(())
}

fn build(scrape: &mut Scrape) -> prometheus::Result<()> {
    scrape.gauge(
        "dongflow_build_info",
        "Always 1; the labels say which dongflow this is.",
        &["version"],
        vec![(vec![env!("CARGO_PKG_VERSION").to_owned()], 1.0)],
    )?;
    process(scrape)
}

/// The process metrics Prometheus' client libraries export as `process_*`, here under the
/// contract's prefix, and the peak resident memory (the figure users compare: what the process
/// needed at its worst). Each is left out when `/proc` cannot tell it.
#[cfg(target_os = "linux")]
fn process(scrape: &mut Scrape) -> prometheus::Result<()> {
    let Ok(me) = procfs::process::Process::myself() else {
        return Ok(());
    };
    let ticks = procfs::ticks_per_second() as f64;
    let mut gauges = Vec::new();
    if let Ok(stat) = me.stat() {
        scrape.seconds_counter(
            "dongflow_process_cpu_seconds_total",
            "User and system CPU time spent, in seconds.",
            (stat.utime + stat.stime) as f64 / ticks,
        )?;
        if let Ok(boot) = procfs::boot_time_secs() {
            gauges.push((
                "dongflow_process_start_time_seconds",
                "Start time of the process since the Unix epoch, in seconds.",
                boot as f64 + stat.starttime as f64 / ticks,
            ));
        }
        gauges.push((
            "dongflow_process_resident_memory_bytes",
            "Resident memory size in bytes.",
            (stat.rss * procfs::page_size()) as f64,
        ));
        gauges.push((
            "dongflow_process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            stat.vsize as f64,
        ));
        gauges.push((
            "dongflow_process_threads",
            "Number of OS threads in the process.",
            stat.num_threads as f64,
        ));
    }
    if let Some(kb) = me.status().ok().and_then(|s| s.vmhwm) {
        gauges.push((
            "dongflow_process_peak_resident_memory_bytes",
            "The most resident memory the process has held, in bytes (VmHWM).",
            (kb * 1024) as f64,
        ));
    }
    if let Ok(fds) = me.fd_count() {
        gauges.push((
            "dongflow_process_open_fds",
            "Number of open file descriptors.",
            fds as f64,
        ));
    }
    if let Ok(limits) = me.limits() {
        if let procfs::process::LimitValue::Value(max) = limits.max_open_files.soft_limit {
            gauges.push((
                "dongflow_process_max_fds",
                "Maximum number of open file descriptors.",
                max as f64,
            ));
        }
    }
    for (name, help, value) in gauges {
        scrape.gauge(name, help, &[], one(value))?;
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn process(_: &mut Scrape) -> prometheus::Result<()> {
    Ok(())
}

fn checkpoints(scrape: &mut Scrape, status: &WriteStatus) -> prometheus::Result<()> {
    scrape.counter(
        "dongflow_checkpoint_write_failures_total",
        "Checkpoint writes of this process that failed.",
        &[],
        one(status.failures()),
    )?;
    let Some(last) = status.last() else {
        return Ok(());
    };
    let gauges = [
        (
            "dongflow_checkpoint_last_time_seconds",
            "Dataflow time of the last checkpoint this process wrote (seconds since the Unix epoch).",
            last.time as f64 / 1000.0,
        ),
        (
            "dongflow_checkpoint_age_seconds",
            "Seconds since the dataflow time of the last checkpoint this process wrote.",
            now_ms().saturating_sub(last.time) as f64 / 1000.0,
        ),
        (
            "dongflow_checkpoint_last_bytes",
            "Bytes this process wrote for its last checkpoint.",
            last.bytes as f64,
        ),
        (
            "dongflow_checkpoint_last_write_seconds",
            "Time this process took to encode and write its last checkpoint.",
            last.write.as_secs_f64(),
        ),
        (
            "dongflow_checkpoint_last_pause_seconds",
            "The longest pause of a worker while its state was copied for the last checkpoint.",
            last.pause.as_secs_f64(),
        ),
    ];
    for (name, help, value) in gauges {
        scrape.gauge(name, help, &[], one(value))?;
    }
    Ok(())
}

fn kafka(scrape: &mut Scrape, k: &KafkaMetrics) -> prometheus::Result<()> {
    use std::sync::atomic::Ordering::Relaxed;
    scrape.counter(
        "dongflow_kafka_records_read_total",
        "Input records read from Kafka, good and bad.",
        &[],
        one(k.consumed.load(Relaxed)),
    )?;
    scrape.counter(
        "dongflow_events_invalid_total",
        "Input records rejected (CONTRACT section 4), by reason.",
        &["reason"],
        k.invalid_by_reason()
            .into_iter()
            .map(|(reason, n)| (vec![reason.to_owned()], n))
            .collect(),
    )?;
    scrape.counter(
        "dongflow_dead_letters_total",
        "Rejected records delivered to the dead-letter topic.",
        &[],
        one(k.dead_lettered.load(Relaxed)),
    )?;
    let by_output = |counters: &[std::sync::atomic::AtomicU64; 3]| {
        OutputKind::ALL
            .iter()
            .map(|kind| {
                (
                    vec![kind.label().to_owned()],
                    counters[*kind as usize].load(Relaxed),
                )
            })
            .collect()
    };
    scrape.counter(
        "dongflow_output_records_written_total",
        "Records the broker acknowledged, by output (changelogs, dead letters).",
        &["output"],
        by_output(&k.delivered),
    )?;
    scrape.counter(
        "dongflow_output_records_failed_total",
        "Records the broker refused for good, by output.",
        &["output"],
        by_output(&k.failed),
    )?;
    let counters = [
        (
            "dongflow_producer_queue_full_waits_total",
            "Times a send waited because the producer's queue was full (broker slow or away).",
            k.queue_full_waits.load(Relaxed),
        ),
        (
            "dongflow_producer_fatal_errors_total",
            "Fatal errors of the changelog and dead-letter producer; the process exits 1 after one.",
            k.fatal_errors(),
        ),
        (
            "dongflow_offset_commit_failures_total",
            "Offset commits to the consumer group that failed (lag tools only).",
            k.commit_failures.load(Relaxed),
        ),
    ];
    for (name, help, value) in counters {
        scrape.counter(name, help, &[], one(value))?;
    }
    scrape.gauge(
        "dongflow_kafka_brokers_reachable",
        "1 when the last metadata request reached a broker.",
        &[],
        one(f64::from(u8::from(k.brokers_reachable.load(Relaxed)))),
    )?;
    let now = now_ms();
    let (mut lag, mut end, mut age) = (Vec::new(), Vec::new(), Vec::new());
    for ((topic, partition), progress) in k.partitions() {
        let labels = vec![topic, partition.to_string()];
        if let Some(l) = progress.lag() {
            lag.push((labels.clone(), l as f64));
        }
        if let Some(e) = progress.end {
            end.push((labels.clone(), e as f64));
        }
        if let Some(at) = progress.read_at_ms {
            age.push((labels, now.saturating_sub(at) as f64 / 1000.0));
        }
    }
    let partition_gauges = [
        (
            "dongflow_consumer_lag_records",
            "Records in each input partition not read yet.",
            lag,
        ),
        (
            "dongflow_input_end_offset",
            "End offset of each input partition when last asked.",
            end,
        ),
        (
            "dongflow_input_read_age_seconds",
            "Seconds since each input partition was last read: a record taken from it, or its end offset seen reached. Grows while the brokers cannot be read.",
            age,
        ),
    ];
    for (name, help, samples) in partition_gauges {
        scrape.gauge(name, help, &["topic", "partition"], samples)?;
    }
    Ok(())
}
