//! Lanes: what `consumer.concurrency` buys a handler that waits (a database
//! write, an HTTP call), against the ideal, in one run.
//!
//! ```sh
//! cargo bench --bench lanes                          # both jobs
//! BENCH_JOBS=io-partition cargo bench --bench lanes  # one of them
//! ```
//!
//! - `io-partition`: 16 partitions, batches of 100, each batch takes one
//!   awaited 20 ms timer. Messages a second with `concurrency` 1, 4, 16 and
//!   64 under `ordering = "partition"`, against the ideal
//!   `min(concurrency, partitions) x batch / batch time` (the batch time as
//!   measured: a timer rounds up under load), capped by what the same
//!   consumer reaches with a handler that only counts.
//! - `io-key`: one partition, 200,000 records over 1,000 keys, batches of 8
//!   handled message by message, each message one awaited 1 ms timer.
//!   `ordering = "key"` with `concurrency` 64 and 1024, against the ideal
//!   (`min(concurrency, keys) / mean call time`) and
//!   against the workaround users write today: batches of 2,000, one at a
//!   time, the handler grouping them by key and joining the keys' chains.
//!
//! Each run is a fresh group reading the topic from the start; its rate is
//! measured from the first handler call to the last record handled, so the
//! group join is not counted. The broker runs in a child process.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use kafka_batch::settings::HandlingOrder;
use kafka_batch::{Consumer, ConsumerSettings, Message, Producer, ProducerSettings};
use serde_json::{json, Value};

#[path = "common/broker.rs"]
mod broker;

const PARTITIONED: &str = "lanes-io";
const KEYED: &str = "lanes-key";

/// One run's figures.
struct Run {
    rate: f64,
    /// Mean duration of one awaited timer, as measured in the handler.
    call: Duration,
}

/// Times every awaited timer in the handler.
#[derive(Default)]
struct Timers {
    total_ns: AtomicU64,
    count: AtomicU64,
}

