//! The stale view: what a starting, restoring or catching-up process answers (`"stale": true`)
//! until its live state is ready, so that it never goes dark (CONTRACT section 7).
//!
//! It is a [`ServingView`] like the live one, filled by one thread:
//! 1. from the restored checkpoint ([`ServingView::seed`]) when the checkpoint says where the changelog
//!    reflects it (its cut, see [`Restored::cut`]), plus the changelog records after that cut of
//!    a later time than the checkpoint's (when the cut is on other topics, this run's are read
//!    whole, for records later than the checkpoint);
//! 2. otherwise from the changelog topics alone, read from their beginning: a checkpoint that
//!    does not know its cut may be older than records the changelog holds;
//! 3. it answers once every changelog partition has been read up to what it held when reading
//!    began, then follows the topics as they grow;
//! 4. once the live state is ready it lets everything go.
//!
//! It also says which keys the changelog held, with a fingerprint of each value
//! ([`StaleView::held_keys`]): a run that cannot trust the changelog to hold its state writes only
//! what differs, and tombstones the keys its state lacks.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use dongflow_connectors::kafka::quiet::Quiet;
use dongflow_connectors::kafka::{Background, ClientSettings, KafkaError, AS_OF_HEADER};
use dongflow_connectors::Id;
use dongflow_dataflow::districts::DistrictIndex;
use dongflow_dataflow::types::{Change, Time};
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError as RdError;
use rdkafka::message::{BorrowedMessage, Headers};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};
use serde::Deserialize;

use super::{ServingView, ViewChange};
use crate::changelog::{HeldKey, HeldKeys};
use crate::query::{Answer, Query};
use crate::recovery::{Published, Restored};
use crate::render::{decode_district, decode_district_key, decode_rider, DecodeError, Fingerprint};

/// Where a stale view's contents come from.
#[derive(Clone, Debug)]
pub struct StaleSource {
    /// The brokers of the changelog topics.
    pub brokers: ClientSettings,
    /// `--district-changelog-topic`.
    pub district_topic: String,
    /// `--rider-changelog-topic`.
    pub rider_topic: String,
    /// The map, to read district codes back.
    pub index: Arc<DistrictIndex>,
    /// The checkpoint this process restored, if any.
    pub restored: Option<Arc<Restored>>,
    /// Whether this run reconciles the changelog with its state once caught up, and so wants the
    /// keys the changelog held ([`StaleView::held_keys`]); a run restored from a checkpoint whose
    /// changelog a clean stop marked complete does not, and the view spares their fingerprints.
    pub reconciles: bool,
}

impl StaleSource {
    /// The restored checkpoint, when it says where a changelog reflects it, and that cut when it
    /// is on this run's changelog. A checkpoint whose cut is on other topics or brokers is this
    /// run's changelog's only source of what came before: it seeds the view, and this run's
    /// changelog is read whole.
    fn seed(&self) -> Option<(&Restored, Option<&Published>)> {
        let restored = self.restored.as_deref()?;
        let cut = restored.cut.as_ref()?;
        let here = Published {
            brokers: self.brokers.bootstrap().to_owned(),
            district_topic: self.district_topic.clone(),
            rider_topic: self.rider_topic.clone(),
            ends: Vec::new(),
        };
        Some((restored, cut.same_changelog(&here).then_some(cut)))
    }
}

/// How far one changelog partition has been read while the view loads.
///
/// A partition is read once the next offset to read is at or past the high watermark of the first
/// fetch answer received since reading began: every record there at start is then in. Not a later
/// answer's: this run may be publishing its state again into the same topics meanwhile, and a
/// reader chasing that would load only once the publishing ends (minutes at a million riders). The
/// end offsets a broker lists ahead of time are not used, since some brokers list them imprecisely
/// (one short of the last batch, or past records they never deliver) and the view would stop short
/// or wait forever; and a partition whose records were all removed (retention, delete-records: low
/// watermark == high watermark) is read at once, with nothing in it.
#[derive(Debug)]
struct Reading {
    /// Where reading began: the cut, or the partition's first offset as listed (used only when
    /// fetch answers do not carry the log start offset).
    start: i64,
    /// The offset after the last record read, once one is.
    next: Option<i64>,
    /// The high watermark of the first fetch answer seen.
    target: Option<i64>,
}

