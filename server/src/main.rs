//! `dongflow`: the command-line entry point. Parses arguments, loads the district map, starts the
//! engine and maps failures to the exit codes of CONTRACT section 1.

use std::io::Write;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use dongflow::cli::{Cli, ClusterArgs, Command, DemoArgs, GenerateArgs, MapArgs, RunArgs};
use dongflow::demo::{channel_sources, feed, sim_config, stop_on_signal};
use dongflow::http::{App, HttpServer};
use dongflow::render::DistrictsView;
use dongflow::{AnswerBody, Engine, EngineConfig, Query};
use dongflow_connectors::simulator::{SimEvent, Simulator};
use dongflow_dataflow::districts::DistrictIndex;

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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Run(args) => run(args),
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

fn load_map(map: &MapArgs) -> Result<Arc<DistrictIndex>, Failure> {
    let index = match &map.districts {
        None => DistrictIndex::builtin_seoul(),
        Some(path) => {
            DistrictIndex::from_geojson_file(path, &map.district_code_prop, &map.district_name_prop)
                .map_err(bad_argument)?
        }
    };
    tracing::info!(districts = index.len(), "district map loaded");
    Ok(Arc::new(index))
}

fn single_process(cluster: &ClusterArgs) -> Result<usize, Failure> {
    if cluster.processes > 1 || cluster.hostfile.is_some() {
        return Err(bad_argument(anyhow::anyhow!(
            "multi-process clusters (-n/-p/-h) are not yet supported; run one process with -w threads"
        )));
    }
    Ok(cluster.workers as usize)
}

fn run(args: RunArgs) -> Result<(), Failure> {
    let _ = load_map(&args.map)?;
    let _ = single_process(&args.cluster)?;
    Err(anyhow::anyhow!(
        "`dongflow run` needs the Kafka source, which is not yet supported in this build; `dongflow demo` runs the engine on the built-in simulator"
    )
    .into())
}

fn demo(args: DemoArgs) -> Result<(), Failure> {
    let index = load_map(&args.map)?;
    let workers = single_process(&args.cluster)?;
    let stop = stop_on_signal();
    let (senders, sources) = channel_sources(workers);
    let engine = Engine::start(EngineConfig::new(workers, index.clone()), sources)
        .context("starting the engine")?;
    let server = HttpServer::start(&args.http, App::new(engine.handle(), index.clone()), 2)
        .with_context(|| format!("cannot listen on {}", args.http))?;
    let sim = sim_config(args.riders, args.seed);
    let (rate, flag) = (args.rate, stop.clone());
    let feeder = std::thread::spawn(move || feed(sim, rate, None, &senders, &flag));
    println!(
        "dongflow demo: {workers} worker(s), {} districts, {} simulated riders at {} events/s",
        index.len(),
        args.riders,
        args.rate
    );
    println!(
        "HTTP: http://{}/  (API: /v1/districts, /v1/riders/{{id}}, /metrics)",
        server.addr()
    );
    println!("(the embedded Kafka broker is not part of this build yet: the simulator feeds the engine directly)");
    println!("Ctrl-C stops.");
    let started = Instant::now();
    let mut last_print = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if args.duration.is_some_and(|d| started.elapsed() >= d) {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if last_print.elapsed() >= Duration::from_secs(2) {
            last_print = Instant::now();
            print_summary(&engine, &index, started.elapsed());
        }
    }
    stop.store(true, Ordering::SeqCst);
    let sent = feeder.join().unwrap_or(0);
    print_summary(&engine, &index, started.elapsed());
    server.stop();
    engine.stop();
    println!("stopped after {sent} events");
    Ok(())
}

fn print_summary(engine: &Engine, index: &DistrictIndex, elapsed: Duration) {
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
    if args.input.brokers.is_some() {
        return Err(anyhow::anyhow!("producing to Kafka is not yet supported in this build; without --brokers, events are written to stdout as JSON lines").into());
    }
    let stop = stop_on_signal();
    let mut simulator = Simulator::new(sim_config(args.riders, args.seed));
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
        let (topic, json) = match simulator.next_event() {
            SimEvent::Rider(e) => (
                &args.input.rider_topic,
                dongflow_connectors::events::encode_rider(&e),
            ),
            SimEvent::Delivery(e) => (
                &args.input.delivery_topic,
                dongflow_connectors::events::encode_delivery(&e),
            ),
        };
        let line = writeln!(out, "{topic}\t{}", String::from_utf8_lossy(&json));
        if line.is_err() {
            break; // stdout closed (e.g. piped into `head`): a normal way to stop.
        }
        n += 1;
    }
    let _ = out.flush();
    Ok(())
}
