//! The history a record carries: [`Ref`]s (the coordinates of the records
//! it was derived from), each level's [`Hist`], and [`History`], a ref's
//! history kept as the JSON it was read as until someone looks at it.

use std::fmt;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use super::decode_hist::parse_hist;
use super::MessageId;

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
pub struct History(pub(super) Arc<HistoryInner>);

pub(super) struct HistoryInner {
    /// The JSON as read, already checked (by the fast path's scan or by
    /// [`check_hist`]); `None` when built in code.
    ///
    /// [`check_hist`]: super::decode_hist::check_hist
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
    ///
    /// [`check_hist`]: super::decode_hist::check_hist
    pub(super) fn from_checked(raw: &RawValue) -> History {
        History(Arc::new(HistoryInner {
            raw: Some(raw.to_owned()),
            parsed: std::sync::OnceLock::new(),
        }))
    }

    /// A history read from a record by the fast path, whose scan accepted
    /// it: JSON (`scan` checks the grammar, `fast` the UTF-8) that
    /// [`check_hist`] accepts.
    ///
    /// [`check_hist`]: super::decode_hist::check_hist
    pub(super) fn from_scanned(text: &str) -> History {
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
