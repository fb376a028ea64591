//! Lanes and rebalances: a revoke waits for its partitions' batches in the
//! handler, drops their late results when they run past
//! `revoke_timeout_ms`, and never stops the partitions it keeps.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::lanes::{committed_to, coords, lane_settings, produce_to};
use common::*;
use kafka_batch::settings::FailurePolicy::Retry;
use kafka_batch::settings::HandlingOrder;
use kafka_batch::{Consumer, Message};

const LIMIT: Duration = Duration::from_secs(90);

/// Cooperative rebalance with batches of every partition in the handler:
/// the revoke waits (up to `revoke_timeout_ms`) for the batches of the
/// partitions it takes, gives them up when they do not finish, and their
/// late results are dropped, never committed; the partitions kept keep
/// their batches, which finish and are committed by their owner. The
/// batches are held until the new member has its share, which it gets only
/// after the revoke: so the revoke certainly met them in flight.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoke_with_batches_in_flight_drops_their_late_results_and_keeps_the_others() {
    let broker = broker_with("events", 4);
    for p in 0..4 {
        produce_to(&broker, "events", p, 0..20);
    }
    let mut settings = lane_settings(&broker, "events", 4, HandlingOrder::Partition);
    settings
        .kafka
        .set("partition.assignment.strategy", "cooperative-sticky");
    settings.kafka.set("heartbeat.interval.ms", "300");
    settings.kafka.set("session.timeout.ms", "6000");
    settings.kafka.set("max.poll.interval.ms", "10000");
    settings.revoke_timeout_ms = 2000;
    let first = Consumer::new(&settings).unwrap();
    let first_handle = first.handle();
    let second = Consumer::new(&settings).unwrap();
    let second_handle = second.handle();
    let held = AtomicUsize::new(0);
    let release = tokio::sync::Notify::new();
    let by_first: Mutex<Vec<(i32, i64)>> = Mutex::default();
    let by_second: Mutex<Vec<(i32, i64)>> = Mutex::default();
    let run_first = first.process(async |batch: Vec<Message>| {
        let at = coords(&batch);
        if at.iter().any(|(_, o)| *o == 0) {
            let waiting = release.notified();
            held.fetch_add(1, Ordering::SeqCst);
            waiting.await;
        }
        by_first.lock().unwrap().extend(at);
        anyhow::Ok(())
    });
    let run_second = async {
        wait_until(
            "the first member holds a batch of every partition",
            LIMIT,
            || held.load(Ordering::SeqCst) == 4,
        )
        .await;
        second
            .process(async |batch: Vec<Message>| {
                by_second.lock().unwrap().extend(coords(&batch));
                anyhow::Ok(())
            })
            .await
    };
    let moved: Mutex<BTreeSet<i32>> = Mutex::default();
    let test = async {
        wait_until("the second member has its two partitions", LIMIT, || {
            second_handle
                .assignments()
                .first()
                .is_some_and(|held| held.len() == 2)
        })
        .await;
        *moved.lock().unwrap() = second_handle.assignments()[0]
            .iter()
            .map(|tp| tp.partition)
            .collect();
        release.notify_waiters();
        committed_to(&broker, "events", &[(0, 20), (1, 20), (2, 20), (3, 20)]).await;
        first_handle.shutdown();
        second_handle.shutdown();
    };
    let (a, b, ()) = within(LIMIT, async { tokio::join!(run_first, run_second, test) }).await;
    a.expect("the first member returns Ok");
    b.expect("the second member returns Ok");

    let moved = moved.into_inner().unwrap();
    let by_first = by_first.into_inner().unwrap();
    let by_second = by_second.into_inner().unwrap();
    for p in 0..4 {
        let second_saw: BTreeSet<i64> = by_second
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, o)| *o)
            .collect();
        if moved.contains(&p) {
            assert_eq!(
                second_saw,
                (0..20).collect(),
                "partition {p} moved: its new owner read it all, the old owner's late batch was not committed"
            );
        } else {
            assert!(
                second_saw.is_empty(),
                "partition {p} stayed: {second_saw:?}"
            );
            let first_saw: Vec<i64> = by_first
                .iter()
                .filter(|(q, _)| *q == p)
                .map(|(_, o)| *o)
                .collect();
            assert_eq!(
                first_saw,
                (0..20).collect::<Vec<i64>>(),
                "partition {p} stayed with its owner, handled once in order"
            );
        }
    }
    assert_eq!(moved.len(), 2);
}

