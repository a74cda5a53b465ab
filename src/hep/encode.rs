//! HEP v3 (Homer Encapsulation Protocol) encoder: pure, no I/O.
//!
//! A packet is `"HEP3"`, the total length (u16, big-endian), then chunks of
//! `vendor (u16) | type (u16) | length (u16, header included) | payload`, all vendor 0
//! (generic). The chunk types used are those of the HEP3 specification.

use std::net::{IpAddr, SocketAddr};

/// Generic chunk types (vendor 0x0000).
pub mod chunk {
    pub const IP_FAMILY: u16 = 0x0001;
    pub const IP_PROTO: u16 = 0x0002;
    pub const IPV4_SRC: u16 = 0x0003;
    pub const IPV4_DST: u16 = 0x0004;
    pub const IPV6_SRC: u16 = 0x0005;
    pub const IPV6_DST: u16 = 0x0006;
    pub const SRC_PORT: u16 = 0x0007;
    pub const DST_PORT: u16 = 0x0008;
    pub const TIME_SEC: u16 = 0x0009;
    pub const TIME_USEC: u16 = 0x000a;
    pub const PROTO_TYPE: u16 = 0x000b;
    pub const CAPTURE_ID: u16 = 0x000c;
    pub const AUTH_KEY: u16 = 0x000e;
    pub const PAYLOAD: u16 = 0x000f;
    pub const CORRELATION_ID: u16 = 0x0011;
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
/// `PROTO_TYPE` value of SIP.
pub const PROTO_SIP: u8 = 1;

/// The whole packet's length is a u16: what does not fit is not exported.
pub const MAX_PACKET: usize = u16::MAX as usize;

/// One captured message.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub tcp: bool,
    /// Unix time of the capture.
    pub secs: u32,
    pub micros: u32,
    pub capture_id: u32,
    /// Empty: no authentication chunk.
    pub password: &'a [u8],
    /// Empty: no correlation chunk.
    pub correlation_id: &'a [u8],
    pub payload: &'a [u8],
}

fn put(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
    out.extend_from_slice(&0u16.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    // Callers keep every chunk under MAX_PACKET (checked in `encode`).
    out.extend_from_slice(&((data.len() + 6) as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// Encode `m` into `out` (cleared first). `None` when it would exceed [`MAX_PACKET`] or when
/// source and destination are of different families (IPv4 and IPv6: HEP cannot say that).
pub fn encode(m: &Message<'_>, out: &mut Vec<u8>) -> Option<()> {
    out.clear();
    let fixed = 6 + 7 + 7 + 2 * 16 + 2 * 8 + 2 * 10 + 7 + 10;
    let var = [m.password, m.correlation_id, m.payload]
        .iter()
        .map(|d| d.len() + 6)
        .sum::<usize>();
    if fixed + var > MAX_PACKET {
        return None;
    }
    out.extend_from_slice(b"HEP3");
    out.extend_from_slice(&[0, 0]);
    let (src_ip, dst_ip) = (m.src.ip(), m.dst.ip());
    match (src_ip, dst_ip) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            put(out, chunk::IP_FAMILY, &[AF_INET]);
            put(out, chunk::IP_PROTO, &[proto(m.tcp)]);
            put(out, chunk::IPV4_SRC, &s.octets());
            put(out, chunk::IPV4_DST, &d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            put(out, chunk::IP_FAMILY, &[AF_INET6]);
            put(out, chunk::IP_PROTO, &[proto(m.tcp)]);
            put(out, chunk::IPV6_SRC, &s.octets());
            put(out, chunk::IPV6_DST, &d.octets());
        }
        _ => return None,
    }
    put(out, chunk::SRC_PORT, &m.src.port().to_be_bytes());
    put(out, chunk::DST_PORT, &m.dst.port().to_be_bytes());
    put(out, chunk::TIME_SEC, &m.secs.to_be_bytes());
    put(out, chunk::TIME_USEC, &m.micros.to_be_bytes());
    put(out, chunk::PROTO_TYPE, &[PROTO_SIP]);
    put(out, chunk::CAPTURE_ID, &m.capture_id.to_be_bytes());
    if !m.password.is_empty() {
        put(out, chunk::AUTH_KEY, m.password);
    }
    if !m.correlation_id.is_empty() {
        put(out, chunk::CORRELATION_ID, m.correlation_id);
    }
    put(out, chunk::PAYLOAD, m.payload);
    let len = (out.len() as u16).to_be_bytes();
    out.get_mut(4..6)?.copy_from_slice(&len);
    Some(())
}

fn proto(tcp: bool) -> u8 {
    if tcp {
        IPPROTO_TCP
    } else {
        IPPROTO_UDP
    }
}

/// The value of the first header named one of `names` (any case), trimmed. Only the header
/// section is looked at, and continuation lines (starting with a space or tab) are skipped:
/// `Subject: x\r\n i: forged` carries no Call-ID, as the SIP parser reads it too.
fn header<'a>(msg: &'a [u8], names: &[&[u8]]) -> Option<&'a [u8]> {
    for line in msg.split(|b| *b == b'\n').skip(1) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.first().is_some_and(|b| matches!(b, b' ' | b'\t')) {
            continue;
        }
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name = line.get(..colon)?.trim_ascii();
        if names.iter().any(|n| name.eq_ignore_ascii_case(n)) {
            return line.get(colon + 1..).map(<[u8]>::trim_ascii);
        }
    }
    None
}

