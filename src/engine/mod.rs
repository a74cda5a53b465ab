//! The protection engine, sans-I/O: every decision is a function of (time, source, message,
//! state). It is two parts:
//! - the detectors ([`detectors`]), sharded by source: a source's counters live in one of
//!   [`SHARDS`] shards, each behind its own lock, so cores handling different sources never
//!   wait for each other;
//! - the block ledger ([`ledger`]): blocks, lists, strikes, feeds and the fraud guard, behind
//!   one lock taken to make a block, by the operator, and never for a clean packet.
//!
//! The packet path asks the lock-free drop gate first ([`crate::blocks::Gate`]), then makes
//! one entry per packet, [`Engine::inspect`], with what it parsed and routed; the verdict
//! says forward, answer or drop. Changes to durable state queue [`Event`]s that the caller
//! drains ([`Engine::take_events`]).
//!
//! Verdict order, cheapest first: trusted upstream, block table and lists (the gate, before any
//! parse); then threat feeds, packet flood, anomalies, scanner User-Agent, account
//! protection, OPTIONS sweep, INVITE rate, toll fraud.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

pub mod anomaly;
pub mod auth;
mod blocking;
pub mod detectors;
mod evidence;
mod feeds;
pub mod flood;
pub mod fraud;
pub mod invite;
pub mod ledger;
pub mod scanner;
pub mod sweep;
pub mod track;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use crossbeam_utils::CachePadded;
use ipnet::IpNet;
use parking_lot::{Mutex, MutexGuard};

use crate::blocks::{
    canonical_ip, source_net, table::clip, BlockKey, BlockType, Event, Gate, GateVerdict,
};
use crate::clock::Millis;
use crate::config::Config;
use crate::feeds::list::FeedList;
use crate::stats::{DropReason, Transport};
use crate::util::printable;
use crate::wire::{HeaderName, Message, ParseError};

pub use anomaly::Anomaly;
use auth::AccountWatch;
pub use detectors::Detectors;
pub use fraud::SNAPSHOT_NAMES;
pub use ledger::Ledger;
use scanner::ScannerMatcher;

/// Detector shards. A power of two; enough that two or four cores rarely meet on one, few
/// enough that per-shard bounds stay useful (each holds 1/SHARDS of
/// `protection.tracked_sources`).
pub const SHARDS: usize = 16;

/// Before parsing: what to do with a packet from this source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pre {
    /// The upstream PBX: never inspected, never blocked.
    Trusted,
    /// Whitelisted: forwarded without protection checks.
    Whitelisted,
    /// Drop (or answer 403 when `reply_403`), without parsing.
    Blocked { kind: BlockType, reply_403: bool },
    /// Parse and inspect.
    Inspect,
}

/// The engine's answer for one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Forward,
    Reply {
        code: u16,
        reason: &'static str,
        retry_after: Option<u32>,
    },
    Drop(crate::stats::DropReason),
}

/// A detector's finding: who to block, why, for how long.
#[derive(Debug, Clone)]
pub struct Detection {
    pub key: BlockKey,
    pub kind: BlockType,
    pub reason: String,
    pub duration: Duration,
    pub evidence: Vec<String>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Strike {
    count: u32,
    last: Millis,
}

/// How far a packet's sender is trusted, as the gate (or the upstream binding) said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trust {
    /// The upstream PBX on its own flow.
    Upstream,
    /// A whitelisted source: forwarded without protection checks.
    Whitelisted,
    /// Everyone else.
    Inspect,
}

/// One message as the packet path received, parsed and routed it: the input of the engine's
/// single entry per packet ([`Engine::inspect`]).
pub struct Seen<'a, 'm> {
    pub transport: Transport,
    pub src: SocketAddr,
    pub trust: Trust,
    pub what: What<'a, 'm>,
}

