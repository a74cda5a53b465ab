//! Guard tests with explicit times: the limiter's minute window, guessing detection, bounds.

use super::*;
use std::net::Ipv4Addr;

const T0: Millis = 6_000_000; // a multiple of WINDOW: window edges fall on round numbers

fn settings(hit_count: u32, limited_rate: u32, not_found_limit: u32) -> Settings {
    Settings {
        hit_count,
        limited_rate,
        not_found_limit,
        block_time: Duration::from_secs(3600),
        ipv6_prefix: 64,
        capacity: 100,
    }
}

fn ip(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, last))
}

fn rrq(name: &[u8]) -> Req<'_> {
    Req {
        op: "RRQ",
        filename: name,
    }
}

fn not_found() -> Outcome {
    Outcome::Refused {
        code: 1,
        message: "File not found".into(),
    }
}

#[test]
fn limiter_minute_window_with_explicit_times() {
    let mut g = Guard::new(settings(100, 10, 1000));
    let a = ip(1);
    // A burst of 100 in the first second passes.
    for i in 0..100 {
        assert_eq!(
            g.on_request(T0 + i, a, rrq(b"f")).0,
            Admit::Pass,
            "request {i}"
        );
    }
    // Over hit_count: limited_rate more pass, then drops; logged once per episode.
    for i in 100..110 {
        assert_eq!(
            g.on_request(T0 + i, a, rrq(b"f")).0,
            Admit::Pass,
            "request {i}"
        );
    }
    assert_eq!(
        g.on_request(T0 + 110, a, rrq(b"f")).0,
        Admit::Limited { new_episode: true }
    );
    assert_eq!(
        g.on_request(T0 + 111, a, rrq(b"f")).0,
        Admit::Limited { new_episode: false }
    );
    // Still limited late in the same minute.
    assert_eq!(
        g.on_request(T0 + 59_999, a, rrq(b"f")).0,
        Admit::Limited { new_episode: false }
    );
    // Other sources are not affected.
    assert_eq!(g.on_request(T0 + 500, ip(2), rrq(b"f")).0, Admit::Pass);

    // A sustained flood (one request every 200 ms = 300/min) for five minutes gets about
    // limited_rate through per minute.
    let mut t = T0 + 60_000;
    for minute in 0..5 {
        let mut passed = 0;
        for _ in 0..300 {
            if g.on_request(t, a, rrq(b"f")).0 == Admit::Pass {
                passed += 1;
            }
            t += 200;
        }
        assert!(
            (9..=11).contains(&passed),
            "minute {minute}: {passed} passed"
        );
    }
    // Two quiet minutes and the source is back to normal; a new flood is a new episode.
    t += 2 * WINDOW;
    for i in 0..100 {
        assert_eq!(
            g.on_request(t + i, a, rrq(b"f")).0,
            Admit::Pass,
            "after pause {i}"
        );
    }
    for i in 100..110 {
        assert_eq!(g.on_request(t + i, a, rrq(b"f")).0, Admit::Pass);
    }
    assert_eq!(
        g.on_request(t + 110, a, rrq(b"f")).0,
        Admit::Limited { new_episode: true }
    );
}

#[test]
fn slowing_down_to_hit_count_ends_the_limit() {
    let mut g = Guard::new(settings(10, 2, 1000));
    let a = ip(1);
    for i in 0..20 {
        g.on_request(T0 + i, a, rrq(b"f"));
    }
    assert!(matches!(
        g.on_request(T0 + 30_000, a, rrq(b"f")).0,
        Admit::Limited { .. }
    ));
    // 90 s after the burst the sliding estimate is half of the first minute's 21: under 10.
    assert_eq!(g.on_request(T0 + 90_000, a, rrq(b"f")).0, Admit::Pass);
}

#[test]
fn not_found_answers_make_a_tftp_block_with_evidence() {
    let mut g = Guard::new(settings(100, 10, 20));
    let a = ip(7);
    for i in 0..19u64 {
        let name = format!("SEP0011223344{i:02}.cnf.xml");
        assert_eq!(g.on_request(T0 + i, a, rrq(name.as_bytes())).0, Admit::Pass);
        assert!(g
            .on_outcome(T0 + i, a, rrq(name.as_bytes()), &not_found())
            .is_none());
    }
    let d = g
        .on_outcome(T0 + 100, a, rrq(b"cfg001122334455.xml"), &not_found())
        .expect("20th not-found blocks");
    assert_eq!(d.kind, BlockType::Tftp);
    assert_eq!(d.key, BlockKey::whole(g.net(a)));
    assert_eq!(d.duration, Duration::from_secs(3600));
    assert!(d.reason.contains("20 \"file not found\""), "{}", d.reason);
    assert_eq!(d.evidence.len(), EVIDENCE_LINES);
    assert_eq!(
        d.evidence.last().map(String::as_str),
        Some("RRQ cfg001122334455.xml -> ERROR 1 File not found")
    );
    // The source's state is reset after a detection.
    assert!(g.on_outcome(T0 + 101, a, rrq(b"x"), &not_found()).is_none());
}

#[test]
fn the_same_missing_name_counts_as_not_found_each_time() {
    let mut g = Guard::new(settings(100, 10, 5));
    let a = ip(8);
    for i in 0..4 {
        assert!(g
            .on_outcome(T0 + i, a, rrq(b"same"), &not_found())
            .is_none());
    }
    assert!(g
        .on_outcome(T0 + 4, a, rrq(b"same"), &not_found())
        .is_some());
}

