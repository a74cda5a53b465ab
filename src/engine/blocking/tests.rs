//! The block table under attack: eviction by cost, the bounded and aggregated blacklist.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::super::tests::{cfg, engine, on_req, req, resp, sa, T0};
use crate::blocks::{BlockType, Event, ListKind, UnblockReason};
use crate::engine::{Engine, Pre};
use crate::wire::{parse, Framing};

fn scanner_packet(e: &mut Engine, now: u64, src: SocketAddr) {
    on_req(e, now, src, &req("OPTIONS", "1", "friendly-scanner", ""));
}

fn v4(n: u32) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::from(n)), 5060)
}

#[test]
fn spoofed_scanner_burst_does_not_evict_a_brute_forcer() {
    let mut c = cfg();
    c.protection.max_blocks = 50;
    let mut e = engine(&c);
    let brute = sa("192.0.2.9:5060");
    for i in 0..c.register.hit_count {
        let m = resp(403, "REGISTER", "1001", 1);
        let m = parse(&m, Framing::Datagram).unwrap();
        e.on_answer(T0 + i as u64, brute, &m, Some(i as u64));
    }
    assert!(matches!(
        e.precheck(T0 + 10, brute),
        Pre::Blocked {
            kind: BlockType::Register,
            ..
        }
    ));
    // One packet each from 5000 spoofed sources: one-packet scanner blocks, a day long but
    // cheap, arriving while the brute forcer's block is the one closest to expiry.
    for i in 0..5000u32 {
        scanner_packet(&mut e, T0 + 20, v4(0x0b00_0000 + i));
    }
    assert_eq!(e.ledger_mut().block_table().len(), 50);
    assert!(
        matches!(e.precheck(T0 + 30, brute), Pre::Blocked { .. }),
        "the brute forcer is still blocked"
    );
    let (evicted, refused) = e.ledger_mut().block_table().evictions();
    assert_eq!((evicted, refused), (0, 5000 - 49));
    assert!(!e.take_events().iter().any(|ev| matches!(
        ev,
        Event::Unblocked {
            why: UnblockReason::Evicted,
            ..
        }
    )));
    // A scanner whose block was refused is still dropped packet by packet.
    let late = v4(0x0c00_0001);
    let v = on_req(
        &mut e,
        T0 + 40,
        late,
        &req("OPTIONS", "1", "sipvicious", ""),
    );
    assert!(matches!(v, crate::engine::Verdict::Drop(_)));
}

#[test]
fn costlier_block_takes_the_place_of_the_cheapest() {
    let mut c = cfg();
    c.protection.max_blocks = 10;
    let mut e = engine(&c);
    for i in 0..10u32 {
        scanner_packet(&mut e, T0, v4(0x0b00_0000 + i));
    }
    let brute = sa("192.0.2.9:5060");
    for i in 0..c.register.hit_count {
        let m = resp(403, "REGISTER", "1001", 1);
        let m = parse(&m, Framing::Datagram).unwrap();
        e.on_answer(T0 + i as u64, brute, &m, Some(i as u64));
    }
    assert!(matches!(e.precheck(T0 + 10, brute), Pre::Blocked { .. }));
    assert_eq!(e.ledger_mut().block_table().evictions(), (1, 0));
    assert!(e.take_events().iter().any(|ev| matches!(
        ev,
        Event::Unblocked {
            kind: BlockType::Scanner,
            why: UnblockReason::Evicted,
            ..
        }
    )));
}

fn blacklisted(e: &Engine) -> Vec<String> {
    e.ledger()
        .lists()
        .entries(ListKind::Blacklist)
        .into_iter()
        .map(|(n, _)| n.to_string())
        .collect()
}

