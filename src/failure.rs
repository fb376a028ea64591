//! Failed messages: how a handler names them, and the headers kafka-batch
//! writes on the records it sends to the retry and dead-letter topics.
//!
//! A handler returns `Ok(())` when the whole batch is handled, any error when
//! the whole batch failed, or [`Failures`] naming the messages that failed:
//!
//! ```no_run
//! use kafka_batch::{Consumer, Failures, Message, Settings};
//!
//! # async fn store(_: &Message) -> std::io::Result<()> { Ok(()) }
//! # async fn run() -> anyhow::Result<()> {
//! let consumer = Consumer::new(&Settings::load()?.consumer)?;
//! consumer
//!     .process(async |batch: Vec<Message>| {
//!         let mut failed = Failures::new();
//!         for (i, message) in batch.iter().enumerate() {
//!             if let Err(e) = store(message).await {
//!                 failed.add(i, e); // this one goes to the failure policies
//!             }
//!         }
//!         failed.into_result() // Ok(()) when nothing failed
//!     })
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! The failed messages go through `consumer.failure.policies`; the others
//! count as handled. `Failures` may also be wrapped (`anyhow`'s `?` and
//! `.context(..)` keep it findable).

use std::fmt;

use crate::envelope::MessageId;
use crate::error::BoxError;

pub(crate) mod record;

/// Names of the headers kafka-batch adds to records it writes to the retry
/// and dead-letter topics. Every one starts with [`headers::PREFIX`], which
/// replay strips.
pub mod headers {
    /// The prefix of every header kafka-batch adds.
    pub const PREFIX: &str = "kafka-batch-";
    /// Times the record was handed to a handler (text, decimal).
    pub const ATTEMPTS: &str = "kafka-batch-attempts";
    /// Times the record went through the retry topic (text, decimal).
    pub const RETRIES: &str = "kafka-batch-retries";
    /// When a retry record is due: milliseconds since the Unix epoch (text, decimal).
    pub const DUE_MS: &str = "kafka-batch-due-ms";
    /// The topic the record was first consumed from.
    pub const SOURCE_TOPIC: &str = "kafka-batch-source-topic";
    /// Its partition there (text, decimal).
    pub const SOURCE_PARTITION: &str = "kafka-batch-source-partition";
    /// Its offset there (text, decimal).
    pub const SOURCE_OFFSET: &str = "kafka-batch-source-offset";
    /// The consumer group that failed it.
    pub const GROUP: &str = "kafka-batch-group";
    /// The service that failed it.
    pub const SERVICE: &str = "kafka-batch-service";
    /// Why: `handler`, or the decode error's kind (`null_key`, `key_not_utf8`,
    /// `not_json`, `not_envelope`, `payload_type`).
    pub const REASON: &str = "kafka-batch-reason";
    /// The error's text (at most 4 KiB).
    pub const ERROR: &str = "kafka-batch-error";
    /// When it failed (RFC 3339, UTC).
    pub const FAILED_AT: &str = "kafka-batch-failed-at";
}

/// What the kafka-batch headers of a retry or dead-letter record say.
///
/// Parsing is lenient: a header that is missing, not UTF-8 or not a number
/// leaves its field empty (or 0); it never fails or panics, whatever the bytes.
///
/// ```
/// use kafka_batch::failure::{headers, FailureInfo};
///
/// let info = FailureInfo::from_headers([
///     (headers::SOURCE_TOPIC.as_bytes(), Some(&b"events"[..])),
///     (headers::SOURCE_OFFSET.as_bytes(), Some(&b"42"[..])),
///     (headers::ATTEMPTS.as_bytes(), Some(&b"not a number"[..])),
/// ]);
/// assert_eq!(info.source_topic.as_deref(), Some("events"));
/// assert_eq!(info.source_offset, Some(42));
/// assert_eq!(info.attempts, 0);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailureInfo {
    /// Times the record was handed to a handler.
    pub attempts: u32,
    /// Times it went through the retry topic.
    pub retries: u32,
    /// When a retry record is due, in milliseconds since the Unix epoch.
    pub due_ms: Option<i64>,
    /// The topic it was first consumed from.
    pub source_topic: Option<String>,
    /// Its partition there.
    pub source_partition: Option<i32>,
    /// Its offset there.
    pub source_offset: Option<i64>,
    /// The consumer group that failed it.
    pub group: Option<String>,
    /// The service that failed it.
    pub service: Option<String>,
    /// Why it failed (`handler` or a decode error kind).
    pub reason: Option<String>,
    /// The error's text.
    pub error: Option<String>,
    /// When it failed (RFC 3339).
    pub failed_at: Option<String>,
}

