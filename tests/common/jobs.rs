//! Helpers of the job queue's tests.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kafka_batch::jobs::JobQueue;
use kafka_batch::settings::Backoff;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::Settings;

/// A queue named `queue` on `broker`, its three topics created with
/// `partitions` partitions (the embedded broker has no CreateTopics: init
/// finds them there).
pub async fn queue_on(broker: &EmbeddedBroker, queue: &str, partitions: i32) -> Settings {
    for suffix in ["jobs", "delayed", "dead"] {
        broker
            .create_topic(&format!("{queue}.{suffix}"), partitions)
            .unwrap();
    }
    let settings = Settings::from_figment(
        Settings::figment()
            .merge(("bootstrap_servers", broker.bootstrap_servers()))
            .merge(("service", "jobs-test"))
            .merge(("jobs.queue", queue))
            .merge((
                "consumer.kafka",
                BTreeMap::from([("heartbeat.interval.ms", "300")]),
            )),
    )
    .unwrap();
    let report = JobQueue::new(&settings).unwrap().init().await.unwrap();
    assert!(report.created.is_empty(), "{report}");
    assert_eq!(report.existing.len(), 3, "{report}");
    settings
}

/// A fixed backoff schedule without jitter: waits of `ms`, then doubling.
pub fn doubling(ms: u64) -> Backoff {
    Backoff {
        initial: Duration::from_millis(ms),
        multiplier: 2.0,
        max: Duration::from_secs(60),
        jitter: 0.0,
    }
}

/// Runs `queue` on a task of its own until it is shut down.
pub fn spawn_run(queue: &Arc<JobQueue>) -> tokio::task::JoinHandle<Result<(), kafka_batch::Error>> {
    let queue = Arc::clone(queue);
    tokio::spawn(async move { queue.run().await })
}

/// (succeeded, dead) of a job name, from the counters (no broker request).
pub fn queue_stats(queue: &JobQueue, name: &str) -> (u64, u64) {
    let counts = queue.counts().get(name).copied().unwrap_or_default();
    (counts.succeeded, counts.dead)
}

/// The log end of a partition.
pub fn broker_end(broker: &EmbeddedBroker, topic: &str, partition: i32) -> i64 {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let client: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .create()
        .unwrap();
    client
        .fetch_watermarks(topic, partition, Duration::from_secs(10))
        .unwrap()
        .1
}
