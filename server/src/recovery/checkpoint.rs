//! Checkpoints in `--state-dir`: the upsert state of every worker at one dataflow time `T` and the
//! input offsets that produced exactly that state.
//!
//! Layout: `checkpoint-<T>/process-<p>-worker-<g>.bin` (bincode of a [`WorkerPart`]) and, written
//! last, `checkpoint-<T>/process-<p>.manifest.json` listing every file of that process with its size
//! and checksum. A checkpoint is complete when the manifests of all its processes are there and every
//! file matches its manifest; anything else is reported and skipped, never trusted. In a cluster whose
//! processes keep their own state dirs, each dir holds only its process's parts: a restart of the same
//! shape restores every process from its own part at the newest time all of them have ([`usable`],
//! agreed in [`super::agree`]). Files are written to a temporary name, synced and renamed. After each
//! write, [`prune`] deletes what is older than the newest complete checkpoint (never that one) and
//! keeps a few newer ones, so disk use stays bounded. Pruning judges completeness by manifests and
//! file sizes and reads no checkpoint back.
//!
//! A clean stop whose changelog records were all acknowledged adds
//! `checkpoint-<T>/process-<p>.published.json` ([`mark_published`]): a restore from `T` then need not
//! publish its state again. Every run deletes the marks before it publishes ([`retract_published`]).

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use dongflow_dataflow::stages::{DeliveryState, RiderRule};
use dongflow_dataflow::types::{DeliveryRow, RiderRow, Time};
use dongflow_dataflow::upsert::StateSnapshot;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::report::Chain;

/// Version of the files' layout this version writes; it reads this one and the earlier ones
/// ([`v1`], [`v2`]), and skips a checkpoint of any other.
const FORMAT: u32 = 3;
/// How many checkpoint directories being written (or other processes' parts) are kept at most.
const KEEP: usize = 2;
/// How many of this process's complete parts are kept beside the newest complete checkpoint.
const KEEP_OWN: usize = 3;

/// One worker's part of a checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WorkerPart {
    /// The dataflow time the state is complete through.
    pub time: Time,
    /// Global worker index (process × workers + local index).
    pub worker: usize,
    /// The rider upsert's state.
    pub riders: StateSnapshot<RiderRow>,
    /// The delivery upsert's state, tombstones included.
    pub deliveries: StateSnapshot<DeliveryState>,
    /// Next offset per `(topic, partition)` this worker reads.
    pub offsets: Vec<(String, i32, i64)>,
    /// How long copying the state paused the worker.
    #[serde(skip)]
    pub pause: Duration,
}

/// A checkpoint loaded for a restart: every worker's parts merged.
#[derive(Clone, Debug, Default)]
pub struct Restored {
    /// The checkpoint's time.
    pub time: Time,
    /// Every rider's state, sorted by id (the writer sorted each part; loading merges them).
    pub riders: StateSnapshot<RiderRow>,
    /// Every delivery's state.
    pub deliveries: StateSnapshot<DeliveryState>,
    /// Next offset per `(topic, partition)`.
    pub offsets: HashMap<(String, i32), i64>,
    /// Where the changelog of every change through `time` was published and acknowledged, when
    /// every process that wrote the checkpoint stopped cleanly at it and no run has published
    /// since (see [`mark_published`]).
    pub published: Option<Published>,
    /// Where the changelog reflects this checkpoint: per changelog partition, an offset before
    /// which every record is of `time` or earlier and the records, latest per key, are exactly the
    /// checkpoint's state; records after it of `time` or earlier are in the checkpoint too (as
    /// Kafka Streams' checkpoint file records its changelog offsets). A partition not listed is
    /// read from its beginning. `None` when a process did not know its cut (its changelog was not
    /// yet cleared of what earlier runs left, say); the changelog is then read whole.
    pub cut: Option<Published>,
    /// Whether this holds only this process's workers' parts (a cluster whose processes keep
    /// their own state dirs): each worker still finds all it owns, but the state is not the whole
    /// cluster's, so it cannot seed a view of every key.
    pub partial: bool,
}

/// The cluster a run is: which checkpoints it can restore depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Shape {
    /// This process.
    pub process: usize,
    /// Processes in the cluster.
    pub processes: usize,
    /// Workers in each process.
    pub workers: usize,
}

/// A checkpoint this process can restore.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Usable {
    /// Its time.
    pub time: Time,
    /// Whether every process's part is in this state dir (a single process, or a shared folder):
    /// then any shape restores it; else only this process's part is, which only a cluster of the
    /// same shape restores, every process from its own part at the same time.
    pub whole: bool,
}

/// A changelog position: these brokers and topics, up to these offsets. As a clean stop's mark,
/// every change through a checkpoint's time acknowledged, the topics then ending at these offsets;
/// as a checkpoint's cut (see [`Restored::cut`]), where the changelog reflects the checkpoint. Kept beside the checkpoint as
/// `process-<p>.published.json`; any run that publishes deletes it first ([`retract_published`]),
/// so it is only ever found when the changelog holds the checkpoint's state and nothing newer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Published {
    /// The brokers' bootstrap list.
    pub brokers: String,
    /// The district changelog topic.
    pub district_topic: String,
    /// The rider changelog topic.
    pub rider_topic: String,
    /// The end offset (high watermark) of every changelog partition once everything was
    /// acknowledged: a topic deleted and created again since has ended lower.
    pub ends: Vec<(String, i32, i64)>,
}

impl Published {
    /// Whether `other` names the same brokers and changelog topics (its ends aside).
    pub fn same_changelog(&self, other: &Published) -> bool {
        (&self.brokers, &self.district_topic, &self.rider_topic)
            == (&other.brokers, &other.district_topic, &other.rider_topic)
    }
}