/// The Call-ID of a SIP message (full or compact `i:` name, any case), trimmed; at most
/// [`MAX_CALL_ID`] bytes.
pub fn call_id(msg: &[u8]) -> Option<&[u8]> {
    let v = header(msg, &[b"call-id", b"i"])?;
    (!v.is_empty()).then(|| v.get(..v.len().min(MAX_CALL_ID)).unwrap_or(v))
}

/// Call-IDs longer than this are cut (they are attacker data, and only a correlation key).
pub const MAX_CALL_ID: usize = 256;

/// The method a message belongs to: a request's method, or a response's CSeq method.
pub fn method(msg: &[u8]) -> Option<&[u8]> {
    let first = msg.split(|b| *b == b'\n').next()?;
    if !first.starts_with(b"SIP/2.0") {
        return first.split(|b| *b == b' ').next();
    }
    header(msg, &[b"cseq"])?.split(|b| *b == b' ').nth(1)
}

/// Whether a message belongs to an INVITE dialog (`hep.only = "dialogs"`).
pub fn is_dialog(msg: &[u8]) -> bool {
    matches!(
        method(msg),
        Some(b"INVITE" | b"ACK" | b"BYE" | b"CANCEL" | b"PRACK" | b"UPDATE" | b"INFO" | b"REFER")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walk the chunks of a packet: (type, payload).
    fn chunks(p: &[u8]) -> Vec<(u16, Vec<u8>)> {
        assert_eq!(&p[..4], b"HEP3");
        assert_eq!(u16::from_be_bytes([p[4], p[5]]) as usize, p.len());
        let mut out = vec![];
        let mut i = 6;
        while i < p.len() {
            assert_eq!(&p[i..i + 2], &[0, 0], "vendor 0");
            let t = u16::from_be_bytes([p[i + 2], p[i + 3]]);
            let l = u16::from_be_bytes([p[i + 4], p[i + 5]]) as usize;
            out.push((t, p[i + 6..i + l].to_vec()));
            i += l;
        }
        assert_eq!(i, p.len());
        out
    }

    const INVITE: &[u8] = b"INVITE sip:100@pbx SIP/2.0\r\nVia: SIP/2.0/UDP 10.0.0.1\r\ni:  abc@host \r\nCSeq: 1 INVITE\r\n\r\nv=0\r\nCall-ID: body\r\n";

    #[test]
    fn ipv4_udp_packet_per_spec() {
        let m = Message {
            src: "10.0.0.1:5062".parse().unwrap(),
            dst: "192.0.2.7:5060".parse().unwrap(),
            tcp: false,
            secs: 1_700_000_000,
            micros: 123_456,
            capture_id: 2001,
            password: b"",
            correlation_id: b"abc@host",
            payload: INVITE,
        };
        let mut out = vec![];
        encode(&m, &mut out).unwrap();
        let c = chunks(&out);
        let want: Vec<(u16, Vec<u8>)> = vec![
            (1, vec![2]),
            (2, vec![17]),
            (3, vec![10, 0, 0, 1]),
            (4, vec![192, 0, 2, 7]),
            (7, 5062u16.to_be_bytes().to_vec()),
            (8, 5060u16.to_be_bytes().to_vec()),
            (9, 1_700_000_000u32.to_be_bytes().to_vec()),
            (10, 123_456u32.to_be_bytes().to_vec()),
            (11, vec![1]),
            (12, 2001u32.to_be_bytes().to_vec()),
            (0x11, b"abc@host".to_vec()),
            (0x0f, INVITE.to_vec()),
        ];
        assert_eq!(c, want);
    }

    #[test]
    fn ipv6_tcp_with_password() {
        let m = Message {
            src: "[2001:db8::1]:5060".parse().unwrap(),
            dst: "[2001:db8::2]:5080".parse().unwrap(),
            tcp: true,
            secs: 1,
            micros: 2,
            capture_id: 7,
            password: b"secret",
            correlation_id: b"",
            payload: b"OPTIONS sip:x SIP/2.0\r\n\r\n",
        };
        let mut out = vec![];
        encode(&m, &mut out).unwrap();
        let c = chunks(&out);
        assert_eq!(c[0], (1, vec![10]));
        assert_eq!(c[1], (2, vec![6]));
        assert_eq!(c[2].0, 5);
        assert_eq!(c[2].1.len(), 16);
        assert!(c.contains(&(0x0e, b"secret".to_vec())));
        assert!(!c.iter().any(|(t, _)| *t == 0x11));
    }

    #[test]
    fn refuses_what_does_not_fit() {
        let big = vec![b'x'; MAX_PACKET];
        let mut m = Message {
            src: "10.0.0.1:1".parse().unwrap(),
            dst: "[::1]:2".parse().unwrap(),
            tcp: false,
            secs: 0,
            micros: 0,
            capture_id: 0,
            password: b"",
            correlation_id: b"",
            payload: b"x",
        };
        let mut out = vec![];
        assert!(encode(&m, &mut out).is_none(), "mixed families");
        m.dst = "10.0.0.2:2".parse().unwrap();
        m.payload = &big;
        assert!(encode(&m, &mut out).is_none(), "too big");
    }

    #[test]
    fn call_id_and_method() {
        assert_eq!(call_id(INVITE), Some(&b"abc@host"[..]));
        assert_eq!(
            call_id(b"SIP/2.0 200 OK\r\ncall-id:x\r\n\r\n"),
            Some(&b"x"[..])
        );
        assert_eq!(call_id(b"garbage"), None);
        assert_eq!(call_id(b"A\r\nCall-ID:   \r\n"), None);
        let long = [b"A\r\nCall-ID: ".as_slice(), &[b'y'; 1000]].concat();
        assert_eq!(call_id(&long).map(<[u8]>::len), Some(MAX_CALL_ID));
        // A folded line is part of the header before it, never a Call-ID of its own.
        let folded = b"OPTIONS sip:x SIP/2.0\r\nSubject: x\r\n i: victim\r\nCall-ID: own\r\n\r\n";
        assert_eq!(call_id(folded), Some(&b"own"[..]));
        let folded_cseq = b"SIP/2.0 200 OK\r\nTo: <sip:a>\r\n\tCSeq: 1 INVITE\r\n\r\n";
        assert_eq!(method(folded_cseq), None);
        assert!(is_dialog(INVITE));
        assert!(is_dialog(b"SIP/2.0 180 Ringing\r\nCSeq: 1 INVITE\r\n\r\n"));
        assert!(!is_dialog(b"REGISTER sip:x SIP/2.0\r\n\r\n"));
        assert!(!is_dialog(b"SIP/2.0 401 No\r\nCSeq: 2 REGISTER\r\n\r\n"));
        assert!(!is_dialog(b""));
    }
}
