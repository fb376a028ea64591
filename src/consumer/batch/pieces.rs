//! Batches split by key and put together again, for `ordering = "key"`.
//!
//! A batch cut from one partition is split into pieces, one per key (its
//! lane), each keeping its records in offset order. The scheduler then
//! merges pieces of free lanes into the batches it hands over, so records
//! of different keys of one partition run at once while each key's records
//! stay in order. Each piece carries the offsets it settles: a partition's
//! records of one handed-over batch are no longer a range.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use serde::de::DeserializeOwned;

use super::{Batch, BatchBuilder, BatchRange, Kept, Seen, Source};
use crate::consumer::policy::{Chain, ChainState};
use crate::consumer::state::Shared;
use crate::envelope::{DecodeError, RawRecord};
use crate::failure::record::KeptRecord;
use crate::offsets::{Generation, TopicPartition};

/// What must be handled in order: a partition's records of one key, or its
/// records without a usable key; a hash of the topic, the partition and
/// the key (two keys sharing one share a lane, which keeps each in order
/// and only runs them one after the other).
pub(crate) type LaneKey = u64;

/// Sets and maps of lanes: the key is a hash already, used as it is.
pub(crate) type LaneSet = std::collections::HashSet<LaneKey, PassHash>;
type LaneMap<V> = HashMap<LaneKey, V, PassHash>;

/// A hasher for keys that are hashes: it keeps the `u64` written to it.
#[derive(Clone, Copy, Default)]
pub(crate) struct PassHash;

impl std::hash::BuildHasher for PassHash {
    type Hasher = Pass;
    fn build_hasher(&self) -> Pass {
        Pass(0)
    }
}

pub(crate) struct Pass(u64);

impl Hasher for Pass {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only u64s are hashed here; anything else still hashes.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The lanes of a piece or of a batch merged from pieces, and the records
/// it settles when it finishes.
#[derive(Debug, Default)]
pub(crate) struct Keyed {
    pub lanes: Vec<LaneKey>,
    /// Per partition and generation, the offsets of its records.
    pub settle: Vec<(TopicPartition, Generation, Vec<i64>)>,
}

/// A cut batch's offsets as the tracker takes them: the range it read, and
/// the offsets in it still to be dealt with (sorted).
pub(crate) struct Read {
    pub tp: TopicPartition,
    pub generation: Generation,
    pub first: i64,
    pub end: i64,
    pub open: Vec<i64>,
}

/// The lane of a key of a partition (`None`: the keyless lane).
pub(crate) fn lane_of(tp: &TopicPartition, key: Option<&str>) -> LaneKey {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    tp.hash(&mut hasher);
    key.hash(&mut hasher);
    hasher.finish()
}

impl<T> Batch<T> {
    /// Splits a batch of one builder into one piece per lane, in the order
    /// their first records came; and says, per partition, what it read.
    ///
    /// The messages must carry their ids (a builder made [`keyed`]).
    /// Undecodable records bound for the dead-letter topic take their
    /// partition's keyless lane.
    ///
    /// [`keyed`]: super::BatchBuilder::keyed
    pub fn split_by_key(self) -> (Vec<(LaneKey, Batch<T>)>, Vec<Read>) {
        let mut reads = self
            .ranges
            .iter()
            .map(|r| Read {
                tp: r.tp.clone(),
                generation: r.generation,
                first: r.first,
                end: r.end,
                open: Vec::new(),
            })
            .collect::<Vec<_>>();
        let mut pieces: Vec<(LaneKey, Batch<T>)> = Vec::new();
        let mut index: LaneMap<usize> = LaneMap::default();
        let ranges = self.ranges;
        let range_of = |topic: &str, partition: i32| {
            ranges
                .iter()
                .position(|r| r.tp.partition == partition && &*r.tp.topic == topic)
        };
        let mut piece_for = |lane: LaneKey, range: usize, pieces: &mut Vec<(LaneKey, Batch<T>)>| {
            *index.entry(lane).or_insert_with(|| {
                let r = &ranges[range];
                let mut piece = Batch::empty(0, 0);
                piece.ranges.push(BatchRange {
                    tp: r.tp.clone(),
                    generation: r.generation,
                    first: i64::MAX,
                    end: i64::MIN,
                    records: 0,
                    subscribed: r.subscribed,
                });
                piece.keyed = Some(Keyed {
                    lanes: vec![lane],
                    settle: vec![(r.tp.clone(), r.generation, Vec::new())],
                });
                pieces.push((lane, piece));
                pieces.len() - 1
            })
        };
        let mut kept = self.kept.into_iter();
        for message in self.messages {
            let k: Option<Kept> = kept.next();
            let Some(range) = message
                .origin()
                .and_then(|o| range_of(&o.topic, o.partition))
            else {
                continue;
            };
            let offset = message.origin().map_or(0, |o| o.offset);
            let lane = lane_of(&ranges[range].tp, Some(&message.id));
            let i = piece_for(lane, range, &mut pieces);
            let piece = &mut pieces[i].1;
            note(piece, offset);
            reads[range].open.push(offset);
            piece.messages.push(message);
            if let Some(k) = k {
                piece.kept.push(k);
            }
        }
        for rejected in self.rejected {
            let Some(range) = range_of(&rejected.error.topic, rejected.error.partition) else {
                continue;
            };
            let offset = rejected.error.offset;
            let lane = lane_of(&ranges[range].tp, None);
            let i = piece_for(lane, range, &mut pieces);
            let piece = &mut pieces[i].1;
            note(piece, offset);
            reads[range].open.push(offset);
            piece.rejected.push(rejected);
        }
        for read in &mut reads {
            read.open.sort_unstable();
        }
        (pieces, reads)
    }

