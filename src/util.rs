//! Small shared helpers.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// A fast keyed-by-constant hash over several byte strings (with separators, so ("ab","c") and
/// ("a","bc") differ). For keys that need secrecy use [`keyed_hash64`].
pub fn hash64(parts: &[&[u8]]) -> u64 {
    keyed_hash64(&[0; 16], parts)
}

pub fn keyed_hash64(key: &[u8; 16], parts: &[&[u8]]) -> u64 {
    let mut h = SipHasher13::new_with_key(key);
    for p in parts {
        h.write(p);
        h.write_u8(0xff);
    }
    h.finish()
}

/// Lossy text of attacker bytes for logs and evidence: invalid UTF-8 and control characters
/// replaced, clipped to `max` characters.
pub fn printable(b: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(b);
    let mut out = String::with_capacity(s.len().min(max + 3));
    for (n, c) in s.chars().enumerate() {
        if n >= max {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { '·' } else { c });
    }
    out
}

/// An error and its sources, `outer: inner: innermost`, for log lines and CLI messages.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}
