//! Prometheus metrics (OpenMetrics text): a collector that reads the node's counters at scrape
//! time, plus counts of state events ([`record_event`], called by the state task for every
//! event) and the per-minute history behind the dashboard's chart.
//!
//! Every known label value is always rendered, zeros included, so `rate()` and alerts work from
//! the first scrape.

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use super::history::{History, HistoryView};
use crate::blocks::{BlockType, Event, UnblockReason};
use crate::clock::Millis;
use crate::node::Node;
use crate::stats::{DropReason, LATENCY_BUCKETS_US};

const TYPES: usize = BlockType::ALL.len();
const WHYS: [UnblockReason; 5] = [
    UnblockReason::Expired,
    UnblockReason::Manual,
    UnblockReason::Evicted,
    UnblockReason::Whitelisted,
    UnblockReason::Aggregated,
];

fn why_str(w: UnblockReason) -> &'static str {
    match w {
        UnblockReason::Expired => "expired",
        UnblockReason::Manual => "manual",
        UnblockReason::Evicted => "evicted",
        UnblockReason::Whitelisted => "whitelisted",
        UnblockReason::Aggregated => "aggregated",
    }
}

/// Counts of state events since start, by block type.
#[derive(Debug)]
pub struct EventCounters {
    blocks: [AtomicU64; TYPES],
    /// Would-be blocks in observe mode.
    observed: [AtomicU64; TYPES],
    unblocks: [[AtomicU64; WHYS.len()]; TYPES],
    history: Mutex<History>,
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
    pub fn record(&self, ev: &Event, now: Millis) {
        match ev {
            Event::Blocked(b) => {
                let c = if b.enforced {
                    &self.blocks
                } else {
                    &self.observed
                };
                c[b.kind as usize].fetch_add(1, Ordering::Relaxed);
                self.history.lock().block(b.blocked_at, b.kind);
            }
            Event::Unblocked { kind, why, .. } => {
                self.unblocks[*kind as usize][*why as usize].fetch_add(1, Ordering::Relaxed);
            }
            Event::Alert { .. } => self.history.lock().alert(now),
            Event::ListAdded { .. } | Event::ListRemoved { .. } | Event::Strikes { .. } => {}
        }
    }

    pub fn history(&self, now: Millis) -> HistoryView {
        self.history.lock().view(now)
    }
}

impl Default for EventCounters {
    fn default() -> Self {
        Self::new()
    }
}

/// The process's event counters, fed by the state task through [`record_event`].
pub static EVENTS: EventCounters = EventCounters::new();

/// Count a state event for metrics and the dashboard's history. Cheap: a few atomics and a
/// short lock for blocks and alerts.
pub fn record_event(ev: &Event) {
    EVENTS.record(ev, crate::clock::wall_ms());
}

/// Render the node's metrics in the OpenMetrics text format (what `/metrics` serves).
pub fn render(node: &std::sync::Arc<Node>, events: &'static EventCounters) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(NodeCollector {
        node: node.clone(),
        events,
    }));
    let mut out = String::with_capacity(8 * 1024);
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

struct NodeCollector {
    node: std::sync::Arc<Node>,
    events: &'static EventCounters,
}

impl std::fmt::Debug for NodeCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeCollector")
    }
}

type Enc<'a> = DescriptorEncoder<'a>;
type R = Result<(), std::fmt::Error>;

