//! Which offsets may be committed: plain data, no Kafka client.
//!
//! Per partition, the tracker keeps the ranges of offsets handed out to the
//! handler, in the order they were handed out, and marks each finished when
//! its batch is done. The committable watermark is the end of the contiguous
//! run of finished ranges from the front: a range that is not finished (still
//! running, failed, or abandoned) holds back every range after it, so no
//! offset is ever committed past a record that was not dealt with.
//!
//! Each assignment of a partition gets a new generation. A result for an
//! older generation (a batch from before a revoke) is dropped, never
//! committed: the partition's next owner reads those records again.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::Arc;

/// A topic and partition.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPartition {
    /// The topic.
    pub topic: Arc<str>,
    /// The partition.
    pub partition: i32,
}

impl TopicPartition {
    /// A topic and partition.
    pub fn new(topic: &str, partition: i32) -> Self {
        TopicPartition {
            topic: Arc::from(topic),
            partition,
        }
    }
}

impl fmt::Display for TopicPartition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}[{}]", self.topic, self.partition)
    }
}

/// Identifies one assignment of a partition to this consumer.
pub type Generation = u64;

#[derive(Debug)]
struct HandedOut {
    first: i64,
    end: i64,
    finished: bool,
    generation: Generation,
    /// Offsets settled one by one before the whole range finished (manual
    /// commits), as sorted, disjoint, non-adjacent half-open intervals.
    settled: Vec<(i64, i64)>,
}

impl HandedOut {
    fn new(first: i64, end: i64, finished: bool, generation: Generation) -> Self {
        HandedOut {
            first,
            end,
            finished,
            generation,
            settled: Vec::new(),
        }
    }

    /// Marks `from..to` (clamped to the range) settled.
    fn settle(&mut self, from: i64, to: i64) {
        let (from, to) = (from.max(self.first), to.min(self.end));
        if from >= to || self.finished {
            return;
        }
        // The intervals are sorted and apart: the new one merges with those
        // that touch it, found by binary search (settling a batch's records
        // one by one stays cheap however many intervals are open).
        let start = self.settled.partition_point(|&(_, b)| b < from);
        let stop = self.settled.partition_point(|&(a, _)| a <= to);
        let merged = if start < stop {
            (
                from.min(self.settled[start].0),
                to.max(self.settled[stop - 1].1),
            )
        } else {
            (from, to)
        };
        self.settled.splice(start..stop, [merged]);
        if self.settled.first() == Some(&(self.first, self.end)) {
            self.finished = true;
        }
    }

    /// The first offset of the range not settled, if any.
    fn first_open(&self) -> Option<i64> {
        if self.finished {
            return None;
        }
        Some(self.settled_prefix().unwrap_or(self.first))
    }

    /// One past the last offset of the settled run from `first`, if any.
    fn settled_prefix(&self) -> Option<i64> {
        match self.settled.first() {
            Some(&(a, b)) if a == self.first => Some(b),
            _ => None,
        }
    }
}

#[derive(Debug)]
struct PartitionOffsets {
    generation: Generation,
    handed_out: VecDeque<HandedOut>,
    /// One past the last offset of the contiguous finished run.
    watermark: Option<i64>,
    /// The last offset committed: by this consumer, or by the group before
    /// the partition was assigned (when the assignment could read it).
    committed: Option<i64>,
    /// The last offset stored for librdkafka's interval commit (at least
    /// `committed` once anything was committed).
    stored: Option<i64>,
    /// Being revoked: nothing more is handed out, what was settles.
    revoking: bool,
}

impl PartitionOffsets {
    /// Moves the watermark over the finished ranges at the front, and into
    /// the front range as far as its records were settled one by one; true
    /// when it moved.
    fn advance(&mut self) -> bool {
        let mut moved = false;
        while self.handed_out.front().is_some_and(|r| r.finished) {
            if let Some(done) = self.handed_out.pop_front() {
                self.watermark = Some(done.end);
                moved = true;
            }
        }
        let prefix = self.handed_out.front().and_then(HandedOut::settled_prefix);
        if let Some(upto) = prefix {
            if self.watermark.is_none_or(|w| w < upto) {
                self.watermark = Some(upto);
                moved = true;
            }
        }
        moved
    }
}

