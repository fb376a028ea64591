//! The lane scheduler: which batches are cut from which records, and which
//! may go to the handler now.
//!
//! A lane is what must be handled in order. With `ordering = "partition"`
//! and `concurrency` above 1, every partition is a lane with a batch
//! builder of its own: a partition's batches go to the handler one after
//! the other (the next only once the one before was reported), while
//! batches of other partitions run beside them. A lane whose batch is in
//! the handler keeps filling its next batches; `max_in_flight_records`
//! bounds them by pausing the partition (see `cap_partitions`).
//!
//! With `concurrency = 1` (one batch in the handler at a time anyway) or
//! `ordering = "unordered"`, one builder cuts batches from every partition
//! in the order records arrive, and they are handed over in that order.
//!
//! Either way, a partition's ranges reach the offset tracker in offset
//! order: the tracker moves its watermark over finished ranges in the order
//! they were handed out, so a later range handed out before an earlier one
//! would let the commit jump over the earlier one.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::BorrowedMessage;
use rdkafka::TopicPartitionList;
use serde::de::DeserializeOwned;
use tokio::sync::mpsc::error::TrySendError;

use super::batch::{Batch, BatchBuilder, Seen, Source};
use super::events::ConsumerEvent;
use super::policy::Chain;
use super::rebalance::PollerContext;
use super::state::{InFlight, PollerState, Shared};
use crate::envelope::{DecodeError, RawRecord};
use crate::offsets::{Generation, OffsetTracker, TopicPartition};
use crate::settings::{ConsumerSettings, HandlingOrder};

mod keys;

/// One builder and the partition it cuts batches of (`None`: every partition).
struct Lane<T> {
    tp: Option<TopicPartition>,
    builder: BatchBuilder<T>,
}

/// Makes a builder for a partition's batches, keyed or not.
fn builder<T: DeserializeOwned>(
    settings: &ConsumerSettings,
    chain: &Chain,
    keyed: bool,
) -> BatchBuilder<T> {
    let builder = BatchBuilder::new(settings).with_chain(chain);
    if keyed {
        builder.keyed(chain)
    } else {
        builder
    }
}

/// The builders, and the batches cut and not yet handed over.
pub(super) struct Lanes<'s, T> {
    settings: &'s ConsumerSettings,
    chain: &'s Chain,
    /// A builder per partition (true) or one for all (false).
    per_partition: bool,
    /// Under `ordering = "key"`: the pieces cut batches are split into.
    keys: Option<keys::KeyQueue<T>>,
    lanes: Vec<Lane<T>>,
    /// The lane of the last record added: records come in runs per partition.
    last: usize,
    ready: VecDeque<Batch<T>>,
    next_id: u64,
    /// This poller's client, written into every batch.
    client: usize,
    /// Batches this client may have handed over and not had reported:
    /// `concurrency` in the handler and `prefetch_batches` more.
    slots: usize,
}

impl<'s, T: DeserializeOwned> Lanes<'s, T> {
    pub fn new(settings: &'s ConsumerSettings, chain: &'s Chain, client: usize) -> Self {
        let lanes_apart = settings.concurrency > 1;
        let per_partition = lanes_apart && settings.ordering != HandlingOrder::Unordered;
        let keyed = lanes_apart && settings.ordering == HandlingOrder::Key;
        let lanes = if per_partition {
            Vec::new()
        } else {
            vec![Lane {
                tp: None,
                builder: builder(settings, chain, false),
            }]
        };
        Lanes {
            settings,
            chain,
            per_partition,
            keys: keyed.then(|| keys::KeyQueue::new(settings, chain)),
            lanes,
            last: 0,
            ready: VecDeque::new(),
            next_id: 1,
            client,
            slots: settings.concurrency.max(1) + settings.prefetch_batches,
        }
    }

    /// The lane of a record's partition, made when it has none yet.
    fn lane_of(&mut self, topic: &str, partition: i32) -> usize {
        if !self.per_partition {
            return 0;
        }
        let is = |lane: &Lane<T>| {
            lane.tp
                .as_ref()
                .is_some_and(|tp| tp.partition == partition && &*tp.topic == topic)
        };
        if self.lanes.get(self.last).is_some_and(is) {
            return self.last;
        }
        let index = match self.lanes.iter().position(is) {
            Some(i) => i,
            None => {
                self.lanes.push(Lane {
                    tp: Some(TopicPartition::new(topic, partition)),
                    builder: builder(self.settings, self.chain, self.keys.is_some()),
                });
                self.lanes.len() - 1
            }
        };
        self.last = index;
        index
    }

