//! The engine wired to Kafka: a [`KafkaSource`] per worker, the topic watch, the producer for dead
//! letters and changelogs. `dongflow run` and `dongflow demo` both start one.

use std::sync::Arc;
use std::time::Duration;

use dongflow_connectors::kafka::{
    KafkaConfig, KafkaError, KafkaMetrics, KafkaSource, Producer, TopicSpec, TopicWatch,
};
use dongflow_connectors::source::EventSource;
use thiserror::Error;

use crate::changelog::KafkaChangelog;
use crate::engine::{Engine, EngineConfig, EngineError};

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
}

/// Why a pipeline could not start.
#[derive(Debug, Error)]
pub enum PipelineError {
    /// A Kafka client could not be made.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The engine could not start.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
}

/// A running pipeline. It dereferences to its [`Engine`].
pub struct Pipeline {
    engine: Option<Engine>,
    watch: Arc<TopicWatch>,
    producer: Arc<Producer>,
    metrics: Arc<KafkaMetrics>,
}

impl std::ops::Deref for Pipeline {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        self.engine.as_ref().expect("the engine runs until stop")
    }
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
                .map(|s| Box::new(s) as Box<dyn EventSource>)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut engine_config = config.engine;
        engine_config.changelog = Some(Arc::new(KafkaChangelog {
            producer: producer.clone(),
            district_topic: config.district_changelog_topic,
            rider_topic: config.rider_changelog_topic,
        }));
        let engine = Engine::start(engine_config, sources)?;
        Ok(Pipeline {
            engine: Some(engine),
            watch,
            producer,
            metrics,
        })
    }

    /// The Kafka counters and lag, for `/metrics`.
    pub fn kafka_metrics(&self) -> Arc<KafkaMetrics> {
        self.metrics.clone()
    }

    /// Changelog and dead-letter records sent but not yet acknowledged by the broker.
    pub fn producer_in_flight(&self) -> i32 {
        self.producer.in_flight()
    }

    /// Stops the workers, then waits up to `flush` for the producer to deliver what they wrote.
    pub fn stop(mut self, flush: Duration) {
        if let Some(engine) = self.engine.take() {
            engine.stop();
        }
        self.watch.stop();
        let left = self.producer.in_flight();
        if let Err(e) = self.producer.flush(flush) {
            tracing::error!("{left} records were still undelivered after {flush:?}: {e}");
        }
    }
}
