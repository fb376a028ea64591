//! The consumer as a stream of batches the caller settles: the same engine
//! as `process`, with the handler's verdict coming from [`Batch::ack`],
//! [`Batch::fail`] or [`Batch::fail_some`] instead of a closure's return.
//!
//! ```text
//!  engine (a tokio task running `process`)     caller
//!  handler(messages) --Batch--> channel  -->  stream.next() -> Batch
//!        ... awaits the verdict ...            batch.ack() / fail / drop
//!  Ok / Err  <------------ oneshot  <--------  (any task)
//! ```
//!
//! Each batch in the caller's hands is a handler call in the engine, so
//! `concurrency`, `ordering` and `max_in_flight_records` bound what the
//! stream hands out exactly as they bound `process`.

use std::collections::HashSet;
use std::fmt;
use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{Consumer, ConsumerHandle};
use crate::envelope::{BatchRef, Message};
use crate::error::{BoxError, Error};
use crate::failure::Failures;
use crate::offsets::{Generation, TopicPartition};

/// The consumer's batches, as a [`Stream`]: see [`Consumer::stream`].
///
/// It ends (`None`) once the consumer was closed ([`ConsumerHandle::close`]
/// or [`ConsumerHandle::shutdown`]), every batch it handed out was settled,
/// and the last commit was made. An error that stops the consumer (a batch
/// failed under the `fail` policy, the broker refused the group) is its last
/// item before the end.
///
/// Dropping the stream shuts the consumer down: batches it had prepared and
/// not handed out are left uncommitted for the next owner, and batches
/// already handed out still settle when their holders settle them.
pub struct BatchStream<T> {
    state: State<T>,
    /// `consumer.concurrency`: how many batches may be out at once.
    pub(super) concurrency: usize,
    handle: ConsumerHandle,
    /// False once the stream is dropped: batches it never handed out are
    /// then given back unhandled, not failed.
    open: Arc<AtomicBool>,
}

enum State<T> {
    /// Not polled yet: the engine starts on the first poll, inside the
    /// caller's runtime.
    Idle(Option<Box<Consumer>>),
    Running {
        batches: mpsc::Receiver<Batch<T>>,
        engine: JoinHandle<Result<(), Error>>,
    },
    Done,
}

/// One batch from a [`BatchStream`]: it owns its messages, can move to
/// another task, and is settled exactly once.
///
/// - [`Batch::ack`]: every message was dealt with; its offsets are
///   committed (with the rest of its partition's settled run).
/// - [`Batch::fail`] or [`Batch::fail_some`]: through the failure chain
///   (`consumer.failure`), as a handler's `Err` is.
/// - Dropping it unsettled counts as a failure of the whole batch, logged
///   with its batch ref.
///
/// A batch held longer than `consumer.handler_timeout_ms` (when set) fails
/// as a handler that runs too long does.
pub struct Batch<T> {
    messages: Vec<Message<T>>,
    /// Each message's position in the batch as it was handed out, so that
    /// [`Failures`] by position still name the right record after
    /// [`Batch::retain`].
    positions: Vec<usize>,
    handed_out: usize,
    batch_ref: BatchRef,
    /// Each partition reading the batch came from.
    readings: Vec<(TopicPartition, Generation)>,
    verdict: Option<oneshot::Sender<Verdict>>,
    handle: Arc<ConsumerHandle>,
    stream_open: Arc<AtomicBool>,
    /// Set once the stream gave the batch to the caller.
    delivered: bool,
}

/// What became of a settled batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Settled {
    /// The verdict went to the consumer: an `ack` is committed, a failure
    /// goes through the failure chain.
    Accepted,
    /// Every partition the batch came from was revoked (or reassigned)
    /// since it was read: the verdict changes nothing, and the partitions'
    /// new owner reads the records again.
    Revoked,
    /// The consumer had already stopped: nothing more is committed.
    Stopped,
}

enum Verdict {
    Ack,
    Fail(BoxError),
    /// The stream was dropped before handing the batch out.
    GiveBack,
}

/// The engine's error for a batch the stream never handed out: the runner
/// gives it back unhandled (left uncommitted, never through the chain).
#[derive(Debug)]
pub(crate) struct GivenBack;

impl fmt::Display for GivenBack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the batch stream was dropped before this batch was handed out")
    }
}

impl std::error::Error for GivenBack {}

/// A batch dropped without `ack`, `fail` or `fail_some`.
#[derive(Debug)]
struct DroppedUnsettled {
    batch_ref: String,
}

impl fmt::Display for DroppedUnsettled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "batch {} was dropped without ack(), fail() or fail_some(): it counts as failed; settle every batch the stream hands out",
            self.batch_ref
        )
    }
}

impl std::error::Error for DroppedUnsettled {}

