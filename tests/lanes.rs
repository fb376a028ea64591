//! Lanes on the embedded broker: several batches in the handler at once
//! (`consumer.concurrency`), in the order `consumer.ordering` asks, bounded
//! per partition by `consumer.max_in_flight_records`, and never a commit
//! past a record still in the handler.
//!
//! Every wait here is for a condition; where concurrency is the point, the
//! handler itself waits for the others (a barrier), so a consumer that ran
//! batches one at a time would hang the test, not pass it.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::lanes::{committed_to, coords, lane_settings, produce_to};
use common::*;
use kafka_batch::settings::FailurePolicy::{Retry, Skip};
use kafka_batch::settings::HandlingOrder;
use kafka_batch::{Consumer, Failures, Message};
use tokio::sync::Barrier;

const LIMIT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_of_different_partitions_run_at_once_each_partition_in_order() {
    let broker = broker_with("events", 4);
    for p in 0..4 {
        produce_to(&broker, "events", p, 0..30);
    }
    let consumer = Consumer::new(&lane_settings(
        &broker,
        "events",
        4,
        HandlingOrder::Partition,
    ))
    .unwrap();
    let handle = consumer.handle();
    // Each partition's first batch waits here until all four are in the
    // handler together.
    let first_batches = Barrier::new(4);
    let in_handler: Mutex<BTreeSet<i32>> = Mutex::default();
    let seen: Mutex<BTreeMap<i32, Vec<i64>>> = Mutex::default();
    let overlaps: Mutex<Vec<String>> = Mutex::default();
    let run = consumer.process(async |batch: Vec<Message>| {
        let at = coords(&batch);
        let partitions: BTreeSet<i32> = at.iter().map(|(p, _)| *p).collect();
        {
            let mut busy = in_handler.lock().unwrap();
            for p in &partitions {
                if !busy.insert(*p) {
                    overlaps
                        .lock()
                        .unwrap()
                        .push(format!("two batches of partition {p} in the handler"));
                }
            }
        }
        if at.iter().any(|(_, offset)| *offset == 0) {
            first_batches.wait().await;
        }
        {
            let mut seen = seen.lock().unwrap();
            for (p, offset) in &at {
                seen.entry(*p).or_default().push(*offset);
            }
            let mut busy = in_handler.lock().unwrap();
            for p in &partitions {
                busy.remove(p);
            }
        }
        anyhow::Ok(())
    });
    let stopper = async {
        committed_to(&broker, "events", &[(0, 30), (1, 30), (2, 30), (3, 30)]).await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, stopper) }).await;
    result.expect("process returns Ok after shutdown");

    assert_eq!(overlaps.into_inner().unwrap(), Vec::<String>::new());
    let seen = seen.into_inner().unwrap();
    for p in 0..4 {
        assert_eq!(
            seen.get(&p),
            Some(&(0..30).collect::<Vec<i64>>()),
            "partition {p}: every record once, in offset order"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unordered_runs_batches_of_one_partition_at_once() {
    let broker = broker_with("events", 1);
    produce_to(&broker, "events", 0, 0..30);
    let consumer = Consumer::new(&lane_settings(
        &broker,
        "events",
        3,
        HandlingOrder::Unordered,
    ))
    .unwrap();
    let handle = consumer.handle();
    // The first three batches (all of partition 0) meet here.
    let together = Barrier::new(3);
    let calls = AtomicUsize::new(0);
    let handled: Mutex<Vec<i64>> = Mutex::default();
    let run = consumer.process(async |batch: Vec<Message>| {
        if calls.fetch_add(1, Ordering::SeqCst) < 3 {
            together.wait().await;
        }
        handled
            .lock()
            .unwrap()
            .extend(coords(&batch).into_iter().map(|(_, o)| o));
        anyhow::Ok(())
    });
    let stopper = async {
        committed_to(&broker, "events", &[(0, 30)]).await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, stopper) }).await;
    result.expect("process returns Ok after shutdown");
    let mut handled = handled.into_inner().unwrap();
    handled.sort_unstable();
    assert_eq!(handled, (0..30).collect::<Vec<i64>>());
}

