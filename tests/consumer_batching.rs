//! Batch cutting, commit-on-Ok and the batch contract, on the embedded broker.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kafka_batch::{Consumer, Error, Message};
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_cut_at_batch_size_and_the_rest_when_the_timeout_passes() {
    let broker = broker_with("sized", 1);
    produce_numbered(&broker, "sized", 0..25).await;
    let batches = collect_batches(&consumer_settings(&broker, "g", "sized", 10, 1500), 25).await;
    assert_eq!(sizes(&batches), vec![10, 10, 5]);
    assert_eq!(committed(&broker, "g", "sized").await, [(0, 25)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_batch_is_handed_over_when_the_timeout_passes() {
    let broker = broker_with("slow-trickle", 1);
    produce_numbered(&broker, "slow-trickle", 0..3).await;
    let batches = collect_batches(
        &consumer_settings(&broker, "g", "slow-trickle", 1000, 300),
        3,
    )
    .await;
    assert_eq!(
        sizes(&batches),
        vec![3],
        "one batch of 3, not waiting for 1000"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_cut_before_they_pass_max_batch_bytes() {
    let broker = broker_with("bytes", 1);
    let producer = kafka_batch::Producer::new(&broker.producer_settings()).unwrap();
    let big = "x".repeat(1000);
    let batch: Vec<Message> = (0..20)
        .map(|i| Message::new(format!("m{i:02}"), json!({ "text": big })))
        .collect();
    producer.produce_batch("bytes", &batch).await.unwrap();
    let mut settings = consumer_settings(&broker, "g", "bytes", 1000, 1000);
    // Each record (key + envelope) is a little over 1 KiB: three fit, four do not.
    settings.max_batch_bytes = 3500;
    let batches = collect_batches(&settings, 20).await;
    assert_eq!(sizes(&batches), vec![3, 3, 3, 3, 3, 3, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_err_batch_is_not_committed_and_the_group_reads_it_again() {
    let broker = broker_with("fragile", 1);
    produce_numbered(&broker, "fragile", 0..10).await;

    let consumer = Consumer::new(&consumer_settings(&broker, "g", "fragile", 5, 1000)).unwrap();
    let calls = AtomicUsize::new(0);
    let result = within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            let calls = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if calls == 2 {
                anyhow::bail!("downstream refused {} messages", batch.len());
            }
            Ok(())
        }),
    )
    .await;
    let error = result.expect_err("the handler's error is returned");
    match &error {
        Error::Handler { batch, source } => {
            assert_eq!(batch, "fragile[0=5:10]");
            assert_eq!(source.to_string(), "downstream refused 5 messages");
        }
        other => panic!("expected a handler error, got {other}"),
    }
    assert!(error.to_string().contains("will be read again"), "{error}");
    assert_eq!(
        committed(&broker, "g", "fragile").await,
        [(0, 5)].into(),
        "only the Ok batch"
    );

    // A new consumer in the group gets the failed batch again.
    let consumer = Consumer::new(&consumer_settings(&broker, "g", "fragile", 5, 1000)).unwrap();
    let handle = consumer.handle();
    let again = Arc::new(Mutex::new(Vec::new()));
    let seen = again.clone();
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            seen.lock().unwrap().extend(batch.iter().map(n_of));
            handle.shutdown();
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    assert_eq!(*again.lock().unwrap(), vec![5, 6, 7, 8, 9]);
    assert_eq!(committed(&broker, "g", "fragile").await, [(0, 10)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latest_only_keeps_the_last_message_of_each_id_and_commits_all() {
    let broker = broker_with("latest", 1);
    let producer = kafka_batch::Producer::new(&broker.producer_settings()).unwrap();
    let batch: Vec<Message> = ["a", "b", "x", "x", "a"]
        .iter()
        .enumerate()
        .map(|(i, id)| Message::new(*id, json!({ "n": i })))
        .collect();
    producer.produce_batch("latest", &batch).await.unwrap();

    let mut settings = consumer_settings(&broker, "g", "latest", 5, 1000);
    settings.latest_only = true;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            seen.lock()
                .unwrap()
                .extend(batch.iter().map(|m| (m.id.clone(), n_of(m))));
            handle.shutdown();
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    let expected: Vec<(kafka_batch::MessageId, usize)> =
        vec![("b".into(), 1), ("x".into(), 3), ("a".into(), 4)];
    assert_eq!(*got.lock().unwrap(), expected);
    assert_eq!(committed(&broker, "g", "latest").await, [(0, 5)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tombstones_are_skipped_and_their_offsets_committed() {
    let broker = broker_with("compacted", 1);
    let envelope =
        |n: usize| serde_json::to_vec(&json!({ "item": { "n": n }, "hist": null })).unwrap();
    let (a, b, c) = (envelope(0), envelope(2), envelope(4));
    broker
        .produce_raw(
            "compacted",
            &[
                (0, Some(b"a"), Some(&a)),
                (0, Some(b"a"), None),
                (0, Some(b"b"), Some(&b)),
                (0, Some(b"b"), Some(b"")),
                (0, Some(b"c"), Some(&c)),
            ],
        )
        .unwrap();
    let consumer = Consumer::new(&consumer_settings(&broker, "g", "compacted", 100, 300)).unwrap();
    let handle = consumer.handle();
    let got = Arc::new(Mutex::new(Vec::new()));
    let seen = got.clone();
    let run = tokio::spawn(consumer.process(async move |batch: Vec<Message>| {
        seen.lock()
            .unwrap()
            .extend(batch.iter().map(|m| m.id.clone()));
        Ok::<_, Error>(())
    }));
    wait_until("the three messages are handled", LIMIT, || {
        got.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(*got.lock().unwrap(), vec!["a", "b", "c"]);
    wait_until(
        "offsets through the tombstones are committed",
        LIMIT,
        || broker.committed_offsets("g", "compacted").unwrap().get(&0) == Some(&5),
    )
    .await;

    // A batch of nothing but tombstones never reaches the handler, yet is committed.
    broker
        .produce_raw("compacted", &[(0, Some(b"a"), None), (0, Some(b"b"), None)])
        .unwrap();
    wait_until("a tombstone-only batch is committed", LIMIT, || {
        broker.committed_offsets("g", "compacted").unwrap().get(&0) == Some(&7)
    })
    .await;
    assert_eq!(
        got.lock().unwrap().len(),
        3,
        "the handler saw no empty batch"
    );
    assert_eq!(handle.stats().skipped, 4);
    handle.shutdown();
    within(LIMIT, run).await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_undecodable_record_stops_the_consumer_with_nothing_committed_past_it() {
    let broker = broker_with("dirty", 1);
    let good = |n: usize| serde_json::to_vec(&json!({ "item": { "n": n } })).unwrap();
    let (g0, g1, g2, g4) = (good(0), good(1), good(2), good(4));
    broker
        .produce_raw(
            "dirty",
            &[
                (0, Some(b"a"), Some(&g0)),
                (0, Some(b"b"), Some(&g1)),
                (0, Some(b"c"), Some(&g2)),
                (0, Some(b"d"), Some(b"{not json")),
                (0, Some(b"e"), Some(&g4)),
            ],
        )
        .unwrap();
    let consumer = Consumer::new(&consumer_settings(&broker, "g", "dirty", 3, 300)).unwrap();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let seen = handled.clone();
    let error = within(
        LIMIT,
        consumer.process(async move |batch: Vec<Message>| {
            seen.lock().unwrap().extend(batch.iter().map(n_of));
            Ok::<_, Error>(())
        }),
    )
    .await
    .expect_err("the bad record stops the consumer");
    let Error::Decode(e) = &error else {
        panic!("a decode error, got {error}")
    };
    assert_eq!((e.topic.as_str(), e.partition, e.offset), ("dirty", 0, 3));
    assert!(
        error.to_string().contains("dirty:0:3") && error.to_string().contains("not JSON"),
        "{error}"
    );
    assert_eq!(*handled.lock().unwrap(), vec![0, 1, 2]);
    assert_eq!(
        committed(&broker, "g", "dirty").await,
        [(0, 3)].into(),
        "nothing past the bad record"
    );
}