/// Why a checkpoint cannot be used.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("{path}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A manifest is not what this version writes.
    #[error("{path}: bad manifest: {reason}")]
    Manifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A file does not match its manifest, or does not decode.
    #[error("{path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Not every process of the cluster has written its part.
    #[error("{dir}: only {found} of {expected} processes wrote their part")]
    Incomplete {
        /// The checkpoint directory.
        dir: PathBuf,
        /// Manifests found.
        found: usize,
        /// Processes in the cluster that wrote it.
        expected: usize,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.to_owned(),
        source,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    time: Time,
    process: usize,
    processes: usize,
    files: Vec<FileEntry>,
    /// This process's changelog cut (see [`Restored::cut`]), when it knew one.
    #[serde(default)]
    changelog: Option<Published>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct FileEntry {
    name: String,
    bytes: u64,
    fnv64: String,
}

/// FNV-1a, 64 bits: catches truncation and flipped bytes.
fn checksum(bytes: &[u8]) -> String {
    use std::hash::Hasher;
    let mut h = fnv::FnvHasher::default();
    h.write(bytes);
    format!("{:016x}", h.finish())
}

fn dir_of(state_dir: &Path, time: Time) -> PathBuf {
    state_dir.join(format!("checkpoint-{time:020}"))
}

/// The files of process `process`'s part of checkpoint `time` (name, contents), to give the
/// other processes of its cluster ([`add_parts`]).
pub fn own_files(
    state_dir: &Path,
    time: Time,
    process: usize,
) -> Result<Vec<(String, Vec<u8>)>, CheckpointError> {
    let dir = dir_of(state_dir, time);
    let (dash, dot) = (format!("process-{process}-"), format!("process-{process}."));
    let mut files = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io(&dir))? {
        let path = entry.map_err(io(&dir))?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else {
            continue;
        };
        if (name.starts_with(&dash) || name.starts_with(&dot)) && !name.ends_with(".tmp") {
            files.push((name, fs::read(&path).map_err(io(&path))?));
        }
    }
    Ok(files)
}

/// Adds other processes' parts of checkpoint `time` to this state dir, each file atomically and
/// the manifests and marks last (a part counts once its manifest is there), so that the
/// checkpoint is whole here.
pub fn add_parts(
    state_dir: &Path,
    time: Time,
    files: &[(String, Vec<u8>)],
) -> Result<(), CheckpointError> {
    let dir = dir_of(state_dir, time);
    let (data, last): (Vec<_>, Vec<_>) = files
        .iter()
        // Only names of this layout, never a path elsewhere.
        .filter(|(name, _)| name.starts_with("process-") && !name.contains(['/', '\\']))
        .partition(|(name, _)| !name.ends_with(".json"));
    for (name, bytes) in data.into_iter().chain(last) {
        write_atomic(&dir.join(name), bytes)?;
    }
    sync_dir(&dir);
    Ok(())
}

/// Writes `bytes` to `path` atomically: temporary file, sync, rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

/// What one write took, for logs and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct WriteReport {
    /// The checkpoint's time.
    pub time: Time,
    /// Bytes written by this process.
    pub bytes: u64,
    /// Time to encode and write them.
    pub write: Duration,
    /// The longest pause of a worker while its state was copied.
    pub pause: Duration,
}

