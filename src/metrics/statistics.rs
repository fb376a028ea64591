//! librdkafka's statistics (`statistics.interval.ms`) as gauges: the lag of
//! each assigned partition, and, when asked for, a subset of the client's
//! own figures.
//!
//! librdkafka hands the statistics over as JSON inside `poll`, on the
//! poller thread, once per interval: nothing here runs per record. Only the
//! fields used are read. A gauge whose partition or broker is no longer
//! reported (a revoked partition, a broker gone) is set to 0 once, so that a
//! sum over the group does not count a partition twice after it moved.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use metrics::{gauge, Gauge};
use serde::Deserialize;

/// What the statistics callback publishes, and the gauges it published.
pub(crate) struct StatisticsGauges {
    service: String,
    /// Forward librdkafka's own figures too (`metrics.librdkafka_statistics`).
    forward: bool,
    published: Mutex<Published>,
}

#[derive(Default)]
struct Published {
    /// Bumped on every statistics report; a gauge not seen in the latest
    /// one is set to 0 and forgotten.
    round: u64,
    gauges: HashMap<GaugeKey, (Gauge, u64)>,
}

#[derive(Clone, PartialEq, Eq, Hash)]
struct GaugeKey {
    name: &'static str,
    scope: Scope,
}

#[derive(Clone, PartialEq, Eq, Hash)]
enum Scope {
    Client,
    Broker(String),
    Partition(String, i32),
}

impl StatisticsGauges {
    pub(crate) fn new(service: &str, forward: bool) -> Self {
        StatisticsGauges {
            service: service.to_owned(),
            forward,
            published: Mutex::new(Published::default()),
        }
    }

    /// Publishes one statistics report (librdkafka's JSON).
    pub(crate) fn update(&self, json: &[u8]) {
        let stats: Stats = match serde_json::from_slice(json) {
            Ok(stats) => stats,
            Err(e) => {
                tracing::debug!(error = %e, "librdkafka statistics not understood; lag not refreshed");
                return;
            }
        };
        let mut published = self
            .published
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        published.round += 1;
        for (topic, t) in &stats.topics {
            for p in t.partitions.values() {
                // -1 is librdkafka's internal "unassigned" partition; the
                // others listed but not desired are not assigned here.
                if p.partition < 0 || !p.desired {
                    continue;
                }
                let scope = || Scope::Partition(topic.clone(), p.partition);
                if p.consumer_lag >= 0 {
                    self.set(
                        &mut published,
                        "kafka_batch_lag",
                        scope(),
                        p.consumer_lag as f64,
                    );
                } else {
                    // Unknown for now (no commit, or the watermark not read
                    // yet): the last value stands.
                    published.keep("kafka_batch_lag", scope());
                }
                if self.forward {
                    self.set(
                        &mut published,
                        "kafka_batch_librdkafka_fetchq_messages",
                        scope(),
                        p.fetchq_cnt as f64,
                    );
                    self.set(
                        &mut published,
                        "kafka_batch_librdkafka_fetchq_bytes",
                        scope(),
                        p.fetchq_size as f64,
                    );
                }
            }
        }
        if self.forward {
            self.set(
                &mut published,
                "kafka_batch_librdkafka_replyq",
                Scope::Client,
                stats.replyq as f64,
            );
            self.set(
                &mut published,
                "kafka_batch_librdkafka_msg_cnt",
                Scope::Client,
                stats.msg_cnt as f64,
            );
            for (name, b) in &stats.brokers {
                // The bootstrap entries (no node id yet) and the logical
                // coordinator entry duplicate a real broker.
                if b.nodeid < 0 || b.source == "logical" {
                    continue;
                }
                let scope = || Scope::Broker(name.clone());
                // librdkafka's round trips are in microseconds.
                self.set(
                    &mut published,
                    "kafka_batch_librdkafka_broker_rtt_avg_seconds",
                    scope(),
                    b.rtt.avg as f64 / 1e6,
                );
                self.set(
                    &mut published,
                    "kafka_batch_librdkafka_broker_rx_bytes",
                    scope(),
                    b.rxbytes as f64,
                );
                self.set(
                    &mut published,
                    "kafka_batch_librdkafka_broker_tx_bytes",
                    scope(),
                    b.txbytes as f64,
                );
            }
        }
        let round = published.round;
        published.gauges.retain(|_, (gauge, seen)| {
            if *seen == round {
                return true;
            }
            gauge.set(0.0);
            false
        });
    }

