//! The control handle of a running consumer: shutdown (by hand or on a
//! signal), manual commits, counters.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use super::state::{Settle, Shared, ToPoller};
use super::ConsumerStats;
use crate::envelope::Message;
use crate::error::Error;
use crate::offsets::{Generation, TopicPartition};

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
    /// Each client's state and inbox (`consumer.clients`; they share the
    /// stop flag and the counters).
    pub(super) clients: Vec<(Arc<Shared>, mpsc::Sender<ToPoller>)>,
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
        if !self.first().stopping.swap(true, Ordering::AcqRel) {
            tracing::info!("consumer shutting down after the batch in hand");
        }
    }

    /// Closes the consumer: the same as [`ConsumerHandle::shutdown`]. A
    /// [`BatchStream`](super::BatchStream) then hands out no more batches,
    /// and ends once the batches it handed out are settled and the last
    /// commit is made. Returns once asked (never waits for the end, which
    /// may need the caller to settle batches first); `Ok` even when the
    /// consumer had already stopped.
    pub async fn close(&self) -> Result<(), Error> {
        self.shutdown();
        Ok(())
    }

    /// True while some client holds `tp` in the assignment `generation`
    /// it was read under: a verdict on the records read then still counts.
    pub(super) fn reads(&self, tp: &TopicPartition, generation: Generation) -> bool {
        self.clients
            .iter()
            .any(|(shared, _)| shared.current_generation(tp) == Some(generation))
    }

    /// What happens to the consumer from now on: partitions assigned and
    /// revoked, commits the broker refused, gaps, pauses for back-pressure
    /// and for `max_in_flight_records`. A watcher that falls more than
    /// 1,024 events behind misses the oldest ([`ConsumerEvent::Missed`])
    /// instead of holding the consumer up. The stream ends once the
    /// consumer and all its handles are dropped.
    ///
    /// ```no_run
    /// use kafka_batch::consumer::ConsumerEvent;
    ///
    /// # async fn run(consumer: kafka_batch::Consumer) {
    /// let mut events = consumer.handle().events();
    /// tokio::spawn(async move {
    ///     while let Some(event) = events.next().await {
    ///         if let ConsumerEvent::Revoked { partitions, .. } = event {
    ///             println!("gave up {} partitions", partitions.len());
    ///         }
    ///     }
    /// });
    /// # }
    /// ```
    ///
    /// [`ConsumerEvent::Missed`]: super::ConsumerEvent::Missed
    pub fn events(&self) -> super::ConsumerEvents {
        super::ConsumerEvents::new(self.first().events.subscribe())
    }

    /// True once [`ConsumerHandle::shutdown`] was called or the consumer is stopping.
    pub fn is_shutting_down(&self) -> bool {
        self.first().stopping.load(Ordering::Acquire)
    }

    /// The first client's state: the stop flag, the counters and the
    /// commit setting are the same in every client's.
    fn first(&self) -> &Shared {
        // A handle is made by a consumer, which has at least one client.
        &self.clients[0].0
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

    /// Commits by hand, for a consumer with `consumer.commit = false`: each
    /// `(topic, partition, offset)` says that every record of that partition
    /// before `offset` (the next offset to read) that the handler was given
    /// was dealt with: those of the batches in the handler now, and of those
    /// it returned. Batches prepared and not yet given to the handler are
    /// not (with `concurrency` above 1 or `prefetch_batches`, some may be).
    /// Returns when the broker answered.
    ///
    /// Like every commit, it goes through the consumer's offset tracker: it
    /// commits each partition's contiguous run of settled records, so never
    /// past a record not handed out yet, and never past one still waiting
    /// for a retry. Batches the handler returned `Ok` for are settled too.
    /// Partitions this consumer does not own any more are left out.
    ///
    /// A consumer with `commit = true` refuses it ([`Error::ManualCommit`]):
    /// it commits each batch itself, and a commit by hand would race it.
    pub async fn commit<'a>(
        &self,
        offsets: impl IntoIterator<Item = (&'a str, i32, i64)>,
    ) -> Result<(), Error> {
        let offsets = offsets
            .into_iter()
            .map(|(topic, partition, offset)| (TopicPartition::new(topic, partition), offset))
            .collect();
        self.request_commit(Settle::Before(offsets)).await
    }

    /// Commits by hand, for a consumer with `consumer.commit = false`: these
    /// messages were dealt with. Returns when the broker answered.
    ///
    /// Each message is settled as the reading it came from (a message read
    /// before a rebalance or a rewind settles nothing: it will be read
    /// again), and then each partition's contiguous run of settled records
    /// is committed: committing messages 5 and 9 while 6 to 8 are not dealt
    /// with commits 6, not 10. Records between messages that the handler
    /// never sees (tombstones, records skipped by a policy) are settled with
    /// their batch, when the handler returns.
    ///
    /// A consumer with `commit = true` refuses it ([`Error::ManualCommit`]).
    pub async fn commit_messages<T>(&self, messages: &[Message<T>]) -> Result<(), Error> {
        let mut records: Vec<(TopicPartition, Generation, Vec<i64>)> = Vec::new();
        for origin in messages.iter().filter_map(Message::origin) {
            match records.iter_mut().find(|(tp, g, _)| {
                *g == origin.generation
                    && tp.partition == origin.partition
                    && tp.topic == origin.topic
            }) {
                Some((_, _, offsets)) => offsets.push(origin.offset),
                None => records.push((
                    TopicPartition {
                        topic: origin.topic.clone(),
                        partition: origin.partition,
                    },
                    origin.generation,
                    vec![origin.offset],
                )),
            }
        }
        self.request_commit(Settle::Records(records)).await
    }

    async fn request_commit(&self, settle: Settle) -> Result<(), Error> {
        if self.first().commit {
            return Err(Error::ManualCommit);
        }
        // Every client settles what it holds of the request (the others'
        // partitions are not in its tracker) and commits its own.
        let mut answers = Vec::with_capacity(self.clients.len());
        for (_, events) in &self.clients {
            let (reply, answer) = tokio::sync::oneshot::channel();
            events
                .send(ToPoller::Commit {
                    settle: settle.clone(),
                    reply,
                })
                .map_err(|_| Error::Stopped)?;
            answers.push(answer);
        }
        for answer in answers {
            answer
                .await
                .map_err(|_| Error::Stopped)?
                .map_err(Error::Commit)?;
        }
        Ok(())
    }

    /// The partitions each client holds now, in client order (one list
    /// with `consumer.clients = 1`), each sorted. Empty before the group
    /// assigned any, and while a rebalance moves them; a partition being
    /// revoked (its batches in the handler finishing) is left out.
    ///
    /// ```no_run
    /// # async fn run(consumer: kafka_batch::Consumer) {
    /// let handle = consumer.handle();
    /// for (client, partitions) in handle.assignments().iter().enumerate() {
    ///     let names: Vec<String> = partitions.iter().map(ToString::to_string).collect();
    ///     println!("client {client}: {}", names.join(","));
    /// }
    /// # }
    /// ```
    pub fn assignments(&self) -> Vec<Vec<TopicPartition>> {
        self.clients
            .iter()
            .map(|(shared, _)| {
                let mut held = shared.lock().held();
                held.sort();
                held
            })
            .collect()
    }

    /// The consumer's counters so far.
    pub fn stats(&self) -> ConsumerStats {
        self.first().stats.snapshot()
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