/// How this process's checkpoint writes went: the last one written and the writes that failed,
/// for `/metrics`. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct WriteStatus {
    last: std::sync::Arc<std::sync::Mutex<Option<WriteReport>>>,
    failures: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl WriteStatus {
    /// The last checkpoint written.
    pub fn last(&self) -> Option<WriteReport> {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes that failed so far.
    pub fn failures(&self) -> u64 {
        self.failures.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Says, for a checkpoint of a time, where the changelog reflects it (see [`Restored::cut`]);
/// `None` when it cannot.
pub type CutSource = std::sync::Arc<dyn Fn(Time) -> Option<Published> + Send + Sync>;

/// Says whether a checkpoint may be written now; asked again (every 10 ms, up to
/// [`HOLD_LIMIT`]) until it may: a checkpoint must not pass input whose outputs could still be lost
/// (a bad record's dead letter not yet acknowledged).
pub type Hold = std::sync::Arc<dyn Fn() -> Box<dyn Fn() -> bool + Send> + Send + Sync>;

/// How long a checkpoint waits for its [`Hold`] before it is skipped.
const HOLD_LIMIT: Duration = Duration::from_secs(10);

/// Asks `ready` every 10 ms until it says yes or `limit` has passed; says whether it did. For the
/// checkpoint writer's waits on what the checkpoint must not pass (its [`Hold`], its changelog's
/// records), which take a few milliseconds when the broker keeps up.
pub fn wait_until(limit: Duration, ready: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !ready() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Writes this process's parts of checkpoints as the workers hand them over.
pub struct Writer {
    parts: Option<Sender<WorkerPart>>,
    cut: std::sync::Arc<std::sync::OnceLock<CutSource>>,
    hold: std::sync::Arc<std::sync::OnceLock<Hold>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<()>>,
    status: WriteStatus,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").finish_non_exhaustive()
    }
}

impl Writer {
    /// A writer into `state_dir` for process `process` of `processes` with `workers` workers.
    pub fn start(
        state_dir: PathBuf,
        process: usize,
        processes: usize,
        workers: usize,
    ) -> Result<Writer, CheckpointError> {
        fs::create_dir_all(&state_dir).map_err(io(&state_dir))?;
        // Two checkpoints' parts at most: a writer that far behind (a slow disk) makes workers
        // skip a checkpoint (see the engine's `collect_checkpoint`) rather than hold its state.
        let (tx, rx) = crossbeam_channel::bounded(2 * workers);
        let status = WriteStatus::default();
        let report = status.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let cut: std::sync::Arc<std::sync::OnceLock<CutSource>> = Default::default();
        let cuts = cut.clone();
        let hold: std::sync::Arc<std::sync::OnceLock<Hold>> = Default::default();
        let holds = hold.clone();
        let thread = std::thread::Builder::new()
            .name("dongflow-checkpoint".into())
            .spawn(move || {
                // Writing is background work: answers go first.
                crate::priority::yield_to_queries();
                let me = Process {
                    state_dir: &state_dir,
                    process,
                    processes,
                    workers,
                };
                write_loop(&rx, &flag, &me, (&cuts, &holds), &report)
            })
            .map_err(io(Path::new("checkpoint thread")))?;
        Ok(Writer {
            parts: Some(tx),
            cut,
            hold,
            stop,
            thread: Some(thread),
            status,
        })
    }

    /// Writes each checkpoint only once `hold` says it may (see [`Hold`]).
    pub fn hold_with(&self, hold: Hold) {
        let _ = self.hold.set(hold);
    }

    /// Records with each checkpoint where `source` says the changelog reflects it.
    pub fn record_cuts(&self, source: CutSource) {
        let _ = self.cut.set(source);
    }

    /// Where workers send their parts.
    pub fn sender(&self) -> Sender<WorkerPart> {
        self.parts
            .clone()
            .unwrap_or_else(|| crossbeam_channel::bounded(0).0)
    }

    /// The last checkpoint written.
    pub fn last(&self) -> Option<WriteReport> {
        self.status.last()
    }

    /// How the writes go, for `/metrics`.
    pub fn status(&self) -> WriteStatus {
        self.status.clone()
    }

    /// Writes what has been handed over, then stops (call once the workers have stopped).
    pub fn finish(mut self) -> Option<WriteReport> {
        self.parts.take();
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.last()
    }
}

/// Which process's parts a writer writes, and where.
struct Process<'a> {
    state_dir: &'a Path,
    process: usize,
    processes: usize,
    workers: usize,
}

fn write_loop(
    rx: &Receiver<WorkerPart>,
    stop: &std::sync::atomic::AtomicBool,
    me: &Process<'_>,
    (cuts, holds): (&std::sync::OnceLock<CutSource>, &std::sync::OnceLock<Hold>),
    report: &WriteStatus,
) {
    let Process {
        state_dir,
        process,
        processes,
        workers,
    } = *me;
    let mut pending: BTreeMap<Time, Vec<WorkerPart>> = BTreeMap::new();
    loop {
        let part = match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(part) => part,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    return;
                }
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        let time = part.time;
        let parts = pending.entry(time).or_default();
        parts.push(part);
        if parts.len() < workers {
            continue;
        }
        let mut parts = pending.remove(&time).unwrap_or_default();
        // An older time that never completed will not complete any more.
        pending.retain(|t, _| *t > time);
        if let Some(hold) = holds.get() {
            let may = hold();
            if !wait_until(HOLD_LIMIT, may) {
                tracing::warn!(
                    "checkpoint {time} skipped: dead letters of the input it covers were not \
                     acknowledged within {HOLD_LIMIT:?}"
                );
                continue;
            }
        }
        // Asked once every part is here: the changelog has had the longest to catch up.
        let cut = cuts.get().and_then(|source| source(time));
        match write_with_cut(state_dir, process, processes, &mut parts, cut) {
            Ok(r) => {
                tracing::info!(
                    "checkpoint {time} written: {} bytes in {:?}, workers paused at most {:?}",
                    r.bytes,
                    r.write,
                    r.pause
                );
                *report.last.lock().unwrap_or_else(|e| e.into_inner()) = Some(r);
                prune(state_dir, process);
            }
            Err(e) => {
                report
                    .failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!("cannot write checkpoint {time}: {}", Chain(&e));
            }
        }
    }
}

/// Writes one process's parts of the checkpoint at their time, manifest last.
pub fn write(
    state_dir: &Path,
    process: usize,
    processes: usize,
    parts: &mut [WorkerPart],
) -> Result<WriteReport, CheckpointError> {
    write_with_cut(state_dir, process, processes, parts, None)
}

/// [`write`], with where the changelog reflects the checkpoint (see [`Restored::cut`]).
pub fn write_with_cut(
    state_dir: &Path,
    process: usize,
    processes: usize,
    parts: &mut [WorkerPart],
    changelog: Option<Published>,
) -> Result<WriteReport, CheckpointError> {
    let started = Instant::now();
    let time = parts.first().map_or(0, |p| p.time);
    let dir = dir_of(state_dir, time);
    fs::create_dir_all(&dir).map_err(io(&dir))?;
    let mut files = Vec::new();
    let mut total = 0;
    for part in parts.iter_mut() {
        // Sorted here, off the workers, so that a restart merges the parts instead of sorting.
        part.riders.entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let name = format!("process-{process}-worker-{}.bin", part.worker);
        let bytes = bincode::serialize(part).map_err(|e| CheckpointError::Corrupt {
            path: dir.join(&name),
            reason: e.to_string(),
        })?;
        write_atomic(&dir.join(&name), &bytes)?;
        total += bytes.len() as u64;
        files.push(FileEntry {
            name,
            bytes: bytes.len() as u64,
            fnv64: checksum(&bytes),
        });
    }
    let manifest = Manifest {
        format: FORMAT,
        time,
        process,
        processes,
        files,
        changelog,
    };
    let path = dir.join(format!("process-{process}.manifest.json"));
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::Manifest {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&path, &json)?;
    // The renames are durable once the directory itself is synced.
    sync_dir(&dir);
    Ok(WriteReport {
        time,
        bytes: total,
        write: started.elapsed(),
        pause: parts.iter().map(|p| p.pause).max().unwrap_or_default(),
    })
}

/// The suffix of the files that say a checkpoint's changelog was published ([`Published`]).
const PUBLISHED: &str = ".published.json";

/// Records that process `process` stopped cleanly at checkpoint `time` of `state_dir` with every
/// change through it acknowledged as `published` says.
pub fn mark_published(
    state_dir: &Path,
    time: Time,
    process: usize,
    published: &Published,
) -> Result<(), CheckpointError> {
    let dir = dir_of(state_dir, time);
    let path = dir.join(format!("process-{process}{PUBLISHED}"));
    let json = serde_json::to_vec_pretty(published).map_err(|e| CheckpointError::Manifest {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    write_atomic(&path, &json)?;
    sync_dir(&dir);
    Ok(())
}

/// Deletes every changelog mark in `state_dir`: called before a run publishes anything, so that a
/// checkpoint is never taken for published once the changelog may hold something newer.
/// Returns how many were deleted.
pub fn retract_published(state_dir: &Path) -> Result<usize, CheckpointError> {
    let mut deleted = 0;
    for (_, dir) in checkpoints(state_dir) {
        let entries = fs::read_dir(&dir).map_err(io(&dir))?;
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().ends_with(PUBLISHED) {
                let path = entry.path();
                fs::remove_file(&path).map_err(io(&path))?;
                deleted += 1;
            }
        }
        sync_dir(&dir);
    }
    Ok(deleted)
}

/// Makes renames and deletions in `dir` durable.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The checkpoint's changelog marks, one per process, merged: `None` unless every process of
/// `processes` has one and they name the same brokers and topics.
fn load_published(dir: &Path, processes: &[usize]) -> Option<Published> {
    let mut merged: Option<Published> = None;
    for process in processes {
        let path = dir.join(format!("process-{process}{PUBLISHED}"));
        let bytes = fs::read(&path).ok()?;
        let mark: Published = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("{}: unreadable changelog mark: {e}", path.display());
                return None;
            }
        };
        match &mut merged {
            None => merged = Some(mark),
            Some(m) => {
                if !m.same_changelog(&mark) {
                    return None;
                }
                // Each process saw the ends at its own stop: the highest is the end.
                for end in mark.ends {
                    match m.ends.iter_mut().find(|e| (&e.0, e.1) == (&end.0, end.1)) {
                        Some(e) => e.2 = e.2.max(end.2),
                        None => m.ends.push(end),
                    }
                }
            }
        }
    }
    merged
}

/// The processes' changelog cuts as one: a partition's is the lowest any process gave (no process
/// wrote a later time before its own), a partition no process names is read whole; `None` unless
/// every process knew its cut, on the same changelog.
fn merged_cut(manifests: &[Manifest]) -> Option<Published> {
    let mut merged: Option<Published> = None;
    for m in manifests {
        let cut = m.changelog.as_ref()?;
        match &mut merged {
            None => merged = Some(cut.clone()),
            Some(all) => {
                if !all.same_changelog(cut) {
                    return None;
                }
                for end in &cut.ends {
                    match all.ends.iter_mut().find(|e| (&e.0, e.1) == (&end.0, end.1)) {
                        Some(e) => e.2 = e.2.min(end.2),
                        None => all.ends.push(end.clone()),
                    }
                }
            }
        }
    }
    merged
}

