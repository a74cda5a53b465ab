//! The gate stays in step with the engine: every change of the block table, the lists and the
//! policy is visible to the lock-free check at once, and its hits reach the block rows.
#![allow(clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::time::Duration;

use super::GateVerdict;
use crate::blocks::{parse_net, source_net, BlockKey, BlockType, Event, ListKind};
use crate::clock::Millis;
use crate::config::{Config, Mode};
use crate::engine::{Detection, Engine};

const T0: Millis = 1_700_000_000_000;

fn cfg() -> Config {
    let mut c = Config::default();
    c.upstream.address = "10.0.0.1:5060".into();
    c
}

fn engine(c: &Config) -> Engine {
    let e = Engine::new(c, T0);
    e.set_upstream(vec!["10.0.0.1".parse().unwrap()]);
    e
}

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn blocked(kind: BlockType) -> GateVerdict {
    GateVerdict::Blocked {
        kind,
        reply_403: false,
    }
}

fn detection(key: BlockKey, kind: BlockType, secs: u64) -> Detection {
    Detection {
        key,
        kind,
        reason: "test".into(),
        duration: Duration::from_secs(secs),
        evidence: vec!["evidence".into()],
    }
}

fn whole(ip: &str) -> BlockKey {
    BlockKey::whole(source_net(ip.parse().unwrap(), 64))
}

#[test]
fn block_expire_and_sweep() {
    let mut e = engine(&cfg());
    let src = sa("192.0.2.7:5060");
    assert_eq!(e.gate().check(T0, src), GateVerdict::Inspect);
    assert!(e.ledger_mut().block(
        T0,
        detection(whole("192.0.2.7"), BlockType::Scanner, 60),
        "ua"
    ));
    assert_eq!(e.gate().check(T0, src), blocked(BlockType::Scanner));
    assert_eq!(
        e.gate().check(T0 + 59_999, src),
        blocked(BlockType::Scanner)
    );
    // Expired: no longer matched, even before the sweep takes it out.
    assert_eq!(e.gate().check(T0 + 60_000, src), GateVerdict::Inspect);
    assert_eq!(e.gate().len(), 1);
    e.ledger_mut().tick(T0 + 60_000);
    assert_eq!(e.gate().len(), 0);
}

#[test]
fn refresh_after_expiry_blocks_again_with_the_new_expiry() {
    let mut e = engine(&cfg());
    let src = sa("192.0.2.8:1");
    let key = whole("192.0.2.8");
    e.ledger_mut()
        .block(T0, detection(key, BlockType::Flood, 10), "");
    let later = T0 + 20_000;
    assert_eq!(e.gate().check(later, src), GateVerdict::Inspect);
    // The same source offends again before the sweep: a new block replaces the stale one.
    assert!(e
        .ledger_mut()
        .block(later, detection(key, BlockType::Flood, 10), ""));
    assert_eq!(e.gate().check(later, src), blocked(BlockType::Flood));
    let expires = e
        .ledger_mut()
        .block_table()
        .get(&key)
        .unwrap()
        .expires_at
        .unwrap();
    assert!(expires > later);
    assert_eq!(e.gate().check(expires, src), GateVerdict::Inspect);
}

#[test]
fn unblock_and_manual_block() {
    let mut e = engine(&cfg());
    let src = sa("198.51.100.1:5060");
    let key = whole("198.51.100.1");
    e.ledger_mut().manual_block(T0, key, None, "op").unwrap();
    assert_eq!(
        e.gate().check(T0 + 1_000_000_000, src),
        blocked(BlockType::Manual)
    );
    e.unblock(key.net, None);
    assert_eq!(e.gate().check(T0, src), GateVerdict::Inspect);
    assert!(e.gate().is_empty());
}

