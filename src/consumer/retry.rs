//! Retries on the poller thread: records of the retry topic that are not
//! due yet, partitions sought back for a retry in place, their waits, and
//! the plans that say how a rewound partition's records are read again.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};

use super::batch::Seen;
use super::gaps::Expectation;
use super::policy::ChainState;
use super::rebalance::PollerContext;
use super::state::{PendingSeek, PollerState, Redelivery, Shared};
use crate::failure::record::read_headers;
use crate::failure::FailureInfo;
use crate::offsets::Generation;
use crate::offsets::TopicPartition;

/// How long a seek back for a retry may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// How a record of the retry topic enters the batch: `None` when it is not
/// due yet, or when its partition is held back from an earlier record that
/// was not due. A record not due holds its partition: the poller pauses it,
/// seeks it back to that record and resumes it when it is due; the
/// consumer's other partitions keep flowing. The records after it, polled
/// before the seek takes effect, are left out: they are read again after it.
pub(super) fn retry_record(m: &BorrowedMessage<'_>, step: usize, shared: &Shared) -> Option<Seen> {
    let tp = TopicPartition::new(m.topic(), m.partition());
    let offset = m.offset();
    if shared
        .lock()
        .held_from(&tp)
        .is_some_and(|from| offset >= from)
    {
        return None;
    }
    let headers = read_headers(m);
    let info = FailureInfo::from_headers(
        headers
            .iter()
            .map(|h| (h.key.as_slice(), h.value.as_deref())),
    );
    if let Some(wait) = info.due_ms.and_then(super::runner::until_due) {
        let mut st = shared.lock();
        if let Some(generation) = st.tracker.generation(&tp) {
            tracing::debug!(partition = %tp, offset, wait_ms = wait.as_millis() as u64, "retry record not due yet: its partition waits");
            st.hold(PendingSeek {
                tp,
                generation,
                offset,
                due: Instant::now() + wait,
            });
        }
        return None;
    }
    Some(Seen::New(ChainState {
        step,
        used: info.retries,
        attempts: info.attempts,
    }))
}

/// The poller's redelivery plans: how the records of rewound partitions
/// are read again.
#[derive(Default)]
pub(super) struct Plans {
    /// Plans still being read through; each record of their partitions is
    /// looked up.
    active: Vec<(TopicPartition, Redelivery)>,
    /// Plans read through to their end, kept (one per partition) for a
    /// rewind of a batch read under them to continue.
    spent: Vec<(TopicPartition, Redelivery)>,
}

impl Plans {
    /// True when no partition is being read again.
    pub fn is_empty(&self) -> bool {
        self.active.is_empty()
    }

    /// Takes the plans of partitions rewound since.
    ///
    /// A rewind of a batch read under a partition's plan continues that
    /// plan: past the rewound batch, the records the plan knew keep what it
    /// said of them (handled, or waiting with their standing in the chain).
    /// Replacing it instead would hand records handled before over again
    /// and start a waiting retry's count afresh.
    pub fn take(&mut self, st: &mut PollerState) {
        for (tp, mut plan) in st.redeliveries.drain(..) {
            for list in [&mut self.active, &mut self.spent] {
                let Some(i) = list.iter().position(|(known, _)| *known == tp) else {
                    continue;
                };
                let (_, old) = list.swap_remove(i);
                if old.generation == plan.read_under && old.until > plan.until {
                    let carried: Vec<(i64, ChainState)> = old
                        .states
                        .range(plan.until..)
                        .map(|(offset, state)| (*offset, *state))
                        .collect();
                    plan.states.extend(carried);
                    plan.until = old.until;
                }
            }
            self.active.push((tp, plan));
        }
    }

    /// How a record of a rewound partition enters the batch, or `None` when
    /// its partition is not being read again (any more).
    pub fn seen(&mut self, m: &BorrowedMessage<'_>, shared: &Shared) -> Option<Seen> {
        let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
        let index = self
            .active
            .iter()
            .position(|(tp, _)| tp.partition == partition && &*tp.topic == topic)?;
        let (tp, r) = &self.active[index];
        let current = shared.lock().tracker.generation(tp) == Some(r.generation);
        if !current {
            self.active.swap_remove(index);
            return None;
        }
        if offset >= r.until {
            let (tp, plan) = self.active.swap_remove(index);
            self.spent.retain(|(known, _)| *known != tp);
            self.spent.push((tp, plan));
            return None;
        }
        Some(match r.states.get(&offset) {
            Some(state) => Seen::New(*state),
            None => Seen::AlreadyHandled,
        })
    }

    /// Forgets the plans of partitions no longer held in their generation.
    pub fn retain(&mut self, current: impl Fn(&TopicPartition) -> Option<Generation>) {
        // A spent plan is only ever continued by a rewind in its own
        // generation's successor, so it may go once its partition is gone.
        self.spent.retain(|(tp, _)| current(tp).is_some());
    }
}