impl Reading {
    fn new(start: i64) -> Reading {
        Reading {
            start,
            next: None,
            target: None,
        }
    }

    fn caught_up(&mut self, watermarks: &Watermarks, topic: &str, partition: i32) -> bool {
        let Some((low, high)) = watermarks.of(topic, partition) else {
            return false;
        };
        if self.target.is_none() && high >= 0 {
            self.target = Some(high);
        }
        let Some(target) = self.target else {
            return false;
        };
        self.next.unwrap_or(self.start).max(low) >= target
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

/// The stale view and the thread that fills it.
pub struct StaleView {
    view: Arc<ServingView>,
    /// Set once every changelog partition has been read up to what it held when reading began.
    loaded: AtomicBool,
    /// The keys the changelog held a value for then, when the run wants them.
    held: OnceLock<Arc<HeldKeys>>,
    /// Set once the held keys are taken, or once loaded when the run does not want them: the view
    /// is not let go before.
    keys_taken: AtomicBool,
    /// Changelog values that could not be read back (skipped, not read as deletions).
    undecodable: AtomicU64,
    thread: Background,
}

impl std::fmt::Debug for StaleView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaleView")
            .field("loaded", &self.loaded)
            .field("as_of", &self.view.as_of())
            .finish()
    }
}

/// A changelog consumer: reads whole topics from given offsets, never joins a group.
fn consumer(brokers: &ClientSettings) -> Result<BaseConsumer<Watermarks>, KafkaError> {
    Ok(brokers
        .configure(
            ClientConfig::new()
                // Reads with assign(): the group is never joined and no offset is committed;
                // librdkafka's consumer only wants a name.
                .set("group.id", "dongflow-stale-view")
                .set("enable.auto.commit", "false")
                .set("enable.partition.eof", "false")
                // A partition trimmed by retention while it is read goes on from its new
                // beginning, not from its end: what it still holds is wanted.
                .set("auto.offset.reset", "earliest")
                // Catching up, not tailing: a broker that holds a fetch for its full wait whenever
                // a partition has nothing new would make loading crawl.
                .set("fetch.wait.max.ms", "10")
                // A failed fetch or a partition without a leader is retried soon: the view is
                // wanted within a second of start.
                .set("fetch.error.backoff.ms", "10")
                .set("topic.metadata.refresh.fast.interval.ms", "10")
                // Statistics carry each partition's watermarks from its last fetch answer: how the
                // view knows it has read everything there at start (see `Reading`). Often, so that
                // loading ends soon after the last fetch.
                .set("statistics.interval.ms", "50"),
        )
        .create_with_context(Watermarks::default())?)
}

/// What the reading thread keeps besides the view.
struct Reader {
    source: StaleSource,
    consumers: [BaseConsumer<Watermarks>; 2],
    topics: [String; 2],
    /// Where each partition starts: the cut, when seeded.
    cut: BTreeMap<(String, i32), i64>,
    read: Decoded,
}

/// What reading back has found so far.
struct Decoded {
    index: Arc<DistrictIndex>,
    /// Records of this time or earlier are in the seeded checkpoint already (0: no seed).
    seeded_at: Time,
    /// The newest `as_of` read.
    newest: Time,
    /// Keys (district topic?, key) whose latest record could not be read back.
    unreadable: BTreeSet<(bool, String)>,
    /// When the seeded checkpoint is not what this run's topics hold (its changelog went to other
    /// topics): what the records read say, per key (district topic?, key), by fingerprint, so
    /// that the held keys are the topics' and not the seed's.
    records: Option<BTreeMap<(bool, String), u64>>,
}

