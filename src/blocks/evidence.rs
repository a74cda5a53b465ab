//! Captured packets as a block's evidence: who sent what to whom, over what, and when, so the
//! dashboard can draw the exchange as a ladder (source, sipwarden, PBX) besides the text lines.
//!
//! Bounds: [`PACKETS`] per block and per tracked source, each at most [`FIRST_LINE_CHARS`] +
//! [`CALL_ID_CHARS`] characters of attacker text (lossy UTF-8, control characters replaced) plus
//! two socket addresses: about 1.5 KiB of text per block at worst, the same order as the
//! [`super::table::EVIDENCE_LINES`] lines.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::collections::VecDeque;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::clock::Millis;
use crate::stats::Transport;
use crate::util::printable;

/// Packets kept per block (and per source while it is watched): two transactions of four
/// messages (request in, relayed, answer in, answer out).
pub const PACKETS: usize = 8;
/// Characters of the start line kept.
pub const FIRST_LINE_CHARS: usize = 96;
/// Characters of the Call-ID kept.
pub const CALL_ID_CHARS: usize = 64;

/// Which way a packet went, seen from sipwarden.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Dir {
    /// Received by us from `from` on our socket `to`.
    In,
    /// Sent by us from our socket `from` to `to`.
    Out,
}

/// One captured packet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Packet {
    /// Wall-clock milliseconds since the Unix epoch.
    pub at: Millis,
    pub dir: Dir,
    pub from: SocketAddr,
    pub to: SocketAddr,
    /// "udp" or "tcp".
    pub transport: String,
    /// The far end is the PBX (upstream), not the blocked source.
    #[serde(default)]
    pub pbx: bool,
    /// The request or status line, without CRLF.
    pub first_line: String,
    #[serde(default)]
    pub call_id: String,
}

impl Packet {
    /// A packet from its raw start line and Call-ID (attacker bytes: clipped and cleaned).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        at: Millis,
        dir: Dir,
        transport: Transport,
        local: SocketAddr,
        peer: SocketAddr,
        pbx: bool,
        first_line: &[u8],
        call_id: &[u8],
    ) -> Packet {
        Captured::new(at, dir, transport, local, peer, pbx, first_line, call_id).packet()
    }

    /// The far end: the source or the PBX.
    pub fn peer(&self) -> SocketAddr {
        match self.dir {
            Dir::In => self.from,
            Dir::Out => self.to,
        }
    }
}

/// Append, keeping the last [`PACKETS`].
pub fn push(list: &mut Vec<Packet>, p: Packet) {
    if list.len() >= PACKETS {
        list.remove(0);
    }
    list.push(p);
}

/// Hold a block read back from the state store or from another node (Redis) to the same
/// bounds as one made here: device and reason clipped, the last
/// [`super::table::EVIDENCE_LINES`] lines, clipped, and the
/// last [`PACKETS`] packets with their text clipped.
pub fn bound(b: &mut super::Block) {
    use super::table::{clip, EVIDENCE_LINES};
    // Device and reason are shown in one line each; a peer may send any length.
    for text in [&mut b.device, &mut b.reason] {
        if text.chars().nth(super::table::EVIDENCE_CHARS).is_some() {
            *text = clip(text);
        }
    }
    let skip = b.evidence.len().saturating_sub(EVIDENCE_LINES);
    b.evidence.drain(..skip);
    for l in &mut b.evidence {
        if l.chars().nth(super::table::EVIDENCE_CHARS).is_some() {
            *l = clip(l);
        }
    }
    let skip = b.packets.len().saturating_sub(PACKETS);
    b.packets.drain(..skip);
    for p in &mut b.packets {
        for (text, max) in [
            (&mut p.first_line, FIRST_LINE_CHARS),
            (&mut p.call_id, CALL_ID_CHARS),
            (&mut p.transport, 3),
        ] {
            if text.chars().nth(max).is_some() {
                *text = printable(text.as_bytes(), max);
            }
        }
    }
}

/// Raw bytes kept of a captured start line: one more than [`FIRST_LINE_CHARS`], so a cut
/// line still shows as cut.
const LINE_BYTES: usize = FIRST_LINE_CHARS + 1;
/// Raw bytes kept of a captured Call-ID.
const CALL_ID_BYTES: usize = CALL_ID_CHARS + 1;

