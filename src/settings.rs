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

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

mod failure;
mod lanes;
mod metrics;

pub use failure::{
    Backoff, DeadLetterSettings, FailurePolicy, FailureSettings, RetrySettings, RetryTopicSettings,
};
pub use lanes::HandlingOrder;
pub use metrics::{MetricsSettings, DEFAULT_STATISTICS_INTERVAL_MS};

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
        }
    }
}

/// The consumer's settings (the `[consumer]` table).
///
/// Usually loaded with [`Settings::load`]; built in code for tests and tools:
///
/// ```
/// use kafka_batch::ConsumerSettings;
///
/// let mut settings = ConsumerSettings::new("localhost:9092", "enricher", &["events"]);
/// settings.batch_size = 1000;
/// settings.kafka.set("fetch.min.bytes", "65536");
/// assert!(settings.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerSettings {
    /// Brokers for the consumer; empty: the top-level `bootstrap_servers`.
    pub bootstrap_servers: String,
    /// The consumer group (librdkafka's `group.id`). Required.
    pub group_id: String,
    /// Topics to subscribe to. Required.
    #[serde(deserialize_with = "list_or_csv")]
    pub topics: Vec<String>,
    /// A batch is handed over when it holds this many messages.
    pub batch_size: usize,
    /// ...or when this many milliseconds have passed since polling for it
    /// began and it holds at least one message.
    pub batch_timeout_ms: u64,
    /// ...or when its records' values add up to this many bytes.
    pub max_batch_bytes: usize,
    /// Batches the poller may prepare ahead of the handler. When they are
    /// ready and the handler is still busy, the poller pauses its partitions
    /// (and keeps polling, so the group does not evict it).
    pub prefetch_batches: usize,
    /// How many batches may be in the handler at once. Which records a
    /// batch may hold while others run is `ordering`'s to say.
    pub concurrency: usize,
    /// Which records may be handled at the same time: `partition` (a
    /// partition's records in offset order, partitions at once), `key` (a
    /// key's records in offset order, keys at once) or `unordered` (any,
    /// for idempotent handlers). See [`HandlingOrder`].
    pub ordering: HandlingOrder,
    /// How many Kafka consumers this process runs, each its own poller
    /// thread and group member, sharing the handler and `concurrency`:
    /// decoding on more cores.
    pub clients: usize,
    /// The most records of one partition read and not yet settled (in
    /// batches being built, waiting, or in the handler). At the cap the
    /// partition is paused until half of them are settled, so memory and
    /// the replay after a crash stay bounded. At least `batch_size`.
    pub max_in_flight_records: usize,
    /// Within a batch, keep only the last message of each id.
    pub latest_only: bool,
    /// Commit each batch's offsets after the handler returns `Ok`. With
    /// `false` the library never commits; the handler commits through the
    /// consumer's control handle.
    pub commit: bool,
    /// How often the settled offsets are committed, in milliseconds. The
    /// poller stores each partition's settled watermark as it moves (no
    /// round trip) and librdkafka commits what was stored on this interval,
    /// so the poller never waits for a commit; revokes, shutdown and manual
    /// commits still commit synchronously. A crash replays at most this much
    /// settled work. 0: commit synchronously whenever a watermark moves
    /// (a round trip that the poller waits for).
    pub commit_interval_ms: u64,
    /// On a revoke, how long to wait for in-flight batches of the revoked
    /// partitions before giving them up (their records will be read again by
    /// the next owner).
    pub revoke_timeout_ms: u64,
    /// How long one batch's handler may run before it counts as failed (its
    /// future is dropped, and the batch goes through the failure chain with
    /// an error naming this limit). 0: no limit.
    pub handler_timeout_ms: u64,
    /// Shutting down during a rebalance: how long the consumer keeps serving
    /// the rebalance (so that its revoke commits what was handled) when the
    /// broker refuses the final commit because the group is rebalancing.
    pub shutdown_timeout_ms: u64,
    /// What to do when the broker returns a record past the one expected
    /// (the records between were not delivered): `warn` (log and count, then
    /// go on) or `fail` (stop before committing past the gap).
    pub on_gap: OnGap,
    /// What happens to failed messages and undecodable records.
    pub failure: FailureSettings,
    /// librdkafka properties for the consumer, over the top-level `kafka`.
    pub kafka: KafkaProperties,
    /// Name of this service (filled from the top-level `service`).
    #[serde(skip)]
    pub service: String,
    /// The metrics settings (filled from the top-level `[metrics]` table).
    #[serde(skip)]
    pub metrics: MetricsSettings,
}

