//! Fraud guard tests with explicit time; the property tests drive random call lives (every way
//! a call ends, in any order, with retransmissions and stray messages) from fixed seeds.
#![allow(clippy::indexing_slicing)]

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;
use crate::config::Fraud;

const T0: Millis = 1_700_000_000_000; // a Tuesday, 22:13 UTC

fn src() -> IpNet {
    "192.0.2.10/32".parse().unwrap()
}

fn cfg() -> Fraud {
    Fraud {
        enabled: true,
        ..Fraud::default()
    }
}

fn guard(c: &Fraud) -> FraudGuard {
    FraudGuard::new(c, [7; 16])
}

fn invite(g: &mut FraudGuard, now: Millis, account: &str, number: &str, id: &str) -> Decision {
    g.on_invite(
        now,
        src(),
        account.as_bytes(),
        number.as_bytes(),
        id.as_bytes(),
        true,
    )
}

#[test]
fn burst_to_an_international_prefix_is_rejected_past_the_limit() {
    let mut g = guard(&cfg());
    for i in 0..5 {
        let d = invite(&mut g, T0 + i, "1001", "0044123456", &format!("c{i}"));
        assert!(d.reject.is_none(), "call {i}");
        g.on_invite_answer(T0 + i, format!("c{i}").as_bytes(), 486);
    }
    let d = invite(&mut g, T0 + 10, "1001", "0044123456", "c5");
    let f = d.reject.expect("sixth call in a minute");
    assert_eq!(f.metric, Metric::CallsPerMinute);
    assert_eq!((f.value, f.limit), (6, 5));
    // Another account on the same source is unaffected; so are national numbers.
    assert!(invite(&mut g, T0 + 11, "1002", "0044123456", "d1")
        .reject
        .is_none());
    assert!(invite(&mut g, T0 + 12, "1001", "0301234567", "d2")
        .reject
        .is_none());
    // A minute later the window has moved on.
    assert!(invite(&mut g, T0 + 61_000, "1001", "0044123456", "c6")
        .reject
        .is_none());
}

#[test]
fn a_warning_comes_once_before_the_limit() {
    let mut g = guard(&cfg());
    let mut warnings = 0;
    for i in 0..5 {
        let d = invite(&mut g, T0 + i, "1001", "0044123456", &format!("c{i}"));
        warnings += d.alerts.iter().filter(|f| !f.critical).count();
    }
    // calls_per_minute 5 warns at 4; concurrent 3 warns at 3 and is critical at 4.
    assert!(warnings >= 1);
}

#[test]
fn concurrent_calls_are_limited_and_released() {
    let mut g = guard(&cfg());
    for i in 0..3 {
        let id = format!("c{i}");
        assert!(invite(&mut g, T0 + i, "1001", "001555", &id)
            .reject
            .is_none());
        g.on_invite_answer(T0 + i, id.as_bytes(), 200);
        g.on_ack(id.as_bytes());
    }
    let f = invite(&mut g, T0 + 5, "1001", "001556", "c3")
        .reject
        .unwrap();
    assert_eq!(f.metric, Metric::Concurrent);
    g.on_bye(T0 + 6, b"c0");
    g.on_bye_answer(b"c0", 200);
    assert!(invite(&mut g, T0 + 7, "1001", "001557", "c4")
        .reject
        .is_none());
    for id in ["c1", "c2", "c4"] {
        g.on_upstream_bye(id.as_bytes());
    }
    assert_eq!(g.concurrent_total(), 0);
    assert_eq!(g.active_calls(), 0);
}

#[test]
fn a_refused_bye_does_not_end_the_call() {
    let mut g = guard(&cfg());
    invite(&mut g, T0, "1001", "001555", "c0");
    g.on_invite_answer(T0, b"c0", 200);
    g.on_ack(b"c0");
    g.on_bye(T0 + 1, b"c0");
    g.on_bye_answer(b"c0", 403);
    g.tick(T0 + 60_000);
    assert_eq!(g.concurrent_total(), 1);
}

