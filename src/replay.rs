//! Inspecting and replaying a dead-letter topic.
//!
//! [`Replay::read`] lists the records of a dead-letter topic (or a slice of
//! it) with what their failure headers say; [`Replay::run`] produces them
//! back, unchanged (key, value, the record's own headers) but without
//! kafka-batch's failure headers, to the topic each came from or to another.
//!
//! ```no_run
//! use kafka_batch::replay::Replay;
//!
//! # async fn run() -> Result<(), kafka_batch::Error> {
//! let replay = Replay::new("localhost:9092", "events.dead").partition(0).offsets(100..200);
//! for letter in replay.read()? {
//!     println!("{}:{} failed: {:?}", letter.partition, letter.offset, letter.info.error);
//! }
//! let report = replay.run().await?; // back to each record's source topic
//! println!("replayed {} records", report.replayed);
//! # Ok(()) }
//! ```
//!
//! Replaying is at least once, like everything else: running it twice
//! produces the records twice. Note the last offset replayed
//! ([`ReplayReport::next_offsets`]) to continue from there.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};

use crate::error::Error;
use crate::failure::record::{owned_headers, KeptRecord, RawHeader};
use crate::failure::FailureInfo;
use crate::settings::KafkaProperties;

/// How long metadata and watermark requests may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// One record of a dead-letter topic.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct DeadLetter {
    /// Its partition in the dead-letter topic.
    pub partition: i32,
    /// Its offset there.
    pub offset: i64,
    /// The key bytes, as the failed record had them.
    pub key: Option<Vec<u8>>,
    /// The value bytes, as the failed record had them (the envelope).
    pub value: Option<Vec<u8>>,
    /// Every header, kafka-batch's failure headers included, as (name, value) bytes.
    pub headers: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    /// What the failure headers say: source, attempts, reason, error, time.
    pub info: FailureInfo,
}

/// What [`Replay::run`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplayReport {
    /// Records produced (and acknowledged).
    pub replayed: usize,
    /// Of those, how many went to each topic.
    pub by_topic: BTreeMap<String, usize>,
    /// Records left out: no destination given and no source-topic header.
    pub without_source: usize,
    /// Per dead-letter partition, the offset after the last record read:
    /// where a later replay should start.
    pub next_offsets: BTreeMap<i32, i64>,
}

/// Reads a dead-letter topic, or a slice of it, and replays it. See the
/// [module docs](self).
#[derive(Clone)]
pub struct Replay {
    bootstrap_servers: String,
    kafka: KafkaProperties,
    topic: String,
    partition: Option<i32>,
    offsets: Option<Range<i64>>,
    to: Option<String>,
    filter: Option<Arc<DeadLetterFilter>>,
}

/// A predicate choosing which dead letters [`Replay::run`] writes back.
type DeadLetterFilter = dyn Fn(&DeadLetter) -> bool + Send + Sync;

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("bootstrap_servers", &self.bootstrap_servers)
            .field("topic", &self.topic)
            .field("partition", &self.partition)
            .field("offsets", &self.offsets)
            .field("to", &self.to)
            .field("filtered", &self.filter.is_some())
            .finish_non_exhaustive()
    }
}

impl DeadLetter {
    /// The record's parts and what its failure headers say.
    fn from_record(r: KeptRecord) -> DeadLetter {
        DeadLetter {
            partition: r.partition,
            offset: r.offset,
            info: FailureInfo::from_headers(
                r.headers
                    .iter()
                    .map(|h| (h.key.as_slice(), h.value.as_deref())),
            ),
            headers: r.headers.into_iter().map(|h| (h.key, h.value)).collect(),
            key: r.key,
            value: r.value,
        }
    }
}

impl Replay {
    /// Replays `dead_letter_topic` on the cluster at `bootstrap_servers`:
    /// every partition, from the beginning to the end it had when reading began.
    pub fn new(bootstrap_servers: &str, dead_letter_topic: &str) -> Replay {
        Replay {
            bootstrap_servers: bootstrap_servers.to_owned(),
            kafka: KafkaProperties::default(),
            topic: dead_letter_topic.to_owned(),
            partition: None,
            offsets: None,
            to: None,
            filter: None,
        }
    }

    /// librdkafka properties for both the reader and the producer (security
    /// settings, for example).
    pub fn kafka(mut self, properties: &KafkaProperties) -> Replay {
        self.kafka = properties.clone();
        self
    }

    /// Only this partition of the dead-letter topic.
    pub fn partition(mut self, partition: i32) -> Replay {
        self.partition = Some(partition);
        self
    }

    /// Only records whose offset in the dead-letter topic is in `offsets`.
    pub fn offsets(mut self, offsets: Range<i64>) -> Replay {
        self.offsets = Some(offsets);
        self
    }

    /// Only the records `filter` selects (by what their headers say, their
    /// key or their value), for [`Replay::read`] and [`Replay::run`]:
    /// [`JobQueue::retry_dead`](crate::jobs::JobQueue::retry_dead) picks
    /// jobs by id this way. Others are left where they are.
    pub fn matching(
        mut self,
        filter: impl Fn(&DeadLetter) -> bool + Send + Sync + 'static,
    ) -> Replay {
        self.filter = Some(Arc::new(filter));
        self
    }

    /// Produce every record to `topic`, instead of the topic it came from.
    pub fn to_topic(mut self, topic: &str) -> Replay {
        self.to = Some(topic.to_owned());
        self
    }