impl Default for ConsumerSettings {
    fn default() -> Self {
        ConsumerSettings {
            bootstrap_servers: String::new(),
            group_id: String::new(),
            topics: Vec::new(),
            batch_size: 500,
            batch_timeout_ms: 1000,
            max_batch_bytes: 16 * 1024 * 1024,
            prefetch_batches: 1,
            concurrency: 1,
            ordering: HandlingOrder::Partition,
            max_in_flight_records: 5_000,
            clients: 1,
            latest_only: false,
            commit: true,
            commit_interval_ms: 1_000,
            revoke_timeout_ms: 30_000,
            handler_timeout_ms: 0,
            shutdown_timeout_ms: 30_000,
            on_gap: OnGap::Warn,
            failure: FailureSettings::default(),
            kafka: KafkaProperties::default(),
            service: DEFAULT_SERVICE.into(),
            metrics: MetricsSettings::default(),
        }
    }
}

/// What the consumer does when the broker skips records (`consumer.on_gap`).
///
/// The consumer expects each partition to continue exactly where it was
/// committed, or sought to, and each record to follow the one before. A
/// record further on means the records between were not delivered: a
/// compacted topic and the markers of transactional producers do this
/// legitimately; so does `auto.offset.reset` after a rewind to an offset
/// that retention has deleted, and a broker that skips records it holds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum OnGap {
    /// Log a warning naming the missing offsets, count it
    /// (`kafka_batch_offset_gaps_total`), and go on: the commit moves past
    /// the gap. Right for compacted topics and transactional producers.
    #[default]
    Warn,
    /// Stop the consumer before it commits past the gap: `process` returns
    /// [`Error::Gap`](crate::Error::Gap) once the records before it are
    /// handled and committed. For topics that are neither compacted nor
    /// written by transactional producers, where a gap means lost records.
    Fail,
}

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

/// librdkafka's defaults that kafka-batch changes for the consumer.
///
/// `auto.offset.reset=latest` and no auto commit keep the Python wrapper's
/// meaning; the queue sizes bound memory (see `config/default.toml`).
pub const CONSUMER_DEFAULTS: &[(&str, &str)] = &[
    ("auto.offset.reset", "latest"),
    ("enable.auto.commit", "false"),
    ("enable.auto.offset.store", "false"),
    ("enable.partition.eof", "false"),
    ("session.timeout.ms", "10000"),
    ("heartbeat.interval.ms", "3000"),
    ("max.poll.interval.ms", "300000"),
    ("queued.max.messages.kbytes", "16384"),
    ("fetch.max.bytes", "16777216"),
];

/// The longest `consumer.commit_interval_ms` librdkafka takes (a day).
const MAX_COMMIT_INTERVAL_MS: u64 = 86_400_000;

/// Prefixes of librdkafka properties that only a consumer understands.
const CONSUMER_ONLY: &[&str] = &[
    "auto.offset.reset",
    "auto.commit.",
    "enable.auto.",
    "enable.partition.eof",
    "fetch.",
    "group.",
    "session.timeout.ms",
    "heartbeat.interval.ms",
    "max.poll.interval.ms",
    "queued.",
    "partition.assignment.strategy",
    "isolation.level",
    "check.crcs",
    "coordinator.query.interval.ms",
    "consume.callback.max.messages",
];

/// librdkafka's defaults that kafka-batch changes for the producer.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[("acks", "all"), ("compression.type", "snappy")];

/// Properties that have their own setting, or that would break the library's
/// promise, and so cannot be passed through.
const RESERVED: &[(&str, &str)] = &[
    ("bootstrap.servers", "use the `bootstrap_servers` setting"),
    ("group.id", "use `consumer.group_id`"),
    (
        "enable.auto.commit",
        "kafka-batch commits a batch's offsets only after the handler returns Ok; auto commit would commit records that were never handled. Remove it (set `consumer.commit = false` to commit yourself)",
    ),
    (
        "enable.auto.offset.store",
        "kafka-batch commits explicit offsets; remove it",
    ),
    (
        "auto.commit.interval.ms",
        "use `consumer.commit_interval_ms` (librdkafka commits on it only the offsets kafka-batch stored as settled)",
    ),
];

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

impl ConsumerSettings {
    /// Settings for a consumer of `topics` in group `group_id` at `bootstrap_servers`,
    /// with every other value at its default.
    pub fn new(bootstrap_servers: &str, group_id: &str, topics: &[&str]) -> Self {
        ConsumerSettings {
            bootstrap_servers: bootstrap_servers.into(),
            group_id: group_id.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            ..ConsumerSettings::default()
        }
    }

    /// The topics the consumer subscribes to: `topics`, and the retry topic
    /// when the failure chain has `retry_topic`.
    pub fn subscription(&self) -> Vec<String> {
        let mut topics = self.topics.clone();
        topics.extend(self.failure.retry_topic_name().map(str::to_owned));
        topics
    }