impl Consumer {
    /// The consumer as a stream of batches that the caller settles, in any
    /// task: `ack()` commits a batch, `fail(..)` sends it through the failure
    /// chain. Call it inside a tokio runtime: the engine runs as a task of
    /// that runtime from the first poll.
    ///
    /// ```no_run
    /// use kafka_batch::{Consumer, Settings};
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
    /// let mut batches = consumer.stream::<Event>();
    /// while let Some(batch) = batches.next().await {
    ///     let mut batch = batch?;
    ///     // Drafts are settled with the batch, never handled.
    ///     batch.retain(|m| !m.payload.title.is_empty());
    ///     tokio::spawn(async move {
    ///         for message in batch.messages() {
    ///             println!("{}", message.payload.title);
    ///         }
    ///         batch.ack();
    ///     });
    /// }
    /// # Ok(()) }
    /// ```
    pub fn stream<T>(self) -> BatchStream<T>
    where
        T: DeserializeOwned + Send + 'static,
    {
        BatchStream {
            concurrency: self.settings.concurrency.max(1),
            handle: self.handle(),
            state: State::Idle(Some(Box::new(self))),
            open: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl<T> BatchStream<T>
where
    T: DeserializeOwned + Send + 'static,
{
    /// The handle of the consumer behind the stream: close it, commit by
    /// hand, read its counters.
    pub fn handle(&self) -> &ConsumerHandle {
        &self.handle
    }

    /// The next batch, an error that stopped the consumer, or `None` once
    /// the stream ended: [`StreamExt::next`](futures_util::StreamExt::next)
    /// without the import.
    pub async fn next(&mut self) -> Option<Result<Batch<T>, Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }

    fn start(&mut self, consumer: Box<Consumer>) -> Result<(), Error> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Internal(
                "Consumer::stream must be polled inside a tokio runtime (the consumer runs as a task of it)"
                    .into(),
            )
        })?;
        let slots = consumer.settings.concurrency.max(1);
        let (to_stream, batches) = mpsc::channel::<Batch<T>>(slots);
        let handle = Arc::new(self.handle.clone());
        let open = Arc::clone(&self.open);
        let engine = runtime.spawn(consumer.process(
            async move |messages: Vec<Message<T>>| -> Result<(), BoxError> {
                let (verdict_tx, verdict) = oneshot::channel();
                let batch = Batch::new(messages, verdict_tx, &handle, &open);
                if let Err(unsent) = to_stream.send(batch).await {
                    unsent.0.disarm();
                    return Err(Box::new(GivenBack) as BoxError);
                }
                match verdict.await {
                    Ok(Verdict::Ack) => Ok(()),
                    Ok(Verdict::Fail(error)) => Err(error),
                    Ok(Verdict::GiveBack) => Err(Box::new(GivenBack) as BoxError),
                    // A batch always answers, from its `Drop` at the latest.
                    Err(_) => Err(Box::new(GivenBack) as BoxError),
                }
            },
        ));
        self.state = State::Running { batches, engine };
        Ok(())
    }
}

impl<T> Stream for BatchStream<T>
where
    T: DeserializeOwned + Send + 'static,
{
    type Item = Result<Batch<T>, Error>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let State::Idle(consumer) = &mut this.state {
            let Some(consumer) = consumer.take() else {
                this.state = State::Done;
                return Poll::Ready(None);
            };
            if let Err(e) = this.start(consumer) {
                this.state = State::Done;
                return Poll::Ready(Some(Err(e)));
            }
        }
        let State::Running { batches, engine } = &mut this.state else {
            return Poll::Ready(None);
        };
        match batches.poll_recv(cx) {
            Poll::Ready(Some(mut batch)) => {
                batch.delivered = true;
                return Poll::Ready(Some(Ok(batch)));
            }
            Poll::Pending => return Poll::Pending,
            // Every sender is gone: the engine returned (or is returning).
            Poll::Ready(None) => {}
        }
        let ended = match Pin::new(engine).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(Ok(()))) => None,
            Poll::Ready(Ok(Err(e))) => Some(Err(e)),
            Poll::Ready(Err(e)) => Some(Err(Error::Internal(format!(
                "the consumer's task ended abnormally: {e}"
            )))),
        };
        this.state = State::Done;
        Poll::Ready(ended)
    }
}

impl<T> Drop for BatchStream<T> {
    fn drop(&mut self) {
        self.open.store(false, Ordering::Release);
        if matches!(self.state, State::Running { .. }) {
            self.handle.shutdown();
        }
    }
}

impl<T> fmt::Debug for BatchStream<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = match self.state {
            State::Idle(_) => "not started",
            State::Running { .. } => "running",
            State::Done => "ended",
        };
        f.debug_struct("BatchStream")
            .field("state", &state)
            .finish_non_exhaustive()
    }
}

