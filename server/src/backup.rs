//! The backup view: the changelog topics read back into a latest-per-key view, so that a process
//! that is starting, restoring or catching up answers at once from what was last published
//! (`"stale": true`, with the records' `as_of`) instead of going dark.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dongflow_connectors::kafka::quiet::Quiet;
use dongflow_connectors::kafka::{Background, ClientSettings, KafkaError};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError as RdError;
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use serde::Deserialize;

use serde_json::{Map, Value};

use crate::changelog::HeldKeys;

#[derive(Debug, Default)]
struct View {
    /// District code → its latest changelog value (with `as_of`).
    districts: BTreeMap<String, Value>,
    /// Rider id → its latest changelog value (with `as_of`).
    riders: BTreeMap<String, Value>,
    /// District code → riders whose latest value places them there.
    by_district: BTreeMap<String, BTreeSet<String>>,
    /// Keys (district topic?, key) whose latest record could not be decoded.
    unreadable: BTreeSet<(bool, String)>,
}

fn as_of(v: &Value) -> u64 {
    v.get("as_of").and_then(Value::as_u64).unwrap_or(0)
}

fn district_of(v: &Value) -> Option<String> {
    Some(v.get("district")?.get("code")?.as_str()?.to_owned())
}

/// A changelog value as an HTTP answer: the stored object with `"stale": true`.
fn stale(mut v: Value) -> Value {
    if let Some(o) = v.as_object_mut() {
        o.insert("stale".into(), Value::Bool(true));
    }
    v
}

/// An object of a list answer: without its own `as_of`.
fn element(v: &Value) -> Value {
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        o.remove("as_of");
    }
    v
}

/// How far one changelog partition has been read while the view loads.
///
/// A partition is read once the next offset to read is at or past the high watermark of a fetch
/// answer received since reading began: every record there at start is then in. The end offsets a
/// broker lists ahead of time are not used, since some brokers list them imprecisely (one short of the
/// last batch, or past records they never deliver) and the view would stop short or wait forever; and a
/// partition whose records were all removed (retention, delete-records: low watermark == high
/// watermark) is read at once, with nothing in it.
#[derive(Debug)]
struct Reading {
    /// The partition's first offset as listed when reading began (used only when fetch answers do
    /// not carry the log start offset).
    listed_low: i64,
    /// The offset after the last record read, once one is.
    next: Option<i64>,
}

impl Reading {
    fn caught_up(&self, watermarks: &Watermarks, topic: &str, partition: i32) -> bool {
        let Some((low, high)) = watermarks.of(topic, partition) else {
            return false;
        };
        if high < 0 {
            return false;
        }
        let first = if low >= 0 { low } else { self.listed_low };
        self.next.unwrap_or(first).max(first) >= high
    }
}

/// The reader's client context: librdkafka's complaints kept readable ([`Quiet`]), and the
/// watermarks of each partition's last fetch answer, which librdkafka reports in its statistics
/// (`lo_offset`, `hi_offset`: -1001 until a fetch answer arrives).
#[derive(Debug, Default)]
struct Watermarks {
    quiet: Quiet,
    last: Mutex<BTreeMap<(String, i32), (i64, i64)>>,
}

/// The part of librdkafka's statistics the reader wants.
#[derive(Deserialize)]
struct Stats {
    #[serde(default)]
    topics: BTreeMap<String, TopicStats>,
}

#[derive(Deserialize)]
struct TopicStats {
    #[serde(default)]
    partitions: BTreeMap<String, PartitionStats>,
}

#[derive(Deserialize)]
struct PartitionStats {
    partition: i32,
    lo_offset: i64,
    hi_offset: i64,
}

impl Watermarks {
    /// The (low, high) watermarks of the last fetch answer for a partition, once statistics named it.
    fn of(&self, topic: &str, partition: i32) -> Option<(i64, i64)> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.get(&(topic.to_owned(), partition)).copied()
    }
}

