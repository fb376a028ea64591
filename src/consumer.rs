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
mod forward;
mod gaps;
mod policy;
mod poller;
mod rebalance;
mod runner;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use serde::de::DeserializeOwned;

use crate::envelope::{DecodeErrorKind, Message};
use crate::error::{BoxError, Error};
use crate::metrics::ConsumerMetrics;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::settings::ConsumerSettings;

use batch::Batch;
use rebalance::PollerContext;

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
    pub fn new(settings: &ConsumerSettings) -> Result<Consumer, Error> {
        let config = settings.client_config()?;
        let (events, inbox) = mpsc::channel();
        let shared = Arc::new(Shared::new(settings, inbox));
        // Created here so that a configuration librdkafka refuses fails now;
        // the group is joined only when `process` starts, so a consumer
        // created early is never a member that does not poll.
        let consumer: BaseConsumer<PollerContext> =
            config.create_with_context(PollerContext::new(Arc::clone(&shared)))?;
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

/// Controls a running consumer. Cheap to clone; usable from the handler.
///
/// ```no_run
/// use kafka_batch::{Consumer, ConsumerSettings, Message};
///
/// # async fn run() -> Result<(), kafka_batch::Error> {
/// let consumer = Consumer::new(&ConsumerSettings::new("localhost:9092", "g", &["events"]))?;
/// let handle = consumer.handle();
/// let stopper = handle.clone();
/// consumer
///     .process(async |batch: Vec<Message>| {
///         if batch.iter().any(|m| m.id == "stop") {
///             stopper.shutdown(); // this batch still commits; process then returns Ok
///         }
///         Ok::<_, std::io::Error>(())
///     })
///     .await?;
/// println!("handled {} messages", handle.stats().messages);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct ConsumerHandle {
    shared: Arc<Shared>,
    events: mpsc::Sender<ToPoller>,
}

impl std::fmt::Debug for ConsumerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerHandle")
            .field("stopping", &self.is_shutting_down())
            .finish_non_exhaustive()
    }
}

impl ConsumerHandle {
    /// Stops the consumer after the batch in hand: that batch finishes and is
    /// committed, the consumer leaves its group, and `process` returns `Ok`.
    /// Batches prepared but not started are left for the next owner.
    pub fn shutdown(&self) {
        if !self.shared.stopping.swap(true, Ordering::AcqRel) {
            tracing::info!("consumer shutting down after the batch in hand");
        }
    }

    /// True once [`ConsumerHandle::shutdown`] was called or the consumer is stopping.
    pub fn is_shutting_down(&self) -> bool {
        self.shared.stopping.load(Ordering::Acquire)
    }

    /// Calls [`ConsumerHandle::shutdown`] on SIGINT (Ctrl-C) or SIGTERM.
    ///
    /// The signal handlers are installed before this returns, so a signal
    /// sent right after it already stops the consumer gracefully. Call it
    /// from inside a tokio runtime; the returned task ends after the first signal.
    pub fn shutdown_on_signals(&self) -> tokio::task::JoinHandle<()> {
        let handle = self.clone();
        let signals = Signals::install();
        tokio::spawn(async move {
            signals.recv().await;
            handle.shutdown();
        })
    }

    /// Commits offsets by hand (`offset` is the next offset to read), for a
    /// consumer with `commit = false`. Partitions this consumer does not own
    /// any more are left out. Returns when the broker answered.
    pub async fn commit<'a>(
        &self,
        offsets: impl IntoIterator<Item = (&'a str, i32, i64)>,
    ) -> Result<(), Error> {
        let offsets = offsets
            .into_iter()
            .map(|(topic, partition, offset)| (TopicPartition::new(topic, partition), offset))
            .collect();
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.events
            .send(ToPoller::Commit { offsets, reply })
            .map_err(|_| Error::Stopped)?;
        answer
            .await
            .map_err(|_| Error::Stopped)?
            .map_err(Error::Commit)
    }

