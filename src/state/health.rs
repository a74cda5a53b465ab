//! Health of the background links an operator must watch: the state store, the Redis link, the
//! notifier and the HEP exporter. Each keeps its own counters (an `Arc` it owns); they are
//! attached here once at start so `/metrics` and `/api/stats` can read them from the node.
//!
//! A link that is not configured stays unattached and renders as zeros (a store-less node, a
//! single node without Redis), so dashboards and alerts see every series from the first scrape.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use crate::cluster::ClusterStats;
use crate::notify::NotifyStats;
use crate::state::StateStats;

/// Counters of the HEP exporter (`[hep]`).
#[derive(Debug, Default)]
pub struct HepStats {
    /// HEP packets handed to the socket.
    pub sent: AtomicU64,
    /// Not queued: the export queue was full (the packet path never waits for HEP).
    pub dropped: AtomicU64,
    /// Send errors (collector unreachable, TCP connection lost).
    pub failed: AtomicU64,
    /// Messages not exported because of `hep.only`.
    pub filtered: AtomicU64,
    /// 1 while the exporter has a socket to the collector (UDP: bound; TCP: connected).
    pub connected: AtomicU64,
}

/// The links' counters, attached by each link when it starts.
#[derive(Debug, Default)]
pub struct Health {
    state: OnceLock<Arc<StateStats>>,
    cluster: OnceLock<Arc<ClusterStats>>,
    notify: OnceLock<Arc<NotifyStats>>,
    hep: OnceLock<Arc<HepStats>>,
}

/// A copy of every health value, as rendered.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HealthSnapshot {
    pub state_attached: bool,
    pub state_commits: u64,
    pub state_events: u64,
    pub state_failures: u64,
    pub state_retrying: u64,
    pub state_commit_micros: u64,
    pub state_max_commit_micros: u64,
    pub cluster_configured: bool,
    pub cluster_connected: bool,
    pub cluster_published: u64,
    pub cluster_publish_failures: u64,
    pub cluster_applied: u64,
    pub cluster_dropped: u64,
    pub cluster_malformed: u64,
    pub cluster_received: u64,
    pub cluster_reconciled: u64,
    pub cluster_superseded: u64,
    /// Other nodes in the nodes table (bounded by the cluster module).
    pub cluster_nodes: u64,
    /// Duration and rows of the last full load of the shared set.
    pub cluster_full_load_ms: u64,
    pub cluster_full_load_rows: u64,
    pub cluster_catchup_stream: u64,
    pub cluster_catchup_full: u64,
    /// The largest lag over the other nodes (now - their last log entry seen), milliseconds.
    pub cluster_node_lag_ms: u64,
    /// Age of the oldest event not yet published (0 when none waits), milliseconds.
    pub cluster_lag_ms: u64,
    pub notify_sent: u64,
    pub notify_failed: u64,
    pub notify_dropped: u64,
    pub notify_suppressed: u64,
    pub hep_sent: u64,
    pub hep_dropped: u64,
    pub hep_failed: u64,
    pub hep_filtered: u64,
    pub hep_connected: bool,
}

fn g(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

impl Health {
    pub fn attach_state(&self, s: Arc<StateStats>) {
        let _ = self.state.set(s);
    }

    pub fn attach_cluster(&self, s: Arc<ClusterStats>) {
        let _ = self.cluster.set(s);
    }

    /// The cluster link's counters and nodes table, when `cluster.redis_url` is set.
    pub fn cluster(&self) -> Option<&Arc<ClusterStats>> {
        self.cluster.get()
    }

    /// Several notifiers (webhook, e-mail) share one [`NotifyStats`].
    pub fn attach_notify(&self, s: Arc<NotifyStats>) {
        let _ = self.notify.set(s);
    }

    pub fn attach_hep(&self, s: Arc<HepStats>) {
        let _ = self.hep.set(s);
    }

    /// Read everything; `now_ms` is wall-clock unix milliseconds (for the cluster lag).
    pub fn snapshot(&self, now_ms: u64) -> HealthSnapshot {
        let mut h = HealthSnapshot::default();
        if let Some(s) = self.state.get() {
            h.state_attached = true;
            h.state_commits = g(&s.commits);
            h.state_events = g(&s.events);
            h.state_failures = g(&s.failures);
            h.state_retrying = g(&s.retrying);
            h.state_commit_micros = g(&s.commit_micros);
            h.state_max_commit_micros = g(&s.max_commit_micros);
        }
        if let Some(c) = self.cluster.get() {
            h.cluster_configured = true;
            h.cluster_connected = c.connected.load(Ordering::Relaxed);
            h.cluster_published = g(&c.published);
            h.cluster_publish_failures = g(&c.publish_failures);
            h.cluster_applied = g(&c.applied);
            h.cluster_dropped = g(&c.dropped);
            h.cluster_malformed = g(&c.malformed);
            h.cluster_received = g(&c.received);
            h.cluster_reconciled = g(&c.reconciled);
            h.cluster_superseded = g(&c.superseded);
            h.cluster_nodes = c.nodes.lock().len() as u64;
            h.cluster_full_load_ms = g(&c.last_full_load_ms);
            h.cluster_full_load_rows = g(&c.last_full_load_rows);
            h.cluster_catchup_stream = g(&c.catchup_stream);
            h.cluster_catchup_full = g(&c.catchup_full);
            h.cluster_node_lag_ms = c.max_lag_ms(now_ms);
            let since = g(&c.waiting_since_ms);
            h.cluster_lag_ms = if since == 0 {
                0
            } else {
                now_ms.saturating_sub(since)
            };
        }
        if let Some(n) = self.notify.get() {
            h.notify_sent = g(&n.sent);
            h.notify_failed = g(&n.failed);
            h.notify_dropped = g(&n.dropped);
            h.notify_suppressed = g(&n.suppressed);
        }
        if let Some(x) = self.hep.get() {
            h.hep_sent = g(&x.sent);
            h.hep_dropped = g(&x.dropped);
            h.hep_failed = g(&x.failed);
            h.hep_filtered = g(&x.filtered);
            h.hep_connected = g(&x.connected) != 0;
        }
        h
    }
}
