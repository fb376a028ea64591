//! The job queue's order and delivery on the embedded broker: FIFO by key
//! beside concurrent jobs, jobs scheduled for later, and a worker dropped
//! mid-run (its runs written to the promise checker's recorder).

mod common;
#[path = "promise/recorder.rs"]
#[allow(dead_code)]
mod recorder;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::jobs::{broker_end, queue_on, queue_stats, spawn_run};
use common::*;
use kafka_batch::jobs::{Job, JobDefinition, JobQueue};
use kafka_batch::testing::EmbeddedBroker;
use recorder::{Call, CommitWatcher, Outcome, Recorder};
use serde::Deserialize;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(120);

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
