//! The poller's state machine: how each outcome the runner reports, and
//! each command a handle sends, changes the tracker and the retries
//! waiting. Only the poller thread (its loop and its rebalance callbacks)
//! runs it.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;

use super::super::policy;
use super::super::rebalance::PollerContext;
use super::super::state::{
    InFlight, KeyedRedelivery, PendingSeek, PollerState, Redelivery, Rewind, Settle, Shared,
    ToPoller,
};
use crate::failure::record::KeptRecord;
use crate::offsets::TopicPartition;

impl PollerState {
    /// Applies every outcome and command waiting, without blocking.
    pub(in crate::consumer) fn drain(
        &mut self,
        consumer: &BaseConsumer<PollerContext>,
        shared: &Shared,
    ) {
        while let Some(event) = self.inbox.as_ref().and_then(|i| i.try_recv().ok()) {
            self.apply(event, consumer, shared);
        }
    }

    /// Waits up to `timeout` for one outcome or command and applies it.
    pub(in crate::consumer) fn wait_one(
        &mut self,
        timeout: Duration,
        consumer: &BaseConsumer<PollerContext>,
        shared: &Shared,
    ) {
        let event = match &self.inbox {
            Some(inbox) => inbox.recv_timeout(timeout).ok(),
            None => None,
        };
        if let Some(event) = event {
            self.apply(event, consumer, shared);
        }
    }

    pub(in crate::consumer) fn apply(
        &mut self,
        event: ToPoller,
        consumer: &BaseConsumer<PollerContext>,
        shared: &Shared,
    ) {
        match event {
            ToPoller::Finished { batch } => self.settle(batch, &[], shared),
            ToPoller::Retried {
                batch,
                rewinds,
                ack,
            } => {
                self.settle(batch, &rewinds, shared);
                let _ = ack.send(());
            }
            ToPoller::Failed { batch, rewinds } => {
                self.settle(batch, &rewinds, shared);
                self.handler_failed = true;
            }
            ToPoller::Control(op) => op(consumer, self, shared),
            ToPoller::Abandoned { batch } => {
                self.take_in_flight(batch, shared);
            }
            ToPoller::Redeliver {
                batch,
                records,
                wait,
            } => self.redeliver(batch, records, wait, shared),
            ToPoller::Commit { settle, reply } => {
                // Through the tracker, like every commit: what the request
                // settles, and then the contiguous watermarks, never past a
                // record that is not settled.
                match settle {
                    Settle::Before(offsets) => self.settle_given_before(&offsets, shared),
                    Settle::Records(records) => {
                        for (tp, generation, offsets) in records {
                            let held = self.tracker.settle_records(&tp, generation, offsets);
                            if held == 0 {
                                tracing::debug!(partition = %tp, "manual commit of messages read before a rebalance or rewind: nothing settled, they will be read again");
                            }
                        }
                    }
                }
                let offsets = self.tracker.committable();
                let _ = reply.send(
                    super::super::commit::commit_offsets(consumer, &offsets, shared).map(|()| {
                        for (tp, offset) in &offsets {
                            self.tracker.committed(tp, *offset);
                        }
                    }),
                );
            }
        }
    }

