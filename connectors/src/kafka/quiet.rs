//! A client context that keeps librdkafka's complaints readable: while a broker is down it reports
//! the same connection error many times a second; each kind is logged once per interval instead.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError as RdError;
use rdkafka::ClientContext;

/// How often one kind of client error is logged.
const EVERY: Duration = Duration::from_secs(30);

/// Rate-limited logging of client errors and logs.
#[derive(Debug, Default)]
pub struct Quiet {
    last: Mutex<HashMap<String, Instant>>,
}

impl Quiet {
    /// Whether a message of `kind` should be logged now.
    fn due(&self, kind: String) -> bool {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        match last.get(&kind) {
            Some(t) if now.duration_since(*t) < EVERY => false,
            _ => {
                last.insert(kind, now);
                true
            }
        }
    }

    /// A client error: the client retries by itself, so it is a warning, once per interval.
    pub fn error(&self, error: &RdError, reason: &str) {
        let kind = format!("{:?}", error.rdkafka_error_code());
        if self.due(kind) {
            tracing::warn!(
                "Kafka client: {error}: {reason} (retrying; repeats hidden for {EVERY:?})"
            );
        }
    }

    /// A librdkafka log line.
    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        let serious = (level as i32) <= (RDKafkaLogLevel::Warning as i32);
        if !serious || !self.due(format!("log:{facility}")) {
            return;
        }
        tracing::warn!("librdkafka {facility}: {message}");
    }
}

impl ClientContext for Quiet {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        Quiet::log(self, level, fac, log_message);
    }

    fn error(&self, error: RdError, reason: &str) {
        Quiet::error(self, &error, reason);
    }
}

impl ConsumerContext for Quiet {}
