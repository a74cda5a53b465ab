//! The drop gate: answers "is this source blocked?" for the packet path without the engine's
//! lock. Many receive tasks read it at once; the engine writes it, under its own lock, on every
//! change of the block table (through [`super::BlockTable`], which owns the hooks) and of the
//! lists and the policy (through [`Gate::set_policy`]).
//!
//! Two parts, by how often they change:
//! - the enforced blocks, in a lock-free concurrent map ([`papaya::HashMap`]): blocks come and
//!   go at attack rate, so a copy per change would cost O(blocks); a lookup takes no lock and
//!   writes no shared word (its epoch guard is per thread), so two cores dropping packets never
//!   wait for, nor bounce a cache line with, each other;
//! - the white- and blacklist with the policy (observe mode, 403 reply, IPv6 prefix), as an
//!   [`ArcSwap`] snapshot: they change only when an operator or the automatic blacklist acts, and
//!   a reader pays one atomic load.
//!
//! Only *enforced, unexpired* blocks answer [`GateVerdict::Blocked`]: observe-mode blocks are
//! never put here, and an entry whose time is up stops matching at once, before the engine's
//! sweep removes it. Packets dropped here are counted per entry ([`Gate::hits`]); the table folds
//! them into its rows ([`super::BlockTable::fold_gate_hits`]) where the admin reads them. A
//! receive loop counts its drops in its own [`LocalHits`] first and adds them to the entries in
//! bulk ([`Gate::check_local`], [`LocalHits::flush`]), so a flood from one source does not make
//! every core increment the same counter. The
//! gate holds no more entries than the block table (`protection.max_blocks`), which bounds it.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use super::{source_net, Block, BlockKey, BlockType, Lists};
use crate::clock::Millis;

/// What the gate says about a packet's source, before any parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateVerdict {
    /// Drop (or answer 403 when `reply_403`): an enforced block or the static blacklist.
    Blocked { kind: BlockType, reply_403: bool },
    /// Whitelisted and not blocked: forwarded without protection checks.
    Whitelisted,
    /// Not decided here: on to the engine.
    Inspect,
}

/// The rarely-changing part: lists and the policy that reads them.
#[derive(Debug, Clone)]
pub struct Policy {
    pub lists: Lists,
    /// `protection.mode = "observe"`: the blacklist blocks nothing.
    pub observe: bool,
    /// `protection.blocked_reply = "403"`.
    pub reply_403: bool,
    /// `protection.ipv6_prefix`: the unit blocks are keyed by.
    pub ipv6_prefix: u8,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            lists: Lists::default(),
            observe: false,
            reply_403: false,
            ipv6_prefix: 64,
        }
    }
}

#[derive(Debug)]
struct Entry {
    kind: BlockType,
    expires_at: Option<Millis>,
    /// Packets dropped here since the entry was put (or last folded into the table).
    hits: AtomicU64,
}

/// Drops a receive loop counts for itself before adding them to the gate's entries: a few
/// distinct sources (a flood comes from one, or from many one at a time), searched linearly.
/// Full, or [`LocalHits::FLUSH_EVERY`] drops, or the loop's timer: flushed.
#[derive(Debug, Default)]
pub struct LocalHits {
    pending: Vec<(BlockKey, u64)>,
    count: u64,
}

impl LocalHits {
    /// Distinct sources held before a flush.
    pub const KEYS: usize = 16;
    /// Drops held before a flush, so the admin's figures are never far behind.
    pub const FLUSH_EVERY: u64 = 4096;

    fn add(&mut self, gate: &Gate, key: BlockKey) {
        self.count += 1;
        match self.pending.iter_mut().find(|(k, _)| *k == key) {
            Some((_, n)) => *n += 1,
            None => {
                if self.pending.len() >= Self::KEYS {
                    self.flush(gate);
                    self.count = 1;
                }
                self.pending.push((key, 1));
            }
        }
        if self.count >= Self::FLUSH_EVERY {
            self.flush(gate);
        }
    }

    /// Add the held drops to the gate's entries (those still there).
    pub fn flush(&mut self, gate: &Gate) {
        if self.pending.is_empty() {
            return;
        }
        let m = gate.blocks.pin();
        for (k, n) in self.pending.drain(..) {
            if let Some(e) = m.get(&k) {
                e.hits.fetch_add(n, Ordering::Relaxed);
            }
        }
        self.count = 0;
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}

#[derive(Debug)]
pub struct Gate {
    blocks: papaya::HashMap<BlockKey, Entry>,
    /// (address, port) entries: when zero the second lookup is skipped.
    port_blocks: AtomicUsize,
    policy: ArcSwap<Policy>,
    /// Copies of `policy.ipv6_prefix` and `policy.reply_403`, read with plain loads so a
    /// blocked packet never touches the snapshot.
    ipv6_prefix: AtomicU8,
    reply_403: AtomicBool,
}

impl Default for Gate {
    fn default() -> Self {
        let p = Policy::default();
        Gate {
            blocks: papaya::HashMap::new(),
            port_blocks: AtomicUsize::new(0),
            ipv6_prefix: AtomicU8::new(p.ipv6_prefix),
            reply_403: AtomicBool::new(p.reply_403),
            policy: ArcSwap::from_pointee(p),
        }
    }
}

impl Gate {
    pub fn new() -> Arc<Gate> {
        Arc::new(Gate::default())
    }

