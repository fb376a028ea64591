//! The producer on the embedded broker: deliveries, size limits, a full queue.

mod common;

use std::time::Duration;

use common::*;
use kafka_batch::producer::RecordError;
use kafka_batch::{Delivery, Error, Message, Producer};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn produce_batch_returns_every_records_partition_and_offset() {
    let broker = broker_with("out", 3);
    let mut settings = broker.producer_settings();
    settings.service = "writer".into();
    let producer = Producer::new(&settings).unwrap();
    let batch: Vec<Message> = (0..30)
        .map(|i| Message::new(format!("id-{i}"), json!({ "i": i })))
        .collect();
    let deliveries = producer.produce_batch("out", &batch).await.unwrap();
    assert_eq!(deliveries.len(), 30);

    let read = broker.read_messages::<Value>("out", 30, LIMIT).unwrap();
    assert_eq!(read.len(), 30);
    for (message, delivery) in batch.iter().zip(&deliveries) {
        let Delivery::Written { partition, offset } = *delivery else {
            panic!("written")
        };
        let stored = read
            .iter()
            .find(|r| {
                r.origin()
                    .is_some_and(|o| o.partition == partition && o.offset == offset)
            })
            .expect("the record is where the delivery report says");
        assert_eq!(stored.id, message.id);
        assert_eq!(stored.payload, message.payload);
        assert_eq!(
            stored.source().unwrap().hist.as_deref().unwrap().svc,
            "writer"
        );
    }
    let one = producer
        .produce("out", &Message::new("single", json!(1)))
        .await
        .unwrap();
    assert!(matches!(one, Delivery::Written { .. }));
    producer.close().await.unwrap();
}

fn sized_batch() -> Vec<Message> {
    vec![
        Message::new("small-1", json!("x")),
        Message::new("huge", json!("y".repeat(5000))),
        Message::new("small-2", json!("z")),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_record_is_an_error_naming_it_and_the_others_are_delivered() {
    let broker = broker_with("limited", 1);
    let mut settings = broker.producer_settings();
    settings.kafka.set("message.max.bytes", "2000");
    let producer = Producer::new(&settings).unwrap();
    let error = producer
        .produce_batch("limited", &sized_batch())
        .await
        .unwrap_err();
    let Error::Produce(e) = &error else {
        panic!("a produce error, got {error}")
    };
    assert_eq!(e.failures.len(), 1);
    assert_eq!(
        (e.failures[0].index, e.failures[0].id.as_str()),
        (1, "huge")
    );
    assert!(matches!(e.failures[0].error, RecordError::Kafka(_)));
    assert!(e.deliveries[0].is_some() && e.deliveries[1].is_none() && e.deliveries[2].is_some());
    let text = error.to_string();
    assert!(
        text.contains("1 of 3 records") && text.contains("\"huge\""),
        "{text}"
    );
    let ids: Vec<kafka_batch::MessageId> = broker
        .read_messages::<Value>("limited", 2, LIMIT)
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec!["small-1", "small-2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skip_oversized_skips_with_a_delivery_that_says_so() {
    let broker = broker_with("limited", 1);
    let mut settings = broker.producer_settings();
    settings.kafka.set("message.max.bytes", "2000");
    settings.skip_oversized = true;
    let producer = Producer::new(&settings).unwrap();
    let deliveries = producer
        .produce_batch("limited", &sized_batch())
        .await
        .unwrap();
    assert!(matches!(deliveries[0], Delivery::Written { .. }));
    assert_eq!(deliveries[1], Delivery::SkippedOversized);
    assert!(matches!(deliveries[2], Delivery::Written { .. }));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_waits_instead_of_failing_the_batch() {
    let broker = broker_with("busy", 2);
    let mut settings = broker.producer_settings();
    // Room for 10 records at a time; the batch holds 2,000.
    settings.kafka.set("queue.buffering.max.messages", "10");
    let producer = Producer::new(&settings).unwrap();
    let batch: Vec<Message> = (0..2000)
        .map(|i| Message::new(format!("{i}"), json!(i)))
        .collect();
    let deliveries = within(LIMIT, producer.produce_batch("busy", &batch))
        .await
        .unwrap();
    assert_eq!(deliveries.len(), 2000);
    assert!(deliveries
        .iter()
        .all(|d| matches!(d, Delivery::Written { .. })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_fails_each_record_with_the_reason() {
    init_tracing();
    let mut settings = kafka_batch::ProducerSettings::new("127.0.0.1:1");
    settings.kafka.set("message.timeout.ms", "1500");
    let producer = Producer::new(&settings).unwrap();
    let error = within(
        LIMIT,
        producer.produce_batch("nowhere", &sized_batch()[..1]),
    )
    .await
    .unwrap_err();
    let Error::Produce(e) = &error else {
        panic!("a produce error, got {error}")
    };
    assert_eq!(e.failures.len(), 1);
    assert!(error.to_string().contains("timed out"), "{error}");
}
