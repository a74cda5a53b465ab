//! `GET /api/stats`: the shapes it answers (the CLI reads the same types) and how one
//! [`Snapshot`] of the node becomes them. `/metrics` renders the same snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::{history::HistoryView, AppState};
use crate::blocks::BlockType;
use crate::config::Mode;
use crate::stats::events::{why_str, WHYS};
use crate::stats::{DropReason, Snapshot, TlsFailure, WsOutcome};

/// `GET /api/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StatsView {
    pub version: String,
    /// `enforce` or `observe`.
    pub mode: String,
    /// Server time, unix seconds.
    pub time: u64,
    pub packets_in: Transports,
    pub forwarded: Forwarded,
    pub replies_sent: u64,
    pub keepalives: u64,
    /// Packets not forwarded, by reason (every reason listed, zeros included).
    pub dropped: BTreeMap<String, u64>,
    pub dropped_total: u64,
    pub active_blocks: ActiveBlocks,
    /// Blocks made since start, by type (every type listed).
    #[serde(default)]
    pub blocks_made: BTreeMap<String, u64>,
    /// Would-be blocks detected in observe mode since start, by type.
    #[serde(default)]
    pub observed_blocks: BTreeMap<String, u64>,
    /// Blocks lifted since start, by why (expired, manual, evicted, whitelisted, aggregated).
    #[serde(default)]
    pub unblocks: BTreeMap<String, u64>,
    pub lists: ListCounts,
    /// Entries held by the detectors.
    #[serde(default)]
    pub tracked_sources: u64,
    pub alerts: u64,
    pub events_dropped: u64,
    pub tcp: TcpCounts,
    #[serde(default)]
    pub tls: TlsCounts,
    #[serde(default)]
    pub ws: WsCounts,
    /// Panics caught on the packet path.
    #[serde(default)]
    pub panics: u64,
    #[serde(default)]
    pub listeners: Vec<ListenerView>,
    pub tftp: TftpCounts,
    pub latency: Latency,
    /// Blocks per type and alerts per minute over the last hour.
    pub history: HistoryView,
    /// The state store, Redis link, notifier and HEP exporter.
    #[serde(default)]
    pub health: HealthView,
}