impl Timers {
    async fn sleep(&self, d: Duration) {
        let start = Instant::now();
        tokio::time::sleep(d).await;
        self.total_ns
            .fetch_add(start.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    fn mean(&self) -> Duration {
        let n = self.count.load(Ordering::Relaxed).max(1);
        Duration::from_nanos(self.total_ns.load(Ordering::Relaxed) / n)
    }
}

/// What a handler does with one batch.
#[derive(Clone, Copy)]
enum Work {
    /// Counts only.
    Count,
    /// One timer per batch.
    PerBatch(Duration),
    /// One timer per message, the batch's messages one after the other.
    PerMessage(Duration),
    /// The workaround: group the batch by key, each key's messages one
    /// after the other (a timer each), the keys joined.
    KeyChains(Duration),
}

fn settings(
    bootstrap: &str,
    topic: &str,
    group: &str,
    batch: usize,
    concurrency: usize,
    ordering: HandlingOrder,
) -> ConsumerSettings {
    let mut s = ConsumerSettings::new(bootstrap, group, &[topic]);
    s.kafka.set("auto.offset.reset", "earliest");
    s.batch_size = batch;
    s.batch_timeout_ms = 50;
    s.concurrency = concurrency;
    s.ordering = ordering;
    s.max_in_flight_records = s.max_in_flight_records.max(batch * 4);
    s
}

/// Consumes `records` messages with `work`, and measures the rate from the
/// first handler call to the last message handled.
async fn consume(settings: &ConsumerSettings, records: usize, work: Work) -> anyhow::Result<Run> {
    let consumer = Consumer::new(settings)?;
    let handle = consumer.handle();
    let handled = AtomicUsize::new(0);
    let first: Mutex<Option<Instant>> = Mutex::new(None);
    let last: Mutex<Option<Instant>> = Mutex::new(None);
    let timers = Timers::default();
    consumer
        .process(async |batch: Vec<Message<Value>>| {
            {
                let mut first = first.lock().unwrap_or_else(|e| e.into_inner());
                first.get_or_insert_with(Instant::now);
            }
            match work {
                Work::Count => {}
                Work::PerBatch(d) => timers.sleep(d).await,
                Work::PerMessage(d) => {
                    for m in &batch {
                        std::hint::black_box(m);
                        timers.sleep(d).await;
                    }
                }
                Work::KeyChains(d) => {
                    let mut by_key: BTreeMap<&str, Vec<&Message<Value>>> = BTreeMap::new();
                    for m in &batch {
                        by_key.entry(&m.id).or_default().push(m);
                    }
                    join_all(by_key.into_values().map(|chain| {
                        let timers = &timers;
                        async move {
                            for m in chain {
                                std::hint::black_box(m);
                                timers.sleep(d).await;
                            }
                        }
                    }))
                    .await;
                }
            }
            let n = batch.len();
            if handled.fetch_add(n, Ordering::Relaxed) + n >= records {
                *last.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                handle.shutdown();
            }
            anyhow::Ok(())
        })
        .await?;
    let first = first.into_inner().unwrap_or_else(|e| e.into_inner());
    let last = last.into_inner().unwrap_or_else(|e| e.into_inner());
    let (Some(first), Some(last)) = (first, last) else {
        anyhow::bail!("the run handled fewer than {records} records");
    };
    Ok(Run {
        rate: handled.into_inner() as f64 / last.duration_since(first).as_secs_f64(),
        call: timers.mean(),
    })
}

async fn produce(
    bootstrap: &str,
    topic: &str,
    records: usize,
    key: impl Fn(usize) -> String,
) -> anyhow::Result<()> {
    let mut settings = ProducerSettings::new(bootstrap);
    settings.service = "bench-lanes".into();
    let producer = Producer::new(&settings)?;
    for start in (0..records).step_by(10_000) {
        let batch: Vec<Message<Value>> = (start..(start + 10_000).min(records))
            .map(|i| Message::new(key(i), json!({ "n": i })))
            .collect();
        producer.produce_batch(topic, &batch).await?;
    }
    Ok(())
}

async fn io_partition(bootstrap: &str) -> anyhow::Result<()> {
    const PARTITIONS: usize = 16;
    const BATCH: usize = 100;
    const RECORDS: usize = 200_000;
    let batch_time = Duration::from_millis(20);
    produce(bootstrap, PARTITIONED, RECORDS, |i| format!("e{i}")).await?;
    let counting = consume(
        &settings(
            bootstrap,
            PARTITIONED,
            "io-count",
            BATCH,
            16,
            HandlingOrder::Partition,
        ),
        RECORDS,
        Work::Count,
    )
    .await?;
    println!(
        "io-partition: {PARTITIONS} partitions, batches of {BATCH}, one 20 ms timer per batch; a counting handler reaches {:.0} msg/s",
        counting.rate
    );
    for concurrency in [1, 4, 16, 64] {
        // About five seconds of the ideal rate, at most the topic.
        let ideal_nominal =
            concurrency.min(PARTITIONS) as f64 * BATCH as f64 / batch_time.as_secs_f64();
        let records = ((ideal_nominal * 5.0) as usize).clamp(BATCH * 50, RECORDS);
        let run = consume(
            &settings(
                bootstrap,
                PARTITIONED,
                &format!("io-{concurrency}"),
                BATCH,
                concurrency,
                HandlingOrder::Partition,
            ),
            records,
            Work::PerBatch(batch_time),
        )
        .await?;
        let ideal = (concurrency.min(PARTITIONS) as f64 * BATCH as f64 / run.call.as_secs_f64())
            .min(counting.rate);
        println!(
            "  concurrency {concurrency:>4}: {:>8.0} msg/s; ideal {:>8.0} (batch time {:.1} ms); ratio {:.2}",
            run.rate,
            ideal,
            run.call.as_secs_f64() * 1e3,
            run.rate / ideal
        );
    }
    Ok(())
}

async fn io_key(bootstrap: &str) -> anyhow::Result<()> {
    const RECORDS: usize = 200_000;
    const KEYS: usize = 1_000;
    let call = Duration::from_millis(1);
    produce(bootstrap, KEYED, RECORDS, |i| format!("k{}", i % KEYS)).await?;
    println!("io-key: 1 partition, {RECORDS} records over {KEYS} keys, one 1 ms timer per message");
    let workaround = consume(
        &settings(
            bootstrap,
            KEYED,
            "key-workaround",
            2_000,
            1,
            HandlingOrder::Partition,
        ),
        RECORDS,
        Work::KeyChains(call),
    )
    .await?;
    println!(
        "  workaround (batches of 2000, chains per key joined): {:>8.0} msg/s (call {:.2} ms)",
        workaround.rate,
        workaround.call.as_secs_f64() * 1e3
    );
    for concurrency in [64, 1024] {
        let run = consume(
            &settings(
                bootstrap,
                KEYED,
                &format!("key-{concurrency}"),
                8,
                concurrency,
                HandlingOrder::Key,
            ),
            RECORDS,
            Work::PerMessage(call),
        )
        .await?;
        // At most one call per key at a time.
        let ideal = concurrency.min(KEYS) as f64 / run.call.as_secs_f64();
        println!(
            "  ordering key, batches of 8, concurrency {concurrency:>4}: {:>8.0} msg/s; ideal {:>8.0} (call {:.2} ms), ratio {:.2}; against the workaround {:.2}",
            run.rate,
            ideal,
            run.call.as_secs_f64() * 1e3,
            run.rate / ideal,
            run.rate / workaround.rate
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    if broker::serve_if_child()? {
        return Ok(());
    }
    let (bootstrap, _broker) =
        broker::start(&[&format!("{PARTITIONED}:16"), &format!("{KEYED}:1")])?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let jobs = std::env::var("BENCH_JOBS").unwrap_or_else(|_| "io-partition,io-key".into());
    runtime.block_on(async {
        if jobs.contains("io-partition") {
            io_partition(&bootstrap).await?;
        }
        if jobs.contains("io-key") {
            io_key(&bootstrap).await?;
        }
        anyhow::Ok(())
    })
}
