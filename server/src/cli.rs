//! The command line of CONTRACT section 1.
//!
//! Every option of `run` can also be set as an environment variable `DONGFLOW_<NAME>`. `-h` is
//! timely's hostfile, as in timely's own flags, so help is `--help` only.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// dongflow: where every delivery rider is and what they are doing, district by district.
///
/// It consumes rider and delivery events from Kafka, places each rider in its administrative
/// district (행정동), joins riders with their active deliveries, counts per district, serves the
/// result over HTTP and writes every change to compacted changelog topics.
///
/// Logs go to stderr. `RUST_LOG` chooses what is logged (default `info`; e.g. `RUST_LOG=debug`, or
/// `RUST_LOG=info,dongflow::view=debug` for one part).
#[derive(Debug, Parser)]
#[command(name = "dongflow", version, disable_help_subcommand = true)]
pub struct Cli {
    /// How log lines are written: `text` for people, `json` (one object a line) for log shippers.
    #[arg(long, env = "DONGFLOW_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `--log-format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Plain lines (coloured on a terminal).
    Text,
    /// One JSON object a line (tracing-subscriber's JSON format).
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The engine: consume the input topics, run the dataflow, serve HTTP, write the changelogs.
    #[command(disable_help_flag = true)]
    Run(Box<RunArgs>),
    /// Everything in one process with no outside services: embedded broker, simulator and engine.
    Demo(DemoArgs),
    /// The event simulator: produce realistic rider and delivery events to a broker.
    ///
    /// With `--brokers`, events go to the two input topics (created with 4 partitions if missing),
    /// at `--rate` events a second or as fast as the broker takes them. Without it, they are written
    /// to stdout, one `TOPIC<TAB>JSON` line each (e.g. `rider-events\t{"rider_id":...}`), for files
    /// and other tools.
    Generate(GenerateArgs),
}

/// Timely's cluster flags, handed to timely and to nothing else.
#[derive(Debug, Clone, Args)]
pub struct ClusterArgs {
    /// Timely worker threads per process.
    #[arg(short = 'w', long = "workers", env = "DONGFLOW_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub workers: u64,
    /// Number of processes in the timely cluster.
    #[arg(short = 'n', long = "processes", env = "DONGFLOW_PROCESSES", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub processes: u64,
    /// This process's index in the cluster (0-based).
    #[arg(
        short = 'p',
        long = "process",
        env = "DONGFLOW_PROCESS",
        default_value_t = 0
    )]
    pub process: u64,
    /// File with one host:port per line, one line per process.
    #[arg(short = 'h', long = "hostfile", env = "DONGFLOW_HOSTFILE")]
    pub hostfile: Option<PathBuf>,
    /// Print help.
    #[arg(long = "help", action = clap::ArgAction::Help)]
    pub help: Option<bool>,
}

/// The broker and the two input topics (read by `run`, written by `generate`).
#[derive(Debug, Clone, Args)]
pub struct InputArgs {
    /// Kafka bootstrap servers [default for `run`: start the embedded broker].
    #[arg(long, env = "DONGFLOW_BROKERS")]
    pub brokers: Option<String>,
    /// Topic of rider events.
    #[arg(long, env = "DONGFLOW_RIDER_TOPIC", default_value = "rider-events")]
    pub rider_topic: String,
    /// Topic of delivery events.
    #[arg(
        long,
        env = "DONGFLOW_DELIVERY_TOPIC",
        default_value = "delivery-events"
    )]
    pub delivery_topic: String,
}

/// librdkafka properties for every Kafka client of the process (CONTRACT section 8).
#[derive(Debug, Clone, Default, Args)]
pub struct KafkaPropertyArgs {
    /// A librdkafka property for every Kafka client of the process, e.g.
    /// `-X security.protocol=SASL_SSL` (repeatable; later wins over earlier and over the file).
    /// Properties the engine needs for correctness (enable.idempotence, enable.auto.commit,
    /// isolation.level, ...) are refused.
    #[arg(
        short = 'X',
        long = "kafka-config",
        env = "DONGFLOW_KAFKA_CONFIG",
        value_name = "KEY=VALUE"
    )]
    pub properties: Vec<String>,
    /// librdkafka properties, one `key=value` a line, `#` comments (Java `.properties` style):
    /// the place for `sasl.password`, which is never printed.
    #[arg(long, env = "DONGFLOW_KAFKA_CONFIG_FILE", value_name = "FILE")]
    pub kafka_config_file: Option<PathBuf>,
}

