//! The counting link's Prometheus metrics, rendered (zeros on a single node) by `/metrics`.

use std::sync::atomic::Ordering;

use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;

use super::SharedCounts;

fn counter(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: u64) -> std::fmt::Result {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    m.encode_counter::<NoLabelSet, u64, u64>(&v, None)
}

/// `sipwarden_cluster_count_*`: rounds, entries sent and received, overflow, malformed and
/// clamped input, publish failures, and the peers gauge.
pub fn encode(e: &mut DescriptorEncoder<'_>, counts: &SharedCounts) -> std::fmt::Result {
    let s = counts.stats();
    let g = |f: fn(&super::CountStats) -> &std::sync::atomic::AtomicU64| {
        s.map_or(0, |s| f(s).load(Ordering::Relaxed))
    };
    let rows: [(&str, &str, u64); 7] = [
        (
            "sipwarden_cluster_count_rounds",
            "Rounds of count deltas published to the other nodes.",
            g(|s| &s.rounds),
        ),
        (
            "sipwarden_cluster_count_entries_sent",
            "(detector, source, delta) entries published.",
            g(|s| &s.entries_sent),
        ),
        (
            "sipwarden_cluster_count_entries_received",
            "(detector, source, delta) entries applied from other nodes.",
            g(|s| &s.entries_received),
        ),
        (
            "sipwarden_cluster_count_overflow",
            "Local counts not published: over the entries per round or the pending keys cap.",
            g(|s| &s.overflow),
        ),
        (
            "sipwarden_cluster_count_malformed",
            "Count messages from Redis dropped: too large, undecodable, too many entries or peers.",
            g(|s| &s.malformed),
        ),
        (
            "sipwarden_cluster_count_clamped",
            "Deltas from other nodes clamped to the largest plausible delta.",
            g(|s| &s.clamped),
        ),
        (
            "sipwarden_cluster_count_publish_failures",
            "Rounds not published because Redis was unreachable (their deltas are lost).",
            g(|s| &s.publish_failures),
        ),
    ];
    for (name, help, v) in rows {
        counter(e, name, help, v)?;
    }
    let mut m = e.encode_descriptor(
        "sipwarden_cluster_count_peers",
        "Other nodes heard from within cluster.peer_timeout.",
        None,
        MetricType::Gauge,
    )?;
    m.encode_gauge(&g(|s| &s.peers))
}
