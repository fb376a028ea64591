//! Commits, all made on the poller thread from the offset tracker: never
//! past a record that was not dealt with.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use super::events::ConsumerEvent;
use super::rebalance::PollerContext;
use super::state::{PollerState, Shared};
use crate::error::Error;
use crate::offsets::TopicPartition;

/// How long to wait before retrying a failed commit.
pub(super) const COMMIT_RETRY: Duration = Duration::from_millis(500);
/// Attempts at the last commit before the consumer closes.
const FINAL_COMMIT_ATTEMPTS: u32 = 5;

/// Hands over every partition whose finished run moved: stored for
/// librdkafka's interval commit (no round trip), or, with
/// `commit_interval_ms = 0`, committed now.
pub(super) fn commit_finished(
    consumer: &BaseConsumer<PollerContext>,
    st: &mut PollerState,
    shared: &Shared,
) -> Result<(), KafkaError> {
    // (`interval_commit` implies `commit`; `commit_finished_now` checks it.)
    if shared.interval_commit {
        store_finished(consumer, st)
    } else {
        commit_finished_now(consumer, st, shared)
    }
}

/// Commits every partition whose finished run moved since the last commit,
/// and waits for the broker: where the promise needs to know (a revoke, the
/// shutdown) or where the settings ask for it.
pub(super) fn commit_finished_now(
    consumer: &BaseConsumer<PollerContext>,
    st: &mut PollerState,
    shared: &Shared,
) -> Result<(), KafkaError> {
    if !shared.commit {
        return Ok(());
    }
    let offsets = st.tracker.committable();
    commit_offsets(consumer, &offsets, shared)?;
    for (tp, offset) in &offsets {
        st.tracker.committed(tp, *offset);
    }
    Ok(())
}

/// Stores each moved watermark for librdkafka's interval commit. A store is
/// local (no request), and librdkafka commits only stored offsets, so what
/// it commits is never past a record that was not dealt with.
fn store_finished(
    consumer: &BaseConsumer<PollerContext>,
    st: &mut PollerState,
) -> Result<(), KafkaError> {
    let offsets = st.tracker.storable();
    if offsets.is_empty() {
        return Ok(());
    }
    let tpl = offset_list(&offsets)?;
    let result = consumer.store_offsets(&tpl);
    // librdkafka answers per partition (and fails the call only when none
    // was stored): a partition it refused is stored again on the next try.
    let mut refused = None;
    for (tp, offset) in &offsets {
        match tpl
            .find_partition(&tp.topic, tp.partition)
            .map(|e| e.error())
        {
            Some(Ok(())) if result.is_ok() => st.tracker.stored(tp, *offset),
            Some(Err(e)) => refused = Some(e),
            _ => {}
        }
    }
    match (result, refused) {
        (Err(e), _) | (Ok(()), Some(e)) => {
            tracing::warn!(error = %e, offsets = %describe(&offsets), "storing settled offsets for the interval commit failed; it will be retried");
            Err(e)
        }
        (Ok(()), None) => Ok(()),
    }
}

fn offset_list(offsets: &[(TopicPartition, i64)]) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (tp, offset) in offsets {
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))?;
    }
    Ok(tpl)
}

/// Commits exactly these offsets (the next offset to read), synchronously.
///
/// They are stored first, so that librdkafka's own commits (on its interval,
/// and of the partitions it gives up in a rebalance) carry the same offsets
/// and never an older one.
pub(super) fn commit_offsets(
    consumer: &BaseConsumer<PollerContext>,
    offsets: &[(TopicPartition, i64)],
    shared: &Shared,
) -> Result<(), KafkaError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let tpl = offset_list(offsets)?;
    if shared.interval_commit {
        if let Err(e) = consumer.store_offsets(&tpl) {
            tracing::debug!(error = %e, "storing offsets before committing them failed; committing them anyway");
        }
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            committed(shared, offsets);
            Ok(())
        }
        // Nothing new to commit is not a failure.
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
        Err(e) => {
            commit_failed(shared, &e, offsets);
            Err(e)
        }
    }
}