/// Who may use the HTTP API, and over what (CONTRACT sections 1 and 6).
#[derive(Debug, Clone, Default, Args)]
pub struct HttpSecurityArgs {
    /// Bearer tokens, one a line: every route but `/healthz` and `/readyz` then needs
    /// `Authorization: Bearer TOKEN`. Re-read on SIGHUP, so tokens rotate without a restart.
    #[arg(long, env = "DONGFLOW_HTTP_TOKEN_FILE", value_name = "FILE")]
    pub http_token_file: Option<PathBuf>,
    /// Serve HTTPS with this certificate chain (PEM); needs `--http-tls-key`.
    #[arg(
        long,
        env = "DONGFLOW_HTTP_TLS_CERT",
        value_name = "FILE",
        requires = "http_tls_key"
    )]
    pub http_tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `--http-tls-cert`.
    #[arg(
        long,
        env = "DONGFLOW_HTTP_TLS_KEY",
        value_name = "FILE",
        requires = "http_tls_cert"
    )]
    pub http_tls_key: Option<PathBuf>,
}

/// The maps shipped in the binary, chosen with `--districts builtin:NAME`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuiltinMap {
    /// `builtin:seoul-gu`: Seoul's 25 gu as coarse polygons (`run`'s default).
    SeoulGu,
    /// `builtin:seoul-dongs`: Seoul's 425 dongs, real boundaries of 2021-04-01 (`demo`'s default).
    SeoulDongs,
}

impl BuiltinMap {
    /// The built-in map a `--districts` value names, if it names one.
    pub fn named(value: &std::path::Path) -> Option<Self> {
        match value.to_str()? {
            "builtin:seoul-gu" => Some(Self::SeoulGu),
            "builtin:seoul-dongs" => Some(Self::SeoulDongs),
            _ => None,
        }
    }
}

/// Which district map to use.
#[derive(Debug, Clone, Args)]
pub struct MapArgs {
    /// GeoJSON FeatureCollection of Polygon/MultiPolygon districts, WGS84 lon/lat; or a map shipped
    /// in the binary: `builtin:seoul-gu` (Seoul's 25 gu as coarse polygons, the default of `run`) or
    /// `builtin:seoul-dongs` (Seoul's 425 dongs, real boundaries as of 2021-04-01, the default of
    /// `demo`; provenance and licence in the NOTICE file).
    #[arg(long, env = "DONGFLOW_DISTRICTS", value_name = "FILE")]
    pub districts: Option<PathBuf>,
    /// The feature property holding the district code.
    #[arg(long, env = "DONGFLOW_DISTRICT_CODE_PROP", default_value = "adm_cd2")]
    pub district_code_prop: String,
    /// The feature property holding the district name.
    #[arg(long, env = "DONGFLOW_DISTRICT_NAME_PROP", default_value = "adm_nm")]
    pub district_name_prop: String,
}

/// Where to start reading the input topics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StartFrom {
    /// Resume from the newest complete checkpoint; `earliest` when there is none.
    Checkpoint,
    /// From the beginning of the topics.
    Earliest,
    /// From the end of the topics.
    Latest,
}

