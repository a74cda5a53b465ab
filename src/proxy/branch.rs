//! Our Via branch: deterministic (a request, its retransmissions, its CANCEL and the ACK of a
//! non-2xx answer all get the same one, as RFC 3261 §16.11 asks of a stateless proxy) and
//! authenticated: it carries a MAC over where the response must go, so a response we did not
//! cause is recognised and dropped instead of being routed wherever its Via chain says.
//!
//! Layout: `z9hG4bKsw2` + transaction (16 hex) + loop (8 hex) + MAC (16 hex). The MAC covers
//! the transaction and loop parts, the Call-ID, the CSeq number and the next hop's address as we
//! stamped it (`received`/`rport` of the Via below ours): everything a response echoes and a
//! CANCEL shares with its INVITE. Whether the request carried credentials (and which) goes in a
//! separate `swa` parameter with its own MAC, since the CANCEL carries none.

use super::flow::Flow;
use super::keys::{parse_hex, Domain, Keys};
use crate::stats::Transport;
use crate::wire::edit::hex_digits;

/// Every branch we mint starts with this (magic cookie, our mark, layout version).
pub const PREFIX: &[u8] = b"z9hG4bKsw2";
/// Our mark alone, for recognising branches of any layout version.
pub const MARK: &[u8] = b"z9hG4bKsw";
/// The Via parameter naming the attempt (credentials fingerprint) a request carried.
pub const ATTEMPT_PARAM: &[u8] = b"swa";

const TX_HEX: usize = 16;
const LOOP_HEX: usize = 8;
const MAC_HEX: usize = 16;
const ATTEMPT_MAC_BITS: u32 = 48;

/// The parts of one of our branches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Branch {
    pub tx: u64,
    pub loop_hash: u32,
    pub mac: u64,
}

/// What the MAC binds a branch to.
pub struct Binding<'a> {
    pub call_id: &'a [u8],
    pub cseq: u32,
    /// Where the response goes: the next Via's address as we stamped it.
    pub next_hop: Flow,
}

fn mac(keys: &Keys, tx: u64, loop_hash: u32, b: &Binding<'_>) -> u64 {
    let (ids, ip, n) = mac_parts(tx, loop_hash, b);
    keys.mac(
        Domain::Response,
        &[&ids, b.call_id, ip.get(..n).unwrap_or(&[])],
    )
}

/// The fixed-size inputs of the MAC (no allocation on the packet path): transaction, loop,
/// CSeq, next-hop transport and port; and the next hop's IP bytes.
fn mac_parts(tx: u64, loop_hash: u32, b: &Binding<'_>) -> ([u8; 19], [u8; 16], usize) {
    let mut ids = [0u8; 19];
    ids[..8].copy_from_slice(&tx.to_be_bytes());
    ids[8..12].copy_from_slice(&loop_hash.to_be_bytes());
    ids[12..16].copy_from_slice(&b.cseq.to_be_bytes());
    ids[16] = match b.next_hop.transport {
        Transport::Udp => b'u',
        Transport::Tcp => b't',
        Transport::Ws => b'w',
        Transport::Wss => b'x',
        Transport::Tls => b's',
    };
    ids[17..].copy_from_slice(&b.next_hop.addr.port().to_be_bytes());
    let mut ip = [0u8; 16];
    let n = match b.next_hop.addr.ip() {
        std::net::IpAddr::V4(a) => {
            ip[..4].copy_from_slice(&a.octets());
            4
        }
        std::net::IpAddr::V6(a) => {
            ip = a.octets();
            16
        }
    };
    (ids, ip, n)
}

impl Branch {
    /// Mint the branch for a request with these transaction and loop parts.
    pub fn mint(keys: &Keys, tx: u64, loop_hash: u32, b: &Binding<'_>) -> Branch {
        Branch {
            tx,
            loop_hash,
            mac: mac(keys, tx, loop_hash, b),
        }
    }

    /// Parse one of our branches (any other value: `None`).
    pub fn parse(v: &[u8]) -> Option<Branch> {
        let hex = v.strip_prefix(PREFIX)?;
        if hex.len() != TX_HEX + LOOP_HEX + MAC_HEX {
            return None;
        }
        let (tx, rest) = hex.split_at_checked(TX_HEX)?;
        let (lp, mac) = rest.split_at_checked(LOOP_HEX)?;
        Some(Branch {
            tx: u64::try_from(parse_hex(tx, TX_HEX)?).ok()?,
            loop_hash: u32::try_from(parse_hex(lp, LOOP_HEX)?).ok()?,
            mac: u64::try_from(parse_hex(mac, MAC_HEX)?).ok()?,
        })
    }

    /// Is this branch one we minted for a request bound to `b`?
    pub fn verify(&self, keys: &Keys, b: &Binding<'_>) -> bool {
        let (ids, ip, n) = mac_parts(self.tx, self.loop_hash, b);
        let parts: [&[u8]; 3] = [&ids, b.call_id, ip.get(..n).unwrap_or(&[])];
        keys.verify(Domain::Response, &parts, self.mac, 64)
    }
}