/// What librdkafka's interval commit answered (inside `poll`, on the poller
/// thread): counted and logged like a commit made here. A failed one is
/// made again on the next interval, since what was stored is still ahead
/// of what was committed.
pub(super) fn interval_commit_answered(
    shared: &Shared,
    result: Result<(), KafkaError>,
    tpl: &TopicPartitionList,
) {
    let offsets: Vec<(TopicPartition, i64)> = tpl
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((TopicPartition::new(e.topic(), e.partition()), o)),
            _ => None,
        })
        .collect();
    let refused = tpl.elements().iter().find_map(|e| e.error().err());
    match (result, refused) {
        (Ok(()), None) => committed(shared, &offsets),
        (Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)), _) => {}
        (Err(e), _) | (Ok(()), Some(e)) => {
            commit_failed(shared, &e, &offsets);
        }
    }
}

fn committed(shared: &Shared, offsets: &[(TopicPartition, i64)]) {
    shared.metrics.commits.increment(1);
    if shared.stats.commits.fetch_add(1, Ordering::Relaxed) == 0 {
        tracing::info!(offsets = %describe(offsets), "first offsets committed");
    }
    tracing::debug!(offsets = ?offsets, "offsets committed");
}

fn commit_failed(shared: &Shared, error: &KafkaError, offsets: &[(TopicPartition, i64)]) {
    shared.metrics.commit_failures.increment(1);
    shared.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(error = %error, offsets = %describe(offsets), "offset commit failed; it will be retried");
    shared.emit(|client| ConsumerEvent::CommitFailed {
        client,
        error: error.to_string(),
        offsets: offsets.to_vec(),
    });
}

/// `topic[partition]=offset,...` for a log line.
pub(super) fn describe(offsets: &[(TopicPartition, i64)]) -> String {
    offsets
        .iter()
        .map(|(tp, o)| format!("{tp}={o}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// True for a commit the broker refused because the group is rebalancing:
/// this member's partitions are being handed over, and its revoke (or the
/// next owner) takes care of what it handled.
fn refused_for_rebalance(error: &KafkaError) -> bool {
    matches!(
        error,
        KafkaError::ConsumerCommit(
            RDKafkaErrorCode::RebalanceInProgress | RDKafkaErrorCode::IllegalGeneration
        )
    )
}

/// The commit made before closing, retried a few times; a failure is returned.
///
/// A commit refused because the group is rebalancing (a rolling deploy
/// stops members while the group rebalances) is not a failure of the
/// service: the consumer keeps serving the rebalance, for up to
/// `serve_for`, so that its revoke commits what was handled (records
/// polled meanwhile are left for the next owner), and then closes cleanly.
pub(super) fn final_commit(
    consumer: &BaseConsumer<PollerContext>,
    shared: &Shared,
    serve_for: Duration,
) -> Result<(), Error> {
    let mut attempt = 1;
    let mut serve_until: Option<Instant> = None;
    loop {
        let result = {
            let mut st = shared.lock();
            st.drain(consumer, shared);
            commit_finished_now(consumer, &mut st, shared)
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if refused_for_rebalance(&e) => {
                let until = *serve_until.get_or_insert_with(|| {
                    tracing::info!(error = %e, "the final commit was refused while the group rebalances: serving the rebalance, whose revoke commits what was handled");
                    Instant::now() + serve_for
                });
                if Instant::now() >= until {
                    return Err(Error::Commit(e));
                }
                serve_rebalance(consumer, COMMIT_RETRY);
            }
            Err(e) if attempt >= FINAL_COMMIT_ATTEMPTS => return Err(Error::Commit(e)),
            Err(_) => {
                attempt += 1;
                std::thread::sleep(COMMIT_RETRY);
            }
        }
    }
}

/// Polls for `period` so that librdkafka serves the group's rebalance (its
/// callbacks run inside `poll`). Records it returns are dropped unread: the
/// consumer is closing, and they were never handed out or committed.
fn serve_rebalance(consumer: &BaseConsumer<PollerContext>, period: Duration) {
    let deadline = Instant::now() + period;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        // `poll` may return early after serving a callback: re-check the clock.
        let _ = consumer.poll(left.min(Duration::from_millis(50)));
        if left.is_zero() {
            break;
        }
    }
}