    /// Adds one record to its lane's batch, cutting that batch first when
    /// the record would take it past `max_batch_bytes`. Errors as
    /// [`BatchBuilder::push`] does.
    pub fn add(
        &mut self,
        record: RawRecord<'_>,
        seen: Seen,
        source: Option<&BorrowedMessage<'_>>,
        generation: impl FnOnce(&TopicPartition) -> Option<Generation>,
        shared: &Shared,
        now: Instant,
    ) -> Result<(), DecodeError> {
        let lane = self.lane_of(record.topic, record.partition);
        if let Some(full) = self.lanes[lane].builder.make_room(&record, now) {
            self.queue(full);
        }
        let result = self.lanes[lane].builder.push(
            record,
            seen,
            source.map(Source::Polled),
            generation,
            shared,
        );
        if self.lanes[lane].builder.should_cut(now) {
            let batch = self.lanes[lane].builder.cut(now);
            self.queue(batch);
        }
        result
    }

    fn queue(&mut self, mut batch: Batch<T>) {
        if let Some(keys) = &mut self.keys {
            keys.split(batch);
            return;
        }
        // Ids are unique across the lanes' builders.
        batch.id = self.next_id;
        batch.client = self.client;
        self.next_id += 1;
        self.ready.push_back(batch);
    }

    /// Cuts every batch being built that holds a record (the consumer is
    /// stopping after a failure: what was read before it is handed over).
    pub fn cut_all(&mut self, now: Instant) {
        for i in 0..self.lanes.len() {
            if self.lanes[i].builder.has_records() {
                let batch = self.lanes[i].builder.cut(now);
                self.queue(batch);
            }
        }
    }

    /// Cuts the batches whose timeout passed; restarts the windows that
    /// ended with no record.
    pub fn cut_due(&mut self, now: Instant) {
        for i in 0..self.lanes.len() {
            if self.lanes[i].builder.should_cut(now) {
                let batch = self.lanes[i].builder.cut(now);
                self.queue(batch);
            } else {
                self.lanes[i].builder.restart_idle_window(now);
            }
        }
    }

    /// How long until the first timeout of a batch being built.
    pub fn remaining(&self, now: Instant) -> Duration {
        if !self.per_partition {
            return self.lanes[0].builder.remaining(now);
        }
        self.lanes
            .iter()
            .filter(|l| l.builder.has_records())
            .map(|l| l.builder.remaining(now))
            .min()
            .unwrap_or(Duration::MAX)
    }

    /// Drops what was read of partitions whose generation changed (revoked,
    /// reassigned, or rewound for a retry), and the lanes of partitions no
    /// longer assigned.
    pub fn drop_stale(&mut self, tracker: &OffsetTracker) {
        for lane in &mut self.lanes {
            lane.builder.drop_stale(tracker);
        }
        if self.per_partition {
            self.lanes.retain(|l| {
                l.builder.has_records()
                    || l.tp
                        .as_ref()
                        .is_some_and(|tp| tracker.generation(tp).is_some())
            });
            self.last = 0;
        }
        self.ready.retain_mut(|b| b.drop_stale(tracker));
        if let Some(keys) = &mut self.keys {
            keys.drop_stale(tracker);
        }
    }

    /// True when no cut batch waits to be handed over.
    pub fn ready_is_empty(&self) -> bool {
        self.ready.is_empty() && self.keys.as_ref().is_none_or(keys::KeyQueue::is_empty)
    }

    /// Hands over, in order, the cut batches that may go now while the
    /// channel has room. Returns true when one that may go waits for room.
    ///
    /// Per partition, a batch whose partition has one in flight waits, and
    /// so does every later batch of that partition: ranges reach the
    /// tracker in offset order.
    pub fn hand_over(
        &mut self,
        batches: &tokio::sync::mpsc::Sender<Batch<T>>,
        st: &mut PollerState,
        shared: &Shared,
    ) -> bool {
        if let Some(keys) = &mut self.keys {
            keys.take_redeliveries(st, shared);
            return keys.hand_over(batches, st, shared, &mut self.next_id, self.client);
        }
        // Partitions with a batch in flight, or an earlier batch waiting.
        let mut blocked: HashSet<TopicPartition> = HashSet::new();
        if self.per_partition {
            for b in &st.in_flight {
                for (tp, _, _, _) in &b.ranges {
                    blocked.insert(tp.clone());
                }
            }
        }
        let mut i = 0;
        while i < self.ready.len() {
            let batch = &mut self.ready[i];
            if !batch.drop_stale(&st.tracker) {
                self.ready.remove(i);
                continue;
            }
            if self.per_partition && batch.ranges.iter().any(|r| blocked.contains(&r.tp)) {
                blocked.extend(batch.ranges.iter().map(|r| r.tp.clone()));
                i += 1;
                continue;
            }
            if !batch.has_work() {
                // Only tombstones or skipped records: nothing for the
                // handler, but their offsets are dealt with.
                for r in &batch.ranges {
                    st.tracker.handed_out(&r.tp, r.first, r.end);
                    st.tracker.finished(&r.tp, r.generation, r.first);
                }
                self.ready.remove(i);
                continue;
            }
            // The runner's slots (in the handler, and prepared) are all
            // taken: the next outcome frees one.
            if st.in_flight.len() >= self.slots {
                return true;
            }
            let permit = match batches.try_reserve() {
                Ok(permit) => permit,
                Err(TrySendError::Full(())) | Err(TrySendError::Closed(())) => return true,
            };
            let Some(batch) = self.ready.remove(i) else {
                break;
            };
            let ranges = batch
                .ranges
                .iter()
                .filter_map(|r| {
                    st.tracker
                        .handed_out(&r.tp, r.first, r.end)
                        .map(|generation| (r.tp.clone(), generation, r.first, r.end))
                })
                .collect();
            if self.per_partition {
                blocked.extend(batch.ranges.iter().map(|r| r.tp.clone()));
            }
            st.in_flight.push(InFlight {
                id: batch.id,
                ranges,
                warned: false,
                records: batch.messages.len() + batch.rejected.len(),
                keyed: None,
            });
            st.publish_in_flight(shared);
            permit.send(batch);
        }
        false
    }

