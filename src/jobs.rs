//! A job queue on Kafka: named jobs, registered definitions, retries with
//! backoff through a delayed topic, a dead topic, jobs in order by key.
//!
//! It is a layer on the consumer, not a second engine: workers are a
//! [`Consumer`] in a group over the active and delayed
//! topics, with `ordering = "key"` lanes and `concurrency` jobs at once;
//! a job's offset is committed only once it ran `Ok` or what settles it
//! (its retry, its dead record, its result) is written. The delayed topic
//! is the consumer's retry topic: a record there waits until its
//! `kafka-batch-due-ms` header says it is due. Records on every job topic
//! are the usual envelope (item = the [`Job`]) with the failure chain's
//! headers, so `kafka-batch tail`, `kafka-batch dead` and
//! [`Replay`](crate::replay::Replay) read them.
//!
//! ```no_run
//! use kafka_batch::jobs::{Job, JobDefinition, JobQueue};
//! use kafka_batch::Settings;
//! use serde::Deserialize;
//! use serde_json::json;
//!
//! #[derive(Deserialize)]
//! struct Add { a: i64, b: i64 }
//!
//! # async fn run() -> anyhow::Result<()> {
//! let settings = Settings::load()?; // the [jobs] table names the queue
//! let mut queue = JobQueue::new(&settings)?;
//! queue.register_typed(JobDefinition::new("add", async |add: Add| anyhow::Ok(add.a + add.b)).retries(3));
//! println!("{}", queue.init().await?); // creates the three topics, once
//! queue.enqueue(Job::new("add", json!({"a": 1, "b": 2}))).await?;
//! queue.run_until_shutdown().await?; // until SIGINT or SIGTERM
//! # Ok(()) }
//! ```
//!
//! # Retries and the dead topic
//!
//! A run that fails (an error, a panic, its definition's `timeout`) is
//! written to the delayed topic, due after `backoff.wait(attempt)`, until
//! it ran `retries + 1` times; then it goes to the dead topic with the
//! error, the attempts and the time. So do jobs whose name no definition
//! has (`unknown_job`) and, for [`JobQueue::register_typed`], jobs whose
//! arguments do not fit the type (`bad_args`): retrying cannot help them.
//! [`JobQueue::dead`] lists the dead topic and [`JobQueue::retry_dead`]
//! puts jobs back on the active topic, each with a fresh set of retries.
//!
//! # When a delayed job runs
//!
//! Never before it is due. How much later: a delayed partition is read in
//! offset order, and a record not due yet holds its partition (the
//! consumer pauses it, and resumes it when the record is due), so a job
//! waits for the records before it on its partition. So it runs at most
//! this much after it is due:
//!
//! - until the latest due time of the records before it on its delayed
//!   partition (a job scheduled far ahead holds up the ones behind it;
//!   retries of one definition are written with growing waits, so among
//!   themselves this is usually nothing; more delayed partitions spread it);
//! - plus up to librdkafka's `fetch.wait.max.ms` (500 ms by default): the
//!   resumed partition joins the next fetch request, after the one in flight;
//! - plus the time the jobs before it in its lane take, when all
//!   `concurrency` slots are busy.
//!
//! # Order
//!
//! Jobs with the same key run one at a time, in the order they were
//! enqueued, and jobs of different keys run side by side; a job without a
//! key is keyed by its id (a [`JobDefinition::fifo`] definition's jobs
//! without a key, by its name, when the enqueuing queue registered it). A
//! retry goes through the delayed topic, so later jobs of its key may run
//! before it: FIFO holds for first runs.
//!
//! # When a write fails
//!
//! If writing a retry, a dead job or a result fails, the job is not
//! committed and goes through the consumer's own failure chain: the
//! delayed topic once, retries in place, then the dead topic (its reason
//! `handler`); it may run again meanwhile (at least once).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;

use crate::consumer::{Consumer, ConsumerHandle};
use crate::error::Error;
use crate::failure::headers;
use crate::failure::record::owned_headers;
use crate::producer::{Delivery, Producer};
use crate::settings::{
    ConsumerSettings, DeadLetterSettings, FailurePolicy, FailureSettings, HandlingOrder,
    RetryTopicSettings, Settings,
};

mod definition;
mod job;
mod stats;
mod topics;
mod worker;

pub use definition::{JobDefinition, JobFuture, Perform, DEFAULT_BACKOFF, DEFAULT_RETRIES};
pub use job::{DeadJob, Job};
pub use stats::{JobCounts, JobStats, Waiting};
pub use topics::InitReport;

use definition::Registered;
use stats::{Counters, Event};
use worker::Worker;

