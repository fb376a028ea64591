//! Writing failed records to the retry and dead-letter topics: the record as
//! it was read (key, value, headers), plus kafka-batch's failure headers, and
//! a wait for every delivery report before anything is committed past it.

use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use time::OffsetDateTime;

use super::policy::{Chain, ChainState};
use crate::envelope::format_dt;
use crate::error::Error;
use crate::failure::record::{owned_headers, FailureHeaders, KeptRecord};
use crate::failure::FailureInfo;
use crate::settings::{ConsumerSettings, FailurePolicy};

/// Where a failed record goes.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Destination {
    /// The retry topic, due at `due_ms` (Unix milliseconds), with its new standing.
    Retry { state: ChainState, due_ms: i64 },
    /// The dead-letter topic.
    DeadLetter,
}

/// One failed record to write.
pub(crate) struct Outgoing<'a> {
    pub record: &'a KeptRecord,
    pub destination: Destination,
    /// `handler` or a decode error kind.
    pub reason: &'static str,
    pub error: &'a str,
    /// Times the record was handed to a handler.
    pub attempts: u32,
}

/// The producer behind the `retry_topic` and `dead_letter` policies.
pub(crate) struct Forwarder {
    producer: FutureProducer,
    group: String,
    service: String,
    retry_topic: String,
    dead_letter_topic: String,
}

impl Forwarder {
    /// A forwarder when the chain writes to another topic, else `None`.
    pub fn new(settings: &ConsumerSettings, chain: &Chain) -> Result<Option<Forwarder>, Error> {
        if !chain.keeps_records() {
            return Ok(None);
        }
        let failure = &settings.failure;
        let producer: FutureProducer = settings.failure_producer_config()?.create()?;
        Ok(Some(Forwarder {
            producer,
            group: settings.group_id.clone(),
            service: settings.service.clone(),
            retry_topic: failure
                .retry_topic_name()
                .map(str::to_owned)
                .unwrap_or_default(),
            dead_letter_topic: if failure.has(FailurePolicy::DeadLetter) {
                failure.dead_letter.topic.clone()
            } else {
                String::new()
            },
        }))
    }

    /// Writes every record and returns when each has a delivery report: `Ok`
    /// only when all were written.
    pub async fn send(&self, outgoing: &[Outgoing<'_>]) -> Result<(), Error> {
        let failed_at = format_dt(OffsetDateTime::now_utc());
        let mut pending = Vec::with_capacity(outgoing.len());
        for out in outgoing {
            let record = out.record;
            let topic = match out.destination {
                Destination::Retry { .. } => self.retry_topic.as_str(),
                Destination::DeadLetter => self.dead_letter_topic.as_str(),
            };
            let added = self.failure_headers(out, &failed_at);
            let mut future_record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topic).headers(owned_headers(&record.headers, true, &added));
            future_record.key = record.key.as_deref();
            future_record.payload = record.value.as_deref();
            loop {
                match self.producer.send_result(future_record) {
                    Ok(delivery) => {
                        pending.push((topic, record, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                        // librdkafka's queue is full: wait for deliveries to make room.
                        future_record = returned;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => return Err(forward_error(topic, record, error)),
                }
            }
        }
        // Every record is in flight already; waiting in order costs nothing more.
        for (topic, record, delivery) in pending {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((error, _))) => return Err(forward_error(topic, record, error)),
                Err(_canceled) => {
                    return Err(forward_error(
                        topic,
                        record,
                        KafkaError::MessageProduction(RDKafkaErrorCode::Fail),
                    ))
                }
            }
        }
        Ok(())
    }

    fn failure_headers(&self, out: &Outgoing<'_>, failed_at: &str) -> Vec<(&'static str, String)> {
        let record = out.record;
        // A record read back from the retry topic names its first source.
        let earlier = FailureInfo::from_headers(
            record
                .headers
                .iter()
                .map(|h| (h.key.as_slice(), h.value.as_deref())),
        );
        let source = earlier
            .source()
            .unwrap_or((&record.topic, record.partition, record.offset));
        FailureHeaders {
            source: Some(source),
            group: &self.group,
            service: &self.service,
            attempts: out.attempts,
            reason: out.reason,
            error: out.error,
            failed_at,
            retry: match out.destination {
                Destination::Retry { state, due_ms } => Some((state.used, due_ms)),
                Destination::DeadLetter => None,
            },
        }
        .pairs()
    }
}

fn forward_error(topic: &str, record: &KeptRecord, error: KafkaError) -> Error {
    Error::FailureTopic(Box::new(crate::failure::FailureTopicError {
        topic: topic.to_owned(),
        record: record.describe(),
        source: error,
    }))
}
