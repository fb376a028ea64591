//! The promise on a real broker: at least once, never a gap, proven with
//! real consumer processes (`examples/group_member.rs`) that join, leave,
//! are killed with SIGKILL and stopped with SIGTERM.
//!
//! `scripts/test.sh` installs tansu (an Apache Kafka compatible broker),
//! starts it on a free loopback port and runs these tests with:
//!
//! - `REAL_BROKER_BOOTSTRAP`: the broker's address; without it every test
//!   here says it was skipped and passes, so `cargo test` alone still runs
//!   the other tiers;
//! - `REAL_BROKER_MEMBER_BIN`: the member binary (default
//!   `target/release/examples/group_member`);
//! - `REAL_BROKER_SEED`: replays a kill schedule (each run prints its seed).
//!
//! Every member appends what it handled to its own file before its handler
//! returns `Ok`; the checks compare those files with the group's committed
//! offsets and the topic's log end. Each test makes its own topic and group.
//! Lines starting with `RELIABILITY` are the figures RELIABILITY.md records.

mod common;
#[path = "real_broker/harness.rs"]
mod harness;
#[path = "real_broker/order.rs"]
mod order;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::report;
use harness::{assert_no_commit_ahead, produce, real_broker, wait_until, Rng, Run};
use kafka_batch::{Message, Producer, ProducerSettings};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Records of the group and crash runs.
const RECORDS: usize = 200_000;

/// How long the crash run's group may commit nothing while records remain
/// before the test fails: a member holding partitions it does not fetch.
/// (A killed member's partitions move on after its 6 s session timeout and
/// a rejoin, and a batch takes 1 s.)
const STALL: Duration = Duration::from_secs(60);

fn sleep_ms(ms: u64) -> (&'static str, String) {
    ("MEMBER_SLEEP_MS", ms.to_string())
}

/// Three member processes handle 200,000 records while members join and
/// leave: every id is handled, and the commits end at the log end.
#[tokio::test(flavor = "multi_thread")]
async fn group_with_members_joining_and_leaving_handles_every_record() {
    let Some(bootstrap) =
        real_broker("group_with_members_joining_and_leaving_handles_every_record")
    else {
        return;
    };
    let mut run = Run::new(&bootstrap, "rb-group", 8).await;
    let produced_at = Instant::now();
    produce(&bootstrap, &run.topic, 0..RECORDS).await;
    let produce_secs = produced_at.elapsed().as_secs_f64();
    // Members pace themselves (20 ms a batch of 500) so the group changes
    // while there is work left.
    let pace = [sleep_ms(20)];
    let started = Instant::now();
    let mut first = run.start_member(&pace);
    let limit = Duration::from_secs(240);
    let handled_at_least = |run: &Run, n: usize| run.handled().total() >= n;
    wait_until("20,000 handled", limit, || handled_at_least(&run, 20_000)).await;
    let mut second = run.start_member(&pace);
    wait_until("60,000 handled", limit, || handled_at_least(&run, 60_000)).await;
    let mut third = run.start_member(&pace);
    assert_no_commit_ahead(&run, "after two members joined");
    wait_until("100,000 handled", limit, || handled_at_least(&run, 100_000)).await;
    first.stop().await;
    assert_no_commit_ahead(&run, "after a member left");
    wait_until("130,000 handled", limit, || handled_at_least(&run, 130_000)).await;
    let mut fourth = run.start_member(&pace);

    run.wait_all_committed(limit).await;
    let elapsed = started.elapsed().as_secs_f64();
    for member in [&mut second, &mut third, &mut fourth] {
        member.stop().await;
    }

    let handled = run.handled();
    let missing = handled.missing(RECORDS);
    assert!(
        missing.is_empty(),
        "ids never handled: {:?}",
        &missing[..missing.len().min(10)]
    );
    let ends = run.watermarks();
    let committed = run.committed();
    for (p, (_, end)) in &ends {
        assert_eq!(
            committed.get(p),
            Some(end),
            "partition {p} committed to its log end"
        );
    }
    assert_no_commit_ahead(&run, "at the end");
    report(&format!(
        "group: {RECORDS} records on 8 partitions produced at {:.0}/s; 4 member processes (3 at once, one joined, one left, one joined) handled them in {elapsed:.1} s ({:.0}/s paced at 20 ms a batch); lost 0; duplicates {}; commits at log end on every partition",
        RECORDS as f64 / produce_secs,
        RECORDS as f64 / elapsed,
        handled.duplicates()
    ));
}