impl<T> Batch<T> {
    fn new(
        messages: Vec<Message<T>>,
        verdict: oneshot::Sender<Verdict>,
        handle: &Arc<ConsumerHandle>,
        stream_open: &Arc<AtomicBool>,
    ) -> Batch<T> {
        let mut batch_ref = BatchRef::default();
        let mut readings: Vec<(TopicPartition, Generation)> = Vec::new();
        let mut seen: HashSet<(&str, i32, Generation)> = HashSet::new();
        for origin in messages.iter().filter_map(Message::origin) {
            batch_ref.add(&origin.topic, origin.partition, origin.offset);
            if seen.insert((&origin.topic, origin.partition, origin.generation)) {
                readings.push((
                    TopicPartition {
                        topic: Arc::clone(&origin.topic),
                        partition: origin.partition,
                    },
                    origin.generation,
                ));
            }
        }
        drop(seen);
        Batch {
            positions: (0..messages.len()).collect(),
            handed_out: messages.len(),
            messages,
            batch_ref,
            readings,
            verdict: Some(verdict),
            handle: Arc::clone(handle),
            stream_open: Arc::clone(stream_open),
            delivered: false,
        }
    }

    /// The messages, decoded, in the order they were read (per partition).
    pub fn messages(&self) -> &[Message<T>] {
        &self.messages
    }

    /// The messages, to change in place (their offsets stay the batch's).
    pub fn messages_mut(&mut self) -> &mut [Message<T>] {
        &mut self.messages
    }

    /// How many messages the batch holds now.
    pub fn len(&self) -> usize {
        self.messages.len()
    }

    /// True when no message is left (all filtered out by [`Batch::retain`]).
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty()
    }

    /// The partitions and offset ranges of the messages as handed out, for
    /// logs: `topic[partition=first:end,...]`.
    pub fn batch_ref(&self) -> &BatchRef {
        &self.batch_ref
    }

    /// Keeps only the messages for which `keep` returns true. The others
    /// are settled with the batch: committed when it is acknowledged or
    /// fails, never retried, so filtering never stalls a partition's
    /// commits and never skips one.
    pub fn retain(&mut self, mut keep: impl FnMut(&Message<T>) -> bool) {
        // `retain` visits in order: the same flags serve both vectors.
        let keeps: Vec<bool> = self.messages.iter().map(&mut keep).collect();
        let mut flags = keeps.iter().copied();
        self.messages.retain(|_| flags.next().unwrap_or(true));
        let mut flags = keeps.iter().copied();
        self.positions.retain(|_| flags.next().unwrap_or(true));
    }

    /// Every message was dealt with: the batch's offsets are committed.
    pub fn ack(mut self) -> Settled {
        self.settle(Verdict::Ack)
    }

    /// The batch failed: each message left in it goes through the failure
    /// chain (`consumer.failure`) with `error`, as when a handler returns
    /// `Err`. Messages [`Batch::retain`] removed are settled, not failed.
    pub fn fail(mut self, error: impl Into<BoxError>) -> Settled {
        let error = error.into();
        let verdict = if self.positions.len() == self.handed_out {
            Verdict::Fail(error)
        } else {
            let text = crate::failure::error_text(error.as_ref());
            let mut failures = Failures::new();
            for &position in &self.positions {
                failures.add(position, text.clone());
            }
            Verdict::Fail(Box::new(failures))
        };
        self.settle(verdict)
    }

    /// Some messages failed, each with its error (positions in
    /// [`Batch::messages`] as it is now, or ids); the others were dealt
    /// with. See [`Failures`].
    pub fn fail_some(mut self, failures: Failures) -> Settled {
        let failures = failures.at_positions(&self.positions);
        self.settle(Verdict::Fail(Box::new(failures)))
    }

    fn settle(&mut self, verdict: Verdict) -> Settled {
        let Some(reply) = self.verdict.take() else {
            return Settled::Stopped;
        };
        let revoked = !self.readings.is_empty()
            && self
                .readings
                .iter()
                .all(|(tp, generation)| !self.handle.reads(tp, *generation));
        if reply.send(verdict).is_err() {
            tracing::info!(batch = %self.batch_ref, "a batch was settled after the consumer stopped: nothing more is committed, its records are read again");
            return Settled::Stopped;
        }
        if revoked {
            tracing::info!(batch = %self.batch_ref, "a batch was settled after its partitions were revoked: nothing is committed for it, their new owner reads the records again");
            return Settled::Revoked;
        }
        Settled::Accepted
    }

    /// Drops the batch without a verdict: it was never handed out.
    fn disarm(mut self) {
        self.verdict = None;
    }
}

impl<T> Drop for Batch<T> {
    fn drop(&mut self) {
        if self.verdict.is_none() {
            return;
        }
        if !self.delivered && !self.stream_open.load(Ordering::Acquire) {
            self.settle(Verdict::GiveBack);
            return;
        }
        tracing::warn!(batch = %self.batch_ref, "a batch was dropped without ack(), fail() or fail_some(): it counts as failed");
        let error = DroppedUnsettled {
            batch_ref: self.batch_ref.to_string(),
        };
        self.settle(Verdict::Fail(Box::new(error)));
    }
}

impl<T: fmt::Debug> fmt::Debug for Batch<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batch")
            .field("batch_ref", &self.batch_ref.to_string())
            .field("messages", &self.messages)
            .finish_non_exhaustive()
    }
}
