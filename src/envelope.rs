//! The envelope wire format shared with the PredictHQ Python wrapper.
//!
//! This module knows JSON and nothing of Kafka clients: it turns a record's key
//! and value into a [`Message`] and back, exactly as `WIRE.md` describes.
//!
//! ```json
//! { "item": <payload>,
//!   "hist": { "svc": "producer", "dt": "2026-11-22T09:34:06.123456+00:00",
//!             "refs": [ { "topic": "in", "partition": 3, "offset": 1042,
//!                         "key": "id", "hist": { ... } } ] } }
//! ```
//!
//! Everything here is pure and cheap to test: packing, unpacking with the
//! long-history guard, the batch-ref text used in logs, latest-only selection
//! and stage latencies computed from a history.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use serde::de::{
    self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde::Serialize;
use serde_json::value::RawValue;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub use id::MessageId;
use scan::Field;

/// A history nested this many levels deep (the top `hist` is level 1) is cut.
pub const MAX_HIST_DEPTH: u32 = 100;

/// Where a message came from: a consumed record's coordinates and the history
/// that record carried.
///
/// Refs form the provenance tree of a record: when a service produces an
/// output from some inputs, the inputs' refs become the output's `hist.refs`.
///
/// ```
/// use kafka_batch::{Hist, Ref};
///
/// let input = Ref {
///     topic: "events".into(),
///     partition: 3,
///     offset: 1042,
///     key: Some("evt-1".into()),
///     hist: Some(Hist { svc: "loader".into(), dt: "2026-11-22T09:34:06+00:00".into(), refs: vec![] }.into()),
/// };
/// assert_eq!(input.to_string(), "events:3:1042:evt-1");
/// assert_eq!(input.hist.as_ref().map(|h| h.depth()), Some(1));
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ref {
    /// Topic of the consumed record (shared by the refs of one partition).
    pub topic: Arc<str>,
    /// Partition of the consumed record.
    pub partition: i32,
    /// Offset of the consumed record.
    pub offset: i64,
    /// Key (message id) of the consumed record.
    pub key: Option<MessageId>,
    /// The `hist` the consumed record carried, or `None`.
    pub hist: Option<History>,
}

impl fmt::Display for Ref {
    /// `topic:partition:offset:key`, the form the Python wrapper logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}:{}",
            self.topic,
            self.partition,
            self.offset,
            self.key.as_deref().unwrap_or("")
        )
    }
}

/// The history written into every produced record: which service packed it,
/// when, and which inputs it was derived from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hist {
    /// Name of the service that produced the record.
    pub svc: String,
    /// RFC 3339 time the record was packed, kept as written.
    pub dt: String,
    /// The inputs this record was derived from.
    pub refs: Vec<Ref>,
}

impl Hist {
    /// How many `hist` levels this history nests (itself being level 1).
    pub fn depth(&self) -> u32 {
        // Iterative so that a deep (user-built) history cannot overflow the stack.
        let mut deepest = 0;
        let mut stack: Vec<(&Hist, u32)> = vec![(self, 1)];
        while let Some((hist, depth)) = stack.pop() {
            deepest = deepest.max(depth);
            for r in &hist.refs {
                if let Some(h) = &r.hist {
                    stack.push((h.get(), depth + 1));
                }
            }
        }
        deepest
    }
}

/// A ref's history. One read from a record is kept as the JSON it was
/// written as, checked against the long-history guard, and parsed into a
/// [`Hist`] only when first looked at; packing a message derived from it
/// writes that JSON back unchanged, without parsing it. It dereferences to
/// [`Hist`].
///
/// ```
/// use kafka_batch::envelope::History;
/// use kafka_batch::Hist;
///
/// let history = History::from(Hist { svc: "loader".into(), dt: "2026-11-22T09:34:06+00:00".into(), refs: vec![] });
/// assert_eq!(history.svc, "loader");
/// assert_eq!(history.depth(), 1);
/// ```
#[derive(Clone)]
pub struct History(Arc<HistoryInner>);

