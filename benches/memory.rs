//! Peak memory of a consuming process against the size of the backlog it
//! reads: kafka-batch with its default settings, and a hand-written rdkafka
//! loop with the same librdkafka settings.
//!
//! ```sh
//! cargo bench --bench memory                                 # embedded broker in this process
//! BENCH_BACKLOGS=100000,1000000 cargo bench --bench memory
//! BENCH_BOOTSTRAP=127.0.0.1:9092 cargo bench --bench memory  # any broker (topics created by the bench)
//! ```
//!
//! The backlog is written first; then each consumer runs in a child process
//! of its own (this same binary) that reads the whole backlog and reports
//! its peak resident set (`VmHWM` from /proc/self/status). Memory bounded by
//! the settings shows as the same peak for every backlog size.

use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context};
use kafka_batch::settings::CONSUMER_DEFAULTS;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{ConsumerSettings, Message, Producer, ProducerSettings};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::ClientConfig;

mod common;
use common::Event;

const PARTITIONS: i32 = 16;
const RAW_BATCH: usize = 500;

/// About 200 bytes once enveloped, as in the throughput bench.
fn event(i: usize) -> Message<Event> {
    Message::new(
        format!("evt-{i:08}"),
        Event {
            title: format!("event number {i}"),
            category: ["concerts", "sports", "expos"][i % 3].into(),
            lat: (i % 18_000) as f64 / 100.0 - 90.0,
            lon: (i % 36_000) as f64 / 100.0 - 180.0,
            rank: (i % 100) as u32,
            labels: Vec::new(),
        },
    )
}

/// This process's peak resident set in KiB (`VmHWM`).
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// The consuming child: reads `records` records of `topic` and prints
/// `records peak_kib seconds`.
fn consume_child(kind: &str) -> anyhow::Result<()> {
    let var = |name: &str| std::env::var(name).with_context(|| format!("{name} not set"));
    let (bootstrap, topic) = (var("BENCH_BOOTSTRAP")?, var("BENCH_TOPIC")?);
    let records: usize = var("BENCH_RECORDS")?.parse()?;
    let group = format!("memory-{kind}-{topic}");
    let start = Instant::now();
    let count = match kind {
        "raw" => raw_consume(&bootstrap, &group, &topic, records)?,
        _ => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(library_consume(&bootstrap, &group, &topic, records))?,
    };
    println!(
        "{count} {} {:.2}",
        peak_rss_kib(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// kafka-batch with its default settings (only where to start reading is set).
async fn library_consume(
    bootstrap: &str,
    group: &str,
    topic: &str,
    records: usize,
) -> anyhow::Result<usize> {
    let mut settings = ConsumerSettings::new(bootstrap, group, &[topic]);
    settings.kafka.set("auto.offset.reset", "earliest");
    common::library_consume_loop(&settings, records).await
}

/// The hand-written loop of the throughput bench: poll, decode, commit every 500.
fn raw_consume(bootstrap: &str, group: &str, topic: &str, records: usize) -> anyhow::Result<usize> {
    let mut config = ClientConfig::new();
    for (k, v) in CONSUMER_DEFAULTS {
        config.set(*k, *v);
    }
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest");
    common::RawCommit::AsyncPerBatch.configure(&mut config);
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[topic])?;
    common::raw_consume_loop(
        &consumer,
        records,
        RAW_BATCH,
        common::RawCommit::AsyncPerBatch,
    )
}

/// Creates a topic on an outside broker (which may not create topics on first use).
async fn create_topic(bootstrap: &str, topic: &str) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()?;
    let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    for result in admin.create_topics([&new], &AdminOptions::new()).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => bail!("cannot create topic {topic}: {code}"),
        }
    }
    Ok(())
}

fn run_child(kind: &str, bootstrap: &str, topic: &str, records: usize) -> anyhow::Result<String> {
    let out = Command::new(std::env::current_exe()?)
        .env("BENCH_MEMORY_CHILD", kind)
        .env("BENCH_BOOTSTRAP", bootstrap)
        .env("BENCH_TOPIC", topic)
        .env("BENCH_RECORDS", records.to_string())
        .output()?;
    if !out.status.success() {
        bail!(
            "{kind} consumer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() -> anyhow::Result<()> {
    if let Ok(kind) = std::env::var("BENCH_MEMORY_CHILD") {
        return consume_child(&kind);
    }
    let backlogs: Vec<usize> = std::env::var("BENCH_BACKLOGS")
        .unwrap_or_else(|_| "250000,1000000".into())
        .split(',')
        .map(|n| n.trim().parse())
        .collect::<Result<_, _>>()
        .context("BENCH_BACKLOGS: record counts separated by commas")?;
    let (bootstrap, broker) = match std::env::var("BENCH_BOOTSTRAP") {
        Ok(b) => (b, None),
        Err(_) => {
            let broker = EmbeddedBroker::start()?;
            (broker.bootstrap_servers().to_owned(), Some(broker))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "broker {bootstrap}; records of ~200 bytes; {PARTITIONS} partitions; peak RSS of the consuming process"
    );
    // Each run gets a topic of its own, so backlogs of different sizes never mix.
    let run_id = std::process::id();
    for &records in &backlogs {
        let topic = format!("bench-memory-{run_id}-{records}");
        runtime.block_on(async {
            match &broker {
                Some(broker) => broker.create_topic(&topic, PARTITIONS)?,
                None => create_topic(&bootstrap, &topic).await?,
            }
            let mut settings = ProducerSettings::new(&bootstrap);
            settings.service = "bench".into();
            let producer = Producer::new(&settings)?;
            let messages: Vec<Message<Event>> = (0..records).map(event).collect();
            for batch in messages.chunks(10_000) {
                producer.produce_batch(&topic, batch).await?;
            }
            producer.close().await?;
            anyhow::Ok(())
        })?;
        for kind in ["raw", "library"] {
            let line = run_child(kind, &bootstrap, &topic, records)?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (count, peak, secs) = match fields[..] {
                [c, p, s] => (c, p.parse::<u64>().unwrap_or(0), s),
                _ => bail!("unexpected child output {line:?}"),
            };
            let label = if kind == "raw" {
                "raw rdkafka"
            } else {
                "kafka-batch"
            };
            println!(
                "backlog {records:>8}  {label:<12} read {count:>8} records in {secs:>6} s, peak RSS {:>7.1} MiB",
                peak as f64 / 1024.0
            );
        }
    }
    Ok(())
}