pub enum What<'a, 'm> {
    /// Could not be parsed, or is over `sip.max_message_bytes` (`err` says which).
    Unparsed { err: ParseError, bytes: &'a [u8] },
    /// A request. `our_dialog`: in one of the dialogs we record-routed (the router's word);
    /// `forged`: the router refused it because its Via claims to be ours.
    Request {
        msg: &'a Message<'m>,
        our_dialog: bool,
        forged: bool,
    },
    /// A response. `answer`: for a final answer from the PBX, the phone it goes back to and
    /// the fingerprint of the credentials the request carried (the router remembered both);
    /// `to`: where it was forwarded; `forged`: a response we did not cause, through a Via
    /// that looks like ours.
    Response {
        msg: &'a Message<'m>,
        answer: Option<(SocketAddr, Option<u64>)>,
        to: Option<(Transport, SocketAddr)>,
        forged: bool,
    },
}

/// What a detector shard reaches outside itself: the ledger, the account watch, the
/// lock-free copies of the feed list and upstream addresses, and the gate.
pub struct Ctx {
    ledger: Mutex<Ledger>,
    accounts: AccountWatch,
    feeds: Arc<ArcSwap<FeedList>>,
    /// The ledger's list of the PBX's addresses (the same `Arc`).
    upstream: Arc<ArcSwap<Vec<IpAddr>>>,
    gate: Arc<Gate>,
    /// The ledger queued events the caller has not taken yet: read on every entry, written
    /// only when a block, alert or list change is made.
    pending: AtomicBool,
    /// Times the ledger's lock was taken (tests: a clean packet must not take it).
    #[cfg(test)]
    ledger_locks: std::sync::atomic::AtomicU64,
}

impl Ctx {
    /// Run `f` on the ledger (its lock held), keeping the engine's lock-free copies and the
    /// pending flag in step with what `f` changed.
    pub fn ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        #[cfg(test)]
        self.ledger_locks.fetch_add(1, Ordering::Relaxed);
        let mut l = self.ledger.lock();
        let r = f(&mut l);
        self.settle(&mut l);
        r
    }

    fn settle(&self, l: &mut Ledger) {
        l.sync_gate();
        if l.has_events() {
            self.pending.store(true, Ordering::Release);
        }
    }

    pub fn accounts(&self) -> &AccountWatch {
        &self.accounts
    }

    pub fn is_upstream(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.upstream.load().contains(&ip)
    }
}

/// The ledger, locked; on drop the engine's copies and pending flag are brought in step.
pub struct LedgerGuard<'e> {
    guard: MutexGuard<'e, Ledger>,
    ctx: &'e Ctx,
}

impl std::ops::Deref for LedgerGuard<'_> {
    type Target = Ledger;
    fn deref(&self) -> &Ledger {
        &self.guard
    }
}

impl std::ops::DerefMut for LedgerGuard<'_> {
    fn deref_mut(&mut self) -> &mut Ledger {
        &mut self.guard
    }
}

impl Drop for LedgerGuard<'_> {
    fn drop(&mut self) {
        self.ctx.settle(&mut self.guard);
    }
}

pub struct Engine {
    ctx: Ctx,
    shards: Box<[CachePadded<Mutex<Detectors>>; SHARDS]>,
    /// Picks a source's shard; keyed per run so the spread cannot be aimed at.
    spread: std::collections::hash_map::RandomState,
    /// The config the shards were built from (replaced on reload; read without a lock).
    cfg: ArcSwap<Config>,
}

impl Engine {
    pub fn new(cfg: &Config, now: Millis) -> Engine {
        let ledger = Ledger::new(cfg, now);
        let gate = ledger.gate().clone();
        let feeds = ledger.feed_copy();
        let shared = Arc::new(cfg.clone());
        let scanners = Arc::new(ScannerMatcher::new(&cfg.scanners.user_agents));
        let shards = Box::new(std::array::from_fn(|_| {
            CachePadded::new(Mutex::new(Detectors::new(
                shared.clone(),
                SHARDS,
                scanners.clone(),
                now,
            )))
        }));
        Engine {
            ctx: Ctx {
                accounts: AccountWatch::new(cfg.protection.tracked_sources),
                feeds,
                upstream: ledger.upstream.clone(),
                gate,
                pending: AtomicBool::new(false),
                #[cfg(test)]
                ledger_locks: Default::default(),
                ledger: Mutex::new(ledger),
            },
            shards,
            spread: std::collections::hash_map::RandomState::new(),
            cfg: ArcSwap::new(shared),
        }
    }

