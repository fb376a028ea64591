//! Consume and produce throughput: kafka-batch against hand-written rdkafka
//! code doing the same job, and against the best Rust peer, in one run, on
//! the same broker and records.
//!
//! ```sh
//! cargo bench --bench throughput                      # embedded broker in a child process
//! BENCH_RECORDS=200000 cargo bench --bench throughput
//! BENCH_BOOTSTRAP=127.0.0.1:9092 cargo bench --bench throughput   # any broker (topics auto-created)
//! BENCH_JOBS=consume-library cargo bench --bench throughput       # one side only (for a profiler)
//! BENCH_PARTITIONS=16 BENCH_JOBS=consume-raw,consume-library,consume-peer cargo bench --bench throughput
//! ```
//!
//! `BENCH_JOBS` is a comma-separated list of `consume-raw`, `consume-library`,
//! `consume-clients` (kafka-batch with `consumer.clients = 2`: two poller
//! threads decoding), `consume-peer`, `produce` (default: all five).
//! `BENCH_CONCURRENCY` sets the library's `consumer.concurrency` (default:
//! its number of clients); `BENCH_COMMIT_INTERVAL_MS` its
//! `consumer.commit_interval_ms` (0: a synchronous commit per batch). Consume rates run from each run's first record,
//! so the group join is not counted.
//!
//! The raw consume side is three hand-written at-least-once loops
//! (`common::RawCommit`): committing synchronously per batch, asynchronously
//! per batch, and storing each handled batch's offsets for librdkafka's
//! interval commit. kafka-batch is compared with the faster of the two that
//! never wait for a commit: the best hand-written code, not a slow one.
//!
//! The peer (`consume-peer`, `common/peer.rs`) is ruststream-rdkafka 0.7, the
//! Kafka broker of the RustStream framework, on the same rdkafka 0.39: a
//! handler over batches of the same size `BATCH` that decodes the same
//! envelope into the same `Event` and counts like the library's, with
//! `Commit::Tracked` (each handled message's offset stored, committed on
//! librdkafka's interval and at close), as its guides set up a batch
//! consumer. It is reported with the ratio kafka-batch / peer.
//!
//! Reported per job: messages a second (wall) and CPU microseconds per
//! message of this process (user + system, all threads, from
//! `CLOCK_PROCESS_CPUTIME_ID`), so the
//! broker's work is not counted. Each job runs `BENCH_ROUNDS` times (default
//! 3), raw, library and peer in turn; for each side the fastest wall time and
//! the least CPU per message over its rounds are reported.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::bail;
use kafka_batch::settings::{CONSUMER_DEFAULTS, PRODUCER_DEFAULTS};
use kafka_batch::{ConsumerSettings, Message, Producer, ProducerSettings};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::DeliveryResult;
use rdkafka::producer::{BaseRecord, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use serde::Serialize;

#[path = "common/broker.rs"]
mod broker;
mod common;
use common::{cpu_time, Event, RawCommit};
// Only this bench builds the peer (the codec and memory benches include `common` too).
#[path = "common/peer.rs"]
mod peer;

const INPUT: &str = "bench-input";
const BATCH: usize = 500;

/// Rounds of each job (`BENCH_ROUNDS`, default 3), raw and library alternating.
static ROUNDS: std::sync::LazyLock<usize> = std::sync::LazyLock::new(|| {
    std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(3)
});

/// About 200 bytes once enveloped.
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

/// What the raw producer writes: the same envelope kafka-batch writes.
#[derive(Serialize)]
struct EnvelopeOut<'a, T> {
    item: &'a T,
    hist: HistOut<'a>,
}

#[derive(Serialize)]
struct HistOut<'a> {
    svc: &'a str,
    dt: &'a str,
    refs: [(); 0],
}

/// CPU time (user + system) of all this process's threads so far, exited
/// ones included: the scheduler's own count, to the nanosecond
/// (`/proc/self/stat` counts in 10 ms steps).
#[derive(Clone, Copy)]
struct Measure {
    wall: Duration,
    cpu: Duration,
    records: usize,
}

