use super::*;
use proptest::prelude::*;
use std::collections::BTreeSet;

fn tp(p: i32) -> TopicPartition {
    TopicPartition::new("t", p)
}

#[test]
fn an_unfinished_range_holds_back_later_ones() {
    let mut t = OffsetTracker::default();
    let g = t.assign(tp(0));
    for (first, end) in [(0, 5), (5, 9), (12, 20)] {
        assert_eq!(t.handed_out(&tp(0), first, end), Some(g));
    }
    assert!(t.finished(&tp(0), g, 12));
    assert!(t.finished(&tp(0), g, 0));
    assert_eq!(t.committable(), vec![(tp(0), 5)]);
    t.committed(&tp(0), 5);
    assert_eq!(t.committable(), vec![]);
    assert!(t.has_unfinished(&tp(0)));
    assert!(t.finished(&tp(0), g, 5));
    assert_eq!(
        t.committable(),
        vec![(tp(0), 20)],
        "a gap between ranges (compaction) is fine"
    );
    assert!(!t.has_unfinished(&tp(0)));
}

#[test]
fn results_from_a_revoked_or_reassigned_partition_are_dropped() {
    let mut t = OffsetTracker::default();
    let old = t.assign(tp(1));
    t.handed_out(&tp(1), 0, 10);
    t.revoke(&tp(1));
    assert!(!t.finished(&tp(1), old, 0), "revoked");
    assert_eq!(t.handed_out(&tp(1), 10, 20), None, "not assigned");
    let new = t.assign(tp(1));
    assert_ne!(old, new);
    t.handed_out(&tp(1), 0, 10);
    assert!(!t.finished(&tp(1), old, 0), "old generation");
    assert_eq!(t.committable(), vec![]);
    assert!(t.finished(&tp(1), new, 0));
    assert_eq!(t.committable(), vec![(tp(1), 10)]);
}

#[test]
fn a_rewind_keeps_the_handled_prefix_and_drops_later_results() {
    let mut t = OffsetTracker::default();
    let g = t.assign(tp(0));
    t.handed_out(&tp(0), 0, 10);
    t.handed_out(&tp(0), 10, 20);
    // The first batch failed at offset 4: 0..4 were handled.
    let g2 = t.rewind(&tp(0), g, 0, 4).expect("the range is held");
    assert_ne!(g, g2);
    assert_eq!(t.committable(), vec![(tp(0), 4)]);
    assert!(!t.holds(&tp(0), g, 10), "the later batch is forgotten");
    assert!(!t.finished(&tp(0), g, 10), "its result is dropped");
    assert_eq!(t.generation(&tp(0)), Some(g2));
    assert_eq!(
        t.rewind(&tp(0), g, 0, 4),
        None,
        "a stale rewind changes nothing"
    );
    // Read again from 4.
    t.handed_out(&tp(0), 4, 12);
    assert!(t.holds(&tp(0), g2, 4));
    assert!(t.finished(&tp(0), g2, 4));
    assert_eq!(t.watermark(&tp(0)), Some(12));
}

#[test]
fn a_rewind_at_the_first_record_commits_nothing_new() {
    let mut t = OffsetTracker::default();
    let g = t.assign(tp(0));
    t.handed_out(&tp(0), 5, 10);
    t.rewind(&tp(0), g, 5, 5);
    assert_eq!(t.committable(), vec![]);
    assert!(!t.has_unfinished(&tp(0)));
}

#[test]
fn records_settled_one_by_one_move_the_watermark_only_over_a_contiguous_run() {
    let mut t = OffsetTracker::default();
    let g = t.assign(tp(0));
    t.handed_out(&tp(0), 0, 10);
    t.handed_out(&tp(0), 10, 20);
    // Messages 0 and 9 committed by hand while 1 to 8 are unsettled.
    assert_eq!(t.settle_records(&tp(0), g, [0, 9]), 2);
    assert_eq!(t.committable(), vec![(tp(0), 1)]);
    assert_eq!(
        t.settle_records(&tp(0), g + 1, [1, 2]),
        0,
        "another generation's records are not these"
    );
    assert_eq!(t.settle_records(&tp(0), g, [99]), 0, "not handed out");
    t.settle_records(&tp(0), g, 1..9);
    assert_eq!(
        t.watermark(&tp(0)),
        Some(10),
        "the whole range settled finishes it"
    );
    assert!(t.holds(&tp(0), g, 10));
    // The second batch then fails at 12: only 10 and 11 were handled.
    let g2 = t.rewind(&tp(0), g, 10, 12).expect("held");
    assert_eq!(t.watermark(&tp(0)), Some(12));
    // Settling an offset never moves the watermark back.
    t.handed_out(&tp(0), 12, 15);
    t.settle_records(&tp(0), g2, [12]);
    assert_eq!(t.watermark(&tp(0)), Some(13));
}

