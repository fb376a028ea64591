//! The promise checker: seeded scenarios against the embedded broker, a
//! recorder of every handler call and every observed commit, and the
//! assertions of the promise (at least once, never a gap).
//!
//! - `scenario`: the generator (a pure function of the seed);
//! - `drive`: runs a scenario (members, supervisor, faults, timeline);
//! - `handler`: the handler, driven by each record's fate;
//! - `recorder`: handler calls and the commit watcher, reusable by other faces;
//! - `check`: the assertions;
//! - `rng`: splitmix64.
#![allow(dead_code)]

pub mod check;
pub mod drive;
pub mod handler;
pub mod recorder;
pub mod rng;
pub mod scenario;

use std::sync::Arc;
use std::time::Instant;

use scenario::Scenario;

/// What one passing or failing scenario contributes to the report line.
#[derive(Debug, Default)]
pub struct Summary {
    pub records: usize,
    pub faults: u64,
    pub restarts: u64,
    pub calls: usize,
    /// Seeks back asked for, and how many the consumer made.
    pub seeks: (usize, usize),
    pub seconds: f64,
    /// The violations, empty when the scenario passed.
    pub violations: Vec<check::Violation>,
}

/// The command that replays one seed.
pub fn replay_command(seed: u64, panics: bool) -> String {
    format!(
        "PROMISE_SEED={seed}{} cargo test --test promise -- --nocapture",
        if panics { "" } else { " PROMISE_PANICS=0" }
    )
}

/// Runs the scenario of `seed` and checks it.
pub async fn run_seed(seed: u64, panics: bool) -> (Arc<Scenario>, Summary) {
    let sc = Arc::new(Scenario::generate(seed, panics));
    let started = Instant::now();
    let run = drive::run(Arc::clone(&sc)).await;
    let violations = check::check(&sc, &run);
    let log = run.recorder.lock();
    let summary = Summary {
        records: sc.records.len(),
        faults: log.faults,
        restarts: log.restarts,
        calls: log.calls.len(),
        seeks: (log.seeks.len(), log.seeks_made),
        seconds: started.elapsed().as_secs_f64(),
        violations,
    };
    drop(log);
    (sc, summary)
}

/// An env variable as a number, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a number")),
        Err(_) => default,
    }
}
