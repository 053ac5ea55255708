//! The composition root: the engine wired to Kafka (a [`KafkaSource`] per worker, the topic watch,
//! the producer for dead letters and changelogs), the changelog outputs and their reconciling, the
//! stale view, the checkpoint writer, the marks of a clean stop, and the thread that gives free
//! memory back. `dongflow run` and `dongflow demo` both start one.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use dongflow_connectors::kafka::{
    KafkaConfig, KafkaError, KafkaMetrics, KafkaSource, OutputKind, Producer, TopicSpec, TopicWatch,
};
use dongflow_connectors::source::EventSource;
use thiserror::Error;

use crate::changelog::{
    ChangelogOutputs, ClearingProgress, Handed, HeldKeysSource, KafkaChangelog,
};
use crate::engine::{CheckpointSettings, Engine, EngineConfig, EngineError, Hook};
use crate::memory::GiveBack;
use crate::recovery::{
    mark_published, retract_published, wait_until, CheckpointError, CutSource, Published, Restored,
    WriteReport, WriteStatus, Writer,
};
use crate::report::Chain;
use crate::view::{StaleSource, StaleView};

/// Partitions of output topics the pipeline creates when they are missing.
pub const OUTPUT_PARTITIONS: i32 = 4;

/// Everything a pipeline needs.
#[derive(Clone, Debug)]
pub struct PipelineConfig {
    /// The engine (workers, map, cluster).
    pub engine: EngineConfig,
    /// Brokers, topics, group.
    pub kafka: KafkaConfig,
    /// `--district-changelog-topic`.
    pub district_changelog_topic: String,
    /// `--rider-changelog-topic`.
    pub rider_changelog_topic: String,
    /// Whether to create missing output topics (changelogs, dead letters) once a broker answers.
    /// The embedded broker is started with them instead.
    pub create_outputs: bool,
    /// Where checkpoints go (`None`: no checkpoints).
    pub state_dir: Option<PathBuf>,
    /// Time between checkpoints.
    pub checkpoint_interval: Duration,
    /// The checkpoint to resume from: its state seeds the workers, its offsets the sources.
    pub restore: Option<Arc<Restored>>,
}

