//! Commits, all made on the poller thread from the offset tracker: never
//! past a record that was not dealt with.

use std::sync::atomic::Ordering;
use std::time::Duration;

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
            shared.stats.commits.fetch_add(1, Ordering::Relaxed);
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

/// The commit made before closing, retried a few times; a failure is returned.
pub(super) fn final_commit(
    consumer: &BaseConsumer<PollerContext>,
    shared: &Shared,
) -> Result<(), Error> {
    let mut attempt = 1;
    loop {
        let result = {
            let mut st = shared.lock();
            st.drain(consumer, shared);
            commit_finished(consumer, &mut st, shared)
        };
        match result {
            Ok(()) => return Ok(()),
            Err(e) if attempt >= FINAL_COMMIT_ATTEMPTS => return Err(Error::Commit(e)),
            Err(_) => {
                attempt += 1;
                std::thread::sleep(COMMIT_RETRY);
            }
        }
    }
}