    /// The librdkafka configuration of the producer that writes failed
    /// records to the retry and dead-letter topics: kafka-batch's producer
    /// defaults, the consumer's `kafka` tables, then `failure.kafka`.
    pub fn failure_producer_config(&self) -> Result<rdkafka::ClientConfig, SettingsError> {
        self.validate()?;
        let mut config = rdkafka::ClientConfig::new();
        for (k, v) in PRODUCER_DEFAULTS {
            config.set(*k, *v);
        }
        for (k, v) in self.kafka.overlaid_by(&self.failure.kafka).iter() {
            // The consumer's own properties mean nothing to a producer (and
            // librdkafka would warn about each).
            if !CONSUMER_ONLY.iter().any(|prefix| k.starts_with(prefix)) {
                config.set(k, v);
            }
        }
        config.set("bootstrap.servers", &self.bootstrap_servers);
        Ok(config)
    }

    /// The batch timeout as a duration.
    pub fn batch_timeout(&self) -> Duration {
        Duration::from_millis(self.batch_timeout_ms)
    }

    /// `handler_timeout_ms` as a duration; `None` when there is no limit.
    pub fn handler_timeout(&self) -> Option<Duration> {
        (self.handler_timeout_ms > 0).then(|| Duration::from_millis(self.handler_timeout_ms))
    }

    /// librdkafka's `max.poll.interval.ms` as this consumer will run it
    /// (kafka-batch's default unless the `kafka` table sets it).
    pub fn max_poll_interval(&self) -> Option<Duration> {
        self.kafka
            .get("max.poll.interval.ms")
            .or_else(|| {
                CONSUMER_DEFAULTS
                    .iter()
                    .find(|(k, _)| *k == "max.poll.interval.ms")
                    .map(|(_, v)| *v)
            })
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis)
    }

    fn check_values(&self) -> Result<(), SettingsError> {
        let positive = [
            ("consumer.batch_size", self.batch_size as u64),
            ("consumer.batch_timeout_ms", self.batch_timeout_ms),
            ("consumer.max_batch_bytes", self.max_batch_bytes as u64),
            ("consumer.prefetch_batches", self.prefetch_batches as u64),
            ("consumer.concurrency", self.concurrency as u64),
            ("consumer.clients", self.clients as u64),
        ];
        for (name, value) in positive {
            if value == 0 {
                return Err(SettingsError::invalid(
                    name,
                    "is 0",
                    "it must be at least 1 (see config/default.toml for the default)",
                ));
            }
        }
        if self.max_in_flight_records < self.batch_size {
            return Err(SettingsError::invalid(
                "consumer.max_in_flight_records",
                format!(
                    "({}) is below consumer.batch_size ({})",
                    self.max_in_flight_records, self.batch_size
                ),
                "a partition paused at this cap could never fill a batch; raise it to at least batch_size (a few batches' worth lets batches of one partition be prepared while one is handled)",
            ));
        }
        if self.commit_interval_ms > MAX_COMMIT_INTERVAL_MS {
            return Err(SettingsError::invalid(
                "consumer.commit_interval_ms",
                format!("({}) is above a day", self.commit_interval_ms),
                "librdkafka commits at most a day apart; a crash would replay everything settled since the last commit. Use a few seconds at most (1000 by default), or 0 to commit after every batch",
            ));
        }
        if let Some(max) = self.max_poll_interval().map(|d| d.as_millis() as u64) {
            if self.revoke_timeout_ms >= max {
                return Err(SettingsError::invalid(
                    "consumer.revoke_timeout_ms",
                    format!("({}) is not below max.poll.interval.ms ({max})", self.revoke_timeout_ms),
                    "a revoke that waits that long would get the consumer evicted; lower it or raise max.poll.interval.ms",
                ));
            }
        }
        self.failure.check(&self.topics)?;
        self.metrics.validate()?;
        self.kafka.check_reserved("consumer.kafka")
    }

    /// Checks that these settings can run a consumer: the values of
    /// [`Settings::validate`] plus brokers, a group id and topics.
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.check_values()?;
        require_brokers(&self.bootstrap_servers, "consumer.bootstrap_servers")?;
        if self.group_id.trim().is_empty() {
            return Err(SettingsError::invalid(
                "consumer.group_id",
                "is empty",
                "name the consumer group ([consumer] group_id = \"my-service\" or KAFKA_BATCH_CONSUMER__GROUP_ID)",
            ));
        }
        if self.topics.is_empty() || self.topics.iter().any(|t| t.trim().is_empty()) {
            return Err(SettingsError::invalid(
                "consumer.topics",
                "is empty or holds an empty name",
                "list the topics to consume ([consumer] topics = [\"events\"] or KAFKA_BATCH_CONSUMER__TOPICS=events)",
            ));
        }
        Ok(())
    }

    /// The librdkafka configuration: kafka-batch's defaults, then the
    /// pass-through properties, then brokers and group.
    pub fn client_config(&self) -> Result<rdkafka::ClientConfig, SettingsError> {
        self.validate()?;
        let mut config = rdkafka::ClientConfig::new();
        for (k, v) in CONSUMER_DEFAULTS {
            config.set(*k, *v);
        }
        if let Some(interval) = self.metrics.statistics_interval(&self.kafka) {
            config.set("statistics.interval.ms", interval.to_string());
        }
        for (k, v) in self.kafka.iter() {
            config.set(k, v);
        }
        if self.commit && self.commit_interval_ms > 0 {
            // librdkafka's interval commit, of only what the poller stored:
            // each partition's settled watermark (`enable.auto.offset.store`
            // stays false, so nothing read is stored before it is settled).
            config.set("enable.auto.commit", "true").set(
                "auto.commit.interval.ms",
                self.commit_interval_ms.to_string(),
            );
        }
        config
            .set("bootstrap.servers", &self.bootstrap_servers)
            .set("group.id", &self.group_id);
        Ok(config)
    }
}

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