impl ClientContext for Watermarks {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.quiet.log(level, fac, log_message);
    }

    fn error(&self, error: RdError, reason: &str) {
        self.quiet.error(&error, reason);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let Ok(stats) = serde_json::from_slice::<Stats>(statistics) else {
            return;
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for (topic, t) in stats.topics {
            // Partition -1 is librdkafka's queue for records not yet given a partition.
            for p in t.partitions.into_values().filter(|p| p.partition >= 0) {
                last.insert((topic.clone(), p.partition), (p.lo_offset, p.hi_offset));
            }
        }
    }
}

impl ConsumerContext for Watermarks {}

/// The view and the thread that fills it.
pub struct BackupView {
    view: RwLock<View>,
    /// Set once every changelog partition has been read up to the end it had when reading began:
    /// from then on the view is the latest published state, and may answer.
    loaded: AtomicBool,
    /// The newest `as_of` among the records read.
    newest: AtomicU64,
    /// The newest `as_of` among the records that were there when reading began.
    loaded_as_of: AtomicU64,
    /// Says when the live state is ready: the reader then lets the view go by itself, so a view
    /// nobody asks stops reading too.
    live: std::sync::OnceLock<Box<dyn Fn() -> bool + Send + Sync>>,
    /// The keys with a value once the view is loaded: what earlier runs left in the changelog.
    held: std::sync::OnceLock<Arc<HeldKeys>>,
    /// Set when the live state is ready before the view is loaded: it then keeps keys alone.
    keys_only: AtomicBool,
    /// Changelog values that were not JSON (skipped, not read as deletions).
    undecodable: AtomicU64,
    thread: Background,
}

impl std::fmt::Debug for BackupView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackupView")
            .field("loaded", &self.loaded)
            .field("newest", &self.newest)
            .finish()
    }
}

impl BackupView {
    /// Starts reading `district_topic` and `rider_topic` from the beginning, once `begin` says
    /// so (it is asked every 10 ms): a restart from a checkpoint lets the checkpoint's own view,
    /// which answers sooner, have the machine first.
    pub fn start(
        brokers: &ClientSettings,
        district_topic: &str,
        rider_topic: &str,
        begin: impl Fn() -> bool + Send + 'static,
    ) -> Result<Arc<BackupView>, KafkaError> {
        let consumer = || -> Result<BaseConsumer<Watermarks>, KafkaError> {
            Ok(brokers
                .configure(
                    ClientConfig::new()
                        // Reads whole topics from the start with assign(): the group is never joined and
                        // no offset is committed; librdkafka's consumer only wants a name.
                        .set("group.id", "dongflow-backup-view")
                        .set("enable.auto.commit", "false")
                        .set("enable.partition.eof", "false")
                        // A partition trimmed by retention while it is read goes on from its new
                        // beginning, not from its end: what it still holds is wanted.
                        .set("auto.offset.reset", "earliest")
                        // Catching up, not tailing: a broker that holds a fetch for its full wait
                        // whenever a partition has nothing new would make loading crawl.
                        .set("fetch.wait.max.ms", "10")
                        // A failed fetch or a partition without a leader is retried soon: the view is
                        // wanted within a second of start.
                        .set("fetch.error.backoff.ms", "10")
                        .set("topic.metadata.refresh.fast.interval.ms", "10")
                        // Statistics carry each partition's watermarks from its last fetch answer:
                        // how the view knows it has read everything there at start (see
                        // `Reading`). Often, so that loading ends soon after the last fetch.
                        .set("statistics.interval.ms", "50"),
                )
                .create_with_context(Watermarks::default())?)
        };
        let consumers = [consumer()?, consumer()?];
        let view = Arc::new(BackupView {
            view: RwLock::new(View::default()),
            loaded: AtomicBool::new(false),
            newest: AtomicU64::new(0),
            loaded_as_of: AtomicU64::new(0),
            live: std::sync::OnceLock::new(),
            held: std::sync::OnceLock::new(),
            keys_only: AtomicBool::new(false),
            undecodable: AtomicU64::new(0),
            thread: Background::default(),
        });
        let topics = [district_topic.to_owned(), rider_topic.to_owned()];
        let v = view.clone();
        view.thread.start("dongflow-backup-view", move || {
            while !begin() {
                if v.thread.stopping() {
                    return;
                }
                std::thread::park_timeout(Duration::from_millis(10));
            }
            v.read(&consumers, &topics)
        })?;
        Ok(view)
    }

