//! Helpers shared by the integration tests (each test starts its own embedded broker).
#![allow(dead_code)]

pub mod jobs;
pub mod lanes;

use std::future::Future;
use std::time::{Duration, Instant};

use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{Consumer, ConsumerSettings, Error, Message, Producer};
use serde_json::{json, Value};

/// Logs to the test output when RUST_LOG is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A broker with `topic` created with `partitions` partitions.
pub fn broker_with(topic: &str, partitions: i32) -> EmbeddedBroker {
    init_tracing();
    let broker = EmbeddedBroker::start().expect("the embedded broker starts");
    broker
        .create_topic(topic, partitions)
        .expect("topic created");
    broker
}

/// Consumer settings with a batch size and timeout.
pub fn consumer_settings(
    broker: &EmbeddedBroker,
    group: &str,
    topic: &str,
    batch_size: usize,
    timeout_ms: u64,
) -> ConsumerSettings {
    let mut s = broker.consumer_settings(group, &[topic]);
    s.batch_size = batch_size;
    s.batch_timeout_ms = timeout_ms;
    s.service = "test-consumer".into();
    s
}

/// Produces `{"n": i}` messages with ids `m{i}` for each `i` in `range`.
pub async fn produce_numbered(broker: &EmbeddedBroker, topic: &str, range: std::ops::Range<usize>) {
    let mut settings = broker.producer_settings();
    settings.service = "test-origin".into();
    let producer = Producer::new(&settings).expect("producer");
    let batch: Vec<Message> = range
        .map(|i| Message::new(format!("m{i}"), json!({ "n": i })))
        .collect();
    producer
        .produce_batch(topic, &batch)
        .await
        .expect("every record delivered");
}

/// The number in a `{"n": i}` payload.
pub fn n_of(m: &Message<Value>) -> usize {
    m.payload["n"].as_u64().expect("payload has n") as usize
}

/// Waits until `condition` holds, checking every 20 ms; panics after `limit`.
pub async fn wait_until(what: &str, limit: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `future`, failing the test if it takes longer than `limit` (a hung
/// consumer should fail the test, not hang CI).
pub async fn within<T>(limit: Duration, future: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, future)
        .await
        .expect("finished in time")
}

/// The committed offsets of `group` on `topic` (blocking call on a worker thread).
pub async fn committed(
    broker: &EmbeddedBroker,
    group: &str,
    topic: &str,
) -> std::collections::BTreeMap<i32, i64> {
    tokio::task::block_in_place(|| broker.committed_offsets(group, topic))
        .expect("committed offsets")
}

/// Runs a consumer until it has handled `count` messages, then shuts it down;
/// returns the batches the handler saw.
pub async fn collect_batches(
    settings: &ConsumerSettings,
    count: usize,
) -> Vec<Vec<Message<Value>>> {
    let consumer = Consumer::new(settings).expect("consumer");
    let handle = consumer.handle();
    let batches: std::sync::Mutex<Vec<Vec<Message<Value>>>> = Default::default();
    within(
        Duration::from_secs(60),
        consumer.process(async |batch: Vec<Message>| {
            let mut batches = batches.lock().unwrap();
            batches.push(batch);
            if batches.iter().map(Vec::len).sum::<usize>() >= count {
                handle.shutdown();
            }
            Ok::<_, Error>(())
        }),
    )
    .await
    .expect("process returns Ok after shutdown");
    batches.into_inner().unwrap()
}

/// The size of each batch.
pub fn sizes(batches: &[Vec<Message<Value>>]) -> Vec<usize> {
    batches.iter().map(Vec::len).collect()
}

/// A line of figures for RELIABILITY.md, written straight to stderr so it
/// shows even when the test passes (libtest captures only the print macros).
pub fn report(line: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stderr(), "RELIABILITY {line}");
}
