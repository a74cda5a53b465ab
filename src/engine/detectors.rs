//! The detectors of one shard of sources: packet flood, protocol anomalies, scanner
//! User-Agents, authentication failures learnt from the PBX's answers, OPTIONS sweeps and
//! INVITE rate, with the device names and packet rings of the sources they watch.
//!
//! A source's state lives in the shard its address (after `protection.ipv6_prefix`) hashes
//! to, so two cores handling different sources take different locks. A detector reaches
//! outside its shard only to make a block (the ledger's lock), to count an account under
//! attack from many sources ([`super::auth::AccountWatch`]), and for the toll-fraud guard,
//! which is per account and call, when it is on.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::Arc;

use ipnet::IpNet;
use lru::LruCache;

use super::anomaly::AnomalyScore;
use super::auth::{self, Answer, AuthTracker};
use super::evidence;
use super::flood::FloodGuard;
use super::invite::{InviteCheck, InviteGuard};
use super::scanner::ScannerMatcher;
use super::sweep::OptionsSweep;
use super::track::{nonzero, EngineClock};
use super::{reason_of, request_evidence, to_user, uri_user, Anomaly, Ctx, Detection, Verdict};
use crate::blocks::{table::clip, BlockKey, BlockType, Event};
use crate::clock::Millis;
use crate::config::{Config, InviteAction, Mode};
use crate::util::printable;
use crate::wire::{HeaderName, Message, Method};

/// Per-shard capacity for a node-wide bound of `cap` entries over `shards` shards.
pub(super) fn share(cap: usize, shards: usize) -> usize {
    cap.div_ceil(shards.max(1)).max(1)
}

pub struct Detectors {
    pub(super) cfg: Arc<Config>,
    /// This shard's notion of now, shared with its governor limiters only (not with other
    /// shards: no cache line written by two cores).
    clock: EngineClock,
    scanners: Arc<ScannerMatcher>,
    flood: FloodGuard,
    invites: InviteGuard,
    pub(super) auth: AuthTracker,
    anomalies: AnomalyScore,
    options: OptionsSweep,
    /// The last User-Agent seen from each source, for the block table's Device column when a
    /// block comes from the PBX's answers (which carry the PBX's Server header, not the UA).
    devices: LruCache<IpNet, Box<str>>,
    /// Recent packets per source, for the evidence ladder of a block that may follow.
    pub(super) watched: evidence::Watched,
}

impl Detectors {
    /// One shard of `shards`, for `cfg`'s bounds divided between them.
    pub fn new(
        cfg: Arc<Config>,
        shards: usize,
        scanners: Arc<ScannerMatcher>,
        now: Millis,
    ) -> Self {
        let clock = EngineClock::default();
        clock.set(now);
        let cap = share(cfg.protection.tracked_sources, shards);
        Detectors {
            flood: FloodGuard::new(cap, &cfg, clock.clone()),
            invites: InviteGuard::new(cap, &cfg.invite, clock.clone()),
            auth: AuthTracker::new(cap),
            anomalies: AnomalyScore::new(cap),
            options: OptionsSweep::new(cap),
            devices: LruCache::new(nonzero(cap / 4 + 1)),
            watched: LruCache::new(nonzero(share(evidence::WATCHED, shards))),
            scanners,
            clock,
            cfg,
        }
    }

    pub(super) fn reconfigure(
        &mut self,
        cfg: Arc<Config>,
        shards: usize,
        scanners: Arc<ScannerMatcher>,
    ) {
        let cap = share(cfg.protection.tracked_sources, shards);
        self.flood.reconfigure(cap, &cfg);
        self.invites.reconfigure(cap, &cfg.invite);
        self.auth.resize(cap);
        self.anomalies.resize(cap);
        self.options.resize(cap);
        self.devices.resize(nonzero(cap / 4 + 1));
        self.scanners = scanners;
        self.cfg = cfg;
    }

    pub(super) fn set_shared(&mut self, shared: &crate::cluster_count::SharedCounts) {
        self.auth.set_shared(shared.clone());
        self.invites.set_shared(shared.clone());
    }

    pub(super) fn observe(&self) -> bool {
        self.cfg.protection.mode == Mode::Observe
    }

