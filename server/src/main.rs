//! `dongflow`: the command-line entry point. Parses arguments, loads the district map, starts the
//! engine and maps failures to the exit codes of CONTRACT section 1.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use dongflow::cli::{
    BuiltinMap, Cli, ClusterArgs, Command, DemoArgs, GenerateArgs, HttpSecurityArgs,
    KafkaPropertyArgs, LogFormat, MapArgs, RunArgs, StartFrom,
};
use dongflow::demo::{sim_config, stop_on_signal};
use dongflow::engine::{now_ms, ClusterSpec};
use dongflow::failstop;
use dongflow::http::{App, HttpSecurity, HttpServer, PipelineStatus, Tokens};
use dongflow::pipeline::{Pipeline, PipelineConfig};
use dongflow::recovery::{restore, Shape};
use dongflow::render::DistrictsView;
use dongflow::{AnswerBody, EngineConfig, Query};
use dongflow_connectors::kafka::generate::{generate as produce, GenerateConfig};
use dongflow_connectors::kafka::{
    ensure_topics, ClientSettings, EmbeddedBroker, KafkaConfig, StartAt, TopicSpec,
};
use dongflow_connectors::simulator::{SimEvent, Simulator};
use dongflow_dataflow::districts::DistrictIndex;

/// With `--features mimalloc`, the binary allocates with mimalloc (an allocator trial; the system
/// allocator is the default: docs/bench/README.md has the figures).
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A failure and its exit code: 2 for bad arguments or an unreadable district file, 1 otherwise.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl From<anyhow::Error> for Failure {
    fn from(error: anyhow::Error) -> Self {
        Self { code: 1, error }
    }
}

fn bad_argument(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: 2,
        error: error.into(),
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let logs = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr);
    match cli.log_format {
        // Colours only for people: logs piped to files or collectors stay plain text.
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    let result = match cli.command {
        Command::Run(args) => run(*args),
        Command::Demo(args) => demo(args),
        Command::Generate(args) => generate(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("dongflow: {error:#}");
            ExitCode::from(code)
        }
    }
}

/// The map of `--districts`, or `default` without one.
fn load_map(map: &MapArgs, default: BuiltinMap) -> Result<Arc<DistrictIndex>, Failure> {
    let index = match map.districts.as_deref() {
        None => builtin_map(default)?,
        Some(path) => match BuiltinMap::named(path) {
            Some(builtin) => builtin_map(builtin)?,
            None => DistrictIndex::from_geojson_file(
                path,
                &map.district_code_prop,
                &map.district_name_prop,
            )
            .map_err(bad_argument)?,
        },
    };
    tracing::info!(districts = index.len(), "district map loaded");
    Ok(Arc::new(index))
}

fn builtin_map(map: BuiltinMap) -> Result<DistrictIndex, Failure> {
    Ok(match map {
        BuiltinMap::SeoulGu => DistrictIndex::builtin_seoul(),
        BuiltinMap::SeoulDongs => {
            DistrictIndex::seoul_dongs().context("the built-in map of Seoul's dongs")?
        }
    })
}

