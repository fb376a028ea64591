//! Failure policies on the embedded broker: partial batch failures, retry in
//! place, the delayed retry topic, the dead-letter topic, skip, bad input
//! between good records, crashes with a retry pending, and replay.
//!
//! Every test checks the promise at its end: the committed offset of each
//! partition is never past a record that was not handled, skipped, or
//! written to the retry or dead-letter topic.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use common::*;
use kafka_batch::failure::{headers, FailureInfo};
use kafka_batch::replay::Replay;
use kafka_batch::settings::FailurePolicy::{self, *};
use kafka_batch::testing::{EmbeddedBroker, RawProduce};
use kafka_batch::{Consumer, ConsumerSettings, Error, Failures, Message};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde::Deserialize;
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

fn policies(
    broker: &EmbeddedBroker,
    group: &str,
    topic: &str,
    chain: &[FailurePolicy],
) -> ConsumerSettings {
    let mut s = consumer_settings(broker, group, topic, 100, 200);
    s.failure.policies = chain.to_vec();
    s.failure.retry.backoff_ms = 50;
    s.failure.retry.jitter = 0.0;
    s.failure.dead_letter.topic = format!("{topic}.dead");
    s.failure.retry_topic.topic = format!("{topic}.retry");
    s.failure.retry_topic.jitter = 0.0;
    s
}

/// Fails the messages whose id is in `poison`.
fn fail_ids(batch: &[Message], poison: &[&str]) -> Result<(), Failures> {
    let mut failed = Failures::new();
    for (i, m) in batch.iter().enumerate() {
        if poison.contains(&m.id.as_str()) {
            failed.add(i, format!("{} is poison", m.id));
        }
    }
    failed.into_result()
}

/// The (partition, offset) of every message.
fn offsets_of(batch: &[Message]) -> Vec<(i32, i64)> {
    batch
        .iter()
        .filter_map(|m| m.origin().map(|o| (o.partition, o.offset)))
        .collect()
}

/// The promise: every offset below each committed offset was dealt with.
fn assert_nothing_skipped_silently(
    committed: &BTreeMap<i32, i64>,
    dealt_with: &BTreeSet<(i32, i64)>,
) {
    for (partition, next) in committed {
        for offset in 0..*next {
            assert!(
                dealt_with.contains(&(*partition, offset)),
                "committed {partition}:{next} is past {partition}:{offset}, which nobody dealt with"
            );
        }
    }
}

fn read_all(broker: &EmbeddedBroker, topic: &str) -> Vec<kafka_batch::replay::DeadLetter> {
    tokio::task::block_in_place(|| Replay::new(broker.bootstrap_servers(), topic).read())
        .expect("topic read")
}