/// Members are killed with SIGKILL at random moments, at least 10 times,
/// and replaced: no id is lost, no commit ever runs ahead of what was
/// handled, and the duplicates are bounded by what the killed members had
/// handled but not yet committed.
#[tokio::test(flavor = "multi_thread")]
async fn members_killed_mid_batch_lose_nothing() {
    let Some(bootstrap) = real_broker("members_killed_mid_batch_lose_nothing") else {
        return;
    };
    // A second a batch of 500: the run lasts long enough for every kill to
    // land while there is work left, and most kills catch a member between
    // handling a batch and committing it.
    crash_run(&bootstrap, "rb-crash", &[sleep_ms(1000)], None).await;
}

/// The crash run with lanes: each member keeps 8 batches in the handler at
/// once, ordered by key (1,000 keys over 8 partitions), and each key's
/// records must be handled in offset order by every member.
#[tokio::test(flavor = "multi_thread")]
async fn members_with_key_lanes_killed_mid_batch_lose_nothing_and_keep_key_order() {
    let Some(bootstrap) =
        real_broker("members_with_key_lanes_killed_mid_batch_lose_nothing_and_keep_key_order")
    else {
        return;
    };
    // Eight batches of 100 at once, each 1.6 s: about the pace of the run
    // above (500 records a second a member).
    let env = [
        sleep_ms(1600),
        ("KAFKA_BATCH_CONSUMER__CONCURRENCY", "8".to_string()),
        ("KAFKA_BATCH_CONSUMER__ORDERING", "key".to_string()),
        ("KAFKA_BATCH_CONSUMER__BATCH_SIZE", "100".to_string()),
    ];
    crash_run(&bootstrap, "rb-lanes", &env, Some(1_000)).await;
}

