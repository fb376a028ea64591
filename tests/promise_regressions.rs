//! Regression tests for the places where the promise broke (issue 12's
//! findings), each on the embedded broker and each failing without its fix.
//! The randomized checker (tests/promise.rs) explores around them; these
//! pin each one down.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use kafka_batch::consumer::HandlerTimeout;
use kafka_batch::failure::headers;
use kafka_batch::settings::FailurePolicy::{self, *};
use kafka_batch::settings::OnGap;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{Consumer, ConsumerSettings, Error, Failures, Message};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer as _};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

fn chain(broker: &EmbeddedBroker, topic: &str, policies: &[FailurePolicy]) -> ConsumerSettings {
    let mut s = consumer_settings(broker, "g", topic, 100, 200);
    s.failure.policies = policies.to_vec();
    s.failure.retry.backoff_ms = 50;
    s.failure.retry.jitter = 0.0;
    s.failure.retry_topic.topic = format!("{topic}.retry");
    s.failure.retry_topic.jitter = 0.0;
    s.failure.dead_letter.topic = format!("{topic}.dead");
    s
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_millis() as i64
}

/// Commits `offset` for `group` on partition 0 of `topic` from outside the
/// group, as an operator's tool would (the group has no members yet).
fn commit_for_group(broker: &EmbeddedBroker, group: &str, topic: &str, offset: i64) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("group.id", group)
        .create()
        .expect("client");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .expect("offset");
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("committed from outside the group");
}

/// Waits until `group` has committed `offset` on partition 0 of `topic`.
async fn wait_for_commit(broker: &EmbeddedBroker, group: &str, topic: &str, offset: i64) {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let committed = committed(broker, group, topic).await;
        if committed.get(&0) == Some(&offset) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {group} to commit {topic}[0] at {offset}: {committed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Finding 1. Records of the retry topic found not yet due back to back
/// (the poller takes its bookkeeping once every 32 records) must each be
/// read again: the partition rewinds to the earliest of them. Before the
/// fix each queued its own seek, the last one won, and the earlier records
/// were committed past without being handled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_records_found_not_due_back_to_back_are_all_handled_when_due() {
    const RECORDS: usize = 100;
    let broker = broker_with("jobs", 1);
    broker.create_topic("jobs.retry", 1).unwrap();
    broker.create_topic("jobs.dead", 1).unwrap();
    // Written as the library writes a first retry: m0 due already, the
    // others in 1.5 s. The consumer polls them in one fetch, well before
    // then; after the first record of a burst the poller takes its
    // bookkeeping only once every 32 records, so m1 to m31 are all found
    // not due before any seek is made.
    let due = unix_ms() + 1500;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    for i in 0..RECORDS {
        let key = format!("m{i}");
        let value = format!(r#"{{"item": {{"n": {i}}}}}"#);
        let due_text = if i == 0 { 0 } else { due }.to_string();
        let header_values = [
            (headers::ATTEMPTS, "1"),
            (headers::RETRIES, "1"),
            (headers::DUE_MS, due_text.as_str()),
        ];
        let mut record_headers = OwnedHeaders::new();
        for (name, value) in header_values {
            record_headers = record_headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        producer
            .send(
                BaseRecord::to("jobs.retry")
                    .partition(0)
                    .key(&key)
                    .payload(&value)
                    .headers(record_headers),
            )
            .map_err(|(e, _)| e)
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();

    let settings = chain(&broker, "jobs", &[RetryTopic, DeadLetter]);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let handled: Arc<Mutex<Vec<(usize, i64)>>> = Arc::default();
    let seen = handled.clone();
    let run = tokio::spawn(consumer.process(async move |batch: Vec<Message>| {
        let now = unix_ms();
        seen.lock()
            .unwrap()
            .extend(batch.iter().map(|m| (n_of(m), now)));
        Ok::<_, Error>(())
    }));
    wait_for_commit(&broker, "g", "jobs.retry", RECORDS as i64).await;
    handle.shutdown();
    within(LIMIT, run).await.unwrap().unwrap();

    let handled = handled.lock().unwrap().clone();
    let ids: BTreeSet<usize> = handled.iter().map(|(n, _)| *n).collect();
    let lost: Vec<usize> = (0..RECORDS).filter(|n| !ids.contains(n)).collect();
    assert!(
        lost.is_empty(),
        "the retry topic was committed to its end, but these were never handled: {lost:?}"
    );
    // "A few milliseconds early is due" (runner::until_due): 5 ms.
    let early: Vec<&(usize, i64)> = handled
        .iter()
        .filter(|(n, at)| *n > 0 && *at < due - 5)
        .collect();
    assert!(early.is_empty(), "handled before they were due: {early:?}");
}

/// Finding 2, `process`: a panic in the handler stops the consumer like
/// `fail`: batches handled before are committed, the panicked one is not,
/// the group is left, and `process` says the handler panicked. The next
/// consumer of the group starts exactly at the panicked batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_panic_stops_the_consumer_with_nothing_of_its_batch_committed() {
    let broker = broker_with("events", 1);
    produce_numbered(&broker, "events", 0..30).await;
    // `skip` would commit past a failed batch: a panic must never go there.
    let settings = {
        let mut s = chain(&broker, "events", &[Retry, Skip]);
        s.batch_size = 10;
        s
    };
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let calls = AtomicUsize::new(0);
    let result = within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            calls.fetch_add(1, Ordering::SeqCst);
            if batch.iter().any(|m| n_of(m) == 15) {
                panic!("the handler's own bug");
            }
            Ok::<_, Error>(())
        }),
    )
    .await;
    match result {
        Err(Error::HandlerPanicked { batch, message }) => {
            assert_eq!(batch, "events[0=10:20]");
            assert_eq!(message, "the handler's own bug");
        }
        other => panic!("process must say the handler panicked, got {other:?}"),
    }
    assert_eq!(calls.into_inner(), 2, "no retry of a panicked batch");
    assert_eq!(handle.stats().handler_panics, 1);
    assert_eq!(handle.stats().failed_skipped, 0);
    assert_eq!(
        committed(&broker, "g", "events").await,
        BTreeMap::from([(0, 10)])
    );
    // The group was left: the next consumer gets the partition at once and
    // starts at the panicked batch.
    let batches = collect_batches(&settings, 20).await;
    assert_eq!(n_of(&batches[0][0]), 10);
}