/// Health of the background links in `/api/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HealthView {
    pub state: StateHealth,
    pub cluster: ClusterHealth,
    pub notify: NotifyHealth,
    pub hep: HepHealth,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StateHealth {
    /// Batches waiting for the state task.
    pub queue_depth: u64,
    pub commits: u64,
    /// State changes written by those commits.
    #[serde(default)]
    pub events: u64,
    pub failures: u64,
    /// Changes waiting for another commit attempt.
    pub retrying: u64,
    /// Time spent in commits since start, and the longest one, microseconds.
    #[serde(default)]
    pub commit_micros: u64,
    #[serde(default)]
    pub max_commit_micros: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterHealth {
    pub configured: bool,
    pub connected: bool,
    pub published: u64,
    pub publish_failures: u64,
    pub applied: u64,
    pub dropped: u64,
    /// Age of the oldest change not yet published, milliseconds.
    pub lag_ms: u64,
    #[serde(default)]
    pub received: u64,
    #[serde(default)]
    pub reconciled: u64,
    #[serde(default)]
    pub superseded: u64,
    #[serde(default)]
    pub malformed: u64,
    /// Reconnects caught up from the log, and full loads of the shared set.
    #[serde(default)]
    pub catchups_stream: u64,
    #[serde(default)]
    pub catchups_full: u64,
    /// Nodes seen in the shared log.
    #[serde(default)]
    pub nodes: u64,
    /// The largest lag over the other nodes, milliseconds.
    #[serde(default)]
    pub node_lag_ms: u64,
    /// Duration (milliseconds) and rows of the last full load of the shared set.
    #[serde(default)]
    pub full_load_ms: u64,
    #[serde(default)]
    pub full_load_rows: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NotifyHealth {
    pub sent: u64,
    pub failed: u64,
    pub dropped: u64,
    pub suppressed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HepHealth {
    pub connected: bool,
    pub sent: u64,
    pub dropped: u64,
    pub failed: u64,
    pub filtered: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Transports {
    pub udp: u64,
    pub tcp: u64,
    #[serde(default)]
    pub tls: u64,
    /// WebSocket and secure WebSocket together.
    #[serde(default)]
    pub ws: u64,
    pub total: u64,
}

/// SIP over WebSocket: upgrades by outcome (every outcome listed), open connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WsCounts {
    pub upgrades: BTreeMap<String, u64>,
    /// Open now (a gauge).
    pub open: u64,
    /// Closed for a message or frame over `websocket.max_frame_bytes`.
    pub oversized: u64,
}

/// TLS counters in `/api/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TlsCounts {
    pub handshakes_ok: u64,
    pub handshakes_failed: u64,
    /// Failed handshakes by reason (every reason listed, zeros included).
    pub failures: BTreeMap<String, u64>,
    /// In handshake now.
    pub in_handshake: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    /// TCP, TLS and WebSocket connections closed because their source was blocked.
    pub closed_blocked: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Forwarded {
    pub requests: u64,
    pub responses: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ActiveBlocks {
    /// Enforced blocks.
    pub total: u64,
    /// Would-be blocks (observe mode).
    pub observe: u64,
    pub by_type: BTreeMap<String, u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListCounts {
    pub whitelist: u64,
    pub blacklist: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TcpCounts {
    /// Open now.
    pub connections: u64,
    /// Accepted since start.
    #[serde(default)]
    pub accepted: u64,
    pub rejected: u64,
    /// Closed because their write queue went over `sip.tcp_write_queue_bytes`.
    #[serde(default)]
    pub write_overflows: u64,
    /// Closed because a write took longer than `sip.tcp_write_timeout`.
    #[serde(default)]
    pub write_timeouts: u64,
}

/// A listener task as the supervisor sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ListenerView {
    pub name: String,
    pub serving: bool,
    pub restarts: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TftpCounts {
    pub requests: u64,
    pub transfers: u64,
    pub limited: u64,
    pub dropped: u64,
    pub malformed: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub avg_us: u64,
}

/// `GET /api/stats`, from one snapshot of the node (the one `/metrics` would render).
pub(crate) async fn stats(State(st): State<Arc<AppState>>) -> Json<StatsView> {
    Json(StatsView::from(&st.node.snapshot()))
}

fn names<T: Copy>(all: &[T], name: fn(T) -> &'static str, values: &[u64]) -> BTreeMap<String, u64> {
    all.iter()
        .zip(values)
        .map(|(k, v)| (name(*k).to_string(), *v))
        .collect()
}

impl From<&Snapshot> for StatsView {
    fn from(s: &Snapshot) -> StatsView {
        let p = &s.packets;
        let x = &s.engine;
        let types = BlockType::ALL;
        let unblocks: Vec<u64> = (0..WHYS.len())
            .map(|w| {
                s.events
                    .unblocks
                    .iter()
                    .map(|row| row.get(w).copied().unwrap_or(0))
                    .sum()
            })
            .collect();
        StatsView {
            version: env!("CARGO_PKG_VERSION").into(),
            mode: match s.mode {
                Mode::Enforce => "enforce",
                Mode::Observe => "observe",
            }
            .into(),
            time: s.now_ms / 1000,
            packets_in: Transports {
                udp: p.udp,
                tcp: p.tcp,
                tls: p.tls,
                ws: p.ws,
                total: p.total_in(),
            },
            forwarded: Forwarded {
                requests: p.requests_forwarded,
                responses: p.responses_forwarded,
            },
            replies_sent: p.replies_sent,
            keepalives: p.keepalives,
            dropped: names(&DropReason::ALL, DropReason::as_str, &s.dropped),
            dropped_total: s.dropped_total(),
            active_blocks: ActiveBlocks {
                total: x.active_total(),
                observe: x.observed_active,
                by_type: names(&types, BlockType::as_str, &x.active),
            },
            blocks_made: names(&types, BlockType::as_str, &s.events.blocks),
            observed_blocks: names(&types, BlockType::as_str, &s.events.observed),
            unblocks: names(&WHYS, why_str, &unblocks),
            lists: ListCounts {
                whitelist: x.whitelist,
                blacklist: x.blacklist,
            },
            tracked_sources: x.tracked,
            alerts: s.alerts,
            events_dropped: s.events_dropped,
            tcp: TcpCounts {
                connections: s.tcp.open,
                accepted: s.tcp.accepted,
                rejected: s.tcp.rejected,
                write_overflows: s.tcp.write_overflows,
                write_timeouts: s.tcp.write_timeouts,
            },
            tls: TlsCounts {
                handshakes_ok: s.tls.handshakes_ok,
                handshakes_failed: s.tls.handshakes_failed(),
                failures: names(&TlsFailure::ALL, TlsFailure::as_str, &s.tls.failures),
                in_handshake: s.tls.in_handshake,
                reloads_ok: s.tls.reloads_ok,
                reloads_failed: s.tls.reloads_failed,
                closed_blocked: s.tcp.closed_blocked,
            },
            ws: WsCounts {
                upgrades: names(&WsOutcome::ALL, WsOutcome::as_str, &s.ws.upgrades),
                open: s.ws.open,
                oversized: s.ws.oversized,
            },
            panics: s.panics,
            listeners: s
                .listeners
                .iter()
                .map(|l| ListenerView {
                    name: l.name.clone(),
                    serving: l.serving,
                    restarts: l.restarts,
                })
                .collect(),
            tftp: TftpCounts {
                requests: s.tftp.requests,
                transfers: s.tftp.transfers,
                limited: s.tftp.limited,
                dropped: s.tftp.dropped,
                malformed: s.tftp.malformed,
            },
            latency: Latency {
                count: s.latency.count,
                avg_us: s.latency.sum_us.checked_div(s.latency.count).unwrap_or(0),
            },
            history: s.history.clone(),
            health: HealthView::from(s),
        }
    }
}

impl From<&Snapshot> for HealthView {
    fn from(s: &Snapshot) -> HealthView {
        let h = &s.health;
        HealthView {
            state: StateHealth {
                queue_depth: s.state_queue_depth,
                commits: h.state_commits,
                events: h.state_events,
                failures: h.state_failures,
                retrying: h.state_retrying,
                commit_micros: h.state_commit_micros,
                max_commit_micros: h.state_max_commit_micros,
            },
            cluster: ClusterHealth {
                configured: h.cluster_configured,
                connected: h.cluster_connected,
                published: h.cluster_published,
                publish_failures: h.cluster_publish_failures,
                applied: h.cluster_applied,
                dropped: h.cluster_dropped,
                lag_ms: h.cluster_lag_ms,
                received: h.cluster_received,
                reconciled: h.cluster_reconciled,
                superseded: h.cluster_superseded,
                malformed: h.cluster_malformed,
                catchups_stream: h.cluster_catchup_stream,
                catchups_full: h.cluster_catchup_full,
                nodes: h.cluster_nodes,
                node_lag_ms: h.cluster_node_lag_ms,
                full_load_ms: h.cluster_full_load_ms,
                full_load_rows: h.cluster_full_load_rows,
            },
            notify: NotifyHealth {
                sent: h.notify_sent,
                failed: h.notify_failed,
                dropped: h.notify_dropped,
                suppressed: h.notify_suppressed,
            },
            hep: HepHealth {
                connected: h.hep_connected,
                sent: h.hep_sent,
                dropped: h.hep_dropped,
                failed: h.hep_failed,
                filtered: h.hep_filtered,
            },
        }
    }
}
