//! A quick scan that proves an ordinary history valid without serde.
//!
//! Checking a history with serde's visitors (`check_hist`) costs about as
//! much as decoding a small payload, for every record consumed, and reading
//! it as a raw value first costs a second pass over it. Most histories are
//! plain: no escapes, integers that fit, nothing too deep. This scan walks
//! such a history's bytes once, validating them as JSON and following the
//! history grammar in the same pass, and answers "valid" or "don't know";
//! only "don't know" goes on to the full check, which stays the only
//! authority on why a history is dropped. So the scan may only ever say
//! "valid" for a history the full check accepts: anything unusual (an
//! escaped field name, an escape serde_json would refuse in text, a control
//! character, a number that is not a plain integer where the grammar wants
//! one, a history nested near the limit, a legacy `refs` object, unknown
//! values nested deeper than [`MAX_SKIP_DEPTH`]) is "don't know".
//!
//! The scan does not rely on its input being JSON: the envelope fast path
//! (`fast.rs`) runs it on raw record bytes, and what it accepts is written
//! back unchanged as JSON later, so everything it accepts is JSON by the
//! grammar of RFC 8259 (but for UTF-8, which the caller checks once for the
//! whole history with `std::str::from_utf8`: the scan lets bytes of 0x80
//! and above through inside strings).
//!
//! Every read goes through `get`, so no input can make it panic; it recurses
//! only per `hist` level, which it cuts at [`MAX_HIST_DEPTH`].

use super::MAX_HIST_DEPTH;

/// Unknown values nested deeper than this are left to serde_json (whose skip
/// has no limit): the scan tracks the open containers in one `u64`.
const MAX_SKIP_DEPTH: u32 = 64;

/// True when `raw` is certainly a history the full check accepts (and, but
/// for UTF-8, JSON).
pub(super) fn plainly_valid(raw: &[u8]) -> bool {
    let mut scan = Scan::new(raw);
    scan.hist(1).is_some() && scan.at_end()
}

/// A cursor over bytes that may be anything.
pub(super) struct Scan<'a> {
    s: &'a [u8],
    i: usize,
}

/// One in every byte of a word.
const ONES: u64 = u64::MAX / 255;
/// The high bit of every byte of a word.
const HIGHS: u64 = ONES << 7;

/// The high bit set in each byte of `w` that ends a plain string's run of
/// bytes: a quote, a backslash or a control character (below 0x20). Exact
/// for the lowest such byte, which is the only one used (a borrow can only
/// flag bytes above a byte that is flagged rightly).
#[inline]
fn string_stops(w: u64) -> u64 {
    let control = w.wrapping_sub(ONES * 0x20) & !w;
    let q = w ^ (ONES * u64::from(b'"'));
    let quote = q.wrapping_sub(ONES) & !q;
    let b = w ^ (ONES * u64::from(b'\\'));
    let backslash = b.wrapping_sub(ONES) & !b;
    (control | quote | backslash) & HIGHS
}

/// Where the run of plain string bytes from `from` on ends: the index of the
/// first quote, backslash or control character, or the length of `body`.
#[inline]
fn plain_run_end(body: &[u8], from: usize) -> usize {
    let mut len = from;
    // Eight bytes at a time while eight are left, then one at a time.
    while let Some(word) = body.get(len..).and_then(<[u8]>::first_chunk::<8>) {
        let stops = string_stops(u64::from_le_bytes(*word));
        if stops != 0 {
            return len + (stops.trailing_zeros() / 8) as usize;
        }
        len += 8;
    }
    while let Some(&b) = body.get(len) {
        if b == b'"' || b == b'\\' || b < 0x20 {
            break;
        }
        len += 1;
    }
    len
}

/// The length of the escape `at` starts with (at a backslash), if
/// serde_json reads it into text: `\"`, `\\`, `\/`, `\b`, `\f`, `\n`,
/// `\r`, `\t`, or `\u` and four hex digits that are not a surrogate, or a
/// leading surrogate escape followed by a trailing one.
fn escape_len(at: &[u8]) -> Option<usize> {
    match at.get(1)? {
        b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => Some(2),
        b'u' => match hex4(at.get(2..6)?)? {
            0xDC00..=0xDFFF => None,
            0xD800..=0xDBFF => {
                if at.get(6..8)? != b"\\u" {
                    return None;
                }
                let trailing = hex4(at.get(8..12)?)?;
                (0xDC00..=0xDFFF).contains(&trailing).then_some(12)
            }
            _ => Some(6),
        },
        _ => None,
    }
}