/// Finding 2, `process_blocking`: a panic in a blocking handler was a
/// `JoinError`, an ordinary error, so `skip` committed past a batch that
/// was never handled. Now both modes agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_handler_panic_is_never_skipped() {
    let broker = broker_with("events", 1);
    produce_numbered(&broker, "events", 0..40).await;
    let settings = {
        let mut s = chain(&broker, "events", &[Skip]);
        s.batch_size = 10;
        s
    };
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let result = within(
        LIMIT,
        consumer.process_blocking(|batch: Vec<Message>| {
            if batch.iter().any(|m| n_of(m) == 25) {
                panic!("blocking bug");
            }
            Ok::<_, Error>(())
        }),
    )
    .await;
    assert!(
        matches!(&result, Err(Error::HandlerPanicked { message, .. }) if message == "blocking bug"),
        "{result:?}"
    );
    assert_eq!(handle.stats().failed_skipped, 0);
    assert_eq!(
        committed(&broker, "g", "events").await,
        BTreeMap::from([(0, 20)])
    );
}

/// Finding 3. A manual commit goes through the tracker: committing
/// messages 0 and 9 of a batch whose 1 to 8 then fail commits 1, not 10.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_commit_never_commits_past_a_message_not_dealt_with() {
    let broker = broker_with("manual", 1);
    produce_numbered(&broker, "manual", 0..10).await;
    let mut settings = consumer_settings(&broker, "g", "manual", 10, 300);
    settings.commit = false;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let result = within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            handle
                .commit_messages(&[batch[0].clone(), batch[9].clone()])
                .await
                .map_err(|e| Box::new(e) as kafka_batch::BoxError)?;
            let mut failed = Failures::new();
            for i in 1..9 {
                failed.add(i, "not dealt with");
            }
            failed
                .into_result()
                .map_err(|f| Box::new(f) as kafka_batch::BoxError)
        }),
    )
    .await;
    assert!(matches!(result, Err(Error::Handler { .. })), "{result:?}");
    assert_eq!(
        committed(&broker, "g", "manual").await,
        BTreeMap::from([(0, 1)]),
        "only the contiguous run of settled records"
    );
    // The next consumer reads from 1: nothing lost.
    let mut again = consumer_settings(&broker, "g", "manual", 10, 300);
    again.commit = true;
    let batches = collect_batches(&again, 9).await;
    let read: Vec<usize> = batches.iter().flatten().map(n_of).collect();
    assert_eq!(read, (1..10).collect::<Vec<_>>());
}

