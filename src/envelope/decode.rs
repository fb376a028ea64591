//! Unpacking a record into a [`Message`]: the key and the envelope
//! (`{"item": ..., "hist": ...}`), read by the fast path when it knows and
//! else by the full path (serde_json), which alone reports errors. The
//! envelope's `hist` is checked by [`check_hist`] (in `decode_hist`).

use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

use super::decode_hist::{check_hist, HistDropped, Key};
use super::scan::Field;
use super::{fast, History, Message};

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
pub(crate) struct LastHistory(pub(super) Option<History>);

/// [`unpack`], sharing the history with the previous record when it is the same.
fn unpack_sharing<T: DeserializeOwned>(
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
pub(super) enum Path {
    /// The one-pass fast path, then the full path when it does not know.
    Fast,
    /// The full path only: what the fast path must agree with (tests).
    #[cfg(test)]
    Full,
}

/// [`unpack_parts`], reading the envelope by `path`.
pub(super) fn unpack_parts_by<'a, T: DeserializeOwned>(
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
pub(super) enum RawHist<'a> {
    /// Found by the fast path: its scan checked it, or it is byte for byte
    /// the last history accepted.
    Checked(&'a str),
    /// Captured by serde_json, still to be checked.
    Unchecked(&'a RawValue),
}

impl<'a> RawHist<'a> {
    /// The JSON text, as written in the record.
    pub(super) fn text(&self) -> &'a str {
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
pub(super) fn parse_envelope<T: DeserializeOwned>(
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
