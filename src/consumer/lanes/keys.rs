//! The lanes of `ordering = "key"`: a cut batch is split into pieces, one
//! per key, and batches are put together from the pieces of keys that have
//! nothing in the handler.
//!
//! The offset tracker learns what a cut batch read (a range, with its
//! messages' offsets open) before any of it is handed over, so the commit
//! stops at the first record of any key not dealt with, whichever pieces
//! finish first. A record retried in place comes back as a piece of its
//! own, at the front, due after its wait: its key waits for it, other keys
//! do not, and the partition is never sought back.

use std::collections::VecDeque;
use std::time::Instant;

use serde::de::DeserializeOwned;
use tokio::sync::mpsc::error::TrySendError;

use super::super::batch::pieces::{LaneKey, LaneSet, Read};
use super::super::batch::{Batch, BatchBuilder, BatchRange};
use super::super::policy::Chain;
use super::super::state::{InFlight, PollerState, Shared};
use crate::offsets::OffsetTracker;
use crate::settings::ConsumerSettings;

/// A key's records from one cut batch, or records delivered again.
struct Piece<T> {
    lane: LaneKey,
    batch: Batch<T>,
    /// A retry in place: not before this.
    due: Option<Instant>,
}

pub(in crate::consumer) struct KeyQueue<T> {
    pieces: VecDeque<Piece<T>>,
    /// What cut batches read, for the tracker, in the order they were cut.
    unregistered: Vec<Read>,
    /// Decodes records delivered again (never latest-only: each of them is
    /// an open offset that only its own delivery settles).
    redo: BatchBuilder<T>,
    batch_size: usize,
    /// Batches the runner may hold: in the handler, and in the channel.
    slots: usize,
    /// Messages in `pieces`.
    pending: usize,
}

impl<T: DeserializeOwned> KeyQueue<T> {
    pub fn new(settings: &ConsumerSettings, chain: &Chain) -> Self {
        let mut plain = settings.clone();
        plain.latest_only = false;
        KeyQueue {
            pieces: VecDeque::new(),
            unregistered: Vec::new(),
            redo: BatchBuilder::new(&plain).with_chain(chain).keyed(chain),
            batch_size: settings.batch_size,
            slots: settings.concurrency.max(1) + settings.prefetch_batches,
            pending: 0,
        }
    }

    /// Splits a cut batch into its keys' pieces.
    pub fn split(&mut self, batch: Batch<T>) {
        let (pieces, reads) = batch.split_by_key();
        self.unregistered.extend(reads);
        self.pending += pieces.iter().map(|(_, b)| b.message_count()).sum::<usize>();
        self.pieces
            .extend(pieces.into_iter().map(|(lane, batch)| Piece {
                lane,
                batch,
                due: None,
            }));
    }

    pub fn is_empty(&self) -> bool {
        self.pieces.is_empty() && self.unregistered.is_empty()
    }

    pub fn ranges(&self) -> impl Iterator<Item = &BatchRange> {
        self.pieces.iter().flat_map(|p| p.batch.ranges.iter())
    }

    pub fn drop_stale(&mut self, tracker: &OffsetTracker) {
        self.pieces.retain_mut(|p| p.batch.drop_stale(tracker));
        self.pending = self.pieces.iter().map(|p| p.batch.message_count()).sum();
        self.unregistered
            .retain(|r| tracker.generation(&r.tp) == Some(r.generation));
    }

    /// Puts the records that a finished batch asked to have delivered again
    /// at the front, in their order, due after their wait.
    pub fn take_redeliveries(&mut self, st: &mut PollerState, shared: &Shared) {
        if st.keyed_redeliveries.is_empty() {
            return;
        }
        let now = Instant::now();
        for redelivery in std::mem::take(&mut st.keyed_redeliveries).into_iter().rev() {
            for (record, state, generation) in &redelivery.records {
                let tp = crate::offsets::TopicPartition::new(&record.topic, record.partition);
                if st.tracker.generation(&tp) != Some(*generation) {
                    continue; // revoked since: the next owner reads it again
                }
                if let Err(e) = self.redo.push_kept(record, *state, *generation, shared) {
                    // It decoded when it was first read; the same bytes
                    // decode the same way. Left open: never committed past.
                    tracing::error!(error = %e, "a record to deliver again no longer decodes; its partition's commit stays before it");
                }
            }
            if !self.redo.has_records() {
                continue;
            }
            let (pieces, _already_registered) = self.redo.cut(now).split_by_key();
            for (lane, batch) in pieces.into_iter().rev() {
                self.pending += batch.message_count();
                self.pieces.push_front(Piece {
                    lane,
                    batch,
                    due: Some(redelivery.due),
                });
            }
        }
    }

