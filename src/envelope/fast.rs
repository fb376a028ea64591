//! The envelope fast path: one pass over an ordinary record.
//!
//! The full path (`parse_envelope`, then `check_hist`) reads the envelope
//! with serde_json, capturing `hist` as a raw value (a pass over the
//! history), and then checks that history (a second pass). Here the
//! top-level object is walked by hand instead: `item` is decoded by
//! serde_json from where it starts (so the payload is exactly what the full
//! path would decode), `hist` is checked by the validating scan while its
//! end is found, and other fields are skipped by the same scan.
//!
//! The fast path only ever says "done" or "don't know". Anything unusual (a
//! duplicate `item` or `hist`, an escaped or non-UTF-8 field name, an
//! `item` that does not decode, trailing bytes, anything malformed) is
//! "don't know", and the full path runs on the whole record: it stays the
//! only authority on errors and their kinds. So whenever this returns a
//! result, the full path returns the same payload and the same history text
//! (a property test checks it).
//!
//! A history the scan cannot vouch for (a legacy `refs` object, one nested
//! near the limit, an escaped field name) does not send the whole record back:
//! serde_json captures it as a raw value from where it starts, exactly as
//! the full path would, and `check_hist` decides about it, as it does there.
//! The item is still decoded once.

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;

use super::decode::RawHist;
use super::scan::{Field, Scan, ENVELOPE_FIELDS};

/// serde_json's recursion limit. The full path decodes `item` one level
/// inside the envelope object, so a payload nested 127 levels deep fails
/// there and would decode here, from the top.
const SERDE_DEPTH_LIMIT: usize = 128;

/// The envelope's payload and its history (`None` when missing or `null`),
/// or `None`: don't know.
///
/// `last` is the text of the last history accepted, if any: a history
/// written byte for byte the same is that history, and is not scanned again.
pub(super) fn envelope<'a, T: DeserializeOwned>(
    value: &'a [u8],
    last: Option<&str>,
) -> Option<(T, Option<RawHist<'a>>)> {
    let mut scan = Scan::new(value);
    if !scan.eat(b'{') {
        return None;
    }
    let mut item: Option<T> = None;
    let mut hist: Option<Option<RawHist<'_>>> = None;
    // An empty object has no `item`: the full path says why.
    loop {
        match scan.field(&ENVELOPE_FIELDS)? {
            Field::Item if item.is_none() => item = Some(payload(&mut scan)?),
            Field::Hist if hist.is_none() => hist = Some(history(&mut scan, last)?),
            // A duplicate: an error for `item`, the last one for `hist`.
            Field::Item | Field::Hist => return None,
            _ => scan.skip()?,
        }
        if !scan.next_field()? {
            break;
        }
    }
    if !scan.at_end() {
        return None;
    }
    Some((item?, hist.flatten()))
}

/// The `hist` value where the scan stands (`None` for `null`), checked by
/// the scan or else captured by serde_json for `check_hist`; the scan moves
/// past it. `None` outside: don't know.
fn history<'a>(scan: &mut Scan<'a>, last: Option<&str>) -> Option<Option<RawHist<'a>>> {
    scan.ws();
    let start = scan.pos();
    let rest = scan.rest();
    // The records of one producer batch usually carry one history. An object
    // ends at its own closing brace, so bytes that begin with the whole of an
    // accepted object's text hold exactly that object: accepted again, with
    // no scan (the caller shares the last one's `History`). Only objects:
    // `1` is the start of `12`.
    if let Some(last) = last.filter(|l| l.starts_with('{')) {
        if let Some(text) = rest.get(..last.len()).filter(|t| *t == last.as_bytes()) {
            scan.seek(start + text.len());
            return Some(Some(RawHist::Checked(std::str::from_utf8(text).ok()?)));
        }
    }
    if scan.hist(1).is_some() {
        let text = rest.get(..scan.pos().checked_sub(start)?)?;
        if text == b"null" {
            return Some(None);
        }
        // The scan let bytes of 0x80 and above through in strings.
        return Some(Some(RawHist::Checked(std::str::from_utf8(text).ok()?)));
    }
    // What the full path does with this value: serde_json reads it as a
    // raw value (which checks it is JSON, and UTF-8).
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<&RawValue>();
    let raw = values.next()?.ok()?;
    scan.seek(start + values.byte_offset());
    Some((raw.get() != "null").then_some(RawHist::Unchecked(raw)))
}

/// The `item` value, decoded by serde_json where the scan stands; the scan
/// moves past it.
fn payload<T: DeserializeOwned>(scan: &mut Scan<'_>) -> Option<T> {
    let rest = scan.rest();
    // A stream deserializer says where the value ended; it accepts a value
    // followed by `,` or `}` (and the walk checks which follows).
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<T>();
    let item = values.next()?.ok()?;
    let end = values.byte_offset();
    let text = rest.get(..end)?;
    if may_nest_too_deep(text) {
        return None;
    }
    scan.seek(scan.pos() + end);
    Some(item)
}

/// True when `text` holds enough `[` and `{` to nest as deep as the full
/// path's recursion limit inside the envelope: counting bytes (even in
/// strings) over-counts nesting, which only sends more payloads to the full
/// path.
fn may_nest_too_deep(text: &[u8]) -> bool {
    // A little under the limit, to stay clear of off-by-ones; a payload
    // nested this deep holds this many openings and as many closings.
    let limit = SERDE_DEPTH_LIMIT - 8;
    if text.len() < 2 * limit {
        return false;
    }
    let mut opens = 0usize;
    // A byte-wide count per chunk vectorises (16 bytes an instruction); 224
    // bytes, seven times 32, cannot overflow it and leave no scalar tail
    // (255 made this pass 1.6 times slower). `[` (0x5b) and `{` (0x7b) are
    // the bytes equal to 0x7b once bit 0x20 is set.
    for chunk in text.chunks(224) {
        let count = chunk
            .iter()
            .fold(0u8, |n, &b| n.wrapping_add(u8::from(b | 0x20 == b'{')));
        opens += usize::from(count);
        if opens >= limit {
            return true;
        }
    }
    false
}
