//! Metrics of the failure policies, labelled by reason. Its own binary: it
//! installs a process-wide recorder.

mod common;

use std::time::Duration;

use common::*;
use kafka_batch::settings::FailurePolicy;
use kafka_batch::{Consumer, Failures, Message};
use metrics_util::debugging::{DebugValue, DebuggingRecorder};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_dead_letters_skips_and_decode_errors_are_counted_by_reason() {
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    recorder.install().unwrap();

    let broker = broker_with("orders", 1);
    broker.create_topic("orders.dead", 1).unwrap();
    produce_numbered(&broker, "orders", 0..4).await;
    broker
        .produce_raw(
            "orders",
            &[
                (0, Some(b"x"), Some(b"not json")),
                (0, None, Some(b"{\"item\": 1}")),
            ],
        )
        .unwrap();
    let mut settings = consumer_settings(&broker, "g", "orders", 100, 200);
    settings.failure.policies = vec![FailurePolicy::Retry, FailurePolicy::DeadLetter];
    settings.failure.retry.retries = 2;
    settings.failure.retry.backoff_ms = 10;
    settings.failure.dead_letter.topic = "orders.dead".into();
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let run = consumer.process(async |batch: Vec<Message>| {
        let mut failed = Failures::new();
        for (i, m) in batch.iter().enumerate() {
            if m.id == "m1" {
                failed.add(i, "nope");
            }
        }
        failed.into_result()
    });
    let stopper = async {
        wait_until("three dead letters", Duration::from_secs(60), || {
            handle.stats().dead_lettered == 3
        })
        .await;
        handle.shutdown();
    };
    let (result, ()) = within(Duration::from_secs(60), async {
        tokio::join!(run, stopper)
    })
    .await;
    result.unwrap();

    let metrics: Vec<(String, Vec<String>, u64)> = snapshotter
        .snapshot()
        .into_vec()
        .into_iter()
        .filter_map(|(key, _, _, value)| match value {
            DebugValue::Counter(c) => Some((
                key.key().name().to_owned(),
                key.key()
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect(),
                c,
            )),
            _ => None,
        })
        .collect();
    let counter = |name: &str, labels: &[&str]| -> u64 {
        metrics
            .iter()
            .filter(|(n, l, _)| n == name && labels.iter().all(|want| l.iter().any(|x| x == want)))
            .map(|(_, _, c)| *c)
            .sum()
    };
    assert_eq!(
        counter(
            "kafka_batch_retries_total",
            &["kind=in_place", "reason=handler"]
        ),
        2,
        "{metrics:?}"
    );
    assert_eq!(
        counter("kafka_batch_dead_letters_total", &["reason=handler"]),
        1
    );
    assert_eq!(
        counter("kafka_batch_dead_letters_total", &["reason=not_json"]),
        1
    );
    assert_eq!(
        counter("kafka_batch_dead_letters_total", &["reason=null_key"]),
        1
    );
    assert_eq!(
        counter(
            "kafka_batch_decode_errors_total",
            &["reason=not_json", "topic=orders"]
        ),
        1
    );
    assert_eq!(
        counter("kafka_batch_decode_errors_total", &["reason=null_key"]),
        1
    );
}
