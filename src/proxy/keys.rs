//! The routing key: what signs our flow tokens and authenticates our Via branches. It must
//! outlive the process (a restart must not orphan every registered phone) and may be shared by
//! several nodes; rotation keeps verifying with the previous key for a grace period.

use std::hash::Hasher;

use siphasher::sip::SipHasher13;

/// What a MAC is for: the same key never signs two kinds of thing with the same input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Domain {
    /// A flow token (Path, Record-Route, contact-mode Contact).
    Flow = 1,
    /// The transaction part of our branch.
    Transaction = 2,
    /// The branch's MAC over where the response must go.
    Response = 3,
    /// The attempt fingerprint carried to the response (`swa` Via parameter).
    Attempt = 4,
    /// The loop-detection part of our branch.
    Loop = 5,
}

/// The current key (mints and verifies) and the previous one (verifies only, during rotation).
#[derive(Clone, PartialEq, Eq)]
pub struct Keys {
    current: [u8; 16],
    previous: Option<[u8; 16]>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Keys")
            .field("previous", &self.previous.is_some())
            .finish_non_exhaustive()
    }
}

impl Keys {
    pub fn new(current: [u8; 16], previous: Option<[u8; 16]>) -> Self {
        let previous = previous.filter(|p| *p != current);
        Self { current, previous }
    }

    /// A fresh random key (tests, and a first start without a stored key).
    pub fn random() -> Self {
        let mut k = [0u8; 16];
        rand::fill(&mut k);
        Self::new(k, None)
    }

    pub fn current(&self) -> &[u8; 16] {
        &self.current
    }

    pub fn previous(&self) -> Option<&[u8; 16]> {
        self.previous.as_ref()
    }

    /// MAC with the current key.
    pub fn mac(&self, domain: Domain, parts: &[&[u8]]) -> u64 {
        mac_with(&self.current, domain, parts)
    }

    /// Does `tag` (the low `bits` bits of a MAC) verify under the current or previous key?
    pub fn verify(&self, domain: Domain, parts: &[&[u8]], tag: u64, bits: u32) -> bool {
        let mask = if bits >= 64 {
            u64::MAX
        } else {
            (1u64 << bits) - 1
        };
        std::iter::once(&self.current)
            .chain(self.previous.iter())
            .any(|k| mac_with(k, domain, parts) & mask == tag)
    }
}

/// SipHash-1-3 keyed MAC over length-prefixed parts (so no two part lists collide by moving
/// bytes between parts, whatever bytes an attacker puts in them).
fn mac_with(key: &[u8; 16], domain: Domain, parts: &[&[u8]]) -> u64 {
    let mut h = SipHasher13::new_with_key(key);
    h.write_u8(domain as u8);
    for p in parts {
        h.write_u64(p.len() as u64);
        h.write(p);
    }
    h.finish()
}

/// The routing keys as kept in the state store: the current key, and the previous one with the
/// time it was retired (unix ms).
#[derive(Clone, PartialEq, Eq)]
pub struct StoredKeys {
    pub current: [u8; 16],
    pub previous: Option<([u8; 16], u64)>,
}

impl std::fmt::Debug for StoredKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKeys")
            .field("retired_at", &self.previous.map(|p| p.1))
            .finish_non_exhaustive()
    }
}

/// Decide the keys at start: the configured key if any, else the stored one, else `fresh`.
/// When the key in force changes, the one it replaces is kept as `previous` (verify only) for
/// `grace_ms`. Returns the keys to use and what the store must hold (`None`: unchanged).
pub fn resolve(
    configured: Option<[u8; 16]>,
    stored: Option<&StoredKeys>,
    now: u64,
    grace_ms: u64,
    fresh: [u8; 16],
) -> (Keys, Option<StoredKeys>) {
    let live_previous =
        |p: Option<([u8; 16], u64)>| p.filter(|(_, at)| now.saturating_sub(*at) < grace_ms);
    let next = match (configured, stored) {
        (Some(k), Some(s)) if k == s.current => StoredKeys {
            current: k,
            previous: live_previous(s.previous),
        },
        (Some(k), Some(s)) => StoredKeys {
            current: k,
            previous: Some((s.current, now)),
        },
        (Some(k), None) => StoredKeys {
            current: k,
            previous: None,
        },
        (None, Some(s)) => StoredKeys {
            current: s.current,
            previous: live_previous(s.previous),
        },
        (None, None) => StoredKeys {
            current: fresh,
            previous: None,
        },
    };
    let keys = Keys::new(next.current, next.previous.map(|p| p.0));
    let changed = stored != Some(&next);
    (keys, changed.then_some(next))
}

