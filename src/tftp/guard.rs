//! TFTP brute-force decisions, sans-I/O: a per-source request limiter and a file-name guessing
//! detector. Time is an input (`now`, unix ms), so every rule is testable with explicit times.
//!
//! Rules, per source (an IPv4 address or an IPv6 prefix, [`source_net`]):
//! - **Limiter.** Every RRQ/WRQ counts in a sliding one-minute window. While that count is at
//!   most `hit_count`, requests pass. Beyond it the source is *limited*: requests pass only
//!   while fewer than `limited_rate` have passed in the limited state over the last minute;
//!   the rest are **dropped silently** (and counted by the caller). Dropped requests still count
//!   in the window, so a source that keeps flooding stays limited; one that slows down to
//!   `hit_count` a minute is back to normal. No ERROR is sent for a dropped request: an answer
//!   would tell a guesser its request was seen and cost us a packet per attacker packet.
//! - **Guessing.** `not_found_limit` "file not found" answers (ERROR 1, and ERROR 2 "access
//!   violation", which servers such as tftpd-hpa give for unreadable files) within a minute,
//!   *or* `not_found_limit` distinct file names within a minute that the source did not get
//!   (refused, unanswered, or dropped by the limiter), make a TFTP block. A name the server
//!   served is not counted: phones behind one NAT fetching many real files are not guessing.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;
use lru::LruCache;

use crate::blocks::table::{clip, EVIDENCE_LINES};
use crate::blocks::{source_net, BlockKey, BlockType};
use crate::clock::Millis;
use crate::config::Config;
use crate::engine::track::{nonzero, Window};
use crate::engine::Detection;
use crate::tftp::codec::error_code;
use crate::util::{hash64, printable};

/// The window of every per-minute rule.
pub const WINDOW: Millis = 60_000;
/// Sources tracked at once (further capped by `protection.tracked_sources`); the least recently
/// seen is forgotten first. Provisioning sees at most a few thousand phones; each entry costs
/// under 2 KiB, so this bounds the guard at about 32 MiB even when an attacker cycles addresses.
pub const MAX_SOURCES: usize = 16_384;
/// Distinct unserved names remembered per source and minute: the count only has to reach
/// `not_found_limit`, which is clamped to this.
pub const MAX_SUSPECT_NAMES: usize = 256;
/// Names recently served to a source, remembered so that a limited retry of a real file does
/// not look like a guess.
const SERVED_MEMORY: usize = 8;
/// Characters of a file name kept in evidence.
const NAME_CHARS: usize = 64;

/// The guard's view of the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub hit_count: u32,
    pub limited_rate: u32,
    pub not_found_limit: u32,
    pub block_time: Duration,
    pub ipv6_prefix: u8,
    /// Sources tracked at once.
    pub capacity: usize,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            hit_count: cfg.tftp.hit_count,
            limited_rate: cfg.tftp.limited_rate,
            not_found_limit: cfg.tftp.not_found_limit,
            block_time: cfg.tftp.block_time,
            ipv6_prefix: cfg.protection.ipv6_prefix,
            capacity: cfg.protection.tracked_sources.min(MAX_SOURCES),
        }
    }

    fn name_limit(&self) -> usize {
        (self.not_found_limit as usize).clamp(1, MAX_SUSPECT_NAMES)
    }
}

/// What to do with a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Pass,
    /// Over the rate: drop it. `new_episode` is true for the first drop since the source was
    /// last under `hit_count`, so the caller logs once per episode, not once per packet.
    Limited {
        new_episode: bool,
    },
}

/// How a transfer the guard let through ended, as the relay saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The server's first answer was DATA, OACK or (for a write) ACK.
    Served,
    /// The server's first answer was ERROR.
    Refused { code: u16, message: String },
    /// The server never answered.
    NoAnswer,
    /// Ended for another reason (the client gave up first, the source was blocked, a local
    /// error): says nothing about the file name.
    Abandoned,
}

/// A request as the guard needs it: the opcode name and the file name.
#[derive(Debug, Clone, Copy)]
pub struct Req<'a> {
    pub op: &'static str,
    pub filename: &'a [u8],
}

#[derive(Debug, Default)]
struct Names {
    start: Millis,
    fps: Vec<u32>,
}

impl Names {
    /// Add `fp` to this minute's set (at most `cap` entries) and return the set's size.
    fn add(&mut self, now: Millis, fp: u32, cap: usize) -> usize {
        if now.saturating_sub(self.start) >= WINDOW {
            self.start = now;
            self.fps.clear();
        }
        if !self.fps.contains(&fp) && self.fps.len() < cap {
            self.fps.push(fp);
        }
        self.fps.len()
    }

    fn remove(&mut self, fp: u32) {
        self.fps.retain(|f| *f != fp);
    }
}

#[derive(Debug, Default)]
struct Source {
    requests: Window,
    passed_limited: Window,
    limited: bool,
    not_found: Window,
    suspect: Names,
    served: VecDeque<u32>,
    evidence: VecDeque<String>,
}

impl Source {
    fn note(&mut self, line: String) {
        if self.evidence.len() >= EVIDENCE_LINES {
            self.evidence.pop_front();
        }
        self.evidence.push_back(clip(&line));
    }
}

pub struct Guard {
    settings: Settings,
    sources: LruCache<IpNet, Source>,
}

fn fingerprint(name: &[u8]) -> u32 {
    hash64(&[name]) as u32
}

impl Guard {
    pub fn new(settings: Settings) -> Guard {
        Guard {
            sources: LruCache::new(nonzero(settings.capacity)),
            settings,
        }
    }