/// A packet as a watched source's ring holds it: the raw bytes, clipped, in place. Turned into
/// a [`Packet`] (text cleaned) only when a block takes the ring, so capturing every inspected
/// packet allocates nothing. About 230 bytes.
#[derive(Debug, Clone)]
pub struct Captured {
    pub at: Millis,
    pub dir: Dir,
    pub transport: Transport,
    pub from: SocketAddr,
    pub to: SocketAddr,
    pub pbx: bool,
    line: [u8; LINE_BYTES],
    line_len: u8,
    call_id: [u8; CALL_ID_BYTES],
    call_id_len: u8,
}

/// Copy at most `N` bytes of `src` into a fixed buffer; the length copied.
fn clip_into<const N: usize>(src: &[u8]) -> ([u8; N], u8) {
    let mut buf = [0u8; N];
    let n = src.len().min(N).min(u8::MAX as usize);
    if let (Some(dst), Some(src)) = (buf.get_mut(..n), src.get(..n)) {
        dst.copy_from_slice(src);
    }
    (buf, n as u8)
}

impl Captured {
    /// A packet from its raw start line and Call-ID, kept raw (clipped, not yet cleaned).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        at: Millis,
        dir: Dir,
        transport: Transport,
        local: SocketAddr,
        peer: SocketAddr,
        pbx: bool,
        first_line: &[u8],
        call_id: &[u8],
    ) -> Captured {
        let first_line = first_line.strip_suffix(b"\r\n").unwrap_or(first_line);
        let (from, to) = match dir {
            Dir::In => (peer, local),
            Dir::Out => (local, peer),
        };
        let (line, line_len) = clip_into::<LINE_BYTES>(first_line);
        let (call_id, call_id_len) = clip_into::<CALL_ID_BYTES>(call_id);
        Captured {
            at,
            dir,
            transport,
            from,
            to,
            pbx,
            line,
            line_len,
            call_id,
            call_id_len,
        }
    }

    pub fn first_line(&self) -> &[u8] {
        self.line
            .get(..usize::from(self.line_len))
            .unwrap_or_default()
    }

    pub fn call_id(&self) -> &[u8] {
        self.call_id
            .get(..usize::from(self.call_id_len))
            .unwrap_or_default()
    }

    /// The far end: the source or the PBX.
    pub fn peer(&self) -> SocketAddr {
        match self.dir {
            Dir::In => self.from,
            Dir::Out => self.to,
        }
    }

    /// This request as we relayed it: from our socket `from` to the PBX at `to` over
    /// `transport` (the proxy rewrites headers, not the request line).
    pub fn relayed(&self, from: SocketAddr, to: SocketAddr, transport: Transport) -> Captured {
        Captured {
            dir: Dir::Out,
            from,
            to,
            transport,
            pbx: true,
            ..self.clone()
        }
    }

    fn is_request(&self) -> bool {
        !self.first_line().starts_with(b"SIP/")
    }

    /// The packet as a block keeps and shows it (text cleaned and clipped).
    pub fn packet(&self) -> Packet {
        Packet {
            at: self.at,
            dir: self.dir,
            from: self.from,
            to: self.to,
            transport: self.transport.as_str().to_string(),
            pbx: self.pbx,
            first_line: printable(self.first_line(), FIRST_LINE_CHARS),
            call_id: printable(self.call_id(), CALL_ID_CHARS),
        }
    }
}

/// The recent packets of one watched source, oldest first.
#[derive(Debug, Default, Clone)]
pub struct Ring(VecDeque<Captured>);

impl Ring {
    pub fn push(&mut self, p: Captured) {
        if self.0.len() >= PACKETS {
            self.0.pop_front();
        }
        self.0.push_back(p);
    }

    /// The latest received request with this Call-ID from `peer` (to copy as relayed).
    pub fn request(&self, call_id: &[u8], peer: SocketAddr) -> Option<&Captured> {
        self.0.iter().rev().find(|p| {
            p.dir == Dir::In && !p.pbx && p.from == peer && p.call_id() == call_id && p.is_request()
        })
    }

