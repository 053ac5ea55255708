//! One thread per process that asks the brokers about the input topics, so that no worker ever
//! blocks on metadata: partition counts (topics that appear later, partitions added), the end
//! offsets seen at start (for readiness), end offsets for lag, and creation of missing output topics.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

use super::quiet::Quiet;
use super::{
    create_topics, Background, ClientSettings, Input, KafkaConfig, KafkaError, KafkaMetrics,
    TopicSpec,
};

/// How often the brokers are asked.
const PERIOD: Duration = Duration::from_secs(1);
/// How long one metadata or offsets request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the watch knows about the input topics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Topology {
    /// Partitions per input ([`Input`] index); 0 while a topic does not exist.
    pub partitions: [i32; 2],
    /// `(start, end)` offsets of each partition that existed at the first answer from a broker.
    pub at_start: HashMap<(Input, i32), (i64, i64)>,
    /// Whether a broker has answered at all.
    pub reached: bool,
}

/// The watch. Sources read it through [`TopicWatch::generation`] (cheap) and
/// [`TopicWatch::topology`] (when the generation changed).
#[derive(Debug)]
pub struct TopicWatch {
    topology: Mutex<Topology>,
    generation: AtomicU64,
    thread: Background,
}

impl TopicWatch {
    /// Starts watching the inputs of `config`, creating the `outputs` topics once a broker answers.
    pub fn start(
        config: &KafkaConfig,
        outputs: Vec<TopicSpec>,
        metrics: Arc<KafkaMetrics>,
    ) -> Result<Arc<Self>, KafkaError> {
        let consumer: BaseConsumer<Quiet> = config
            .brokers
            // Metadata only: this client never joins a group or reads records.
            .configure(ClientConfig::new().set("enable.auto.commit", "false"))
            .create_with_context(Quiet::default())?;
        let watch = Arc::new(TopicWatch {
            topology: Mutex::new(Topology::default()),
            generation: AtomicU64::new(0),
            thread: Background::default(),
        });
        let mut looker = Looker {
            consumer,
            brokers: config.brokers.clone(),
            inputs: [config.rider_topic.clone(), config.delivery_topic.clone()],
            outputs,
            metrics,
            said_unreachable: false,
            said_missing: [false; 2],
        };
        let w = watch.clone();
        watch.thread.start("dongflow-topic-watch", move || {
            while !w.thread.stopping() {
                looker.look(&w);
                std::thread::park_timeout(PERIOD);
            }
        })?;
        Ok(watch)
    }

    /// Bumped every time the topology changes.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// What is known now.
    pub fn topology(&self) -> Topology {
        self.topology
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops the watch thread and waits for it.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

impl Drop for TopicWatch {
    fn drop(&mut self) {
        self.thread.request_stop();
    }
}

/// The watch thread's side.
struct Looker {
    consumer: BaseConsumer<Quiet>,
    brokers: ClientSettings,
    inputs: [String; 2],
    outputs: Vec<TopicSpec>,
    metrics: Arc<KafkaMetrics>,
    said_unreachable: bool,
    said_missing: [bool; 2],
}

impl Looker {
    fn look(&mut self, watch: &TopicWatch) {
        let metadata = match self.consumer.fetch_metadata(None, REQUEST_TIMEOUT) {
            Ok(m) => m,
            Err(e) => {
                self.metrics
                    .brokers_reachable
                    .store(false, Ordering::Relaxed);
                if !self.said_unreachable {
                    tracing::warn!(
                        "cannot reach the Kafka brokers at {}: {e}; retrying every second",
                        self.brokers
                    );
                    self.said_unreachable = true;
                }
                return;
            }
        };
        self.metrics
            .brokers_reachable
            .store(true, Ordering::Relaxed);
        if self.said_unreachable {
            tracing::info!("the Kafka brokers at {} answer again", self.brokers);
            self.said_unreachable = false;
        }
        let mut counts = [0i32; 2];
        for input in Input::ALL {
            let name = &self.inputs[input as usize];
            let found = metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none());
            counts[input as usize] = found.map_or(0, |t| t.partitions().len() as i32);
            let missing = counts[input as usize] == 0;
            if missing && !self.said_missing[input as usize] {
                tracing::warn!(
                    "input topic `{name}` does not exist yet; reading it as soon as it does"
                );
            } else if !missing && self.said_missing[input as usize] {
                tracing::info!("input topic `{name}` now exists");
            }
            self.said_missing[input as usize] = missing;
        }
        let before = watch.topology();
        let mut after = before.clone();
        after.partitions = counts;
        let mut all_known = true;
        for input in Input::ALL {
            let topic = &self.inputs[input as usize];
            for p in 0..counts[input as usize] {
                let Ok((low, high)) = self.consumer.fetch_watermarks(topic, p, REQUEST_TIMEOUT)
                else {
                    // Without every end offset, "caught up with what was there at start" cannot be
                    // decided yet (e.g. a partition has no leader now).
                    all_known = false;
                    continue;
                };
                if !before.reached {
                    after.at_start.insert((input, p), (low, high));
                }
                self.metrics.update_partition(topic, p, |progress| {
                    progress.start = Some(low);
                    progress.end = Some(high);
                    // Nothing left to read at an end offset just asked for: as read as can be. A
                    // partition seen for the first time counts from now, so that one never read
                    // shows its age too.
                    if progress.lag() == Some(0) || progress.read_at_ms.is_none() {
                        progress.read_now();
                    }
                });
            }
            if before.reached && counts[input as usize] > before.partitions[input as usize] {
                tracing::info!(
                    "input topic `{topic}` has {} partitions (was {})",
                    counts[input as usize],
                    before.partitions[input as usize]
                );
            }
        }
        if !before.reached && !all_known {
            // Try the first round again; keep what is known so that reading can start.
            after.at_start.clear();
        } else {
            after.reached = true;
        }
        if after != before {
            *watch.topology.lock().unwrap_or_else(|e| e.into_inner()) = after;
            watch.generation.fetch_add(1, Ordering::AcqRel);
        }
        // After the inputs: the workers should not wait for this.
        let exists = |name: &str| {
            metadata
                .topics()
                .iter()
                .any(|t| t.name() == name && t.error().is_none())
        };
        self.outputs.retain(|spec| !exists(&spec.name));
        self.create_outputs();
    }

    fn create_outputs(&mut self) {
        if self.outputs.is_empty() {
            return;
        }
        match create_topics(&self.brokers, &self.outputs, REQUEST_TIMEOUT) {
            Ok(created) => {
                for name in created {
                    tracing::info!("created output topic `{name}`");
                }
                self.outputs.clear();
            }
            Err(e) => tracing::warn!("cannot create the output topics yet: {e}; retrying"),
        }
    }
}
