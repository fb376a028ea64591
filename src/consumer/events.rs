//! What happens to a running consumer, as a stream a caller can watch:
//! rebalances, failed commits, gaps, back-pressure. Sent on a broadcast
//! channel by the poller thread and its callbacks; nothing is built when
//! nobody watches, and a watcher that falls behind misses events (told by
//! [`ConsumerEvent::Missed`]) rather than holding the consumer up.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use tokio::sync::broadcast;

use crate::offsets::TopicPartition;

/// Events a watcher may fall behind by before it misses some.
pub(super) const CAPACITY: usize = 1024;

/// Something that happened to a running consumer: see
/// [`ConsumerHandle::events`](super::ConsumerHandle::events). `client` is
/// the index of the Kafka consumer it happened to (`consumer.clients`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConsumerEvent {
    /// The group gave this client these partitions.
    Assigned {
        /// Which client.
        client: usize,
        /// The partitions added.
        partitions: Vec<TopicPartition>,
    },
    /// These partitions were taken away, after their batches finished (or
    /// `revoke_timeout_ms` ran out) and what finished was committed.
    Revoked {
        /// Which client.
        client: usize,
        /// The partitions given up.
        partitions: Vec<TopicPartition>,
    },
    /// The broker refused a commit; it is made again (the next interval,
    /// or the next commit), and nothing is lost meanwhile.
    CommitFailed {
        /// Which client.
        client: usize,
        /// The broker's error.
        error: String,
        /// The offsets the refused commit carried.
        offsets: Vec<(TopicPartition, i64)>,
    },
    /// The broker returned `end` where `first` was expected: the records
    /// between were never delivered (see `consumer.on_gap`).
    Gap {
        /// Which client.
        client: usize,
        /// The partition.
        partition: TopicPartition,
        /// The first offset not delivered.
        first: i64,
        /// The offset the broker returned instead.
        end: i64,
    },
    /// The handler is behind: the client paused its partitions (it keeps
    /// polling, so it stays in the group).
    Paused {
        /// Which client.
        client: usize,
    },
    /// The handler caught up: the client resumed its partitions.
    Resumed {
        /// Which client.
        client: usize,
    },
    /// This partition reached `max_in_flight_records` and was paused until
    /// half of them are settled.
    Capped {
        /// Which client.
        client: usize,
        /// The partition.
        partition: TopicPartition,
    },
    /// The watcher fell this many events behind and they were dropped.
    Missed {
        /// How many.
        events: u64,
    },
}

/// The events of a running consumer, from when
/// [`ConsumerHandle::events`](super::ConsumerHandle::events) was called. A
/// [`Stream`] (and an inherent `next()`); it ends when the consumer is gone.
pub struct ConsumerEvents {
    next: Pin<Box<dyn Future<Output = Received> + Send>>,
}

type Received = (
    Result<ConsumerEvent, broadcast::error::RecvError>,
    broadcast::Receiver<ConsumerEvent>,
);

fn receive(
    mut receiver: broadcast::Receiver<ConsumerEvent>,
) -> Pin<Box<dyn Future<Output = Received> + Send>> {
    Box::pin(async move { (receiver.recv().await, receiver) })
}

impl ConsumerEvents {
    pub(super) fn new(receiver: broadcast::Receiver<ConsumerEvent>) -> ConsumerEvents {
        ConsumerEvents {
            next: receive(receiver),
        }
    }

    /// The next event, or `None` once the consumer is gone.
    pub async fn next(&mut self) -> Option<ConsumerEvent> {
        std::future::poll_fn(|cx| Pin::new(&mut *self).poll_next(cx)).await
    }
}

impl Stream for ConsumerEvents {
    type Item = ConsumerEvent;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<ConsumerEvent>> {
        let (received, receiver) = match self.next.as_mut().poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(received) => received,
        };
        let event = match received {
            Ok(event) => event,
            Err(broadcast::error::RecvError::Lagged(events)) => ConsumerEvent::Missed { events },
            Err(broadcast::error::RecvError::Closed) => {
                // Polled again after the end: still the end.
                self.next = Box::pin(std::future::ready((
                    Err(broadcast::error::RecvError::Closed),
                    receiver,
                )));
                return Poll::Ready(None);
            }
        };
        self.next = receive(receiver);
        Poll::Ready(Some(event))
    }
}

impl std::fmt::Debug for ConsumerEvents {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerEvents").finish_non_exhaustive()
    }
}
