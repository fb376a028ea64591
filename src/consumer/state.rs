//! The engine's state between the poller, its rebalance callbacks, the
//! runner and the handles: the offset tracker, the batches in flight, the
//! retries waiting, and the outcomes and commands sent to the poller.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;

use super::gaps;
use super::policy;
use super::rebalance::PollerContext;
use super::stats::StatsCounters;
use crate::metrics::ConsumerMetrics;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::settings::ConsumerSettings;

/// State shared by the poller loop, its rebalance callbacks, the runner and handles.
pub(super) struct Shared {
    /// Locked by the poller loop between polls and by the rebalance
    /// callbacks (which run inside `poll`, on the same thread).
    pub(super) state: Mutex<PollerState>,
    pub(super) stopping: AtomicBool,
    /// Bumped on every assign and revoke, so the loop knows to drop buffered
    /// records of partitions whose generation changed.
    pub(super) rebalance_epoch: AtomicU64,
    pub(super) stats: StatsCounters,
    pub(super) metrics: ConsumerMetrics,
    pub(super) revoke_timeout: Duration,
    pub(super) commit: bool,
    /// The batches in the handler now, with when each started: the runner
    /// writes it, the poller reads it to report batches that run long. Not
    /// under the state lock, which a revoke holds while it waits for them.
    pub(super) running: Mutex<Vec<(u64, Instant)>>,
    /// The library's own retry topic, when the chain has `retry_topic`.
    pub(super) retry_topic: Option<String>,
    /// Each assigned partition's current generation, as in the tracker. The
    /// runner reads it (to drop records that will be read again) without
    /// the state lock, which a revoke holds while it waits for the runner.
    pub(super) generations: Mutex<HashMap<TopicPartition, crate::offsets::Generation>>,
}

impl Shared {
    pub(super) fn new(settings: &ConsumerSettings, inbox: mpsc::Receiver<ToPoller>) -> Shared {
        Shared {
            state: Mutex::new(PollerState {
                tracker: OffsetTracker::default(),
                inbox: Some(inbox),
                in_flight: Vec::new(),
                paused: false,
                handler_failed: false,
                seeks: Vec::new(),
                backoff: HashMap::new(),
                capped: HashSet::new(),
                redeliveries: Vec::new(),
                expectations: Vec::new(),
            }),
            stopping: AtomicBool::new(false),
            rebalance_epoch: AtomicU64::new(0),
            stats: StatsCounters::default(),
            metrics: ConsumerMetrics::new(&settings.service),
            revoke_timeout: Duration::from_millis(settings.revoke_timeout_ms),
            commit: settings.commit,
            running: Mutex::new(Vec::new()),
            retry_topic: settings.failure.retry_topic_name().map(str::to_owned),
            generations: Mutex::new(HashMap::new()),
        }
    }

    /// Publishes a partition's generation (`None`: no longer assigned).
    pub(super) fn publish_generation(
        &self,
        tp: &TopicPartition,
        generation: Option<crate::offsets::Generation>,
    ) {
        let mut generations = self
            .generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match generation {
            Some(g) => {
                generations.insert(tp.clone(), g);
            }
            None => {
                generations.remove(tp);
            }
        }
    }

    /// The current generation of a partition, as last published.
    pub(super) fn current_generation(
        &self,
        tp: &TopicPartition,
    ) -> Option<crate::offsets::Generation> {
        self.generations
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(tp)
            .copied()
    }

    #[cfg(test)]
    pub(super) fn for_tests() -> Shared {
        Shared::new(&ConsumerSettings::default(), mpsc::channel().1)
    }

