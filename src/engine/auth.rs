//! Authentication outcomes learnt from the PBX's answers to every method it challenges or
//! rejects (REGISTER, INVITE, MESSAGE, INFO, PUBLISH, NOTIFY, REFER, SUBSCRIBE, BYE, ...):
//! password brute force counted per attempt, NAT-aware blocking, extension enumeration,
//! password guessing across accounts, and one account attacked from many sources.
//!
//! One answer goes through four steps: [`classify`] (what the status means), de-duplication
//! (a retransmission is not a new attempt), counting, and [`decide`] (whether to block).
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;

use ipnet::IpNet;
use lru::LruCache;

use super::track::{nonzero, Distinct, Window};
use super::Detection;
use crate::blocks::{source_net, BlockKey, BlockType};
use crate::clock::Millis;
use crate::cluster_count::{Detector, SharedCounts};
use crate::config::Config;
use crate::util::hash64;

/// With good history at an address, its whole-address block still comes once failures reach
/// this many times `hit_count`: a device cycling through ports is not let off for ever.
pub const NAT_WHOLE_FACTOR: u32 = 10;
/// Evidence lines kept per tracked source.
const EVIDENCE: usize = 3;
/// A retransmitted request's answer within this long is not counted again (64*T1).
const RETRANSMIT_WINDOW: Millis = 32_000;

/// What the PBX said about one request, as the response router saw it.
pub struct Answer<'a> {
    pub phone: SocketAddr,
    /// The CSeq method (the request's method).
    pub method: &'a [u8],
    pub code: u16,
    /// The To user: the extension a request was for (what an enumerator varies).
    pub user: &'a [u8],
    /// The account whose password was tried: the To user of a REGISTER, the From user of
    /// any other request (a MESSAGE or INVITE authenticates as its sender, not its target).
    pub account: &'a [u8],
    /// A fingerprint of the request's Authorization / Proxy-Authorization value, when it
    /// carried credentials.
    pub attempt: Option<u64>,
    pub call_id: &'a [u8],
    pub cseq: u32,
    pub evidence: String,
}

impl Answer<'_> {
    fn had_credentials(&self) -> bool {
        self.attempt.is_some()
    }
}

/// What one final answer means for authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx to REGISTER: a device at this source holds valid credentials (good history).
    Registered,
    /// 401/407 to a request without credentials: the normal first step, not a failure.
    Challenged,
    /// 404: for REGISTER a failure (the account does not exist); for other methods only
    /// enumeration evidence, since a call to a number that does not exist is no password guess.
    NoSuchUser,
    /// 403, or 401/407 to a request that already carried credentials.
    Failed,
}

/// Does an answer to this method say anything about authentication? Everything the PBX can
/// challenge does; ACK gets no answer and CANCEL is never challenged (RFC 3261 §22.1).
pub fn counted_method(method: &[u8]) -> bool {
    !method.is_empty() && method != b"ACK" && method != b"CANCEL"
}

/// Step 1: what a final status means (None: nothing to learn).
pub fn classify(method: &[u8], code: u16, had_credentials: bool) -> Option<Outcome> {
    if !counted_method(method) {
        return None;
    }
    match code {
        200..=299 if method == b"REGISTER" => Some(Outcome::Registered),
        401 | 407 if had_credentials => Some(Outcome::Failed),
        401 | 407 => Some(Outcome::Challenged),
        403 => Some(Outcome::Failed),
        404 => Some(Outcome::NoSuchUser),
        _ => None,
    }
}

#[derive(Debug, Default)]
struct SourceAuth {
    fails: Window,
    users_failed: Distinct<32>,
    users_challenged: Distinct<32>,
    creds_at: Millis,
    good_at: Millis,
    evidence: Vec<String>,
}

#[derive(Debug, Default)]
struct Account {
    sources: Distinct<32>,
    protected_until: Millis,
}

/// Accounts under attack from many sources: the one detector state that is not per source,
/// so it is not in a source's shard but shared, behind its own lock. That lock is taken for a
/// password failure (an attack, not a call) and, while some account is protected, for a
/// REGISTER; the packets of a normal call never touch it.
pub struct AccountWatch {
    accounts: parking_lot::Mutex<LruCache<u64, Account>>,
    /// The latest `protected_until` of any account: while `now` is past it no account is
    /// protected and [`AccountWatch::is_protected`] answers without the lock.
    protected_until: std::sync::atomic::AtomicU64,
}