/// Options of `dongflow run`.
#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Timely cluster.
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Broker and input topics.
    #[command(flatten)]
    pub input: InputArgs,
    /// Output topic of district counts.
    #[arg(
        long,
        env = "DONGFLOW_DISTRICT_CHANGELOG_TOPIC",
        default_value = "district-changelog"
    )]
    pub district_changelog_topic: String,
    /// Output topic of rider snapshots.
    #[arg(
        long,
        env = "DONGFLOW_RIDER_CHANGELOG_TOPIC",
        default_value = "rider-changelog"
    )]
    pub rider_changelog_topic: String,
    /// Topic for rejected input records.
    #[arg(
        long,
        env = "DONGFLOW_DEAD_LETTER_TOPIC",
        default_value = "dongflow-dlq"
    )]
    pub dead_letter_topic: String,
    /// District map.
    #[command(flatten)]
    pub map: MapArgs,
    /// HTTP listen address of this process.
    #[arg(long, env = "DONGFLOW_HTTP", default_value = "127.0.0.1:8080")]
    pub http: String,
    /// HTTP base URLs of all processes, in process order (multi-process only), comma-separated.
    /// Every process keeps the whole serving view and answers every key itself; the list is
    /// checked to name one URL per process.
    #[arg(long, env = "DONGFLOW_HTTP_PEERS", value_delimiter = ',')]
    pub http_peers: Vec<String>,
    /// Directory for checkpoints.
    #[arg(long, env = "DONGFLOW_STATE_DIR", default_value = "./dongflow-state")]
    pub state_dir: PathBuf,
    /// Time between checkpoints, e.g. `10s`, `500ms`, `2m` (more than zero).
    #[arg(long, env = "DONGFLOW_CHECKPOINT_INTERVAL", default_value = "10s", value_parser = parse_interval)]
    pub checkpoint_interval: Duration,
    /// How long a delivered or cancelled delivery is remembered (on the engine's clock), so that late and
    /// duplicate events for it are ignored instead of bringing it back, e.g. `6h`, `90m`. After that
    /// it is forgotten: an event for the same id starts a new delivery.
    #[arg(long, env = "DONGFLOW_TERMINAL_TTL", default_value = "6h", value_parser = parse_interval)]
    pub terminal_ttl: Duration,
    /// How long a rider whose shift ended is remembered after its last event (on the engine's
    /// clock), with its last rider type and location for its next shift, e.g. `24h`. After that it
    /// is forgotten: its next shift starts without them. A late event older than a forgotten
    /// rider's last one is still stale: it cannot start a shift.
    #[arg(long, env = "DONGFLOW_RIDER_TTL", default_value = "24h", value_parser = parse_interval)]
    pub rider_ttl: Duration,
    /// Where to start reading the input topics.
    #[arg(long, env = "DONGFLOW_START_FROM", value_enum, default_value_t = StartFrom::Checkpoint)]
    pub start_from: StartFrom,
    /// Consumer group under which offsets are committed, for lag tools only.
    #[arg(long, env = "DONGFLOW_GROUP_ID", default_value = "dongflow")]
    pub group_id: String,
    /// librdkafka properties.
    #[command(flatten)]
    pub kafka: KafkaPropertyArgs,
    /// HTTP access control and TLS.
    #[command(flatten)]
    pub http_security: HttpSecurityArgs,
}

/// Options of `dongflow demo`.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Timely worker threads (the demo runs in one process; `dongflow run` makes clusters).
    #[arg(short = 'w', long = "workers", env = "DONGFLOW_WORKERS", default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=1024))]
    pub workers: u64,
    /// District map.
    #[command(flatten)]
    pub map: MapArgs,
    /// HTTP listen address.
    #[arg(long, env = "DONGFLOW_HTTP", default_value = "127.0.0.1:8080")]
    pub http: String,
    /// Simulated riders.
    #[arg(long, default_value_t = 2_000)]
    pub riders: usize,
    /// Simulated events per second (0: as fast as possible).
    #[arg(long, default_value_t = 2_000)]
    pub rate: u64,
    /// Simulator seed: the same seed gives the same riders and moves (their `ts` follow the clock).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Stop after this long (e.g. `30s`) instead of at Ctrl-C.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// librdkafka properties (for the clients of the embedded broker).
    #[command(flatten)]
    pub kafka: KafkaPropertyArgs,
    /// HTTP access control and TLS.
    #[command(flatten)]
    pub http_security: HttpSecurityArgs,
}

/// Options of `dongflow generate`.
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// Broker and topics to produce to.
    #[command(flatten)]
    pub input: InputArgs,
    /// Simulated riders.
    #[arg(long, default_value_t = 2_000)]
    pub riders: usize,
    /// Events per second (0: as fast as possible).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Stop after this long, e.g. `60s`.
    #[arg(long, value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Stop after this many events.
    #[arg(long)]
    pub events: Option<u64>,
    /// Seed: the same seed and `--start-ts` give the same events.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// The simulated clock's start (the first events' `ts`): ms since the Unix epoch, or `now`.
    /// The default, a fixed 2026-01-01T00:00:00Z, makes a seed's events the same every time; to
    /// feed topics an earlier run already fed, start later (e.g. `now`), or the engine ignores the
    /// repeated events as stale (CONTRACT section 3).
    #[arg(long, value_name = "MS|now", default_value = "1767225600000", value_parser = parse_start_ts)]
    pub start_ts: StartTs,
    /// Partitions of the input topics when they have to be created.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: i32,
    /// librdkafka properties.
    #[command(flatten)]
    pub kafka: KafkaPropertyArgs,
}

