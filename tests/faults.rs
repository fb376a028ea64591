//! Broker faults on the embedded broker (librdkafka's mock cluster, three
//! brokers): request errors per API for the consumer and the producer, and a
//! broker down and back up mid-run. Each run must end with every id handled
//! at least once, every offset committed, every delivery report accounted
//! for, and the consumer recovered by itself.
//!
//! Each test also shows its fault took effect: every injected error was
//! answered to a request (the cluster tracks requests, see
//! `EmbeddedBroker::pending_request_errors`), what the client can observe of
//! it was observed, and for the consumer, the second half of the records is
//! produced only after that, so the consumer must recover to handle them.

mod common;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{Consumer, ConsumerStats, Delivery, Error, Message, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::json;

const RECORDS: usize = 2000;
/// Records produced before the fault; the rest once it has taken effect.
const FIRST: usize = RECORDS / 2;
const PARTITIONS: i32 = 6;
const LIMIT: Duration = Duration::from_secs(90);
/// For one step of a run, so that a step that never ends is named.
const STEP: Duration = Duration::from_secs(60);

use RDKafkaRespErr::*;

/// Three brokers, topic "jobs", every request tracked.
fn cluster() -> EmbeddedBroker {
    init_tracing();
    let broker = EmbeddedBroker::start_with_brokers(3).expect("the embedded cluster starts");
    broker.track_requests().expect("requests tracked");
    broker
        .create_topic("jobs", PARTITIONS)
        .expect("topic created");
    broker
}

/// Whether every error injected for each of `apis` was answered to a request.
fn answered(broker: &EmbeddedBroker, apis: &[RDKafkaApiKey]) -> bool {
    tokio::task::block_in_place(|| {
        apis.iter().all(|&api| {
            broker
                .pending_request_errors(api)
                .expect("pending errors counted")
                == 0
        })
    })
}

/// Consumes every record while `fault` is applied once the first batch is
/// handled. The second half of the records is produced only once every
/// error injected for `apis` was answered and the consumer's counters show
/// `observed`; returns those counters after it has seen every id.
async fn consume_through(
    broker: &EmbeddedBroker,
    what: &str,
    apis: &[RDKafkaApiKey],
    observed: impl Fn(&ConsumerStats) -> bool,
    fault: impl Fn(&EmbeddedBroker) + Send + Sync,
) -> ConsumerStats {
    produce_numbered(broker, "jobs", 0..FIRST).await;
    let settings = consumer_settings(broker, "g", "jobs", 200, 200);
    let consumer = Consumer::new(&settings).expect("consumer");
    let handle = consumer.handle();
    let faulted = AtomicBool::new(false);
    let seen = Mutex::new(BTreeSet::new());
    let handled = AtomicUsize::new(0);
    let run = consumer.process(async |batch: Vec<Message>| {
        if !faulted.load(Ordering::Acquire) {
            tokio::task::block_in_place(|| fault(broker));
            faulted.store(true, Ordering::Release);
        }
        handled.fetch_add(batch.len(), Ordering::Relaxed);
        seen.lock().unwrap().extend(batch.iter().map(n_of));
        Ok::<_, Error>(())
    });
    let feed = async {
        wait_until("the fault is injected", LIMIT, || {
            faulted.load(Ordering::Acquire)
        })
        .await;
        wait_until(
            &format!("{what}: every injected error answered, and seen by the consumer"),
            LIMIT,
            || answered(broker, apis) && observed(&handle.stats()),
        )
        .await;
        produce_numbered(broker, "jobs", FIRST..RECORDS).await;
        wait_until_committed(broker, &seen).await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, feed) }).await;
    result.expect("the consumer recovers by itself and stops cleanly");
    let seen = seen.lock().unwrap().clone();
    let handled = handled.into_inner();
    assert_eq!(seen.len(), RECORDS, "every id handled at least once");
    let committed = committed(broker, "g", "jobs").await;
    assert_eq!(
        committed.values().sum::<i64>(),
        RECORDS as i64,
        "every offset committed: {committed:?}"
    );
    // Reported only once the checks behind "lost 0" have passed.
    let stats = handle.stats();
    report(&format!(
        "embedded faults, {what}: {RECORDS} records on {PARTITIONS} partitions, 3 brokers, half produced after every injected error was answered; lost 0; duplicates {}; commit failures retried {}; partitions revoked {}",
        handled - seen.len(),
        stats.commit_failures,
        stats.revoked
    ));
    stats
}

