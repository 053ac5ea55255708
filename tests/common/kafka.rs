//! Kafka test helpers: the two real brokers (the embedded mock cluster, tansu), producing and
//! reading topics with rdkafka, and `dongflow run` as a child process.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dongflow_connectors::kafka::{create_topics, ClientSettings, EmbeddedBroker, TopicSpec};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};

/// A running broker of either kind.
pub enum Broker {
    /// librdkafka's mock cluster in this process.
    Embedded(EmbeddedBroker),
    /// A tansu child process with its storage in a temp dir.
    Tansu(Tansu),
}

impl Broker {
    pub fn embedded() -> Broker {
        Broker::Embedded(EmbeddedBroker::start(&[]).expect("mock cluster starts"))
    }

    /// The embedded broker, for its fault injection; a test that made one knows it is one.
    pub fn as_embedded(&self) -> &EmbeddedBroker {
        match self {
            Broker::Embedded(embedded) => embedded,
            Broker::Tansu(_) => panic!("the test needs the embedded broker"),
        }
    }

    /// Tansu, or `None` (with a note) when its binary is not installed and not required.
    pub fn tansu() -> Option<Broker> {
        let binary = tansu_binary()?;
        Some(Broker::Tansu(Tansu::start(binary, free_port())))
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Broker::Embedded(b) => b.bootstrap(),
            Broker::Tansu(t) => t.bootstrap(),
        }
    }

    /// Creates topics with `partitions` partitions each.
    pub fn create(&self, topics: &[&str], partitions: i32) {
        match self {
            Broker::Embedded(b) => {
                for t in topics {
                    b.create_topic(&TopicSpec::new(t, partitions))
                        .expect("mock topic");
                }
            }
            Broker::Tansu(t) => create_on(&t.bootstrap(), topics, partitions),
        }
    }
}

pub fn create_on(bootstrap: &str, topics: &[&str], partitions: i32) {
    let specs: Vec<TopicSpec> = topics
        .iter()
        .map(|t| TopicSpec::new(t, partitions))
        .collect();
    create_topics(&bootstrap.into(), &specs, Duration::from_secs(20)).expect("topics created");
}

/// The tansu binary: `$TANSU`, `tansu` on the PATH or in `~/.cargo/bin`. Missing: `None`, unless
/// `DONGFLOW_REQUIRE_TANSU=1` (CI), which fails the test.
pub fn tansu_binary() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Ok(p) = std::env::var("TANSU") {
        candidates.push(p.into());
    }
    if let Ok(path) = std::env::var("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join("tansu")));
    }
    if let Ok(home) = std::env::var("HOME") {
        candidates.push(PathBuf::from(home).join(".cargo/bin/tansu"));
    }
    let found = candidates.into_iter().find(|p| p.is_file());
    if found.is_none() {
        assert!(
            std::env::var("DONGFLOW_REQUIRE_TANSU").as_deref() != Ok("1"),
            "DONGFLOW_REQUIRE_TANSU=1 but no tansu binary: cargo install tansu --locked --features dynostore,libsql"
        );
        eprintln!("SKIPPED: tansu is not installed (cargo install tansu --locked --features dynostore,libsql)");
    }
    found
}

/// A port for a listener that must be named before it exists (timely's hostfile, a broker or an
/// engine started as a child process), so that no parallel test can take it meanwhile:
/// - taken from 20000..30000, below Linux's ephemeral range (32768..60999), so no `bind(0)`
///   anywhere is handed it;
/// - held for this test process's lifetime with an exclusive lock on
///   `$TMPDIR/dongflow-test-ports/PORT.lock`, so that no other test, in this process or another
///   (cargo nextest runs each test in a process of its own), is given it too;
/// - and checked free (bindable) when given.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Mutex;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    static HELD: Mutex<Vec<std::fs::File>> = Mutex::new(Vec::new());
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 10_000;
    let dir = std::env::temp_dir().join("dongflow-test-ports");
    std::fs::create_dir_all(&dir).expect("port lock dir");
    // Test processes start their search at different places, so that they rarely meet.
    let start = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        let Ok(lock) = std::fs::File::create(dir.join(format!("{port}.lock"))) else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        HELD.lock().unwrap_or_else(|e| e.into_inner()).push(lock);
        return port;
    }
    panic!("no free port in {FIRST}..{}", FIRST + SPAN);
}

