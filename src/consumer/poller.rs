//! The poller thread: the one place where the Kafka consumer is called.
//!
//! It polls, cuts batches, hands them to the runner through a bounded
//! channel, applies the runner's outcomes to the offset tracker and commits.
//! When the channel is full it pauses its partitions but keeps polling, so a
//! slow handler neither gets the consumer evicted from its group nor makes
//! it buffer without bound.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::{Message as _, TopicPartitionList};
use serde::de::DeserializeOwned;

mod outcomes;

use super::batch::{Batch, Seen};
use super::commit::{commit_finished, describe, final_commit, COMMIT_RETRY};
use super::events::ConsumerEvent;
use super::gaps::{Gap, GapGuard};
use super::lanes::{cap_partitions, Lanes};
use super::policy::{Chain, ChainState};
use super::rebalance::PollerContext;
use super::retry::{resume_due, retry_record, seek_back, Plans};
use super::revoke;
use super::state::{PollerState, Shared};
use crate::envelope::{BatchRef, PartitionRange};
use crate::error::Error;
use crate::offsets::TopicPartition;
use crate::settings::{ConsumerSettings, FailurePolicy, OnGap};

/// The longest a single poll blocks, so outcomes and shutdown are noticed quickly.
const MAX_POLL_WAIT: Duration = Duration::from_millis(50);
/// How long the poller waits for a busy handler without polling before it
/// pauses its partitions. Waiting without polling is cheap and bounded
/// (librdkafka's own prefetch queue is capped by `queued.max.messages.kbytes`)
/// and keeps that prefetched data, which a pause throws away and refetches;
/// pausing (and polling on) is what keeps a slow handler's consumer in its
/// group. Rebalance callbacks wait at most this long.
const PAUSE_AFTER: Duration = Duration::from_millis(1000);
/// How long the poller waits for an outcome, rather than polling, while
/// batches wait for their lanes: new records are looked at this often.
const LANE_WAIT: Duration = Duration::from_millis(5);
/// While records are ready without waiting, the clock is read once every
/// this many (see `run`).
const RECORDS_PER_CLOCK_READ: u32 = 32;