#[test]
fn port_blocks_cover_only_their_port() {
    let mut e = engine(&cfg());
    let net = source_net("203.0.113.5".parse().unwrap(), 64);
    let key = BlockKey::with_port(net, 5062);
    e.ledger_mut()
        .block(T0, detection(key, BlockType::Register, 60), "");
    assert_eq!(
        e.gate().check(T0, sa("203.0.113.5:5062")),
        blocked(BlockType::Register)
    );
    assert_eq!(
        e.gate().check(T0, sa("203.0.113.5:5060")),
        GateVerdict::Inspect
    );
    e.unblock(net, Some(5062));
    assert_eq!(
        e.gate().check(T0, sa("203.0.113.5:5062")),
        GateVerdict::Inspect
    );
}

#[test]
fn ipv6_blocks_cover_the_prefix_and_follow_its_length() {
    let mut c = cfg();
    let mut e = engine(&c);
    let key = BlockKey::whole(source_net("2001:db8:1:2::5".parse().unwrap(), 64));
    e.ledger_mut()
        .block(T0, detection(key, BlockType::Anomaly, 60), "");
    assert_eq!(
        e.gate().check(T0, sa("[2001:db8:1:2:ffff::1]:5060")),
        blocked(BlockType::Anomaly)
    );
    assert_eq!(
        e.gate().check(T0, sa("[2001:db8:1:3::1]:5060")),
        GateVerdict::Inspect
    );
    // A reload with another prefix length keys lookups by it, as the table does.
    c.protection.ipv6_prefix = 48;
    e.reconfigure(&c, T0);
    assert_eq!(
        e.gate().check(T0, sa("[2001:db8:1:2::5]:5060")),
        GateVerdict::Inspect
    );
    let key48 = BlockKey::whole(source_net("2001:db8:1::".parse().unwrap(), 48));
    e.ledger_mut()
        .block(T0, detection(key48, BlockType::Anomaly, 60), "");
    assert_eq!(
        e.gate().check(T0, sa("[2001:db8:1:ffff::1]:1")),
        blocked(BlockType::Anomaly)
    );
}

#[test]
fn eviction_leaves_the_gate() {
    let mut c = cfg();
    c.protection.max_blocks = 1;
    let mut e = engine(&c);
    e.ledger_mut().block(
        T0,
        detection(whole("192.0.2.1"), BlockType::Scanner, 60),
        "",
    );
    // A costlier block takes the only slot.
    e.ledger_mut().block(
        T0,
        detection(whole("192.0.2.2"), BlockType::Register, 60),
        "",
    );
    assert_eq!(e.gate().check(T0, sa("192.0.2.1:1")), GateVerdict::Inspect);
    assert_eq!(
        e.gate().check(T0, sa("192.0.2.2:1")),
        blocked(BlockType::Register)
    );
    assert_eq!(e.gate().len(), 1);
}

#[test]
fn lists_add_remove_and_whitelist_precedence() {
    let mut e = engine(&cfg());
    let src = sa("10.9.0.1:5060");
    let net = parse_net("10.9.0.0/16").unwrap();
    e.ledger_mut()
        .list_add(T0, ListKind::Blacklist, net, "", "api");
    assert_eq!(e.gate().check(T0, src), blocked(BlockType::Blacklist));
    let one = parse_net("10.9.0.1").unwrap();
    e.ledger_mut()
        .list_add(T0, ListKind::Whitelist, one, "", "api");
    assert_eq!(e.gate().check(T0, src), GateVerdict::Whitelisted);
    assert_eq!(
        e.gate().check(T0, sa("10.9.0.2:1")),
        blocked(BlockType::Blacklist)
    );
    e.ledger_mut().list_remove(ListKind::Blacklist, net);
    assert_eq!(e.gate().check(T0, sa("10.9.0.2:1")), GateVerdict::Inspect);
    e.ledger_mut().list_remove(ListKind::Whitelist, one);
    assert_eq!(e.gate().check(T0, src), GateVerdict::Inspect);
}

