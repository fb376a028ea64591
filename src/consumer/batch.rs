//! Cutting batches: up to `batch_size` messages, `max_batch_bytes` bytes, or
//! whatever arrived when `batch_timeout_ms` passed.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::message::BorrowedMessage;
use serde::de::DeserializeOwned;

use super::policy::{Action, Chain, ChainState};
use super::Shared;
use crate::envelope::{
    latest_only, unpack_parts, BatchRef, DecodeError, History, LastHistory, Message, MessageId,
    PartitionRange, RawRecord,
};
use crate::failure::record::KeptRecord;
use crate::offsets::{Generation, OffsetTracker, TopicPartition};
use crate::settings::ConsumerSettings;

/// A cut batch: its messages and, per partition, the offsets it covers
/// (tombstones and skipped records included, so their offsets are committed
/// with the batch).
pub(crate) struct Batch<T> {
    pub id: u64,
    /// Which of the consumer's clients read it (`consumer.clients`).
    pub client: usize,
    pub messages: Vec<Message<T>>,
    pub ranges: Vec<BatchRange>,
    /// With a failure chain other than `fail`: what the failure policies
    /// need of each message, in the order of `messages`.
    pub kept: Vec<Kept>,
    /// Undecodable records bound for the dead-letter topic.
    pub rejected: Vec<Rejected>,
    /// Under `ordering = "key"`: the batch's lanes, and the records it
    /// settles when it finishes.
    pub keyed: Option<pieces::Keyed>,
    /// When not empty: the id and history of each message, in the order of
    /// `messages`, which [`Batch::finish_messages`] puts into them.
    deferred: Vec<Deferred>,
    /// The keys of the deferred messages, end to end.
    keys: String,
}

/// What a message still needs: its key (in [`Batch::keys`]) and history.
///
/// A message's id and ref take two allocations (the id, which the ref's key
/// shares, and the list of refs). Made on the poller thread and freed on the
/// handler's, each goes through the allocator's shared arena (a fifth of the
/// consumer's CPU time per message when they were four); made on the
/// handler's thread, which frees them, they come from its own cache. So the
/// poller keeps the keys in one buffer per batch, and the runner builds ids
/// and refs just before the handler runs.
struct Deferred {
    key: std::ops::Range<usize>,
    hist: Option<History>,
}

/// What the failure policies need of one message once the handler has it.
pub(crate) struct Kept {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub id: MessageId,
    pub state: ChainState,
    /// The record as read, when the chain may write it to another topic.
    pub raw: Option<KeptRecord>,
}

/// An undecodable record whose policy is `dead_letter`.
pub(crate) struct Rejected {
    pub error: DecodeError,
    pub raw: Option<KeptRecord>,
}

/// Where a record pushed to the builder came from: polled now, or kept
/// from an earlier delivery (a retry in place under `ordering = "key"`).
#[derive(Clone, Copy)]
pub(crate) enum Source<'m> {
    Polled(&'m BorrowedMessage<'m>),
    Kept(&'m KeptRecord),
}

/// How a polled record enters the batch.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Seen {
    /// To be handed to the handler; its standing in the failure chain.
    New(ChainState),
    /// Read again after a rewind, but it was handled (or dealt with by a
    /// policy) before: its offset counts, the handler does not see it again.
    AlreadyHandled,
}

/// What the policies do with an undecodable record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OnBadRecord {
    Fail,
    Skip,
    DeadLetter,
}

/// One partition's offsets in a batch, read during one assignment generation.
pub(crate) struct BatchRange {
    pub tp: TopicPartition,
    pub generation: Generation,
    pub first: i64,
    pub end: i64,
    /// Records read of it (tombstones and skipped records included).
    pub records: usize,
    subscribed: bool,
}

/// Room made for a batch's messages up front, so a batch is not copied as
/// it grows; larger batches grow past it.
const MESSAGES_CAPACITY: usize = 1024;

/// Room made per message for the keys of a batch, up front: ids of this
/// length or less are never copied as the key buffer grows.
const KEY_BYTES_RESERVED: usize = 24;

