//! The job queue (`kafka_batch::jobs`) on the embedded broker: retries with
//! growing waits into the dead topic and back, jobs no definition can run,
//! `init` where topics cannot be created, results.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::jobs::{doubling, queue_on, queue_stats, spawn_run};
use common::*;
use kafka_batch::jobs::{DeadJob, Job, JobDefinition, JobQueue};
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::Settings;
use serde::Deserialize;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

/// A job that fails twice then succeeds runs three times, in order, each
/// after at least its backoff; one that always fails uses its retries and
/// lands on the dead topic with the reason, the attempts and the error;
/// `retry_dead` brings it back and, fixed, it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_into_the_dead_topic_and_retry_dead_brings_a_job_back() {
    let broker = EmbeddedBroker::start().unwrap();
    init_tracing();
    let settings = queue_on(&broker, "retries", 2).await;
    let runs: Arc<Mutex<Vec<String>>> = Arc::default();
    let fixed = Arc::new(AtomicBool::new(false));
    let mut queue = JobQueue::new(&settings).unwrap();
    let flaky_runs = Arc::clone(&runs);
    queue.register(
        JobDefinition::new("flaky", move |job: Job| {
            let runs = Arc::clone(&flaky_runs);
            async move {
                let before = {
                    let mut runs = runs.lock().unwrap();
                    runs.push(job.name.clone());
                    runs.iter().filter(|r| **r == job.name).count() - 1
                };
                if before < 2 {
                    anyhow::bail!("run {} of {} fails", before + 1, job.id)
                }
                anyhow::Ok(json!({"ran": before + 1}))
            }
        })
        .retries(3)
        .backoff(doubling(200)),
    );
    let (doomed_runs, doomed_fixed) = (Arc::clone(&runs), Arc::clone(&fixed));
    queue.register(
        JobDefinition::new("doomed", move |job: Job| {
            let (runs, fixed) = (Arc::clone(&doomed_runs), Arc::clone(&doomed_fixed));
            async move {
                runs.lock().unwrap().push(job.name.clone());
                if !fixed.load(Ordering::Acquire) {
                    anyhow::bail!("the mail server refused {}", job.id)
                }
                anyhow::Ok(())
            }
        })
        .retries(2)
        .backoff(doubling(100)),
    );
    let queue = Arc::new(queue);
    let doomed = Job::new("doomed", json!({"to": "nobody"}));
    let flaky = Job::new("flaky", json!({}));
    queue.enqueue(flaky.clone()).await.unwrap();
    queue.enqueue(doomed.clone()).await.unwrap();
    let run = spawn_run(&queue);

    let count = |name: &str| runs.lock().unwrap().iter().filter(|r| *r == name).count();
    wait_until("flaky succeeded", LIMIT, || {
        queue_stats(&queue, "flaky").0 == 1
    })
    .await;
    wait_until("doomed is dead", LIMIT, || {
        queue_stats(&queue, "doomed").1 == 1
    })
    .await;
    assert_eq!(
        count("flaky"),
        3,
        "two failures, then the run that succeeded"
    );
    assert_eq!(count("doomed"), 3, "retries 2: three runs");
    // The waits grow as the backoff says: each retry record on the delayed
    // topic is due 200 ms, then 400 ms, after the failure it records.
    let delayed = kafka_batch::replay::Replay::new(broker.bootstrap_servers(), "retries.delayed")
        .read()
        .unwrap();
    let mut waits: Vec<(u32, i64)> = delayed
        .iter()
        .filter(|r| r.key.as_deref() == Some(flaky.id.as_bytes()))
        .map(|r| {
            let failed_at = kafka_batch::envelope::parse_dt(r.info.failed_at.as_deref().unwrap())
                .expect("an RFC 3339 failed-at header");
            let failed_ms = (failed_at.unix_timestamp_nanos() / 1_000_000) as i64;
            (r.info.retries, r.info.due_ms.unwrap() - failed_ms)
        })
        .collect();
    waits.sort();
    assert_eq!(waits, [(1, 200), (2, 400)], "retry number and wait (ms)");
    let stats = queue.stats().await.unwrap();
    assert_eq!(stats.of("flaky").retried, 2);
    assert_eq!(stats.of("doomed").retried, 2);

    let dead = queue.dead().await.unwrap();
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(d.job, doomed);
    assert_eq!((d.reason.as_str(), d.attempts), ("handler", 3));
    assert!(d.error.contains("the mail server refused"), "{}", d.error);
    assert!(!d.failed_at.is_empty());

    fixed.store(true, Ordering::Release);
    assert_eq!(queue.retry_dead(vec![doomed.id.clone()]).await.unwrap(), 1);
    wait_until("doomed succeeded after retry_dead", LIMIT, || {
        queue_stats(&queue, "doomed").0 == 1
    })
    .await;
    assert_eq!(count("doomed"), 4);
    queue.shutdown();
    within(LIMIT, run).await.unwrap().unwrap();
}