/// Checkpoint directories with their times, newest first.
fn checkpoints(state_dir: &Path) -> Vec<(Time, PathBuf)> {
    let Ok(entries) = fs::read_dir(state_dir) else {
        return Vec::new();
    };
    let mut found: Vec<(Time, PathBuf)> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let time = name.strip_prefix("checkpoint-")?.parse().ok()?;
            Some((time, e.path()))
        })
        .collect();
    found.sort_by_key(|(time, _)| std::cmp::Reverse(*time));
    found
}

/// Deletes every checkpoint older than the newest complete one, which is never deleted. Of the newer
/// ones, this process's own complete parts are kept, the newest [`KEEP_OWN`] (in a cluster whose
/// processes keep their own state dirs, a restart restores the newest time that every process
/// still has, so each keeps a few), and of the others (being written, or other processes' parts
/// waiting for their peers) the newest [`KEEP`], so that disk use stays bounded.
fn prune(state_dir: &Path, process: usize) {
    let all = checkpoints(state_dir);
    let newest_complete = all.iter().position(|(_, path)| is_complete(path));
    let (mut own, mut other) = (0, 0);
    for (i, (_, path)) in all.iter().enumerate() {
        let delete = match newest_complete {
            Some(complete) if i > complete => true,
            Some(complete) if i == complete => false,
            _ if own_part_complete(path, process) => {
                own += 1;
                own > KEEP_OWN
            }
            _ => {
                other += 1;
                other > KEEP
            }
        };
        if delete {
            if let Err(e) = fs::remove_dir_all(path) {
                tracing::warn!("cannot delete old checkpoint {}: {e}", path.display());
            }
        }
    }
}

/// Whether this process's part of a checkpoint directory is all there.
fn own_part_complete(dir: &Path, process: usize) -> bool {
    own_manifest(dir, process).is_ok_and(|m| has_files(dir, &m))
}

/// The manifests of one checkpoint directory, with the processes they are of, when there is one
/// for every process of the checkpoint's cluster.
fn complete_manifests(
    dir: &Path,
) -> Result<(Vec<Manifest>, std::collections::BTreeSet<usize>), CheckpointError> {
    let mut manifests = Vec::new();
    for entry in fs::read_dir(dir).map_err(io(dir))?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".manifest.json") {
            manifests.push(read_manifest(&entry.path())?);
        }
    }
    let expected = manifests.first().map_or(1, |m| m.processes);
    let processes: std::collections::BTreeSet<usize> =
        manifests.iter().map(|m| m.process).collect();
    if processes.len() != expected || manifests.iter().any(|m| m.processes != expected) {
        return Err(CheckpointError::Incomplete {
            dir: dir.to_owned(),
            found: processes.len(),
            expected,
        });
    }
    Ok((manifests, processes))
}

/// Whether a checkpoint directory is complete, judged by its manifests and its files' sizes alone
/// (no file is read: pruning after every write must not read the checkpoint back; a restore
/// checks the checksums).
fn is_complete(dir: &Path) -> bool {
    complete_manifests(dir).is_ok_and(|(manifests, _)| manifests.iter().all(|m| has_files(dir, m)))
}

/// Whether every file a manifest lists is there at its size.
fn has_files(dir: &Path, manifest: &Manifest) -> bool {
    manifest
        .files
        .iter()
        .all(|f| fs::metadata(dir.join(&f.name)).is_ok_and(|meta| meta.len() == f.bytes))
}

fn load_dir(dir: &Path) -> Result<Restored, CheckpointError> {
    let (manifests, processes) = complete_manifests(dir)?;
    load_manifests(dir, &manifests, processes.into_iter().collect())
}

/// One process's manifest in a checkpoint directory.
fn own_manifest(dir: &Path, process: usize) -> Result<Manifest, CheckpointError> {
    read_manifest(&dir.join(format!("process-{process}.manifest.json")))
}

