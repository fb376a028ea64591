//! Control operations on a running consumer (`ConsumerHandle`): pause and
//! resume kept apart from the consumer's own pauses and across rebalances,
//! seek back and forward with the commits they make, a subscription
//! replaced mid-run, metadata, watermarks and lag.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::lanes::{committed_to, coords, lane_settings, produce_to};
use common::*;
use kafka_batch::consumer::ConsumerEvent;
use kafka_batch::offsets::TopicPartition;
use kafka_batch::settings::HandlingOrder;
use kafka_batch::{Consumer, Error, Message};

const LIMIT: Duration = Duration::from_secs(90);

/// A partition the user paused stays paused while back-pressure pauses and
/// resumes the consumer, and through a rebalance that revokes and assigns
/// it again; `resume` then lets its records through, and everything is
/// committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_pause_outlives_back_pressure_and_a_rebalance() {
    let broker = broker_with("events", 2);
    broker.create_topic("other", 1).unwrap();
    let mut settings = lane_settings(&broker, "events", 1, HandlingOrder::Partition);
    settings.kafka.set("heartbeat.interval.ms", "300");
    settings.kafka.set("session.timeout.ms", "6000");
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let mut events = handle.events();
    let seen: Mutex<Vec<(i32, i64)>> = Mutex::default();
    let run = consumer.process(async |batch: Vec<Message>| {
        let at = coords(&batch);
        seen.lock().unwrap().extend(&at);
        // The first batch takes longer than the poller waits for a busy
        // handler (1 s): back-pressure pauses the consumer.
        if at.contains(&(1, 0)) {
            tokio::time::sleep(Duration::from_millis(1_500)).await;
        }
        anyhow::Ok(())
    });
    let p0 = TopicPartition::new("events", 0);
    let check = async {
        wait_until("both partitions assigned", LIMIT, || {
            handle.stats().assigned >= 2
        })
        .await;
        handle.pause(std::slice::from_ref(&p0)).await.unwrap();
        produce_to(&broker, "events", 0, 0..300);
        produce_to(&broker, "events", 1, 0..600);
        // Back-pressure pauses the consumer and resumes it.
        let (mut paused, mut resumed) = (false, false);
        while !(paused && resumed) {
            match within(LIMIT, events.next()).await.expect("an event") {
                ConsumerEvent::Paused { .. } => paused = true,
                ConsumerEvent::Resumed { .. } if paused => resumed = true,
                _ => {}
            }
        }
        // A member of the group that reads another topic joins: a
        // rebalance that revokes both partitions and gives them back.
        let assigned_before = handle.stats().assigned;
        let mut other = broker.consumer_settings("lanes", &["other"]);
        other.kafka.set("heartbeat.interval.ms", "300");
        let other = Consumer::new(&other).unwrap();
        let other_handle = other.handle();
        let other_run = tokio::spawn(other.process(async |_b: Vec<Message>| anyhow::Ok(())));
        wait_until("the partitions were assigned again", LIMIT, || {
            handle.stats().assigned >= assigned_before + 2
        })
        .await;
        committed_to(&broker, "events", &[(1, 600)]).await;
        assert!(
            !seen.lock().unwrap().iter().any(|(p, _)| *p == 0),
            "nothing of the paused partition was handled"
        );
        handle.resume(std::slice::from_ref(&p0)).await.unwrap();
        committed_to(&broker, "events", &[(0, 300), (1, 600)]).await;
        other_handle.shutdown();
        within(LIMIT, other_run).await.unwrap().unwrap();
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, check) }).await;
    result.unwrap();
    let handled: BTreeSet<(i32, i64)> = seen.into_inner().unwrap().into_iter().collect();
    assert_eq!(handled.len(), 900, "every record handled once resumed");
}