impl<T> Batch<T> {
    pub(super) fn empty(id: u64, capacity: usize) -> Self {
        Batch {
            id,
            client: 0,
            messages: Vec::with_capacity(capacity.min(MESSAGES_CAPACITY)),
            ranges: Vec::new(),
            kept: Vec::new(),
            rejected: Vec::new(),
            keyed: None,
            deferred: Vec::new(),
            keys: String::new(),
        }
    }

    /// Gives each deferred message its id and ref (on the thread that will
    /// hand it to the handler).
    pub fn finish_messages(&mut self) {
        let deferred = std::mem::take(&mut self.deferred);
        for (m, d) in self.messages.iter_mut().zip(deferred) {
            m.set_source(&self.keys[d.key], d.hist);
        }
        self.keys = String::new();
    }

    /// True when the runner has something to do: messages for the handler,
    /// or records for the dead-letter topic.
    pub fn has_work(&self) -> bool {
        !self.messages.is_empty() || !self.rejected.is_empty()
    }

    /// The batch ref for logs: `topic[partition=first:end,...]`. A batch
    /// put together from several keys' pieces (`ordering = "key"`) holds
    /// several ranges of a partition: its ref spans them, one per partition.
    pub fn batch_ref(&self) -> BatchRef {
        let mut spans: Vec<PartitionRange> = Vec::with_capacity(self.ranges.len());
        for r in &self.ranges {
            match spans
                .iter_mut()
                .find(|s| s.partition == r.tp.partition && s.topic == r.tp.topic)
            {
                Some(s) => {
                    s.first = s.first.min(r.first);
                    s.end = s.end.max(r.end);
                    s.records += r.records;
                }
                None => spans.push(PartitionRange {
                    topic: r.tp.topic.clone(),
                    partition: r.tp.partition,
                    first: r.first,
                    end: r.end,
                    records: r.records,
                }),
            }
        }
        BatchRef::from_ranges(spans)
    }

    /// Drops the records of partitions reassigned or revoked since they were
    /// read (the next owner reads them again). Returns whether any record is left.
    pub fn drop_stale(&mut self, tracker: &OffsetTracker) -> bool {
        self.retain_ranges(|r| tracker.generation(&r.tp) == Some(r.generation))
    }

    /// Like [`Batch::drop_stale`], for a batch already handed out, given
    /// each partition's current generation: drops the ranges of partitions
    /// revoked or rewound for a retry since, so the handler never sees
    /// records that will be read again. (An unfinished range is held exactly
    /// while its generation is current.)
    pub fn drop_released(
        &mut self,
        current: impl Fn(&TopicPartition) -> Option<Generation>,
    ) -> bool {
        self.retain_ranges(|r| current(&r.tp) == Some(r.generation))
    }

    fn retain_ranges(&mut self, keep: impl Fn(&BatchRange) -> bool) -> bool {
        if self.ranges.iter().all(&keep) {
            return !self.ranges.is_empty();
        }
        let (kept, dropped): (Vec<BatchRange>, Vec<BatchRange>) =
            std::mem::take(&mut self.ranges).into_iter().partition(keep);
        self.ranges = kept;
        let gone = |topic: &str, partition: i32| {
            dropped
                .iter()
                .any(|r| r.tp.partition == partition && &*r.tp.topic == topic)
        };
        if !self.deferred.is_empty() {
            // `deferred` runs in step with `messages`: filter both.
            let (messages, deferred): (Vec<Message<T>>, Vec<Deferred>) =
                std::mem::take(&mut self.messages)
                    .into_iter()
                    .zip(std::mem::take(&mut self.deferred))
                    .filter(|(m, _)| m.origin().is_none_or(|o| !gone(&o.topic, o.partition)))
                    .unzip();
            self.messages = messages;
            self.deferred = deferred;
        } else if self.kept.is_empty() {
            self.messages
                .retain(|m| m.origin().is_none_or(|o| !gone(&o.topic, o.partition)));
        } else {
            // `kept` runs in step with `messages`: filter both by it.
            let (messages, kept): (Vec<Message<T>>, Vec<Kept>) = std::mem::take(&mut self.messages)
                .into_iter()
                .zip(std::mem::take(&mut self.kept))
                .filter(|(_, k)| !gone(&k.topic, k.partition))
                .unzip();
            self.messages = messages;
            self.kept = kept;
        }
        self.rejected
            .retain(|r| !gone(&r.error.topic, r.error.partition));
        !self.ranges.is_empty()
    }
}

