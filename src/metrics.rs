//! Metrics through the [`metrics`] facade: install any recorder (for example
//! `metrics-exporter-prometheus`) and these appear. With the `prometheus`
//! feature, `serve_prometheus` (or the setting `metrics.prometheus_listen`)
//! serves them at `/metrics`.
//!
//! | name | kind | labels | meaning |
//! | --- | --- | --- | --- |
//! | `<service>_kafka_process_seconds` | histogram | | time the handler took per batch (the Python wrapper's summary) |
//! | `kafka_batch_handler_seconds` | histogram | `service` | the same time per batch, under one name for every service |
//! | `<service>_kafka_process_count` | counter | | messages handed to the handler and handled `Ok` (the Python wrapper's counter) |
//! | `kafka_batch_batches_total` | counter | `service`, `outcome` = `ok` / `error` | batches handled |
//! | `kafka_batch_batch_messages` | histogram | `service` | messages per batch |
//! | `kafka_batch_decode_errors_total` | counter | `service`, `topic`, `reason` | records that could not be decoded |
//! | `kafka_batch_skipped_records_total` | counter | `service`, `reason` = `tombstone` / `unsubscribed_topic`, or a failure reason for the `skip` policy | records never handed to the handler, or failed and skipped |
//! | `kafka_batch_retries_total` | counter | `service`, `kind` = `in_place` / `topic`, `reason` | failed records sent to be retried |
//! | `kafka_batch_dead_letters_total` | counter | `service`, `reason` | records written to the dead-letter topic |
//! | `kafka_batch_handler_panics_total` | counter | `service` | batches whose handler panicked (each stopped the consumer) |
//! | `kafka_batch_handler_timeouts_total` | counter | `service` | batches whose handler ran past `handler_timeout_ms` |
//! | `kafka_batch_long_batches_total` | counter | `service` | batches in the handler longer than `max.poll.interval.ms` (a hung handler holds its partitions: alert on it) |
//! | `kafka_batch_partitions_capped_total` | counter | `service` | times a partition was paused at `consumer.max_in_flight_records` (the handler is slower than the partition's intake) |
//! | `kafka_batch_seek_skipped_records_total` | counter | `service` | records a `ConsumerHandle::seek` forward skipped on purpose (committed past, never handled) |
//! | `kafka_batch_offset_gaps_total` | counter | `service` | records the broker did not deliver (see `consumer.on_gap`) |
//! | `kafka_batch_commits_total` | counter | `service` | successful offset commits |
//! | `kafka_batch_commit_failures_total` | counter | `service` | failed offset commits (retried) |
//! | `kafka_batch_rebalances_total` | counter | `service`, `kind` = `assign` / `revoke` / `error` | group rebalances seen |
//! | `kafka_batch_paused` | gauge | `service` | pollers (one per `consumer.clients`) that have paused their partitions for back-pressure: 1 while the only one has |
//! | `kafka_batch_in_flight_batches` | gauge | `service` | batches handed to the handler (or waiting for it in the channel) and not yet settled, over every client |
//! | `kafka_batch_in_flight_records` | gauge | `service` | the messages in those batches |
//! | `kafka_batch_lag` | gauge | `service`, `topic`, `partition` | per assigned partition: log end (high watermark) minus the group's committed offset, from librdkafka's statistics (see below); 0 once the partition is no longer assigned here |
//! | `kafka_batch_produced_total` | counter | `service`, `topic` | records delivered |
//! | `kafka_batch_produce_failures_total` | counter | `service`, `topic` | records whose delivery failed |
//! | `kafka_batch_oversized_skipped_total` | counter | `service`, `topic` | records skipped as too large (`producer.skip_oversized`) |
//!
//! A failure `reason` is `handler` (the handler failed the message), or the
//! decode error's kind: `null_key`, `key_not_utf8`, `not_json`,
//! `not_envelope`, `payload_type`.
//!
//! # From librdkafka's statistics
//!
//! `kafka_batch_lag` is refreshed each time librdkafka reports its
//! statistics (`statistics.interval.ms`), never by a request of its own. They
//! are on at 5000 ms when `metrics.prometheus_listen`, `metrics.lag` or
//! `metrics.librdkafka_statistics` is set, unless a `kafka` table sets
//! `statistics.interval.ms`; lag is published whenever they are on. A
//! partition's lag appears once the group has a committed offset for it and
//! the consumer has read its high watermark. With
//! `metrics.librdkafka_statistics = true` this subset of librdkafka's own
//! figures is forwarded too, as gauges (librdkafka's counts since the client
//! started, as it reports them):
//!
//! | name | labels | librdkafka's field |
//! | --- | --- | --- |
//! | `kafka_batch_librdkafka_replyq` | `service` | `replyq`: operations (callbacks, events) waiting in the client's queue |
//! | `kafka_batch_librdkafka_msg_cnt` | `service` | `msg_cnt`: messages in the client's producer queues |
//! | `kafka_batch_librdkafka_broker_rtt_avg_seconds` | `service`, `broker` | `brokers.*.rtt.avg`: average request round trip over the last interval |
//! | `kafka_batch_librdkafka_broker_rx_bytes` | `service`, `broker` | `brokers.*.rxbytes`: bytes received from the broker |
//! | `kafka_batch_librdkafka_broker_tx_bytes` | `service`, `broker` | `brokers.*.txbytes`: bytes sent to the broker |
//! | `kafka_batch_librdkafka_fetchq_messages` | `service`, `topic`, `partition` | `fetchq_cnt`: messages fetched and waiting in the partition's queue |
//! | `kafka_batch_librdkafka_fetchq_bytes` | `service`, `topic`, `partition` | `fetchq_size`: their bytes |
//!
//! `broker` is librdkafka's broker name, `host:port/id`.