struct HistoryInner {
    /// The JSON as read, already checked (by the fast path's scan or by
    /// [`check_hist`]); `None` when built in code.
    raw: Option<Box<RawValue>>,
    parsed: std::sync::OnceLock<Hist>,
}

impl History {
    /// A history built in code.
    pub fn new(hist: Hist) -> History {
        History(Arc::new(HistoryInner {
            raw: None,
            parsed: std::sync::OnceLock::from(hist),
        }))
    }

    /// A history read from a record, which [`check_hist`] accepted.
    fn from_checked(raw: &RawValue) -> History {
        History(Arc::new(HistoryInner {
            raw: Some(raw.to_owned()),
            parsed: std::sync::OnceLock::new(),
        }))
    }

    /// A history read from a record by the fast path, whose scan accepted
    /// it: JSON (`scan` checks the grammar, `fast` the UTF-8) that
    /// [`check_hist`] accepts.
    fn from_scanned(text: &str) -> History {
        // SAFETY: `from_string_unchecked` needs one well-formed JSON value
        // with no whitespace around it. The fast path hands over only text
        // that `Scan::hist` accepted from its first byte to its last: an
        // object whose every byte it checked against the JSON grammar
        // (strings without control characters and with valid escapes only,
        // exact numbers and literals, balanced containers), that
        // `std::str::from_utf8` accepted, and that starts and ends where
        // that value does. (Text the fast path matched byte for byte to the
        // last history accepted never gets here: that history is shared.)
        // Debug builds (so every test) re-parse it to check.
        let raw = unsafe { RawValue::from_string_unchecked(text.to_owned()) };
        History(Arc::new(HistoryInner {
            raw: Some(raw),
            parsed: std::sync::OnceLock::new(),
        }))
    }

    /// The history, parsed on first use.
    pub fn get(&self) -> &Hist {
        self.0.parsed.get_or_init(|| match &self.0.raw {
            Some(raw) => match parse_hist(raw) {
                Ok(Some(hist)) => hist,
                // check_hist accepted this JSON with the same grammar, so this
                // cannot happen; an empty history is the safe answer if it did.
                other => {
                    tracing::error!(result = ?other.err(), "a checked history failed to parse; this is a bug, please report it");
                    Hist {
                        svc: String::new(),
                        dt: String::new(),
                        refs: Vec::new(),
                    }
                }
            },
            None => Hist {
                svc: String::new(),
                dt: String::new(),
                refs: Vec::new(),
            },
        })
    }

    /// The JSON this history was read as, or `None` for one built in code.
    pub fn raw_json(&self) -> Option<&str> {
        self.0.raw.as_deref().map(RawValue::get)
    }
}

impl std::ops::Deref for History {
    type Target = Hist;

    fn deref(&self) -> &Hist {
        self.get()
    }
}

impl From<Hist> for History {
    fn from(hist: Hist) -> History {
        History::new(hist)
    }
}

impl From<Box<Hist>> for History {
    fn from(hist: Box<Hist>) -> History {
        History::new(*hist)
    }
}

impl PartialEq for History {
    fn eq(&self, other: &History) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.get() == other.get()
    }
}

impl Eq for History {}

impl fmt::Debug for History {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.get().fmt(f)
    }
}

impl Serialize for History {
    /// Writes the JSON as it was read (unchanged, unparsed), or the history built in code.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match (&self.0.raw, self.0.parsed.get()) {
            (Some(raw), _) => raw.serialize(s),
            (None, Some(hist)) => hist.serialize(s),
            (None, None) => self.get().serialize(s),
        }
    }
}

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
            }),
        }
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

