//! The runner: hands each batch to the handler, sends the messages it failed
//! (and undecodable records) through the failure chain, and reports the
//! outcome to the poller, which commits.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt as _;
use std::panic::AssertUnwindSafe;
use tracing::Instrument;

use super::batch::Batch;
use super::failure_reason;
use super::forward::{Destination, Forwarder, Outgoing};
use super::policy::{unit_random, Action, Chain, ChainState};
use super::state::{Rewind, Shared, ToPoller};
use super::stream::GivenBack;
use crate::envelope::Message;
use crate::error::{BoxError, Error};
use crate::failure::record::KeptRecord;
use crate::failure::{error_text, Failures};
use crate::offsets::TopicPartition;
use crate::settings::ConsumerSettings;

/// One failed record on its way through the chain.
struct Failed<'b> {
    topic: &'b str,
    partition: i32,
    offset: i64,
    reason: &'static str,
    error: String,
    /// Its standing, counting the delivery that failed.
    state: ChainState,
    retryable: bool,
    record: Option<&'b KeptRecord>,
}

pub(super) struct Runner<'s> {
    shared: &'s Shared,
    events: &'s mpsc::Sender<ToPoller>,
    chain: Chain,
    forwarder: Option<Forwarder>,
    /// `consumer.handler_timeout_ms`, when set.
    timeout: Option<Duration>,
    /// `ordering = "key"` with batches at once: a retry in place delivers
    /// the records again from memory instead of rewinding their partition.
    keyed: bool,
}