#[test]
fn a_challenge_is_refunded_and_its_retry_counts_once() {
    let mut g = guard(&cfg());
    for i in 0..20 {
        let id = format!("c{i}");
        assert!(invite(&mut g, T0 + i, "1001", "0044123", &id)
            .reject
            .is_none());
        g.on_invite_answer(T0 + i, id.as_bytes(), 407);
    }
    assert_eq!(g.concurrent_total(), 0);
    let d = invite(&mut g, T0 + 30, "1001", "0044123", "x");
    assert!(d.reject.is_none());
}

#[test]
fn premium_block_holds_the_account_until_block_time() {
    let mut g = guard(&cfg());
    for i in 0..3 {
        let id = format!("p{i}");
        assert!(invite(&mut g, T0 + i, "1001", "0900123", &id)
            .reject
            .is_none());
        g.on_invite_answer(T0 + i, id.as_bytes(), 603);
    }
    let f = invite(&mut g, T0 + 5, "1001", "0900123", "p3")
        .reject
        .unwrap();
    assert_eq!(f.metric, Metric::CallsPerHour);
    let f = invite(&mut g, T0 + HOUR - 1, "1001", "0900999", "p4")
        .reject
        .unwrap();
    assert_eq!(f.metric, Metric::Blocked);
    assert!(g
        .report(T0 + 10)
        .rows
        .iter()
        .any(|r| r.blocked_for_secs.is_some()));
    assert!(g.unblock_account("1001"));
    // The hour window is still full: a critical again, not a block carried over.
    let f = invite(&mut g, T0 + 20, "1001", "0900999", "p5")
        .reject
        .unwrap();
    assert_eq!(f.metric, Metric::CallsPerHour);
}

#[test]
fn same_number_and_distinct_numbers() {
    let mut c = cfg();
    c.rules = vec![FraudRule {
        same_number: 3,
        distinct_numbers: 4,
        ..FraudRule::default()
    }];
    let mut g = guard(&c);
    for i in 0..3 {
        let id = format!("s{i}");
        assert!(invite(&mut g, T0 + i, "1001", "123", &id).reject.is_none());
        g.on_invite_answer(T0, id.as_bytes(), 486);
    }
    assert_eq!(
        invite(&mut g, T0 + 5, "1001", "123", "s3")
            .reject
            .unwrap()
            .metric,
        Metric::SameNumber
    );
    for i in 0..3 {
        let id = format!("d{i}");
        assert!(invite(&mut g, T0 + 10 + i, "1001", &format!("20{i}"), &id)
            .reject
            .is_none());
        g.on_invite_answer(T0, id.as_bytes(), 486);
    }
    let f = invite(&mut g, T0 + 20, "1001", "999", "d9").reject.unwrap();
    assert_eq!((f.metric, f.value), (Metric::DistinctNumbers, 5));
}

#[test]
fn hours_and_days_profiles() {
    assert_eq!(parse_hours("").unwrap(), (1 << 24) - 1);
    assert_eq!(parse_hours("8-10").unwrap(), 0b1100000000);
    assert_eq!(parse_hours("22-2").unwrap(), (1 << 22) | (1 << 23) | 1 | 2);
    assert!(parse_hours("25-3").is_err());
    assert_eq!(parse_days("mon-fri").unwrap(), 0x1f);
    assert_eq!(parse_days("sat,sun").unwrap(), 0x60);
    assert_eq!(parse_days("fri-mon").unwrap(), 0x71);
    assert!(parse_days("funday").is_err());
    // T0 is a Tuesday at 22:13 UTC: a night-time rule applies, an office-hours one does not.
    let mut c = cfg();
    c.rules = vec![FraudRule {
        calls_per_minute: 1,
        hours: "8-18".into(),
        ..FraudRule::default()
    }];
    let mut g = guard(&c);
    for i in 0..3 {
        assert!(invite(&mut g, T0 + i, "1", "5", &format!("h{i}"))
            .reject
            .is_none());
    }
    c.rules[0].hours = "22-6".into();
    c.rules[0].days = "tue".into();
    let mut g = guard(&c);
    invite(&mut g, T0, "1", "5", "n0");
    assert!(invite(&mut g, T0 + 1, "1", "5", "n1").reject.is_some());
}