impl FailureInfo {
    /// Reads kafka-batch's headers from a record's headers (name and value
    /// bytes); other headers are ignored, and the last of a repeated name wins.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a [u8], Option<&'a [u8]>)>,
    ) -> FailureInfo {
        let mut info = FailureInfo::default();
        for (name, value) in headers {
            let Some(text) = value.and_then(|v| std::str::from_utf8(v).ok()) else {
                continue;
            };
            let text = text.trim();
            match name {
                n if n == headers::ATTEMPTS.as_bytes() => {
                    info.attempts = text.parse().unwrap_or_default()
                }
                n if n == headers::RETRIES.as_bytes() => {
                    info.retries = text.parse().unwrap_or_default()
                }
                n if n == headers::DUE_MS.as_bytes() => info.due_ms = text.parse().ok(),
                n if n == headers::SOURCE_TOPIC.as_bytes() => {
                    info.source_topic = (!text.is_empty()).then(|| text.to_owned())
                }
                n if n == headers::SOURCE_PARTITION.as_bytes() => {
                    info.source_partition = text.parse().ok()
                }
                n if n == headers::SOURCE_OFFSET.as_bytes() => {
                    info.source_offset = text.parse().ok()
                }
                n if n == headers::GROUP.as_bytes() => info.group = Some(text.to_owned()),
                n if n == headers::SERVICE.as_bytes() => info.service = Some(text.to_owned()),
                n if n == headers::REASON.as_bytes() => info.reason = Some(text.to_owned()),
                n if n == headers::ERROR.as_bytes() => info.error = Some(text.to_owned()),
                n if n == headers::FAILED_AT.as_bytes() => info.failed_at = Some(text.to_owned()),
                _ => {}
            }
        }
        info
    }

    /// The source coordinates, when all three headers were readable.
    pub fn source(&self) -> Option<(&str, i32, i64)> {
        Some((
            self.source_topic.as_deref()?,
            self.source_partition?,
            self.source_offset?,
        ))
    }
}

/// The messages of a batch that failed, each with its error; every other
/// message of the batch counts as handled. Return it (or wrap it in your
/// error) from the handler. See the [module docs](self).
///
/// A position or id that names no message of the batch makes the whole batch
/// count as failed: kafka-batch cannot tell which records were handled.
#[derive(Default)]
pub struct Failures {
    failed: Vec<(Which, BoxError)>,
}

enum Which {
    Index(usize),
    Id(MessageId),
}

impl Failures {
    /// No failures yet.
    pub fn new() -> Failures {
        Failures::default()
    }

    /// One failed message, by its position in the batch.
    pub fn at(index: usize, error: impl Into<BoxError>) -> Failures {
        let mut failures = Failures::new();
        failures.add(index, error);
        failures
    }

    /// Adds the message at `index` of the batch.
    pub fn add(&mut self, index: usize, error: impl Into<BoxError>) -> &mut Self {
        self.failed.push((Which::Index(index), error.into()));
        self
    }

    /// Adds every message of the batch whose id is `id` (a `&str`, a
    /// `String` or a message's id: `failed.add_id(&message.id, e)`).
    pub fn add_id(&mut self, id: impl Into<MessageId>, error: impl Into<BoxError>) -> &mut Self {
        self.failed.push((Which::Id(id.into()), error.into()));
        self
    }

    /// True when no message was added.
    pub fn is_empty(&self) -> bool {
        self.failed.is_empty()
    }

    /// How many failures were added.
    pub fn len(&self) -> usize {
        self.failed.len()
    }

    /// `Ok(())` when nothing failed, else `Err(self)`: the handler's return value.
    pub fn into_result(self) -> Result<(), Failures> {
        if self.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }

    /// The failed positions with their error texts, given the batch's ids in
    /// order; `Err` names a position or id that is not in the batch.
    pub(crate) fn resolve(&self, ids: &[&str]) -> Result<Vec<(usize, String)>, String> {
        let len = ids.len();
        let mut out: Vec<(usize, String)> = Vec::new();
        for (which, error) in &self.failed {
            let text = error_text(error.as_ref());
            match which {
                Which::Index(i) if *i < len => out.push((*i, text)),
                Which::Index(i) => {
                    return Err(format!(
                        "position {i} is not in the batch of {len} messages"
                    ))
                }
                Which::Id(id) => {
                    let before = out.len();
                    out.extend(
                        ids.iter()
                            .enumerate()
                            .filter(|(_, m)| **m == id.as_str())
                            .map(|(i, _)| (i, text.clone())),
                    );
                    if out.len() == before {
                        return Err(format!("id {id:?} is not in the batch"));
                    }
                }
            }
        }
        out.sort_by_key(|(i, _)| *i);
        out.dedup_by_key(|(i, _)| *i);
        Ok(out)
    }

