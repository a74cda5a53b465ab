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

/// Lossy text of attacker bytes for logs and evidence: invalid UTF-8, control characters and
/// the invisible ones that reorder or hide text on screen (bidi controls, zero-width marks)
/// replaced, clipped to `max` characters.
pub fn printable(b: &[u8], max: usize) -> String {
    // A character takes at most 4 bytes: what lies beyond cannot change the result, and is not
    // copied.
    let b = b
        .get(..b.len().min(max.saturating_add(1).saturating_mul(4)))
        .unwrap_or(b);
    let s = String::from_utf8_lossy(b);
    let mut out = String::with_capacity(s.len().min(max + 3));
    for (n, c) in s.chars().enumerate() {
        if n >= max {
            out.push('…');
            break;
        }
        out.push(if c.is_control() || hides_text(c) {
            '·'
        } else {
            c
        });
    }
    out
}

/// Format characters that make shown text differ from what it is: bidi embeddings, overrides
/// and isolates, zero-width spaces and joiners, direction marks, the byte-order mark.
fn hides_text(c: char) -> bool {
    matches!(c, '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
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

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn printable_hides_what_would_disguise_text_and_reads_only_what_it_shows() {
        assert_eq!(printable(b"INVITE sip:a\x00b", 20), "INVITE sip:a·b");
        // A right-to-left override would show "evil" reversed in the dashboard.
        assert_eq!(printable("a\u{202E}live".as_bytes(), 20), "a·live");
        assert_eq!(printable("x\u{200B}y\u{FEFF}".as_bytes(), 20), "x·y·");
        // Cut to the limit, multi-byte characters whole, the same with a long tail or without.
        let long = "é".repeat(10_000);
        assert_eq!(printable(long.as_bytes(), 5), "ééééé…");
        assert_eq!(printable("ééééé".as_bytes(), 5), "ééééé");
        assert_eq!(printable(&[0xff; 100_000], 3), "\u{FFFD}\u{FFFD}\u{FFFD}…");
    }
}
