//! The `[producer]` table: [`ProducerSettings`] and the librdkafka
//! configuration the producer is built with.

use serde::{Deserialize, Serialize};

use super::{require_brokers, KafkaProperties, SettingsError, DEFAULT_SERVICE};

/// The producer's settings (the `[producer]` table).
///
/// ```
/// use kafka_batch::ProducerSettings;
///
/// let mut settings = ProducerSettings::new("localhost:9092");
/// settings.service = "enricher".into();
/// settings.kafka.set("linger.ms", "20");
/// assert_eq!(settings.client_config().unwrap().get("acks"), Some("all"));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProducerSettings {
    /// Brokers for the producer; empty: the top-level `bootstrap_servers`.
    pub bootstrap_servers: String,
    /// Skip records over the broker's size limit with a warning and a counter
    /// instead of failing the batch (the Python wrapper's
    /// `ignore_large_message_errors`).
    pub skip_oversized: bool,
    /// How long closing (or dropping) the producer waits for queued records.
    pub flush_timeout_ms: u64,
    /// librdkafka properties for the producer, over the top-level `kafka`.
    pub kafka: KafkaProperties,
    /// Name of this service (filled from the top-level `service`).
    #[serde(skip)]
    pub service: String,
}

impl Default for ProducerSettings {
    fn default() -> Self {
        ProducerSettings {
            bootstrap_servers: String::new(),
            skip_oversized: false,
            flush_timeout_ms: 30_000,
            kafka: KafkaProperties::default(),
            service: DEFAULT_SERVICE.into(),
        }
    }
}

/// librdkafka's defaults that kafka-batch changes for the producer.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[("acks", "all"), ("compression.type", "snappy")];

impl ProducerSettings {
    /// Settings for a producer to `bootstrap_servers`, every other value at its default.
    pub fn new(bootstrap_servers: &str) -> Self {
        ProducerSettings {
            bootstrap_servers: bootstrap_servers.into(),
            ..ProducerSettings::default()
        }
    }

    /// Checks that these settings can run a producer.
    pub fn validate(&self) -> Result<(), SettingsError> {
        require_brokers(&self.bootstrap_servers, "producer.bootstrap_servers")?;
        self.kafka.check_reserved("producer.kafka")
    }

    /// The librdkafka configuration: kafka-batch's defaults, then the
    /// pass-through properties, then brokers.
    pub fn client_config(&self) -> Result<rdkafka::ClientConfig, SettingsError> {
        self.validate()?;
        let mut config = rdkafka::ClientConfig::new();
        for (k, v) in PRODUCER_DEFAULTS {
            config.set(*k, *v);
        }
        for (k, v) in self.kafka.iter() {
            config.set(k, v);
        }
        config.set("bootstrap.servers", &self.bootstrap_servers);
        Ok(config)
    }
}
