//! [`ProducerSink`]: the producer as a `futures::Sink` of messages, which
//! gathers them into batches and produces each with its delivery reports.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::Sink;
use serde::Serialize;

use super::{Delivery, Producer};
use crate::envelope::Message;
use crate::error::Error;

/// Messages gathered before a batch is sent, unless the sink is flushed first.
const DEFAULT_BATCH: usize = 500;

/// How long the first message of a batch waits for the batch to fill.
const DEFAULT_MAX_WAIT: Duration = Duration::from_millis(100);

type Sending<'p> = Pin<Box<dyn Future<Output = Result<Vec<Delivery>, Error>> + Send + 'p>>;

/// The producer as a [`Sink`] of [`Message`]s to one topic: see
/// [`Producer::sink`].
///
/// Messages are gathered into batches by count and by time: a batch is
/// sent when it holds [`ProducerSink::batch_size`] messages (500 by
/// default), when a message comes after its first one has waited
/// [`ProducerSink::max_wait`] (100 ms by default), and whatever is
/// gathered is sent on `poll_flush` and `poll_close` (which
/// `StreamExt::forward` calls whenever its stream has nothing ready, and
/// `SinkExt::send` after each message). Flush and close return once every
/// record sent has a delivery report, or with the [`Error::Produce`] that
/// names the records that were not delivered (the others were). One batch
/// is in flight while the next one gathers.
pub struct ProducerSink<'p, T> {
    producer: &'p Producer,
    topic: String,
    batch_size: usize,
    max_wait: Duration,
    gathering: Vec<Message<T>>,
    /// When the first message gathered came.
    gathered_since: Option<Instant>,
    sending: Option<Sending<'p>>,
}

impl Producer {
    /// A [`Sink`] that produces messages to `topic` in batches, waiting for
    /// their delivery reports. Compose transforms with `SinkExt::with` (on
    /// the way in) and `StreamExt::map` (on the way out of a stream):
    ///
    /// ```no_run
    /// use futures_util::{stream, SinkExt as _, StreamExt as _};
    /// use kafka_batch::{Message, Producer, ProducerSettings};
    /// use serde_json::{json, Value};
    ///
    /// # async fn run() -> Result<(), kafka_batch::Error> {
    /// let producer = Producer::new(&ProducerSettings::new("localhost:9092"))?;
    /// let upper = producer
    ///     .sink::<Value>("shouted")
    ///     .with(|m: Message<String>| async move {
    ///         Ok::<_, kafka_batch::Error>(m.map(|s| json!(s.to_uppercase())))
    ///     });
    /// let words = stream::iter(["a", "b"].map(|w| Ok(Message::new(w, w.to_string()))));
    /// words.forward(upper).await?;
    /// # Ok(()) }
    /// ```
    ///
    /// To acknowledge consumed batches only after their outputs are
    /// delivered, use [`BatchStream::pipe_to`](crate::BatchStream::pipe_to)
    /// or [`Batch::ack_after_produce`](crate::Batch::ack_after_produce)
    /// instead: a sink fed by a stream knows nothing of the input batches.
    pub fn sink<'p, T: Serialize + Send + Sync + 'p>(&'p self, topic: &str) -> ProducerSink<'p, T> {
        ProducerSink {
            producer: self,
            topic: topic.to_owned(),
            batch_size: DEFAULT_BATCH,
            max_wait: DEFAULT_MAX_WAIT,
            gathering: Vec::new(),
            gathered_since: None,
            sending: None,
        }
    }
}

impl<'p, T: Serialize + Send + Sync + 'p> ProducerSink<'p, T> {
    /// Sends a batch once it holds `size` messages (at least 1).
    pub fn batch_size(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    /// Sends a batch once its first message has waited `wait`, at the next
    /// message (a sink acts only when it is polled; `forward` and `send`
    /// also flush whenever their stream has nothing ready).
    pub fn max_wait(mut self, wait: Duration) -> Self {
        self.max_wait = wait;
        self
    }

    /// True when the batch gathering should go now: full, or waited enough.
    fn due(&self) -> bool {
        self.gathering.len() >= self.batch_size
            || self
                .gathered_since
                .is_some_and(|since| since.elapsed() >= self.max_wait)
    }

    /// Polls the batch in flight, if any; `Ready(Ok)` once none is.
    fn poll_sending(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let Some(sending) = self.sending.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let result = std::task::ready!(sending.as_mut().poll(cx));
        self.sending = None;
        Poll::Ready(result.map(drop))
    }

    /// Starts sending what was gathered.
    fn start_sending(&mut self) {
        if self.gathering.is_empty() {
            return;
        }
        let batch = std::mem::take(&mut self.gathering);
        self.gathered_since = None;
        let (producer, topic) = (self.producer, self.topic.clone());
        self.sending = Some(Box::pin(async move {
            producer.produce_batch(&topic, &batch).await
        }));
    }
}

impl<'p, T: Serialize + Send + Sync + 'p> Sink<Message<T>> for ProducerSink<'p, T> {
    type Error = Error;

    fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        if !this.due() {
            return Poll::Ready(Ok(()));
        }
        // Full or waited enough: the batch in flight must be done before
        // this one goes.
        std::task::ready!(this.poll_sending(cx))?;
        this.start_sending();
        // Poll it once, so that it starts sending now.
        match this.poll_sending(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => Poll::Ready(Ok(())),
        }
    }

    fn start_send(self: Pin<&mut Self>, message: Message<T>) -> Result<(), Error> {
        let this = self.get_mut();
        this.gathered_since.get_or_insert_with(Instant::now);
        this.gathering.push(message);
        Ok(())
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_sending(cx))?;
        this.start_sending();
        this.poll_sending(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        self.poll_flush(cx)
    }
}

// Nothing of the sink is ever pinned in place (the batch in flight is boxed).
impl<T> Unpin for ProducerSink<'_, T> {}

impl<T> std::fmt::Debug for ProducerSink<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProducerSink")
            .field("topic", &self.topic)
            .field("gathering", &self.gathering.len())
            .field("sending", &self.sending.is_some())
            .finish_non_exhaustive()
    }
}