/// Parse a key written as hex digits: 32 (16 bytes, used as they are) up to 128 (longer keys,
/// e.g. from `openssl rand -hex 32`, are condensed to 16 bytes with SipHash-1-3-128).
pub fn parse_hex_key(s: &str) -> Option<[u8; 16]> {
    let b = s.trim().as_bytes();
    if b.len() < 32 || b.len() > 128 || !b.len().is_multiple_of(2) {
        return None;
    }
    let mut bytes = Vec::with_capacity(b.len() / 2);
    for pair in b.chunks_exact(2) {
        let hi = hex_digit(*pair.first()?)?;
        let lo = hex_digit(*pair.get(1)?)?;
        bytes.push(hi << 4 | lo);
    }
    if let Ok(k) = <[u8; 16]>::try_from(bytes.as_slice()) {
        return Some(k);
    }
    use siphasher::sip128::Hasher128;
    let mut h = siphasher::sip128::SipHasher13::new_with_key(b"sipwarden-flowky");
    h.write(&bytes);
    Some(h.finish128().as_bytes())
}

pub fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Parse exactly `digits` hex digits (at most 32) from `b` into a number; `None` for anything
/// else (wrong length, non-hex bytes, multi-byte UTF-8).
pub fn parse_hex(b: &[u8], digits: usize) -> Option<u128> {
    if b.len() != digits || digits > 32 {
        return None;
    }
    b.iter()
        .try_fold(0u128, |acc, &c| Some(acc << 4 | u128::from(hex_digit(c)?)))
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn rotation_verifies_previous_but_mints_current() {
        let old = Keys::new([1; 16], None);
        let tag = old.mac(Domain::Flow, &[b"x"]);
        let rotated = Keys::new([2; 16], Some([1; 16]));
        assert!(rotated.verify(Domain::Flow, &[b"x"], tag, 64));
        assert_ne!(rotated.mac(Domain::Flow, &[b"x"]), tag);
        let fresh = Keys::new([3; 16], None);
        assert!(!fresh.verify(Domain::Flow, &[b"x"], tag, 64));
    }

    #[test]
    fn domains_and_part_boundaries_separate() {
        let k = Keys::new([9; 16], None);
        assert_ne!(k.mac(Domain::Flow, &[b"ab"]), k.mac(Domain::Loop, &[b"ab"]));
        assert_ne!(
            k.mac(Domain::Flow, &[b"a\xff", b"b"]),
            k.mac(Domain::Flow, &[b"a", b"\xffb"])
        );
    }

    #[test]
    fn resolve_keeps_rotates_and_expires() {
        let day = 86_400_000;
        // First start: a fresh key, to be stored.
        let (k, save) = resolve(None, None, 0, day, [1; 16]);
        assert_eq!(k.current(), &[1; 16]);
        let stored = save.unwrap();
        // Restart: the stored key, nothing to save.
        let (k, save) = resolve(None, Some(&stored), 10, day, [2; 16]);
        assert_eq!(k.current(), &[1; 16]);
        assert!(save.is_none());
        // The operator configures a key: it takes over, the old one verifies for the grace.
        let (k, save) = resolve(Some([3; 16]), Some(&stored), 100, day, [2; 16]);
        assert_eq!(k.current(), &[3; 16]);
        assert_eq!(k.previous(), Some(&[1; 16]));
        let rotated = save.unwrap();
        assert_eq!(rotated.previous, Some(([1; 16], 100)));
        // Within the grace the previous key stays; after it, it is dropped.
        let (k, save) = resolve(Some([3; 16]), Some(&rotated), day, day, [2; 16]);
        assert_eq!(k.previous(), Some(&[1; 16]));
        assert!(save.is_none());
        let (k, save) = resolve(Some([3; 16]), Some(&rotated), day + 101, day, [2; 16]);
        assert_eq!(k.previous(), None);
        assert_eq!(save.unwrap().previous, None);
    }

    #[test]
    fn hex_parsing_is_strict() {
        assert_eq!(parse_hex(b"00ff", 4), Some(255));
        assert_eq!(parse_hex(b"00f", 4), None);
        assert_eq!(parse_hex("0é1".as_bytes(), 4), None);
        assert_eq!(
            parse_hex(b"+0ff", 4),
            None,
            "from_str_radix would accept a sign"
        );
        assert_eq!(parse_hex_key(&"ab".repeat(16)), Some([0xab; 16]));
        assert_eq!(parse_hex_key("abc"), None);
        assert_eq!(parse_hex_key(&"g".repeat(32)), None);
        let long = parse_hex_key(&"ab".repeat(20)).unwrap();
        assert_ne!(long, [0xab; 16]);
        assert_eq!(parse_hex_key(&"ab".repeat(20)), Some(long), "deterministic");
        assert_eq!(parse_hex_key(&"a".repeat(33)), None, "odd length");
    }
}