#[test]
fn whitelisting_lifts_blocks_from_the_gate() {
    let mut e = engine(&cfg());
    e.ledger_mut().block(
        T0,
        detection(whole("192.0.2.9"), BlockType::Scanner, 60),
        "",
    );
    e.ledger_mut().list_add(
        T0,
        ListKind::Whitelist,
        parse_net("192.0.2.0/24").unwrap(),
        "",
        "api",
    );
    assert_eq!(
        e.gate().check(T0, sa("192.0.2.9:1")),
        GateVerdict::Whitelisted
    );
    assert!(e.gate().is_empty());
}

#[test]
fn automatic_blacklist_reaches_the_gate() {
    let mut c = cfg();
    c.register.block_threshold = 2;
    let mut e = engine(&c);
    let key = whole("192.0.2.50");
    let mut t = T0;
    for _ in 0..2 {
        e.ledger_mut()
            .block(t, detection(key, BlockType::Scanner, 1), "");
        t += 2_000;
        e.ledger_mut().tick(t);
    }
    assert!(e
        .ledger_mut()
        .lists()
        .blacklisted("192.0.2.50".parse().unwrap())
        .is_some());
    assert!(matches!(
        e.gate().check(t + 10_000_000, sa("192.0.2.50:1")),
        GateVerdict::Blocked { .. }
    ));
}

#[test]
fn observe_mode_enforces_nothing() {
    let mut c = cfg();
    c.protection.mode = Mode::Observe;
    c.lists.blacklist = vec![parse_net("192.0.2.0/24").unwrap()];
    let mut e = engine(&c);
    e.ledger_mut().block(
        T0,
        detection(whole("198.51.100.9"), BlockType::Scanner, 60),
        "",
    );
    assert_eq!(
        e.ledger_mut().block_table().len(),
        1,
        "shown as a would-be block"
    );
    assert_eq!(
        e.gate().check(T0, sa("198.51.100.9:1")),
        GateVerdict::Inspect
    );
    assert_eq!(e.gate().check(T0, sa("192.0.2.1:1")), GateVerdict::Inspect);
    // Back to enforce: the blacklist applies at once; a would-be block stays one.
    c.protection.mode = Mode::Enforce;
    e.reconfigure(&c, T0);
    assert_eq!(
        e.gate().check(T0, sa("192.0.2.1:1")),
        blocked(BlockType::Blacklist)
    );
    assert_eq!(
        e.gate().check(T0, sa("198.51.100.9:1")),
        GateVerdict::Inspect
    );
}

#[test]
fn reconfigure_replaces_config_lists_and_the_403_reply() {
    let mut c = cfg();
    c.lists.blacklist = vec![parse_net("192.0.2.0/24").unwrap()];
    let mut e = engine(&c);
    assert_eq!(
        e.gate().check(T0, sa("192.0.2.1:1")),
        blocked(BlockType::Blacklist)
    );
    c.lists.blacklist = vec![];
    c.protection.blocked_reply = crate::config::BlockedReply::Forbidden;
    e.reconfigure(&c, T0);
    assert_eq!(e.gate().check(T0, sa("192.0.2.1:1")), GateVerdict::Inspect);
    e.ledger_mut()
        .manual_block(T0, whole("192.0.2.1"), None, "")
        .unwrap();
    assert_eq!(
        e.gate().check(T0, sa("192.0.2.1:1")),
        GateVerdict::Blocked {
            kind: BlockType::Manual,
            reply_403: true
        }
    );
}