/// The timely cluster of `-n/-p/-h`: `None` for one process.
fn cluster_spec(cluster: &ClusterArgs) -> Result<Option<ClusterSpec>, Failure> {
    let processes = cluster.processes as usize;
    let process = cluster.process as usize;
    if process >= processes {
        return Err(bad_argument(anyhow::anyhow!(
            "--process {process} is not below --processes {processes}"
        )));
    }
    if processes == 1 {
        return Ok(None);
    }
    let Some(path) = &cluster.hostfile else {
        return Err(bad_argument(anyhow::anyhow!(
            "--processes {processes} needs --hostfile with one host:port per process"
        )));
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read hostfile {}", path.display()))
        .map_err(bad_argument)?;
    let addresses: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    if addresses.len() < processes {
        return Err(bad_argument(anyhow::anyhow!(
            "hostfile {} lists {} addresses for {processes} processes",
            path.display(),
            addresses.len()
        )));
    }
    Ok(Some(ClusterSpec {
        process,
        addresses: addresses[..processes].to_vec(),
    }))
}

/// Checks `--http-peers` (every process's HTTP base URL, in process order). Every process holds
/// the whole serving view and answers every key itself, so the URLs are only checked for being
/// one per process.
fn check_peer_urls(peers: &[String], cluster: &Option<ClusterSpec>) -> Result<(), Failure> {
    let Some(c) = cluster else {
        return Ok(());
    };
    if peers.len() != c.addresses.len() {
        return Err(bad_argument(anyhow::anyhow!(
            "--http-peers lists {} URLs for {} processes: give every process's URL, in process order",
            peers.len(),
            c.addresses.len()
        )));
    }
    Ok(())
}

/// The librdkafka properties of `-X` and `--kafka-config-file` for `bootstrap`: refused ones are
/// bad arguments.
fn kafka_settings(args: &KafkaPropertyArgs, bootstrap: &str) -> Result<ClientSettings, Failure> {
    ClientSettings::load(
        bootstrap,
        args.kafka_config_file.as_deref(),
        &args.properties,
    )
    .map_err(bad_argument)
}

/// The token file and TLS pair of the HTTP options; unreadable ones are bad arguments.
fn http_security(args: &HttpSecurityArgs) -> Result<HttpSecurity, Failure> {
    let tokens = match &args.http_token_file {
        Some(path) => Some(Arc::new(Tokens::load(path).map_err(bad_argument)?)),
        None => None,
    };
    let tls = match (&args.http_tls_cert, &args.http_tls_key) {
        (Some(cert), Some(key)) => {
            Some(dongflow::http::tls::server_config(cert, key).map_err(bad_argument)?)
        }
        _ => None,
    };
    Ok(HttpSecurity { tokens, tls })
}

/// Binds the HTTP address before anything else starts, so that a bad address or a port in use is
/// one clear line and exit 2.
fn bind_http(addr: &str) -> Result<std::net::TcpListener, Failure> {
    std::net::TcpListener::bind(addr)
        .map_err(|e| bad_argument(anyhow::anyhow!("cannot listen on {addr}: {e}")))
}

/// Serves the HTTP API of a pipeline on `listener`, with its Kafka metrics and its stale view.
fn serve(
    pipeline: &Pipeline,
    index: &Arc<DistrictIndex>,
    listener: std::net::TcpListener,
    security: HttpSecurity,
) -> Result<HttpServer, Failure> {
    let status = PipelineStatus {
        kafka: pipeline.kafka_metrics(),
        stale: Some(pipeline.stale_view()),
        checkpoints: pipeline.checkpoint_status(),
        changelog: Some(pipeline.changelog_progress()),
    };
    let app = App::with_kafka(pipeline.handle(), index.clone(), status);
    Ok(HttpServer::start_on(listener, app, 2, security).context("cannot serve HTTP")?)
}

/// `https` or `http`, as the URLs printed say.
fn scheme(security: &HttpSecurity) -> &'static str {
    if security.tls.is_some() {
        "https"
    } else {
        "http"
    }
}

