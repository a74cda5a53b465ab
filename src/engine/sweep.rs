//! OPTIONS sweep: a scanner probing for SIP servers sends OPTIONS; `patterns.options_sweep`
//! of them from one source within `patterns.monit_period` is a scan, whatever its User-Agent.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use ipnet::IpNet;
use lru::LruCache;

use super::track::{nonzero, Window};
use super::{request_evidence, Detection};
use crate::blocks::{BlockKey, BlockType};
use crate::clock::Millis;
use crate::config::Config;
use crate::wire::Message;

pub struct OptionsSweep {
    windows: LruCache<IpNet, Window>,
}

impl OptionsSweep {
    pub fn new(cap: usize) -> Self {
        Self {
            windows: LruCache::new(nonzero(cap)),
        }
    }

    pub fn resize(&mut self, cap: usize) {
        self.windows.resize(nonzero(cap));
    }

    /// An OPTIONS from `net`: the block to make when the sweep threshold is reached.
    pub fn check(
        &mut self,
        now: Millis,
        cfg: &Config,
        net: IpNet,
        msg: &Message<'_>,
    ) -> Option<Detection> {
        let period = cfg.patterns.monit_period.as_millis() as Millis;
        let n = self
            .windows
            .get_or_insert_mut(net, Window::default)
            .add(now, period, 1);
        if n < cfg.patterns.options_sweep {
            return None;
        }
        Some(Detection {
            key: BlockKey::whole(net),
            kind: BlockType::Scan,
            reason: format!(
                "OPTIONS sweep: {n} OPTIONS within {}",
                humantime::format_duration(cfg.patterns.monit_period)
            ),
            duration: cfg.patterns.block_time,
            evidence: vec![request_evidence(msg)],
        })
    }

    pub fn len(&self) -> usize {
        self.windows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}
