//! The engine's state between the poller, its rebalance callbacks, the
//! runner and the handles: the offset tracker, the batches in flight, the
//! retries waiting, and the outcomes and commands sent to the poller.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::error::KafkaError;

use super::events::ConsumerEvent;
use super::gaps;
use super::policy;
use super::stats::StatsCounters;
use crate::failure::record::KeptRecord;
use crate::metrics::ConsumerMetrics;
use crate::offsets::{OffsetTracker, TopicPartition};
use crate::settings::ConsumerSettings;

/// State shared by the poller loop, its rebalance callbacks, the runner and handles.
pub(super) struct Shared {
    /// Locked by the poller loop between polls and by the rebalance
    /// callbacks (which run inside `poll`, on the same thread).
    pub(super) state: Mutex<PollerState>,
    /// Shared by the consumer's clients: a shutdown stops them all.
    pub(super) stopping: Arc<AtomicBool>,
    /// Bumped on every assign and revoke, so the loop knows to drop buffered
    /// records of partitions whose generation changed.
    pub(super) rebalance_epoch: AtomicU64,
    /// Shared by the consumer's clients: a handle reads their sum.
    pub(super) stats: Arc<StatsCounters>,
    pub(super) metrics: ConsumerMetrics,
    pub(super) revoke_timeout: Duration,
    pub(super) commit: bool,
    /// Set while the poller loop runs: a revoke then waits for its
    /// partitions' batches from the loop (which keeps handing over the
    /// other partitions' batches), not inside librdkafka's callback.
    pub(super) defer_revokes: AtomicBool,
    /// Settled offsets are stored for librdkafka's interval commit
    /// (`commit_interval_ms` above 0) rather than committed one by one.
    pub(super) interval_commit: bool,
    /// The batches in the handler now, with when each started: the runner
    /// writes it, the poller reads it to report batches that run long. Not
    /// under the state lock, which a revoke holds while it waits for them.
    pub(super) running: Mutex<HashMap<u64, Instant>>,
    /// The library's own retry topic, when the chain has `retry_topic`.
    pub(super) retry_topic: Option<String>,
    /// Each assigned partition's current generation, as in the tracker. The
    /// runner reads it (to drop records that will be read again) without
    /// the state lock, which a revoke holds while it waits for the runner.
    pub(super) generations: Mutex<HashMap<TopicPartition, crate::offsets::Generation>>,
    /// This client's index (`consumer.clients`), for events and logs.
    pub(super) client: usize,
    /// Shared by the consumer's clients: what [`ConsumerHandle::events`]
    /// watches.
    ///
    /// [`ConsumerHandle::events`]: super::ConsumerHandle::events
    pub(super) events: tokio::sync::broadcast::Sender<ConsumerEvent>,
}

impl Shared {
    #[cfg(test)]
    pub(super) fn new(settings: &ConsumerSettings, inbox: mpsc::Receiver<ToPoller>) -> Shared {
        let (events, _) = tokio::sync::broadcast::channel(1);
        Shared::of_client(settings, inbox, Arc::default(), Arc::default(), (0, events))
    }