    /// Assigns every partition of the topics that exist, from the beginning, and returns each
    /// one's reading state. `None` when the broker could not say; the caller tries again.
    fn begin(
        &self,
        consumers: &[BaseConsumer<Watermarks>; 2],
        topics: &[String; 2],
    ) -> Option<BTreeMap<(usize, i32), Reading>> {
        // A topic the broker does not list holds nothing from earlier runs: it is not waited for
        // (the changelog's clearing waits for this view's keys). One listed with an error is asked
        // again.
        let md = consumers[0]
            .fetch_metadata(None, Duration::from_secs(5))
            .ok()?;
        let mut partitions = [0usize; 2];
        for (i, name) in topics.iter().enumerate() {
            if let Some(t) = md.topics().iter().find(|t| t.name() == name) {
                t.error().is_none().then_some(())?;
                partitions[i] = t.partitions().len();
            }
        }
        for (i, consumer) in consumers.iter().enumerate() {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions[i] as i32 {
                let _ = tpl.add_partition_offset(&topics[i], p, Offset::Beginning);
            }
            if let Err(e) = consumer.assign(&tpl) {
                tracing::warn!("backup view: cannot read {}: {e}", topics[i]);
                return None;
            }
        }
        // The first offset of every partition, for a broker whose fetch answers do not carry it:
        // one request for all of a topic's partitions (the timestamp -2, `Offset::Beginning`,
        // asks for the earliest offset).
        let started = std::time::Instant::now();
        let mut reading = BTreeMap::new();
        for (i, consumer) in consumers.iter().enumerate() {
            if partitions[i] == 0 {
                continue;
            }
            let mut ask = TopicPartitionList::new();
            for p in 0..partitions[i] as i32 {
                let _ = ask.add_partition_offset(&topics[i], p, Offset::Beginning);
            }
            let earliest = match consumer.offsets_for_times(ask, Duration::from_secs(10)) {
                Ok(tpl) => tpl,
                Err(e) => {
                    tracing::warn!("backup view: no first offsets for {}: {e}", topics[i]);
                    return None;
                }
            };
            for e in earliest.elements() {
                let listed_low = match e.offset() {
                    Offset::Offset(low) => low,
                    _ => 0,
                };
                reading.insert(
                    (i, e.partition()),
                    Reading {
                        listed_low,
                        next: None,
                    },
                );
            }
        }
        tracing::info!(
            "backup view: reading {} changelog partitions (first offsets took {:?})",
            reading.len(),
            started.elapsed()
        );
        Some(reading)
    }

    fn read(&self, consumers: &[BaseConsumer<Watermarks>; 2], topics: &[String; 2]) {
        let started = std::time::Instant::now();
        let mut pending = loop {
            if self.thread.stopping() {
                return;
            }
            match self.begin(consumers, topics) {
                Some(reading) => break reading,
                None => std::thread::park_timeout(Duration::from_millis(500)),
            }
        };
        let mut read = 0u64;
        while !self.thread.stopping() {
            if self.live.get().is_some_and(|live| live()) {
                // Not before it is loaded: the changelog's clearing wants its keys. Until then it
                // reads on for them alone.
                if self.loaded.load(Ordering::Acquire) {
                    self.release();
                    break;
                }
                self.keep_keys_only();
            }
            let mut idle = true;
            for (i, consumer) in consumers.iter().enumerate() {
                // Take everything that has arrived, without waiting.
                while let Some(Ok(m)) = consumer.poll(Duration::ZERO) {
                    idle = false;
                    read += 1;
                    self.take(i, &m, &mut pending);
                }
            }
            if !self.loaded.load(Ordering::Acquire) {
                pending.retain(|&(i, p), r| !r.caught_up(consumers[i].context(), &topics[i], p));
                if pending.is_empty() {
                    self.loaded_as_of
                        .store(self.newest.load(Ordering::Acquire), Ordering::Release);
                    let _ = self.held.set(Arc::new(self.keys()));
                    self.loaded.store(true, Ordering::Release);
                    tracing::info!(
                        "backup view: {read} changelog records loaded in {:?}",
                        started.elapsed()
                    );
                }
            }
            if idle {
                // Nothing on either topic: wait a little on one of them (the other is read next round).
                if let Some(Ok(m)) = consumers[0].poll(Duration::from_millis(5)) {
                    read += 1;
                    self.take(0, &m, &mut pending);
                }
            }
        }
    }

