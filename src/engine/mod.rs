//! The protection engine, sans-I/O: every decision is a function of (time, source, message,
//! state). The socket layer asks [`Engine::precheck`] before parsing, [`Engine::on_request`]
//! after, and reports the PBX's answers through [`Engine::on_answer`]. Changes to durable state
//! queue [`Event`]s that the caller drains.
//!
//! Verdict order, cheapest first: trusted upstream, block table (O(1), before any parse),
//! whitelist, static blacklist, packet flood; after parse: anomalies, scanner User-Agent,
//! account protection, OPTIONS sweep, INVITE rate.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

pub mod anomaly;
pub mod auth;
mod blocking;
mod evidence;
mod feeds;
pub mod fraud;
pub mod invite;
pub mod scanner;
pub mod track;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use governor::Quota;
use ipnet::IpNet;
use lru::LruCache;

use crate::blocks::{
    canonical_ip, source_net, table::clip, Block, BlockKey, BlockTable, BlockType, Event, Gate,
    ListEntry, ListKind, Lists, Policy, UnblockReason,
};
use crate::clock::Millis;
use crate::config::{Config, InviteAction, Mode};
use crate::util::printable;
use crate::wire::{HeaderName, Message, Method, ParseError};

pub use anomaly::Anomaly;
use auth::{Answer, AuthTracker};
pub use fraud::SNAPSHOT_NAMES;
use invite::{InviteCheck, InviteGuard};
use scanner::ScannerMatcher;
use track::{nonzero, EngineClock, Limiters, Window};

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

/// After parsing a request from a phone.
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

pub struct Engine {
    cfg: Config,
    clock: EngineClock,
    table: BlockTable,
    lists: Lists,
    upstream: Vec<IpAddr>,
    strikes: LruCache<IpNet, Strike>,
    scanners: ScannerMatcher,
    flood: Limiters<IpNet>,
    invites: InviteGuard,
    auth: AuthTracker,
    anomalies: LruCache<IpNet, (Window, Vec<String>)>,
    options: LruCache<IpNet, Window>,
    /// The last User-Agent seen from each source, for the block table's Device column when a
    /// block comes from the PBX's answers (which carry the PBX's Server header, not the UA).
    devices: LruCache<IpNet, Box<str>>,
    events: Vec<Event>,
    /// The lists changed since the gate's policy was last published (restore batches many
    /// changes; see [`Engine::sync_gate`]).
    lists_dirty: bool,
    fraud: fraud::FraudGuard,
    feeds: crate::feeds::list::FeedList,
    /// Cluster-wide counts (disabled on a single node); see [`crate::cluster_count`].
    shared: crate::cluster_count::SharedCounts,
    /// Recent packets per source, for the evidence ladder of a block that may follow.
    watched: evidence::Watched,
}

fn flood_quota(cfg: &Config) -> Quota {
    let pps = NonZeroU32::new(cfg.flood.packets_per_second).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(pps).allow_burst(pps)
}

impl Engine {
    pub fn new(cfg: &Config, now: Millis) -> Engine {
        let clock = EngineClock::default();
        clock.set(now);
        let cap = cfg.protection.tracked_sources;
        let mut e = Engine {
            cfg: cfg.clone(),
            table: BlockTable::new(cfg.protection.max_blocks),
            lists: Lists::default(),
            upstream: Vec::new(),
            strikes: LruCache::new(nonzero(cap)),
            scanners: ScannerMatcher::new(&cfg.scanners.user_agents),
            flood: Limiters::new(cap, flood_quota(cfg), clock.clone()),
            invites: InviteGuard::new(cap, &cfg.invite, clock.clone()),
            auth: AuthTracker::new(cap),
            anomalies: LruCache::new(nonzero(cap)),
            options: LruCache::new(nonzero(cap)),
            devices: LruCache::new(nonzero(cap / 4 + 1)),
            events: Vec::new(),
            lists_dirty: false,
            fraud: fraud::FraudGuard::new(&cfg.fraud, rand::random()),
            feeds: crate::feeds::list::FeedList::new(cfg.feeds.max_entries),
            shared: crate::cluster_count::SharedCounts::disabled(),
            watched: LruCache::new(nonzero(evidence::WATCHED)),
            clock,
        };
        e.lists
            .replace_config(ListKind::Whitelist, &cfg.lists.whitelist, now);
        e.lists
            .replace_config(ListKind::Blacklist, &cfg.lists.blacklist, now);
        e.publish_policy();
        e
    }