#[test]
fn max_duration_alerts_once() {
    let mut g = guard(&cfg());
    invite(&mut g, T0, "1001", "0044", "c0");
    g.on_invite_answer(T0, b"c0", 200);
    g.on_ack(b"c0");
    assert!(g.tick(T0 + 3_600_000).is_empty());
    let a = g.tick(T0 + 7_201_000);
    assert_eq!(a.len(), 1);
    assert_eq!(a[0].metric, Metric::MaxDuration);
    assert!(g.tick(T0 + 7_300_000).is_empty());
}

#[test]
fn observe_mode_counts_and_alerts_without_rejecting() {
    let mut g = guard(&cfg());
    let mut crit = 0;
    for i in 0..8 {
        let d = g.on_invite(
            T0 + i,
            src(),
            b"1001",
            b"0044",
            format!("c{i}").as_bytes(),
            false,
        );
        assert!(d.reject.is_none());
        crit += d.alerts.iter().filter(|f| f.critical).count();
    }
    assert!(crit > 0);
    assert_eq!(g.active_calls(), 8);
}

#[test]
fn snapshot_restores_calls_and_counters() {
    let mut g = guard(&cfg());
    for i in 0..3 {
        let id = format!("c{i}");
        invite(&mut g, T0 + i, "1001", "0044", &id);
        g.on_invite_answer(T0 + i, id.as_bytes(), 200);
    }
    let json = serde_json::to_string(&g.snapshot()).unwrap();
    let mut h = FraudGuard::new(&cfg(), [9; 16]);
    h.restore(serde_json::from_str(&json).unwrap());
    assert_eq!(h.concurrent_total(), 3);
    assert_eq!(
        invite(&mut h, T0 + 5, "1001", "0044", "c9")
            .reject
            .unwrap()
            .metric,
        Metric::Concurrent
    );
    for id in ["c0", "c1", "c2"] {
        h.on_ack(id.as_bytes());
        h.on_upstream_bye(id.as_bytes());
    }
    assert_eq!(h.concurrent_total(), 0);
}

/// Random call lives. Invariants after every step: the sum of the counters' concurrent calls
/// equals the slots of the calls in the table (no drift; a decrement never hits zero, checked
/// by the debug assertion in `uncount`), and once every call has ended all counters are zero.
#[test]
fn property_counters_never_drift_underflow_or_leak() {
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut c = cfg();
        c.rules.push(FraudRule {
            per: FraudPer::Source,
            concurrent: 50,
            ..FraudRule::default()
        });
        // Small caps so eviction of calls and counters is exercised too.
        c.max_calls = rng.random_range(5..60);
        c.max_subjects = rng.random_range(2..20);
        let mut g = guard(&c);
        let mut now = T0;
        let numbers = ["0044123", "0900555", "+8816", "030123", "00870"];
        for _ in 0..600 {
            now += rng.random_range(0..20_000);
            let id = format!("call{}", rng.random_range(0..40));
            let acct = format!("{}", 1000 + rng.random_range(0..6));
            let num = numbers[rng.random_range(0..numbers.len())];
            match rng.random_range(0..10) {
                0 | 1 => {
                    invite(&mut g, now, &acct, num, &id);
                }
                2 => g.on_invite_answer(now, id.as_bytes(), 200),
                3 => g.on_invite_answer(
                    now,
                    id.as_bytes(),
                    [401, 407, 486, 487, 408, 503][rng.random_range(0..6)],
                ),
                4 => g.on_ack(id.as_bytes()),
                5 => g.on_bye(now, id.as_bytes()),
                6 => g.on_bye_answer(id.as_bytes(), [200, 481, 403][rng.random_range(0..3)]),
                7 => g.on_upstream_bye(id.as_bytes()),
                8 => {
                    g.tick(now);
                }
                _ => {
                    let snap = serde_json::to_string(&g.snapshot()).unwrap();
                    g = guard(&c);
                    g.restore(serde_json::from_str(&snap).unwrap());
                }
            }
            let slots: u64 = g
                .calls
                .iter()
                .flat_map(|(_, call)| call.slots.iter())
                .filter(|s| g.subjects.peek(&s.key).is_some_and(|cn| cn.gen == s.gen))
                .count() as u64;
            assert_eq!(g.concurrent_total(), slots, "seed {seed}");
            assert!(g.calls.len() <= c.max_calls && g.subjects.len() <= c.max_subjects);
        }
        // Every call ends, one way or another: the counters are back to zero.
        g.tick(now + c.call_timeout.as_millis() as Millis + 1);
        assert_eq!(g.active_calls(), 0, "seed {seed}");
        assert_eq!(g.concurrent_total(), 0, "seed {seed}");
        g.tick(now + c.call_timeout.as_millis() as Millis + IDLE_EVICT + 1);
        assert_eq!(g.tracked(), 0, "idle counters evicted, seed {seed}");
    }
}

