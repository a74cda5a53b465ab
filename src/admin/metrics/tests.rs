//! The exact Prometheus lines the node's counters render as.

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
        include_str!("../../../examples/prometheus-sipwarden-alerts.yml"),
        include_str!("../../../examples/grafana-sipwarden.json"),
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
