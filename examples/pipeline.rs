//! The main job: load events, enrich them in batches, produce the results
//! with their provenance, and commit.
//!
//! ```sh
//! cargo run --release --example pipeline                   # embedded broker, 100,000 records
//! PIPELINE_RECORDS=1000000 cargo run --release --example pipeline
//! KAFKA_BATCH_BOOTSTRAP_SERVERS=localhost:9092 cargo run --release --example pipeline
//! # metrics at http://127.0.0.1:9464/metrics while it runs:
//! cargo run --release --features prometheus --example pipeline -- --prometheus 127.0.0.1:9464
//! ```
//!
//! With no `bootstrap_servers` configured it starts kafka-batch's embedded
//! broker (librdkafka's mock cluster) in this process. Every setting can be
//! changed with `KAFKA_BATCH_*` variables (see `config/default.toml`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use kafka_batch::envelope::stage_latencies;
use kafka_batch::testing::{self, EmbeddedBroker};
use kafka_batch::{Consumer, Message, Producer, Settings};
use serde::{Deserialize, Serialize};

const EVENTS: &str = "pipeline-events";
const ENRICHED: &str = "pipeline-enriched";
const PARTITIONS: i32 = 16;

/// An event as the loading service writes it.
#[derive(Debug, Serialize, Deserialize)]
struct Event {
    title: String,
    category: String,
    country: String,
    lat: f64,
    lon: f64,
    start: String,
    duration_hours: u32,
    attendance: u32,
}

/// What the enriching service adds.
#[derive(Debug, Serialize, Deserialize)]
struct Enriched {
    title: String,
    category: String,
    country: String,
    /// A ~11 km grid cell, for grouping nearby events.
    cell: String,
    start: String,
    end_hour: u32,
    attendance: u32,
    rank_level: String,
}

fn enrich(event: &Event) -> Enriched {
    let start_hour: u32 = event
        .start
        .get(11..13)
        .and_then(|h| h.parse().ok())
        .unwrap_or(0);
    Enriched {
        title: event.title.trim().to_owned(),
        category: event.category.clone(),
        country: event.country.clone(),
        cell: format!("{:.1}:{:.1}", event.lat, event.lon),
        start: event.start.clone(),
        end_hour: (start_hour + event.duration_hours) % 24,
        attendance: event.attendance,
        rank_level: match event.attendance {
            0..=999 => "minor",
            1000..=9_999 => "moderate",
            10_000..=49_999 => "major",
            _ => "severe",
        }
        .to_owned(),
    }
}