#[test]
fn stray_messages_never_create_or_underflow_counters() {
    let mut g = guard(&cfg());
    g.on_bye_answer(b"nope", 200);
    g.on_invite_answer(T0, b"nope", 487);
    g.on_ack(b"nope");
    g.on_upstream_bye(b"nope");
    assert_eq!(g.tracked(), 0);
    let _ = Duration::ZERO;
}

mod engine {
    use super::*;
    use crate::config::Config;
    use crate::engine::{Engine, Verdict};
    use crate::wire::{parse, Framing};
    use std::net::SocketAddr;

    fn invite(to: &str, from: &str, creds: Option<&str>, call: &str) -> Vec<u8> {
        let auth = creds.map_or(String::new(), |u| {
            format!("Proxy-Authorization: Digest username=\"{u}\", realm=\"pbx\", nonce=\"n\", uri=\"sip:{to}@pbx\", response=\"00\"\r\n")
        });
        format!(
            "INVITE sip:{to}@pbx SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK{call}\r\nMax-Forwards: 70\r\n\
From: <sip:{from}@pbx>;tag=1\r\nTo: <sip:{to}@pbx>\r\nCall-ID: {call}\r\nCSeq: 2 INVITE\r\n{auth}Content-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    fn answer(code: u16, method: &str, call: &str) -> Vec<u8> {
        format!(
            "SIP/2.0 {code} X\r\nVia: SIP/2.0/UDP 192.0.2.10;branch=z9hG4bK{call}\r\nFrom: <sip:a@pbx>;tag=1\r\n\
To: <sip:b@pbx>;tag=2\r\nCall-ID: {call}\r\nCSeq: 2 {method}\r\nContent-Length: 0\r\n\r\n"
        )
        .into_bytes()
    }

    #[test]
    fn credentials_username_is_the_account() {
        let b = invite("0044", "1001", Some("alice"), "x");
        let m = parse(&b, Framing::Datagram).unwrap();
        assert_eq!(credentials_user(&m), b"alice");
        assert_eq!(
            auth_param(b"Digest realm=\"r\", username=bob", b"username"),
            b"bob"
        );
        assert_eq!(auth_param(b"Digest xusername=\"no\"", b"username"), b"");
    }

    #[test]
    fn the_engine_rejects_past_the_limit_and_uncounts_every_end() {
        let mut c = Config::default();
        c.fraud.enabled = true;
        c.invite.rate_limit = 1000;
        c.invite.burst = 1000;
        let mut e = Engine::new(&c, T0);
        let phone: SocketAddr = "192.0.2.10:5060".parse().unwrap();
        let on = |e: &mut Engine, b: Vec<u8>| {
            let m = parse(&b, Framing::Datagram).unwrap();
            if m.is_request() {
                Some(e.on_request(T0, phone, &m, false))
            } else {
                e.on_answer(T0, phone, &m, None);
                None
            }
        };
        for i in 0..5 {
            let call = format!("c{i}");
            assert_eq!(
                on(&mut e, invite("0044123", "1001", Some("1001"), &call)),
                Some(Verdict::Forward)
            );
            on(
                &mut e,
                answer(if i % 2 == 0 { 487 } else { 486 }, "INVITE", &call),
            );
        }
        match on(&mut e, invite("0044123", "1001", Some("1001"), "c5")) {
            Some(Verdict::Reply {
                code: 403, reason, ..
            }) => assert!(reason.contains("calls per minute")),
            v => panic!("{v:?}"),
        }
        // A second account on the same source is unaffected.
        assert_eq!(
            on(&mut e, invite("0044123", "1002", Some("1002"), "d0")),
            Some(Verdict::Forward)
        );
        on(&mut e, answer(200, "INVITE", "d0"));
        let mut ack = invite("0044123", "1002", None, "d0");
        ack = String::from_utf8(ack)
            .unwrap()
            .replace("INVITE sip", "ACK sip")
            .replace("2 INVITE", "2 ACK")
            .into_bytes();
        on(&mut e, ack);
        assert_eq!(e.ledger_mut().fraud().concurrent_total(), 1);
        let bye = answer(200, "BYE", "d0");
        let upstream_bye = String::from_utf8(invite("0044123", "1002", None, "d0"))
            .unwrap()
            .replace("INVITE sip", "BYE sip");
        let m = parse(upstream_bye.as_bytes(), Framing::Datagram).unwrap();
        e.on_upstream_request(&m);
        on(&mut e, bye);
        assert_eq!(e.ledger_mut().fraud().concurrent_total(), 0);
        assert_eq!(e.ledger_mut().fraud().active_calls(), 0);
        assert!(e.take_events().iter().any(|ev| matches!(
            ev,
            crate::blocks::Event::Alert {
                kind: crate::blocks::BlockType::Fraud,
                ..
            }
        )));
    }
}

mod max_duration_bye {
    use super::*;
    use crate::stats::Transport;
    use crate::wire::{parse, Framing};

