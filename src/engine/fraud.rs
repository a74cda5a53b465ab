//! Toll-fraud guard, sans-I/O: per account (or source) and destination prefix group, counts call
//! attempts per minute/hour/day, concurrent calls, the same number in a row and distinct numbers,
//! and decides before the call whether the next INVITE passes.
//!
//! Counters cannot drift: a call is counted exactly when its record enters `calls` and uncounted
//! exactly when the record leaves it ([`FraudGuard::end`] is the only way out: BYE answered,
//! BYE from the PBX, final >= 300 (CANCEL ends in 487), setup timeout (408/lost), no ACK,
//! `call_timeout`, eviction). Each counter carries a generation: a call only uncounts the
//! generation it counted, so a counter evicted and re-created is never decremented by calls of
//! its predecessor (no underflow, no leak).
//!
//! Memory: `max_calls` call records (~120 bytes each plus one slot per matching rule) and
//! `max_subjects` counters, each holding at most `calls_per_minute + 1` timestamps (8 bytes),
//! `distinct_numbers + 1` numbers (16 bytes) and 84 minute/hour buckets (16 bytes): about 1.7 KB
//! with the default rules. Numbers and accounts are clipped to 32 and 64 bytes.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

pub mod dialog;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;

use ipnet::IpNet;
use lru::LruCache;
use serde::{Deserialize, Serialize};

use super::track::nonzero;
use crate::clock::Millis;
use crate::config::{Fraud, FraudAction, FraudPer, FraudRule, MaxDurationAction};
use dialog::Dialog;

/// Time a 2xx may wait for its ACK (64*T1, RFC 3261 Timer H) and a BYE for its answer.
pub const ACK_WAIT: Millis = 32_000;
/// Counters idle this long (no call, none up, not blocked) are dropped: longer than the day window.
pub const IDLE_EVICT: Millis = 25 * 3_600_000;
const MINUTE: Millis = 60_000;
const HOUR: Millis = 3_600_000;
const MAX_NUMBER: usize = 32;
const MAX_ACCOUNT: usize = 64;
/// Rows `report` returns and destinations remembered for "top destinations".
const REPORT_ROWS: usize = 200;
const TOP_DESTINATIONS: usize = 1000;

/// What a limit measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    CallsPerMinute,
    CallsPerHour,
    CallsPerDay,
    Concurrent,
    SameNumber,
    DistinctNumbers,
    MaxDuration,
    /// The account or source is blocked by an earlier `action = "block"`.
    Blocked,
}

impl Metric {
    pub const ALL: [Metric; 8] = [
        Metric::CallsPerMinute,
        Metric::CallsPerHour,
        Metric::CallsPerDay,
        Metric::Concurrent,
        Metric::SameNumber,
        Metric::DistinctNumbers,
        Metric::MaxDuration,
        Metric::Blocked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Metric::CallsPerMinute => "calls_per_minute",
            Metric::CallsPerHour => "calls_per_hour",
            Metric::CallsPerDay => "calls_per_day",
            Metric::Concurrent => "concurrent",
            Metric::SameNumber => "same_number",
            Metric::DistinctNumbers => "distinct_numbers",
            Metric::MaxDuration => "max_duration",
            Metric::Blocked => "blocked",
        }
    }

    /// The reason phrase of the rejection (the phone and any PBX log shows it).
    pub fn reason(self, code: u16) -> &'static str {
        match (code, self) {
            (503, _) => "Service Unavailable (toll-fraud limit)",
            (_, Metric::CallsPerMinute) => "Forbidden (toll-fraud limit: calls per minute)",
            (_, Metric::CallsPerHour) => "Forbidden (toll-fraud limit: calls per hour)",
            (_, Metric::CallsPerDay) => "Forbidden (toll-fraud limit: calls per day)",
            (_, Metric::Concurrent) => "Forbidden (toll-fraud limit: concurrent calls)",
            (_, Metric::SameNumber) => "Forbidden (toll-fraud limit: same number)",
            (_, Metric::DistinctNumbers) => "Forbidden (toll-fraud limit: distinct numbers)",
            (_, Metric::MaxDuration) => "Forbidden (toll-fraud limit: duration)",
            (_, Metric::Blocked) => "Forbidden (toll-fraud block)",
        }
    }
}

/// What the guard did since start, for `/metrics` (counters: they only go up).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    /// INVITEs refused (a retransmission is refused again), by the limit that refused them
    /// (index: position in [`Metric::ALL`]).
    pub rejected: [u64; 8],
    /// `action = "block"` taken on an account and on a source.
    pub blocked_accounts: u64,
    pub blocked_sources: u64,
    /// Warnings and critical findings that only alerted (observe mode, `action = "alert"`,
    /// max duration).
    pub warnings: u64,
    pub critical_alerts: u64,
    /// Calls ended by sipwarden at their max duration.
    pub ended: u64,
}

impl Counts {
    fn metric(m: Metric) -> usize {
        Metric::ALL.iter().position(|x| *x == m).unwrap_or(0)
    }

    fn decision(&mut self, d: &Decision) {
        if let Some(f) = &d.reject {
            if let Some(c) = self.rejected.get_mut(Self::metric(f.metric)) {
                *c += 1;
            }
            if f.action == FraudAction::Block && f.metric != Metric::Blocked {
                match f.who {
                    Who::Account(_) => self.blocked_accounts += 1,
                    Who::Source(_) => self.blocked_sources += 1,
                }
            }
        }
        for f in &d.alerts {
            if f.critical {
                self.critical_alerts += 1;
            } else {
                self.warnings += 1;
            }
        }
    }
}

