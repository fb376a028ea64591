//! Inspect a dead-letter topic and replay it to where its records came from.
//!
//! ```sh
//! # A self-contained demo on the embedded broker: a consumer dead-letters
//! # the records it cannot handle, then they are listed and replayed.
//! cargo run --example replay
//!
//! # Against a cluster: list, then replay a slice of a dead-letter topic.
//! KAFKA_BATCH_BOOTSTRAP_SERVERS=kafka:9092 cargo run --example replay -- events.dead --list
//! KAFKA_BATCH_BOOTSTRAP_SERVERS=kafka:9092 cargo run --example replay -- events.dead \
//!     --partition 0 --from 100 --until 200 [--to events.repaired]
//! ```

use std::time::Duration;

use anyhow::{bail, Context};
use kafka_batch::replay::Replay;
use kafka_batch::settings::FailurePolicy;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{Consumer, Failures, Message, Producer, Settings};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kafka_batch=warn".into()),
        )
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    match std::env::var("KAFKA_BATCH_BOOTSTRAP_SERVERS") {
        Ok(servers) => cli(&servers, &args).await,
        Err(_) => demo().await,
    }
}

/// `<topic> [--list] [--partition N] [--from OFFSET] [--until OFFSET] [--to TOPIC]`
async fn cli(servers: &str, args: &[String]) -> anyhow::Result<()> {
    let Some(topic) = args.first() else {
        bail!("usage: replay <dead-letter-topic> [--list] [--partition N] [--from OFFSET] [--until OFFSET] [--to TOPIC]");
    };
    let settings = Settings::load().context("loading settings")?;
    let mut replay = Replay::new(servers, topic).kafka(&settings.kafka);
    let mut list = false;
    let (mut from, mut until) = (0, i64::MAX);
    let mut rest = args[1..].iter();
    while let Some(flag) = rest.next() {
        let mut value = || rest.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--list" => list = true,
            "--partition" => replay = replay.partition(value()?.parse()?),
            "--from" => from = value()?.parse()?,
            "--until" => until = value()?.parse()?,
            "--to" => replay = replay.to_topic(value()?),
            other => bail!("unknown argument {other:?}"),
        }
    }
    let replay = replay.offsets(from..until);
    if list {
        list_dead_letters(replay.clone()).await?;
        return Ok(());
    }
    let report = replay.run().await?;
    println!("{report:#?}");
    Ok(())
}

/// Prints each dead letter with what its failure headers say.
async fn list_dead_letters(replay: Replay) -> anyhow::Result<()> {
    // Reading blocks (librdkafka polls): keep it off the async workers.
    for letter in tokio::task::spawn_blocking(move || replay.read()).await?? {
        let info = &letter.info;
        println!(
            "  {}:{}  from {:?}  attempts {}  {}: {}",
            letter.partition,
            letter.offset,
            info.source(),
            info.attempts,
            info.reason.as_deref().unwrap_or("?"),
            info.error.as_deref().unwrap_or("?"),
        );
    }
    Ok(())
}

/// The whole story on the embedded broker.
async fn demo() -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start()?;
    broker.create_topic("orders", 1)?;
    broker.create_topic("orders.dead", 1)?;
    let servers = broker.bootstrap_servers().to_owned();

    // Ten orders, two of which the service will refuse, and one record
    // that is not even JSON.
    let producer = Producer::new(&broker.producer_settings())?;
    let orders: Vec<Message> = (0..10)
        .map(|i| Message::new(format!("order-{i}"), json!({ "n": i, "valid": i % 4 != 3 })))
        .collect();
    producer.produce_batch("orders", &orders).await?;
    broker.produce_raw(
        "orders",
        &[(0, Some(b"order-x"), Some(b"<html>oops</html>"))],
    )?;

    let mut settings = broker.consumer_settings("order-service", &["orders"]);
    settings.failure.policies = vec![FailurePolicy::Retry, FailurePolicy::DeadLetter];
    settings.failure.retry.retries = 2;
    settings.failure.retry.backoff_ms = 100;
    settings.failure.dead_letter.topic = "orders.dead".into();
    let consumer = Consumer::new(&settings)?;
    let handle = consumer.handle();
    let stopper = handle.clone();
    let watcher = tokio::spawn(async move {
        while stopper.stats().dead_lettered < 3 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stopper.shutdown();
    });
    consumer
        .process(async |batch: Vec<Message>| {
            let mut failed = Failures::new();
            for (i, order) in batch.iter().enumerate() {
                if order.payload["valid"] == false {
                    failed.add(i, format!("{} failed validation", order.id));
                }
            }
            failed.into_result()
        })
        .await?;
    watcher.await?;
    let stats = handle.stats();
    println!(
        "consumer: {} messages handled, {} retries, {} dead-lettered",
        stats.messages, stats.retries, stats.dead_lettered
    );

    println!("\ndead letters in orders.dead:");
    list_dead_letters(Replay::new(&servers, "orders.dead")).await?;

    // Once the bug is fixed, replay them to where they came from.
    let report = Replay::new(&servers, "orders.dead").run().await?;
    println!(
        "\nreplayed {} records ({:?}); next time start at {:?}",
        report.replayed, report.by_topic, report.next_offsets
    );
    Ok(())
}
