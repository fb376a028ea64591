//! Rebalance callbacks. They run inside `poll`, on the poller thread.
//!
//! On assign, each partition gets a new generation in the tracker. A revoke
//! is `revoke.rs`'s: the revoked partitions' batches finish, what finished
//! is committed, and the partitions are forgotten.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaResult, RDKafkaErrorCode};
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::commit::interval_commit_answered;
use super::events::ConsumerEvent;
use super::gaps::Expectation;
use super::revoke::{self, give_up};
use super::state::Shared;
use crate::metrics::statistics::StatisticsGauges;
use crate::offsets::TopicPartition;
use crate::settings::ConsumerSettings;

/// The consumer's librdkafka context: rebalance callbacks over the shared
/// state, and the statistics turned into gauges.
pub(crate) struct PollerContext {
    shared: Arc<Shared>,
    statistics: StatisticsGauges,
}

impl PollerContext {
    pub(super) fn new(shared: Arc<Shared>, settings: &ConsumerSettings) -> Self {
        PollerContext {
            shared,
            statistics: StatisticsGauges::new(
                &settings.service,
                settings.metrics.librdkafka_statistics,
            ),
        }
    }
}

impl ClientContext for PollerContext {
    /// librdkafka's statistics (every `statistics.interval.ms`, inside
    /// `poll` on the poller thread): the lag gauges and, when asked for,
    /// librdkafka's own figures. Read as JSON here, skipping the fields not
    /// used, instead of rust-rdkafka's full `Statistics`.
    fn stats_raw(&self, statistics: &[u8]) {
        self.statistics.update(statistics);
    }
}

impl ConsumerContext for PollerContext {
    /// The answers to librdkafka's interval commits (commits made here,
    /// synchronously, answer where they are made).
    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        interval_commit_answered(&self.shared, result, offsets);
    }

    /// Serves a rebalance the way rust-rdkafka's default does (assign or
    /// unassign, eagerly or incrementally as the protocol says), with the
    /// tracker kept in step: every partition librdkafka fetches has a
    /// generation, and none that it gave up keeps one.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        let cooperative = matches!(
            consumer.rebalance_protocol(),
            RebalanceProtocol::Cooperative
        );
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.assign(consumer, tpl);
                let assigned = if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                };
                self.set_pause_state(consumer, tpl);
                assigned
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                // Cooperative: the poller loop finishes it (and gives the
                // partitions up then) while the kept partitions go on. An
                // eager revoke takes every partition, so nothing could go on
                // meanwhile: it is served here, as librdkafka expects.
                if cooperative && self.shared.defer_revokes.load(Ordering::Acquire) {
                    revoke::begin(&self.shared, tpl, cooperative);
                    Ok(())
                } else {
                    self.revoke(consumer, tpl);
                    give_up(consumer, tpl, cooperative)
                }
            }
            other => {
                let code: RDKafkaErrorCode = other.into();
                self.shared.metrics.rebalance_errors.increment(1);
                // On an error the protocol gives up what it gives up on a
                // revoke: the listed partitions when cooperative, the whole
                // assignment when eager. Forgetting more than that would
                // leave partitions that librdkafka still fetches without a
                // generation, their records dropped until the next rebalance.
                let given_up = if cooperative {
                    Ok(tpl.clone())
                } else {
                    consumer.assignment()
                };
                match given_up {
                    Ok(given_up) => {
                        tracing::warn!(error = %code, partitions = %names(&partitions(&given_up)), "rebalance error: giving up these partitions, as librdkafka does");
                        self.revoke(consumer, &given_up);
                    }
                    Err(e) => {
                        tracing::warn!(error = %code, assignment_error = %e, "rebalance error, and the assignment cannot be read: giving up every partition held");
                        self.revoke_all(consumer);
                    }
                }
                give_up(consumer, tpl, cooperative)
            }
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, "librdkafka refused the rebalance's assignment change");
        }
    }
}

pub(super) fn partitions(tpl: &TopicPartitionList) -> Vec<TopicPartition> {
    tpl.elements()
        .iter()
        .map(|e| TopicPartition::new(e.topic(), e.partition()))
        .collect()
}

/// How long the assign callback waits for the group's committed offsets.
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

/// The committed offsets the new partitions resume from: librdkafka reads
/// them too, to start fetching; the gap guard checks the broker returns
/// records from there. Unknown (left out) when there is no commit yet or
/// the coordinator does not answer: the guard then starts at the first
/// record it sees.
fn committed_starts(
    consumer: &BaseConsumer<PollerContext>,
    tpl: &TopicPartitionList,
) -> HashMap<TopicPartition, i64> {
    match consumer.committed_offsets(tpl.clone(), COMMITTED_TIMEOUT) {
        Ok(committed) => committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some((TopicPartition::new(e.topic(), e.partition()), o)),
                _ => None,
            })
            .collect(),
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the committed offsets of new partitions; the gap check starts at their first record");
            HashMap::new()
        }
    }
}

/// Starts each partition of the library's own retry topic that the group
/// has no commit for at its beginning, whatever `auto.offset.reset` says
/// for the main topics: a record written there before the last member
/// stopped, and not yet due then, would otherwise be jumped over by
/// `latest`, never handled. (When the committed offsets could not be read,
/// the retry partitions start at the beginning too: read again, never lost.)
fn read_retry_topic_from_its_beginning(
    tpl: &TopicPartitionList,
    retry_topic: &str,
    committed: &HashMap<TopicPartition, i64>,
) {
    for mut e in tpl.elements() {
        if e.topic() != retry_topic
            || committed.contains_key(&TopicPartition::new(e.topic(), e.partition()))
        {
            continue;
        }
        match e.set_offset(Offset::Beginning) {
            Ok(()) => tracing::info!(
                topic = retry_topic,
                partition = e.partition(),
                "retry topic partition with no commit: read from its beginning"
            ),
            Err(err) => {
                tracing::warn!(error = %err, topic = retry_topic, partition = e.partition(), "cannot start a retry topic partition at its beginning")
            }
        }
    }
}