/// Per-partition record of handed-out and finished offsets.
///
/// ```
/// use kafka_batch::offsets::{OffsetTracker, TopicPartition};
///
/// let tp = TopicPartition::new("events", 0);
/// let mut tracker = OffsetTracker::default();
/// let generation = tracker.assign(tp.clone());
/// tracker.handed_out(&tp, 0, 10);
/// tracker.handed_out(&tp, 10, 20);
/// // The second batch finished first: nothing may be committed yet.
/// assert!(tracker.finished(&tp, generation, 10));
/// assert_eq!(tracker.committable(), vec![]);
/// // Now both have: commit up to 20.
/// assert!(tracker.finished(&tp, generation, 0));
/// assert_eq!(tracker.committable(), vec![(tp, 20)]);
/// ```
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, PartitionOffsets>,
    next_generation: Generation,
    /// Some watermark may be ahead of its commit: the poller asks for
    /// committable offsets after every poll, and this keeps that free when
    /// nothing finished.
    uncommitted: bool,
    /// Some watermark may be ahead of what was stored for the interval
    /// commit: the same shortcut for [`OffsetTracker::storable`].
    unstored: bool,
}

impl OffsetTracker {
    /// Starts a new assignment of `tp`, forgetting anything known of an older one.
    pub fn assign(&mut self, tp: TopicPartition) -> Generation {
        self.assign_at(tp, None)
    }

    /// [`OffsetTracker::assign`], knowing the group's committed offset:
    /// nothing at or below it is committed (or stored) again, so a seek
    /// back before anything was read does not move the group's commit back.
    pub(crate) fn assign_at(
        &mut self,
        tp: TopicPartition,
        group_committed: Option<i64>,
    ) -> Generation {
        self.next_generation += 1;
        let generation = self.next_generation;
        self.partitions.insert(
            tp,
            PartitionOffsets {
                generation,
                handed_out: VecDeque::new(),
                watermark: None,
                committed: group_committed,
                stored: group_committed,
                revoking: false,
            },
        );
        generation
    }

    /// Forgets `tp`: it is no longer this consumer's.
    pub fn revoke(&mut self, tp: &TopicPartition) {
        self.partitions.remove(tp);
    }

    /// Every partition assigned.
    pub fn partitions(&self) -> Vec<TopicPartition> {
        self.partitions.keys().cloned().collect()
    }

    /// The current generation of `tp`, or `None` when it is not assigned
    /// or is being revoked: `None` means its records are not handed out.
    pub fn generation(&self, tp: &TopicPartition) -> Option<Generation> {
        self.partitions
            .get(tp)
            .filter(|p| !p.revoking)
            .map(|p| p.generation)
    }