/// A cooperative revoke waits for its partitions' batches in the handler
/// without stopping the partitions it keeps. librdkafka fetches nothing
/// until the revoke gives the partitions up (it pauses the whole
/// assignment meanwhile), so what flows is what was read: here a record of
/// each partition kept fails while the revoke waits, and its retry from
/// memory is handed over and handled before the revoked partitions' held
/// batches finish. Those are then committed, so the new owner starts after
/// them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cooperative_revoke_waits_for_its_batches_while_the_other_partitions_flow() {
    let broker = broker_with("events", 4);
    for p in 0..4 {
        produce_to(&broker, "events", p, 0..1);
    }
    let mut settings = lane_settings(&broker, "events", 16, HandlingOrder::Key);
    settings
        .kafka
        .set("partition.assignment.strategy", "cooperative-sticky");
    settings.kafka.set("heartbeat.interval.ms", "300");
    settings.kafka.set("session.timeout.ms", "6000");
    settings.kafka.set("max.poll.interval.ms", "120000");
    settings.failure.policies = vec![Retry];
    settings.failure.retry.retries = 3;
    settings.failure.retry.backoff_ms = 20;
    // Longer than the test waits: the revoke finishes because its batches
    // did, not because its time ran out.
    settings.revoke_timeout_ms = 100_000;
    let first = Consumer::new(&settings).unwrap();
    let first_handle = first.handle();
    let second = Consumer::new(&settings).unwrap();
    let second_handle = second.handle();
    // Each partition's record waits for a verdict: fail (retried) or pass.
    let verdicts = tokio::sync::watch::channel(BTreeMap::<i32, bool>::new());
    let held = AtomicUsize::new(0);
    let attempts: Mutex<Vec<(i32, bool)>> = Mutex::default();
    let run_first = first.process(async |batch: Vec<Message>| {
        let partitions: BTreeSet<i32> = coords(&batch).iter().map(|(p, _)| *p).collect();
        let mut verdict = verdicts.1.clone();
        let mut fail = false;
        for p in &partitions {
            let seen_before = attempts.lock().unwrap().iter().any(|(q, _)| q == p);
            if seen_before {
                continue; // a retry: it passes
            }
            held.fetch_add(1, Ordering::SeqCst);
            let pass = *verdict
                .wait_for(|v| v.contains_key(p))
                .await?
                .get(p)
                .unwrap_or(&true);
            fail |= !pass;
        }
        attempts
            .lock()
            .unwrap()
            .extend(partitions.iter().map(|p| (*p, !fail)));
        if fail {
            anyhow::bail!("failing once, to be retried");
        }
        anyhow::Ok(())
    });
    let start_second = AtomicBool::new(false);
    let run_second = async {
        wait_until("the second member may start", LIMIT, || {
            start_second.load(Ordering::SeqCst)
        })
        .await;
        second.process(async |_: Vec<Message>| anyhow::Ok(())).await
    };
    let kept: Mutex<Vec<i32>> = Mutex::default();
    let test = async {
        wait_until(
            "the first member holds every partition's record",
            LIMIT,
            || held.load(Ordering::SeqCst) == 4,
        )
        .await;
        start_second.store(true, Ordering::SeqCst);
        wait_until("the first member revokes two partitions", LIMIT, || {
            first_handle.stats().revoking == 2
        })
        .await;
        let keeps: Vec<i32> = first_handle.assignments()[0]
            .iter()
            .map(|tp| tp.partition)
            .collect();
        assert_eq!(keeps.len(), 2, "two partitions kept: {keeps:?}");
        verdicts
            .0
            .send_modify(|v| v.extend(keeps.iter().map(|p| (*p, false))));
        let passed_again = |p: &i32| attempts.lock().unwrap().contains(&(*p, true));
        wait_until(
            "the kept partitions' records are retried and handled",
            LIMIT,
            || keeps.iter().all(passed_again),
        )
        .await;
        assert_eq!(
            first_handle.stats().revoking,
            2,
            "the revoke still waits for its held batches"
        );
        *kept.lock().unwrap() = keeps;
        verdicts
            .0
            .send_modify(|v| v.extend((0..4).map(|p| (p, true))));
        committed_to(&broker, "events", &[(0, 1), (1, 1), (2, 1), (3, 1)]).await;
        assert_eq!(
            first_handle.stats().revoked,
            2,
            "one revoke of two partitions"
        );
        first_handle.shutdown();
        second_handle.shutdown();
    };
    let (a, b, ()) = within(LIMIT, async { tokio::join!(run_first, run_second, test) }).await;
    a.expect("the first member returns Ok");
    b.expect("the second member returns Ok");

    let kept = kept.into_inner().unwrap();
    let attempts = attempts.into_inner().unwrap();
    for p in 0..4 {
        let tries: Vec<bool> = attempts
            .iter()
            .filter(|(q, _)| *q == p)
            .map(|(_, ok)| *ok)
            .collect();
        if kept.contains(&p) {
            assert_eq!(
                tries,
                vec![false, true],
                "partition {p} kept: failed once, retried"
            );
        } else {
            assert_eq!(
                tries,
                vec![true],
                "partition {p} revoked: its held batch finished once"
            );
        }
    }
    assert_eq!(
        second_handle.stats().messages,
        0,
        "the held batches were committed at the revoke: the new owner read nothing again"
    );
    report(&format!(
        "lanes: a cooperative revoke waited for its 2 partitions' held batches while partitions {kept:?} failed, were retried from memory and handled; the held batches were then committed and the new owner read nothing again"
    ));
}
