//! The promise checker (see tests/promise/mod.rs): random, seeded scenarios
//! of records, failure chains, handler outcomes, members, broker faults,
//! shutdowns and crashes, each checked against the promise.
//!
//! `PROMISE_SEED=N` replays one scenario; `PROMISE_SCENARIOS=N` runs N
//! (seeds `PROMISE_BASE_SEED`.. , default 1..); `PROMISE_PANICS=0` turns
//! the handler's panic fates off.

mod common;
// `tests/promise.rs` is this file, so the module is named by its path.
#[path = "promise/mod.rs"]
mod promise;

use std::io::Write as _;

/// Scenarios in a default run: fits in about 5 minutes on a loaded 2-core machine.
const DEFAULT_SCENARIOS: u64 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_promise_holds_in_random_scenarios() {
    common::init_tracing();
    let panics = promise::env_u64("PROMISE_PANICS", 1) != 0;
    let seeds: Vec<u64> = match std::env::var("PROMISE_SEED") {
        Ok(_) => vec![promise::env_u64("PROMISE_SEED", 0)],
        Err(_) => {
            let base = promise::env_u64("PROMISE_BASE_SEED", 1);
            let n = promise::env_u64("PROMISE_SCENARIOS", DEFAULT_SCENARIOS);
            (base..base + n).collect()
        }
    };
    let fail_fast = promise::env_u64("PROMISE_FAIL_FAST", 0) != 0;
    let (mut records, mut faults, mut restarts, mut lost) = (0, 0, 0, 0);
    let mut failed: Vec<String> = Vec::new();
    for seed in &seeds {
        let (sc, summary) = promise::run_seed(*seed, panics).await;
        records += summary.records;
        faults += summary.faults;
        restarts += summary.restarts;
        let _ = writeln!(
            std::io::stderr(),
            "promise seed {seed}: {} records, {} calls, {} faults, {} restarts, {} client(s) x concurrency {} {:?}, commit interval {} ms{}{}, {:.1}s, {}",
            summary.records,
            summary.calls,
            summary.faults,
            summary.restarts,
            sc.clients,
            sc.concurrency,
            sc.ordering,
            sc.commit_interval_ms,
            if sc.stream { ", stream" } else { "" },
            match summary.seeks {
                (0, _) => String::new(),
                (asked, made) => format!(", {made} of {asked} seeks back made"),
            },
            summary.seconds,
            if summary.violations.is_empty() {
                "ok".to_string()
            } else {
                format!("{} VIOLATION(S)", summary.violations.len())
            }
        );
        if summary.violations.is_empty() {
            continue;
        }
        lost += promise::check::lost(&summary.violations);
        let mut text = format!(
            "PROMISE BROKEN, seed {seed}\n{sc}\nreplay: {}\n",
            promise::replay_command(*seed, panics)
        );
        for v in summary
            .violations
            .iter()
            .filter(|v| v.property != "lost record")
        {
            text.push_str(&format!("  [{}] {}\n", v.property, v.detail));
        }
        text.push_str(&format!(
            "  lost records: {}\n",
            promise::check::lost(&summary.violations)
        ));
        let _ = writeln!(std::io::stderr(), "{text}");
        let mut short = format!(
            "seed {seed} ({}):\n",
            promise::replay_command(*seed, panics)
        );
        for v in summary
            .violations
            .iter()
            .filter(|v| v.property != "lost record")
        {
            short.push_str(&format!("  [{}] {}\n", v.property, v.detail));
        }
        failed.push(short);
        if fail_fast {
            break;
        }
    }
    common::report(&format!(
        "promise checker: {} scenarios, {records} records, {faults} faults injected, {restarts} restarts, lost {lost}{}",
        seeds.len(),
        if panics { "" } else { " (panic fates off)" }
    ));
    assert!(
        failed.is_empty(),
        "{} of {} scenario(s) broke the promise:\n{}",
        failed.len(),
        seeds.len(),
        failed.join("\n")
    );
}

/// The deterministic part: a scenario is a function of its seed, and every
/// generated chain is one the settings accept.
#[test]
fn scenarios_are_pure_functions_of_their_seed_and_valid() {
    for seed in 1..=500 {
        let a = promise::scenario::Scenario::generate(seed, true);
        let b = promise::scenario::Scenario::generate(seed, true);
        assert_eq!(
            a.to_string(),
            b.to_string(),
            "seed {seed} generates one scenario"
        );
        let topics: Vec<&str> = a.topics.iter().map(|(t, _)| t.as_str()).collect();
        let mut s = kafka_batch::ConsumerSettings::new("127.0.0.1:9", &a.group(), &topics);
        s.failure.policies = a.chain.clone();
        s.failure.retry.retries = a.retry.retries;
        s.failure.retry_topic.retries = a.retry_topic.retries;
        s.failure.retry_topic.topic = a.retry_topic_name();
        s.failure.dead_letter.topic = a.dead_topic_name();
        s.validate()
            .unwrap_or_else(|e| panic!("seed {seed}: chain {:?} refused: {e}", a.chain));
        assert!(a.budget() >= a.in_place_budget() && a.in_place_budget() >= 1);
        let absorbs = matches!(
            a.ends_with(),
            kafka_batch::settings::FailurePolicy::Skip
                | kafka_batch::settings::FailurePolicy::DeadLetter
        );
        for (i, r) in a.records.iter().enumerate() {
            use promise::scenario::{Fate, Kind};
            // A record that always fails, or bytes that never decode, can
            // only end where the chain absorbs them.
            if matches!(
                r.kind,
                Kind::Good(Fate::AlwaysFail) | Kind::NotJson | Kind::NoItem | Kind::NullKey
            ) {
                assert!(
                    absorbs,
                    "seed {seed}: record {i} {:?} under chain {:?}",
                    r.kind, a.chain
                );
            }
            assert_eq!(a.index_of(&a.id(i)), Some(i));
        }
    }
}

/// Lists scenarios without running them: `PROMISE_SCENARIOS=50 cargo test
/// --test promise catalogue -- --ignored --nocapture`.
#[test]
#[ignore]
fn catalogue() {
    let base = promise::env_u64("PROMISE_BASE_SEED", 1);
    for seed in base..base + promise::env_u64("PROMISE_SCENARIOS", DEFAULT_SCENARIOS) {
        let sc = promise::scenario::Scenario::generate(seed, true);
        let first = sc
            .to_string()
            .lines()
            .take(7)
            .collect::<Vec<_>>()
            .join("\n");
        println!("{first}\n");
    }
}
