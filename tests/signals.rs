//! SIGTERM stops a consumer gracefully: the batch in hand is committed and
//! `process` returns Ok. (Its own test binary: it signals its own process.)

mod common;

use std::sync::Mutex;
use std::time::Duration;

use common::*;
use kafka_batch::{Consumer, Error, Message};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_batch_in_hand_and_returns_ok() {
    let broker = broker_with("signalled", 1);
    produce_numbered(&broker, "signalled", 0..50).await;
    let consumer = Consumer::new(&consumer_settings(&broker, "g", "signalled", 10, 300)).unwrap();
    let handle = consumer.handle();
    handle.shutdown_on_signals();
    let handled = Mutex::new(Vec::new());
    within(
        Duration::from_secs(60),
        consumer.process(async |batch: Vec<Message>| {
            let first = handled.lock().unwrap().is_empty();
            if first {
                let status = std::process::Command::new("kill")
                    .args(["-TERM", &std::process::id().to_string()])
                    .status()
                    .expect("kill runs");
                assert!(status.success());
                // Signals are delivered asynchronously; this batch is "in hand"
                // once the consumer has seen it.
                wait_until("the consumer sees SIGTERM", Duration::from_secs(10), || {
                    handle.is_shutting_down()
                })
                .await;
            }
            handled.lock().unwrap().extend(batch.iter().map(n_of));
            Ok::<_, Error>(())
        }),
    )
    .await
    .expect("SIGTERM makes process return Ok");
    assert_eq!(
        *handled.lock().unwrap(),
        (0..10).collect::<Vec<_>>(),
        "the batch in hand finished, no other started"
    );
    assert_eq!(committed(&broker, "g", "signalled").await, [(0, 10)].into());
}
