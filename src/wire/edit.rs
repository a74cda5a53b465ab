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
}