/// Waits for the group to commit the rest of the backlog after the kills,
/// and returns how many members it had to add to make tansu hand out
/// partitions it had left with nobody.
///
/// A group that stops committing while records remain is a failure, not
/// something to wait out: that is how this run found members that held
/// partitions and never fetched them (a pause kept across a revoke and
/// re-assign, see RELIABILITY.md). One case is tansu's, not ours: a member
/// killed while it was joining is still given partitions by the rebalance
/// the next member's join starts (DescribeGroups no longer counts it, so the
/// wait for the broker to drop it passes), and tansu 0.6.0 does not rebalance
/// when that dead member's session ends. Its partitions then belong to no
/// member that runs, which the members' own `partitions assigned` and
/// `partitions revoked` lines show. Then, and only then, one more member
/// joins, as an operator would start one, and the wait goes on. A stall
/// with every unfinished partition held by a running member fails at once.
async fn drain(
    run: &mut Run,
    members: &mut Vec<harness::Member>,
    killed_at: &HashMap<String, time::OffsetDateTime>,
    pace: &[(&'static str, String)],
    seed: u64,
) -> usize {
    let ends = tokio::task::block_in_place(|| run.watermarks());
    let total_end: i64 = ends.values().map(|(_, end)| end).sum();
    let mut rejoins = 0;
    loop {
        let committed_sum = || run.committed().values().sum::<i64>();
        let mut last = tokio::task::block_in_place(committed_sum);
        let mut last_move = Instant::now();
        wait_until(
            "the group commits to the log end, or stops committing",
            Duration::from_secs(600),
            || {
                let now = committed_sum();
                if now != last {
                    (last, last_move) = (now, Instant::now());
                }
                now >= total_end || last_move.elapsed() > STALL
            },
        )
        .await;
        if last >= total_end {
            return rejoins;
        }
        let committed = tokio::task::block_in_place(|| run.committed());
        let held = run.ownership(killed_at).held_now();
        let orphaned: Vec<i32> = ends
            .iter()
            .filter(|(p, (_, end))| committed.get(p).copied().unwrap_or(0) < *end)
            .map(|(p, _)| *p)
            .filter(|p| !held.contains(p))
            .collect();
        if orphaned.is_empty() || rejoins == 2 {
            let described: Vec<String> = members
                .iter()
                .map(|m| {
                    format!(
                        "{} (pid {}): last batch started {:?}, last done {:?}",
                        m.name,
                        m.pid(),
                        m.last_said("batch-start "),
                        m.last_said("batch-done ")
                    )
                })
                .collect();
            panic!(
                "the group stopped committing for {} s at {last} of {total_end} (seed {seed}); committed {committed:?}, log ends {ends:?}; held by running members {held:?} (with nobody: {orphaned:?}, after {rejoins} members added); members: {described:#?}; their logs are in {}",
                STALL.as_secs(),
                run.dir.display()
            );
        }
        report(&format!(
            "note: partitions {orphaned:?} are held by no running member (tansu gave them to a member killed while joining); one more member joins"
        ));
        rejoins += 1;
        members.push(run.start_member(pace));
    }
}

/// Three members handle 200,000 records on 8 partitions while ten of them
/// are killed with SIGKILL at random moments, each replaced: nothing is
/// lost, no commit ever runs ahead of what was handled, and the duplicates
/// are what the killed members had handled and not committed. With `keys`,
/// records share that many keys and each member must keep their order.
async fn crash_run(
    bootstrap: &str,
    name: &str,
    pace: &[(&'static str, String)],
    keys: Option<usize>,
) {
    let bootstrap = bootstrap.to_owned();
    let mut rng = Rng::from_env_or_time();
    let seed = rng.seed();
    let mut run = Run::new(&bootstrap, name, 8).await;
    harness::produce_keyed(&bootstrap, &run.topic, 0..RECORDS, keys).await;
    let started = Instant::now();
    let mut members: Vec<_> = (0..3).map(|_| run.start_member(pace)).collect();
    let (mut kills, mut in_flight_at_kills, mut kills_mid_batch) = (0, 0, 0);
    let mut killed_at = HashMap::new();
    while kills < 10 {
        // A random moment, 0.5 to 2.5 s after the last kill.
        tokio::time::sleep(Duration::from_millis(500 + rng.below(2000))).await;
        let victim = rng.below(members.len() as u64) as usize;
        let mid_batch = {
            let m = &members[victim];
            let start = m
                .last_said("batch-start ")
                .map(|l| l["batch-start ".len()..].to_string());
            let done = m
                .last_said("batch-done ")
                .map(|l| l["batch-done ".len()..].to_string());
            start.is_some() && start != done
        };
        members[victim].kill9();
        let name = members[victim].name.clone();
        killed_at.insert(name.clone(), time::OffsetDateTime::now_utc());
        kills += 1;
        kills_mid_batch += usize::from(mid_batch);
        let committed = tokio::task::block_in_place(|| run.committed());
        let in_flight =
            tokio::task::block_in_place(|| run.handled().uncommitted_of(&name, &committed));
        in_flight_at_kills += in_flight;
        tokio::task::block_in_place(|| {
            assert_no_commit_ahead(&run, &format!("after kill {kills} ({name})"))
        });
        // The replacement starts once the broker has dropped the dead member
        // (its session timed out): tansu 0.6.0 does not tell the surviving
        // members to rejoin when it drops one, so only a join after that
        // moves the dead member's partitions on (see RELIABILITY.md).
        let alive = members.len() - 1;
        wait_until(
            "the broker dropped the killed member",
            Duration::from_secs(60),
            || run.group_members() <= alive,
        )
        .await;
        members[victim] = run.start_member(pace);
    }
    let handled_at_last_kill = tokio::task::block_in_place(|| run.handled().counts().len());
    assert!(
        handled_at_last_kill < RECORDS,
        "the 10 kills should land while records are still waiting (handled {handled_at_last_kill} of {RECORDS}): slow the members down"
    );
    // The rest of the backlog: see `drain`.
    let rejoins = drain(&mut run, &mut members, &killed_at, pace, seed).await;
    let elapsed = started.elapsed().as_secs_f64();
    for member in &mut members {
        member.stop().await;
    }

    let handled = run.handled();
    let missing = handled.missing(RECORDS);
    assert!(
        missing.is_empty(),
        "ids never handled (seed {seed}): {:?}",
        &missing[..missing.len().min(10)]
    );
    assert_no_commit_ahead(&run, "at the end");
    let duplicates = handled.duplicates();
    // tansu 0.6.0 sometimes completes a rebalance before every member has
    // rejoined: a partition's new owner starts from the last commit while
    // its old owner is still finishing (and committing) its batches. Those
    // records are read twice by the broker's doing, and only while two
    // members held one partition; every other duplicate must be a record a
    // killed member had handled and not committed.
    let ownership = run.ownership(&killed_at);
    let mut by_overlap = 0;
    let mut overlapped = BTreeSet::new();
    for handlers in handled.repeated() {
        let overlap = handlers.iter().enumerate().find_map(|(i, (a, p))| {
            handlers[i + 1..]
                .iter()
                .find(|(b, q)| p == q && a != b && ownership.overlapped(a, b, *p))
                .map(|(b, _)| format!("partition {p}: {a} and {b}"))
        });
        if let Some(overlap) = overlap {
            by_overlap += handlers.len() - 1;
            overlapped.insert(overlap);
        }
    }
    // Under key lanes a revoke commits up to the partition's first record
    // not dealt with, and records of other keys handled past it are read
    // again by the next owner: every rebalance (each kill and each
    // replacement makes one) can add duplicates beyond what the killed
    // members had in flight, up to `max_in_flight_records` a partition.
    // Those are reported, not bounded by the kills (issue 13's open item).
    assert!(
        keys.is_some() || duplicates - by_overlap <= in_flight_at_kills,
        "{duplicates} duplicates ({by_overlap} of them while the broker had given one partition to two members: {overlapped:?}), but the killed members had only {in_flight_at_kills} records handled and uncommitted (seed {seed}; member logs in {})",
        run.dir.display()
    );
    let order = match keys {
        Some(keys) => {
            let broken = order::key_order_broken(&handled);
            assert!(
                broken.is_empty(),
                "a key's records were handled out of offset order (seed {seed}): {:?}",
                &broken[..broken.len().min(10)]
            );
            format!(", {keys} keys, per-key order kept by every member")
        }
        None => String::new(),
    };
    report(&format!(
        "{name}: {RECORDS} records on 8 partitions{order}, 3 members at a time ({}), {kills} SIGKILLs at random moments ({kills_mid_batch} in the middle of a batch), each replaced once the broker dropped it; done in {elapsed:.1} s; lost 0; no commit ahead of handling at any kill; duplicates {duplicates} (handled-but-uncommitted at the kills: {in_flight_at_kills}; read while tansu had given a partition to two members: {by_overlap} {overlapped:?}); members added for partitions tansu left with nobody: {rejoins}; seed {seed}",
        pace.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
    ));
}

/// SIGTERM in the middle of a batch: the batch finishes, its offsets are
/// committed, the process exits 0, and the next consumer starts exactly
/// after it.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_mid_batch_finishes_commits_and_hands_over_exactly() {
    let Some(bootstrap) = real_broker("sigterm_mid_batch_finishes_commits_and_hands_over_exactly")
    else {
        return;
    };
    const COUNT: usize = 4_000;
    let mut run = Run::new(&bootstrap, "rb-sigterm", 4).await;
    produce(&bootstrap, &run.topic, 0..COUNT).await;
    let mut first = run.start_member(&[sleep_ms(3000)]);
    wait_until(
        "the first member is inside its second batch",
        Duration::from_secs(60),
        || first.said("batch-start 2"),
    )
    .await;
    assert!(
        !first.said("batch-done 2"),
        "the signal must land mid-batch"
    );
    first.terminate();
    let status = first.wait_exit(Duration::from_secs(60)).await;
    assert!(status.success(), "SIGTERM exits 0, got {status}");
    assert!(first.said("batch-done 2"), "the batch in hand was finished");
    assert!(
        !first.said("batch-start 3"),
        "no batch starts after the signal"
    );

    // What it committed is exactly what it handled: nothing more, nothing less.
    let handled = run.handled();
    let starts = run
        .watermarks()
        .iter()
        .map(|(p, (low, _))| (*p, *low))
        .collect();
    let handled_to = handled.contiguous_end(&starts);
    let committed = run.committed();
    assert_eq!(
        handled.total(),
        first.stats()["messages"].as_u64().unwrap_or(0) as usize
    );
    for (p, end) in &handled_to {
        assert_eq!(
            committed.get(p).copied().unwrap_or(0),
            *end,
            "partition {p}: committed exactly up to what was handled"
        );
    }
    let first_handled = handled.total();

    let mut second = run.start_member(&[]);
    run.wait_all_committed(Duration::from_secs(120)).await;
    second.stop().await;
    for member in [&first, &second] {
        let stats = member.stats();
        assert_eq!(
            stats["offset_gaps"].as_u64(),
            Some(0),
            "the broker returned every record ({stats})"
        );
    }
    let handled = run.handled();
    assert!(handled.missing(COUNT).is_empty(), "every id handled");
    assert_eq!(
        handled.duplicates(),
        0,
        "the next consumer started exactly after the first"
    );
    report(&format!(
        "sigterm: SIGTERM in the middle of batch 2 (3 s handler): the batch finished, {first_handled} records committed exactly, exit 0; the next member handled the other {} of {COUNT}; duplicates 0",
        COUNT - first_handled
    ));
}

/// A handler that works longer than `max.poll.interval.ms` on a batch: the
/// consumer keeps its partitions (it is never evicted and re-assigned), and
/// nothing is handled twice.
#[tokio::test(flavor = "multi_thread")]
async fn handler_slower_than_max_poll_interval_keeps_its_partitions() {
    let Some(bootstrap) = real_broker("handler_slower_than_max_poll_interval_keeps_its_partitions")
    else {
        return;
    };
    const COUNT: usize = 1_500;
    let mut run = Run::new(&bootstrap, "rb-slow", 3).await;
    run.set("KAFKA_BATCH_CONSUMER__KAFKA__MAX_POLL_INTERVAL_MS", 7000);
    run.set("KAFKA_BATCH_CONSUMER__REVOKE_TIMEOUT_MS", 5000);
    produce(&bootstrap, &run.topic, 0..COUNT).await;
    // The first two batches take 10 s each, well past the 7 s poll interval.
    let mut member = run.start_member(&[sleep_ms(10_000), ("MEMBER_SLOW_BATCHES", "2".into())]);
    run.wait_all_committed(Duration::from_secs(120)).await;
    member.stop().await;

    let stats = member.stats();
    assert_eq!(
        stats["offset_gaps"].as_u64(),
        Some(0),
        "the broker returned every record ({stats})"
    );
    let handled = run.handled();
    assert!(handled.missing(COUNT).is_empty(), "every id handled");
    assert_eq!(handled.duplicates(), 0, "nothing handled twice");
    assert_eq!(
        stats["assigned"].as_u64(),
        Some(3),
        "each partition assigned once: the member was never evicted ({stats})"
    );
    assert!(
        stats["pauses"].as_u64().unwrap_or(0) >= 1,
        "the poller paused while the handler worked ({stats})"
    );
    report(&format!(
        "slow handler: 2 batches of 10 s with max.poll.interval.ms=7000: partitions kept (assigned once), {COUNT} handled once each; duplicates 0"
    ));
}

/// A backlog of one million records and a slow handler: the consumer's
/// memory is bounded by its settings, not by the backlog.
#[tokio::test(flavor = "multi_thread")]
async fn memory_stays_bounded_with_a_million_record_backlog() {
    let Some(bootstrap) = real_broker("memory_stays_bounded_with_a_million_record_backlog") else {
        return;
    };
    // REAL_BROKER_MEMORY_BACKLOG sets another size, to show the peak does
    // not follow it.
    let backlog: usize = std::env::var("REAL_BROKER_MEMORY_BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    // The bound, from the default settings: librdkafka's prefetch queue
    // (queued.max.messages.kbytes = 16 MiB) + one fetch response
    // (fetch.max.bytes = 16 MiB) + the batches in hand (the one being
    // handled, `prefetch_batches` = 1 ready, the one being cut: 3 x 500
    // decoded messages) + the process itself. See RELIABILITY.md.
    const BOUND_MIB: u64 = 192;
    let mut run = Run::new(&bootstrap, "rb-memory", 8).await;
    produce(&bootstrap, &run.topic, 0..backlog).await;
    let mut member = run.start_member(&[sleep_ms(100)]);
    wait_until("50,000 records handled", Duration::from_secs(120), || {
        run.handled().total() >= 50_000
    })
    .await;
    let peak_mib = member.peak_rss_kib() / 1024;
    member.stop().await;
    let handled = run.handled().total();
    let ends = run.watermarks();
    let backlog_left: i64 =
        ends.values().map(|(_, end)| end).sum::<i64>() - run.committed().values().sum::<i64>();
    assert_no_commit_ahead(&run, "after the slow member stopped");
    assert!(
        backlog_left as usize > backlog / 2,
        "the backlog was still there while measuring: {backlog_left} of {backlog} left, {handled} handled"
    );
    assert!(
        peak_mib <= BOUND_MIB,
        "peak RSS {peak_mib} MiB with a {backlog}-record backlog is over the {BOUND_MIB} MiB bound"
    );

    // The same backlog read by another group with a quarter of the buffers:
    // the peak follows the settings.
    let small = [
        sleep_ms(100),
        (
            "KAFKA_BATCH_CONSUMER__GROUP_ID",
            format!("{}-small-buffers", run.group),
        ),
        (
            "KAFKA_BATCH_CONSUMER__KAFKA__QUEUED_MAX_MESSAGES_KBYTES",
            "4096".into(),
        ),
        (
            "KAFKA_BATCH_CONSUMER__KAFKA__FETCH_MAX_BYTES",
            "4194304".into(),
        ),
    ];
    let mut member = run.start_member(&small);
    let before = handled;
    wait_until(
        "50,000 more records handled",
        Duration::from_secs(120),
        || run.handled().total() >= before + 50_000,
    )
    .await;
    let small_peak_mib = member.peak_rss_kib() / 1024;
    member.stop().await;
    assert!(
        small_peak_mib < peak_mib,
        "smaller buffers, smaller peak: {small_peak_mib} MiB against {peak_mib} MiB"
    );
    report(&format!(
        "memory: {backlog} records waiting, slow handler (100 ms a batch of 500): peak RSS {peak_mib} MiB with the default buffers (16 MiB prefetch queue, 16 MiB fetch) after {handled} handled ({backlog_left} still waiting), {small_peak_mib} MiB with 4 MiB and 4 MiB; bound {BOUND_MIB} MiB"
    ));
}

/// The gap guard on a broker that skips records: tansu 0.6.0 answers a
/// fetch from inside a stored record batch with the next batch. A group
/// whose commit falls inside a batch resumes past records it never gets,
/// and the consumer must say so (a warning naming the offsets, and
/// `ConsumerStats::offset_gaps`) instead of moving on silently. Against a
/// broker that returns what it is asked for, it must report nothing.
#[tokio::test(flavor = "multi_thread")]
async fn records_the_broker_skips_are_reported() {
    let Some(bootstrap) = real_broker("records_the_broker_skips_are_reported") else {
        return;
    };
    let mut run = Run::new(&bootstrap, "rb-gap", 1).await;
    // 2,000 records in batches of 100, as a producer with linger writes them.
    let mut settings = ProducerSettings::new(&bootstrap);
    settings.kafka.set("batch.num.messages", "100");
    settings.kafka.set("linger.ms", "100");
    let producer = Producer::new(&settings).expect("producer");
    let records: Vec<Message> = (0..2_000)
        .map(|i| Message::new(harness::id_of(i), serde_json::json!({ "n": i })))
        .collect();
    producer
        .produce_batch(&run.topic, &records)
        .await
        .expect("delivered");
    producer.close().await.expect("flushed");
    // The group has handled up to 150: its commit falls inside a batch.
    tokio::task::block_in_place(|| {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", &run.group)
            .create()
            .expect("committer");
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&run.topic, 0, Offset::Offset(150))
            .expect("offset");
        consumer
            .commit(&tpl, CommitMode::Sync)
            .expect("commit at 150");
    });

    let mut member = run.start_member(&[]);
    run.wait_all_committed(Duration::from_secs(60)).await;
    member.stop().await;
    let stats = member.stats();
    let gaps = stats["offset_gaps"].as_u64().unwrap_or(0);
    let first = run
        .handled()
        .by_member
        .values()
        .flatten()
        .map(|(_, offset, _)| *offset)
        .min();
    if first == Some(150) {
        assert_eq!(gaps, 0, "no gap, none reported ({stats})");
        report("gap guard: the broker resumed exactly at the committed offset; no gap reported");
    } else {
        let warning = std::fs::read_to_string(run.dir.join("member-1.stderr")).unwrap_or_default();
        assert!(
            gaps >= 1,
            "the broker skipped 150..{first:?} and the consumer said so ({stats})"
        );
        assert!(
            warning.contains("where 150 was expected"),
            "the warning names the offset the group expected"
        );
        report(&format!(
            "gap guard: resuming a group at its committed offset 150, tansu returned offset {first:?} first; the consumer reported {gaps} gap(s), with a warning naming the offsets"
        ));
    }
}
