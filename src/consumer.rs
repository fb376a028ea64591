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
mod control;
mod events;
mod forward;
mod gaps;
mod handle;
mod lanes;
mod pipe;
mod policy;
mod poller;
mod rebalance;
mod retry;
mod revoke;
mod runner;
mod state;
mod stats;
mod stream;

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use futures_util::stream::{FuturesUnordered, StreamExt as _};

use rdkafka::consumer::BaseConsumer;
use serde::de::DeserializeOwned;

use crate::envelope::{DecodeErrorKind, Message};
use crate::error::{BoxError, Error};
use crate::settings::ConsumerSettings;

use rebalance::PollerContext;
use state::{Shared, ToPoller};

pub(crate) use control::{partition_lags, partitions_of};
pub use control::{PartitionInfo, PartitionLag};
pub use events::{ConsumerEvent, ConsumerEvents};
pub use handle::ConsumerHandle;
pub(crate) use policy::{random_u64, unit_random};
pub(crate) use runner::panic_message;
pub use runner::HandlerTimeout;
pub use stats::ConsumerStats;
pub use stream::{Batch, BatchStream, Settled};

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
    /// One per `consumer.clients`.
    clients: Vec<Client>,
    settings: ConsumerSettings,
}

/// One Kafka consumer of this process, with its poller's state.
struct Client {
    consumer: BaseConsumer<PollerContext>,
    shared: Arc<Shared>,
    events: mpsc::Sender<ToPoller>,
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
        let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stats = Arc::new(stats::StatsCounters::default());
        let mut clients = Vec::with_capacity(settings.clients.max(1));
        let (events_tx, _) = tokio::sync::broadcast::channel(events::CAPACITY);
        for client in 0..settings.clients.max(1) {
            let (events, inbox) = mpsc::channel();
            let shared = Arc::new(Shared::of_client(
                settings,
                inbox,
                Arc::clone(&stopping),
                Arc::clone(&stats),
                (client, events_tx.clone()),
            ));
            // Created here so that a configuration librdkafka refuses fails
            // now; the group is joined only when `process` starts, so a
            // consumer created early is never a member that does not poll.
            let consumer: BaseConsumer<PollerContext> =
                config.create_with_context(PollerContext::new(Arc::clone(&shared), settings))?;
            clients.push(Client {
                consumer,
                shared,
                events,
            });
        }
        Ok(Consumer {
            clients,
            settings: settings.clone(),
        })
    }

    /// A handle to stop the consumer, commit by hand, or read its counters,
    /// from anywhere (the handler included).
    pub fn handle(&self) -> ConsumerHandle {
        ConsumerHandle {
            clients: self
                .clients
                .iter()
                .map(|c| (Arc::clone(&c.shared), c.events.clone()))
                .collect(),
        }
    }

    /// Runs `handler` on every batch until the consumer is shut down (then
    /// returns `Ok`) or the handler fails (then returns its error, having
    /// committed nothing of the failed batch).
    ///
    /// The handler takes the batch's messages, decoded into `T`, and returns
    /// `Ok(())` or any error (`anyhow::Error`, `std::io::Error`, ...). Only
    /// after `Ok` are the batch's offsets committed.
    ///
    /// With `consumer.concurrency` above 1 the handler runs for several
    /// batches at once, through a shared reference: an `async` closure that
    /// borrows (a producer, a database pool) works as it is; state the
    /// handler changes goes behind a `Mutex` or in atomics (or keep
    /// `concurrency = 1`). `consumer.ordering` says which records may be in
    /// the handler together. Batches run on this task, so a handler that
    /// computes for long without awaiting holds the others up: spawn such
    /// work, or use [`Consumer::process_blocking`].
    ///
    /// On shutdown, and after a failure that stops the consumer, the
    /// batches already in the handler finish (and are committed when they
    /// succeed); none is started after it.
    pub async fn process<T, F, E>(self, handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned + Send + 'static,
        F: AsyncFn(Vec<Message<T>>) -> Result<(), E>,
        E: Into<BoxError>,
    {
        let Consumer { clients, settings } = self;
        // One channel for every client's batches: each batch says whose it
        // is. Each poller hands over at most `concurrency + prefetch_batches`
        // batches not yet reported, so the channel never makes it wait: it
        // waits for outcomes, which free the slots (waiting for room in a
        // smaller channel, it would sleep while the runner takes batches).
        let slots = settings.concurrency.max(1) + settings.prefetch_batches;
        let (batches_tx, batches_rx) =
            tokio::sync::mpsc::channel::<batch::Batch<T>>(slots * clients.len());
        let mut pollers = Vec::with_capacity(clients.len());
        let mut shared_of = Vec::with_capacity(clients.len());
        for (index, client) in clients.into_iter().enumerate() {
            let Client {
                consumer,
                shared,
                events,
            } = client;
            let (done_tx, done_rx) = tokio::sync::oneshot::channel();
            let poller_shared = Arc::clone(&shared);
            let poller_settings = settings.clone();
            let batches = batches_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("kafka-batch-poller-{index}"))
                // Deep (but allowed) histories are parsed recursively on this thread.
                .stack_size(8 * 1024 * 1024)
                .spawn(move || {
                    let result = poller::run(
                        consumer,
                        Arc::clone(&poller_shared),
                        batches,
                        &poller_settings,
                        index,
                    );
                    if result.is_err() {
                        // The other clients stop too: `process` returns this error.
                        poller_shared.stopping.store(true, Ordering::Release);
                    }
                    let _ = done_tx.send(result);
                });
            match thread {
                Ok(thread) => pollers.push((Some(thread), done_rx)),
                Err(e) => {
                    shared.stopping.store(true, Ordering::Release);
                    pollers.push((
                        None,
                        oneshot_with(Err(Error::Internal(format!(
                            "cannot start a poller thread: {e}"
                        )))),
                    ));
                }
            }
            shared_of.push((shared, events));
        }
        drop(batches_tx);

        let runners: Result<Vec<runner::Runner<'_>>, Error> = shared_of
            .iter()
            .map(|(shared, events)| runner::Runner::new(&settings, shared, events))
            .collect();
        let failure = match runners {
            Err(e) => {
                for (shared, _) in &shared_of {
                    shared.stopping.store(true, Ordering::Release);
                }
                drop(batches_rx);
                Some(e)
            }
            Ok(runners) => run_batches(&runners, &handler, batches_rx, &settings).await,
        };
        let mut poller_error = None;
        for (thread, done) in pollers {
            let result = done
                .await
                .unwrap_or_else(|_| Err(Error::Internal("a poller thread panicked".into())));
            if let Some(thread) = thread {
                let _ = thread.join();
            }
            if let Err(e) = result {
                if failure.is_some() || poller_error.is_some() {
                    tracing::error!(error = %e, "the consumer also failed while stopping");
                } else {
                    poller_error = Some(e);
                }
            }
        }
        match failure.or(poller_error) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Like [`Consumer::process`], for a synchronous handler: each batch runs
    /// on tokio's blocking pool, so a handler that blocks does not stall the
    /// runtime.
    pub async fn process_blocking<T, F, E>(self, handler: F) -> Result<(), Error>
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(Vec<Message<T>>) -> Result<(), E> + Send + Sync + 'static,
        E: Into<BoxError> + 'static,
    {
        let handler = Arc::new(handler);
        self.process(async |batch: Vec<Message<T>>| -> Result<(), BoxError> {
            let handler = Arc::clone(&handler);
            let ran =
                tokio::task::spawn_blocking(move || (*handler)(batch).map_err(Into::into)).await;
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

/// Takes batches from the poller and runs up to `consumer.concurrency` of
/// them at once, until the poller closes the channel. Returns the error of
/// the first batch that stopped the consumer.
///
/// Once stopping (a shutdown, or that error), the batches in the handler
/// run to their end and the ones still arriving are given back unhandled.
/// The channel is read until the poller closes it, which it does only once
/// every batch it handed over was reported: so no outcome is lost to the
/// poller leaving early.
async fn run_batches<T, F, E>(
    runners: &[runner::Runner<'_>],
    handler: &F,
    mut batches: tokio::sync::mpsc::Receiver<batch::Batch<T>>,
    settings: &ConsumerSettings,
) -> Option<Error>
where
    T: DeserializeOwned + Send + 'static,
    F: AsyncFn(Vec<Message<T>>) -> Result<(), E>,
    E: Into<BoxError>,
{
    let concurrency = settings.concurrency.max(1);
    let mut running = FuturesUnordered::new();
    let mut failure: Option<Error> = None;
    let mut open = true;
    while open || !running.is_empty() {
        tokio::select! {
            // Outcomes first: a finished batch makes room for the next.
            biased;
            Some(result) = running.next(), if !running.is_empty() => {
                if let Err(e) = result {
                    if failure.is_none() {
                        // Every client stops: the batches in the handler
                        // finish, and none is started.
                        for runner in runners {
                            runner.stop();
                        }
                        failure = Some(e);
                    } else {
                        tracing::error!(error = %e, "another batch failed while the consumer was stopping");
                    }
                }
            }
            batch = batches.recv(), if open && running.len() < concurrency => match batch {
                None => open = false,
                Some(batch) => match runners.get(batch.client) {
                    // Stopping: this batch is left uncommitted for the next owner.
                    Some(runner) if failure.is_some() || runner.stopping() => runner.abandon(batch.id),
                    Some(runner) => running.push(runner.run(handler, batch)),
                    None => tracing::error!(client = batch.client, "a batch of no client was dropped"),
                },
            },
            else => break,
        }
    }
    failure
}

/// A receiver that already holds `value`.
fn oneshot_with<V>(value: V) -> tokio::sync::oneshot::Receiver<V> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let _ = tx.send(value);
    rx
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
