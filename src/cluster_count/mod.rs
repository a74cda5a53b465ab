//! Cluster-wide counting (the OpenSIPS ratelimit/BIN model): detectors count on the packet
//! path as before and also [`SharedCounts::record`] what they counted; every
//! `cluster.count_interval` the [`link`] task publishes this node's deltas since the last round
//! on the `sipwarden:counts` channel, and applies the other nodes' deltas to a table of remote
//! contributions per (peer, detector, source). A detector deciding adds
//! [`SharedCounts::remote`] to its own figure. No Redis round trip is ever on the packet path:
//! both sides only take this module's lock for a hash lookup.
//!
//! What counts cluster-wide: password failures per source ([`Detector::Auth`], the
//! `register.hit_count` rule), INVITEs admitted per source ([`Detector::Invite`], charged into
//! each node's rate limiter as a debt, so the cluster as a whole keeps `invite.rate_limit`),
//! and TFTP requests per source ([`Detector::Tftp`], the `tftp.hit_count` rule). Per-port,
//! per-user and pattern counters stay local.
//!
//! Hostile input (whoever can write to the Redis channel): a message over [`MAX_MESSAGE`]
//! bytes, with more than [`MAX_ENTRIES`] entries, or that does not decode, is dropped and
//! counted in `malformed`; a delta over [`MAX_DELTA`] is clamped to it (counted in
//! `clamped`); our own messages are skipped by node id. Every table is bounded below, with
//! the reason next to the bound.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

pub mod link;
pub mod metrics;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ipnet::IpNet;
use lru::LruCache;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use crate::clock::Millis;
use crate::config::Config;
use crate::engine::track::{nonzero, Window};

/// The channel the deltas travel on.
pub const CHANNEL: &str = "sipwarden:counts";
/// Entries per published round. Over it, the largest deltas are sent and the rest counted in
/// `overflow` (a flood from more sources than this in 100 ms is spread thin per source, so the
/// small deltas matter least). About 60 bytes each in JSON: a round stays under 64 KiB.
pub const MAX_ENTRIES: usize = 1024;
/// A received message larger than this is not parsed ([`MAX_ENTRIES`] entries of the longest
/// form, an IPv6 /128 with a 10-digit delta, fit with room to spare).
pub const MAX_MESSAGE: usize = 128 << 10;
/// Distinct (detector, source) keys waiting for the next round. An attacker cycling addresses
/// cannot grow it: increments for new keys beyond it are counted in `overflow` and not sent.
pub const MAX_PENDING: usize = 16_384;
/// Remote (detector, source) keys kept, least recently updated forgotten first. Each key holds
/// one slot per peer that reported it (usually one or two): about 200 bytes a key with two
/// peers, so this caps the table near 13 MiB.
pub const MAX_REMOTE_KEYS: usize = 65_536;
/// Peers tracked; a node id beyond it (or longer than [`MAX_NODE_ID`]) is ignored and counted
/// in `malformed`. A cluster of more than a few dozen SIP proxies in front of one PBX is not a
/// deployment we know of.
pub const MAX_PEERS: usize = 64;
pub const MAX_NODE_ID: usize = 64;
/// The largest delta one entry of one round may claim. A node's packet path handles well under
/// 100k packets a second from one source, i.e. 10k per 100 ms round: more is a lie (or a broken
/// peer), and unclamped it would let one message push every counter over its threshold.
pub const MAX_DELTA: u32 = 10_000;

/// The detectors that count cluster-wide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Detector {
    Auth,
    Invite,
    Tftp,
}

/// One round of one node, as it travels: `[node, [[detector, source, delta], ...]]`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Round {
    pub node: String,
    pub entries: Vec<(Detector, IpNet, u32)>,
}

/// Counters of the counting link (rendered by `/metrics`).
#[derive(Debug, Default)]
pub struct CountStats {
    /// Rounds published.
    pub rounds: AtomicU64,
    pub entries_sent: AtomicU64,
    pub entries_received: AtomicU64,
    /// Increments not sent: over [`MAX_ENTRIES`] in a round or [`MAX_PENDING`] keys waiting.
    pub overflow: AtomicU64,
    /// Received messages dropped (too large, undecodable, too many entries or peers).
    pub malformed: AtomicU64,
    /// Received deltas clamped to [`MAX_DELTA`].
    pub clamped: AtomicU64,
    /// Peers heard from within `cluster.peer_timeout`.
    pub peers: AtomicU64,
    /// Rounds that could not be published (Redis away); their deltas are lost.
    pub publish_failures: AtomicU64,
}

/// Sliding-window lengths per detector, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Periods {
    pub auth: Millis,
    pub tftp: Millis,
    pub peer_timeout: Millis,
}

impl Periods {
    pub fn from_config(cfg: &Config) -> Periods {
        Periods {
            auth: cfg.register.monit_period.as_millis() as Millis,
            tftp: crate::tftp::guard::WINDOW,
            peer_timeout: cfg.cluster.peer_timeout.as_millis() as Millis,
        }
    }

