//! The batch consumer: a poller thread that owns the Kafka consumer, and a
//! runner on tokio that hands each batch to the handler.
//!
//! ```text
//!  poller thread (owns BaseConsumer)          runner (process's own task)
//!  poll -> decode -> cut batch  --batches-->  handler(batch).await
//!  commit finished offsets      <-outcomes--  Ok / Err
//!  pause partitions when the batch channel is full, keep polling
//! ```
//!
//! Every call on the Kafka consumer happens on the poller thread, commits
//! included; offsets are committed from the [`OffsetTracker`], which only
//! ever moves past records whose batch finished `Ok`.
//!
//! [`OffsetTracker`]: crate::offsets::OffsetTracker

mod batch;
mod commit;
mod forward;
mod gaps;
mod handle;
mod policy;
mod poller;
mod rebalance;
mod retry;
mod runner;
mod state;
mod stats;

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc, Mutex, PoisonError};

use rdkafka::consumer::BaseConsumer;
use serde::de::DeserializeOwned;

use crate::envelope::{DecodeErrorKind, Message};
use crate::error::{BoxError, Error};
use crate::settings::ConsumerSettings;

use batch::Batch;
use rebalance::PollerContext;
use state::{Shared, ToPoller};

pub use handle::ConsumerHandle;
pub use runner::HandlerTimeout;
pub use stats::ConsumerStats;

