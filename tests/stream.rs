//! `Consumer::stream`: batches handed out as a stream, settled by the caller
//! (in any task) with `ack`, `fail` or `fail_some`, or failed by being
//! dropped; `retain` settles what it filters out; the stream ends after
//! `close` once the last commit is made.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use kafka_batch::consumer::Settled;
use kafka_batch::replay::Replay;
use kafka_batch::settings::FailurePolicy;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{Batch, Consumer, Error, Failures};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(60);

/// Waits until every partition of `topic` is committed to its end: the
/// commits add up to the `records` produced (offsets start at 0 and have no
/// holes here). Fails after `LIMIT` with what was committed.
async fn committed_to_end(broker: &EmbeddedBroker, group: &str, topic: &str, records: i64) {
    let deadline = std::time::Instant::now() + LIMIT;
    loop {
        let committed = committed(broker, group, topic).await;
        if committed.values().sum::<i64>() == records {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "every partition committed to its end ({records} records): {committed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Batches taken from the stream and acknowledged by other tasks, four in
/// the caller's hands at a time: every record arrives, and once the stream
/// is closed it ends only after the last commit, which is at the log end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_acknowledged_in_other_tasks_are_committed_and_the_stream_ends_after_close() {
    let broker = broker_with("events", 4);
    produce_numbered(&broker, "events", 0..2_000).await;
    let mut settings = consumer_settings(&broker, "g", "events", 100, 100);
    settings.concurrency = 4;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let mut batches = consumer.stream::<Value>();
    let mut seen = BTreeSet::new();
    let mut settled = Vec::new();
    within(LIMIT, async {
        // Through the `Stream` trait, as a combinator or `select!` takes it.
        while let Some(batch) = futures_util::StreamExt::next(&mut batches).await {
            let batch = batch.expect("a batch");
            seen.extend(batch.messages().iter().map(n_of));
            settled.push(tokio::spawn(async move { batch.ack() }));
            if seen.len() == 2_000 {
                handle.close().await.expect("close");
            }
        }
    })
    .await;
    assert_eq!(seen.len(), 2_000, "every record was handed out");
    for task in settled {
        assert_eq!(task.await.unwrap(), Settled::Accepted);
    }
    committed_to_end(&broker, "g", "events", 2_000).await;
    assert_eq!(handle.stats().messages, 2_000);
}

/// `retain` drops messages from a batch and settles them with it: the
/// caller sees only the kept ones, and the commits still reach the log end
/// (a filter never stalls a partition's commits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retain_settles_the_messages_it_drops() {
    let broker = broker_with("events", 2);
    produce_numbered(&broker, "events", 0..1_000).await;
    let settings = consumer_settings(&broker, "g", "events", 64, 100);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let mut batches = consumer.stream::<Value>();
    let (mut kept, mut handed_out) = (BTreeSet::new(), 0);
    within(LIMIT, async {
        while let Some(batch) = batches.next().await {
            let mut batch = batch.expect("a batch");
            handed_out += batch.len();
            batch.retain(|m| n_of(m) % 2 == 0);
            kept.extend(batch.messages().iter().map(n_of));
            assert_eq!(batch.ack(), Settled::Accepted);
            if handed_out >= 1_000 {
                handle.close().await.expect("close");
            }
        }
    })
    .await;
    assert_eq!(kept, (0..1_000).step_by(2).collect::<BTreeSet<_>>());
    committed_to_end(&broker, "g", "events", 1_000).await;
}

/// A batch dropped without a verdict counts as failed: under the default
/// `fail` policy the stream's next item is the error, naming the batch,
/// the stream then ends, and nothing of the batch is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_dropped_unsettled_fails_and_nothing_of_it_is_committed() {
    let broker = broker_with("events", 1);
    produce_numbered(&broker, "events", 0..300).await;
    let settings = consumer_settings(&broker, "g", "events", 100, 100);
    let consumer = Consumer::new(&settings).unwrap();
    let mut batches = consumer.stream::<Value>();
    let first = within(LIMIT, batches.next())
        .await
        .expect("an item")
        .expect("a batch");
    let batch_ref = first.batch_ref().to_string();
    drop(first);
    let error = within(LIMIT, batches.next())
        .await
        .expect("the failure is the next item")
        .expect_err("the dropped batch failed the consumer");
    assert!(matches!(error, Error::Handler { .. }), "{error}");
    let text = format!("{error} {:?}", std::error::Error::source(&error));
    assert!(
        text.contains("dropped without ack()") && text.contains(&batch_ref),
        "the error says what happened, naming {batch_ref}: {text}"
    );
    assert!(
        within(LIMIT, batches.next()).await.is_none(),
        "then it ends"
    );
    let committed = committed(&broker, "g", "events").await;
    assert!(
        committed.get(&0).is_none_or(|&c| c == 0),
        "nothing of the failed batch is committed: {committed:?}"
    );
}

