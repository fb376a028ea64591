//! A quick scan that proves an ordinary history valid without serde.
//!
//! Checking a history with serde's visitors (`check_hist`) costs about as
//! much as decoding a small payload, for every record consumed. Most
//! histories are plain: no escapes, integers that fit, nothing too deep. This
//! scan walks such a history's bytes once and answers "valid" or "don't
//! know"; only "don't know" goes on to the full check, which stays the only
//! authority on why a history is dropped. So the scan may only ever say
//! "valid" for a history the full check accepts: anything unusual (a
//! backslash anywhere, a number that is not a plain integer, a history
//! nested near the limit, a legacy `refs` object) is "don't know".
//!
//! It relies on the text being valid JSON already (serde_json checked it
//! while reading it as a raw value), so it only follows the structure.

use super::MAX_HIST_DEPTH;

/// True when `raw` (valid JSON) is certainly a history the full check accepts.
pub(super) fn plainly_valid(raw: &[u8]) -> bool {
    // Without escapes a string ends at the next quote, and field names can
    // be compared as bytes (an escaped name could spell `hist`).
    if raw.contains(&b'\\') {
        return false;
    }
    let mut scan = Scan { s: raw, i: 0 };
    scan.hist(1) == Some(()) && {
        scan.ws();
        scan.i == raw.len()
    }
}

struct Scan<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Scan<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    fn eat(&mut self, byte: u8) -> Option<()> {
        self.ws();
        (self.peek() == Some(byte)).then(|| self.i += 1)
    }

    /// `null`, consumed when next.
    fn null(&mut self) -> bool {
        self.ws();
        if self.s[self.i..].starts_with(b"null") {
            self.i += 4;
            true
        } else {
            false
        }
    }

    /// A string (no escapes, so it ends at the next quote); its contents.
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        let len = self.s[start..].iter().position(|&b| b == b'"')?;
        self.i = start + len + 1;
        Some(&self.s[start..start + len])
    }

    fn string_or_null(&mut self) -> Option<()> {
        if self.null() {
            return Some(());
        }
        self.string().map(|_| ())
    }

    /// A plain integer (`-?[0-9]+`) within `min..=max`.
    fn integer(&mut self, min: i64, max: i64) -> Option<()> {
        self.ws();
        let start = self.i;
        let negative = self.peek() == Some(b'-');
        if negative {
            self.i += 1;
        }
        while self.peek().is_some_and(|b| b.is_ascii_digit()) {
            self.i += 1;
        }
        if matches!(self.peek(), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        let text = std::str::from_utf8(&self.s[start..self.i]).ok()?;
        let n: i64 = text.parse().ok()?;
        // serde_json reads `-0` as a float, which the full check refuses.
        if negative && n == 0 {
            return None;
        }
        (min..=max).contains(&n).then_some(())
    }

    /// Any value, skipped (valid JSON without escapes: strings end at the
    /// next quote, brackets balance).
    fn skip(&mut self) -> Option<()> {
        self.ws();
        match self.peek()? {
            b'"' => self.string().map(|_| ()),
            b'{' | b'[' => {
                let mut depth = 0usize;
                loop {
                    match self.peek()? {
                        b'"' => {
                            self.string()?;
                            continue;
                        }
                        b'{' | b'[' => depth += 1,
                        b'}' | b']' => {
                            depth -= 1;
                            if depth == 0 {
                                self.i += 1;
                                return Some(());
                            }
                        }
                        _ => {}
                    }
                    self.i += 1;
                }
            }
            _ => {
                // A number or a literal: up to the next delimiter.
                while !matches!(
                    self.peek(),
                    None | Some(b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
                ) {
                    self.i += 1;
                }
                Some(())
            }
        }
    }

    /// Calls `field` for each field name of an object; `field` reads the value.
    fn object(&mut self, mut field: impl FnMut(&mut Self, &'a [u8]) -> Option<()>) -> Option<()> {
        self.eat(b'{')?;
        if self.eat(b'}').is_some() {
            return Some(());
        }
        loop {
            let name = self.string()?;
            self.eat(b':')?;
            field(self, name)?;
            if self.eat(b',').is_none() {
                return self.eat(b'}');
            }
        }
    }

    /// A `hist` value at `depth` (the top one being 1): null or a history object.
    fn hist(&mut self, depth: u32) -> Option<()> {
        if self.null() {
            return Some(());
        }
        // Near the limit the full check decides (and says why).
        if depth >= MAX_HIST_DEPTH - 1 {
            return None;
        }
        self.object(|scan, name| match name {
            b"svc" | b"dt" => scan.string_or_null(),
            b"refs" => scan.refs(depth),
            _ => scan.skip(),
        })
    }

    /// A `refs` value: null or a list of ref objects (a single object, the
    /// legacy form, is left to the full check).
    fn refs(&mut self, depth: u32) -> Option<()> {
        if self.null() {
            return Some(());
        }
        self.eat(b'[')?;
        if self.eat(b']').is_some() {
            return Some(());
        }
        loop {
            self.object(|scan, name| match name {
                b"topic" | b"key" => scan.string_or_null(),
                b"partition" => scan.integer(i32::MIN.into(), i32::MAX.into()),
                b"offset" => scan.integer(i64::MIN, i64::MAX),
                b"hist" => scan.hist(depth + 1),
                _ => scan.skip(),
            })?;
            if self.eat(b',').is_none() {
                return self.eat(b']');
            }
        }
    }
}
