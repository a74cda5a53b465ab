//! Flow tokens: the user part of our Path and Record-Route URIs names where a phone is really
//! reached (RFC 5626 idea): its transport address (behind NAT, on its own TCP connection) or the
//! Contact it registered (when it is not behind NAT). A keyed MAC makes them unforgeable: a
//! token we did not mint routes nowhere.
//!
//! Layout: `sw` + `u`|`t`|`w`|`x` (udp, tcp, ws, wss) + 8 or 32 hex digits (IPv4/IPv6) + 4 (port) + 12 (MAC).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::keys::{parse_hex, Domain, Keys};
use crate::stats::Transport;
use crate::wire::edit::push_hex;

/// Where a phone really is: the transport and the address its packets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    pub addr: SocketAddr,
}

/// Every token starts with this (a user part that starts with it and does not verify is a
/// token that failed, answered 430, not a user name).
pub const PREFIX: &[u8] = b"sw";
const MAC_HEX: usize = 12;
const MAC_BITS: u32 = 48;

fn transport_char(t: Transport) -> u8 {
    match t {
        Transport::Udp => b'u',
        Transport::Tcp => b't',
        Transport::Ws => b'w',
        Transport::Wss => b'x',
        Transport::Tls => b's',
    }
}

fn mac_parts(f: &Flow, ip: &mut [u8; 16]) -> ([u8; 1], usize, [u8; 2]) {
    let n = match f.addr.ip() {
        IpAddr::V4(a) => {
            ip[..4].copy_from_slice(&a.octets());
            4
        }
        IpAddr::V6(a) => {
            *ip = a.octets();
            16
        }
    };
    (
        [transport_char(f.transport)],
        n,
        f.addr.port().to_be_bytes(),
    )
}

fn mac(keys: &Keys, f: &Flow) -> u64 {
    let mut ip = [0u8; 16];
    let (t, n, port) = mac_parts(f, &mut ip);
    keys.mac(Domain::Flow, &[&t, ip.get(..n).unwrap_or(&[]), &port]) & ((1 << MAC_BITS) - 1)
}

fn verifies(keys: &Keys, f: &Flow, tag: u64) -> bool {
    let mut ip = [0u8; 16];
    let (t, n, port) = mac_parts(f, &mut ip);
    keys.verify(
        Domain::Flow,
        &[&t, ip.get(..n).unwrap_or(&[]), &port],
        tag,
        MAC_BITS,
    )
}

/// Append the token for `f` to `out`.
pub fn encode(keys: &Keys, f: &Flow, out: &mut impl std::fmt::Write) {
    let t = char::from(transport_char(f.transport));
    let _ = write!(out, "sw{t}");
    match f.addr.ip() {
        IpAddr::V4(a) => {
            let _ = write!(out, "{:08x}", u32::from(a));
        }
        IpAddr::V6(a) => {
            let _ = write!(out, "{:032x}", u128::from(a));
        }
    }
    let _ = write!(out, "{:04x}{:012x}", f.addr.port(), mac(keys, f));
}

pub fn to_string(keys: &Keys, f: &Flow) -> String {
    let mut s = String::with_capacity(64);
    encode(keys, f, &mut s);
    s
}

/// [`encode`] as bytes appended to `out`, without the formatting machinery (a token goes into
/// every Record-Route and Path we add).
pub fn push_token(keys: &Keys, f: &Flow, out: &mut Vec<u8>) {
    out.extend_from_slice(PREFIX);
    out.push(transport_char(f.transport));
    match f.addr.ip() {
        IpAddr::V4(a) => push_hex(out, u32::from(a).into(), 8),
        IpAddr::V6(a) => {
            let n = u128::from(a);
            push_hex(out, (n >> 64) as u64, 16);
            push_hex(out, n as u64, 16);
        }
    }
    push_hex(out, f.addr.port().into(), 4);
    push_hex(out, mac(keys, f), MAC_HEX);
}