/// Streams 200 records of `orders` under the `dead_letter` policy, each
/// batch settled by `settle`, until every record was handed out; returns
/// the numbers dead-lettered, once every offset is committed.
async fn dead_letters_when(mut settle: impl FnMut(Batch<Value>)) -> BTreeSet<usize> {
    let broker = broker_with("orders", 1);
    produce_numbered(&broker, "orders", 0..200).await;
    let mut settings = consumer_settings(&broker, "g", "orders", 50, 100);
    settings.failure.policies = vec![FailurePolicy::DeadLetter];
    settings.failure.dead_letter.topic = "orders.dead".into();
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let mut batches = consumer.stream::<Value>();
    let mut handed_out = 0;
    within(LIMIT, async {
        while let Some(batch) = batches.next().await {
            let batch = batch.expect("a batch");
            handed_out += batch.len();
            settle(batch);
            if handed_out >= 200 {
                handle.close().await.expect("close");
            }
        }
    })
    .await;
    committed_to_end(&broker, "g", "orders", 200).await;
    let letters = tokio::task::block_in_place(|| {
        Replay::new(broker.bootstrap_servers(), "orders.dead").read()
    })
    .expect("dead-letter topic read");
    assert_eq!(handle.stats().dead_lettered as usize, letters.len());
    letters.iter().map(letter_n).collect()
}

/// `fail_some` after `retain` names messages by their place in the batch as
/// it is now: the dead-letter topic gets exactly the records named, the
/// filtered ones and the acknowledged ones are committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_some_after_retain_dead_letters_the_messages_it_names() {
    let mut named = BTreeSet::new();
    let dead = dead_letters_when(|mut batch| {
        // Keep the odd numbers, and fail the first one kept.
        batch.retain(|m| n_of(m) % 2 == 1);
        named.insert(n_of(&batch.messages()[0]));
        let failed = Failures::at(0, "the first odd one of the batch is poison");
        assert_eq!(batch.fail_some(failed), Settled::Accepted);
    })
    .await;
    assert_eq!(dead, named, "exactly the messages named were dead-lettered");
}

/// `fail` after `retain` fails the messages kept, and only them: the
/// filtered ones are settled, not dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fail_after_retain_dead_letters_only_the_messages_kept() {
    let dead = dead_letters_when(|mut batch| {
        batch.retain(|m| n_of(m) % 10 == 0);
        assert_eq!(batch.fail("the downstream refused"), Settled::Accepted);
    })
    .await;
    assert_eq!(dead, (0..200).step_by(10).collect::<BTreeSet<_>>());
}

/// The `n` of a dead letter's record (its envelope, unchanged).
fn letter_n(letter: &kafka_batch::replay::DeadLetter) -> usize {
    let value: Value = serde_json::from_slice(letter.value.as_deref().expect("a value"))
        .expect("the record unchanged");
    value["item"]["n"].as_u64().expect("n") as usize
}

/// A batch settled after a rebalance took its partition says so
/// (`Settled::Revoked`), and the verdict commits nothing: the next owner
/// reads the records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_settled_after_its_partition_was_revoked_says_so() {
    let broker = broker_with("events", 1);
    produce_numbered(&broker, "events", 0..100).await;
    let mut settings = consumer_settings(&broker, "g", "events", 100, 100);
    settings.revoke_timeout_ms = 200;
    settings.kafka.set("heartbeat.interval.ms", "300");
    settings.kafka.set("session.timeout.ms", "6000");
    let first = Consumer::new(&settings).unwrap();
    let first_handle = first.handle();
    let mut first_batches = first.stream::<Value>();
    let held = within(LIMIT, first_batches.next())
        .await
        .expect("an item")
        .expect("a batch");
    // A second member joins: the revoke waits 200 ms for the held batch,
    // then gives the partition up.
    let second = Consumer::new(&settings).unwrap();
    let second_handle = second.handle();
    let second_run =
        tokio::spawn(second.process(async |_batch: Vec<kafka_batch::Message>| anyhow::Ok(())));
    // The first stream is polled meanwhile, as a caller's loop would.
    let polling = tokio::spawn(async move {
        while let Some(batch) = first_batches.next().await {
            batch.expect("a batch").ack();
        }
    });
    wait_until("the first member's partition was revoked", LIMIT, || {
        first_handle.stats().revoked >= 1
    })
    .await;
    assert_eq!(held.ack(), Settled::Revoked);
    first_handle.close().await.unwrap();
    second_handle.close().await.unwrap();
    within(LIMIT, polling).await.unwrap();
    within(LIMIT, second_run).await.unwrap().unwrap();
}

