//! Prometheus metrics (OpenMetrics text), rendered from one [`Snapshot`] of the node's counters:
//! the same one `/api/stats` renders, so the two cannot disagree.
//!
//! Every known label value is always rendered, zeros included, so `rate()` and alerts work from
//! the first scrape. Counters only for values that never go down (prometheus-client adds the
//! `_total` suffix); levels such as open connections or queue depths are gauges.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::blocks::BlockType;
use crate::stats::events::{why_str, WHYS};
use crate::stats::{DropReason, Snapshot, TlsFailure, WsOutcome, LATENCY_BUCKETS_US};

/// Render a snapshot in the OpenMetrics text format (what `/metrics` serves).
pub fn render(s: &Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SnapshotCollector(s.clone())));
    let mut out = String::with_capacity(16 * 1024);
    if prometheus_client::encoding::text::encode(&mut out, &registry).is_err() {
        out.clear();
    }
    out
}

#[derive(Debug)]
struct SnapshotCollector(Snapshot);

impl Collector for SnapshotCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> R {
        let s = &self.0;
        let version = [("version", env!("CARGO_PKG_VERSION"))];
        e.encode_descriptor("sipwarden_build", "sipwarden build", None, MetricType::Info)?
            .encode_info(&version)?;
        packets(&mut e, s)?;
        connections(&mut e, s)?;
        supervision(&mut e, s)?;
        blocks(&mut e, s)?;
        fraud_and_feeds(&mut e, s)?;
        health(&mut e, s)?;
        crate::cluster_count::metrics::encode(&mut e, &s.shared_counts)?;
        tftp(&mut e, s)?;
        latency(&mut e, s)
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

/// A gauge in seconds.
fn seconds(e: &mut Enc<'_>, name: &str, help: &str, secs: f64) -> R {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Gauge)?;
    m.encode_gauge(&secs)
}

fn ms(v: u64) -> f64 {
    v as f64 / 1e3
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

/// Rows by block type from an array indexed by `BlockType as usize`.
fn by_type(counts: &[u64]) -> Vec<(&'static str, u64)> {
    BlockType::ALL
        .iter()
        .map(|t| (t.as_str(), counts.get(*t as usize).copied().unwrap_or(0)))
        .collect()
}

/// SIP packets in, forwarded, dropped, answered.
fn packets(e: &mut Enc<'_>, s: &Snapshot) -> R {
    let p = &s.packets;
    labelled(
        e,
        "sipwarden_sip_packets_received",
        "SIP packets received from phones and the PBX, by transport.",
        MetricType::Counter,
        "transport",
        &[("udp", p.udp), ("tcp", p.tcp), ("tls", p.tls), ("ws", p.ws)],
    )?;
    labelled(
        e,
        "sipwarden_sip_forwarded",
        "SIP messages forwarded, by kind.",
        MetricType::Counter,
        "kind",
        &[
            ("request", p.requests_forwarded),
            ("response", p.responses_forwarded),
        ],
    )?;
    let drops: Vec<_> = DropReason::ALL
        .iter()
        .zip(s.dropped)
        .map(|(r, v)| (r.as_str(), v))
        .collect();
    labelled(
        e,
        "sipwarden_sip_dropped",
        "SIP packets not forwarded, by reason.",
        MetricType::Counter,
        "reason",
        &drops,
    )?;
    counter(
        e,
        "sipwarden_sip_replies_sent",
        "SIP responses sipwarden generated itself (403, 483, 503, ...).",
        p.replies_sent,
    )?;
    counter(
        e,
        "sipwarden_sip_keepalives",
        "Keep-alive packets (CRLF) received.",
        p.keepalives,
    )
}

/// TCP, TLS and WebSocket connections.
fn connections(e: &mut Enc<'_>, s: &Snapshot) -> R {
    let t = &s.tls;
    labelled(
        e,
        "sipwarden_tls_handshakes",
        "TLS handshakes on sip.listen_tls, by outcome.",
        MetricType::Counter,
        "outcome",
        &[("ok", t.handshakes_ok), ("failed", t.handshakes_failed())],
    )?;
    let fails: Vec<_> = TlsFailure::ALL
        .iter()
        .zip(t.failures)
        .map(|(r, v)| (r.as_str(), v))
        .collect();
    labelled(
        e,
        "sipwarden_tls_handshake_failures",
        "TLS handshakes that did not complete, by reason.",
        MetricType::Counter,
        "reason",
        &fails,
    )?;
    gauge(
        e,
        "sipwarden_tls_handshakes_in_progress",
        "TLS connections in handshake now.",
        t.in_handshake,
    )?;
    labelled(
        e,
        "sipwarden_tls_certificate_reloads",
        "Certificate reloads (SIGHUP, file change), by outcome; a failure keeps the old ones.",
        MetricType::Counter,
        "outcome",
        &[("ok", t.reloads_ok), ("failed", t.reloads_failed)],
    )?;
    let c = &s.tcp;
    counter(
        e,
        "sipwarden_connections_closed_blocked",
        "TCP, TLS and WebSocket connections closed because their source was blocked.",
        c.closed_blocked,
    )?;
    counter(
        e,
        "sipwarden_tcp_connections",
        "TCP connections accepted (sipwarden_tcp_connections_open is the gauge of open ones).",
        c.accepted,
    )?;
    gauge(
        e,
        "sipwarden_tcp_connections_open",
        "TCP connections open now.",
        c.open,
    )?;
    counter(
        e,
        "sipwarden_tcp_rejected",
        "TCP connections refused by the connection limits.",
        c.rejected,
    )?;
    counter(
        e,
        "sipwarden_tcp_write_overflows",
        "TCP connections closed because their write queue exceeded sip.tcp_write_queue_bytes.",
        c.write_overflows,
    )?;
    counter(
        e,
        "sipwarden_tcp_write_timeouts",
        "TCP connections closed because a write took longer than sip.tcp_write_timeout.",
        c.write_timeouts,
    )?;
    let upgrades: Vec<_> = WsOutcome::ALL
        .iter()
        .zip(s.ws.upgrades)
        .map(|(o, v)| (o.as_str(), v))
        .collect();
    labelled(
        e,
        "sipwarden_ws_upgrades",
        "WebSocket upgrades (sip.listen_ws, sip.listen_wss), by outcome.",
        MetricType::Counter,
        "outcome",
        &upgrades,
    )?;
    gauge(
        e,
        "sipwarden_ws_connections_open",
        "WebSocket connections open now.",
        s.ws.open,
    )?;
    counter(
        e,
        "sipwarden_ws_oversized",
        "WebSocket connections closed for a message or frame over websocket.max_frame_bytes.",
        s.ws.oversized,
    )
}

/// Caught panics and the listener supervisor.
fn supervision(e: &mut Enc<'_>, s: &Snapshot) -> R {
    counter(
        e,
        "sipwarden_panics",
        "Panics caught while handling a message (a bug: please report it).",
        s.panics,
    )?;
    let restarts: Vec<_> = s
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.restarts))
        .collect();
    labelled(
        e,
        "sipwarden_listener_restarts",
        "Listener tasks restarted by the supervisor after they ended unexpectedly.",
        MetricType::Counter,
        "listener",
        &restarts,
    )?;
    let up: Vec<_> = s
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), u64::from(l.serving)))
        .collect();
    labelled(
        e,
        "sipwarden_listener_up",
        "1 while every task of the listener is serving, 0 while one is being restarted.",
        MetricType::Gauge,
        "listener",
        &up,
    )
}

