//! The errors kafka-batch returns, each saying what happened to the records
//! involved and what to do next.

use rdkafka::error::KafkaError;

use crate::envelope::DecodeError;
use crate::producer::ProduceError;
use crate::settings::SettingsError;

/// Any error a handler may return: `anyhow::Error`, `std::io::Error`, a
/// `thiserror` type, a `String`...
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong in a consumer or producer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The settings cannot work.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// librdkafka refused a configuration or a call.
    #[error("Kafka client error: {0} (check bootstrap_servers and the librdkafka properties in the `kafka` tables)")]
    Kafka(#[from] KafkaError),
    /// The handler returned an error; nothing of the batch was committed.
    #[error("the handler failed on batch {batch}: {source}; none of this batch's offsets were committed, so its records will be read again")]
    Handler {
        /// The batch ref (`topic[partition=first:end,...]`).
        batch: String,
        /// The handler's error.
        source: BoxError,
    },
    /// A record could not be decoded and the failure policy is `fail`.
    #[error("{0}; it was not committed: fix or remove the record, or choose a failure policy that skips it")]
    Decode(#[from] DecodeError),
    /// Committing offsets failed even after retries.
    #[error("committing offsets failed: {0}; records after the last successful commit will be read again by the next consumer")]
    Commit(KafkaError),
    /// A failed record could not be written to the retry or dead-letter
    /// topic, so the consumer stopped without committing past it.
    #[error(transparent)]
    FailureTopic(Box<crate::failure::FailureTopicError>),
    /// Producing records failed.
    #[error(transparent)]
    Produce(#[from] ProduceError),
    /// The embedded broker could not be started or driven.
    #[error("embedded broker: {0}")]
    Broker(String),
    /// The consumer has stopped, so it cannot do what was asked.
    #[error("the consumer has stopped, so nothing was committed: commit from the handler, while `process` runs")]
    Stopped,
    /// The consumer's poller thread ended without a result (it panicked).
    #[error(
        "the kafka-batch poller thread ended unexpectedly: {0}; this is a bug, please report it"
    )]
    Internal(String),
}