    /// Records that the handler started (`true`) or finished batch `id`.
    pub(super) fn running(&self, id: u64, started: bool) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if started {
            running.push((id, Instant::now()));
        } else {
            running.retain(|(batch, _)| *batch != id);
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, PollerState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pub(super) struct PollerState {
    pub(super) tracker: OffsetTracker,
    /// Outcomes and commands for the poller; dropped when it exits.
    pub(super) inbox: Option<mpsc::Receiver<ToPoller>>,
    /// Batches handed to the runner and not yet reported.
    pub(super) in_flight: Vec<InFlight>,
    pub(super) paused: bool,
    pub(super) handler_failed: bool,
    /// Partitions to pause and seek back for a retry (on the poller thread).
    pub(super) seeks: Vec<PendingSeek>,
    /// Partitions paused until a retry is due.
    pub(super) backoff: HashMap<TopicPartition, Instant>,
    /// Partitions paused at `max_in_flight_records`, until half are settled.
    pub(super) capped: HashSet<TopicPartition>,
    /// Partitions to be read again after a rewind, for the poller to take.
    pub(super) redeliveries: Vec<(TopicPartition, Redelivery)>,
    /// Where partitions continue after an assignment or a seek, for the
    /// poller's gap guard to take.
    pub(super) expectations: Vec<gaps::Expectation>,
}

/// A batch handed to the runner: which ranges it holds.
pub(super) struct InFlight {
    pub(super) id: u64,
    /// Topic-partition, generation, first offset, end.
    pub(super) ranges: Vec<(TopicPartition, crate::offsets::Generation, i64, i64)>,
    /// True once it was logged as running long.
    pub(super) warned: bool,
    /// Its messages, and undecodable records for the dead-letter topic.
    pub(super) records: usize,
}

/// A partition to pause, seek back to `offset`, and resume at `due`.
pub(super) struct PendingSeek {
    pub(super) tp: TopicPartition,
    pub(super) generation: crate::offsets::Generation,
    pub(super) offset: i64,
    pub(super) due: Instant,
}

/// How to treat the records of a rewound partition as they are read again:
/// those in `states` are handed over again with that standing in the failure
/// chain; the others before `until` were dealt with and are not.
pub(super) struct Redelivery {
    pub(super) generation: crate::offsets::Generation,
    /// The generation the rewound batch was read under: when that is the
    /// generation of the partition's previous plan, this plan continues it.
    pub(super) read_under: crate::offsets::Generation,
    pub(super) until: i64,
    pub(super) states: BTreeMap<i64, policy::ChainState>,
}

/// A partition of a batch whose records from `at` on were not dealt with.
pub(super) struct Rewind {
    pub(super) tp: TopicPartition,
    pub(super) at: i64,
    /// For a retry in place: the wait, and the standing of each retried record.
    pub(super) retry: Option<(Duration, BTreeMap<i64, policy::ChainState>)>,
}

pub(super) enum ToPoller {
    Finished {
        batch: u64,
    },
    /// Some records are retried in place: rewind their partitions, then `ack`.
    Retried {
        batch: u64,
        rewinds: Vec<Rewind>,
        ack: tokio::sync::oneshot::Sender<()>,
    },
    /// The consumer stops; only records before each rewind may be committed.
    Failed {
        batch: u64,
        rewinds: Vec<Rewind>,
    },
    Abandoned {
        batch: u64,
    },
    /// A manual commit: settle what it names, commit the watermarks.
    Commit {
        settle: Settle,
        reply: tokio::sync::oneshot::Sender<Result<(), KafkaError>>,
    },
}

/// What a manual commit says was dealt with.
pub(super) enum Settle {
    /// Every record handed out before each offset (`ConsumerHandle::commit`).
    Before(Vec<(TopicPartition, i64)>),
    /// These records, as read under their generation
    /// (`ConsumerHandle::commit_messages`).
    Records(Vec<(TopicPartition, crate::offsets::Generation, Vec<i64>)>),
}

impl PollerState {
    /// Applies every outcome and command waiting, without blocking.
    pub(super) fn drain(&mut self, consumer: &BaseConsumer<PollerContext>, shared: &Shared) {
        while let Some(event) = self.inbox.as_ref().and_then(|i| i.try_recv().ok()) {
            self.apply(event, consumer, shared);
        }
    }

    /// Waits up to `timeout` for one outcome or command and applies it.
    pub(super) fn wait_one(
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

    pub(super) fn apply(
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
            ToPoller::Abandoned { batch } => {
                self.take_in_flight(batch, shared);
            }
            ToPoller::Commit { settle, reply } => {
                // Through the tracker, like every commit: what the request
                // settles, and then the contiguous watermarks, never past a
                // record that is not settled.
                match settle {
                    Settle::Before(offsets) => {
                        for (tp, offset) in offsets {
                            self.tracker.settle_before(&tp, offset);
                        }
                    }
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
                    super::commit::commit_offsets(consumer, &offsets, shared).map(|()| {
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
    pub(super) fn settle(&mut self, batch: u64, rewinds: &[Rewind], shared: &Shared) {
        let Some(done) = self.take_in_flight(batch, shared) else {
            return;
        };
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

    /// Holds `seek.tp` back from `seek.offset` on: the poller pauses it,
    /// seeks it back there and resumes it at `seek.due`.
    ///
    /// A partition has one seek at a time, to the earliest offset asked for
    /// in its current generation. Several records of one retry-topic
    /// partition can be found not due before the poller performs the seek;
    /// had each queued its own, the last would win and the earlier records
    /// would never be read again (and be committed past). A seek of an
    /// older generation is stale and gives way to a newer one.
    pub(super) fn hold(&mut self, seek: PendingSeek) {
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
    pub(super) fn held_from(&self, tp: &TopicPartition) -> Option<i64> {
        self.seeks.iter().find(|s| s.tp == *tp).map(|s| s.offset)
    }

    pub(super) fn take_in_flight(&mut self, batch: u64, shared: &Shared) -> Option<InFlight> {
        let i = self.in_flight.iter().position(|b| b.id == batch)?;
        let done = self.in_flight.swap_remove(i);
        self.publish_in_flight(shared);
        Some(done)
    }

    /// Sets the in-flight gauges: once per batch handed over or settled
    /// (the batches in flight are a handful), never per record.
    pub(super) fn publish_in_flight(&self, shared: &Shared) {
        let records: usize = self.in_flight.iter().map(|b| b.records).sum();
        shared
            .metrics
            .in_flight_batches
            .set(self.in_flight.len() as f64);
        shared.metrics.in_flight_records.set(records as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