/// A command-line value that is not what its flag takes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Not a duration.
    #[error("`{0}` is not a duration like 500ms, 10s, 2m or 1h")]
    Duration(String),
    /// A zero interval.
    #[error("`{0}` must be more than zero")]
    Zero(String),
    /// Not a start time.
    #[error("`{0}` is neither `now` nor milliseconds since the Unix epoch")]
    StartTs(String),
}

/// Parses `500ms`, `10s`, `2m`, `1h`, `1h 30m` (humantime's units); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, ValueError> {
    let s = s.trim();
    let parsed = match s.parse::<f64>() {
        Ok(seconds) => Duration::try_from_secs_f64(seconds).ok(),
        Err(_) => humantime::parse_duration(s).ok(),
    };
    parsed.ok_or_else(|| ValueError::Duration(s.to_owned()))
}

/// Where `generate`'s simulated clock starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartTs {
    /// At this time, in ms since the Unix epoch.
    At(u64),
    /// At the wall clock's time when the command starts.
    Now,
}

impl StartTs {
    /// The start in ms since the Unix epoch (`Now` read from the clock).
    pub fn ms(self) -> u64 {
        match self {
            StartTs::At(ms) => ms,
            StartTs::Now => dongflow_connectors::now_ms(),
        }
    }
}

/// Parses `now` or milliseconds since the Unix epoch.
pub fn parse_start_ts(s: &str) -> Result<StartTs, ValueError> {
    if s.eq_ignore_ascii_case("now") {
        return Ok(StartTs::Now);
    }
    s.parse()
        .map(StartTs::At)
        .map_err(|_| ValueError::StartTs(s.to_owned()))
}

/// As [`parse_duration`], refusing zero: a checkpoint every instant, or deliveries forgotten as
/// soon as they end, is never what is meant.
pub fn parse_interval(s: &str) -> Result<Duration, ValueError> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err(ValueError::Zero(s.to_owned()));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1h 30m"), Ok(Duration::from_secs(5400)));
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert_eq!(parse_interval("6h"), Ok(Duration::from_secs(6 * 3600)));
        assert_eq!(parse_interval("0s"), Err(ValueError::Zero("0s".into())));
        assert_eq!(
            parse_duration("ten").map_err(|e| e.to_string()),
            Err("`ten` is not a duration like 500ms, 10s, 2m or 1h".into())
        );
        assert!(parse_interval("0").is_err());
    }

    #[test]
    fn run_accepts_the_contract_flags() {
        let cli = Cli::try_parse_from([
            "dongflow",
            "run",
            "-w",
            "2",
            "-n",
            "2",
            "-p",
            "1",
            "-h",
            "hosts.txt",
            "--brokers",
            "b:9092",
            "--start-from",
            "earliest",
            "--checkpoint-interval",
            "250ms",
            "--http-peers",
            "http://a,http://b",
        ])
        .expect("parses");
        let Command::Run(run) = cli.command else {
            panic!("not run")
        };
        assert_eq!(
            (
                run.cluster.workers,
                run.cluster.processes,
                run.cluster.process
            ),
            (2, 2, 1)
        );
        assert_eq!(run.cluster.hostfile, Some(PathBuf::from("hosts.txt")));
        assert_eq!(run.start_from, StartFrom::Earliest);
        assert_eq!(run.checkpoint_interval, Duration::from_millis(250));
        assert_eq!(run.http_peers, ["http://a", "http://b"]);
        assert_eq!(run.map.district_code_prop, "adm_cd2");
        assert_eq!(run.input.rider_topic, "rider-events");
        assert_eq!(run.input.brokers.as_deref(), Some("b:9092"));
    }

    #[test]
    fn help_is_long_only_and_workers_must_be_positive() {
        assert!(Cli::try_parse_from(["dongflow", "run", "-w", "0"]).is_err());
        let err = Cli::try_parse_from(["dongflow", "run", "--help"]).expect_err("help exits");
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
    }
}