/// The block table and lists (gauges), blocks made and lifted (counters), alerts.
fn blocks(e: &mut Enc<'_>, s: &Snapshot) -> R {
    let x = &s.engine;
    labelled(
        e,
        "sipwarden_blocks_active",
        "Blocks in force, by type.",
        MetricType::Gauge,
        "type",
        &by_type(&x.active),
    )?;
    labelled(
        e,
        "sipwarden_block_evictions",
        "Blocks that gave way to costlier ones in a full block table (evicted), and new blocks not stored because every block held cost as much or more (refused).",
        MetricType::Counter,
        "outcome",
        &[("evicted", x.evicted), ("refused", x.refused)],
    )?;
    gauge(
        e,
        "sipwarden_blocks_observed_active",
        "Would-be blocks shown in observe mode (nothing is dropped for them).",
        x.observed_active,
    )?;
    labelled(
        e,
        "sipwarden_list_entries",
        "Entries in the whitelist and the static blacklist.",
        MetricType::Gauge,
        "list",
        &[("whitelist", x.whitelist), ("blacklist", x.blacklist)],
    )?;
    gauge(
        e,
        "sipwarden_tracked_sources",
        "Entries held by the detectors (bounded by protection.tracked_sources each).",
        x.tracked,
    )?;
    let ev = &s.events;
    labelled(
        e,
        "sipwarden_blocks",
        "Blocks made, by type.",
        MetricType::Counter,
        "type",
        &by_type(&ev.blocks),
    )?;
    labelled(
        e,
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
            let row = ev.unblocks.get(t as usize);
            for (i, w) in WHYS.iter().enumerate() {
                let v = row.and_then(|r| r.get(i)).copied().unwrap_or(0);
                let labels = [("type", t.as_str()), ("why", why_str(*w))];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
            }
        }
    }
    counter(
        e,
        "sipwarden_alerts",
        "Alerts that are not blocks (INVITE flood episodes, accounts under attack).",
        s.alerts,
    )?;
    counter(
        e,
        "sipwarden_state_events_dropped",
        "State changes not persisted because the state queue was full.",
        s.events_dropped,
    )
}

