//! The attempt counter: failures counted per attempt (credentials value), for every method.

use std::net::SocketAddr;

use super::super::tests::{cfg, engine, on_req, req, resp, sa, T0};
use super::*;
use crate::engine::{Engine, Verdict};
use crate::wire::{parse, Framing};

fn attempt(e: &mut Engine, now: Millis, phone: SocketAddr, b: &[u8], fp: Option<u64>) {
    let m = parse(b, Framing::Datagram).unwrap();
    e.on_answer(now, phone, &m, fp);
}

#[test]
fn classify_covers_every_challenged_method() {
    for m in [
        &b"REGISTER"[..],
        b"INVITE",
        b"MESSAGE",
        b"INFO",
        b"PUBLISH",
        b"NOTIFY",
        b"REFER",
        b"SUBSCRIBE",
        b"BYE",
        b"OPTIONS",
        b"UPDATE",
    ] {
        assert_eq!(classify(m, 403, false), Some(Outcome::Failed));
        assert_eq!(classify(m, 401, true), Some(Outcome::Failed));
        assert_eq!(classify(m, 407, false), Some(Outcome::Challenged));
        assert_eq!(classify(m, 404, true), Some(Outcome::NoSuchUser));
        assert_eq!(classify(m, 486, true), None);
    }
    assert_eq!(classify(b"REGISTER", 200, true), Some(Outcome::Registered));
    assert_eq!(classify(b"INVITE", 200, true), None);
    for m in [&b"ACK"[..], b"CANCEL", b""] {
        assert_eq!(classify(m, 403, true), None);
    }
}

#[test]
fn new_guesses_with_constant_call_id_and_cseq_are_each_counted() {
    let c = cfg();
    let mut e = engine(&c);
    let phone = sa("192.0.2.9:5060");
    // The same Call-ID and CSeq every time, only the Authorization value changes.
    let r = resp(401, "REGISTER", "1001", 7);
    for i in 0..c.register.hit_count as u64 - 1 {
        attempt(&mut e, T0 + i, phone, &r, Some(1000 + i));
        assert_eq!(e.ledger_mut().block_table().len(), 0, "guess {i}");
    }
    attempt(&mut e, T0 + 10, phone, &r, Some(2000));
    let b = e
        .ledger_mut()
        .blocks()
        .next()
        .expect("blocked after hit_count guesses");
    assert_eq!(b.kind, BlockType::Register);
    assert_eq!(b.key.port, None);
}

#[test]
fn identical_credentials_count_once() {
    let c = cfg();
    let mut e = engine(&c);
    let phone = sa("192.0.2.9:5060");
    // Thirty answers to retransmissions of one request (one guess), even with new CSeqs.
    for i in 0..30u64 {
        let r = resp(403, "REGISTER", "1001", 7 + (i % 2) as u32);
        attempt(&mut e, T0 + i * 100, phone, &r, Some(42));
    }
    assert_eq!(e.ledger_mut().block_table().len(), 0);
    // Four more distinct guesses make five attempts.
    for i in 0..4u64 {
        let r = resp(403, "REGISTER", "1001", 7);
        attempt(&mut e, T0 + 5000 + i, phone, &r, Some(43 + i));
    }
    assert_eq!(e.ledger_mut().block_table().len(), 1);
}

#[test]
fn retransmissions_without_credentials_still_deduplicated_by_transaction() {
    let c = cfg();
    let mut e = engine(&c);
    let phone = sa("192.0.2.9:5060");
    for i in 0..20u64 {
        attempt(&mut e, T0 + i, phone, &resp(403, "INVITE", "1001", 3), None);
    }
    assert_eq!(
        e.ledger_mut().block_table().len(),
        0,
        "one transaction, one failure"
    );
    // An enumerator keeping Call-ID and CSeq but changing the user is not one transaction.
    for u in 0..10u32 {
        let user = format!("{}", 2000 + u);
        let r = resp(404, "REGISTER", &user, 3).to_vec();
        let r = String::from_utf8(r)
            .unwrap()
            .replace(&format!("c3{user}"), "c3");
        attempt(&mut e, T0 + 100 + u as u64, phone, r.as_bytes(), None);
    }
    assert_eq!(
        e.ledger_mut().blocks().next().map(|b| b.kind),
        Some(BlockType::Scan)
    );
}

#[test]
fn failures_on_every_method_count() {
    for method in [
        "MESSAGE",
        "INFO",
        "PUBLISH",
        "NOTIFY",
        "REFER",
        "SUBSCRIBE",
        "BYE",
    ] {
        let c = cfg();
        let mut e = engine(&c);
        let phone = sa("192.0.2.20:5060");
        for i in 0..c.register.hit_count {
            let code = if i % 2 == 0 { 407 } else { 403 };
            attempt(
                &mut e,
                T0 + i as u64,
                phone,
                &resp(code, method, "1001", 1),
                Some(i as u64),
            );
        }
        let b = e
            .ledger_mut()
            .blocks()
            .next()
            .unwrap_or_else(|| panic!("{method} not counted"));
        assert_eq!(b.kind, BlockType::Invite, "{method}");
        assert!(b.reason.contains(method), "{method}: {}", b.reason);
    }
}

#[test]
fn ack_and_cancel_answers_and_non_register_404_do_not_count_as_guesses() {
    let c = cfg();
    let mut e = engine(&c);
    let phone = sa("192.0.2.21:5060");
    for i in 0..20u32 {
        attempt(
            &mut e,
            T0,
            phone,
            &resp(403, "CANCEL", "1", i),
            Some(i as u64),
        );
        // Calls to a number that does not exist, from a phone that has credentials.
        attempt(
            &mut e,
            T0,
            phone,
            &resp(404, "INVITE", "1", i),
            Some(i as u64),
        );
    }
    assert_eq!(e.ledger_mut().block_table().len(), 0);
}

#[test]
fn credentials_on_any_method_mark_a_phone_that_answers_challenges() {
    let c = cfg();
    let mut e = engine(&c);
    let nat = sa("192.0.2.70:5060");
    // Phones behind one NAT send MESSAGEs to many users; each is challenged once, then
    // answered with credentials: no enumeration.
    for u in 0..20u32 {
        let user = format!("{}", 3000 + u);
        let v = on_req(
            &mut e,
            T0,
            nat,
            &req(
                "MESSAGE",
                &user,
                "Yealink",
                "Proxy-Authorization: Digest x\r\n",
            ),
        );
        assert_eq!(v, Verdict::Forward);
        attempt(&mut e, T0 + 1, nat, &resp(407, "MESSAGE", &user, u), None);
    }
    assert_eq!(e.ledger_mut().block_table().len(), 0);
}

#[test]
fn non_register_failures_are_charged_to_the_sending_account() {
    let c = cfg();
    let mut e = engine(&c);
    let src = sa("192.0.2.30:5060");
    // MESSAGEs to one target, authenticating as a different account each time.
    for (i, account) in (4000..4005).enumerate() {
        let r = format!(
            "SIP/2.0 403 Forbidden\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK1\r\n\
From: <sip:{account}@pbx>;tag=1\r\nTo: <sip:1000@pbx>;tag=2\r\nCall-ID: m{i}\r\n\
CSeq: 1 MESSAGE\r\nContent-Length: 0\r\n\r\n"
        );
        attempt(&mut e, T0 + i as u64, src, r.as_bytes(), Some(i as u64));
    }
    let b = e.ledger_mut().blocks().next().expect("blocked");
    assert!(b.reason.contains("across 5 accounts"), "{}", b.reason);
    assert!(b.reason.contains("MESSAGE"), "{}", b.reason);
}
