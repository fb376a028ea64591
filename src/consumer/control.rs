//! Control operations on a running consumer: subscription, assignment,
//! metadata, lag, pause and resume, seek. Each runs on the poller thread
//! (the one owner of the Kafka consumer) as a [`ControlOp`] in its inbox,
//! and answers through its own reply channel, never through the batches.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::error::KafkaError;
use rdkafka::{Offset, TopicPartitionList};

use super::gaps::Expectation;
use super::rebalance::PollerContext;
use super::state::{PollerState, Shared, ToPoller};
use super::ConsumerHandle;
use crate::error::Error;
use crate::offsets::TopicPartition;

/// A control operation, run on the poller thread.
pub(super) type ControlOp =
    Box<dyn FnOnce(&BaseConsumer<PollerContext>, &mut PollerState, &Shared) + Send>;

/// How long a control operation waits for the broker.
const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// One partition of a topic, as the cluster's metadata describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionInfo {
    /// The partition number.
    pub partition: i32,
    /// The broker id of its leader (-1 when it has none).
    pub leader: i32,
    /// The broker ids holding a replica.
    pub replicas: Vec<i32>,
    /// The replicas in sync with the leader.
    pub in_sync: Vec<i32>,
}

/// How far behind the log end one owned partition's commit is.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PartitionLag {
    /// The partition.
    pub partition: TopicPartition,
    /// The group's committed offset (the next record to read), if any.
    pub committed: Option<i64>,
    /// One past the last record of the partition (its high watermark).
    pub log_end: i64,
    /// `log_end - committed` (the whole partition from its log start when
    /// nothing is committed).
    pub lag: i64,
}