/// Why a record could not be turned into a [`Message`].
#[derive(Debug, thiserror::Error)]
pub enum DecodeErrorKind {
    /// The record has no key, so it has no message id.
    #[error(
        "the record key is null: every message needs an id (the producer writes it as the key)"
    )]
    NullKey,
    /// The key bytes are not UTF-8 text.
    #[error("the record key is not UTF-8 text")]
    KeyNotUtf8,
    /// The value is not JSON at all.
    #[error("the record value is not JSON ({0})")]
    NotJson(serde_json::Error),
    /// The value is JSON but not an envelope (`{"item": ..., "hist": ...}`).
    #[error(
        "the record value is not an envelope: expected a JSON object with an `item` field ({0})"
    )]
    NotEnvelope(String),
    /// The envelope's `item` does not fit the handler's payload type.
    #[error("the payload does not match the handler's payload type ({0})")]
    Payload(serde_json::Error),
}

/// A record that could not be decoded, with its coordinates.
#[derive(Debug, thiserror::Error)]
#[error("cannot decode record {topic}:{partition}:{offset}: {kind}")]
pub struct DecodeError {
    /// The record's topic.
    pub topic: String,
    /// The record's partition.
    pub partition: i32,
    /// The record's offset.
    pub offset: i64,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

/// A Kafka record as the decoder sees it: coordinates, key and value bytes.
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    /// Topic the record was read from.
    pub topic: &'a str,
    /// Partition the record was read from.
    pub partition: i32,
    /// Offset of the record.
    pub offset: i64,
    /// Key bytes, `None` for a null key.
    pub key: Option<&'a [u8]>,
    /// Value bytes, `None` for a null value.
    pub value: Option<&'a [u8]>,
}

/// Unpacks a record into a message.
///
/// Returns `Ok(None)` for a tombstone (null or empty value), which is skipped,
/// never an error. `topic` is shared between the messages of one partition to
/// save an allocation per message.
pub fn unpack<T: DeserializeOwned>(
    record: RawRecord<'_>,
    topic: &Arc<str>,
) -> Result<Option<Message<T>>, DecodeError> {
    unpack_sharing(record, topic, &mut LastHistory::default())
}

/// The history of the last record unpacked, for the next to share.
///
/// A producer's batch of records usually carries one history (same service,
/// same packing time, and for origin records no refs), and consecutive
/// records of a partition come from the same batch. A record whose `hist` is
/// byte for byte the last one's shares its [`History`]: no copy, and no
/// second run of the long-history check, whose answer could only be the same.
#[derive(Default)]
pub(crate) struct LastHistory(Option<History>);

/// [`unpack`], sharing the history with the previous record when it is the same.
pub(crate) fn unpack_sharing<T: DeserializeOwned>(
    record: RawRecord<'_>,
    topic: &Arc<str>,
    last: &mut LastHistory,
) -> Result<Option<Message<T>>, DecodeError> {
    let Some(parts) = unpack_parts(record, last)? else {
        return Ok(None);
    };
    let mut message = Message::consumed(parts.payload, topic, record.partition, record.offset, 0);
    message.set_source(parts.key, parts.hist);
    Ok(Some(message))
}

/// A decoded record before it becomes a [`Message`]: what the message is
/// made of that is not in the record's coordinates.
pub(crate) struct Unpacked<'a, T> {
    /// The key, the message id.
    pub key: &'a str,
    /// The decoded `item`.
    pub payload: T,
    /// The checked `hist`, or `None` (missing, null, or cut by the guard).
    pub hist: Option<History>,
}

/// Decodes a record (as [`unpack`]) without building the message, so the
/// caller chooses where its id and ref are allocated.
pub(crate) fn unpack_parts<'a, T: DeserializeOwned>(
    record: RawRecord<'a>,
    last: &mut LastHistory,
) -> Result<Option<Unpacked<'a, T>>, DecodeError> {
    unpack_parts_by(record, last, Path::Fast)
}

/// How [`unpack_parts_by`] reads an envelope.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Path {
    /// The one-pass fast path, then the full path when it does not know.
    Fast,
    /// The full path only: what the fast path must agree with (tests).
    #[cfg(test)]
    Full,
}