impl AccountWatch {
    pub fn new(cap: usize) -> Self {
        Self {
            accounts: parking_lot::Mutex::new(LruCache::new(nonzero(cap))),
            protected_until: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn resize(&self, cap: usize) {
        self.accounts.lock().resize(nonzero(cap));
    }

    pub fn tracked(&self) -> usize {
        self.accounts.lock().len()
    }

    /// Is `user` an account under attack right now?
    pub fn is_protected(&self, now: Millis, user: &[u8]) -> bool {
        use std::sync::atomic::Ordering;
        if self.protected_until.load(Ordering::Relaxed) <= now {
            return false;
        }
        self.accounts
            .lock()
            .peek(&hash64(&[user]))
            .is_some_and(|a| a.protected_until > now)
    }

    /// A password failure for `account` from `net`. Returns an alert when the account has
    /// just come under attack from many sources (and is now protected).
    pub fn failed(
        &self,
        now: Millis,
        patterns: &crate::config::Patterns,
        account: &[u8],
        net: IpNet,
    ) -> Option<String> {
        let pperiod = patterns.monit_period.as_millis() as Millis;
        let mut map = self.accounts.lock();
        let acct = map.get_or_insert_mut(hash64(&[account]), Account::default);
        let n_src = acct
            .sources
            .add(now, pperiod, hash64(&[net.to_string().as_bytes()]) as u32);
        if n_src < patterns.sources_per_account as usize || acct.protected_until > now {
            return None;
        }
        acct.protected_until = now.saturating_add(patterns.block_time.as_millis() as Millis);
        self.protected_until
            .fetch_max(acct.protected_until, std::sync::atomic::Ordering::Relaxed);
        Some(format!(
            "account {} attacked from {n_src} sources: only sources that registered it recently may try it for {}",
            crate::util::printable(account, 64),
            humantime::format_duration(patterns.block_time)
        ))
    }
}

/// Step 3's result: the counters one answer moved, for [`decide`].
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// The source has a device that registered within `register.good_history`.
    pub good: bool,
    /// Distinct users rejected or challenged-and-silent (0 when the answer was no such case).
    pub enumerated: usize,
    /// Whether the answer is a password failure (Failed, or NoSuchUser for REGISTER).
    pub failure: bool,
    /// Failures from the source, from its (address, port), for its (source, user), and
    /// distinct accounts failing with credentials.
    pub n_ip: u32,
    pub n_port: u32,
    pub n_user: u32,
    pub n_accounts: usize,
    pub evidence: Vec<String>,
}

pub struct AuthTracker {
    sources: LruCache<IpNet, SourceAuth>,
    ports: LruCache<(IpNet, u16), Window>,
    users: LruCache<u64, Window>,
    good_users: LruCache<u64, Millis>,
    /// Answers seen within [`RETRANSMIT_WINDOW`], by a keyed hash of what makes an attempt
    /// (see [`AuthTracker::first_sight`]). Bounded like every other map here; the key is
    /// secret so an attacker cannot craft a new guess that collides with an old one.
    seen: LruCache<u64, Millis>,
    seen_key: RandomState,
    /// Failures per source counted cluster-wide (a no-op on a single node).
    shared: SharedCounts,
}

impl AuthTracker {
    pub fn new(cap: usize) -> Self {
        let n = nonzero(cap);
        Self {
            sources: LruCache::new(n),
            ports: LruCache::new(n),
            users: LruCache::new(n),
            good_users: LruCache::new(n),
            seen: LruCache::new(n),
            seen_key: RandomState::new(),
            shared: SharedCounts::disabled(),
        }
    }

    /// Count failures per source across the cluster through `shared`.
    pub fn set_shared(&mut self, shared: SharedCounts) {
        self.shared = shared;
    }

    pub fn resize(&mut self, cap: usize) {
        let n = nonzero(cap);
        self.sources.resize(n);
        self.ports.resize(n);
        self.users.resize(n);
        self.good_users.resize(n);
        self.seen.resize(n);
    }

    pub fn tracked(&self) -> usize {
        self.sources.len() + self.ports.len() + self.users.len()
    }

    /// A request carrying credentials: this source answers challenges, as phones do and
    /// enumerators do not.
    pub fn saw_credentials(&mut self, now: Millis, net: IpNet) {
        self.sources
            .get_or_insert_mut(net, SourceAuth::default)
            .creds_at = now;
    }

    /// A request from `net` when the cluster's failures for it have reached `hit_count`
    /// without this node seeing the last of them (they came through other nodes): the block
    /// the next answer here would make, made before the request reaches the PBX. None on a
    /// single node, and for sources with good history (their blocks need the port of an
    /// answer, see [`decide`]).
    pub fn cluster_block(&mut self, now: Millis, cfg: &Config, net: IpNet) -> Option<Detection> {
        if !self.shared.is_enabled() {
            return None;
        }
        let reg = &cfg.register;
        let remote = self.shared.remote(now, Detector::Auth, net);
        if remote == 0 {
            return None;
        }
        let period = reg.monit_period.as_millis() as Millis;
        let good_window = reg.good_history.as_millis() as Millis;
        let (local, good, evidence) = self.sources.peek(&net).map_or((0, false, Vec::new()), |s| {
            (
                s.fails.estimate(now, period),
                s.good_at > 0 && now.saturating_sub(s.good_at) < good_window,
                s.evidence.clone(),
            )
        });
        let n = local.saturating_add(remote);
        if good || n < reg.hit_count {
            return None;
        }
        Some(Detection {
            key: BlockKey::whole(net),
            kind: BlockType::Register,
            reason: format!(
                "{n} failed authentications within {} across the cluster ({local} here)",
                humantime::format_duration(reg.monit_period)
            ),
            duration: reg.block_time,
            evidence,
        })
    }