/// librdkafka properties passed through as they are (`"fetch.max.bytes" = 1048576`).
///
/// Names are normalised: `_` becomes `.`, so that an environment variable
/// (which cannot hold a dot) can name any property. Values may be strings,
/// numbers or booleans.
///
/// ```
/// use kafka_batch::settings::KafkaProperties;
///
/// let mut props = KafkaProperties::default();
/// props.set("fetch_max_bytes", "2097152"); // as an environment variable writes it
/// assert_eq!(props.get("fetch.max.bytes"), Some("2097152"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KafkaProperties(BTreeMap<String, String>);

impl KafkaProperties {
    /// Sets a property.
    pub fn set(&mut self, name: &str, value: impl Into<String>) -> &mut Self {
        self.0.insert(normalise(name), value.into());
        self
    }

    /// The value of a property, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.get(&normalise(name)).map(String::as_str)
    }

    /// Every property, in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The properties as `name=value` pairs for a log line, with the value
    /// of every property that may hold a secret (a password, a key, a
    /// token, an OAuth secret or config) replaced by `<redacted>`.
    ///
    /// ```
    /// use kafka_batch::settings::KafkaProperties;
    ///
    /// let mut props = KafkaProperties::default();
    /// props.set("sasl.password", "hunter2").set("fetch.min.bytes", "1");
    /// assert_eq!(props.redacted(), "fetch.min.bytes=1 sasl.password=<redacted>");
    /// ```
    pub fn redacted(&self) -> String {
        const SECRET: &[&str] = &[
            "password",
            "secret",
            "key.pem",
            "token",
            "oauthbearer.config",
            "jaas",
        ];
        self.0
            .iter()
            .map(|(k, v)| {
                if SECRET.iter().any(|s| k.contains(s)) {
                    format!("{k}=<redacted>")
                } else {
                    format!("{k}={v}")
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn overlaid_by(&self, over: &KafkaProperties) -> KafkaProperties {
        let mut merged = self.0.clone();
        merged.extend(over.0.iter().map(|(k, v)| (k.clone(), v.clone())));
        KafkaProperties(merged)
    }

    fn check_reserved(&self, table: &str) -> Result<(), SettingsError> {
        for (name, why) in RESERVED {
            if let Some(value) = self.0.get(*name) {
                if *name == "enable.auto.commit" && value == "false" {
                    continue;
                }
                return Err(SettingsError::invalid(
                    format!("{table}.\"{name}\""),
                    format!("= {value:?} cannot be passed through"),
                    *why,
                ));
            }
        }
        Ok(())
    }
}

fn normalise(name: &str) -> String {
    name.trim().replace('_', ".")
}

impl<'de> Deserialize<'de> for KafkaProperties {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct PropertiesVisitor;
        impl<'de> Visitor<'de> for PropertiesVisitor {
            type Value = KafkaProperties;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a table of librdkafka properties (name = value)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut props = KafkaProperties::default();
                while let Some(name) = map.next_key::<String>()? {
                    let value = map.next_value::<Scalar>()?;
                    props.set(&name, value.0);
                }
                Ok(props)
            }
        }
        d.deserialize_map(PropertiesVisitor)
    }
}

/// A property value: text, number or boolean, kept as librdkafka's text.
struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_char<E: de::Error>(self, v: char) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(ScalarVisitor)
    }
}

/// A list written as a list, or as one comma-separated string (handy in env).
fn list_or_csv<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    struct ListVisitor;
    impl<'de> Visitor<'de> for ListVisitor {
        type Value = Vec<String>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of names or a comma-separated string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            Ok(v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                out.push(item);
            }
            Ok(out)
        }
    }
    d.deserialize_any(ListVisitor)
}

#[cfg(test)]
mod tests;