/// Waits for SIGINT/SIGTERM, for another process of the cluster to have been asked to stop (the
/// whole cluster stops at one time, see [`dongflow::EngineHandle::stopping`]), or for the producer to
/// fail for good: then the process must end with exit 1, so that a supervisor restarts it and the
/// restart publishes the state again. (A lost cluster peer ends the process by itself: see
/// [`failstop`].)
fn wait_for_stop(stop: &AtomicBool, pipeline: &Pipeline) -> Option<Failure> {
    let engine = pipeline.handle();
    while !stop.load(Ordering::Relaxed) {
        if engine.stopping() {
            tracing::info!("the cluster is stopping (another process was asked to)");
            break;
        }
        if let Some(reason) = pipeline.producer_failure() {
            return Some(
                anyhow::anyhow!(
                    "the Kafka producer failed for good ({reason}); exiting so that a \
                     supervisor restarts dongflow, which then publishes its state again"
                )
                .into(),
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// The topics the embedded broker starts with.
/// The topics of the embedded broker: the inputs and the dead letters, then the two changelogs.
fn embedded_topics(kafka: &KafkaConfig, district: &str, rider: &str) -> Vec<TopicSpec> {
    vec![
        TopicSpec::new(&kafka.rider_topic, EMBEDDED_PARTITIONS),
        TopicSpec::new(&kafka.delivery_topic, EMBEDDED_PARTITIONS),
        TopicSpec::new(&kafka.dead_letter_topic, EMBEDDED_PARTITIONS),
        TopicSpec::compacted(district, EMBEDDED_CHANGELOG_PARTITIONS),
        TopicSpec::compacted(rider, EMBEDDED_CHANGELOG_PARTITIONS),
    ]
}

/// Partitions of each topic of the embedded broker.
const EMBEDDED_PARTITIONS: i32 = 4;
/// Partitions of the embedded broker's changelog topics. It keeps about 5 MB of each partition and
/// does not compact: spread over this many, the changelogs stay whole (every key's latest record
/// readable from offset 0) for the length of a demo at its default rate (README, "Limits").
const EMBEDDED_CHANGELOG_PARTITIONS: i32 = 64;
/// The changelog producer's linger on the embedded broker. Spread over that many partitions, the
/// default 100 ms would make batches of a few records, which compress poorly and fill the broker's
/// fixed 5 MB a partition sooner; a second makes them tens of records. The changelog is then up to a
/// second later, HTTP answers not at all (they come from the live state).
const EMBEDDED_LINGER_MS: &str = "1000";
/// How often the demo asks whether the embedded broker has begun dropping changelog records.
const TRIM_CHECK_EVERY: Duration = Duration::from_secs(10);

/// Which process of which cluster this run is, for the checkpoints it can restore.
fn shape(cluster: &Option<ClusterSpec>, workers: usize) -> Shape {
    Shape {
        process: cluster.as_ref().map_or(0, |c| c.process),
        processes: cluster.as_ref().map_or(1, |c| c.addresses.len()),
        workers,
    }
}

fn run(args: RunArgs) -> Result<(), Failure> {
    let cluster = cluster_spec(&args.cluster)?;
    check_peer_urls(&args.http_peers, &cluster)?;
    if let Some(spec) = &cluster {
        failstop::watch_timely_panics();
        failstop::watch_peers(&args.http_peers, spec.process).context("watching the peers")?;
    }
    let brokers = kafka_settings(
        &args.kafka,
        args.input.brokers.as_deref().unwrap_or_default(),
    )?;
    let security = http_security(&args.http_security)?;
    let listener = bind_http(&args.http)?;
    let index = load_map(&args.map, BuiltinMap::SeoulGu)?;
    let (start, restore) = match args.start_from {
        StartFrom::Latest => (StartAt::Latest, None),
        StartFrom::Earliest => (StartAt::Earliest, None),
        StartFrom::Checkpoint => match restore(
            &args.state_dir,
            shape(&cluster, args.cluster.workers as usize),
            cluster.as_ref().map(|c| c.addresses.as_slice()),
        )
        .context("choosing the checkpoint to restore")?
        {
            Some(r) => (StartAt::Earliest, Some(Arc::new(r))),
            None => {
                tracing::info!(
                    "no usable checkpoint in {}: starting from the earliest offsets",
                    args.state_dir.display()
                );
                (StartAt::Earliest, None)
            }
        },
    };
    let mut kafka = KafkaConfig {
        brokers,
        group_id: args.group_id.clone(),
        rider_topic: args.input.rider_topic.clone(),
        delivery_topic: args.input.delivery_topic.clone(),
        dead_letter_topic: args.dead_letter_topic.clone(),
        start,
    };
    let embedded = match &args.input.brokers {
        Some(_) => None,
        None => {
            let topics = embedded_topics(
                &kafka,
                &args.district_changelog_topic,
                &args.rider_changelog_topic,
            );
            let broker = EmbeddedBroker::start(&topics).context("starting the embedded broker")?;
            kafka.brokers = kafka
                .brokers
                .with_bootstrap(broker.bootstrap())
                .with_producer_default("linger.ms", EMBEDDED_LINGER_MS);
            Some(broker)
        }
    };
    let stop = stop_on_signal();
    let workers = args.cluster.workers as usize;
    let mut engine = EngineConfig::new(workers, index.clone());
    engine.cluster = cluster;
    engine.terminal_ttl = u64::try_from(args.terminal_ttl.as_millis()).unwrap_or(u64::MAX);
    engine.rider_ttl = Some(u64::try_from(args.rider_ttl.as_millis()).unwrap_or(u64::MAX));
    let config = PipelineConfig {
        engine,
        kafka: kafka.clone(),
        district_changelog_topic: args.district_changelog_topic.clone(),
        rider_changelog_topic: args.rider_changelog_topic.clone(),
        create_outputs: embedded.is_none(),
        state_dir: Some(args.state_dir.clone()),
        checkpoint_interval: args.checkpoint_interval,
        restore,
    };
    let pipeline = Pipeline::start(config).context("starting the engine")?;
    let scheme = scheme(&security);
    let server = serve(&pipeline, &index, listener, security)?;
    let which = if embedded.is_some() {
        " (embedded)"
    } else {
        ""
    };
    println!("Kafka: {}{which}", kafka.brokers);
    println!("HTTP: {scheme}://{}/", server.addr());
    let _ = std::io::stdout().flush();
    let fatal = wait_for_stop(&stop, &pipeline);
    tracing::info!("stopping");
    if fatal.is_none() {
        failstop::stand_down();
    }
    server.stop();
    pipeline.stop(Duration::from_secs(if fatal.is_some() { 1 } else { 30 }));
    drop(embedded);
    fatal.map_or(Ok(()), Err)
}

fn demo(args: DemoArgs) -> Result<(), Failure> {
    let workers = args.workers as usize;
    let brokers = kafka_settings(&args.kafka, "")?;
    let security = http_security(&args.http_security)?;
    let listener = bind_http(&args.http)?;
    let index = load_map(&args.map, BuiltinMap::SeoulDongs)?;
    let kafka = KafkaConfig {
        brokers: brokers.clone(),
        group_id: "dongflow-demo".into(),
        rider_topic: "rider-events".into(),
        delivery_topic: "delivery-events".into(),
        dead_letter_topic: "dongflow-dlq".into(),
        start: StartAt::Earliest,
    };
    let topics = embedded_topics(&kafka, "district-changelog", "rider-changelog");
    let broker = EmbeddedBroker::start(&topics).context("starting the embedded broker")?;
    let changelogs = &topics[3..];
    let kafka = KafkaConfig {
        brokers: brokers
            .with_bootstrap(broker.bootstrap())
            .with_producer_default("linger.ms", EMBEDDED_LINGER_MS),
        ..kafka
    };
    let stop = stop_on_signal();
    let pipeline = Pipeline::start(PipelineConfig {
        engine: EngineConfig::new(workers, index.clone()),
        kafka: kafka.clone(),
        district_changelog_topic: "district-changelog".into(),
        rider_changelog_topic: "rider-changelog".into(),
        create_outputs: false,
        state_dir: None,
        checkpoint_interval: Duration::from_secs(10),
        restore: None,
    })
    .context("starting the engine")?;
    let scheme = scheme(&security);
    let server = serve(&pipeline, &index, listener, security)?;
    let generate = GenerateConfig {
        brokers: kafka.brokers.clone(),
        rider_topic: kafka.rider_topic.clone(),
        delivery_topic: kafka.delivery_topic.clone(),
        rate: args.rate,
        events: None,
        duration: None,
    };
    let (sim, flag) = (sim_config(args.riders, args.seed, now_ms()), stop.clone());
    let feeder = std::thread::spawn(move || produce(sim, &generate, &flag, |_| {}));
    println!(
        "dongflow demo: {workers} worker(s), {} districts, {} simulated riders at {} events/s",
        index.len(),
        args.riders,
        args.rate
    );
    println!(
        "Kafka: {} (embedded; topics rider-events, delivery-events, district-changelog, rider-changelog, dongflow-dlq)",
        kafka.brokers
    );
    println!(
        "Map: {scheme}://{}/  (the live district map)",
        server.addr()
    );
    println!(
        "HTTP: {scheme}://{}/  (API: /v1/districts, /v1/riders/{{id}}, /metrics)",
        server.addr()
    );
    println!("Ctrl-C stops.");
    let _ = std::io::stdout().flush();
    let started = Instant::now();
    let mut last_print = Instant::now();
    let (mut last_trim_check, mut trimmed) = (Instant::now(), false);
    while !stop.load(Ordering::Relaxed) {
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            print_summary(&pipeline, &index, started.elapsed());
        }
        if !trimmed && last_trim_check.elapsed() >= TRIM_CHECK_EVERY {
            last_trim_check = Instant::now();
            if let Some((topic, p)) = broker
                .trimmed(changelogs)
                .ok()
                .and_then(|t| t.into_iter().next())
            {
                trimmed = true;
                println!(
                    "note: after {:.0} s the embedded broker drops the oldest records of {topic} (partition {p} first): it keeps about 5 MB a partition and does not compact, so a reader from offset 0 no longer gets every key; read the changelogs as they are written, or run on a real broker",
                    started.elapsed().as_secs_f64()
                );
            }
        }
    }
    stop.store(true, Ordering::SeqCst);
    let sent = match feeder.join() {
        Ok(Ok(p)) => p.sent,
        Ok(Err(e)) => {
            tracing::error!("the simulator stopped: {e}");
            0
        }
        Err(_) => 0,
    };
    print_summary(&pipeline, &index, started.elapsed());
    server.stop();
    pipeline.stop(Duration::from_secs(10));
    drop(broker);
    println!("stopped after {sent} events");
    Ok(())
}

fn print_summary(pipeline: &Pipeline, index: &DistrictIndex, elapsed: Duration) {
    let engine = pipeline.handle();
    let Ok(answer) = engine.query(&Query::Districts) else {
        println!("[{:>5.1}s] no state yet", elapsed.as_secs_f64());
        return;
    };
    let AnswerBody::Districts(counts) = answer.body else {
        return;
    };
    let view = DistrictsView::new(index, answer.as_of, false, &counts);
    let on_shift: u64 = view.districts.iter().map(|d| d.riders_on_shift).sum();
    let waiting: u64 = view.districts.iter().map(|d| d.waiting_deliveries).sum();
    let mut busiest = view.districts.clone();
    busiest.sort_by(|a, b| b.pressure.total_cmp(&a.pressure).then(a.code.cmp(b.code)));
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "[{:>5.1}s] as_of {} | {} events in | {} riders on shift | {} waiting deliveries",
        elapsed.as_secs_f64(),
        answer.as_of,
        engine.events_in(),
        on_shift,
        waiting
    );
    for d in busiest.iter().take(3) {
        let _ = writeln!(
            out,
            "          {:<24} on shift {:>4}  delivering {:>4}  waiting {:>3}  pressure {:.2}",
            d.name, d.riders_on_shift, d.riders_delivering, d.waiting_deliveries, d.pressure
        );
    }
}

fn generate(args: GenerateArgs) -> Result<(), Failure> {
    let stop = stop_on_signal();
    if let Some(brokers) = &args.input.brokers {
        let brokers = kafka_settings(&args.kafka, brokers)?;
        return generate_to_kafka(&args, &brokers, &stop);
    }
    let mut simulator = Simulator::new(sim_config(args.riders, args.seed, args.start_ts.ms()));
    let started = Instant::now();
    let limit = args.events.unwrap_or(u64::MAX);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut n = 0u64;
    while n < limit
        && !stop.load(Ordering::Relaxed)
        && args.duration.is_none_or(|d| started.elapsed() < d)
    {
        if args.rate > 0 && n as f64 > started.elapsed().as_secs_f64() * args.rate as f64 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let event = simulator.next_event();
        let topic = match &event {
            SimEvent::Rider(_) => &args.input.rider_topic,
            SimEvent::Delivery(_) => &args.input.delivery_topic,
        };
        let line = writeln!(out, "{topic}\t{}", String::from_utf8_lossy(&event.encode()));
        if line.is_err() {
            break; // stdout closed (e.g. piped into `head`): a normal way to stop.
        }
        n += 1;
    }
    let _ = out.flush();
    Ok(())
}

fn generate_to_kafka(
    args: &GenerateArgs,
    brokers: &ClientSettings,
    stop: &AtomicBool,
) -> Result<(), Failure> {
    let topics = [
        TopicSpec::new(&args.input.rider_topic, args.partitions),
        TopicSpec::new(&args.input.delivery_topic, args.partitions),
    ];
    let created = ensure_topics(brokers, &topics, Duration::from_secs(10))
        .with_context(|| format!("cannot create the input topics on {brokers}"))?;
    for name in created {
        eprintln!("created topic {name} with {} partitions", args.partitions);
    }
    let config = GenerateConfig {
        brokers: brokers.clone(),
        rider_topic: args.input.rider_topic.clone(),
        delivery_topic: args.input.delivery_topic.clone(),
        rate: args.rate,
        events: args.events,
        duration: args.duration,
    };
    let started = Instant::now();
    let terminal = std::io::stderr().is_terminal();
    let mut last_line = Instant::now();
    let report = |sent: u64, done: bool| {
        let secs = started.elapsed().as_secs_f64().max(1e-9);
        let rate = sent as f64 / secs;
        let of = args.events.map(|n| format!(" of {n}")).unwrap_or_default();
        if terminal {
            eprint!("\r{sent}{of} events in {secs:.1} s ({rate:.0} events/s)   ");
            if done {
                eprintln!();
            }
        } else if done {
            eprintln!("{sent} events in {secs:.1} s ({rate:.0} events/s)");
        }
    };
    let produced = produce(
        sim_config(args.riders, args.seed, args.start_ts.ms()),
        &config,
        stop,
        |sent| {
            if terminal || last_line.elapsed() >= Duration::from_secs(5) {
                last_line = Instant::now();
                report(sent, false);
            }
        },
    )
    .context("producing events")?;
    report(produced.sent, true);
    if produced.failed > 0 {
        return Err(anyhow::anyhow!(
            "{} of {} events were not delivered",
            produced.failed,
            produced.sent
        )
        .into());
    }
    Ok(())
}