    /// The same failures with each position `i` replaced by `positions[i]`
    /// (a batch's messages filtered after it was handed out: `positions`
    /// holds each kept message's place in the batch as handed out). A
    /// position past the end stays past it, so it still makes the whole
    /// batch count as failed.
    pub(crate) fn at_positions(self, positions: &[usize]) -> Failures {
        let failed = self
            .failed
            .into_iter()
            .map(|(which, error)| match which {
                Which::Index(i) => (
                    Which::Index(positions.get(i).copied().unwrap_or(usize::MAX)),
                    error,
                ),
                other => (other, error),
            })
            .collect();
        Failures { failed }
    }

    /// Finds `Failures` in an error or the errors it wraps.
    pub(crate) fn find<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e Failures> {
        let mut current = Some(error);
        while let Some(e) = current {
            if let Some(failures) = e.downcast_ref::<Failures>() {
                return Some(failures);
            }
            current = e.source();
        }
        None
    }
}

impl fmt::Debug for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.failed.iter().map(|(which, e)| match which {
                Which::Index(i) => format!("#{i}: {e}"),
                Which::Id(id) => format!("id {id:?}: {e}"),
            }))
            .finish()
    }
}

impl fmt::Display for Failures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} message(s) of the batch failed", self.failed.len())?;
        for (n, (which, e)) in self.failed.iter().take(3).enumerate() {
            let sep = if n == 0 { ": " } else { "; " };
            match which {
                Which::Index(i) => write!(f, "{sep}#{i}: {e}")?,
                Which::Id(id) => write!(f, "{sep}id {id:?}: {e}")?,
            }
        }
        if self.failed.len() > 3 {
            write!(f, "; and {} more", self.failed.len() - 3)?;
        }
        Ok(())
    }
}

impl std::error::Error for Failures {}

/// A failed record could not be written to the retry or dead-letter topic.
#[derive(Debug, thiserror::Error)]
#[error("cannot write failed record {record} to {topic:?}: {source}; nothing past it was committed. Check that the topic exists and the consumer may write to it")]
pub struct FailureTopicError {
    /// The retry or dead-letter topic.
    pub topic: String,
    /// The record (`topic:partition:offset:key`).
    pub record: String,
    /// Why.
    pub source: rdkafka::error::KafkaError,
}

/// An error and its sources as one line, at most 4 KiB (header-sized).
pub(crate) fn error_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    header_sized(&mut text);
    text
}

/// Cuts `text` to at most 4 KiB, on a character boundary: a header's size.
pub(crate) fn header_sized(text: &mut String) {
    if text.len() > 4096 {
        let mut cut = 4096;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_ids_resolve_to_sorted_positions() {
        let batch = ["a", "b", "c", "b"];
        let mut f = Failures::new();
        f.add(2, "two").add_id("b", "bees");
        assert_eq!(
            f.resolve(&batch).unwrap(),
            vec![(1, "bees".into()), (2, "two".into()), (3, "bees".into())]
        );
    }

    #[test]
    fn a_name_not_in_the_batch_is_refused() {
        let batch = ["a"];
        assert!(Failures::at(1, "x").resolve(&batch).is_err());
        let mut f = Failures::new();
        f.add_id("zz", "x");
        assert!(f.resolve(&batch).is_err());
    }

    #[test]
    fn failures_are_found_inside_wrapping_errors() {
        #[derive(Debug)]
        struct Wrapper(Failures);
        impl fmt::Display for Wrapper {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("while storing")
            }
        }
        impl std::error::Error for Wrapper {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let boxed: BoxError = Box::new(Wrapper(Failures::at(0, "boom")));
        assert_eq!(Failures::find(boxed.as_ref()).map(Failures::len), Some(1));
        let anyhow_wrapped: BoxError = anyhow::Error::from(Failures::at(0, "boom"))
            .context("storing")
            .into();
        assert!(Failures::find(anyhow_wrapped.as_ref()).is_some());
        let plain: BoxError = "no failures here".into();
        assert!(Failures::find(plain.as_ref()).is_none());
    }

    #[test]
    fn error_text_joins_sources_and_stays_header_sized() {
        let long: BoxError = "x".repeat(10_000).into();
        assert_eq!(error_text(long.as_ref()).len(), 4096);
        let wrapped: BoxError = anyhow::anyhow!("inner").context("outer").into();
        assert_eq!(error_text(wrapped.as_ref()), "outer: inner");
    }
}
