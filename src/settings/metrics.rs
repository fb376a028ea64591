//! The `[metrics]` table: the Prometheus endpoint and librdkafka's statistics.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{KafkaProperties, SettingsError};

/// librdkafka's `statistics.interval.ms` when the metrics need statistics
/// and the `kafka` tables do not set it.
pub const DEFAULT_STATISTICS_INTERVAL_MS: u64 = 5000;

/// The metrics settings (the top-level `[metrics]` table; the consumer gets
/// a copy as [`ConsumerSettings::metrics`](super::ConsumerSettings::metrics)).
///
/// ```
/// use kafka_batch::settings::MetricsSettings;
///
/// let mut metrics = MetricsSettings::default();
/// assert!(!metrics.wants_statistics(), "off by default");
/// metrics.lag = true;
/// assert!(metrics.wants_statistics());
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsSettings {
    /// Where to serve Prometheus metrics (`/metrics` over HTTP), e.g.
    /// `127.0.0.1:9464` or `0.0.0.0:9464`. Empty: no endpoint. Needs the
    /// `prometheus` cargo feature; the consumer starts the endpoint when it
    /// is created (once per process). Implies [`MetricsSettings::lag`].
    pub prometheus_listen: String,
    /// Publish `kafka_batch_lag` per partition through whatever recorder is
    /// installed: turns librdkafka's statistics on (every 5 s unless
    /// `statistics.interval.ms` is set in the `kafka` tables).
    pub lag: bool,
    /// Also forward a subset of librdkafka's own statistics as gauges
    /// (`kafka_batch_librdkafka_*`, see [`crate::metrics`]); turns the
    /// statistics on like [`MetricsSettings::lag`].
    pub librdkafka_statistics: bool,
}

impl MetricsSettings {
    /// True when librdkafka's statistics must be on for these metrics.
    pub fn wants_statistics(&self) -> bool {
        self.lag || self.librdkafka_statistics || !self.prometheus_listen.trim().is_empty()
    }

    /// The address of the Prometheus endpoint, `None` when there is none.
    ///
    /// Fails when the address does not parse, or (without the `prometheus`
    /// feature) when one is set at all.
    pub fn prometheus_addr(&self) -> Result<Option<SocketAddr>, SettingsError> {
        let listen = self.prometheus_listen.trim();
        if listen.is_empty() {
            return Ok(None);
        }
        if !cfg!(feature = "prometheus") {
            return Err(SettingsError::invalid(
                "metrics.prometheus_listen",
                format!("= {listen:?} needs the `prometheus` cargo feature"),
                "enable it (kafka-batch = { version = \"0.1\", features = [\"prometheus\"] }), or leave the setting empty and install your own metrics recorder",
            ));
        }
        listen.parse::<SocketAddr>().map(Some).map_err(|e| {
            SettingsError::invalid(
                "metrics.prometheus_listen",
                format!("= {listen:?} is not an address ({e})"),
                "write an IP address and a port, e.g. \"127.0.0.1:9464\" or \"0.0.0.0:9464\"",
            )
        })
    }

    /// Checks the values (the address parses, the feature is there).
    pub fn validate(&self) -> Result<(), SettingsError> {
        self.prometheus_addr().map(|_| ())
    }

    /// The `statistics.interval.ms` to set: its default when the metrics
    /// need statistics and `kafka` (the properties the client is built
    /// from) does not set it; `None` otherwise.
    pub(super) fn statistics_interval(&self, kafka: &KafkaProperties) -> Option<u64> {
        if kafka.get("statistics.interval.ms").is_some() || !self.wants_statistics() {
            return None;
        }
        Some(DEFAULT_STATISTICS_INTERVAL_MS)
    }
}