    /// Tells whoever watches the consumer's events (nothing is built when
    /// nobody does).
    pub(super) fn emit(&self, event: impl FnOnce(usize) -> ConsumerEvent) {
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event(self.client));
        }
    }

    /// One client's state, with the stop flag and counters all of the
    /// consumer's clients share.
    pub(super) fn of_client(
        settings: &ConsumerSettings,
        inbox: mpsc::Receiver<ToPoller>,
        stopping: Arc<AtomicBool>,
        stats: Arc<StatsCounters>,
        (client, events): (usize, tokio::sync::broadcast::Sender<ConsumerEvent>),
    ) -> Shared {
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
                busy_lanes: Default::default(),
                redeliveries: Vec::new(),
                keyed_redeliveries: Vec::new(),
                expectations: Vec::new(),
                revoking: Vec::new(),
                published_in_flight: (0, 0),
                user_paused: HashSet::new(),
            }),
            stopping,
            rebalance_epoch: AtomicU64::new(0),
            stats,
            metrics: ConsumerMetrics::new(&settings.service),
            revoke_timeout: Duration::from_millis(settings.revoke_timeout_ms),
            commit: settings.commit,
            interval_commit: settings.commit && settings.commit_interval_ms > 0,
            defer_revokes: AtomicBool::new(false),
            running: Mutex::new(HashMap::new()),
            retry_topic: settings.failure.retry_topic_name().map(str::to_owned),
            generations: Mutex::new(HashMap::new()),
            client,
            events,
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
            running.insert(id, Instant::now());
        } else {
            running.remove(&id);
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
    /// Under `ordering = "key"`: the lanes of the batches in flight.
    pub(super) busy_lanes: super::batch::pieces::LaneSet,
    /// Partitions paused at `max_in_flight_records`, until half are settled.
    pub(super) capped: HashSet<TopicPartition>,
    /// Partitions to be read again after a rewind, for the poller to take.
    pub(super) redeliveries: Vec<(TopicPartition, Redelivery)>,
    /// Under `ordering = "key"`: records to deliver again from memory, for
    /// the key scheduler to take.
    pub(super) keyed_redeliveries: Vec<KeyedRedelivery>,
    /// Where partitions continue after an assignment or a seek, for the
    /// poller's gap guard to take.
    pub(super) expectations: Vec<gaps::Expectation>,
    /// Revokes librdkafka asked for that wait for their partitions'
    /// batches in the handler, while the other partitions go on.
    pub(super) revoking: Vec<super::revoke::PendingRevoke>,
    /// What this client last added to the in-flight gauges (batches, records).
    pub(super) published_in_flight: (usize, usize),
    /// Partitions the user paused ([`ConsumerHandle::pause`]): kept paused
    /// whatever back-pressure, retries and the in-flight cap do, and across
    /// rebalances, until the user resumes them.
    ///
    /// [`ConsumerHandle::pause`]: super::ConsumerHandle::pause
    pub(super) user_paused: HashSet<TopicPartition>,
}

impl PollerState {
    /// The partitions held and not being revoked (in no order).
    pub(super) fn held(&self) -> Vec<TopicPartition> {
        let mut held = self.tracker.partitions();
        held.retain(|tp| self.tracker.generation(tp).is_some());
        held
    }
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
    /// Under `ordering = "key"`: its lanes, and the records it settles when
    /// it finishes (its ranges then only say which partitions it holds).
    pub(super) keyed: Option<super::batch::pieces::Keyed>,
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

/// Records of a finished batch to be delivered again, from memory, once due
/// (a retry in place under `ordering = "key"`).
pub(super) struct KeyedRedelivery {
    pub(super) due: Instant,
    /// Each record, its standing in the chain, and the generation it was read under.
    pub(super) records: Vec<(KeptRecord, policy::ChainState, crate::offsets::Generation)>,
}

/// A partition of a batch whose records from `at` on were not dealt with.
pub(super) struct Rewind {
    pub(super) tp: TopicPartition,
    pub(super) at: i64,
    /// For a retry in place: the wait, and the standing of each retried record.
    pub(super) retry: Option<(Duration, BTreeMap<i64, policy::ChainState>)>,
}

pub(super) enum ToPoller {
    /// A control operation of a handle (`control.rs`), run on the poller
    /// thread with the consumer and the state; it answers through its own
    /// reply channel.
    Control(super::control::ControlOp),
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
    /// Under `ordering = "key"`: the batch is done but for `records`, to be
    /// delivered again after `wait` (their keys wait for them).
    Redeliver {
        batch: u64,
        records: Vec<(KeptRecord, policy::ChainState)>,
        wait: Duration,
    },
    /// A manual commit: settle what it names, commit the watermarks.
    Commit {
        settle: Settle,
        reply: tokio::sync::oneshot::Sender<Result<(), KafkaError>>,
    },
}

/// What a manual commit says was dealt with.
#[derive(Clone)]
pub(super) enum Settle {
    /// Every record handed out before each offset (`ConsumerHandle::commit`).
    Before(Vec<(TopicPartition, i64)>),
    /// These records, as read under their generation
    /// (`ConsumerHandle::commit_messages`).
    Records(Vec<(TopicPartition, crate::offsets::Generation, Vec<i64>)>),
}