/// Finding 3. A raw-offset commit settles what was handed out before it,
/// and never commits past a record not handed out yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manual_commit_of_an_offset_stops_at_what_was_handed_out() {
    let broker = broker_with("manual", 1);
    produce_numbered(&broker, "manual", 0..10).await;
    let mut settings = consumer_settings(&broker, "g", "manual", 5, 300);
    settings.commit = false;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    within(
        LIMIT,
        consumer.process(async |_batch: Vec<Message>| {
            // Inside the first batch (0..5): "everything up to 1000 is done".
            handle.commit([("manual", 0, 1000)]).await?;
            handle.shutdown();
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        committed(&broker, "g", "manual").await,
        BTreeMap::from([(0, 5)])
    );
}

/// Finding 3. With `commit = true` the consumer commits by itself and
/// refuses manual commits, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_commits_are_refused_when_the_consumer_commits_itself() {
    let broker = broker_with("auto", 1);
    produce_numbered(&broker, "auto", 0..5).await;
    let settings = consumer_settings(&broker, "g", "auto", 5, 300);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let refusals = Mutex::new(Vec::new());
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            // Awaited before the lock is taken: no guard is held across an await.
            let refusal = handle.commit_messages(&batch).await;
            refusals.lock().unwrap().push(refusal);
            let refusal = handle.commit([("auto", 0, 5)]).await;
            refusals.lock().unwrap().push(refusal);
            handle.shutdown();
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    let refusals = std::mem::take(&mut *refusals.lock().unwrap());
    for refusal in refusals {
        let error = refusal.expect_err("refused");
        assert!(matches!(error, Error::ManualCommit), "{error}");
        assert!(error.to_string().contains("commit = false"), "{error}");
    }
}

/// Finding 4. A service stopped while its group rebalances (a rolling
/// deploy) gets its final commit refused with REBALANCE_IN_PROGRESS. That
/// is not a failure of the service: the consumer serves the rebalance and
/// `process` returns `Ok`. Before, five refusals made `process` fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_final_commit_refused_for_a_rebalance_still_stops_cleanly() {
    let broker = broker_with("events", 1);
    produce_numbered(&broker, "events", 0..10).await;
    let settings = consumer_settings(&broker, "g", "events", 10, 200);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let result = within(
        LIMIT,
        consumer.process(async |_: Vec<Message>| {
            // More refusals than the final commit's five attempts.
            tokio::task::block_in_place(|| {
                broker
                    .request_errors(
                        RDKafkaApiKey::OffsetCommit,
                        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REBALANCE_IN_PROGRESS; 8],
                    )
                    .unwrap()
            });
            handle.shutdown();
            Ok::<_, Error>(())
        }),
    )
    .await;
    assert!(result.is_ok(), "process stops cleanly: {result:?}");
    assert!(
        handle.stats().commit_failures >= 5,
        "the refusals were seen: {:?}",
        handle.stats()
    );
    let committed = committed(&broker, "g", "events").await;
    assert!(committed.get(&0).is_none_or(|c| *c <= 10), "{committed:?}");
}

/// Finding 7. A batch whose handler runs past `handler_timeout_ms` counts
/// as failed (its future is dropped) and goes through the chain: here it
/// is retried in place and then succeeds. With the default chain the
/// consumer stops with an error naming the timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_handler_times_out_and_its_batch_goes_through_the_chain() {
    let broker = broker_with("slow", 1);
    produce_numbered(&broker, "slow", 0..10).await;
    let mut settings = chain(&broker, "slow", &[Retry, DeadLetter]);
    settings.handler_timeout_ms = 300;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let calls = AtomicUsize::new(0);
    let handled = Mutex::new(Vec::new());
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            let calls = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if calls == 1 {
                std::future::pending::<()>().await;
            }
            let handled = {
                let mut handled = handled.lock().unwrap();
                handled.extend(batch.iter().map(n_of));
                handled.len()
            };
            if handled == 10 {
                handle.shutdown();
            }
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    assert_eq!(*handled.lock().unwrap(), (0..10).collect::<Vec<_>>());
    assert_eq!(handle.stats().handler_timeouts, 1);
    assert_eq!(handle.stats().retries, 10, "each message retried once");
    assert_eq!(handle.stats().dead_lettered, 0);
    assert_eq!(
        committed(&broker, "g", "slow").await,
        BTreeMap::from([(0, 10)])
    );

    let mut failing = consumer_settings(&broker, "g2", "slow", 10, 200);
    failing.handler_timeout_ms = 200;
    let result = within(
        LIMIT,
        Consumer::new(&failing)
            .unwrap()
            .process(async |_: Vec<Message>| {
                std::future::pending::<()>().await;
                Ok::<_, Error>(())
            }),
    )
    .await;
    let Err(Error::Handler { source, .. }) = result else {
        panic!("the default chain stops the consumer: {result:?}");
    };
    let timeout = source
        .downcast_ref::<HandlerTimeout>()
        .expect("the error names the timeout");
    assert_eq!(timeout.limit, Duration::from_millis(200));
    assert!(committed(&broker, "g2", "slow").await.is_empty());
}