    /// The offsets read and not yet handed over, per partition: the first
    /// and the end.
    pub fn buffered(&self, spans: &mut HashMap<TopicPartition, (i64, i64)>) {
        let batches = self.ready.iter().flat_map(|b| b.ranges.iter());
        let building = self.lanes.iter().flat_map(|l| l.builder.ranges().iter());
        let pieces = self.keys.iter().flat_map(keys::KeyQueue::ranges);
        for r in batches.chain(building).chain(pieces) {
            let span = spans.entry(r.tp.clone()).or_insert((r.first, r.end));
            *span = (span.0.min(r.first), span.1.max(r.end));
        }
    }
}

/// Pauses each partition with `cap` or more records read and not yet
/// settled (`consumer.max_in_flight_records`), and resumes a capped one
/// once no more than half that many are left: the hysteresis keeps a
/// partition at the cap from being paused and resumed for every batch, each
/// time throwing away what librdkafka had fetched of it.
pub(super) fn cap_partitions<T: DeserializeOwned>(
    consumer: &BaseConsumer<PollerContext>,
    st: &mut PollerState,
    lanes: &Lanes<'_, T>,
    shared: &Shared,
    cap: usize,
) {
    // Per partition, from its first record not dealt with to one past the
    // last read: what a crash now would read again, and (but for records
    // already settled) what is held in memory.
    let mut spans: HashMap<TopicPartition, (i64, i64)> = HashMap::new();
    lanes.buffered(&mut spans);
    // What was handed out (in flight, or under `ordering = "key"` read and
    // split) is in the tracker, from its first open record to its end.
    for tp in st.tracker.partitions() {
        let (Some(open), Some(end)) = (st.tracker.first_open(&tp), st.tracker.handed_end(&tp))
        else {
            continue;
        };
        let span = spans.entry(tp).or_insert((open, end));
        *span = (span.0.min(open), span.1.max(end));
    }
    let counts: HashMap<TopicPartition, usize> = spans
        .into_iter()
        .map(|(tp, (first, end))| (tp, (end - first).max(0) as usize))
        .collect();
    for (tp, n) in &counts {
        if *n < cap || st.capped.contains(tp) {
            continue;
        }
        // Already paused (all of them, or this one for a retry): only
        // marked, so that nothing resumes it before it is below the cap.
        if !st.paused && !st.backoff.contains_key(tp) && !st.user_paused.contains(tp) {
            if let Err(e) = consumer.pause(&one(tp)) {
                tracing::warn!(partition = %tp, error = %e, "cannot pause a partition at consumer.max_in_flight_records; trying again");
                continue;
            }
        }
        tracing::debug!(partition = %tp, records = n, cap, "partition paused: max_in_flight_records reached");
        st.capped.insert(tp.clone());
        shared.stats.capped.fetch_add(1, Ordering::Relaxed);
        shared.metrics.partitions_capped.increment(1);
        shared.emit(|client| ConsumerEvent::Capped {
            client,
            partition: tp.clone(),
        });
    }
    let below: Vec<TopicPartition> = st
        .capped
        .iter()
        .filter(|tp| counts.get(*tp).copied().unwrap_or(0) <= cap / 2)
        .cloned()
        .collect();
    for tp in below {
        if !st.paused && !st.backoff.contains_key(&tp) && !st.user_paused.contains(&tp) {
            if let Err(e) = consumer.resume(&one(&tp)) {
                tracing::warn!(partition = %tp, error = %e, "cannot resume a partition below consumer.max_in_flight_records; trying again");
                continue;
            }
        }
        st.capped.remove(&tp);
    }
}

fn one(tp: &TopicPartition) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::with_capacity(1);
    tpl.add_partition(&tp.topic, tp.partition);
    tpl
}