fn header<'a>(letter: &'a kafka_batch::replay::DeadLetter, name: &str) -> Option<&'a [u8]> {
    letter
        .headers
        .iter()
        .rev()
        .find(|(k, _)| k == name.as_bytes())
        .and_then(|(_, v)| v.as_deref())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_message_is_retried_in_place_then_dead_lettered_alone() {
    let broker = broker_with("orders", 1);
    broker.create_topic("orders.dead", 1).unwrap();
    produce_numbered(&broker, "orders", 0..10).await;
    let mut settings = policies(&broker, "g", "orders", &[Retry, DeadLetter]);
    settings.failure.retry.retries = 2;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let deliveries: Mutex<Vec<Vec<String>>> = Mutex::new(Vec::new());
    let handled = Mutex::new(BTreeSet::new());
    let run = consumer.process(async |batch: Vec<Message>| {
        let ids = batch.iter().map(|m| m.id.to_string()).collect();
        deliveries.lock().unwrap().push(ids);
        let result = fail_ids(&batch, &["m4"]);
        let mut handled = handled.lock().unwrap();
        for (m, at) in batch.iter().zip(offsets_of(&batch)) {
            if m.id != "m4" {
                handled.insert(at);
            }
        }
        result
    });
    let stopper = async {
        wait_until("m4 was dead-lettered", LIMIT, || {
            handle.stats().dead_lettered == 1
        })
        .await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, stopper) }).await;
    result.expect("process returns Ok after shutdown");
    let deliveries = deliveries.lock().unwrap().clone();
    let mut handled = handled.lock().unwrap().clone();

    let ids: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    assert_eq!(
        deliveries,
        vec![ids, vec!["m4".to_string()], vec!["m4".to_string()]],
        "m4 was delivered 3 times (2 retries), in order, alone; the messages handled with it were not delivered again"
    );
    let stats = handle.stats();
    assert_eq!((stats.retries, stats.dead_lettered), (2, 1));

    let dead = read_all(&broker, "orders.dead");
    assert_eq!(dead.len(), 1, "only the poison message is dead-lettered");
    let letter = &dead[0];
    let original = &read_all(&broker, "orders")[4];
    assert_eq!(letter.key, original.key, "key unchanged");
    assert_eq!(letter.value, original.value, "value bytes unchanged");
    let text = |name| String::from_utf8(header(letter, name).expect(name).to_vec()).unwrap();
    assert_eq!(text(headers::SOURCE_TOPIC), "orders");
    assert_eq!(text(headers::SOURCE_PARTITION), "0");
    assert_eq!(text(headers::SOURCE_OFFSET), "4");
    assert_eq!(text(headers::GROUP), "g");
    assert_eq!(text(headers::SERVICE), "test-consumer");
    assert_eq!(text(headers::ATTEMPTS), "3");
    assert_eq!(text(headers::REASON), "handler");
    assert_eq!(text(headers::ERROR), "m4 is poison");
    assert!(kafka_batch::envelope::parse_dt(&text(headers::FAILED_AT)).is_ok());
    assert_eq!(letter.info.source(), Some(("orders", 0, 4)));

    handled.insert((0, 4)); // dead-lettered, confirmed
    let committed = committed(&broker, "g", "orders").await;
    assert_eq!(committed, BTreeMap::from([(0, 10)]));
    assert_nothing_skipped_silently(&committed, &handled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_ending_in_retry_stops_and_commits_up_to_the_failed_message() {
    let broker = broker_with("orders", 1);
    produce_numbered(&broker, "orders", 0..10).await;
    let mut settings = policies(&broker, "g", "orders", &[Retry]);
    settings.failure.retry.retries = 1;
    let consumer = Consumer::new(&settings).unwrap();
    let m4_deliveries = AtomicUsize::new(0);
    let result = within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            m4_deliveries.fetch_add(
                batch.iter().filter(|m| m.id == "m4").count(),
                Ordering::SeqCst,
            );
            fail_ids(&batch, &["m4"])
        }),
    )
    .await;
    let Err(Error::Handler { source, .. }) = result else {
        panic!("the chain ends with fail: process returns the handler's error, got {result:?}");
    };
    assert!(source.to_string().contains("m4 is poison"), "{source}");
    assert_eq!(
        m4_deliveries.into_inner(),
        2,
        "delivered, retried once, then fail"
    );
    assert_eq!(
        committed(&broker, "g", "orders").await,
        BTreeMap::from([(0, 4)]),
        "committed exactly up to the failed message"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_default_policy_a_partial_failure_commits_nothing_of_the_batch() {
    let broker = broker_with("orders", 1);
    produce_numbered(&broker, "orders", 0..10).await;
    let settings = consumer_settings(&broker, "g", "orders", 100, 200);
    let consumer = Consumer::new(&settings).unwrap();
    let result = within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| fail_ids(&batch, &["m4"])),
    )
    .await;
    assert!(matches!(result, Err(Error::Handler { .. })), "{result:?}");
    assert_eq!(committed(&broker, "g", "orders").await, BTreeMap::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_commits_past_the_failed_message_and_counts_it() {
    let broker = broker_with("orders", 2);
    produce_numbered(&broker, "orders", 0..20).await;
    let settings = policies(&broker, "g", "orders", &[Skip]);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let seen = Mutex::new(BTreeSet::new());
    let dealt_with = Mutex::new(BTreeSet::new());
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            let seen = {
                let mut seen = seen.lock().unwrap();
                seen.extend(batch.iter().map(|m| m.id.to_string()));
                seen.len()
            };
            dealt_with.lock().unwrap().extend(offsets_of(&batch));
            if seen == 20 {
                handle.shutdown();
            }
            // Fail two messages by id: the rest of the batch is handled.
            let mut failed = Failures::new();
            for id in ["m3", "m12"] {
                if batch.iter().any(|m| m.id == id) {
                    failed.add_id(id, "bad data");
                }
            }
            failed.into_result()
        }),
    )
    .await
    .unwrap();
    let dealt_with = dealt_with.lock().unwrap().clone();
    assert_eq!(handle.stats().failed_skipped, 2);
    let committed = committed(&broker, "g", "orders").await;
    assert_eq!(committed.values().sum::<i64>(), 20, "{committed:?}");
    assert_nothing_skipped_silently(&committed, &dealt_with);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_retry_succeeds_on_its_third_attempt_while_its_partition_flows() {
    let broker = broker_with("jobs", 1);
    broker.create_topic("jobs.retry", 1).unwrap();
    broker.create_topic("jobs.dead", 1).unwrap();
    produce_numbered(&broker, "jobs", 0..10).await;
    let mut settings = policies(&broker, "g", "jobs", &[RetryTopic, DeadLetter]);
    // Two retries, each due 3 s after its failure: a window of at least 6 s
    // for the main partition to show it keeps flowing.
    settings.failure.retry_topic.retries = 3;
    settings.failure.retry_topic.backoff_ms = 3000;
    settings.failure.retry_topic.backoff_multiplier = 1.0;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let m2_attempts = AtomicUsize::new(0);
    let handled: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let later_produced = AtomicBool::new(false);
    let run = consumer.process(async |batch: Vec<Message>| {
        let mut failed = Failures::new();
        for (i, m) in batch.iter().enumerate() {
            if m.id == "m2" {
                let m2_attempts = m2_attempts.fetch_add(1, Ordering::SeqCst) + 1;
                if m2_attempts < 3 {
                    failed.add(i, format!("attempt {m2_attempts} failed"));
                    continue;
                }
            }
            handled.lock().unwrap().push(m.id.to_string());
        }
        let m2_attempts = m2_attempts.load(Ordering::SeqCst);
        if m2_attempts == 1 && !later_produced.swap(true, Ordering::SeqCst) {
            // Records arriving on the main partition while m2 waits.
            produce_numbered(&broker, "jobs", 10..20).await;
        }
        if m2_attempts == 3 {
            handle.shutdown();
        }
        failed.into_result()
    });
    within(LIMIT, run).await.unwrap();
    let handled = handled.lock().unwrap().clone();

    let m2_at = handled
        .iter()
        .position(|id| id == "m2")
        .expect("m2 was handled");
    let later: BTreeSet<&str> = handled[..m2_at].iter().map(String::as_str).collect();
    for i in 10..20 {
        assert!(
            later.contains(format!("m{i}").as_str()),
            "m{i}, produced after m2 failed, was handled before m2's third attempt: {handled:?}"
        );
    }
    assert_eq!(handled.len(), 20, "each message handled once: {handled:?}");
    assert_eq!(handle.stats().retry_topic, 2);
    assert_eq!(handle.stats().dead_lettered, 0);

    let retries = read_all(&broker, "jobs.retry");
    assert_eq!(retries.len(), 2);
    type Standing<'a> = (u32, u32, Option<(&'a str, i32, i64)>);
    let info: Vec<Standing<'_>> = retries
        .iter()
        .map(|r| (r.info.attempts, r.info.retries, r.info.source()))
        .collect();
    assert_eq!(
        info,
        [(1, 1, Some(("jobs", 0, 2))), (2, 2, Some(("jobs", 0, 2)))],
        "attempts, retries and the first source, on each retry record"
    );
    assert!(retries.iter().all(|r| r.info.due_ms.is_some()));
    assert_eq!(
        committed(&broker, "g", "jobs").await,
        BTreeMap::from([(0, 20)])
    );
    assert_eq!(
        committed(&broker, "g", "jobs.retry").await,
        BTreeMap::from([(0, 2)])
    );
}

