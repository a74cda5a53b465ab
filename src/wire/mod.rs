//! The SIP wire format, ours on purpose: a zero-copy scan of messages into byte ranges, the value
//! grammars the proxy needs (Via, URIs, name-addr lists), TCP framing, and an editor that splices
//! changes into the original bytes. No I/O and no clock here.
#![deny(clippy::string_slice, clippy::indexing_slicing)]
#![warn(unreachable_pub)]

pub mod edit;
pub mod frame;
pub mod header;
pub mod reply;
pub mod scan;
pub mod uri;
pub mod via;

pub use edit::Edits;
pub use header::HeaderName;
pub use scan::{parse, Framing, Message, Method, ParseError, StartLine};

/// A byte range into a message buffer. `u32` keeps the header table small.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub start: u32,
    pub end: u32,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Span {
            start: start as u32,
            end: end as u32,
        }
    }

    pub fn of<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        buf.get(self.start as usize..self.end as usize)
            .unwrap_or(b"")
    }

    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn range(&self) -> std::ops::Range<usize> {
        self.start as usize..self.end as usize
    }

    /// Shift a span computed on a sub-slice that started at `base`.
    pub fn offset(self, base: usize) -> Span {
        Span::new(self.start as usize + base, self.end as usize + base)
    }
}

/// `buf[i]`, or 0 past the end (a byte no grammar here accepts, so scanning loops stop on it).
/// As cheap as indexing (one bounds check) and it cannot panic.
#[inline]
pub(crate) fn at(buf: &[u8], i: usize) -> u8 {
    buf.get(i).copied().unwrap_or(0)
}

/// `buf[s..e]`, or empty when the range is reversed or out of bounds.
#[inline]
pub(crate) fn sub(buf: &[u8], s: usize, e: usize) -> &[u8] {
    buf.get(s..e).unwrap_or_default()
}

/// `buf[s..]`, or empty past the end.
#[inline]
pub(crate) fn tail(buf: &[u8], s: usize) -> &[u8] {
    buf.get(s..).unwrap_or_default()
}

/// The first `needle` in `hay`. Header values and URIs are short: under 32 bytes a plain loop
/// costs less than `memchr`'s set-up, beyond it `memchr` wins.
#[inline]
pub(crate) fn find(needle: u8, hay: &[u8]) -> Option<usize> {
    if hay.len() < 32 {
        hay.iter().position(|b| *b == needle)
    } else {
        memchr::memchr(needle, hay)
    }
}

/// The last `needle` in `hay` (see [`find`]).
#[inline]
pub(crate) fn rfind(needle: u8, hay: &[u8]) -> Option<usize> {
    if hay.len() < 32 {
        hay.iter().rposition(|b| *b == needle)
    } else {
        memchr::memrchr(needle, hay)
    }
}

/// Linear white space, folded line breaks included.
pub fn is_lws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

/// Trim LWS from both ends of `buf[s..e]`.
pub fn trim(buf: &[u8], mut s: usize, mut e: usize) -> (usize, usize) {
    while s < e && is_lws(at(buf, s)) {
        s += 1;
    }
    while e > s && is_lws(at(buf, e - 1)) {
        e -= 1;
    }
    (s, e)
}

/// Split a header value at top-level commas (outside quotes and angle brackets), yielding
/// trimmed spans relative to `base` (the value's offset in the message).
pub fn split_commas(value: &[u8], base: usize) -> impl Iterator<Item = Span> + '_ {
    let mut pos = 0;
    std::iter::from_fn(move || {
        while pos < value.len() {
            let start = pos;
            // Fast path: up to the first comma, quote or angle bracket nothing changes the
            // state below, so skip there in one tight loop.
            pos += tail(value, pos)
                .iter()
                .position(|b| matches!(b, b',' | b'"' | b'<'))
                .unwrap_or(value.len() - pos);
            let (mut quoted, mut angle, mut escaped) = (false, false, false);
            while pos < value.len() {
                let b = at(value, pos);
                if quoted {
                    if escaped {
                        escaped = false;
                    } else if b == b'\\' {
                        escaped = true;
                    } else if b == b'"' {
                        quoted = false;
                    }
                } else if b == b'"' {
                    quoted = true;
                } else if b == b'<' {
                    angle = true;
                } else if b == b'>' {
                    angle = false;
                } else if b == b',' && !angle {
                    break;
                }
                pos += 1;
            }
            let end = pos;
            pos += 1; // skip the comma
            let (s, e) = trim(value, start, end);
            if e > s {
                return Some(Span::new(base + s, base + e));
            }
        }
        None
    })
}