/// [`unpack_parts`], reading the envelope by `path`.
fn unpack_parts_by<'a, T: DeserializeOwned>(
    record: RawRecord<'a>,
    last: &mut LastHistory,
    path: Path,
) -> Result<Option<Unpacked<'a, T>>, DecodeError> {
    let value = match record.value {
        None => return Ok(None),
        Some([]) => return Ok(None),
        Some(v) => v,
    };
    let fail = |kind| DecodeError {
        topic: record.topic.to_owned(),
        partition: record.partition,
        offset: record.offset,
        kind,
    };
    let key = match record.key {
        None => return Err(fail(DecodeErrorKind::NullKey)),
        Some(k) => std::str::from_utf8(k).map_err(|_| fail(DecodeErrorKind::KeyNotUtf8))?,
    };
    let last_text = last.0.as_ref().and_then(History::raw_json);
    let (payload, raw_hist) = decode_envelope::<T>(value, last_text, path).map_err(fail)?;
    let hist = match raw_hist {
        None => None,
        // The Python wrapper treats an empty history as none (it is falsy).
        Some(raw) if is_empty_object(raw.text()) => None,
        Some(raw) => match &last.0 {
            Some(h) if h.raw_json() == Some(raw.text()) => Some(h.clone()),
            _ => match raw.check() {
                Ok(h) => {
                    last.0 = Some(h.clone());
                    Some(h)
                }
                Err(reason) => {
                    tracing::warn!(
                        record = %format_args!("{}:{}:{}:{}", record.topic, record.partition, record.offset, key),
                        %reason,
                        "message history dropped, the item is still delivered"
                    );
                    None
                }
            },
        },
    };
    Ok(Some(Unpacked { key, payload, hist }))
}

/// True for `{}`, with any JSON white space inside: an empty history,
/// which is read as no history wherever a history is read, as the Python
/// wrapper reads it (an empty dict is falsy there).
fn is_empty_object(text: &str) -> bool {
    text.strip_prefix('{')
        .and_then(|t| t.strip_suffix('}'))
        .is_some_and(|inside| {
            inside
                .trim_matches(|c| matches!(c, ' ' | '\t' | '\n' | '\r'))
                .is_empty()
        })
}

/// A record's `hist` text, before it becomes a [`History`].
enum RawHist<'a> {
    /// Found by the fast path: its scan checked it, or it is byte for byte
    /// the last history accepted.
    Checked(&'a str),
    /// Captured by serde_json, still to be checked.
    Unchecked(&'a RawValue),
}

impl<'a> RawHist<'a> {
    /// The JSON text, as written in the record.
    fn text(&self) -> &'a str {
        match self {
            RawHist::Checked(text) => text,
            RawHist::Unchecked(raw) => raw.get(),
        }
    }

    /// The history, or why it is dropped.
    fn check(self) -> Result<History, HistDropped> {
        match self {
            RawHist::Checked(text) => Ok(History::from_scanned(text)),
            RawHist::Unchecked(raw) => check_hist(raw).map(|()| History::from_checked(raw)),
        }
    }
}

/// The envelope's payload and history text: by the fast path when it
/// knows, else by the full path, which alone reports errors.
fn decode_envelope<'a, T: DeserializeOwned>(
    value: &'a [u8],
    last: Option<&str>,
    path: Path,
) -> Result<(T, Option<RawHist<'a>>), DecodeErrorKind> {
    if path == Path::Fast {
        if let Some(parts) = fast::envelope::<T>(value, last) {
            return Ok(parts);
        }
    }
    let (payload, hist) = parse_envelope::<T>(value)?;
    Ok((payload, hist.map(RawHist::Unchecked)))
}

/// The full path: parses the envelope in one pass, the item straight into
/// `T`, the history kept as raw text for the depth-guarded second parse.
/// Every error a record can have is reported from here.
fn parse_envelope<T: DeserializeOwned>(
    value: &[u8],
) -> Result<(T, Option<&RawValue>), DecodeErrorKind> {
    let in_item = std::cell::Cell::new(false);
    let mut de = serde_json::Deserializer::from_slice(value);
    let parsed = EnvelopeSeed::<T> {
        in_item: &in_item,
        marker: std::marker::PhantomData,
    }
    .deserialize(&mut de)
    .and_then(|parsed| de.end().map(|()| parsed));
    parsed.map_err(|e| match e.classify() {
        serde_json::error::Category::Data if in_item.get() => DecodeErrorKind::Payload(e),
        serde_json::error::Category::Data => DecodeErrorKind::NotEnvelope(e.to_string()),
        _ => DecodeErrorKind::NotJson(e),
    })
}

