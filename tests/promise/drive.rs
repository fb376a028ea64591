//! Runs one scenario against a fresh embedded broker: produces the waves,
//! runs the members under a supervisor that restarts them, applies the
//! timeline, and waits until every record is settled (or the run stalls).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use kafka_batch::replay::{DeadLetter, Replay};
use kafka_batch::settings::FailurePolicy;
use kafka_batch::testing::EmbeddedBroker;
use kafka_batch::{Consumer, ConsumerHandle, ConsumerSettings, Error};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use super::recorder::{CommitWatcher, Exit, Recorder};
use super::scenario::{Event, Kind, Scenario};

pub use super::handler::process;

/// The tail record's coordinates, what `process` returned for it and the variant.
pub type Tail = ((String, i32, i64), Result<(), String>, &'static str);

/// A record to produce: partition, key, value (owned).
type Owned = (i32, Option<Vec<u8>>, Option<Vec<u8>>);

/// What the checker gets from a run.
pub struct Run {
    pub recorder: Recorder,
    /// Every record of every topic at the end, by (topic, partition), in offset order.
    pub logs: BTreeMap<(String, i32), Vec<DeadLetter>>,
    pub dead: Vec<DeadLetter>,
    /// Why the run stopped waiting, when it did not settle.
    pub unsettled: Option<String>,
    /// The tail record's coordinates and what `process` returned for it.
    pub tail: Option<Tail>,
    pub started: Instant,
}

enum Cmd {
    /// Seek one partition back this many records before its commit; the
    /// instance goes on.
    SeekBack(i64),
    Shutdown,
    Crash,
    /// Shut down and do not restart.
    Stop,
}

pub struct Ctx {
    pub sc: Arc<Scenario>,
    pub settings: ConsumerSettings,
    pub recorder: Recorder,
    pub instances: AtomicU32,
}

/// The variant's name, for the contract check.
pub fn variant(e: &Error) -> &'static str {
    match e {
        Error::Handler { .. } => "Handler",
        Error::Decode(_) => "Decode",
        Error::Commit(_) => "Commit",
        Error::FailureTopic(_) => "FailureTopic",
        Error::Kafka(_) => "Kafka",
        Error::Internal(_) => "Internal",
        _ => "other",
    }
}

fn settings(sc: &Scenario, broker: &EmbeddedBroker) -> ConsumerSettings {
    let group = sc.group();
    let topics: Vec<&str> = sc.topics.iter().map(|(t, _)| t.as_str()).collect();
    let mut s = if sc.precommit_start {
        // The library's own default reset (latest) for every topic.
        ConsumerSettings::new(broker.bootstrap_servers(), &group, &topics)
    } else {
        broker.consumer_settings(&group, &topics)
    };
    s.service = "promise".into();
    s.batch_size = sc.batch_size;
    s.batch_timeout_ms = sc.batch_timeout_ms;
    s.concurrency = sc.concurrency;
    s.clients = sc.clients;
    s.ordering = sc.ordering;
    s.commit_interval_ms = sc.commit_interval_ms;
    if let Some(cap) = sc.max_in_flight {
        s.max_in_flight_records = cap;
    }
    s.failure.policies = sc.chain.clone();
    let (r, rt) = (sc.retry, sc.retry_topic);
    s.failure.retry.retries = r.retries;
    s.failure.retry.backoff_ms = r.backoff_ms;
    s.failure.retry.backoff_multiplier = r.multiplier;
    s.failure.retry.max_backoff_ms = 2000;
    s.failure.retry.jitter = r.jitter;
    s.failure.retry_topic.topic = sc.retry_topic_name();
    s.failure.retry_topic.retries = rt.retries;
    s.failure.retry_topic.backoff_ms = rt.backoff_ms;
    s.failure.retry_topic.backoff_multiplier = rt.multiplier;
    s.failure.retry_topic.max_backoff_ms = 10_000;
    s.failure.retry_topic.jitter = rt.jitter;
    s.failure.dead_letter.topic = sc.dead_topic_name();
    s.kafka.set("heartbeat.interval.ms", "300");
    s.kafka.set("session.timeout.ms", "6000");
    // Also the rebalance timeout: the mock cluster waits this long for a
    // member that was closed in the middle of joining (300 s by default).
    s.kafka.set("max.poll.interval.ms", "10000");
    s.revoke_timeout_ms = 5000;
    if sc.cooperative {
        s.kafka
            .set("partition.assignment.strategy", "cooperative-sticky");
    }
    s
}