pub(super) fn run<T: DeserializeOwned + Send + 'static>(
    consumer: BaseConsumer<PollerContext>,
    shared: Arc<Shared>,
    batches: tokio::sync::mpsc::Sender<Batch<T>>,
    settings: &ConsumerSettings,
    client: usize,
) -> Result<(), Error> {
    let subscription = settings.subscription();
    let topics: Vec<&str> = subscription.iter().map(String::as_str).collect();
    if let Err(e) = consumer.subscribe(&topics) {
        shared.lock().inbox = None;
        return Err(e.into());
    }
    tracing::info!(
        client,
        group = %settings.group_id,
        topics = %subscription.join(","),
        bootstrap_servers = %settings.bootstrap_servers,
        batch_size = settings.batch_size,
        batch_timeout_ms = settings.batch_timeout_ms,
        commit = settings.commit,
        failure = %settings.failure.policies.iter().map(|p| p.name()).collect::<Vec<_>>().join(","),
        kafka = %settings.kafka.redacted(),
        "consumer started: joining the group"
    );
    let chain = Chain::new(&settings.failure);
    let retry_topic = settings.failure.retry_topic_name();
    let retry_topic_step = chain.step_of(FailurePolicy::RetryTopic).unwrap_or(0);
    let mut redelivery = Plans::default();
    // A batch in the handler longer than this is logged: the poller keeps a
    // hung handler's consumer in its group, so nothing else would say so.
    let long_batch = settings.max_poll_interval();
    let mut lanes = Lanes::<T>::new(settings, &chain, client);
    let mut epoch = shared.rebalance_epoch.load(Ordering::Acquire);
    let mut retry_commit_at: Option<Instant> = None;
    let mut failure: Option<Error> = None;
    // Since when a batch has been ready with no room for it in the channel.
    let mut full_since: Option<Instant> = None;
    // Checks that the broker returns every record from where it was asked to.
    let mut gaps = GapGuard::default();
    // The clock is read after a poll that may have waited, and otherwise
    // once every `RECORDS_PER_CLOCK_READ` records: reading it (a system
    // call's worth on a virtual machine) was a good part of the loop's own
    // cost per record. The round's decisions (cutting a batch on its
    // timeout, pausing) do not need it fresher than a few dozen records.
    let mut now = Instant::now();
    // True while polls return records: the next poll then does not wait, so
    // no time passes in it that the clock must catch up with.
    let mut streaming = false;
    let mut unclocked: u32 = 0;
    // True while batches wait for their lanes and outcomes are due.
    let mut lane_wait = false;

    // From here on a revoke waits in this loop, which keeps handing over the
    // other partitions' batches (`revoke.rs`).
    shared.defer_revokes.store(true, Ordering::Release);
    let outcome = loop {
        // The runner's outcomes and commands, commits, retries and handing
        // over: looked at after every poll that may have waited, and while
        // records stream in, with the clock (once every
        // `RECORDS_PER_CLOCK_READ` records), or at once when a batch is
        // ready or the consumer is failing. Taking an outcome a few dozen
        // records later is the same as its arriving later, which it may.
        if unclocked == 0 || !lanes.ready_is_empty() || failure.is_some() {
            let mut st = shared.lock();
            st.drain(&consumer, &shared);
            revoke::serve(&consumer, &mut st, &shared, false);
            take_expectations(&mut gaps, &mut st);
            if retry_commit_at.is_none_or(|at| now >= at) {
                retry_commit_at = commit_finished(&consumer, &mut st, &shared)
                    .err()
                    .map(|_| Instant::now() + COMMIT_RETRY);
            }
            if batches.is_closed() || (st.handler_failed && st.in_flight.is_empty()) {
                // The runner has stopped, or the handler failed and the
                // batches still in the handler then have all been reported:
                // the runner returns the handler's error.
                break Ok(());
            }
            // Retries: partitions to seek back, partitions whose wait is over.
            seek_back(&consumer, &mut st);
            resume_due(&consumer, &mut st);
            redelivery.take(&mut st);
            // A user shutdown finishes only the batch in hand; after a failure
            // (an undecodable record, a fatal error) every record read before
            // it is still handed over, so the commit stops exactly there.
            // After a handler failure the batches in the handler finish,
            // and nothing more is handed over.
            let shutting_down = shared.stopping.load(Ordering::Acquire) || st.handler_failed;
            let draining = failure.is_some();
            let waiting = !shutting_down && lanes.hand_over(&batches, &mut st, &shared);
            // The cap is looked at when the clock is read (a few dozen
            // records apart while they stream): counting is per partition,
            // not per record, and a cap passed by a few dozen is still a bound.
            if unclocked == 0 {
                cap_partitions(
                    &consumer,
                    &mut st,
                    &lanes,
                    &shared,
                    settings.max_in_flight_records,
                );
            }
            if let Some(limit) = long_batch {
                warn_long_batches(&mut st, &shared, now, limit);
            }
            if st.in_flight.is_empty() && (shutting_down || (draining && lanes.ready_is_empty())) {
                break failure.take().map_or(Ok(()), Err);
            }
            let full = !shutting_down && !draining && waiting;
            full_since = if full { full_since.or(Some(now)) } else { None };
            let waited = full_since.map_or(Duration::ZERO, |since| now.duration_since(since));
            let want_pause = shutting_down || draining || waited >= PAUSE_AFTER;
            if want_pause != st.paused {
                set_paused(&consumer, &mut st, &shared, want_pause);
            }
            if full && !want_pause {
                // The handler is busy: wait for its outcome rather than poll for more.
                st.wait_one(
                    (PAUSE_AFTER - waited).min(MAX_POLL_WAIT),
                    &consumer,
                    &shared,
                );
                now = Instant::now();
                continue;
            }
            // Batches wait for their lanes (a partition's or a key's batch in
            // the handler): the outcome that frees one is what to wait for.
            // A poll would sleep through it; so wait for outcomes a little,
            // then poll without waiting.
            // So does a revoke waiting for its partitions' batches.
            lane_wait = !shutting_down
                && !draining
                && (!lanes.ready_is_empty() || revoke::pending(&st))
                && !st.in_flight.is_empty();
            if lane_wait && !streaming {
                st.wait_one(LANE_WAIT, &consumer, &shared);
                now = Instant::now();
            }
        }

        let wait = if streaming || lane_wait {
            Duration::ZERO
        } else if shared.stopping.load(Ordering::Acquire)
            || failure.is_some()
            || !lanes.ready_is_empty()
        {
            MAX_POLL_WAIT
        } else {
            lanes.remaining(now).min(MAX_POLL_WAIT)
        };
        let polled = consumer.poll(wait);
        streaming = polled.is_some();
        unclocked += 1;
        if !(streaming && wait.is_zero() && unclocked < RECORDS_PER_CLOCK_READ) {
            now = Instant::now();
            unclocked = 0;
        }

        let current = shared.rebalance_epoch.load(Ordering::Acquire);
        if current != epoch {
            epoch = current;
            let mut st = shared.lock();
            take_expectations(&mut gaps, &mut st);
            gaps.retain(|tp, generation| st.tracker.generation(tp) == Some(generation));
            lanes.drop_stale(&st.tracker);
            redelivery.retain(|tp| st.tracker.generation(tp));
        }

        match polled {
            None => {}
            // Stopping: a record still arriving is left for the next read.
            Some(Ok(_)) if failure.is_some() => {}
            Some(Ok(m)) => {
                // Only a retry topic's records are looked at more closely
                // (reading a record's topic name costs a strlen and a UTF-8 check).
                let seen = if retry_topic.is_some_and(|t| t == m.topic()) {
                    // `None` when not due yet: its partition waits.
                    retry_record(&m, retry_topic_step, &shared)
                } else {
                    Some(Seen::New(ChainState::default()))
                };
                let seen = match seen {
                    Some(seen) if !redelivery.is_empty() => {
                        Some(redelivery.seen(&m, &shared).unwrap_or(seen))
                    }
                    other => other,
                };
                let record = super::raw_record(&m);
                let gap = seen.and_then(|_| {
                    let gap = gaps.observe(record.topic, record.partition, record.offset)?;
                    report_gap(&shared, record.topic, record.partition, &gap);
                    Some(gap)
                });
                if let (Some(gap), OnGap::Fail) = (&gap, settings.on_gap) {
                    // The record after the gap is not taken: what came before
                    // it is handed over and committed, nothing past the gap.
                    tracing::error!(topic = record.topic, partition = record.partition, missing = %format_args!("{}..{}", gap.first, gap.end), "records were not delivered and consumer.on_gap is \"fail\": the consumer stops before committing past them");
                    failure = Some(Error::Gap {
                        topic: record.topic.to_owned(),
                        partition: record.partition,
                        first: gap.first,
                        end: gap.end,
                    });
                } else if let Some(seen) = seen {
                    let generation = |tp: &TopicPartition| {
                        let st = shared.lock();
                        // A partition waiting for its seek back hands out nothing.
                        if st.held_from(tp).is_some() {
                            None
                        } else {
                            st.tracker.generation(tp)
                        }
                    };
                    if let Err(e) = lanes.add(record, seen, Some(&m), generation, &shared, now) {
                        tracing::error!(error = %e, "undecodable record: the consumer stops after handling what came before it (failure policy `fail`)");
                        failure = Some(Error::Decode(e));
                    }
                }
            }
            Some(Err(e)) => match consumer.client().fatal_error() {
                Some((code, reason)) => {
                    tracing::error!(%code, %reason, "fatal Kafka consumer error: the consumer stops");
                    failure = Some(Error::Kafka(KafkaError::MessageConsumptionFatal(code)));
                }
                None => {
                    tracing::warn!(error = %e, "Kafka consumer error (librdkafka retries by itself)")
                }
            },
        }

        if failure.is_some() {
            // Hand over what was read before the failure.
            lanes.cut_all(now);
        } else {
            lanes.cut_due(now);
        }
    };

    // Revokes still waiting finish now (what the handler finished is
    // committed); from here on a revoke waits in librdkafka's callback.
    shared.defer_revokes.store(false, Ordering::Release);
    revoke::serve(&consumer, &mut shared.lock(), &shared, true);
    let committed = final_commit(
        &consumer,
        &shared,
        Duration::from_millis(settings.shutdown_timeout_ms),
    );
    let last_commits = {
        let mut st = shared.lock();
        st.in_flight.clear();
        st.publish_in_flight(&shared);
        st.tracker.committed_offsets()
    };
    tracing::info!(
        last_committed = %describe(&last_commits),
        "consumer stopping: leaving the group"
    );
    // Dropping the consumer leaves the group; its revoke callback runs here.
    drop(consumer);
    // Commit requests still queued learn that the consumer has stopped.
    shared.lock().inbox = None;
    tracing::info!("consumer closed");
    outcome.and(committed)
}

