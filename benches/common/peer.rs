//! The peer side of the consume comparison: ruststream-rdkafka 0.7 (RustStream's Kafka broker,
//! on the same rdkafka 0.39 and librdkafka as kafka-batch) consuming the same records into the
//! same payload type, in batches of the same size, at least once.
//!
//! Configured as its own guides show for a batch consumer (`guide_commits`, `kafka_batches`):
//! a handler over a slice mounted with `.batch(n)`, `Commit::Tracked` (each acknowledged
//! delivery advances a stored watermark, librdkafka commits what is stored on its interval and
//! once more when the consumer closes), and the default dispatch: one batch at a time on the
//! app's runtime. Neither `workers(n)` nor `threads(n)` is set, because the docs keep workers
//! for handlers that wait on I/O and say threads cost more CPU than they save below about ten
//! microseconds of work a delivery; this handler only counts.
//!
//! The element type is the raw loops' [`PlainEnvelope<Event>`]: the peer's JSON codec
//! (serde_json) decodes `item` and skips `hist`, as they do. The handler is the documented
//! manual form (`impl Handle<[T]>` with `subscriber(..).batch(n).build()`), the same mount as the
//! `#[subscriber]` attribute without the `macros` feature's proc-macro crate, and it lets the
//! handler own its counter.
//!
//! Kept out of `common/mod.rs` because the codec and memory benches include that module and
//! have no use for the peer.

use std::future::{ready, Future};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Context as _;
use kafka_batch::settings::CONSUMER_DEFAULTS;
use ruststream_rdkafka::prelude::*;
use tokio::sync::Notify;

use crate::common::{Event, PlainEnvelope};

/// The properties the commit mode owns, left out of `CONSUMER_DEFAULTS`: `Commit::Tracked`
/// refuses a passthrough that sets them (it stores offsets itself and needs librdkafka's
/// interval commit on), and the start is the typed `StartOffset::Earliest`.
const OWNED_BY_PEER: [&str; 3] = [
    "enable.auto.commit",
    "enable.auto.offset.store",
    "auto.offset.reset",
];

/// The batch handler: counts what it is handed, as the library job's handler does, and wakes
/// [`peer_consume`] once `records` were counted. `Ok(())` acknowledges the whole batch.
struct Count {
    records: usize,
    count: Arc<AtomicUsize>,
    done: Arc<Notify>,
}

impl Handle<[PlainEnvelope<Event>]> for Count {
    fn handle(
        &self,
        batch: &[PlainEnvelope<Event>],
        _outs: &(),
        _ctx: &mut Context<'_>,
    ) -> impl Future<Output = Result<(), Vec<HandlerOutcome>>> {
        crate::common::first_record();
        let counted = self
            .count
            .fetch_add(std::hint::black_box(batch).len(), Ordering::Relaxed)
            + batch.len();
        if counted >= self.records {
            // Stores a permit if `run_until` is not waiting yet, so no wakeup is lost.
            self.done.notify_one();
        }
        ready(Ok(()))
    }
}

/// Consumes `records` messages of `topic` in `group` with ruststream-rdkafka and returns how many
/// the handler counted.
///
/// A RustStream app runs until it is told to stop: `run` waits for SIGINT/SIGTERM, and
/// `run_until(future)` for any future the caller owns (the API its docs give for a caller-driven
/// stop; it installs no signal handler). The handler's `Notify` is that future, so the app stops
/// once everything was counted, through its own graceful shutdown: the dispatch loop stops, the
/// last batch settles, and the consumer closes, which commits the stored offsets. All of it is
/// inside the measured time, as the library's shutdown and the raw loops' final commit are, and
/// so is the startup: the broker's connect probe (a producer client created for one metadata
/// fetch, then dropped) and the wait for the group's first assignment.
pub async fn peer_consume(
    bootstrap: &str,
    topic: &str,
    group: &str,
    records: usize,
    batch: usize,
) -> anyhow::Result<usize> {
    let mut source = KafkaTopic::new(topic)
        .group(group)
        .start(StartOffset::Earliest)
        .commit(Commit::Tracked);
    for (key, value) in CONSUMER_DEFAULTS {
        if !OWNED_BY_PEER.contains(key) {
            source = source.config(*key, *value);
        }
    }
    let count = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(Notify::new());
    let handler = Count {
        records,
        count: Arc::clone(&count),
        done: Arc::clone(&done),
    };
    let size = std::num::NonZeroUsize::new(batch).context("batch size 0")?;
    let app = RustStream::new(AppInfo::new("bench-peer", "0.1.0")).with_broker(
        KafkaBroker::new([bootstrap]),
        |b| {
            b.include(subscriber(source, handler).batch(size).build());
        },
    );
    app.run_until(async move { done.notified().await })
        .await
        .context("ruststream-rdkafka app")?;
    Ok(count.load(Ordering::Relaxed))
}
