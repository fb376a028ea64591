//! The `[jobs]` table: the job queue's topics, its worker group and how
//! many jobs run at once (see [`crate::jobs`]).

use serde::{Deserialize, Serialize};

use super::SettingsError;

/// The job queue's settings (the `[jobs]` table).
///
/// Topic names left empty follow the queue's name: `<queue>.jobs`,
/// `<queue>.delayed` and `<queue>.dead`; the worker group is
/// `<queue>.workers`.
///
/// ```
/// use kafka_batch::settings::JobsSettings;
///
/// let jobs = JobsSettings { queue: "mail".into(), ..JobsSettings::default() };
/// assert_eq!(jobs.active(), "mail.jobs");
/// assert_eq!(jobs.delayed(), "mail.delayed");
/// assert_eq!(jobs.dead(), "mail.dead");
/// assert_eq!(jobs.group(), "mail.workers");
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobsSettings {
    /// The queue's name, which the default topic and group names start with.
    pub queue: String,
    /// The active topic, where jobs wait to run. Default `<queue>.jobs`.
    pub active_topic: String,
    /// The delayed topic: retries and jobs scheduled for later, each held
    /// until it is due. Default `<queue>.delayed`.
    pub delayed_topic: String,
    /// The dead topic: jobs whose retries are used up, unknown job names and
    /// arguments that do not fit. Default `<queue>.dead`.
    pub dead_topic: String,
    /// When set, each job's `Ok` value is written here, keyed by job id.
    pub results_topic: String,
    /// The workers' consumer group. Default `<queue>.workers`.
    pub group_id: String,
    /// Partitions of each topic `JobQueue::init` creates.
    pub partitions: i32,
    /// Replicas of each topic `JobQueue::init` creates (-1: the broker's default).
    pub replication_factor: i32,
    /// Jobs run at once by one worker process.
    pub concurrency: usize,
}

impl Default for JobsSettings {
    fn default() -> Self {
        JobsSettings {
            queue: "default".into(),
            active_topic: String::new(),
            delayed_topic: String::new(),
            dead_topic: String::new(),
            results_topic: String::new(),
            group_id: String::new(),
            partitions: 8,
            replication_factor: -1,
            concurrency: 8,
        }
    }
}

impl JobsSettings {
    fn or_named(&self, set: &str, suffix: &str) -> String {
        if set.trim().is_empty() {
            format!("{}.{suffix}", self.queue)
        } else {
            set.to_owned()
        }
    }

    /// The active topic's name.
    pub fn active(&self) -> String {
        self.or_named(&self.active_topic, "jobs")
    }

    /// The delayed topic's name.
    pub fn delayed(&self) -> String {
        self.or_named(&self.delayed_topic, "delayed")
    }

    /// The dead topic's name.
    pub fn dead(&self) -> String {
        self.or_named(&self.dead_topic, "dead")
    }

    /// The results topic's name, when results are written.
    pub fn results(&self) -> Option<&str> {
        let topic = self.results_topic.trim();
        (!topic.is_empty()).then_some(topic)
    }

    /// The workers' consumer group.
    pub fn group(&self) -> String {
        self.or_named(&self.group_id, "workers")
    }

    /// Checks the values.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.queue.trim().is_empty() {
            return Err(SettingsError::invalid(
                "jobs.queue",
                "is empty",
                "name the queue (its topics are named after it), e.g. \"default\"",
            ));
        }
        let names = [self.active(), self.delayed(), self.dead()];
        if names[0] == names[1] || names[0] == names[2] || names[1] == names[2] {
            return Err(SettingsError::invalid(
                "jobs.active_topic",
                format!(
                    "the active, delayed and dead topics must differ, but they are {names:?}"
                ),
                "give each its own name, or leave them empty to use <queue>.jobs, .delayed and .dead",
            ));
        }
        if self.results().is_some_and(|r| names.iter().any(|n| n == r)) {
            return Err(SettingsError::invalid(
                "jobs.results_topic",
                "is one of the job topics",
                "write results to a topic of their own, e.g. \"<queue>.results\"",
            ));
        }
        if self.partitions < 1 {
            return Err(SettingsError::invalid(
                "jobs.partitions",
                format!("is {}", self.partitions),
                "use 1 or more",
            ));
        }
        if self.replication_factor == 0 || self.replication_factor < -1 {
            return Err(SettingsError::invalid(
                "jobs.replication_factor",
                format!("is {}", self.replication_factor),
                "use 1 or more, or -1 for the broker's default",
            ));
        }
        if self.concurrency == 0 {
            return Err(SettingsError::invalid(
                "jobs.concurrency",
                "is 0",
                "use 1 or more jobs at once",
            ));
        }
        Ok(())
    }
}
