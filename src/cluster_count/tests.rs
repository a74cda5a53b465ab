//! Cluster counting without Redis: rounds handed between handles by hand, on explicit times,
//! and two engines (or TFTP guards) sharing counts the way two nodes would.

use std::net::SocketAddr;
use std::time::Duration;

use super::*;
use crate::config::{Config, InviteAction};
use crate::engine::{Engine, Verdict};
use crate::wire::{parse, Framing};

const T0: Millis = 1_700_000_000_000;

fn periods() -> Periods {
    Periods {
        auth: 60_000,
        tftp: 60_000,
        peer_timeout: 10_000,
    }
}

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Hand `from`'s pending round to each of `to`, as Redis pub/sub would.
fn exchange(now: Millis, from: &SharedCounts, to: &[&SharedCounts]) {
    if let Some(r) = from.take_round() {
        let bytes = serde_json::to_vec(&r).unwrap();
        for t in to {
            t.apply(now, &bytes);
        }
        from.apply(now, &bytes); // our own message comes back too, and is skipped
    }
}

#[test]
fn disabled_handle_records_nothing_and_reports_zero() {
    let s = SharedCounts::disabled();
    s.record(Detector::Auth, net("192.0.2.1/32"), 5);
    assert!(s.take_round().is_none());
    assert_eq!(s.remote(T0, Detector::Auth, net("192.0.2.1/32")), 0);
    assert_eq!(s.apply(T0, br#"{"node":"x","entries":[]}"#), 0);
    assert!(s.stats().is_none());
}

#[test]
fn deltas_reach_peers_and_own_messages_are_skipped() {
    let (a, b) = (
        SharedCounts::new("a", periods()),
        SharedCounts::new("b", periods()),
    );
    let k = net("192.0.2.1/32");
    a.record(Detector::Auth, k, 2);
    a.record(Detector::Auth, k, 1);
    a.record(Detector::Invite, k, 7);
    exchange(T0, &a, &[&b]);
    assert_eq!(b.remote(T0, Detector::Auth, k), 3);
    assert_eq!(b.remote_total(Detector::Invite, k), 7);
    assert_eq!(a.remote(T0, Detector::Auth, k), 0, "own round skipped");
    assert!(a.take_round().is_none(), "a round takes everything pending");
    // The window ages: after two periods nothing is left of it.
    assert_eq!(b.remote(T0 + 120_001, Detector::Auth, k), 0);
    let st = b.stats().unwrap();
    assert_eq!(st.entries_received.load(Ordering::Relaxed), 2);
    assert_eq!(st.peers.load(Ordering::Relaxed), 1);
}

#[test]
fn a_round_is_capped_to_the_largest_deltas_and_the_rest_counted() {
    let a = SharedCounts::new("a", periods());
    for i in 0..(MAX_ENTRIES as u32 + 100) {
        let k = IpNet::from(std::net::IpAddr::from(i.to_be_bytes()));
        a.record(Detector::Tftp, k, if i < 10 { 1000 } else { 1 });
    }
    let r = a.take_round().unwrap();
    assert_eq!(r.entries.len(), MAX_ENTRIES);
    assert_eq!(r.entries.iter().filter(|e| e.2 == 1000).count(), 10);
    assert_eq!(a.stats().unwrap().overflow.load(Ordering::Relaxed), 100);
    assert!(serde_json::to_vec(&r).unwrap().len() < MAX_MESSAGE / 2);
}

#[test]
fn pending_keys_are_bounded() {
    let a = SharedCounts::new("a", periods());
    for i in 0..(MAX_PENDING as u32 + 5) {
        let k = IpNet::from(std::net::IpAddr::from(i.to_be_bytes()));
        a.record(Detector::Auth, k, 1);
    }
    assert_eq!(a.stats().unwrap().overflow.load(Ordering::Relaxed), 5);
}

#[test]
fn hostile_messages_are_dropped_counted_or_clamped() {
    let b = SharedCounts::new("b", periods());
    let k = "192.0.2.7/32";
    let st = b.stats().unwrap();
    for bad in [
        &b"not json"[..],
        br#"{"node":"x"}"#,
        br#"{"node":"x","entries":[["auth","300.1.1.1/32",1]]}"#,
        br#"{"node":"x","entries":[["nosuch","192.0.2.7/32",1]]}"#,
        br#"{"node":"x","entries":[["auth","192.0.2.7/32",-1]]}"#,
        br#"{"node":"","entries":[]}"#,
    ] {
        assert_eq!(b.apply(T0, bad), 0);
    }
    assert_eq!(st.malformed.load(Ordering::Relaxed), 6);
    let huge = vec![b' '; MAX_MESSAGE + 1];
    assert_eq!(b.apply(T0, &huge), 0);
    let many: Vec<String> = (0..=MAX_ENTRIES)
        .map(|_| format!(r#"["auth","{k}",1]"#))
        .collect();
    let msg = format!(r#"{{"node":"x","entries":[{}]}}"#, many.join(","));
    assert_eq!(b.apply(T0, msg.as_bytes()), 0);
    assert_eq!(st.malformed.load(Ordering::Relaxed), 8);
    let absurd = format!(r#"{{"node":"x","entries":[["auth","{k}",4294967295]]}}"#);
    assert_eq!(b.apply(T0, absurd.as_bytes()), 1);
    assert_eq!(b.remote(T0, Detector::Auth, net(k)), MAX_DELTA);
    assert_eq!(st.clamped.load(Ordering::Relaxed), 1);
    // Peers beyond the cap are ignored.
    for p in 0..MAX_PEERS + 3 {
        let m = format!(r#"{{"node":"p{p}","entries":[]}}"#);
        b.apply(T0, m.as_bytes());
    }
    assert_eq!(st.peers.load(Ordering::Relaxed), MAX_PEERS as u64);
}

#[test]
fn a_silent_peer_is_dropped_with_its_counts() {
    let (a, b, c) = (
        SharedCounts::new("a", periods()),
        SharedCounts::new("b", periods()),
        SharedCounts::new("c", periods()),
    );
    let k = net("192.0.2.1/32");
    a.record(Detector::Auth, k, 2);
    exchange(T0, &a, &[&c]);
    b.record(Detector::Auth, k, 3);
    exchange(T0 + 5_000, &b, &[&c]);
    assert_eq!(c.remote(T0 + 5_000, Detector::Auth, k), 5);
    assert_eq!(c.expire_peers(T0 + 10_000), 0);
    assert_eq!(c.expire_peers(T0 + 10_001), 1, "a: silent for over 10 s");
    assert_eq!(c.remote(T0 + 10_001, Detector::Auth, k), 3);
    assert_eq!(c.expire_peers(T0 + 15_001), 1);
    assert_eq!(c.remote_len(), 0);
    assert_eq!(c.stats().unwrap().peers.load(Ordering::Relaxed), 0);
}

// ---- two engines sharing counts -----------------------------------------------------------

fn config() -> Config {
    let mut c = Config::default();
    c.upstream.address = "10.0.0.1:5060".into();
    c.cluster.redis_url = "redis://127.0.0.1:6392/".into();
    c
}

fn node(c: &Config, id: &str) -> (Engine, SharedCounts) {
    let e = Engine::new(c, T0);
    e.set_upstream(vec!["10.0.0.1".parse().unwrap()]);
    let s = SharedCounts::new(id, Periods::from_config(c));
    e.set_shared_counts(s.clone());
    (e, s)
}

fn register_403(i: u32) -> Vec<u8> {
    format!(
        "SIP/2.0 403 Forbidden\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK{i}\r\nFrom: <sip:1001@pbx>;tag=1\r\n\
To: <sip:1001@pbx>;tag=2\r\nCall-ID: c{i}\r\nCSeq: {i} REGISTER\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn invite(i: u32) -> Vec<u8> {
    format!(
        "INVITE sip:2000@pbx SIP/2.0\r\nVia: SIP/2.0/UDP 1.2.3.4;branch=z9hG4bK{i}\r\nMax-Forwards: 70\r\n\
From: <sip:1001@pbx>;tag={i}\r\nTo: <sip:2000@pbx>\r\nCall-ID: i{i}\r\nCSeq: 1 INVITE\r\n\
User-Agent: test\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

#[test]
fn a_brute_forcer_alternating_between_two_nodes_is_blocked_after_hit_count_in_total() {
    let c = config();
    let hit = c.register.hit_count;
    let (mut a, sa) = node(&c, "a");
    let (mut b, sb) = node(&c, "b");
    let phone: SocketAddr = "192.0.2.9:5060".parse().unwrap();
    let mut blocked_at = None;
    // One failure every 300 ms, alternating; a round every 100 ms.
    for i in 0..(2 * hit) {
        let now = T0 + u64::from(i) * 300;
        let e = if i % 2 == 0 { &mut a } else { &mut b };
        let m = register_403(i);
        e.on_answer(
            now,
            phone,
            &parse(&m, Framing::Datagram).unwrap(),
            Some(u64::from(i)),
        );
        if !e.ledger_mut().block_table().is_empty() {
            blocked_at = Some(i + 1);
            break;
        }
        exchange(now + 100, &sa, &[&sb]);
        exchange(now + 100, &sb, &[&sa]);
    }
    assert_eq!(
        blocked_at,
        Some(hit),
        "blocked at the hit_count-th failure in total"
    );
}

#[test]
fn single_node_without_cluster_counts_alone() {
    let mut c = config();
    c.cluster.redis_url.clear();
    assert!(!SharedCounts::for_config(&c).is_enabled());
    c.cluster.redis_url = "redis://x/".into();
    c.cluster.shared_counters = false;
    assert!(!SharedCounts::for_config(&c).is_enabled());
}

/// Offer `offered` INVITEs a second for `secs`, split evenly across two nodes with a round
/// every 100 ms delivered 20 ms later; returns what both admitted.
fn split_flood(rate: u32, burst: u32, offered: u32, secs: u32) -> (u32, u32) {
    let mut c = config();
    c.invite.rate_limit = rate;
    c.invite.burst = burst;
    c.invite.action = InviteAction::Reject;
    c.invite.notify = false;
    let (mut a, sa) = node(&c, "a");
    let (mut b, sb) = node(&c, "b");
    let src: SocketAddr = "192.0.2.50:5060".parse().unwrap();
    let step = 1000 / offered.max(1);
    let (mut admitted_a, mut admitted_b) = (0, 0);
    let mut next_round = T0 + 100;
    for i in 0..(offered * secs) {
        let now = T0 + u64::from(i * step);
        while next_round + 20 <= now {
            exchange(next_round + 20, &sa, &[&sb]);
            exchange(next_round + 20, &sb, &[&sa]);
            next_round += 100;
        }
        let m = invite(i);
        let msg = parse(&m, Framing::Datagram).unwrap();
        let (e, n) = if i % 2 == 0 {
            (&mut a, &mut admitted_a)
        } else {
            (&mut b, &mut admitted_b)
        };
        if e.on_request(now, src, &msg, false) == Verdict::Forward {
            *n += 1;
        }
    }
    (admitted_a, admitted_b)
}

#[test]
fn an_invite_flood_split_across_two_nodes_is_held_to_the_rate_in_total() {
    // 100 INVITEs/s offered, 10/s allowed (burst 20), for 20 s: rate x time + burst = 220.
    let (a, b) = split_flood(10, 20, 100, 20);
    let total = a + b;
    let exact = 10 * 20 + 20;
    eprintln!("split flood: admitted {total} (a {a}, b {b}), exact {exact}");
    assert!(
        total.abs_diff(exact) * 10 <= exact,
        "admitted {total} (a {a}, b {b}), exact {exact}"
    );
    assert!(
        a.abs_diff(b) * 4 <= total,
        "both nodes take a share: {a} / {b}"
    );
}

#[test]
fn tftp_hit_count_is_cluster_wide() {
    use crate::tftp::guard::{Admit, Guard, Req, Settings};
    let s = Settings {
        hit_count: 10,
        limited_rate: 1,
        not_found_limit: 1000,
        block_time: Duration::from_secs(60),
        ipv6_prefix: 64,
        capacity: 100,
    };
    let (mut ga, mut gb) = (Guard::new(s.clone()), Guard::new(s));
    let (sa, sb) = (
        SharedCounts::new("a", periods()),
        SharedCounts::new("b", periods()),
    );
    ga.set_shared(sa.clone());
    gb.set_shared(sb.clone());
    let ip: std::net::IpAddr = "192.0.2.60".parse().unwrap();
    let req = Req {
        op: "RRQ",
        filename: b"x.cfg",
    };
    let mut passed = 0;
    for i in 0..40u64 {
        let now = T0 + i * 200;
        let g = if i % 2 == 0 { &mut ga } else { &mut gb };
        if g.on_request(now, ip, req).0 == Admit::Pass {
            passed += 1;
        }
        exchange(now + 100, &sa, &[&sb]);
        exchange(now + 100, &sb, &[&sa]);
    }
    // hit_count in total, then limited_rate (1 a minute) on each node.
    assert_eq!(passed, 10 + 2);
}

#[test]
fn metrics_render_zeros_on_a_single_node_and_counts_with_a_cluster() {
    let render = |s: &SharedCounts| {
        let mut reg = prometheus_client::registry::Registry::default();
        #[derive(Debug)]
        struct C(SharedCounts);
        impl prometheus_client::collector::Collector for C {
            fn encode(
                &self,
                mut e: prometheus_client::encoding::DescriptorEncoder<'_>,
            ) -> std::fmt::Result {
                super::metrics::encode(&mut e, &self.0)
            }
        }
        reg.register_collector(Box::new(C(s.clone())));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &reg).unwrap();
        out
    };
    let off = render(&SharedCounts::disabled());
    assert!(
        off.contains("sipwarden_cluster_count_rounds_total 0\n"),
        "{off}"
    );
    assert!(off.contains("sipwarden_cluster_count_peers 0\n"));
    let (a, b) = (
        SharedCounts::new("a", periods()),
        SharedCounts::new("b", periods()),
    );
    a.record(Detector::Auth, net("192.0.2.1/32"), 1);
    exchange(T0, &a, &[&b]);
    let on = render(&b);
    for line in [
        "sipwarden_cluster_count_entries_received_total 1\n",
        "sipwarden_cluster_count_peers 1\n",
        "sipwarden_cluster_count_overflow_total 0\n",
        "sipwarden_cluster_count_entries_sent_total 0\n",
    ] {
        assert!(on.contains(line), "{line} in {on}");
    }
}

#[test]
fn cluster_count_keys_are_optional_and_checked_by_name() {
    let c = Config::from_toml("[cluster]\nredis_url = \"redis://127.0.0.1/\"\n").unwrap();
    assert!(c.cluster.shared_counters);
    assert_eq!(c.cluster.count_interval, Duration::from_millis(100));
    assert_eq!(c.cluster.peer_timeout, Duration::from_secs(10));
    for (text, key) in [
        ("count_interval = \"1ms\"", "cluster.count_interval"),
        ("count_interval = \"1m\"", "cluster.count_interval"),
        ("peer_timeout = \"1s\"", "cluster.peer_timeout"),
        (
            "count_interval = \"5s\"\npeer_timeout = \"10s\"",
            "cluster.peer_timeout",
        ),
        ("shared_counters = 1", "cluster.shared_counters"),
        ("shared_counter = true", "cluster"),
    ] {
        let e = Config::from_toml(&format!("[cluster]\n{text}\n")).unwrap_err();
        assert!(e.to_string().contains(key), "{text}: {e}");
    }
}

#[test]
fn a_node_that_heard_of_hit_count_failures_blocks_on_the_next_request() {
    let c = config();
    let (mut a, sa) = node(&c, "a");
    let (b, sb) = node(&c, "b");
    let phone: SocketAddr = "192.0.2.9:5060".parse().unwrap();
    // Failures 1..=4 at b, then b's round reaches a.
    for i in 0..c.register.hit_count - 1 {
        let m = register_403(i);
        b.on_answer(
            T0 + u64::from(i),
            phone,
            &parse(&m, Framing::Datagram).unwrap(),
            Some(u64::from(i)),
        );
    }
    exchange(T0 + 100, &sb, &[&sa]);
    // Not yet at hit_count: a forwards.
    let inv = invite(1);
    let r = parse(&inv, Framing::Datagram).unwrap();
    assert_eq!(a.on_request(T0 + 200, phone, &r, false), Verdict::Forward);
    // One more failure at b reaches a: a refuses the next request and blocks the source.
    let m = register_403(9);
    b.on_answer(
        T0 + 300,
        phone,
        &parse(&m, Framing::Datagram).unwrap(),
        Some(9),
    );
    exchange(T0 + 400, &sb, &[&sa]);
    assert!(matches!(
        a.on_request(T0 + 500, phone, &r, false),
        Verdict::Drop(_)
    ));
    let blk = a
        .ledger_mut()
        .blocks()
        .next()
        .expect("blocked on a")
        .clone();
    assert_eq!(blk.kind, crate::blocks::BlockType::Register);
    assert!(blk.reason.contains("across the cluster"), "{}", blk.reason);
}
