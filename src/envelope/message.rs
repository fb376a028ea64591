//! [`Message`], what a handler gets and gives: an id, a payload and the refs
//! it was derived from; where a consumed one was read from ([`Origin`]); and
//! latest-only selection within a batch.

use std::collections::HashSet;
use std::sync::Arc;

use super::{History, MessageId, Ref};

/// Where a consumed message was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Origin {
    /// The record's topic.
    pub topic: Arc<str>,
    /// The record's partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
    /// The assignment generation it was read under (0 outside a consumer),
    /// so that a manual commit settles this reading of the record and no
    /// later one.
    pub(crate) generation: crate::offsets::Generation,
    /// Times a handler failed this record before this delivery (from the
    /// failure chain: a retry in place, or the retry topic's headers).
    pub(crate) failed_attempts: u32,
}

/// One message: an id, a payload of the user's type, and where it came from.
///
/// A consumed message has one ref, the ref of its own record, so an output
/// built with [`Message::derive`] (or carrying the same `refs`) records that
/// it was derived from this input.
///
/// ```
/// use kafka_batch::Message;
/// use serde_json::json;
///
/// let input = Message::new("event-1", json!({"n": 1}));
/// let output = input.derive(json!({"n": 2}));
/// assert_eq!(output.id, "event-1");
/// assert_eq!(output.refs, input.refs);
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct Message<T = serde_json::Value> {
    /// The message id, written as the record key. An empty id is a null key.
    pub id: MessageId,
    /// The payload, written as the envelope's `item`.
    pub payload: T,
    /// The inputs this message was derived from; they become `hist.refs`.
    pub refs: Vec<Ref>,
    origin: Option<Origin>,
}

impl<T> Message<T> {
    /// A new message with no refs (an origin record).
    pub fn new(id: impl Into<MessageId>, payload: T) -> Self {
        Message {
            id: id.into(),
            payload,
            refs: Vec::new(),
            origin: None,
        }
    }

    /// Replaces the refs of this message.
    pub fn with_refs(mut self, refs: Vec<Ref>) -> Self {
        self.refs = refs;
        self
    }

    /// Adds the refs of `source` to this message's refs: this message was
    /// derived (at least in part) from `source`.
    pub fn derived_from<U>(mut self, source: &Message<U>) -> Self {
        self.refs.extend(source.refs.iter().cloned());
        self
    }

    /// A new message with the same id and refs and another payload: the usual
    /// way to turn an input into an output that records where it came from.
    pub fn derive<U>(&self, payload: U) -> Message<U> {
        Message {
            id: self.id.clone(),
            payload,
            refs: self.refs.clone(),
            origin: None,
        }
    }

    /// Turns the payload into another, keeping id and refs.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Message<U> {
        Message {
            id: self.id,
            payload: f(self.payload),
            refs: self.refs,
            origin: None,
        }
    }

    /// A consumed message with no id or refs yet: [`Message::set_source`]
    /// fills them in.
    pub(crate) fn consumed(
        payload: T,
        topic: &Arc<str>,
        partition: i32,
        offset: i64,
        generation: crate::offsets::Generation,
    ) -> Self {
        Message {
            id: MessageId::default(),
            payload,
            refs: Vec::new(),
            origin: Some(Origin {
                topic: Arc::clone(topic),
                partition,
                offset,
                generation,
                failed_attempts: 0,
            }),
        }
    }

    /// Records that a handler failed this consumed message `failed` times
    /// before this delivery.
    pub(crate) fn set_failed_attempts(&mut self, failed: u32) {
        if let Some(origin) = &mut self.origin {
            origin.failed_attempts = failed;
        }
    }

    /// Which delivery of its record this is: 1 the first time a handler
    /// gets it, 2 after one failure retried (in place or through the retry
    /// topic), and so on; 1 for a message built in code.
    ///
    /// Counted by the failure chain, so it survives a trip through the
    /// retry topic (its `kafka-batch-attempts` header). A record read again
    /// after a crash or a rebalance starts from what the chain last wrote:
    /// that delivery was not a failure the handler returned.
    pub fn attempt(&self) -> u32 {
        self.origin
            .as_ref()
            .map_or(1, |o| o.failed_attempts.saturating_add(1))
    }

    /// Sets a consumed message's id (the record key) and its one ref: the
    /// record's coordinates and the history it carried.
    pub(crate) fn set_source(&mut self, key: &str, hist: Option<History>) {
        let Some(origin) = &self.origin else {
            return;
        };
        // Two allocations: the id, which the ref's key shares, and the list.
        self.id = MessageId::from(key);
        self.refs = vec![Ref {
            topic: Arc::clone(&origin.topic),
            partition: origin.partition,
            offset: origin.offset,
            key: Some(self.id.clone()),
            hist,
        }];
    }

    /// Where this message was consumed from, or `None` for a message built in code.
    pub fn origin(&self) -> Option<&Origin> {
        self.origin.as_ref()
    }

    /// The ref of the record this message was consumed from (with the history
    /// that record carried), or `None` for a message built in code.
    pub fn source(&self) -> Option<&Ref> {
        let origin = self.origin.as_ref()?;
        self.refs.iter().find(|r| {
            r.partition == origin.partition
                && r.offset == origin.offset
                && *r.topic == *origin.topic
        })
    }
}

/// Keeps only the last message of each id, in the order of those last
/// messages: ids `a b x x a` become `b x a`.
pub fn latest_only<T>(messages: Vec<Message<T>>) -> Vec<Message<T>> {
    let mut seen: HashSet<&str> = HashSet::with_capacity(messages.len());
    let mut keep = vec![false; messages.len()];
    for (i, m) in messages.iter().enumerate().rev() {
        keep[i] = seen.insert(m.id.as_str());
    }
    messages
        .into_iter()
        .zip(keep)
        .filter_map(|(m, k)| k.then_some(m))
        .collect()
}