/// A seek forward skips on purpose: the records between the first one not
/// dealt with and the target are never handed out again (one batch in the
/// handler at the seek finishes, its result dropped), they are committed
/// past and counted. A seek back reads records again without moving the
/// commit back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seek_forward_skips_and_counts_and_seek_back_reads_again() {
    let broker = broker_with("events", 1);
    produce_to(&broker, "events", 0, 0..200);
    let mut settings = lane_settings(&broker, "events", 1, HandlingOrder::Partition);
    settings.commit_interval_ms = 0;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let seen: Mutex<Vec<i64>> = Mutex::default();
    let gate = tokio::sync::Notify::new();
    let held = AtomicBool::new(false);
    let run = consumer.process(async |batch: Vec<Message>| {
        let offsets: Vec<i64> = coords(&batch).into_iter().map(|(_, o)| o).collect();
        seen.lock().unwrap().extend(&offsets);
        if offsets.first() == Some(&10) {
            // Held in the handler until the seek is done.
            let released = gate.notified();
            held.store(true, Ordering::SeqCst);
            released.await;
        }
        anyhow::Ok(())
    });
    let check = async {
        committed_to(&broker, "events", &[(0, 10)]).await;
        wait_until("the second batch is in the handler", LIMIT, || {
            held.load(Ordering::SeqCst)
        })
        .await;
        handle.seek("events", 0, 150).await.unwrap();
        gate.notify_one();
        committed_to(&broker, "events", &[(0, 200)]).await;
        assert_eq!(
            handle.stats().seek_skipped,
            140,
            "10..150 skipped on purpose"
        );
        {
            let seen = seen.lock().unwrap();
            assert!(
                !seen.iter().any(|o| (20..150).contains(o)),
                "nothing between the batch in the handler and the target was handed out"
            );
            assert!((150..200).all(|o| seen.contains(&o)));
        }
        // Back: 180..200 again; the commit stays at 200.
        handle.seek("events", 0, 180).await.unwrap();
        wait_until("180..200 handled a second time", LIMIT, || {
            let seen = seen.lock().unwrap();
            (180..200).all(|o| seen.iter().filter(|s| **s == o).count() == 2)
        })
        .await;
        assert_eq!(
            handle.stats().seek_skipped,
            140,
            "a seek back skips nothing"
        );
        let committed = committed(&broker, "lanes", "events").await;
        assert_eq!(committed.get(&0), Some(&200), "the commit never moved back");
        // A partition not held.
        match handle.seek("events", 7, 0).await {
            Err(Error::NotAssigned { partition: 7, .. }) => {}
            other => panic!("seek of a partition not held: {other:?}"),
        }
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, check) }).await;
    result.unwrap();
}

/// `set_subscription` replaces the subscription mid-run: the consumer then
/// holds and reads only the new topic's partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_replaced_mid_run_reads_only_the_new_topic() {
    let broker = broker_with("first", 2);
    broker.create_topic("second", 3).unwrap();
    produce_to(&broker, "first", 0, 0..50);
    let settings = lane_settings(&broker, "first", 1, HandlingOrder::Partition);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let seen: Mutex<Vec<String>> = Mutex::default();
    let run = consumer.process(async |batch: Vec<Message>| {
        let mut seen = seen.lock().unwrap();
        for m in &batch {
            seen.push(m.origin().expect("origin").topic.to_string());
        }
        anyhow::Ok(())
    });
    let check = async {
        committed_to(&broker, "first", &[(0, 50)]).await;
        assert_eq!(handle.subscription().await.unwrap(), ["first"]);
        handle.set_subscription(&["second"]).await.unwrap();
        assert_eq!(handle.subscription().await.unwrap(), ["second"]);
        wait_until("the second topic's partitions held", LIMIT, || {
            handle.assignments().concat().len() == 3
        })
        .await;
        let held = handle.assignment().await.unwrap();
        assert!(held.iter().all(|tp| &*tp.topic == "second"), "{held:?}");
        produce_to(&broker, "first", 1, 0..20);
        produce_to(&broker, "second", 2, 0..40);
        committed_to(&broker, "second", &[(2, 40)]).await;
        let first_seen = seen
            .lock()
            .unwrap()
            .iter()
            .filter(|t| *t == "first")
            .count();
        assert_eq!(
            first_seen, 50,
            "nothing of the first topic after the switch"
        );
        assert!(matches!(
            handle.set_subscription(&[]).await,
            Err(Error::Control(_))
        ));
        // Leaving every topic gives every partition up; a pattern then
        // takes the topics it matches.
        handle.unsubscribe().await.unwrap();
        wait_until("every partition given up", LIMIT, || {
            handle.assignments().concat().is_empty()
        })
        .await;
        handle.subscribe_pattern("fir.*").await.unwrap();
        assert_eq!(handle.subscription().await.unwrap(), ["^fir.*"]);
        wait_until("the first topic's partitions held again", LIMIT, || {
            handle.assignments().concat().len() == 2
        })
        .await;
        committed_to(&broker, "first", &[(0, 50), (1, 20)]).await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, check) }).await;
    result.unwrap();
}

