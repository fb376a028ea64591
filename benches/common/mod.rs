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

/// The best hand-written consume loop, on a subscribed consumer with
/// `enable.auto.offset.store=true`: poll, decode the envelope into the same
/// payload type with serde_json, commit every `batch` records (librdkafka
/// stores each polled offset; the loop commits them). Returns the count.
#[allow(dead_code)] // the codec bench includes this module but consumes nothing
pub fn raw_consume_loop(
    consumer: &rdkafka::consumer::BaseConsumer,
    records: usize,
    batch: usize,
) -> anyhow::Result<usize> {
    use rdkafka::consumer::{CommitMode, Consumer as _};
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::Message as _;

    let (mut count, mut since_commit) = (0, 0);
    while count < records {
        match consumer.poll(std::time::Duration::from_millis(100)) {
            None => {}
            Some(Err(e)) => anyhow::bail!("raw consumer: {e}"),
            Some(Ok(m)) => {
                let envelope: PlainEnvelope<Event> =
                    serde_json::from_slice(m.payload().unwrap_or_default())?;
                std::hint::black_box((m.key(), envelope.item));
                count += 1;
                since_commit += 1;
                if since_commit == batch {
                    consumer.commit_consumer_state(CommitMode::Sync)?;
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
    let mut count = 0;
    consumer
        .process(async |batch: Vec<kafka_batch::Message<Event>>| {
            count += std::hint::black_box(batch).len();
            if count >= records {
                handle.shutdown();
            }
            anyhow::Ok(())
        })
        .await?;
    Ok(count)
}
