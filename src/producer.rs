//! The producer: packs messages into the envelope, sends a batch, and
//! returns only when every record has a delivery report.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message as _};
use serde::Serialize;
use time::OffsetDateTime;

mod sink;

pub use sink::ProducerSink;

use crate::consumer::PartitionInfo;
use crate::envelope::{format_dt, key_of, pack_into, Message, MessageId};
use crate::error::Error;
use crate::metrics::ProducerMetrics;
use crate::settings::ProducerSettings;

/// What happened to one produced record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The broker acknowledged the record (with the configured `acks`).
    Written {
        /// The partition it was written to.
        partition: i32,
        /// Its offset in that partition.
        offset: i64,
    },
    /// The record was over the size limit and `producer.skip_oversized` is on.
    SkippedOversized,
}

/// Why one record of a batch was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The payload could not be serialised to JSON.
    #[error("payload is not serialisable to JSON: {0}")]
    Encode(serde_json::Error),
    /// librdkafka or the broker refused the record.
    #[error("{0}")]
    Kafka(KafkaError),
}

/// One record of a batch that was not delivered.
#[derive(Debug)]
pub struct RecordFailure {
    /// Its position in the batch passed to [`Producer::produce_batch`].
    pub index: usize,
    /// Its message id.
    pub id: MessageId,
    /// Why.
    pub error: RecordError,
}

/// Some records of a batch were not delivered; the others were.
#[derive(Debug)]
pub struct ProduceError {
    /// The topic produced to.
    pub topic: String,
    /// How many records the batch held.
    pub total: usize,
    /// The records that failed, in batch order.
    pub failures: Vec<RecordFailure>,
    /// Each record's delivery, `None` for the failed ones.
    pub deliveries: Vec<Option<Delivery>>,
}

impl std::fmt::Display for ProduceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} records to topic {:?} were not delivered",
            self.failures.len(),
            self.total,
            self.topic
        )?;
        for (i, failure) in self.failures.iter().take(5).enumerate() {
            let sep = if i == 0 { ": " } else { "; " };
            write!(
                f,
                "{sep}#{} (id {:?}): {}",
                failure.index, failure.id, failure.error
            )?;
        }
        if self.failures.len() > 5 {
            write!(f, "; and {} more", self.failures.len() - 5)?;
        }
        write!(
            f,
            ". The other records were delivered; return this error from the handler to have the input batch read again, or retry the failed records"
        )
    }
}

impl std::error::Error for ProduceError {}

/// Produces enveloped messages in batches, waiting for every delivery report.
///
/// ```no_run
/// use kafka_batch::{Message, Producer, ProducerSettings};
/// use serde_json::json;
///
/// # async fn run() -> Result<(), kafka_batch::Error> {
/// let mut settings = ProducerSettings::new("localhost:9092");
/// settings.service = "loader".into();
/// let producer = Producer::new(&settings)?;
/// let batch = vec![Message::new("event-1", json!({"title": "Concert"}))];
/// let deliveries = producer.produce_batch("events", &batch).await?;
/// println!("written at {:?}", deliveries[0]);
/// producer.close().await?;
/// # Ok(()) }
/// ```
pub struct Producer {
    inner: ThreadedProducer<DeliveryContext>,
    service: String,
    skip_oversized: bool,
    flush_timeout: Duration,
    metrics: ProducerMetrics,
}

impl std::fmt::Debug for Producer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Producer")
            .field("service", &self.service)
            .finish_non_exhaustive()
    }
}

impl Producer {
    /// A producer with these settings (`service` is written as `hist.svc`).
    pub fn new(settings: &ProducerSettings) -> Result<Producer, Error> {
        let config = settings.client_config()?;
        let inner: ThreadedProducer<DeliveryContext> =
            config.create_with_context(DeliveryContext)?;
        Ok(Producer {
            inner,
            service: settings.service.clone(),
            skip_oversized: settings.skip_oversized,
            flush_timeout: Duration::from_millis(settings.flush_timeout_ms),
            metrics: ProducerMetrics::new(&settings.service),
        })
    }

    /// The service name written into every record's history.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// Packs and sends every message to `topic`, and returns when each has a
    /// delivery report: the partition and offset of each, or a
    /// [`ProduceError`] naming the records that failed and why.
    ///
    /// When librdkafka's queue is full, this waits for room instead of failing.
    pub async fn produce_batch<T: Serialize>(
        &self,
        topic: &str,
        messages: &[Message<T>],
    ) -> Result<Vec<Delivery>, Error> {
        self.produce_batch_with_headers(topic, messages, |_| None)
            .await
    }

