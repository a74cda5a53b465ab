//! The background links' series: the state store, the Redis link, the notifier, HEP export.

use prometheus_client::encoding::NoLabelSet;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;

use super::{counter, gauge, labelled, ms, seconds, Enc, R};
use crate::stats::Snapshot;

/// The background links: state store, Redis, notifier, HEP.
pub(super) fn health(e: &mut Enc<'_>, s: &Snapshot) -> R {
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