#[test]
fn not_found_counts_decay_with_the_minute() {
    let mut g = Guard::new(settings(100, 10, 20));
    let a = ip(9);
    for i in 0..19u8 {
        assert!(g.on_outcome(T0, a, rrq(&[b'a', i]), &not_found()).is_none());
    }
    // Two minutes later the earlier answers no longer count.
    assert!(g
        .on_outcome(T0 + 2 * WINDOW, a, rrq(b"z"), &not_found())
        .is_none());
}

#[test]
fn unanswered_distinct_names_block_but_served_names_never_count() {
    let mut g = Guard::new(settings(1000, 10, 10));
    let a = ip(10);
    // A NAT full of phones fetching 50 real files: no block.
    for i in 0..50u8 {
        assert!(g
            .on_outcome(T0 + i as u64, a, rrq(&[b'p', i]), &Outcome::Served)
            .is_none());
    }
    // Abandoned transfers say nothing.
    for i in 0..50u8 {
        assert!(g
            .on_outcome(T0 + 100, a, rrq(&[b'q', i]), &Outcome::Abandoned)
            .is_none());
    }
    // A server that stays silent for unknown names: distinct unanswered names block.
    for i in 0..9u8 {
        assert!(g
            .on_outcome(T0 + 200, a, rrq(&[b'n', i]), &Outcome::NoAnswer)
            .is_none());
        // Repeats of one name are one name.
        assert!(g
            .on_outcome(T0 + 200, a, rrq(&[b'n', 0]), &Outcome::NoAnswer)
            .is_none());
    }
    let d = g
        .on_outcome(T0 + 300, a, rrq(b"n-last"), &Outcome::NoAnswer)
        .expect("10 distinct unanswered names");
    assert!(d.reason.contains("10 distinct"), "{}", d.reason);
}

#[test]
fn names_dropped_by_the_limiter_count_as_guesses() {
    let mut g = Guard::new(settings(5, 1, 10));
    let a = ip(11);
    // Five real files served, one more allowed while limited.
    for i in 0..6u8 {
        assert_eq!(g.on_request(T0, a, rrq(&[b'r', b'0' + i])).0, Admit::Pass);
        g.on_outcome(T0, a, rrq(&[b'r', b'0' + i]), &Outcome::Served);
    }
    // Retries of a served name while limited are dropped but are not guesses.
    for _ in 0..20 {
        let (admit, d) = g.on_request(T0 + 1, a, rrq(b"r0"));
        assert!(matches!(admit, Admit::Limited { .. }));
        assert!(d.is_none());
    }
    // New names while limited are guesses: the tenth distinct one blocks.
    for i in 0..9u8 {
        let (admit, d) = g.on_request(T0 + 2, a, rrq(&[b'g', b'0' + i]));
        assert!(matches!(admit, Admit::Limited { .. }));
        assert!(d.is_none(), "guess {i}");
    }
    let (_, d) = g.on_request(T0 + 3, a, rrq(b"g-last"));
    let d = d.expect("tenth unserved name");
    assert_eq!(d.kind, BlockType::Tftp);
    // The server's last answers stay in the evidence next to the last drops.
    let ev: Vec<&str> = d.evidence.iter().map(String::as_str).collect();
    assert_eq!(
        ev,
        [
            "RRQ r3 -> served",
            "RRQ r4 -> served",
            "RRQ r5 -> served",
            "RRQ g8 -> dropped (over 5/min)",
            "RRQ g-last -> dropped (over 5/min)",
        ]
    );
}

#[test]
fn ipv6_sources_share_their_prefix_and_memory_is_bounded() {
    let mut g = Guard::new(Settings {
        capacity: 3,
        ..settings(2, 1, 100)
    });
    let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
    let b: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
    assert_eq!(g.on_request(T0, a, rrq(b"f")).0, Admit::Pass);
    assert_eq!(g.on_request(T0, b, rrq(b"f")).0, Admit::Pass);
    assert_eq!(g.on_request(T0, a, rrq(b"f")).0, Admit::Pass);
    assert!(matches!(
        g.on_request(T0, b, rrq(b"f")).0,
        Admit::Limited { .. }
    ));
    for i in 0..=255u8 {
        g.on_request(T0, ip(i), rrq(b"f"));
        g.on_outcome(T0, ip(i), rrq(b"f"), &not_found());
    }
    assert_eq!(g.len(), 3);
    g.set_settings(Settings {
        capacity: 2,
        ..settings(2, 1, 100)
    });
    assert_eq!(g.len(), 2);
}

#[test]
fn distinct_names_per_source_are_capped() {
    let mut g = Guard::new(settings(1_000_000, 10, 100_000));
    let a = ip(12);
    for i in 0..2000u32 {
        let name = i.to_string();
        g.on_outcome(T0, a, rrq(name.as_bytes()), &Outcome::NoAnswer);
    }
    // The limit is clamped to MAX_SUSPECT_NAMES, so this has blocked and reset at least once;
    // what remains is under the cap.
    let src = g.sources.peek(&g.net(a)).map_or(0, |s| s.suspect.fps.len());
    assert!(src < MAX_SUSPECT_NAMES);
}
