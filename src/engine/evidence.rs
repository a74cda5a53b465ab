//! Capturing the packets a block's ladder shows: every inspected request and the PBX's final
//! answers go into a small per-source ring ([`Ring`]); a new block takes its source's ring.
//!
//! Bound: [`WATCHED`] sources over all detector shards (least recently seen evicted in each
//! shard) of [`PACKETS`] raw packets each, about 1.9 KiB per source (fixed-size buffers: no
//! allocation per captured packet), so about 4 MiB whatever an attacker sends. A ring is
//! cleaned into text only when a block takes it. An attacker's ring can
//! be pushed out by traffic from many other sources between its packets; the block then keeps
//! fewer packets (its text evidence lines are kept apart and are not affected).
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::net::SocketAddr;

use ipnet::IpNet;

use super::{Ctx, Detectors, Verdict};
use crate::blocks::evidence::{Captured, Dir, Packet, Ring, PACKETS};
use crate::blocks::{source_net, BlockKey};
use crate::clock::Millis;
use crate::stats::Transport;
use crate::wire::Message;

/// Sources whose recent packets are kept for a block that may follow.
pub const WATCHED: usize = 2048;

impl Detectors {
    /// [`Detectors::on_request`] for a request received over `t`: the packet is captured
    /// first.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_request_over(
        &mut self,
        ctx: &Ctx,
        now: Millis,
        t: Transport,
        src: SocketAddr,
        net: IpNet,
        msg: &Message<'_>,
        our_dialog: bool,
    ) -> Verdict {
        let p = Captured::new(
            now,
            Dir::In,
            t,
            self.local_for(t),
            src,
            false,
            msg.start_line.of(msg.buf),
            msg.call_id(),
        );
        self.watched.get_or_insert_mut(net, Ring::default).push(p);
        let v = self.on_request(ctx, now, src, net, msg, our_dialog);
        // Our own answer (a 503 to an INVITE flood, a 403 to an account under attack), sent
        // right after; not when the request made a block (its ring has been handed over).
        if let Verdict::Reply { code, reason, .. } = v {
            let local = self.local_for(t);
            if let Some(ring) = self.watched.get_mut(&net) {
                let line = format!("SIP/2.0 {code} {reason}");
                let p = Captured::new(
                    now,
                    Dir::Out,
                    t,
                    local,
                    src,
                    false,
                    line.as_bytes(),
                    msg.call_id(),
                );
                ring.push(p);
            }
        }
        v
    }

    /// [`Detectors::on_answer`] for a final answer received from the PBX at `pbx` and routed
    /// back to the phone over `to` (when it is): captured, with the relayed copy of the
    /// request it answers, into the phone's ring before the answer is counted (it may make the
    /// block). The caller has checked that the phone is neither the upstream nor whitelisted.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_answer_from(
        &mut self,
        ctx: &Ctx,
        now: Millis,
        pbx: (Transport, SocketAddr),
        phone: SocketAddr,
        msg: &Message<'_>,
        attempt: Option<u64>,
        to: Option<(Transport, SocketAddr)>,
    ) {
        self.capture_answer(now, pbx, phone, msg, to);
        self.on_answer(ctx, now, phone, msg, attempt);
    }

    fn capture_answer(
        &mut self,
        now: Millis,
        (pt, pbx): (Transport, SocketAddr),
        phone: SocketAddr,
        msg: &Message<'_>,
        to: Option<(Transport, SocketAddr)>,
    ) {
        let net = source_net(phone.ip(), self.cfg.protection.ipv6_prefix);
        let local_pbx = self.local_for(pt);
        let first = msg.start_line.of(msg.buf);
        let call_id = msg.call_id();
        let answer_in = Captured::new(now, Dir::In, pt, local_pbx, pbx, true, first, call_id);
        let answer_out = to.map(|(t, a)| {
            Captured::new(
                now,
                Dir::Out,
                t,
                self.local_for(t),
                a,
                false,
                first,
                call_id,
            )
        });
        let Some(ring) = self.watched.get_mut(&net) else {
            return;
        };
        // The request as relayed to the PBX: its start line (the proxy rewrites headers, not
        // the request line), timestamped when it was received.
        if let Some(req) = ring.request(answer_in.call_id(), phone) {
            let relayed = req.relayed(local_pbx, pbx, pt);
            ring.push(relayed);
        }
        ring.push(answer_in);
        if let Some(p) = answer_out {
            ring.push(p);
        }
    }

    /// The packets captured from the source of a new block on `key` (the ring is handed
    /// over: the source's further packets stop at the gate).
    pub(super) fn take_packets(&mut self, key: &BlockKey) -> Vec<Packet> {
        let Some(ring) = self.watched.pop(&key.net) else {
            return Vec::new();
        };
        let mut v: Vec<Packet> = ring
            .iter()
            .filter(|p| key.port.is_none_or(|port| p.pbx || p.peer().port() == port))
            .map(Captured::packet)
            .collect();
        let skip = v.len().saturating_sub(PACKETS);
        v.drain(..skip);
        v
    }

    /// Sources with captured packets held.
    pub fn watched(&self) -> usize {
        self.watched.len()
    }

    /// Our socket as shown in evidence: the first listen address of the transport (the
    /// other transport's when it has none).
    fn local_for(&self, t: Transport) -> SocketAddr {
        let s = &self.cfg.sip;
        let (first, other) = match t {
            Transport::Udp => (&s.listen_udp, &s.listen_tcp),
            Transport::Tcp => (&s.listen_tcp, &s.listen_udp),
            Transport::Tls => (&s.listen_tls, &s.listen_udp),
            Transport::Ws => (&s.listen_ws, &s.listen_udp),
            Transport::Wss => (&s.listen_wss, &s.listen_udp),
        };
        first
            .first()
            .or(other.first())
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 5060)))
    }
}

