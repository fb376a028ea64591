//! `ordering = "key"` on the embedded broker: a key's records in offset
//! order, keys of one partition at once, and a poison key that holds back
//! only itself (and its partition's commit) under each way its chain ends.
//!
//! Where parallelism or flow is the point, the handler waits for it (a
//! barrier, or the other keys' records), so a consumer that serialized
//! them would hang the test rather than pass it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use kafka_batch::settings::FailurePolicy::{self, DeadLetter, Fail, Retry, Skip};
use kafka_batch::settings::HandlingOrder;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{Consumer, ConsumerSettings, Error, Failures, Message};
use tokio::sync::Barrier;

const LIMIT: Duration = Duration::from_secs(90);

/// Produces `count` records to partition 0, record `n` with key `k{n % keys}`.
fn produce_keyed(broker: &EmbeddedBroker, topic: &str, count: usize, keys: usize) {
    let ks: Vec<String> = (0..count).map(|n| format!("k{}", n % keys)).collect();
    let values: Vec<Vec<u8>> = (0..count)
        .map(|n| format!(r#"{{"item": {{"n": {n}}}}}"#).into_bytes())
        .collect();
    let records: Vec<_> = ks
        .iter()
        .zip(&values)
        .map(|(k, v)| (0, Some(k.as_bytes()), Some(v.as_slice())))
        .collect();
    broker
        .produce_raw(topic, &records)
        .expect("records produced");
}

fn keyed_settings(
    broker: &EmbeddedBroker,
    topic: &str,
    concurrency: usize,
    batch_size: usize,
) -> ConsumerSettings {
    let mut s = consumer_settings(broker, "keys", topic, batch_size, 100);
    s.concurrency = concurrency;
    s.ordering = HandlingOrder::Key;
    s
}

async fn committed_to(broker: &EmbeddedBroker, topic: &str, end: i64) {
    wait_until(&format!("{topic}[0] committed to {end}"), LIMIT, || {
        tokio::task::block_in_place(|| broker.committed_offsets("keys", topic))
            .map(|c| c.get(&0) == Some(&end))
            .unwrap_or(false)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_records_come_in_order_and_keys_of_one_partition_run_at_once() {
    let broker = broker_with("events", 1);
    produce_keyed(&broker, "events", 120, 10);
    // Batches of 2: up to five keys' batches can be in the handler at once.
    let consumer = Consumer::new(&keyed_settings(&broker, "events", 8, 2)).unwrap();
    let handle = consumer.handle();
    // The first four batches, all of partition 0, meet here.
    let together = Barrier::new(4);
    let calls = AtomicUsize::new(0);
    let in_handler: Mutex<BTreeSet<String>> = Mutex::default();
    let problems: Mutex<Vec<String>> = Mutex::default();
    let seen: Mutex<BTreeMap<String, Vec<usize>>> = Mutex::default();
    let run = consumer.process(async |batch: Vec<Message>| {
        let keys: BTreeSet<String> = batch.iter().map(|m| m.id.to_string()).collect();
        {
            let mut busy = in_handler.lock().unwrap();
            for k in &keys {
                if !busy.insert(k.clone()) {
                    problems
                        .lock()
                        .unwrap()
                        .push(format!("two batches of key {k} at once"));
                }
            }
        }
        if calls.fetch_add(1, Ordering::SeqCst) < 4 {
            together.wait().await;
        }
        let mut seen = seen.lock().unwrap();
        for m in &batch {
            seen.entry(m.id.to_string()).or_default().push(n_of(m));
        }
        let mut busy = in_handler.lock().unwrap();
        for k in &keys {
            busy.remove(k);
        }
        anyhow::Ok(())
    });
    let stopper = async {
        committed_to(&broker, "events", 120).await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, stopper) }).await;
    result.expect("process returns Ok after shutdown");
    assert_eq!(problems.into_inner().unwrap(), Vec::<String>::new());
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 10);
    for (k, ns) in &seen {
        let i: usize = k[1..].parse().unwrap();
        let want: Vec<usize> = (0..12).map(|j| j * 10 + i).collect();
        assert_eq!(ns, &want, "key {k}: each record once, in offset order");
    }
}

/// Record 7 (key k2) fails on every delivery. Its last delivery waits until
/// every record of the other keys was handled: they must flow while it is
/// retried. None of k2's later records may be handled before the chain is
/// done with record 7. (Batches of one record: the delivery that waits
/// holds no other key.)
async fn poison_key(ending: FailurePolicy) {
    let topic = format!("poison-{}", ending.name());
    let broker = broker_with(&topic, 1);
    broker.create_topic(&format!("{topic}.dead"), 1).unwrap();
    produce_keyed(&broker, &topic, 50, 5);
    let mut settings = keyed_settings(&broker, &topic, 4, 1);
    settings.failure.policies = vec![Retry, ending];
    settings.failure.retry.retries = 2;
    settings.failure.retry.backoff_ms = 20;
    settings.failure.retry.jitter = 0.0;
    settings.failure.dead_letter.topic = format!("{topic}.dead");
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let deliveries = AtomicUsize::new(0);
    let others = AtomicUsize::new(0);
    let early: Mutex<Vec<usize>> = Mutex::default();
    let run = consumer.process(async |batch: Vec<Message>| {
        let mut failed = Failures::new();
        for (i, m) in batch.iter().enumerate() {
            let n = n_of(m);
            if n == 7 {
                if deliveries.fetch_add(1, Ordering::SeqCst) == 2 {
                    wait_until("the other keys' 40 records were handled", LIMIT, || {
                        others.load(Ordering::SeqCst) == 40
                    })
                    .await;
                }
                failed.add(i, "record 7 is poison");
            } else if m.id == "k2" {
                if n > 7 && deliveries.load(Ordering::SeqCst) < 3 {
                    early.lock().unwrap().push(n);
                }
            } else {
                others.fetch_add(1, Ordering::SeqCst);
            }
        }
        failed.into_result()
    });
    let result = match ending {
        Fail => within(LIMIT, run).await,
        _ => {
            let stopper = async {
                committed_to(&broker, &topic, 50).await;
                handle.shutdown();
            };
            within(LIMIT, async { tokio::join!(run, stopper) }).await.0
        }
    };
    assert_eq!(deliveries.into_inner(), 3, "delivered once, retried twice");
    assert_eq!(
        early.into_inner().unwrap(),
        Vec::<usize>::new(),
        "k2's later records wait for record 7"
    );
    assert_eq!(others.into_inner(), 40);
    match ending {
        Fail => {
            assert!(
                matches!(result, Err(Error::Handler { .. })),
                "fail stops the consumer: {result:?}"
            );
            let committed = committed(&broker, "keys", &topic).await;
            assert_eq!(
                committed.get(&0),
                Some(&7),
                "committed up to the poison record, not past it"
            );
        }
        DeadLetter => {
            result.expect("process returns Ok after shutdown");
            let dead = broker
                .read_messages::<serde_json::Value>(&format!("{topic}.dead"), 1, LIMIT)
                .unwrap();
            assert_eq!(dead.len(), 1);
            assert_eq!(dead[0].payload["n"], 7);
        }
        _ => result.expect("process returns Ok after shutdown"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_key_is_skipped_while_other_keys_flow() {
    poison_key(Skip).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_key_is_dead_lettered_while_other_keys_flow() {
    poison_key(DeadLetter).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_key_fails_the_consumer_committed_up_to_it() {
    poison_key(Fail).await;
}