/// Four hex digits (either case), as a number.
fn hex4(digits: &[u8]) -> Option<u16> {
    let mut n: u16 = 0;
    for &d in digits {
        let value = char::from(d).to_digit(16)?;
        n = (n << 4) | u16::try_from(value).ok()?;
    }
    Some(n)
}

impl<'a> Scan<'a> {
    pub(super) fn new(s: &'a [u8]) -> Self {
        Scan { s, i: 0 }
    }

    /// Where the scan is: the index of the next byte to read.
    pub(super) fn pos(&self) -> usize {
        self.i
    }

    /// Moves the scan to `pos` (past a value someone else read).
    pub(super) fn seek(&mut self, pos: usize) {
        self.i = pos;
    }

    /// The bytes from the scan's position on (empty past the end).
    pub(super) fn rest(&self) -> &'a [u8] {
        self.s.get(self.i..).unwrap_or_default()
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    /// Skips JSON whitespace (exactly the four bytes RFC 8259 allows).
    #[inline]
    pub(super) fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }

    /// True when only whitespace is left.
    pub(super) fn at_end(&mut self) -> bool {
        self.ws();
        self.i >= self.s.len()
    }

    /// `byte` (after whitespace), consumed when next.
    #[inline]
    pub(super) fn eat(&mut self, byte: u8) -> bool {
        self.ws();
        if self.peek() == Some(byte) {
            self.i += 1;
            true
        } else {
            false
        }
    }

    /// The literal `word` (`null`, `true`, `false`), consumed when next. What
    /// follows it is the caller's to check (`nullx` fails there).
    #[inline]
    fn literal(&mut self, word: &[u8]) -> bool {
        let end = self.i.saturating_add(word.len());
        if self.s.get(self.i..end) == Some(word) {
            self.i = end;
            true
        } else {
            false
        }
    }

    /// A field name (after whitespace): a string without escapes, whose
    /// contents are the name. An escaped name is "don't know": it could
    /// spell `hist`.
    #[inline]
    pub(super) fn string(&mut self) -> Option<&'a [u8]> {
        self.string_with(false)
    }

    /// A string value (after whitespace), with escapes only as serde_json
    /// reads them into text (`check_hist` reads `svc`, `dt`, `topic` and
    /// `key` so; it skips other strings with looser rules, which accept all
    /// these).
    #[inline]
    fn text(&mut self) -> Option<()> {
        self.string_with(true).map(|_| ())
    }

    /// A string without control characters (after whitespace), with
    /// escapes when `escapes`; its contents as written.
    #[inline]
    fn string_with(&mut self, escapes: bool) -> Option<&'a [u8]> {
        self.ws();
        if self.peek() != Some(b'"') {
            return None;
        }
        let start = self.i + 1;
        let body = self.s.get(start..)?;
        let mut len = 0;
        loop {
            len = plain_run_end(body, len);
            match body.get(len)? {
                b'"' => {
                    self.i = start + len + 1;
                    return body.get(..len);
                }
                b'\\' if escapes => len += escape_len(body.get(len..)?)?,
                _ => return None,
            }
        }
    }

    fn string_or_null(&mut self) -> Option<()> {
        self.ws();
        if self.peek() == Some(b'n') {
            return self.literal(b"null").then_some(());
        }
        self.text()
    }

    /// `[0-9]*`, consumed; how many.
    #[inline]
    fn digits(&mut self) -> usize {
        let start = self.i;
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        self.i - start
    }

    /// A JSON number, exactly as RFC 8259 spells one (what serde_json's
    /// skip accepts): `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
    fn number(&mut self) -> Option<()> {
        self.literal(b"-");
        match self.peek()? {
            b'0' => self.i += 1,
            b'1'..=b'9' => {
                self.digits();
            }
            _ => return None,
        }
        if self.literal(b".") && self.digits() == 0 {
            return None;
        }
        if let Some(b'e' | b'E') = self.peek() {
            self.i += 1;
            if let Some(b'+' | b'-') = self.peek() {
                self.i += 1;
            }
            if self.digits() == 0 {
                return None;
            }
        }
        Some(())
    }

    /// A plain integer (`-?(0|[1-9][0-9]*)`, after whitespace) within
    /// `min..=max`, as serde_json reads one into `i32` or `i64`.
    fn integer(&mut self, min: i64, max: i64) -> Option<()> {
        self.ws();
        let negative = self.literal(b"-");
        let start = self.i;
        let count = self.digits();
        let text = self.s.get(start..self.i)?;
        // A leading zero is invalid JSON; more than 19 digits cannot fit.
        if count == 0 || count > 19 || (count > 1 && text.first() == Some(&b'0')) {
            return None;
        }
        // serde_json reads a fraction or an exponent as a float, which the
        // full check refuses.
        if let Some(b'.' | b'e' | b'E') = self.peek() {
            return None;
        }
        let mut n: u64 = 0;
        for &d in text {
            n = n * 10 + u64::from(d - b'0');
        }
        // serde_json reads `-0` as a float too.
        if negative && n == 0 {
            return None;
        }
        let n = i128::from(n);
        let n = if negative { -n } else { n };
        (i128::from(min)..=i128::from(max))
            .contains(&n)
            .then_some(())
    }

    /// A field name and its colon (after whitespace).
    #[inline]
    fn name(&mut self) -> Option<&'a [u8]> {
        let name = self.string()?;
        self.eat(b':').then_some(name)
    }

    /// Any JSON value, checked and skipped, without recursion: the kinds of
    /// the open containers are bits of one word (1 for an object).
    pub(super) fn skip(&mut self) -> Option<()> {
        let mut open: u64 = 0;
        let mut depth = 0u32;
        loop {
            // A value.
            self.ws();
            let first = self.peek()?;
            match first {
                b'{' | b'[' => {
                    self.i += 1;
                    if depth == MAX_SKIP_DEPTH {
                        return None;
                    }
                    depth += 1;
                    open = (open << 1) | u64::from(first == b'{');
                    let close = if first == b'{' { b'}' } else { b']' };
                    if !self.eat(close) {
                        if first == b'{' {
                            self.name()?;
                        }
                        continue;
                    }
                    depth -= 1;
                    open >>= 1;
                }
                b'"' => self.text()?,
                b'-' | b'0'..=b'9' => self.number()?,
                b't' if self.literal(b"true") => {}
                b'f' if self.literal(b"false") => {}
                b'n' if self.literal(b"null") => {}
                _ => return None,
            }
            // After a value: close what it ends, or go on to the next one.
            loop {
                if depth == 0 {
                    return Some(());
                }
                let in_object = open & 1 == 1;
                self.ws();
                match self.peek()? {
                    b',' => {
                        self.i += 1;
                        if in_object {
                            self.name()?;
                        }
                        break;
                    }
                    b'}' if in_object => {}
                    b']' if !in_object => {}
                    _ => return None,
                }
                self.i += 1;
                depth -= 1;
                open >>= 1;
            }
        }
    }

    /// The next field name of an object and its colon, as one of `known`
    /// or [`Field::Other`]. A known name written plainly (`"svc":`) is
    /// matched in place, one masked compare of 16 bytes for each, without a
    /// string scan; any other spelling (a space before the colon) is read
    /// as a string and then looked up. Names must be UTF-8, as serde_json
    /// reads them as text.
    #[inline]
    pub(super) fn field(&mut self, known: &[Known]) -> Option<Field> {
        self.ws();
        let rest = self.rest();
        let head = match rest.first_chunk::<16>() {
            Some(head) => *head,
            // Near the end: the bytes left, then zeros (no name has any).
            None => {
                let mut head = [0u8; 16];
                for (to, from) in head.iter_mut().zip(rest) {
                    *to = *from;
                }
                head
            }
        };
        let head = u128::from_le_bytes(head);
        for k in known {
            if head & k.mask == k.word {
                self.i += k.len;
                return Some(k.field);
            }
        }
        let name = self.name()?;
        match known.iter().find(|k| k.name == name) {
            Some(k) => Some(k.field),
            None => std::str::from_utf8(name).ok().map(|_| Field::Other),
        }
    }

    /// The end of an object's field: true after a comma (another field
    /// follows), false after the closing brace; `None` for anything else.
    #[inline]
    pub(super) fn next_field(&mut self) -> Option<bool> {
        if self.eat(b',') {
            Some(true)
        } else {
            self.eat(b'}').then_some(false)
        }
    }

    /// A `hist` value at `depth` (the top one being 1): null or a history
    /// object, after whitespace.
    pub(super) fn hist(&mut self, depth: u32) -> Option<()> {
        if !self.eat(b'{') {
            return self.literal(b"null").then_some(());
        }
        // Near the limit the full check decides (and says why).
        if depth >= MAX_HIST_DEPTH - 1 {
            return None;
        }
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            match self.field(&HIST_FIELDS)? {
                Field::Svc | Field::Dt => self.string_or_null()?,
                Field::Refs => self.refs(depth)?,
                _ => self.skip()?,
            }
            if !self.next_field()? {
                return Some(());
            }
        }
    }

    /// A `refs` value: null or a list of ref objects (a single object, the
    /// legacy form, is left to the full check).
    fn refs(&mut self, depth: u32) -> Option<()> {
        if !self.eat(b'[') {
            return self.literal(b"null").then_some(());
        }
        if self.eat(b']') {
            return Some(());
        }
        loop {
            self.a_ref(depth)?;
            if !self.eat(b',') {
                return self.eat(b']').then_some(());
            }
        }
    }

    /// One ref object of a history at `depth`.
    fn a_ref(&mut self, depth: u32) -> Option<()> {
        if !self.eat(b'{') {
            return None;
        }
        if self.eat(b'}') {
            return Some(());
        }
        loop {
            match self.field(&REF_FIELDS)? {
                Field::Topic | Field::Key => self.string_or_null()?,
                Field::Partition => self.integer(i32::MIN.into(), i32::MAX.into())?,
                Field::Offset => self.integer(i64::MIN, i64::MAX)?,
                Field::Hist => self.hist(depth + 1)?,
                _ => self.skip()?,
            }
            if !self.next_field()? {
                return Some(());
            }
        }
    }
}