impl ConsumerHandle {
    /// Runs `op` on client `client`'s poller thread and waits for its answer.
    /// Asked before the consumer runs, it is answered once it does.
    async fn on_poller<R: Send + 'static>(
        &self,
        client: usize,
        op: impl FnOnce(&BaseConsumer<PollerContext>, &mut PollerState, &Shared) -> R + Send + 'static,
    ) -> Result<R, Error> {
        let (_, inbox) = self.clients.get(client).ok_or(Error::Stopped)?;
        let (reply, answer) = tokio::sync::oneshot::channel();
        let op: ControlOp = Box::new(move |consumer, st, shared| {
            let _ = reply.send(op(consumer, st, shared));
        });
        inbox
            .send(ToPoller::Control(op))
            .map_err(|_| Error::Stopped)?;
        answer.await.map_err(|_| Error::Stopped)
    }

    /// Runs `op` on every client's poller, in client order.
    async fn on_every_poller<R: Send + 'static>(
        &self,
        op: impl Fn(&BaseConsumer<PollerContext>, &mut PollerState, &Shared) -> R
            + Send
            + Clone
            + 'static,
    ) -> Result<Vec<R>, Error> {
        let mut answers = Vec::with_capacity(self.clients.len());
        for client in 0..self.clients.len() {
            answers.push(self.on_poller(client, op.clone()).await?);
        }
        Ok(answers)
    }

    /// Replaces the whole subscription with `topics` (it never adds to it):
    /// the group rebalances, and partitions of topics no longer named are
    /// revoked as in any rebalance (their batches finish and are committed).
    /// The library's own retry topic stays subscribed when the failure
    /// chain has `retry_topic`.
    ///
    /// ```no_run
    /// # async fn run(handle: kafka_batch::ConsumerHandle) -> Result<(), kafka_batch::Error> {
    /// handle.set_subscription(&["orders", "refunds"]).await?;
    /// assert_eq!(handle.subscription().await?, ["orders", "refunds"]);
    /// # Ok(()) }
    /// ```
    pub async fn set_subscription(&self, topics: &[&str]) -> Result<(), Error> {
        if topics.is_empty() || topics.iter().any(|t| t.is_empty()) {
            return Err(Error::Control(
                "set_subscription needs at least one topic name, none empty: to stop consuming every topic call unsubscribe()".into(),
            ));
        }
        let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
        self.subscribe_to(topics).await
    }

    /// The same as [`ConsumerHandle::set_subscription`]: it **replaces**
    /// the subscription with `topics`, it does not add to it.
    pub async fn subscribe(&self, topics: &[&str]) -> Result<(), Error> {
        self.set_subscription(topics).await
    }

    /// Replaces the whole subscription with every topic whose name matches
    /// `pattern`, a regular expression (librdkafka's; a leading `^` is
    /// added when missing), now and as topics are created.
    pub async fn subscribe_pattern(&self, pattern: &str) -> Result<(), Error> {
        if pattern.is_empty() || pattern == "^" {
            return Err(Error::Control(
                "subscribe_pattern needs a regular expression, such as \"^orders\\\\..*\"".into(),
            ));
        }
        let pattern = if pattern.starts_with('^') {
            pattern.to_owned()
        } else {
            format!("^{pattern}")
        };
        self.subscribe_to(vec![pattern]).await
    }

    async fn subscribe_to(&self, topics: Vec<String>) -> Result<(), Error> {
        self.on_every_poller(move |consumer, _st, shared| {
            let mut all: Vec<&str> = topics.iter().map(String::as_str).collect();
            if let Some(retry) = shared.retry_topic.as_deref() {
                all.push(retry);
            }
            tracing::info!(topics = %all.join(","), "subscription replaced");
            consumer.subscribe(&all)
        })
        .await?
        .into_iter()
        .collect::<Result<(), KafkaError>>()
        .map_err(Error::Kafka)
    }

    /// Leaves every topic, the retry topic included: the group revokes this
    /// consumer's partitions (their batches finish and are committed) and
    /// it reads nothing until the next `set_subscription`.
    pub async fn unsubscribe(&self) -> Result<(), Error> {
        self.on_every_poller(|consumer, _st, _shared| {
            consumer.unsubscribe();
            tracing::info!("unsubscribed from every topic");
        })
        .await?;
        Ok(())
    }

    /// The topics (or patterns) subscribed to, without the library's own
    /// retry topic, sorted.
    pub async fn subscription(&self) -> Result<Vec<String>, Error> {
        let mut topics = self
            .on_poller(0, |consumer, _st, shared| {
                consumer.subscription().map(|tpl| {
                    tpl.elements()
                        .iter()
                        .map(|e| e.topic().to_owned())
                        .filter(|t| shared.retry_topic.as_deref() != Some(t.as_str()))
                        .collect::<Vec<String>>()
                })
            })
            .await??;
        topics.sort();
        Ok(topics)
    }

    /// Every partition this consumer holds now (all its clients), sorted;
    /// partitions being revoked are left out.
    pub async fn assignment(&self) -> Result<Vec<TopicPartition>, Error> {
        let mut all: Vec<TopicPartition> = self
            .on_every_poller(|_consumer, st, _shared| st.held())
            .await?
            .into_iter()
            .flatten()
            .collect();
        all.sort();
        Ok(all)
    }

    /// Each partition of `topic` with its leader, replicas and in-sync
    /// replicas, from the cluster's metadata (one request).
    pub async fn partitions_for(&self, topic: &str) -> Result<Vec<PartitionInfo>, Error> {
        let topic = topic.to_owned();
        self.on_poller(0, move |consumer, _st, _shared| {
            let metadata = consumer.fetch_metadata(Some(&topic), BROKER_TIMEOUT)?;
            partitions_of(&metadata, &topic)
        })
        .await?
    }

    /// The log start and log end (high watermark) of one partition, from
    /// its leader (one request).
    pub async fn watermarks(&self, topic: &str, partition: i32) -> Result<(i64, i64), Error> {
        let topic = topic.to_owned();
        self.on_poller(0, move |consumer, _st, _shared| {
            consumer
                .fetch_watermarks(&topic, partition, BROKER_TIMEOUT)
                .map_err(Error::Kafka)
        })
        .await?
    }

    /// For each partition this consumer holds: the group's committed
    /// offset, the log end, and how far the commit is behind it. Asks the
    /// broker (one request for the commits, one per partition for the log
    /// ends), on each client's poller thread, which polls nothing
    /// meanwhile: for dashboards, use the lag gauges (`metrics.lag`).
    pub async fn lag(&self) -> Result<Vec<PartitionLag>, Error> {
        let answers = self
            .on_every_poller(
                |consumer, st, _shared| -> Result<Vec<PartitionLag>, KafkaError> {
                    partition_lags(consumer, st.held())
                },
            )
            .await?;
        let mut all = Vec::new();
        for answer in answers {
            all.extend(answer?);
        }
        all.sort_by(|a, b| a.partition.cmp(&b.partition));
        Ok(all)
    }

    /// Stops fetching `partitions` until [`ConsumerHandle::resume`]: the
    /// batches already read still go to the handler. The consumer remembers
    /// the pause across rebalances (a partition assigned again, or to
    /// another client, stays paused) and keeps it apart from its own
    /// pauses: back-pressure, a retry's wait or `max_in_flight_records`
    /// never resume a partition the user paused, and a user resume never
    /// resumes one the consumer holds paused. Partitions not held now are
    /// paused when they are assigned.
    pub async fn pause(&self, partitions: &[TopicPartition]) -> Result<(), Error> {
        self.user_pause(partitions, true).await
    }

    /// Undoes [`ConsumerHandle::pause`] for `partitions`. A partition the
    /// consumer holds paused itself (back-pressure, a retry's wait, the
    /// in-flight cap) resumes when that ends.
    pub async fn resume(&self, partitions: &[TopicPartition]) -> Result<(), Error> {
        self.user_pause(partitions, false).await
    }

    /// Records the user's pause (or its end) in every client, and pauses
    /// (or resumes) the partitions a client holds that the consumer does
    /// not keep paused for reasons of its own.
    async fn user_pause(&self, partitions: &[TopicPartition], pause: bool) -> Result<(), Error> {
        let partitions = partitions.to_vec();
        self.on_every_poller(move |consumer, st, _shared| {
            let owned = st.held();
            let mut tpl = TopicPartitionList::new();
            for tp in &partitions {
                let changed = if pause {
                    st.user_paused.insert(tp.clone())
                } else {
                    st.user_paused.remove(tp)
                };
                if changed && owned.contains(tp) && !paused_by_consumer(st, tp) {
                    tpl.add_partition(&tp.topic, tp.partition);
                }
            }
            if tpl.count() == 0 {
                return Ok(());
            }
            if pause {
                consumer.pause(&tpl)?;
            } else {
                consumer.resume(&tpl)?;
            }
            let names = super::rebalance::names(&partitions);
            tracing::info!(partitions = %names, pause, "partitions paused or resumed by the user");
            Ok(())
        })
        .await?
        .into_iter()
        .collect::<Result<(), KafkaError>>()
        .map_err(Error::Kafka)
    }

    /// Moves the read position of a partition this consumer holds to
    /// `offset`. What was read of it and not dealt with is dropped: the
    /// batches in the handler finish, but their results change nothing.
    ///
    /// - Backwards, the records from `offset` on are read and handled
    ///   again; the commit does not move back (records before the last
    ///   commit are read again by this consumer, and after a crash only
    ///   from the commit).
    /// - Forwards, the records between the first one not dealt with and
    ///   `offset` are skipped **on purpose**: logged as a warning, counted
    ///   in `kafka_batch_seek_skipped_records_total` and
    ///   [`ConsumerStats::seek_skipped`](super::ConsumerStats), and committed past
    ///   as if dealt with.
    ///
    /// Fails with [`Error::NotAssigned`] when no client holds the partition.
    pub async fn seek(&self, topic: &str, partition: i32, offset: i64) -> Result<(), Error> {
        if offset < 0 {
            return Err(Error::Control(format!(
                "seek to offset {offset} of {topic}[{partition}]: an offset is 0 or more (use watermarks() for the log start and end)"
            )));
        }
        let tp = TopicPartition::new(topic, partition);
        let answers = self
            .on_every_poller(move |consumer, st, shared| {
                seek_held(consumer, st, shared, &tp, offset)
            })
            .await?;
        let mut sought = false;
        for answer in answers {
            sought |= answer?;
        }
        if sought {
            Ok(())
        } else {
            Err(Error::NotAssigned {
                topic: topic.to_owned(),
                partition,
            })
        }
    }
}