    /// Appends `piece`'s records (a later piece: each lane's records stay
    /// in the order they were added).
    pub fn merge(&mut self, piece: Batch<T>) {
        self.messages.extend(piece.messages);
        self.kept.extend(piece.kept);
        self.rejected.extend(piece.rejected);
        self.ranges.extend(piece.ranges);
        if let Some(theirs) = piece.keyed {
            let ours = self.keyed.get_or_insert_with(Keyed::default);
            ours.lanes.extend(theirs.lanes);
            for (tp, generation, offsets) in theirs.settle {
                match ours
                    .settle
                    .iter_mut()
                    .find(|(t, g, _)| *t == tp && *g == generation)
                {
                    Some((_, _, known)) => known.extend(offsets),
                    None => ours.settle.push((tp, generation, offsets)),
                }
            }
        }
    }

    /// The messages it holds.
    pub fn message_count(&self) -> usize {
        self.messages.len()
    }
}

/// Counts one record of `offset` into the piece's range and settle list.
fn note<T>(piece: &mut Batch<T>, offset: i64) {
    if let Some(r) = piece.ranges.first_mut() {
        r.first = r.first.min(offset);
        r.end = r.end.max(offset + 1);
        r.records += 1;
    }
    if let Some((_, _, offsets)) = piece.keyed.as_mut().and_then(|k| k.settle.first_mut()) {
        offsets.push(offset);
    }
}

impl<T: DeserializeOwned> BatchBuilder<T> {
    /// For `ordering = "key"`: messages carry their ids from the start (the
    /// scheduler splits batches by them), and with a retry in place the
    /// records are kept, to be delivered again from memory: a partition is
    /// never sought back for one key.
    pub fn keyed(mut self, chain: &Chain) -> Self {
        self.defer = false;
        self.keep_records |= chain
            .step_of(crate::settings::FailurePolicy::Retry)
            .is_some();
        self
    }

    /// Adds a record kept from an earlier delivery (see [`BatchBuilder::keyed`]),
    /// as read under `generation`, with its standing in the chain.
    pub fn push_kept(
        &mut self,
        kept: &KeptRecord,
        state: ChainState,
        generation: Generation,
        shared: &Shared,
    ) -> Result<(), DecodeError> {
        let record = RawRecord {
            topic: &kept.topic,
            partition: kept.partition,
            offset: kept.offset,
            key: kept.key.as_deref(),
            value: kept.value.as_deref(),
        };
        self.push(
            record,
            Seen::New(state),
            Some(Source::Kept(kept)),
            |_| Some(generation),
            shared,
        )
    }
}