    /// Count REGISTER failures and INVITEs per source across the cluster through `shared`.
    pub fn set_shared_counts(&mut self, shared: crate::cluster_count::SharedCounts) {
        self.auth.set_shared(shared.clone());
        self.invites.set_shared(shared.clone());
        self.shared = shared;
    }

    /// The cluster-wide counts handle (disabled on a single node), for the TFTP guard and
    /// `/metrics`.
    pub fn shared_counts(&self) -> &crate::cluster_count::SharedCounts {
        &self.shared
    }

    /// The lock-free drop gate this engine keeps in step with its block table, lists and
    /// policy: the packet path asks it before taking the engine's lock.
    pub fn gate(&self) -> &std::sync::Arc<Gate> {
        self.table.gate()
    }

    /// Publish the lists and policy to the gate if a batch of changes ([`Engine::restore`])
    /// left them unpublished. Cheap when nothing changed; the node calls it after every engine
    /// entry.
    pub fn sync_gate(&mut self) {
        if self.lists_dirty {
            self.publish_policy();
        }
    }

    /// Copy the lists and the policy that reads them into the gate. O(list entries): lists
    /// change at operator pace (and the automatic blacklist is bounded).
    pub(crate) fn publish_policy(&mut self) {
        self.lists_dirty = false;
        let p = &self.cfg.protection;
        self.table.gate().set_policy(Policy {
            lists: self.lists.clone(),
            observe: p.mode == Mode::Observe,
            reply_403: p.blocked_reply == crate::config::BlockedReply::Forbidden,
            ipv6_prefix: p.ipv6_prefix,
        });
    }

    /// Fold the packets the gate dropped into the block rows' hits (for readers of the table).
    pub fn fold_gate_hits(&mut self) {
        self.table.fold_gate_hits();
    }