    /// Tells the tracker what cut batches read, then hands over batches
    /// put together from the pieces of free keys while the channel has
    /// room. Returns true when a piece that may go waits for room.
    pub fn hand_over(
        &mut self,
        batches: &tokio::sync::mpsc::Sender<Batch<T>>,
        st: &mut PollerState,
        shared: &Shared,
        next_id: &mut u64,
        client: usize,
    ) -> bool {
        for read in self.unregistered.drain(..) {
            if st.tracker.generation(&read.tp) == Some(read.generation) {
                st.tracker
                    .handed_out_open(&read.tp, read.first, read.end, &read.open);
            }
        }
        // (Pieces of partitions revoked since were dropped when the poller
        // saw the rebalance; one stale by a race is dropped by the runner,
        // and its settlement by the tracker.)
        // Keys with an earlier piece waiting (those with a batch in the
        // handler are `st.busy_lanes`).
        let mut blocked = LaneSet::default();
        let now = Instant::now();
        loop {
            if st.in_flight.len() >= self.slots {
                return self.any_may_go(&st.busy_lanes, &blocked, now);
            }
            let permit = match batches.try_reserve() {
                Ok(permit) => permit,
                Err(TrySendError::Full(())) | Err(TrySendError::Closed(())) => {
                    return self.any_may_go(&st.busy_lanes, &blocked, now);
                }
            };
            // With more free slots than full batches waiting, smaller
            // batches: more keys run at once (a batch's records are often
            // handled one after the other).
            let free = self.slots.saturating_sub(st.in_flight.len()).max(1);
            let size = self.pending.div_ceil(free).clamp(1, self.batch_size);
            let mut batch = Batch::empty(*next_id, size);
            let mut taken = LaneSet::default();
            let mut i = 0;
            while i < self.pieces.len() && batch.message_count() < size {
                let piece = &self.pieces[i];
                let joins = taken.contains(&piece.lane);
                let busy = st.busy_lanes.contains(&piece.lane) || blocked.contains(&piece.lane);
                if !joins && (busy || piece.due.is_some_and(|d| d > now)) {
                    // Its later pieces wait behind it.
                    blocked.insert(piece.lane);
                    i += 1;
                    continue;
                }
                let Some(piece) = self.pieces.remove(i) else {
                    break;
                };
                taken.insert(piece.lane);
                self.pending -= piece.batch.message_count();
                batch.merge(piece.batch);
            }
            if !batch.has_work() {
                return false;
            }
            *next_id += 1;
            batch.client = client;
            st.busy_lanes.extend(taken);
            let keyed = batch.keyed.take();
            st.in_flight.push(InFlight {
                id: batch.id,
                ranges: batch
                    .ranges
                    .iter()
                    .map(|r| (r.tp.clone(), r.generation, r.first, r.end))
                    .collect(),
                warned: false,
                records: batch.messages.len() + batch.rejected.len(),
                keyed,
            });
            st.publish_in_flight(shared);
            permit.send(batch);
        }
    }

    fn any_may_go(&self, busy: &LaneSet, blocked: &LaneSet, now: Instant) -> bool {
        let mut waiting = LaneSet::default();
        for piece in &self.pieces {
            if waiting.contains(&piece.lane) {
                continue;
            }
            let held = busy.contains(&piece.lane) || blocked.contains(&piece.lane);
            if held || piece.due.is_some_and(|d| d > now) {
                waiting.insert(piece.lane);
                continue;
            }
            return true;
        }
        false
    }
}