/// Why a pipeline could not start.
#[derive(Debug, Error)]
pub enum PipelineError {
    /// A Kafka client could not be made.
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    /// The engine could not start.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The state dir cannot be used.
    #[error("the state dir cannot be used")]
    Checkpoint(#[from] CheckpointError),
}

/// A running pipeline.
pub struct Pipeline {
    engine: Option<Engine>,
    watch: Arc<TopicWatch>,
    producer: Arc<Producer>,
    metrics: Arc<KafkaMetrics>,
    writer: Option<Writer>,
    stale: Arc<StaleView>,
    /// How far the workers have reconciled the changelog with their state.
    reconciled: Arc<ClearingProgress>,
    /// Where a clean stop records that its changelog is complete: the state dir and process, and
    /// the brokers and topics it was published to.
    mark: Option<(PathBuf, usize, Published)>,
    /// Gives the memory the allocator holds free back to the system, while the engine runs.
    _give_back: GiveBack,
}

impl Pipeline {
    /// Starts the workers of this process, reading their share of the input partitions.
    pub fn start(config: PipelineConfig) -> Result<Pipeline, PipelineError> {
        let metrics = Arc::new(KafkaMetrics::default());
        let producer = Arc::new(Producer::new(&config.kafka.brokers, metrics.clone())?);
        let mut outputs = vec![
            TopicSpec::compacted(&config.district_changelog_topic, OUTPUT_PARTITIONS),
            TopicSpec::compacted(&config.rider_changelog_topic, OUTPUT_PARTITIONS),
            TopicSpec::new(&config.kafka.dead_letter_topic, OUTPUT_PARTITIONS),
        ];
        if !config.create_outputs {
            outputs.clear();
        }
        let watch = TopicWatch::start(&config.kafka, outputs, metrics.clone())?;
        let workers = config.engine.workers;
        let (process, processes) = config
            .engine
            .cluster
            .as_ref()
            .map_or((0, 1), |c| (c.process, c.addresses.len()));
        let sources = (0..workers)
            .map(|i| {
                KafkaSource::new(
                    &config.kafka,
                    process * workers + i,
                    processes * workers,
                    watch.clone(),
                    producer.clone(),
                    metrics.clone(),
                )
                .map(|s| match &config.restore {
                    Some(r) => s.resume_from(r.offsets.clone()),
                    None => s,
                })
                .map(|s| Box::new(s) as Box<dyn EventSource>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let writer = match &config.state_dir {
            Some(dir) => Some(Writer::start(dir.clone(), process, processes, workers)?),
            None => None,
        };
        let published_to = Published {
            brokers: config.kafka.brokers.bootstrap().to_owned(),
            district_topic: config.district_changelog_topic.clone(),
            rider_topic: config.rider_changelog_topic.clone(),
            ends: Vec::new(),
        };
        let restore_published = config
            .restore
            .as_ref()
            .is_some_and(|r| changelog_holds(r, &published_to, &producer));
        let mut engine_config = config.engine;
        engine_config.checkpoint = writer.as_ref().map(|w| CheckpointSettings {
            interval: config.checkpoint_interval.as_millis().max(1) as u64,
            parts: w.sender(),
        });
        engine_config.restore = config.restore.clone();
        engine_config.restore_published = restore_published;
        if let Some(dir) = config.state_dir.clone() {
            // From the first record published on, the changelog may hold more than any
            // checkpoint: the marks saying otherwise go before.
            engine_config.before_publishing = Some(Hook(Arc::new(move || retract_marks(&dir))));
        }
        // Filled in once the engine runs; until then the live state is not ready.
        let engine_handle: Arc<std::sync::OnceLock<crate::EngineHandle>> = Arc::default();
        let live = engine_handle.clone();
        let live_ready = move || live.get().is_some_and(crate::EngineHandle::ready);
        // Stale answers while the live state is not ready: the checkpoint and the changelog after
        // its cut, or the changelog alone.
        let stale = StaleView::start(
            StaleSource {
                brokers: config.kafka.brokers.clone(),
                district_topic: config.district_changelog_topic.clone(),
                rider_topic: config.rider_changelog_topic.clone(),
                index: engine_config.districts.clone(),
                restored: config.restore.clone(),
                reconciles: !restore_published,
            },
            live_ready,
        )?;
        // A run that cannot trust the changelog to hold its state reconciles the two once caught
        // up: it needs what the changelog held, which the stale view reads.
        let held = (!restore_published).then(|| {
            let stale = stale.clone();
            HeldKeysSource(Arc::new(move || stale.held_keys()))
        });
        let reconciled = Arc::new(ClearingProgress::default());
        let handed = Arc::new(Handed::default());
        engine_config.outputs = Some(Arc::new(ChangelogOutputs {
            sink: Arc::new(KafkaChangelog {
                producer: producer.clone(),
                district_topic: config.district_changelog_topic.clone(),
                rider_topic: config.rider_changelog_topic.clone(),
            }),
            index: engine_config.districts.clone(),
            held,
            progress: reconciled.clone(),
            handed: handed.clone(),
        }));
        if let Some(writer) = &writer {
            // A checkpoint passes the offsets of bad records: their dead letters must be
            // acknowledged first, or a crash would lose them (the restart reads on after them).
            let dead_letters = producer.clone();
            writer.hold_with(Arc::new(move || {
                let sent = dead_letters.dead_letters_sent();
                let dead_letters = dead_letters.clone();
                Box::new(move || dead_letters.dead_letters_acknowledged(sent))
            }));
            // Each checkpoint records where the changelog reflects it, so that a restart's stale
            // view reads only what came after.
            producer.track_changelog();
            writer.record_cuts(cut_source(
                &producer,
                &metrics,
                &published_to,
                config.restore.as_deref(),
                reconciled.clone(),
                handed,
            ));
        }
        let mark = config
            .state_dir
            .clone()
            .map(|dir| (dir, process, published_to));
        let engine = Engine::start(engine_config, sources)?;
        let _ = engine_handle.set(engine.handle());
        let (handle, outputs) = (engine.handle(), producer.clone());
        Ok(Pipeline {
            engine: Some(engine),
            watch,
            producer,
            metrics,
            writer,
            stale,
            reconciled,
            mark,
            _give_back: GiveBack::start(
                move || handle.caught_up(),
                move || outputs.in_flight() == 0,
            ),
        })
    }

    /// A handle on the engine, for queries and progress.
    pub fn handle(&self) -> crate::EngineHandle {
        self.engine
            .as_ref()
            .expect("the engine runs until stop")
            .handle()
    }

    /// The view that answers (stale) while the live state is not ready.
    pub fn stale_view(&self) -> Arc<StaleView> {
        self.stale.clone()
    }

    /// How far the workers have reconciled the changelog with their state, for `/metrics`.
    pub fn changelog_progress(&self) -> Arc<ClearingProgress> {
        self.reconciled.clone()
    }

    /// The last checkpoint this process wrote.
    pub fn last_checkpoint(&self) -> Option<WriteReport> {
        self.writer.as_ref().and_then(Writer::last)
    }

    /// How this process's checkpoint writes go (`None` without a state dir), for `/metrics`.
    pub fn checkpoint_status(&self) -> Option<WriteStatus> {
        self.writer.as_ref().map(Writer::status)
    }

    /// The Kafka counters and lag, for `/metrics`.
    pub fn kafka_metrics(&self) -> Arc<KafkaMetrics> {
        self.metrics.clone()
    }

    /// The changelog producer's fatal error, if it had one: the process must then stop.
    pub fn producer_failure(&self) -> Option<String> {
        self.producer.fatal_error()
    }

    /// Changelog and dead-letter records sent but not yet acknowledged by the broker.
    pub fn producer_in_flight(&self) -> i32 {
        self.producer.in_flight()
    }

    /// Stops the workers (after a last checkpoint), then waits up to `flush` for the producer to
    /// deliver what they wrote.
    ///
    /// When the workers ended normally, the last checkpoint covers everything they took in, and
    /// every changelog record was acknowledged, that checkpoint is marked as published: a restart
    /// from it then need not publish its state again.
    pub fn stop(mut self, flush: Duration) {
        let (mut clean, mut final_at) = (false, 0);
        if let Some(engine) = self.engine.take() {
            let handle = engine.handle();
            clean = engine.stop();
            final_at = handle.final_checkpoint_at();
        }
        let unreconciled = self.reconciled.uncleared();
        if unreconciled > 0 {
            tracing::warn!(
                "the changelog was not yet reconciled with the state ({unreconciled} worker \
                 topics): a restart reconciles it again"
            );
            clean = false;
        }
        let written = self.writer.take().and_then(Writer::finish);
        self.stale.stop();
        self.watch.stop();
        let left = self.producer.in_flight();
        let flushed = match self.producer.flush(flush) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!("{left} records were still undelivered after {flush:?}: {e}");
                false
            }
        };
        let failed: u64 = [OutputKind::DistrictChangelog, OutputKind::RiderChangelog]
            .iter()
            .map(|k| self.metrics.failed[*k as usize].load(Ordering::Relaxed))
            .sum();
        let Some((dir, process, mut published)) = self.mark.take() else {
            return;
        };
        let Some(report) = written else {
            return;
        };
        // Every input was taken in before the stop's checkpoint time (`final_at`), and the last
        // checkpoint is at or after it: it holds everything the changelog was sent.
        if !(clean && flushed && failed == 0 && final_at > 0 && report.time >= final_at) {
            tracing::info!(
                "checkpoint {} not marked as published (clean stop {clean}, flushed {flushed}, \
                 {failed} changelog records refused): a restart publishes its state again",
                report.time
            );
            return;
        }
        match changelog_ends(&self.producer, &published) {
            Ok(ends) => published.ends = ends,
            Err(e) => {
                tracing::warn!("{}: checkpoint not marked", Chain(&e));
                return;
            }
        }
        match mark_published(&dir, report.time, process, &published) {
            Ok(()) => tracing::info!(
                "checkpoint {}: changelog complete and marked; a restart from it will not publish it again",
                report.time
            ),
            Err(e) => tracing::warn!("cannot mark checkpoint {}: {}", report.time, Chain(&e)),
        }
    }
}

/// How long a checkpoint waits for the changelog records of its time to land before it is written
/// without a cut: a broker that slow makes the next restart read the changelog whole, never a
/// stale view ahead of the changelog.
const LANDING_LIMIT: Duration = Duration::from_secs(5);

/// Where the changelog reflects a checkpoint of a given time, for the checkpoint writer: known
/// once the changelog holds exactly this run's state (a restore published at a clean stop, or a
/// run that has cleared what earlier runs left) from a time at or before the checkpoint's, every
/// changelog record of the checkpoint's time and earlier has landed (handed to the producer by
/// every sink operator, and delivered: a crash cannot lose it any more, so a restart's stale view
/// seeded from the checkpoint is never ahead of the changelog), and no changelog record was
/// refused. A partition this run has not written keeps the restored checkpoint's cut: nothing
/// there changed since.
fn cut_source(
    producer: &Arc<Producer>,
    metrics: &Arc<KafkaMetrics>,
    changelog: &Published,
    restored: Option<&Restored>,
    reconciled: Arc<ClearingProgress>,
    handed: Arc<Handed>,
) -> CutSource {
    let (producer, metrics, changelog) = (producer.clone(), metrics.clone(), changelog.clone());
    let earlier: Vec<(String, i32, i64)> = restored
        .and_then(|r| r.cut.clone())
        .filter(|cut| cut.same_changelog(&changelog))
        .map(|cut| cut.ends)
        .unwrap_or_default();
    Arc::new(move |time| {
        if reconciled.whole_from()? > time {
            return None;
        }
        // Asked before the refusals are counted: a record refused meanwhile is counted below.
        let landed = || handed.through(time) && producer.changelog_landed_through(time);
        if !wait_until(LANDING_LIMIT, landed) {
            tracing::warn!(
                "checkpoint {time}: its changelog records did not land within {LANDING_LIMIT:?}; \
                 written without a cut (a restart reads the changelog whole)"
            );
            return None;
        }
        let refused: u64 = [OutputKind::DistrictChangelog, OutputKind::RiderChangelog]
            .iter()
            .map(|k| metrics.failed[*k as usize].load(Ordering::Relaxed))
            .sum();
        if refused > 0 {
            return None;
        }
        let mut ends = earlier.clone();
        for (kind, partition, offset) in producer.changelog_cut(time) {
            let topic = match kind {
                OutputKind::DistrictChangelog => &changelog.district_topic,
                _ => &changelog.rider_topic,
            };
            match ends.iter_mut().find(|e| (&e.0, e.1) == (topic, partition)) {
                Some(e) => e.2 = offset,
                None => ends.push((topic.clone(), partition, offset)),
            }
        }
        Some(Published {
            ends,
            ..changelog.clone()
        })
    })
}

/// A changelog topic whose end offsets could not be read.
#[derive(Debug, Error)]
#[error("cannot read the end of {topic}")]
struct EndsUnknown {
    topic: String,
    source: KafkaError,
}

/// The end offset of every partition of both changelog topics `of` names; the error says which
/// topic could not be read.
fn changelog_ends(
    producer: &Producer,
    of: &Published,
) -> Result<Vec<(String, i32, i64)>, EndsUnknown> {
    let mut ends = Vec::new();
    for topic in [&of.district_topic, &of.rider_topic] {
        let found = producer
            .end_offsets(topic, Duration::from_secs(5))
            .map_err(|source| EndsUnknown {
                topic: topic.clone(),
                source,
            })?;
        ends.extend(found);
    }
    Ok(ends)
}

/// Whether the changelog holds the state of `restored` as it was published at a clean stop: the
/// same brokers and topics as now, and none of their partitions ended lower than then (a topic
/// deleted and created again). Says why not in the log.
fn changelog_holds(restored: &Restored, now: &Published, producer: &Producer) -> bool {
    let time = restored.time;
    let Some(then) = &restored.published else {
        tracing::info!(
            "checkpoint {time}: no clean stop marked its changelog; the changelog is reconciled with its state once caught up"
        );
        return false;
    };
    if !then.same_changelog(now) {
        tracing::info!(
            "checkpoint {time}: its changelog went to {} ({}, {}), this run's goes to {} ({}, {}); \
             the changelog is reconciled with its state once caught up",
            then.brokers,
            then.district_topic,
            then.rider_topic,
            now.brokers,
            now.district_topic,
            now.rider_topic
        );
        return false;
    }
    let ends = match changelog_ends(producer, now) {
        Ok(ends) => ends,
        Err(e) => {
            tracing::info!(
                "checkpoint {time}: {e}; the changelog is reconciled with its state once caught up"
            );
            return false;
        }
    };
    for (topic, partition, end) in &then.ends {
        let found = ends
            .iter()
            .find(|(t, p, _)| (t, p) == (topic, partition))
            .map(|e| e.2);
        if found.is_none_or(|now| now < *end) {
            tracing::info!(
                "checkpoint {time}: {topic}[{partition}] ended at {end} and now at {found:?} \
                 (recreated?); the changelog is reconciled with its state once caught up"
            );
            return false;
        }
    }
    tracing::info!("checkpoint {time}: the changelog holds its state (marked at a clean stop); not published again");
    true
}

/// Deletes the state dir's changelog marks, saying so.
fn retract_marks(state_dir: &std::path::Path) {
    match retract_published(state_dir) {
        Ok(0) => {}
        Ok(n) => tracing::info!("{n} changelog mark(s) retracted: this run publishes on"),
        Err(e) => tracing::error!(
            "cannot retract a changelog mark ({e}): a restart from that checkpoint would not \
             publish its state again; delete it by hand"
        ),
    }
}
