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

/// Where the measured part of a run starts (see [`start_measuring`]): when,
/// the process's CPU time then, and the records handled before it.
type Start = (std::time::Instant, std::time::Duration, usize);
static START: std::sync::Mutex<Option<Start>> = std::sync::Mutex::new(None);
static STARTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Notes that the run being measured has its first record: the rate is
/// measured from here, so that joining the group is not counted as
/// consuming.
#[allow(dead_code)]
pub fn first_record() {
    start_measuring(0);
}

/// Starts the measured part of a run here, `handled_before` records in:
/// the first record, or (with several clients) the first batch once every
/// client holds partitions, since their joins are rebalances in which
/// nobody consumes for seconds on the embedded broker.
#[allow(dead_code)]
pub fn start_measuring(handled_before: usize) {
    if !STARTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        *START.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((std::time::Instant::now(), cpu_time(), handled_before));
    }
}

/// Starts a measured run: forgets the last run's start.
#[allow(dead_code)]
pub fn reset_first_record() {
    STARTED.store(false, std::sync::atomic::Ordering::Relaxed);
    *START.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

/// Where the measured run started, if it did.
#[allow(dead_code)]
pub fn measured_start() -> Option<Start> {
    *START.lock().unwrap_or_else(|e| e.into_inner())
}

/// CPU time of this process so far (user + system, all threads).
#[allow(dead_code)]
pub fn cpu_time() -> std::time::Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to write.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) };
    if status != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
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
    let several = settings.clients > 1;
    consumer
        .process(async |batch: Vec<kafka_batch::Message<Event>>| {
            let n = std::hint::black_box(batch).len();
            let before = count.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            if !several {
                first_record();
            } else if measured_start().is_none()
                && handle.assignments().iter().all(|held| !held.is_empty())
            {
                start_measuring(before);
            }
            let total = before + n;
            if total >= records {
                handle.shutdown();
            }
            anyhow::Ok(())
        })
        .await?;
    Ok(count.into_inner())
}