    fn of(&self, d: Detector) -> Millis {
        match d {
            Detector::Auth => self.auth,
            Detector::Tftp => self.tftp,
            // INVITEs are charged by total (see [`SharedCounts::remote_total`]); the window
            // only ages the entry.
            Detector::Invite => 1_000,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct PeerCount {
    peer: u32,
    window: Window,
    total: u64,
}

#[derive(Debug)]
struct Peer {
    id: u32,
    last_heard: Millis,
}

struct Table {
    periods: Periods,
    pending: HashMap<(Detector, IpNet), u32>,
    remote: LruCache<(Detector, IpNet), SmallVec<[PeerCount; 2]>>,
    peers: HashMap<Box<str>, Peer>,
    next_peer: u32,
}

struct Inner {
    node_id: Box<str>,
    table: Mutex<Table>,
    stats: CountStats,
}

/// The detectors' handle on cluster-wide counts: cheap to clone, and a no-op (nothing
/// recorded, every remote figure 0) when no cluster is configured, so single-node behaviour is
/// exactly what it was.
#[derive(Clone, Default)]
pub struct SharedCounts(Option<Arc<Inner>>);

impl std::fmt::Debug for SharedCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SharedCounts")
            .field(&self.0.as_ref().map(|i| &i.node_id))
            .finish()
    }
}

impl SharedCounts {
    pub fn disabled() -> SharedCounts {
        SharedCounts(None)
    }

    /// An enabled handle for the node `node_id` (a random id, distinct per process).
    pub fn new(node_id: &str, periods: Periods) -> SharedCounts {
        SharedCounts(Some(Arc::new(Inner {
            node_id: node_id.into(),
            table: Mutex::new(Table {
                periods,
                pending: HashMap::new(),
                remote: LruCache::new(nonzero(MAX_REMOTE_KEYS)),
                peers: HashMap::new(),
                next_peer: 0,
            }),
            stats: CountStats::default(),
        })))
    }

    /// Enabled when the config names a cluster and `cluster.shared_counters` is on; the node id
    /// is random per process (a restarted node is a new peer; the old one times out).
    pub fn for_config(cfg: &Config) -> SharedCounts {
        if cfg.cluster.redis_url.is_empty() || !cfg.cluster.shared_counters {
            return SharedCounts::disabled();
        }
        let id = format!("{:016x}", rand::random::<u64>());
        SharedCounts::new(&id, Periods::from_config(cfg))
    }

    pub fn is_enabled(&self) -> bool {
        self.0.is_some()
    }

    pub fn node_id(&self) -> Option<&str> {
        self.0.as_deref().map(|i| &*i.node_id)
    }

    pub fn stats(&self) -> Option<&CountStats> {
        self.0.as_deref().map(|i| &i.stats)
    }

    pub fn set_periods(&self, periods: Periods) {
        if let Some(i) = &self.0 {
            i.table.lock().periods = periods;
        }
    }

    /// `n` local events for `key`, to be published with the next round.
    pub fn record(&self, d: Detector, key: IpNet, n: u32) {
        let Some(i) = &self.0 else { return };
        let mut t = i.table.lock();
        let full = t.pending.len() >= MAX_PENDING;
        match t.pending.get_mut(&(d, key)) {
            Some(v) => *v = v.saturating_add(n),
            None if full => {
                i.stats.overflow.fetch_add(u64::from(n), Ordering::Relaxed);
            }
            None => {
                t.pending.insert((d, key), n);
            }
        }
    }

    /// The other nodes' events for `key` within the detector's window, as this node heard them.
    pub fn remote(&self, now: Millis, d: Detector, key: IpNet) -> u32 {
        let Some(i) = &self.0 else { return 0 };
        let t = i.table.lock();
        let period = t.periods.of(d);
        t.remote.peek(&(d, key)).map_or(0, |slots| {
            slots.iter().fold(0u32, |sum, s| {
                sum.saturating_add(s.window.estimate(now, period))
            })
        })
    }

    /// Every event the peers now counted reported for `key` since this node first heard of it
    /// (it goes down only when a peer is dropped): a detector charges the difference since it
    /// last looked.
    pub fn remote_total(&self, d: Detector, key: IpNet) -> u64 {
        let Some(i) = &self.0 else { return 0 };
        let t = i.table.lock();
        t.remote
            .peek(&(d, key))
            .map_or(0, |slots| slots.iter().map(|s| s.total).sum())
    }

    /// Drop what the peers reported for `key` (after the source was blocked here, so that it
    /// starts from nothing when unblocked).
    pub fn forget(&self, d: Detector, key: IpNet) {
        if let Some(i) = &self.0 {
            i.table.lock().remote.pop(&(d, key));
        }
    }