    /// Applies a batch's outcome to the tracker: each partition finished,
    /// or finished up to its rewind (and, for a retry, scheduled to be read
    /// again from there).
    pub(in crate::consumer) fn settle(&mut self, batch: u64, rewinds: &[Rewind], shared: &Shared) {
        let Some(done) = self.take_in_flight(batch, shared) else {
            return;
        };
        if let Some(keyed) = done.keyed {
            // Keyed batches are never rewound: a failure that stops the
            // consumer settles none of it (the commit stays before its
            // first record), and a retry in place comes as `Redeliver`.
            if rewinds.is_empty() {
                for (tp, generation, offsets) in keyed.settle {
                    self.tracker.settle_records(&tp, generation, offsets);
                }
            }
            return;
        }
        let mut rewound = false;
        for (tp, generation, first, end) in &done.ranges {
            let Some(rewind) = rewinds.iter().find(|r| r.tp == *tp) else {
                if !self.tracker.finished(tp, *generation, *first) {
                    tracing::debug!(partition = %tp, "result for a partition no longer owned dropped");
                }
                continue;
            };
            let at = rewind.at.clamp(*first, *end);
            let Some(new_generation) = self.tracker.rewind(tp, *generation, *first, at) else {
                continue;
            };
            shared.publish_generation(tp, Some(new_generation));
            rewound = true;
            if let Some((wait, states)) = &rewind.retry {
                self.hold(PendingSeek {
                    tp: tp.clone(),
                    generation: new_generation,
                    offset: at,
                    due: Instant::now() + *wait,
                });
                self.redeliveries.push((
                    tp.clone(),
                    Redelivery {
                        generation: new_generation,
                        read_under: *generation,
                        until: *end,
                        states: states.clone(),
                    },
                ));
            }
        }
        if rewound {
            // The poller drops what it buffered of the rewound partitions.
            shared.rebalance_epoch.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A manual commit of offsets: settles, before each offset, the records
    /// of the batches the handler was given and has not finished (those it
    /// finished are settled already). Never the batches prepared and not
    /// yet given to it, nor records read and not handed over: the caller
    /// can only have dealt with what it saw.
    fn settle_given_before(&mut self, offsets: &[(TopicPartition, i64)], shared: &Shared) {
        let started: Vec<u64> = shared
            .running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .keys()
            .copied()
            .collect();
        for batch in self.in_flight.iter().filter(|b| started.contains(&b.id)) {
            for (tp, offset) in offsets {
                match &batch.keyed {
                    Some(keyed) => {
                        for (t, generation, records) in &keyed.settle {
                            if t == tp {
                                let before = records.iter().copied().filter(|o| o < offset);
                                self.tracker.settle_records(tp, *generation, before);
                            }
                        }
                    }
                    None => {
                        for (t, generation, first, end) in &batch.ranges {
                            if t == tp {
                                self.tracker.settle_range(
                                    tp,
                                    *generation,
                                    *first,
                                    (*end).min(*offset),
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    /// Settles a keyed batch but for the records to deliver again, and
    /// queues those for the key scheduler.
    fn redeliver(
        &mut self,
        batch: u64,
        records: Vec<(KeptRecord, policy::ChainState)>,
        wait: Duration,
        shared: &Shared,
    ) {
        let Some(done) = self.take_in_flight(batch, shared) else {
            return;
        };
        let Some(keyed) = done.keyed else {
            tracing::error!(batch, "a batch of a consumer not ordered by key asked for a delivery from memory: nothing of it is settled");
            return;
        };
        let again = |tp: &TopicPartition, offset: i64| {
            records.iter().any(|(r, _)| {
                r.offset == offset && r.partition == tp.partition && r.topic == tp.topic
            })
        };
        let mut generations = Vec::new();
        for (tp, generation, offsets) in keyed.settle {
            let done: Vec<i64> = offsets.into_iter().filter(|o| !again(&tp, *o)).collect();
            self.tracker.settle_records(&tp, generation, done);
            generations.push((tp, generation));
        }
        let records = records
            .into_iter()
            .filter_map(|(record, state)| {
                let generation = generations
                    .iter()
                    .find(|(tp, _)| tp.partition == record.partition && tp.topic == record.topic)
                    .map(|(_, g)| *g)?;
                Some((record, state, generation))
            })
            .collect();
        self.keyed_redeliveries.push(KeyedRedelivery {
            due: Instant::now() + wait,
            records,
        });
    }

    /// Holds `seek.tp` back from `seek.offset` on: the poller pauses it,
    /// seeks it back there and resumes it at `seek.due`.
    ///
    /// A partition has one seek at a time, to the earliest offset asked for
    /// in its current generation. Several records of one retry-topic
    /// partition can be found not due before the poller performs the seek;
    /// had each queued its own, the last would win and the earlier records
    /// would never be read again (and be committed past). A seek of an
    /// older generation is stale and gives way to a newer one.
    pub(in crate::consumer) fn hold(&mut self, seek: PendingSeek) {
        match self.seeks.iter_mut().find(|s| s.tp == seek.tp) {
            None => self.seeks.push(seek),
            Some(held) if seek.generation > held.generation => *held = seek,
            Some(held) if seek.generation == held.generation && seek.offset < held.offset => {
                *held = seek
            }
            Some(_) => {}
        }
    }

    /// The offset `tp` is held back from, while its seek is pending.
    pub(in crate::consumer) fn held_from(&self, tp: &TopicPartition) -> Option<i64> {
        self.seeks.iter().find(|s| s.tp == *tp).map(|s| s.offset)
    }

    pub(in crate::consumer) fn take_in_flight(
        &mut self,
        batch: u64,
        shared: &Shared,
    ) -> Option<InFlight> {
        let i = self.in_flight.iter().position(|b| b.id == batch)?;
        let done = self.in_flight.swap_remove(i);
        if let Some(keyed) = &done.keyed {
            for lane in &keyed.lanes {
                self.busy_lanes.remove(lane);
            }
        }
        self.publish_in_flight(shared);
        Some(done)
    }

    /// Moves the in-flight gauges by this client's change: once per batch
    /// handed over or settled (the batches in flight are a handful), never
    /// per record. By the change, not to the value, so that the clients of
    /// a consumer (and consumers of one service) add up.
    pub(in crate::consumer) fn publish_in_flight(&mut self, shared: &Shared) {
        let records: usize = self.in_flight.iter().map(|b| b.records).sum();
        let now = (self.in_flight.len(), records);
        let (batches_before, records_before) = self.published_in_flight;
        shared
            .metrics
            .in_flight_batches
            .increment(now.0 as f64 - batches_before as f64);
        shared
            .metrics
            .in_flight_records
            .increment(now.1 as f64 - records_before as f64);
        self.published_in_flight = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consumer::state::Shared;

    fn seek(generation: u64, offset: i64) -> PendingSeek {
        PendingSeek {
            tp: TopicPartition::new("t.retry", 0),
            generation,
            offset,
            due: Instant::now(),
        }
    }

    fn held(shared: &Shared) -> Vec<(u64, i64)> {
        shared
            .lock()
            .seeks
            .iter()
            .map(|s| (s.generation, s.offset))
            .collect()
    }

    #[test]
    fn a_partition_is_held_from_its_earliest_offset_in_its_newest_generation() {
        let shared = Shared::for_tests();
        // Records 5 and 9 found not due, then 3 (after a rewind, say).
        shared.lock().hold(seek(1, 5));
        shared.lock().hold(seek(1, 9));
        assert_eq!(held(&shared), [(1, 5)], "the later record does not win");
        shared.lock().hold(seek(1, 3));
        assert_eq!(held(&shared), [(1, 3)]);
        assert_eq!(
            shared.lock().held_from(&TopicPartition::new("t.retry", 0)),
            Some(3)
        );
        shared.lock().hold(seek(0, 1));
        assert_eq!(
            held(&shared),
            [(1, 3)],
            "an older generation's seek is stale"
        );
        shared.lock().hold(seek(2, 7));
        assert_eq!(
            held(&shared),
            [(2, 7)],
            "a newer generation's seek replaces it"
        );
    }
}
