//! Pipelines, slow handlers, shutdown and rebalances, on the embedded broker.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kafka_batch::{Consumer, Error, Message, Producer};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(90);

/// One hop: consume `from`, derive each message, produce to `to` as `service`.
async fn hop(
    broker: &kafka_batch::testing::EmbeddedBroker,
    service: &str,
    from: &str,
    to: &str,
    expected: usize,
) {
    let mut producer_settings = broker.producer_settings();
    producer_settings.service = service.into();
    let producer = Producer::new(&producer_settings).unwrap();
    let mut settings = consumer_settings(broker, service, from, 7, 300);
    settings.service = service.into();
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let done = AtomicUsize::new(0);
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            let out: Vec<Message> = batch
                .iter()
                .map(|m| m.derive(json!({ "n": n_of(m), "via": service })))
                .collect();
            producer.produce_batch(to, &out).await?;
            let done = done.fetch_add(batch.len(), Ordering::SeqCst) + batch.len();
            if done == expected {
                handle.shutdown();
            }
            anyhow::Ok(())
        }),
    )
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_two_hop_pipeline_carries_the_full_ref_chain() {
    let broker = broker_with("raw", 2);
    broker.create_topic("middle", 3).unwrap();
    broker.create_topic("final", 1).unwrap();
    produce_numbered(&broker, "raw", 0..20).await;
    hop(&broker, "hop-one", "raw", "middle", 20).await;
    hop(&broker, "hop-two", "middle", "final", 20).await;

    let raw: HashMap<kafka_batch::MessageId, Message> =
        by_id(broker.read_messages("raw", 20, LIMIT).unwrap());
    let middle: HashMap<kafka_batch::MessageId, Message> =
        by_id(broker.read_messages("middle", 20, LIMIT).unwrap());
    let finals = broker.read_messages::<Value>("final", 20, LIMIT).unwrap();
    assert_eq!(finals.len(), 20);
    for m in &finals {
        let own = m
            .source()
            .unwrap()
            .hist
            .as_deref()
            .expect("final record has a history");
        assert_eq!(own.svc, "hop-two");
        assert_eq!(m.payload["via"], "hop-two");
        let [from_middle] = own.refs.as_slice() else {
            panic!("one ref")
        };
        let middle_record = middle[&m.id].source().unwrap();
        assert_eq!(
            (
                &*from_middle.topic,
                from_middle.partition,
                from_middle.offset,
                from_middle.key.as_deref()
            ),
            (
                "middle",
                middle_record.partition,
                middle_record.offset,
                Some(m.id.as_str())
            ),
            "the ref names the exact middle record"
        );
        let middle_hist = from_middle.hist.as_deref().unwrap();
        assert_eq!(middle_hist.svc, "hop-one");
        let [from_raw] = middle_hist.refs.as_slice() else {
            panic!("one ref")
        };
        let raw_record = raw[&m.id].source().unwrap();
        assert_eq!(
            (&*from_raw.topic, from_raw.partition, from_raw.offset),
            ("raw", raw_record.partition, raw_record.offset)
        );
        let origin = from_raw.hist.as_deref().unwrap();
        assert_eq!(origin.svc, "test-origin");
        assert!(origin.refs.is_empty(), "the origin record has no inputs");
        assert_eq!(own.depth(), 3);
    }
}

fn by_id(messages: Vec<Message>) -> HashMap<kafka_batch::MessageId, Message> {
    messages.into_iter().map(|m| (m.id.clone(), m)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_slower_than_max_poll_interval_keeps_its_partitions() {
    let broker = broker_with("slow", 1);
    produce_numbered(&broker, "slow", 0..30).await;
    let mut settings = consumer_settings(&broker, "g", "slow", 10, 500);
    settings.kafka.set("session.timeout.ms", "3000");
    settings.kafka.set("heartbeat.interval.ms", "500");
    settings.kafka.set("max.poll.interval.ms", "3000");
    settings.revoke_timeout_ms = 2000;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let first = AtomicBool::new(true);
    let revoked_while_running = AtomicU64::new(0);
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            if first.swap(false, Ordering::SeqCst) {
                // Work for twice max.poll.interval.ms.
                tokio::time::sleep(Duration::from_millis(6000)).await;
            }
            let mut seen = record.lock().unwrap();
            seen.extend(batch.iter().map(n_of));
            if seen.len() >= 30 {
                revoked_while_running.store(handle.stats().revoked, Ordering::SeqCst);
                handle.shutdown();
            }
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        (0..30).collect::<Vec<_>>(),
        "each record once, in order: no eviction, no re-read"
    );
    assert_eq!(
        revoked_while_running.into_inner(),
        0,
        "the consumer was never evicted"
    );
    assert_eq!(
        handle.stats().long_batches,
        1,
        "the batch that ran past max.poll.interval.ms was reported, once"
    );
    assert!(
        handle.stats().pauses >= 1,
        "the poller paused while the handler was busy"
    );
    assert_eq!(committed(&broker, "g", "slow").await, [(0, 30)].into());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_mid_run_commits_the_batch_in_hand_and_the_next_consumer_starts_after_it() {
    let broker = broker_with("orderly", 1);
    produce_numbered(&broker, "orderly", 0..100).await;
    let consumer = Consumer::new(&consumer_settings(&broker, "g", "orderly", 10, 500)).unwrap();
    let handle = consumer.handle();
    let batches = Mutex::new(Vec::new());
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            handle.shutdown();
            // The batch in hand still runs to the end after shutdown was asked for.
            tokio::task::yield_now().await;
            let numbers = batch.iter().map(n_of).collect::<Vec<_>>();
            batches.lock().unwrap().push(numbers);
            Ok::<_, Error>(())
        }),
    )
    .await
    .expect("shutdown makes process return Ok");
    assert_eq!(
        *batches.lock().unwrap(),
        vec![(0..10).collect::<Vec<_>>()],
        "only the batch in hand ran"
    );
    assert_eq!(committed(&broker, "g", "orderly").await, [(0, 10)].into());

    let consumer = Consumer::new(&consumer_settings(&broker, "g", "orderly", 10, 500)).unwrap();
    let handle = consumer.handle();
    let first_offset = Mutex::new(None);
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            *first_offset.lock().unwrap() = batch[0].origin().map(|o| o.offset);
            handle.shutdown();
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        *first_offset.lock().unwrap(),
        Some(10),
        "the next consumer starts exactly after the committed batch"
    );
}

