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
    /// Records with the same key are handled in offset order; records of
    /// different keys run at once, those of one partition too: parallelism
    /// beyond the partition count. A batch never holds a record whose key
    /// has an earlier record in the handler. Records without a usable key
    /// share their partition's keyless lane. A record retried in place
    /// holds back only its key (it is delivered again from memory, never by
    /// seeking the partition back), and its partition's commit, until the
    /// chain ends; the partition's other keys flow until
    /// `max_in_flight_records` pauses it.
    Key,
    /// Any batches may run at once, records of one partition included: for
    /// handlers whose effect does not depend on order (idempotent writes).
    /// A record retried in place is read again from the broker, and batches
    /// of its partition that were in the handler meanwhile are handled
    /// again: duplicates, never a loss.
    Unordered,
}
