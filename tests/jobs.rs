//! The job queue (`kafka_batch::jobs`) on the embedded broker: retries with
//! growing waits into the dead topic and back, FIFO by key beside
//! concurrent jobs, jobs scheduled for later, a worker dropped mid-run, and
//! jobs no definition can run.

mod common;
#[path = "promise/recorder.rs"]
#[allow(dead_code)]
mod recorder;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use kafka_batch::jobs::{Job, JobDefinition, JobQueue};
use kafka_batch::settings::Backoff;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::Settings;
use recorder::{Call, CommitWatcher, Outcome, Recorder};
use serde::Deserialize;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

/// A queue named `queue` on `broker`, its three topics created with
/// `partitions` partitions (the embedded broker has no CreateTopics: init
/// finds them there).
async fn queue_on(broker: &EmbeddedBroker, queue: &str, partitions: i32) -> Settings {
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
fn doubling(ms: u64) -> Backoff {
    Backoff {
        initial: Duration::from_millis(ms),
        multiplier: 2.0,
        max: Duration::from_secs(60),
        jitter: 0.0,
    }
}

/// Runs `queue` on a task of its own until it is shut down.
fn spawn_run(queue: &Arc<JobQueue>) -> tokio::task::JoinHandle<Result<(), kafka_batch::Error>> {
    let queue = Arc::clone(queue);
    tokio::spawn(async move { queue.run().await })
}

/// A job that fails twice then succeeds runs three times, in order, each
/// after at least its backoff; one that always fails uses its retries and
/// lands on the dead topic with the reason, the attempts and the error;
/// `retry_dead` brings it back and, fixed, it succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_back_off_into_the_dead_topic_and_retry_dead_brings_a_job_back() {
    let broker = EmbeddedBroker::start().unwrap();
    init_tracing();
    let settings = queue_on(&broker, "retries", 2).await;
    let runs: Arc<Mutex<Vec<(String, Instant, Instant)>>> = Arc::default();
    let fixed = Arc::new(AtomicBool::new(false));
    let mut queue = JobQueue::new(&settings).unwrap();
    let flaky_runs = Arc::clone(&runs);
    queue.register(
        JobDefinition::new("flaky", move |job: Job| {
            let runs = Arc::clone(&flaky_runs);
            async move {
                let started = Instant::now();
                let before = runs
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|r| r.0 == job.name)
                    .count();
                runs.lock()
                    .unwrap()
                    .push((job.name.clone(), started, Instant::now()));
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
                runs.lock()
                    .unwrap()
                    .push((job.name.clone(), Instant::now(), Instant::now()));
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
    queue.enqueue(Job::new("flaky", json!({}))).await.unwrap();
    queue.enqueue(doomed.clone()).await.unwrap();
    let run = spawn_run(&queue);

    let count = |name: &str| runs.lock().unwrap().iter().filter(|r| r.0 == name).count();
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
    // Each retry came no earlier than its backoff after the run before it:
    // 200 ms, then 400 ms (waits grow; under load they only grow longer).
    let starts: Vec<Instant> = runs
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.0 == "flaky")
        .map(|r| r.1)
        .collect();
    for (i, want) in [(1, 200), (2, 400)] {
        let gap = starts[i] - starts[i - 1];
        assert!(
            gap >= Duration::from_millis(want),
            "retry {i} came after {gap:?}, before its {want} ms backoff"
        );
    }
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

/// (succeeded, dead) of a job name, from the counters (no broker request).
fn queue_stats(queue: &JobQueue, name: &str) -> (u64, u64) {
    let counts = queue.counts().get(name).copied().unwrap_or_default();
    (counts.succeeded, counts.dead)
}

/// FIFO: 5 keys, 1,000 jobs, concurrency 16: per key the jobs ran one at a
/// time in enqueue order. Jobs without a key ran side by side: each waits
/// until another one runs beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifo_jobs_keep_their_order_per_key_and_others_run_concurrently() {
    let broker = EmbeddedBroker::start().unwrap();
    init_tracing();
    let mut settings = queue_on(&broker, "fifo", 4).await;
    settings.jobs.concurrency = 16;
    let order: Arc<Mutex<BTreeMap<String, Vec<u64>>>> = Arc::default();
    let running_per_key: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let mut queue = JobQueue::new(&settings).unwrap();

    #[derive(Deserialize)]
    struct Step {
        key: String,
        seq: u64,
    }
    let (o, r) = (Arc::clone(&order), Arc::clone(&running_per_key));
    queue.register_typed(
        JobDefinition::new("step", move |step: Step| {
            let (order, running) = (Arc::clone(&o), Arc::clone(&r));
            async move {
                let overlapping = {
                    let mut running = running.lock().unwrap();
                    let n = running.entry(step.key.clone()).or_default();
                    *n += 1;
                    *n > 1
                };
                order
                    .lock()
                    .unwrap()
                    .entry(step.key.clone())
                    .or_default()
                    .push(step.seq);
                tokio::task::yield_now().await;
                *running.lock().unwrap().get_mut(&step.key).unwrap() -= 1;
                anyhow::ensure!(!overlapping, "two jobs of key {} ran at once", step.key);
                anyhow::Ok(())
            }
        })
        .fifo(true),
    );
    let (now, peak) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n, p) = (Arc::clone(&now), Arc::clone(&peak));
    queue.register(
        JobDefinition::new("side_by_side", move |_job: Job| {
            let (now, peak) = (Arc::clone(&n), Arc::clone(&p));
            async move {
                let here = now.fetch_add(1, Ordering::AcqRel) + 1;
                peak.fetch_max(here, Ordering::AcqRel);
                // Waits for the condition, not a time: another job beside it.
                let deadline = Instant::now() + Duration::from_secs(60);
                while peak.load(Ordering::Acquire) < 2 && Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                now.fetch_sub(1, Ordering::AcqRel);
                anyhow::ensure!(
                    peak.load(Ordering::Acquire) >= 2,
                    "no other job ran beside this one"
                );
                anyhow::Ok(())
            }
        })
        .retries(0),
    );
    let queue = Arc::new(queue);
    let jobs: Vec<Job> = (0..1000u64)
        .map(|seq| {
            let key = format!("k{}", seq % 5);
            Job::new("step", json!({"key": key, "seq": seq})).key(key)
        })
        .collect();
    queue.enqueue_batch(jobs).await.unwrap();
    queue
        .enqueue_batch((0..20).map(|i| Job::new("side_by_side", json!({"i": i}))))
        .await
        .unwrap();
    let run = spawn_run(&queue);
    wait_until("every job succeeded", LIMIT, || {
        queue_stats(&queue, "step").0 == 1000 && queue_stats(&queue, "side_by_side").0 == 20
    })
    .await;
    queue.shutdown();
    within(LIMIT, run).await.unwrap().unwrap();
    let order = order.lock().unwrap();
    assert_eq!(order.len(), 5);
    for (key, seqs) in order.iter() {
        let want: Vec<u64> = (0..1000u64)
            .filter(|s| format!("k{}", s % 5) == *key)
            .collect();
        assert_eq!(seqs, &want, "key {key} ran out of enqueue order");
    }
    assert!(peak.load(Ordering::Acquire) >= 2);
    let counts = queue.counts();
    assert_eq!(
        counts["step"].retried + counts["step"].dead,
        0,
        "no FIFO job overlapped its key"
    );
}

/// A job enqueued for later runs once it is due, never before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_enqueued_for_later_runs_when_due_and_not_before() {
    let broker = EmbeddedBroker::start().unwrap();
    init_tracing();
    let settings = queue_on(&broker, "later", 1).await;
    let ran: Arc<Mutex<Vec<(String, SystemTime)>>> = Arc::default();
    let mut queue = JobQueue::new(&settings).unwrap();
    let r = Arc::clone(&ran);
    queue.register(JobDefinition::new("remind", move |job: Job| {
        let ran = Arc::clone(&r);
        async move {
            ran.lock()
                .unwrap()
                .push((job.id.clone(), SystemTime::now()));
            anyhow::Ok(())
        }
    }));
    let queue = Arc::new(queue);
    let run = spawn_run(&queue);
    let due = SystemTime::now() + Duration::from_millis(1500);
    let later = Job::new("remind", json!({"what": "later"}));
    queue.enqueue_at(later.clone(), due).await.unwrap();
    let soon = Job::new("remind", json!({"what": "now"}));
    queue.enqueue(soon.clone()).await.unwrap();
    wait_until("both ran", LIMIT, || ran.lock().unwrap().len() == 2).await;
    let ran = ran.lock().unwrap().clone();
    let at = |id: &str| ran.iter().find(|(i, _)| i == id).map(|(_, t)| *t).unwrap();
    assert!(
        at(&later.id) >= due,
        "ran {:?} before it was due",
        due.duration_since(at(&later.id))
    );
    queue.shutdown();
    within(LIMIT, run).await.unwrap().unwrap();
}

