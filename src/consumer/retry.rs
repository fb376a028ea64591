//! Retries on the poller thread: records of the retry topic that are not
//! due yet, partitions sought back for a retry in place, their waits, and
//! the plans that say how a rewound partition's records are read again.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message as _, Offset, TopicPartitionList};

use super::batch::Seen;
use super::gaps::Expectation;
use super::policy::ChainState;
use super::rebalance::PollerContext;
use super::state::{PendingSeek, PollerState, Redelivery, Shared};
use crate::failure::record::read_headers;
use crate::failure::FailureInfo;
use crate::offsets::TopicPartition;

/// How long a seek back for a retry may take.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// How a record of the retry topic enters the batch: `None` when it is not
/// due yet. Then its partition is paused and sought back to it, to be resumed
/// when it is due; the consumer's other partitions keep flowing.
pub(super) fn retry_record(m: &BorrowedMessage<'_>, step: usize, shared: &Shared) -> Option<Seen> {
    let headers = read_headers(m);
    let info = FailureInfo::from_headers(
        headers
            .iter()
            .map(|h| (h.key.as_slice(), h.value.as_deref())),
    );
    if let Some(wait) = info.due_ms.and_then(super::runner::until_due) {
        let tp = TopicPartition::new(m.topic(), m.partition());
        let mut st = shared.lock();
        if let Some(generation) = st.tracker.generation(&tp) {
            tracing::debug!(partition = %tp, offset = m.offset(), wait_ms = wait.as_millis() as u64, "retry record not due yet: its partition waits");
            st.seeks.push(PendingSeek {
                tp,
                generation,
                offset: m.offset(),
                due: Instant::now() + wait,
            });
        }
        return None;
    }
    Some(Seen::New(ChainState {
        step,
        used: info.retries,
        attempts: info.attempts,
    }))
}

/// How a record of a rewound partition enters the batch, or `None` when its
/// partition is not being read again (any more).
pub(super) fn redelivered(
    redelivery: &mut Vec<(TopicPartition, Redelivery)>,
    m: &BorrowedMessage<'_>,
    shared: &Shared,
) -> Option<Seen> {
    let (topic, partition, offset) = (m.topic(), m.partition(), m.offset());
    let index = redelivery
        .iter()
        .position(|(tp, _)| tp.partition == partition && &*tp.topic == topic)?;
    let (tp, r) = &redelivery[index];
    let current = shared.lock().tracker.generation(tp) == Some(r.generation);
    if !current || offset >= r.until {
        redelivery.swap_remove(index);
        return None;
    }
    Some(match r.states.get(&offset) {
        Some(state) => Seen::New(*state),
        None => Seen::AlreadyHandled,
    })
}

/// Pauses each partition a retry asked for and seeks it back. A partition
/// whose seek fails keeps handing out nothing, and the seek is tried again.
pub(super) fn seek_back(consumer: &BaseConsumer<PollerContext>, st: &mut PollerState) {
    if st.seeks.is_empty() {
        return;
    }
    let seeks = std::mem::take(&mut st.seeks);
    for seek in seeks {
        if st.tracker.generation(&seek.tp) != Some(seek.generation) {
            continue; // revoked or rewound again since
        }
        let mut tpl = TopicPartitionList::with_capacity(1);
        tpl.add_partition(&seek.tp.topic, seek.tp.partition);
        // Pause first: pausing sets the fetch position to after the last
        // record read, and the seek then moves it back.
        let paused = consumer.pause(&tpl);
        let sought = paused.and_then(|()| {
            consumer.seek(
                &seek.tp.topic,
                seek.tp.partition,
                Offset::Offset(seek.offset),
                SEEK_TIMEOUT,
            )
        });
        match sought {
            Ok(()) => {
                tracing::debug!(partition = %seek.tp, offset = seek.offset, "partition sought back, paused until the retry is due");
                st.expectations.push(Expectation {
                    tp: seek.tp.clone(),
                    generation: seek.generation,
                    next: Some(seek.offset),
                });
                st.backoff.insert(seek.tp, seek.due);
            }
            Err(e) => {
                tracing::warn!(partition = %seek.tp, offset = seek.offset, error = %e, "cannot seek back for a retry; trying again");
                st.seeks.push(seek);
            }
        }
    }
}

/// Resumes the partitions whose retry is due (unless all are paused for
/// back-pressure: then they resume with the others).
pub(super) fn resume_due(consumer: &BaseConsumer<PollerContext>, st: &mut PollerState) {
    if st.backoff.is_empty() {
        return;
    }
    let now = Instant::now();
    let due: Vec<TopicPartition> = st
        .backoff
        .iter()
        .filter(|(_, at)| **at <= now)
        .map(|(tp, _)| tp.clone())
        .collect();
    for tp in due {
        if !st.paused {
            let mut tpl = TopicPartitionList::with_capacity(1);
            tpl.add_partition(&tp.topic, tp.partition);
            if let Err(e) = consumer.resume(&tpl) {
                tracing::warn!(partition = %tp, error = %e, "cannot resume a partition after its retry wait; trying again");
                continue;
            }
        }
        st.backoff.remove(&tp);
    }
}