impl<'s> Runner<'s> {
    pub fn new(
        settings: &ConsumerSettings,
        shared: &'s Shared,
        events: &'s mpsc::Sender<ToPoller>,
    ) -> Result<Runner<'s>, Error> {
        let chain = Chain::new(&settings.failure);
        let forwarder = Forwarder::new(settings, &chain)?;
        Ok(Runner {
            shared,
            events,
            chain,
            forwarder,
            timeout: settings.handler_timeout(),
            keyed: settings.concurrency > 1
                && settings.ordering == crate::settings::HandlingOrder::Key,
        })
    }

    /// True once the consumer is stopping (a shutdown, or a failure).
    pub fn stopping(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    /// Stops every client of the consumer (they share the flag).
    pub fn stop(&self) {
        self.shared.stopping.store(true, Ordering::Release);
    }

    /// Gives a batch back unhandled: it is left uncommitted for the next owner.
    pub fn abandon(&self, batch: u64) {
        self.tell(ToPoller::Abandoned { batch });
    }

    fn tell(&self, event: ToPoller) {
        // The poller outlives the runner; if it stopped, nothing is committed anyway.
        let _ = self.events.send(event);
    }

    /// Runs one batch to its outcome. `Err` stops the consumer: nothing from
    /// the first failed record of each partition on is committed.
    pub async fn run<T, F, E>(&self, handler: &F, mut batch: Batch<T>) -> Result<(), Error>
    where
        F: AsyncFn(Vec<Message<T>>) -> Result<(), E>,
        E: Into<BoxError>,
    {
        let id = batch.id;
        // Records rewound for a retry, or revoked, since the batch was cut
        // will be read again: the handler must not see them now.
        if !batch.drop_released(|tp| self.shared.current_generation(tp)) {
            self.tell(ToPoller::Abandoned { batch: id });
            return Ok(());
        }
        if !batch.has_work() {
            self.tell(ToPoller::Finished { batch: id });
            return Ok(());
        }
        batch.finish_messages();
        let batch_ref = batch.batch_ref().to_string();
        let Batch {
            messages,
            kept,
            rejected,
            ranges,
            ..
        } = batch;
        let outcome = if messages.is_empty() {
            Ok(())
        } else {
            self.shared.running(id, true);
            let outcome =
                run_handler(handler, messages, &batch_ref, self.shared, self.timeout).await;
            self.shared.running(id, false);
            outcome
        };
        // Nothing of a batch whose handler panicked is committed, and none
        // of it goes through the chain: a panic is a bug in the handler, not
        // a verdict on the records, so it stops the consumer like `fail`.
        let error = match outcome {
            Ok(()) => None,
            // A batch stream dropped before handing this batch out: it is
            // left uncommitted, as a batch not started at shutdown is.
            Err(HandlerFailure::Error(error)) if error.is::<GivenBack>() => {
                self.tell(ToPoller::Abandoned { batch: id });
                return Ok(());
            }
            Err(HandlerFailure::Error(error)) => Some(error),
            Err(HandlerFailure::Panicked(message)) => {
                self.tell(ToPoller::Failed {
                    batch: id,
                    rewinds: whole_batch(&ranges),
                });
                return Err(Error::HandlerPanicked {
                    batch: batch_ref,
                    message,
                });
            }
        };

        let mut failed: Vec<Failed<'_>> = Vec::new();
        let mut handler_error = None;
        if let Some(error) = error {
            if kept.is_empty() {
                // The default chain, `fail`: nothing of the batch is committed.
                self.tell(ToPoller::Failed {
                    batch: id,
                    rewinds: whole_batch(&ranges),
                });
                return Err(Error::Handler {
                    batch: batch_ref,
                    source: error,
                });
            }
            let whole = || {
                let text = error_text(error.as_ref());
                (0..kept.len()).map(|i| (i, text.clone())).collect()
            };
            let positions: Vec<(usize, String)> = match Failures::find(error.as_ref()) {
                Some(failures) => match failures
                    .resolve(&kept.iter().map(|k| k.id.as_str()).collect::<Vec<_>>())
                {
                    Ok(positions) => positions,
                    Err(why) => {
                        tracing::warn!(batch = %batch_ref, %why, "the handler's Failures name a message that is not in the batch: the whole batch counts as failed");
                        whole()
                    }
                },
                None => whole(),
            };
            // The rest of the batch was handled.
            let handled = (kept.len() - positions.len()) as u64;
            self.shared
                .stats
                .messages
                .fetch_add(handled, Ordering::Relaxed);
            self.shared.metrics.process_count.increment(handled);
            for (i, text) in positions {
                let k = &kept[i];
                failed.push(Failed {
                    topic: &k.topic,
                    partition: k.partition,
                    offset: k.offset,
                    reason: failure_reason(None),
                    error: text,
                    state: ChainState {
                        attempts: k.state.attempts + 1,
                        ..k.state
                    },
                    retryable: true,
                    record: k.raw.as_ref(),
                });
            }
            handler_error = Some(error);
        }
        for r in &rejected {
            failed.push(Failed {
                topic: &r.error.topic,
                partition: r.error.partition,
                offset: r.error.offset,
                reason: failure_reason(Some(&r.error.kind)),
                error: r.error.to_string(),
                state: ChainState::default(),
                retryable: false,
                record: r.raw.as_ref(),
            });
        }
        if failed.is_empty() {
            self.tell(ToPoller::Finished { batch: id });
            return Ok(());
        }

        let actions: Vec<Action> = failed
            .iter()
            .map(|f| self.chain.decide(f.state, f.retryable, unit_random()))
            .collect();
        let stop = |error: Error| {
            self.tell(ToPoller::Failed {
                batch: id,
                rewinds: first_failed_per_partition(&failed),
            });
            Err(error)
        };
        if actions.contains(&Action::Fail) {
            let source = handler_error.unwrap_or_else(|| "a record failed".into());
            tracing::error!(batch = %batch_ref, failed = failed.len(), "failure policy `fail`: the consumer stops; nothing from the first failed record of each partition on is committed");
            return stop(Error::Handler {
                batch: batch_ref,
                source,
            });
        }

        if let Err(e) = self.forward(&failed, &actions).await {
            tracing::error!(error = %e, "the consumer stops: a failed record could not be written");
            return stop(e);
        }
        let mut rewinds: Vec<Rewind> = Vec::new();
        let mut again: Vec<(KeptRecord, ChainState)> = Vec::new();
        let mut again_after = Duration::ZERO;
        for (f, action) in failed.iter().zip(&actions) {
            self.account(f, action);
            if let (true, Action::Retry { wait, state }) = (self.keyed, action) {
                let Some(record) = f.record else {
                    return stop(Error::Internal(format!(
                        "record {}:{}:{} must be delivered again but was not kept",
                        f.topic, f.partition, f.offset
                    )));
                };
                again.push((record.clone(), *state));
                again_after = again_after.max(*wait);
                continue;
            }
            if let Action::Retry { wait, state } = action {
                let tp = TopicPartition::new(f.topic, f.partition);
                match rewinds.iter_mut().find(|r| r.tp == tp) {
                    Some(r) => {
                        r.at = r.at.min(f.offset);
                        if let Some((w, states)) = &mut r.retry {
                            *w = (*w).max(*wait);
                            states.insert(f.offset, *state);
                        }
                    }
                    None => rewinds.push(Rewind {
                        tp,
                        at: f.offset,
                        retry: Some((*wait, BTreeMap::from([(f.offset, *state)]))),
                    }),
                }
            }
        }
        if !again.is_empty() {
            self.tell(ToPoller::Redeliver {
                batch: id,
                records: again,
                wait: again_after,
            });
        } else if rewinds.is_empty() {
            self.tell(ToPoller::Finished { batch: id });
        } else {
            // Wait until the poller has rewound the partitions, so the next
            // batch's records of them are dropped before the handler sees them.
            let (ack, applied) = tokio::sync::oneshot::channel();
            self.tell(ToPoller::Retried {
                batch: id,
                rewinds,
                ack,
            });
            let _ = applied.await;
        }
        Ok(())
    }

    /// Writes the records bound for the retry and dead-letter topics and
    /// waits for every delivery report.
    async fn forward(&self, failed: &[Failed<'_>], actions: &[Action]) -> Result<(), Error> {
        let now_ms = unix_millis(SystemTime::now());
        let mut outgoing = Vec::new();
        for (f, action) in failed.iter().zip(actions) {
            let destination = match action {
                Action::RetryTopic { wait, state } => Destination::Retry {
                    state: *state,
                    due_ms: now_ms.saturating_add(wait.as_millis() as i64),
                },
                Action::DeadLetter => Destination::DeadLetter,
                _ => continue,
            };
            let Some(record) = f.record else {
                return Err(Error::Internal(format!(
                    "record {}:{}:{} must be written to another topic but was not kept",
                    f.topic, f.partition, f.offset
                )));
            };
            outgoing.push(Outgoing {
                record,
                destination,
                reason: f.reason,
                error: &f.error,
                attempts: f.state.attempts,
            });
        }
        match (&self.forwarder, outgoing.is_empty()) {
            (_, true) => Ok(()),
            (Some(forwarder), false) => forwarder.send(&outgoing).await,
            (None, false) => Err(Error::Internal("no producer for failed records".into())),
        }
    }

    /// Logs and counts what happened to one failed record.
    fn account(&self, f: &Failed<'_>, action: &Action) {
        let metrics = &self.shared.metrics;
        let stats = &self.shared.stats;
        let record = format_args!("{}:{}:{}", f.topic, f.partition, f.offset);
        match action {
            Action::Retry { wait, state } => {
                metrics.retried("in_place", f.reason);
                stats.retries.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%record, reason = f.reason, error = %f.error, retry = state.used, wait_ms = wait.as_millis() as u64, "failed record will be delivered again in place");
            }
            Action::RetryTopic { wait, state } => {
                metrics.retried("topic", f.reason);
                stats.retry_topic.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%record, reason = f.reason, error = %f.error, retry = state.used, due_in_ms = wait.as_millis() as u64, "failed record written to the retry topic");
            }
            Action::DeadLetter => {
                metrics.dead_lettered(f.reason);
                stats.dead_lettered.fetch_add(1, Ordering::Relaxed);
                let key = f
                    .record
                    .map(KeptRecord::describe)
                    .unwrap_or_else(|| record.to_string());
                tracing::warn!(record = %key, reason = f.reason, attempts = f.state.attempts, error = %f.error, "record written to the dead-letter topic");
            }
            Action::Skip => {
                metrics.skipped_failed(f.reason);
                stats.failed_skipped.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%record, reason = f.reason, error = %f.error, "failed record skipped (failure policy `skip`)");
            }
            Action::Fail => {}
        }
    }
}