impl Measure {
    fn rate(&self) -> f64 {
        self.records as f64 / self.wall.as_secs_f64()
    }
    fn cpu_us(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.records as f64
    }
}

async fn measure<F: std::future::Future<Output = anyhow::Result<usize>>>(
    job: F,
) -> anyhow::Result<Measure> {
    common::reset_first_record();
    let (cpu0, wall0) = (cpu_time(), Instant::now());
    let records = job.await?;
    // From the first record on (with several clients, from when each holds
    // partitions): joining the group is not consuming.
    let (start, cpu_start, before) = common::measured_start().unwrap_or((wall0, cpu0, 0));
    Ok(Measure {
        wall: start.elapsed(),
        cpu: cpu_time().saturating_sub(cpu_start),
        records: records.saturating_sub(before),
    })
}

/// The least disturbed of the rounds: the fastest wall time, and (maybe from
/// another round) the least CPU per message. On a shared machine the other
/// rounds measure the neighbours too (waiting, cache misses, migrations).
fn best(rounds: impl IntoIterator<Item = Measure> + Clone) -> Option<Measure> {
    let fastest = rounds.clone().into_iter().min_by_key(|m| m.wall)?;
    let leanest = rounds
        .into_iter()
        .min_by(|a, b| a.cpu_us().total_cmp(&b.cpu_us()))?;
    // Scaled to the fastest round's record count, so `cpu_us` is the leanest's.
    let cpu = leanest
        .cpu
        .mul_f64(fastest.records as f64 / leanest.records as f64);
    Some(Measure { cpu, ..fastest })
}

fn consumer_config(bootstrap: &str, group: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (k, v) in CONSUMER_DEFAULTS {
        config.set(*k, *v);
    }
    config
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest");
    config
}

/// A hand-written loop: poll, decode, and commit every BATCH messages as
/// `commit` says.
fn raw_consume(
    bootstrap: &str,
    group: &str,
    records: usize,
    commit: RawCommit,
) -> anyhow::Result<usize> {
    let mut config = consumer_config(bootstrap, group);
    commit.configure(&mut config);
    let consumer: BaseConsumer = config.create()?;
    consumer.subscribe(&[INPUT])?;
    common::raw_consume_loop(&consumer, records, BATCH, commit)
}

/// The hand-written loops measured, in the order they run each round.
const RAW_COMMITS: [RawCommit; 3] = [
    RawCommit::SyncPerBatch,
    RawCommit::AsyncPerBatch,
    RawCommit::StoredWithInterval,
];