#[test]
fn restore_at_start_fills_the_gate() {
    let mut e = engine(&cfg());
    let net = parse_net("203.0.113.0/24").unwrap();
    e.ledger_mut().restore(
        T0,
        Event::ListAdded {
            list: ListKind::Blacklist,
            net,
            entry: crate::blocks::ListEntry {
                comment: String::new(),
                added_at: T0,
                source: "api".into(),
            },
        },
    );
    e.ledger_mut().sync_gate();
    assert_eq!(
        e.gate().check(T0, sa("203.0.113.4:1")),
        blocked(BlockType::Blacklist)
    );
    let key = whole("198.51.100.77");
    let mut other = engine(&cfg());
    other
        .ledger_mut()
        .manual_block(T0, key, Some(Duration::from_secs(60)), "")
        .unwrap();
    let b = other.ledger_mut().block_table().get(&key).unwrap().clone();
    e.ledger_mut().restore(T0, Event::Blocked(b));
    assert_eq!(
        e.gate().check(T0, sa("198.51.100.77:1")),
        blocked(BlockType::Manual)
    );
    e.ledger_mut().restore(
        T0,
        Event::Unblocked {
            key,
            kind: BlockType::Manual,
            why: crate::blocks::UnblockReason::Manual,
        },
    );
    assert_eq!(
        e.gate().check(T0, sa("198.51.100.77:1")),
        GateVerdict::Inspect
    );
}

#[test]
fn gate_hits_are_folded_into_the_rows_the_admin_reads() {
    let (node, _rx) = crate::node::Node::new(cfg());
    let now = node.now();
    let key = whole("192.0.2.99");
    node.with_engine(|e| e.manual_block(now, key, None, "").map(|_| ()))
        .unwrap();
    for _ in 0..5 {
        assert_eq!(
            node.gate().check(now, sa("192.0.2.99:5060")),
            blocked(BlockType::Manual)
        );
    }
    // What /api/blocks reads (through `Node::inspect`).
    let hits = node.inspect(|e| e.block_table().get(&key).map(|b| b.hits));
    assert_eq!(hits, Some(5));
    node.gate().check(now, sa("192.0.2.99:1"));
    let hits = node.inspect(|e| e.blocks().map(|b| b.hits).sum::<u64>());
    assert_eq!(hits, 6, "folded once, never twice");
    // A row taken out of the table carries its unfolded hits (a list edit re-inserts it).
    node.gate().check(now, sa("192.0.2.99:1"));
    let removed = node.with_engine(|e| e.unblock(key.net, None));
    assert_eq!(removed.first().map(|b| b.hits), Some(7));
}

#[test]
fn drops_counted_locally_reach_the_rows_once_flushed_and_are_bounded_before() {
    use super::LocalHits;
    let mut e = engine(&cfg());
    for i in 1..=20u8 {
        let key = whole(&format!("192.0.2.{i}"));
        assert!(e
            .ledger_mut()
            .block(T0, detection(key, BlockType::Scanner, 600), ""));
    }
    let gate = e.gate().clone();
    let mut local = LocalHits::default();
    let one = sa("192.0.2.1:5060");
    for _ in 0..10 {
        assert_eq!(
            gate.check_local(T0, one, &mut local),
            blocked(BlockType::Scanner)
        );
    }
    // Held locally: the entry has seen none of them yet.
    assert_eq!(gate.hits(&whole("192.0.2.1")), 0);
    // More distinct sources than it holds: the oldest are flushed, nothing lost.
    for i in 2..=20u8 {
        let src = sa(&format!("192.0.2.{i}:5060"));
        assert_eq!(
            gate.check_local(T0, src, &mut local),
            blocked(BlockType::Scanner)
        );
    }
    assert_eq!(gate.hits(&whole("192.0.2.1")), 10);
    local.flush(&gate);
    assert!(local.is_empty());
    let total: u64 = (1..=20u8)
        .map(|i| gate.hits(&whole(&format!("192.0.2.{i}"))))
        .sum();
    assert_eq!(total, 29);
    // A flood from one source never holds more than FLUSH_EVERY drops back.
    for _ in 0..LocalHits::FLUSH_EVERY {
        gate.check_local(T0, one, &mut local);
    }
    assert_eq!(gate.hits(&whole("192.0.2.1")), 10 + LocalHits::FLUSH_EVERY);
    // Not blocked: nothing counted anywhere.
    assert_eq!(
        gate.check_local(T0, sa("198.51.100.1:5060"), &mut local),
        GateVerdict::Inspect
    );
    assert!(local.is_empty());
}