/// Unknown names, arguments that do not fit the type and records that are
/// no job at all go to the dead topic, each with its reason; the worker
/// keeps going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_names_and_bad_args_go_to_the_dead_topic() {
    let broker = EmbeddedBroker::start().unwrap();
    init_tracing();
    let settings = queue_on(&broker, "bad", 1).await;
    #[derive(Deserialize)]
    struct Add {
        a: i64,
        b: i64,
    }
    let mut queue = JobQueue::new(&settings).unwrap();
    queue.register_typed(JobDefinition::new("add", async |add: Add| {
        anyhow::Ok(add.a + add.b)
    }));
    let queue = Arc::new(queue);
    let unknown = Job::new("subtract", json!({"a": 1, "b": 2}));
    let bad = Job::new("add", json!({"a": "one"}));
    let good = Job::new("add", json!({"a": 1, "b": 2}));
    queue
        .enqueue_batch([unknown.clone(), bad.clone(), good.clone()])
        .await
        .unwrap();
    broker
        .produce_raw(
            "bad.jobs",
            &[(0, Some(&b"garbage"[..]), Some(&b"not json"[..]))],
        )
        .unwrap();
    let run = spawn_run(&queue);
    wait_until("the good job ran", LIMIT, || {
        queue_stats(&queue, "add").0 == 1
    })
    .await;
    // The record that is no job is dead-lettered by the consumer itself
    // (`kafka-batch dead` shows it; `dead()` lists jobs only).
    let is_garbage = |d: &kafka_batch::replay::DeadLetter| {
        d.key.as_deref() == Some(&b"garbage"[..]) && d.info.reason.as_deref() == Some("not_json")
    };
    let deadline = Instant::now() + LIMIT;
    loop {
        let all = kafka_batch::replay::Replay::new(broker.bootstrap_servers(), "bad.dead")
            .read()
            .unwrap();
        if all.len() >= 3 && all.iter().any(is_garbage) {
            break;
        }
        assert!(Instant::now() < deadline, "dead records: {all:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = queue.dead().await.unwrap();
    let reason = |id: &str| {
        dead.iter()
            .find(|d| d.job.id == id)
            .map(|d| d.reason.clone())
    };
    assert_eq!(reason(&unknown.id).as_deref(), Some("unknown_job"));
    assert_eq!(reason(&bad.id).as_deref(), Some("bad_args"));
    assert_eq!(dead.len(), 2, "only those two jobs are dead: {dead:?}");
    // A filter picks among the dead (the record that is no job never matches).
    let put_back = queue
        .retry_dead(|d: &DeadJob| d.reason == "unknown_job")
        .await
        .unwrap();
    assert_eq!(put_back, 1, "only the unknown job went back");
    wait_until("the unknown job is dead again", LIMIT, || {
        queue_stats(&queue, "subtract").1 == 2
    })
    .await;
    queue.shutdown();
    within(LIMIT, run).await.unwrap().unwrap();
}

/// `init` on a broker without the Admin API's CreateTopics (the embedded
/// broker) says which topics are missing and what to do, and creates none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_says_what_it_cannot_create() {
    let broker = EmbeddedBroker::start().unwrap();
    init_tracing();
    broker.create_topic("half.jobs", 1).unwrap();
    let settings = Settings::from_figment(
        Settings::figment()
            .merge(("bootstrap_servers", broker.bootstrap_servers()))
            .merge(("jobs.queue", "half")),
    )
    .unwrap();
    let error = within(LIMIT, JobQueue::new(&settings).unwrap().init())
        .await
        .expect_err("the embedded broker cannot create topics");
    let text = error.to_string();
    assert!(
        text.contains("half.delayed") && text.contains("half.dead"),
        "{text}"
    );
    assert!(!text.contains("\"half.jobs\""), "half.jobs exists: {text}");
    assert!(text.contains("EmbeddedBroker::create_topic"), "{text}");
}

/// With `jobs.results_topic`, each job's `Ok` value is written there keyed
/// by the job's id, derived from the job's record (its provenance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_are_written_keyed_by_job_id() {
    let broker = EmbeddedBroker::start().unwrap();
    init_tracing();
    let mut settings = queue_on(&broker, "sums", 2).await;
    broker.create_topic("sums.results", 1).unwrap();
    settings.jobs.results_topic = "sums.results".into();
    #[derive(Deserialize)]
    struct Add {
        a: i64,
        b: i64,
    }
    let mut queue = JobQueue::new(&settings).unwrap();
    queue.register_typed(JobDefinition::new("add", async |add: Add| {
        anyhow::Ok(json!({"sum": add.a + add.b}))
    }));
    let queue = Arc::new(queue);
    let jobs: Vec<Job> = (0..10)
        .map(|i| Job::new("add", json!({"a": i, "b": 100})))
        .collect();
    queue.enqueue_batch(jobs.clone()).await.unwrap();
    let run = spawn_run(&queue);
    let results = tokio::task::spawn_blocking({
        let bootstrap = broker.bootstrap_servers().to_owned();
        move || {
            kafka_batch::testing::read_messages::<serde_json::Value>(
                &bootstrap,
                "sums.results",
                10,
                LIMIT,
            )
        }
    })
    .await
    .unwrap()
    .unwrap();
    queue.shutdown();
    within(LIMIT, run).await.unwrap().unwrap();
    assert_eq!(results.len(), 10);
    for (i, job) in jobs.iter().enumerate() {
        let result = results
            .iter()
            .find(|m| m.id == job.id.as_str())
            .unwrap_or_else(|| panic!("no result for job {}", job.id));
        assert_eq!(result.payload, json!({"sum": i as i64 + 100}));
        let hist = result.refs[0].hist.as_ref().expect("the result's history");
        let inputs: Vec<&str> = hist.get().refs.iter().map(|r| &*r.topic).collect();
        assert_eq!(inputs, ["sums.jobs"], "derived from the job's record");
    }
}