async fn library_consume(
    bootstrap: &str,
    group: &str,
    records: usize,
    clients: usize,
) -> anyhow::Result<usize> {
    let mut settings = ConsumerSettings::new(bootstrap, group, &[INPUT]);
    settings.batch_size = BATCH;
    // Two clients: two poller threads decode; two batches may be in the
    // (counting) handler at once, one per client's partitions.
    settings.clients = clients;
    settings.concurrency = std::env::var("BENCH_CONCURRENCY")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(clients);
    // The second client's join is a rebalance, which the first learns of
    // at its next heartbeat (3 s by default): part of starting, not of
    // consuming, so heartbeats come often here.
    settings.kafka.set("heartbeat.interval.ms", "100");
    settings.kafka.set("auto.offset.reset", "earliest");
    if let Some(p) = std::env::var("BENCH_PREFETCH")
        .ok()
        .and_then(|p| p.parse().ok())
    {
        settings.prefetch_batches = p;
    }
    // `BENCH_COMMIT_INTERVAL_MS=0`: a synchronous commit whenever a batch
    // settles, as before the interval commit, for what that costs.
    if let Some(ms) = std::env::var("BENCH_COMMIT_INTERVAL_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
    {
        settings.commit_interval_ms = ms;
    }
    common::library_consume_loop(&settings, records).await
}

struct Counting {
    delivered: AtomicUsize,
    failed: AtomicUsize,
}

impl ClientContext for Counting {}

impl ProducerContext for Counting {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        match result {
            Ok(_) => self.delivered.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

/// Waits for every queued record's delivery, as `rd_kafka_flush` does.
///
/// Not rdkafka's `flush`: with a `ThreadedProducer` it polls in steps of up
/// to 100 ms while the polling thread takes the reports it waits for (a
/// flush every 500 records then runs at 5,000 records a second).
/// `rd_kafka_flush` with the whole timeout returns when the last report is
/// served, and sends without waiting `linger.ms` while it waits.
fn flush_all(producer: &ThreadedProducer<Counting>) -> anyhow::Result<()> {
    // SAFETY: the pointer is the live client owned by `producer`.
    let code = unsafe { rdkafka_sys::rd_kafka_flush(producer.client().native_ptr(), 60_000) };
    if code != rdkafka_sys::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        bail!("raw producer: flush: {code:?}");
    }
    Ok(())
}

/// The best hand-written producer: pack into a reused buffer, send, flush
/// after every `chunk` records (a batch pipeline must know a batch was
/// delivered before it commits its input; `usize::MAX` flushes only at the end).
fn raw_produce(
    bootstrap: &str,
    topic: &str,
    messages: &[Message<Event>],
    chunk: usize,
) -> anyhow::Result<usize> {
    let mut config = ClientConfig::new();
    for (k, v) in PRODUCER_DEFAULTS {
        config.set(*k, *v);
    }
    config.set("bootstrap.servers", bootstrap);
    let producer: ThreadedProducer<Counting> = config.create_with_context(Counting {
        delivered: AtomicUsize::new(0),
        failed: AtomicUsize::new(0),
    })?;
    let dt = kafka_batch::envelope::format_dt(time::OffsetDateTime::now_utc());
    let mut value = Vec::with_capacity(256);
    for (i, m) in messages.iter().enumerate() {
        if i > 0 && i % chunk == 0 {
            flush_all(&producer)?;
        }
        value.clear();
        let hist = HistOut {
            svc: "bench",
            dt: &dt,
            refs: [],
        };
        serde_json::to_writer(
            &mut value,
            &EnvelopeOut {
                item: &m.payload,
                hist,
            },
        )?;
        let mut record = BaseRecord::to(topic)
            .key(m.id.as_bytes())
            .payload(value.as_slice());
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => bail!("raw producer: {e}"),
            }
        }
    }
    flush_all(&producer)?;
    let context = producer.context();
    let (delivered, failed) = (
        context.delivered.load(Ordering::Relaxed),
        context.failed.load(Ordering::Relaxed),
    );
    if failed > 0 {
        bail!("raw producer: {failed} records failed");
    }
    Ok(delivered)
}

/// `produce_batch` over `chunk`-record batches, with `lanes` (1, 2 or 4)
/// calls in flight: each call returns only when its records are delivered,
/// so with one lane the broker's acknowledgement of each batch is a pause in
/// the stream; with more, batches are sent while others are acknowledged.
async fn library_produce(
    bootstrap: &str,
    topic: &str,
    messages: &[Message<Event>],
    chunk: usize,
    lanes: usize,
) -> anyhow::Result<usize> {
    let mut settings = ProducerSettings::new(bootstrap);
    settings.service = "bench".into();
    let producer = Producer::new(&settings)?;
    let lanes = lanes.clamp(1, 4);
    let lane = |first: usize| {
        let producer = &producer;
        async move {
            let mut delivered = 0;
            for batch in messages.chunks(chunk).skip(first).step_by(lanes) {
                delivered += producer.produce_batch(topic, batch).await?.len();
            }
            anyhow::Ok(delivered)
        }
    };
    let delivered = match lanes {
        1 => lane(0).await?,
        2 => {
            let (a, b) = tokio::join!(lane(0), lane(1));
            a? + b?
        }
        _ => {
            let (a, b, c, d) = tokio::join!(lane(0), lane(1), lane(2), lane(3));
            a? + b? + c? + d?
        }
    };
    producer.close().await?;
    Ok(delivered)
}