/// Two consumers in one group; the first leaves while records keep coming.
async fn take_over(strategy: &str) {
    let topic = "shared";
    let broker = broker_with(topic, 4);
    let handled: Arc<Mutex<Vec<(char, usize)>>> = Arc::default();
    let make = |name: char| {
        let mut s = consumer_settings(&broker, "group", topic, 10, 200);
        s.kafka.set("partition.assignment.strategy", strategy);
        // Notice rebalances quickly.
        s.kafka.set("heartbeat.interval.ms", "300");
        s.kafka.set("session.timeout.ms", "6000");
        // librdkafka's own debug log, e.g. TEST_RDKAFKA_DEBUG=cgrp RUST_LOG=librdkafka=debug.
        if let Ok(debug) = std::env::var("TEST_RDKAFKA_DEBUG") {
            s.kafka.set("debug", debug);
        }
        s.kafka.set("client.id", format!("consumer-{name}"));
        let consumer = Consumer::new(&s).unwrap();
        let handle = consumer.handle();
        let handled = handled.clone();
        let run = consumer.process(async move |batch: Vec<Message>| {
            // A little work per batch, so that records are in flight at every rebalance.
            tokio::time::sleep(Duration::from_millis(10)).await;
            handled
                .lock()
                .unwrap()
                .extend(batch.iter().map(|m| (name, n_of(m))));
            Ok::<_, Error>(())
        });
        (handle, run)
    };
    // Both are created now, b only starts later: a consumer that is not
    // processing yet must not be a group member (it would hold partitions
    // it never polls).
    let (a, run_a) = make('a');
    let (b, run_b) = make('b');
    let a_count = |c: char| {
        handled
            .lock()
            .unwrap()
            .iter()
            .filter(|(who, _)| *who == c)
            .count()
    };

    // Records keep coming until b has handled some, and 20 chunks more
    // while a leaves: the embedded broker takes seconds to rebalance, and a
    // alone could otherwise handle every record before b is given a
    // partition.
    let b_handles = AtomicBool::new(false);
    let produced = AtomicUsize::new(0);
    let produced_all = AtomicBool::new(false);
    let produce = async {
        let mut chunk = 0;
        let mut tail = None;
        while tail.is_none_or(|left| left > 0) && chunk < 2_000 {
            produce_numbered(&broker, topic, chunk * 10..chunk * 10 + 10).await;
            chunk += 1;
            produced.store(chunk * 10, Ordering::Release);
            if b_handles.load(Ordering::Acquire) {
                tail = Some(tail.unwrap_or(20) - 1);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        produced_all.store(true, Ordering::Release);
    };
    let run_a = tokio::spawn(run_a);
    let drive = async {
        wait_until("a handles a batch", LIMIT, || a_count('a') > 0).await;
        let run_b = tokio::spawn(run_b);
        wait_until("b handles a batch", LIMIT, || a_count('b') > 0).await;
        b_handles.store(true, Ordering::Release);
        a.shutdown();
        within(LIMIT, run_a)
            .await
            .unwrap()
            .expect("a leaves cleanly");
        // The condition that matters: b has committed every partition to
        // its end (every record handled once is not enough: a's last
        // commit may have been refused during the rebalance, and b then
        // reads those records again before it can commit past them).
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let committed = committed(&broker, "group", topic).await;
            if produced_all.load(Ordering::Acquire)
                && committed.values().sum::<i64>() == produced.load(Ordering::Acquire) as i64
            {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting for every partition to be committed to its end: {committed:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        b.shutdown();
        within(LIMIT, run_b)
            .await
            .unwrap()
            .expect("b stops cleanly");
    };
    tokio::join!(produce, drive);
    let total = produced.load(Ordering::Acquire);

    let handled = handled.lock().unwrap().clone();
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for (_, n) in &handled {
        *counts.entry(*n).or_default() += 1;
    }
    assert_eq!(counts.len(), total, "every record handled");
    let duplicates: Vec<_> = counts.iter().filter(|(_, c)| **c > 1).collect();
    // A record is read twice only when the broker refused a commit: librdkafka's
    // mock refuses OffsetCommit while the group is joining (Apache Kafka accepts
    // it from current members), so an eager revoke there cannot commit.
    let refused = a.stats().commit_failures + b.stats().commit_failures;
    assert!(
        duplicates.is_empty() || refused > 0,
        "records re-read although every commit was accepted: {duplicates:?}"
    );
    eprintln!(
        "{strategy}: {} records read twice or more, {refused} commits refused by the broker",
        duplicates.len()
    );
    let committed = committed(&broker, "group", topic).await;
    assert_eq!(
        committed.values().sum::<i64>(),
        total as i64,
        "every partition committed to its end: {committed:?}"
    );
    assert!(a.stats().revoked > 0 && b.stats().assigned > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_consumer_hands_its_partitions_over_with_nothing_lost_eager() {
    take_over("range").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leaving_consumer_hands_its_partitions_over_with_nothing_lost_cooperative() {
    take_over("cooperative-sticky").await;
}

/// A consumer paused by back-pressure when a rebalance takes its partitions,
/// which resumes (with nothing assigned) before it gets some of them back,
/// fetches them again. librdkafka keeps an application's pause across an
/// eager revoke and re-assign, so the consumer must set the state of every
/// partition it is given; before it did, the real-broker crash run found
/// members that held partitions and never fetched them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_paused_when_revoked_fetches_the_partitions_it_gets_back() {
    let topic = "paused";
    let broker = broker_with(topic, 2);
    let total = 200;
    produce_numbered(&broker, topic, 0..total).await;
    let handled: Arc<Mutex<HashSet<usize>>> = Arc::default();
    let (open, gate) = tokio::sync::watch::channel(false);
    let make = |name: &str, gate: Option<tokio::sync::watch::Receiver<bool>>| {
        let mut s = consumer_settings(&broker, "group", topic, 10, 200);
        s.kafka.set("partition.assignment.strategy", "range");
        s.kafka.set("heartbeat.interval.ms", "300");
        s.kafka.set("session.timeout.ms", "6000");
        s.kafka.set("client.id", name);
        // The revoke gives up on the held batches quickly, so the consumer
        // is still paused when its partitions are revoked.
        s.revoke_timeout_ms = 300;
        let consumer = Consumer::new(&s).unwrap();
        let handle = consumer.handle();
        let handled = handled.clone();
        let run = consumer.process(async move |batch: Vec<Message>| {
            if let Some(mut gate) = gate.clone() {
                gate.wait_for(|open| *open).await?;
            }
            handled.lock().unwrap().extend(batch.iter().map(n_of));
            anyhow::Ok(())
        });
        (handle, run)
    };
    let (a, run_a) = make("consumer-a", Some(gate));
    let (b, run_b) = make("consumer-b", None);
    let run_a = tokio::spawn(run_a);
    // a's handler holds its first batch: the next fills the channel and a
    // pauses its partitions.
    wait_until("a pauses for back-pressure", LIMIT, || a.stats().pauses > 0).await;
    // Slow responses make the rejoin take long enough for a to resume (with
    // nothing assigned) between the revoke and the new assignment.
    broker
        .round_trip_time(1, Duration::from_millis(400))
        .unwrap();
    let run_b = tokio::spawn(run_b);
    wait_until("a's partitions are revoked", LIMIT, || {
        a.stats().revoked > 0
    })
    .await;
    open.send_replace(true);
    wait_until("every record is handled after the rebalance", LIMIT, || {
        handled.lock().unwrap().len() == total
    })
    .await;
    assert!(
        a.stats().assigned > 2,
        "a got a partition back after the revoke: {:?}",
        a.stats()
    );
    // Committed to the end before either leaves: the mock refuses commits
    // during the rebalance a leave starts, so a last commit then would fail.
    wait_until("every partition is committed to its end", LIMIT, || {
        tokio::task::block_in_place(|| broker.committed_offsets("group", topic))
            .is_ok_and(|c| c.values().sum::<i64>() == total as i64)
    })
    .await;
    a.shutdown();
    b.shutdown();
    within(LIMIT, run_a)
        .await
        .unwrap()
        .expect("a stops cleanly");
    within(LIMIT, run_b)
        .await
        .unwrap()
        .expect("b stops cleanly");
}