    /// Is `user` under attack (per `accounts`), and has this source no recent success for it?
    pub fn refuse(
        &mut self,
        now: Millis,
        net: IpNet,
        user: &[u8],
        accounts: &AccountWatch,
    ) -> bool {
        accounts.is_protected(now, user) && self.good_users.peek(&pair(net, user)).is_none()
    }

    /// Learn from a final response of the PBX. Returns a block to make, and an alert.
    pub fn on_answer(
        &mut self,
        now: Millis,
        cfg: &Config,
        a: &Answer<'_>,
        accounts: &AccountWatch,
    ) -> (Option<Detection>, Option<String>) {
        let Some(outcome) = classify(a.method, a.code, a.had_credentials()) else {
            return (None, None);
        };
        let net = source_net(a.phone.ip(), cfg.protection.ipv6_prefix);
        if outcome == Outcome::Registered {
            self.sources
                .get_or_insert_mut(net, SourceAuth::default)
                .good_at = now;
            self.good_users.put(pair(net, a.user), now);
            return (None, None);
        }
        if !self.first_sight(now, a) {
            return (None, None);
        }
        let (counts, alert) = self.count(now, cfg, net, a, outcome, accounts);
        (decide(cfg, net, a, &counts), alert)
    }

    /// Step 2: is this answer news, or the answer to a retransmission? A request with
    /// credentials is one attempt per distinct credentials value: a new password guess counts
    /// even when the Call-ID and CSeq stay the same, a retransmission (the identical
    /// Authorization) does not. Without credentials the transaction identity decides; the user
    /// and method are part of it so an enumerator cannot hide behind one Call-ID/CSeq.
    fn first_sight(&mut self, now: Millis, a: &Answer<'_>) -> bool {
        let mut h = self.seen_key.build_hasher();
        a.phone.hash(&mut h);
        a.code.hash(&mut h);
        a.method.hash(&mut h);
        match a.attempt {
            Some(fp) => {
                b'A'.hash(&mut h);
                fp.hash(&mut h);
            }
            None => {
                b'T'.hash(&mut h);
                a.call_id.hash(&mut h);
                a.cseq.hash(&mut h);
                a.user.hash(&mut h);
            }
        }
        let id = h.finish();
        if self
            .seen
            .get(&id)
            .is_some_and(|t| now.saturating_sub(*t) < RETRANSMIT_WINDOW)
        {
            return false;
        }
        self.seen.put(id, now);
        true
    }

    /// Step 3: move the counters this answer concerns. Returns them, and an alert when an
    /// account has just come under attack from many sources.
    fn count(
        &mut self,
        now: Millis,
        cfg: &Config,
        net: IpNet,
        a: &Answer<'_>,
        outcome: Outcome,
        accounts: &AccountWatch,
    ) -> (Counts, Option<String>) {
        let patterns = &cfg.patterns;
        let reg = &cfg.register;
        let pperiod = patterns.monit_period.as_millis() as Millis;
        let rperiod = reg.monit_period.as_millis() as Millis;
        let good_window = reg.good_history.as_millis() as Millis;
        let creds = a.had_credentials();
        let user_fp = hash64(&[a.user]) as u32;
        let account_fp = hash64(&[a.account]) as u32;
        let s = self.sources.get_or_insert_mut(net, SourceAuth::default);
        if s.evidence.len() >= EVIDENCE {
            s.evidence.remove(0);
        }
        s.evidence.push(a.evidence.clone());
        let mut c = Counts {
            good: s.good_at > 0 && now.saturating_sub(s.good_at) < good_window,
            evidence: s.evidence.clone(),
            ..Counts::default()
        };
        let answers_challenges = s.creds_at > 0 && now.saturating_sub(s.creds_at) < pperiod;

        // Extension enumeration: many distinct users rejected, or challenged without the
        // source ever answering a challenge.
        let challenged = outcome == Outcome::Challenged;
        if outcome == Outcome::NoSuchUser
            || (a.code == 403 && !creds)
            || (challenged && !answers_challenges)
        {
            let counter = if challenged {
                &mut s.users_challenged
            } else {
                &mut s.users_failed
            };
            c.enumerated = counter.add(now, pperiod, user_fp);
        }
        c.failure = outcome == Outcome::Failed
            || (outcome == Outcome::NoSuchUser && a.method == b"REGISTER");
        if !c.failure {
            return (c, None);
        }

        // The whole-address count is cluster-wide: this node's failures plus what the other
        // nodes reported for the source (0 on a single node).
        self.shared.record(Detector::Auth, net, 1);
        c.n_ip = s
            .fails
            .add(now, rperiod, 1)
            .saturating_add(self.shared.remote(now, Detector::Auth, net));
        if creds {
            c.n_accounts = s.users_failed.add(now, pperiod, account_fp);
        }
        c.n_port = self
            .ports
            .get_or_insert_mut((net, a.phone.port()), Window::default)
            .add(now, rperiod, 1);
        c.n_user = self
            .users
            .get_or_insert_mut(pair(net, a.account), Window::default)
            .add(now, rperiod, 1);

        let alert = accounts.failed(now, patterns, a.account, net);
        (c, alert)
    }