    fn set(&self, published: &mut Published, name: &'static str, scope: Scope, value: f64) {
        let round = published.round;
        let key = GaugeKey { name, scope };
        let (gauge, seen) = published
            .gauges
            .entry(key)
            .or_insert_with_key(|key| (self.register(key), round));
        *seen = round;
        gauge.set(value);
    }

    fn register(&self, key: &GaugeKey) -> Gauge {
        let service = self.service.clone();
        match &key.scope {
            Scope::Client => gauge!(key.name, "service" => service),
            Scope::Broker(broker) => {
                gauge!(key.name, "service" => service, "broker" => broker.clone())
            }
            Scope::Partition(topic, partition) => gauge!(
                key.name,
                "service" => service,
                "topic" => topic.clone(),
                "partition" => partition.to_string(),
            ),
        }
    }
}

/// A consumer that stopped holds no partition: its gauges fall to 0 (in
/// a process that goes on, they would otherwise stand at their last value).
impl Drop for StatisticsGauges {
    fn drop(&mut self) {
        let published = self
            .published
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner);
        for (gauge, _) in published.gauges.values() {
            gauge.set(0.0);
        }
    }
}

impl Published {
    /// Keeps a gauge (if published) without changing its value.
    fn keep(&mut self, name: &'static str, scope: Scope) {
        let round = self.round;
        if let Some((_, seen)) = self.gauges.get_mut(&GaugeKey { name, scope }) {
            *seen = round;
        }
    }
}

/// The fields of librdkafka's statistics that are used (see librdkafka's
/// STATISTICS.md); everything else is skipped unread.
#[derive(Default, Deserialize)]
#[serde(default)]
struct Stats {
    replyq: i64,
    msg_cnt: i64,
    brokers: HashMap<String, BrokerStats>,
    topics: HashMap<String, TopicStats>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct BrokerStats {
    nodeid: i32,
    source: String,
    rxbytes: i64,
    txbytes: i64,
    rtt: Window,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct Window {
    avg: i64,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct TopicStats {
    partitions: HashMap<String, PartitionStats>,
}

#[derive(Default, Deserialize)]
#[serde(default)]
struct PartitionStats {
    partition: i32,
    desired: bool,
    consumer_lag: i64,
    fetchq_cnt: i64,
    fetchq_size: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};

    fn report(lag0: i64, with_partition_1: bool) -> String {
        let p1 = if with_partition_1 {
            r#","1": {"partition": 1, "desired": true, "consumer_lag": 7, "fetchq_cnt": 2, "fetchq_size": 20}"#
        } else {
            ""
        };
        format!(
            r#"{{"name": "c#consumer-1", "type": "consumer", "replyq": 3, "msg_cnt": 0,
            "brokers": {{
              "127.0.0.1:9092/bootstrap": {{"nodeid": -1, "source": "configured", "rxbytes": 1, "txbytes": 1, "rtt": {{"avg": 0}}}},
              "127.0.0.1:9092/1": {{"nodeid": 1, "source": "learned", "rxbytes": 1000, "txbytes": 500, "rtt": {{"avg": 2500, "min": 1}}}},
              "GroupCoordinator": {{"nodeid": 1, "source": "logical", "rxbytes": 9, "txbytes": 9, "rtt": {{"avg": 9}}}}
            }},
            "topics": {{"events": {{"topic": "events", "partitions": {{
              "-1": {{"partition": -1, "desired": false, "consumer_lag": -1}},
              "0": {{"partition": 0, "desired": true, "consumer_lag": {lag0}, "fetchq_cnt": 5, "fetchq_size": 50, "hi_offset": 10}}
              {p1}
            }}}}}},
            "cgrp": {{"state": "up"}}}}"#
        )
    }