/// A job queue: enqueues jobs, and runs the ones its definitions name.
///
/// One process may only enqueue (register nothing, never `run`), only
/// work, or both. See the [module docs](self).
pub struct JobQueue {
    settings: Settings,
    producer: Arc<Producer>,
    counters: Arc<Counters>,
    definitions: HashMap<String, Arc<Registered>>,
    running: Mutex<Vec<ConsumerHandle>>,
}

impl std::fmt::Debug for JobQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.definitions.keys().collect();
        names.sort();
        f.debug_struct("JobQueue")
            .field("queue", &self.settings.jobs.queue)
            .field("definitions", &names)
            .finish_non_exhaustive()
    }
}

impl JobQueue {
    /// A queue from the `[jobs]` table and the brokers and `kafka` tables
    /// of `settings`. Creates the producer; joins no group until `run`.
    pub fn new(settings: &Settings) -> Result<JobQueue, Error> {
        settings.jobs.validate()?;
        Ok(JobQueue {
            producer: Arc::new(Producer::new(&settings.producer)?),
            counters: Arc::new(Counters::new(&settings.service, &settings.jobs.queue)),
            settings: settings.clone(),
            definitions: HashMap::new(),
            running: Mutex::new(Vec::new()),
        })
    }

    /// Creates the active, delayed and dead topics (and the results topic
    /// when set) that do not exist yet, with `jobs.partitions` partitions,
    /// through the Admin API. Safe to call from every process at start.
    pub async fn init(&self) -> Result<InitReport, Error> {
        topics::init(&self.settings).await
    }

    /// Registers a definition whose `perform` takes the [`Job`]. A later
    /// definition of the same name replaces it.
    pub fn register(&mut self, definition: JobDefinition) -> &mut Self {
        let name = definition.name.clone();
        self.definitions
            .insert(name, Arc::new(Registered::untyped(definition)));
        self
    }