    /// The verdict for a packet from `src` at `now`, counting the hit on the entry when
    /// blocked. Lock-free.
    pub fn check(&self, now: Millis, src: SocketAddr) -> GateVerdict {
        self.verdict(now, src, |e, _| {
            e.hits.fetch_add(1, Ordering::Relaxed);
        })
    }

    /// Is `ip` whitelisted? Lock-free, without touching the policy's reference count.
    pub fn is_whitelisted(&self, ip: std::net::IpAddr) -> bool {
        self.policy.load().lists.is_whitelisted(ip)
    }

    /// As [`Gate::check`] without counting a hit (for readers such as the HEP filter).
    pub fn check_quiet(&self, now: Millis, src: SocketAddr) -> GateVerdict {
        self.verdict(now, src, |_, _| {})
    }

    /// As [`Gate::check`], the hit counted in the caller's `local` (flushed to the entry
    /// later): what a receive loop uses.
    pub fn check_local(&self, now: Millis, src: SocketAddr, local: &mut LocalHits) -> GateVerdict {
        self.verdict(now, src, |_, key| local.add(self, key))
    }

    fn verdict(
        &self,
        now: Millis,
        src: SocketAddr,
        mut hit: impl FnMut(&Entry, BlockKey),
    ) -> GateVerdict {
        let ip = src.ip();
        let net = source_net(ip, self.ipv6_prefix.load(Ordering::Relaxed));
        let reply_403 = self.reply_403.load(Ordering::Relaxed);
        {
            let m = self.blocks.pin();
            let mut lookup = |key: BlockKey| {
                let e = m.get(&key)?;
                if matches!(e.expires_at, Some(t) if t <= now) {
                    return None;
                }
                hit(e, key);
                Some(e.kind)
            };
            if let Some(kind) = lookup(BlockKey::whole(net)) {
                return GateVerdict::Blocked { kind, reply_403 };
            }
            if self.port_blocks.load(Ordering::Relaxed) > 0 {
                if let Some(kind) = lookup(BlockKey::with_port(net, src.port())) {
                    return GateVerdict::Blocked { kind, reply_403 };
                }
            }
        }
        let policy = self.policy.load();
        if policy.lists.is_whitelisted(ip) {
            return GateVerdict::Whitelisted;
        }
        if !policy.observe && policy.lists.blacklisted(ip).is_some() {
            return GateVerdict::Blocked {
                kind: BlockType::Blacklist,
                reply_403,
            };
        }
        GateVerdict::Inspect
    }

    /// Mirror a block stored in the table: enforced ones are put (with no hits yet: the row
    /// carries its own), others taken out.
    pub(crate) fn put(&self, b: &Block) {
        if !b.enforced {
            self.remove(&b.key);
            return;
        }
        let entry = Entry {
            kind: b.kind,
            expires_at: b.expires_at,
            hits: AtomicU64::new(0),
        };
        if self.blocks.pin().insert(b.key, entry).is_none() && b.key.port.is_some() {
            self.port_blocks.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Mirror a block leaving the table. Returns the hits not yet folded.
    pub(crate) fn remove(&self, key: &BlockKey) -> u64 {
        match self.blocks.pin().remove(key) {
            Some(e) => {
                if key.port.is_some() {
                    self.port_blocks.fetch_sub(1, Ordering::Relaxed);
                }
                e.hits.load(Ordering::Relaxed)
            }
            None => 0,
        }
    }

    /// Hits counted here for `key`, not yet folded into the table.
    pub fn hits(&self, key: &BlockKey) -> u64 {
        self.blocks
            .pin()
            .get(key)
            .map_or(0, |e| e.hits.load(Ordering::Relaxed))
    }

    /// Take every entry's unfolded hits (resetting them), for the table to add to its rows.
    pub(crate) fn drain_hits(&self, mut f: impl FnMut(&BlockKey, u64)) {
        for (k, e) in self.blocks.pin().iter() {
            let n = e.hits.swap(0, Ordering::Relaxed);
            if n > 0 {
                f(k, n);
            }
        }
    }

    /// Publish new lists or policy. O(list size) for the caller; readers never wait.
    pub fn set_policy(&self, p: Policy) {
        self.ipv6_prefix.store(p.ipv6_prefix, Ordering::Relaxed);
        self.reply_403.store(p.reply_403, Ordering::Relaxed);
        self.policy.store(Arc::new(p));
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Enforced blocks mirrored (for tests and metrics).
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[cfg(test)]
mod tests;
