//! Splice edits into the original message bytes: each edit replaces a byte range (an insert is
//! an empty range). The output is built in one pass; nothing else of the message is touched.

use std::io::Write;

use super::{sub, tail, Span};

#[derive(Debug, Clone, Copy)]
struct Op {
    at: Span,
    /// Range of the replacement text in `scratch`.
    text: (u32, u32),
    /// Insertion order, to keep inserts at the same offset in the order they were made.
    seq: u32,
}

/// A reusable list of edits; `clear()` keeps the allocations for the next message.
#[derive(Debug, Default)]
pub struct Edits {
    ops: Vec<Op>,
    scratch: Vec<u8>,
}

impl Edits {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn clear(&mut self) {
        self.ops.clear();
        self.scratch.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// Replace `at` with formatted text.
    pub fn replace_fmt(&mut self, at: Span, args: std::fmt::Arguments<'_>) {
        let start = self.scratch.len() as u32;
        // Writing into a Vec cannot fail.
        let _ = self.scratch.write_fmt(args);
        self.push(at, start);
    }

    pub fn replace(&mut self, at: Span, text: &[u8]) {
        let start = self.scratch.len() as u32;
        self.scratch.extend_from_slice(text);
        self.push(at, start);
    }

    /// Record an edit whose text is `scratch[start..]`.
    fn push(&mut self, at: Span, start: u32) {
        let end = self.scratch.len() as u32;
        let seq = self.ops.len() as u32;
        self.ops.push(Op {
            at,
            text: (start, end),
            seq,
        });
    }

    pub fn insert(&mut self, at: usize, text: &[u8]) {
        self.replace(Span::new(at, at), text);
    }

    pub fn insert_fmt(&mut self, at: usize, args: std::fmt::Arguments<'_>) {
        self.replace_fmt(Span::new(at, at), args);
    }

    /// Replace `at` with the text `write` appends to the buffer it is given. For the packet
    /// path: pieces pushed as bytes ([`push_dec`], [`push_hex`], [`push_ip`]) cost a fraction
    /// of the formatting machinery behind [`Edits::replace_fmt`].
    pub fn replace_with(&mut self, at: Span, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.scratch.len() as u32;
        write(&mut self.scratch);
        self.push(at, start);
    }

    /// Insert at `at` the text `write` appends (see [`Edits::replace_with`]).
    pub fn insert_with(&mut self, at: usize, write: impl FnOnce(&mut Vec<u8>)) {
        self.replace_with(Span::new(at, at), write);
    }

    pub fn delete(&mut self, at: Span) {
        self.replace(at, b"");
    }

    /// Write `src` with the edits applied into `out` (cleared first). Overlapping edits are a
    /// bug in the caller; the later-starting one is skipped rather than corrupting the output.
    pub fn apply(&mut self, src: &[u8], out: &mut Vec<u8>) {
        out.clear();
        self.ops.sort_by_key(|o| (o.at.start, o.at.end, o.seq));
        let mut pos = 0usize;
        for op in &self.ops {
            let (s, e) = (op.at.start as usize, op.at.end as usize);
            if s < pos || e > src.len() {
                continue;
            }
            out.extend_from_slice(sub(src, pos, s));
            out.extend_from_slice(sub(&self.scratch, op.text.0 as usize, op.text.1 as usize));
            pos = e;
        }
        out.extend_from_slice(tail(src, pos));
    }
}

/// Append `n` in decimal.
pub fn push_dec(out: &mut Vec<u8>, mut n: u64) {
    let mut digits = [0u8; 20];
    let mut i = digits.len();
    loop {
        i -= 1;
        if let Some(d) = digits.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    out.extend_from_slice(digits.get(i..).unwrap_or_default());
}

/// The low `width` hex digits of `n`, most significant first (lower case, zero-padded;
/// `width` at most 16).
pub fn hex_digits(n: u64, width: usize) -> impl Iterator<Item = u8> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    (0..width.min(16)).rev().map(move |i| {
        let d = ((n >> (4 * i)) & 0xf) as usize;
        HEX.get(d).copied().unwrap_or(b'0')
    })
}

/// Append the low `width` hex digits of `n` ([`hex_digits`]).
pub fn push_hex(out: &mut Vec<u8>, n: u64, width: usize) {
    out.extend(hex_digits(n, width));
}

/// Append an IP address as `Display` writes it (IPv6 without brackets).
pub fn push_ip(out: &mut Vec<u8>, ip: std::net::IpAddr) {
    match ip {
        std::net::IpAddr::V4(a) => {
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                push_dec(out, o.into());
            }
        }
        // Rarer, and its shortest form (RFC 5952) is not worth a second implementation.
        std::net::IpAddr::V6(a) => {
            let _ = write!(out, "{a}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splices_in_order() {
        let src = b"0123456789";
        let mut e = Edits::new();
        e.replace(Span::new(2, 4), b"ab");
        e.insert(0, b"X");
        e.insert(0, b"Y");
        e.delete(Span::new(8, 10));
        e.insert_fmt(5, format_args!("<{}>", 7));
        let mut out = Vec::new();
        e.apply(src, &mut out);
        assert_eq!(out, b"XY01ab4<7>567");
    }

    #[test]
    fn byte_writers_match_display() {
        for n in [0u64, 7, 10, 69, 5060, 65535, u64::MAX] {
            let mut v = Vec::new();
            push_dec(&mut v, n);
            assert_eq!(v, n.to_string().as_bytes());
        }
        let mut v = Vec::new();
        push_hex(&mut v, 0xabc, 6);
        push_hex(&mut v, u64::MAX, 16);
        assert_eq!(v, b"000abcffffffffffffffff");
        for ip in ["0.0.0.0", "192.0.2.255", "10.1.1.2", "::1", "2001:db8::7"] {
            let ip: std::net::IpAddr = ip.parse().unwrap();
            let mut v = Vec::new();
            push_ip(&mut v, ip);
            assert_eq!(v, ip.to_string().as_bytes());
        }
        let mut e = Edits::new();
        e.insert_with(1, |w| push_dec(w, 42));
        e.replace_with(Span::new(2, 3), |w| w.extend_from_slice(b"xy"));
        let mut out = Vec::new();
        e.apply(b"abc", &mut out);
        assert_eq!(out, b"a42bxy");
    }
}