/// Who a rule counts.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Who {
    Account(Box<str>),
    Source(IpNet),
}

impl std::fmt::Display for Who {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Who::Account(a) => f.write_str(a),
            Who::Source(n) => write!(f, "{n}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct SubjectKey {
    rule: u16,
    who: Who,
}

/// A threshold reached: a warning, or critical (`value > limit`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub rule: usize,
    pub group: String,
    pub who: Who,
    pub metric: Metric,
    pub value: u64,
    pub limit: u64,
    pub critical: bool,
    pub action: FraudAction,
    pub number: String,
}

impl Finding {
    pub fn describe(&self) -> String {
        let ended = if self.metric == Metric::MaxDuration && self.action == FraudAction::Block {
            ", call ended by sipwarden"
        } else {
            ""
        };
        format!(
            "{} {} {} (group {}): {} {} of {} calling {}{ended}",
            if self.critical { "critical" } else { "warning" },
            match self.who {
                Who::Account(_) => "account",
                Who::Source(_) => "source",
            },
            self.who,
            if self.group.is_empty() {
                "any"
            } else {
                &self.group
            },
            self.metric.as_str(),
            self.value,
            self.limit,
            self.number,
        )
    }
}

/// The guard's answer to an INVITE.
#[derive(Debug, Default)]
pub struct Decision {
    /// Reject the call: the first critical finding with action reject or block.
    pub reject: Option<Finding>,
    /// Block this source (a per-source rule with action block).
    pub block_source: Option<Finding>,
    /// Warnings and critical findings of alert rules (and, in observe mode, everything).
    pub alerts: Vec<Finding>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Phase {
    Setup,
    Answered(Millis),
    Confirmed(Millis),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Slot {
    key: SubjectKey,
    gen: u64,
    /// This call extended the same-number run (undone on a refund).
    ran: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Call {
    started: Millis,
    phase: Phase,
    bye_at: Option<Millis>,
    number: u64,
    max_duration: Millis,
    duration_alerted: bool,
    slots: Vec<Slot>,
    /// What a BYE needs, with `on_max_duration = "bye"` and a max-duration rule (not persisted:
    /// a call restored after a restart is alerted, not ended).
    #[serde(skip)]
    dialog: Option<Box<Dialog>>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counters {
    gen: u64,
    concurrent: u32,
    recent: VecDeque<Millis>,
    minutes: VecDeque<(u64, u32)>,
    hours: VecDeque<(u64, u32)>,
    last_number: u64,
    run: u32,
    distinct: VecDeque<(u64, Millis)>,
    warned: u8,
    warned_at: Millis,
    blocked_until: Millis,
    last_seen: Millis,
}

fn bucket_add(b: &mut VecDeque<(u64, u32)>, idx: u64, span: u64) {
    match b.back_mut() {
        Some(last) if last.0 == idx => last.1 = last.1.saturating_add(1),
        _ => b.push_back((idx, 1)),
    }
    while b.front().is_some_and(|f| f.0 + span <= idx) {
        b.pop_front();
    }
}

fn bucket_sum(b: &VecDeque<(u64, u32)>, idx: u64, span: u64) -> u64 {
    b.iter()
        .filter(|e| e.0 + span > idx)
        .map(|e| u64::from(e.1))
        .sum()
}

fn bucket_sub(b: &mut VecDeque<(u64, u32)>, idx: u64) {
    if let Some(e) = b.iter_mut().find(|e| e.0 == idx) {
        e.1 = e.1.saturating_sub(1);
    }
}

impl Counters {
    fn values(&self, now: Millis, number: u64, window: Millis) -> [(Metric, u64); 6] {
        let minute = now / MINUTE;
        let hour = now / HOUR;
        let recent = self
            .recent
            .iter()
            .filter(|t| now.saturating_sub(**t) < MINUTE)
            .count() as u64;
        let distinct = self
            .distinct
            .iter()
            .filter(|(n, t)| *n != number && now.saturating_sub(*t) < window)
            .count() as u64;
        let run = if self.last_number == number && self.run > 0 {
            u64::from(self.run) + 1
        } else {
            1
        };
        [
            (Metric::CallsPerMinute, recent + 1),
            (
                Metric::CallsPerHour,
                bucket_sum(&self.minutes, minute, 60) + 1,
            ),
            (Metric::CallsPerDay, bucket_sum(&self.hours, hour, 24) + 1),
            (Metric::Concurrent, u64::from(self.concurrent) + 1),
            (Metric::SameNumber, run),
            (Metric::DistinctNumbers, distinct + 1),
        ]
    }

    fn count(&mut self, now: Millis, number: u64, rule: &FraudRule) -> bool {
        self.recent.push_back(now);
        while self.recent.len() > rule.calls_per_minute as usize + 1
            || self
                .recent
                .front()
                .is_some_and(|t| now.saturating_sub(*t) >= MINUTE)
        {
            self.recent.pop_front();
        }
        bucket_add(&mut self.minutes, now / MINUTE, 60);
        bucket_add(&mut self.hours, now / HOUR, 24);
        let ran = self.last_number == number && self.run > 0;
        self.run = if ran { self.run.saturating_add(1) } else { 1 };
        self.last_number = number;
        let window = rule.distinct_window.as_millis() as Millis;
        if rule.distinct_numbers > 0 {
            self.distinct
                .retain(|(n, t)| *n != number && now.saturating_sub(*t) < window);
            self.distinct.push_back((number, now));
            while self.distinct.len() > rule.distinct_numbers as usize + 1 {
                self.distinct.pop_front();
            }
        }
        self.concurrent = self.concurrent.saturating_add(1);
        self.last_seen = now;
        ran
    }

    /// Undo the rate counts of a call that did not happen (challenged for credentials).
    fn refund(&mut self, started: Millis, number: u64, ran: bool) {
        if let Some(i) = self.recent.iter().position(|t| *t == started) {
            self.recent.remove(i);
        }
        bucket_sub(&mut self.minutes, started / MINUTE);
        bucket_sub(&mut self.hours, started / HOUR);
        if self.last_number == number {
            self.run = if ran { self.run.saturating_sub(1) } else { 0 };
        }
    }
}

fn limit_of(rule: &FraudRule, m: Metric) -> u32 {
    match m {
        Metric::CallsPerMinute => rule.calls_per_minute,
        Metric::CallsPerHour => rule.calls_per_hour,
        Metric::CallsPerDay => rule.calls_per_day,
        Metric::Concurrent => rule.concurrent,
        Metric::SameNumber => rule.same_number,
        Metric::DistinctNumbers => rule.distinct_numbers,
        Metric::MaxDuration | Metric::Blocked => 0,
    }
}

fn metric_bit(m: Metric) -> u8 {
    1 << (m as u8 & 7)
}

/// Hours of the day as a 24-bit mask: "" (all), "8-18" (08:00 to 17:59), "22-6" (wraps), "9".
pub fn parse_hours(s: &str) -> Result<u32, String> {
    let s = s.trim();
    if s.is_empty() {
        return Ok((1 << 24) - 1);
    }
    let num = |t: &str| t.trim().parse::<u32>().ok().filter(|h| *h <= 24);
    let (a, b) = match s.split_once('-') {
        Some((a, b)) => (num(a), num(b)),
        None => (num(s), num(s).map(|h| h + 1)),
    };
    let (Some(a), Some(b)) = (a, b) else {
        return Err(format!(
            "{s:?}: expected \"H-H\" with hours 0..=24, e.g. \"8-18\""
        ));
    };
    let (a, b) = (a % 24, if b == 24 { 24 } else { b % 24 });
    let mut mask = 0u32;
    let mut h = a;
    loop {
        mask |= 1 << h;
        h = (h + 1) % 24;
        if h == b % 24 {
            break;
        }
    }
    Ok(mask)
}

const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Days of the week as a 7-bit mask (bit 0 Monday): "" (all), "mon-fri", "sat,sun".
pub fn parse_days(s: &str) -> Result<u8, String> {
    let s = s.trim().to_ascii_lowercase();
    if s.is_empty() {
        return Ok(0x7f);
    }
    let day = |t: &str| DAYS.iter().position(|d| *d == t.trim());
    let mut mask = 0u8;
    for part in s.split(',') {
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (day(a), day(b)),
            None => (day(part), day(part)),
        };
        let (Some(a), Some(b)) = (a, b) else {
            return Err(format!(
                "{part:?}: expected days like \"mon-fri\" or \"sat,sun\""
            ));
        };
        let mut d = a;
        loop {
            mask |= 1 << d;
            if d == b {
                break;
            }
            d = (d + 1) % 7;
        }
    }
    Ok(mask)
}

/// The dialled number: digits and a leading '+' of a Request-URI user part, clipped.
pub fn normalize_number(user: &[u8]) -> String {
    let mut out = String::new();
    for (i, b) in user.iter().enumerate() {
        if out.len() >= MAX_NUMBER || *b == b';' {
            break;
        }
        if b.is_ascii_digit() || (i == 0 && *b == b'+') {
            out.push(char::from(*b));
        }
    }
    out
}

/// An account name fit for keys and logs (printable, clipped).
pub fn clip_account(user: &[u8]) -> Box<str> {
    crate::util::printable(user, MAX_ACCOUNT).into()
}

struct Compiled {
    rule: FraudRule,
    hours: u32,
    days: u8,
}

/// A row of [`FraudGuard::report`]: one account or source near or over a limit.
#[derive(Debug, Clone, Serialize)]
pub struct SubjectRow {
    pub rule: usize,
    pub group: String,
    pub per: FraudPer,
    pub subject: String,
    pub concurrent: u32,
    pub calls_minute: u64,
    pub calls_hour: u64,
    pub calls_day: u64,
    pub same_number_run: u32,
    pub distinct_numbers: u64,
    /// The highest value/limit over the rule's limits.
    pub ratio: f64,
    pub blocked_for_secs: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub enabled: bool,
    pub active_calls: usize,
    /// Sum of every counter's concurrent calls (0 when no call is up).
    pub concurrent_total: u64,
    pub subjects: usize,
    pub rows: Vec<SubjectRow>,
    pub top_destinations: Vec<(String, u32)>,
}

/// The guard's durable state, for the state store.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    key: [u8; 16],
    next_gen: u64,
    calls: Vec<(u64, Call)>,
    subjects: Vec<(SubjectKey, Counters)>,
}

pub struct FraudGuard {
    cfg: Fraud,
    rules: Vec<Compiled>,
    key: [u8; 16],
    next_gen: u64,
    calls: LruCache<u64, Call>,
    subjects: LruCache<SubjectKey, Counters>,
    top: LruCache<Box<str>, u32>,
    /// Calls ended at their max duration whose BYEs are still to be sent; drained by the node
    /// every tick, and never more than `max_calls` (each one left the call table).
    byes: Vec<Dialog>,
    counts: Counts,
}

impl FraudGuard {
    /// `key` keys the Call-ID hash (so an attacker cannot aim collisions at another call).
    pub fn new(cfg: &Fraud, key: [u8; 16]) -> Self {
        let mut g = Self {
            cfg: cfg.clone(),
            rules: Vec::new(),
            key,
            next_gen: 1,
            calls: LruCache::new(nonzero(cfg.max_calls)),
            subjects: LruCache::new(nonzero(cfg.max_subjects)),
            top: LruCache::new(nonzero(TOP_DESTINATIONS)),
            byes: Vec::new(),
            counts: Counts::default(),
        };
        g.reconfigure(cfg);
        g
    }

    /// New rules apply to new calls; calls up keep the counters they were counted in. Counters of
    /// a rule whose definition changed restart (their generation no longer matches).
    pub fn reconfigure(&mut self, cfg: &Fraud) {
        let old: Vec<FraudRule> = self.rules.iter().map(|c| c.rule.clone()).collect();
        self.rules = cfg
            .rules
            .iter()
            .map(|r| Compiled {
                rule: r.clone(),
                hours: parse_hours(&r.hours).unwrap_or((1 << 24) - 1),
                days: parse_days(&r.days).unwrap_or(0x7f),
            })
            .collect();
        let changed = |i: u16| old.get(usize::from(i)) != cfg.rules.get(usize::from(i));
        let stale: Vec<SubjectKey> = self
            .subjects
            .iter()
            .filter(|(k, _)| changed(k.rule))
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            self.subjects.pop(&k);
        }
        self.calls.resize(nonzero(cfg.max_calls));
        self.subjects.resize(nonzero(cfg.max_subjects));
        self.cfg = cfg.clone();
    }

    pub fn enabled(&self) -> bool {
        self.cfg.enabled && !self.rules.is_empty()
    }

    fn call_key(&self, call_id: &[u8]) -> u64 {
        crate::util::keyed_hash64(&self.key, &[call_id])
    }

    fn number_key(&self, number: &str) -> u64 {
        crate::util::keyed_hash64(&self.key, &[number.as_bytes()])
    }

    fn groups_of(&self, number: &str) -> Vec<&str> {
        self.cfg
            .prefix_groups
            .iter()
            .filter(|(_, p)| p.iter().any(|p| number.starts_with(p.as_str())))
            .map(|(g, _)| g.as_str())
            .collect()
    }

    fn active(&self, c: &Compiled, now: Millis, groups: &[&str]) -> bool {
        let local = now as i64 / 60_000 + i64::from(self.cfg.utc_offset_minutes);
        let hour = local.div_euclid(60).rem_euclid(24) as u32;
        // 1970-01-01 was a Thursday (bit 3 with Monday = 0).
        let day = (local.div_euclid(1440) + 3).rem_euclid(7) as u8;
        (c.rule.group.is_empty() || groups.contains(&c.rule.group.as_str()))
            && c.hours & (1 << hour) != 0
            && c.days & (1 << day) != 0
    }

    /// An INVITE from a phone (out of dialog). `account`: the credentials' username, else the
    /// From user. `enforce`: false in observe mode (criticals become alerts, the call counts).
    pub fn on_invite(
        &mut self,
        now: Millis,
        source: IpNet,
        account: &[u8],
        dialled: &[u8],
        call_id: &[u8],
        enforce: bool,
    ) -> Decision {
        let d = self.decide(now, source, account, dialled, call_id, enforce);
        self.counts.decision(&d);
        d
    }

    fn decide(
        &mut self,
        now: Millis,
        source: IpNet,
        account: &[u8],
        dialled: &[u8],
        call_id: &[u8],
        enforce: bool,
    ) -> Decision {
        let mut d = Decision::default();
        if !self.enabled() {
            return d;
        }
        let ck = self.call_key(call_id);
        if self.calls.get(&ck).is_some() {
            return d; // a retransmission, or a second INVITE of a call already counted
        }
        let number = normalize_number(dialled);
        let nk = self.number_key(&number);
        let account = clip_account(account);
        let groups = self.groups_of(&number);
        let applicable: Vec<usize> = (0..self.rules.len())
            .filter(|i| {
                self.rules
                    .get(*i)
                    .is_some_and(|c| self.active(c, now, &groups))
            })
            .collect();
        let mut keys = Vec::with_capacity(applicable.len());
        for &i in &applicable {
            let Some(c) = self.rules.get(i) else { continue };
            let rule = &c.rule;
            let who = match rule.per {
                FraudPer::Account => Who::Account(account.clone()),
                FraudPer::Source => Who::Source(source),
            };
            let key = SubjectKey {
                rule: i as u16,
                who: who.clone(),
            };
            let finding = |metric, value, limit, critical| Finding {
                rule: i,
                group: rule.group.clone(),
                who: who.clone(),
                metric,
                value,
                limit,
                critical,
                action: rule.action,
                number: number.clone(),
            };
            let window = rule.distinct_window.as_millis() as Millis;
            let next_gen = &mut self.next_gen;
            let cn = self.subjects.get_or_insert_mut(key.clone(), || {
                *next_gen += 1;
                Counters {
                    gen: *next_gen,
                    ..Counters::default()
                }
            });
            {
                if cn.blocked_until > now {
                    d.reject.get_or_insert(finding(Metric::Blocked, 1, 0, true));
                    keys.push(key);
                    continue;
                }
                if now.saturating_sub(cn.warned_at) >= HOUR {
                    cn.warned = 0;
                }
                for (m, v) in cn.values(now, nk, window) {
                    let limit = u64::from(limit_of(rule, m));
                    if limit == 0 {
                        continue;
                    }
                    let warn = ((limit as f64) * rule.warn_at).ceil().max(1.0) as u64;
                    if v > limit {
                        let f = finding(m, v, limit, true);
                        if rule.action == FraudAction::Alert || !enforce {
                            d.alerts.push(f);
                        } else {
                            if rule.action == FraudAction::Block {
                                cn.blocked_until = now + self.cfg.block_time.as_millis() as Millis;
                                if rule.per == FraudPer::Source {
                                    d.block_source.get_or_insert(f.clone());
                                }
                            }
                            d.reject.get_or_insert(f);
                        }
                    } else if v >= warn && cn.warned & metric_bit(m) == 0 {
                        cn.warned |= metric_bit(m);
                        cn.warned_at = now;
                        d.alerts.push(finding(m, v, limit, false));
                    }
                }
            }
            keys.push(key);
        }
        if d.reject.is_some() {
            return d;
        }
        let mut slots = Vec::with_capacity(keys.len());
        let mut max_duration = 0;
        for (&i, key) in applicable.iter().zip(keys) {
            let Some(c) = self.rules.get(i) else { continue };
            let md = c.rule.max_duration.as_millis() as Millis;
            if md > 0 && (max_duration == 0 || md < max_duration) {
                max_duration = md;
            }
            if let Some(cn) = self.subjects.get_mut(&key) {
                let ran = cn.count(now, nk, &c.rule);
                slots.push(Slot {
                    gen: cn.gen,
                    key,
                    ran,
                });
            }
        }
        if slots.is_empty() {
            return d;
        }
        let top = self.top.get_or_insert_mut(number.into_boxed_str(), || 0);
        *top = top.saturating_add(1);
        let call = Call {
            started: now,
            phase: Phase::Setup,
            bye_at: None,
            number: nk,
            max_duration,
            duration_alerted: false,
            slots,
            dialog: None,
        };
        if let Some((k, old)) = self.calls.push(ck, call) {
            if k != ck {
                self.uncount(old, false);
            }
        }
        d
    }

    /// The only way a call leaves the table.
    fn end(&mut self, ck: u64, refund: bool) {
        if let Some(call) = self.calls.pop(&ck) {
            self.uncount(call, refund);
        }
    }

    fn uncount(&mut self, call: Call, refund: bool) {
        for s in call.slots {
            if let Some(cn) = self.subjects.peek_mut(&s.key) {
                if cn.gen == s.gen {
                    debug_assert!(cn.concurrent > 0, "fraud counter underflow");
                    cn.concurrent = cn.concurrent.saturating_sub(1);
                    if refund {
                        cn.refund(call.started, call.number, s.ran);
                    }
                }
            }
        }
    }

    /// A final response of the PBX to a phone's INVITE.
    pub fn on_invite_answer(&mut self, now: Millis, call_id: &[u8], code: u16) {
        let ck = self.call_key(call_id);
        match code {
            200..=299 => {
                if let Some(c) = self.calls.get_mut(&ck) {
                    if c.phase == Phase::Setup {
                        c.phase = Phase::Answered(now);
                    }
                }
            }
            // A challenge: the call did not happen; its retry with credentials counts instead.
            401 | 407 => self.end(ck, true),
            300.. => self.end(ck, false),
            _ => {}
        }
    }

    /// An ACK from the phone confirms an answered call.
    pub fn on_ack(&mut self, call_id: &[u8]) {
        let ck = self.call_key(call_id);
        if let Some(c) = self.calls.get_mut(&ck) {
            if let Phase::Answered(at) = c.phase {
                c.phase = Phase::Confirmed(at);
            }
        }
    }

    /// A BYE from the phone: the call ends when the PBX answers it (2xx, or 481: no such call);
    /// a phone cannot uncount a call with a BYE the PBX refuses.
    pub fn on_bye(&mut self, now: Millis, call_id: &[u8]) {
        let ck = self.call_key(call_id);
        if let Some(c) = self.calls.get_mut(&ck) {
            c.bye_at.get_or_insert(now);
        }
    }

    pub fn on_bye_answer(&mut self, call_id: &[u8], code: u16) {
        let ck = self.call_key(call_id);
        if (200..300).contains(&code) || code == 481 || code == 408 {
            self.end(ck, false);
        } else if let Some(c) = self.calls.get_mut(&ck) {
            c.bye_at = None;
        }
    }

    /// A BYE from the PBX (trusted) ends the call at once.
    pub fn on_upstream_bye(&mut self, call_id: &[u8]) {
        let ck = self.call_key(call_id);
        self.end(ck, false);
    }

    /// Timeouts and idle eviction; returns max-duration alerts. Call about once a second.
    pub fn tick(&mut self, now: Millis) -> Vec<Finding> {
        let setup = self.cfg.setup_timeout.as_millis() as Millis;
        let stale = self.cfg.call_timeout.as_millis() as Millis;
        let mut ended = Vec::new();
        let mut alerts = Vec::new();
        let mut byes = Vec::new();
        for (ck, c) in self.calls.iter_mut() {
            let age = now.saturating_sub(c.started);
            let over = match c.phase {
                Phase::Setup => age >= setup,
                Phase::Answered(at) => now.saturating_sub(at) >= ACK_WAIT,
                Phase::Confirmed(_) => false,
            } || age >= stale
                || c.bye_at.is_some_and(|t| now.saturating_sub(t) >= ACK_WAIT);
            if over {
                ended.push(*ck);
                continue;
            }
            if let Phase::Answered(at) | Phase::Confirmed(at) = c.phase {
                if c.max_duration > 0
                    && !c.duration_alerted
                    && now.saturating_sub(at) > c.max_duration
                {
                    c.duration_alerted = true;
                    let end = self.cfg.on_max_duration == MaxDurationAction::Bye
                        && c.dialog.as_ref().is_some_and(|d| d.caller.is_some());
                    if end {
                        if let Some(d) = c.dialog.take() {
                            byes.push(*d);
                        }
                        ended.push(*ck);
                    }
                    if let Some(s) = c.slots.first() {
                        let rule = usize::from(s.key.rule);
                        alerts.push(Finding {
                            rule,
                            group: self
                                .rules
                                .get(rule)
                                .map(|r| r.rule.group.clone())
                                .unwrap_or_default(),
                            who: s.key.who.clone(),
                            metric: Metric::MaxDuration,
                            value: now.saturating_sub(at) / 1000,
                            limit: c.max_duration / 1000,
                            critical: true,
                            action: if end {
                                FraudAction::Block
                            } else {
                                FraudAction::Alert
                            },
                            number: String::new(),
                        });
                    }
                }
            }
        }
        for ck in ended {
            self.end(ck, false);
        }
        self.counts.ended += byes.len() as u64;
        self.counts.critical_alerts += alerts.len() as u64;
        self.byes.extend(byes);
        let idle: Vec<SubjectKey> = self
            .subjects
            .iter()
            .filter(|(_, c)| {
                c.concurrent == 0
                    && c.blocked_until <= now
                    && now.saturating_sub(c.last_seen) >= IDLE_EVICT
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in idle {
            self.subjects.pop(&k);
        }
        alerts
    }

    /// The phone's INVITE was counted (`on_invite`): keep its Contact when the call may have to
    /// be ended at its max duration.
    pub fn note_invite(&mut self, msg: &crate::wire::Message<'_>) {
        if self.cfg.on_max_duration != MaxDurationAction::Bye {
            return;
        }
        let ck = self.call_key(msg.call_id());
        if let Some(c) = self.calls.peek_mut(&ck) {
            if c.max_duration > 0 && c.dialog.is_none() && c.phase == Phase::Setup {
                c.dialog = Dialog::from_invite(msg).map(Box::new);
            }
        }
    }

    /// The PBX's 2xx to a phone's INVITE, forwarded to `caller`: complete the call's dialog.
    pub fn note_answer(
        &mut self,
        msg: &crate::wire::Message<'_>,
        caller: (crate::stats::Transport, std::net::SocketAddr),
    ) {
        if !msg.status().is_some_and(|c| (200..300).contains(&c))
            || !matches!(msg.cseq(), Some((_, b"INVITE")))
        {
            return;
        }
        let ck = self.call_key(msg.call_id());
        if let Some(c) = self.calls.peek_mut(&ck) {
            if let Some(d) = c.dialog.as_mut() {
                if d.caller.is_none() && !d.learn_answer(msg, caller) {
                    c.dialog = None;
                }
            }
        }
    }

    pub fn counts(&self) -> &Counts {
        &self.counts
    }

    /// Calls ended at their max duration: the BYEs to send (each call once).
    pub fn take_byes(&mut self) -> Vec<Dialog> {
        std::mem::take(&mut self.byes)
    }

    /// Lift a block on an account (all its rules).
    pub fn unblock_account(&mut self, account: &str) -> bool {
        let mut any = false;
        for (k, c) in self.subjects.iter_mut() {
            if matches!(&k.who, Who::Account(a) if &**a == account) && c.blocked_until > 0 {
                c.blocked_until = 0;
                any = true;
            }
        }
        any
    }

    pub fn active_calls(&self) -> usize {
        self.calls.len()
    }

    pub fn concurrent_total(&self) -> u64 {
        self.subjects
            .iter()
            .map(|(_, c)| u64::from(c.concurrent))
            .sum()
    }

    pub fn subjects(&self) -> usize {
        self.subjects.len()
    }

    pub fn tracked(&self) -> usize {
        self.calls.len() + self.subjects.len()
    }

    /// Accounts and sources near or over a limit (ratio >= the rule's warn_at), with calls up
    /// or blocked; the most loaded first.
    pub fn report(&self, now: Millis) -> Report {
        let mut rows: Vec<SubjectRow> = self
            .subjects
            .iter()
            .filter_map(|(k, c)| {
                let rule = &self.rules.get(usize::from(k.rule))?.rule;
                let window = rule.distinct_window.as_millis() as Millis;
                let v = c.values(now, u64::MAX, window);
                // values() counts the next call: show the current counts.
                let cur = |m: Metric| {
                    v.iter()
                        .find(|(x, _)| *x == m)
                        .map_or(0, |(_, n)| n.saturating_sub(1))
                };
                let ratio = v
                    .iter()
                    .filter_map(|(m, _)| {
                        let l = limit_of(rule, *m);
                        let n = if *m == Metric::SameNumber {
                            u64::from(c.run)
                        } else {
                            cur(*m)
                        };
                        (l > 0).then(|| n as f64 / f64::from(l))
                    })
                    .fold(0.0, f64::max);
                let blocked = (c.blocked_until > now).then(|| (c.blocked_until - now) / 1000);
                let show = ratio >= rule.warn_at || c.concurrent > 0 || blocked.is_some();
                show.then(|| SubjectRow {
                    rule: usize::from(k.rule),
                    group: rule.group.clone(),
                    per: rule.per,
                    subject: k.who.to_string(),
                    concurrent: c.concurrent,
                    calls_minute: cur(Metric::CallsPerMinute),
                    calls_hour: cur(Metric::CallsPerHour),
                    calls_day: cur(Metric::CallsPerDay),
                    same_number_run: c.run,
                    distinct_numbers: cur(Metric::DistinctNumbers),
                    ratio,
                    blocked_for_secs: blocked,
                })
            })
            .collect();
        rows.sort_by(|a, b| b.ratio.total_cmp(&a.ratio));
        rows.truncate(REPORT_ROWS);
        let mut top: Vec<(String, u32)> =
            self.top.iter().map(|(n, c)| (n.to_string(), *c)).collect();
        top.sort_by_key(|e| std::cmp::Reverse(e.1));
        top.truncate(10);
        Report {
            enabled: self.enabled(),
            active_calls: self.calls.len(),
            concurrent_total: self.concurrent_total(),
            subjects: self.subjects.len(),
            rows,
            top_destinations: top,
        }
    }

    /// The state to persist: calls up and counters, least recently used first.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            key: self.key,
            next_gen: self.next_gen,
            calls: self
                .calls
                .iter()
                .rev()
                .map(|(k, c)| (*k, c.clone()))
                .collect(),
            subjects: self
                .subjects
                .iter()
                .rev()
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect(),
        }
    }

    /// Load a snapshot saved earlier (at start): the call table and counters as they were, so
    /// calls up at the restart still uncount when they end.
    pub fn restore(&mut self, snap: Snapshot) {
        self.key = snap.key;
        self.next_gen = self.next_gen.max(snap.next_gen);
        self.calls.clear();
        self.subjects.clear();
        for (k, c) in snap.subjects {
            if usize::from(k.rule) < self.rules.len() {
                self.subjects.push(k, c);
            }
        }
        for (k, c) in snap.calls {
            if let Some((ek, old)) = self.calls.push(k, c) {
                if ek != k {
                    self.uncount(old, false);
                }
            }
        }
    }
}

// ---- the engine's hooks ---------------------------------------------------------------------

/// The username of the request's Proxy-Authorization or Authorization (empty when absent).
pub fn credentials_user<'a>(msg: &crate::wire::Message<'a>) -> &'a [u8] {
    use crate::wire::HeaderName;
    let value = msg
        .value(HeaderName::ProxyAuthorization)
        .or_else(|| msg.value(HeaderName::Authorization))
        .unwrap_or(b"");
    auth_param(value, b"username")
}

