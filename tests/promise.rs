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
            "promise seed {seed}: {} records, {} calls, {} faults, {} restarts, {:.1}s, {}",
            summary.records,
            summary.calls,
            summary.faults,
            summary.restarts,
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
        lost += summary
            .violations
            .iter()
            .filter(|v| v.property.starts_with('1') || v.property.starts_with('2'))
            .count();
        let mut text = format!(
            "PROMISE BROKEN, seed {seed}\n{sc}\nreplay: {}\n",
            promise::replay_command(*seed, panics)
        );
        for v in &summary.violations {
            text.push_str(&format!("  [{}] {}\n", v.property, v.detail));
        }
        let _ = writeln!(std::io::stderr(), "{text}");
        let mut short = format!(
            "seed {seed} ({}):\n",
            promise::replay_command(*seed, panics)
        );
        for v in &summary.violations {
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
