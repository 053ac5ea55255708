//! What every Kafka client of the process shares: the bootstrap servers and the user's librdkafka
//! properties (CONTRACT sections 1 and 8).
//!
//! The user's properties come from `--kafka-config-file` (Java `.properties` style: `key=value` a
//! line, `#` and `!` comments) and `-X KEY=VALUE` (later wins). They are applied on top of each
//! client's own settings, so `security.protocol`, `sasl.*`, `ssl.*` and tuning work as in any
//! librdkafka client, except the properties the engine's correctness rests on, which are refused
//! ([`PROTECTED`]). Secret values (passwords, keys) never appear in `Debug`, `Display` or errors.

use std::fmt;
use std::path::{Path, PathBuf};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError as RdError;
use thiserror::Error;

/// Properties the engine sets itself for correctness, with the reason a user cannot change them.
/// librdkafka's aliases of a name are listed beside it.
pub const PROTECTED: &[(&str, &str)] = &[
    ("bootstrap.servers", "set with --brokers"),
    ("metadata.broker.list", "set with --brokers"),
    ("group.id", "set with --group-id"),
    (
        "enable.idempotence",
        "the producer must be idempotent: no changelog record duplicated or reordered",
    ),
    (
        "enable.auto.commit",
        "offsets are committed from the engine's own positions, never automatically",
    ),
    (
        "enable.auto.offset.store",
        "offsets are committed from the engine's own positions, never automatically",
    ),
    ("isolation.level", "the engine reads committed records only"),
    ("auto.offset.reset", "set with --start-from"),
    (
        "enable.partition.eof",
        "readiness is decided from end offsets, not end-of-partition events",
    ),
    (
        "message.timeout.ms",
        "the producer never gives up on a record while a broker is away",
    ),
    (
        "delivery.timeout.ms",
        "the producer never gives up on a record while a broker is away",
    ),
    ("acks", "an idempotent producer needs acks=all"),
    (
        "request.required.acks",
        "an idempotent producer needs acks=all",
    ),
    ("retries", "records are retried until delivered"),
    (
        "message.send.max.retries",
        "records are retried until delivered",
    ),
    (
        "partitioner",
        "changelog keys are partitioned with murmur2, as Kafka's Java clients do",
    ),
    (
        "transactional.id",
        "the engine writes no transactions: its changelog is idempotent per key",
    ),
];

/// The reason a property cannot be set by the user, if it is protected.
pub fn protected(key: &str) -> Option<&'static str> {
    PROTECTED
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, reason)| *reason)
}

/// Whether a property's value is a secret: it is never printed.
pub fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key == "ssl.key.pem"
        || key == "ssl_key"
        || key == "sasl.oauthbearer.config"
        || key == "sasl.jaas.config"
}

/// Reconnect backoff the engine starts from, in ms: librdkafka's default doubles up to 10 s, which
/// left the engine up to 7 s without reading after a broker came back; capped at 500 ms, a broker's
/// return is noticed within a second (CONTRACT section 7 asks for 2 s). A user may override both.
const RECONNECT_BACKOFF: [(&str, &str); 2] = [
    ("reconnect.backoff.ms", "100"),
    ("reconnect.backoff.max.ms", "500"),
];

/// A bad `-X` or `--kafka-config-file`: exit 2.
#[derive(Debug, Error)]
pub enum SettingsError {
    /// The file cannot be read.
    #[error("cannot read Kafka config file {}: {error}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (shown in this error's message, so not chained as its source).
        error: std::io::Error,
    },
    /// A line or `-X` value that is not `key=value`.
    #[error("{place}: expected KEY=VALUE")]
    Syntax {
        /// Where: `FILE line N` or `-X`.
        place: String,
    },
    /// A property the engine sets itself.
    #[error("Kafka property `{key}` cannot be set: {reason}")]
    Protected {
        /// The property.
        key: String,
        /// Why.
        reason: &'static str,
    },
    /// librdkafka refused a property (unknown name, bad value, unreadable certificate, ...).
    #[error("Kafka property `{key}`: {reason}")]
    Refused {
        /// The property.
        key: String,
        /// librdkafka's reason, without the value when it is a secret.
        reason: String,
    },
    /// librdkafka refused the properties taken together.
    #[error("the Kafka properties are refused: {0}")]
    Client(String),
}

/// The bootstrap servers and the user's properties: each Kafka client of the process is made from
/// them with [`ClientSettings::configure`].
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ClientSettings {
    bootstrap: String,
    properties: Vec<(String, String)>,
    /// Producer properties the process chooses for these brokers, under the user's.
    producer: Vec<(String, String)>,
}

