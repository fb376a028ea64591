//! Packing a message into a record: the envelope value, the key, and the
//! `hist.dt` time format (written by [`format_dt`], read by [`parse_dt`]).

use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

use super::{Message, Ref};

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
