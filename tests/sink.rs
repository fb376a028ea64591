//! `Producer::sink` and the pipe (`BatchStream::pipe_to`): messages go out
//! in batches with every delivery report waited for, a delivery error names
//! the records, and an input batch is acknowledged only once its outputs
//! are delivered.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use futures_util::{stream, SinkExt as _, StreamExt as _};
use kafka_batch::{Consumer, Error, Message, Producer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use serde_json::{json, Value};

const LIMIT: Duration = Duration::from_secs(60);

/// Messages forwarded through a sink with a transform on the way in
/// (`SinkExt::with`) are all on the topic once `forward` returns, in
/// batches of the sink's size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_through_a_sink_with_a_transform_delivers_everything() {
    let broker = broker_with("out", 3);
    let producer = Producer::new(&broker.producer_settings()).unwrap();
    let sink = producer
        .sink::<Value>("out")
        .batch_size(100)
        .with(|m: Message<usize>| async move { Ok::<_, Error>(m.map(|n| json!({ "n": n * 2 }))) });
    let numbers = stream::iter(0..1_234).map(|i| Ok(Message::new(format!("m{i}"), i)));
    within(LIMIT, numbers.forward(sink)).await.unwrap();
    let out =
        tokio::task::block_in_place(|| broker.read_messages::<Value>("out", 1_234, LIMIT)).unwrap();
    let doubled: BTreeSet<u64> = out
        .iter()
        .map(|m| m.payload["n"].as_u64().unwrap())
        .collect();
    assert_eq!(doubled, (0..1_234).map(|n| n * 2).collect());
}

/// A record the broker refuses makes `flush` (here through `send`) return
/// the producer's error naming it; the records around it are delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_error_names_the_records_that_failed() {
    let broker = broker_with("limited", 1);
    let mut settings = broker.producer_settings();
    settings.kafka.set("message.max.bytes", "2000");
    let producer = Producer::new(&settings).unwrap();
    let mut sink = producer.sink::<Value>("limited");
    sink.feed(Message::new("small-1", json!("x")))
        .await
        .unwrap();
    sink.feed(Message::new("huge", json!("y".repeat(5000))))
        .await
        .unwrap();
    let error = within(LIMIT, sink.send(Message::new("small-2", json!("z"))))
        .await
        .unwrap_err();
    let Error::Produce(e) = &error else {
        panic!("a produce error, got {error}")
    };
    assert_eq!(e.failures.len(), 1);
    assert_eq!(e.failures[0].id.as_str(), "huge");
    // The sink goes on after an error.
    within(LIMIT, sink.send(Message::new("small-3", json!("w"))))
        .await
        .unwrap();
    let ids: Vec<String> =
        tokio::task::block_in_place(|| broker.read_messages::<Value>("limited", 3, LIMIT))
            .unwrap()
            .into_iter()
            .map(|m| m.id.to_string())
            .collect();
    assert_eq!(ids, ["small-1", "small-2", "small-3"]);
}

/// Under the default `fail` policy, outputs the broker refuses fail their
/// input batch: the consumer stops, and every input offset committed has
/// its output on the output topic (nothing is acknowledged before its
/// outputs are delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipe_acknowledges_an_input_only_after_its_output_is_delivered() {
    let broker = broker_with("in", 1);
    broker.create_topic("out", 1).unwrap();
    produce_numbered(&broker, "in", 0..2_000).await;
    let mut producer_settings = broker.producer_settings();
    producer_settings.kafka.set("retries", "0");
    let producer = Producer::new(&producer_settings).unwrap();
    let settings = consumer_settings(&broker, "g", "in", 100, 100);
    let consumer = Consumer::new(&settings).unwrap();
    broker.track_requests().unwrap();
    // One produce request of the pipe's outputs is refused.
    let refused = [RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED];
    let pipe = consumer.stream::<Value>().pipe_to(&producer, "out", |m| {
        if n_of(m) == 700 {
            // Refuse the next produce request: the 8th batch's outputs.
            broker
                .request_errors(RDKafkaApiKey::Produce, &refused)
                .unwrap();
        }
        Some(json!({ "n": n_of(m) }))
    });
    let error = within(LIMIT, pipe).await.unwrap_err();
    assert!(matches!(error, Error::Handler { .. }), "{error}");
    assert!(error.to_string().contains("not delivered"), "{error}");
    assert_eq!(
        broker
            .pending_request_errors(RDKafkaApiKey::Produce)
            .unwrap(),
        0,
        "the refusals were met"
    );
    let committed = committed(&broker, "g", "in")
        .await
        .get(&0)
        .copied()
        .unwrap_or(0);
    assert!(
        committed < 2_000,
        "the failed batch was not committed ({committed})"
    );
    let outputs: BTreeSet<u64> = tokio::task::block_in_place(|| {
        broker.read_messages::<Value>("out", committed as usize, LIMIT)
    })
    .unwrap()
    .iter()
    .map(|m| m.payload["n"].as_u64().unwrap())
    .collect();
    for n in 0..committed as u64 {
        assert!(
            outputs.contains(&n),
            "input {n} committed without its output"
        );
    }
}

/// A batch goes by time as well as by count: fed without a flush, the
/// first message is sent once the next one comes after `max_wait`, while
/// the batch is far from full; what remains goes on `flush`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_that_waited_its_max_wait_goes_before_it_is_full() {
    let broker = broker_with("aged", 1);
    let producer = Producer::new(&broker.producer_settings()).unwrap();
    let mut sink = producer
        .sink::<Value>("aged")
        .batch_size(1_000)
        .max_wait(Duration::from_millis(50));
    sink.feed(Message::new("first", json!(1))).await.unwrap();
    // The time that the batching is about: more than max_wait.
    tokio::time::sleep(Duration::from_millis(120)).await;
    sink.feed(Message::new("second", json!(2))).await.unwrap();
    let end = || -> i64 {
        use rdkafka::consumer::{BaseConsumer, Consumer as _};
        let client: BaseConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap_servers())
            .create()
            .unwrap();
        client
            .fetch_watermarks("aged", 0, Duration::from_secs(10))
            .unwrap()
            .1
    };
    wait_until("the first message was sent, unflushed", LIMIT, || {
        tokio::task::block_in_place(end) == 1
    })
    .await;
    sink.flush().await.unwrap();
    assert_eq!(
        tokio::task::block_in_place(end),
        2,
        "the rest went on flush"
    );
}