/// A worker dropped while jobs run (no shutdown): after a new worker
/// starts, every job ran at least once, and the group committed the active
/// topic to its end. Runs go to the promise checker's recorder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_dropped_mid_run_loses_no_job() {
    let broker = EmbeddedBroker::start().unwrap();
    init_tracing();
    let settings = queue_on(&broker, "killed", 4).await;
    let recorder = Recorder::default();
    let make = |instance: u32| {
        let mut queue = JobQueue::new(&settings).unwrap();
        let recorder = recorder.clone();
        queue.register(JobDefinition::new("work", move |job: Job| {
            let recorder = recorder.clone();
            async move {
                let index = {
                    let mut log = recorder.lock();
                    log.next_call += 1;
                    let call = log.next_call;
                    let attempt = {
                        let a = log.attempts.entry(job.id.clone()).or_insert(0);
                        *a += 1;
                        *a
                    };
                    log.calls.push(Call {
                        call,
                        instance,
                        topic: "killed.jobs".into(),
                        partition: -1,
                        offset: -1,
                        id: job.id.clone(),
                        attempt,
                        outcome: Outcome::Ok,
                        rebalances: 0,
                        started: Instant::now(),
                        returned: None,
                    });
                    log.calls.len() - 1
                };
                // The first worker's jobs after its 50th never end: it is
                // dropped while they run.
                if instance == 1 && index >= 50 {
                    std::future::pending::<()>().await;
                }
                tokio::task::yield_now().await;
                recorder.returned(index, index + 1);
                anyhow::Ok(())
            }
        }));
        Arc::new(queue)
    };
    let first = make(1);
    let ids: Vec<String> = (0..300).map(|i| format!("job-{i}")).collect();
    let jobs = ids.iter().map(|id| Job {
        id: id.clone(),
        ..Job::new("work", json!({}))
    });
    first.enqueue_batch(jobs).await.unwrap();
    let run = spawn_run(&first);
    wait_until("the first worker is stuck in jobs", LIMIT, || {
        recorder
            .lock()
            .calls
            .iter()
            .filter(|c| c.returned.is_none())
            .count()
            >= 2
    })
    .await;
    // Dropped, not shut down: what was running is abandoned uncommitted.
    run.abort();
    let _ = run.await;
    drop(first);
    let ran_by_first = recorder.lock().calls.len();

    let second = make(2);
    let run = spawn_run(&second);
    let mut watcher = CommitWatcher::new(
        broker.bootstrap_servers(),
        "killed.workers",
        vec!["killed.jobs".into()],
    );
    let ends: BTreeMap<i32, i64> = (0..4)
        .map(|p| (p, broker_end(&broker, "killed.jobs", p)))
        .collect();
    let deadline = Instant::now() + LIMIT;
    loop {
        let committed = {
            let r = recorder.clone();
            tokio::task::block_in_place(|| watcher.read_once(&r))
        };
        if ends
            .iter()
            .all(|(p, end)| committed.get(&("killed.jobs".to_string(), *p)) == Some(end))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the active topic was not committed to its end: {committed:?}, ends {ends:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    second.shutdown();
    within(LIMIT, run).await.unwrap().unwrap();
    let calls = recorder.calls();
    for id in &ids {
        assert!(
            calls.iter().any(|c| c.id == *id && c.returned.is_some()),
            "job {id} never ran to its end"
        );
    }
    assert!(
        ran_by_first < 300,
        "the first worker was dropped before it ran everything"
    );
    let cut_short: Vec<&Call> = calls
        .iter()
        .filter(|c| c.instance == 1 && c.returned.is_none())
        .collect();
    assert!(
        !cut_short.is_empty(),
        "jobs were running when the worker was dropped"
    );
    for c in cut_short {
        assert!(
            calls
                .iter()
                .any(|d| d.id == c.id && d.instance == 2 && d.returned.is_some()),
            "job {} was cut short and never ran again",
            c.id
        );
    }
    assert!(
        calls.iter().any(|c| c.instance == 2),
        "the second worker ran jobs"
    );
}

/// The log end of a partition.
fn broker_end(broker: &EmbeddedBroker, topic: &str, partition: i32) -> i64 {
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