/// A tansu broker process; killed on drop.
pub struct Tansu {
    binary: PathBuf,
    /// The address it listens on and advertises (loopback unless a test's network says otherwise).
    host: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    /// The port advertised to clients, when they reach tansu through something else (a TLS
    /// endpoint in front of it).
    pub advertised: Option<u16>,
    /// Whether clients must authenticate (SASL SCRAM).
    pub authentication: bool,
}

impl Tansu {
    pub fn start(binary: PathBuf, port: u16) -> Tansu {
        Self::start_on(binary, "127.0.0.1", port)
    }

    /// Tansu listening on (and advertising) `host:port`.
    pub fn start_on(binary: PathBuf, host: &str, port: u16) -> Tansu {
        let dir =
            std::env::temp_dir().join(format!("dongflow-tansu-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut t = Tansu {
            binary,
            host: host.to_owned(),
            port,
            dir,
            child: None,
            advertised: None,
            authentication: false,
        };
        t.up();
        t
    }

    pub fn bootstrap(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// Starts the process (again) on the same port and storage, and waits until it accepts.
    pub fn up(&mut self) {
        let url = format!("tcp://{}:{}", self.host, self.port);
        let advertised = format!(
            "tcp://{}:{}",
            self.host,
            self.advertised.unwrap_or(self.port)
        );
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))
            .expect("log file");
        let child = Command::new(&self.binary)
            .current_dir(&self.dir)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &advertised,
                "--storage-engine",
                "sqlite://tansu.db",
            ])
            .args(self.authentication.then_some("--authentication"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tansu starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect((self.host.as_str(), self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not listen on {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Creates a SCRAM-SHA-512 user (tansu must be running without authentication).
    pub fn create_user(&self, name: &str, password: &str) {
        let status = Command::new(&self.binary)
            .args([
                "user",
                "create",
                "--broker",
                &format!("tcp://{}:{}", self.host, self.port),
                "--mechanism",
                "scram512",
                name,
                password,
            ])
            .stdout(Stdio::null())
            .status()
            .expect("tansu user create runs");
        assert!(status.success(), "tansu user create failed");
    }

    /// Its folder (storage and log).
    pub fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A record to produce or a record read.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Record {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub partition: i32,
    pub offset: i64,
    pub headers: BTreeMap<String, String>,
}

impl Record {
    pub fn new(topic: &str, key: Option<&[u8]>, value: Option<&[u8]>) -> Record {
        Record {
            topic: topic.to_owned(),
            key: key.map(<[u8]>::to_vec),
            value: value.map(<[u8]>::to_vec),
            partition: -1,
            offset: -1,
            headers: BTreeMap::new(),
        }
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// Produces records in order (keyed records go to the key's partition) and waits for delivery.
pub fn produce(bootstrap: &str, records: &[Record]) {
    produce_via(&bootstrap.into(), records);
}

/// [`produce`] through a client made from `settings` (a secured broker's properties, say).
pub fn produce_via(settings: &ClientSettings, records: &[Record]) {
    let producer: BaseProducer = settings
        .configure(
            ClientConfig::new()
                .set("linger.ms", "5")
                // Keep the order of each key's records even when a send is retried.
                .set("enable.idempotence", "true")
                // Keys land where the engine's changelog producer (and Kafka's Java clients) put
                // them: a changelog record a test leaves behind shares its key's partition with
                // the engine's tombstone for it.
                .set("partitioner", "murmur2_random"),
        )
        .create()
        .expect("producer");
    for r in records {
        let mut record: BaseRecord<'_, [u8], [u8]> = BaseRecord::to(&r.topic);
        if let Some(k) = &r.key {
            record = record.key(&k[..]);
        }
        if let Some(v) = &r.value {
            record = record.payload(&v[..]);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((_, back)) => {
                    record = back;
                    producer.poll(Duration::from_millis(5));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60)).expect("delivered");
}

/// Reads every partition of `topic` from the beginning, as records arrive.
pub struct Reader {
    consumer: BaseConsumer,
    topic: String,
    partitions: i32,
    pub records: Vec<Record>,
}

impl Reader {
    pub fn new(bootstrap: &str, topic: &str, partitions: i32) -> Reader {
        Self::via(&bootstrap.into(), topic, partitions)
    }

    /// [`Reader::new`] through a client made from `settings`.
    pub fn via(settings: &ClientSettings, topic: &str, partitions: i32) -> Reader {
        let consumer: BaseConsumer = settings
            .configure(
                ClientConfig::new()
                    .set("group.id", "dongflow-tests")
                    .set("enable.auto.commit", "false"),
            )
            .create()
            .expect("consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&tpl).expect("assign");
        Reader {
            consumer,
            topic: topic.to_owned(),
            partitions,
            records: Vec::new(),
        }
    }

    /// Reads until every partition's end offset (asked now) has been reached.
    pub fn read_to_end(&mut self, _bootstrap: &str) {
        let ends: Vec<i64> = (0..self.partitions)
            .map(|p| {
                self.consumer
                    .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                    .expect("watermarks")
                    .1
            })
            .collect();
        eventually(Duration::from_secs(60), "the topic read to its end", || {
            self.poll(Duration::from_millis(50));
            (0..self.partitions)
                .all(|p| {
                    let end = ends[p as usize];
                    end == 0
                        || self
                            .records
                            .iter()
                            .any(|r| r.partition == p && r.offset + 1 >= end)
                })
                .then_some(())
        });
    }

    /// Takes what has arrived, waiting up to `wait` for the first record.
    pub fn poll(&mut self, wait: Duration) {
        let mut timeout = wait;
        while let Some(m) = self.consumer.poll(timeout) {
            timeout = Duration::ZERO;
            let Ok(m) = m else { continue };
            let headers = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| {
                            (
                                h.key.to_owned(),
                                String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned(),
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            self.records.push(Record {
                topic: m.topic().to_owned(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().map(<[u8]>::to_vec),
                partition: m.partition(),
                offset: m.offset(),
                headers,
            });
        }
    }

    /// Latest value per key (tombstones remove the key), as JSON (a value that is not JSON as a
    /// JSON string of its text, so that it differs from every answer).
    pub fn latest(&self) -> BTreeMap<String, serde_json::Value> {
        let mut out = BTreeMap::new();
        for r in &self.records {
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            match &r.value {
                None => {
                    out.remove(&key);
                }
                Some(v) => {
                    let text = || serde_json::Value::String(String::from_utf8_lossy(v).into());
                    out.insert(key, serde_json::from_slice(v).unwrap_or_else(|_| text()));
                }
            }
        }
        out
    }
}

/// `dongflow run` as a child process; killed on drop. Its stderr is kept for assertions.
pub struct Dongflow {
    child: Child,
    pub http: String,
    pub stderr: Arc<Mutex<String>>,
}

impl Dongflow {
    pub fn run(args: &[&str]) -> Dongflow {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_dongflow")),
            "127.0.0.1:0",
            args,
            true,
        )
    }

    /// Starts `dongflow run --http ADDR ARGS` without waiting for it to serve (a cluster process
    /// serves only once every process has joined).
    pub fn start_at(addr: &str, args: &[&str]) -> Dongflow {
        Self::spawn(
            Command::new(env!("CARGO_BIN_EXE_dongflow")),
            addr,
            args,
            false,
        )
    }

    /// Like [`Dongflow::start_at`], in the network namespace `netns` (`ip netns exec` execs the
    /// engine, so the child is the engine itself).
    pub fn start_in(netns: &str, addr: &str, args: &[&str]) -> Dongflow {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", netns])
            .arg(env!("CARGO_BIN_EXE_dongflow"));
        Self::spawn(command, addr, args, false)
    }

    fn spawn(mut command: Command, addr: &str, args: &[&str], wait: bool) -> Dongflow {
        let mut child = command
            .arg("run")
            .args(["--http", addr])
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dongflow starts");
        let stderr = Arc::new(Mutex::new(String::new()));
        let err = child.stderr.take().expect("stderr");
        let log = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("  dongflow: {line}");
                let mut l = log.lock().unwrap_or_else(|e| e.into_inner());
                l.push_str(&line);
                l.push('\n');
            }
        });
        let out = child.stdout.take().expect("stdout");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("HTTP: ") {
                    let _ = tx.send(url.trim_end_matches('/').to_owned());
                }
            }
        });
        let http = if wait {
            rx.recv_timeout(Duration::from_secs(60))
                .expect("dongflow prints its HTTP address")
        } else {
            format!("http://{addr}")
        };
        Dongflow {
            child,
            http,
            stderr,
        }
    }

    /// The exit code once the process has exited (`Some(None)`: killed by a signal).
    pub fn exited(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().ok().flatten().map(|s| s.code())
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// SIGTERM, then the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let _ = Command::new("/usr/bin/kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(code) = self.exited() {
                return code;
            }
            assert!(
                Instant::now() < deadline,
                "dongflow did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Dongflow {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` until it returns `Some`, or fails after `limit`, saying `what`.
pub fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