    /// Commits, for each partition of `messages`, the offset after the last
    /// of them (for a consumer with `commit = false`).
    pub async fn commit_messages<T>(&self, messages: &[Message<T>]) -> Result<(), Error> {
        let mut next: Vec<(&str, i32, i64)> = Vec::new();
        for origin in messages.iter().filter_map(Message::origin) {
            match next
                .iter_mut()
                .find(|(t, p, _)| *p == origin.partition && *t == &*origin.topic)
            {
                Some(entry) => entry.2 = entry.2.max(origin.offset + 1),
                None => next.push((&origin.topic, origin.partition, origin.offset + 1)),
            }
        }
        self.commit(next).await
    }

    /// The consumer's counters so far.
    pub fn stats(&self) -> ConsumerStats {
        self.shared.stats.snapshot()
    }
}

/// SIGINT and SIGTERM listeners, installed when created.
#[cfg(unix)]
struct Signals {
    interrupt: Option<tokio::signal::unix::Signal>,
    terminate: Option<tokio::signal::unix::Signal>,
}

#[cfg(unix)]
impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        let listen = |name: &str, kind: SignalKind| {
            signal(kind)
                .map_err(
                    |e| tracing::warn!(error = %e, signal = name, "cannot listen for this signal"),
                )
                .ok()
        };
        Signals {
            interrupt: listen("SIGINT", SignalKind::interrupt()),
            terminate: listen("SIGTERM", SignalKind::terminate()),
        }
    }

    async fn recv(mut self) {
        async fn next(listener: &mut Option<tokio::signal::unix::Signal>) {
            match listener {
                Some(l) => {
                    l.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = next(&mut self.interrupt) => {}
            _ = next(&mut self.terminate) => {}
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Signals {
        Signals
    }

    async fn recv(self) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// What a consumer has done so far (see [`ConsumerHandle::stats`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Batches the handler finished `Ok`.
    pub batches: u64,
    /// Messages in those batches.
    pub messages: u64,
    /// Successful offset commits.
    pub commits: u64,
    /// Failed offset commits (each retried).
    pub commit_failures: u64,
    /// Partitions assigned to this consumer, counted per assignment.
    pub assigned: u64,
    /// Partitions revoked from this consumer, counted per revoke.
    pub revoked: u64,
    /// Times the poller paused its partitions because the handler was busy.
    pub pauses: u64,
    /// Tombstones and records of unsubscribed topics skipped.
    pub skipped: u64,
    /// Records that could not be decoded.
    pub decode_errors: u64,
    /// Failed records delivered again in place (policy `retry`).
    pub retries: u64,
    /// Failed records written to the retry topic (policy `retry_topic`).
    pub retry_topic: u64,
    /// Records written to the dead-letter topic (policy `dead_letter`).
    pub dead_lettered: u64,
    /// Failed or undecodable records skipped (policy `skip`).
    pub failed_skipped: u64,
    /// Times the broker returned a record past the one the consumer
    /// expected: the records between were not delivered (a compacted topic
    /// or transaction markers explain this; otherwise the broker skipped
    /// records). Each one is also logged as a warning naming the offsets.
    pub offset_gaps: u64,
}

#[derive(Default)]
struct StatsCounters {
    batches: AtomicU64,
    messages: AtomicU64,
    commits: AtomicU64,
    commit_failures: AtomicU64,
    assigned: AtomicU64,
    revoked: AtomicU64,
    pauses: AtomicU64,
    skipped: AtomicU64,
    decode_errors: AtomicU64,
    retries: AtomicU64,
    retry_topic: AtomicU64,
    dead_lettered: AtomicU64,
    failed_skipped: AtomicU64,
    offset_gaps: AtomicU64,
}

impl StatsCounters {
    fn snapshot(&self) -> ConsumerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsumerStats {
            batches: get(&self.batches),
            messages: get(&self.messages),
            commits: get(&self.commits),
            commit_failures: get(&self.commit_failures),
            assigned: get(&self.assigned),
            revoked: get(&self.revoked),
            pauses: get(&self.pauses),
            skipped: get(&self.skipped),
            decode_errors: get(&self.decode_errors),
            retries: get(&self.retries),
            retry_topic: get(&self.retry_topic),
            dead_lettered: get(&self.dead_lettered),
            failed_skipped: get(&self.failed_skipped),
            offset_gaps: get(&self.offset_gaps),
        }
    }
}

/// State shared by the poller loop, its rebalance callbacks, the runner and handles.
struct Shared {
    /// Locked by the poller loop between polls and by the rebalance
    /// callbacks (which run inside `poll`, on the same thread).
    state: Mutex<PollerState>,
    stopping: AtomicBool,
    /// Bumped on every assign and revoke, so the loop knows to drop buffered
    /// records of partitions whose generation changed.
    rebalance_epoch: AtomicU64,
    stats: StatsCounters,
    metrics: ConsumerMetrics,
    revoke_timeout: Duration,
    commit: bool,
    /// Each assigned partition's current generation, as in the tracker. The
    /// runner reads it (to drop records that will be read again) without
    /// the state lock, which a revoke holds while it waits for the runner.
    generations: Mutex<HashMap<TopicPartition, crate::offsets::Generation>>,
}

impl Shared {
    fn new(settings: &ConsumerSettings, inbox: mpsc::Receiver<ToPoller>) -> Shared {
        Shared {
            state: Mutex::new(PollerState {
                tracker: OffsetTracker::default(),
                inbox: Some(inbox),
                in_flight: Vec::new(),
                paused: false,
                handler_failed: false,
                seeks: Vec::new(),
                backoff: HashMap::new(),
                redeliveries: Vec::new(),
                expectations: Vec::new(),
            }),
            stopping: AtomicBool::new(false),
            rebalance_epoch: AtomicU64::new(0),
            stats: StatsCounters::default(),
            metrics: ConsumerMetrics::new(&settings.service),
            revoke_timeout: Duration::from_millis(settings.revoke_timeout_ms),
            commit: settings.commit,
            generations: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes a partition's generation (`None`: no longer assigned).
    fn publish_generation(
        &self,
        tp: &TopicPartition,
        generation: Option<crate::offsets::Generation>,
    ) {
        let mut generations = self
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match generation {
            Some(g) => {
                generations.insert(tp.clone(), g);
            }
            None => {
                generations.remove(tp);
            }
        }
    }

    /// The current generation of a partition, as last published.
    fn current_generation(&self, tp: &TopicPartition) -> Option<crate::offsets::Generation> {
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tp)
            .copied()
    }

    #[cfg(test)]
    fn for_tests() -> Shared {
        Shared::new(&ConsumerSettings::default(), mpsc::channel().1)
    }

    fn lock(&self) -> MutexGuard<'_, PollerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

struct PollerState {
    tracker: OffsetTracker,
    /// Outcomes and commands for the poller; dropped when it exits.
    inbox: Option<mpsc::Receiver<ToPoller>>,
    /// Batches handed to the runner and not yet reported.
    in_flight: Vec<InFlight>,
    paused: bool,
    handler_failed: bool,
    /// Partitions to pause and seek back for a retry (on the poller thread).
    seeks: Vec<PendingSeek>,
    /// Partitions paused until a retry is due.
    backoff: HashMap<TopicPartition, Instant>,
    /// Partitions to be read again after a rewind, for the poller to take.
    redeliveries: Vec<(TopicPartition, Redelivery)>,
    /// Where partitions continue after an assignment or a seek, for the
    /// poller's gap guard to take.
    expectations: Vec<gaps::Expectation>,
}

/// A batch handed to the runner: which ranges it holds.
struct InFlight {
    id: u64,
    /// Topic-partition, generation, first offset, end.
    ranges: Vec<(TopicPartition, crate::offsets::Generation, i64, i64)>,
}

/// A partition to pause, seek back to `offset`, and resume at `due`.
struct PendingSeek {
    tp: TopicPartition,
    generation: crate::offsets::Generation,
    offset: i64,
    due: Instant,
}

/// How to treat the records of a rewound partition as they are read again:
/// those in `states` are handed over again with that standing in the failure
/// chain; the others before `until` were dealt with and are not.
struct Redelivery {
    generation: crate::offsets::Generation,
    until: i64,
    states: BTreeMap<i64, policy::ChainState>,
}

/// A partition of a batch whose records from `at` on were not dealt with.
struct Rewind {
    tp: TopicPartition,
    at: i64,
    /// For a retry in place: the wait, and the standing of each retried record.
    retry: Option<(Duration, BTreeMap<i64, policy::ChainState>)>,
}

enum ToPoller {
    Finished {
        batch: u64,
    },
    /// Some records are retried in place: rewind their partitions, then `ack`.
    Retried {
        batch: u64,
        rewinds: Vec<Rewind>,
        ack: tokio::sync::oneshot::Sender<()>,
    },
    /// The consumer stops; only records before each rewind may be committed.
    Failed {
        batch: u64,
        rewinds: Vec<Rewind>,
    },
    Abandoned {
        batch: u64,
    },
    Commit {
        offsets: Vec<(TopicPartition, i64)>,
        reply: tokio::sync::oneshot::Sender<Result<(), KafkaError>>,
    },
}

impl PollerState {
    /// Applies every outcome and command waiting, without blocking.
    fn drain(&mut self, consumer: &BaseConsumer<PollerContext>, shared: &Shared) {
        while let Some(event) = self.inbox.as_ref().and_then(|i| i.try_recv().ok()) {
            self.apply(event, consumer, shared);
        }
    }

    /// Waits up to `timeout` for one outcome or command and applies it.
    fn wait_one(
        &mut self,
        timeout: Duration,
        consumer: &BaseConsumer<PollerContext>,
        shared: &Shared,
    ) {
        let event = match &self.inbox {
            Some(inbox) => inbox.recv_timeout(timeout).ok(),
            None => None,
        };
        if let Some(event) = event {
            self.apply(event, consumer, shared);
        }
    }

    fn apply(&mut self, event: ToPoller, consumer: &BaseConsumer<PollerContext>, shared: &Shared) {
        match event {
            ToPoller::Finished { batch } => self.settle(batch, &[], shared),
            ToPoller::Retried {
                batch,
                rewinds,
                ack,
            } => {
                self.settle(batch, &rewinds, shared);
                let _ = ack.send(());
            }
            ToPoller::Failed { batch, rewinds } => {
                self.settle(batch, &rewinds, shared);
                self.handler_failed = true;
            }
            ToPoller::Abandoned { batch } => {
                self.take_in_flight(batch);
            }
            ToPoller::Commit { offsets, reply } => {
                let owned: Vec<(TopicPartition, i64)> = offsets
                    .into_iter()
                    .filter(|(tp, _)| self.tracker.generation(tp).is_some())
                    .collect();
                let _ = reply.send(poller::commit_offsets(consumer, &owned, shared).map(|()| {
                    for (tp, offset) in &owned {
                        self.tracker.committed(tp, *offset);
                    }
                }));
            }
        }
    }

    /// Applies a batch's outcome to the tracker: each partition finished,
    /// or finished up to its rewind (and, for a retry, scheduled to be read
    /// again from there).
    fn settle(&mut self, batch: u64, rewinds: &[Rewind], shared: &Shared) {
        let Some(done) = self.take_in_flight(batch) else {
            return;
        };
        let mut rewound = false;
        for (tp, generation, first, end) in &done.ranges {
            let Some(rewind) = rewinds.iter().find(|r| r.tp == *tp) else {
                if !self.tracker.finished(tp, *generation, *first) {
                    tracing::debug!(partition = %tp, "result for a partition no longer owned dropped");
                }
                continue;
            };
            let at = rewind.at.clamp(*first, *end);
            let Some(new_generation) = self.tracker.rewind(tp, *generation, *first, at) else {
                continue;
            };
            shared.publish_generation(tp, Some(new_generation));
            rewound = true;
            if let Some((wait, states)) = &rewind.retry {
                self.seeks.push(PendingSeek {
                    tp: tp.clone(),
                    generation: new_generation,
                    offset: at,
                    due: Instant::now() + *wait,
                });
                self.redeliveries.push((
                    tp.clone(),
                    Redelivery {
                        generation: new_generation,
                        until: *end,
                        states: states.clone(),
                    },
                ));
            }
        }
        if rewound {
            // The poller drops what it buffered of the rewound partitions.
            shared.rebalance_epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    fn take_in_flight(&mut self, batch: u64) -> Option<InFlight> {
        let i = self.in_flight.iter().position(|b| b.id == batch)?;
        Some(self.in_flight.swap_remove(i))
    }
}