impl StaleView {
    /// Starts filling a stale view from `source`; it lets its contents go once `live` says the live
    /// state is ready (asked between reads).
    pub fn start(
        source: StaleSource,
        live: impl Fn() -> bool + Send + 'static,
    ) -> Result<Arc<StaleView>, KafkaError> {
        let consumers = [consumer(&source.brokers)?, consumer(&source.brokers)?];
        let view = Arc::new(StaleView {
            view: ServingView::new_stale(),
            loaded: AtomicBool::new(false),
            held: OnceLock::new(),
            keys_taken: AtomicBool::new(false),
            undecodable: AtomicU64::new(0),
            thread: Background::default(),
        });
        let topics = [source.district_topic.clone(), source.rider_topic.clone()];
        let read = Decoded {
            index: source.index.clone(),
            seeded_at: 0,
            newest: 0,
            unreadable: BTreeSet::new(),
            records: None,
        };
        let mut reader = Reader {
            source,
            consumers,
            topics,
            cut: BTreeMap::new(),
            read,
        };
        let v = view.clone();
        view.thread
            .start("dongflow-stale-view", move || v.fill(&mut reader, &live))?;
        Ok(view)
    }

    fn fill(&self, reader: &mut Reader, live: &dyn Fn() -> bool) {
        let started = Instant::now();
        // (the checkpoint's time, its cut's ends when on this run's changelog)
        let seed = reader
            .source
            .seed()
            .map(|(restored, cut)| (restored.time, cut.map(|c| c.ends.clone())));
        match &seed {
            Some((time, ends)) => {
                reader.read.seeded_at = *time;
                reader.read.newest = *time;
                match ends {
                    Some(ends) => {
                        reader.cut = ends.iter().map(|(t, p, o)| ((t.clone(), *p), *o)).collect();
                    }
                    None => reader.read.records = Some(BTreeMap::new()),
                }
            }
            None => {
                if let Some(r) = &reader.source.restored {
                    tracing::info!(
                        "stale view: checkpoint {} {}; reading the changelog whole",
                        r.time,
                        match r.partial {
                            true => "holds only this process's part of the cluster's state",
                            false => "does not say where the changelog reflects it",
                        }
                    );
                }
            }
        }
        // Reading begins first: the broker answers its first fetches while the checkpoint is
        // seeded.
        let mut pending = loop {
            if self.thread.stopping() {
                return;
            }
            match reader.begin() {
                Some(reading) => break reading,
                None => std::thread::park_timeout(Duration::from_millis(500)),
            }
        };
        if let (Some((time, ends)), Some(restored)) = (&seed, &reader.source.restored) {
            self.view.seed(restored);
            tracing::info!(
                "stale view: checkpoint {time} seeded {:?} after start; reading the changelog {}",
                started.elapsed(),
                match ends {
                    Some(_) => "after its cut",
                    None => "whole (the checkpoint's went to other topics)",
                }
            );
        }
        let mut read = 0u64;
        while !self.thread.stopping() {
            let loaded = self.loaded.load(Ordering::Acquire);
            // Not before it is loaded: the changelog's clearing wants its keys.
            if loaded && live() {
                self.release();
                return;
            }
            let mut changes = Vec::new();
            for i in 0..2 {
                // Take everything that has arrived, without waiting.
                while let Some(Ok(m)) = reader.consumers[i].poll(Duration::ZERO) {
                    read += 1;
                    if let Some(r) = pending.get_mut(&(i, m.partition())) {
                        r.next = Some(m.offset() + 1);
                    }
                    self.take(&mut reader.read, i == 0, &m, &mut changes);
                }
            }
            let idle = changes.is_empty();
            if !loaded {
                self.view.prepare(changes);
                pending.retain(|&(i, p), r| {
                    !r.caught_up(reader.consumers[i].context(), &reader.topics[i], p)
                });
                if pending.is_empty() {
                    self.view.advance([], reader.read.newest);
                    // Answers first: the held keys (a fingerprint of every value, the longest
                    // part at a million riders) are wanted only once the live state has caught
                    // up. Taken next, from this same version (nothing else changes the view
                    // meanwhile, and it is not let go before they are taken: see `release`).
                    self.loaded.store(true, Ordering::Release);
                    tracing::info!(
                        "stale view: {read} changelog records loaded in {:?}; answering at {}",
                        started.elapsed(),
                        reader.read.newest
                    );
                    if reader.source.reconciles {
                        let taking = Instant::now();
                        let held = reader.read.held_keys(&self.view);
                        let keys = held.districts.len() + held.riders.len();
                        let _ = self.held.set(Arc::new(held));
                        tracing::info!(
                            "stale view: the {keys} keys the changelog held taken in {:?}",
                            taking.elapsed()
                        );
                    }
                    self.keys_taken.store(true, Ordering::Release);
                }
            } else if !idle {
                self.view.advance(changes, reader.read.newest);
            }
            if idle {
                // Nothing new: wait a little on one topic (the other is read next round).
                if let Some(Ok(m)) = reader.consumers[1].poll(Duration::from_millis(5)) {
                    read += 1;
                    if let Some(r) = pending.get_mut(&(1, m.partition())) {
                        r.next = Some(m.offset() + 1);
                    }
                    let mut more = Vec::new();
                    self.take(&mut reader.read, false, &m, &mut more);
                    match self.loaded.load(Ordering::Acquire) {
                        true => self.view.advance(more, reader.read.newest),
                        false => self.view.prepare(more),
                    }
                }
            }
        }
    }