#[test]
fn automatic_blacklist_is_bounded() {
    let mut c = cfg();
    c.register.block_threshold = 1;
    c.protection.max_auto_blacklist = 3;
    c.protection.aggregate_ipv4 = 0;
    let mut e = engine(&c);
    for i in 0..10u32 {
        scanner_packet(&mut e, T0, v4(0x0b00_0000 + (i << 8)));
    }
    assert_eq!(e.ledger_mut().lists().len(ListKind::Blacklist), 3);
    assert_eq!(
        e.ledger_mut().block_table().len(),
        10,
        "the others still get dynamic blocks"
    );
    let dynamic = e
        .ledger_mut()
        .blocks()
        .filter(|b| b.expires_at.is_some())
        .count();
    assert_eq!(dynamic, 7);
    assert!(e
        .ledger_mut()
        .blocks()
        .any(|b| b.reason.contains("automatic blacklist is full")));
    // The bound also holds against max_blocks: never more than half of the table.
    let mut c = c.clone();
    c.protection.max_auto_blacklist = 10_000;
    c.protection.max_blocks = 8;
    let mut e = engine(&c);
    for i in 0..10u32 {
        scanner_packet(&mut e, T0, v4(0x0b00_0000 + (i << 8)));
    }
    assert_eq!(e.ledger_mut().lists().len(ListKind::Blacklist), 4);
}

#[test]
fn blacklisted_neighbours_aggregate_into_their_prefix() {
    let mut c = cfg();
    c.register.block_threshold = 1;
    let mut e = engine(&c);
    // An operator entry inside the prefix is never touched.
    let op: ipnet::IpNet = "203.0.113.77/32".parse().unwrap();
    e.ledger_mut()
        .list_add(T0, ListKind::Blacklist, op, "mine", "api");
    for i in 1..=3u8 {
        scanner_packet(&mut e, T0, sa(&format!("203.0.113.{i}:5060")));
    }
    assert_eq!(blacklisted(&e).len(), 4, "{:?}", blacklisted(&e));
    scanner_packet(&mut e, T0, sa("203.0.113.4:5060"));
    let mut list = blacklisted(&e);
    list.sort();
    assert_eq!(list, vec!["203.0.113.0/24", "203.0.113.77/32"]);
    assert!(matches!(
        e.precheck(T0 + 1, sa("203.0.113.200:5060")),
        Pre::Blocked {
            kind: BlockType::Blacklist,
            ..
        }
    ));
    // One table row for the prefix instead of four permanent ones.
    let permanent: Vec<_> = e
        .ledger_mut()
        .blocks()
        .filter(|b| b.expires_at.is_none())
        .collect();
    let rows: Vec<String> = permanent.iter().map(|b| b.key.ip_text()).collect();
    assert_eq!(rows, vec!["203.0.113.0/24"]);
    let ev = e.take_events();
    assert_eq!(
        ev.iter()
            .filter(|x| matches!(
                x,
                Event::Unblocked {
                    why: UnblockReason::Aggregated,
                    ..
                }
            ))
            .count(),
        3
    );
}

#[test]
fn no_aggregation_over_the_whitelist_or_the_upstream() {
    let mut c = cfg();
    c.register.block_threshold = 1;
    c.lists.whitelist = vec!["198.51.100.250/32".parse().unwrap()];
    let mut e = engine(&c);
    for i in 1..=6u8 {
        scanner_packet(&mut e, T0, sa(&format!("198.51.100.{i}:5060")));
        // The upstream is 10.0.0.1.
        scanner_packet(&mut e, T0, sa(&format!("10.0.0.{}:5060", i + 1)));
    }
    let list = blacklisted(&e);
    assert_eq!(list.len(), 12, "{list:?}");
    assert!(list.iter().all(|n| n.ends_with("/32")));
    assert_eq!(e.precheck(T0, sa("198.51.100.250:5060")), Pre::Whitelisted);
    assert!(
        !e.ledger_mut().is_blocked(T0, sa("10.0.0.1:5060")),
        "the upstream stays reachable"
    );
}

#[test]
fn ipv6_sources_aggregate_per_48() {
    let mut c = cfg();
    c.register.block_threshold = 1;
    let mut e = engine(&c);
    for i in 1..=4u16 {
        scanner_packet(&mut e, T0, sa(&format!("[2001:db8:7:{i}::1]:5060")));
    }
    assert_eq!(blacklisted(&e), vec!["2001:db8:7::/48"]);
}
