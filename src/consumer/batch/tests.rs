//! Tests of batch cutting: limits, skipped records, bad records through the chain.
use super::*;
use serde_json::Value;

fn record<'a>(topic: &'a str, offset: i64, value: Option<&'a [u8]>) -> RawRecord<'a> {
    RawRecord {
        topic,
        partition: 0,
        offset,
        key: Some(b"k"),
        value,
    }
}

fn new() -> Seen {
    Seen::New(ChainState::default())
}

fn builder(topics: &[&str]) -> BatchBuilder<Value> {
    let mut settings = ConsumerSettings::new("b:9092", "g", topics);
    settings.batch_size = 2;
    BatchBuilder::new(&settings)
}

#[test]
fn records_of_unsubscribed_topics_are_skipped_but_their_offsets_are_kept() {
    let shared = Shared::for_tests();
    let mut b = builder(&["events"]);
    let envelope = br#"{"item": 1}"#;
    for (topic, offset) in [
        ("events", 10),
        ("stranger", 3),
        ("stranger", 4),
        ("events", 11),
    ] {
        b.push(
            record(topic, offset, Some(envelope)),
            new(),
            None,
            |_| Some(1),
            &shared,
        )
        .unwrap();
    }
    assert!(
        b.should_cut(Instant::now()),
        "two messages make a batch of two"
    );
    let batch = b.cut(Instant::now());
    assert_eq!(
        batch.messages.len(),
        2,
        "only the subscribed topic's messages"
    );
    assert_eq!(
        batch.batch_ref().to_string(),
        "events[0=10:12],stranger[0=3:5]"
    );
    assert_eq!(
        shared
            .stats
            .skipped
            .load(std::sync::atomic::Ordering::Relaxed),
        2
    );
}

#[test]
fn a_pattern_subscription_accepts_what_librdkafka_matched() {
    let sub = Subscription {
        topics: vec!["^events-.*".into()],
        any: true,
    };
    assert!(sub.accepts("events-eu"));
    let exact = Subscription {
        topics: vec!["events".into()],
        any: false,
    };
    assert!(exact.accepts("events") && !exact.accepts("events-eu"));
}

#[test]
fn a_record_of_an_unassigned_partition_is_dropped_unread() {
    let shared = Shared::for_tests();
    let mut b = builder(&["events"]);
    b.push(
        record("events", 1, Some(br#"{"item": 1}"#)),
        new(),
        None,
        |_| None,
        &shared,
    )
    .unwrap();
    assert!(
        !b.should_cut(Instant::now() + Duration::from_secs(60)),
        "nothing was added"
    );
}

#[test]
fn a_decode_error_adds_nothing_to_the_batch() {
    let shared = Shared::for_tests();
    let mut b = builder(&["events"]);
    let err = b
        .push(
            record("events", 7, Some(b"garbage")),
            new(),
            None,
            |_| Some(1),
            &shared,
        )
        .unwrap_err();
    assert_eq!((err.topic.as_str(), err.offset), ("events", 7));
    assert!(!b.should_cut(Instant::now() + Duration::from_secs(60)));
}

fn chain(policies: &[crate::settings::FailurePolicy]) -> Chain {
    let mut failure = crate::settings::FailureSettings {
        policies: policies.to_vec(),
        ..Default::default()
    };
    failure.dead_letter.topic = "dead".into();
    Chain::new(&failure)
}

#[test]
fn an_undecodable_record_follows_the_chain() {
    use crate::settings::FailurePolicy::*;
    let shared = Shared::for_tests();
    let garbage = record("events", 7, Some(b"garbage"));

    let mut skipping = builder(&["events"]).with_chain(&chain(&[Retry, Skip]));
    skipping
        .push(garbage, new(), None, |_| Some(1), &shared)
        .unwrap();
    let batch = skipping.cut(Instant::now());
    assert!(
        !batch.has_work(),
        "nothing for the handler or the dead-letter topic"
    );
    assert_eq!(
        batch.batch_ref().to_string(),
        "events[0=7:8]",
        "its offset counts"
    );

    let mut dead = builder(&["events"]).with_chain(&chain(&[Retry, DeadLetter]));
    dead.push(garbage, new(), None, |_| Some(1), &shared)
        .unwrap();
    let batch = dead.cut(Instant::now());
    assert!(batch.has_work() && batch.messages.is_empty());
    assert_eq!(batch.rejected.len(), 1);
    assert_eq!(batch.rejected[0].error.offset, 7);
}

#[test]
fn a_record_handled_before_a_rewind_counts_but_is_not_handed_over() {
    let shared = Shared::for_tests();
    let mut b = builder(&["events"]).with_chain(&chain(&[crate::settings::FailurePolicy::Retry]));
    let envelope = br#"{"item": 1}"#;
    b.push(
        record("events", 3, Some(envelope)),
        Seen::AlreadyHandled,
        None,
        |_| Some(1),
        &shared,
    )
    .unwrap();
    let retried = ChainState {
        step: 0,
        used: 1,
        attempts: 1,
    };
    b.push(
        record("events", 4, Some(envelope)),
        Seen::New(retried),
        None,
        |_| Some(1),
        &shared,
    )
    .unwrap();
    let batch = b.cut(Instant::now());
    assert_eq!(batch.messages.len(), 1);
    assert_eq!(batch.kept[0].offset, 4);
    assert_eq!(batch.kept[0].state, retried);
    assert_eq!(batch.batch_ref().to_string(), "events[0=3:5]");
}

#[test]
fn latest_only_keeps_what_the_policies_need_in_step() {
    let shared = Shared::for_tests();
    let mut settings = ConsumerSettings::new("b:9092", "g", &["events"]);
    settings.latest_only = true;
    let mut b: BatchBuilder<Value> =
        BatchBuilder::new(&settings).with_chain(&chain(&[crate::settings::FailurePolicy::Skip]));
    for (offset, key) in [(0, "a"), (1, "b"), (2, "a")] {
        let r = RawRecord {
            key: Some(key.as_bytes()),
            ..record("events", offset, Some(br#"{"item": 1}"#))
        };
        b.push(r, new(), None, |_| Some(1), &shared).unwrap();
    }
    let batch = b.cut(Instant::now());
    let ids: Vec<&str> = batch.messages.iter().map(|m| m.id.as_str()).collect();
    let kept: Vec<(&str, i64)> = batch
        .kept
        .iter()
        .map(|k| (k.id.as_str(), k.offset))
        .collect();
    assert_eq!(ids, ["b", "a"]);
    assert_eq!(kept, [("b", 1), ("a", 2)]);
}

#[test]
fn a_record_past_the_byte_limit_starts_the_next_batch_even_if_it_is_bad() {
    let shared = Shared::for_tests();
    let mut settings = ConsumerSettings::new("b:9092", "g", &["events"]);
    settings.max_batch_bytes = 30;
    let mut b: BatchBuilder<Value> = BatchBuilder::new(&settings);
    let good = record("events", 1, Some(br#"{"item": "twenty bytes"}"#));
    assert!(b.make_room(&good, Instant::now()).is_none());
    b.push(good, new(), None, |_| Some(1), &shared).unwrap();
    let bad = record("events", 2, Some(b"garbage, and over the limit"));
    let full = b
        .make_room(&bad, Instant::now())
        .expect("the batch is cut before the bad record");
    assert_eq!(full.messages.len(), 1);
    assert!(b.push(bad, new(), None, |_| Some(1), &shared).is_err());
}