    /// The source network `src` counts under (`protection.ipv6_prefix`).
    fn net(&self, src: SocketAddr) -> IpNet {
        source_net(src.ip(), self.cfg.load().protection.ipv6_prefix)
    }

    /// The shard holding `net`'s detector state.
    fn shard(&self, net: IpNet) -> MutexGuard<'_, Detectors> {
        use std::hash::BuildHasher;
        let i = (self.spread.hash_one(net) as usize) % SHARDS;
        let [first, ..] = &*self.shards;
        self.shards.get(i).unwrap_or(first).lock()
    }

    /// Is `ip` one of the PBX's addresses? Lock-free.
    pub fn is_upstream(&self, ip: IpAddr) -> bool {
        self.ctx.is_upstream(ip)
    }

    /// Run `f` on the detector shard holding `net` (tests).
    #[cfg(test)]
    pub(crate) fn with_shard<R>(&self, net: IpNet, f: impl FnOnce(&mut Detectors) -> R) -> R {
        f(&mut self.shard(net))
    }

    /// Times the ledger's lock was taken through the packet path's way to it (tests).
    #[cfg(test)]
    pub(crate) fn ledger_locks(&self) -> u64 {
        self.ctx.ledger_locks.load(Ordering::Relaxed)
    }

    /// The ledger, locked (for the admin surface, the state task, the cluster and tests).
    pub fn ledger(&self) -> LedgerGuard<'_> {
        LedgerGuard {
            guard: self.ctx.ledger.lock(),
            ctx: &self.ctx,
        }
    }

    /// The ledger, without locking, for an engine owned outright (tests, fuzzing).
    pub fn ledger_mut(&mut self) -> &mut Ledger {
        self.ctx.ledger.get_mut()
    }

    /// Run `f` on the ledger (the lock held for `f` only).
    pub fn with_ledger<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        self.ctx.ledger(f)
    }

    /// The lock-free drop gate the ledger keeps in step with its table, lists and policy.
    pub fn gate(&self) -> &Arc<Gate> {
        &self.ctx.gate
    }

    /// Did the ledger queue events since the last [`Engine::take_events`]? Lock-free.
    pub fn has_events(&self) -> bool {
        self.ctx.pending.load(Ordering::Acquire)
    }

    /// Take the queued state changes, oldest first.
    pub fn take_events(&self) -> Vec<Event> {
        self.ctx.pending.store(false, Ordering::Release);
        self.ctx.ledger.lock().take_events()
    }

    pub fn config(&self) -> Arc<Config> {
        self.cfg.load_full()
    }

    // ---- the packet path --------------------------------------------------------------

    /// The one engine entry per packet, after the gate let it through: the message as parsed
    /// and routed, and the verdict for it. Takes the lock of one detector shard (the
    /// sender's, or for the PBX's answer the phone's); the ledger's only to make a block,
    /// and for the fraud guard's methods when it is on.
    pub fn inspect(&self, now: Millis, s: Seen<'_, '_>) -> Verdict {
        match (s.trust, s.what) {
            (Trust::Upstream, What::Request { msg, .. }) => {
                self.on_upstream_request(msg);
                Verdict::Forward
            }
            (Trust::Whitelisted, What::Request { .. }) | (_, What::Unparsed { .. })
                if s.trust != Trust::Inspect =>
            {
                Verdict::Forward
            }
            (_, What::Unparsed { err, bytes }) => {
                let net = self.net(s.src);
                let what = Anomaly::from_parse(err);
                let mut d = self.shard(net);
                if d.within_rate(&self.ctx, now, net) {
                    d.on_anomaly(&self.ctx, now, net, what, bytes);
                }
                Verdict::Drop(DropReason::Malformed)
            }
            (
                _,
                What::Request {
                    msg,
                    our_dialog,
                    forged,
                },
            ) => {
                let (net, mut d) = match self.admit(now, s.src) {
                    Ok(a) => a,
                    Err(v) => return v,
                };
                if forged {
                    d.on_anomaly(&self.ctx, now, net, Anomaly::ForgedResponse, msg.buf);
                    return Verdict::Drop(DropReason::Forged);
                }
                d.on_request_over(&self.ctx, now, s.transport, s.src, net, msg, our_dialog)
            }
            (
                trust,
                What::Response {
                    msg,
                    answer,
                    to,
                    forged,
                },
            ) => {
                if trust == Trust::Inspect {
                    let (net, mut d) = match self.admit(now, s.src) {
                        Ok(a) => a,
                        Err(v) => return v,
                    };
                    if let Some(a) = anomaly::check_response(msg) {
                        d.on_anomaly(&self.ctx, now, net, a, msg.buf);
                        return Verdict::Drop(DropReason::Anomaly);
                    }
                    if forged {
                        d.on_anomaly(&self.ctx, now, net, Anomaly::ForgedResponse, msg.buf);
                        return Verdict::Drop(DropReason::Forged);
                    }
                }
                if forged {
                    return Verdict::Drop(DropReason::Forged);
                }
                if let Some((phone, attempt)) = answer {
                    if msg.status().is_some_and(|c| c >= 200) {
                        self.on_answer_from(now, (s.transport, s.src), phone, msg, attempt, to);
                    }
                }
                Verdict::Forward
            }
        }
    }

    /// What every parsed message from a sender the gate let through meets first: the threat
    /// feeds, then the packet rate; then its detector shard, locked, for the rest.
    fn admit(
        &self,
        now: Millis,
        src: SocketAddr,
    ) -> Result<(IpNet, MutexGuard<'_, Detectors>), Verdict> {
        if let Some(v) = self.feed_check(now, src) {
            return Err(v);
        }
        let net = self.net(src);
        let mut d = self.shard(net);
        if !d.within_rate(&self.ctx, now, net) {
            return Err(Verdict::Drop(DropReason::Blocked));
        }
        Ok((net, d))
    }

    /// A threat feed lists `src`: its first packet makes a FEED block (the ledger's lock),
    /// later ones stop at the gate. The lookup is on a lock-free copy of the feed list.
    fn feed_check(&self, now: Millis, src: SocketAddr) -> Option<Verdict> {
        self.ctx.feeds.load().lookup(now, src.ip())?;
        self.ctx
            .ledger(|l| l.feed_check(now, src))
            .map(|_| Verdict::Drop(DropReason::Blocked))
    }

    /// Before parsing, as the packet path did before the gate: the gate's answer, then the
    /// threat feeds and the packet-rate limit. For callers without a parsed message (tests,
    /// the fuzzer) and for the TFTP relay.
    pub fn precheck(&self, now: Millis, src: SocketAddr) -> Pre {
        match self.ctx.gate.check(now, src) {
            GateVerdict::Blocked { kind, reply_403 } => return Pre::Blocked { kind, reply_403 },
            GateVerdict::Whitelisted => return Pre::Whitelisted,
            GateVerdict::Inspect => {}
        }
        if let Some(Verdict::Drop(_)) = self.feed_check(now, src) {
            return Pre::Blocked {
                kind: BlockType::Feed,
                reply_403: false,
            };
        }
        let net = self.net(src);
        if !self.shard(net).within_rate(&self.ctx, now, net) {
            return Pre::Blocked {
                kind: BlockType::Flood,
                reply_403: false,
            };
        }
        Pre::Inspect
    }

    /// A packet that could not be parsed, or a parsed one with an anomaly: score the source.
    pub fn on_anomaly(&self, now: Millis, src: SocketAddr, what: Anomaly, sample: &[u8]) {
        let net = self.net(src);
        self.shard(net)
            .on_anomaly(&self.ctx, now, net, what, sample);
    }

    /// A parse error is an anomaly.
    pub fn on_malformed(&self, now: Millis, src: SocketAddr, err: ParseError, sample: &[u8]) {
        self.on_anomaly(now, src, Anomaly::from_parse(err), sample);
    }

    /// A parsed request from a phone (not trusted, not whitelisted), without capture.
    pub fn on_request(
        &self,
        now: Millis,
        src: SocketAddr,
        msg: &Message<'_>,
        our_dialog: bool,
    ) -> Verdict {
        let net = self.net(src);
        self.shard(net)
            .on_request(&self.ctx, now, src, net, msg, our_dialog)
    }

    /// [`Engine::on_request`] for a request received over `t`: the packet is captured first.
    pub fn on_request_over(
        &self,
        now: Millis,
        t: Transport,
        src: SocketAddr,
        msg: &Message<'_>,
        our_dialog: bool,
    ) -> Verdict {
        let net = self.net(src);
        self.shard(net)
            .on_request_over(&self.ctx, now, t, src, net, msg, our_dialog)
    }

    /// A final response from the PBX to `phone`'s request (see [`Detectors::on_answer`]).
    pub fn on_answer(
        &self,
        now: Millis,
        phone: SocketAddr,
        msg: &Message<'_>,
        attempt: Option<u64>,
    ) {
        if !self.answer_counts(now, msg, phone, None) {
            return;
        }
        let net = self.net(phone);
        self.shard(net)
            .on_answer(&self.ctx, now, phone, msg, attempt);
    }

    /// [`Engine::on_answer`] with the answer captured for the evidence ladder, and the fraud
    /// guard told where a 2xx to an INVITE went.
    pub fn on_answer_from(
        &self,
        now: Millis,
        pbx: (Transport, SocketAddr),
        phone: SocketAddr,
        msg: &Message<'_>,
        attempt: Option<u64>,
        to: Option<(Transport, SocketAddr)>,
    ) {
        if !self.answer_counts(now, msg, phone, to) {
            return;
        }
        let net = self.net(phone);
        self.shard(net)
            .on_answer_from(&self.ctx, now, pbx, phone, msg, attempt, to);
    }

    /// The fraud guard's share of a final answer (forwarded to `to`), and whether the
    /// detectors count it (not for the upstream or a whitelisted phone).
    fn answer_counts(
        &self,
        now: Millis,
        msg: &Message<'_>,
        phone: SocketAddr,
        to: Option<(Transport, SocketAddr)>,
    ) -> bool {
        let Some(code) = msg.status() else {
            return false;
        };
        if code < 200 {
            return false;
        }
        if self.cfg.load().fraud.enabled {
            self.ctx.ledger(|l| {
                l.fraud_on_answer(now, msg, code);
                if let Some(to) = to {
                    l.on_answer_forwarded(msg, to);
                }
            });
        }
        !self.ctx.is_upstream(phone.ip()) && !self.ctx.gate.is_whitelisted(phone.ip())
    }

    /// A request from the PBX (its BYE ends a call the fraud guard tracks).
    pub fn on_upstream_request(&self, msg: &Message<'_>) {
        if self.cfg.load().fraud.enabled {
            self.ctx.ledger(|l| l.on_upstream_request(msg));
        }
    }

    /// A source that is blocked (or blacklisted) or has an open anomaly record: what
    /// `hep.only = "blocked"` exports. No side effects (no hit counted, no LRU touched).
    pub fn is_suspect(&self, now: Millis, a: SocketAddr) -> bool {
        match self.ctx.gate.check_quiet(now, a) {
            GateVerdict::Blocked { .. } => return true,
            GateVerdict::Whitelisted => return false,
            GateVerdict::Inspect => {}
        }
        let net = self.net(a);
        // Observe mode keeps its blocks out of the gate: the ledger has them.
        (self.cfg.load().protection.mode == crate::config::Mode::Observe
            && self.ctx.ledger(|l| l.is_listed(now, a)))
            || self.shard(net).has_anomalies(now, net)
    }

    // ---- what spans the shards ------------------------------------------------------------

    /// Apply a reloaded config: thresholds, lists from the file and scanner patterns change;
    /// blocks, strikes, counters and run-time list entries stay.
    pub fn reconfigure(&self, cfg: &Config, now: Millis) {
        self.ctx.ledger(|l| l.reconfigure(cfg, now));
        self.ctx.accounts.resize(cfg.protection.tracked_sources);
        let shared = Arc::new(cfg.clone());
        let scanners = Arc::new(ScannerMatcher::new(&cfg.scanners.user_agents));
        for s in self.shards.iter() {
            s.lock()
                .reconfigure(shared.clone(), SHARDS, scanners.clone());
        }
        self.cfg.store(shared);
    }

    /// The PBX's addresses (after name resolution): requests from them are trusted.
    pub fn set_upstream(&self, ips: Vec<IpAddr>) {
        self.ctx.ledger(|l| l.set_upstream(ips));
    }

    /// Count REGISTER failures and INVITEs per source across the cluster through `shared`.
    pub fn set_shared_counts(&self, shared: crate::cluster_count::SharedCounts) {
        for s in self.shards.iter() {
            s.lock().set_shared(&shared);
        }
        self.ctx.ledger(|l| l.set_shared_counts(shared));
    }

    /// Remove blocks on `net` (all its port blocks too when `port` is None), and forget the
    /// detectors' counts for it. Returns the blocks removed.
    pub fn unblock(&self, net: IpNet, port: Option<u16>) -> Vec<crate::blocks::Block> {
        let removed = self.ctx.ledger(|l| l.unblock(net, port));
        self.forget(&removed);
        removed
    }

    /// Forget the detectors' failure counts for the sources of `blocks` (after an operator
    /// removed them), so an unblocked phone starts afresh.
    pub fn forget(&self, blocks: &[crate::blocks::Block]) {
        for b in blocks {
            self.shard(b.key.net).auth.reset(b.key.net);
        }
    }

    /// Entries held by the detectors and the ledger (for the memory-bound soak and metrics).
    pub fn tracked(&self) -> usize {
        let shards: usize = self.shards.iter().map(|s| s.lock().tracked()).sum();
        shards + self.ctx.accounts.tracked() + self.ctx.ledger.lock().tracked()
    }

    /// Sources with captured packets held.
    pub fn watched(&self) -> usize {
        self.shards.iter().map(|s| s.lock().watched()).sum()
    }

    /// Calls the fraud guard ended at their max duration: the node sends each one's two BYEs.
    pub fn take_fraud_byes(&self) -> Vec<fraud::dialog::Dialog> {
        self.ctx.ledger(|l| l.take_fraud_byes())
    }
}

