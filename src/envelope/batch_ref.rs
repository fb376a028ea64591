//! [`BatchRef`]: a batch's partitions and offset ranges, and their text in logs.

use std::fmt;
use std::sync::Arc;

/// The partitions and offset ranges of a batch, printed for logs as
/// `topic[partition=first:end,...],other[...]` (`end` is one past the last).
///
/// Topics and partitions keep the order in which they first appear.
///
/// ```
/// use kafka_batch::BatchRef;
///
/// let mut batch = BatchRef::default();
/// for offset in 100..150 {
///     batch.add("input-topic", 0, offset);
/// }
/// batch.add("input-topic", 3, 7);
/// batch.add("input-topic", 3, 8);
/// batch.add("other-topic", 1, 0);
/// assert_eq!(batch.to_string(), "input-topic[0=100:150,3=7:9],other-topic[1=0:1]");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BatchRef {
    ranges: Vec<PartitionRange>,
}

/// The offsets one batch holds for one partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionRange {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
    /// The lowest offset in the batch.
    pub first: i64,
    /// One past the highest offset in the batch: the offset to commit.
    pub end: i64,
    /// How many records of this partition the batch holds.
    pub records: usize,
}

impl BatchRef {
    /// Records one offset of a partition.
    pub fn add(&mut self, topic: &str, partition: i32, offset: i64) {
        // Records arrive grouped by partition, so the last range is nearly
        // always the one to extend.
        if let Some(range) = self
            .ranges
            .iter_mut()
            .rev()
            .find(|r| r.partition == partition && &*r.topic == topic)
        {
            range.first = range.first.min(offset);
            range.end = range.end.max(offset + 1);
            range.records += 1;
            return;
        }
        self.ranges.push(PartitionRange {
            topic: Arc::from(topic),
            partition,
            first: offset,
            end: offset + 1,
            records: 1,
        });
    }

    /// A batch ref from ranges already gathered.
    pub fn from_ranges(ranges: impl IntoIterator<Item = PartitionRange>) -> Self {
        BatchRef {
            ranges: ranges.into_iter().collect(),
        }
    }

    /// Each partition's range, in order of first appearance.
    pub fn ranges(&self) -> &[PartitionRange] {
        &self.ranges
    }

    /// True when no offset was added.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// The number of records added.
    pub fn records(&self) -> usize {
        self.ranges.iter().map(|r| r.records).sum()
    }
}

impl fmt::Display for BatchRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut topics: Vec<&str> = Vec::new();
        for r in &self.ranges {
            if !topics.contains(&&*r.topic) {
                topics.push(&r.topic);
            }
        }
        for (i, topic) in topics.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{topic}[")?;
            let mut first = true;
            for r in self.ranges.iter().filter(|r| &*r.topic == *topic) {
                if !first {
                    f.write_str(",")?;
                }
                first = false;
                write!(f, "{}={}:{}", r.partition, r.first, r.end)?;
            }
            f.write_str("]")?;
        }
        Ok(())
    }
}