/// Iterate `;name[=value]` parameters in `buf[s..e]`, yielding (name, value) spans; the value span
/// is empty (start == end == name end) when there is no `=`.
pub fn params(buf: &[u8], s: usize, e: usize) -> impl Iterator<Item = (Span, Option<Span>)> + '_ {
    // Past the end of `buf` there is nothing to find (spans come from parsing `buf`).
    let e = e.min(buf.len());
    let mut pos = s;
    std::iter::from_fn(move || {
        while pos < e {
            match sub(buf, pos, e).iter().position(|b| *b == b';') {
                Some(i) => pos += i,
                None => {
                    pos = e;
                    break;
                }
            }
            let ps = pos + 1;
            // Fast path: before the first quote nothing is escaped or quoted, so the
            // parameter runs to the next ';' unless a quote comes first.
            let mut pe = ps
                + sub(buf, ps, e)
                    .iter()
                    .position(|b| matches!(b, b';' | b'"'))
                    .unwrap_or(e.saturating_sub(ps));
            let (mut quoted, mut escaped) = (false, false);
            while pe < e && (quoted || at(buf, pe) != b';') {
                match at(buf, pe) {
                    _ if escaped => escaped = false,
                    b'\\' if quoted => escaped = true,
                    b'"' => quoted = !quoted,
                    _ => {}
                }
                pe += 1;
            }
            pos = pe;
            let (ns, ne) = trim(buf, ps, pe);
            if ns == ne {
                continue;
            }
            return Some(match sub(buf, ns, ne).iter().position(|b| *b == b'=') {
                Some(i) => {
                    let (n0, n1) = trim(buf, ns, ns + i);
                    let (v0, v1) = trim(buf, ns + i + 1, ne);
                    (Span::new(n0, n1), Some(Span::new(v0, v1)))
                }
                None => (Span::new(ns, ne), None),
            });
        }
        None
    })
}

/// Offset just past the closing quote of the quoted string at the start of `v`.
pub fn quoted_end(v: &[u8]) -> Option<usize> {
    let mut i = 1;
    while i < v.len() {
        match at(v, i) {
            b'\\' => i += 2,
            b'"' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

/// `*( SEMI generic-param )`: every parameter has a token name and, after `=`, a non-empty
/// token, host or quoted string.
pub fn params_well_formed(v: &[u8]) -> bool {
    let (s, e) = trim(v, 0, v.len());
    let mut rest = sub(v, s, e);
    while let Some((&semi, after)) = rest.split_first() {
        if semi != b';' {
            return false;
        }
        // The parameter runs to the next ';' outside a quoted string.
        let mut end = 0;
        loop {
            match after.get(end) {
                None | Some(b';') => break,
                Some(b'"') => match quoted_end(tail(after, end)) {
                    Some(n) => end += n,
                    None => return false,
                },
                Some(_) => end += 1,
            }
        }
        let (p, next) = after.split_at_checked(end).unwrap_or((after, &[]));
        rest = next;
        let (name, value) = match memchr::memchr(b'=', p) {
            Some(i) => (sub(p, 0, i), Some(tail(p, i + 1))),
            None => (p, None),
        };
        let (a, b) = trim(name, 0, name.len());
        if a == b || !sub(name, a, b).iter().all(|c| scan::is_token(*c)) {
            return false;
        }
        if let Some(value) = value {
            let (a, b) = trim(value, 0, value.len());
            let value = sub(value, a, b);
            let ok = if value.first() == Some(&b'"') {
                quoted_end(value) == Some(value.len())
            } else {
                !value.is_empty()
                    && value
                        .iter()
                        .all(|c| scan::is_token(*c) || matches!(c, b':' | b'[' | b']'))
            };
            if !ok {
                return false;
            }
        }
    }
    true
}

/// Parse a decimal u16 port.
pub fn parse_port(b: &[u8]) -> Option<u16> {
    if b.is_empty() || b.len() > 5 || !b.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = b.iter().fold(0u32, |a, d| a * 10 + (d - b'0') as u32);
    u16::try_from(n).ok()
}
