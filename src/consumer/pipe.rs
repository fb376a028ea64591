//! Consume, transform, produce, and acknowledge each input batch only once
//! its outputs are delivered: the job a stream and a sink alone cannot do
//! safely, since a sink fed by a stream knows nothing of the input batches.

use futures_util::TryStreamExt as _;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::stream::{Batch, BatchStream, Settled};
use crate::envelope::Message;
use crate::error::Error;
use crate::producer::Producer;

impl<T> Batch<T> {
    /// One output for each message that `transform` gives a payload for,
    /// derived from it: the output keeps the input's id and refs, so it
    /// records which input it came from (see [`Message::derive`]).
    pub fn derive_all<U>(
        &self,
        mut transform: impl FnMut(&Message<T>) -> Option<U>,
    ) -> Vec<Message<U>> {
        self.messages()
            .iter()
            .filter_map(|m| transform(m).map(|payload| m.derive(payload)))
            .collect()
    }

    /// Produces `outputs` to `topic` and acknowledges this batch once every
    /// one has a delivery report. If some were not delivered, the batch
    /// fails instead (through the failure chain, with the producer's error,
    /// which names them) and the error is returned: the batch's records are
    /// then handled again, or dead-lettered, as the chain says, and never
    /// committed before their outputs exist.
    pub async fn ack_after_produce<U: Serialize>(
        self,
        producer: &Producer,
        topic: &str,
        outputs: &[Message<U>],
    ) -> Result<Settled, Error> {
        match producer.produce_batch(topic, outputs).await {
            Ok(_) => Ok(self.ack()),
            Err(error) => {
                self.fail(error.to_string());
                Err(error)
            }
        }
    }
}

impl<T: DeserializeOwned + Send + 'static> BatchStream<T> {
    /// The whole consume-transform-produce job: for every batch, one output
    /// per message that `transform` gives a payload for (derived from it,
    /// see [`Batch::derive_all`]), produced to `topic`, and the batch
    /// acknowledged only once all of them are delivered
    /// ([`Batch::ack_after_produce`]). Up to `consumer.concurrency` batches
    /// at once.
    ///
    /// A batch whose outputs were not all delivered fails through the
    /// failure chain and the pipe goes on (logged as a warning); it returns
    /// when the stream ends (after [`ConsumerHandle::close`] or a signal),
    /// or with the error that stopped the consumer.
    ///
    /// ```no_run
    /// use kafka_batch::{Consumer, Producer, Settings};
    /// use serde_json::{json, Value};
    ///
    /// # async fn run() -> anyhow::Result<()> {
    /// let settings = Settings::load()?;
    /// let producer = Producer::new(&settings.producer)?;
    /// let consumer = Consumer::new(&settings.consumer)?;
    /// consumer.handle().shutdown_on_signals();
    /// consumer
    ///     .stream::<Value>()
    ///     .pipe_to(&producer, "enriched", |m| Some(json!({"seen": m.payload})))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    ///
    /// [`ConsumerHandle::close`]: super::ConsumerHandle::close
    pub async fn pipe_to<U, F>(
        self,
        producer: &Producer,
        topic: &str,
        transform: F,
    ) -> Result<(), Error>
    where
        U: Serialize,
        F: Fn(&Message<T>) -> Option<U>,
    {
        let concurrency = self.concurrency;
        self.try_for_each_concurrent(concurrency, |batch| {
            let outputs = batch.derive_all(&transform);
            async move {
                if let Err(e) = batch.ack_after_produce(producer, topic, &outputs).await {
                    tracing::warn!(error = %e, "pipe: outputs not delivered; the input batch failed through the failure chain");
                }
                Ok(())
            }
        })
        .await
    }
}