    const INVITE: &str = "INVITE sip:0044123@pbx SIP/2.0\r\nVia: SIP/2.0/UDP 192.0.2.10:5060;branch=z9hG4bK1\r\nFrom: <sip:1001@pbx>;tag=a\r\nTo: <sip:0044123@pbx>\r\nCall-ID: md\r\nCSeq: 7 INVITE\r\nContact: <sip:1001@192.0.2.10:5060>\r\nContent-Length: 0\r\n\r\n";

    fn ok(contact: &str) -> String {
        format!("SIP/2.0 200 OK\r\nVia: SIP/2.0/UDP 192.0.2.1:5060;branch=z9hG4bKsw1\r\nRecord-Route: <sip:pbx.example;lr>, <sip:tok@192.0.2.1:5060;lr>\r\nFrom: <sip:1001@pbx>;tag=a\r\nTo: <sip:0044123@pbx>;tag=b\r\nCall-ID: md\r\nCSeq: 7 INVITE\r\nContact: {contact}\r\nContent-Length: 0\r\n\r\n")
    }

    fn run(action: MaxDurationAction, contact: &str) -> (Vec<Dialog>, usize) {
        let mut c = cfg();
        c.on_max_duration = action;
        c.rules = vec![FraudRule {
            max_duration: Duration::from_secs(60),
            ..FraudRule::default()
        }];
        let mut g = guard(&c);
        let inv = parse(INVITE.as_bytes(), Framing::Datagram).unwrap();
        assert!(invite(&mut g, T0, "1001", "0044123", "md").reject.is_none());
        g.note_invite(&inv);
        let ok = ok(contact);
        let m = parse(ok.as_bytes(), Framing::Datagram).unwrap();
        g.on_invite_answer(T0, b"md", 200);
        let caller = (Transport::Udp, "192.0.2.10:5060".parse().unwrap());
        g.note_answer(&m, caller);
        g.on_ack(b"md");
        assert!(g.tick(T0 + 30_000).is_empty());
        let alerts = g.tick(T0 + 61_000);
        assert_eq!(alerts.len(), 1);
        (g.take_byes(), g.active_calls())
    }