/// `ConsumerHandle::events` tells what happens to the consumer: its
/// partitions assigned, a pause while the caller holds a batch and the
/// records pile up, the resume once it is settled, the revoke at the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tell_of_the_assignment_back_pressure_and_the_revoke() {
    use kafka_batch::consumer::ConsumerEvent;
    let broker = broker_with("events", 2);
    produce_numbered(&broker, "events", 0..2_000).await;
    let settings = consumer_settings(&broker, "g", "events", 50, 100);
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let mut events = handle.events();
    let mut batches = consumer.stream::<Value>();
    let held = within(LIMIT, batches.next())
        .await
        .expect("an item")
        .expect("a batch");
    let next_event = async |events: &mut kafka_batch::consumer::ConsumerEvents| {
        loop {
            match within(LIMIT, events.next()).await.expect("an event") {
                // Commits may fail and pauses repeat: only the kinds asked for count.
                ConsumerEvent::CommitFailed { .. } => continue,
                event => return event,
            }
        }
    };
    match next_event(&mut events).await {
        ConsumerEvent::Assigned { client, partitions } => {
            assert_eq!(client, 0);
            assert_eq!(partitions.len(), 2, "{partitions:?}");
        }
        other => panic!("the first event is the assignment, not {other:?}"),
    }
    // The batch is held: the poller fills its slots and pauses.
    assert_eq!(
        next_event(&mut events).await,
        ConsumerEvent::Paused { client: 0 }
    );
    held.ack();
    assert_eq!(
        next_event(&mut events).await,
        ConsumerEvent::Resumed { client: 0 }
    );
    handle.close().await.unwrap();
    let drain = tokio::spawn(async move {
        while let Some(batch) = batches.next().await {
            batch.expect("a batch").ack();
        }
    });
    let revoked = loop {
        match next_event(&mut events).await {
            ConsumerEvent::Revoked { partitions, .. } => break partitions,
            ConsumerEvent::Paused { .. } | ConsumerEvent::Resumed { .. } => continue,
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(revoked.len(), 2, "both partitions given up at the close");
    within(LIMIT, drain).await.unwrap();
}

/// Batches acknowledged out of order commit only the contiguous run: the
/// later batch's ack leaves the commit before the earlier batch, and the
/// earlier one's ack then moves it past both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_acked_out_of_order_commit_only_the_contiguous_run() {
    let broker = broker_with("events", 1);
    produce_numbered(&broker, "events", 0..200).await;
    let mut settings = consumer_settings(&broker, "g", "events", 100, 100);
    settings.concurrency = 2;
    settings.ordering = kafka_batch::settings::HandlingOrder::Unordered;
    settings.commit_interval_ms = 0;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let mut batches = consumer.stream::<Value>();
    let first = within(LIMIT, batches.next()).await.unwrap().unwrap();
    let second = within(LIMIT, batches.next()).await.unwrap().unwrap();
    assert_eq!(n_of(&first.messages()[0]), 0);
    assert_eq!(n_of(&second.messages()[0]), 100);
    second.ack();
    wait_until("the later batch counted", LIMIT, || {
        handle.stats().batches == 1
    })
    .await;
    let early = committed(&broker, "g", "events").await;
    assert!(
        early.get(&0).is_none_or(|&c| c == 0),
        "nothing committed past the unsettled first batch: {early:?}"
    );
    first.ack();
    committed_to_end(&broker, "g", "events", 200).await;
    handle.close().await.unwrap();
    assert!(within(LIMIT, batches.next()).await.is_none());
}

/// Under a `retry` policy a batch dropped unsettled is read again: its
/// records come back in a later batch, and once that one is acknowledged
/// everything is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_batch_is_read_again_under_retry() {
    let broker = broker_with("events", 1);
    produce_numbered(&broker, "events", 0..100).await;
    let mut settings = consumer_settings(&broker, "g", "events", 100, 100);
    settings.failure.policies = vec![FailurePolicy::Retry];
    settings.failure.retry.backoff_ms = 50;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let mut batches = consumer.stream::<Value>();
    let dropped = within(LIMIT, batches.next()).await.unwrap().unwrap();
    let dropped_ns: Vec<usize> = dropped.messages().iter().map(n_of).collect();
    drop(dropped);
    let mut again = BTreeSet::new();
    while again.len() < dropped_ns.len() {
        let batch = within(LIMIT, batches.next()).await.unwrap().unwrap();
        again.extend(batch.messages().iter().map(n_of));
        batch.ack();
    }
    assert_eq!(again, dropped_ns.into_iter().collect::<BTreeSet<_>>());
    assert!(
        handle.stats().retries >= 1,
        "the drop went through the retry policy"
    );
    committed_to_end(&broker, "g", "events", 100).await;
    handle.close().await.unwrap();
    while let Some(batch) = within(LIMIT, batches.next()).await {
        batch.unwrap().ack();
    }
}