/// Finding 8. The library's own retry topic is read from its beginning
/// when the group has no commit there, whatever `auto.offset.reset` says:
/// a record written there by a consumer that stopped before it was due is
/// handled by the next one. Before, `latest` jumped over it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_record_written_before_a_stop_is_handled_after_the_restart() {
    let broker = broker_with("jobs", 1);
    broker.create_topic("jobs.retry", 1).unwrap();
    broker.create_topic("jobs.dead", 1).unwrap();
    produce_numbered(&broker, "jobs", 0..10).await;
    // A group that starts the main topics at their end, as by default; it
    // committed the main topic at 0 before, so these ten are read.
    commit_for_group(&broker, "g", "jobs", 0);
    let mut settings = chain(&broker, "jobs", &[RetryTopic, DeadLetter]);
    settings.kafka.set("auto.offset.reset", "latest");
    settings.failure.retry_topic.backoff_ms = 1500;

    let first = Consumer::new(&settings).unwrap();
    let handle = first.handle();
    within(
        LIMIT,
        first.process(async |batch: Vec<Message>| {
            let mut failed = Failures::new();
            for (i, m) in batch.iter().enumerate() {
                if m.id == "m2" {
                    failed.add(i, "not yet");
                }
            }
            if batch.iter().any(|m| n_of(m) == 9) {
                // Stop before m2 is due: nothing of the retry topic is committed.
                handle.shutdown();
            }
            failed.into_result()
        }),
    )
    .await
    .unwrap();
    assert_eq!(handle.stats().retry_topic, 1);
    assert_eq!(
        committed(&broker, "g", "jobs").await,
        BTreeMap::from([(0, 10)])
    );
    assert!(committed(&broker, "g", "jobs.retry").await.is_empty());

    let second = Consumer::new(&settings).unwrap();
    let handle = second.handle();
    let handled: Mutex<Vec<String>> = Mutex::new(Vec::new());
    within(
        LIMIT,
        second.process(async |batch: Vec<Message>| {
            let saw_m2 = {
                let mut handled = handled.lock().unwrap();
                handled.extend(batch.iter().map(|m| m.id.to_string()));
                handled.iter().any(|id| id == "m2")
            };
            if saw_m2 {
                handle.shutdown();
            }
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    assert_eq!(*handled.lock().unwrap(), ["m2"]);
    assert_eq!(
        committed(&broker, "g", "jobs.retry").await,
        BTreeMap::from([(0, 1)])
    );
}

/// Produces `count` records of about 8 KiB to partition 0 of `topic`.
fn produce_large(broker: &EmbeddedBroker, topic: &str, count: usize) {
    let filler = "x".repeat(8 * 1024);
    let values: Vec<(String, String)> = (0..count)
        .map(|i| {
            (
                format!("m{i}"),
                format!(r#"{{"item": {{"n": {i}, "filler": "{filler}"}}}}"#),
            )
        })
        .collect();
    let records: Vec<kafka_batch::testing::RawProduce<'_>> = values
        .iter()
        .map(|(k, v)| (0, Some(k.as_bytes()), Some(v.as_bytes())))
        .collect();
    broker.produce_raw(topic, &records).unwrap();
}

/// Finding 9. A committed offset that retention deleted: librdkafka's
/// `auto.offset.reset` jumps past the gap. With `on_gap = "fail"` the
/// consumer stops before committing past it; with `warn` it reports the
/// gap and goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gap_after_retention_stops_the_consumer_with_on_gap_fail() {
    let broker = broker_with("events", 1);
    // The embedded broker keeps about 5 MiB per partition: 8 MiB pushes
    // the first records out.
    produce_large(&broker, "events", 1000);
    commit_for_group(&broker, "g", "events", 0);
    let mut settings = consumer_settings(&broker, "g", "events", 100, 200);
    settings.on_gap = OnGap::Fail;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let result = within(
        LIMIT,
        consumer.process(async |_: Vec<Message>| Ok::<_, Error>(())),
    )
    .await;
    let Err(Error::Gap {
        topic,
        partition,
        first,
        end,
    }) = result
    else {
        panic!("the gap stops the consumer: {result:?}");
    };
    assert_eq!((topic.as_str(), partition, first), ("events", 0, 0));
    assert!(end > 0, "the broker resumed past the deleted records");
    assert_eq!(handle.stats().offset_gaps, 1);
    assert_eq!(
        handle.stats().messages,
        0,
        "nothing past the gap handed out"
    );
    assert_eq!(
        committed(&broker, "g", "events").await,
        BTreeMap::from([(0, 0)]),
        "nothing committed past the gap"
    );

    settings.on_gap = OnGap::Warn;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let last = AtomicUsize::new(0);
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message<Value>>| {
            let now = batch
                .last()
                .map(n_of)
                .unwrap_or(last.load(Ordering::SeqCst));
            last.store(now, Ordering::SeqCst);
            if now == 999 {
                handle.shutdown();
            }
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    assert_eq!(handle.stats().offset_gaps, 1);
    assert_eq!(
        committed(&broker, "g", "events").await,
        BTreeMap::from([(0, 1000)])
    );
}