/// The bytes a record counts for against `max_batch_bytes`: key and value.
fn size_of(record: &RawRecord<'_>) -> usize {
    record.value.map_or(0, <[u8]>::len) + record.key.map_or(0, <[u8]>::len)
}

/// Which topics the consumer subscribed to; records of others are skipped.
struct Subscription {
    topics: Vec<String>,
    /// A `^pattern` subscription: librdkafka matched the topic already.
    any: bool,
}

impl Subscription {
    fn accepts(&self, topic: &str) -> bool {
        self.any || self.topics.iter().any(|t| t == topic)
    }
}

/// Builds batches from polled records.
pub(crate) struct BatchBuilder<T> {
    batch: Batch<T>,
    bytes: usize,
    window_start: Instant,
    next_id: u64,
    batch_size: usize,
    max_bytes: usize,
    timeout: Duration,
    latest_only: bool,
    subscription: Subscription,
    on_bad_record: OnBadRecord,
    /// Keep what the failure policies need of each message.
    keep_state: bool,
    /// ...including a copy of the record as read.
    keep_records: bool,
    /// The last history read, for the next record to share.
    last_history: LastHistory,
    /// Leave ids and refs to the runner (see [`Deferred`]): not when the
    /// builder itself needs the ids (latest-only, failure policies).
    defer: bool,
}

impl<T: DeserializeOwned> BatchBuilder<T> {
    pub fn new(settings: &ConsumerSettings) -> Self {
        BatchBuilder {
            batch: Batch::empty(0, settings.batch_size),
            bytes: 0,
            window_start: Instant::now(),
            next_id: 1,
            batch_size: settings.batch_size,
            max_bytes: settings.max_batch_bytes,
            timeout: settings.batch_timeout(),
            latest_only: settings.latest_only,
            subscription: Subscription {
                topics: settings.subscription(),
                any: settings.topics.iter().any(|t| t.starts_with('^')),
            },
            on_bad_record: OnBadRecord::Fail,
            keep_state: false,
            keep_records: false,
            last_history: LastHistory::default(),
            defer: !settings.latest_only,
        }
    }

    /// Follows the failure chain: what happens to undecodable records, and
    /// what is kept of each message for the policies.
    pub fn with_chain(mut self, chain: &Chain) -> Self {
        // Undecodable records skip the retry steps, so the state is moot.
        self.on_bad_record = match chain.decide(ChainState::default(), false, 0.0) {
            Action::Skip => OnBadRecord::Skip,
            Action::DeadLetter => OnBadRecord::DeadLetter,
            _ => OnBadRecord::Fail,
        };
        self.keep_state = !chain.is_fail_only();
        self.keep_records = chain.keeps_records();
        self.defer = self.defer && !self.keep_state;
        self
    }

    /// Cuts the batch being built when `record` would take it past
    /// `max_batch_bytes`, so that the record starts the next one.
    pub fn make_room(&mut self, record: &RawRecord<'_>, now: Instant) -> Option<Batch<T>> {
        (self.has_records() && self.bytes + size_of(record) > self.max_bytes).then(|| self.cut(now))
    }