/// Pauses each partition a retry asked for and seeks it back. A partition
/// whose seek fails keeps handing out nothing, and the seek is tried again.
pub(super) fn seek_back(consumer: &BaseConsumer<PollerContext>, st: &mut PollerState) {
    if st.seeks.is_empty() {
        return;
    }
    let seeks = std::mem::take(&mut st.seeks);
    for seek in seeks {
        if st.tracker.generation(&seek.tp) != Some(seek.generation) {
            continue; // revoked or rewound again since
        }
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition(&seek.tp.topic, seek.tp.partition);
        // Pause first: pausing sets the fetch position to after the last
        // record read, and the seek then moves it back.
        let paused = consumer.pause(&tpl);
        let sought = paused.and_then(|()| {
            consumer.seek(
                &seek.tp.topic,
                seek.tp.partition,
                Offset::Offset(seek.offset),
                SEEK_TIMEOUT,
            )
        });
        match sought {
            Ok(()) => {
                tracing::debug!(partition = %seek.tp, offset = seek.offset, "partition sought back, paused until the retry is due");
                st.expectations.push(Expectation {
                    tp: seek.tp.clone(),
                    generation: seek.generation,
                    next: Some(seek.offset),
                });
                st.backoff.insert(seek.tp, seek.due);
            }
            Err(e) => {
                tracing::warn!(partition = %seek.tp, offset = seek.offset, error = %e, "cannot seek back for a retry; trying again");
                st.hold(seek);
            }
        }
    }
}

/// Resumes the partitions whose retry is due (unless all are paused for
/// back-pressure: then they resume with the others; or the partition is at
/// its in-flight cap: then it resumes below it).
pub(super) fn resume_due(consumer: &BaseConsumer<PollerContext>, st: &mut PollerState) {
    if st.backoff.is_empty() {
        return;
    }
    let now = Instant::now();
    let due: Vec<TopicPartition> = st
        .backoff
        .iter()
        .filter(|(_, at)| **at <= now)
        .map(|(tp, _)| tp.clone())
        .collect();
    for tp in due {
        // A partition also at its in-flight cap stays paused for that, and
        // one the user paused until the user resumes it.
        if !st.paused && !st.capped.contains(&tp) && !st.user_paused.contains(&tp) {
            let mut tpl = TopicPartitionList::with_capacity(1);
            tpl.add_partition(&tp.topic, tp.partition);
            if let Err(e) = consumer.resume(&tpl) {
                tracing::warn!(partition = %tp, error = %e, "cannot resume a partition after its retry wait; trying again");
                continue;
            }
        }
        st.backoff.remove(&tp);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn state(used: u32) -> ChainState {
        ChainState {
            step: 0,
            used,
            attempts: used,
        }
    }

    fn plan(
        generation: Generation,
        read_under: Generation,
        until: i64,
        states: &[(i64, u32)],
    ) -> Redelivery {
        Redelivery {
            generation,
            read_under,
            until,
            states: states.iter().map(|(o, u)| (*o, state(*u))).collect(),
        }
    }

    /// The poller takes a plan that a rewind of `tp` left.
    fn take(plans: &mut Plans, shared: &Shared, tp: &TopicPartition, plan: Redelivery) {
        shared.lock().redeliveries.push((tp.clone(), plan));
        plans.take(&mut shared.lock());
    }

    fn active(plans: &Plans) -> Vec<(Generation, i64, BTreeMap<i64, ChainState>)> {
        plans
            .active
            .iter()
            .map(|(_, r)| (r.generation, r.until, r.states.clone()))
            .collect()
    }

    #[test]
    fn a_rewind_of_a_batch_read_under_a_plan_continues_it() {
        let shared = Shared::for_tests();
        let tp = TopicPartition::new("t", 0);
        let mut plans = Plans::default();
        // Batch 0..100 failed 10 and 50: both wait for their first retry.
        take(
            &mut plans,
            &shared,
            &tp,
            plan(2, 1, 100, &[(10, 1), (50, 1)]),
        );
        // Read again, a batch 10..31 (cut by other partitions' records)
        // failed 10 again.
        take(&mut plans, &shared, &tp, plan(3, 2, 31, &[(10, 2)]));
        assert_eq!(
            active(&plans),
            [(3, 100, BTreeMap::from([(10, state(2)), (50, state(1))]))],
            "31..100 stay handled, and 50 keeps its standing"
        );
    }

    #[test]
    fn a_rewind_after_the_plan_was_read_through_still_continues_it() {
        let shared = Shared::for_tests();
        let tp = TopicPartition::new("t", 0);
        let mut plans = Plans::default();
        take(
            &mut plans,
            &shared,
            &tp,
            plan(2, 1, 100, &[(10, 1), (50, 1)]),
        );
        let spent = plans.active.pop().expect("one plan");
        plans.spent.push(spent);
        take(&mut plans, &shared, &tp, plan(3, 2, 31, &[(10, 2)]));
        assert_eq!(
            active(&plans),
            [(3, 100, BTreeMap::from([(10, state(2)), (50, state(1))]))]
        );
        assert!(plans.spent.is_empty());
    }

    #[test]
    fn a_plan_of_another_reading_is_replaced() {
        let shared = Shared::for_tests();
        let tp = TopicPartition::new("t", 0);
        let mut plans = Plans::default();
        take(&mut plans, &shared, &tp, plan(2, 1, 100, &[(50, 1)]));
        // The partition was revoked and assigned again (generation 5): its
        // records are read from the commit, and the old plan means nothing.
        take(&mut plans, &shared, &tp, plan(6, 5, 31, &[(10, 1)]));
        assert_eq!(active(&plans), [(6, 31, BTreeMap::from([(10, state(1))]))]);
    }
}
