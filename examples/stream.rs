//! The consumer as a stream and the producer as a sink: words go in through
//! a sink with a transform, come out of the consumer as batches, are
//! transformed again and produced, and each input batch is acknowledged
//! only once its outputs are delivered (`BatchStream::pipe_to`).
//!
//! ```sh
//! cargo run --release --example stream    # embedded broker, no set-up
//! ```

use std::time::Duration;

use anyhow::Context as _;
use futures_util::{stream, SinkExt as _, StreamExt as _};
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{Consumer, Message, Producer};
use serde::{Deserialize, Serialize};

const WORDS: &str = "stream-words";
const SHOUTED: &str = "stream-shouted";
const COUNT: usize = 10_000;

#[derive(Debug, Serialize, Deserialize)]
struct Word {
    text: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Shouted {
    text: String,
    letters: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start()?;
    broker.create_topic(WORDS, 4)?;
    broker.create_topic(SHOUTED, 4)?;
    let producer = Producer::new(&broker.producer_settings())?;

    // In: a stream of numbers, mapped to messages, through a sink whose
    // `with` turns each into a `Word` on its way to the topic.
    let numbers = stream::iter(0..COUNT).map(|i| Ok(Message::new(format!("w{i}"), i)));
    let sink = producer
        .sink::<Word>(WORDS)
        .with(|m: Message<usize>| async move {
            Ok::<_, kafka_batch::Error>(m.map(|i| Word {
                text: format!("word number {i}"),
            }))
        });
    numbers.forward(sink).await.context("producing the words")?;
    println!("produced {COUNT} words through the sink");

    // Out: batches from the stream, one output per word, each batch
    // acknowledged once its outputs are delivered.
    let mut settings = broker.consumer_settings("shouters", &[WORDS]);
    settings.concurrency = 4;
    let consumer = Consumer::new(&settings)?;
    let handle = consumer.handle();
    let closer = handle.clone();
    // Close once every word was handled: the stream then ends after the
    // last commit, and `pipe_to` returns.
    tokio::spawn(async move {
        while closer.stats().messages < COUNT as u64 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = closer.close().await;
    });
    let started = std::time::Instant::now();
    consumer
        .stream::<Word>()
        .pipe_to(&producer, SHOUTED, |m| {
            Some(Shouted {
                text: m.payload.text.to_uppercase(),
                letters: m.payload.text.len(),
            })
        })
        .await
        .context("the pipe")?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "piped {COUNT} words in {secs:.2} s ({:.0} a second), {} batches",
        COUNT as f64 / secs,
        handle.stats().batches
    );

    let committed = tokio::task::block_in_place(|| broker.committed_offsets("shouters", WORDS))?;
    let total: i64 = committed.values().sum();
    println!("committed {total} of {COUNT} input offsets: {committed:?}");
    let out: Vec<Message<Shouted>> =
        tokio::task::block_in_place(|| broker.read_messages(SHOUTED, 1, Duration::from_secs(10)))?;
    if let Some(first) = out.first() {
        // Read back, its one ref is its own record, whose history names the
        // input record it was derived from.
        let source = first
            .refs
            .iter()
            .filter_map(|own| own.hist.as_ref())
            .flat_map(|hist| hist.refs.iter().map(ToString::to_string))
            .collect::<Vec<_>>()
            .join(",");
        println!(
            "an output: {:?} ({} letters), derived from {source}",
            first.payload.text, first.payload.letters
        );
    }
    anyhow::ensure!(total == COUNT as i64, "every input offset committed");
    Ok(())
}