/// A rewind of every partition of a batch to its first record: nothing of
/// it may be committed.
fn whole_batch(ranges: &[super::batch::BatchRange]) -> Vec<Rewind> {
    ranges
        .iter()
        .map(|r| Rewind {
            tp: r.tp.clone(),
            at: r.first,
            retry: None,
        })
        .collect()
}

/// For each partition with a failed record, a rewind to the first one: the
/// records before it were handled and may be committed, none after.
fn first_failed_per_partition(failed: &[Failed<'_>]) -> Vec<Rewind> {
    let mut rewinds: Vec<Rewind> = Vec::new();
    for f in failed {
        match rewinds
            .iter_mut()
            .find(|r| r.tp.partition == f.partition && &*r.tp.topic == f.topic)
        {
            Some(r) => r.at = r.at.min(f.offset),
            None => rewinds.push(Rewind {
                tp: TopicPartition::new(f.topic, f.partition),
                at: f.offset,
                retry: None,
            }),
        }
    }
    rewinds
}

fn unix_millis(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Milliseconds from now until `due_ms` (Unix milliseconds), or `None` when due.
pub(super) fn until_due(due_ms: i64) -> Option<Duration> {
    let now = unix_millis(SystemTime::now());
    // A few milliseconds early is due: not worth a pause and a seek.
    (due_ms > now + 5).then(|| Duration::from_millis((due_ms - now) as u64))
}

/// How a handler call ended when it did not return `Ok`.
enum HandlerFailure {
    /// It returned an error, or ran past `handler_timeout_ms`.
    Error(BoxError),
    /// It panicked, with this message.
    Panicked(String),
}

/// The error a batch fails with when its handler ran past
/// `consumer.handler_timeout_ms`: its future was dropped, and the batch went
/// through the failure chain like any failed batch.
///
/// It is the source of [`Error::Handler`] when the chain stops the consumer;
/// find it with `std::error::Error::source` and `downcast_ref`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerTimeout {
    /// The limit that passed.
    pub limit: Duration,
}

impl std::fmt::Display for HandlerTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the handler ran longer than consumer.handler_timeout_ms ({} ms) and was cancelled; raise the limit if batches legitimately take this long",
            self.limit.as_millis()
        )
    }
}