/// The toll-fraud guard and the threat feeds.
fn fraud_and_feeds(e: &mut Enc<'_>, s: &Snapshot) -> R {
    use crate::engine::fraud::Metric;
    let x = &s.engine;
    gauge(
        e,
        "sipwarden_fraud_calls_tracked",
        "Calls the toll-fraud guard follows (set up or answered, bounded by fraud.max_calls).",
        x.fraud_calls,
    )?;
    gauge(
        e,
        "sipwarden_fraud_concurrent_calls",
        "Concurrent calls counted over all rules' accounts and sources.",
        x.fraud_concurrent,
    )?;
    gauge(
        e,
        "sipwarden_fraud_subjects",
        "Accounts and sources the toll-fraud rules count (bounded by fraud.max_subjects).",
        x.fraud_subjects,
    )?;
    let counts = &x.fraud;
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
        for f in &x.feeds {
            for (outcome, v) in [("ok", f.pulls_ok), ("failed", f.pulls_failed)] {
                let labels = [("feed", f.name.as_str()), ("outcome", outcome)];
                m.encode_family(&labels)?
                    .encode_counter::<NoLabelSet, u64, u64>(&v, None)?;
            }
        }
    }
    let rows: Vec<_> = x
        .feeds
        .iter()
        .map(|f| (f.name.as_str(), f.entries))
        .collect();
    labelled(
        e,
        "sipwarden_feed_entries",
        "Addresses and networks listed, by feed.",
        MetricType::Gauge,
        "feed",
        &rows,
    )?;
    let rows: Vec<_> = x
        .feeds
        .iter()
        .map(|f| (f.name.as_str(), f.last_update_s))
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