    /// Registers a definition whose `perform` takes the job's arguments as
    /// `A` (recommended): a job whose arguments do not fit goes to the dead
    /// topic as `bad_args`, without a run.
    pub fn register_typed<A: DeserializeOwned + 'static>(
        &mut self,
        definition: JobDefinition<A>,
    ) -> &mut Self {
        let name = definition.name.clone();
        self.definitions
            .insert(name, Arc::new(Registered::typed(definition)));
        self
    }

    /// Writes a job to the active topic; returns once the broker has it.
    pub async fn enqueue(&self, job: Job) -> Result<Delivery, Error> {
        let mut deliveries = self.enqueue_batch(vec![job]).await?;
        deliveries
            .pop()
            .ok_or_else(|| Error::Internal("a one-job enqueue returned no delivery".into()))
    }

    /// Writes jobs to the active topic; returns once the broker has each.
    /// On an error, the [`ProduceError`](crate::producer::ProduceError)
    /// names the jobs not written (by position).
    pub async fn enqueue_batch(
        &self,
        jobs: impl IntoIterator<Item = Job>,
    ) -> Result<Vec<Delivery>, Error> {
        self.write(&self.settings.jobs.active(), jobs, None).await
    }

    /// Writes a job to the delayed topic, to run at `at` and not before
    /// (see the [module docs](self) for how much later at most).
    pub async fn enqueue_at(&self, job: Job, at: impl Into<SystemTime>) -> Result<Delivery, Error> {
        let due_ms = at
            .into()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut deliveries = self
            .write(&self.settings.jobs.delayed(), [job], Some(due_ms))
            .await?;
        deliveries
            .pop()
            .ok_or_else(|| Error::Internal("a one-job enqueue returned no delivery".into()))
    }

    /// Writes a job to the delayed topic, to run `delay` from now.
    pub async fn enqueue_in(&self, job: Job, delay: Duration) -> Result<Delivery, Error> {
        self.enqueue_at(job, SystemTime::now() + delay).await
    }

    async fn write(
        &self,
        topic: &str,
        jobs: impl IntoIterator<Item = Job>,
        due_ms: Option<i64>,
    ) -> Result<Vec<Delivery>, Error> {
        let jobs: Vec<Job> = jobs
            .into_iter()
            .map(|mut job| {
                // A FIFO definition's jobs without a key keep their order by name.
                if job.key.is_none() && self.definitions.get(&job.name).is_some_and(|d| d.fifo) {
                    job.key = Some(job.name.clone());
                }
                job
            })
            .collect();
        let messages: Vec<_> = jobs.iter().map(Job::message).collect();
        let added: Vec<(&str, String)> = due_ms
            .map(|due| {
                vec![
                    (headers::DUE_MS, due.to_string()),
                    (headers::ATTEMPTS, "0".to_owned()),
                ]
            })
            .unwrap_or_default();
        let deliveries = self
            .producer
            .produce_batch_with_headers(topic, &messages, |_| {
                (!added.is_empty()).then(|| owned_headers(&[], false, &added))
            })
            .await?;
        for job in &jobs {
            self.counters.count(&job.name, Event::Enqueued, 1);
        }
        Ok(deliveries)
    }

    /// The consumer settings of this queue's workers: the `[consumer]`
    /// table's client properties, with the queue's topics, group, lanes and
    /// failure chain.
    fn worker_settings(&self) -> ConsumerSettings {
        let jobs = &self.settings.jobs;
        let mut settings = self.settings.consumer.clone();
        settings.group_id = jobs.group();
        settings.topics = vec![jobs.active()];
        // One job per batch: each is settled (and committed) on its own, and
        // `concurrency` of them run at once, one at a time per key.
        settings.batch_size = 1;
        settings.concurrency = jobs.concurrency;
        settings.ordering = HandlingOrder::Key;
        settings.latest_only = false;
        settings.commit = true;
        // A group's first worker reads what was enqueued before it started
        // (librdkafka's default, `latest`, would skip those jobs), unless
        // the `kafka` table says otherwise.
        if settings.kafka.get("auto.offset.reset").is_none() {
            settings.kafka.set("auto.offset.reset", "earliest");
        }
        settings.failure = FailureSettings {
            // The delayed topic is the chain's retry topic, so the consumer
            // holds each record there until it is due. The jobs' own
            // retries are written by the worker; this chain only takes a
            // job whose settling write failed.
            policies: vec![
                FailurePolicy::RetryTopic,
                FailurePolicy::Retry,
                FailurePolicy::DeadLetter,
            ],
            retry_topic: RetryTopicSettings {
                topic: jobs.delayed(),
                retries: 1,
                ..RetryTopicSettings::default()
            },
            dead_letter: DeadLetterSettings { topic: jobs.dead() },
            ..std::mem::take(&mut settings.failure)
        };
        settings
    }

    /// Runs the registered definitions' jobs until [`JobQueue::shutdown`]
    /// (or a failure that stops the consumer), then returns once the jobs
    /// running are settled and committed. Call it from several tasks (or
    /// processes) for more workers in the group.
    pub async fn run(&self) -> Result<(), Error> {
        self.run_with(false).await
    }

    /// [`JobQueue::run`], shutting down on SIGINT or SIGTERM.
    pub async fn run_until_shutdown(&self) -> Result<(), Error> {
        self.run_with(true).await
    }

    async fn run_with(&self, on_signals: bool) -> Result<(), Error> {
        let settings = self.worker_settings();
        let consumer = Consumer::new(&settings)?;
        let handle = consumer.handle();
        if on_signals {
            handle.shutdown_on_signals();
        }
        self.running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(handle.clone());
        let worker = Worker {
            definitions: self.definitions.clone(),
            producer: Arc::clone(&self.producer),
            counters: Arc::clone(&self.counters),
            delayed_topic: self.settings.jobs.delayed(),
            dead_topic: self.settings.jobs.dead(),
            results_topic: self.settings.jobs.results().map(str::to_owned),
            group: settings.group_id.clone(),
        };
        tracing::info!(queue = %self.settings.jobs.queue, jobs = ?self.definitions.keys().collect::<Vec<_>>(), "job workers starting");
        work(consumer, worker).await
    }

    /// Asks every running worker of this queue to stop: the jobs running
    /// finish and are committed, no other starts.
    pub fn shutdown(&self) {
        for handle in self
            .running
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            handle.shutdown();
        }
    }

    /// The counts per job name since this queue was made, and what waits on
    /// the active and delayed topics (asks the broker for the workers'
    /// group lag).
    pub async fn stats(&self) -> Result<JobStats, Error> {
        let waiting = topics::waiting(&self.settings).await?;
        self.counters.waiting(waiting);
        Ok(JobStats {
            jobs: self.counters.snapshot(),
            waiting,
        })
    }

    /// The counts per job name since this queue was made, without asking
    /// the broker (see [`JobQueue::stats`] for what waits too).
    pub fn counts(&self) -> std::collections::BTreeMap<String, JobCounts> {
        self.counters.snapshot()
    }

    /// Every job on the dead topic ([`dead`]).
    pub async fn dead(&self) -> Result<Vec<DeadJob>, Error> {
        dead(&self.settings).await
    }

    /// Puts dead jobs back on the active topic, as they were enqueued (with
    /// a fresh set of retries): the ones `which` selects, by id
    /// (`&["id-1", "id-2"]`, a `Vec<String>`) or by a filter
    /// (`|dead: &DeadJob| dead.job.name == "mail"`). Returns how many were
    /// put back. The dead topic is a log: they stay listed there.
    pub async fn retry_dead(&self, which: impl DeadSelection) -> Result<usize, Error> {
        retry_dead(&self.settings, which).await
    }
}