/// Hands the gap guard where partitions continue (after an assignment or a
/// seek), for the partitions still held in that generation.
fn take_expectations(gaps: &mut GapGuard, st: &mut PollerState) {
    if st.expectations.is_empty() {
        return;
    }
    let tracker = &st.tracker;
    gaps.expect(
        st.expectations
            .drain(..)
            .filter(|e| tracker.generation(&e.tp) == Some(e.generation)),
    );
}

/// Says that the broker skipped records: a warning naming them, a metric
/// and a counter. The commit still moves past them, as it must for
/// compacted topics and transaction markers, which look the same.
fn report_gap(shared: &Shared, topic: &str, partition: i32, gap: &Gap) {
    shared.metrics.offset_gaps.increment(1);
    shared.stats.offset_gaps.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(
        topic,
        partition,
        missing = %format_args!("{}..{}", gap.first, gap.end),
        "the broker returned offset {} where {} was expected: {} offsets were not delivered (expected on a compacted topic or after transaction markers; otherwise the broker skipped records)",
        gap.end,
        gap.first,
        gap.end - gap.first
    );
    shared.emit(|client| ConsumerEvent::Gap {
        client,
        partition: TopicPartition::new(topic, partition),
        first: gap.first,
        end: gap.end,
    });
}

/// Warns, once per batch, of every batch in the handler for longer than `limit`.
fn warn_long_batches(st: &mut PollerState, shared: &Shared, now: Instant, limit: Duration) {
    let long: Vec<(u64, Duration)> = shared
        .running
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .iter()
        .map(|(id, started)| (*id, now.saturating_duration_since(*started)))
        .filter(|(_, running)| *running >= limit)
        .collect();
    for (id, running) in long {
        let Some(batch) = st.in_flight.iter_mut().find(|b| b.id == id && !b.warned) else {
            continue;
        };
        batch.warned = true;
        shared.metrics.long_batches.increment(1);
        shared.stats.long_batches.fetch_add(1, Ordering::Relaxed);
        let batch_ref =
            BatchRef::from_ranges(
                batch
                    .ranges
                    .iter()
                    .map(|(tp, _, first, end)| PartitionRange {
                        topic: tp.topic.clone(),
                        partition: tp.partition,
                        first: *first,
                        end: *end,
                        records: 0,
                    }),
            );
        tracing::warn!(
            batch = %batch_ref,
            running_ms = running.as_millis() as u64,
            max_poll_interval_ms = limit.as_millis() as u64,
            "a batch has been in the handler longer than max.poll.interval.ms: the consumer keeps its partitions (the poller still polls), so a hung handler holds them until it returns; set consumer.handler_timeout_ms to fail such batches"
        );
    }
}

