//! Kafka in and out, with rdkafka.
//!
//! - [`source`]: [`KafkaSource`], one per timely worker. Partitions are assigned statically (partition
//!   `p` of each input topic to global worker `p mod W`); no consumer group decides ownership, so no
//!   rebalance and no eviction for slow processing can happen.
//! - [`watch`]: [`TopicWatch`], one thread per process that learns the input topics' partitions and
//!   end offsets from the brokers (missing topics, new partitions, brokers down) and creates missing
//!   output topics, so that no worker ever blocks on metadata.
//! - [`producer`]: [`Producer`], the process's idempotent producer for dead letters and changelogs.
//! - [`admin`]: topic creation and [`EmbeddedBroker`], librdkafka's in-process mock cluster.
//! - [`generate`]: the simulator produced to the input topics (`dongflow generate --brokers`).
//! - [`settings`]: [`ClientSettings`], the bootstrap servers and the user's librdkafka properties
//!   (`-X`, `--kafka-config-file`) that every Kafka client of the process is made from.
//! - [`quiet`]: rate-limited logging of librdkafka's errors (a down broker repeats them).
//! - [`background`]: the stop flag and handle of those client threads.
//! - [`metrics`]: [`KafkaMetrics`], the counters and lag that `/metrics` shows.

pub mod admin;
pub mod background;
pub mod generate;
pub mod metrics;
pub mod producer;
pub mod quiet;
pub mod settings;
pub mod source;
pub mod watch;

use std::time::Duration;

use thiserror::Error;

pub use admin::{create_topics, ensure_topics, EmbeddedBroker, TopicSpec};
pub use background::Background;
pub use metrics::KafkaMetrics;
pub use producer::{OutputKind, Producer, AS_OF_HEADER};
pub use settings::{ClientSettings, SettingsError};
pub use source::KafkaSource;
pub use watch::TopicWatch;

/// Where the engine starts reading a partition that has no checkpointed offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest record the broker still has.
    Earliest,
    /// Only records produced from now on.
    Latest,
}

/// The engine's Kafka settings.
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    /// Bootstrap servers and the user's client properties.
    pub brokers: ClientSettings,
    /// The consumer group under which offsets are committed (for lag tools only).
    pub group_id: String,
    /// Input topic of rider events.
    pub rider_topic: String,
    /// Input topic of delivery events.
    pub delivery_topic: String,
    /// Where rejected input goes.
    pub dead_letter_topic: String,
    /// Where partitions without a known offset start.
    pub start: StartAt,
}

impl KafkaConfig {
    /// The input topics, riders first: a topic's index here is its [`Input`] kind.
    pub fn inputs(&self) -> [&str; 2] {
        [&self.rider_topic, &self.delivery_topic]
    }
}

/// Which input a record came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Input {
    /// `rider-events`.
    Riders = 0,
    /// `delivery-events`.
    Deliveries = 1,
}

impl Input {
    /// Both inputs, in the order of [`KafkaConfig::inputs`].
    pub const ALL: [Input; 2] = [Input::Riders, Input::Deliveries];
}

/// What went wrong talking to Kafka.
#[derive(Debug, Error)]
pub enum KafkaError {
    /// The client library refused or failed.
    #[error(transparent)]
    Client(#[from] rdkafka::error::KafkaError),
    /// A topic could not be created.
    #[error("cannot create topic `{topic}`: {reason}")]
    CreateTopic {
        /// The topic.
        topic: String,
        /// The broker's answer.
        reason: String,
    },
    /// A client thread could not be started.
    #[error("cannot start thread {name}: {reason}")]
    Thread {
        /// The thread's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// A broker did not answer in time.
    #[error("no answer from {brokers} within {timeout:?}")]
    Timeout {
        /// The bootstrap servers.
        brokers: String,
        /// How long we waited.
        timeout: Duration,
    },
}
