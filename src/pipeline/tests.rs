//! The pipeline on a node and a router as the shipped layout builds them: what it sends, what
//! it drops and counts, and that the drop gate answers before anything else.
#![allow(clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;
use crate::config::{BlockedReply, Config, IncomingMode, InviteAction, NatDetection};
use crate::node::Node;
use crate::proxy::{Advertised, Flow, Keys, RouterConfig};

const PBX: &str = "127.0.0.1:5080";

fn node(tune: impl FnOnce(&mut Config)) -> Arc<Node> {
    let mut c = Config::default();
    c.upstream.address = PBX.into();
    tune(&mut c);
    let c = c.validate().expect("valid config");
    let (node, _events) = Node::new(c);
    node.engine()
        .set_upstream(vec!["127.0.0.1".parse().unwrap()]);
    node
}

fn router() -> Router {
    let me = Advertised::new("192.0.2.10", 5060);
    let cfg = RouterConfig {
        tls: None,
        udp: Some(me.clone()),
        tcp: None,
        ws: None,
        wss: None,
        aliases: vec![me],
        incoming: IncomingMode::Path,
        nat: NatDetection::Auto,
        keys: Keys::new([5; 16], None),
        sockets: vec![(Transport::Udp, "192.0.2.10:5060".parse().unwrap())],
    };
    let pbx = Flow {
        transport: Transport::Udp,
        addr: PBX.parse().unwrap(),
    };
    Router::new(cfg, pbx)
}

fn request(method: &str, src: SocketAddr, ua: &str, n: u32) -> Vec<u8> {
    format!(
        "{method} sip:2000@192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP {src};branch=z9hG4bK-t{n}\r\n\
Max-Forwards: 70\r\nFrom: <sip:1000@192.0.2.10>;tag={n}\r\nTo: <sip:2000@192.0.2.10>\r\n\
Call-ID: t{n}@test\r\nCSeq: 1 {method}\r\nContact: <sip:1000@{src}>\r\n\
User-Agent: {ua}\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

struct Run {
    node: Arc<Node>,
    router: Router,
    edits: Edits,
    out: Vec<u8>,
    hits: LocalHits,
}

impl Run {
    fn new(tune: impl FnOnce(&mut Config)) -> Run {
        Run {
            node: node(tune),
            router: router(),
            edits: Edits::default(),
            out: Vec::new(),
            hits: LocalHits::default(),
        }
    }

    fn decide(&mut self, src: &str, bytes: &[u8]) -> Option<Send> {
        let inb = Inbound {
            transport: Transport::Udp,
            src: src.parse().unwrap(),
        };
        let w = Work {
            edits: &mut self.edits,
            out: &mut self.out,
            hits: &mut self.hits,
        };
        decide(&self.node, &self.router, 65_535, &inb, bytes, w, |_| false)
    }

    fn out(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }
}

#[test]
fn clean_requests_are_forwarded_with_our_via_and_keepalives_are_counted() {
    let mut r = Run::new(|_| {});
    let phone: SocketAddr = "198.51.100.7:5062".parse().unwrap();
    let d = r.decide("198.51.100.7:5062", &request("INVITE", phone, "phone", 1));
    let Some(Send {
        action: Action::Forward { to, .. },
        request: true,
    }) = d
    else {
        panic!("forwarded: {d:?}");
    };
    assert_eq!(to.addr, PBX.parse::<SocketAddr>().unwrap());
    assert!(
        r.out()
            .starts_with("INVITE sip:2000@192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10"),
        "{}",
        r.out()
    );
    assert_eq!(r.decide("198.51.100.7:5062", b"\r\n\r\n"), None);
    assert_eq!(r.node.stats.keepalives.load(Ordering::Relaxed), 1);
}

#[test]
fn a_scanner_is_blocked_then_dropped_at_the_gate_and_garbage_is_scored() {
    let mut r = Run::new(|_| {});
    let src: SocketAddr = "203.0.113.9:5070".parse().unwrap();
    assert_eq!(
        r.decide(
            "203.0.113.9:5070",
            &request("OPTIONS", src, "friendly-scanner", 1)
        ),
        None
    );
    assert_eq!(r.node.stats.dropped(DropReason::Scanner), 1);
    // Its next packet, even a clean one, stops at the gate without a parse.
    assert_eq!(
        r.decide("203.0.113.9:5070", &request("INVITE", src, "phone", 2)),
        None
    );
    assert_eq!(r.node.stats.dropped(DropReason::Blocked), 1);
    assert_eq!(r.decide("203.0.113.9:5070", b"garbage"), None);
    assert_eq!(r.node.stats.dropped(DropReason::Blocked), 2);
    // Garbage from another source is a malformed drop, scored.
    assert_eq!(r.decide("198.51.100.8:5060", b"\x16\x03\x01garbage"), None);
    assert_eq!(r.node.stats.dropped(DropReason::Malformed), 1);
}

#[test]
fn an_invite_flood_is_answered_503_and_a_blocked_source_403_when_configured() {
    let mut r = Run::new(|c| {
        c.invite.rate_limit = 1;
        c.invite.burst = 1;
        c.invite.action = InviteAction::Reject;
        c.protection.blocked_reply = BlockedReply::Forbidden;
    });
    let src: SocketAddr = "198.51.100.20:5060".parse().unwrap();
    let mut replied = 0;
    for n in 0..5 {
        if let Some(Send {
            action: Action::Reply { to },
            request: false,
        }) = r.decide("198.51.100.20:5060", &request("INVITE", src, "phone", n))
        {
            assert_eq!(to.addr, src);
            assert!(
                r.out().starts_with("SIP/2.0 503 Service Unavailable\r\n"),
                "{}",
                r.out()
            );
            assert!(r.out().contains("Retry-After: 5\r\n"));
            replied += 1;
        }
    }
    assert!(replied >= 3, "{replied} answered 503");
    // A scanner under blocked_reply = "403": blocked, then answered 403 at the gate.
    let scanner: SocketAddr = "203.0.113.10:5060".parse().unwrap();
    r.decide(
        "203.0.113.10:5060",
        &request("OPTIONS", scanner, "sipvicious", 1),
    );
    let d = r.decide(
        "203.0.113.10:5060",
        &request("OPTIONS", scanner, "sipvicious", 2),
    );
    assert!(
        matches!(
            d,
            Some(Send {
                action: Action::Reply { .. },
                ..
            })
        ),
        "{d:?}"
    );
    assert!(
        r.out().starts_with("SIP/2.0 403 Forbidden\r\n"),
        "{}",
        r.out()
    );
}

#[test]
fn a_whitelisted_source_is_forwarded_whatever_it_sends() {
    let mut r = Run::new(|c| c.lists.whitelist = vec!["198.51.100.0/24".parse().unwrap()]);
    let src: SocketAddr = "198.51.100.30:5060".parse().unwrap();
    for n in 0..3 {
        let d = r.decide(
            "198.51.100.30:5060",
            &request("OPTIONS", src, "friendly-scanner", n),
        );
        assert!(
            matches!(
                d,
                Some(Send {
                    action: Action::Forward { .. },
                    request: true
                })
            ),
            "{d:?}"
        );
    }
    assert_eq!(r.node.stats.dropped(DropReason::Scanner), 0);
}