/// One parameter of a Digest credentials value, unquoted (no escapes: usernames have none).
fn auth_param<'a>(value: &'a [u8], name: &[u8]) -> &'a [u8] {
    let mut rest = value;
    while let Some(at) = rest
        .windows(name.len())
        .position(|w| w.eq_ignore_ascii_case(name))
    {
        let before_ok = at == 0
            || rest
                .get(at - 1)
                .is_some_and(|b| matches!(b, b' ' | b',' | b'\t'));
        let after = rest.get(at + name.len()..).unwrap_or(b"");
        let after_trim = after.trim_ascii_start();
        if before_ok {
            if let Some(v) = after_trim.strip_prefix(b"=") {
                let v = v.trim_ascii_start();
                return match v.strip_prefix(b"\"") {
                    Some(q) => q.split(|b| *b == b'"').next().unwrap_or(b""),
                    None => v.split(|b| *b == b',').next().unwrap_or(b"").trim_ascii(),
                };
            }
        }
        rest = after;
    }
    b""
}

impl super::Ledger {
    /// From `on_request`, after every other check passed: the toll-fraud rules for an initial
    /// INVITE, call-state tracking for ACK and BYE. `Some` rejects the request.
    pub(super) fn fraud_on_request(
        &mut self,
        now: Millis,
        src: std::net::SocketAddr,
        net: IpNet,
        msg: &crate::wire::Message<'_>,
    ) -> Option<super::Verdict> {
        use crate::wire::{HeaderName, Method};
        if !self.fraud.enabled() {
            return None;
        }
        let call_id = msg.call_id();
        match msg.method()? {
            Method::Ack => self.fraud.on_ack(call_id),
            Method::Bye => self.fraud.on_bye(now, call_id),
            Method::Invite => {
                let in_dialog = msg
                    .header(HeaderName::To)
                    .and_then(|h| crate::wire::uri::NameAddr::parse(msg.buf, h.value))
                    .is_some_and(|na| na.tag(msg.buf).is_some());
                if in_dialog {
                    return None;
                }
                let creds = credentials_user(msg);
                let account = if creds.is_empty() {
                    super::uri_user(msg, HeaderName::From)
                } else {
                    creds
                };
                let dialled = msg
                    .request_uri()
                    .and_then(|sp| crate::wire::uri::Uri::parse(msg.buf, sp))
                    .map_or(&b""[..], |u| u.user(msg.buf));
                let enforce = !self.observe();
                let d = self
                    .fraud
                    .on_invite(now, net, account, dialled, call_id, enforce);
                for f in &d.alerts {
                    self.fraud_alert(f, src);
                }
                if let Some(f) = d.block_source {
                    let det = super::Detection {
                        key: crate::blocks::BlockKey::whole(net),
                        kind: crate::blocks::BlockType::Fraud,
                        reason: format!(
                            "toll fraud: account {}, group {}: {} {} over {}",
                            crate::util::printable(account, 64),
                            if f.group.is_empty() { "any" } else { &f.group },
                            f.metric.as_str(),
                            f.value,
                            f.limit
                        ),
                        duration: self.cfg.fraud.block_time,
                        evidence: vec![super::request_evidence(msg)],
                    };
                    let ua = crate::util::printable(msg.user_agent(), 80);
                    self.block(now, det, &ua);
                }
                if d.reject.is_none() && enforce {
                    self.fraud.note_invite(msg);
                }
                if let Some(f) = d.reject {
                    self.fraud_alert(&f, src);
                    let code = self.cfg.fraud.reject_code;
                    return Some(super::Verdict::Reply {
                        code,
                        reason: f.metric.reason(code),
                        retry_after: None,
                    });
                }
            }
            _ => {}
        }
        None
    }