/// The broker runs in a child process (this same binary), so that its CPU
/// time is not this process's. It stops when this process closes its stdin.
fn report(job: &str, raw: Measure, library: Measure, library_label: &str) {
    println!(
        "{job:<8} raw rdkafka    {:>9.0} msg/s  {:>6.2} µs CPU/msg",
        raw.rate(),
        raw.cpu_us()
    );
    println!(
        "{job:<8} {library_label:<14} {:>9.0} msg/s  {:>6.2} µs CPU/msg   throughput ratio {:.2}, CPU ratio {:.2}",
        library.rate(),
        library.cpu_us(),
        library.rate() / raw.rate(),
        library.cpu_us() / raw.cpu_us()
    );
}

fn main() -> anyhow::Result<()> {
    if broker::serve_if_child()? {
        return Ok(());
    }
    if std::env::var_os("RUST_LOG").is_some() {
        // The consumer's own log, for looking into a slow run.
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let records: usize = std::env::var("BENCH_RECORDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1_000_000);
    let topics = [INPUT, "bench-raw-out", "bench-lib-out"];
    let (bootstrap, _broker) = match std::env::var("BENCH_BOOTSTRAP") {
        Ok(b) => (b, None),
        Err(_) => {
            let (b, child) = broker::start(&topics)?;
            (b, Some(child))
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let messages: Vec<Message<Event>> = (0..records).map(event).collect();
        println!("broker {bootstrap}; {records} records of ~200 bytes; batches of {BATCH}");
        library_produce(&bootstrap, INPUT, &messages, 10_000, 2).await?;

        let jobs = std::env::var("BENCH_JOBS")
            .unwrap_or_else(|_| "consume-raw,consume-library,consume-clients,consume-peer,produce".into());
        let (want_raw, want_library, want_peer) = (
            jobs.contains("consume-raw"),
            jobs.contains("consume-library"),
            jobs.contains("consume-peer"),
        );
        // Each round runs every hand-written loop, then the library, then the
        // peer. The honest baseline ("raw") is the faster of the two that
        // never wait for a commit; the one that commits synchronously per
        // batch is shown for what it costs.
        let want_clients = jobs.contains("consume-clients");
        type Round = (Vec<Measure>, Option<Measure>, Option<Measure>, Option<Measure>);
        let mut rounds: Vec<Round> = Vec::new();
        for round in 0..(*ROUNDS).max(1) {
            let mut raws = Vec::new();
            if want_raw {
                for (i, commit) in RAW_COMMITS.into_iter().enumerate() {
                    let b = bootstrap.clone();
                    let group = format!("raw-{round}-{i}");
                    raws.push(
                        measure(async move {
                            tokio::task::spawn_blocking(move || {
                                raw_consume(&b, &group, records, commit)
                            })
                            .await?
                        })
                        .await?,
                    );
                }
            }
            let library = if want_library {
                Some(
                    measure(library_consume(
                        &bootstrap,
                        &format!("library-{round}"),
                        records,
                        1,
                    ))
                    .await?,
                )
            } else {
                None
            };
            let two_clients = if want_clients {
                Some(
                    measure(library_consume(
                        &bootstrap,
                        &format!("clients-{round}"),
                        records,
                        2,
                    ))
                    .await?,
                )
            } else {
                None
            };
            let peer = if want_peer {
                let group = format!("peer-{round}");
                Some(measure(peer::peer_consume(&bootstrap, INPUT, &group, records, BATCH)).await?)
            } else {
                None
            };
            rounds.push((raws, library, peer, two_clients));
        }
        let raws: Vec<(RawCommit, Option<Measure>)> = RAW_COMMITS
            .into_iter()
            .enumerate()
            .map(|(i, commit)| (commit, best(rounds.iter().filter_map(|r| r.0.get(i).copied()))))
            .collect();
        for (commit, m) in &raws {
            if let Some(m) = m {
                println!(
                    "consume  {:<22} {:>9.0} msg/s  {:>6.2} µs CPU/msg",
                    commit.label(),
                    m.rate(),
                    m.cpu_us()
                );
            }
        }
        let honest = raws
            .iter()
            .filter(|(commit, _)| *commit != RawCommit::SyncPerBatch)
            .filter_map(|(commit, m)| m.map(|m| (*commit, m)))
            .max_by(|a, b| a.1.rate().total_cmp(&b.1.rate()));
        let library = best(rounds.iter().filter_map(|r| r.1));
        if let (Some((commit, raw)), Some(two)) = (honest, best(rounds.iter().filter_map(|r| r.3))) {
            println!(
                "consume  {:<22} {:>9.0} msg/s  {:>6.2} µs CPU/msg   against the fastest raw ({}): throughput ratio {:.2}, CPU ratio {:.2}",
                "kafka-batch, 2 clients",
                two.rate(),
                two.cpu_us(),
                commit.label(),
                two.rate() / raw.rate(),
                two.cpu_us() / raw.cpu_us()
            );
        }
        match (honest, library) {
            (Some((commit, raw)), Some(library)) => {
                println!(
                    "consume  {:<22} {:>9.0} msg/s  {:>6.2} µs CPU/msg   against the fastest raw ({}): throughput ratio {:.2}, CPU ratio {:.2}",
                    "kafka-batch",
                    library.rate(),
                    library.cpu_us(),
                    commit.label(),
                    library.rate() / raw.rate(),
                    library.cpu_us() / raw.cpu_us()
                );
            }
            (_, Some(library)) => println!(
                "consume  {:<22} {:>9.0} msg/s  {:>6.2} µs CPU/msg",
                "kafka-batch",
                library.rate(),
                library.cpu_us()
            ),
            _ => {}
        }
        if let Some(peer) = best(rounds.iter().filter_map(|r| r.2)) {
            print!(
                "consume  {:<22} {:>9.0} msg/s  {:>6.2} µs CPU/msg",
                "ruststream-rdkafka",
                peer.rate(),
                peer.cpu_us()
            );
            match library {
                Some(library) => println!(
                    "   kafka-batch / peer: throughput ratio {:.2}, CPU ratio {:.2}",
                    library.rate() / peer.rate(),
                    library.cpu_us() / peer.cpu_us()
                ),
                None => println!(),
            }
        }
        if !jobs.contains("produce") {
            return Ok(());
        }

        // Each library job against the hand-written loop that waits for the same thing.
        // A batch of 500 waits for its deliveries (a round trip) before the
        // next is sent: that job runs on at most 100,000 records.
        for (raw_chunk, library_chunk, lanes, label) in [
            (
                usize::MAX,
                10_000,
                4,
                "one flush at the end / batches of 10k, four in flight",
            ),
            (
                usize::MAX,
                10_000,
                2,
                "one flush at the end / batches of 10k, two in flight",
            ),
            (
                usize::MAX,
                10_000,
                1,
                "one flush at the end / batches of 10k, one at a time",
            ),
            (BATCH, BATCH, 1, "a flush every 500 / batches of 500"),
        ] {
            let count = if raw_chunk == BATCH {
                records.min(100_000)
            } else {
                records
            };
            let messages = &messages[..count];
            let mut rounds = Vec::new();
            for _ in 0..(*ROUNDS).max(1) {
                let (b, batch) = (bootstrap.clone(), messages.to_vec());
                let raw = measure(async {
                    tokio::task::spawn_blocking(move || {
                        raw_produce(&b, "bench-raw-out", &batch, raw_chunk)
                    })
                    .await?
                })
                .await?;
                let library = measure(library_produce(
                    &bootstrap,
                    "bench-lib-out",
                    messages,
                    library_chunk,
                    lanes,
                ))
                .await?;
                rounds.push((raw, library));
            }
            println!("produce {count} records, raw {label}:");
            if let (Some(raw), Some(library)) = (
                best(rounds.iter().map(|r| r.0)),
                best(rounds.iter().map(|r| r.1)),
            ) {
                report("produce", raw, library, "kafka-batch");
            }
        }
        anyhow::Ok(())
    })
}
