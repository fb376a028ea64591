//! Settings: built-in defaults, then a TOML file, then `KAFKA_BATCH_*`
//! environment variables, then overrides in code.
//!
//! `config/default.toml` in this repository lists every setting with its
//! default and what it does. A service keeps its own TOML file and loads it:
//!
//! ```no_run
//! # fn main() -> Result<(), kafka_batch::SettingsError> {
//! // config/kafka-batch.toml (or the file named by KAFKA_BATCH_CONFIG), then env.
//! let settings = kafka_batch::Settings::load()?;
//! # Ok(()) }
//! ```
//!
//! # Environment variables
//!
//! Every setting can be overridden by an environment variable named
//! `KAFKA_BATCH_` followed by its path, with `__` between levels:
//! `KAFKA_BATCH_CONSUMER__BATCH_SIZE=1000`, `KAFKA_BATCH_BOOTSTRAP_SERVERS=kafka:9092`.
//! Lists may be written as `a,b` or `[a, b]`.
//!
//! librdkafka properties pass through the `kafka` tables (top level for both
//! clients, `consumer.kafka` and `producer.kafka` for one). Their names contain
//! dots, which an environment variable cannot; write each dot as `_`:
//! `KAFKA_BATCH_CONSUMER__KAFKA__FETCH_MAX_BYTES=2097152` sets the consumer's
//! `fetch.max.bytes`. (No librdkafka property has an underscore in its name, so
//! the mapping is exact.) In TOML, write the property as librdkafka names it:
//! `"fetch.max.bytes" = 2097152`.
//!
//! Unknown setting names are rejected, so that a typo is an error, not a
//! silently ignored value.

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod consumer;
mod failure;
mod jobs;
mod kafka_properties;
mod lanes;
mod metrics;
mod producer;

pub use consumer::{ConsumerSettings, OnGap, CONSUMER_DEFAULTS};
pub use failure::{
    Backoff, DeadLetterSettings, FailurePolicy, FailureSettings, RetrySettings, RetryTopicSettings,
};
pub use jobs::JobsSettings;
pub use kafka_properties::KafkaProperties;
pub use lanes::HandlingOrder;
pub use metrics::{MetricsSettings, DEFAULT_STATISTICS_INTERVAL_MS};
pub use producer::{ProducerSettings, PRODUCER_DEFAULTS};

/// The service name used when none is set.
pub const DEFAULT_SERVICE: &str = "kafka-batch";
/// The environment variable prefix for every setting.
pub const ENV_PREFIX: &str = "KAFKA_BATCH_";
/// The environment variable naming the TOML file to load.
pub const CONFIG_ENV: &str = "KAFKA_BATCH_CONFIG";
/// The TOML file loaded when `KAFKA_BATCH_CONFIG` is not set (if it exists).
pub const DEFAULT_CONFIG_FILE: &str = "config/kafka-batch.toml";

/// A setting that cannot be used, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The TOML file or an environment variable could not be read or has a
    /// wrong or unknown name or type.
    #[error("cannot load settings: {0}")]
    Load(#[from] Box<figment::Error>),
    /// A value was read but cannot work.
    #[error("setting `{setting}` {problem}: {fix}")]
    Invalid {
        /// The setting's path, as written in TOML.
        setting: String,
        /// What is wrong with it.
        problem: String,
        /// What to do instead.
        fix: String,
    },
}