/// Partition 0's first batch is held in the handler while its second
/// finishes; partition 1's batch is then handled and committed. The commit
/// that carries partition 1 comes after the poller applied the second batch
/// (outcomes are applied in the order they are sent), so if a finished
/// later batch could move the commit, partition 0 would show it then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_finishing_early_never_moves_the_commit_past_one_still_running() {
    let broker = broker_with("events", 2);
    produce_to(&broker, "events", 0, 0..20);
    let consumer = Consumer::new(&lane_settings(
        &broker,
        "events",
        3,
        HandlingOrder::Unordered,
    ))
    .unwrap();
    let handle = consumer.handle();
    let release_first = tokio::sync::Notify::new();
    let second_done = AtomicBool::new(false);
    let run = consumer.process(async |batch: Vec<Message>| {
        let at = coords(&batch);
        if at.contains(&(0, 0)) {
            release_first.notified().await;
        } else if at.contains(&(0, 10)) {
            second_done.store(true, Ordering::SeqCst);
        }
        anyhow::Ok(())
    });
    let test = async {
        wait_until("the second batch of partition 0 returned", LIMIT, || {
            second_done.load(Ordering::SeqCst)
        })
        .await;
        produce_to(&broker, "events", 1, 0..5);
        committed_to(&broker, "events", &[(1, 5)]).await;
        let now = committed(&broker, "lanes", "events").await;
        assert_eq!(
            now.get(&0),
            None,
            "nothing of partition 0 is committed while its first batch runs: {now:?}"
        );
        release_first.notify_one();
        committed_to(&broker, "events", &[(0, 20), (1, 5)]).await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, test) }).await;
    result.expect("process returns Ok after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_at_max_in_flight_records_is_paused_and_resumed() {
    let broker = broker_with("events", 1);
    produce_to(&broker, "events", 0, 0..200);
    let mut settings = lane_settings(&broker, "events", 2, HandlingOrder::Partition);
    settings.max_in_flight_records = 20;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let handled = AtomicUsize::new(0);
    let run = consumer.process(async |batch: Vec<Message>| {
        if coords(&batch).contains(&(0, 0)) {
            // Held until the partition is paused at its cap: 20 records read
            // and not dealt with, 10 of them in this batch.
            wait_until("the partition was paused at its cap", LIMIT, || {
                handle.stats().capped >= 1
            })
            .await;
        }
        handled.fetch_add(batch.len(), Ordering::SeqCst);
        anyhow::Ok(())
    });
    let stopper = async {
        committed_to(&broker, "events", &[(0, 200)]).await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, stopper) }).await;
    result.expect("process returns Ok after shutdown");
    assert_eq!(
        handled.into_inner(),
        200,
        "resumed: every record handled once"
    );
}

/// A record of partition 0 fails on every delivery; partition 1 must be
/// handled and committed to its end while it is being retried: the retry's
/// second delivery waits for that, so a consumer that held partition 1 back
/// behind the retry would never get there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_retried_in_place_holds_back_only_its_partition() {
    let broker = broker_with("events", 2);
    produce_to(&broker, "events", 0, 0..10);
    produce_to(&broker, "events", 1, 0..20);
    let mut settings = lane_settings(&broker, "events", 2, HandlingOrder::Partition);
    settings.failure.policies = vec![Retry, Skip];
    settings.failure.retry.retries = 3;
    settings.failure.retry.backoff_ms = 20;
    settings.failure.retry.jitter = 0.0;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let poison_deliveries = AtomicUsize::new(0);
    let run = consumer.process(async |batch: Vec<Message>| {
        let mut failed = Failures::new();
        for (i, m) in batch.iter().enumerate() {
            if m.id == "p0-m3" {
                if poison_deliveries.fetch_add(1, Ordering::SeqCst) == 1 {
                    committed_to(&broker, "events", &[(1, 20)]).await;
                }
                failed.add(i, "p0-m3 is poison");
            }
        }
        failed.into_result()
    });
    let stopper = async {
        committed_to(&broker, "events", &[(0, 10), (1, 20)]).await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, stopper) }).await;
    result.expect("process returns Ok after shutdown");
    assert_eq!(
        poison_deliveries.into_inner(),
        4,
        "delivered once and retried 3 times, then skipped"
    );
    assert_eq!(handle.stats().failed_skipped, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_in_one_process_are_two_members_sharing_the_handler_and_the_partitions() {
    let broker = broker_with("events", 4);
    for p in 0..4 {
        produce_to(&broker, "events", p, 0..50);
    }
    let mut settings = lane_settings(&broker, "events", 4, HandlingOrder::Partition);
    settings.clients = 2;
    // Rebalances of the embedded broker's group settle at the pace of
    // heartbeats and the rebalance timeout (max.poll.interval.ms).
    settings.kafka.set("heartbeat.interval.ms", "300");
    settings.kafka.set("session.timeout.ms", "6000");
    settings.kafka.set("max.poll.interval.ms", "10000");
    settings.revoke_timeout_ms = 5000;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let handled = AtomicUsize::new(0);
    let run = consumer.process(async |batch: Vec<Message>| {
        handled.fetch_add(batch.len(), Ordering::SeqCst);
        anyhow::Ok(())
    });
    let stopper = async {
        wait_until(
            "each client holds two of the four partitions",
            LIMIT,
            || {
                handle
                    .assignments()
                    .iter()
                    .map(Vec::len)
                    .collect::<Vec<_>>()
                    == [2, 2]
            },
        )
        .await;
        committed_to(&broker, "events", &[(0, 50), (1, 50), (2, 50), (3, 50)]).await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, stopper) }).await;
    result.expect("process returns Ok after shutdown");
    assert!(handled.into_inner() >= 200, "every record handled");
    assert!(handle.stats().assigned >= 4, "the partitions were assigned");
}
