//! Packet flood: a GCRA limiter per source over every packet it sends, all methods (like
//! Kamailio's pike), `flood.packets_per_second` with a burst of the same size.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::num::NonZeroU32;

use governor::Quota;
use ipnet::IpNet;

use super::track::{EngineClock, Limiters};
use super::Detection;
use crate::blocks::{BlockKey, BlockType};
use crate::config::Config;

fn quota(cfg: &Config) -> Quota {
    let pps = NonZeroU32::new(cfg.flood.packets_per_second).unwrap_or(NonZeroU32::MIN);
    Quota::per_second(pps).allow_burst(pps)
}

pub struct FloodGuard {
    limiters: Limiters<IpNet>,
}

impl FloodGuard {
    /// At most `cap` sources tracked (the least recently seen forgotten first).
    pub fn new(cap: usize, cfg: &Config, clock: EngineClock) -> Self {
        Self {
            limiters: Limiters::new(cap, quota(cfg), clock),
        }
    }

    pub fn reconfigure(&mut self, cap: usize, cfg: &Config) {
        self.limiters.reconfigure(cap, quota(cfg));
    }

    /// One packet from `net`: the block to make when it is over the rate.
    pub fn check(&mut self, cfg: &Config, net: IpNet) -> Option<Detection> {
        if self.limiters.check(net) {
            return None;
        }
        let pps = cfg.flood.packets_per_second;
        Some(Detection {
            key: BlockKey::whole(net),
            kind: BlockType::Flood,
            reason: format!("more than {pps} packets per second"),
            duration: cfg.flood.block_time,
            evidence: vec![format!("packet rate over {pps}/s")],
        })
    }

    pub fn len(&self) -> usize {
        self.limiters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.limiters.is_empty()
    }
}