    /// Entries held (for the memory bound and metrics).
    pub(super) fn tracked(&self) -> usize {
        self.flood.len()
            + self.invites.tracked()
            + self.auth.tracked()
            + self.anomalies.len()
            + self.options.len()
            + self.devices.len()
            + self.watched.len()
    }

    /// Make a block for `d`: the device seen from the source when none is given, and the
    /// packets captured from it, go with it to the ledger.
    fn block(&mut self, ctx: &Ctx, now: Millis, d: Detection, device: &str) -> bool {
        let device = match (device, self.devices.peek(&d.key.net)) {
            ("", Some(seen)) => seen.to_string(),
            (given, _) => given.to_string(),
        };
        let packets = self.take_packets(&d.key);
        ctx.ledger(|l| l.block_with(now, d, &device, packets))
    }

    /// The packet-rate limiter: false (and a block is made) when `net` is over
    /// `flood.packets_per_second`. Dropped even when the table had no room for the block: the
    /// limiter alone says this source is over the rate.
    pub(super) fn within_rate(&mut self, ctx: &Ctx, now: Millis, net: IpNet) -> bool {
        self.clock.set(now);
        let Some(d) = self.flood.check(&self.cfg, net) else {
            return true;
        };
        self.block(ctx, now, d, "");
        self.observe()
    }

    /// A packet that could not be parsed, or a parsed one with an anomaly: score the source.
    pub(super) fn on_anomaly(
        &mut self,
        ctx: &Ctx,
        now: Millis,
        net: IpNet,
        what: Anomaly,
        sample: &[u8],
    ) {
        self.clock.set(now);
        if let Some(d) = self.anomalies.add(now, &self.cfg, net, what, sample) {
            self.block(ctx, now, d, "");
        }
    }

    /// Does `net` have an open anomaly record (for `hep.only = "blocked"`)? No side effects.
    pub(super) fn has_anomalies(&self, now: Millis, net: IpNet) -> bool {
        self.anomalies.is_scored(now, &self.cfg, net)
    }

    /// A parsed request from a phone (not trusted, not whitelisted). `our_dialog`: the request
    /// is in-dialog (To tag) and its Route names a dialog we record-routed, as the router
    /// decided; then values another party chose and this sender only echoes are not held
    /// against it (see [`super::anomaly::check_request`]).
    pub(super) fn on_request(
        &mut self,
        ctx: &Ctx,
        now: Millis,
        src: SocketAddr,
        net: IpNet,
        msg: &Message<'_>,
        our_dialog: bool,
    ) -> Verdict {
        use crate::stats::DropReason as D;
        self.clock.set(now);
        let ua = msg.user_agent();
        let observe = self.observe();

        if let Some(a) = super::anomaly::check_request(msg, our_dialog) {
            self.on_anomaly(ctx, now, net, a, msg.buf);
            if a.is_fatal() && a != Anomaly::MaxForwardsExhausted && !observe {
                return Verdict::Drop(D::Anomaly);
            }
        }

        if let Some(pattern) = self.scanners.find(ua) {
            let d = Detection {
                key: BlockKey::whole(net),
                kind: BlockType::Scanner,
                reason: format!("User-Agent matches scanner pattern {pattern:?}"),
                duration: self.cfg.scanners.block_time,
                evidence: vec![request_evidence(msg)],
            };
            self.block(ctx, now, d, &printable(ua, 80));
            if !observe {
                return Verdict::Drop(D::Scanner);
            }
        }

        let method = msg.method().unwrap_or(Method::Other);
        if !ua.is_empty()
            && matches!(method, Method::Register | Method::Invite | Method::Options)
            && self.devices.get(&net).is_none_or(|d| d.as_bytes() != ua)
        {
            self.devices.put(net, printable(ua, 80).into());
        }
        let counted = auth::counted_method(msg.method_bytes());
        if counted && msg.has_credentials() {
            self.auth.saw_credentials(now, net);
        }
        if counted {
            if let Some(d) = self.auth.cluster_block(now, &self.cfg, net) {
                if self.block(ctx, now, d, &printable(ua, 80)) {
                    self.auth.reset(net);
                }
                if !observe {
                    return Verdict::Drop(D::Blocked);
                }
            }
        }

        if method == Method::Register {
            let user = to_user(msg);
            if self.auth.refuse(now, net, user, ctx.accounts()) && !observe {
                return Verdict::Reply {
                    code: 403,
                    reason: "Forbidden",
                    retry_after: None,
                };
            }
        }

        if method == Method::Options {
            if let Some(d) = self.options.check(now, &self.cfg, net, msg) {
                self.block(ctx, now, d, &printable(ua, 80));
                if !observe {
                    return Verdict::Drop(D::Pattern);
                }
            }
        }

        if method == Method::Invite {
            if let InviteCheck::Excess { new_episode } = self.invites.check(now, net) {
                let rate = self.cfg.invite.rate_limit;
                if new_episode && self.cfg.invite.notify {
                    let ev = Event::Alert {
                        kind: BlockType::Invite,
                        source: net.to_string(),
                        message: format!(
                            "INVITE flood from {net}: over {rate}/s (burst {}), action {:?}",
                            self.cfg.invite.burst, self.cfg.invite.action
                        ),
                    };
                    ctx.ledger(|l| l.events.push(ev));
                }
                if observe {
                    return Verdict::Forward;
                }
                return match self.cfg.invite.action {
                    InviteAction::Reject => Verdict::Reply {
                        code: 503,
                        reason: "Service Unavailable",
                        retry_after: Some(5),
                    },
                    InviteAction::Drop => Verdict::Drop(D::InviteRate),
                    InviteAction::Block => {
                        let d = Detection {
                            key: BlockKey::whole(net),
                            kind: BlockType::Invite,
                            reason: format!("INVITE flood: over {rate}/s"),
                            duration: self.cfg.invite.block_time,
                            evidence: vec![request_evidence(msg)],
                        };
                        self.block(ctx, now, d, &printable(ua, 80));
                        Verdict::Drop(D::InviteRate)
                    }
                };
            }
        }
        if self.cfg.fraud.enabled && matches!(method, Method::Invite | Method::Ack | Method::Bye) {
            // The fraud guard counts per account, destination and call: shared state, behind
            // the ledger's lock, and only for the methods it reads.
            if let Some(v) = ctx.ledger(|l| l.fraud_on_request(now, src, net, msg)) {
                return v;
            }
        }
        Verdict::Forward
    }

