//! The `[consumer.failure]` table: what happens to a message the handler
//! failed, or a record that could not be decoded.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use super::{KafkaProperties, SettingsError};

/// One step of the failure chain (`consumer.failure.policies`).
///
/// Retry steps hand a failed message to the handler again, up to their
/// number of retries, then pass it to the next step; `fail`, `dead_letter`
/// and `skip` end the chain, and a chain that ends with a retry step ends
/// with `fail`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Stop the consumer and return the error from `process`; records from
    /// the failed one on are not committed.
    Fail,
    /// Seek the failed record's partition back and deliver it again after a
    /// backoff (`consumer.failure.retry`). The partition waits meanwhile;
    /// the others keep flowing.
    Retry,
    /// Produce the failed record to the delayed retry topic
    /// (`consumer.failure.retry_topic`) and commit past it; it is handed to
    /// the handler again when due, while its partition keeps flowing.
    RetryTopic,
    /// Produce the record unchanged, with failure headers, to the dead-letter
    /// topic (`consumer.failure.dead_letter`), and commit past it once written.
    DeadLetter,
    /// Log, count, and commit past the record.
    Skip,
}

impl FailurePolicy {
    /// The name used in settings.
    pub fn name(self) -> &'static str {
        match self {
            FailurePolicy::Fail => "fail",
            FailurePolicy::Retry => "retry",
            FailurePolicy::RetryTopic => "retry_topic",
            FailurePolicy::DeadLetter => "dead_letter",
            FailurePolicy::Skip => "skip",
        }
    }

    /// True for the steps that end the chain.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            FailurePolicy::Fail | FailurePolicy::DeadLetter | FailurePolicy::Skip
        )
    }
}

impl fmt::Display for FailurePolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FailurePolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "fail" => Ok(FailurePolicy::Fail),
            "retry" => Ok(FailurePolicy::Retry),
            "retry_topic" => Ok(FailurePolicy::RetryTopic),
            "dead_letter" => Ok(FailurePolicy::DeadLetter),
            "skip" => Ok(FailurePolicy::Skip),
            other => Err(format!(
                "unknown failure policy {other:?}: expected fail, retry, retry_topic, dead_letter or skip"
            )),
        }
    }
}

/// What happens to failed messages and undecodable records (the
/// `[consumer.failure]` table).
///
/// ```
/// use kafka_batch::ConsumerSettings;
/// use kafka_batch::settings::FailurePolicy;
///
/// let mut settings = ConsumerSettings::new("localhost:9092", "enricher", &["events"]);
/// settings.failure.policies = vec![FailurePolicy::Retry, FailurePolicy::DeadLetter];
/// settings.failure.dead_letter.topic = "events.dead".into();
/// assert!(settings.validate().is_ok());
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FailureSettings {
    /// The chain, in order. Default: `["fail"]`.
    #[serde(deserialize_with = "policies_list")]
    pub policies: Vec<FailurePolicy>,
    /// The `retry` step (in place).
    pub retry: RetrySettings,
    /// The `retry_topic` step (through a delayed topic).
    pub retry_topic: RetryTopicSettings,
    /// The `dead_letter` step.
    pub dead_letter: DeadLetterSettings,
    /// librdkafka properties for the producer that writes to the retry and
    /// dead-letter topics, over the consumer's `kafka` tables.
    pub kafka: KafkaProperties,
}

impl Default for FailureSettings {
    fn default() -> Self {
        FailureSettings {
            policies: vec![FailurePolicy::Fail],
            retry: RetrySettings::default(),
            retry_topic: RetryTopicSettings::default(),
            dead_letter: DeadLetterSettings::default(),
            kafka: KafkaProperties::default(),
        }
    }
}

/// Retry in place (`[consumer.failure.retry]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySettings {
    /// How many times a failed message is delivered again before it goes to
    /// the next step.
    pub retries: u32,
    /// The wait before the first retry, in milliseconds.
    pub backoff_ms: u64,
    /// Each further wait is the previous one times this.
    pub backoff_multiplier: f64,
    /// No wait is longer than this, in milliseconds.
    pub max_backoff_ms: u64,
    /// Each wait is moved at random by up to this fraction of it (0 to 1).
    pub jitter: f64,
}

impl Default for RetrySettings {
    fn default() -> Self {
        RetrySettings {
            retries: 3,
            backoff_ms: 500,
            backoff_multiplier: 2.0,
            max_backoff_ms: 30_000,
            jitter: 0.2,
        }
    }
}