/// Runs a consumer that fails `m2` until `condition` holds, then drops it
/// without shutting it down (a crash).
async fn crash_with_m2_pending(
    settings: &ConsumerSettings,
    pending: impl Fn(&kafka_batch::ConsumerStats) -> bool,
) {
    let consumer = Consumer::new(settings).unwrap();
    let handle = consumer.handle();
    let run = consumer.process(async |batch: Vec<Message>| fail_ids(&batch, &["m2"]));
    tokio::select! {
        result = run => panic!("the consumer stopped by itself: {result:?}"),
        () = wait_until("a retry of m2 is pending", LIMIT, || pending(&handle.stats())) => {}
    }
}

/// Runs a consumer that handles everything until it saw `m2`.
async fn recover(settings: &ConsumerSettings) -> BTreeSet<String> {
    let consumer = Consumer::new(settings).unwrap();
    let handle = consumer.handle();
    let seen = Mutex::new(BTreeSet::new());
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            let saw_m2 = {
                let mut seen = seen.lock().unwrap();
                seen.extend(batch.iter().map(|m| m.id.to_string()));
                seen.contains("m2")
            };
            if saw_m2 {
                handle.shutdown();
            }
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    let seen = seen.lock().unwrap().clone();
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_a_retry_waits_in_place_loses_nothing() {
    let broker = broker_with("orders", 1);
    produce_numbered(&broker, "orders", 0..10).await;
    let mut settings = policies(&broker, "g", "orders", &[Retry, DeadLetter]);
    settings.failure.retry.backoff_ms = 60_000;
    settings.failure.retry.max_backoff_ms = 60_000;
    crash_with_m2_pending(&settings, |s| s.retries == 1).await;
    assert!(
        committed(&broker, "g", "orders").await.get(&0) <= Some(&2),
        "nothing committed past m2 while its retry waits"
    );
    let seen = recover(&settings).await;
    assert!(
        seen.contains("m2"),
        "the next consumer handles m2: {seen:?}"
    );
    assert_eq!(
        committed(&broker, "g", "orders").await,
        BTreeMap::from([(0, 10)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_while_a_retry_waits_in_the_retry_topic_loses_nothing() {
    let broker = broker_with("orders", 1);
    broker.create_topic("orders.retry", 1).unwrap();
    produce_numbered(&broker, "orders", 0..10).await;
    let mut settings = policies(&broker, "g", "orders", &[RetryTopic, DeadLetter]);
    settings.failure.retry_topic.backoff_ms = 1000;
    crash_with_m2_pending(&settings, |s| s.retry_topic == 1).await;
    let seen = recover(&settings).await;
    assert!(
        seen.contains("m2"),
        "m2 comes back from the retry topic: {seen:?}"
    );
    assert_eq!(
        committed(&broker, "g", "orders").await,
        BTreeMap::from([(0, 10)])
    );
    assert_eq!(
        committed(&broker, "g", "orders.retry").await,
        BTreeMap::from([(0, 1)])
    );
}

#[derive(Debug, Deserialize)]
struct Event {
    #[allow(dead_code)]
    n: u64,
}

/// Good records with every kind of bad one between them, on partition 0.
fn produce_garbage_between_good_records(broker: &EmbeddedBroker, topic: &str) {
    let good = |n: u64| format!(r#"{{"item": {{"n": {n}}}, "hist": null}}"#).into_bytes();
    let (g0, g6, g8) = (good(0), good(6), good(8));
    let wrong_type = br#"{"item": {"n": "not a number"}}"#;
    broker
        .produce_raw(
            topic,
            &[
                (0, Some(b"m0"), Some(&g0)),
                (0, None, Some(&g0)),                   // 1: null key
                (0, Some(b"\xff\xfe"), Some(&g0)),      // 2: key not UTF-8
                (0, Some(b"m3"), Some(b"\x00garbage")), // 3: not JSON
                (0, Some(b"m4"), Some(b"[1, 2, 3]")),   // 4: not an envelope
                (0, Some(b"m5"), Some(wrong_type)),     // 5: payload of the wrong type
            ],
        )
        .unwrap();
    let odd_headers: &[(&[u8], Option<&[u8]>)] = &[
        (b"\xff\xfe not utf-8", Some(b"\x00\x01")),
        (b"empty", None),
        (headers::DUE_MS.as_bytes(), Some(b"not a time")),
    ];
    broker
        .produce_with_headers(topic, (0, Some(b"m6"), Some(&g6)), odd_headers)
        .unwrap();
    broker
        .produce_with_headers(topic, (0, Some(b"m7"), Some(b"{\"item\": ")), odd_headers) // 7: truncated JSON
        .unwrap();
    broker
        .produce_raw(topic, &[(0, Some(b"m8"), Some(&g8))])
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_between_good_ones_are_dead_lettered_unchanged_and_replayable() {
    let broker = broker_with("events", 1);
    broker.create_topic("events.dead", 1).unwrap();
    produce_garbage_between_good_records(&broker, "events");
    let settings = policies(&broker, "g", "events", &[Retry, DeadLetter]);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let handled: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let dealt_with = Mutex::new(BTreeSet::new());
    let run = consumer.process(async |batch: Vec<Message<Event>>| {
        handled
            .lock()
            .unwrap()
            .extend(batch.iter().map(|m| m.id.to_string()));
        dealt_with.lock().unwrap().extend(
            batch
                .iter()
                .filter_map(|m| m.origin().map(|o| (o.partition, o.offset))),
        );
        Ok::<_, Error>(())
    });
    let stopper = async {
        wait_until("every record dealt with", LIMIT, || {
            let s = handle.stats();
            s.messages == 3 && s.dead_lettered == 6
        })
        .await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, stopper) }).await;
    result.unwrap();
    let handled = handled.lock().unwrap().clone();
    let mut dealt_with = dealt_with.lock().unwrap().clone();
    assert_eq!(
        handled,
        ["m0", "m6", "m8"],
        "only good records reach the handler"
    );
    assert_eq!(handle.stats().decode_errors, 6);
    assert_eq!(
        handle.stats().retries,
        0,
        "undecodable records are not retried"
    );

    let originals = read_all(&broker, "events");
    let dead = read_all(&broker, "events.dead");
    let reasons: Vec<(i64, &str)> = dead
        .iter()
        .map(|d| {
            (
                d.info.source_offset.unwrap(),
                d.info.reason.as_deref().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        reasons,
        [
            (1, "null_key"),
            (2, "key_not_utf8"),
            (3, "not_json"),
            (4, "not_envelope"),
            (5, "payload_type"),
            (7, "not_json")
        ]
    );
    for letter in &dead {
        let offset = letter.info.source_offset.unwrap();
        let original = &originals[offset as usize];
        assert_eq!(
            (&letter.key, &letter.value),
            (&original.key, &original.value)
        );
        assert!(
            letter
                .info
                .error
                .as_deref()
                .unwrap()
                .contains(&format!("events:0:{offset}")),
            "the error names where: {:?}",
            letter.info.error
        );
        assert_eq!(letter.info.attempts, 0, "never handed to the handler");
        dealt_with.insert((0, offset));
    }
    assert!(
        dead[5]
            .headers
            .iter()
            .any(|(k, v)| k.as_slice() == b"\xff\xfe not utf-8"
                && v.as_deref() == Some(&b"\x00\x01"[..])),
        "the record's own headers are kept byte for byte: {:?}",
        dead[5].headers
    );
    let committed = committed(&broker, "g", "events").await;
    assert_eq!(committed, BTreeMap::from([(0, 9)]));
    assert_nothing_skipped_silently(&committed, &dealt_with);

    // An operator replays the dead letters to where they came from.
    let report = Replay::new(broker.bootstrap_servers(), "events.dead")
        .run()
        .await
        .unwrap();
    assert_eq!(report.replayed, 6);
    assert_eq!(report.by_topic, BTreeMap::from([("events".to_string(), 6)]));
    assert_eq!(report.next_offsets, BTreeMap::from([(0, 6)]));
    let replayed = &read_all(&broker, "events")[9..];
    for (copy, letter) in replayed.iter().zip(&dead) {
        assert_eq!((&copy.key, &copy.value), (&letter.key, &letter.value));
        assert!(
            copy.headers
                .iter()
                .all(|(k, _)| !k.starts_with(headers::PREFIX.as_bytes())),
            "failure headers stripped: {:?}",
            copy.headers
        );
    }
    assert_eq!(
        replayed[5].headers,
        dead[5]
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(headers::PREFIX.as_bytes()))
            .cloned()
            .collect::<Vec<_>>()
    );
    assert_eq!(
        FailureInfo::from_headers(
            replayed[5]
                .headers
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_deref()))
        )
        .source(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_records_between_good_ones_are_skipped_with_skip() {
    let broker = broker_with("events", 1);
    produce_garbage_between_good_records(&broker, "events");
    let settings = policies(&broker, "g", "events", &[Skip]);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let handled: Mutex<Vec<String>> = Mutex::new(Vec::new());
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message<Event>>| {
            let handled = {
                let mut handled = handled.lock().unwrap();
                handled.extend(batch.iter().map(|m| m.id.to_string()));
                handled.len()
            };
            if handled == 3 {
                handle.shutdown();
            }
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    assert_eq!(*handled.lock().unwrap(), ["m0", "m6", "m8"]);
    assert_eq!(handle.stats().failed_skipped, 6);
    assert_eq!(
        committed(&broker, "g", "events").await,
        BTreeMap::from([(0, 9)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_batch_error_sends_each_message_through_the_chain() {
    let broker = broker_with("orders", 1);
    broker.create_topic("orders.dead", 1).unwrap();
    produce_numbered(&broker, "orders", 0..5).await;
    let settings = policies(&broker, "g", "orders", &[DeadLetter]);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let run = consumer.process(async |_batch: Vec<Message<Value>>| {
        Err::<(), _>(std::io::Error::other("downstream is down"))
    });
    let stopper = async {
        wait_until("all dead-lettered", LIMIT, || {
            handle.stats().dead_lettered == 5
        })
        .await;
        handle.shutdown();
    };
    let (result, ()) = within(LIMIT, async { tokio::join!(run, stopper) }).await;
    result.unwrap();
    let dead = read_all(&broker, "orders.dead");
    let offsets: Vec<Option<i64>> = dead.iter().map(|d| d.info.source_offset).collect();
    assert_eq!(offsets, [Some(0), Some(1), Some(2), Some(3), Some(4)]);
    assert!(dead
        .iter()
        .all(|d| d.info.error.as_deref() == Some("downstream is down")));
    assert_eq!(
        committed(&broker, "g", "orders").await,
        BTreeMap::from([(0, 5)])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_topic_that_cannot_be_written_stops_the_consumer_before_committing() {
    let broker = broker_with("orders", 1);
    broker.create_topic("orders.dead", 1).unwrap();
    produce_numbered(&broker, "orders", 0..5).await;
    // The broker refuses the next writes for good (not a retriable error).
    broker
        .request_errors(
            RDKafkaApiKey::Produce,
            &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 10],
        )
        .unwrap();
    let settings = policies(&broker, "g", "orders", &[DeadLetter]);
    let consumer = Consumer::new(&settings).unwrap();
    let result = within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| fail_ids(&batch, &["m2"])),
    )
    .await;
    assert!(
        matches!(result, Err(Error::FailureTopic(ref e)) if e.topic == "orders.dead"),
        "{result:?}"
    );
    assert_eq!(
        committed(&broker, "g", "orders").await,
        BTreeMap::from([(0, 2)]),
        "committed up to the record that could not be dead-lettered, not past it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_wait_longer_than_max_poll_interval_keeps_the_group_and_the_other_partitions_flowing(
) {
    let broker = broker_with("orders", 2);
    broker.create_topic("orders.dead", 1).unwrap();
    // m0..m9 on partition 0 (produce_numbered spreads by key: put them by hand).
    let good = |n: usize| format!(r#"{{"item": {{"n": {n}}}}}"#).into_bytes();
    let values: Vec<Vec<u8>> = (0..10).map(good).collect();
    let keys: Vec<String> = (0..10).map(|i| format!("m{i}")).collect();
    let records: Vec<RawProduce<'_>> = (0..10)
        .map(|i| (0, Some(keys[i].as_bytes()), Some(values[i].as_slice())))
        .collect();
    broker.produce_raw("orders", &records).unwrap();

    let mut settings = policies(&broker, "g", "orders", &[Retry, DeadLetter]);
    settings.failure.retry.retries = 1;
    settings.failure.retry.backoff_ms = 4000;
    settings.failure.retry.max_backoff_ms = 4000;
    settings.kafka.set("max.poll.interval.ms", "3000");
    settings.kafka.set("session.timeout.ms", "3000");
    settings.kafka.set("heartbeat.interval.ms", "500");
    settings.revoke_timeout_ms = 1000;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let seen: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let produced_later = AtomicBool::new(false);
    let run = consumer.process(async |batch: Vec<Message>| {
        seen.lock()
            .unwrap()
            .extend(batch.iter().map(|m| m.id.to_string()));
        if !produced_later.swap(true, Ordering::SeqCst) {
            // While m4 waits 4 s on partition 0, partition 1 gets records.
            let late: Vec<RawProduce<'_>> = vec![
                (1, Some(b"late-1"), Some(br#"{"item": 1}"#)),
                (1, Some(b"late-2"), Some(br#"{"item": 2}"#)),
            ];
            tokio::task::block_in_place(|| broker.produce_raw("orders", &late)).unwrap();
        }
        fail_ids(&batch, &["m4"])
    });
    let stopper = async {
        wait_until("m4 dead-lettered", LIMIT, || {
            handle.stats().dead_lettered == 1
        })
        .await;
        let before_shutdown = handle.stats();
        handle.shutdown();
        before_shutdown
    };
    let (result, stats) = within(LIMIT, async { tokio::join!(run, stopper) }).await;
    result.unwrap();
    let seen = seen.lock().unwrap().clone();

    let retry_at = seen.iter().rposition(|id| id == "m4").unwrap();
    assert_eq!(seen.iter().filter(|id| *id == "m4").count(), 2, "{seen:?}");
    for late in ["late-1", "late-2"] {
        let at = seen
            .iter()
            .position(|id| id == late)
            .expect("the other partition was read");
        assert!(
            at < retry_at,
            "{late} was handled while m4 waited: {seen:?}"
        );
    }

    assert_eq!(
        (stats.assigned, stats.revoked),
        (2, 0),
        "the 4 s wait, longer than max.poll.interval.ms, cost no rebalance"
    );
    assert_eq!(
        committed(&broker, "g", "orders").await,
        BTreeMap::from([(0, 10), (1, 2)])
    );
}