impl ClientSettings {
    /// Settings for `bootstrap` without user properties.
    pub fn new(bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            properties: Vec::new(),
            producer: Vec::new(),
        }
    }

    /// Settings for `bootstrap` with the properties of `file` (if any), then of `overrides`
    /// (`KEY=VALUE` each; later wins). Protected and malformed properties are refused; the rest are
    /// checked by librdkafka itself, so a typo or an unreadable CA file is one error at start.
    pub fn load(
        bootstrap: impl Into<String>,
        file: Option<&Path>,
        overrides: &[String],
    ) -> Result<Self, SettingsError> {
        let mut properties: Vec<(String, String)> = Vec::new();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|error| SettingsError::Read {
                path: path.to_owned(),
                error,
            })?;
            for (n, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
                    continue;
                }
                let place = || format!("{} line {}", path.display(), n + 1);
                properties.push(
                    split_property(line).ok_or_else(|| SettingsError::Syntax { place: place() })?,
                );
            }
        }
        for o in overrides {
            properties.push(split_property(o).ok_or_else(|| SettingsError::Syntax {
                place: "-X".to_owned(),
            })?);
        }
        let mut settings = Self::new(bootstrap);
        for (key, value) in properties {
            if let Some(reason) = protected(&key) {
                return Err(SettingsError::Protected { key, reason });
            }
            settings.properties.retain(|(k, _)| *k != key);
            settings.properties.push((key, value));
        }
        settings.check()?;
        Ok(settings)
    }

    /// Lets librdkafka judge the properties: a client is made (it connects to nothing) and dropped.
    fn check(&self) -> Result<(), SettingsError> {
        let mut config = ClientConfig::new();
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        // A group id keeps the consumer from refusing consumer-only settings; nothing is joined.
        config.set("group.id", "dongflow-settings-check");
        match config.create::<BaseConsumer>() {
            Ok(_) => Ok(()),
            Err(RdError::ClientConfig(_, reason, key, _)) => Err(SettingsError::Refused {
                reason: if is_secret(&key) {
                    "invalid value".to_owned()
                } else {
                    reason
                },
                key,
            }),
            Err(RdError::ClientCreation(reason)) => {
                Err(SettingsError::Client(redact(&reason, &self.properties)))
            }
            Err(e) => Err(SettingsError::Client(redact(
                &e.to_string(),
                &self.properties,
            ))),
        }
    }

    /// The same properties for other bootstrap servers (the embedded broker's, known only once it
    /// runs).
    pub fn with_bootstrap(&self, bootstrap: impl Into<String>) -> Self {
        Self {
            bootstrap: bootstrap.into(),
            properties: self.properties.clone(),
            producer: self.producer.clone(),
        }
    }

    /// The same settings, with a producer property of the process's own choosing for these
    /// brokers: it replaces the producer's default, and the user's properties still win over it.
    pub fn with_producer_default(&self, key: &str, value: &str) -> Self {
        let mut settings = self.clone();
        settings.producer.push((key.to_owned(), value.to_owned()));
        settings
    }

    /// The producer properties chosen with [`ClientSettings::with_producer_default`].
    pub fn producer_defaults(&self) -> &[(String, String)] {
        &self.producer
    }

    /// The bootstrap servers.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// The user's properties, in the order applied (secrets included: never print them).
    pub fn properties(&self) -> &[(String, String)] {
        &self.properties
    }

    /// Completes a client's own configuration: the bootstrap servers, the reconnect backoff
    /// (unless the client set its own), then the user's properties over the client's.
    pub fn configure<'a>(&self, config: &'a mut ClientConfig) -> &'a mut ClientConfig {
        config.set("bootstrap.servers", &self.bootstrap);
        for (key, value) in RECONNECT_BACKOFF {
            if config.get(key).is_none() {
                config.set(key, value);
            }
        }
        for (key, value) in &self.properties {
            config.set(key, value);
        }
        config
    }

    /// A new configuration with only these settings (for clients that need nothing of their own).
    pub fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        self.configure(&mut config);
        config
    }
}

/// `key=value` with both sides trimmed; `None` without `=` or with an empty key.
fn split_property(line: &str) -> Option<(String, String)> {
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    (!key.is_empty()).then(|| (key.to_owned(), value.trim().to_owned()))
}

/// `text` with every secret value of `properties` replaced by `***`.
fn redact(text: &str, properties: &[(String, String)]) -> String {
    properties
        .iter()
        .filter(|(k, v)| is_secret(k) && !v.is_empty())
        .fold(text.to_owned(), |t, (_, v)| t.replace(v.as_str(), "***"))
}

