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
use crate::cluster_count::{Detector, SharedCounts};
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
/// Evidence lines (of [`EVIDENCE_LINES`]) that may show requests dropped by the limiter; the
/// rest show the server's answers.
const DROP_LINES: usize = 2;
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
    /// The last requests the server answered (or did not), and the last ones the limiter
    /// dropped, kept apart so a stream of drops cannot push the server's answers out.
    answers: VecDeque<String>,
    drops: VecDeque<String>,
}

fn push_line(ring: &mut VecDeque<String>, cap: usize, line: &str) {
    if ring.len() >= cap {
        ring.pop_front();
    }
    ring.push_back(clip(line));
}

impl Source {
    fn note(&mut self, line: String) {
        push_line(&mut self.answers, EVIDENCE_LINES, &line);
    }

    fn note_drop(&mut self, line: String) {
        push_line(&mut self.drops, DROP_LINES, &line);
    }

    /// At most [`EVIDENCE_LINES`]: the server's last answers, then the last drops.
    fn evidence(self) -> Vec<String> {
        let skip = (self.answers.len() + self.drops.len()).saturating_sub(EVIDENCE_LINES);
        self.answers
            .into_iter()
            .skip(skip)
            .chain(self.drops)
            .collect()
    }
}

pub struct Guard {
    settings: Settings,
    sources: LruCache<IpNet, Source>,
    /// Requests per source counted cluster-wide for the `hit_count` rule (a no-op on a single
    /// node); the limited rate and the guessing rules stay per node.
    shared: SharedCounts,
}

fn fingerprint(name: &[u8]) -> u32 {
    hash64(&[name]) as u32
}

impl Guard {
    pub fn new(settings: Settings) -> Guard {
        Guard {
            sources: LruCache::new(nonzero(settings.capacity)),
            settings,
            shared: SharedCounts::disabled(),
        }
    }

    /// Count requests per source across the cluster through `shared`.
    pub fn set_shared(&mut self, shared: SharedCounts) {
        self.shared = shared;
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
        let remote = self.shared.remote(now, Detector::Tftp, net);
        self.shared.record(Detector::Tftp, net, 1);
        let src = self.sources.get_or_insert_mut(net, Source::default);
        let n = src.requests.add(now, WINDOW, 1).saturating_add(remote);
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
        src.note_drop(format!(
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
        self.shared.forget(Detector::Tftp, *net);
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
            evidence: src.evidence(),
        })
    }
}

#[cfg(test)]
mod tests;