    /// Starts revoking `tp`: nothing more of it is handed out (the next
    /// owner reads it), and what was handed out still settles, until
    /// [`OffsetTracker::revoke`] forgets it.
    pub fn begin_revoke(&mut self, tp: &TopicPartition) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.revoking = true;
        }
    }

    /// Records that offsets `first..end` of `tp` were handed out.
    ///
    /// Returns the generation they belong to, or `None` (and records nothing)
    /// when `tp` is not assigned or is being revoked.
    pub fn handed_out(&mut self, tp: &TopicPartition, first: i64, end: i64) -> Option<Generation> {
        let p = self.partitions.get_mut(tp).filter(|p| !p.revoking)?;
        p.handed_out
            .push_back(HandedOut::new(first, end, false, p.generation));
        Some(p.generation)
    }

    /// Records that offsets `first..end` of `tp` were read, of which only
    /// `open` (sorted) are still to be dealt with: the others (tombstones,
    /// records skipped, offsets the broker did not deliver) are settled at
    /// once. The open ones are settled with [`OffsetTracker::settle_records`],
    /// in any order and by any number of batches.
    ///
    /// Returns the generation, or `None` (and records nothing) when `tp` is
    /// not assigned or is being revoked.
    pub fn handed_out_open(
        &mut self,
        tp: &TopicPartition,
        first: i64,
        end: i64,
        open: &[i64],
    ) -> Option<Generation> {
        let p = self.partitions.get_mut(tp).filter(|p| !p.revoking)?;
        let mut range = HandedOut::new(first, end, false, p.generation);
        let mut from = first;
        for &offset in open {
            range.settle(from, offset);
            from = offset + 1;
        }
        range.settle(from, end);
        p.handed_out.push_back(range);
        let (moved, generation) = (p.advance(), p.generation);
        self.note_moved(moved);
        Some(generation)
    }

    /// The first offset of `tp` handed out and not settled, if any.
    pub fn first_open(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions
            .get(tp)?
            .handed_out
            .iter()
            .find_map(HandedOut::first_open)
    }

    /// One past the last offset of `tp` handed out, if any is still held.
    pub fn handed_end(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.get(tp)?.handed_out.back().map(|r| r.end)
    }

    /// Marks the range of `tp` starting at `first`, handed out in
    /// `generation`, as finished. Returns `false` when the result is stale
    /// (the partition was revoked or reassigned since) and was dropped.
    pub fn finished(&mut self, tp: &TopicPartition, generation: Generation, first: i64) -> bool {
        let Some(p) = self.partitions.get_mut(tp) else {
            return false;
        };
        let Some(range) = p
            .handed_out
            .iter_mut()
            .find(|r| r.first == first && r.generation == generation)
        else {
            return false;
        };
        range.finished = true;
        let moved = p.advance();
        self.note_moved(moved);
        true
    }

    /// Marks single records of `tp`, handed out in `generation`, settled
    /// before their batch finished (a manual commit of some messages). An
    /// offset not handed out in that generation changes nothing. Returns
    /// how many of the offsets were held.
    pub fn settle_records(
        &mut self,
        tp: &TopicPartition,
        generation: Generation,
        offsets: impl IntoIterator<Item = i64>,
    ) -> usize {
        let Some(p) = self.partitions.get_mut(tp) else {
            return 0;
        };
        let mut held = 0;
        let holds = |r: &HandedOut, offset: i64| {
            r.generation == generation && r.first <= offset && offset < r.end
        };
        for offset in offsets {
            // Ranges are handed out in offset order: the one holding an
            // offset is found by binary search (under `ordering = "key"` a
            // partition has hundreds of small ranges open), and by a scan
            // should that order ever not hold.
            let below = p.handed_out.partition_point(|r| r.first <= offset);
            let index = below
                .checked_sub(1)
                .filter(|i| holds(&p.handed_out[*i], offset))
                .or_else(|| p.handed_out.iter().position(|r| holds(r, offset)));
            if let Some(range) = index.and_then(|i| p.handed_out.get_mut(i)) {
                range.settle(offset, offset + 1);
                held += 1;
            }
        }
        let moved = p.advance();
        self.note_moved(moved);
        held
    }

    /// Marks offsets `from..to` of `tp`, handed out in `generation`, settled
    /// (a manual commit reaching into a batch in the handler).
    pub fn settle_range(
        &mut self,
        tp: &TopicPartition,
        generation: Generation,
        from: i64,
        to: i64,
    ) {
        let Some(p) = self.partitions.get_mut(tp) else {
            return;
        };
        for range in p
            .handed_out
            .iter_mut()
            .filter(|r| r.generation == generation)
        {
            range.settle(from, to);
        }
        let moved = p.advance();
        self.note_moved(moved);
    }

    /// Marks every record of `tp` handed out before `offset` settled (a
    /// manual commit of an offset: the caller says all of them were dealt
    /// with). Records not handed out are not: the watermark stops at the
    /// first of them.
    pub fn settle_before(&mut self, tp: &TopicPartition, offset: i64) {
        let Some(p) = self.partitions.get_mut(tp) else {
            return;
        };
        for range in p.handed_out.iter_mut() {
            range.settle(range.first, offset);
        }
        let moved = p.advance();
        self.note_moved(moved);
    }

    /// True while the range of `tp` starting at `first`, handed out in
    /// `generation`, still counts: its result would be applied.
    pub fn holds(&self, tp: &TopicPartition, generation: Generation, first: i64) -> bool {
        self.partitions.get(tp).is_some_and(|p| {
            p.handed_out
                .iter()
                .any(|r| r.first == first && r.generation == generation)
        })
    }

    /// The range of `tp` starting at `first` (handed out in `generation`)
    /// was dealt with only before `upto`: its records from `upto` on, and
    /// every range handed out after it, will be read again.
    ///
    /// Marks `first..upto` finished, forgets the rest, and gives the
    /// partition a new generation, so results for the forgotten ranges are
    /// dropped. The caller must seek the partition back to `upto` before
    /// handing out more of it. Returns the new generation, or `None` when the
    /// range is not held (a stale result: nothing changes).
    pub fn rewind(
        &mut self,
        tp: &TopicPartition,
        generation: Generation,
        first: i64,
        upto: i64,
    ) -> Option<Generation> {
        let p = self.partitions.get_mut(tp)?;
        let index = p
            .handed_out
            .iter()
            .position(|r| r.first == first && r.generation == generation)?;
        p.handed_out.truncate(index);
        if upto > first {
            p.handed_out
                .push_back(HandedOut::new(first, upto, true, generation));
        }
        let moved = p.advance();
        self.next_generation += 1;
        p.generation = self.next_generation;
        let generation = p.generation;
        self.note_moved(moved);
        Some(generation)
    }

    /// The caller moved `tp`'s read position to `offset`: everything
    /// handed out is forgotten (results for it are dropped by the new
    /// generation this returns), and records before `offset` that were not
    /// dealt with count as settled: a seek forward skips them on purpose,
    /// a seek backward reads settled records again (the watermark does not
    /// move back, so no commit goes back either). Returns the new
    /// generation and how many records the seek skipped (when known: the
    /// first record not dealt with was), or `None` when `tp` is not held.
    pub(crate) fn seek(
        &mut self,
        tp: &TopicPartition,
        offset: i64,
    ) -> Option<(Generation, Option<i64>)> {
        let p = self.partitions.get_mut(tp).filter(|p| !p.revoking)?;
        let first_open = p
            .handed_out
            .front()
            .map(|r| r.settled_prefix().unwrap_or(r.first))
            .or(p.watermark)
            .or(p.committed);
        p.handed_out.clear();
        let skipped = first_open.map(|first| (offset - first).max(0));
        let moved = match first_open {
            Some(first) if offset <= first => false,
            _ if p.watermark.is_some_and(|w| w >= offset) => false,
            _ => {
                p.watermark = Some(offset);
                true
            }
        };
        self.next_generation += 1;
        p.generation = self.next_generation;
        let generation = p.generation;
        self.note_moved(moved);
        Some((generation, skipped))
    }

    /// True when some range of `tp` was handed out and is not finished.
    pub fn has_unfinished(&self, tp: &TopicPartition) -> bool {
        self.partitions
            .get(tp)
            .is_some_and(|p| !p.handed_out.is_empty())
    }

    /// The committable watermark of `tp`: one past the last offset of its
    /// contiguous finished run.
    pub fn watermark(&self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.get(tp).and_then(|p| p.watermark)
    }

    /// Each partition whose watermark is ahead of what was committed, with
    /// the offset to commit (the next offset to read), in partition order.
    pub fn committable(&self) -> Vec<(TopicPartition, i64)> {
        if !self.uncommitted {
            return Vec::new();
        }
        self.ahead_of(|p| p.committed)
    }

    /// The last offset committed for each partition held, in partition order.
    pub fn committed_offsets(&self) -> Vec<(TopicPartition, i64)> {
        let mut out: Vec<(TopicPartition, i64)> = self
            .partitions
            .iter()
            .filter_map(|(tp, p)| p.committed.map(|c| (tp.clone(), c)))
            .collect();
        out.sort();
        out
    }

    /// Each partition whose watermark is ahead of what was stored for the
    /// interval commit (or committed), with the offset to store, in
    /// partition order: what [`OffsetTracker::committable`] is for commits
    /// made one by one, for commits librdkafka makes on an interval.
    pub fn storable(&self) -> Vec<(TopicPartition, i64)> {
        if !self.unstored {
            return Vec::new();
        }
        self.ahead_of(|p| p.stored)
    }

    /// Each partition whose watermark is ahead of `mark` (what was committed,
    /// or stored), with its watermark, in partition order.
    fn ahead_of(
        &self,
        mark: impl Fn(&PartitionOffsets) -> Option<i64>,
    ) -> Vec<(TopicPartition, i64)> {
        let mut out: Vec<(TopicPartition, i64)> = self
            .partitions
            .iter()
            .filter_map(|(tp, p)| match (p.watermark, mark(p)) {
                (Some(w), Some(m)) if w <= m => None,
                (Some(w), _) => Some((tp.clone(), w)),
                (None, _) => None,
            })
            .collect();
        out.sort();
        out
    }

    /// After a watermark moved (`moved`): something may be committed and
    /// stored again.
    fn note_moved(&mut self, moved: bool) {
        if moved {
            self.uncommitted = true;
            self.unstored = true;
        }
    }

    /// Records that `offset` was stored for `tp`, for librdkafka to commit.
    pub fn stored(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.stored = Some(p.stored.map_or(offset, |s| s.max(offset)));
        }
        self.unstored = self
            .partitions
            .values()
            .any(|p| matches!((p.watermark, p.stored), (Some(w), s) if s.is_none_or(|s| w > s)));
    }

    /// Records a successful commit of `offset` for `tp` (which was stored
    /// before it was committed).
    pub fn committed(&mut self, tp: &TopicPartition, offset: i64) {
        if let Some(p) = self.partitions.get_mut(tp) {
            p.committed = Some(p.committed.map_or(offset, |c| c.max(offset)));
        }
        self.uncommitted = self
            .partitions
            .values()
            .any(|p| matches!((p.watermark, p.committed), (Some(w), c) if c.is_none_or(|c| w > c)));
        self.stored(tp, offset);
    }
}

#[cfg(test)]
mod tests;
