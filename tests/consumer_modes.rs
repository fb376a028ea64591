//! The blocking handler and manual commits.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use kafka_batch::{Consumer, Error, Message};

const LIMIT: Duration = Duration::from_secs(60);

/// On a single-threaded runtime, a task can only answer the handler if the
/// handler does not block the runtime's one thread.
#[tokio::test(flavor = "current_thread")]
async fn a_blocking_handler_runs_off_the_runtime() {
    let broker = broker_with("blocking", 1);
    produce_numbered(&broker, "blocking", 0..3).await;
    let consumer = Consumer::new(&consumer_settings(&broker, "g", "blocking", 10, 200)).unwrap();
    let handle = consumer.handle();
    let (ask_tx, ask_rx) = tokio::sync::mpsc::unbounded_channel::<mpsc::Sender<()>>();
    let answerer = tokio::spawn(async move {
        let mut ask_rx = ask_rx;
        while let Some(reply) = ask_rx.recv().await {
            let _ = reply.send(());
        }
    });
    let handled = AtomicUsize::new(0);
    within(
        LIMIT,
        consumer.process_blocking(move |batch: Vec<Message>| {
            let (reply_tx, reply_rx) = mpsc::channel();
            ask_tx
                .send(reply_tx)
                .map_err(|_| "the answering task is gone")?;
            reply_rx
                .recv_timeout(Duration::from_secs(20))
                .map_err(|_| "the runtime was blocked: no answer")?;
            let handled = handled.fetch_add(batch.len(), Ordering::SeqCst) + batch.len();
            if handled == 3 {
                handle.shutdown();
            }
            Ok::<_, &'static str>(())
        }),
    )
    .await
    .expect("the blocking handler ran while the runtime stayed free");
    answerer.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_commit_off_only_what_the_handler_commits_is_committed() {
    let broker = broker_with("manual", 1);
    produce_numbered(&broker, "manual", 0..10).await;
    let mut settings = consumer_settings(&broker, "g", "manual", 5, 300);
    settings.commit = false;
    let consumer = Consumer::new(&settings).unwrap();
    let handle = consumer.handle();
    let calls = AtomicUsize::new(0);
    within(
        LIMIT,
        consumer.process(async |batch: Vec<Message>| {
            let calls = calls.fetch_add(1, Ordering::SeqCst) + 1;
            if calls == 1 {
                handle.commit_messages(&batch).await?;
            } else {
                handle.shutdown();
            }
            Ok::<_, Error>(())
        }),
    )
    .await
    .unwrap();
    assert_eq!(
        committed(&broker, "g", "manual").await,
        [(0, 5)].into(),
        "the second batch was not committed"
    );
    assert!(
        handle.commit([("manual", 0, 10)]).await.is_err(),
        "a stopped consumer commits nothing"
    );
}