/// `partitions_for`, `watermarks` and `lag` answer from the broker: lag is
/// zero once everything is committed, and grows by what is produced while
/// the consumer's partitions are paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_watermarks_and_lag() {
    let broker = broker_with("events", 3);
    for p in 0..3 {
        produce_to(&broker, "events", p, 0..10);
    }
    let settings = lane_settings(&broker, "events", 1, HandlingOrder::Partition);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let run = consumer.process(async |_batch: Vec<Message>| anyhow::Ok(()));
    let check = async {
        let partitions = handle.partitions_for("events").await.unwrap();
        assert_eq!(
            partitions.iter().map(|p| p.partition).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert!(partitions
            .iter()
            .all(|p| p.leader >= 0 && p.replicas.contains(&p.leader)));
        assert!(matches!(
            handle.partitions_for("no-such-topic").await,
            Err(Error::Control(_))
        ));
        assert_eq!(handle.watermarks("events", 1).await.unwrap(), (0, 10));
        let producer = kafka_batch::Producer::new(&broker.producer_settings()).unwrap();
        assert_eq!(producer.partitions_for("events").await.unwrap(), partitions);
        committed_to(&broker, "events", &[(0, 10), (1, 10), (2, 10)]).await;
        let lag = handle.lag().await.unwrap();
        assert_eq!(lag.len(), 3);
        assert!(
            lag.iter()
                .all(|l| l.lag == 0 && l.committed == Some(10) && l.log_end == 10),
            "{lag:?}"
        );
        let all: Vec<TopicPartition> = (0..3).map(|p| TopicPartition::new("events", p)).collect();
        handle.pause(&all).await.unwrap();
        produce_to(&broker, "events", 2, 10..15);
        let lag = handle.lag().await.unwrap();
        assert_eq!(lag.iter().map(|l| l.lag).sum::<i64>(), 5, "{lag:?}");
        handle.resume(&all).await.unwrap();
        committed_to(&broker, "events", &[(2, 15)]).await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, check) }).await;
    result.unwrap();
}

/// A seek back on a partition nothing was read of yet, whose records the
/// group committed before, leaves the group's commit where it was (promise
/// checker seed 2259: the seek's offset was committed at shutdown, moving
/// the group's commit back by 50 records).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seek_back_before_anything_was_read_keeps_the_groups_commit() {
    let broker = broker_with("events", 1);
    produce_to(&broker, "events", 0, 0..100);
    let settings = lane_settings(&broker, "events", 1, HandlingOrder::Partition);
    let first = Consumer::new(&settings).unwrap();
    let first_handle = first.handle();
    let first_run = tokio::spawn(first.process(async |_b: Vec<Message>| anyhow::Ok(())));
    committed_to(&broker, "events", &[(0, 100)]).await;
    first_handle.close().await.unwrap();
    within(LIMIT, first_run).await.unwrap().unwrap();

    let second = Consumer::new(&settings).unwrap();
    let handle = second.handle();
    let handled = Mutex::new(0usize);
    let run = second.process(async |batch: Vec<Message>| {
        *handled.lock().unwrap() += batch.len();
        anyhow::Ok(())
    });
    let p0 = TopicPartition::new("events", 0);
    let check = async {
        wait_until("the partition assigned", LIMIT, || {
            handle.stats().assigned >= 1
        })
        .await;
        // Paused, so that nothing is read after the seek either.
        handle.pause(std::slice::from_ref(&p0)).await.unwrap();
        handle.seek("events", 0, 50).await.unwrap();
        handle.close().await.unwrap();
    };
    let (outcome, ()) = within(LIMIT, async { tokio::join!(run, check) }).await;
    outcome.unwrap();
    assert_eq!(*handled.lock().unwrap(), 0, "nothing was read");
    assert_eq!(
        broker.committed_offsets("lanes", "events").unwrap().get(&0),
        Some(&100),
        "the group's commit did not move back"
    );
}