fn counter(e: &mut Enc<'_>, name: &str, help: &str, v: u64) -> R {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    m.encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

fn gauge(e: &mut Enc<'_>, name: &str, help: &str, v: u64) -> R {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    m.encode_gauge(&v)
}

/// A metric with one label: `rows` are (label value, value).
fn labelled(
    e: &mut Enc<'_>,
    name: &str,
    help: &str,
    kind: MetricType,
    label: &str,
    rows: &[(&str, u64)],
) -> R {
    let counter = matches!(kind, MetricType::Counter);
    let mut m = e.encode_descriptor(name, help, None, kind)?;
    for (value, v) in rows {
        let labels = [(label, *value)];
        let mut f = m.encode_family(&labels)?;
        if counter {
            f.encode_counter::<NoLabelSet, u64, u64>(v, None)?;
        } else {
            f.encode_gauge(v)?;
        }
    }
    Ok(())
}

fn by_type(counts: &[AtomicU64; TYPES]) -> Vec<(&'static str, u64)> {
    BlockType::ALL
        .iter()
        .map(|t| (t.as_str(), counts[*t as usize].load(Ordering::Relaxed)))
        .collect()
}

/// The background links: state store, Redis, notifier, HEP.
fn health(e: &mut Enc<'_>, node: &Node) -> R {
    let h = node.stats.health.snapshot(crate::clock::wall_ms());
    gauge(
        e,
        "sipwarden_state_queue_depth",
        "Batches of state changes waiting for the state task (bounded by the event queue).",
        node.event_queue_depth() as u64,
    )?;
    counter(
        e,
        "sipwarden_state_commits",
        "Write transactions committed to the state store.",
        h.state_commits,
    )?;
    counter(
        e,
        "sipwarden_state_commit_failures",
        "Commits to the state store that failed (disk full, read-only); retried every second.",
        h.state_failures,
    )?;
    gauge(
        e,
        "sipwarden_state_retry_events",
        "State changes waiting for another commit attempt after a failure.",
        h.state_retrying,
    )?;
    gauge(
        e,
        "sipwarden_cluster_configured",
        "1 when cluster.redis_url is set.",
        u64::from(h.cluster_configured),
    )?;
    gauge(
        e,
        "sipwarden_cluster_connected",
        "1 while the Redis subscription is connected.",
        u64::from(h.cluster_connected),
    )?;
    counter(
        e,
        "sipwarden_cluster_published",
        "State changes shared through Redis.",
        h.cluster_published,
    )?;
    counter(
        e,
        "sipwarden_cluster_publish_failures",
        "Attempts to publish to Redis that failed (retried with backoff).",
        h.cluster_publish_failures,
    )?;
    counter(
        e,
        "sipwarden_cluster_applied",
        "State changes from other nodes applied here.",
        h.cluster_applied,
    )?;
    counter(
        e,
        "sipwarden_cluster_dropped",
        "State changes not shared or not stored because a cluster queue was full.",
        h.cluster_dropped,
    )?;
    gauge(
        e,
        "sipwarden_cluster_link_up",
        "1 while this node follows the shared log in Redis.",
        u64::from(h.cluster_connected),
    )?;
    counter(
        e,
        "sipwarden_cluster_received",
        "State changes read from other nodes' entries in the shared log.",
        h.cluster_received,
    )?;
    counter(
        e,
        "sipwarden_cluster_reconciled",
        "Blocks and list entries published again because the shared set lacked them.",
        h.cluster_reconciled,
    )?;
    counter(
        e,
        "sipwarden_cluster_malformed",
        "Entries of the shared log or set that could not be decoded (skipped).",
        h.cluster_malformed,
    )?;
    labelled(
        e,
        "sipwarden_cluster_catchups",
        "Connections to Redis by how the node caught up: stream (resumed from its last log entry) or full (loaded the whole set).",
        MetricType::Counter,
        "path",
        &[
            ("stream", h.cluster_catchup_stream),
            ("full", h.cluster_catchup_full),
        ],
    )?;
    {
        let mut m = e.encode_descriptor(
            "sipwarden_cluster_node_lag",
            "The largest lag over the other nodes: now minus the writing time of their last log entry seen (heartbeats every 3 s).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        m.encode_gauge(&(h.cluster_node_lag_ms as f64 / 1000.0))?;
    }
    {
        let mut m = e.encode_descriptor(
            "sipwarden_cluster_publish_lag",
            "Age of the oldest state change not yet published to Redis (0 when none waits).",
            Some(&Unit::Seconds),
            MetricType::Gauge,
        )?;
        m.encode_gauge(&(h.cluster_lag_ms as f64 / 1000.0))?;
    }
    labelled(
        e,
        "sipwarden_notifications",
        "Notifications by outcome: sent, failed (after retries or a 4xx), dropped (queue full), suppressed (over the rate limit, summed up in a digest).",
        MetricType::Counter,
        "outcome",
        &[
            ("sent", h.notify_sent),
            ("failed", h.notify_failed),
            ("dropped", h.notify_dropped),
            ("suppressed", h.notify_suppressed),
        ],
    )?;
    labelled(
        e,
        "sipwarden_hep_packets",
        "HEP export by outcome: sent, dropped (queue full), failed (send error), filtered (hep.only, hep.sample, blocked-source drops).",
        MetricType::Counter,
        "outcome",
        &[
            ("sent", h.hep_sent),
            ("dropped", h.hep_dropped),
            ("failed", h.hep_failed),
            ("filtered", h.hep_filtered),
        ],
    )?;
    counter(
        e,
        "sipwarden_hep_filtered",
        "Messages the HEP filter skipped before the export queue (hep.only, hep.sample, blocked-source drops).",
        h.hep_filtered,
    )?;
    gauge(
        e,
        "sipwarden_hep_connected",
        "1 while the HEP exporter has a socket to its collector.",
        u64::from(h.hep_connected),
    )
}

impl Collector for NodeCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> R {
        let node = &self.node;
        let s = &node.stats;
        fn g(c: &impl crate::stats::Read) -> u64 {
            c.read()
        }

        let version = [("version", env!("CARGO_PKG_VERSION"))];
        e.encode_descriptor("sipwarden_build", "sipwarden build", None, MetricType::Info)?
            .encode_info(&version)?;

        labelled(
            &mut e,
            "sipwarden_sip_packets_received",
            "SIP packets received from phones and the PBX, by transport.",
            MetricType::Counter,
            "transport",
            &[
                ("udp", g(&s.packets_in_udp)),
                ("tcp", g(&s.packets_in_tcp)),
                ("tls", g(&s.packets_in_tls)),
                ("ws", g(&s.ws.packets_in)),
            ],
        )?;
        let t = &s.tls;
        labelled(
            &mut e,
            "sipwarden_tls_handshakes",
            "TLS handshakes on sip.listen_tls, by outcome.",
            MetricType::Counter,
            "outcome",
            &[
                ("ok", g(&t.handshakes_ok)),
                ("failed", t.handshakes_failed()),
            ],
        )?;
        let fails: Vec<_> = crate::stats::TlsFailure::ALL
            .iter()
            .map(|r| (r.as_str(), t.failures(*r)))
            .collect();
        labelled(
            &mut e,
            "sipwarden_tls_handshake_failures",
            "TLS handshakes that did not complete, by reason.",
            MetricType::Counter,
            "reason",
            &fails,
        )?;
        gauge(
            &mut e,
            "sipwarden_tls_handshakes_in_progress",
            "TLS connections in handshake now.",
            g(&t.in_handshake),
        )?;
        labelled(
            &mut e,
            "sipwarden_tls_certificate_reloads",
            "Certificate reloads (SIGHUP, file change), by outcome; a failure keeps the old ones.",
            MetricType::Counter,
            "outcome",
            &[("ok", g(&t.reloads_ok)), ("failed", g(&t.reloads_failed))],
        )?;
        counter(
            &mut e,
            "sipwarden_connections_closed_blocked",
            "TCP, TLS and WebSocket connections closed because their source was blocked.",
            g(&s.conns_closed_blocked),
        )?;
        labelled(
            &mut e,
            "sipwarden_sip_forwarded",
            "SIP messages forwarded, by kind.",
            MetricType::Counter,
            "kind",
            &[
                ("request", g(&s.requests_forwarded)),
                ("response", g(&s.responses_forwarded)),
            ],
        )?;
        let drops: Vec<_> = DropReason::ALL
            .iter()
            .map(|r| (r.as_str(), s.dropped(*r)))
            .collect();
        labelled(
            &mut e,
            "sipwarden_sip_dropped",
            "SIP packets not forwarded, by reason.",
            MetricType::Counter,
            "reason",
            &drops,
        )?;
        counter(
            &mut e,
            "sipwarden_sip_replies_sent",
            "SIP responses sipwarden generated itself (403, 483, 503, ...).",
            g(&s.replies_sent),
        )?;
        counter(
            &mut e,
            "sipwarden_sip_keepalives",
            "Keep-alive packets (CRLF) received.",
            g(&s.keepalives),
        )?;
        counter(
            &mut e,
            "sipwarden_tcp_connections",
            "TCP connections accepted.",
            g(&s.tcp_connections),
        )?;
        gauge(
            &mut e,
            "sipwarden_tcp_connections_open",
            "TCP connections open now.",
            g(&s.tcp_open),
        )?;
        counter(
            &mut e,
            "sipwarden_tcp_rejected",
            "TCP connections refused by the connection limits.",
            g(&s.tcp_rejected),
        )?;
        counter(
            &mut e,
            "sipwarden_tcp_write_overflows",
            "TCP connections closed because their write queue exceeded sip.tcp_write_queue_bytes.",
            g(&s.tcp_write_overflows),
        )?;
        counter(
            &mut e,
            "sipwarden_tcp_write_timeouts",
            "TCP connections closed because a write took longer than sip.tcp_write_timeout.",
            g(&s.tcp_write_timeouts),
        )?;
        let upgrades: Vec<_> = crate::stats::WsOutcome::ALL
            .iter()
            .map(|o| (o.as_str(), s.ws.upgrades(*o)))
            .collect();
        labelled(
            &mut e,
            "sipwarden_ws_upgrades",
            "WebSocket upgrades (sip.listen_ws, sip.listen_wss), by outcome.",
            MetricType::Counter,
            "outcome",
            &upgrades,
        )?;
        gauge(
            &mut e,
            "sipwarden_ws_connections_open",
            "WebSocket connections open now.",
            g(&s.ws.open),
        )?;
        counter(
            &mut e,
            "sipwarden_ws_oversized",
            "WebSocket connections closed for a message or frame over websocket.max_frame_bytes.",
            g(&s.ws.oversized),
        )?;
        counter(
            &mut e,
            "sipwarden_panics",
            "Panics caught while handling a message (a bug: please report it).",
            g(&s.panics),
        )?;
        let listeners = s.listeners.states();
        let restarts: Vec<_> = listeners
            .iter()
            .map(|l| (l.name.as_str(), l.restarts))
            .collect();
        labelled(
            &mut e,
            "sipwarden_listener_restarts",
            "Listener tasks restarted by the supervisor after they ended unexpectedly.",
            MetricType::Counter,
            "listener",
            &restarts,
        )?;
        let up: Vec<_> = listeners
            .iter()
            .map(|l| (l.name.as_str(), u64::from(l.serving)))
            .collect();
        labelled(
            &mut e,
            "sipwarden_listener_up",
            "1 while every task of the listener is serving, 0 while one is being restarted.",
            MetricType::Gauge,
            "listener",
            &up,
        )?;

        let (active, observed, white, black, evictions) = node.inspect(|eng| {
            let mut active = [0u64; TYPES];
            let mut observed = 0u64;
            for b in eng.blocks() {
                if b.enforced {
                    active[b.kind as usize] += 1;
                } else {
                    observed += 1;
                }
            }
            let l = eng.lists();
            (
                active,
                observed,
                l.len(crate::blocks::ListKind::Whitelist) as u64,
                l.len(crate::blocks::ListKind::Blacklist) as u64,
                eng.block_table().evictions(),
            )
        });
        // Outside the ledger's lock: this takes each detector shard's in turn.
        let tracked = node.engine().tracked() as u64;
        let rows: Vec<_> = BlockType::ALL
            .iter()
            .map(|t| (t.as_str(), active[*t as usize]))
            .collect();
        labelled(
            &mut e,
            "sipwarden_blocks_active",
            "Blocks in force, by type.",
            MetricType::Gauge,
            "type",
            &rows,
        )?;
        labelled(
            &mut e,
            "sipwarden_block_evictions",
            "Blocks that gave way to costlier ones in a full block table (evicted), and new blocks not stored because every block held cost as much or more (refused).",
            MetricType::Counter,
            "outcome",
            &[("evicted", evictions.0), ("refused", evictions.1)],
        )?;
        gauge(
            &mut e,
            "sipwarden_blocks_observed_active",
            "Would-be blocks shown in observe mode (nothing is dropped for them).",
            observed,
        )?;
        labelled(
            &mut e,
            "sipwarden_list_entries",
            "Entries in the whitelist and the static blacklist.",
            MetricType::Gauge,
            "list",
            &[("whitelist", white), ("blacklist", black)],
        )?;
        gauge(
            &mut e,
            "sipwarden_tracked_sources",
            "Entries held by the detectors (bounded by protection.tracked_sources each).",
            tracked,
        )?;

        fraud_and_feeds(&mut e, node)?;

        let ev = self.events;
        labelled(
            &mut e,
            "sipwarden_blocks",
            "Blocks made, by type.",
            MetricType::Counter,
            "type",
            &by_type(&ev.blocks),
        )?;
        labelled(
            &mut e,
            "sipwarden_observed_blocks",
            "Would-be blocks detected in observe mode, by type.",
            MetricType::Counter,
            "type",
            &by_type(&ev.observed),
        )?;
        {
            let mut m = e.encode_descriptor(
                "sipwarden_unblocks",
                "Blocks lifted, by type and why.",
                None,
                MetricType::Counter,
            )?;
            for t in BlockType::ALL {
                for w in WHYS {
                    let v = ev.unblocks[t as usize][w as usize].load(Ordering::Relaxed);
                    let labels = [("type", t.as_str()), ("why", why_str(w))];
                    m.encode_family(&labels)?
                        .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
                }
            }
        }
        counter(
            &mut e,
            "sipwarden_alerts",
            "Alerts that are not blocks (INVITE flood episodes, accounts under attack).",
            g(&s.alerts),
        )?;
        counter(
            &mut e,
            "sipwarden_state_events_dropped",
            "State changes not persisted because the state queue was full.",
            g(&s.events_dropped),
        )?;

        health(&mut e, node)?;
        let counts = node.inspect(|eng| eng.shared_counts().clone());
        crate::cluster_count::metrics::encode(&mut e, &counts)?;

        counter(
            &mut e,
            "sipwarden_tftp_requests",
            "TFTP requests received.",
            g(&s.tftp_requests),
        )?;
        counter(
            &mut e,
            "sipwarden_tftp_transfers",
            "TFTP transfers relayed.",
            g(&s.tftp_transfers),
        )?;
        counter(
            &mut e,
            "sipwarden_tftp_limited",
            "TFTP requests refused by the per-source rate limit.",
            g(&s.tftp_limited),
        )?;
        counter(
            &mut e,
            "sipwarden_tftp_dropped",
            "TFTP requests dropped (blocked sources, limits).",
            g(&s.tftp_dropped),
        )?;
        counter(
            &mut e,
            "sipwarden_tftp_malformed",
            "TFTP packets that could not be parsed.",
            g(&s.tftp_malformed),
        )?;

        let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_US
            .iter()
            .zip(&s.latency_buckets)
            .map(|(le, n)| (*le as f64 / 1e6, g(n)))
            .collect();
        let count = g(&s.latency_count);
        let in_buckets: u64 = buckets.iter().map(|(_, n)| n).sum();
        buckets.push((f64::MAX, count.saturating_sub(in_buckets)));
        let mut m = e.encode_descriptor(
            "sipwarden_forward_latency",
            "Time from receiving a SIP message to sending it on.",
            Some(&Unit::Seconds),
            MetricType::Histogram,
        )?;
        m.encode_histogram::<NoLabelSet>(g(&s.latency_sum_us) as f64 / 1e6, count, &buckets, None)
    }
}

/// The toll-fraud guard and the threat feeds: one engine read for both.
fn fraud_and_feeds(e: &mut Enc<'_>, node: &Node) -> R {
    use crate::engine::fraud::Metric;
    let (calls, concurrent, subjects, counts, feeds) = node.inspect(|eng| {
        let f = eng.fraud();
        let feeds: Vec<_> = eng.feeds().status().cloned().collect();
        (
            f.active_calls() as u64,
            f.concurrent_total(),
            f.subjects() as u64,
            f.counts().clone(),
            feeds,
        )
    });
    gauge(
        e,
        "sipwarden_fraud_calls_tracked",
        "Calls the toll-fraud guard follows (set up or answered, bounded by fraud.max_calls).",
        calls,
    )?;
    gauge(
        e,
        "sipwarden_fraud_concurrent_calls",
        "Concurrent calls counted over all rules' accounts and sources.",
        concurrent,
    )?;
    gauge(
        e,
        "sipwarden_fraud_subjects",
        "Accounts and sources the toll-fraud rules count (bounded by fraud.max_subjects).",
        subjects,
    )?;
    let rows: Vec<_> = Metric::ALL
        .iter()
        .zip(counts.rejected)
        .map(|(m, v)| (m.as_str(), v))
        .collect();
    labelled(
        e,
        "sipwarden_fraud_rejected",
        "INVITEs refused by a toll-fraud rule (retransmissions included), by the limit (\"blocked\": an earlier block).",
        MetricType::Counter,
        "limit",
        &rows,
    )?;
    labelled(
        e,
        "sipwarden_fraud_blocks",
        "Toll-fraud rules with action = \"block\" that blocked an account or a source.",
        MetricType::Counter,
        "per",
        &[
            ("account", counts.blocked_accounts),
            ("source", counts.blocked_sources),
        ],
    )?;
    labelled(
        e,
        "sipwarden_fraud_alerts",
        "Toll-fraud alerts: warnings, and critical findings that did not refuse the call.",
        MetricType::Counter,
        "level",
        &[
            ("warning", counts.warnings),
            ("critical", counts.critical_alerts),
        ],
    )?;
    counter(
        e,
        "sipwarden_fraud_calls_ended",
        "Calls ended by sipwarden at their maximum duration (fraud.on_max_duration = \"bye\").",
        counts.ended,
    )?;
    {
        let mut m = e.encode_descriptor(
            "sipwarden_feed_pulls",
            "Threat-feed pulls, by feed and outcome.",
            None,
            MetricType::Counter,
        )?;
        for f in &feeds {
            for (outcome, v) in [("ok", f.pulls_ok), ("failed", f.pulls_failed)] {
                let labels = [("feed", f.name.as_str()), ("outcome", outcome)];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
            }
        }
    }
    let rows: Vec<_> = feeds
        .iter()
        .map(|f| (f.name.as_str(), f.entries as u64))
        .collect();
    labelled(
        e,
        "sipwarden_feed_entries",
        "Addresses and networks listed, by feed.",
        MetricType::Gauge,
        "feed",
        &rows,
    )?;
    let rows: Vec<_> = feeds
        .iter()
        .map(|f| (f.name.as_str(), f.last_update.map_or(0, |t| t / 1000)))
        .collect();
    labelled(
        e,
        "sipwarden_feed_last_update_seconds",
        "Unix time of the feed's last successful pull (0: none yet).",
        MetricType::Gauge,
        "feed",
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::BlockKey;
    use crate::config::Config;
    use crate::engine::Detection;

    #[test]
    fn websocket_series_rendered() {
        let (node, _rx) = Node::new(Config::default());
        let s = &node.stats.ws;
        s.upgrade(crate::stats::WsOutcome::Ok);
        s.upgrade(crate::stats::WsOutcome::Ok);
        s.upgrade(crate::stats::WsOutcome::NoSubprotocol);
        s.open.store(1, Ordering::Relaxed);
        node.stats.packet_in(crate::stats::Transport::Wss);
        let text = render(&node, Box::leak(Box::new(EventCounters::new())));
        for want in [
            "sipwarden_ws_upgrades_total{outcome=\"ok\"} 2",
            "sipwarden_ws_upgrades_total{outcome=\"no_subprotocol\"} 1",
            "sipwarden_ws_upgrades_total{outcome=\"blocked\"} 0",
            "# TYPE sipwarden_ws_connections_open gauge",
            "sipwarden_ws_connections_open 1",
            "sipwarden_ws_oversized_total 0",
            "sipwarden_sip_packets_received_total{transport=\"ws\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
    }

    #[test]
    fn health_rendered() {
        let (node, _rx) = Node::new(Config::default());
        let lines =
            |node: &std::sync::Arc<Node>| render(node, Box::leak(Box::new(EventCounters::new())));
        // Nothing attached: every series is there, at zero.
        let text = lines(&node);
        for want in [
            "# TYPE sipwarden_state_commit_failures counter",
            "sipwarden_state_commit_failures_total 0",
            "sipwarden_state_queue_depth 0",
            "sipwarden_cluster_connected 0",
            "sipwarden_cluster_publish_lag_seconds 0.0",
            "sipwarden_notifications_total{outcome=\"failed\"} 0",
            "sipwarden_hep_packets_total{outcome=\"dropped\"} 0",
            "sipwarden_hep_filtered_total 0",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }

        let st = std::sync::Arc::new(crate::state::StateStats::default());
        st.commits.store(7, Ordering::Relaxed);
        st.failures.store(2, Ordering::Relaxed);
        st.retrying.store(5, Ordering::Relaxed);
        node.stats.health.attach_state(st);
        let cl = std::sync::Arc::new(crate::cluster::ClusterStats::default());
        cl.connected.store(true, Ordering::Relaxed);
        cl.publish_failures.store(3, Ordering::Relaxed);
        cl.received.store(11, Ordering::Relaxed);
        cl.reconciled.store(6, Ordering::Relaxed);
        cl.catchup_stream.store(2, Ordering::Relaxed);
        cl.catchup_full.store(1, Ordering::Relaxed);
        node.stats.health.attach_cluster(cl);
        let n = std::sync::Arc::new(crate::notify::NotifyStats::default());
        n.sent.store(4, Ordering::Relaxed);
        n.dropped.store(1, Ordering::Relaxed);
        node.stats.health.attach_notify(n);
        let h = std::sync::Arc::new(crate::state::health::HepStats::default());
        h.sent.store(9, Ordering::Relaxed);
        h.connected.store(1, Ordering::Relaxed);
        node.stats.health.attach_hep(h);
        let text = lines(&node);
        for want in [
            "sipwarden_state_commits_total 7",
            "sipwarden_state_commit_failures_total 2",
            "sipwarden_state_retry_events 5",
            "sipwarden_cluster_configured 1",
            "sipwarden_cluster_connected 1",
            "sipwarden_cluster_publish_failures_total 3",
            "sipwarden_cluster_link_up 1",
            "sipwarden_cluster_received_total 11",
            "sipwarden_cluster_reconciled_total 6",
            "sipwarden_cluster_catchups_total{path=\"stream\"} 2",
            "sipwarden_cluster_catchups_total{path=\"full\"} 1",
            "sipwarden_cluster_node_lag_seconds 0.0",
            "sipwarden_notifications_total{outcome=\"sent\"} 4",
            "sipwarden_notifications_total{outcome=\"dropped\"} 1",
            "sipwarden_hep_packets_total{outcome=\"sent\"} 9",
            "sipwarden_hep_connected 1",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
    }

    /// The example alert rules and dashboard only name metrics that exist.
    #[test]
    fn examples_name_rendered_metrics() {
        let (node, _rx) = Node::new(Config::default());
        let text = render(&node, Box::leak(Box::new(EventCounters::new())));
        // Sample names, and for families without samples yet (no listener in a bare node) the
        // name in `# TYPE` plus the suffix of its type.
        let mut rendered: std::collections::HashSet<String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_string)
            .collect();
        for l in text.lines() {
            let mut w = l.split(' ').skip(2);
            if let (Some(name), Some(kind)) = (w.next(), w.next()) {
                let suffix = if kind == "counter" { "_total" } else { "" };
                rendered.insert(format!("{name}{suffix}"));
            }
        }
        for file in [
            include_str!("../../examples/prometheus-sipwarden-alerts.yml"),
            include_str!("../../examples/grafana-sipwarden.json"),
        ] {
            let mut rest = file;
            while let Some(i) = rest.find("sipwarden_") {
                let tail = rest.get(i..).unwrap_or("");
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                let name = tail.get(..end).unwrap_or("");
                assert!(rendered.contains(name), "{name} is not rendered");
                rest = tail.get(end..).unwrap_or("");
            }
        }
    }

    #[test]
    fn block_evictions_rendered() {
        let mut cfg = Config::default();
        cfg.protection.max_blocks = 2;
        let (node, _rx) = Node::new(cfg);
        let now = node.now();
        node.with_engine(|e| {
            for (i, kind) in [BlockType::Register, BlockType::Scanner, BlockType::Register]
                .into_iter()
                .enumerate()
            {
                let ip: std::net::IpAddr = format!("192.0.2.{}", i + 1).parse().unwrap();
                let d = Detection {
                    key: BlockKey::whole(ip.into()),
                    kind,
                    reason: "test".into(),
                    duration: std::time::Duration::from_secs(60),
                    evidence: vec![],
                };
                e.block(now, d, "");
            }
            // A scanner block is cheaper than everything held: refused.
            let d = Detection {
                key: BlockKey::whole("192.0.2.9".parse::<std::net::IpAddr>().unwrap().into()),
                kind: BlockType::Scanner,
                reason: "test".into(),
                duration: std::time::Duration::from_secs(60),
                evidence: vec![],
            };
            e.block(now, d, "");
        });
        let text = render(&node, Box::leak(Box::new(EventCounters::new())));
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "# TYPE sipwarden_block_evictions counter",
            "sipwarden_block_evictions_total{outcome=\"evicted\"} 1",
            "sipwarden_block_evictions_total{outcome=\"refused\"} 1",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn fraud_and_feed_metrics_rendered() {
        let mut cfg = Config::default();
        cfg.fraud.enabled = true;
        cfg.fraud.rules = vec![crate::config::FraudRule {
            calls_per_minute: 1,
            ..crate::config::FraudRule::default()
        }];
        let (node, _rx) = Node::new(cfg);
        let now = node.now();
        let src: ipnet::IpNet = "192.0.2.7/32".parse().unwrap();
        node.with_engine(|e| {
            let g = e.fraud_mut();
            assert!(g
                .on_invite(now, src, b"1001", b"0044", b"c1", true)
                .reject
                .is_none());
            assert!(g
                .on_invite(now, src, b"1001", b"0044", b"c2", true)
                .reject
                .is_some());
            let nets: Vec<ipnet::IpNet> = vec!["198.51.100.0/24".parse().unwrap()];
            e.feed_update(now, "apiban", "https://apiban.org", &nets, Some(101), None);
            e.feed_update(
                now,
                "apiban",
                "https://apiban.org",
                &[],
                None,
                Some("timeout".into()),
            );
        });
        let text = render(&node, Box::leak(Box::new(EventCounters::new())));
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "# TYPE sipwarden_fraud_calls_tracked gauge",
            "sipwarden_fraud_calls_tracked 1",
            "sipwarden_fraud_concurrent_calls 1",
            "sipwarden_fraud_subjects 1",
            "# TYPE sipwarden_fraud_rejected counter",
            "sipwarden_fraud_rejected_total{limit=\"calls_per_minute\"} 1",
            "sipwarden_fraud_rejected_total{limit=\"concurrent\"} 0",
            "sipwarden_fraud_blocks_total{per=\"account\"} 0",
            "sipwarden_fraud_alerts_total{level=\"warning\"} 1",
            "sipwarden_fraud_calls_ended_total 0",
            "sipwarden_feed_pulls_total{feed=\"apiban\",outcome=\"ok\"} 1",
            "sipwarden_feed_pulls_total{feed=\"apiban\",outcome=\"failed\"} 1",
            "sipwarden_feed_entries{feed=\"apiban\"} 1",
            &format!(
                "sipwarden_feed_last_update_seconds{{feed=\"apiban\"}} {}",
                now / 1000
            ),
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{text}");
        }
    }
}
