//! Runs the embedded broker (librdkafka's mock cluster) on its own, so any
//! service or tool can be pointed at it without installing Kafka.
//!
//! ```sh
//! cargo run --release --example broker -- events:16 enriched:16
//! # prints: bootstrap.servers=127.0.0.1:PORT ; serves until Ctrl-C or SIGTERM
//! KAFKA_BATCH_BOOTSTRAP_SERVERS=127.0.0.1:PORT cargo run --release --example pipeline
//! ```
//!
//! Arguments are `topic:partitions` to create. Topics that are not created
//! are made on first use with the mock cluster's default partition count.
//! `BROKER_COUNT` sets the number of brokers (default 1).

use anyhow::Context;
use kafka_batch::testing::EmbeddedBroker;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let brokers: i32 = std::env::var("BROKER_COUNT")
        .ok()
        .map(|v| v.parse().context("BROKER_COUNT must be a number"))
        .transpose()?
        .unwrap_or(1);
    let broker = EmbeddedBroker::start_with_brokers(brokers)?;
    for arg in std::env::args().skip(1) {
        let (topic, partitions) = arg
            .split_once(':')
            .with_context(|| format!("{arg:?}: write topics as name:partitions"))?;
        let partitions = partitions
            .parse()
            .with_context(|| format!("{arg:?}: partitions must be a number"))?;
        broker.create_topic(topic, partitions)?;
        eprintln!("created topic {topic} with {partitions} partitions");
    }
    println!("bootstrap.servers={}", broker.bootstrap_servers());
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    eprintln!("stopping the embedded broker");
    Ok(())
}