    pub fn iter(&self) -> impl Iterator<Item = &Captured> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn clipped_cleaned_and_oriented() {
        let long = vec![b'A'; 500];
        let p = Packet::new(
            7,
            Dir::In,
            Transport::Udp,
            a("127.0.0.1:5060"),
            a("192.0.2.1:5070"),
            false,
            &long,
            b"c\x00id",
        );
        assert_eq!(p.from, a("192.0.2.1:5070"));
        assert_eq!(p.to, a("127.0.0.1:5060"));
        assert_eq!(p.first_line.chars().count(), FIRST_LINE_CHARS + 1);
        assert_eq!(p.call_id, "c·id");
        let q = Packet::new(
            8,
            Dir::Out,
            Transport::Tcp,
            a("127.0.0.1:5060"),
            a("192.0.2.1:5070"),
            false,
            b"SIP/2.0 403 Forbidden\r\n",
            b"c",
        );
        assert_eq!((q.from, q.to), (a("127.0.0.1:5060"), a("192.0.2.1:5070")));
        assert_eq!(q.first_line, "SIP/2.0 403 Forbidden");
        assert_eq!(q.peer(), a("192.0.2.1:5070"));
    }

    #[test]
    fn bounded() {
        let mut r = Ring::default();
        let mut v = Vec::new();
        for i in 0..3 * PACKETS as u64 {
            let p = Packet::new(
                i,
                Dir::In,
                Transport::Udp,
                a("127.0.0.1:5060"),
                a("192.0.2.1:5070"),
                false,
                b"REGISTER sip:x SIP/2.0",
                format!("c{i}").as_bytes(),
            );
            r.push(Captured::new(
                i,
                Dir::In,
                Transport::Udp,
                a("127.0.0.1:5060"),
                a("192.0.2.1:5070"),
                false,
                b"REGISTER sip:x SIP/2.0",
                format!("c{i}").as_bytes(),
            ));
            push(&mut v, p);
        }
        assert_eq!(r.iter().count(), PACKETS);
        assert_eq!(v.len(), PACKETS);
        assert_eq!(v.first().map(|p| p.at), Some(2 * PACKETS as u64));
        let last = format!("c{}", 3 * PACKETS - 1);
        assert!(r.request(last.as_bytes(), a("192.0.2.1:5070")).is_some());
        assert!(r.request(b"c0", a("192.0.2.1:5070")).is_none());
        // Cleaned only when a block takes it: the same text as a packet made at once.
        let raw = Captured::new(
            1,
            Dir::In,
            Transport::Tcp,
            a("127.0.0.1:5060"),
            a("192.0.2.1:5070"),
            false,
            &[b'A'; 500],
            b"c\x00id",
        );
        let made = Packet::new(
            1,
            Dir::In,
            Transport::Tcp,
            a("127.0.0.1:5060"),
            a("192.0.2.1:5070"),
            false,
            &[b'A'; 500],
            b"c\x00id",
        );
        assert_eq!(raw.packet(), made);
    }

    #[test]
    fn restored_blocks_are_held_to_the_bounds() {
        let p = Packet::new(
            1,
            Dir::In,
            Transport::Udp,
            a("127.0.0.1:5060"),
            a("192.0.2.1:5070"),
            false,
            b"OPTIONS sip:x SIP/2.0",
            b"c",
        );
        let mut big = p.clone();
        big.first_line = "X".repeat(10_000);
        big.call_id = "Y".repeat(10_000);
        big.transport = "Z".repeat(100);
        let mut b = crate::blocks::Block {
            key: crate::blocks::BlockKey::whole("192.0.2.1/32".parse().unwrap()),
            kind: crate::blocks::BlockType::Scanner,
            device: String::new(),
            reason: String::new(),
            blocked_at: 0,
            expires_at: None,
            strikes: 1,
            hits: 1,
            evidence: vec!["E".repeat(5000); 100],
            packets: vec![p; 50],
            enforced: true,
        };
        b.packets.push(big);
        bound(&mut b);
        assert_eq!(b.evidence.len(), crate::blocks::table::EVIDENCE_LINES);
        assert!(b.evidence.iter().all(|l| l.chars().count() <= 161));
        assert_eq!(b.packets.len(), PACKETS);
        let last = b.packets.last().unwrap();
        assert_eq!(last.first_line.chars().count(), FIRST_LINE_CHARS + 1);
        assert_eq!(last.call_id.chars().count(), CALL_ID_CHARS + 1);
        assert!(last.transport.chars().count() <= 4);
    }

    /// Old state files (blocks without packets) and old packets without the optional fields.
    #[test]
    fn old_records_load() {
        let p: Packet = serde_json::from_str(
            r#"{"at":1,"dir":"in","from":"192.0.2.1:5070","to":"127.0.0.1:5060","transport":"udp","first_line":"OPTIONS sip:x SIP/2.0"}"#,
        )
        .unwrap();
        assert!(!p.pbx);
        assert_eq!(p.call_id, "");
    }
}