/// A manifest of the format this version writes.
fn read_manifest(path: &Path) -> Result<Manifest, CheckpointError> {
    let path = path.to_owned();
    let bytes = fs::read(&path).map_err(io(&path))?;
    let manifest: Manifest =
        serde_json::from_slice(&bytes).map_err(|e| CheckpointError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
    if !(1..=FORMAT).contains(&manifest.format) {
        return Err(CheckpointError::Manifest {
            path,
            reason: format!(
                "format {} (this version reads 1 to {FORMAT})",
                manifest.format
            ),
        });
    }
    Ok(manifest)
}

/// Why this process's own part of a checkpoint does not fit the cluster that runs, if it does not.
fn misfit(manifest: &Manifest, shape: Shape) -> Option<String> {
    let (processes, workers) = (manifest.processes, manifest.files.len());
    (processes != shape.processes || workers != shape.workers).then(|| {
        format!(
            "written by {processes} process(es) × {workers} worker(s), this run is {} × {}: \
             another shape restores only from every process's part in one folder (a shared \
             --state-dir)",
            shape.processes, shape.workers
        )
    })
}

/// The checkpoints in `state_dir` this process of `shape` can restore, newest first. Judged by
/// manifests and file sizes (a restore checks the checksums); each one skipped is logged with why.
pub fn usable(state_dir: &Path, shape: Shape) -> Vec<Usable> {
    let mut found = Vec::new();
    for (time, dir) in checkpoints(state_dir) {
        if is_complete(&dir) {
            found.push(Usable { time, whole: true });
            continue;
        }
        if shape.processes == 1 {
            tracing::info!(
                "checkpoint {time} skipped: not every process's part is in {}",
                dir.display()
            );
            continue;
        }
        let why_not = match own_manifest(&dir, shape.process) {
            Err(e) => Some(Chain(&e).to_string()),
            Ok(m) => misfit(&m, shape).or_else(|| {
                (!has_files(&dir, &m)).then(|| "a file is missing or short".to_owned())
            }),
        };
        match why_not {
            None => found.push(Usable { time, whole: false }),
            Some(why) => tracing::info!("checkpoint {time} skipped: {why}"),
        }
    }
    found
}

/// Loads the checkpoint `which` of `state_dir`: every part when it is whole, else this process's.
pub fn load(state_dir: &Path, which: Usable, shape: Shape) -> Result<Restored, CheckpointError> {
    let dir = dir_of(state_dir, which.time);
    if which.whole {
        return load_dir(&dir);
    }
    let manifest = own_manifest(&dir, shape.process)?;
    let mut restored = load_manifests(&dir, std::slice::from_ref(&manifest), vec![shape.process])?;
    restored.partial = true;
    // The process's own cut covers only the changelog partitions its workers wrote.
    restored.cut = None;
    Ok(restored)
}

/// Loads the parts the manifests of `processes` list.
fn load_manifests(
    dir: &Path,
    manifests: &[Manifest],
    processes: Vec<usize>,
) -> Result<Restored, CheckpointError> {
    let mut restored = Restored {
        time: manifests[0].time,
        ..Restored::default()
    };
    let files: Vec<(&FileEntry, u32)> = manifests
        .iter()
        .flat_map(|m| m.files.iter().map(|file| (file, m.format)))
        .collect();
    // Each file is read, checked and decoded on a thread of its own: a restart answers sooner.
    let parts: Vec<Result<WorkerPart, CheckpointError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = files
            .iter()
            .map(|&(file, format)| scope.spawn(move || load_part(dir, file, format, restored.time)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    });
    for part in parts {
        let part = part?;
        restored.riders.absorb(part.riders);
        restored.deliveries.absorb(part.deliveries);
        for (topic, partition, offset) in part.offsets {
            let next = restored.offsets.entry((topic, partition)).or_insert(offset);
            *next = (*next).max(offset);
        }
    }
    // Each part is sorted: the stable sort merges their runs.
    restored.riders.entries.sort_by(|a, b| a.0.cmp(&b.0));
    restored.riders.time = restored.time;
    restored.deliveries.time = restored.time;
    restored.published = load_published(dir, &processes);
    restored.cut = match &restored.published {
        // Everything through the checkpoint was acknowledged and nothing later sent.
        Some(published) => Some(published.clone()),
        None => merged_cut(manifests),
    };
    Ok(restored)
}

/// Reads, checks and decodes one file, of layout `format`, of a checkpoint of time `time`.
fn load_part(
    dir: &Path,
    file: &FileEntry,
    format: u32,
    time: Time,
) -> Result<WorkerPart, CheckpointError> {
    let path = dir.join(&file.name);
    let bytes = fs::read(&path).map_err(io(&path))?;
    if bytes.len() as u64 != file.bytes || checksum(&bytes) != file.fnv64 {
        return Err(CheckpointError::Corrupt {
            path,
            reason: format!(
                "{} bytes with checksum {}, the manifest says {} bytes with {}",
                bytes.len(),
                checksum(&bytes),
                file.bytes,
                file.fnv64
            ),
        });
    }
    let decoded = match format {
        1 => bincode::deserialize::<v1::WorkerPart>(&bytes).map(WorkerPart::from),
        2 => bincode::deserialize::<v2::WorkerPart>(&bytes).map(WorkerPart::from),
        _ => bincode::deserialize::<WorkerPart>(&bytes),
    };
    let part = decoded.map_err(|e| CheckpointError::Corrupt {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    if part.time != time {
        return Err(CheckpointError::Corrupt {
            path,
            reason: format!("time {} in a checkpoint of {time}", part.time),
        });
    }
    Ok(part)
}

/// Says which checkpoint a restart restores, and what it holds.
pub fn log_restoring(r: &Restored) {
    tracing::info!(
        "restoring checkpoint {}{}: {} riders, {} deliveries, {} partition offsets ({} records \
         before them){}",
        r.time,
        if r.partial {
            " (this process's part)"
        } else {
            ""
        },
        r.riders.entries.len(),
        r.deliveries.entries.len(),
        r.offsets.len(),
        r.offsets.values().sum::<i64>(),
        if r.published.is_some() {
            "; written at a clean stop with its changelog published"
        } else {
            ""
        }
    );
}

/// The newest complete checkpoint in `state_dir`; unusable ones are logged and skipped.
pub fn load_latest(state_dir: &Path) -> Option<Restored> {
    for (time, dir) in checkpoints(state_dir) {
        match load_dir(&dir) {
            Ok(r) => {
                log_restoring(&r);
                return Some(r);
            }
            Err(e) => tracing::warn!("skipping checkpoint {time}: {}", Chain(&e)),
        }
    }
    None
}

/// The layout of format 2: every delivery row with its type, pickup and drop-off points, which
/// no answer shows (format 3 keeps only the pickup's district).
mod v2 {
    use dongflow_dataflow::types::{RiderRow, Time};
    use dongflow_dataflow::upsert::StateSnapshot;
    use dongflow_records::{Coord, DeliveryStatus, Id, Label, Millis};
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct DeliveryRow {
        pub(super) status: DeliveryStatus,
        pub(super) delivery_type: Option<Label>,
        pub(super) pickup: Option<Coord>,
        #[serde(with = "dongflow_dataflow::districts::wire")]
        pub(super) pickup_district: dongflow_dataflow::districts::DistrictId,
        pub(super) dropoff: Option<Coord>,
        pub(super) rider_id: Option<Id>,
        pub(super) vehicle: Option<Label>,
        pub(super) ts: Millis,
    }

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) enum DeliveryState {
        Live(DeliveryRow),
        Ended { ts: Millis },
    }

    /// A worker's part in formats 1 and 2, of their layouts of the riders' and deliveries' states.
    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct Part<R, D> {
        pub(super) time: Time,
        pub(super) worker: usize,
        pub(super) riders: R,
        pub(super) deliveries: D,
        pub(super) offsets: Vec<(String, i32, i64)>,
    }

    pub(super) type WorkerPart = Part<StateSnapshot<RiderRow>, StateSnapshot<DeliveryState>>;
}

impl From<v2::DeliveryState> for DeliveryState {
    fn from(state: v2::DeliveryState) -> Self {
        match state {
            v2::DeliveryState::Live(row) => DeliveryState::Live(DeliveryRow {
                status: row.status,
                pickup_district: row.pickup_district,
                rider_id: row.rider_id.into(),
                vehicle: row.vehicle,
                ts: row.ts,
            }),
            v2::DeliveryState::Ended { ts } => DeliveryState::Ended { ts },
        }
    }
}

impl From<v2::WorkerPart> for WorkerPart {
    fn from(part: v2::WorkerPart) -> Self {
        Self {
            time: part.time,
            worker: part.worker,
            riders: part.riders,
            deliveries: part.deliveries.map_states(DeliveryState::from),
            offsets: part.offsets,
            pause: Duration::ZERO,
        }
    }
}

/// The layout of format 1, as earlier versions wrote it: no idle riders apart and no horizon of
/// forgotten ones, and the delivery rows of format 2.
mod v1 {
    use super::v2::DeliveryState;
    use dongflow_dataflow::types::{RiderRow, Time};
    use dongflow_records::Id;
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Serialize, Deserialize)]
    pub(super) struct StateSnapshot<S> {
        pub(super) time: Time,
        pub(super) entries: Vec<(Id, S)>,
        pub(super) expiry: Vec<(Time, Id)>,
    }

    pub(super) type WorkerPart =
        super::v2::Part<StateSnapshot<RiderRow>, StateSnapshot<DeliveryState>>;
}