    /// Apply a reloaded config; tracked state stays.
    pub fn set_settings(&mut self, settings: Settings) {
        if settings != self.settings {
            self.sources.resize(nonzero(settings.capacity));
            self.settings = settings;
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Sources tracked (bounded by `settings.capacity`).
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    pub fn net(&self, ip: IpAddr) -> IpNet {
        source_net(ip, self.settings.ipv6_prefix)
    }

    /// A request from `ip` (not whitelisted, not blocked). A dropped request's name counts as
    /// not served, which may complete a guessing detection.
    pub fn on_request(
        &mut self,
        now: Millis,
        ip: IpAddr,
        req: Req<'_>,
    ) -> (Admit, Option<Detection>) {
        let net = self.net(ip);
        let s = &self.settings;
        let (hit_count, limited_rate, name_limit) = (s.hit_count, s.limited_rate, s.name_limit());
        let src = self.sources.get_or_insert_mut(net, Source::default);
        let n = src.requests.add(now, WINDOW, 1);
        if n <= hit_count {
            src.limited = false;
            return (Admit::Pass, None);
        }
        if src.passed_limited.estimate(now, WINDOW) < limited_rate {
            src.passed_limited.add(now, WINDOW, 1);
            return (Admit::Pass, None);
        }
        let new_episode = !src.limited;
        src.limited = true;
        let fp = fingerprint(req.filename);
        let names = if src.served.contains(&fp) {
            src.suspect.fps.len()
        } else {
            src.suspect.add(now, fp, name_limit)
        };
        src.note(format!(
            "{} {} -> dropped (over {hit_count}/min)",
            req.op,
            printable(req.filename, NAME_CHARS)
        ));
        let detection = (names >= name_limit).then(|| self.detect(net, names, false));
        (Admit::Limited { new_episode }, detection.flatten())
    }

    /// How a transfer from `ip` ended. Returns a detection when the source is guessing names.
    pub fn on_outcome(
        &mut self,
        now: Millis,
        ip: IpAddr,
        req: Req<'_>,
        outcome: &Outcome,
    ) -> Option<Detection> {
        let net = self.net(ip);
        let name_limit = self.settings.name_limit();
        let not_found_limit = self.settings.not_found_limit;
        let src = self.sources.get_or_insert_mut(net, Source::default);
        let fp = fingerprint(req.filename);
        let name = printable(req.filename, NAME_CHARS);
        let (not_found, names) = match outcome {
            Outcome::Abandoned => return None,
            Outcome::Served => {
                src.suspect.remove(fp);
                if !src.served.contains(&fp) {
                    if src.served.len() >= SERVED_MEMORY {
                        src.served.pop_front();
                    }
                    src.served.push_back(fp);
                }
                src.note(format!("{} {name} -> served", req.op));
                return None;
            }
            Outcome::Refused { code, message } => {
                src.note(format!("{} {name} -> ERROR {code} {message}", req.op));
                let nf = if matches!(
                    *code,
                    error_code::FILE_NOT_FOUND | error_code::ACCESS_VIOLATION
                ) {
                    src.not_found.add(now, WINDOW, 1)
                } else {
                    src.not_found.estimate(now, WINDOW)
                };
                (nf, src.suspect.add(now, fp, name_limit))
            }
            Outcome::NoAnswer => {
                src.note(format!("{} {name} -> no answer from the server", req.op));
                (
                    src.not_found.estimate(now, WINDOW),
                    src.suspect.add(now, fp, name_limit),
                )
            }
        };
        if not_found >= not_found_limit {
            self.detect(net, not_found as usize, true)
        } else if names >= name_limit {
            self.detect(net, names, false)
        } else {
            None
        }
    }

    /// Forget a source (after a block, so it starts clean when unblocked).
    pub fn forget(&mut self, net: &IpNet) {
        self.sources.pop(net);
    }

    fn detect(&mut self, net: IpNet, n: usize, not_found: bool) -> Option<Detection> {
        let src = self.sources.pop(&net)?;
        let reason = if not_found {
            format!("TFTP file-name guessing: {n} \"file not found\" answers within 1m")
        } else {
            format!("TFTP file-name guessing: {n} distinct file names not served within 1m")
        };
        Some(Detection {
            key: BlockKey::whole(net),
            kind: BlockType::Tftp,
            reason,
            duration: self.settings.block_time,
            evidence: src.evidence.into_iter().collect(),
        })
    }
}

#[cfg(test)]
mod tests {
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
            assert_eq!(g.on_request(T0, a, rrq(&[b'r', i])).0, Admit::Pass);
            g.on_outcome(T0, a, rrq(&[b'r', i]), &Outcome::Served);
        }
        // Retries of a served name while limited are dropped but are not guesses.
        for _ in 0..20 {
            let (admit, d) = g.on_request(T0 + 1, a, rrq(&[b'r', 0]));
            assert!(matches!(admit, Admit::Limited { .. }));
            assert!(d.is_none());
        }
        // New names while limited are guesses: the tenth distinct one blocks.
        for i in 0..9u8 {
            let (admit, d) = g.on_request(T0 + 2, a, rrq(&[b'g', i]));
            assert!(matches!(admit, Admit::Limited { .. }));
            assert!(d.is_none(), "guess {i}");
        }
        let (_, d) = g.on_request(T0 + 3, a, rrq(b"g-last"));
        let d = d.expect("tenth unserved name");
        assert_eq!(d.kind, BlockType::Tftp);
        assert!(
            d.evidence.iter().all(|e| e.contains("dropped")),
            "{:?}",
            d.evidence
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
}