/// The watched-source map's key type, for the engine's field.
pub type Watched = lru::LruCache<IpNet, Ring>;

#[cfg(test)]
mod tests {
    #![allow(clippy::indexing_slicing)]
    use super::*;
    use crate::blocks::BlockType;
    use crate::engine::tests::{cfg, engine, sa, T0};
    use crate::wire::{parse, Framing};

    fn register(n: u32) -> Vec<u8> {
        format!(
            "REGISTER sip:pbx SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.9:5070;branch=z9hG4bK{n}\r\n\
Max-Forwards: 70\r\nFrom: <sip:1001@pbx>;tag=1\r\nTo: <sip:1001@pbx>\r\nCall-ID: reg-{n}\r\n\
CSeq: {n} REGISTER\r\nAuthorization: Digest username=\"1001\",response=\"{n}\"\r\n\
User-Agent: phone\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    fn forbidden(n: u32) -> Vec<u8> {
        format!(
            "SIP/2.0 403 Forbidden\r\nVia: SIP/2.0/UDP 192.0.2.9:5070;branch=z9hG4bK{n}\r\n\
From: <sip:1001@pbx>;tag=1\r\nTo: <sip:1001@pbx>;tag=2\r\nCall-ID: reg-{n}\r\n\
CSeq: {n} REGISTER\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    /// A REGISTER brute force: the block's packets are the last two transactions as a ladder
    /// (phone -> us -> PBX -> us -> phone), with our listen address, transports and times.
    #[test]
    fn register_block_carries_the_ladder() {
        let mut c = cfg();
        c.sip.listen_udp = vec![sa("198.51.100.1:5060")];
        let mut e = engine(&c);
        let phone = sa("192.0.2.9:5070");
        let pbx = sa("10.0.0.1:5060");
        for n in 1..=5u32 {
            let t = T0 + u64::from(n) * 1000;
            let r = register(n);
            let m = parse(&r, Framing::Datagram).unwrap();
            assert_eq!(
                e.on_request_over(t, Transport::Udp, phone, &m, false),
                Verdict::Forward
            );
            let a = forbidden(n);
            let m = parse(&a, Framing::Datagram).unwrap();
            let fp = Some(u64::from(n));
            let back = Some((Transport::Udp, phone));
            e.on_answer_from(t + 20, (Transport::Udp, pbx), phone, &m, fp, back);
        }
        let b = e.ledger_mut().blocks().next().expect("blocked").clone();
        assert_eq!(b.kind, BlockType::Register);
        assert_eq!(b.packets.len(), PACKETS);
        let us = sa("198.51.100.1:5060");
        let last: Vec<_> = b.packets[4..].iter().collect();
        assert_eq!(
            last.iter()
                .map(|p| (p.dir, p.from, p.to, p.pbx))
                .collect::<Vec<_>>(),
            vec![
                (Dir::In, phone, us, false),
                (Dir::Out, us, pbx, true),
                (Dir::In, pbx, us, true),
                (Dir::Out, us, phone, false),
            ]
        );
        assert_eq!(last[0].first_line, "REGISTER sip:pbx SIP/2.0");
        assert_eq!(last[1].first_line, "REGISTER sip:pbx SIP/2.0");
        assert_eq!(last[2].first_line, "SIP/2.0 403 Forbidden");
        assert!(last
            .iter()
            .all(|p| p.call_id == "reg-5" && p.transport == "udp"));
        assert_eq!(last[0].at, T0 + 5000);
        assert_eq!(last[3].at, T0 + 5020);
        // Handed over: the ring is gone with the block made.
        assert_eq!(e.watched(), 0);
        // Persisted and restored as JSON, like the state store and the cluster do.
        let json = serde_json::to_string(&b).unwrap();
        let back: crate::blocks::Block = serde_json::from_str(&json).unwrap();
        assert_eq!(back, b);
    }

    /// An INVITE flood answered 503 by sipwarden itself: the answers are in the ring too.
    #[test]
    fn our_own_replies_are_captured() {
        let mut c = cfg();
        c.invite.rate_limit = 1;
        c.invite.burst = 1;
        let e = engine(&c);
        let src = sa("203.0.113.7:5070");
        let r = crate::engine::tests::req("INVITE", "100", "phone", "");
        let m = parse(&r, Framing::Datagram).unwrap();
        let mut replied = 0;
        for i in 0..3 {
            if let Verdict::Reply { code: 503, .. } =
                e.on_request_over(T0 + i, Transport::Udp, src, &m, false)
            {
                replied += 1;
            }
        }
        assert!(replied >= 1);
        let net = source_net(src.ip(), 64);
        let out: Vec<_> = e.with_shard(net, |d| {
            let ring = d.watched.peek(&net).unwrap();
            ring.iter()
                .filter(|p| p.dir == Dir::Out)
                .map(Captured::packet)
                .collect::<Vec<_>>()
        });
        assert_eq!(out.len(), replied);
        assert!(out
            .iter()
            .all(|p| p.first_line == "SIP/2.0 503 Service Unavailable" && p.to == src));
    }

    #[test]
    fn scanner_block_has_the_one_packet_it_took() {
        let mut e = engine(&cfg());
        let src = sa("203.0.113.5:5070");
        let r = crate::engine::tests::req("OPTIONS", "100", "friendly-scanner", "");
        let m = parse(&r, Framing::Datagram).unwrap();
        e.on_request_over(T0, Transport::Tcp, src, &m, false);
        let b = e.ledger_mut().blocks().next().expect("blocked");
        assert_eq!(b.packets.len(), 1);
        let p = &b.packets[0];
        assert_eq!((p.dir, p.from, p.transport.as_str()), (Dir::In, src, "tcp"));
        assert_eq!(p.to, sa("0.0.0.0:5060"));
        assert!(p.first_line.starts_with("OPTIONS sip:100@pbx"));
        assert!(e.is_suspect(T0, src));
        assert!(!e.is_suspect(T0, sa("203.0.113.6:5070")));
    }

    /// A block written before packets were kept still loads, with none.
    #[test]
    fn old_state_without_packets_loads() {
        let old = r#"{"key":{"net":"192.0.2.1/32","port":null},"kind":"SCANNER","device":"x",
            "reason":"r","blocked_at":1,"expires_at":null,"strikes":1,"hits":2,
            "evidence":["OPTIONS sip:x SIP/2.0"],"enforced":true}"#;
        let b: crate::blocks::Block = serde_json::from_str(old).unwrap();
        assert!(b.packets.is_empty());
        assert_eq!(b.evidence.len(), 1);
    }

    #[test]
    fn watched_sources_are_bounded() {
        let e = engine(&cfg());
        let r = crate::engine::tests::req("OPTIONS", "100", "phone", "");
        let m = parse(&r, Framing::Datagram).unwrap();
        for i in 0..(WATCHED as u32 + 500) {
            let src = SocketAddr::from((u32::to_be_bytes(0x0b00_0000 + i), 5060));
            e.on_request_over(T0, Transport::Udp, src, &m, false);
        }
        assert_eq!(e.watched(), WATCHED);
    }
}