    /// Apply a reloaded config: thresholds, lists from the file and scanner patterns change;
    /// blocks, strikes and run-time list entries stay.
    pub fn reconfigure(&mut self, cfg: &Config, now: Millis) {
        self.clock.set(now);
        let cap = cfg.protection.tracked_sources;
        self.table.set_max(cfg.protection.max_blocks);
        self.strikes.resize(nonzero(cap));
        self.scanners = ScannerMatcher::new(&cfg.scanners.user_agents);
        self.flood.reconfigure(cap, flood_quota(cfg));
        self.invites.reconfigure(cap, &cfg.invite);
        self.auth.resize(cap);
        self.anomalies.resize(nonzero(cap));
        self.options.resize(nonzero(cap));
        self.devices.resize(nonzero(cap / 4 + 1));
        self.fraud.reconfigure(&cfg.fraud);
        self.shared
            .set_periods(crate::cluster_count::Periods::from_config(cfg));
        for kind in [ListKind::Whitelist, ListKind::Blacklist] {
            let nets = match kind {
                ListKind::Whitelist => &cfg.lists.whitelist,
                ListKind::Blacklist => &cfg.lists.blacklist,
            };
            let (added, removed) = self.lists.replace_config(kind, nets, now);
            for net in removed {
                self.events.push(Event::ListRemoved { list: kind, net });
            }
            for net in added {
                let entry = ListEntry {
                    comment: String::new(),
                    added_at: now,
                    source: "config".into(),
                };
                if kind == ListKind::Whitelist {
                    self.unblock_covered(net, UnblockReason::Whitelisted);
                }
                self.events.push(Event::ListAdded {
                    list: kind,
                    net,
                    entry,
                });
            }
        }
        self.cfg = cfg.clone();
        self.publish_policy();
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The PBX's addresses (after name resolution): requests from them are trusted.
    pub fn set_upstream(&mut self, ips: Vec<IpAddr>) {
        self.upstream = ips.into_iter().map(canonical_ip).collect();
    }

    pub fn is_upstream(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.upstream.contains(&ip)
    }

    fn observe(&self) -> bool {
        self.cfg.protection.mode == Mode::Observe
    }

    // ---- the packet path --------------------------------------------------------------

    /// Before parsing. O(1) for a blocked source: one hash lookup, no parse, no allocation.
    /// The caller decides whether the packet is the upstream's (bound to its flow, not its IP:
    /// `proxy::Router::is_upstream`) and does not call this for it.
    pub fn precheck(&mut self, now: Millis, src: SocketAddr) -> Pre {
        let reply_403 = self.cfg.protection.blocked_reply == crate::config::BlockedReply::Forbidden;
        if let Some(hit) = self.table.check(now, src, self.cfg.protection.ipv6_prefix) {
            return Pre::Blocked {
                kind: hit.kind,
                reply_403,
            };
        }
        if self.lists.is_whitelisted(src.ip()) {
            return Pre::Whitelisted;
        }
        if let Some(p) = self.feed_check(now, src) {
            return p;
        }
        if self.lists.blacklisted(src.ip()).is_some() && !self.observe() {
            return Pre::Blocked {
                kind: BlockType::Blacklist,
                reply_403,
            };
        }
        self.clock.set(now);
        let net = source_net(src.ip(), self.cfg.protection.ipv6_prefix);
        if !self.flood.check(net) {
            let pps = self.cfg.flood.packets_per_second;
            let d = Detection {
                key: BlockKey::whole(net),
                kind: BlockType::Flood,
                reason: format!("more than {pps} packets per second"),
                duration: self.cfg.flood.block_time,
                evidence: vec![format!("packet rate over {pps}/s")],
            };
            // Dropped even when the table had no room for the block: the limiter alone
            // says this source is over the rate.
            self.block(now, d, "");
            if !self.observe() {
                return Pre::Blocked {
                    kind: BlockType::Flood,
                    reply_403: false,
                };
            }
        }
        Pre::Inspect
    }

    /// A packet that could not be parsed, or a parsed one with an anomaly: score the source.
    pub fn on_anomaly(&mut self, now: Millis, src: SocketAddr, what: Anomaly, sample: &[u8]) {
        self.clock.set(now);
        let net = source_net(src.ip(), self.cfg.protection.ipv6_prefix);
        let period = self.cfg.anomaly.monit_period.as_millis() as Millis;
        let (w, ev) = self
            .anomalies
            .get_or_insert_mut(net, || (Window::default(), Vec::new()));
        let score = w.add(now, period, what.weight());
        if ev.len() >= 3 {
            ev.remove(0);
        }
        let first_line = sample.split(|b| *b == b'\n').next().unwrap_or(b"");
        ev.push(clip(&format!(
            "{}: {}",
            what.describe(),
            printable(first_line, 80)
        )));
        if score >= self.cfg.anomaly.threshold {
            let evidence = ev.clone();
            let d = Detection {
                key: BlockKey::whole(net),
                kind: BlockType::Anomaly,
                reason: format!(
                    "protocol anomalies scored {score} within {} (last: {})",
                    humantime::format_duration(self.cfg.anomaly.monit_period),
                    what.describe()
                ),
                duration: self.cfg.anomaly.block_time,
                evidence,
            };
            self.block(now, d, "");
        }
    }

    /// Convenience for the socket layer: a parse error is an anomaly.
    pub fn on_malformed(&mut self, now: Millis, src: SocketAddr, err: ParseError, sample: &[u8]) {
        let what = match err {
            ParseError::NotSip => Anomaly::NotSip,
            e => Anomaly::Malformed(e),
        };
        self.on_anomaly(now, src, what, sample);
    }

    /// A parsed request from a phone (not trusted, not whitelisted). `our_dialog`: the request
    /// is in-dialog (To tag) and its Route names a dialog we record-routed, as the router
    /// decided; then values another party chose and this sender only echoes are not held
    /// against it (see [`anomaly::check_request`]).
    pub fn on_request(
        &mut self,
        now: Millis,
        src: SocketAddr,
        msg: &Message<'_>,
        our_dialog: bool,
    ) -> Verdict {
        use crate::stats::DropReason as D;
        let _ = our_dialog;
        self.clock.set(now);
        let net = source_net(src.ip(), self.cfg.protection.ipv6_prefix);
        let ua = msg.user_agent();
        let observe = self.observe();

        if let Some(a) = anomaly::check_request(msg, our_dialog) {
            self.on_anomaly(now, src, a, msg.buf);
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
            self.block(now, d, &printable(ua, 80));
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
        if msg.has_credentials() && auth::counted_method(msg.method_bytes()) {
            self.auth.saw_credentials(now, net);
        }
        if auth::counted_method(msg.method_bytes()) {
            if let Some(d) = self.auth.cluster_block(now, &self.cfg, net) {
                if self.block(now, d, &printable(ua, 80)) {
                    self.auth.reset(net);
                }
                if !observe {
                    return Verdict::Drop(D::Blocked);
                }
            }
        }

        if method == Method::Register {
            let user = to_user(msg);
            if self.auth.refuse(now, net, user) && !observe {
                return Verdict::Reply {
                    code: 403,
                    reason: "Forbidden",
                    retry_after: None,
                };
            }
        }

        if method == Method::Options {
            let period = self.cfg.patterns.monit_period.as_millis() as Millis;
            let n = self
                .options
                .get_or_insert_mut(net, Window::default)
                .add(now, period, 1);
            if n >= self.cfg.patterns.options_sweep {
                let d = Detection {
                    key: BlockKey::whole(net),
                    kind: BlockType::Scan,
                    reason: format!(
                        "OPTIONS sweep: {n} OPTIONS within {}",
                        humantime::format_duration(self.cfg.patterns.monit_period)
                    ),
                    duration: self.cfg.patterns.block_time,
                    evidence: vec![request_evidence(msg)],
                };
                self.block(now, d, &printable(ua, 80));
                if !observe {
                    return Verdict::Drop(D::Pattern);
                }
            }
        }

        if method == Method::Invite {
            if let InviteCheck::Excess { new_episode } = self.invites.check(now, net) {
                let rate = self.cfg.invite.rate_limit;
                if new_episode && self.cfg.invite.notify {
                    self.events.push(Event::Alert {
                        kind: BlockType::Invite,
                        source: net.to_string(),
                        message: format!(
                            "INVITE flood from {net}: over {rate}/s (burst {}), action {:?}",
                            self.cfg.invite.burst, self.cfg.invite.action
                        ),
                    });
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
                        self.block(now, d, &printable(ua, 80));
                        Verdict::Drop(D::InviteRate)
                    }
                };
            }
        }
        if let Some(v) = self.fraud_on_request(now, src, net, msg) {
            return v;
        }
        Verdict::Forward
    }

    /// A final response from the PBX to a phone's request, with what the proxy remembered of
    /// the request: `attempt` is a fingerprint of its Authorization / Proxy-Authorization
    /// value when it carried credentials, `None` otherwise. Failures are counted per attempt
    /// (see [`auth`]), for every method the PBX challenges or rejects.
    pub fn on_answer(
        &mut self,
        now: Millis,
        phone: SocketAddr,
        msg: &Message<'_>,
        attempt: Option<u64>,
    ) {
        let Some(code) = msg.status() else { return };
        if code >= 200 {
            self.fraud_on_answer(now, msg, code);
        }
        if code < 200 || self.is_upstream(phone.ip()) || self.lists.is_whitelisted(phone.ip()) {
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
        let (detection, alert) = self.auth.on_answer(now, &self.cfg, &answer);
        if let Some(message) = alert {
            self.events.push(Event::Alert {
                kind: BlockType::Register,
                source: phone.ip().to_string(),
                message,
            });
        }
        if let Some(d) = detection {
            let net = d.key.net;
            let port = d.key.port;
            if self.block(now, d, "") {
                match port {
                    Some(p) => self.auth.reset_port(net, p),
                    None => self.auth.reset(net),
                }
            }
        }
    }

    /// Let the caller record the device (User-Agent) seen from a source for a block made from
    /// a response (responses carry the PBX's Server header, not the phone's UA).
    pub fn note_device(&mut self, key: &BlockKey, device: &str) {
        if let Some(b) = self.table.get_mut(key) {
            if b.device.is_empty() {
                b.device = device.to_string();
            }
        }
    }

    // ---- blocks ---------------------------------------------------------------------------

    /// Remove blocks on `net` (all its port blocks too when `port` is None). Returns them.
    pub fn unblock(&mut self, net: IpNet, port: Option<u16>) -> Vec<Block> {
        let removed = match port {
            Some(p) => self
                .table
                .remove(&BlockKey::with_port(net, p))
                .into_iter()
                .collect(),
            None => self.table.remove_net(net),
        };
        for b in &removed {
            self.auth.reset(b.key.net);
            self.events.push(Event::Unblocked {
                key: b.key,
                kind: b.kind,
                why: UnblockReason::Manual,
            });
        }
        removed
    }

    fn unblock_covered(&mut self, net: IpNet, why: UnblockReason) {
        for b in self.table.remove_net(net) {
            self.events.push(Event::Unblocked {
                key: b.key,
                kind: b.kind,
                why,
            });
        }
    }

    /// Expire blocks whose time is up. Call about once a second.
    /// An operational alert from outside the packet path (a certificate that does not load):
    /// logged, counted and notified like the engine's own.
    pub fn alert(&mut self, kind: BlockType, source: String, message: String) {
        self.events.push(Event::Alert {
            kind,
            source,
            message,
        });
    }

    pub fn tick(&mut self, now: Millis) {
        self.clock.set(now);
        self.fraud_tick(now);
        for b in self.table.expire(now) {
            self.events.push(Event::Unblocked {
                key: b.key,
                kind: b.kind,
                why: UnblockReason::Expired,
            });
        }
    }

    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.table.iter()
    }

    pub fn block_table(&self) -> &BlockTable {
        &self.table
    }

    /// Is this source blocked (for the TFTP relay and other guards sharing the table)?
    pub fn is_blocked(&mut self, now: Millis, src: SocketAddr) -> bool {
        self.table
            .check(now, src, self.cfg.protection.ipv6_prefix)
            .is_some()
            || (self.lists.blacklisted(src.ip()).is_some() && !self.observe())
    }

    pub fn is_whitelisted(&self, ip: IpAddr) -> bool {
        self.lists.is_whitelisted(ip) || self.is_upstream(ip)
    }

    // ---- lists ---------------------------------------------------------------------------

    pub fn lists(&self) -> &Lists {
        &self.lists
    }

    pub fn list_add(
        &mut self,
        now: Millis,
        list: ListKind,
        net: IpNet,
        comment: &str,
        source: &str,
    ) -> ListEntry {
        let net = net.trunc();
        let entry = ListEntry {
            comment: clip(comment),
            added_at: now,
            source: source.to_string(),
        };
        self.lists.add(list, net, entry.clone());
        if list == ListKind::Whitelist {
            self.unblock_covered(net, UnblockReason::Whitelisted);
        }
        self.publish_policy();
        self.events.push(Event::ListAdded {
            list,
            net,
            entry: entry.clone(),
        });
        entry
    }

    pub fn list_remove(&mut self, list: ListKind, net: IpNet) -> bool {
        let net = net.trunc();
        let removed = self.lists.remove(list, net).is_some();
        if removed {
            self.publish_policy();
            self.events.push(Event::ListRemoved { list, net });
            if list == ListKind::Blacklist {
                // A source that was auto-blacklisted keeps a permanent table entry: drop it too.
                for b in self.table.remove_net(net) {
                    if b.expires_at.is_some() {
                        self.table.insert(b);
                    } else {
                        self.events.push(Event::Unblocked {
                            key: b.key,
                            kind: b.kind,
                            why: UnblockReason::Manual,
                        });
                    }
                }
            }
        }
        removed
    }

    // ---- state exchange ---------------------------------------------------------------------

    /// Take the queued state changes, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Load state saved earlier (at start) or learnt from another node, without queuing events
    /// for it again. Expired blocks are skipped; whitelisted ones too.
    pub fn restore(&mut self, now: Millis, ev: Event) {
        match ev {
            Event::Blocked(mut b) => {
                crate::blocks::evidence::bound(&mut b);
                if !b.is_expired(now)
                    && !self.lists.whitelist_covers(b.key.net)
                    && !self.is_upstream(b.key.net.addr())
                {
                    self.table.insert(b);
                }
            }
            Event::Unblocked { key, .. } => {
                self.table.remove(&key);
            }
            Event::ListAdded { list, net, entry } => {
                self.lists.add(list, net, entry);
                self.lists_dirty = true;
                if list == ListKind::Whitelist {
                    for b in self.table.remove_net(net) {
                        drop(b);
                    }
                }
            }
            Event::ListRemoved { list, net } => {
                self.lists.remove(list, net);
                self.lists_dirty = true;
            }
            Event::Strikes { net, strikes, last } => {
                let s = self.strikes.get_or_insert_mut(net, Strike::default);
                if last >= s.last {
                    *s = Strike {
                        count: strikes,
                        last,
                    };
                }
            }
            Event::Alert { .. } => {}
        }
    }

    /// The strike memory, for persistence snapshots.
    pub fn strikes(&self) -> impl Iterator<Item = (IpNet, u32, Millis)> + '_ {
        self.strikes.iter().map(|(n, s)| (*n, s.count, s.last))
    }

    /// Entries held by the detectors (for the memory-bound soak and metrics).
    pub fn tracked(&self) -> usize {
        self.flood.len()
            + self.invites.tracked()
            + self.auth.tracked()
            + self.anomalies.len()
            + self.options.len()
            + self.strikes.len()
            + self.devices.len()
            + self.fraud.tracked()
            + self.watched.len()
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