/// Retry through a delayed topic (`[consumer.failure.retry_topic]`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryTopicSettings {
    /// The retry topic. The consumer subscribes to it too.
    pub topic: String,
    /// How many times a message goes through the retry topic before it goes
    /// to the next step.
    pub retries: u32,
    /// The delay before the first retry, in milliseconds.
    pub backoff_ms: u64,
    /// Each further delay is the previous one times this.
    pub backoff_multiplier: f64,
    /// No delay is longer than this, in milliseconds.
    pub max_backoff_ms: u64,
    /// Each delay is moved at random by up to this fraction of it (0 to 1).
    pub jitter: f64,
}

impl Default for RetryTopicSettings {
    fn default() -> Self {
        RetryTopicSettings {
            topic: String::new(),
            retries: 3,
            backoff_ms: 10_000,
            backoff_multiplier: 3.0,
            max_backoff_ms: 3_600_000,
            jitter: 0.1,
        }
    }
}

/// The dead-letter topic (`[consumer.failure.dead_letter]`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterSettings {
    /// The dead-letter topic.
    pub topic: String,
}

/// A backoff schedule: `initial`, then times `multiplier` each time, at most
/// `max`, each moved at random by up to `jitter` of itself.
///
/// ```
/// use std::time::Duration;
/// use kafka_batch::settings::Backoff;
///
/// let backoff = Backoff { initial: Duration::from_secs(1), multiplier: 2.0, max: Duration::from_secs(5), jitter: 0.0 };
/// let waits: Vec<u64> = (1..=4).map(|retry| backoff.nominal(retry).as_secs()).collect();
/// assert_eq!(waits, [1, 2, 4, 5]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Backoff {
    /// The first wait.
    pub initial: Duration,
    /// The growth factor.
    pub multiplier: f64,
    /// The longest wait.
    pub max: Duration,
    /// The random spread, as a fraction of the wait.
    pub jitter: f64,
}

impl Backoff {
    /// The wait before retry number `retry` (1 for the first), without jitter.
    pub fn nominal(&self, retry: u32) -> Duration {
        let exponent = retry.saturating_sub(1).min(1024) as i32;
        let secs = self.initial.as_secs_f64() * self.multiplier.powi(exponent);
        let max = self.max.as_secs_f64();
        Duration::from_secs_f64(if secs.is_finite() { secs.min(max) } else { max })
    }

    /// The wait before retry number `retry`, with jitter drawn from `unit`
    /// (a number in `[0, 1)`): within `nominal × (1 ± jitter)`, never past `max`.
    pub fn wait(&self, retry: u32, unit: f64) -> Duration {
        let nominal = self.nominal(retry).as_secs_f64();
        let spread = nominal * self.jitter * (2.0 * unit.clamp(0.0, 1.0) - 1.0);
        Duration::from_secs_f64((nominal + spread).clamp(0.0, self.max.as_secs_f64()))
    }
}

impl Backoff {
    fn from_settings(initial_ms: u64, multiplier: f64, max_ms: u64, jitter: f64) -> Backoff {
        Backoff {
            initial: Duration::from_millis(initial_ms),
            multiplier,
            max: Duration::from_millis(max_ms),
            jitter,
        }
    }
}

impl RetrySettings {
    /// The backoff schedule of these settings.
    pub fn backoff(&self) -> Backoff {
        Backoff::from_settings(
            self.backoff_ms,
            self.backoff_multiplier,
            self.max_backoff_ms,
            self.jitter,
        )
    }
}

impl RetryTopicSettings {
    /// The delay schedule of these settings.
    pub fn backoff(&self) -> Backoff {
        Backoff::from_settings(
            self.backoff_ms,
            self.backoff_multiplier,
            self.max_backoff_ms,
            self.jitter,
        )
    }
}

fn check_backoff(
    table: &str,
    retries: u32,
    backoff_ms: u64,
    multiplier: f64,
    max_backoff_ms: u64,
    jitter: f64,
) -> Result<(), SettingsError> {
    if retries == 0 {
        return Err(SettingsError::invalid(
            format!("{table}.retries"),
            "is 0",
            "give at least 1, or take the step out of consumer.failure.policies",
        ));
    }
    if !multiplier.is_finite() || multiplier < 1.0 {
        return Err(SettingsError::invalid(
            format!("{table}.backoff_multiplier"),
            format!("is {multiplier}"),
            "use 1 (a fixed wait) or more (a growing wait)",
        ));
    }
    if !(0.0..=1.0).contains(&jitter) {
        return Err(SettingsError::invalid(
            format!("{table}.jitter"),
            format!("is {jitter}"),
            "use a fraction from 0 (none) to 1 (up to the whole wait)",
        ));
    }
    if backoff_ms > max_backoff_ms {
        return Err(SettingsError::invalid(
            format!("{table}.backoff_ms"),
            format!("({backoff_ms}) is above max_backoff_ms ({max_backoff_ms})"),
            "raise max_backoff_ms or lower backoff_ms",
        ));
    }
    Ok(())
}