impl std::error::Error for HandlerTimeout {}

/// The text of a panic's payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "a panic with a payload that is not text".to_owned()
    }
}

/// Runs the handler on one batch inside a span naming the batch: a panic is
/// caught (in the call and in its future), and with a `timeout` the future
/// is dropped when it passes.
async fn run_handler<T, F, E>(
    handler: &F,
    messages: Vec<Message<T>>,
    batch_ref: &str,
    shared: &Shared,
    timeout: Option<Duration>,
) -> Result<(), HandlerFailure>
where
    F: AsyncFn(Vec<Message<T>>) -> Result<(), E>,
    E: Into<BoxError>,
{
    let count = messages.len();
    let span = tracing::info_span!("kafka_batch", batch = %batch_ref, messages = count);
    let started = Instant::now();
    let result = match std::panic::catch_unwind(AssertUnwindSafe(|| handler(messages))) {
        Err(payload) => Err(HandlerFailure::Panicked(panic_message(&*payload))),
        Ok(future) => {
            let guarded = AssertUnwindSafe(future.instrument(span.clone())).catch_unwind();
            // `Err(limit)`: the limit passed and the future was dropped.
            let finished = match timeout {
                Some(limit) => tokio::time::timeout(limit, guarded)
                    .await
                    .map_err(|_| limit),
                None => Ok(guarded.await),
            };
            match finished {
                Ok(Ok(Ok(()))) => Ok(()),
                Ok(Ok(Err(e))) => Err(HandlerFailure::Error(e.into())),
                Ok(Err(payload)) => Err(HandlerFailure::Panicked(panic_message(&*payload))),
                Err(limit) => {
                    shared.metrics.handler_timeouts.increment(1);
                    shared
                        .stats
                        .handler_timeouts
                        .fetch_add(1, Ordering::Relaxed);
                    Err(HandlerFailure::Error(Box::new(HandlerTimeout { limit })))
                }
            }
        }
    };
    let metrics = &shared.metrics;
    let elapsed = started.elapsed().as_secs_f64();
    metrics.process_seconds.record(elapsed);
    metrics.handler_seconds.record(elapsed);
    match result {
        Ok(()) => {
            metrics.process_count.increment(count as u64);
            metrics.batches_ok.increment(1);
            metrics.batch_messages.record(count as f64);
            shared.stats.batches.fetch_add(1, Ordering::Relaxed);
            shared
                .stats
                .messages
                .fetch_add(count as u64, Ordering::Relaxed);
            span.in_scope(|| {
                tracing::debug!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "batch handled"
                )
            });
        }
        Err(HandlerFailure::Error(ref source)) => {
            metrics.batches_failed.increment(1);
            span.in_scope(|| tracing::warn!(error = %source, "the handler failed; the failure policies decide what happens to its messages"));
        }
        Err(HandlerFailure::Panicked(ref message)) => {
            metrics.batches_failed.increment(1);
            metrics.handler_panics.increment(1);
            shared.stats.handler_panics.fetch_add(1, Ordering::Relaxed);
            span.in_scope(|| tracing::error!(panic = %message, "the handler panicked: the consumer stops; nothing of this batch is committed, and it goes to no failure policy"));
        }
    }
    result
}