    fn config(&self) -> ClientConfig {
        let mut config = ClientConfig::new();
        for (k, v) in self.kafka.iter() {
            config.set(k, v);
        }
        config.set("bootstrap.servers", &self.bootstrap_servers);
        config
    }

    /// The selected records, in partition and offset order. Blocking: call it
    /// from a thread that may block (`tokio::task::spawn_blocking`).
    pub fn read(&self) -> Result<Vec<DeadLetter>, Error> {
        Ok(self
            .read_records()?
            .0
            .into_iter()
            .map(DeadLetter::from_record)
            .filter(|d| self.filter.as_ref().is_none_or(|selects| selects(d)))
            .collect())
    }

    /// The selected records, and the offset after the last one read per partition.
    fn read_records(&self) -> Result<(Vec<KeptRecord>, BTreeMap<i32, i64>), Error> {
        let consumer: BaseConsumer = self
            .config()
            .set("group.id", "kafka-batch-replay")
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .create()?;
        let metadata = consumer.fetch_metadata(Some(&self.topic), REQUEST_TIMEOUT)?;
        let partitions: Vec<i32> = metadata
            .topics()
            .iter()
            .filter(|t| t.name() == self.topic)
            .flat_map(|t| t.partitions().iter().map(|p| p.id()))
            .filter(|p| self.partition.is_none_or(|only| only == *p))
            .collect();
        if partitions.is_empty() {
            return Err(Error::Broker(format!(
                "dead-letter topic {:?} has no partition {} on {}: check the topic name and partition",
                self.topic,
                self.partition.map_or("at all".into(), |p| p.to_string()),
                self.bootstrap_servers
            )));
        }
        // Read each partition from its start to the end it has now.
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for partition in partitions {
            let (low, high) = consumer.fetch_watermarks(&self.topic, partition, REQUEST_TIMEOUT)?;
            let (start, end) = match &self.offsets {
                Some(r) => (r.start.max(low), r.end.min(high)),
                None => (low, high),
            };
            if start < end {
                tpl.add_partition_offset(&self.topic, partition, Offset::Offset(start))?;
                ends.insert(partition, end);
            }
        }
        let mut next = ends.clone();
        if ends.is_empty() {
            return Ok((Vec::new(), BTreeMap::new()));
        }
        consumer.assign(&tpl)?;
        let topic: Arc<str> = Arc::from(self.topic.as_str());
        let mut records = Vec::new();
        let mut quiet = 0;
        while !ends.is_empty() {
            match consumer.poll(Duration::from_millis(200)) {
                None => {
                    // Compaction or transaction markers can leave the last
                    // offsets empty: stop after a while with nothing new.
                    quiet += 1;
                    if quiet >= 25 {
                        break;
                    }
                }
                Some(Err(e)) => return Err(e.into()),
                Some(Ok(m)) => {
                    quiet = 0;
                    let Some(end) = ends.get(&m.partition()).copied() else {
                        continue;
                    };
                    if m.offset() < end {
                        records.push(KeptRecord::copy(&m, &topic));
                        next.insert(m.partition(), m.offset() + 1);
                    }
                    if m.offset() + 1 >= end {
                        ends.remove(&m.partition());
                    }
                }
            }
        }
        records.sort_by_key(|r| (r.partition, r.offset));
        Ok((records, next))
    }

    /// Produces the selected records back, without kafka-batch's failure
    /// headers, and returns when the broker acknowledged every one.
    pub async fn run(&self) -> Result<ReplayReport, Error> {
        let this = self.clone();
        let (records, next_offsets) = tokio::task::spawn_blocking(move || this.read_records())
            .await
            .map_err(|e| Error::Internal(format!("the replay reader panicked: {e}")))??;
        let producer: FutureProducer = self
            .config()
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .create()?;
        let mut report = ReplayReport {
            next_offsets,
            ..ReplayReport::default()
        };
        let mut pending = Vec::with_capacity(records.len());
        for record in &records {
            if let Some(filter) = &self.filter {
                if !filter(&DeadLetter::from_record(record.clone())) {
                    continue;
                }
            }
            let info = FailureInfo::from_headers(
                record
                    .headers
                    .iter()
                    .map(|h: &RawHeader| (h.key.as_slice(), h.value.as_deref())),
            );
            let Some(destination) = self.to.clone().or(info.source_topic) else {
                tracing::warn!(record = %record.describe(), "dead letter without a source-topic header left out (give a destination with to_topic)");
                report.without_source += 1;
                continue;
            };
            let mut out: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(&destination).headers(owned_headers(&record.headers, true, &[]));
            out.key = record.key.as_deref();
            out.payload = record.value.as_deref();
            let delivery = loop {
                match producer.send_result(out) {
                    Ok(delivery) => break delivery,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        out = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => return Err(e.into()),
                }
            };
            pending.push((destination, delivery));
        }
        for (destination, delivery) in pending {
            match delivery.await {
                Ok(Ok(_)) => {
                    report.replayed += 1;
                    *report.by_topic.entry(destination).or_default() += 1;
                }
                Ok(Err((e, _))) => return Err(e.into()),
                Err(_) => {
                    return Err(Error::Kafka(KafkaError::MessageProduction(
                        RDKafkaErrorCode::Fail,
                    )))
                }
            }
        }
        Ok(report)
    }
}
