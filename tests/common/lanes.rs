//! Helpers of the lanes tests: records produced to one partition, where
//! each message came from, and waiting for commits.

use std::collections::BTreeMap;
use std::time::Duration;

use kafka_batch::settings::HandlingOrder;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{ConsumerSettings, Message};

use super::{committed, consumer_settings};

const LIMIT: Duration = Duration::from_secs(90);

/// Produces `{"item": {"n": i}}` with key `p{partition}-m{i}` to one partition.
pub fn produce_to(
    broker: &EmbeddedBroker,
    topic: &str,
    partition: i32,
    range: std::ops::Range<usize>,
) {
    let keys: Vec<String> = range
        .clone()
        .map(|i| format!("p{partition}-m{i}"))
        .collect();
    let values: Vec<Vec<u8>> = range
        .map(|i| format!(r#"{{"item": {{"n": {i}}}}}"#).into_bytes())
        .collect();
    let records: Vec<_> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| (partition, Some(k.as_bytes()), Some(v.as_slice())))
        .collect();
    broker
        .produce_raw(topic, &records)
        .expect("records produced");
}

pub fn lane_settings(
    broker: &EmbeddedBroker,
    topic: &str,
    concurrency: usize,
    ordering: HandlingOrder,
) -> ConsumerSettings {
    let mut s = consumer_settings(broker, "lanes", topic, 10, 100);
    s.concurrency = concurrency;
    s.ordering = ordering;
    s
}

/// (partition, offset) of each message.
pub fn coords(batch: &[Message]) -> Vec<(i32, i64)> {
    batch
        .iter()
        .map(|m| {
            let o = m.origin().expect("a consumed message has its origin");
            (o.partition, o.offset)
        })
        .collect()
}

/// Waits until `group` has committed `end` for each partition of `topic`.
pub async fn committed_to(broker: &EmbeddedBroker, topic: &str, ends: &[(i32, i64)]) {
    let want: BTreeMap<i32, i64> = ends.iter().copied().collect();
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let now = committed(broker, "lanes", topic).await;
        if want.iter().all(|(p, end)| now.get(p) == Some(end)) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for commits {want:?}, have {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