use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};

#[cfg(feature = "prometheus")]
mod prometheus;
pub(crate) mod statistics;

#[cfg(feature = "prometheus")]
pub(crate) use prometheus::ensure_serving;
#[cfg(feature = "prometheus")]
pub use prometheus::{serve_prometheus, PrometheusEndpoint};

/// The Prometheus-safe form of a service name, for the metric name prefix.
pub fn metric_prefix(service: &str) -> String {
    service
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The consumer's metric handles, registered once per consumer.
#[derive(Clone)]
pub(crate) struct ConsumerMetrics {
    pub process_seconds: Histogram,
    pub handler_seconds: Histogram,
    pub process_count: Counter,
    pub batches_ok: Counter,
    pub batches_failed: Counter,
    pub batch_messages: Histogram,
    pub skipped_tombstones: Counter,
    pub skipped_unsubscribed: Counter,
    pub commits: Counter,
    pub commit_failures: Counter,
    pub assigns: Counter,
    pub revokes: Counter,
    pub rebalance_errors: Counter,
    pub paused: Gauge,
    pub in_flight_batches: Gauge,
    pub in_flight_records: Gauge,
    pub offset_gaps: Counter,
    pub handler_panics: Counter,
    pub handler_timeouts: Counter,
    pub long_batches: Counter,
    pub partitions_capped: Counter,
    pub seek_skipped: Counter,
    service: String,
}

impl ConsumerMetrics {
    pub fn new(service: &str) -> Self {
        let prefix = metric_prefix(service);
        let svc = service.to_owned();
        ConsumerMetrics {
            process_seconds: histogram!(format!("{prefix}_kafka_process_seconds")),
            process_count: counter!(format!("{prefix}_kafka_process_count")),
            handler_seconds: histogram!("kafka_batch_handler_seconds", "service" => svc.clone()),
            batches_ok: counter!("kafka_batch_batches_total", "service" => svc.clone(), "outcome" => "ok"),
            batches_failed: counter!("kafka_batch_batches_total", "service" => svc.clone(), "outcome" => "error"),
            batch_messages: histogram!("kafka_batch_batch_messages", "service" => svc.clone()),
            skipped_tombstones: counter!("kafka_batch_skipped_records_total", "service" => svc.clone(), "reason" => "tombstone"),
            skipped_unsubscribed: counter!("kafka_batch_skipped_records_total", "service" => svc.clone(), "reason" => "unsubscribed_topic"),
            commits: counter!("kafka_batch_commits_total", "service" => svc.clone()),
            commit_failures: counter!("kafka_batch_commit_failures_total", "service" => svc.clone()),
            assigns: counter!("kafka_batch_rebalances_total", "service" => svc.clone(), "kind" => "assign"),
            revokes: counter!("kafka_batch_rebalances_total", "service" => svc.clone(), "kind" => "revoke"),
            rebalance_errors: counter!("kafka_batch_rebalances_total", "service" => svc.clone(), "kind" => "error"),
            paused: gauge!("kafka_batch_paused", "service" => svc.clone()),
            in_flight_batches: gauge!("kafka_batch_in_flight_batches", "service" => svc.clone()),
            in_flight_records: gauge!("kafka_batch_in_flight_records", "service" => svc.clone()),
            offset_gaps: counter!("kafka_batch_offset_gaps_total", "service" => svc.clone()),
            handler_panics: counter!("kafka_batch_handler_panics_total", "service" => svc.clone()),
            handler_timeouts: counter!("kafka_batch_handler_timeouts_total", "service" => svc.clone()),
            long_batches: counter!("kafka_batch_long_batches_total", "service" => svc.clone()),
            partitions_capped: counter!("kafka_batch_partitions_capped_total", "service" => svc.clone()),
            seek_skipped: counter!("kafka_batch_seek_skipped_records_total", "service" => svc.clone()),
            service: svc,
        }
    }

    pub fn decode_error(&self, error: &crate::envelope::DecodeError) {
        counter!(
            "kafka_batch_decode_errors_total",
            "service" => self.service.clone(),
            "topic" => error.topic.clone(),
            "reason" => crate::consumer::failure_reason(Some(&error.kind)),
        )
        .increment(1);
    }

    /// A failed record skipped by the `skip` policy.
    pub fn skipped_failed(&self, reason: &'static str) {
        counter!("kafka_batch_skipped_records_total", "service" => self.service.clone(), "reason" => reason)
            .increment(1);
    }

    /// A failed record sent to be retried, `in_place` or through the `topic`.
    pub fn retried(&self, kind: &'static str, reason: &'static str) {
        counter!("kafka_batch_retries_total", "service" => self.service.clone(), "kind" => kind, "reason" => reason)
            .increment(1);
    }

    /// A record written to the dead-letter topic.
    pub fn dead_lettered(&self, reason: &'static str) {
        counter!("kafka_batch_dead_letters_total", "service" => self.service.clone(), "reason" => reason)
            .increment(1);
    }
}

/// The producer's metric handles.
#[derive(Clone)]
pub(crate) struct ProducerMetrics {
    service: String,
}

impl ProducerMetrics {
    pub fn new(service: &str) -> Self {
        ProducerMetrics {
            service: service.to_owned(),
        }
    }

    pub fn produced(&self, topic: &str, delivered: u64, failed: u64, oversized: u64) {
        let labels = [
            ("service", self.service.clone()),
            ("topic", topic.to_owned()),
        ];
        if delivered > 0 {
            counter!("kafka_batch_produced_total", &labels).increment(delivered);
        }
        if failed > 0 {
            counter!("kafka_batch_produce_failures_total", &labels).increment(failed);
        }
        if oversized > 0 {
            counter!("kafka_batch_oversized_skipped_total", &labels).increment(oversized);
        }
    }
}