impl FailureSettings {
    /// True when the chain holds `policy`.
    pub fn has(&self, policy: FailurePolicy) -> bool {
        self.policies.contains(&policy)
    }

    /// The retry topic the consumer writes to and reads from, when the
    /// chain has `retry_topic`.
    pub fn retry_topic_name(&self) -> Option<&str> {
        self.has(FailurePolicy::RetryTopic)
            .then_some(self.retry_topic.topic.as_str())
    }

    /// Checks the chain and the tables of the steps it uses against the
    /// consumer's `topics`.
    pub(super) fn check(&self, topics: &[String]) -> Result<(), SettingsError> {
        const SETTING: &str = "consumer.failure.policies";
        if self.policies.is_empty() {
            return Err(SettingsError::invalid(
                SETTING,
                "is empty",
                "name at least one policy, e.g. [\"fail\"] (the default)",
            ));
        }
        for (i, policy) in self.policies.iter().enumerate() {
            if self.policies[..i].contains(policy) {
                return Err(SettingsError::invalid(
                    SETTING,
                    format!("names {policy} twice"),
                    "name each policy once; raise its retries instead",
                ));
            }
            if policy.is_terminal() && i + 1 < self.policies.len() {
                return Err(SettingsError::invalid(
                    SETTING,
                    format!("has {policy} before other steps"),
                    "fail, dead_letter and skip end the chain: put the one you want last",
                ));
            }
        }
        let subscribed = |topic: &str| topics.iter().any(|t| t == topic);
        if self.has(FailurePolicy::Retry) {
            let r = &self.retry;
            check_backoff(
                "consumer.failure.retry",
                r.retries,
                r.backoff_ms,
                r.backoff_multiplier,
                r.max_backoff_ms,
                r.jitter,
            )?;
        }
        if self.has(FailurePolicy::RetryTopic) {
            let r = &self.retry_topic;
            if r.topic.trim().is_empty() {
                return Err(SettingsError::invalid(
                    "consumer.failure.retry_topic.topic",
                    "is empty but the chain has retry_topic",
                    "name the delayed retry topic, e.g. \"events.retry\"",
                ));
            }
            if subscribed(&r.topic) {
                return Err(SettingsError::invalid(
                    "consumer.failure.retry_topic.topic",
                    format!("({}) is one of consumer.topics", r.topic),
                    "use a topic of its own: the consumer subscribes to it by itself",
                ));
            }
            check_backoff(
                "consumer.failure.retry_topic",
                r.retries,
                r.backoff_ms,
                r.backoff_multiplier,
                r.max_backoff_ms,
                r.jitter,
            )?;
        }
        if self.has(FailurePolicy::DeadLetter) {
            let topic = &self.dead_letter.topic;
            if topic.trim().is_empty() {
                return Err(SettingsError::invalid(
                    "consumer.failure.dead_letter.topic",
                    "is empty but the chain has dead_letter",
                    "name the dead-letter topic, e.g. \"events.dead\"",
                ));
            }
            if subscribed(topic)
                || (self.has(FailurePolicy::RetryTopic) && *topic == self.retry_topic.topic)
            {
                return Err(SettingsError::invalid(
                    "consumer.failure.dead_letter.topic",
                    format!("({topic}) is a topic this consumer reads"),
                    "use a topic of its own, or dead letters would be consumed again",
                ));
            }
        }
        self.kafka.check_reserved("consumer.failure.kafka")
    }
}

/// The policies as a list, or one comma-separated string (handy in env).
fn policies_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<FailurePolicy>, D::Error> {
    struct PoliciesVisitor;
    impl<'de> Visitor<'de> for PoliciesVisitor {
        type Value = Vec<FailurePolicy>;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a list of failure policies or a comma-separated string")
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| s.parse().map_err(E::custom))
                .collect()
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            let mut out = Vec::new();
            while let Some(item) = seq.next_element::<String>()? {
                out.push(item.parse().map_err(de::Error::custom)?);
            }
            Ok(out)
        }
    }
    d.deserialize_any(PoliciesVisitor)
}