/// Does this user part look like one of our tokens (verified or not)?
pub fn looks_like_token(user: &[u8]) -> bool {
    user.strip_prefix(PREFIX)
        .and_then(|r| r.first())
        .is_some_and(|t| matches!(t, b'u' | b't' | b'w' | b'x'))
}

/// Decode and verify a token; `None` for anything we did not mint (with the current key or,
/// during rotation, the previous one). Works on bytes only: any length, any byte, never a panic.
pub fn decode(keys: &Keys, tok: &[u8]) -> Option<Flow> {
    let rest = tok.strip_prefix(PREFIX)?;
    let (&t, hex) = rest.split_first()?;
    let transport = match t {
        b'u' => Transport::Udp,
        b't' => Transport::Tcp,
        b'w' => Transport::Ws,
        b'x' => Transport::Wss,
        b's' => Transport::Tls,
        _ => return None,
    };
    let ip_len = match hex.len() {
        n if n == 8 + 4 + MAC_HEX => 8,
        n if n == 32 + 4 + MAC_HEX => 32,
        _ => return None,
    };
    let (ip_hex, rest) = hex.split_at_checked(ip_len)?;
    let (port_hex, mac_hex) = rest.split_at_checked(4)?;
    let ip_n = parse_hex(ip_hex, ip_len)?;
    let ip = if ip_len == 8 {
        IpAddr::V4(Ipv4Addr::from(u32::try_from(ip_n).ok()?))
    } else {
        IpAddr::V6(Ipv6Addr::from(ip_n))
    };
    let port = u16::try_from(parse_hex(port_hex, 4)?).ok()?;
    let tag = u64::try_from(parse_hex(mac_hex, MAC_HEX)?).ok()?;
    let flow = Flow {
        transport,
        addr: SocketAddr::new(ip, port),
    };
    verifies(keys, &flow, tag).then_some(flow)
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_forgery() {
        let keys = Keys::new([7u8; 16], None);
        for addr in ["192.0.2.7:5062", "[2001:db8::1]:40000"] {
            let f = Flow {
                transport: Transport::Tcp,
                addr: addr.parse().unwrap(),
            };
            let tok = to_string(&keys, &f);
            let mut bytes = Vec::new();
            push_token(&keys, &f, &mut bytes);
            assert_eq!(bytes, tok.as_bytes());
            assert!(looks_like_token(tok.as_bytes()));
            assert_eq!(decode(&keys, tok.as_bytes()), Some(f));
            let mut forged = tok.clone().into_bytes();
            let last = forged.len() - 1;
            forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
            assert_eq!(decode(&keys, &forged), None);
            assert_eq!(
                decode(&Keys::new([8u8; 16], None), tok.as_bytes()),
                None,
                "other key"
            );
            assert_eq!(
                decode(&Keys::new([8u8; 16], Some([7u8; 16])), tok.as_bytes()),
                Some(f),
                "previous key during rotation"
            );
        }
        assert_eq!(decode(&keys, b"alice"), None);
        assert_eq!(decode(&keys, b"swu"), None);
        assert_eq!(decode(&keys, b"swuzzzzzzzzzzzzzzzzzzzzzzzz"), None);
    }

    #[test]
    fn multibyte_utf8_anywhere_is_rejected_without_panic() {
        let keys = Keys::new([7u8; 16], None);
        // The token from the issue: a two-byte character at offset 7 of the 24 digits.
        assert_eq!(decode(&keys, "swu1234567é123456789012345".as_bytes()), None);
        let base = "swu".to_string() + &"0".repeat(24);
        for i in 3..base.len() {
            for c in ["é", "€", "\u{10348}", "\u{0}", "+", "-"] {
                let mut s = base.clone();
                s.replace_range(i..=i, c);
                assert_eq!(decode(&keys, s.as_bytes()), None, "{s:?}");
                let mut t = s.into_bytes();
                t.truncate(t.len().saturating_sub(1));
                assert_eq!(decode(&keys, &t), None);
            }
        }
    }
}