fn set_paused(
    consumer: &BaseConsumer<PollerContext>,
    st: &mut PollerState,
    shared: &Shared,
    pause: bool,
) {
    let assignment = match consumer.assignment() {
        Ok(a) => a,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read the assignment to pause or resume it");
            return;
        }
    };
    // Partitions waiting for a retry stay paused, and are not paused again:
    // pausing resets librdkafka's fetch position, which would undo the seek.
    // Partitions at their in-flight cap stay paused until below it.
    let mut partitions = TopicPartitionList::with_capacity(assignment.count());
    for e in assignment.elements() {
        let is = |tp: &TopicPartition| tp.partition == e.partition() && &*tp.topic == e.topic();
        // Partitions the user paused stay paused, and are not paused again.
        if !st.backoff.keys().any(is) && !st.capped.iter().any(is) && !st.user_paused.iter().any(is)
        {
            partitions.add_partition(e.topic(), e.partition());
        }
    }
    let result = if pause {
        consumer.pause(&partitions)
    } else {
        consumer.resume(&partitions)
    };
    match result {
        Ok(()) => {
            st.paused = pause;
            // Counts the clients paused, so that several add up.
            shared
                .metrics
                .paused
                .increment(if pause { 1.0 } else { -1.0 });
            if pause {
                shared.stats.pauses.fetch_add(1, Ordering::Relaxed);
                shared.emit(|client| ConsumerEvent::Paused { client });
            } else {
                shared.emit(|client| ConsumerEvent::Resumed { client });
            }
            tracing::trace!(pause, "partitions paused or resumed");
        }
        Err(e) => tracing::warn!(error = %e, pause, "cannot pause or resume the partitions"),
    }
}