fn push_evidence(ev: &mut Vec<String>, line: String) {
    if ev.len() >= crate::blocks::table::EVIDENCE_LINES {
        ev.remove(0);
    }
    ev.push(line);
}

/// The user part of the To URI (the account a REGISTER is for).
pub fn to_user<'a>(msg: &Message<'a>) -> &'a [u8] {
    uri_user(msg, HeaderName::To)
}

/// The user part of the URI in a To or From header (empty when absent or unparseable).
fn uri_user<'a>(msg: &Message<'a>, h: HeaderName) -> &'a [u8] {
    let b = msg.buf;
    msg.header(h)
        .and_then(|h| crate::wire::uri::NameAddr::parse(b, h.value))
        .and_then(|na| crate::wire::uri::Uri::parse(b, na.uri))
        .map_or(&b""[..], |u| u.user(b))
}

fn reason_of<'a>(msg: &Message<'a>) -> &'a [u8] {
    match msg.start {
        crate::wire::StartLine::Response { reason, .. } => reason.of(msg.buf),
        _ => b"",
    }
}

/// One line of evidence for a request: request line and User-Agent.
pub fn request_evidence(msg: &Message<'_>) -> String {
    let line = msg.start_line.of(msg.buf);
    let line = line.strip_suffix(b"\r\n").unwrap_or(line);
    let ua = msg.user_agent();
    if ua.is_empty() {
        clip(&printable(line, 100))
    } else {
        clip(&format!(
            "{} UA={}",
            printable(line, 100),
            printable(ua, 50)
        ))
    }
}