impl From<v1::WorkerPart> for WorkerPart {
    /// Each rider off shift counts as idle since the checkpoint's time: forgotten late, never
    /// early.
    fn from(part: v1::WorkerPart) -> Self {
        let idle = part
            .riders
            .entries
            .iter()
            .filter(|(_, row)| RiderRule::idle_row(row).is_some())
            .map(|(id, _)| (part.time, id.clone()))
            .collect();
        Self {
            time: part.time,
            worker: part.worker,
            riders: StateSnapshot {
                idle,
                ..part.riders.into()
            },
            deliveries: StateSnapshot::from(part.deliveries).map_states(DeliveryState::from),
            offsets: part.offsets,
            pause: Duration::ZERO,
        }
    }
}

impl<S> From<v1::StateSnapshot<S>> for StateSnapshot<S> {
    fn from(s: v1::StateSnapshot<S>) -> Self {
        Self {
            time: s.time,
            entries: s.entries,
            expiry: s.expiry,
            idle: Vec::new(),
            forgotten_through: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_is_fnv_1a_64_as_manifests_on_disk_name_it() {
        // The published FNV-1a test vectors: checkpoints written before still check.
        assert_eq!(checksum(b""), "cbf29ce484222325");
        assert_eq!(checksum(b"a"), "af63dc4c8601ec8c");
        assert_eq!(checksum(b"foobar"), "85944171f73967e8");
    }

    fn part(time: Time, worker: usize, offset: i64) -> WorkerPart {
        WorkerPart {
            time,
            worker,
            riders: StateSnapshot::default(),
            deliveries: StateSnapshot::default(),
            offsets: vec![("rider-events".into(), worker as i32, offset)],
            pause: Duration::ZERO,
        }
    }

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dongflow-ckpt-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn written(dir: &Path, time: Time) -> PathBuf {
        write(
            dir,
            0,
            1,
            &mut [part(time, 0, time as i64), part(time, 1, time as i64 + 1)],
        )
        .expect("written");
        dir_of(dir, time)
    }

    #[test]
    fn the_newest_complete_checkpoint_is_loaded_with_every_part() {
        let dir = temp("newest");
        written(&dir, 100);
        written(&dir, 200);
        let r = load_latest(&dir).expect("a checkpoint");
        assert_eq!(r.time, 200);
        assert_eq!(r.offsets.get(&("rider-events".to_string(), 1)), Some(&201));
        assert_eq!(r.offsets.len(), 2);
    }

    /// Cuts a file to half its length, as a crash in the middle of a write would.
    fn truncate(file: &Path) {
        let bytes = fs::read(file).expect("read");
        fs::write(file, &bytes[..bytes.len() / 2]).expect("truncate");
    }

    #[test]
    fn a_truncated_file_is_skipped_for_the_previous_checkpoint() {
        let dir = temp("truncated");
        written(&dir, 100);
        let newest = written(&dir, 200);
        truncate(&newest.join("process-0-worker-1.bin"));
        let error = load_dir(&newest).expect_err("truncated");
        assert!(error.to_string().contains("the manifest says"), "{error}");
        assert_eq!(load_latest(&dir).map(|r| r.time), Some(100));
    }

    #[test]
    fn a_bad_manifest_is_skipped_for_the_previous_checkpoint() {
        let dir = temp("manifest");
        written(&dir, 100);
        let newest = written(&dir, 200);
        fs::write(
            newest.join("process-0.manifest.json"),
            b"{\"format\": 1, \"time\": ",
        )
        .expect("w");
        let error = load_dir(&newest).expect_err("bad manifest");
        assert!(error.to_string().contains("bad manifest"), "{error}");
        assert_eq!(load_latest(&dir).map(|r| r.time), Some(100));
    }

    #[test]
    fn a_checkpoint_missing_a_process_is_incomplete() {
        let dir = temp("incomplete");
        write(&dir, 1, 2, &mut [part(300, 2, 5)]).expect("written");
        let error = load_dir(&dir_of(&dir, 300)).expect_err("incomplete");
        assert!(
            error.to_string().contains("only 1 of 2 processes"),
            "{error}"
        );
        assert!(load_latest(&dir).is_none());
    }

    #[test]
    fn the_riders_of_every_part_are_loaded_sorted_by_id() {
        let dir = temp("sorted");
        let row = |ts| RiderRow {
            status: dongflow_connectors::RiderStatus::OnShift,
            rider_type: None,
            location: None.into(),
            district: 0,
            ts,
        };
        let with_riders = |worker, ids: &[&str]| {
            let mut p = part(400, worker, 1);
            p.riders.entries = ids.iter().map(|id| ((*id).into(), row(1))).collect();
            p
        };
        let mut parts = [
            with_riders(0, &["r-9", "r-1", "r-30"]),
            with_riders(1, &["r-5", "r-10", "r-2"]),
        ];
        write(&dir, 0, 1, &mut parts).expect("written");
        let r = load_latest(&dir).expect("a checkpoint");
        let ids: Vec<&str> = r.riders.entries.iter().map(|(id, _)| id.as_str()).collect();
        assert_eq!(ids, ["r-1", "r-10", "r-2", "r-30", "r-5", "r-9"]);
    }

    fn mark(topic: &str, end: i64) -> Published {
        Published {
            brokers: "127.0.0.1:9092".into(),
            district_topic: "district-changelog".into(),
            rider_topic: topic.into(),
            ends: vec![(topic.into(), 0, end)],
        }
    }

    #[test]
    fn a_changelog_mark_is_loaded_with_its_checkpoint_until_retracted() {
        let dir = temp("published");
        written(&dir, 100);
        written(&dir, 200);
        assert_eq!(load_latest(&dir).and_then(|r| r.published), None);
        mark_published(&dir, 200, 0, &mark("rider-changelog", 7)).expect("marked");
        let r = load_latest(&dir).expect("a checkpoint");
        assert_eq!(r.published, Some(mark("rider-changelog", 7)));
        assert_eq!(retract_published(&dir).expect("retracted"), 1);
        assert_eq!(load_latest(&dir).and_then(|r| r.published), None);
        assert_eq!(retract_published(&dir).expect("nothing left"), 0);
    }

    #[test]
    fn a_cluster_checkpoint_is_published_only_when_every_process_says_so() {
        let dir = temp("published-cluster");
        write(&dir, 0, 2, &mut [part(300, 0, 5)]).expect("written");
        write(&dir, 1, 2, &mut [part(300, 1, 6)]).expect("written");
        mark_published(&dir, 300, 0, &mark("rider-changelog", 7)).expect("marked");
        assert_eq!(load_latest(&dir).and_then(|r| r.published), None);
        // Processes that published to different topics: not one changelog.
        mark_published(&dir, 300, 1, &mark("other-changelog", 9)).expect("marked");
        assert_eq!(load_latest(&dir).and_then(|r| r.published), None);
        mark_published(&dir, 300, 1, &mark("rider-changelog", 9)).expect("marked");
        let published = load_latest(&dir).and_then(|r| r.published);
        assert_eq!(
            published,
            Some(mark("rider-changelog", 9)),
            "the highest end"
        );
    }

    #[test]
    fn a_cluster_checkpoint_has_a_cut_when_every_process_knew_one_the_lowest_per_partition() {
        let dir = temp("cut");
        let cut = |offsets: &[(i32, i64)]| Published {
            ends: offsets
                .iter()
                .map(|(p, o)| ("rider-changelog".to_owned(), *p, *o))
                .collect(),
            ..mark("rider-changelog", 0)
        };
        write_with_cut(
            &dir,
            0,
            2,
            &mut [part(300, 0, 5)],
            Some(cut(&[(0, 10), (1, 4)])),
        )
        .expect("written");
        write_with_cut(&dir, 1, 2, &mut [part(300, 1, 6)], None).expect("written");
        assert_eq!(
            load_latest(&dir).and_then(|r| r.cut),
            None,
            "one process knew none"
        );
        write_with_cut(
            &dir,
            0,
            2,
            &mut [part(400, 0, 5)],
            Some(cut(&[(0, 10), (1, 4)])),
        )
        .expect("written");
        write_with_cut(
            &dir,
            1,
            2,
            &mut [part(400, 1, 6)],
            Some(cut(&[(0, 8), (2, 3)])),
        )
        .expect("written");
        let merged = load_latest(&dir).and_then(|r| r.cut).expect("a cut");
        let mut ends = merged.ends.clone();
        ends.sort();
        assert_eq!(
            ends,
            [
                ("rider-changelog".to_owned(), 0, 8),
                ("rider-changelog".to_owned(), 1, 4),
                ("rider-changelog".to_owned(), 2, 3)
            ]
        );
        // A clean stop's mark is the cut: everything through the checkpoint acknowledged.
        mark_published(&dir, 400, 0, &mark("rider-changelog", 20)).expect("marked");
        mark_published(&dir, 400, 1, &mark("rider-changelog", 21)).expect("marked");
        let r = load_latest(&dir).expect("a checkpoint");
        assert_eq!(r.cut, Some(mark("rider-changelog", 21)));
    }

    #[test]
    fn old_checkpoints_are_deleted_once_a_newer_one_is_complete() {
        let dir = temp("prune");
        for t in [100, 200, 300] {
            written(&dir, t);
            prune(&dir, 0);
        }
        let left: Vec<Time> = checkpoints(&dir).into_iter().map(|(t, _)| t).collect();
        assert_eq!(left, vec![300]);
    }

    #[test]
    fn the_newest_complete_checkpoint_is_never_deleted() {
        // Complete at 100; later ones each lack process 1's manifest (a cluster whose other
        // process writes elsewhere, or has not written yet): 100 stays, with this process's
        // newest three parts after it, and of process 1's parts alone the newest two.
        let dir = temp("prune-keep-complete");
        written(&dir, 100);
        for t in [200, 300, 400, 500] {
            write(&dir, 0, 2, &mut [part(t, 0, 7)]).expect("written");
            prune(&dir, 0);
        }
        let left: Vec<Time> = checkpoints(&dir).into_iter().map(|(t, _)| t).collect();
        assert_eq!(left, vec![500, 400, 300, 100]);
        for t in [600, 700, 800] {
            write(&dir, 1, 2, &mut [part(t, 1, 7)]).expect("written");
            prune(&dir, 0);
        }
        let left: Vec<Time> = checkpoints(&dir).into_iter().map(|(t, _)| t).collect();
        assert_eq!(left, vec![800, 700, 500, 400, 300, 100]);
        assert_eq!(load_latest(&dir).map(|r| r.time), Some(100));
    }

    #[test]
    fn a_file_of_the_wrong_size_makes_a_checkpoint_incomplete_for_pruning() {
        let dir = temp("prune-size");
        written(&dir, 100);
        let newer = written(&dir, 200);
        truncate(&newer.join("process-0-worker-1.bin"));
        prune(&dir, 0);
        let left: Vec<Time> = checkpoints(&dir).into_iter().map(|(t, _)| t).collect();
        assert_eq!(left, vec![200, 100], "100 is the newest complete one");
    }

    /// A part of one rider for worker `worker` at `time`.
    fn rider_part(time: Time, worker: usize, id: &str) -> WorkerPart {
        let mut p = part(time, worker, worker as i64 + 10);
        let row = RiderRow {
            status: dongflow_connectors::RiderStatus::OnShift,
            rider_type: None,
            location: None.into(),
            district: 0,
            ts: 1,
        };
        p.riders.entries.push((id.into(), row));
        p
    }

    /// A delivery state as formats 1 and 2 held it, with a type and points that the current
    /// format does not keep.
    fn as_before(state: DeliveryState) -> v2::DeliveryState {
        match state {
            DeliveryState::Live(row) => v2::DeliveryState::Live(v2::DeliveryRow {
                status: row.status,
                delivery_type: Some("FOOD".into()),
                pickup: Some(dongflow_connectors::Coord {
                    lat: 37.5,
                    lon: 127.0,
                }),
                pickup_district: row.pickup_district,
                dropoff: Some(dongflow_connectors::Coord {
                    lat: 37.6,
                    lon: 127.1,
                }),
                rider_id: row.rider_id.into(),
                vehicle: row.vehicle,
                ts: row.ts,
            }),
            DeliveryState::Ended { ts } => v2::DeliveryState::Ended { ts },
        }
    }

    /// Rewrites the checkpoint of `time` in `dir` in format 1 or 2, as earlier versions wrote it.
    fn as_format(dir: &Path, time: Time, format: u32) {
        let ckpt = dir_of(dir, time);
        let path = ckpt.join("process-0.manifest.json");
        let mut manifest: Manifest =
            serde_json::from_slice(&fs::read(&path).expect("read")).expect("manifest");
        manifest.format = format;
        for file in &mut manifest.files {
            let at = ckpt.join(&file.name);
            let part: WorkerPart =
                bincode::deserialize(&fs::read(&at).expect("read")).expect("part");
            let deliveries = part.deliveries.map_states(as_before);
            fn earlier<S>(s: StateSnapshot<S>) -> v1::StateSnapshot<S> {
                v1::StateSnapshot {
                    time: s.time,
                    entries: s.entries,
                    expiry: s.expiry,
                }
            }
            let bytes = match format {
                1 => bincode::serialize(&v1::WorkerPart {
                    time: part.time,
                    worker: part.worker,
                    riders: earlier(part.riders),
                    deliveries: earlier(deliveries),
                    offsets: part.offsets,
                }),
                _ => bincode::serialize(&v2::WorkerPart {
                    time: part.time,
                    worker: part.worker,
                    riders: part.riders,
                    deliveries,
                    offsets: part.offsets,
                }),
            }
            .expect("encoded");
            fs::write(&at, &bytes).expect("write");
            file.bytes = bytes.len() as u64;
            file.fnv64 = checksum(&bytes);
        }
        fs::write(&path, serde_json::to_vec(&manifest).expect("json")).expect("write");
    }

    /// A live delivery and an ended one, as a worker's part holds them.
    fn with_deliveries(mut part: WorkerPart) -> WorkerPart {
        let live = DeliveryRow {
            status: dongflow_connectors::DeliveryStatus::Assigned,
            pickup_district: 3,
            rider_id: Some("r-1".into()).into(),
            vehicle: Some("BIKE".into()),
            ts: 9,
        };
        part.deliveries.entries = vec![
            ("d-1".into(), DeliveryState::Live(live)),
            ("d-2".into(), DeliveryState::Ended { ts: 8 }),
        ];
        part.deliveries.expiry = vec![(1_000, "d-2".into())];
        part
    }

    /// A checkpoint of format 2 (delivery rows with their type and points) restores the same
    /// deliveries as the current format, without what no answer shows.
    #[test]
    fn a_checkpoint_of_format_2_restores_its_deliveries() {
        let dir = temp("format-2");
        let parts = [with_deliveries(rider_part(100, 0, "r-1"))];
        write(&dir, 0, 1, &mut parts.clone()).expect("written");
        let current = load_latest(&dir).expect("restores");
        as_format(&dir, 100, 2);
        let r = load_latest(&dir).expect("format 2 restores");
        assert_eq!(r.deliveries.entries, current.deliveries.entries);
        assert_eq!(r.deliveries.expiry, current.deliveries.expiry);
        assert_eq!(r.riders.entries, current.riders.entries);
        assert_eq!(r.deliveries.entries, parts[0].deliveries.entries);
    }

    /// Idle riders and the horizon of forgotten ones are kept; a checkpoint of format 1 (written
    /// before they were) still restores, its riders off shift idle since its time.
    #[test]
    fn idle_riders_are_kept_and_a_checkpoint_of_format_1_still_restores() {
        let dir = temp("format-1");
        let parts = || {
            let mut parts = [
                with_deliveries(rider_part(100, 0, "r-1")),
                rider_part(100, 1, "r-2"),
            ];
            parts[1].riders.entries[0].1.status = dongflow_connectors::RiderStatus::ShiftEnded;
            parts[1].riders.idle.push((60, "r-2".into()));
            parts[1].riders.forgotten_through = 7;
            parts
        };
        write(&dir, 0, 1, &mut parts()).expect("written");
        let r = load_latest(&dir).expect("restores");
        assert_eq!(
            (r.riders.idle.clone(), r.riders.forgotten_through),
            (vec![(60, "r-2".into())], 7)
        );
        let deliveries = load_latest(&dir).expect("restores").deliveries.entries;
        as_format(&dir, 100, 1);
        let r = load_latest(&dir).expect("format 1 restores");
        assert_eq!(r.riders.entries.len(), 2);
        assert_eq!(r.deliveries.entries, deliveries);
        assert_eq!(
            (r.riders.idle.clone(), r.riders.forgotten_through),
            (vec![(100, "r-2".into())], 0)
        );
        // A format this version does not know is skipped, saying why.
        let path = dir_of(&dir, 100).join("process-0.manifest.json");
        let text = String::from_utf8(fs::read(&path).expect("read")).expect("utf-8");
        fs::write(&path, text.replace("\"format\":1", "\"format\":4")).expect("write");
        let error = load_dir(&dir_of(&dir, 100)).expect_err("format 4");
        assert!(
            error
                .to_string()
                .contains("format 4 (this version reads 1 to 3)"),
            "{error}"
        );
    }

    #[test]
    fn each_process_of_a_cluster_restores_its_own_part_from_its_own_dir() {
        let (a, b) = (temp("own-a"), temp("own-b"));
        let shape = |process| Shape {
            process,
            processes: 2,
            workers: 1,
        };
        for t in [100, 200] {
            write(&a, 0, 2, &mut [rider_part(t, 0, "r0")]).expect("written");
            write(&b, 1, 2, &mut [rider_part(t, 1, "r1")]).expect("written");
        }
        let usable_a = usable(&a, shape(0));
        assert_eq!(
            usable_a,
            [200, 100].map(|time| Usable { time, whole: false })
        );
        let restored = load(&a, usable_a[0], shape(0)).expect("loads");
        assert!(restored.partial);
        assert_eq!(
            restored.cut, None,
            "a process's own cut is not the changelog's"
        );
        assert_eq!(restored.time, 200);
        let ids: Vec<&str> = restored
            .riders
            .entries
            .iter()
            .map(|e| e.0.as_str())
            .collect();
        assert_eq!(ids, ["r0"]);
        assert_eq!(restored.offsets.get(&("rider-events".into(), 0)), Some(&10));
        // Process 1 restores only from its own dir's parts.
        assert!(usable(&a, shape(1)).is_empty());
        // Another shape cannot use a part alone; a single process cannot either.
        let wider = Shape {
            workers: 2,
            ..shape(0)
        };
        assert!(usable(&a, wider).is_empty());
        let single = Shape {
            process: 0,
            processes: 1,
            workers: 2,
        };
        assert!(usable(&a, single).is_empty());
        // Both parts in one folder make it whole: any shape restores it.
        write(&a, 1, 2, &mut [rider_part(200, 1, "r1")]).expect("written");
        assert_eq!(
            usable(&a, single)[0],
            Usable {
                time: 200,
                whole: true
            }
        );
        let whole = load(
            &a,
            Usable {
                time: 200,
                whole: true,
            },
            single,
        )
        .expect("loads");
        assert!(!whole.partial);
        assert_eq!(whole.riders.entries.len(), 2);
    }
}