/// Runs consumer instances one after another, as a supervisor would: it
/// restarts one that stopped (by itself, a shutdown, or a crash) until told
/// to stop, at most `max_restarts` times.
async fn supervise(ctx: Arc<Ctx>, mut commands: mpsc::UnboundedReceiver<Cmd>, max_restarts: u64) {
    let mut restarts = 0;
    loop {
        let instance = ctx.instances.fetch_add(1, Ordering::AcqRel) + 1;
        let consumer = Consumer::new(&ctx.settings).expect("the scenario's settings are valid");
        let handle = consumer.handle();
        let mut task = tokio::spawn(process(Arc::clone(&ctx), instance, consumer));
        let mut stop = false;
        let (asked, joined) = loop {
            tokio::select! {
                joined = &mut task => break ("", joined),
                cmd = commands.recv() => match cmd {
                    Some(Cmd::SeekBack(back)) => seek_back(&ctx, instance, &handle, back).await,
                    Some(Cmd::Crash) => {
                        task.abort();
                        break ("crash", task.await);
                    }
                    Some(Cmd::Shutdown) => {
                        handle.shutdown();
                        break ("shutdown", task.await);
                    }
                    Some(Cmd::Stop) | None => {
                        stop = true;
                        handle.shutdown();
                        break ("shutdown", task.await);
                    }
                },
            }
        };
        let (result, variant_name) = match joined {
            Ok(Ok(())) => (Ok(()), "Ok"),
            Ok(Err(e)) => (Err(e.to_string()), variant(&e)),
            Err(j) if j.is_panic() => {
                let text = j
                    .into_panic()
                    .downcast::<String>()
                    .map(|s| *s)
                    .unwrap_or_else(|_| "a panic".into());
                (Err(format!("PANIC: {text}")), "panic")
            }
            Err(_) => (Err("dropped".into()), "dropped"),
        };
        {
            let mut log = ctx.recorder.lock();
            log.exits.push(Exit {
                instance,
                asked,
                result,
                variant: variant_name,
                at: Instant::now(),
            });
        }
        if stop {
            return;
        }
        restarts += 1;
        {
            let mut log = ctx.recorder.lock();
            log.restarts += 1;
            log.disturbed = true;
        }
        if restarts > max_restarts {
            ctx.recorder.note(format!(
                "the supervisor gave up after {max_restarts} restarts"
            ));
            // Wait for the stop so the run ends as a stall, with what is missing.
            while let Some(cmd) = commands.recv().await {
                if matches!(cmd, Cmd::Stop) {
                    return;
                }
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Seeks the first main-topic partition `instance` holds back to `back`
/// records before its committed offset, writing the seek down before it is
/// asked (the order check lets a partition go back once per seek).
async fn seek_back(ctx: &Ctx, instance: u32, handle: &ConsumerHandle, back: i64) {
    let retry = ctx.sc.retry_topic_name();
    // An instance just started (or rebalancing) holds nothing yet: wait a
    // little for a partition to seek.
    let mut target = None;
    for _ in 0..20 {
        match handle.lag().await {
            Ok(lag) => target = lag.into_iter().find(|l| *l.partition.topic != *retry),
            Err(e) => tracing::info!(error = %e, "promise checker: lag() failed"),
        }
        if target.is_some() || handle.is_shutting_down() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let Some(target) = target else {
        tracing::info!("promise checker: no partition to seek back");
        return;
    };
    let offset = (target.committed.unwrap_or(0) - back).max(0);
    let (topic, partition) = (
        target.partition.topic.to_string(),
        target.partition.partition,
    );
    ctx.recorder
        .lock()
        .seeks
        .push((instance, topic.clone(), partition, Instant::now()));
    // A rebalance may have taken the partition meanwhile, or librdkafka may
    // not be fetching it yet: then there is no seek, and nothing to check.
    match handle.seek(&topic, partition, offset).await {
        Ok(()) => ctx.recorder.lock().seeks_made += 1,
        Err(e) => tracing::debug!(error = %e, "promise checker: seek back refused"),
    }
}

fn good_value(index: usize) -> Vec<u8> {
    format!(r#"{{"item":{{"i":{index}}},"hist":null}}"#).into_bytes()
}

/// Produces records `range` of the scenario and waits for every delivery
/// report, writing again what the broker refused (an injected Produce
/// error is aimed at the library's writes, not at the test's input).
async fn produce(bootstrap: String, sc: Arc<Scenario>, range: std::ops::Range<usize>) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("the test producer");
    let mut pending: Vec<(String, Owned)> = Vec::new();
    for i in range {
        let rec = sc.records[i];
        let key = Some(sc.id(i).into_bytes());
        let (key, value) = match rec.kind {
            Kind::Good(_) => (key, Some(good_value(i))),
            Kind::NotJson => (key, Some(b"\x00not json".to_vec())),
            Kind::NoItem => (key, Some(format!(r#"{{"i":{i}}}"#).into_bytes())),
            Kind::NullKey => (None, Some(good_value(i))),
            Kind::Tombstone => (key, None),
        };
        pending.push((sc.topics[rec.topic].0.clone(), (rec.partition, key, value)));
    }
    for _ in 0..20 {
        if pending.is_empty() {
            return;
        }
        let mut waiting = Vec::with_capacity(pending.len());
        for (topic, (partition, key, value)) in &pending {
            let mut record: FutureRecord<'_, [u8], [u8]> =
                FutureRecord::to(topic).partition(*partition);
            record.key = key.as_deref();
            record.payload = value.as_deref();
            waiting.push(producer.send_result(record).ok());
        }
        let mut again = Vec::new();
        for (delivery, item) in waiting.into_iter().zip(pending) {
            let delivered = match delivery {
                Some(future) => matches!(future.await, Ok(Ok(_))),
                None => false,
            };
            if !delivered {
                again.push(item);
            }
        }
        pending = again;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "the test producer could not deliver {} record(s)",
        pending.len()
    );
}

/// Commits offset 0 for every source partition, as the group, before it first runs.
fn precommit(broker: &EmbeddedBroker, sc: &Scenario) {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", broker.bootstrap_servers())
        .set("group.id", sc.group())
        .set("enable.auto.commit", "false")
        .create()
        .expect("a client for the first commit");
    let mut tpl = TopicPartitionList::new();
    for (topic, partitions) in &sc.topics {
        for p in 0..*partitions {
            tpl.add_partition_offset(topic, p, Offset::Offset(0))
                .expect("offset 0 is valid");
        }
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .expect("the group's first commit");
}

fn read_topic(broker: &EmbeddedBroker, topic: &str) -> Vec<DeadLetter> {
    // A read right after a broker came back may fail once; try again.
    for _ in 0..5 {
        if let Ok(records) = Replay::new(broker.bootstrap_servers(), topic).read() {
            return records;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("cannot read topic {topic} back at the end of the run");
}

/// Runs the scenario; the checker judges what it returns.
pub async fn run(sc: Arc<Scenario>) -> Run {
    let started = Instant::now();
    let broker = Arc::new(
        EmbeddedBroker::start_with_brokers(sc.brokers).expect("the embedded cluster starts"),
    );
    for (topic, partitions) in &sc.topics {
        broker
            .create_topic(topic, *partitions)
            .expect("topic created");
    }
    let mut watched: Vec<String> = sc.topics.iter().map(|(t, _)| t.clone()).collect();
    if sc.has(FailurePolicy::RetryTopic) {
        broker
            .create_topic(&sc.retry_topic_name(), sc.retry_partitions)
            .expect("retry topic created");
        watched.push(sc.retry_topic_name());
    }
    if sc.has(FailurePolicy::DeadLetter) {
        broker
            .create_topic(&sc.dead_topic_name(), 1)
            .expect("dead-letter topic created");
    }
    let recorder = Recorder::default();
    let ctx = Arc::new(Ctx {
        settings: settings(&sc, &broker),
        sc: Arc::clone(&sc),
        recorder: recorder.clone(),
        instances: AtomicU32::new(0),
    });
    if sc.precommit_start {
        let (b, s) = (Arc::clone(&broker), Arc::clone(&sc));
        tokio::task::spawn_blocking(move || precommit(&b, &s))
            .await
            .expect("precommit thread");
    }
    produce(
        broker.bootstrap_servers().to_owned(),
        Arc::clone(&sc),
        sc.waves[0].1.clone(),
    )
    .await;
    let stop_watching = Arc::new(AtomicBool::new(false));
    // If the run panics (a test bug), the watcher's blocking thread must
    // still stop, or the runtime waits for it forever.
    let _stop_on_unwind = StopOnDrop(Arc::clone(&stop_watching));
    let latest = Arc::new(Mutex::new(BTreeMap::new()));
    let watcher = CommitWatcher::new(broker.bootstrap_servers(), &sc.group(), watched.clone())
        .spawn(
            recorder.clone(),
            Duration::from_millis(75),
            Arc::clone(&stop_watching),
            Arc::clone(&latest),
        );

    let max_restarts = 6 + 3 * sc.records.len() as u64 / 50;
    let (primary_tx, primary_rx) = mpsc::unbounded_channel();
    let primary = tokio::spawn(supervise(Arc::clone(&ctx), primary_rx, max_restarts));
    let mut second: Option<(mpsc::UnboundedSender<Cmd>, tokio::task::JoinHandle<()>)> = None;

    // The timeline: production waves and events, in time order.
    let mut timeline: Vec<(u64, Option<std::ops::Range<usize>>, Option<Event>)> = sc.waves[1..]
        .iter()
        .map(|(at, r)| (*at, Some(r.clone()), None))
        .chain(sc.events.iter().map(|(at, e)| (*at, None, Some(e.clone()))))
        .collect();
    timeline.sort_by_key(|(at, _, _)| *at);
    let t0 = Instant::now();
    let mut background = Vec::new();
    for (at, wave, event) in timeline {
        let when = t0 + Duration::from_millis(at);
        tokio::time::sleep_until(when.into()).await;
        if let Some(range) = wave {
            let (b, s) = (broker.bootstrap_servers().to_owned(), Arc::clone(&sc));
            background.push(tokio::spawn(produce(b, s, range)));
        }
        let Some(event) = event else { continue };
        let mut log = recorder.lock();
        match event {
            Event::JoinSecond => {
                log.disturbed = true;
                let (tx, rx) = mpsc::unbounded_channel();
                second = Some((
                    tx,
                    tokio::spawn(supervise(Arc::clone(&ctx), rx, max_restarts)),
                ));
            }
            Event::LeaveSecond => {
                if let Some((tx, _)) = &second {
                    let _ = tx.send(Cmd::Stop);
                }
            }
            Event::Errors(api, errors) => {
                log.disturbed = true;
                log.faults += errors.len() as u64;
                broker
                    .request_errors(api, &errors)
                    .expect("errors injected");
            }
            Event::BrokerDown(id, ms) => {
                log.disturbed = true;
                log.faults += 1;
                broker.broker_down(id).expect("broker down");
                let b = Arc::clone(&broker);
                background.push(tokio::task::spawn_blocking(move || {
                    std::thread::sleep(Duration::from_millis(ms));
                    b.broker_up(id).expect("broker up");
                }));
            }
            Event::Shutdown => {
                log.disturbed = true;
                let _ = primary_tx.send(Cmd::Shutdown);
            }
            Event::Crash => {
                log.disturbed = true;
                let _ = primary_tx.send(Cmd::Crash);
            }
            Event::SeekBack(back) => {
                log.disturbed = true;
                let _ = primary_tx.send(Cmd::SeekBack(back));
            }
        }
    }
    for task in background {
        task.await.expect("a producer or broker task");
    }

    let unsettled = wait_settled(&sc, &broker, &recorder, &latest, &watched).await;

    let _ = primary_tx.send(Cmd::Stop);
    if let Some((tx, task)) = second.take() {
        let _ = tx.send(Cmd::Stop);
        task.await.expect("second member's supervisor");
    }
    primary.await.expect("primary supervisor");

    let tail = if sc.tail_garbage && unsettled.is_none() {
        Some(run_tail(&ctx, &broker).await)
    } else {
        None
    };

    stop_watching.store(true, Ordering::Release);
    watcher.await.expect("commit watcher");
    let b = Arc::clone(&broker);
    let dead_name = sc.dead_topic_name();
    let has_dead = sc.has(FailurePolicy::DeadLetter);
    let (logs, dead) = tokio::task::spawn_blocking(move || {
        let mut logs = BTreeMap::new();
        for topic in &watched {
            for r in read_topic(&b, topic) {
                logs.entry((topic.clone(), r.partition))
                    .or_insert_with(Vec::new)
                    .push(r);
            }
        }
        let dead = if has_dead {
            read_topic(&b, &dead_name)
        } else {
            Vec::new()
        };
        (logs, dead)
    })
    .await
    .expect("reading the topics back");
    Run {
        recorder,
        logs,
        dead,
        unsettled,
        tail,
        started,
    }
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Waits until every partition's commit is at its end; `Some(why)` if the
/// run stalls (nothing handled or committed for a while) or takes too long.
async fn wait_settled(
    sc: &Scenario,
    broker: &Arc<EmbeddedBroker>,
    recorder: &Recorder,
    latest: &Arc<Mutex<BTreeMap<(String, i32), i64>>>,
    watched: &[String],
) -> Option<String> {
    let ends_client: Arc<BaseConsumer> = Arc::new(
        ClientConfig::new()
            .set("bootstrap.servers", broker.bootstrap_servers())
            .create()
            .expect("a client for the log ends"),
    );
    let stall = Duration::from_secs(25)
        + Duration::from_millis(
            sc.retry_topic.backoff_ms * (1 + sc.retry_topic.retries as u64) * 2,
        );
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut last_progress = (Instant::now(), 0usize, 0usize);
    loop {
        let client = Arc::clone(&ends_client);
        let topics: Vec<(String, i32)> = watched
            .iter()
            .map(|t| {
                let n = if *t == sc.retry_topic_name() {
                    sc.retry_partitions
                } else {
                    sc.topics
                        .iter()
                        .find(|(name, _)| name == t)
                        .map_or(0, |x| x.1)
                };
                (t.clone(), n)
            })
            .collect();
        let ends = tokio::task::spawn_blocking(move || {
            let mut ends = BTreeMap::new();
            for (t, n) in topics {
                for p in 0..n {
                    match client.fetch_watermarks(&t, p, Duration::from_secs(5)) {
                        Ok((_, high)) => {
                            ends.insert((t.clone(), p), high);
                        }
                        Err(_) => return None,
                    }
                }
            }
            Some(ends)
        })
        .await
        .expect("log ends thread");
        let committed = latest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(ends) = &ends {
            let behind: Vec<String> = ends
                .iter()
                .filter(|(k, end)| committed.get(*k).copied().unwrap_or(0) != **end)
                .map(|((t, p), end)| {
                    format!(
                        "{t}:{p} committed {:?} of {end}",
                        committed.get(&(t.clone(), *p))
                    )
                })
                .collect();
            if behind.is_empty() {
                return None;
            }
            let (calls, commits) = {
                let log = recorder.lock();
                (log.calls.len(), log.commits.len())
            };
            if (calls, commits) != (last_progress.1, last_progress.2) {
                last_progress = (Instant::now(), calls, commits);
            } else if last_progress.0.elapsed() > stall {
                return Some(format!(
                    "stalled for {}s with partitions behind: {}",
                    stall.as_secs(),
                    behind.join(", ")
                ));
            }
            if Instant::now() > deadline {
                return Some(format!(
                    "deadline passed with partitions behind: {}",
                    behind.join(", ")
                ));
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Produces one undecodable record at the end of the first partition and
/// runs a consumer until it stops on it.
async fn run_tail(ctx: &Arc<Ctx>, broker: &Arc<EmbeddedBroker>) -> Tail {
    let topic = ctx.sc.topics[0].0.clone();
    let (b, t) = (Arc::clone(broker), topic.clone());
    let offset = tokio::task::spawn_blocking(move || {
        let client: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", b.bootstrap_servers())
            .create()
            .expect("a client for the log end");
        let (_, high) = client
            .fetch_watermarks(&t, 0, Duration::from_secs(10))
            .expect("the log end");
        // Written again while the broker refuses it: an injected Produce
        // error may still be pending, and the record must exist for the
        // check that follows.
        let mut attempts = 0;
        while let Err(e) = b.produce_raw(&t, &[(0, Some(b"tail"), Some(b"\x00not json"))]) {
            attempts += 1;
            assert!(attempts < 10, "the tail record is delivered: {e}");
        }
        high
    })
    .await
    .expect("tail producer");
    let instance = ctx.instances.fetch_add(1, Ordering::AcqRel) + 1;
    let consumer = Consumer::new(&ctx.settings).expect("the scenario's settings are valid");
    let handle = consumer.handle();
    let run = tokio::spawn(process(Arc::clone(ctx), instance, consumer));
    let (result, name) = match tokio::time::timeout(Duration::from_secs(60), run).await {
        Ok(Ok(Ok(()))) => (Ok(()), "Ok"),
        Ok(Ok(Err(e))) => (Err(e.to_string()), variant(&e)),
        Ok(Err(j)) => (Err(format!("PANIC or drop: {j}")), "panic"),
        Err(_) => {
            handle.shutdown();
            (Err("did not stop within 60 s".into()), "timeout")
        }
    };
    ((topic, 0, offset), result, name)
}
