//! One member of a consumer group that writes down everything it handled:
//! the process the real-broker reliability tests start, kill and restart
//! (`tests/real_broker.rs`). It is also a small, complete consumer service.
//!
//! ```sh
//! KAFKA_BATCH_BOOTSTRAP_SERVERS=127.0.0.1:9092 \
//! KAFKA_BATCH_CONSUMER__GROUP_ID=members KAFKA_BATCH_CONSUMER__TOPICS=events \
//! MEMBER_LOG=/tmp/member-1.log cargo run --release --example group_member
//! ```
//!
//! Settings come from `Settings::load()` (the TOML file, then `KAFKA_BATCH_*`
//! variables). The member's own variables:
//!
//! - `MEMBER_LOG` (required): the file it appends `partition offset id` to,
//!   one line per message, in one write per batch, as the handler starts
//!   (so before it returns `Ok` and the batch can be committed).
//! - `MEMBER_SLEEP_MS`: how long the handler then works on each batch
//!   before returning `Ok` (default 0).
//! - `MEMBER_SLOW_BATCHES`: only the first this many batches sleep (default: all).
//!
//! On standard output it prints `assigned` when it first receives a batch,
//! `batch-start N` when a batch arrives and `batch-done N` just before its
//! handler returns `Ok`, and at the end one `stats {...}` line. SIGTERM or Ctrl-C
//! finishes the batch in hand, commits it and exits 0.

use std::fmt::Write as _;
use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use anyhow::Context;
use kafka_batch::{Consumer, Message, Settings};
use serde_json::Value;

fn env_number(name: &str) -> anyhow::Result<Option<u64>> {
    std::env::var(name)
        .ok()
        .map(|v| {
            v.parse()
                .with_context(|| format!("{name}={v:?} must be a whole number"))
        })
        .transpose()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kafka_batch=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let log_path = std::env::var("MEMBER_LOG")
        .context("set MEMBER_LOG to the file this member writes what it handled to")?;
    let sleep = Duration::from_millis(env_number("MEMBER_SLEEP_MS")?.unwrap_or(0));
    let slow_batches = env_number("MEMBER_SLOW_BATCHES")?.unwrap_or(u64::MAX);

    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open MEMBER_LOG {log_path}"))?;
    // The handler runs through a shared reference (several batches at once
    // with `consumer.concurrency` above 1): what it changes is behind a
    // Mutex or in an atomic.
    let log = Mutex::new(log);
    let settings = Settings::load()?;
    let consumer = Consumer::new(&settings.consumer)?;
    let handle = consumer.handle();
    handle.shutdown_on_signals();

    let batches = AtomicU64::new(0);
    let result = consumer
        .process(async |batch: Vec<Message<Value>>| {
            let batches = batches.fetch_add(1, Ordering::Relaxed) + 1;
            if batches == 1 {
                say("assigned");
            }
            say(&format!("batch-start {batches}"));
            let mut lines = String::new();
            for m in &batch {
                let origin = m
                    .origin()
                    .context("a consumed message knows where it was read")?;
                // The record's identity (a payload `id` when the run gives
                // records shared keys), then its key.
                let id = m.payload.get("id").and_then(Value::as_str).unwrap_or(&m.id);
                let _ = writeln!(
                    lines,
                    "{} {} {} {}",
                    origin.partition, origin.offset, id, m.id
                );
            }
            // One write per batch, done before Ok: what the file holds was
            // handled, and nothing can be committed that is not in it.
            // (The lock is only held for the write, never across an await.
            // A panic while it was held leaves the file usable: go on.)
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .write_all(lines.as_bytes())
                .context("cannot append to MEMBER_LOG")?;
            // Then the work takes its time (a downstream write, say): a kill
            // now leaves records handled but not committed.
            if batches <= slow_batches && !sleep.is_zero() {
                tokio::time::sleep(sleep).await;
            }
            say(&format!("batch-done {batches}"));
            anyhow::Ok(())
        })
        .await;
    let stats = handle.stats();
    let line = serde_json::json!({
        "batches": stats.batches,
        "messages": stats.messages,
        "commits": stats.commits,
        "commit_failures": stats.commit_failures,
        "assigned": stats.assigned,
        "revoked": stats.revoked,
        "pauses": stats.pauses,
        "offset_gaps": stats.offset_gaps,
    });
    say(&format!("stats {line}"));
    result.context("the consumer stopped with an error")
}

/// One line to standard output, flushed at once (the test driver reads it live).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}
