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
#[non_exhaustive]
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
    /// The handler panicked. The consumer stopped as with the `fail` policy:
    /// finished batches were committed, this one was not (and went to no
    /// failure policy), and the consumer left its group.
    #[error("the handler panicked on batch {batch}: {message}; the consumer stopped, none of this batch's offsets were committed, so its records will be read again (fix the panic, or return an error to let the failure policies deal with the records)")]
    HandlerPanicked {
        /// The batch ref (`topic[partition=first:end,...]`).
        batch: String,
        /// The panic's message.
        message: String,
    },
    /// A record could not be decoded and the failure policy is `fail`.
    #[error("{0}; it was not committed: fix or remove the record, or choose a failure policy that skips it")]
    Decode(#[from] DecodeError),
    /// The broker returned a record past the one expected and
    /// `consumer.on_gap` is `fail`: offsets `first..end` of the partition
    /// were not delivered. Nothing past `first` was committed.
    #[error("the broker skipped offsets {first}..{end} of {topic}[{partition}]; the consumer stopped before committing past offset {first} (consumer.on_gap = \"fail\"): find out why those records are gone (retention, compaction, a rewind past the log start), then restart, or set on_gap = \"warn\" to commit past such gaps")]
    Gap {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
        /// The first offset not delivered.
        first: i64,
        /// The offset of the record the broker returned instead.
        end: i64,
    },
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
    /// A manual commit on a consumer that commits by itself.
    #[error("ConsumerHandle::commit and commit_messages are for a consumer with `consumer.commit = false`; this one commits each batch itself once it is dealt with, and a commit by hand would race it: set commit = false to commit by hand, or just return Ok from the handler")]
    ManualCommit,
    /// The consumer has stopped, so it cannot do what was asked.
    #[error("the consumer has stopped, so it did not do what was asked (nothing was committed): commit by hand and call control operations while `process` or the stream runs")]
    Stopped,
    /// A control operation that cannot work as asked (the text says why).
    #[error("{0}")]
    Control(String),
    /// [`ConsumerHandle::seek`](crate::ConsumerHandle::seek) on a partition
    /// this consumer does not hold.
    #[error("this consumer does not hold {topic}[{partition}], so it cannot seek it: seek only partitions that ConsumerHandle::assignment() lists (the group may have moved it to another member)")]
    NotAssigned {
        /// The topic.
        topic: String,
        /// The partition.
        partition: i32,
    },
    /// The Prometheus endpoint could not be started
    /// (`kafka_batch::metrics::serve_prometheus`, or the consumer's
    /// `metrics.prometheus_listen`; feature `prometheus`).
    #[error("cannot serve Prometheus metrics on {addr}: {reason}")]
    Prometheus {
        /// The address asked for.
        addr: std::net::SocketAddr,
        /// Why not.
        reason: String,
    },
    /// The consumer's poller thread ended without a result (it panicked).
    #[error(
        "the kafka-batch poller thread ended unexpectedly: {0}; this is a bug, please report it"
    )]
    Internal(String),
}
