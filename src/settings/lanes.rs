//! How batches share the handler: `consumer.ordering`.

use serde::{Deserialize, Serialize};

/// Which records may be in the handler at the same time
/// (`consumer.ordering`), when `consumer.concurrency` lets several batches
/// run at once.
///
/// Whatever the ordering, a partition's offsets are committed only up to
/// its first record not yet dealt with: a batch that finishes early never
/// moves the commit past one still running.
///
/// ```
/// use kafka_batch::settings::HandlingOrder;
/// use kafka_batch::ConsumerSettings;
///
/// let mut settings = ConsumerSettings::new("localhost:9092", "my-group", &["events"]);
/// settings.concurrency = 8;
/// settings.ordering = HandlingOrder::Partition;
/// assert!(settings.validate().is_ok());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum HandlingOrder {
    /// A partition's records are handled in offset order: a batch never
    /// holds a record of a partition that has a batch in the handler.
    /// Batches of different partitions run at once, so the parallelism is
    /// at most the number of partitions assigned.
    #[default]
    Partition,
    /// Any batches may run at once, records of one partition included: for
    /// handlers whose effect does not depend on order (idempotent writes).
    /// A record retried in place is read again from the broker, and batches
    /// of its partition that were in the handler meanwhile are handled
    /// again: duplicates, never a loss.
    Unordered,
}
