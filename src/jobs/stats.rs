//! What a job queue counts: per job name, what was enqueued, is running,
//! succeeded, was retried or went dead; published as metrics too.

use std::collections::BTreeMap;
use std::sync::{Mutex, PoisonError};

use metrics::{counter, gauge};

/// Counts for one job name, since this [`JobQueue`](super::JobQueue) was made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobCounts {
    /// Enqueued through this queue (confirmed by the broker).
    pub enqueued: u64,
    /// Running now in this worker.
    pub running: u64,
    /// Runs that returned `Ok`.
    pub succeeded: u64,
    /// Failed runs sent to the delayed topic to be tried again.
    pub retried: u64,
    /// Jobs written to the dead topic.
    pub dead: u64,
}

/// Jobs waiting on the queue's topics: the worker group's lag.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Waiting {
    /// Records of the active topic not yet committed by the workers.
    pub active: i64,
    /// Records of the delayed topic (retries and scheduled jobs) not yet
    /// committed: most are waiting until they are due.
    pub delayed: i64,
}

/// A job queue's counts ([`JobQueue::stats`](super::JobQueue::stats)).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct JobStats {
    /// Per job name.
    pub jobs: BTreeMap<String, JobCounts>,
    /// What waits on the topics.
    pub waiting: Waiting,
}

impl JobStats {
    /// The counts of one job name (zero for a name never seen).
    pub fn of(&self, name: &str) -> JobCounts {
        self.jobs.get(name).copied().unwrap_or_default()
    }
}

/// What happened to a job, for the counts and the metrics.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Event {
    Enqueued,
    Succeeded,
    Retried,
    Dead(&'static str),
}

/// The counters, shared by the queue's enqueuers and its workers.
pub(crate) struct Counters {
    service: String,
    queue: String,
    counts: Mutex<BTreeMap<String, JobCounts>>,
}

impl Counters {
    pub fn new(service: &str, queue: &str) -> Counters {
        Counters {
            service: service.to_owned(),
            queue: queue.to_owned(),
            counts: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, JobCounts> {
        self.counts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Counts `n` jobs named `job` and publishes the metric.
    pub fn count(&self, job: &str, event: Event, n: u64) {
        let labels = [
            ("service", self.service.clone()),
            ("queue", self.queue.clone()),
            ("job", job.to_owned()),
        ];
        {
            let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            let c = counts.entry(job.to_owned()).or_default();
            match event {
                Event::Enqueued => c.enqueued += n,
                Event::Succeeded => c.succeeded += n,
                Event::Retried => c.retried += n,
                Event::Dead(_) => c.dead += n,
            }
        }
        match event {
            Event::Enqueued => counter!("kafka_batch_jobs_enqueued_total", &labels).increment(n),
            Event::Succeeded => counter!("kafka_batch_jobs_succeeded_total", &labels).increment(n),
            Event::Retried => counter!("kafka_batch_jobs_retried_total", &labels).increment(n),
            Event::Dead(reason) => {
                let mut labels = labels.to_vec();
                labels.push(("reason", reason.to_owned()));
                counter!("kafka_batch_jobs_dead_total", &labels).increment(n);
            }
        }
    }

    /// Counts a run of `job` as running until the guard is dropped, however
    /// the run ends.
    pub fn running<'c>(&'c self, job: &str) -> Running<'c> {
        self.add_running(job, true);
        Running {
            counters: self,
            job: job.to_owned(),
        }
    }

    fn add_running(&self, job: &str, started: bool) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let c = counts.entry(job.to_owned()).or_default();
        c.running = if started {
            c.running + 1
        } else {
            c.running.saturating_sub(1)
        };
        gauge!("kafka_batch_jobs_running", "service" => self.service.clone(), "queue" => self.queue.clone(), "job" => job.to_owned())
            .set(c.running as f64);
    }

    /// Publishes the waiting counts.
    pub fn waiting(&self, waiting: Waiting) {
        for (topic, n) in [("active", waiting.active), ("delayed", waiting.delayed)] {
            gauge!("kafka_batch_jobs_waiting", "service" => self.service.clone(), "queue" => self.queue.clone(), "topic" => topic)
                .set(n as f64);
        }
    }
}

/// A run counted as running (see [`Counters::running`]).
pub(crate) struct Running<'c> {
    counters: &'c Counters,
    job: String,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.counters.add_running(&self.job, false);
    }
}