/// The partitions of `topic` in `metadata`, sorted; an error naming the
/// topic when the cluster has none.
pub(crate) fn partitions_of(
    metadata: &rdkafka::metadata::Metadata,
    topic: &str,
) -> Result<Vec<PartitionInfo>, Error> {
    let Some(found) = metadata.topics().iter().find(|t| t.name() == topic) else {
        return Err(Error::Control(format!(
            "the cluster returned no metadata for topic {topic:?}"
        )));
    };
    if let Some(error) = found.error() {
        let code: rdkafka::error::RDKafkaErrorCode = error.into();
        return Err(Error::Control(format!(
            "no partitions for topic {topic:?}: {code} (does the topic exist?)"
        )));
    }
    let mut partitions: Vec<PartitionInfo> = found
        .partitions()
        .iter()
        .map(|p| PartitionInfo {
            partition: p.id(),
            leader: p.leader(),
            replicas: p.replicas().to_vec(),
            in_sync: p.isr().to_vec(),
        })
        .collect();
    partitions.sort_by_key(|p| p.partition);
    Ok(partitions)
}

/// For each of `partitions`: the group's committed offset, the log end,
/// and how far the commit is behind it (from the log start when there is
/// no commit). One request for the commits, one per partition for the
/// log ends; for any client of the group (the poller's, or one of its own).
pub(crate) fn partition_lags<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: Vec<TopicPartition>,
) -> Result<Vec<PartitionLag>, KafkaError> {
    if partitions.is_empty() {
        return Ok(Vec::new());
    }
    let mut tpl = TopicPartitionList::with_capacity(partitions.len());
    for tp in &partitions {
        tpl.add_partition(&tp.topic, tp.partition);
    }
    let committed = consumer.committed_offsets(tpl, BROKER_TIMEOUT)?;
    let mut lags = Vec::with_capacity(partitions.len());
    for tp in partitions {
        let (low, high) = consumer.fetch_watermarks(&tp.topic, tp.partition, BROKER_TIMEOUT)?;
        let at = committed
            .find_partition(&tp.topic, tp.partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        let lag = (high - at.unwrap_or(low)).max(0);
        lags.push(PartitionLag {
            partition: tp,
            committed: at,
            log_end: high,
            lag,
        });
    }
    Ok(lags)
}

/// True when the consumer keeps `tp` paused for reasons of its own.
fn paused_by_consumer(st: &PollerState, tp: &TopicPartition) -> bool {
    st.paused || st.backoff.contains_key(tp) || st.capped.contains(tp)
}

/// Seeks `tp` if this client holds it: `Ok(false)` when it does not.
fn seek_held(
    consumer: &BaseConsumer<PollerContext>,
    st: &mut PollerState,
    shared: &Shared,
    tp: &TopicPartition,
    offset: i64,
) -> Result<bool, Error> {
    if st.tracker.generation(tp).is_none() {
        return Ok(false);
    }
    // Seek first: if librdkafka refuses, nothing here has changed.
    consumer.seek(
        &tp.topic,
        tp.partition,
        Offset::Offset(offset),
        BROKER_TIMEOUT,
    )?;
    let Some((generation, skipped)) = st.tracker.seek(tp, offset) else {
        return Ok(false);
    };
    shared.publish_generation(tp, Some(generation));
    // The loop drops what it buffered of the old generation.
    shared.rebalance_epoch.fetch_add(1, Ordering::AcqRel);
    st.expectations.push(Expectation {
        tp: tp.clone(),
        generation,
        next: Some(offset),
    });
    // A retry waiting on the partition is overtaken by the seek.
    st.seeks.retain(|s| s.tp != *tp);
    if st.backoff.remove(tp).is_some()
        && !paused_by_consumer(st, tp)
        && !st.user_paused.contains(tp)
    {
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition(&tp.topic, tp.partition);
        consumer.resume(&tpl)?;
    }
    match skipped {
        Some(skipped) if skipped > 0 => {
            shared.metrics.seek_skipped.increment(skipped as u64);
            shared
                .stats
                .seek_skipped
                .fetch_add(skipped as u64, Ordering::Relaxed);
            tracing::warn!(partition = %tp, offset, skipped, "seek forward: records skipped on purpose, committed past without being handled");
        }
        Some(_) => {
            tracing::info!(partition = %tp, offset, "seek back: these records are read again")
        }
        None => {
            tracing::warn!(partition = %tp, offset, "seek: nothing was read of the partition yet; it continues at the offset, and a commit there skips what came before it")
        }
    }
    Ok(true)
}
