//! Topic creation, and the embedded broker (librdkafka's in-process mock cluster).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::types::RDKafkaErrorCode;

use super::quiet::Quiet;
use super::{ClientSettings, KafkaError};

/// A topic to create if it is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicSpec {
    /// Its name.
    pub name: String,
    /// Its partitions.
    pub partitions: i32,
    /// Whether it is compacted (`cleanup.policy=compact`): changelog topics are.
    pub compacted: bool,
}

impl TopicSpec {
    /// A plain topic.
    pub fn new(name: &str, partitions: i32) -> Self {
        Self {
            name: name.to_owned(),
            partitions,
            compacted: false,
        }
    }

    /// A compacted topic.
    pub fn compacted(name: &str, partitions: i32) -> Self {
        Self {
            compacted: true,
            ..Self::new(name, partitions)
        }
    }
}

/// Creates the topics of `specs` that do not exist yet. Returns the names it created.
pub fn create_topics(
    brokers: &ClientSettings,
    specs: &[TopicSpec],
    timeout: Duration,
) -> Result<Vec<String>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = brokers.config().create()?;
    let topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            // Replication -1: the broker's default, so a real cluster gets its usual redundancy.
            let t = NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(-1));
            if s.compacted {
                // Changelog topics keep the latest record per key (CONTRACT section 5).
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
        })
        .collect();
    let options = AdminOptions::new()
        .operation_timeout(Some(timeout))
        .request_timeout(Some(timeout));
    let results = futures_executor::block_on(admin.create_topics(&topics, &options))?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(KafkaError::CreateTopic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(created)
}

/// Creates the topics of `specs` that the brokers do not list yet (brokers without the admin API,
/// like the embedded one, are never asked to create a topic that exists). Returns the names created.
pub fn ensure_topics(
    brokers: &ClientSettings,
    specs: &[TopicSpec],
    timeout: Duration,
) -> Result<Vec<String>, KafkaError> {
    let client: BaseConsumer = brokers.config().create()?;
    let metadata = client.fetch_metadata(None, timeout)?;
    let missing: Vec<TopicSpec> = specs
        .iter()
        .filter(|s| {
            !metadata
                .topics()
                .iter()
                .any(|t| t.name() == s.name && t.error().is_none())
        })
        .cloned()
        .collect();
    if missing.is_empty() {
        return Ok(Vec::new());
    }
    create_topics(brokers, &missing, timeout)
}

/// librdkafka's mock cluster, in this process: the real Kafka protocol over TCP on loopback, for
/// `dongflow demo`, `run` without `--brokers`, and tests. It keeps a bounded log per partition.
pub struct EmbeddedBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker")
            .field("bootstrap", &self.bootstrap())
            .finish()
    }
}

impl EmbeddedBroker {
    /// Starts a one-broker cluster with `topics` created.
    pub fn start(topics: &[TopicSpec]) -> Result<Self, KafkaError> {
        let cluster = MockCluster::new(1)?;
        let broker = Self { cluster };
        for t in topics {
            broker.create_topic(t)?;
        }
        Ok(broker)
    }

    /// The address other clients connect to.
    pub fn bootstrap(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Makes `broker` the leader of a partition, or leaves the partition without a leader
    /// (unreadable, as while a broker is lost) with `None`. The one broker's id is 1.
    pub fn set_leader(
        &self,
        topic: &str,
        partition: i32,
        broker: Option<i32>,
    ) -> Result<(), KafkaError> {
        self.cluster.partition_leader(topic, partition, broker)?;
        Ok(())
    }

    /// Makes the broker answer the next `errors.len()` produce requests (from any client) with these
    /// errors, one each: fault injection for tests.
    pub fn fail_produce_requests(&self, errors: &[rdkafka::types::RDKafkaRespErr]) {
        self.cluster
            .request_errors(rdkafka::types::RDKafkaApiKey::Produce, errors);
    }

    /// The partitions of `topics` whose oldest records this broker has dropped (their start
    /// offset is above 0): it keeps about 5 MB of record batches a partition (librdkafka's fixed
    /// limit) and does not compact, so a reader from the beginning no longer sees every key there.
    pub fn trimmed(&self, topics: &[TopicSpec]) -> Result<Vec<(String, i32)>, KafkaError> {
        let client: BaseConsumer<Quiet> = rdkafka::config::ClientConfig::new()
            .set("bootstrap.servers", self.bootstrap())
            .create_with_context(Quiet::default())?;
        let mut trimmed = Vec::new();
        for t in topics {
            for p in 0..t.partitions {
                let (low, _) = client.fetch_watermarks(&t.name, p, Duration::from_secs(5))?;
                if low > 0 {
                    trimmed.push((t.name.clone(), p));
                }
            }
        }
        Ok(trimmed)
    }

    /// Creates a topic (the mock cluster has no compaction; the flag is ignored).
    pub fn create_topic(&self, spec: &TopicSpec) -> Result<(), KafkaError> {
        self.cluster.create_topic(&spec.name, spec.partitions, 1)?;
        Ok(())
    }
}