/// Deterministic, varied test data (no randomness crate needed).
fn event(i: usize) -> Message<Event> {
    const CATEGORIES: [&str; 6] = [
        "concerts",
        "sports",
        "conferences",
        "festivals",
        "expos",
        "community",
    ];
    const COUNTRIES: [&str; 6] = ["NZ", "AU", "US", "GB", "DE", "JP"];
    let mix = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    Message::new(
        format!("evt-{i:07}"),
        Event {
            title: format!("  {} #{i} ", CATEGORIES[i % 6]),
            category: CATEGORIES[i % 6].into(),
            country: COUNTRIES[(mix % 6) as usize].into(),
            lat: ((mix >> 8) % 18_000) as f64 / 100.0 - 90.0,
            lon: ((mix >> 24) % 36_000) as f64 / 100.0 - 180.0,
            start: format!(
                "2026-12-{:02}T{:02}:00:00Z",
                1 + (mix >> 40) % 28,
                (mix >> 48) % 24
            ),
            duration_hours: 1 + (mix % 8) as u32,
            attendance: ((mix >> 16) % 80_000) as u32,
        },
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let records: usize = std::env::var("PIPELINE_RECORDS")
        .ok()
        .map(|v| v.parse().context("PIPELINE_RECORDS must be a number"))
        .transpose()?
        .unwrap_or(100_000);

    // `--prometheus ADDR`: serve the metrics there (the `prometheus` feature;
    // without it the consumer refuses the setting and says so).
    let mut args = std::env::args().skip(1);
    let mut prometheus = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--prometheus" => {
                prometheus = Some(
                    args.next()
                        .context("--prometheus needs an address, e.g. 127.0.0.1:9464")?,
                )
            }
            other => anyhow::bail!("unknown argument {other:?}; the only one is --prometheus ADDR"),
        }
    }

    let mut settings = Settings::load().context("loading settings")?;
    let _embedded;
    if settings.bootstrap_servers.is_empty() {
        let broker = EmbeddedBroker::start()?;
        broker.create_topic(EVENTS, PARTITIONS)?;
        broker.create_topic(ENRICHED, PARTITIONS)?;
        println!(
            "embedded broker at {} ({PARTITIONS} partitions per topic)",
            broker.bootstrap_servers()
        );
        settings.bootstrap_servers = broker.bootstrap_servers().to_owned();
        _embedded = broker;
    } else {
        println!("cluster at {}", settings.bootstrap_servers);
    }
    let bootstrap = settings.bootstrap_servers.clone();
    let group = if settings.consumer.group_id.is_empty() {
        "pipeline-enricher".to_owned()
    } else {
        settings.consumer.group_id.clone()
    };

    // 1. A loading service produces the events.
    let mut loader_settings = settings.producer.clone();
    loader_settings.bootstrap_servers.clone_from(&bootstrap);
    loader_settings.service = "pipeline-loader".into();
    let loader = Producer::new(&loader_settings)?;
    let started = Instant::now();
    for chunk in (0..records).collect::<Vec<_>>().chunks(10_000) {
        let batch: Vec<Message<Event>> = chunk.iter().map(|&i| event(i)).collect();
        loader.produce_batch(EVENTS, &batch).await?;
    }
    let load_time = started.elapsed();
    loader.close().await?;
    println!(
        "loaded   {records} events into {EVENTS} in {:.2} s ({:.0} records/s)",
        load_time.as_secs_f64(),
        records as f64 / load_time.as_secs_f64()
    );

    // 2. The enriching service: consume, transform, produce with refs, commit.
    let mut consumer_settings = settings.consumer.clone();
    consumer_settings.bootstrap_servers.clone_from(&bootstrap);
    consumer_settings.group_id.clone_from(&group);
    if consumer_settings.topics.is_empty() {
        consumer_settings.topics = vec![EVENTS.into()];
    }
    if consumer_settings.kafka.get("auto.offset.reset").is_none() {
        consumer_settings.kafka.set("auto.offset.reset", "earliest");
    }
    consumer_settings.service = "pipeline-enricher".into();
    if let Some(addr) = prometheus {
        println!("metrics at http://{addr}/metrics");
        consumer_settings.metrics.prometheus_listen = addr;
    }
    let mut producer_settings = settings.producer.clone();
    producer_settings.bootstrap_servers.clone_from(&bootstrap);
    producer_settings.service = "pipeline-enricher".into();
    let producer = Producer::new(&producer_settings)?;
    let consumer = Consumer::new(&consumer_settings)?;
    let handle = consumer.handle();
    handle.shutdown_on_signals();
    let handled = AtomicUsize::new(0);
    let started = Instant::now();
    consumer
        .process(async |batch: Vec<Message<Event>>| {
            let out: Vec<Message<Enriched>> =
                batch.iter().map(|m| m.derive(enrich(&m.payload))).collect();
            producer.produce_batch(ENRICHED, &out).await?;
            if handled.fetch_add(batch.len(), Ordering::Relaxed) + batch.len() >= records {
                handle.shutdown();
            }
            anyhow::Ok(())
        })
        .await?;
    let run_time = started.elapsed();
    producer.close().await?;
    let stats = handle.stats();
    println!(
        "enriched {} messages in {} batches in {:.2} s ({:.0} messages/s, {} commits, {} pauses for back-pressure)",
        stats.messages,
        stats.batches,
        run_time.as_secs_f64(),
        stats.messages as f64 / run_time.as_secs_f64(),
        stats.commits,
        stats.pauses,
    );

    // 3. What the group committed, read back from the broker.
    let committed: BTreeMap<i32, i64> = {
        let bootstrap = bootstrap.clone();
        let group = group.clone();
        tokio::task::spawn_blocking(move || testing::committed_offsets(&bootstrap, &group, EVENTS))
            .await??
    };
    let total: i64 = committed.values().sum();
    let listed: Vec<String> = committed.iter().map(|(p, o)| format!("{p}={o}")).collect();
    println!(
        "committed offsets of group {group} on {EVENTS}: {}",
        listed.join(" ")
    );
    println!("committed {total} of {records} records");

    // 4. Provenance of a few outputs.
    let sample: Vec<Message<Enriched>> = tokio::task::spawn_blocking(move || {
        testing::read_messages(&bootstrap, ENRICHED, 3, Duration::from_secs(30))
    })
    .await??;
    println!("provenance of {} output records:", sample.len());
    for m in &sample {
        let own = m.source().context("a consumed message has its own ref")?;
        let hist = own.hist.as_deref().context("every output has a history")?;
        println!(
            "  {own} ({} {}, packed by {} at {})",
            m.payload.rank_level, m.payload.category, hist.svc, hist.dt
        );
        for input in &hist.refs {
            let from = input
                .hist
                .as_deref()
                .map(|h| format!("packed by {} at {}", h.svc, h.dt));
            println!(
                "    <- {input} ({})",
                from.unwrap_or_else(|| "no history".into())
            );
        }
        let latency = stage_latencies(
            "pipeline-reader",
            own,
            None,
            time::OffsetDateTime::now_utc(),
        )?;
        let stages: Vec<String> = latency
            .stages
            .iter()
            .map(|(svc, s)| format!("{svc} {s:.3}s"))
            .collect();
        println!(
            "    stages: {} (total {:.3}s)",
            stages.join(", "),
            latency.total_seconds
        );
    }
    anyhow::ensure!(total >= records as i64, "not every record was committed");
    Ok(())
}
