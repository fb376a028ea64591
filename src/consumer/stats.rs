//! What a consumer has done so far: counters the handle reads.

use std::sync::atomic::{AtomicU64, Ordering};

/// What a consumer has done so far (see [`ConsumerHandle::stats`](super::ConsumerHandle::stats)).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConsumerStats {
    /// Batches the handler finished `Ok`.
    pub batches: u64,
    /// Messages in those batches.
    pub messages: u64,
    /// Successful offset commits.
    pub commits: u64,
    /// Failed offset commits (each retried).
    pub commit_failures: u64,
    /// Partitions assigned to this consumer, counted per assignment.
    pub assigned: u64,
    /// Partitions revoked from this consumer, counted per revoke.
    pub revoked: u64,
    /// Partitions being revoked now: nothing more of them is handed out,
    /// and their revoke waits for their batches in the handler (up to
    /// `consumer.revoke_timeout_ms`) while the other partitions go on.
    pub revoking: u64,
    /// Times the poller paused its partitions because the handler was busy.
    pub pauses: u64,
    /// Tombstones and records of unsubscribed topics skipped.
    pub skipped: u64,
    /// Records that could not be decoded.
    pub decode_errors: u64,
    /// Failed records delivered again in place (policy `retry`).
    pub retries: u64,
    /// Failed records written to the retry topic (policy `retry_topic`).
    pub retry_topic: u64,
    /// Records written to the dead-letter topic (policy `dead_letter`).
    pub dead_lettered: u64,
    /// Failed or undecodable records skipped (policy `skip`).
    pub failed_skipped: u64,
    /// Times the broker returned a record past the one the consumer
    /// expected: the records between were not delivered (a compacted topic
    /// or transaction markers explain this; otherwise the broker skipped
    /// records). Each one is also logged as a warning naming the offsets.
    pub offset_gaps: u64,
    /// Batches whose handler panicked (each stopped the consumer).
    pub handler_panics: u64,
    /// Batches whose handler ran past `consumer.handler_timeout_ms` (each
    /// went through the failure chain).
    pub handler_timeouts: u64,
    /// Batches that were in the handler longer than `max.poll.interval.ms`
    /// (each logged once as a warning with its batch ref).
    pub long_batches: u64,
    /// Times a partition was paused because it reached
    /// `consumer.max_in_flight_records` records read and not yet dealt with.
    pub capped: u64,
    /// Records a seek forward ([`ConsumerHandle::seek`]) skipped on
    /// purpose: committed past without being handled.
    ///
    /// [`ConsumerHandle::seek`]: super::ConsumerHandle::seek
    pub seek_skipped: u64,
}

#[derive(Default)]
pub(super) struct StatsCounters {
    pub(super) batches: AtomicU64,
    pub(super) messages: AtomicU64,
    pub(super) commits: AtomicU64,
    pub(super) commit_failures: AtomicU64,
    pub(super) assigned: AtomicU64,
    pub(super) revoked: AtomicU64,
    pub(super) revoking: AtomicU64,
    pub(super) pauses: AtomicU64,
    pub(super) skipped: AtomicU64,
    pub(super) decode_errors: AtomicU64,
    pub(super) retries: AtomicU64,
    pub(super) retry_topic: AtomicU64,
    pub(super) dead_lettered: AtomicU64,
    pub(super) failed_skipped: AtomicU64,
    pub(super) offset_gaps: AtomicU64,
    pub(super) handler_panics: AtomicU64,
    pub(super) handler_timeouts: AtomicU64,
    pub(super) long_batches: AtomicU64,
    pub(super) capped: AtomicU64,
    pub(super) seek_skipped: AtomicU64,
}

impl StatsCounters {
    pub(super) fn snapshot(&self) -> ConsumerStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsumerStats {
            batches: get(&self.batches),
            messages: get(&self.messages),
            commits: get(&self.commits),
            commit_failures: get(&self.commit_failures),
            assigned: get(&self.assigned),
            revoked: get(&self.revoked),
            revoking: get(&self.revoking),
            pauses: get(&self.pauses),
            skipped: get(&self.skipped),
            decode_errors: get(&self.decode_errors),
            retries: get(&self.retries),
            retry_topic: get(&self.retry_topic),
            dead_lettered: get(&self.dead_lettered),
            failed_skipped: get(&self.failed_skipped),
            offset_gaps: get(&self.offset_gaps),
            handler_panics: get(&self.handler_panics),
            handler_timeouts: get(&self.handler_timeouts),
            long_batches: get(&self.long_batches),
            capped: get(&self.capped),
            seek_skipped: get(&self.seek_skipped),
        }
    }
}