    /// Take the deltas recorded since the last round: None when there are none. At most
    /// [`MAX_ENTRIES`], the largest first; the rest are counted in `overflow`.
    pub fn take_round(&self) -> Option<Round> {
        let i = self.0.as_ref()?;
        let pending = std::mem::take(&mut i.table.lock().pending);
        if pending.is_empty() {
            return None;
        }
        let mut entries: Vec<(Detector, IpNet, u32)> =
            pending.into_iter().map(|((d, k), n)| (d, k, n)).collect();
        if entries.len() > MAX_ENTRIES {
            entries.select_nth_unstable_by(MAX_ENTRIES, |a, b| b.2.cmp(&a.2));
            let lost: u64 = entries.drain(MAX_ENTRIES..).map(|e| u64::from(e.2)).sum();
            i.stats.overflow.fetch_add(lost, Ordering::Relaxed);
        }
        Some(Round {
            node: i.node_id.to_string(),
            entries,
        })
    }

    /// A round without entries (a heartbeat).
    pub fn empty_round(&self) -> Round {
        Round {
            node: self.node_id().unwrap_or("").to_string(),
            entries: Vec::new(),
        }
    }

    /// Apply a message from the channel at `now`. Returns the entries applied (0 for our own
    /// message or a dropped one).
    pub fn apply(&self, now: Millis, payload: &[u8]) -> usize {
        let Some(i) = &self.0 else { return 0 };
        let malformed = || {
            i.stats.malformed.fetch_add(1, Ordering::Relaxed);
            0
        };
        if payload.len() > MAX_MESSAGE {
            return malformed();
        }
        let Ok(round) = serde_json::from_slice::<Round>(payload) else {
            return malformed();
        };
        if *round.node == *i.node_id {
            return 0;
        }
        if round.entries.len() > MAX_ENTRIES
            || round.node.is_empty()
            || round.node.len() > MAX_NODE_ID
        {
            return malformed();
        }
        let mut t = i.table.lock();
        let full = t.peers.len() >= MAX_PEERS;
        let peer = match t.peers.get_mut(round.node.as_str()) {
            Some(p) => {
                p.last_heard = now;
                p.id
            }
            None if full => {
                drop(t);
                return malformed();
            }
            None => {
                let id = t.next_peer;
                t.next_peer = t.next_peer.wrapping_add(1);
                t.peers.insert(
                    round.node.as_str().into(),
                    Peer {
                        id,
                        last_heard: now,
                    },
                );
                i.stats.peers.store(t.peers.len() as u64, Ordering::Relaxed);
                id
            }
        };
        let n = round.entries.len();
        let mut clamped = 0u64;
        for (d, key, delta) in round.entries {
            let delta = if delta > MAX_DELTA {
                clamped += 1;
                MAX_DELTA
            } else {
                delta
            };
            let period = t.periods.of(d);
            let slots = t.remote.get_or_insert_mut((d, key), SmallVec::new);
            let slot = match slots.iter_mut().position(|s| s.peer == peer) {
                Some(pos) => slots.get_mut(pos),
                None if slots.len() < MAX_PEERS => {
                    slots.push(PeerCount {
                        peer,
                        window: Window::default(),
                        total: 0,
                    });
                    slots.last_mut()
                }
                None => None,
            };
            if let Some(s) = slot {
                s.window.add(now, period, delta);
                s.total = s.total.saturating_add(u64::from(delta));
            }
        }
        drop(t);
        if clamped > 0 {
            i.stats.clamped.fetch_add(clamped, Ordering::Relaxed);
        }
        i.stats
            .entries_received
            .fetch_add(n as u64, Ordering::Relaxed);
        n
    }

    /// Drop the peers not heard from within `cluster.peer_timeout`, and their counts. Returns
    /// how many were dropped. O(remote keys) when a peer goes, which is rare.
    pub fn expire_peers(&self, now: Millis) -> usize {
        let Some(i) = &self.0 else { return 0 };
        let mut t = i.table.lock();
        let timeout = t.periods.peer_timeout;
        let gone: Vec<u32> = t
            .peers
            .values()
            .filter(|p| now.saturating_sub(p.last_heard) > timeout)
            .map(|p| p.id)
            .collect();
        if gone.is_empty() {
            return 0;
        }
        t.peers.retain(|_, p| !gone.contains(&p.id));
        let mut empty = Vec::new();
        for (k, slots) in t.remote.iter_mut() {
            slots.retain(|s| !gone.contains(&s.peer));
            if slots.is_empty() {
                empty.push(*k);
            }
        }
        for k in empty {
            t.remote.pop(&k);
        }
        i.stats.peers.store(t.peers.len() as u64, Ordering::Relaxed);
        gone.len()
    }

    /// Remote keys held (for tests and the tracked-sources figure).
    pub fn remote_len(&self) -> usize {
        self.0.as_ref().map_or(0, |i| i.table.lock().remote.len())
    }
}
