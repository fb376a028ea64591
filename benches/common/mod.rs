//! What both benchmarks measure with: the payload type, and the plain
//! serde_json decode that is the baseline for the envelope's unpack.

use serde::{Deserialize, Serialize};

/// The payload of every benchmark record.
#[derive(Clone, Serialize, Deserialize)]
pub struct Event {
    pub title: String,
    pub category: String,
    pub lat: f64,
    pub lon: f64,
    pub rank: u32,
    pub labels: Vec<String>,
}

/// The baseline: the same bytes into the same payload type, history skipped.
/// (Decoding is what is measured; not every bench reads the fields.)
#[derive(Deserialize)]
#[allow(dead_code)]
pub struct PlainEnvelope<T> {
    pub item: T,
    hist: serde::de::IgnoredAny,
}

/// When the run being measured got its first record (see [`first_record`]).
static FIRST_RECORD: std::sync::Mutex<Option<std::time::Instant>> = std::sync::Mutex::new(None);
static SEEN_FIRST: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Notes that the run being measured has its first record: the rate is
/// measured from here, so that joining the group (seconds on the embedded
/// broker when two members join at once) is not counted as consuming.
#[allow(dead_code)]
pub fn first_record() {
    if !SEEN_FIRST.swap(true, std::sync::atomic::Ordering::Relaxed) {
        *FIRST_RECORD.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    }
}

/// Starts a measured run: forgets the last run's first record.
#[allow(dead_code)]
pub fn reset_first_record() {
    SEEN_FIRST.store(false, std::sync::atomic::Ordering::Relaxed);
    *FIRST_RECORD.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// When the measured run got its first record, if it got one.
#[allow(dead_code)]
pub fn first_record_at() -> Option<std::time::Instant> {
    *FIRST_RECORD.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a hand-written at-least-once consume loop commits.
#[allow(dead_code)] // the codec bench includes this module but consumes nothing
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RawCommit {
    /// `commit_consumer_state(Sync)` after every batch: a round trip per
    /// batch, as kafka-batch's poller did. Kept to show what that costs.
    SyncPerBatch,
    /// `commit_consumer_state(Async)` after every batch: never waits.
    AsyncPerBatch,
    /// Each batch's next offsets stored once it is handled
    /// (`enable.auto.offset.store=false`), committed by librdkafka on its
    /// own interval (`enable.auto.commit=true`): what a framework with a
    /// tracked watermark does.
    StoredWithInterval,
}

impl RawCommit {
    /// The label in the report.
    #[allow(dead_code)]
    pub fn label(self) -> &'static str {
        match self {
            RawCommit::SyncPerBatch => "raw, sync commit",
            RawCommit::AsyncPerBatch => "raw, async commit",
            RawCommit::StoredWithInterval => "raw, stored+interval",
        }
    }

    /// The consumer properties this way of committing needs.
    #[allow(dead_code)]
    pub fn configure(self, config: &mut rdkafka::ClientConfig) {
        match self {
            RawCommit::SyncPerBatch | RawCommit::AsyncPerBatch => {
                // librdkafka stores each polled offset; the loop handles a
                // record before it polls the next, so what it commits was handled.
                config.set("enable.auto.offset.store", "true");
            }
            RawCommit::StoredWithInterval => {
                config
                    .set("enable.auto.offset.store", "false")
                    .set("enable.auto.commit", "true");
            }
        }
    }
}

/// A hand-written consume loop, on a subscribed consumer configured with
/// [`RawCommit::configure`]: poll, decode the envelope into the same
/// payload type with serde_json, and every `batch` records commit (or
/// store) as `commit` says. Returns the count.
#[allow(dead_code)] // the codec bench includes this module but consumes nothing
pub fn raw_consume_loop(
    consumer: &rdkafka::consumer::BaseConsumer,
    records: usize,
    batch: usize,
    commit: RawCommit,
) -> anyhow::Result<usize> {
    use rdkafka::consumer::{CommitMode, Consumer as _};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::{Message as _, Offset, TopicPartitionList};

    let (mut count, mut since_commit) = (0, 0);
    // The next offset of each partition handled since the last store.
    let mut handled: Vec<(String, i32, i64)> = Vec::new();
    while count < records {
        match consumer.poll(std::time::Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => anyhow::bail!("raw consumer: {e}"),
            Some(Ok(m)) => {
                first_record();
                let envelope: PlainEnvelope<Event> =
                    serde_json::from_slice(m.payload().unwrap_or_default())?;
                std::hint::black_box((m.key(), envelope.item));
                count += 1;
                since_commit += 1;
                if commit == RawCommit::StoredWithInterval {
                    let (topic, partition, next) = (m.topic(), m.partition(), m.offset() + 1);
                    match handled
                        .iter_mut()
                        .find(|(t, p, _)| *p == partition && t == topic)
                    {
                        Some(entry) => entry.2 = next,
                        None => handled.push((topic.to_owned(), partition, next)),
                    }
                }
                if since_commit == batch {
                    match commit {
                        RawCommit::SyncPerBatch => {
                            consumer.commit_consumer_state(CommitMode::Sync)?
                        }
                        RawCommit::AsyncPerBatch => {
                            consumer.commit_consumer_state(CommitMode::Async)?
                        }
                        RawCommit::StoredWithInterval => {
                            let mut tpl = TopicPartitionList::with_capacity(handled.len());
                            for (topic, partition, next) in handled.drain(..) {
                                tpl.add_partition_offset(&topic, partition, Offset::Offset(next))?;
                            }
                            consumer.store_offsets(&tpl)?;
                        }
                    }
                    since_commit = 0;
                }
            }
        }
    }
    match consumer.commit_consumer_state(CommitMode::Sync) {
        // Nothing new since the last commit.
        Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(count),
        Err(e) => Err(e.into()),
    }
}

/// The library side of the consume comparison: `Consumer::process` with a
/// handler that only counts, until `records` messages were handled.
#[allow(dead_code)] // the codec bench includes this module but consumes nothing
pub async fn library_consume_loop(
    settings: &kafka_batch::ConsumerSettings,
    records: usize,
) -> anyhow::Result<usize> {
    let consumer = kafka_batch::Consumer::new(settings)?;
    let handle = consumer.handle();
    // Counted in an atomic: the handler is shared by the batches in flight.
    let count = std::sync::atomic::AtomicUsize::new(0);
    consumer
        .process(async |batch: Vec<kafka_batch::Message<Event>>| {
            first_record();
            let n = std::hint::black_box(batch).len();
            let total = count.fetch_add(n, std::sync::atomic::Ordering::Relaxed) + n;
            if total >= records {
                handle.shutdown();
            }
            anyhow::Ok(())
        })
        .await?;
    Ok(count.into_inner())
}
