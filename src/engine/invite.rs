//! INVITE flood: a GCRA limiter per source (`rate_limit` per second, `burst`), and one alert
//! per episode rather than one per packet.

use std::num::NonZeroU32;

use governor::Quota;
use ipnet::IpNet;
use lru::LruCache;

use super::track::{nonzero, EngineClock, Limiters};
use crate::clock::Millis;
use crate::cluster_count::{Detector, SharedCounts};
use crate::config::Invite;

/// An episode ends after this long without an excess INVITE; the next excess starts a new one.
pub const EPISODE_QUIET: Millis = 30_000;

#[derive(Debug, Clone, Copy, Default)]
struct Episode {
    last_excess: Millis,
    excess: u64,
}

/// INVITEs other nodes admitted for a source that this node has yet to charge to its limiter.
#[derive(Debug, Clone, Copy, Default)]
struct Debt {
    /// The peers' total when last looked at.
    seen: u64,
    /// Cells still to take from the limiter; at most [`InviteGuard::max_debt`].
    owed: u32,
}

pub struct InviteGuard {
    limiters: Limiters<IpNet>,
    episodes: LruCache<IpNet, Episode>,
    /// Cluster-wide rate: every INVITE a peer admitted is charged here as a debt paid from
    /// this node's limiter before any local INVITE passes, so all nodes together admit
    /// `rate_limit` (the lag of one round shows as a small overshoot, not a multiple).
    shared: SharedCounts,
    debts: LruCache<IpNet, Debt>,
    max_debt: u32,
}

/// The outcome of one INVITE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InviteCheck {
    Allowed,
    /// Over the rate; `new_episode` is true for the first excess after a quiet spell.
    Excess {
        new_episode: bool,
    },
}

pub fn quota(cfg: &Invite) -> Quota {
    let rate = NonZeroU32::new(cfg.rate_limit).unwrap_or(NonZeroU32::MIN);
    let burst = NonZeroU32::new(cfg.burst).unwrap_or(rate);
    Quota::per_second(rate).allow_burst(burst)
}

/// Debt beyond one second of the rate plus the burst would only keep a source refused after
/// the cluster's own limiters have long forgotten it.
fn max_debt(cfg: &Invite) -> u32 {
    cfg.rate_limit.saturating_add(cfg.burst).max(1)
}

impl InviteGuard {
    pub fn new(cap: usize, cfg: &Invite, clock: EngineClock) -> Self {
        Self {
            limiters: Limiters::new(cap, quota(cfg), clock),
            episodes: LruCache::new(nonzero(cap / 10 + 1)),
            shared: SharedCounts::disabled(),
            debts: LruCache::new(nonzero(cap / 10 + 1)),
            max_debt: max_debt(cfg),
        }
    }

    /// Limit INVITEs per source across the cluster through `shared`.
    pub fn set_shared(&mut self, shared: SharedCounts) {
        self.shared = shared;
    }

    pub fn reconfigure(&mut self, cap: usize, cfg: &Invite) {
        self.limiters.reconfigure(cap, quota(cfg));
        self.episodes.resize(nonzero(cap / 10 + 1));
        self.debts.resize(nonzero(cap / 10 + 1));
        self.max_debt = max_debt(cfg);
    }

    pub fn check(&mut self, now: Millis, net: IpNet) -> InviteCheck {
        let allowed = if self.shared.is_enabled() {
            self.check_shared(now, net)
        } else {
            self.limiters.check(net)
        };
        if allowed {
            self.shared.record(Detector::Invite, net, 1);
            return InviteCheck::Allowed;
        }
        let ep = self.episodes.get_or_insert_mut(net, Episode::default);
        let new_episode = ep.excess == 0 || now.saturating_sub(ep.last_excess) > EPISODE_QUIET;
        if new_episode {
            ep.excess = 0;
        }
        ep.excess += 1;
        ep.last_excess = now;
        InviteCheck::Excess { new_episode }
    }

    /// Charge what the peers admitted since the last look, then decide for this INVITE. Only
    /// INVITEs of the last second count as new debt (the peers' window), so a source quiet
    /// here for a while is not refused for what the cluster let through long ago. The debt is
    /// paid one cell at a time while the limiter has room: the loop ends at the first refusal
    /// (at most `burst` cells a call, amortised one per cell the limiter frees).
    fn check_shared(&mut self, now: Millis, net: IpNet) -> bool {
        let total = self.shared.remote_total(Detector::Invite, net);
        let debt = match self.debts.get_mut(&net) {
            Some(d) => d,
            None if total == 0 => return self.limiters.check(net),
            None => self.debts.get_or_insert_mut(net, Debt::default),
        };
        // When a peer was dropped its total left the sum: start again from the new total.
        let recent = u64::from(self.shared.remote(now, Detector::Invite, net));
        let new = total.saturating_sub(debt.seen).min(recent);
        debt.seen = total;
        debt.owed = u64::from(debt.owed)
            .saturating_add(new)
            .min(u64::from(self.max_debt)) as u32;
        while debt.owed > 0 && self.limiters.check(net) {
            debt.owed -= 1;
        }
        debt.owed == 0 && self.limiters.check(net)
    }

    pub fn tracked(&self) -> usize {
        self.limiters.len() + self.episodes.len() + self.debts.len()
    }
}