    /// Reads one record back into `changes`: skipped when the seeded checkpoint holds it already,
    /// counted and skipped (not read as a deletion) when it cannot be read.
    fn take(
        &self,
        reader: &mut Decoded,
        district: bool,
        m: &BorrowedMessage<'_>,
        changes: &mut Vec<ViewChange>,
    ) {
        let Some(key) = m.key().and_then(|k| std::str::from_utf8(k).ok()) else {
            return;
        };
        match reader.decode(district, key, m) {
            Ok(Some(change)) => {
                if !reader.unreadable.is_empty() {
                    reader.unreadable.remove(&(district, key.to_owned()));
                }
                changes.push(change);
            }
            Ok(None) => {}
            Err(e) => {
                // The key keeps what it had, and stays held, so that the changelog's clearing
                // replaces the record if the live state has nothing for it.
                if self.undecodable.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        "stale view: a changelog value in {} [{}] at offset {} cannot be read \
                         back ({e}); counted in dongflow_changelog_undecodable_records_total and \
                         skipped",
                        m.topic(),
                        m.partition(),
                        m.offset()
                    );
                }
                reader.unreadable.insert((district, key.to_owned()));
            }
        }
    }

    /// The answer to `query` (`stale: true`), once the view has loaded what the changelog held at
    /// start and until it is let go; `None` otherwise.
    pub fn answer(&self, query: &Query) -> Option<Answer> {
        if !self.loaded.load(Ordering::Acquire) {
            return None;
        }
        self.view.answer(query)
    }

    /// The serving view behind the answers, once it answers (push feeds follow its versions).
    pub fn serving(&self) -> Option<Arc<ServingView>> {
        self.loaded
            .load(Ordering::Acquire)
            .then(|| self.view.clone())
    }

    /// The keys the changelog held a value for when reading began, once all of it is read.
    pub fn held_keys(&self) -> Option<Arc<HeldKeys>> {
        self.held.get().cloned()
    }

    /// Changelog values read that could not be read back.
    pub fn undecodable(&self) -> u64 {
        self.undecodable.load(Ordering::Relaxed)
    }

    /// The view's `as_of` (0 before it answers and after it is let go).
    pub fn as_of(&self) -> Time {
        self.view.as_of()
    }

    /// Stops reading and lets the contents go (the live state has taken over); not before the
    /// view has loaded what the changelog held and taken its keys, which the changelog's
    /// reconciling needs (the reader lets go by itself then, once the live state is ready).
    pub fn release(&self) {
        if !self.keys_taken.load(Ordering::Acquire) || self.thread.request_stop() {
            return;
        }
        self.view.release();
        tracing::info!("live state ready: answers are live from now on");
    }

    /// Stops the reader thread and waits for it.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