    fn fraud_alert(&mut self, f: &Finding, src: std::net::SocketAddr) {
        self.events.push(crate::blocks::Event::Alert {
            kind: crate::blocks::BlockType::Fraud,
            source: src.ip().to_string(),
            message: f.describe(),
        });
    }

    /// From `on_answer`: the PBX's final answer to an INVITE or a BYE.
    pub(super) fn fraud_on_answer(
        &mut self,
        now: Millis,
        msg: &crate::wire::Message<'_>,
        code: u16,
    ) {
        if !self.fraud.enabled() {
            return;
        }
        match msg.cseq() {
            Some((_, b"INVITE")) => self.fraud.on_invite_answer(now, msg.call_id(), code),
            Some((_, b"BYE")) => self.fraud.on_bye_answer(msg.call_id(), code),
            _ => {}
        }
    }

    /// A request from the PBX towards a phone (trusted): its BYE ends the call.
    pub fn on_upstream_request(&mut self, msg: &crate::wire::Message<'_>) {
        if self.fraud.enabled() && msg.method() == Some(crate::wire::Method::Bye) {
            self.fraud.on_upstream_bye(msg.call_id());
        }
    }

    /// The PBX's answer to a phone's request was forwarded to `caller` (transport, address): a
    /// 2xx to an INVITE completes what a max-duration BYE needs.
    pub fn on_answer_forwarded(
        &mut self,
        msg: &crate::wire::Message<'_>,
        caller: (crate::stats::Transport, std::net::SocketAddr),
    ) {
        if self.fraud.enabled() {
            self.fraud.note_answer(msg, caller);
        }
    }

