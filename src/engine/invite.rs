//! INVITE flood: a GCRA limiter per source (`rate_limit` per second, `burst`), and one alert
//! per episode rather than one per packet.

use std::num::NonZeroU32;

use governor::Quota;
use ipnet::IpNet;
use lru::LruCache;

use super::track::{nonzero, EngineClock, Limiters};
use crate::clock::Millis;
use crate::config::Invite;

/// An episode ends after this long without an excess INVITE; the next excess starts a new one.
pub const EPISODE_QUIET: Millis = 30_000;

#[derive(Debug, Clone, Copy, Default)]
struct Episode {
    last_excess: Millis,
    excess: u64,
}

pub struct InviteGuard {
    limiters: Limiters<IpNet>,
    episodes: LruCache<IpNet, Episode>,
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

impl InviteGuard {
    pub fn new(cap: usize, cfg: &Invite, clock: EngineClock) -> Self {
        Self {
            limiters: Limiters::new(cap, quota(cfg), clock),
            episodes: LruCache::new(nonzero(cap / 10 + 1)),
        }
    }

    pub fn reconfigure(&mut self, cap: usize, cfg: &Invite) {
        self.limiters.reconfigure(cap, quota(cfg));
        self.episodes.resize(nonzero(cap / 10 + 1));
    }

    pub fn check(&mut self, now: Millis, net: IpNet) -> InviteCheck {
        if self.limiters.check(net) {
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

    pub fn tracked(&self) -> usize {
        self.limiters.len() + self.episodes.len()
    }
}