impl Reader {
    /// Assigns every partition of the topics that exist, from the cut or the beginning, and
    /// returns each one's reading state. `None` when the broker could not say; the caller tries
    /// again.
    fn begin(&self) -> Option<BTreeMap<(usize, i32), Reading>> {
        // A topic the broker does not list holds nothing from earlier runs: it is not waited for
        // (the changelog's clearing waits for this view's keys). One listed with an error is asked
        // again.
        let asked = Instant::now();
        let md = self.consumers[0]
            .fetch_metadata(None, Duration::from_secs(5))
            .ok()?;
        let metadata = asked.elapsed();
        let mut partitions = [0usize; 2];
        for (i, name) in self.topics.iter().enumerate() {
            if let Some(t) = md.topics().iter().find(|t| t.name() == name) {
                t.error().is_none().then_some(())?;
                partitions[i] = t.partitions().len();
            }
        }
        let start_of = |i: usize, p: i32| self.cut.get(&(self.topics[i].clone(), p)).copied();
        for (i, consumer) in self.consumers.iter().enumerate() {
            let mut tpl = TopicPartitionList::new();
            for p in 0..partitions[i] as i32 {
                let at = start_of(i, p).map_or(Offset::Beginning, Offset::Offset);
                let _ = tpl.add_partition_offset(&self.topics[i], p, at);
            }
            if let Err(e) = consumer.assign(&tpl) {
                tracing::warn!("stale view: cannot read {}: {e}", self.topics[i]);
                return None;
            }
        }
        // The first offset of every partition, for a broker whose fetch answers do not carry it:
        // one request for all of a topic's partitions (the timestamp -2, `Offset::Beginning`,
        // asks for the earliest offset).
        let mut reading = BTreeMap::new();
        let asked = Instant::now();
        for (i, consumer) in self.consumers.iter().enumerate() {
            if partitions[i] == 0 {
                continue;
            }
            let mut ask = TopicPartitionList::new();
            for p in 0..partitions[i] as i32 {
                let _ = ask.add_partition_offset(&self.topics[i], p, Offset::Beginning);
            }
            let earliest = match consumer.offsets_for_times(ask, Duration::from_secs(10)) {
                Ok(tpl) => tpl,
                Err(e) => {
                    tracing::warn!("stale view: no first offsets for {}: {e}", self.topics[i]);
                    return None;
                }
            };
            for e in earliest.elements() {
                let listed_low = match e.offset() {
                    Offset::Offset(low) => low,
                    _ => 0,
                };
                let start = start_of(i, e.partition()).unwrap_or(0).max(listed_low);
                reading.insert((i, e.partition()), Reading::new(start));
            }
        }
        // How long the broker took to answer is worth a line: a slow one delays the view.
        tracing::info!(
            "stale view: reading {} changelog partitions{} (the broker listed them in {:?} and \
             their first offsets in {:?})",
            reading.len(),
            if self.cut.is_empty() {
                ""
            } else {
                " from the checkpoint's cut"
            },
            metadata,
            asked.elapsed()
        );
        Some(reading)
    }
}