pub(super) fn names(tps: &[TopicPartition]) -> String {
    tps.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl PollerContext {
    /// New partitions take the consumer's pause state explicitly, both ways.
    /// librdkafka clears only its own pause on assign, not the
    /// application's: a partition paused under back-pressure, revoked, and
    /// assigned again after the consumer resumed (with nothing assigned, so
    /// nothing was resumed) would otherwise stay paused and never be fetched
    /// again.
    /// Partitions the user paused ([`ConsumerHandle::pause`]) are paused
    /// whatever the consumer's state: a user pause outlives rebalances.
    ///
    /// [`ConsumerHandle::pause`]: super::ConsumerHandle::pause
    fn set_pause_state(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let (paused, user_paused) = {
            let st = self.shared.lock();
            (st.paused, st.user_paused.clone())
        };
        let (mut pause, mut resume) = (TopicPartitionList::new(), TopicPartitionList::new());
        for e in tpl.elements() {
            let held_by_user = user_paused
                .iter()
                .any(|tp| tp.partition == e.partition() && &*tp.topic == e.topic());
            let list = if paused || held_by_user {
                &mut pause
            } else {
                &mut resume
            };
            list.add_partition(e.topic(), e.partition());
        }
        for (list, pausing) in [(pause, true), (resume, false)] {
            if list.count() == 0 {
                continue;
            }
            let result = if pausing {
                consumer.pause(&list)
            } else {
                consumer.resume(&list)
            };
            if let Err(e) = result {
                tracing::warn!(error = %e, paused = pausing, "cannot set the pause state of newly assigned partitions");
            }
        }
    }

    fn assign(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        let tps = partitions(tpl);
        let starts = committed_starts(consumer, tpl);
        if let Some(retry_topic) = &self.shared.retry_topic {
            read_retry_topic_from_its_beginning(tpl, retry_topic, &starts);
        }
        let mut st = self.shared.lock();
        for tp in &tps {
            let generation = st.tracker.assign_at(tp.clone(), starts.get(tp).copied());
            self.shared.publish_generation(tp, Some(generation));
            st.expectations.push(Expectation {
                tp: tp.clone(),
                generation,
                next: starts.get(tp).copied(),
            });
        }
        self.shared.rebalance_epoch.fetch_add(1, Ordering::AcqRel);
        self.shared.metrics.assigns.increment(1);
        self.shared
            .stats
            .assigned
            .fetch_add(tps.len() as u64, Ordering::Relaxed);
        tracing::info!(partitions = %names(&tps), "partitions assigned");
        self.shared.emit(|client| ConsumerEvent::Assigned {
            client,
            partitions: tps.clone(),
        });
    }

    /// Forgets every partition the tracker holds (the assignment could not be read).
    fn revoke_all(&self, consumer: &BaseConsumer<Self>) {
        let held = self.shared.lock().tracker.partitions();
        let mut tpl = TopicPartitionList::with_capacity(held.len());
        for tp in &held {
            tpl.add_partition(&tp.topic, tp.partition);
        }
        self.revoke(consumer, &tpl);
    }

    fn revoke(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        revoke::revoke_now(consumer, &self.shared, &partitions(tpl));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::EmbeddedBroker;
    use std::sync::mpsc;
    use std::time::Instant;

    /// Finding 6: under cooperative assignment librdkafka gives up only the
    /// listed partitions on a rebalance error; forgetting the whole
    /// assignment left the others fetched with no generation, their records
    /// dropped until the next rebalance.
    #[test]
    fn a_rebalance_error_gives_up_only_what_the_protocol_gives_up() {
        let broker = EmbeddedBroker::start().expect("broker");
        broker.create_topic("t", 2).expect("topic");
        let mut settings = broker.consumer_settings("g", &["t"]);
        settings
            .kafka
            .set("partition.assignment.strategy", "cooperative-sticky");
        let shared = Arc::new(Shared::new(&settings, mpsc::channel().1));
        let consumer: BaseConsumer<PollerContext> = settings
            .client_config()
            .expect("settings")
            .create_with_context(PollerContext::new(Arc::clone(&shared), &settings))
            .expect("consumer");
        consumer.subscribe(&["t"]).expect("subscribed");
        let deadline = Instant::now() + Duration::from_secs(30);
        while shared.lock().tracker.partitions().len() < 2 {
            assert!(Instant::now() < deadline, "both partitions assigned");
            let _ = consumer.poll(Duration::from_millis(100));
        }
        let mut listed = TopicPartitionList::new();
        listed.add_partition("t", 0);
        consumer.context().rebalance(
            &consumer,
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__FAIL,
            &mut listed,
        );
        let st = shared.lock();
        assert_eq!(st.tracker.generation(&TopicPartition::new("t", 0)), None);
        assert!(
            st.tracker
                .generation(&TopicPartition::new("t", 1))
                .is_some(),
            "the partition librdkafka keeps fetching keeps its generation"
        );
        assert!(shared
            .current_generation(&TopicPartition::new("t", 1))
            .is_some());
    }
}
