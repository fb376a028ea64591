//! The job queue on a real broker (tansu, started by `scripts/test.sh`,
//! which sets `REAL_BROKER_BOOTSTRAP`): `init` creates the three topics
//! through the Admin API once, and jobs run, retry through the delayed
//! topic and die on it as on the embedded broker.

mod common;
#[path = "real_broker/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use harness::{real_broker, unique, wait_until};
use kafka_batch::jobs::{Job, JobDefinition, JobQueue};
use kafka_batch::settings::Backoff;
use kafka_batch::Settings;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread")]
async fn init_creates_the_job_topics_once_and_jobs_run() {
    let Some(bootstrap) = real_broker("init_creates_the_job_topics_once_and_jobs_run") else {
        return;
    };
    common::init_tracing();
    let queue_name = unique("rb-jobs");
    let settings = Settings::from_figment(
        Settings::figment()
            .merge(("bootstrap_servers", bootstrap.as_str()))
            .merge(("service", "rb-jobs"))
            .merge(("jobs.queue", queue_name.as_str()))
            .merge(("jobs.partitions", 3)),
    )
    .unwrap();
    let mut queue = JobQueue::new(&settings).unwrap();
    let first = queue.init().await.unwrap();
    let mut created = first.created.clone();
    created.sort();
    let want: Vec<String> = ["dead", "delayed", "jobs"]
        .iter()
        .map(|s| format!("{queue_name}.{s}"))
        .collect();
    assert_eq!(created, want, "{first}");
    let again = queue.init().await.unwrap();
    assert!(again.created.is_empty(), "{again}");
    assert_eq!(again.existing.len(), 3, "{again}");

    let failed_once = Arc::new(AtomicBool::new(false));
    let f = Arc::clone(&failed_once);
    queue.register(
        JobDefinition::new("once_flaky", move |job: Job| {
            let failed_once = Arc::clone(&f);
            async move {
                // The marked job's first run fails: it comes back through
                // the delayed topic.
                let first_run =
                    job.args["first"] == json!(true) && !failed_once.swap(true, Ordering::AcqRel);
                anyhow::ensure!(!first_run, "the first run of {} fails", job.id);
                anyhow::Ok(())
            }
        })
        .retries(2)
        .backoff(Backoff {
            initial: Duration::from_millis(200),
            multiplier: 2.0,
            max: Duration::from_secs(5),
            jitter: 0.0,
        }),
    );
    let queue = Arc::new(queue);
    let mut jobs = vec![Job::new("once_flaky", json!({"first": true}))];
    jobs.extend((0..19).map(|i| Job::new("once_flaky", json!({"i": i}))));
    queue.enqueue_batch(jobs).await.unwrap();
    queue
        .enqueue(Job::new("nobody_knows", json!({})))
        .await
        .unwrap();
    let worker = Arc::clone(&queue);
    let run = tokio::spawn(async move { worker.run().await });
    wait_until("every job settled", LIMIT, || {
        let counts = queue.counts();
        counts.get("once_flaky").is_some_and(|c| c.succeeded == 20)
            && counts.get("nobody_knows").is_some_and(|c| c.dead == 1)
    })
    .await;
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.of("once_flaky").retried, 1, "{stats:?}");
    queue.shutdown();
    tokio::time::timeout(LIMIT, run)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let dead = queue.dead().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].reason, "unknown_job");
}
