//! [`Job`], what is queued, and [`DeadJob`], a job on the dead topic with
//! why it is there.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::envelope::Message;

/// One job: a name that picks its definition, its arguments, and an
/// optional key that keeps jobs in order.
///
/// Carried as the `item` of the same envelope as every other message, so
/// `kafka-batch tail` and the Python fleet's tools read job topics too.
/// The record key is the job's key when it has one, else its id: jobs of
/// one key run one at a time, in the order they were enqueued.
///
/// ```
/// use kafka_batch::jobs::Job;
/// use serde_json::json;
///
/// let job = Job::new("send_mail", json!({"to": "ada@example.com"})).key("ada");
/// assert_eq!(job.name, "send_mail");
/// assert_eq!(job.key.as_deref(), Some("ada"));
/// assert_eq!(job.id.len(), 32, "a fresh random id");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Unique per job: `retry_dead` and the results topic name jobs by it.
    pub id: String,
    /// Which registered definition runs it.
    pub name: String,
    /// Its arguments, as the definition expects them.
    #[serde(default)]
    pub args: Value,
    /// Jobs with the same key run one at a time, in enqueue order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
}

impl Job {
    /// A job with a fresh random id and no key.
    pub fn new(name: impl Into<String>, args: Value) -> Job {
        Job {
            id: fresh_id(),
            name: name.into(),
            args,
            key: None,
        }
    }

    /// A job whose arguments are `args` serialized (for a definition
    /// registered with [`JobQueue::register_typed`](super::JobQueue::register_typed)).
    pub fn with_args(name: impl Into<String>, args: &impl Serialize) -> serde_json::Result<Job> {
        Ok(Job::new(name, serde_json::to_value(args)?))
    }

    /// Sets the key: jobs with the same key run in enqueue order.
    pub fn key(mut self, key: impl Into<String>) -> Job {
        self.key = Some(key.into());
        self
    }

    /// The arguments as `A`.
    pub fn args_as<A: DeserializeOwned>(&self) -> serde_json::Result<A> {
        A::deserialize(&self.args)
    }

    /// The record key: the job's key, else its id.
    pub(crate) fn record_key(&self) -> &str {
        self.key.as_deref().unwrap_or(&self.id)
    }

    /// The job as the message written to a job topic.
    pub(crate) fn message(&self) -> Message<&Job> {
        Message::new(self.record_key(), self)
    }
}

/// A fresh 128-bit id, as 32 hex digits, from two draws of the
/// consumer's random source (unique without a dependency for it).
fn fresh_id() -> String {
    use crate::consumer::random_u64;
    format!("{:016x}{:016x}", random_u64(), random_u64())
}

/// A job on the dead topic, with what the worker that gave up on it wrote.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadJob {
    /// The job, as it was enqueued.
    pub job: Job,
    /// Why: `handler` (it failed and its retries are used up),
    /// `unknown_job` (no definition of that name), `bad_args` (its
    /// arguments do not fit the definition's type), or a decode error's
    /// kind when the record was not a job at all.
    pub reason: String,
    /// The last error's text.
    pub error: String,
    /// Times it ran.
    pub attempts: u32,
    /// When it was given up on (RFC 3339, UTC).
    pub failed_at: String,
    /// Where it is on the dead topic.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
}

impl DeadJob {
    /// The job in a dead record, or `None` when the record holds no job
    /// (an undecodable record the consumer dead-lettered: `kafka-batch
    /// dead` shows those).
    pub(crate) fn from_record(topic: &str, dead: &crate::replay::DeadLetter) -> Option<DeadJob> {
        let (partition, offset, info) = (dead.partition, dead.offset, &dead.info);
        let record = crate::envelope::RawRecord {
            topic,
            partition,
            offset,
            key: dead.key.as_deref(),
            value: dead.value.as_deref(),
        };
        let job = crate::envelope::unpack::<Job>(record, &std::sync::Arc::from(topic))
            .ok()??
            .payload;
        Some(DeadJob {
            job,
            reason: info.reason.clone().unwrap_or_default(),
            error: info.error.clone().unwrap_or_default(),
            attempts: info.attempts,
            failed_at: info.failed_at.clone().unwrap_or_default(),
            partition,
            offset,
        })
    }
}