#[test]
fn settling_before_an_offset_stops_at_records_not_handed_out() {
    let mut t = OffsetTracker::default();
    t.assign(tp(0));
    t.handed_out(&tp(0), 0, 10);
    t.settle_before(&tp(0), 4);
    assert_eq!(t.committable(), vec![(tp(0), 4)]);
    t.settle_before(&tp(0), 1_000);
    assert_eq!(
        t.watermark(&tp(0)),
        Some(10),
        "never past what was handed out"
    );
    assert!(!t.has_unfinished(&tp(0)));
}

/// A tracker holding ranges of these sizes of partition 0, handed out
/// one after the other from offset 0; with its generation, the ranges
/// and their end.
fn handed_out_in_turn(sizes: &[i64]) -> (OffsetTracker, Generation, Vec<(i64, i64)>, i64) {
    let mut t = OffsetTracker::default();
    let g = t.assign(tp(0));
    let mut ranges = Vec::new();
    let mut offset = 0;
    for size in sizes {
        t.handed_out(&tp(0), offset, offset + size);
        ranges.push((offset, offset + size));
        offset += size;
    }
    (t, g, ranges, offset)
}

proptest! {
    /// Records settled one by one, in any order, with ranges finishing in
    /// any order: the watermark is always the end of the contiguous run
    /// of settled offsets from the first handed out.
    #[test]
    fn single_settlements_never_move_the_watermark_past_an_unsettled_offset(
        sizes in prop::collection::vec(1i64..8, 1..10),
        steps in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>()), 0..80),
    ) {
        let (mut t, g, ranges, offset) = handed_out_in_turn(&sizes);
        let mut settled = vec![false; offset as usize];
        for (whole_range, index) in steps {
            if whole_range {
                let (first, end) = ranges[index.index(ranges.len())];
                t.finished(&tp(0), g, first);
                for o in first..end {
                    settled[o as usize] = true;
                }
            } else {
                let o = index.index(offset as usize);
                t.settle_records(&tp(0), g, [o as i64]);
                settled[o] = true;
            }
            let run = settled.iter().take_while(|s| **s).count() as i64;
            prop_assert_eq!(t.watermark(&tp(0)), (run > 0).then_some(run));
        }
    }

    /// Ranges handed out with only some offsets open, those settled in
    /// any order: the watermark is always the first open offset not
    /// settled (or the end).
    #[test]
    fn open_offsets_hold_the_watermark_until_each_is_settled(
        sizes in prop::collection::vec(1i64..12, 1..8),
        open_mask in prop::collection::vec(any::<bool>(), 100),
        order in prop::collection::vec(any::<prop::sample::Index>(), 0..100),
    ) {
        let mut t = OffsetTracker::default();
        let g = t.assign(tp(0));
        let mut open: Vec<i64> = Vec::new();
        let mut offset = 0;
        for size in &sizes {
            let these: Vec<i64> = (offset..offset + size)
                .filter(|o| open_mask[*o as usize % open_mask.len()])
                .collect();
            t.handed_out_open(&tp(0), offset, offset + size, &these);
            open.extend(these);
            offset += size;
        }
        let mut unsettled: BTreeSet<i64> = open.iter().copied().collect();
        let expect = |unsettled: &BTreeSet<i64>| {
            let w = unsettled.first().copied().unwrap_or(offset);
            (w > 0).then_some(w)
        };
        prop_assert_eq!(t.watermark(&tp(0)), expect(&unsettled));
        for index in order {
            if open.is_empty() {
                break;
            }
            let o = open[index.index(open.len())];
            t.settle_records(&tp(0), g, [o]);
            unsettled.remove(&o);
            prop_assert_eq!(t.watermark(&tp(0)), expect(&unsettled));
            prop_assert_eq!(t.first_open(&tp(0)), unsettled.first().copied());
        }
    }

    /// Whatever order batches finish in, and whichever fail, the watermark
    /// never passes the first offset of a range that did not finish.
    #[test]
    fn the_watermark_never_passes_an_unfinished_range(
        sizes in prop::collection::vec(1i64..20, 1..30),
        order in prop::collection::vec(any::<prop::sample::Index>(), 0..60),
        failed in prop::collection::vec(any::<bool>(), 30),
    ) {
        let (mut t, g, ranges, offset) = handed_out_in_turn(&sizes);
        let mut finished = vec![false; ranges.len()];
        for index in order {
            let i = index.index(ranges.len());
            if failed[i] {
                continue;
            }
            t.finished(&tp(0), g, ranges[i].0);
            finished[i] = true;
            let first_unfinished = finished.iter().position(|f| !f).map(|i| ranges[i].0);
            let expected = match first_unfinished {
                Some(0) => None,
                Some(first) => Some(first),
                None => Some(offset),
            };
            prop_assert_eq!(t.watermark(&tp(0)), expected);
        }
    }
}