    /// Applies a record of topic `i` (0: districts) and notes how far its partition is read.
    fn take(
        &self,
        i: usize,
        m: &rdkafka::message::BorrowedMessage<'_>,
        pending: &mut BTreeMap<(usize, i32), Reading>,
    ) {
        if let Some(r) = pending.get_mut(&(i, m.partition())) {
            r.next = Some(m.offset() + 1);
        }
        self.apply(i == 0, m);
    }

    fn apply(&self, district: bool, m: &rdkafka::message::BorrowedMessage<'_>) {
        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            return;
        };
        if self.keys_only.load(Ordering::Acquire) {
            let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
            let map = match district {
                true => &mut view.districts,
                false => &mut view.riders,
            };
            match m.payload() {
                Some(_) => map.insert(key.to_owned(), Value::Null),
                None => map.remove(key),
            };
            return;
        }
        let value: Option<Value> = match m.payload().map(serde_json::from_slice::<Value>) {
            None => None,
            Some(Ok(v)) => Some(v),
            Some(Err(e)) => {
                // Not a deletion: the key keeps what it had, and stays held, so that the
                // changelog's clearing replaces the record if the live state has nothing for it.
                if self.undecodable.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "backup view: a changelog value in {} [{}] at offset {} is not JSON ({e}); \
                         counted in dongflow_changelog_undecodable_records_total and skipped",
                        m.topic(),
                        m.partition(),
                        m.offset()
                    );
                }
                let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
                view.unreadable.insert((district, key.to_owned()));
                return;
            }
        };
        if let Some(v) = &value {
            self.newest.fetch_max(as_of(v), Ordering::AcqRel);
        }
        let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
        // A readable record replaces an unreadable one (checked first: most loads have none, and
        // the key would be copied for every record read).
        if !view.unreadable.is_empty() {
            view.unreadable.remove(&(district, key.to_owned()));
        }
        if district {
            match value {
                Some(v) => view.districts.insert(key.to_owned(), v),
                None => view.districts.remove(key),
            };
            return;
        }
        if let Some(old) = view.riders.remove(key).as_ref().and_then(district_of) {
            if let Some(set) = view.by_district.get_mut(&old) {
                set.remove(key);
            }
        }
        if let Some(v) = value {
            if let Some(d) = district_of(&v) {
                view.by_district
                    .entry(d)
                    .or_default()
                    .insert(key.to_owned());
            }
            view.riders.insert(key.to_owned(), v);
        }
    }

    /// The keys the view holds a value for.
    fn keys(&self) -> HeldKeys {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        // A key whose latest record was not readable is held too (once, in order).
        let held = |district: bool, map: &BTreeMap<String, Value>| -> Vec<String> {
            let unreadable = view.unreadable.iter().filter(|(d, _)| *d == district);
            let keys: BTreeSet<&String> = map.keys().chain(unreadable.map(|(_, k)| k)).collect();
            keys.into_iter().cloned().collect()
        };
        HeldKeys {
            districts: held(true, &view.districts),
            riders: held(false, &view.riders),
        }
    }

    /// The keys the changelog held a value for when reading began, once all of it is read.
    pub fn held_keys(&self) -> Option<Arc<HeldKeys>> {
        self.held.get().cloned()
    }

    /// Changelog values read that were not JSON.
    pub fn undecodable(&self) -> u64 {
        self.undecodable.load(Ordering::Relaxed)
    }

    /// Whether the view has let its values go and reads on for the keys alone (the live state
    /// became ready before the view was loaded).
    pub fn keys_only(&self) -> bool {
        self.keys_only.load(Ordering::Acquire)
    }

    /// Whether the view can answer: it has read the changelog as far as it went at start, that
    /// held something, and it still keeps the values.
    pub fn ready(&self) -> bool {
        if !self.loaded.load(Ordering::Acquire) || self.keys_only.load(Ordering::Acquire) {
            return false;
        }
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        !(view.districts.is_empty() && view.riders.is_empty())
    }

    /// The newest `as_of` among the records that were in the changelog when reading began (0
    /// until they are all read): how new the view is as a whole. Records published since then
    /// are applied as they come, but they alone do not make the view newer than a checkpoint.
    pub fn loaded_as_of(&self) -> u64 {
        self.loaded_as_of.load(Ordering::Acquire)
    }

    /// `GET /v1/districts`, stale.
    pub fn districts(&self) -> Value {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let as_of = view.districts.values().map(as_of).max().unwrap_or(0);
        let list: Vec<Value> = view.districts.values().map(element).collect();
        let mut o = Map::new();
        o.insert("as_of".into(), as_of.into());
        o.insert("stale".into(), true.into());
        o.insert("districts".into(), list.into());
        Value::Object(o)
    }

    /// `GET /v1/districts/{code}`, stale; `zero` renders a district with no record (no activity).
    pub fn district(&self, code: &str, zero: impl FnOnce() -> Value) -> Value {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        match view.districts.get(code) {
            Some(v) => stale(v.clone()),
            None => {
                let as_of = view.districts.values().map(as_of).max().unwrap_or(0);
                let mut v = zero();
                if let Some(o) = v.as_object_mut() {
                    o.insert("as_of".into(), as_of.into());
                }
                stale(v)
            }
        }
    }

    /// `GET /v1/districts/{code}/riders`, stale.
    pub fn riders_of(&self, code: &str) -> Value {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        let riders: Vec<&Value> = view
            .by_district
            .get(code)
            .into_iter()
            .flatten()
            .filter_map(|id| view.riders.get(id))
            .collect();
        let as_of = riders.iter().map(|v| as_of(v)).max().unwrap_or(0);
        let mut o = Map::new();
        o.insert("as_of".into(), as_of.into());
        o.insert("stale".into(), true.into());
        o.insert(
            "riders".into(),
            riders.into_iter().map(element).collect::<Vec<_>>().into(),
        );
        Value::Object(o)
    }

    /// `GET /v1/riders/{id}`, stale; `None` when the view has no such rider.
    pub fn rider(&self, id: &str) -> Option<Value> {
        let view = self.view.read().unwrap_or_else(|e| e.into_inner());
        view.riders.get(id).cloned().map(stale)
    }

    /// Lets the view go as soon as `live` says the live state is ready (checked between reads).
    pub fn release_when(&self, live: impl Fn() -> bool + Send + Sync + 'static) {
        let _ = self.live.set(Box::new(live));
    }

    /// Drops the values and the riders by district, and from now on reads only which keys have
    /// a value: the live state answers, and the changelog's clearing wants only the keys.
    fn keep_keys_only(&self) {
        if self.keys_only.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut guard = self.view.write().unwrap_or_else(|e| e.into_inner());
        let view = &mut *guard;
        view.by_district = BTreeMap::new();
        for value in view.riders.values_mut().chain(view.districts.values_mut()) {
            *value = Value::Null;
        }
        tracing::info!(
            "live state ready: answers are live from now on; the changelog's view reads on for \
             its keys alone"
        );
    }

    /// Stops reading and frees the view (the live state has taken over).
    pub fn release(&self) {
        if self.thread.request_stop() {
            return;
        }
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = View::default();
        tracing::info!("live state ready: answers are live from now on");
    }

    /// Stops the reader thread and waits for it.
    pub fn stop(&self) {
        self.thread.stop();
    }
}