impl fmt::Debug for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown: Vec<(&str, &str)> = self
            .properties
            .iter()
            .map(|(k, v)| {
                let v = if is_secret(k) { "***" } else { v.as_str() };
                (k.as_str(), v)
            })
            .collect();
        f.debug_struct("ClientSettings")
            .field("bootstrap", &self.bootstrap)
            .field("properties", &shown)
            .finish()
    }
}

impl fmt::Display for ClientSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.bootstrap)
    }
}

impl From<&str> for ClientSettings {
    fn from(bootstrap: &str) -> Self {
        Self::new(bootstrap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let path =
            std::env::temp_dir().join(format!("dongflow-settings-{}-{name}", std::process::id()));
        std::fs::write(&path, text).expect("write");
        path
    }

    #[test]
    fn file_then_overrides_later_wins() {
        let path = temp_file(
            "order",
            "# a comment\n! another\n\nsecurity.protocol = PLAINTEXT\nclient.id=from-file\nlinger.ms=7\n",
        );
        let s = ClientSettings::load(
            "b:9092",
            Some(&path),
            &["client.id=from-x".into(), "linger.ms=8".into()],
        )
        .expect("loads");
        assert_eq!(
            s.properties(),
            [
                ("security.protocol".to_owned(), "PLAINTEXT".to_owned()),
                ("client.id".to_owned(), "from-x".to_owned()),
                ("linger.ms".to_owned(), "8".to_owned()),
            ]
        );
        let config = s.config();
        assert_eq!(config.get("bootstrap.servers"), Some("b:9092"));
        assert_eq!(config.get("client.id"), Some("from-x"));
        assert_eq!(config.get("reconnect.backoff.max.ms"), Some("500"));
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn user_properties_win_over_a_clients_tuning_but_the_backoff_of_a_client_stays() {
        let s = ClientSettings::load("b", None, &["linger.ms=1".into()]).expect("loads");
        let mut own = ClientConfig::new();
        own.set("linger.ms", "100")
            .set("reconnect.backoff.max.ms", "50");
        s.configure(&mut own);
        assert_eq!(own.get("linger.ms"), Some("1"));
        assert_eq!(own.get("reconnect.backoff.max.ms"), Some("50"));
    }

    #[test]
    fn every_protected_property_is_refused_with_its_reason() {
        for (key, reason) in PROTECTED {
            let err = ClientSettings::load("b", None, &[format!("{key}=x")])
                .expect_err("protected property refused");
            assert_eq!(
                err.to_string(),
                format!("Kafka property `{key}` cannot be set: {reason}")
            );
        }
    }

    #[test]
    fn malformed_lines_say_where_without_echoing_them() {
        let path = temp_file("syntax", "linger.ms=5\nsasl.password hunter2\n");
        let err = ClientSettings::load("b", Some(&path), &[]).expect_err("syntax error");
        let text = err.to_string();
        assert!(text.ends_with("line 2: expected KEY=VALUE"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        let err = ClientSettings::load("b", None, &["=x".into()]).expect_err("empty key");
        assert_eq!(err.to_string(), "-X: expected KEY=VALUE");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn librdkafka_refuses_unknown_names_and_bad_values() {
        let err = ClientSettings::load("b", None, &["no.such.property=1".into()])
            .expect_err("unknown property");
        assert!(
            err.to_string()
                .starts_with("Kafka property `no.such.property`:"),
            "{err}"
        );
        let err = ClientSettings::load("b", None, &["security.protocol=CARRIER_PIGEON".into()])
            .expect_err("bad value");
        assert!(err.to_string().contains("security.protocol"), "{err}");
    }

    #[test]
    fn secrets_are_never_shown() {
        let s = ClientSettings::load(
            "b",
            None,
            &[
                "sasl.username=alice".into(),
                "sasl.password=hunter2".into(),
                "ssl.key.password=opensesame".into(),
            ],
        )
        .expect("loads");
        let shown = format!("{s:?} {s}");
        assert!(shown.contains("alice"), "{shown}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("opensesame"),
            "{shown}"
        );
        assert_eq!(
            redact("auth failed for hunter2", s.properties()),
            "auth failed for ***"
        );
    }

    #[test]
    fn unreadable_file_is_one_error_naming_it() {
        let err = ClientSettings::load("b", Some(Path::new("/no/such/file.properties")), &[])
            .expect_err("missing file");
        assert!(
            err.to_string()
                .starts_with("cannot read Kafka config file /no/such/file.properties: "),
            "{err}"
        );
    }
}