    /// Calls the guard ended at their max duration: the node sends each one's two BYEs.
    pub fn take_fraud_byes(&mut self) -> Vec<dialog::Dialog> {
        self.fraud.take_byes()
    }

    pub(super) fn fraud_tick(&mut self, now: Millis) {
        for f in self.fraud.tick(now) {
            self.events.push(crate::blocks::Event::Alert {
                kind: crate::blocks::BlockType::Fraud,
                source: f.who.to_string(),
                message: f.describe(),
            });
        }
    }

    pub fn fraud(&self) -> &FraudGuard {
        &self.fraud
    }

    pub fn fraud_mut(&mut self) -> &mut FraudGuard {
        &mut self.fraud
    }
}

/// The detector snapshots the state store keeps (see [`super::Engine::durable_snapshots`]).
pub const SNAPSHOT_NAMES: [&str; 2] = ["fraud", "feeds"];

impl super::Ledger {
    /// Whole-state snapshots to persist, by name (JSON). Empty when there is nothing to keep.
    pub fn durable_snapshots(&self) -> Vec<(&'static str, Vec<u8>)> {
        let mut out = Vec::new();
        if self.fraud.tracked() > 0 || self.fraud.enabled() {
            if let Ok(b) = serde_json::to_vec(&self.fraud.snapshot()) {
                out.push(("fraud", b));
            }
        }
        if !self.feeds.is_empty() || self.feeds.status().next().is_some() {
            if let Ok(b) = serde_json::to_vec(&self.feeds_snapshot()) {
                out.push(("feeds", b));
            }
        }
        out
    }

    /// Load a snapshot saved by an earlier run; false when it cannot be decoded.
    pub fn restore_snapshot(&mut self, now: Millis, name: &str, bytes: &[u8]) -> bool {
        match name {
            "fraud" => match serde_json::from_slice::<Snapshot>(bytes) {
                Ok(s) => {
                    self.fraud.restore(s);
                    true
                }
                Err(_) => false,
            },
            "feeds" => match serde_json::from_slice(bytes) {
                Ok(s) => {
                    self.feeds_restore(now, s);
                    true
                }
                Err(_) => false,
            },
            _ => false,
        }
    }
}