    /// Adds one record (call [`BatchBuilder::make_room`] first).
    ///
    /// `generation` gives the partition's current assignment generation; a
    /// record of a partition not assigned (a race with a revoke) is dropped
    /// unread, to be read again by the owner. A record that cannot be decoded
    /// adds nothing.
    ///
    /// `seen` says whether the handler gets it; `source` is the record as
    /// librdkafka returned it, copied when the failure chain may write it to
    /// another topic. An undecodable record goes to the failure chain: with
    /// `skip` its offset counts as dealt with, with `dead_letter` it joins the
    /// batch for the runner to write, with `fail` the error is returned.
    pub fn push(
        &mut self,
        record: RawRecord<'_>,
        seen: Seen,
        source: Option<Source<'_>>,
        generation: impl FnOnce(&TopicPartition) -> Option<Generation>,
        shared: &Shared,
    ) -> Result<(), DecodeError> {
        let size = size_of(&record);
        let index = match self.range_of(record.topic, record.partition) {
            Some(i) => i,
            None => {
                let tp = TopicPartition::new(record.topic, record.partition);
                let Some(generation) = generation(&tp) else {
                    tracing::debug!(partition = %tp, offset = record.offset, "record of a partition not assigned dropped");
                    return Ok(());
                };
                let subscribed = self.subscription.accepts(record.topic);
                if !subscribed {
                    tracing::warn!(
                        topic = record.topic,
                        subscribed = ?self.subscription.topics,
                        "records of a topic this consumer did not subscribe to are skipped"
                    );
                }
                self.batch.ranges.push(BatchRange {
                    tp,
                    generation,
                    first: record.offset,
                    end: record.offset + 1,
                    records: 0,
                    subscribed,
                });
                self.batch.ranges.len() - 1
            }
        };
        let range = &mut self.batch.ranges[index];
        let state = match seen {
            Seen::New(state) => state,
            Seen::AlreadyHandled => {
                range.first = range.first.min(record.offset);
                range.end = range.end.max(record.offset + 1);
                range.records += 1;
                return Ok(());
            }
        };
        let decoded = if range.subscribed {
            unpack_parts::<T>(record, &mut self.last_history)
        } else {
            shared.metrics.skipped_unsubscribed.increment(1);
            Ok(None)
        };
        let copy = |topic: &Arc<str>| {
            if self.keep_records {
                source.map(|source| match source {
                    Source::Polled(m) => KeptRecord::copy(m, topic),
                    Source::Kept(kept) => kept.clone(),
                })
            } else {
                None
            }
        };
        match decoded {
            Err(error) => {
                shared
                    .stats
                    .decode_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                shared.metrics.decode_error(&error);
                match self.on_bad_record {
                    OnBadRecord::Fail => {
                        if range.records == 0 {
                            self.batch.ranges.swap_remove(index);
                        }
                        return Err(error);
                    }
                    OnBadRecord::Skip => {
                        tracing::warn!(error = %error, "undecodable record skipped (failure policy `skip`)");
                        shared
                            .metrics
                            .skipped_failed(super::failure_reason(Some(&error.kind)));
                        shared
                            .stats
                            .failed_skipped
                            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                    OnBadRecord::DeadLetter => {
                        let raw = copy(&range.tp.topic);
                        self.batch.rejected.push(Rejected { error, raw });
                        self.bytes += size;
                    }
                }
            }
            Ok(Some(parts)) if self.defer => {
                if self.batch.deferred.capacity() == 0 {
                    // Room for as many as the messages have, at once: grown
                    // one doubling at a time, each entry was written to
                    // memory not yet in the cache.
                    let room = self.batch.messages.capacity();
                    self.batch.deferred.reserve(room);
                    self.batch.keys.reserve(room * KEY_BYTES_RESERVED);
                }
                let start = self.batch.keys.len();
                self.batch.keys.push_str(parts.key);
                self.batch.deferred.push(Deferred {
                    key: start..self.batch.keys.len(),
                    hist: parts.hist,
                });
                let mut message = Message::consumed(
                    parts.payload,
                    &range.tp.topic,
                    record.partition,
                    record.offset,
                    range.generation,
                );
                message.set_failed_attempts(state.attempts);
                self.batch.messages.push(message);
                self.bytes += size;
            }
            Ok(Some(parts)) => {
                let mut message = Message::consumed(
                    parts.payload,
                    &range.tp.topic,
                    record.partition,
                    record.offset,
                    range.generation,
                );
                message.set_source(parts.key, parts.hist);
                message.set_failed_attempts(state.attempts);
                if self.keep_state {
                    let raw = copy(&range.tp.topic);
                    self.batch.kept.push(Kept {
                        topic: Arc::clone(&range.tp.topic),
                        partition: record.partition,
                        offset: record.offset,
                        id: message.id.clone(),
                        state,
                        raw,
                    });
                }
                self.batch.messages.push(message);
                self.bytes += size;
            }
            Ok(None) => {
                if range.subscribed {
                    shared.metrics.skipped_tombstones.increment(1);
                }
                shared
                    .stats
                    .skipped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        range.first = range.first.min(record.offset);
        range.end = range.end.max(record.offset + 1);
        range.records += 1;
        Ok(())
    }

    fn range_of(&self, topic: &str, partition: i32) -> Option<usize> {
        // Records come in runs per partition: look from the most recent range.
        self.batch
            .ranges
            .iter()
            .rposition(|r| r.tp.partition == partition && &*r.tp.topic == topic)
    }

    /// True when the batch being built holds a record.
    pub fn has_records(&self) -> bool {
        // Asked for every record polled, so not counted: every range holds
        // at least one record (`push` removes a range it opened for nothing).
        !self.batch.ranges.is_empty()
    }

    /// True when the batch is full, or the timeout passed and it holds a record.
    pub fn should_cut(&self, now: Instant) -> bool {
        self.batch.messages.len() >= self.batch_size
            || (self.has_records() && now >= self.window_start + self.timeout)
    }

    /// How long until the timeout of the batch being built.
    pub fn remaining(&self, now: Instant) -> Duration {
        (self.window_start + self.timeout).saturating_duration_since(now)
    }

    /// A window that ended with no record starts again, so that a record
    /// arriving after a quiet spell does not make a batch of one.
    pub fn restart_idle_window(&mut self, now: Instant) {
        if !self.has_records() && now >= self.window_start + self.timeout {
            self.window_start = now;
        }
    }

    /// Takes the batch being built and starts the next.
    pub fn cut(&mut self, now: Instant) -> Batch<T> {
        let mut batch = std::mem::replace(
            &mut self.batch,
            Batch::empty(self.next_id + 1, self.batch_size),
        );
        batch.id = self.next_id;
        self.next_id += 1;
        self.bytes = 0;
        self.window_start = now;
        // A batch shares histories only within itself: the runner drops its
        // messages while this thread builds the next batch, and one shared
        // reference count touched from both threads costs more than one
        // history check and copy per batch.
        self.last_history = LastHistory::default();
        if self.latest_only {
            if batch.kept.is_empty() {
                batch.messages = latest_only(std::mem::take(&mut batch.messages));
            } else {
                let (messages, kept) = latest_only_with(
                    std::mem::take(&mut batch.messages),
                    std::mem::take(&mut batch.kept),
                );
                batch.messages = messages;
                batch.kept = kept;
            }
        }
        batch
    }

    /// Drops buffered records of partitions whose generation changed.
    pub fn drop_stale(&mut self, tracker: &OffsetTracker) {
        self.batch.drop_stale(tracker);
    }

    /// The ranges of the batch being built.
    pub fn ranges(&self) -> &[BatchRange] {
        &self.batch.ranges
    }
}

/// [`latest_only`] over messages and what is kept of each, in step.
fn latest_only_with<T>(messages: Vec<Message<T>>, kept: Vec<Kept>) -> (Vec<Message<T>>, Vec<Kept>) {
    let mut seen = std::collections::HashSet::with_capacity(messages.len());
    let mut keep = vec![false; messages.len()];
    for (i, m) in messages.iter().enumerate().rev() {
        keep[i] = seen.insert(m.id.as_str());
    }
    messages
        .into_iter()
        .zip(kept)
        .zip(keep)
        .filter_map(|(pair, k)| k.then_some(pair))
        .unzip()
}

pub(crate) mod pieces;
#[cfg(test)]
mod tests;
