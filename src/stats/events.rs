//! Counts of state events (blocks made, would-be blocks, unblocks, alerts) and the per-minute
//! history behind the dashboard's chart. Owned by the node's [`Stats`](super::Stats): the state
//! task counts every event it handles through its `Arc<Node>`; the admin surface only reads.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;

use crate::admin::history::{History, HistoryView};
use crate::blocks::{BlockType, Event, UnblockReason};
use crate::clock::Millis;

pub(crate) const TYPES: usize = BlockType::ALL.len();

/// Every reason a block is lifted, in the order of the `why` label.
pub const WHYS: [UnblockReason; 5] = [
    UnblockReason::Expired,
    UnblockReason::Manual,
    UnblockReason::Evicted,
    UnblockReason::Whitelisted,
    UnblockReason::Aggregated,
];

/// The `why` label of an unblock.
pub fn why_str(w: UnblockReason) -> &'static str {
    match w {
        UnblockReason::Expired => "expired",
        UnblockReason::Manual => "manual",
        UnblockReason::Evicted => "evicted",
        UnblockReason::Whitelisted => "whitelisted",
        UnblockReason::Aggregated => "aggregated",
    }
}

/// Counts of state events since start, by block type. Fixed size whatever the traffic: one
/// atomic per (type, reason) and a ring of 60 minutes.
#[derive(Debug)]
pub struct EventCounters {
    blocks: [AtomicU64; TYPES],
    /// Would-be blocks in observe mode.
    observed: [AtomicU64; TYPES],
    unblocks: [[AtomicU64; WHYS.len()]; TYPES],
    history: Mutex<History>,
}

/// A copy of the event counters, as rendered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventCounts {
    /// Blocks made, by type (index: `BlockType as usize`).
    pub blocks: [u64; TYPES],
    /// Would-be blocks detected in observe mode, by type.
    pub observed: [u64; TYPES],
    /// Blocks lifted, by type and by reason (index: position in [`WHYS`]).
    pub unblocks: [[u64; WHYS.len()]; TYPES],
}

fn load(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl EventCounters {
    pub const fn new() -> Self {
        Self {
            blocks: [const { AtomicU64::new(0) }; TYPES],
            observed: [const { AtomicU64::new(0) }; TYPES],
            unblocks: [const { [const { AtomicU64::new(0) }; WHYS.len()] }; TYPES],
            history: parking_lot::const_mutex(History::new()),
        }
    }

    /// Count one event; `now` dates the events that carry no time of their own (alerts).
    /// Cheap: a few atomics and a short lock for blocks and alerts.
    pub fn record(&self, ev: &Event, now: Millis) {
        match ev {
            Event::Blocked(b) => {
                let c = if b.enforced {
                    &self.blocks
                } else {
                    &self.observed
                };
                if let Some(c) = c.get(b.kind as usize) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                self.history.lock().block(b.blocked_at, b.kind);
            }
            Event::Unblocked { kind, why, .. } => {
                let why = WHYS.iter().position(|w| w == why);
                if let Some(c) = self
                    .unblocks
                    .get(*kind as usize)
                    .and_then(|row| row.get(why?))
                {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            Event::Alert { .. } => self.history.lock().alert(now),
            Event::ListAdded { .. } | Event::ListRemoved { .. } | Event::Strikes { .. } => {}
        }
    }

    pub fn counts(&self) -> EventCounts {
        EventCounts {
            blocks: std::array::from_fn(|t| load(&self.blocks[t])),
            observed: std::array::from_fn(|t| load(&self.observed[t])),
            unblocks: std::array::from_fn(|t| std::array::from_fn(|w| load(&self.unblocks[t][w]))),
        }
    }

    /// The last hour, per minute, ending with the minute of `now`.
    pub fn history(&self, now: Millis) -> HistoryView {
        self.history.lock().view(now)
    }
}

impl Default for EventCounters {
    fn default() -> Self {
        Self::new()
    }
}
