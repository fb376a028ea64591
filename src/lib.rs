//! # kafka-batch
//!
//! Consume JSON messages from Kafka in batches and never lose one.
//!
//! A [`Consumer`] polls up to `batch_size` records (or until a timeout),
//! unpacks each record's envelope into a [`Message`], calls your handler with
//! the batch, and commits the batch's offsets only when the handler returned
//! `Ok`. A [`Producer`] packs messages into the same envelope, recording which
//! inputs each output came from, and waits for every delivery report.
//!
//! Records are read and written exactly as the PredictHQ Python wrapper
//! (`phq.kafka`) reads and writes them: see [`envelope`].
//!
//! ```no_run
//! use kafka_batch::{Consumer, Message, Producer, Settings};
//! use serde_json::Value;
//!
//! # async fn run() -> anyhow::Result<()> {
//! let settings = Settings::load()?; // config/kafka-batch.toml, then KAFKA_BATCH_* env
//! let producer = Producer::new(&settings.producer)?;
//! let consumer = Consumer::new(&settings.consumer)?;
//! consumer.handle().shutdown_on_signals();
//!
//! consumer
//!     .process(async |batch: Vec<Message<Value>>| {
//!         let out: Vec<Message<Value>> = batch.iter().map(|m| m.derive(m.payload.clone())).collect();
//!         producer.produce_batch("enriched", &out).await?;
//!         anyhow::Ok(()) // only now are this batch's offsets committed
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! Also: the consumer as a stream of batches you acknowledge
//! ([`Consumer::stream`]), control operations on a running consumer
//! ([`ConsumerHandle`]), the producer as a sink ([`Producer::sink`]), and a
//! job queue on the same engine ([`jobs`]).
//!
//! ## The promise
//!
//! At least once, never a gap: an offset is committed for a partition only
//! when every record before it in that partition was handled `Ok`. A handler
//! error, a crash or a rebalance may cause a record to be seen again; nothing
//! causes one to be silently lost.

#![warn(missing_docs)]

pub mod consumer;
pub mod envelope;
mod error;
pub mod failure;
pub mod jobs;
pub mod metrics;
pub mod offsets;
pub mod producer;
pub mod replay;
pub mod settings;
pub mod testing;

pub use consumer::{Batch, BatchStream, Consumer, ConsumerHandle, ConsumerStats, Settled};
pub use envelope::{BatchRef, DecodeError, Hist, History, Message, MessageId, Ref};
pub use error::{BoxError, Error};
pub use failure::Failures;
pub use producer::{Delivery, ProduceError, Producer};
pub use settings::{ConsumerSettings, ProducerSettings, Settings, SettingsError};