#[test]
fn what_is_stored_for_the_interval_commit_never_passes_an_open_record() {
    let tp = TopicPartition::new("t", 0);
    let mut tracker = OffsetTracker::default();
    let generation = tracker.assign(tp.clone());
    tracker.handed_out(&tp, 0, 10);
    tracker.handed_out(&tp, 10, 20);
    assert!(tracker.finished(&tp, generation, 10));
    assert_eq!(tracker.storable(), vec![], "0..10 is still open");
    assert!(tracker.finished(&tp, generation, 0));
    assert_eq!(tracker.storable(), vec![(tp.clone(), 20)]);
    tracker.stored(&tp, 20);
    assert_eq!(tracker.storable(), vec![], "stored once");
    // Stored is not committed: a revoke's commit still commits it.
    assert_eq!(tracker.committable(), vec![(tp.clone(), 20)]);
    tracker.committed(&tp, 20);
    assert_eq!(tracker.committable(), vec![]);

    tracker.handed_out(&tp, 20, 30);
    assert!(tracker.finished(&tp, generation, 20));
    // A commit made at once also counts as stored.
    tracker.committed(&tp, 30);
    assert_eq!(tracker.storable(), vec![]);

    // A new assignment starts with nothing stored.
    tracker.revoke(&tp);
    let generation = tracker.assign(tp.clone());
    tracker.handed_out(&tp, 30, 40);
    assert!(tracker.finished(&tp, generation, 30));
    assert_eq!(tracker.storable(), vec![(tp, 40)]);
}

#[test]
fn a_seek_forward_settles_what_it_skips_and_a_seek_back_never_moves_the_commit_back() {
    let mut t = OffsetTracker::default();
    let g = t.assign(tp(0));
    t.handed_out(&tp(0), 0, 10);
    t.handed_out(&tp(0), 10, 20);
    assert!(t.finished(&tp(0), g, 0));
    t.committed(&tp(0), 10);
    // Forward from the first record not dealt with (10): 40 skipped, and
    // the batch of 10..20 still in the handler is forgotten.
    let (g2, skipped) = t.seek(&tp(0), 50).expect("held");
    assert_eq!(skipped, Some(40));
    assert_ne!(g2, g);
    assert!(
        !t.finished(&tp(0), g, 10),
        "the old batch's result is dropped"
    );
    assert_eq!(t.committable(), vec![(tp(0), 50)]);
    t.committed(&tp(0), 50);
    // Back to 30: read again, nothing skipped, and no commit below 50.
    let (g3, skipped) = t.seek(&tp(0), 30).expect("held");
    assert_eq!(skipped, Some(0));
    assert_eq!(t.committable(), vec![]);
    t.handed_out(&tp(0), 30, 40);
    assert!(t.finished(&tp(0), g3, 30));
    assert_eq!(t.committable(), vec![], "40 is behind the commit at 50");
    t.handed_out(&tp(0), 40, 60);
    assert!(t.finished(&tp(0), g3, 40));
    assert_eq!(t.committable(), vec![(tp(0), 60)]);
    // Nothing known of a partition (just assigned): the seek's offset is
    // where it continues, and what a commit there would be.
    t.assign(tp(1));
    assert_eq!(t.seek(&tp(1), 7).map(|(_, s)| s), Some(None));
    assert_eq!(t.committable(), vec![(tp(0), 60), (tp(1), 7)]);
    assert_eq!(t.seek(&tp(2), 0), None, "a partition not held");
}

#[test]
fn a_seek_back_before_anything_was_read_keeps_the_groups_commit() {
    // Assigned with the group's commit at 122, nothing read yet (promise
    // seed 2259: a seek back to 72 was committed at shutdown, moving the
    // group's commit back by 50).
    let mut t = OffsetTracker::default();
    t.assign_at(tp(0), Some(122));
    let (g, skipped) = t.seek(&tp(0), 72).expect("held");
    assert_eq!(skipped, Some(0), "a seek back skips nothing");
    assert_eq!(
        t.committable(),
        vec![],
        "nothing to commit: 122 is the commit"
    );
    assert_eq!(t.storable(), vec![]);
    t.handed_out(&tp(0), 72, 100);
    assert!(t.finished(&tp(0), g, 72));
    assert_eq!(t.committable(), vec![], "100 is behind the group's commit");
    assert_eq!(t.storable(), vec![]);
    t.handed_out(&tp(0), 100, 130);
    assert!(t.finished(&tp(0), g, 100));
    assert_eq!(t.committable(), vec![(tp(0), 130)]);
    // Forward from the group's commit: what lies between is skipped.
    t.assign_at(tp(1), Some(10));
    assert_eq!(t.seek(&tp(1), 25).map(|(_, s)| s), Some(Some(15)));
    assert_eq!(t.committable(), vec![(tp(0), 130), (tp(1), 25)]);
}