/// The background links: state store, Redis, notifier, HEP.
fn health(e: &mut Enc<'_>, s: &Snapshot) -> R {
    let h = &s.health;
    gauge(
        e,
        "sipwarden_state_queue_depth",
        "Batches of state changes waiting for the state task (bounded by the event queue).",
        s.state_queue_depth,
    )?;
    counter(
        e,
        "sipwarden_state_commits",
        "Write transactions committed to the state store.",
        h.state_commits,
    )?;
    counter(
        e,
        "sipwarden_state_events_written",
        "State changes written in those transactions.",
        h.state_events,
    )?;
    {
        let mut m = e.encode_descriptor(
            "sipwarden_state_commit",
            "Time spent committing to the state store.",
            Some(&Unit::Seconds),
            MetricType::Counter,
        )?;
        m.encode_counter::<NoLabelSet, f64, u64>(&(h.state_commit_micros as f64 / 1e6), None)?;
    }
    seconds(
        e,
        "sipwarden_state_commit_max",
        "The longest commit to the state store since start.",
        h.state_max_commit_micros as f64 / 1e6,
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
        "sipwarden_cluster_superseded",
        "Local blocks and list entries dropped at reconciliation because an operator removed them meanwhile.",
        h.cluster_superseded,
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
    seconds(
        e,
        "sipwarden_cluster_full_load",
        "Duration of the last full load of the shared set.",
        ms(h.cluster_full_load_ms),
    )?;
    gauge(
        e,
        "sipwarden_cluster_full_load_rows",
        "Blocks and list entries read by the last full load of the shared set.",
        h.cluster_full_load_rows,
    )?;
    gauge(
        e,
        "sipwarden_cluster_nodes",
        "Nodes seen in the shared log (the nodes table, bounded).",
        h.cluster_nodes,
    )?;
    seconds(
        e,
        "sipwarden_cluster_node_lag",
        "The largest lag over the other nodes: now minus the writing time of their last log entry seen (heartbeats every 3 s).",
        ms(h.cluster_node_lag_ms),
    )?;
    seconds(
        e,
        "sipwarden_cluster_publish_lag",
        "Age of the oldest state change not yet published to Redis (0 when none waits).",
        ms(h.cluster_lag_ms),
    )?;
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

fn tftp(e: &mut Enc<'_>, s: &Snapshot) -> R {
    let t = &s.tftp;
    counter(
        e,
        "sipwarden_tftp_requests",
        "TFTP requests received.",
        t.requests,
    )?;
    counter(
        e,
        "sipwarden_tftp_transfers",
        "TFTP transfers relayed.",
        t.transfers,
    )?;
    counter(
        e,
        "sipwarden_tftp_limited",
        "TFTP requests refused by the per-source rate limit.",
        t.limited,
    )?;
    counter(
        e,
        "sipwarden_tftp_dropped",
        "TFTP requests dropped (blocked sources, limits).",
        t.dropped,
    )?;
    counter(
        e,
        "sipwarden_tftp_malformed",
        "TFTP packets that could not be parsed.",
        t.malformed,
    )
}

fn latency(e: &mut Enc<'_>, s: &Snapshot) -> R {
    let l = &s.latency;
    let mut buckets: Vec<(f64, u64)> = LATENCY_BUCKETS_US
        .iter()
        .zip(l.buckets)
        .map(|(le, n)| (*le as f64 / 1e6, n))
        .collect();
    let in_buckets: u64 = l.buckets.iter().sum();
    buckets.push((f64::MAX, l.count.saturating_sub(in_buckets)));
    let mut m = e.encode_descriptor(
        "sipwarden_forward_latency",
        "Time from receiving a SIP message to sending it on.",
        Some(&Unit::Seconds),
        MetricType::Histogram,
    )?;
    m.encode_histogram::<NoLabelSet>(l.sum_us as f64 / 1e6, l.count, &buckets, None)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::blocks::BlockKey;
    use crate::config::Config;
    use crate::engine::Detection;
    use crate::node::Node;

    /// Counters only for values that never go down, each sample `_total`; levels are gauges.
    #[test]
    fn counters_total_and_levels_gauges() {
        let (node, _rx) = Node::new(Config::default());
        let s = &node.stats;
        // Two TCP connections accepted, one closed again: the counter stays, the gauge falls.
        s.tcp_connections.store(2, Ordering::Relaxed);
        s.tcp_open.store(1, Ordering::Relaxed);
        let text = render(&node.snapshot());
        let mut kinds = std::collections::HashMap::new();
        for l in text.lines() {
            if let Some(rest) = l.strip_prefix("# TYPE ") {
                let mut w = rest.split(' ');
                if let (Some(name), Some(kind)) = (w.next(), w.next()) {
                    kinds.insert(name.to_string(), kind.to_string());
                }
            }
        }
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let sample = l.split(['{', ' ']).next().unwrap_or("");
            let family = kinds
                .iter()
                .filter(|(n, _)| sample.starts_with(n.as_str()))
                .max_by_key(|(n, _)| n.len());
            if let Some((name, kind)) = family {
                if kind == "counter" {
                    assert_eq!(sample, format!("{name}_total"), "{l}");
                }
            }
        }
        for level in [
            "sipwarden_tcp_connections_open",
            "sipwarden_ws_connections_open",
            "sipwarden_tls_handshakes_in_progress",
            "sipwarden_state_queue_depth",
            "sipwarden_state_retry_events",
            "sipwarden_state_commit_max_seconds",
            "sipwarden_blocks_active",
            "sipwarden_blocks_observed_active",
            "sipwarden_list_entries",
            "sipwarden_tracked_sources",
            "sipwarden_listener_up",
            "sipwarden_cluster_configured",
            "sipwarden_cluster_connected",
            "sipwarden_cluster_link_up",
            "sipwarden_cluster_nodes",
            "sipwarden_cluster_full_load_rows",
            "sipwarden_cluster_node_lag_seconds",
            "sipwarden_cluster_publish_lag_seconds",
            "sipwarden_cluster_count_peers",
            "sipwarden_hep_connected",
            "sipwarden_fraud_calls_tracked",
            "sipwarden_fraud_concurrent_calls",
            "sipwarden_fraud_subjects",
        ] {
            assert_eq!(
                kinds.get(level).map(String::as_str),
                Some("gauge"),
                "{level}"
            );
        }
        let lines: Vec<&str> = text.lines().collect();
        for want in [
            "# TYPE sipwarden_tcp_connections counter",
            "sipwarden_tcp_connections_total 2",
            "sipwarden_tcp_connections_open 1",
            "sipwarden_state_events_written_total 0",
            "sipwarden_state_commit_seconds_total 0.0",
            "sipwarden_cluster_superseded_total 0",
        ] {
            assert!(lines.contains(&want), "missing {want:?} in\n{text}");
        }
    }

    #[test]
    fn websocket_series_rendered() {
        let (node, _rx) = Node::new(Config::default());
        let s = &node.stats.ws;
        s.upgrade(crate::stats::WsOutcome::Ok);
        s.upgrade(crate::stats::WsOutcome::Ok);
        s.upgrade(crate::stats::WsOutcome::NoSubprotocol);
        s.open.store(1, Ordering::Relaxed);
        node.stats.packet_in(crate::stats::Transport::Wss);
        let text = render(&node.snapshot());
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
        let lines = |node: &std::sync::Arc<Node>| render(&node.snapshot());
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
        let text = render(&node.snapshot());
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
        let text = render(&node.snapshot());
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
        let text = render(&node.snapshot());
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