struct EnvelopeSeed<'c, T> {
    in_item: &'c std::cell::Cell<bool>,
    marker: std::marker::PhantomData<T>,
}

impl<'de, T: DeserializeOwned> DeserializeSeed<'de> for EnvelopeSeed<'_, T> {
    type Value = (T, Option<&'de RawValue>);

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de, T: DeserializeOwned> Visitor<'de> for EnvelopeSeed<'_, T> {
    type Value = (T, Option<&'de RawValue>);

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object with an `item` field")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut item: Option<T> = None;
        let mut hist: Option<&'de RawValue> = None;
        // Field names are compared in place: no allocation per record.
        while let Some(Key(key)) = map.next_key()? {
            match key {
                Field::Item => {
                    if item.is_some() {
                        return Err(de::Error::duplicate_field("item"));
                    }
                    self.in_item.set(true);
                    item = Some(map.next_value()?);
                    self.in_item.set(false);
                }
                Field::Hist => {
                    let raw: &'de RawValue = map.next_value()?;
                    hist = (raw.get() != "null").then_some(raw);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        match item {
            Some(item) => Ok((item, hist)),
            None => Err(de::Error::missing_field("item")),
        }
    }
}

/// Why a history was dropped on input.
#[derive(Debug, thiserror::Error)]
enum HistDropped {
    #[error("the history nests {MAX_HIST_DEPTH} levels deep or more")]
    TooDeep,
    #[error("a `refs` field is a single object instead of a list (legacy data)")]
    LegacyRefs,
    #[error("the history is malformed: {0}")]
    Malformed(String),
}

const TOO_DEEP: &str = "kafka-batch: history too deep";
const LEGACY_REFS: &str = "kafka-batch: refs is an object";

/// Parses a `hist` value with the long-history guard.
///
/// serde_json's own recursion limit (128) would stop far short of the 100
/// `hist` levels the format allows (each level nests three JSON levels), so it
/// is switched off here and replaced by our own depth count, which bounds the
/// recursion just as well. Unknown fields are skipped by serde_json's
/// iterative skipper, so no input can recurse without bound.
fn parse_hist(raw: &RawValue) -> Result<Option<Hist>, HistDropped> {
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.disable_recursion_limit();
    let parsed = HistSeed { depth: 1 }
        .deserialize(&mut de)
        .and_then(|h| de.end().map(|()| h));
    parsed.map_err(|e| {
        let text = e.to_string();
        if text.starts_with(TOO_DEEP) {
            HistDropped::TooDeep
        } else if text.starts_with(LEGACY_REFS) {
            HistDropped::LegacyRefs
        } else {
            HistDropped::Malformed(text)
        }
    })
}

struct HistSeed {
    depth: u32,
}

impl<'de> DeserializeSeed<'de> for HistSeed {
    type Value = Option<Hist>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for HistSeed {
    type Value = Option<Hist>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a history object or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        if self.depth >= MAX_HIST_DEPTH {
            return Err(de::Error::custom(TOO_DEEP));
        }
        let mut hist = Hist {
            svc: String::new(),
            dt: String::new(),
            refs: Vec::new(),
        };
        let mut fields = 0;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            fields += 1;
            match key.as_ref() {
                "svc" => hist.svc = map.next_value::<Option<String>>()?.unwrap_or_default(),
                "dt" => hist.dt = map.next_value::<Option<String>>()?.unwrap_or_default(),
                "refs" => hist.refs = map.next_value_seed(RefsSeed { depth: self.depth })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        // `{}` is no history, as the Python wrapper reads it.
        Ok((fields > 0).then_some(hist))
    }
}

struct RefsSeed {
    depth: u32,
}

impl<'de> DeserializeSeed<'de> for RefsSeed {
    type Value = Vec<Ref>;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for RefsSeed {
    type Value = Vec<Ref>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of refs")
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Vec::new())
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<Self::Value, A::Error> {
        Err(de::Error::custom(LEGACY_REFS))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut refs = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(64));
        while let Some(r) = seq.next_element_seed(RefSeed { depth: self.depth })? {
            refs.push(r);
        }
        Ok(refs)
    }
}

struct RefSeed {
    depth: u32,
}

impl<'de> DeserializeSeed<'de> for RefSeed {
    type Value = Ref;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for RefSeed {
    type Value = Ref;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a ref object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut r = Ref {
            topic: Arc::from(""),
            partition: 0,
            offset: 0,
            key: None,
            hist: None,
        };
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            match key.as_ref() {
                "topic" => {
                    r.topic = map
                        .next_value::<Option<String>>()?
                        .map_or_else(|| Arc::from(""), Arc::from)
                }
                "partition" => r.partition = map.next_value()?,
                "offset" => r.offset = map.next_value()?,
                "key" => r.key = map.next_value()?,
                "hist" => {
                    r.hist = map
                        .next_value_seed(HistSeed {
                            depth: self.depth + 1,
                        })?
                        .map(History::new)
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(r)
    }
}

/// Checks a `hist` value against the long-history guard and the history
/// grammar without building it: the same grammar as [`parse_hist`] (so a
/// checked history always parses), with no allocation but for escaped
/// strings. Consuming a record costs this check; the history is built only
/// when someone looks at it.
fn check_hist(raw: &RawValue) -> Result<(), HistDropped> {
    if scan::plainly_valid(raw.get().as_bytes()) {
        return Ok(());
    }
    let mut de = serde_json::Deserializer::from_str(raw.get());
    de.disable_recursion_limit();
    let checked = CheckHist { depth: 1 }
        .deserialize(&mut de)
        .and_then(|()| de.end());
    checked.map_err(|e| {
        let text = e.to_string();
        if text.starts_with(TOO_DEEP) {
            HistDropped::TooDeep
        } else if text.starts_with(LEGACY_REFS) {
            HistDropped::LegacyRefs
        } else {
            HistDropped::Malformed(text)
        }
    })
}

/// A string (or, with `Option`, null), borrowed or escaped, not kept.
struct AnyStr;

impl<'de> de::Deserialize<'de> for AnyStr {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<AnyStr, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = AnyStr;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<AnyStr, E> {
                Ok(AnyStr)
            }
        }
        d.deserialize_str(V)
    }
}

/// A map key compared in place (escaped keys are unescaped into a scratch copy).
struct Key(Field);

impl<'de> de::Deserialize<'de> for Key {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Key, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(match v {
                    "item" => Field::Item,
                    "svc" => Field::Svc,
                    "dt" => Field::Dt,
                    "refs" => Field::Refs,
                    "topic" => Field::Topic,
                    "partition" => Field::Partition,
                    "offset" => Field::Offset,
                    "key" => Field::Key,
                    "hist" => Field::Hist,
                    _ => Field::Other,
                }))
            }
        }
        d.deserialize_str(V)
    }
}

