//! Broker faults on the embedded broker (librdkafka's mock cluster, three
//! brokers): request errors per API for the consumer and the producer, and a
//! broker down and back up mid-run. Each run must end with every id handled
//! at least once, every offset committed, every delivery report accounted
//! for, and the consumer recovered by itself.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{Consumer, ConsumerStats, Delivery, Error, Message, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::json;

const RECORDS: usize = 2000;
const PARTITIONS: i32 = 6;
const LIMIT: Duration = Duration::from_secs(90);

use RDKafkaRespErr::*;

fn cluster() -> EmbeddedBroker {
    init_tracing();
    let broker = EmbeddedBroker::start_with_brokers(3).expect("the embedded cluster starts");
    broker
        .create_topic("jobs", PARTITIONS)
        .expect("topic created");
    broker
}

/// Consumes every record while `fault` is applied once the first batch is
/// handled; returns the consumer's counters after it has seen every id.
async fn consume_through(
    broker: &EmbeddedBroker,
    what: &str,
    fault: impl Fn(&EmbeddedBroker) + Send + Sync,
) -> ConsumerStats {
    produce_numbered(broker, "jobs", 0..RECORDS).await;
    let settings = consumer_settings(broker, "g", "jobs", 200, 200);
    let consumer = Consumer::new(&settings).expect("consumer");
    let handle = consumer.handle();
    let mut seen = BTreeSet::new();
    let mut handled = 0;
    let mut faulted = false;
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            if !faulted {
                faulted = true;
                tokio::task::block_in_place(|| fault(broker));
            }
            handled += batch.len();
            seen.extend(batch.iter().map(n_of));
            if seen.len() == RECORDS {
                handle.shutdown();
            }
            Ok::<_, Error>(())
        }),
    )
    .await
    .expect("the consumer recovers by itself and stops cleanly");
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
        "embedded faults, {what}: {RECORDS} records on {PARTITIONS} partitions, 3 brokers; lost 0; duplicates {}; commit failures retried {}",
        handled - seen.len(),
        stats.commit_failures
    ));
    stats
}

fn errors(broker: &EmbeddedBroker, api: RDKafkaApiKey, errors: &[RDKafkaRespErr]) {
    broker.request_errors(api, errors).expect("errors injected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_errors() {
    let broker = cluster();
    consume_through(&broker, "Fetch errors (not leader, timed out)", |b| {
        errors(
            b,
            RDKafkaApiKey::Fetch,
            &[
                RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            ],
        )
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offset_commit_errors_are_retried_not_ignored() {
    let broker = cluster();
    let stats = consume_through(
        &broker,
        "OffsetCommit errors (timed out, refused twice)",
        |b| {
            errors(
                b,
                RDKafkaApiKey::OffsetCommit,
                // librdkafka retries the first by itself; the others it
                // returns, and kafka-batch retries them.
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
        stats.commit_failures >= 1,
        "the refused commits were seen and retried: {stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_errors() {
    let broker = cluster();
    consume_through(
        &broker,
        "Heartbeat errors (not coordinator, rebalance in progress)",
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
    let stats = consume_through(&broker, "JoinGroup and SyncGroup errors (coordinator not available, not coordinator, rebalance in progress)", |b| {
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
    })
    .await;
    assert!(stats.assigned >= PARTITIONS as u64, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_broker_of_three_down_and_back_up() {
    let broker = std::sync::Arc::new(cluster());
    produce_numbered(&broker, "jobs", 0..RECORDS).await;
    let settings = consumer_settings(&broker, "g", "jobs", 200, 200);
    let consumer = Consumer::new(&settings).expect("consumer");
    let handle = consumer.handle();
    let progress = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // The outage, driven from outside the handler.
    let outage = {
        let (broker, progress) = (broker.clone(), progress.clone());
        let seen = move || progress.load(std::sync::atomic::Ordering::Relaxed);
        async move {
            wait_until("a first batch", LIMIT, || seen() >= 200).await;
            let b = broker.clone();
            tokio::task::spawn_blocking(move || b.broker_down(2))
                .await
                .expect("joined")
                .expect("down");
            let before = seen();
            // Progress on the partitions the other brokers lead, or time passing.
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            wait_until("progress while a broker is down", LIMIT, || {
                seen() > before || std::time::Instant::now() > deadline
            })
            .await;
            tokio::task::spawn_blocking(move || broker.broker_up(2))
                .await
                .expect("joined")
                .expect("up");
        }
    };
    let mut seen = BTreeSet::new();
    let mut handled = 0;
    let run = consumer.process(async |batch: Vec<Message>| {
        handled += batch.len();
        seen.extend(batch.iter().map(n_of));
        progress.store(seen.len(), std::sync::atomic::Ordering::Relaxed);
        if seen.len() == RECORDS {
            handle.shutdown();
        }
        Ok::<_, Error>(())
    });
    let (result, ()) = within(LIMIT, async { tokio::join!(run, outage) }).await;
    result.expect("the consumer recovers by itself");
    assert_eq!(seen.len(), RECORDS);
    let committed = committed(&broker, "g", "jobs").await;
    assert_eq!(
        committed.values().sum::<i64>(),
        RECORDS as i64,
        "{committed:?}"
    );
    report(&format!(
        "embedded faults, broker 2 of 3 down then up mid-run: {RECORDS} records on {PARTITIONS} partitions; lost 0; duplicates {}",
        handled - seen.len()
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
    report("embedded faults, Produce errors (not leader, timed out): 500 of 500 delivery reports Written after librdkafka's retries; lost 0");

    // A refusal that does not pass: each record is accounted for, delivered
    // or named in the error.
    errors(
        &broker,
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 2],
    );
    match within(LIMIT, producer.produce_batch("jobs", &batch)).await {
        Ok(deliveries) => assert_eq!(deliveries.len(), batch.len()),
        Err(Error::Produce(e)) => {
            assert!(!e.failures.is_empty());
            assert_eq!(e.deliveries.len(), batch.len());
            let delivered = e.deliveries.iter().filter(|d| d.is_some()).count();
            assert_eq!(
                delivered + e.failures.len(),
                batch.len(),
                "every record accounted for"
            );
            report(&format!(
                "embedded faults, Produce refused (topic authorization failed): {delivered} delivered + {} named in the error = {} records, every one accounted for",
                e.failures.len(),
                batch.len()
            ));
        }
        Err(other) => panic!("a per-record produce error, got {other}"),
    }
}