/// Length of a branch of ours as text.
pub const TEXT_LEN: usize = PREFIX.len() + TX_HEX + LOOP_HEX + MAC_HEX;

impl Branch {
    /// The branch as text, on the stack (no formatting machinery: this is on every request).
    pub fn text(&self) -> [u8; TEXT_LEN] {
        let mut t = [0u8; TEXT_LEN];
        let digits = PREFIX
            .iter()
            .copied()
            .chain(hex_digits(self.tx, TX_HEX))
            .chain(hex_digits(self.loop_hash.into(), LOOP_HEX))
            .chain(hex_digits(self.mac, MAC_HEX));
        for (d, s) in t.iter_mut().zip(digits) {
            *d = s;
        }
        t
    }
}

impl std::fmt::Display for Branch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(std::str::from_utf8(&self.text()).unwrap_or_default())
    }
}

/// Length of the `swa` parameter's value: fingerprint and MAC in hex.
pub const ATTEMPT_LEN: usize = 16 + 12;

/// The `swa` value for a request whose credentials fingerprint is `fp`, bound to its branch.
pub fn attempt_param(keys: &Keys, branch: &Branch, fp: u64) -> [u8; ATTEMPT_LEN] {
    let tag = keys.mac(Domain::Attempt, &[&branch.text(), &fp.to_be_bytes()])
        & ((1 << ATTEMPT_MAC_BITS) - 1);
    let mut t = [0u8; ATTEMPT_LEN];
    let digits = hex_digits(fp, 16).chain(hex_digits(tag, 12));
    for (d, s) in t.iter_mut().zip(digits) {
        *d = s;
    }
    t
}

/// Verify an `swa` value against the branch it came with: the fingerprint, or `None`.
pub fn parse_attempt(keys: &Keys, branch_text: &[u8], v: &[u8]) -> Option<u64> {
    let (fp, tag) = v.split_at_checked(16)?;
    let fp = u64::try_from(parse_hex(fp, 16)?).ok()?;
    let tag = u64::try_from(parse_hex(tag, 12)?).ok()?;
    keys.verify(
        Domain::Attempt,
        &[branch_text, &fp.to_be_bytes()],
        tag,
        ATTEMPT_MAC_BITS,
    )
    .then_some(fp)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    fn binding(addr: &str) -> Binding<'static> {
        Binding {
            call_id: b"call-1@phone",
            cseq: 7,
            next_hop: Flow {
                transport: Transport::Udp,
                addr: addr.parse().unwrap(),
            },
        }
    }

    #[test]
    fn mac_binds_the_next_hop_and_the_transaction() {
        let keys = Keys::new([5; 16], None);
        let b = Branch::mint(&keys, 0x1234, 0xabcd, &binding("192.0.2.7:5062"));
        let text = b.to_string();
        let parsed = Branch::parse(text.as_bytes()).unwrap();
        assert_eq!(parsed, b);
        assert!(parsed.verify(&keys, &binding("192.0.2.7:5062")));
        // Another destination: the attack of steering a response anywhere.
        assert!(!parsed.verify(&keys, &binding("127.0.0.1:5060")));
        assert!(!parsed.verify(&keys, &binding("192.0.2.7:5063")));
        let mut other = binding("192.0.2.7:5062");
        other.call_id = b"call-2@phone";
        assert!(!parsed.verify(&keys, &other));
        other = binding("192.0.2.7:5062");
        other.next_hop.transport = Transport::Tcp;
        assert!(!parsed.verify(&keys, &other));
        // Another key (a forger): nothing verifies.
        assert!(!parsed.verify(&Keys::new([6; 16], None), &binding("192.0.2.7:5062")));
        // Rotation: the previous key still verifies responses to requests sent before it.
        assert!(parsed.verify(
            &Keys::new([6; 16], Some([5; 16])),
            &binding("192.0.2.7:5062")
        ));
    }

    #[test]
    fn parse_rejects_everything_else() {
        for v in [
            &b""[..],
            b"z9hG4bK",
            b"z9hG4bKsw2",
            b"z9hG4bKsw20000",
            "z9hG4bKsw2é000000000000000000000000000000000000000".as_bytes(),
            b"z9hG4bKswa0123456789abcdef.01234567",
        ] {
            assert_eq!(Branch::parse(v), None, "{v:?}");
        }
    }

    #[test]
    fn attempt_fingerprint_is_bound_to_its_branch() {
        let keys = Keys::new([5; 16], None);
        let b = Branch::mint(&keys, 1, 2, &binding("192.0.2.7:5062"));
        let other = Branch::mint(&keys, 3, 2, &binding("192.0.2.7:5062"));
        let swa = attempt_param(&keys, &b, 0xfeed);
        let text = b.to_string();
        assert_eq!(parse_attempt(&keys, text.as_bytes(), &swa), Some(0xfeed));
        assert_eq!(
            parse_attempt(&keys, other.to_string().as_bytes(), &swa),
            None
        );
        assert_eq!(parse_attempt(&keys, text.as_bytes(), b"00"), None);
    }
}