    /// [`Producer::produce_batch`], with headers for each record
    /// (`headers_of(index)`): the job queue's delayed and dead records carry
    /// the failure chain's headers.
    pub(crate) async fn produce_batch_with_headers<T: Serialize>(
        &self,
        topic: &str,
        messages: &[Message<T>],
        headers_of: impl Fn(usize) -> Option<rdkafka::message::OwnedHeaders>,
    ) -> Result<Vec<Delivery>, Error> {
        let batch = Arc::new(BatchDeliveries::new(messages.len()));
        let dt = format_dt(OffsetDateTime::now_utc());
        let mut value = Vec::with_capacity(256);
        for (index, message) in messages.iter().enumerate() {
            value.clear();
            if let Err(e) = pack_into(&mut value, &self.service, &dt, message) {
                batch.complete(index, Err(RecordError::Encode(e)));
                continue;
            }
            let mut record = BaseRecord::with_opaque_to(
                topic,
                Box::new(Pending {
                    batch: Arc::clone(&batch),
                    index,
                }),
            )
            .payload(value.as_slice());
            record.key = key_of(&message.id);
            record.headers = headers_of(index);
            loop {
                match self.inner.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        // librdkafka's queue is full: wait for deliveries to make room.
                        record = returned;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => {
                        batch.complete(index, Err(RecordError::Kafka(error)));
                        break;
                    }
                }
            }
        }
        if batch.remaining.load(Ordering::Acquire) > 1 {
            self.send_now();
        }
        batch.sent_all().await;
        self.collect(topic, messages, &batch)
    }

    /// Packs and sends one message, returning its delivery.
    pub async fn produce<T: Serialize>(
        &self,
        topic: &str,
        message: &Message<T>,
    ) -> Result<Delivery, Error> {
        let mut deliveries = self
            .produce_batch(topic, std::slice::from_ref(message))
            .await?;
        deliveries
            .pop()
            .ok_or_else(|| Error::Internal("a one-record batch returned no delivery".into()))
    }

    fn collect<T>(
        &self,
        topic: &str,
        messages: &[Message<T>],
        batch: &BatchDeliveries,
    ) -> Result<Vec<Delivery>, Error> {
        let results =
            std::mem::take(&mut *batch.results.lock().unwrap_or_else(PoisonError::into_inner));
        let mut deliveries = Vec::with_capacity(results.len());
        let mut failures = Vec::new();
        let mut oversized = 0;
        for (index, result) in results.into_iter().enumerate() {
            match result {
                Some(Ok(delivery)) => deliveries.push(Some(delivery)),
                Some(Err(RecordError::Kafka(e))) if self.skip_oversized && is_oversized(&e) => {
                    tracing::warn!(topic, id = %messages[index].id, error = %e, "record over the size limit skipped (producer.skip_oversized)");
                    oversized += 1;
                    deliveries.push(Some(Delivery::SkippedOversized));
                }
                Some(Err(error)) => {
                    failures.push(RecordFailure {
                        index,
                        id: messages[index].id.clone(),
                        error,
                    });
                    deliveries.push(None);
                }
                None => {
                    failures.push(RecordFailure {
                        index,
                        id: messages[index].id.clone(),
                        error: RecordError::Kafka(KafkaError::MessageProduction(
                            RDKafkaErrorCode::Fail,
                        )),
                    });
                    deliveries.push(None);
                }
            }
        }
        let written = (deliveries.len() - failures.len()) as u64 - oversized;
        self.metrics
            .produced(topic, written, failures.len() as u64, oversized);
        if failures.is_empty() {
            return Ok(deliveries.into_iter().flatten().collect());
        }
        Err(Error::Produce(ProduceError {
            topic: topic.to_owned(),
            total: messages.len(),
            failures,
            deliveries,
        }))
    }

    /// Waits (blocking the thread) until every queued record is delivered or
    /// `timeout` passes. [`Producer::produce_batch`] already waits for its
    /// records; this is for records sent some other way.
    pub fn flush(&self, timeout: Duration) -> Result<(), Error> {
        flush(&self.inner, timeout).map_err(Error::from)
    }

    /// Has librdkafka send the records it holds now, instead of after
    /// `linger.ms`.
    ///
    /// `linger.ms` is for gathering records from many sends into one
    /// request; a batch is complete once its last record is sent, and its
    /// caller waits for every delivery, so lingering only adds that wait to
    /// each batch (5 ms by default: a large part of a batch's time). Only
    /// `rd_kafka_flush` makes librdkafka skip the linger, and only while it
    /// runs (`flush(0)` returns before the broker threads it wakes look), so it
    /// runs for at most [`SEND_NOW_MS`] on a blocking thread. Records of
    /// other batches queued meanwhile leave early too, which does no harm.
    fn send_now(&self) {
        let producer = self.inner.clone();
        let flush = move || {
            // SAFETY: the pointer is the live client owned by `producer`,
            // which this closure keeps alive until the call returns.
            unsafe { rdkafka_sys::rd_kafka_flush(producer.client().native_ptr(), SEND_NOW_MS) };
        };
        // Detached: it ends by itself within SEND_NOW_MS. Outside a tokio
        // runtime (produce_batch polled by another executor) a plain thread
        // does it; if none can be started the records just linger.
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn_blocking(flush)),
            Err(_) => drop(std::thread::Builder::new().spawn(flush)),
        }
    }

    /// Each partition of `topic` with its leader, replicas and in-sync
    /// replicas, from the cluster's metadata (one request, on tokio's
    /// blocking pool).
    pub async fn partitions_for(&self, topic: &str) -> Result<Vec<PartitionInfo>, Error> {
        let (producer, topic) = (self.inner.clone(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let metadata = producer
                .client()
                .fetch_metadata(Some(&topic), METADATA_TIMEOUT)?;
            crate::consumer::partitions_of(&metadata, &topic)
        })
        .await
        .map_err(|e| Error::Internal(format!("the metadata request's task failed: {e}")))?
    }

    /// Flushes (up to `producer.flush_timeout_ms`) and closes the producer.
    pub async fn close(self) -> Result<(), Error> {
        let timeout = self.flush_timeout;
        tokio::task::spawn_blocking(move || self.flush(timeout))
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        if self.inner.in_flight_count() == 0 {
            return;
        }
        if let Err(e) = flush(&self.inner, self.flush_timeout) {
            tracing::error!(
                error = %e,
                queued = self.inner.in_flight_count(),
                "producer dropped with records still undelivered after flush_timeout_ms; they are lost (call close() and check its result)"
            );
        }
    }
}