    #[test]
    fn bye_mode_ends_the_call_and_builds_both_byes() {
        let (byes, active) = run(MaxDurationAction::Bye, "<sip:2000@198.51.100.5:5070>");
        assert_eq!(active, 0, "the call left the table");
        assert_eq!(byes.len(), 1);
        let out = byes[0].byes(
            |_| "192.0.2.1:5060".into(),
            Transport::Udp,
            9,
            |h, p| h == b"192.0.2.1" && p == Some(5060),
        );
        assert_eq!(out.len(), 2);
        let callee = String::from_utf8(out[0].bytes.clone()).unwrap();
        assert!(out[0].to_upstream);
        assert!(
            callee.starts_with("BYE sip:2000@198.51.100.5:5070 SIP/2.0\r\n"),
            "{callee}"
        );
        assert!(
            callee.contains("\r\nRoute: <sip:pbx.example;lr>\r\n"),
            "{callee}"
        );
        assert!(
            !callee.contains("tok@"),
            "our own Route entry is not sent: {callee}"
        );
        assert!(callee.contains("\r\nCSeq: 100007 BYE\r\n"), "{callee}");
        assert!(
            callee.contains("\r\nFrom: <sip:1001@pbx>;tag=a\r\nTo: <sip:0044123@pbx>;tag=b\r\n")
        );
        let caller = String::from_utf8(out[1].bytes.clone()).unwrap();
        assert!(
            caller.starts_with("BYE sip:1001@192.0.2.10:5060 SIP/2.0\r\n"),
            "{caller}"
        );
        assert!(!caller.contains("Route:"), "{caller}");
        assert!(
            caller.contains("\r\nFrom: <sip:0044123@pbx>;tag=b\r\nTo: <sip:1001@pbx>;tag=a\r\n")
        );
        for m in [&callee, &caller] {
            let p = parse(m.as_bytes(), Framing::Datagram).unwrap();
            assert_eq!(p.method(), Some(crate::wire::Method::Bye));
            let via = p.value(crate::wire::HeaderName::Via).unwrap();
            let branch = via.split(|b| *b == b'=').nth(1).unwrap();
            assert!(!branch.starts_with(crate::proxy::BRANCH_PREFIX), "{m}");
        }
    }

    #[test]
    fn alert_mode_and_unfit_answers_never_end_a_call() {
        let (byes, active) = run(MaxDurationAction::Alert, "<sip:2000@198.51.100.5:5070>");
        assert!(byes.is_empty());
        assert_eq!(active, 1, "alerted, still tracked");
        // A Contact the learner refuses (no URI): no BYE, the call is alerted and goes on.
        let (byes, active) = run(MaxDurationAction::Bye, "<>");
        assert!(byes.is_empty());
        assert_eq!(active, 1);
    }

    #[test]
    fn oversized_answers_are_not_learnt() {
        let caller = (Transport::Udp, "192.0.2.10:5060".parse().unwrap());
        let inv = parse(INVITE.as_bytes(), Framing::Datagram).unwrap();
        let learn = |msg: &str| {
            let m = parse(msg.as_bytes(), Framing::Datagram).unwrap();
            let mut d = Dialog::from_invite(&inv).unwrap();
            d.learn_answer(&m, caller)
        };
        assert!(learn(&ok("<sip:2000@198.51.100.5>")));
        // Four routes of 500 bytes: each under MAX_FIELD, together over MAX_DIALOG_BYTES.
        let long = format!("<sip:{}@pbx.example;lr>", "a".repeat(480));
        let big = ok("<sip:2000@198.51.100.5>").replacen(
            "Record-Route: ",
            &format!("Record-Route: {long}, {long}, {long}, {long}\r\nRecord-Route: "),
            1,
        );
        assert!(!learn(&big));
        // Seven entries: over MAX_ROUTES.
        let many = ok("<sip:2000@198.51.100.5>").replacen(
            "Record-Route: ",
            "Record-Route: <sip:a;lr>, <sip:b;lr>, <sip:c;lr>, <sip:d;lr>, <sip:e;lr>\r\nRecord-Route: ",
            1,
        );
        assert!(!learn(&many));
    }
}
