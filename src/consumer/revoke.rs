//! Revokes: the revoked partitions' batches in the handler finish (for up
//! to `revoke_timeout_ms`), what finished is committed synchronously, and
//! the partitions are forgotten. A later result for them is dropped by the
//! generation check, so this consumer never commits for a partition it no
//! longer owns.
//!
//! A cooperative revoke, while the poller loop runs, is only started by
//! librdkafka's callback ([`begin`]): nothing more of its partitions is
//! handed out (what the poller buffered of them is dropped, for the next
//! owner to read), and the batches already handed to the runner run as
//! before. The loop goes on handing over the kept partitions' batches, and
//! [`serve`] finishes the revoke once its partitions have no batch left in
//! the handler, then gives them up to librdkafka, which waits for that. An
//! eager revoke takes every partition, so nothing could go on meanwhile;
//! it, and any revoke outside the loop (the final commit, closing), waits
//! in the callback itself ([`revoke_now`]).

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaResult;
use rdkafka::TopicPartitionList;

use super::commit::commit_finished_now;
use super::events::ConsumerEvent;
use super::rebalance::{names, PollerContext};
use super::state::{PollerState, Shared};
use crate::offsets::TopicPartition;

/// A revoke librdkafka asked for, waiting for its partitions' batches.
pub(super) struct PendingRevoke {
    partitions: Vec<TopicPartition>,
    deadline: Instant,
    cooperative: bool,
}

/// Starts revoking `tpl`'s partitions; [`serve`] finishes it.
pub(super) fn begin(shared: &Shared, tpl: &TopicPartitionList, cooperative: bool) {
    let partitions = super::rebalance::partitions(tpl);
    let mut st = shared.lock();
    for tp in &partitions {
        // Their generation stays what the runner knows: batches handed to
        // it run and settle as before, and the revoke waits for them.
        // (Dropping their records from a batch not started would report
        // that batch finished, settling records nobody handled.)
        st.tracker.begin_revoke(tp);
    }
    forget_retries(&mut st, &partitions);
    tracing::info!(
        partitions = %names(&partitions),
        "partitions being revoked: nothing more of them is handed out; the other partitions go on while their batches in the handler finish"
    );
    shared
        .stats
        .revoking
        .fetch_add(partitions.len() as u64, Ordering::Relaxed);
    st.revoking.push(PendingRevoke {
        partitions,
        deadline: Instant::now() + shared.revoke_timeout,
        cooperative,
    });
    // The poller drops what it buffered of them.
    shared.rebalance_epoch.fetch_add(1, Ordering::AcqRel);
}

/// True while a revoke waits: the poller then waits for outcomes rather
/// than sleeping in a poll.
pub(super) fn pending(st: &PollerState) -> bool {
    !st.revoking.is_empty()
}

/// Finishes each revoke whose partitions have no batch in the handler any
/// more, whose time is up, or (`all`) every one, and gives its partitions
/// up to librdkafka.
pub(super) fn serve(
    consumer: &BaseConsumer<PollerContext>,
    st: &mut PollerState,
    shared: &Shared,
    all: bool,
) {
    if st.revoking.is_empty() {
        return;
    }
    let now = Instant::now();
    let mut i = 0;
    while i < st.revoking.len() {
        let revoke = &st.revoking[i];
        let held = holds_batches(st, &revoke.partitions);
        if held && !all && !st.handler_failed && now < revoke.deadline {
            i += 1;
            continue;
        }
        let revoke = st.revoking.swap_remove(i);
        if held && now >= revoke.deadline {
            timed_out(&revoke.partitions, shared);
        }
        finish(consumer, st, shared, &revoke.partitions);
        shared
            .stats
            .revoking
            .fetch_sub(revoke.partitions.len() as u64, Ordering::Relaxed);
        let mut tpl = TopicPartitionList::with_capacity(revoke.partitions.len());
        for tp in &revoke.partitions {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        if let Err(e) = give_up(consumer, &tpl, revoke.cooperative) {
            tracing::warn!(error = %e, partitions = %names(&revoke.partitions), "librdkafka refused to give up the revoked partitions");
        }
    }
}

/// The callback's own revoke: waits for the partitions' batches in the
/// handler (nothing else can be handed over meanwhile), then finishes it.
pub(super) fn revoke_now(
    consumer: &BaseConsumer<PollerContext>,
    shared: &Shared,
    partitions: &[TopicPartition],
) {
    let mut st = shared.lock();
    let deadline = Instant::now() + shared.revoke_timeout;
    loop {
        st.drain(consumer, shared);
        if !holds_batches(&st, partitions) || st.handler_failed {
            break;
        }
        let now = Instant::now();
        if now >= deadline {
            timed_out(partitions, shared);
            break;
        }
        st.wait_one(
            (deadline - now).min(Duration::from_millis(100)),
            consumer,
            shared,
        );
    }
    finish(consumer, &mut st, shared, partitions);
}

/// Unassigns what a revoke (or a rebalance error) takes away.
pub(super) fn give_up(
    consumer: &BaseConsumer<PollerContext>,
    tpl: &TopicPartitionList,
    cooperative: bool,
) -> KafkaResult<()> {
    if cooperative {
        consumer.incremental_unassign(tpl)
    } else {
        consumer.unassign()
    }
}

fn holds_batches(st: &PollerState, partitions: &[TopicPartition]) -> bool {
    st.in_flight
        .iter()
        .any(|b| b.ranges.iter().any(|(tp, _, _, _)| partitions.contains(tp)))
}

fn timed_out(partitions: &[TopicPartition], shared: &Shared) {
    tracing::warn!(
        partitions = %names(partitions),
        timeout_ms = shared.revoke_timeout.as_millis() as u64,
        "revoke: in-flight batches did not finish in time; their records will be read again by the next owner"
    );
}

/// A revoked partition's pause and pending retry go with it; the next
/// owner reads its records again from the last commit.
fn forget_retries(st: &mut PollerState, partitions: &[TopicPartition]) {
    st.backoff.retain(|tp, _| !partitions.contains(tp));
    st.capped.retain(|tp| !partitions.contains(tp));
    st.seeks.retain(|s| !partitions.contains(&s.tp));
}

/// Commits what finished, and forgets the partitions.
fn finish(
    consumer: &BaseConsumer<PollerContext>,
    st: &mut PollerState,
    shared: &Shared,
    partitions: &[TopicPartition],
) {
    if let Err(e) = commit_finished_now(consumer, st, shared) {
        tracing::warn!(error = %e, "revoke: commit failed; the next owner will read those records again");
    }
    for tp in partitions {
        st.tracker.revoke(tp);
        shared.publish_generation(tp, None);
    }
    forget_retries(st, partitions);
    shared.rebalance_epoch.fetch_add(1, Ordering::AcqRel);
    shared.metrics.revokes.increment(1);
    shared
        .stats
        .revoked
        .fetch_add(partitions.len() as u64, Ordering::Relaxed);
    tracing::info!(partitions = %names(partitions), "partitions revoked");
    shared.emit(|client| ConsumerEvent::Revoked {
        client,
        partitions: partitions.to_vec(),
    });
}