impl SettingsError {
    fn invalid(
        setting: impl Into<String>,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        SettingsError::Invalid {
            setting: setting.into(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// All of kafka-batch's settings.
///
/// ```
/// use kafka_batch::Settings;
///
/// let settings = Settings::from_figment(
///     Settings::figment()
///         .merge(("bootstrap_servers", "localhost:9092"))
///         .merge(("consumer.group_id", "enricher"))
///         .merge(("consumer.topics", ["events"])),
/// )
/// .unwrap();
/// assert_eq!(settings.consumer.batch_size, 500);
/// assert_eq!(settings.consumer.bootstrap_servers, "localhost:9092");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Name of this service: written as `hist.svc` in every produced record
    /// and used as the prefix of the metric names.
    pub service: String,
    /// Comma-separated `host:port` list of brokers, for both clients unless
    /// `consumer.bootstrap_servers` or `producer.bootstrap_servers` is set.
    pub bootstrap_servers: String,
    /// librdkafka properties for both clients.
    pub kafka: KafkaProperties,
    /// The consumer's settings.
    pub consumer: ConsumerSettings,
    /// The producer's settings.
    pub producer: ProducerSettings,
    /// The Prometheus endpoint and librdkafka's statistics (the consumer
    /// gets a copy, [`ConsumerSettings::metrics`]).
    pub metrics: MetricsSettings,
    /// The job queue ([`crate::jobs`]).
    pub jobs: JobsSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            service: DEFAULT_SERVICE.into(),
            bootstrap_servers: String::new(),
            kafka: KafkaProperties::default(),
            consumer: ConsumerSettings::default(),
            producer: ProducerSettings::default(),
            metrics: MetricsSettings::default(),
            jobs: JobsSettings::default(),
        }
    }
}

impl Settings {
    /// Built-in defaults, the TOML file, then `KAFKA_BATCH_*` variables.
    ///
    /// The file is the one named by `KAFKA_BATCH_CONFIG` (which must exist),
    /// else `config/kafka-batch.toml` if it exists.
    pub fn load() -> Result<Settings, SettingsError> {
        if let Some(path) = std::env::var_os(CONFIG_ENV) {
            return Settings::load_file(path);
        }
        Settings::from_figment(Settings::figment())
    }

    /// Like [`Settings::load`], reading the given TOML file, which must exist.
    pub fn load_file(path: impl AsRef<Path>) -> Result<Settings, SettingsError> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(SettingsError::invalid(
                CONFIG_ENV,
                format!("names {}, which is not a file", path.display()),
                "point it at your TOML settings file, or unset it to read config/kafka-batch.toml",
            ));
        }
        Settings::from_figment(Settings::figment_for(Some(path)))
    }

    /// The figment [`Settings::load`] reads, for adding overrides in code
    /// with `.merge((path, value))` before [`Settings::from_figment`].
    pub fn figment() -> Figment {
        match std::env::var_os(CONFIG_ENV) {
            Some(path) => Settings::figment_for(Some(Path::new(&path))),
            None => Settings::figment_for(None),
        }
    }

    fn figment_for(file: Option<&Path>) -> Figment {
        let figment = Figment::from(Serialized::defaults(Settings::default()));
        let figment = match file {
            Some(path) => figment.merge(Toml::file_exact(path)),
            // A missing default file provides nothing; it is not an error.
            None if Path::new(DEFAULT_CONFIG_FILE).is_file() => {
                figment.merge(Toml::file_exact(DEFAULT_CONFIG_FILE))
            }
            None => figment,
        };
        figment.merge(Env::prefixed(ENV_PREFIX).ignore(&["config"]).split("__"))
    }

    /// Extracts and validates settings from a figment.
    pub fn from_figment(figment: Figment) -> Result<Settings, SettingsError> {
        let mut settings: Settings = figment.extract().map_err(Box::new)?;
        settings.resolve();
        settings.validate()?;
        Ok(settings)
    }

    /// Fills the consumer's and producer's inherited values from the top level.
    fn resolve(&mut self) {
        for (servers, kafka, service) in [
            (
                &mut self.consumer.bootstrap_servers,
                &mut self.consumer.kafka,
                &mut self.consumer.service,
            ),
            (
                &mut self.producer.bootstrap_servers,
                &mut self.producer.kafka,
                &mut self.producer.service,
            ),
        ] {
            if servers.is_empty() {
                servers.clone_from(&self.bootstrap_servers);
            }
            *kafka = self.kafka.overlaid_by(kafka);
            service.clone_from(&self.service);
        }
        self.consumer.metrics.clone_from(&self.metrics);
    }

    /// Checks every value that can be checked without knowing whether a
    /// consumer will be built (the required consumer settings are checked by
    /// [`ConsumerSettings::validate`]).
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.service.trim().is_empty() {
            return Err(SettingsError::invalid(
                "service",
                "is empty",
                "name this service (it is written into every record's history and names the metrics)",
            ));
        }
        self.kafka.check_reserved("kafka")?;
        self.metrics.validate()?;
        self.consumer.check_values()?;
        self.producer.kafka.check_reserved("producer.kafka")?;
        self.jobs.validate()?;
        Ok(())
    }
}

fn require_brokers(servers: &str, setting: &str) -> Result<(), SettingsError> {
    if servers.trim().is_empty() {
        return Err(SettingsError::invalid(
            setting,
            "is empty",
            "set `bootstrap_servers` in the TOML file or KAFKA_BATCH_BOOTSTRAP_SERVERS=host:9092 \
             (for tests, start kafka_batch::testing::EmbeddedBroker and use its address)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