/// Runs the worker's handler on the consumer until it stops.
async fn work(consumer: Consumer, worker: Worker) -> Result<(), Error> {
    let worker = Arc::new(worker);
    consumer
        .process(async move |batch| worker.handle(batch).await)
        .await
}

/// Puts the dead jobs `which` selects back on the active topic of the
/// `[jobs]` table in `settings` (see [`JobQueue::retry_dead`]), through
/// [`Replay`](crate::replay::Replay): the records as they were enqueued,
/// without the failure headers. Returns how many were put back.
pub async fn retry_dead(settings: &Settings, which: impl DeadSelection) -> Result<usize, Error> {
    let topic = settings.jobs.dead();
    let selects = which.into_filter();
    let replay = crate::replay::Replay::new(&settings.producer.bootstrap_servers, &topic)
        .kafka(&settings.kafka)
        .to_topic(&settings.jobs.active())
        .matching(move |dead| DeadJob::from_record(&topic, dead).is_some_and(|job| selects(&job)));
    Ok(replay.run().await?.replayed)
}

/// Every job on the dead topic of the `[jobs]` table in `settings`, oldest
/// first per partition (records on it that hold no job are left out:
/// `kafka-batch dead` shows those).
pub async fn dead(settings: &Settings) -> Result<Vec<DeadJob>, Error> {
    let topic = settings.jobs.dead();
    let replay = crate::replay::Replay::new(&settings.producer.bootstrap_servers, &topic)
        .kafka(&settings.kafka);
    let records = tokio::task::spawn_blocking(move || replay.read())
        .await
        .map_err(|e| Error::Internal(format!("the dead topic's reader failed: {e}")))??;
    let topic = settings.jobs.dead();
    Ok(records
        .iter()
        .filter_map(|d| DeadJob::from_record(&topic, d))
        .collect())
}

/// Which dead jobs [`JobQueue::retry_dead`] puts back: job ids (`&["id-1",
/// "id-2"]`, a `Vec<String>`, a slice of either) or a filter
/// `Fn(&DeadJob) -> bool`.
///
/// ```no_run
/// use kafka_batch::jobs::{DeadJob, JobQueue};
///
/// # async fn retry(queue: &JobQueue, ids: Vec<String>) -> Result<(), kafka_batch::Error> {
/// queue.retry_dead(&["0f3c9a", "7d21b4"]).await?;
/// queue.retry_dead(ids.as_slice()).await?;
/// let put_back = queue.retry_dead(|dead: &DeadJob| dead.reason == "unknown_job").await?;
/// println!("{put_back} jobs back on the active topic");
/// # Ok(()) }
/// ```
pub trait DeadSelection {
    /// The selection as a filter.
    fn into_filter(self) -> Box<dyn Fn(&DeadJob) -> bool + Send + Sync>;
}

impl<F: Fn(&DeadJob) -> bool + Send + Sync + 'static> DeadSelection for F {
    fn into_filter(self) -> Box<dyn Fn(&DeadJob) -> bool + Send + Sync> {
        Box::new(self)
    }
}

/// Job ids, owned so the filter outlives the caller's list.
fn by_ids<'a>(
    ids: impl IntoIterator<Item = &'a str>,
) -> Box<dyn Fn(&DeadJob) -> bool + Send + Sync> {
    let ids: std::collections::HashSet<String> = ids.into_iter().map(str::to_owned).collect();
    Box::new(move |dead| ids.contains(&dead.job.id))
}

impl DeadSelection for Vec<String> {
    fn into_filter(self) -> Box<dyn Fn(&DeadJob) -> bool + Send + Sync> {
        by_ids(self.iter().map(String::as_str))
    }
}

impl DeadSelection for &[String] {
    fn into_filter(self) -> Box<dyn Fn(&DeadJob) -> bool + Send + Sync> {
        by_ids(self.iter().map(String::as_str))
    }
}

impl DeadSelection for &[&str] {
    fn into_filter(self) -> Box<dyn Fn(&DeadJob) -> bool + Send + Sync> {
        by_ids(self.iter().copied())
    }
}

impl<const N: usize> DeadSelection for [&str; N] {
    fn into_filter(self) -> Box<dyn Fn(&DeadJob) -> bool + Send + Sync> {
        by_ids(self)
    }
}

impl<const N: usize> DeadSelection for &[&str; N] {
    fn into_filter(self) -> Box<dyn Fn(&DeadJob) -> bool + Send + Sync> {
        by_ids(self.iter().copied())
    }
}