/// Consumes batches of enveloped JSON messages and commits each batch's
/// offsets only after the handler returned `Ok`.
///
/// ```no_run
/// use kafka_batch::{Consumer, Message, Settings};
///
/// #[derive(serde::Deserialize)]
/// struct Event {
///     title: String,
/// }
///
/// # async fn run() -> anyhow::Result<()> {
/// let settings = Settings::load()?;
/// let consumer = Consumer::new(&settings.consumer)?;
/// consumer.handle().shutdown_on_signals();
/// consumer
///     .process(async |batch: Vec<Message<Event>>| {
///         for message in &batch {
///             println!("{}: {}", message.id, message.payload.title);
///         }
///         anyhow::Ok(())
///     })
///     .await?;
/// # Ok(()) }
/// ```
pub struct Consumer {
    consumer: BaseConsumer<PollerContext>,
    shared: Arc<Shared>,
    events: mpsc::Sender<ToPoller>,
    settings: ConsumerSettings,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("group_id", &self.settings.group_id)
            .field("topics", &self.settings.topics)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Creates the consumer. It subscribes to `settings.topics` (and so joins
    /// its group) when [`Consumer::process`] starts.
    ///
    /// Fails with an error naming the setting when the settings cannot work.
    ///
    /// With `metrics.prometheus_listen` set (feature `prometheus`), this
    /// starts the Prometheus endpoint, once per process: here rather than in
    /// [`Consumer::process`], because the consumer registers its metrics
    /// now, and they must go to the endpoint's recorder.
    pub fn new(settings: &ConsumerSettings) -> Result<Consumer, Error> {
        let config = settings.client_config()?;
        #[cfg(feature = "prometheus")]
        if let Some(addr) = settings.metrics.prometheus_addr()? {
            crate::metrics::ensure_serving(addr).map_err(|reason| {
                crate::SettingsError::Invalid {
                    setting: "metrics.prometheus_listen".into(),
                    problem: format!("= \"{addr}\": {reason}"),
                    fix: "choose a free address, or leave it empty and install a metrics recorder yourself".into(),
                }
            })?;
        }
        let (events, inbox) = mpsc::channel();
        let shared = Arc::new(Shared::new(settings, inbox));
        // Created here so that a configuration librdkafka refuses fails now;
        // the group is joined only when `process` starts, so a consumer
        // created early is never a member that does not poll.
        let consumer: BaseConsumer<PollerContext> =
            config.create_with_context(PollerContext::new(Arc::clone(&shared), settings))?;
        Ok(Consumer {
            consumer,
            shared,
            events,
            settings: settings.clone(),
        })
    }

    /// A handle to stop the consumer, commit by hand, or read its counters,
    /// from anywhere (the handler included).
    pub fn handle(&self) -> ConsumerHandle {
        ConsumerHandle {
            shared: Arc::clone(&self.shared),
            events: self.events.clone(),
        }
    }

    /// Runs `handler` on every batch until the consumer is shut down (then
    /// returns `Ok`) or the handler fails (then returns its error, having
    /// committed nothing of the failed batch).
    ///
    /// The handler takes the batch's messages, decoded into `T`, and returns
    /// `Ok(())` or any error (`anyhow::Error`, `std::io::Error`, ...). Only
    /// after `Ok` are the batch's offsets committed.
    pub async fn process<T, F, E>(self, mut handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned + Send + 'static,
        F: AsyncFnMut(Vec<Message<T>>) -> Result<(), E>,
        E: Into<BoxError>,
    {
        let (batches_tx, mut batches_rx) =
            tokio::sync::mpsc::channel::<Batch<T>>(self.settings.prefetch_batches);
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let Consumer {
            consumer,
            shared,
            events,
            settings,
        } = self;
        let poller_shared = Arc::clone(&shared);
        let runner_settings = settings.clone();
        let poller = std::thread::Builder::new()
            .name("kafka-batch-poller".into())
            // Deep (but allowed) histories are parsed recursively on this thread.
            .stack_size(8 * 1024 * 1024)
            .spawn(move || {
                let result = poller::run(consumer, poller_shared, batches_tx, &settings);
                let _ = done_tx.send(result);
            })
            .map_err(|e| Error::Internal(format!("cannot start the poller thread: {e}")))?;

        let mut failure = None;
        match runner::Runner::new(&runner_settings, &shared, &events) {
            Err(e) => failure = Some(e),
            Ok(runner) => {
                while let Some(batch) = batches_rx.recv().await {
                    if shared.stopping.load(Ordering::Acquire) {
                        // Shutting down: only the batch in hand finishes; this one is
                        // left uncommitted for the next owner.
                        let _ = events.send(ToPoller::Abandoned { batch: batch.id });
                        continue;
                    }
                    if let Err(e) = runner.run(&mut handler, batch).await {
                        failure = Some(e);
                        break;
                    }
                }
            }
        }
        drop(batches_rx);
        let poller_result = done_rx
            .await
            .unwrap_or_else(|_| Err(Error::Internal("the poller thread panicked".into())));
        let _ = poller.join();
        match failure {
            Some(e) => {
                if let Err(poller_error) = poller_result {
                    tracing::error!(error = %poller_error, "the consumer also failed while stopping");
                }
                Err(e)
            }
            None => poller_result,
        }
    }

    /// Like [`Consumer::process`], for a synchronous handler: each batch runs
    /// on tokio's blocking pool, so a handler that blocks does not stall the
    /// runtime.
    pub async fn process_blocking<T, F, E>(self, handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned + Send + 'static,
        F: FnMut(Vec<Message<T>>) -> Result<(), E> + Send + 'static,
        E: Into<BoxError> + 'static,
    {
        let handler = Arc::new(Mutex::new(handler));
        self.process(async |batch: Vec<Message<T>>| -> Result<(), BoxError> {
            let handler = Arc::clone(&handler);
            let ran = tokio::task::spawn_blocking(move || {
                let mut handler = handler.lock().unwrap_or_else(PoisonError::into_inner);
                (*handler)(batch).map_err(Into::into)
            })
            .await;
            match ran {
                Ok(result) => result,
                // A panic on the blocking pool is the handler's panic: raised
                // again here, it is caught and treated as in `process`.
                Err(join_error) if join_error.is_panic() => {
                    std::panic::resume_unwind(join_error.into_panic())
                }
                Err(join_error) => Err(Box::new(join_error) as BoxError),
            }
        })
        .await
    }
}

/// The decoder's view of a record librdkafka returned.
pub(crate) fn raw_record<M: rdkafka::Message>(m: &M) -> crate::envelope::RawRecord<'_> {
    crate::envelope::RawRecord {
        topic: m.topic(),
        partition: m.partition(),
        offset: m.offset(),
        key: m.key(),
        value: m.payload(),
    }
}

/// The metric label of a failure: `handler`, or the decode error's kind.
pub(crate) fn failure_reason(kind: Option<&DecodeErrorKind>) -> &'static str {
    match kind {
        None => "handler",
        Some(DecodeErrorKind::NullKey) => "null_key",
        Some(DecodeErrorKind::KeyNotUtf8) => "key_not_utf8",
        Some(DecodeErrorKind::NotJson(_)) => "not_json",
        Some(DecodeErrorKind::NotEnvelope(_)) => "not_envelope",
        Some(DecodeErrorKind::Payload(_)) => "payload_type",
    }
}
