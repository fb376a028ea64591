//! A job queue on the embedded broker: a job that always fails (retried
//! with backoff, then dead), one scheduled for later, a FIFO group of
//! steps per customer, and plain jobs; the workers run them, and the
//! example prints what ran, what was retried, what is dead, and the counts.
//!
//! ```sh
//! cargo run --release --example jobs    # embedded broker, no set-up
//! ```

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kafka_batch::jobs::{Job, JobDefinition, JobQueue};
use kafka_batch::settings::Backoff;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::Settings;
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Step {
    customer: String,
    step: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let broker = EmbeddedBroker::start()?;
    // librdkafka's mock cluster has no CreateTopics: make the topics here,
    // and init() finds them (on a real broker, init() creates them).
    for topic in ["shop.jobs", "shop.delayed", "shop.dead"] {
        broker.create_topic(topic, 4)?;
    }
    let settings = Settings::from_figment(
        Settings::figment()
            .merge(("bootstrap_servers", broker.bootstrap_servers()))
            .merge(("service", "jobs-example"))
            .merge(("jobs.queue", "shop"))
            .merge(("jobs.concurrency", 8)),
    )?;
    let started = Instant::now();
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let say = {
        let log = Arc::clone(&log);
        move |line: String| {
            let line = format!("{:>6} ms  {line}", started.elapsed().as_millis());
            log.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    };

    let mut queue = JobQueue::new(&settings)?;
    let fast = Backoff {
        initial: Duration::from_millis(200),
        multiplier: 2.0,
        max: Duration::from_secs(5),
        jitter: 0.1,
    };
    let s = say.clone();
    queue.register(
        JobDefinition::new("charge_card", move |job: Job| {
            let say = s.clone();
            async move {
                say(format!(
                    "charge_card {} fails: card declined",
                    job.args["order"]
                ));
                Err::<(), _>(anyhow::anyhow!("card declined"))
            }
        })
        .retries(3)
        .backoff(fast),
    );
    let s = say.clone();
    queue.register_typed(
        JobDefinition::new("onboarding", move |step: Step| {
            let say = s.clone();
            async move {
                say(format!("onboarding {} step {}", step.customer, step.step));
                anyhow::Ok(())
            }
        })
        .fifo(true),
    );
    let s = say.clone();
    queue.register(JobDefinition::new("send_receipt", move |job: Job| {
        let say = s.clone();
        async move {
            say(format!("send_receipt {}", job.args["order"]));
            anyhow::Ok(json!({"sent": true}))
        }
    }));
    println!("topics: {}", queue.init().await?);

    queue
        .enqueue(Job::new("charge_card", json!({"order": 1})))
        .await?;
    queue
        .enqueue_in(
            Job::new("send_receipt", json!({"order": "later"})),
            Duration::from_secs(2),
        )
        .await?;
    let steps = ["ada", "grace"].into_iter().flat_map(|customer| {
        (1..=4).map(move |step| {
            Job::new("onboarding", json!({"customer": customer, "step": step})).key(customer)
        })
    });
    queue.enqueue_batch(steps).await?;
    queue
        .enqueue_batch((2..6).map(|order| Job::new("send_receipt", json!({"order": order}))))
        .await?;
    queue
        .enqueue(Job::new("refund", json!({"order": 7})))
        .await?;

    let queue = Arc::new(queue);
    let worker = Arc::clone(&queue);
    let run = tokio::spawn(async move { worker.run().await });
    // Until every job is settled: 13 succeeded, 2 dead.
    loop {
        let counts = queue.counts();
        let settled: u64 = counts.values().map(|c| c.succeeded + c.dead).sum();
        if settled == 15 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    queue.shutdown();
    run.await??;

    println!("\nwhat ran:");
    for line in log.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        println!("  {line}");
    }
    println!("\ndead:");
    for dead in queue.dead().await? {
        println!(
            "  {} {} reason={} attempts={} error={:?}",
            dead.job.name, dead.job.args, dead.reason, dead.attempts, dead.error
        );
    }
    let stats = queue.stats().await?;
    println!(
        "\ncounts (waiting: {} active, {} delayed):",
        stats.waiting.active, stats.waiting.delayed
    );
    for (name, c) in &stats.jobs {
        println!(
            "  {name:<13} enqueued {:>2}  succeeded {:>2}  retried {}  dead {}",
            c.enqueued, c.succeeded, c.retried, c.dead
        );
    }
    Ok(())
}