/// [`HistSeed`]'s grammar, checked: a history object or null.
struct CheckHist {
    depth: u32,
}

impl<'de> DeserializeSeed<'de> for CheckHist {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_option(self)
    }
}

impl<'de> Visitor<'de> for CheckHist {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a history object or null")
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if self.depth >= MAX_HIST_DEPTH {
            return Err(de::Error::custom(TOO_DEEP));
        }
        while let Some(Key(key)) = map.next_key()? {
            match key {
                Field::Svc | Field::Dt => {
                    map.next_value::<Option<AnyStr>>()?;
                }
                Field::Refs => map.next_value_seed(CheckRefs { depth: self.depth })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// [`RefsSeed`]'s grammar, checked.
struct CheckRefs {
    depth: u32,
}

impl<'de> DeserializeSeed<'de> for CheckRefs {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for CheckRefs {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a list of refs")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, _map: A) -> Result<(), A::Error> {
        Err(de::Error::custom(LEGACY_REFS))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq
            .next_element_seed(CheckRef { depth: self.depth })?
            .is_some()
        {}
        Ok(())
    }
}

/// [`RefSeed`]'s grammar, checked.
struct CheckRef {
    depth: u32,
}

impl<'de> DeserializeSeed<'de> for CheckRef {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for CheckRef {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a ref object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(Key(key)) = map.next_key()? {
            match key {
                Field::Topic | Field::Key => {
                    map.next_value::<Option<AnyStr>>()?;
                }
                Field::Partition => {
                    map.next_value::<i32>()?;
                }
                Field::Offset => {
                    map.next_value::<i64>()?;
                }
                Field::Hist => map.next_value_seed(CheckHist {
                    depth: self.depth + 1,
                })?,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// The time format kafka-batch writes into `hist.dt`: UTC, microseconds, `+00:00`.
pub fn format_dt(at: OffsetDateTime) -> String {
    let at = at.to_offset(time::UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}+00:00",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.microsecond()
    )
}

/// Parses a `hist.dt` as the Python wrapper accepts it (`Z` or a numeric
/// offset, with or without fractional seconds).
pub fn parse_dt(dt: &str) -> Result<OffsetDateTime, time::error::Parse> {
    OffsetDateTime::parse(dt, &Rfc3339)
}

/// Packs a message into a record value: `{"item": ..., "hist": {svc, dt, refs}}`.
///
/// `dt` is the packing time as [`format_dt`] writes it; a batch shares one.
pub fn pack<T: Serialize>(
    svc: &str,
    dt: &str,
    message: &Message<T>,
) -> Result<Vec<u8>, serde_json::Error> {
    let mut out = Vec::with_capacity(128);
    pack_into(&mut out, svc, dt, message)?;
    Ok(out)
}

/// Like [`pack`], appending to a buffer the caller reuses.
pub fn pack_into<T: Serialize>(
    out: &mut Vec<u8>,
    svc: &str,
    dt: &str,
    message: &Message<T>,
) -> Result<(), serde_json::Error> {
    #[derive(Serialize)]
    struct HistOut<'a> {
        svc: &'a str,
        dt: &'a str,
        refs: &'a [Ref],
    }
    #[derive(Serialize)]
    struct EnvelopeOut<'a, T> {
        item: &'a T,
        hist: HistOut<'a>,
    }
    serde_json::to_writer(
        out,
        &EnvelopeOut {
            item: &message.payload,
            hist: HistOut {
                svc,
                dt,
                refs: &message.refs,
            },
        },
    )
}

/// The record key for a message id: an empty id is a null key.
pub fn key_of(id: &str) -> Option<&[u8]> {
    (!id.is_empty()).then_some(id.as_bytes())
}

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

/// How long each service stage took, from a consumed message's history.
#[derive(Clone, Debug, PartialEq)]
pub struct StageLatencies {
    /// Each stage after the origin, in order, with its length in seconds.
    pub stages: Vec<(String, f64)>,
    /// Seconds from the origin's finish to now.
    pub total_seconds: f64,
}

/// A history time that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("history of service {svc:?} has a `dt` that is not RFC 3339: {dt:?}")]
pub struct LatencyError {
    /// The service whose history entry was bad.
    pub svc: String,
    /// The text found.
    pub dt: String,
}

/// Stage latencies from a consumed message's ref, as `WIRE.md` defines them
/// and as the Python wrapper's `calc_ref_latencies` computes them.
///
/// The chain follows, at each level, the ref whose `hist.dt` is newest (the
/// last of equals); consecutive entries of one service merge into one stage;
/// `this_svc` is appended with `now`. With `target`, timing starts at the
/// service before the target; a chain that never passes the target gives no
/// stages and a total of 0. A history that is null, missing or `{}` is no
/// history: as a ref's branch it is passed over, as the top history it gives
/// no stages and a total of 0.
///
/// The wrapper picks the newest branch by sorting `dt` as text; this
/// compares the times. For the `+00:00` forms both sides write, whole
/// seconds (Python) or microseconds (kafka-batch), the two agree.
///
/// ```
/// use kafka_batch::envelope::{stage_latencies, unpack};
/// use std::sync::Arc;
/// use time::{format_description::well_known::Rfc3339, OffsetDateTime};
///
/// // A record packed by "enricher" from one that "loader" packed 2 s before.
/// let value = br#"{"item": 1, "hist": {"svc": "enricher", "dt": "2026-11-22T09:00:02+00:00",
///   "refs": [{"topic": "raw", "partition": 0, "offset": 7, "key": "a",
///             "hist": {"svc": "loader", "dt": "2026-11-22T09:00:00+00:00", "refs": []}},
///            {"topic": "raw", "partition": 1, "offset": 9, "key": "b", "hist": {}}]}}"#;
/// let record = kafka_batch::envelope::RawRecord {
///     topic: "enriched", partition: 0, offset: 3, key: Some(b"a"), value: Some(value),
/// };
/// let message = unpack::<serde_json::Value>(record, &Arc::from("enriched"))?.expect("not a tombstone");
/// let source = message.source().expect("a consumed message has its ref");
/// let now = OffsetDateTime::parse("2026-11-22T09:00:05+00:00", &Rfc3339)?;
/// let latencies = stage_latencies("writer", source, None, now)?;
/// // The `{}` branch is passed over: loader is the origin.
/// assert_eq!(latencies.stages, [("enricher".to_string(), 2.0), ("writer".to_string(), 3.0)]);
/// assert_eq!(latencies.total_seconds, 5.0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn stage_latencies(
    this_svc: &str,
    source: &Ref,
    target: Option<&str>,
    now: OffsetDateTime,
) -> Result<StageLatencies, LatencyError> {
    let none = StageLatencies {
        stages: Vec::new(),
        total_seconds: 0.0,
    };
    let Some(mut hist) = source.hist.as_deref() else {
        return Ok(none);
    };
    let parse = |h: &Hist| {
        parse_dt(&h.dt).map_err(|_| LatencyError {
            svc: h.svc.clone(),
            dt: h.dt.clone(),
        })
    };
    // Walk back from the newest record to the origin.
    let mut timings: Vec<(&str, OffsetDateTime)> = Vec::new();
    loop {
        timings.push((&hist.svc, parse(hist)?));
        let mut previous: Option<(&Hist, OffsetDateTime)> = None;
        for h in hist.refs.iter().filter_map(|r| r.hist.as_deref()) {
            let dt = parse(h)?;
            if previous.is_none_or(|(_, best)| dt >= best) {
                previous = Some((h, dt));
            }
        }
        match previous {
            Some((h, _)) => hist = h,
            None => break,
        }
    }
    timings.reverse();
    if let Some(target) = target {
        match timings.iter().position(|(svc, _)| *svc == target) {
            None => return Ok(none),
            Some(0) => {}
            Some(i) => {
                timings.drain(..i - 1);
            }
        }
    }
    timings.push((this_svc, now));
    let seconds = |from: OffsetDateTime, to: OffsetDateTime| (to - from).as_seconds_f64();
    let (_, origin_end) = timings[0];
    let mut stages = Vec::new();
    let mut start = origin_end;
    let (mut svc, mut end) = timings[1];
    for &(next_svc, next_end) in &timings[2..] {
        if next_svc == svc {
            end = next_end;
        } else {
            stages.push((svc.to_owned(), seconds(start, end)));
            svc = next_svc;
            start = end;
            end = next_end;
        }
    }
    stages.push((svc.to_owned(), seconds(start, end)));
    Ok(StageLatencies {
        stages,
        total_seconds: seconds(origin_end, now),
    })
}

mod fast;
mod id;
mod scan;

#[cfg(test)]
mod tests;