fn errors(broker: &EmbeddedBroker, api: RDKafkaApiKey, errors: &[RDKafkaRespErr]) {
    broker.request_errors(api, errors).expect("errors injected");
}

/// Waits for the condition the fault tests mean: every record handled and
/// every partition committed to its end. (Every id seen once is not it: a
/// commit the fault kept from the broker makes the partition be read again
/// from the last one that reached it, and the consumer commits past those
/// records only once it has handled them again.)
async fn wait_until_committed(broker: &EmbeddedBroker, seen: &Mutex<BTreeSet<usize>>) {
    wait_until("every record is handled", LIMIT, || {
        seen.lock().unwrap().len() == RECORDS
    })
    .await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    while committed(broker, "g", "jobs").await.values().sum::<i64>() != RECORDS as i64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for every partition to be committed to its end"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_errors() {
    let broker = cluster();
    // Not observable in the consumer's counters: librdkafka refreshes its
    // metadata and fetches again.
    consume_through(
        &broker,
        "Fetch errors (not leader, timed out)",
        &[RDKafkaApiKey::Fetch],
        |_| true,
        |b| {
            errors(
                b,
                RDKafkaApiKey::Fetch,
                &[
                    RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                    RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                    RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                ],
            )
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_commit_errors_are_retried_not_ignored() {
    let broker = cluster();
    // Each commit is one OffsetCommit request (synchronous); librdkafka may
    // retry the timeout by itself, the two refusals it returns, and each is
    // one failed commit that kafka-batch retries.
    let refused = |s: &ConsumerStats| s.commit_failures >= 2;
    let stats = consume_through(
        &broker,
        "OffsetCommit errors (timed out, refused twice)",
        &[RDKafkaApiKey::OffsetCommit],
        refused,
        |b| {
            errors(
                b,
                RDKafkaApiKey::OffsetCommit,
                &[
                    RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                    RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE,
                    RD_KAFKA_RESP_ERR_OFFSET_METADATA_TOO_LARGE,
                ],
            )
        },
    )
    .await;
    assert!(
        refused(&stats),
        "the refused commits were seen and retried: {stats:?}"
    );
}

/// After a rebalance of every partition (librdkafka's default assignors
/// are eager): all revoked once, all assigned again.
fn rebalanced(stats: &ConsumerStats) -> bool {
    stats.revoked >= PARTITIONS as u64
}

fn reassigned(stats: &ConsumerStats) {
    // The second half was produced after the revoke, so reading it took a
    // new assignment of every partition (`revoked` counts the close too).
    assert!(
        stats.assigned >= 2 * PARTITIONS as u64,
        "every partition assigned again: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_errors() {
    let broker = cluster();
    // Heartbeats go every 3 s: the first error makes the consumer look for
    // the coordinator again, the second makes it rejoin the group.
    let stats = consume_through(
        &broker,
        "Heartbeat errors (not coordinator, rebalance in progress)",
        &[RDKafkaApiKey::Heartbeat],
        rebalanced,
        |b| {
            errors(
                b,
                RDKafkaApiKey::Heartbeat,
                &[
                    RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
                    RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS,
                ],
            )
        },
    )
    .await;
    reassigned(&stats);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_and_sync_group_errors() {
    let broker = cluster();
    // Errors on the first join and sync, before the consumer has anything,
    // and a forced rejoin mid-run that meets more of them.
    errors(
        &broker,
        RDKafkaApiKey::JoinGroup,
        &[RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 2],
    );
    errors(
        &broker,
        RDKafkaApiKey::SyncGroup,
        &[RD_KAFKA_RESP_ERR_NOT_COORDINATOR],
    );
    let stats = consume_through(
        &broker,
        "JoinGroup and SyncGroup errors (coordinator not available, not coordinator, rebalance in progress)",
        &[
            RDKafkaApiKey::Heartbeat,
            RDKafkaApiKey::JoinGroup,
            RDKafkaApiKey::SyncGroup,
        ],
        rebalanced,
        |b| {
            // The first batch needed a join and a sync: the errors injected
            // before were answered by then.
            assert!(
                answered(b, &[RDKafkaApiKey::JoinGroup, RDKafkaApiKey::SyncGroup]),
                "the first join and sync met their errors"
            );
            errors(
                b,
                RDKafkaApiKey::Heartbeat,
                &[RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS],
            );
            errors(
                b,
                RDKafkaApiKey::JoinGroup,
                &[RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE],
            );
            errors(
                b,
                RDKafkaApiKey::SyncGroup,
                &[RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS],
            );
        },
    )
    .await;
    reassigned(&stats);
}

/// Requests to broker `id` among `requests[from..to]`, and of them Fetches.
fn to_broker(broker: &EmbeddedBroker, id: i32, from: usize, to: Option<usize>) -> (usize, usize) {
    let requests = tokio::task::block_in_place(|| broker.requests()).expect("requests");
    let to = to.unwrap_or(requests.len());
    let window = requests.get(from..to).unwrap_or_default();
    let mine: Vec<_> = window.iter().filter(|r| r.broker == id).collect();
    let fetches = mine.iter().filter(|r| r.is(RDKafkaApiKey::Fetch)).count();
    (mine.len(), fetches)
}

fn tracked(broker: &EmbeddedBroker) -> usize {
    tokio::task::block_in_place(|| broker.requests())
        .expect("requests")
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partition_leader_down_and_back_up() {
    down_and_back_up(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_group_coordinator_down_and_back_up() {
    down_and_back_up(true).await;
}

/// Takes one broker of three down once the first batch is handled, produces
/// the second half while it is down, and brings it back up once the outage
/// shows in the consumer: records handled from the partitions the other
/// brokers lead, or, when the broker is the group's coordinator, the
/// partitions lost with the group session (commits and heartbeats cannot
/// reach it). The broker leads partitions either way.
async fn down_and_back_up(coordinator: bool) {
    let broker = Arc::new(cluster());
    produce_numbered(&broker, "jobs", 0..FIRST).await;
    let settings = consumer_settings(&broker, "g", "jobs", 200, 200);
    let consumer = Consumer::new(&settings).expect("consumer");
    let handle = consumer.handle();
    // Ids of the second half handled.
    let late = AtomicUsize::new(0);
    let first_batch = AtomicBool::new(false);
    // The outage, driven from outside the handler.
    let outage = async {
        wait_until("a first batch", STEP, || {
            first_batch.load(Ordering::Acquire)
        })
        .await;
        let requests = tokio::task::block_in_place(|| broker.requests()).expect("requests");
        let coordinator_id = requests
            .iter()
            .find(|r| r.is(RDKafkaApiKey::JoinGroup))
            .expect("the consumer joined the group")
            .broker;
        let victim = if coordinator {
            coordinator_id
        } else {
            (1..=3)
                .find(|&id| id != coordinator_id)
                .expect("another broker")
        };
        wait_until("the consumer fetches from the broker", STEP, || {
            to_broker(&broker, victim, 0, None).1 > 0
        })
        .await;
        let b = broker.clone();
        tokio::task::spawn_blocking(move || b.broker_down(victim))
            .await
            .expect("joined")
            .expect("down");
        // Every request tracked from here on came after the broker went down.
        let down = tracked(&broker);
        // The records of the partitions it leads wait for it.
        let produce = produce_numbered(&broker, "jobs", FIRST..RECORDS);
        let up = async {
            if coordinator {
                wait_until("the consumer loses its partitions", STEP, || {
                    handle.stats().revoked >= PARTITIONS as u64
                })
                .await;
            } else {
                wait_until("records handled while the broker is down", STEP, || {
                    late.load(Ordering::Relaxed) > 0
                })
                .await;
            }
            // Every request tracked before here came before the broker went up.
            let up = tracked(&broker);
            let b = broker.clone();
            tokio::task::spawn_blocking(move || b.broker_up(victim))
                .await
                .expect("joined")
                .expect("up");
            assert_eq!(
                to_broker(&broker, victim, down, Some(up)),
                (0, 0),
                "broker {victim} received nothing while down"
            );
            wait_until("the consumer fetches from the broker again", STEP, || {
                to_broker(&broker, victim, up, None).1 > 0
            })
            .await;
            (victim, up - down)
        };
        tokio::join!(produce, up).1
    };
    let seen = Mutex::new(BTreeSet::new());
    let handled = AtomicUsize::new(0);
    let run = consumer.process(async |batch: Vec<Message>| {
        first_batch.store(true, Ordering::Release);
        handled.fetch_add(batch.len(), Ordering::Relaxed);
        let mut seen = seen.lock().unwrap();
        for n in batch.iter().map(n_of) {
            if seen.insert(n) && n >= FIRST {
                late.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok::<_, Error>(())
    });
    let finish = async {
        wait_until_committed(&broker, &seen).await;
        handle.shutdown();
    };
    let (result, (victim, others), ()) =
        within(LIMIT, async { tokio::join!(run, outage, finish) }).await;
    result.expect("the consumer recovers by itself");
    let seen = seen.lock().unwrap().clone();
    let handled = handled.into_inner();
    assert_eq!(seen.len(), RECORDS);
    let committed = committed(&broker, "g", "jobs").await;
    assert_eq!(
        committed.values().sum::<i64>(),
        RECORDS as i64,
        "{committed:?}"
    );
    let stats = handle.stats();
    report(&format!(
        "embedded faults, broker {victim} of 3 ({}) down then up mid-run: {RECORDS} records on {PARTITIONS} partitions, half produced while it was down; it got 0 requests while down ({others} to the others), Fetches again after; lost 0; duplicates {}; commit failures retried {}; partitions revoked {}",
        if coordinator { "the group coordinator" } else { "a partition leader" },
        handled - seen.len(),
        stats.commit_failures,
        stats.revoked
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_errors_are_retried_or_reported_per_record() {
    let broker = cluster();
    let producer = Producer::new(&broker.producer_settings()).expect("producer");
    let batch: Vec<Message> = (0..500)
        .map(|i| Message::new(format!("m{i}"), json!({ "n": i })))
        .collect();

    // Retriable errors: librdkafka retries, every record is delivered.
    errors(
        &broker,
        RDKafkaApiKey::Produce,
        &[
            RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
        ],
    );
    let deliveries = within(LIMIT, producer.produce_batch("jobs", &batch))
        .await
        .expect("retried until delivered");
    assert_eq!(deliveries.len(), batch.len());
    assert!(deliveries
        .iter()
        .all(|d| matches!(d, Delivery::Written { .. })));
    // 500 records on 6 partitions led by 3 brokers took at least one request
    // per broker, and a retry for each refused one.
    assert!(
        answered(&broker, &[RDKafkaApiKey::Produce]),
        "both Produce errors were answered"
    );
    report("embedded faults, Produce errors (not leader, timed out): both answered, 500 of 500 delivery reports Written after librdkafka's retries; lost 0");

    // A refusal that does not pass: each record is accounted for, delivered
    // or named in the error. One only: after it librdkafka marks the topic
    // failed and may refuse the next records itself, without a request.
    errors(
        &broker,
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let result = within(LIMIT, producer.produce_batch("jobs", &batch)).await;
    assert!(
        answered(&broker, &[RDKafkaApiKey::Produce]),
        "the refusal was answered"
    );
    match result {
        Err(Error::Produce(e)) => {
            assert!(!e.failures.is_empty(), "the refused records are named");
            assert_eq!(e.deliveries.len(), batch.len());
            let delivered = e.deliveries.iter().filter(|d| d.is_some()).count();
            assert_eq!(
                delivered + e.failures.len(),
                batch.len(),
                "every record accounted for"
            );
            report(&format!(
                "embedded faults, Produce refused (topic authorization failed, answered): {delivered} delivered + {} named in the error = {} records, every one accounted for",
                e.failures.len(),
                batch.len()
            ));
        }
        Ok(_) => panic!("a refused Produce request, yet every record delivered"),
        Err(other) => panic!("a per-record produce error, got {other}"),
    }
}

#[test]
fn the_embedded_broker_counts_requests_from_tracking_on() {
    init_tracing();
    let broker = EmbeddedBroker::start().expect("the embedded broker starts");
    broker.create_topic("t", 1).expect("topic created");
    let record: kafka_batch::testing::RawProduce<'_> = (0, Some(b"k"), Some(b"v"));
    let produces = |b: &EmbeddedBroker| {
        b.requests()
            .expect("requests")
            .iter()
            .filter(|r| r.is(RDKafkaApiKey::Produce))
            .count()
    };
    // Before tracking: neither the request nor these errors are known.
    broker.produce_raw("t", &[record]).expect("produced");
    errors(
        &broker,
        RDKafkaApiKey::Heartbeat,
        &[RD_KAFKA_RESP_ERR_NOT_COORDINATOR],
    );
    assert!(broker.requests().expect("requests").is_empty());
    broker.track_requests().expect("tracking");
    assert_eq!(
        produces(&broker),
        0,
        "a request before tracking is not counted"
    );
    assert!(
        broker
            .pending_request_errors(RDKafkaApiKey::Heartbeat)
            .is_err(),
        "errors injected untracked cannot be proven answered"
    );

    broker.produce_raw("t", &[record]).expect("produced");
    let requests = broker.requests().expect("requests");
    assert_eq!(produces(&broker), 1, "{requests:?}");
    assert!(requests.iter().all(|r| r.broker == 1));
    assert!(requests.windows(2).all(|w| w[0].micros <= w[1].micros));

    // A retriable error: pending until a Produce request takes it.
    errors(
        &broker,
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION],
    );
    let pending = |b: &EmbeddedBroker| {
        b.pending_request_errors(RDKafkaApiKey::Produce)
            .expect("pending errors")
    };
    assert_eq!(pending(&broker), 1);
    broker
        .produce_raw("t", &[record])
        .expect("retried until produced");
    assert_eq!(pending(&broker), 0);
    assert!(produces(&broker) >= 3, "the refused request and its retry");
}

/// The embedded broker's raw producer (the test input of many tests) says
/// when the broker refused a record, instead of losing it silently.
#[test]
fn the_embedded_broker_raw_producer_reports_a_refused_record() {
    init_tracing();
    let broker = EmbeddedBroker::start().expect("the embedded broker starts");
    broker.create_topic("t", 1).expect("topic created");
    broker.track_requests().expect("tracking");
    errors(
        &broker,
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
    );
    let refused = broker
        .produce_raw("t", &[(0, Some(b"k"), Some(b"v"))])
        .expect_err("the refusal is an error");
    assert!(refused.to_string().contains("not delivered"), "{refused}");
    assert_eq!(
        broker
            .pending_request_errors(RDKafkaApiKey::Produce)
            .expect("pending errors"),
        0,
        "the refusal was the injected error"
    );
}
