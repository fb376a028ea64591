//! Offset gaps: records the broker did not deliver.
//!
//! The offset tracker commits the end of the contiguous run of what was
//! handed out and finished, so it trusts the broker to return every record
//! from the position the consumer asked for. The gap guard checks that
//! trust. After an assignment the consumer must resume at the group's
//! committed offset, and after a seek at the seek's offset. From then on
//! each record of a partition should follow the previous one. A record
//! further on means the records between were not delivered.
//!
//! Kafka has legitimate gaps: compacted topics, and the markers of
//! transactional producers. A broker that skips records it holds looks the
//! same. tansu 0.6.0 does this when a fetch starts inside a stored batch.
//! So a gap is reported (a warning naming the missing offsets, the
//! `kafka_batch_offset_gaps_total` counter, and
//! [`ConsumerStats::offset_gaps`](super::ConsumerStats)), not refused.

use crate::offsets::{Generation, TopicPartition};

/// Where a partition is expected to continue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Expectation {
    pub tp: TopicPartition,
    pub generation: Generation,
    /// The offset of the next record; `None` when it is not known (no
    /// committed offset: `auto.offset.reset` decides).
    pub next: Option<i64>,
}

/// Records that a partition skipped: `first..end` were not delivered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Gap {
    pub first: i64,
    pub end: i64,
}

/// The next expected offset of each partition, on the poller thread.
#[derive(Default)]
pub(super) struct GapGuard {
    /// One entry per partition held. A record is looked up by its borrowed
    /// topic name, with no allocation.
    next: Vec<Next>,
    /// The entry the last record met. Records come in runs per partition
    /// (one fetched batch after another), so most records meet the entry
    /// the one before met, and the list is searched once a run.
    last: usize,
}

struct Next {
    tp: TopicPartition,
    generation: Generation,
    offset: Option<i64>,
}

impl GapGuard {
    /// Takes where partitions continue: after an assignment or a seek.
    pub fn expect(&mut self, expectations: impl IntoIterator<Item = Expectation>) {
        for e in expectations {
            self.next.retain(|n| n.tp != e.tp);
            self.next.push(Next {
                tp: e.tp,
                generation: e.generation,
                offset: e.next,
            });
        }
    }

    /// Forgets partitions this consumer no longer owns.
    pub fn retain(&mut self, mut owned: impl FnMut(&TopicPartition, Generation) -> bool) {
        self.next.retain(|n| owned(&n.tp, n.generation));
    }

    /// Checks a record of `topic`/`partition` at `offset` and returns the
    /// records skipped before it, if any. (Entries are replaced on every
    /// assignment and dropped on revoke, and librdkafka drops records read
    /// under an older assignment, so a record always meets its own.)
    pub fn observe(&mut self, topic: &str, partition: i32, offset: i64) -> Option<Gap> {
        let its_own = |n: &Next| n.tp.partition == partition && &*n.tp.topic == topic;
        if !self.next.get(self.last).is_some_and(its_own) {
            self.last = self.next.iter().position(its_own)?;
        }
        let n = self.next.get_mut(self.last)?;
        let gap = match n.offset {
            Some(expected) if offset > expected => Some(Gap {
                first: expected,
                end: offset,
            }),
            _ => None,
        };
        // A record before the expected one (read again after a pause) moves
        // nothing back: the tracker and the batch builder deal with it.
        n.offset = Some(n.offset.map_or(offset + 1, |o| o.max(offset + 1)));
        gap
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        TopicPartition::new("t", p)
    }

    fn guard(start: Option<i64>) -> (GapGuard, Generation) {
        let mut tracker = crate::offsets::OffsetTracker::default();
        let generation = tracker.assign(tp(0));
        let mut guard = GapGuard::default();
        guard.expect([Expectation {
            tp: tp(0),
            generation,
            next: start,
        }]);
        (guard, generation)
    }

    #[test]
    fn a_partition_that_resumes_where_it_was_committed_has_no_gap() {
        let (mut g, _) = guard(Some(100));
        for offset in 100..110 {
            assert_eq!(g.observe("t", 0, offset), None);
        }
    }

    #[test]
    fn a_first_record_past_the_committed_offset_is_a_gap() {
        let (mut g, _) = guard(Some(14_500));
        assert_eq!(
            g.observe("t", 0, 15_000),
            Some(Gap {
                first: 14_500,
                end: 15_000
            })
        );
        assert_eq!(g.observe("t", 0, 15_001), None);
    }

    #[test]
    fn a_jump_between_records_is_a_gap() {
        let (mut g, _) = guard(None);
        assert_eq!(g.observe("t", 0, 7), None, "no start known");
        assert_eq!(g.observe("t", 0, 8), None);
        assert_eq!(g.observe("t", 0, 12), Some(Gap { first: 9, end: 12 }));
    }

    #[test]
    fn records_read_again_are_not_gaps_and_do_not_move_the_expectation_back() {
        let (mut g, _) = guard(Some(0));
        for offset in 0..10 {
            g.observe("t", 0, offset);
        }
        assert_eq!(g.observe("t", 0, 5), None);
        assert_eq!(g.observe("t", 0, 10), None);
    }

    #[test]
    fn other_partitions_are_not_checked() {
        let (mut g, _) = guard(Some(100));
        assert_eq!(g.observe("t", 1, 500), None);
        assert_eq!(g.observe("other", 0, 500), None);
    }

    #[test]
    fn a_new_expectation_replaces_the_old_one() {
        let (mut g, generation) = guard(Some(100));
        g.expect([Expectation {
            tp: tp(0),
            generation: generation + 1,
            next: Some(400),
        }]);
        assert_eq!(g.observe("t", 0, 400), None);
    }

    #[test]
    fn forgotten_partitions_are_not_checked() {
        let (mut g, _) = guard(Some(100));
        g.retain(|_, _| false);
        assert_eq!(g.observe("t", 0, 500), None);
    }

    #[test]
    fn interleaved_partitions_and_topics_each_keep_their_own_expectation() {
        let mut tracker = crate::offsets::OffsetTracker::default();
        let mut g = GapGuard::default();
        let held = [("t", 0, 10), ("t", 1, 20), ("u", 0, 30), ("u", 1, 40)];
        g.expect(held.map(|(topic, partition, next)| {
            let tp = TopicPartition::new(topic, partition);
            Expectation {
                generation: tracker.assign(tp.clone()),
                tp,
                next: Some(next),
            }
        }));
        // Runs of one partition, then switches, then back: each record meets
        // its own partition's expectation.
        for (topic, partition, next) in held {
            for offset in next..next + 3 {
                assert_eq!(
                    g.observe(topic, partition, offset),
                    None,
                    "{topic}/{partition} at {offset}"
                );
            }
        }
        for (topic, partition, next) in held.iter().rev() {
            assert_eq!(
                g.observe(topic, *partition, next + 5),
                Some(Gap {
                    first: next + 3,
                    end: next + 5
                }),
                "{topic}/{partition}"
            );
        }
        assert_eq!(g.observe("v", 0, 1), None, "a topic not held");
        assert_eq!(
            g.observe("t", 0, 16),
            None,
            "after a miss, the hint still finds t/0"
        );
    }
}
