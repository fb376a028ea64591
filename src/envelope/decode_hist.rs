//! Reading a record's `hist` with the long-history guard: [`parse_hist`]
//! builds a [`Hist`], [`check_hist`] checks one against the same grammar
//! without building it, and both cut a history nested [`MAX_HIST_DEPTH`]
//! levels deep.

use std::fmt;
use std::sync::Arc;

use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

use super::scan::{self, Field};
use super::{Hist, History, Ref, MAX_HIST_DEPTH};

/// Why a history was dropped on input.
#[derive(Debug, thiserror::Error)]
pub(super) enum HistDropped {
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
pub(super) fn parse_hist(raw: &RawValue) -> Result<Option<Hist>, HistDropped> {
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
pub(super) fn check_hist(raw: &RawValue) -> Result<(), HistDropped> {
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
pub(super) struct Key(pub(super) Field);

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