    fn gauges(snapshotter: &Snapshotter) -> Vec<(String, Vec<String>, f64)> {
        let mut all: Vec<_> = snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter_map(|(key, _, _, value)| match value {
                DebugValue::Gauge(g) => Some((
                    key.key().name().to_owned(),
                    key.key()
                        .labels()
                        .map(|l| format!("{}={}", l.key(), l.value()))
                        .collect(),
                    g.into_inner(),
                )),
                _ => None,
            })
            .collect();
        all.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
        all
    }

    fn value(all: &[(String, Vec<String>, f64)], name: &str, label: &str) -> Option<f64> {
        all.iter()
            .find(|(n, labels, _)| n == name && labels.iter().any(|l| l == label))
            .map(|(_, _, v)| *v)
    }

    #[test]
    fn lag_and_the_forwarded_subset_are_published_and_gone_partitions_fall_to_zero() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            let stats = StatisticsGauges::new("svc", true);
            stats.update(report(4, true).as_bytes());
            let all = gauges(&snapshotter);
            assert_eq!(
                value(&all, "kafka_batch_lag", "partition=0"),
                Some(4.0),
                "{all:?}"
            );
            assert_eq!(value(&all, "kafka_batch_lag", "partition=1"), Some(7.0));
            assert!(
                !all.iter()
                    .any(|(_, labels, _)| labels.iter().any(|l| l == "partition=-1")),
                "{all:?}"
            );
            assert_eq!(
                value(&all, "kafka_batch_librdkafka_replyq", "service=svc"),
                Some(3.0)
            );
            assert_eq!(
                value(
                    &all,
                    "kafka_batch_librdkafka_broker_rtt_avg_seconds",
                    "broker=127.0.0.1:9092/1"
                ),
                Some(0.0025)
            );
            assert_eq!(
                all.iter()
                    .filter(|(n, _, _)| n == "kafka_batch_librdkafka_broker_rx_bytes")
                    .count(),
                1,
                "neither the bootstrap nor the logical coordinator entry: {all:?}"
            );
            assert_eq!(
                value(
                    &all,
                    "kafka_batch_librdkafka_fetchq_messages",
                    "partition=0"
                ),
                Some(5.0)
            );

            // Partition 1 revoked, partition 0's lag unknown for now.
            stats.update(report(-1, false).as_bytes());
            let all = gauges(&snapshotter);
            assert_eq!(
                value(&all, "kafka_batch_lag", "partition=0"),
                Some(4.0),
                "the last value stands"
            );
            assert_eq!(
                value(&all, "kafka_batch_lag", "partition=1"),
                Some(0.0),
                "a revoked partition falls to 0"
            );
            stats.update(report(0, false).as_bytes());
            assert_eq!(
                value(&gauges(&snapshotter), "kafka_batch_lag", "partition=0"),
                Some(0.0)
            );
            stats.update(b"not json");
            stats.update(report(3, false).as_bytes());
            drop(stats);
            assert_eq!(
                value(&gauges(&snapshotter), "kafka_batch_lag", "partition=0"),
                Some(0.0),
                "a stopped consumer's lag falls to 0"
            );
        });
    }

    #[test]
    fn without_forwarding_only_lag_is_published() {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::with_local_recorder(&recorder, || {
            StatisticsGauges::new("svc", false).update(report(2, false).as_bytes());
        });
        let names: Vec<String> = gauges(&snapshotter)
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        assert_eq!(names, ["kafka_batch_lag"]);
    }
}
