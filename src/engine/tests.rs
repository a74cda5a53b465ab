//! Detector and verdict-order tests with explicit time.
#![allow(clippy::indexing_slicing)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use super::*;
use crate::blocks::{parse_net, ListKind, UnblockReason};
use crate::config::Mode;
use crate::stats::DropReason;
use crate::wire::{parse, Framing};

pub(super) const T0: Millis = 1_700_000_000_000;

pub(super) fn cfg() -> Config {
    let mut c = Config::default();
    c.upstream.address = "10.0.0.1:5060".into();
    c
}

pub(super) fn engine(c: &Config) -> Engine {
    let e = Engine::new(c, T0);
    e.set_upstream(vec!["10.0.0.1".parse().unwrap()]);
    e
}

pub(super) fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

pub(super) fn req(method: &str, user: &str, ua: &str, extra: &str) -> Vec<u8> {
    format!(
        "{method} sip:{user}@pbx SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK1\r\nMax-Forwards: 70\r\n\
From: <sip:{user}@pbx>;tag=1\r\nTo: <sip:{user}@pbx>\r\nCall-ID: c1\r\nCSeq: 1 {method}\r\n\
User-Agent: {ua}\r\n{extra}Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

pub(super) fn resp(code: u16, method: &str, user: &str, cseq: u32) -> Vec<u8> {
    format!(
        "SIP/2.0 {code} X\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK1\r\nFrom: <sip:{user}@pbx>;tag=1\r\n\
To: <sip:{user}@pbx>;tag=2\r\nCall-ID: c{cseq}{user}\r\nCSeq: {cseq} {method}\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

pub(super) fn on_req(e: &mut Engine, now: Millis, src: SocketAddr, b: &[u8]) -> Verdict {
    let m = parse(b, Framing::Datagram).unwrap();
    e.on_request(now, src, &m, false)
}

/// An answer; with `creds` the request's credentials differ per Call-ID and CSeq.
fn answer(e: &mut Engine, now: Millis, phone: SocketAddr, b: &[u8], creds: bool) {
    let m = parse(b, Framing::Datagram).unwrap();
    let fp = crate::util::hash64(&[m.call_id(), &m.cseq().map_or(0, |c| c.0).to_le_bytes()]);
    e.on_answer(now, phone, &m, creds.then_some(fp));
}

#[test]
fn scanner_user_agent_blocks_at_once() {
    let c = cfg();
    let mut e = engine(&c);
    let src = sa("203.0.113.5:5070");
    assert_eq!(e.precheck(T0, src), Pre::Inspect);
    let v = on_req(
        &mut e,
        T0,
        src,
        &req("OPTIONS", "100", "friendly-scanner", ""),
    );
    assert_eq!(v, Verdict::Drop(DropReason::Scanner));
    assert!(matches!(
        e.precheck(T0 + 1, src),
        Pre::Blocked {
            kind: BlockType::Scanner,
            ..
        }
    ));
    let b = e.ledger_mut().blocks().next().unwrap();
    assert_eq!(b.device, "friendly-scanner");
    assert_eq!(b.evidence.len(), 1);
    assert!(e
        .take_events()
        .iter()
        .any(|ev| matches!(ev, Event::Blocked(_))));
}

#[test]
fn whitelisted_scanner_is_never_blocked_and_upstream_is_trusted() {
    let mut c = cfg();
    c.lists.whitelist = vec![parse_net("203.0.113.0/24").unwrap()];
    let mut e = engine(&c);
    let src = sa("203.0.113.5:5070");
    assert_eq!(e.precheck(T0, src), Pre::Whitelisted);
    let d = Detection {
        key: BlockKey::whole(source_net(src.ip(), 64)),
        kind: BlockType::Manual,
        reason: "x".into(),
        duration: Duration::from_secs(60),
        evidence: vec![],
    };
    assert!(!e.ledger_mut().block(T0, d, ""));
    assert!(e
        .ledger_mut()
        .manual_block(
            T0,
            BlockKey::whole(source_net("10.0.0.1".parse().unwrap(), 64)),
            None,
            ""
        )
        .is_err());
}

#[test]
fn blacklisted_cidr_is_dropped_before_parsing() {
    let mut c = cfg();
    c.lists.blacklist = vec![parse_net("198.51.100.0/24").unwrap()];
    let e = engine(&c);
    assert!(matches!(
        e.precheck(T0, sa("198.51.100.77:5060")),
        Pre::Blocked {
            kind: BlockType::Blacklist,
            ..
        }
    ));
    assert_eq!(e.precheck(T0, sa("198.51.101.1:5060")), Pre::Inspect);
}

#[test]
fn register_brute_force_blocks_after_hit_count_and_expires() {
    let c = cfg();
    let mut e = engine(&c);
    let phone = sa("192.0.2.9:5060");
    // A first challenge is not a failure.
    for i in 0..10 {
        answer(
            &mut e,
            T0 + i,
            phone,
            &resp(401, "REGISTER", "1001", 100 + i as u32),
            false,
        );
    }
    assert_eq!(e.ledger_mut().block_table().len(), 0);
    for i in 0..4u32 {
        answer(
            &mut e,
            T0 + 100 + i as u64,
            phone,
            &resp(403, "REGISTER", "1001", i),
            true,
        );
        // A retransmission's answer is not counted twice.
        answer(
            &mut e,
            T0 + 101 + i as u64,
            phone,
            &resp(403, "REGISTER", "1001", i),
            true,
        );
    }
    assert_eq!(
        e.ledger_mut().block_table().len(),
        0,
        "4 distinct failures < hit_count 5"
    );
    answer(
        &mut e,
        T0 + 200,
        phone,
        &resp(401, "REGISTER", "1001", 9),
        true,
    );
    let b = e.ledger_mut().blocks().next().expect("blocked").clone();
    assert_eq!(b.kind, BlockType::Register);
    assert_eq!(b.key.port, None);
    assert_eq!(b.expires_at, Some(T0 + 200 + 3_600_000));
    assert!(!b.evidence.is_empty());
    assert!(matches!(e.precheck(T0 + 300, phone), Pre::Blocked { .. }));
    e.ledger_mut().tick(T0 + 200 + 3_600_000);
    assert_eq!(
        e.precheck(T0 + 200 + 3_600_001, phone),
        Pre::Inspect,
        "unblocked on time"
    );
    assert!(e.take_events().iter().any(|ev| matches!(
        ev,
        Event::Unblocked {
            why: UnblockReason::Expired,
            ..
        }
    )));
}

#[test]
fn repeat_blocks_escalate_and_reach_the_blacklist() {
    let c = cfg();
    let mut e = engine(&c);
    let src = sa("192.0.2.10:5060");
    let mut now = T0;
    let mut durations = vec![];
    for _ in 0..3 {
        on_req(&mut e, now, src, &req("OPTIONS", "1", "sipcli/v1", ""));
        let b = e.ledger_mut().blocks().next().unwrap().clone();
        durations.push(b.expires_at.map(|x| x - now));
        now = b.expires_at.unwrap_or(now) + 1;
        e.ledger_mut().tick(now);
    }
    assert_eq!(durations[0], Some(86_400_000));
    assert_eq!(durations[1], Some(2 * 86_400_000));
    assert_eq!(
        durations[2], None,
        "third block: permanent, on the blacklist"
    );
    assert!(e.ledger_mut().lists().blacklisted(src.ip()).is_some());
}

#[test]
fn nat_aware_blocks_only_the_failing_port() {
    let c = cfg();
    let mut e = engine(&c);
    let good = sa("192.0.2.50:5060");
    let bad = sa("192.0.2.50:5062");
    answer(&mut e, T0, good, &resp(200, "REGISTER", "1005", 1), true);
    for i in 0..5u32 {
        answer(
            &mut e,
            T0 + 10 + i as u64,
            bad,
            &resp(403, "REGISTER", "1006", 10 + i),
            true,
        );
    }
    let b = e.ledger_mut().blocks().next().expect("blocked").clone();
    assert_eq!(b.key.port, Some(5062));
    assert!(b.reason.contains("only this port"), "{}", b.reason);
    assert!(matches!(e.precheck(T0 + 100, bad), Pre::Blocked { .. }));
    assert_eq!(
        e.precheck(T0 + 100, good),
        Pre::Inspect,
        "the good phone keeps working"
    );
}

#[test]
fn enumeration_is_caught_without_a_scanner_user_agent() {
    let c = cfg();
    let mut e = engine(&c);
    let src = sa("192.0.2.60:5060");
    for u in 0..10u32 {
        answer(
            &mut e,
            T0 + u as u64,
            src,
            &resp(404, "REGISTER", &format!("{}", 2000 + u), u),
            false,
        );
    }
    let b = e.ledger_mut().blocks().next().expect("blocked");
    assert_eq!(b.kind, BlockType::Scan);
}

#[test]
fn phones_answering_challenges_are_not_enumerators() {
    let c = cfg();
    let mut e = engine(&c);
    let nat = sa("192.0.2.70:5060");
    // Twenty phones behind one NAT boot at once: each is challenged, then answers.
    for u in 0..20u32 {
        let user = format!("{}", 3000 + u);
        on_req(
            &mut e,
            T0,
            nat,
            &req("REGISTER", &user, "Yealink", "Authorization: Digest x\r\n"),
        );
        answer(&mut e, T0 + 1, nat, &resp(401, "REGISTER", &user, u), false);
    }
    assert_eq!(e.ledger_mut().block_table().len(), 0);
}

#[test]
fn invite_flood_rejected_with_one_alert_per_episode() {
    let c = cfg();
    let mut e = engine(&c);
    let src = sa("192.0.2.80:5060");
    let inv = req("INVITE", "900", "Phone", "");
    let verdicts: Vec<Verdict> = (0..40).map(|_| on_req(&mut e, T0, src, &inv)).collect();
    let rejected = verdicts
        .iter()
        .filter(|v| matches!(v, Verdict::Reply { code: 503, .. }))
        .count();
    assert_eq!(rejected, 20, "burst of 20 passes, the rest get 503");
    let alerts = e
        .take_events()
        .into_iter()
        .filter(|ev| matches!(ev, Event::Alert { .. }))
        .count();
    assert_eq!(alerts, 1);
    // A second later 10 more are allowed.
    let later: Vec<Verdict> = (0..11)
        .map(|_| on_req(&mut e, T0 + 1000, src, &inv))
        .collect();
    assert_eq!(later.iter().filter(|v| **v == Verdict::Forward).count(), 10);
}

#[test]
fn packet_flood_blocks() {
    let c = cfg();
    let e = engine(&c);
    let src = sa("192.0.2.90:5060");
    let mut blocked = false;
    for _ in 0..250 {
        if matches!(
            e.precheck(T0, src),
            Pre::Blocked {
                kind: BlockType::Flood,
                ..
            }
        ) {
            blocked = true;
            break;
        }
    }
    assert!(blocked);
}

#[test]
fn anomalies_score_to_a_block() {
    let c = cfg();
    let mut e = engine(&c);
    let src = sa("192.0.2.100:5060");
    for _ in 0..2 {
        e.on_malformed(T0, src, ParseError::NotSip, b"\x16\x03\x01 TLS hello");
    }
    assert_eq!(e.ledger_mut().block_table().len(), 0);
    let no_cseq = b"OPTIONS sip:a@b SIP/2.0\r\nVia: SIP/2.0/UDP h;branch=z9hG4bK1\r\nFrom: <sip:a@b>;tag=1\r\nTo: <sip:a@b>\r\nCall-ID: x\r\nContent-Length: 0\r\n\r\n";
    assert_eq!(
        on_req(&mut e, T0, src, no_cseq),
        Verdict::Drop(DropReason::Anomaly)
    );
    let b = e
        .ledger_mut()
        .blocks()
        .next()
        .expect("score 2+2+1 reaches 5");
    assert_eq!(b.kind, BlockType::Anomaly);
}

#[test]
fn observe_mode_reports_but_drops_nothing() {
    let mut c = cfg();
    c.protection.mode = Mode::Observe;
    let mut e = engine(&c);
    let src = sa("203.0.113.9:5060");
    let v = on_req(
        &mut e,
        T0,
        src,
        &req("OPTIONS", "1", "friendly-scanner", ""),
    );
    assert_eq!(v, Verdict::Forward);
    let b = e
        .ledger_mut()
        .blocks()
        .next()
        .expect("would-be block recorded");
    assert!(!b.enforced);
    assert_eq!(e.precheck(T0 + 1, src), Pre::Inspect);
}

#[test]
fn ipv6_blocks_cover_the_prefix() {
    let c = cfg();
    let mut e = engine(&c);
    let a = SocketAddr::new(
        IpAddr::V6("2001:db8:1:2::1".parse::<Ipv6Addr>().unwrap()),
        5060,
    );
    let b = SocketAddr::new(
        IpAddr::V6("2001:db8:1:2:aaaa::9".parse::<Ipv6Addr>().unwrap()),
        5060,
    );
    on_req(&mut e, T0, a, &req("OPTIONS", "1", "sipvicious", ""));
    assert!(matches!(e.precheck(T0, b), Pre::Blocked { .. }));
}

#[test]
fn memory_stays_bounded_under_a_million_sources() {
    let mut c = cfg();
    c.protection.tracked_sources = 1000;
    c.protection.max_blocks = 500;
    let mut e = engine(&c);
    let inv = req("INVITE", "1", "x", "");
    for i in 0..200_000u32 {
        let ip = Ipv4Addr::from(0x0b00_0000 + i);
        let src = SocketAddr::new(IpAddr::V4(ip), 5060);
        e.precheck(T0, src);
        if i % 4 == 0 {
            on_req(&mut e, T0, src, &inv);
            answer(&mut e, T0, src, &resp(403, "REGISTER", "1", i), true);
        }
        if i % 7 == 0 {
            on_req(
                &mut e,
                T0,
                src,
                &req("OPTIONS", "1", "friendly-scanner", ""),
            );
        }
        e.take_events();
    }
    assert!(e.tracked() <= 1000 * 12, "tracked {}", e.tracked());
    assert!(e.ledger_mut().block_table().len() <= 500);
}

#[test]
fn manual_block_and_unblock() {
    let c = cfg();
    let mut e = engine(&c);
    let net = parse_net("192.0.2.200").unwrap();
    let b = e
        .ledger_mut()
        .manual_block(
            T0,
            BlockKey::whole(net),
            Some(Duration::from_secs(60)),
            "test",
        )
        .unwrap();
    assert_eq!(b.kind, BlockType::Manual);
    assert!(matches!(
        e.precheck(T0, sa("192.0.2.200:1")),
        Pre::Blocked { .. }
    ));
    assert_eq!(e.unblock(net, None).len(), 1);
    assert_eq!(e.precheck(T0, sa("192.0.2.200:1")), Pre::Inspect);
    // Whitelisting removes a block.
    e.ledger_mut()
        .manual_block(T0, BlockKey::whole(net), None, "")
        .unwrap();
    e.ledger_mut()
        .list_add(T0, ListKind::Whitelist, net, "office", "api");
    assert_eq!(e.ledger_mut().block_table().len(), 0);
}

#[test]
fn account_under_attack_admits_only_known_sources() {
    let c = cfg();
    let mut e = engine(&c);
    let owner = sa("192.0.2.1:5060");
    answer(&mut e, T0, owner, &resp(200, "REGISTER", "1001", 1), true);
    for i in 0..5u8 {
        let src = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 0, i)), 5060);
        answer(
            &mut e,
            T0 + 1,
            src,
            &resp(403, "REGISTER", "1001", 10 + i as u32),
            true,
        );
    }
    let stranger = sa("198.18.1.1:5060");
    let v = on_req(&mut e, T0 + 2, stranger, &req("REGISTER", "1001", "x", ""));
    assert!(matches!(v, Verdict::Reply { code: 403, .. }));
    let v = on_req(&mut e, T0 + 2, owner, &req("REGISTER", "1001", "x", ""));
    assert_eq!(v, Verdict::Forward);
    assert!(e
        .take_events()
        .iter()
        .any(|ev| matches!(ev, Event::Alert { .. })));
}

#[test]
fn echoed_defects_in_our_dialog_are_forwarded_and_not_scored() {
    let c = cfg();
    let mut e = engine(&c);
    let caller = sa("192.0.2.110:5060");
    // The callee's UA put '@' in its To tag and a '?header' in its Contact (now the
    // Request-URI); the caller merely echoes both in its BYE.
    let bye = b"BYE sip:callee@192.0.2.111?X=1 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.110;branch=z9hG4bK9\r\n\
Max-Forwards: 70\r\nRoute: <sip:proxy;lr>\r\nFrom: <sip:caller@pbx>;tag=1\r\nTo: <sip:callee@pbx>;tag=a@b\r\n\
Call-ID: d1\r\nCSeq: 2 BYE\r\nContent-Length: 0\r\n\r\n";
    let m = parse(bye, Framing::Datagram).unwrap();
    assert!(
        anomaly::check_request(&m, false).is_some(),
        "strict out of dialog"
    );
    assert_eq!(anomaly::check_request(&m, true), None);
    for i in 0..20 {
        assert_eq!(e.on_request(T0 + i, caller, &m, true), Verdict::Forward);
    }
    assert_eq!(
        e.ledger_mut().block_table().len(),
        0,
        "the caller is not blamed"
    );
    // The same bytes outside a dialog of ours keep today's strictness.
    assert_eq!(
        e.on_request(T0 + 100, caller, &m, false),
        Verdict::Drop(DropReason::Anomaly)
    );
    // The sender's own defects still count in a dialog: a missing CSeq.
    let no_cseq = b"BYE sip:callee@192.0.2.111 SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.110;branch=z9hG4bK9\r\n\
From: <sip:caller@pbx>;tag=1\r\nTo: <sip:callee@pbx>;tag=2\r\nCall-ID: d1\r\nContent-Length: 0\r\n\r\n";
    let m = parse(no_cseq, Framing::Datagram).unwrap();
    assert_eq!(
        e.on_request(T0 + 101, caller, &m, true),
        Verdict::Drop(DropReason::Anomaly)
    );
}

/// The packet path of a clean call never takes the ledger's lock: a phone's REGISTER, INVITE,
/// ACK and BYE and the PBX's answers to them go through the sender's (or the phone's)
/// detector shard only, through the one entry per packet. A detection does take it.
#[test]
fn clean_packets_never_lock_the_ledger() {
    let e = engine(&cfg());
    let pbx = sa("10.0.0.1:5060");
    let before = e.ledger_locks();
    for i in 0..50u32 {
        let phone = SocketAddr::from(([192, 0, 2, (i % 200) as u8 + 1], 5060));
        for method in ["REGISTER", "INVITE", "ACK", "BYE"] {
            let b = req(method, "1001", "phone", "");
            let m = parse(&b, Framing::Datagram).unwrap();
            let seen = Seen {
                transport: Transport::Udp,
                src: phone,
                trust: Trust::Inspect,
                what: What::Request {
                    msg: &m,
                    our_dialog: false,
                    forged: false,
                },
            };
            assert_eq!(e.inspect(T0 + u64::from(i), seen), Verdict::Forward);
        }
        for method in ["REGISTER", "INVITE", "BYE"] {
            let b = resp(200, method, "1001", i);
            let m = parse(&b, Framing::Datagram).unwrap();
            let seen = Seen {
                transport: Transport::Udp,
                src: pbx,
                trust: Trust::Upstream,
                what: What::Response {
                    msg: &m,
                    answer: Some((phone, None)),
                    to: Some((Transport::Udp, phone)),
                    forged: false,
                },
            };
            assert_eq!(e.inspect(T0 + u64::from(i), seen), Verdict::Forward);
        }
    }
    assert_eq!(
        e.ledger_locks(),
        before,
        "a clean call took the ledger's lock"
    );
    assert!(!e.has_events());
    // A scanner is blocked: that is the ledger's business.
    let b = req("OPTIONS", "1001", "friendly-scanner", "");
    let m = parse(&b, Framing::Datagram).unwrap();
    let seen = Seen {
        transport: Transport::Udp,
        src: sa("203.0.113.9:5060"),
        trust: Trust::Inspect,
        what: What::Request {
            msg: &m,
            our_dialog: false,
            forged: false,
        },
    };
    assert_eq!(e.inspect(T0, seen), Verdict::Drop(DropReason::Scanner));
    assert!(e.ledger_locks() > before);
    assert!(e.has_events());
}
