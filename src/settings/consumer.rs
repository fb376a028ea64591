//! The `[consumer]` table: [`ConsumerSettings`], what the consumer does on
//! a gap ([`OnGap`]), and the librdkafka configuration it is built with.

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{
    require_brokers, FailureSettings, HandlingOrder, KafkaProperties, MetricsSettings,
    SettingsError, DEFAULT_SERVICE, PRODUCER_DEFAULTS,
};

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
///
/// [`Settings::load`]: super::Settings::load
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

    pub(super) fn check_values(&self) -> Result<(), SettingsError> {
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
    ///
    /// [`Settings::validate`]: super::Settings::validate
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
