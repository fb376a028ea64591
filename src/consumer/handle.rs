//! The control handle of a running consumer: shutdown (by hand or on a
//! signal), manual commits, counters.

use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};

use super::state::{Shared, ToPoller};
use super::ConsumerStats;
use crate::envelope::Message;
use crate::error::Error;
use crate::offsets::TopicPartition;

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
    pub(super) shared: Arc<Shared>,
    pub(super) events: mpsc::Sender<ToPoller>,
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
