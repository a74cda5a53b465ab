//! `/api/cluster`: this node, the nodes seen in the log, the Redis link and the counters.

use std::sync::atomic::Ordering;

use serde::Serialize;

use super::ClusterStats;
use crate::clock::Millis;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct NodeRow {
    pub id: String,
    pub name: String,
    pub addr: String,
    /// Our wall clock at its last entry (unix ms), and how long ago that was.
    pub last_contact: Millis,
    pub last_contact_ms_ago: u64,
    /// Now minus the writing time of its last entry seen (heartbeats every few seconds).
    pub lag_ms: u64,
    /// Arrival minus writing time of that entry: the propagation delay (clock skew included).
    pub delay_ms: i64,
    pub entries: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Counters {
    pub published: u64,
    pub received: u64,
    pub applied: u64,
    pub reconciled: u64,
    pub superseded: u64,
    pub dropped: u64,
    pub malformed: u64,
    pub publish_failures: u64,
    pub catchup_stream: u64,
    pub catchup_full: u64,
    pub last_full_load_ms: u64,
    pub last_full_load_rows: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ClusterView {
    pub configured: bool,
    pub id: String,
    pub name: String,
    pub addr: String,
    pub redis: String,
    pub link_up: bool,
    pub last_id: String,
    pub nodes: Vec<NodeRow>,
    pub counters: Counters,
}

impl ClusterView {
    /// The view of a single node (no `cluster.redis_url`).
    pub fn single() -> Self {
        Self::from_stats(&ClusterStats::default(), 0, false)
    }

    pub fn from_stats(s: &ClusterStats, now: Millis, configured: bool) -> Self {
        let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let (id, hello) = s.me.lock().clone();
        let mut nodes: Vec<NodeRow> = s
            .nodes
            .lock()
            .iter()
            .map(|(id, n)| NodeRow {
                id: id.clone(),
                name: n.name.clone(),
                addr: n.addr.clone(),
                last_contact: n.last_contact,
                last_contact_ms_ago: now.saturating_sub(n.last_contact),
                lag_ms: now.saturating_sub(n.last_sent),
                delay_ms: n.delay_ms,
                entries: n.entries,
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        ClusterView {
            configured,
            id,
            name: hello.name,
            addr: hello.addr,
            redis: s.server.lock().clone(),
            link_up: s.connected.load(Ordering::Relaxed),
            last_id: s.last_id.lock().clone(),
            nodes,
            counters: Counters {
                published: g(&s.published),
                received: g(&s.received),
                applied: g(&s.applied),
                reconciled: g(&s.reconciled),
                superseded: g(&s.superseded),
                dropped: g(&s.dropped),
                malformed: g(&s.malformed),
                publish_failures: g(&s.publish_failures),
                catchup_stream: g(&s.catchup_stream),
                catchup_full: g(&s.catchup_full),
                last_full_load_ms: g(&s.last_full_load_ms),
                last_full_load_rows: g(&s.last_full_load_rows),
            },
        }
    }
}
