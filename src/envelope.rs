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

pub use batch_ref::{BatchRef, PartitionRange};
pub use decode::{unpack, DecodeError, DecodeErrorKind, RawRecord};
pub(crate) use decode::{unpack_parts, LastHistory};
pub use history::{Hist, History, Ref};
pub use id::MessageId;
pub use latency::{stage_latencies, LatencyError, StageLatencies};
pub use message::{latest_only, Message, Origin};
pub use pack::{format_dt, key_of, pack, pack_into, parse_dt};

/// A history nested this many levels deep (the top `hist` is level 1) is cut.
pub const MAX_HIST_DEPTH: u32 = 100;

mod batch_ref;
mod decode;
mod decode_hist;
mod fast;
mod history;
mod id;
mod latency;
mod message;
mod pack;
mod scan;

#[cfg(test)]
mod tests;
