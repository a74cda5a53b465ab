//! Flow tokens: the user part of our Path and Record-Route URIs names the phone's real transport
//! address (RFC 5626 idea), so the PBX's requests find a phone behind NAT or on its own TCP
//! connection. A keyed MAC makes them unforgeable: a token we did not mint routes nowhere.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::stats::Transport;
use crate::util::keyed_hash64;

/// Where a phone really is: the transport and the address its packets come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Flow {
    pub transport: Transport,
    pub addr: SocketAddr,
}

const PREFIX: &str = "sw";
const MAC_HEX: usize = 12;

fn mac(key: &[u8; 16], f: &Flow) -> u64 {
    let t = [match f.transport {
        Transport::Udp => b'u',
        Transport::Tcp => b't',
    }];
    let ip = match f.addr.ip() {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    };
    keyed_hash64(key, &[&t, &ip, &f.addr.port().to_be_bytes()]) & 0xffff_ffff_ffff
}

/// Append the token for `f` to `out`.
pub fn encode(key: &[u8; 16], f: &Flow, out: &mut impl std::fmt::Write) {
    let t = match f.transport {
        Transport::Udp => 'u',
        Transport::Tcp => 't',
    };
    let _ = write!(out, "{PREFIX}{t}");
    match f.addr.ip() {
        IpAddr::V4(a) => {
            let _ = write!(out, "{:08x}", u32::from(a));
        }
        IpAddr::V6(a) => {
            let _ = write!(out, "{:032x}", u128::from(a));
        }
    }
    let _ = write!(out, "{:04x}{:012x}", f.addr.port(), mac(key, f));
}

pub fn to_string(key: &[u8; 16], f: &Flow) -> String {
    let mut s = String::with_capacity(64);
    encode(key, f, &mut s);
    s
}

/// Decode and verify a token; `None` for anything we did not mint.
pub fn decode(key: &[u8; 16], tok: &[u8]) -> Option<Flow> {
    let rest = tok.strip_prefix(PREFIX.as_bytes())?;
    let (&t, hex) = rest.split_first()?;
    let transport = match t {
        b'u' => Transport::Udp,
        b't' => Transport::Tcp,
        _ => return None,
    };
    let hex = std::str::from_utf8(hex).ok()?;
    let ip_len = match hex.len() {
        n if n == 8 + 4 + MAC_HEX => 8,
        n if n == 32 + 4 + MAC_HEX => 32,
        _ => return None,
    };
    let ip = if ip_len == 8 {
        IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(&hex[..8], 16).ok()?))
    } else {
        IpAddr::V6(Ipv6Addr::from(u128::from_str_radix(&hex[..32], 16).ok()?))
    };
    let port = u16::from_str_radix(&hex[ip_len..ip_len + 4], 16).ok()?;
    let tag = u64::from_str_radix(&hex[ip_len + 4..], 16).ok()?;
    let flow = Flow {
        transport,
        addr: SocketAddr::new(ip, port),
    };
    (mac(key, &flow) == tag).then_some(flow)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_forgery() {
        let key = [7u8; 16];
        for addr in ["192.0.2.7:5062", "[2001:db8::1]:40000"] {
            let f = Flow {
                transport: Transport::Tcp,
                addr: addr.parse().unwrap(),
            };
            let tok = to_string(&key, &f);
            assert_eq!(decode(&key, tok.as_bytes()), Some(f));
            let mut forged = tok.clone().into_bytes();
            let last = forged.len() - 1;
            forged[last] = if forged[last] == b'0' { b'1' } else { b'0' };
            assert_eq!(decode(&key, &forged), None);
            assert_eq!(decode(&[8u8; 16], tok.as_bytes()), None, "other key");
        }
        assert_eq!(decode(&key, b"alice"), None);
        assert_eq!(decode(&key, b"swu"), None);
        assert_eq!(decode(&key, b"swuzzzzzzzzzzzzzzzzzzzzzzzz"), None);
    }
}
