//! One read of every counter the node keeps, as plain numbers: `/metrics`, `/api/stats` (and
//! through it the CLI and the dashboard) are all rendered from a [`Snapshot`], so two views of
//! the same moment cannot disagree.

use super::events::{EventCounts, TYPES};
use super::{DropReason, ListenerState, Read, Stats, TlsFailure, WsOutcome, LATENCY_BUCKETS_US};
use crate::admin::history::HistoryView;
use crate::clock::Millis;
use crate::config::Mode;
use crate::engine::fraud::Counts as FraudCounts;
use crate::node::Node;
use crate::state::health::HealthSnapshot;

/// Everything the operator surface shows, read once. Sizes are fixed (arrays over closed
/// enums) except `listeners` and `feeds`, whose length the config fixes, not the traffic.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub mode: Mode,
    /// The node's clock (unix milliseconds) when the snapshot was taken.
    pub now_ms: Millis,
    pub packets: Packets,
    /// Packets not forwarded, by reason (index: position in [`DropReason::ALL`]).
    pub dropped: [u64; DropReason::ALL.len()],
    pub tcp: Tcp,
    pub tls: Tls,
    pub ws: Ws,
    /// Panics caught on the packet path.
    pub panics: u64,
    pub listeners: Vec<ListenerState>,
    /// Alerts that are not blocks (INVITE flood episodes, accounts under attack).
    pub alerts: u64,
    /// State changes not persisted because the state queue was full.
    pub events_dropped: u64,
    pub tftp: Tftp,
    pub latency: Latency,
    /// Blocks made, would-be blocks and unblocks since start.
    pub events: EventCounts,
    pub history: HistoryView,
    /// Batches waiting for the state task.
    pub state_queue_depth: u64,
    pub health: HealthSnapshot,
    pub engine: EngineCounts,
    /// The cluster counting link's handle (its counters are only shown by `/metrics`).
    pub shared_counts: crate::cluster_count::SharedCounts,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Packets {
    pub udp: u64,
    pub tcp: u64,
    pub tls: u64,
    /// WebSocket and secure WebSocket together.
    pub ws: u64,
    pub requests_forwarded: u64,
    pub responses_forwarded: u64,
    /// Responses sipwarden generated itself.
    pub replies_sent: u64,
    pub keepalives: u64,
}