/// Waits until every queued record is delivered, or `timeout`.
///
/// rdkafka's own `flush` calls `rd_kafka_flush` with no wait and then polls
/// in steps of up to 100 ms, while the producer's polling thread takes the
/// delivery reports it waits for: a flush of a few records takes 100 ms.
/// `rd_kafka_flush` with the whole timeout returns as soon as the last
/// report is served (and sends without waiting `linger.ms` meanwhile).
fn flush(
    producer: &ThreadedProducer<DeliveryContext>,
    timeout: Duration,
) -> Result<(), KafkaError> {
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: the pointer is the live client owned by `producer`, borrowed
    // for the duration of the call.
    let code = unsafe { rdkafka_sys::rd_kafka_flush(producer.client().native_ptr(), ms) };
    match code {
        rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR => Ok(()),
        code => Err(KafkaError::Flush(code.into())),
    }
}

fn is_oversized(e: &KafkaError) -> bool {
    e.rdkafka_error_code() == Some(RDKafkaErrorCode::MessageSizeTooLarge)
}

/// How long [`Producer::send_now`] keeps librdkafka's linger off: long enough
/// for the woken broker threads to look (microseconds when the machine is not
/// saturated), short enough to hold a blocking thread only briefly.
const SEND_NOW_MS: i32 = 2;

/// How long [`Producer::partitions_for`] waits for the cluster.
const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The delivery reports of one batch, filled in by librdkafka's thread.
struct BatchDeliveries {
    results: Mutex<Vec<Option<Result<Delivery, RecordError>>>>,
    /// Records not yet reported, plus one until every record was sent.
    remaining: AtomicUsize,
    done: tokio::sync::Notify,
}

impl BatchDeliveries {
    fn new(len: usize) -> Self {
        BatchDeliveries {
            results: Mutex::new((0..len).map(|_| None).collect()),
            remaining: AtomicUsize::new(len + 1),
            done: tokio::sync::Notify::new(),
        }
    }

    fn complete(&self, index: usize, result: Result<Delivery, RecordError>) {
        if let Some(slot) = self
            .results
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get_mut(index)
        {
            *slot = Some(result);
        }
        self.count_down();
    }

    fn count_down(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Drops the "still sending" count and waits for every report.
    async fn sent_all(&self) {
        self.count_down();
        if self.remaining.load(Ordering::Acquire) > 0 {
            self.done.notified().await;
        }
    }
}

struct Pending {
    batch: Arc<BatchDeliveries>,
    index: usize,
}

struct DeliveryContext;

impl ClientContext for DeliveryContext {}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Box<Pending>;

    fn delivery(&self, result: &DeliveryResult<'_>, pending: Box<Pending>) {
        let outcome = match result {
            Ok(m) => Ok(Delivery::Written {
                partition: m.partition(),
                offset: m.offset(),
            }),
            Err((e, _)) => Err(RecordError::Kafka(e.clone())),
        };
        pending.batch.complete(pending.index, outcome);
    }
}