/// The field names the envelope and history grammars know (`Other` for
/// the rest, which are skipped), for this scan and for the serde path's
/// field-name visitor alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Field {
    Svc,
    Dt,
    Refs,
    Topic,
    Partition,
    Offset,
    Key,
    Hist,
    Item,
    Other,
}

/// A field name the grammar knows, as written plainly (`"svc":`): its
/// bytes as the low bytes of a little-endian word, with their mask.
#[derive(Clone, Copy, Debug)]
pub(super) struct Known {
    word: u128,
    mask: u128,
    /// The length of the plain spelling, quotes and colon included.
    len: usize,
    /// The name itself.
    name: &'static [u8],
    field: Field,
}

impl Known {
    /// `name`, which must be at most 12 bytes long.
    const fn new(name: &'static [u8], field: Field) -> Known {
        let len = name.len() + 3;
        assert!(
            len <= 16,
            "a known field name fits in 16 bytes with its quotes and colon"
        );
        let mut word = b'"' as u128;
        let mut mask = 0xff;
        let mut i = 0;
        while i < name.len() {
            word |= (name[i] as u128) << (8 * (i + 1));
            mask |= 0xff << (8 * (i + 1));
            i += 1;
        }
        word |= (b'"' as u128) << (8 * (len - 2)) | (b':' as u128) << (8 * (len - 1));
        mask |= 0xffff << (8 * (len - 2));
        Known {
            word,
            mask,
            len,
            name,
            field,
        }
    }
}

/// A history object's fields, in the usual order.
const HIST_FIELDS: [Known; 3] = [
    Known::new(b"svc", Field::Svc),
    Known::new(b"dt", Field::Dt),
    Known::new(b"refs", Field::Refs),
];

/// A ref object's fields, in the usual order.
const REF_FIELDS: [Known; 5] = [
    Known::new(b"topic", Field::Topic),
    Known::new(b"partition", Field::Partition),
    Known::new(b"offset", Field::Offset),
    Known::new(b"key", Field::Key),
    Known::new(b"hist", Field::Hist),
];

/// The envelope's fields.
pub(super) const ENVELOPE_FIELDS: [Known; 2] = [
    Known::new(b"item", Field::Item),
    Known::new(b"hist", Field::Hist),
];