impl Decoded {
    /// A record as a view change; `None` when the seeded checkpoint holds it already.
    fn decode(
        &mut self,
        district: bool,
        key: &str,
        m: &BorrowedMessage<'_>,
    ) -> Result<Option<ViewChange>, DecodeError> {
        let index = &self.index;
        let Some(value) = m.payload() else {
            if let Some(records) = &mut self.records {
                records.remove(&(district, key.to_owned()));
            }
            // A tombstone says its time in a header; one without is taken as new.
            let as_of = tombstone_time(m);
            if as_of.is_some_and(|t| t <= self.seeded_at) {
                return Ok(None);
            }
            let time = as_of.unwrap_or(self.newest).max(self.newest);
            return Ok(Some(match district {
                true => ViewChange::District(Change {
                    key: decode_district_key(index, key)?,
                    value: None,
                    time,
                }),
                false => ViewChange::Rider(Change {
                    key: Id::from(key),
                    value: None,
                    time,
                }),
            }));
        };
        let change = match district {
            true => {
                let (counts, time) = decode_district(value)?;
                ViewChange::District(Change {
                    key: decode_district_key(index, key)?,
                    value: Some(counts),
                    time,
                })
            }
            false => {
                let (snapshot, time) = decode_rider(index, value)?;
                ViewChange::Rider(Change {
                    key: Id::from(key),
                    value: Some(Arc::new(snapshot)),
                    time,
                })
            }
        };
        if let Some(records) = &mut self.records {
            let fingerprint = match &change {
                ViewChange::District(c) => c.value.as_ref().map(Fingerprint::fingerprint),
                ViewChange::Rider(c) => c.value.as_ref().map(|s| s.fingerprint()),
            };
            if let Some(fp) = fingerprint {
                records.insert((district, key.to_owned()), fp);
            }
        }
        if change.time() <= self.seeded_at {
            return Ok(None);
        }
        self.newest = self.newest.max(change.time());
        Ok(Some(change))
    }

    /// The keys the view holds a value for, with their values' fingerprints, and those whose
    /// latest record could not be read (always written again).
    fn held_keys(&self, view: &ServingView) -> HeldKeys {
        let (mut districts, mut riders) = match &self.records {
            Some(records) => {
                let held = |district: bool| {
                    records
                        .iter()
                        .filter(|((d, _), _)| *d == district)
                        .map(|((_, key), fp)| HeldKey {
                            key: key.clone(),
                            fingerprint: Some(*fp),
                        })
                        .collect::<Vec<_>>()
                };
                (held(true), held(false))
            }
            None => self.view_keys(view),
        };
        if !self.unreadable.is_empty() {
            for (district, keys) in [(true, &mut districts), (false, &mut riders)] {
                let mut unread: BTreeSet<&String> = self
                    .unreadable
                    .iter()
                    .filter(|(d, _)| *d == district)
                    .map(|(_, k)| k)
                    .collect();
                for held in keys.iter_mut() {
                    if unread.remove(&held.key) {
                        held.fingerprint = None;
                    }
                }
                keys.extend(unread.into_iter().map(|key| HeldKey {
                    key: key.clone(),
                    fingerprint: None,
                }));
            }
        }
        HeldKeys { districts, riders }
    }

    /// The keys the view holds, with their values' fingerprints: what the topics hold when the
    /// view is the checkpoint they reflect plus the records after its cut, or the topics alone.
    fn view_keys(&self, view: &ServingView) -> (Vec<HeldKey>, Vec<HeldKey>) {
        view.entries(
            |d, counts| HeldKey {
                key: self.index.code(d).to_owned(),
                fingerprint: Some(counts.fingerprint()),
            },
            |id, snapshot| HeldKey {
                key: id.to_string(),
                fingerprint: Some(snapshot.fingerprint()),
            },
        )
    }
}

/// The `as_of` header of a tombstone, if it has one.
fn tombstone_time(m: &BorrowedMessage<'_>) -> Option<Time> {
    let headers = m.headers()?;
    let header = headers.iter().find(|h| h.key == AS_OF_HEADER)?;
    std::str::from_utf8(header.value?).ok()?.parse().ok()
}