    /// Forget a source's counters (after it was blocked, or unblocked by an operator).
    pub fn reset(&mut self, net: IpNet) {
        if let Some(s) = self.sources.get_mut(&net) {
            s.fails = Window::default();
            s.users_failed = Distinct::default();
            s.users_challenged = Distinct::default();
            s.evidence.clear();
        }
        self.shared.forget(Detector::Auth, net);
    }

    pub fn reset_port(&mut self, net: IpNet, port: u16) {
        self.ports.pop(&(net, port));
    }
}

/// The block type for failures on `method`: REGISTER for REGISTER; INVITE for every other
/// method, since the attack it stands for is the same (guessing a password to place calls
/// or send messages as someone), and the reason text names the method.
pub fn block_type_for(method: &[u8]) -> BlockType {
    if method == b"REGISTER" {
        BlockType::Register
    } else {
        BlockType::Invite
    }
}

/// Step 4: whether the counters call for a block, of what and why.
pub fn decide(cfg: &Config, net: IpNet, a: &Answer<'_>, c: &Counts) -> Option<Detection> {
    let patterns = &cfg.patterns;
    let reg = &cfg.register;
    let port_key = BlockKey::with_port(net, a.phone.port());
    let nat_key = if c.good {
        port_key
    } else {
        BlockKey::whole(net)
    };
    let detection = |key, kind, reason, duration| Detection {
        key,
        kind,
        reason,
        duration,
        evidence: c.evidence.clone(),
    };
    if c.enumerated >= patterns.enumeration_users as usize {
        return Some(detection(
            nat_key,
            BlockType::Scan,
            format!(
                "extension enumeration: {} distinct users rejected within {}",
                c.enumerated,
                humantime::format_duration(patterns.monit_period)
            ),
            patterns.block_time,
        ));
    }
    if !c.failure {
        return None;
    }
    // Failures without credentials across several users are enumeration, not guessing.
    let enumerating = !a.had_credentials() && c.enumerated >= 3;
    let kind = if enumerating {
        BlockType::Scan
    } else {
        block_type_for(a.method)
    };
    let what = crate::util::printable(a.method, 16);
    let hit = reg.hit_count;
    let period = humantime::format_duration(reg.monit_period);
    let n_accounts = c.n_accounts;
    if n_accounts >= patterns.accounts_per_source as usize {
        return Some(detection(
            nat_key,
            kind,
            format!("password guessing ({what}) across {n_accounts} accounts within {period}"),
            reg.block_time,
        ));
    }
    if c.good {
        if c.n_port >= hit || c.n_user >= hit {
            return Some(detection(
                port_key,
                kind,
                format!(
                    "{} failed {what} for user {} from port {} within {period}; other devices at this address authenticated recently, so only this port is blocked",
                    c.n_port.max(c.n_user),
                    crate::util::printable(a.account, 64),
                    a.phone.port()
                ),
                reg.block_time,
            ));
        }
        if c.n_ip >= hit.saturating_mul(NAT_WHOLE_FACTOR) {
            return Some(detection(
                BlockKey::whole(net),
                kind,
                format!("{} failed {what} within {period} from an address with good devices (over {NAT_WHOLE_FACTOR}x hit_count)", c.n_ip),
                reg.block_time,
            ));
        }
        return None;
    }
    if c.n_ip < hit {
        return None;
    }
    let reason = if enumerating {
        format!(
            "extension enumeration: {} {what} for {} distinct users rejected within {period}",
            c.n_ip, c.enumerated
        )
    } else {
        format!("{} failed {what} within {period}", c.n_ip)
    };
    Some(detection(
        BlockKey::whole(net),
        kind,
        reason,
        reg.block_time,
    ))
}

fn pair(net: IpNet, user: &[u8]) -> u64 {
    hash64(&[net.to_string().as_bytes(), user])
}

#[cfg(test)]
mod tests;