impl Packets {
    pub fn total_in(&self) -> u64 {
        self.udp + self.tcp + self.tls + self.ws
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tcp {
    /// Accepted since start (a counter).
    pub accepted: u64,
    /// Open now (a gauge).
    pub open: u64,
    pub rejected: u64,
    pub write_overflows: u64,
    pub write_timeouts: u64,
    /// TCP, TLS and WebSocket connections closed because their source got blocked.
    pub closed_blocked: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tls {
    pub handshakes_ok: u64,
    /// By reason (index: position in [`TlsFailure::ALL`]).
    pub failures: [u64; TlsFailure::ALL.len()],
    /// In handshake now (a gauge).
    pub in_handshake: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
}

impl Tls {
    pub fn handshakes_failed(&self) -> u64 {
        self.failures.iter().sum()
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ws {
    /// By outcome (index: position in [`WsOutcome::ALL`]).
    pub upgrades: [u64; WsOutcome::ALL.len()],
    /// Open now (a gauge).
    pub open: u64,
    pub oversized: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tftp {
    pub requests: u64,
    pub transfers: u64,
    pub limited: u64,
    pub dropped: u64,
    pub malformed: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Latency {
    pub sum_us: u64,
    pub count: u64,
    /// Per bucket of [`LATENCY_BUCKETS_US`] (not cumulative).
    pub buckets: [u64; LATENCY_BUCKETS_US.len()],
}

/// What the engine holds, read in one lock trip.
#[derive(Debug, Clone, Default)]
pub struct EngineCounts {
    /// Enforced blocks in force, by type (expired ones not yet swept excluded).
    pub active: [u64; TYPES],
    /// Would-be blocks in force (observe mode).
    pub observed_active: u64,
    pub whitelist: u64,
    pub blacklist: u64,
    /// Entries held by the detectors.
    pub tracked: u64,
    /// Blocks evicted from a full table, and blocks refused by one.
    pub evicted: u64,
    pub refused: u64,
    pub fraud_calls: u64,
    pub fraud_concurrent: u64,
    pub fraud_subjects: u64,
    pub fraud: FraudCounts,
    pub feeds: Vec<FeedCounts>,
}

impl EngineCounts {
    pub fn active_total(&self) -> u64 {
        self.active.iter().sum()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeedCounts {
    pub name: String,
    pub entries: u64,
    /// Unix seconds of the last good pull (0: none yet).
    pub last_update_s: u64,
    pub pulls_ok: u64,
    pub pulls_failed: u64,
}

fn g(c: &impl Read) -> u64 {
    c.read()
}

impl Stats {
    /// The node's own counters (everything but the engine's and the config's part).
    fn fill(&self, mode: Mode, now_ms: Millis, wall_ms: Millis) -> Snapshot {
        Snapshot {
            mode,
            now_ms,
            packets: Packets {
                udp: g(&self.packets_in_udp),
                tcp: g(&self.packets_in_tcp),
                tls: g(&self.packets_in_tls),
                ws: g(&self.ws.packets_in),
                requests_forwarded: g(&self.requests_forwarded),
                responses_forwarded: g(&self.responses_forwarded),
                replies_sent: g(&self.replies_sent),
                keepalives: g(&self.keepalives),
            },
            dropped: DropReason::ALL.map(|r| self.dropped(r)),
            tcp: Tcp {
                accepted: g(&self.tcp_connections),
                open: g(&self.tcp_open),
                rejected: g(&self.tcp_rejected),
                write_overflows: g(&self.tcp_write_overflows),
                write_timeouts: g(&self.tcp_write_timeouts),
                closed_blocked: g(&self.conns_closed_blocked),
            },
            tls: Tls {
                handshakes_ok: g(&self.tls.handshakes_ok),
                failures: TlsFailure::ALL.map(|r| self.tls.failures(r)),
                in_handshake: g(&self.tls.in_handshake),
                reloads_ok: g(&self.tls.reloads_ok),
                reloads_failed: g(&self.tls.reloads_failed),
            },
            ws: Ws {
                upgrades: WsOutcome::ALL.map(|o| self.ws.upgrades(o)),
                open: g(&self.ws.open),
                oversized: g(&self.ws.oversized),
            },
            panics: g(&self.panics),
            listeners: self.listeners.states(),
            alerts: g(&self.alerts),
            events_dropped: g(&self.events_dropped),
            tftp: Tftp {
                requests: g(&self.tftp_requests),
                transfers: g(&self.tftp_transfers),
                limited: g(&self.tftp_limited),
                dropped: g(&self.tftp_dropped),
                malformed: g(&self.tftp_malformed),
            },
            latency: Latency {
                sum_us: g(&self.latency_sum_us),
                count: g(&self.latency_count),
                buckets: std::array::from_fn(|i| g(&self.latency_buckets[i])),
            },
            events: self.events.counts(),
            history: self.events.history(now_ms),
            state_queue_depth: 0,
            health: self.health.snapshot(wall_ms),
            engine: EngineCounts::default(),
            shared_counts: crate::cluster_count::SharedCounts::disabled(),
        }
    }
}

impl Snapshot {
    /// Read the node: its counters, then the block ledger in one lock trip (no hits folded:
    /// counts need none), then the detector shards' sizes, one shard lock at a time.
    pub fn take(node: &Node) -> Snapshot {
        let now = node.now();
        let mode = node.config().protection.mode;
        let mut s = node.stats.fill(mode, now, crate::clock::wall_ms());
        s.state_queue_depth = node.event_queue_depth() as u64;
        let (engine, shared) = node.peek(|e| (engine_counts(e, now), e.shared_counts().clone()));
        s.engine = engine;
        s.engine.tracked = node.engine().tracked() as u64;
        s.shared_counts = shared;
        s
    }

    /// Packets not forwarded, every reason together.
    pub fn dropped_total(&self) -> u64 {
        self.dropped.iter().sum()
    }
}

fn engine_counts(e: &crate::engine::Ledger, now: Millis) -> EngineCounts {
    let mut c = EngineCounts::default();
    for b in e.blocks().filter(|b| !b.is_expired(now)) {
        if !b.enforced {
            c.observed_active += 1;
        } else if let Some(n) = c.active.get_mut(b.kind as usize) {
            *n += 1;
        }
    }
    let l = e.lists();
    c.whitelist = l.len(crate::blocks::ListKind::Whitelist) as u64;
    c.blacklist = l.len(crate::blocks::ListKind::Blacklist) as u64;
    (c.evicted, c.refused) = e.block_table().evictions();
    let f = e.fraud();
    c.fraud_calls = f.active_calls() as u64;
    c.fraud_concurrent = f.concurrent_total();
    c.fraud_subjects = f.subjects() as u64;
    c.fraud = f.counts().clone();
    c.feeds = e
        .feeds()
        .status()
        .map(|f| FeedCounts {
            name: f.name.clone(),
            entries: f.entries as u64,
            last_update_s: f.last_update.map_or(0, |t| t / 1000),
            pulls_ok: f.pulls_ok,
            pulls_failed: f.pulls_failed,
        })
        .collect();
    c
}
