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
use health::health;

mod health;

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
mod tests;
