//! Commits, all made on the poller thread from the offset tracker: never
//! past a record that was not dealt with.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer as _};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use super::rebalance::PollerContext;
use super::state::{PollerState, Shared};
use crate::error::Error;
use crate::offsets::TopicPartition;

/// How long to wait before retrying a failed commit.
pub(super) const COMMIT_RETRY: Duration = Duration::from_millis(500);
/// Attempts at the last commit before the consumer closes.
const FINAL_COMMIT_ATTEMPTS: u32 = 5;

/// Commits every partition whose finished run moved since the last commit.
pub(super) fn commit_finished(
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

/// Commits exactly these offsets (the next offset to read), synchronously.
pub(super) fn commit_offsets(
    consumer: &BaseConsumer<PollerContext>,
    offsets: &[(TopicPartition, i64)],
    shared: &Shared,
) -> Result<(), KafkaError> {
    if offsets.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::with_capacity(offsets.len());
    for (tp, offset) in offsets {
        tpl.add_partition_offset(&tp.topic, tp.partition, Offset::Offset(*offset))?;
    }
    match consumer.commit(&tpl, CommitMode::Sync) {
        Ok(()) => {
            shared.metrics.commits.increment(1);
            if shared.stats.commits.fetch_add(1, Ordering::Relaxed) == 0 {
                tracing::info!(offsets = %describe(offsets), "first offsets committed");
            }
            tracing::debug!(offsets = ?offsets, "offsets committed");
            Ok(())
        }
        // Nothing new to commit is not a failure.
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
        Err(e) => {
            shared.metrics.commit_failures.increment(1);
            shared.stats.commit_failures.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(error = %e, offsets = ?offsets, "offset commit failed; it will be retried");
            Err(e)
        }
    }
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
            commit_finished(consumer, &mut st, shared)
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
