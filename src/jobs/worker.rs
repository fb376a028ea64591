//! The worker's handler: runs each job by its definition and settles it:
//! a result, a retry on the delayed topic, or the dead topic. A job's
//! offset is committed only once what settles it is written.

use std::collections::HashMap;
use std::sync::Arc;

use time::OffsetDateTime;

use super::definition::{Registered, RunFailure};
use super::stats::{Counters, Event};
use super::Job;
use crate::envelope::{format_dt, Message};
use crate::error::Error;
use crate::failure::header_sized;
use crate::failure::record::{owned_headers, FailureHeaders};
use crate::producer::Producer;

/// What every worker of a queue shares.
pub(crate) struct Worker {
    pub definitions: HashMap<String, Arc<Registered>>,
    pub producer: Arc<Producer>,
    pub counters: Arc<Counters>,
    pub delayed_topic: String,
    pub dead_topic: String,
    pub results_topic: Option<String>,
    pub group: String,
}

/// Why a job goes to the dead topic, as its `kafka-batch-reason` header says.
const UNKNOWN_JOB: &str = "unknown_job";
const BAD_ARGS: &str = "bad_args";
const FAILED: &str = "handler";

impl Worker {
    /// Settles every job of the batch, in order (a batch is one key's jobs
    /// or one job). `Err` only when a write failed: the consumer's failure
    /// chain then has the batch, and nothing of it is committed meanwhile.
    pub async fn handle(&self, batch: Vec<Message<Job>>) -> Result<(), Error> {
        for message in &batch {
            self.settle(message).await?;
        }
        Ok(())
    }

    async fn settle(&self, message: &Message<Job>) -> Result<(), Error> {
        let job = &message.payload;
        let attempt = message.attempt();
        let Some(definition) = self.definitions.get(&job.name) else {
            let known: Vec<&str> = self.definitions.keys().map(String::as_str).collect();
            let why = format!(
                "no job definition named {:?} is registered in this worker (it knows {known:?}): \
                 register one and deploy it, then retry_dead",
                job.name
            );
            tracing::warn!(job = %job.id, name = %job.name, "unknown job name: written to the dead topic");
            return self.bury(message, UNKNOWN_JOB, &why, attempt).await;
        };
        let outcome = {
            let _running = self.counters.running(&job.name);
            // A task of its own: jobs run in parallel on the runtime's
            // threads, and one that computes long holds no other up.
            let (definition, job) = (Arc::clone(definition), job.clone());
            let mut task = AbortOnDrop(tokio::spawn(async move { definition.run(job).await }));
            match (&mut task.0).await {
                Ok(outcome) => outcome,
                Err(e) => Err(RunFailure::Failed(format!("the job's task ended: {e}"))),
            }
        };
        match outcome {
            Ok(value) => {
                if let Some(topic) = &self.results_topic {
                    let result = Message::new(job.id.as_str(), value).derived_from(message);
                    self.producer.produce(topic, &result).await?;
                }
                self.counters.count(&job.name, Event::Succeeded, 1);
                Ok(())
            }
            Err(RunFailure::BadArgs(why)) => {
                tracing::warn!(job = %job.id, name = %job.name, error = %why, "job arguments do not fit: written to the dead topic");
                self.bury(message, BAD_ARGS, &why, attempt).await
            }
            Err(RunFailure::Failed(why)) if attempt <= definition.retries => {
                let wait = definition
                    .backoff
                    .wait(attempt, crate::consumer::unit_random());
                // One clock reading for both headers: due minus failed-at is
                // exactly the backoff.
                let failed_at = OffsetDateTime::now_utc();
                let failed_ms = (failed_at.unix_timestamp_nanos() / 1_000_000) as i64;
                let due_ms = failed_ms.saturating_add(wait.as_millis() as i64);
                tracing::info!(job = %job.id, name = %job.name, attempt, wait_ms = wait.as_millis() as u64, error = %why, "job failed: retried through the delayed topic");
                let added = self.failure_headers(
                    message,
                    FAILED,
                    &why,
                    attempt,
                    failed_at,
                    Some((attempt, due_ms)),
                );
                self.write(&self.delayed_topic, message, &added).await?;
                self.counters.count(&job.name, Event::Retried, 1);
                Ok(())
            }
            Err(RunFailure::Failed(why)) => {
                tracing::warn!(job = %job.id, name = %job.name, attempt, error = %why, "job failed and its retries are used up: written to the dead topic");
                self.bury(message, FAILED, &why, attempt).await
            }
        }
    }

    /// Writes the job to the dead topic with why.
    async fn bury(
        &self,
        message: &Message<Job>,
        reason: &'static str,
        why: &str,
        attempt: u32,
    ) -> Result<(), Error> {
        let now = OffsetDateTime::now_utc();
        let added = self.failure_headers(message, reason, why, attempt, now, None);
        self.write(&self.dead_topic, message, &added).await?;
        self.counters
            .count(&message.payload.name, Event::Dead(reason), 1);
        Ok(())
    }

    /// The failure chain's headers, so that `kafka-batch dead`, `Replay` and
    /// the consumer's retry-topic reader read job records as their own.
    fn failure_headers(
        &self,
        message: &Message<Job>,
        reason: &'static str,
        why: &str,
        attempts: u32,
        failed_at: OffsetDateTime,
        retry: Option<(u32, i64)>,
    ) -> Vec<(&'static str, String)> {
        let mut error = why.to_owned();
        header_sized(&mut error);
        FailureHeaders {
            source: message.origin().map(|o| (&*o.topic, o.partition, o.offset)),
            group: &self.group,
            service: self.producer.service(),
            attempts,
            reason,
            error: &error,
            failed_at: &format_dt(failed_at),
            retry,
        }
        .pairs()
    }

    /// Writes the job, as it was enqueued and derived from the record it was
    /// read from, with `added` headers; returns once the broker has it.
    async fn write(
        &self,
        topic: &str,
        message: &Message<Job>,
        added: &[(&str, String)],
    ) -> Result<(), Error> {
        let job = &message.payload;
        let out = job.message().derived_from(message);
        self.producer
            .produce_batch_with_headers(topic, std::slice::from_ref(&out), |_| {
                Some(owned_headers(&[], false, added))
            })
            .await
            .map(drop)
    }
}

/// A job's task, aborted when the worker drops it: a worker dropped
/// without shutdown stops its jobs too (they were not committed, and run
/// again in the group).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