    /// A final response from the PBX to a phone's request, with what the proxy remembered of
    /// the request: `attempt` is a fingerprint of its Authorization / Proxy-Authorization
    /// value when it carried credentials, `None` otherwise. Failures are counted per attempt
    /// (see [`auth`]), for every method the PBX challenges or rejects. The caller has checked
    /// that the phone is neither the upstream nor whitelisted.
    pub(super) fn on_answer(
        &mut self,
        ctx: &Ctx,
        now: Millis,
        phone: SocketAddr,
        msg: &Message<'_>,
        attempt: Option<u64>,
    ) {
        let Some(code) = msg.status() else { return };
        if code < 200 {
            return;
        }
        let Some((cseq, method)) = msg.cseq() else {
            return;
        };
        self.clock.set(now);
        let user = to_user(msg);
        let account = if method == b"REGISTER" {
            user
        } else {
            uri_user(msg, HeaderName::From)
        };
        let answer = Answer {
            phone,
            method,
            code,
            user,
            account,
            attempt,
            call_id: msg.call_id(),
            cseq,
            evidence: clip(&format!(
                "{} {}{}for {} -> {} {}",
                printable(method, 12),
                if attempt.is_some() {
                    "with credentials "
                } else {
                    ""
                },
                if account == user {
                    String::new()
                } else {
                    format!("from {} ", printable(account, 40))
                },
                printable(user, 40),
                code,
                printable(reason_of(msg), 40),
            )),
        };
        let (detection, alert) = self.auth.on_answer(now, &self.cfg, &answer, ctx.accounts());
        if let Some(message) = alert {
            let ev = Event::Alert {
                kind: BlockType::Register,
                source: phone.ip().to_string(),
                message,
            };
            ctx.ledger(|l| l.events.push(ev));
        }
        if let Some(d) = detection {
            let net = d.key.net;
            let port = d.key.port;
            if self.block(ctx, now, d, "") {
                match port {
                    Some(p) => self.auth.reset_port(net, p),
                    None => self.auth.reset(net),
                }
            }
        }
    }
}
