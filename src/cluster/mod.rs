//! Scale-out: nodes that share `cluster.redis_url` share their blocks and run-time list entries,
//! so an attacker blocked on one node is blocked on all, and the shared state heals itself
//! whichever side loses it.
//!
//! What lives in Redis ([`wire`] has the key names):
//! - **The current set**, the source of truth a joining node loads: a hash of blocks with a
//!   sorted set of their expiry times (Redis 7.0 has no per-field expiry), a hash of run-time
//!   list entries, and tombstones of operator unblocks and list removals (kept 24 h).
//! - **The log**, a Redis Stream of changes (`XADD sipwarden:log MAXLEN ~ cluster.log_max_len`,
//!   also trimmed to `cluster.log_max_age`), each entry tagged with the writer's node id and
//!   clock. Every node also writes a heartbeat entry every few seconds, so `/api/cluster` lists
//!   nodes that block nothing.
//!
//! How a node uses them:
//! - After its local commit, the state task hands this node's events to [`Cluster::publish`],
//!   which never waits: a bounded queue feeds the [`publish`] task, which writes the set and the
//!   log entry in one MULTI/EXEC.
//! - The [`feed`] task reads the log with `XREAD BLOCK` from the last ID it saw (kept in
//!   memory) and applies other nodes' changes with `Engine::restore` (nothing learnt is
//!   published again; the engine refuses blocks that cover the whitelist or the PBX). What it
//!   learns also goes to the local store, so a restart without Redis keeps it.
//! - On every (re)connect the feed catches up: from the stream when its last ID is still there
//!   and the dataset is the one it left (same epoch), else by a full load of the set. Then it
//!   **reconciles**: every enforced block and run-time list entry this node holds that the set
//!   lacks is published again, unless a tombstone says it was removed after it was made (an
//!   unblock wins over an older block). So a Redis restarted empty is refilled by the nodes,
//!   and a node restarted empty is refilled from the set.
//!
//! Not shared: blocks made in observe mode, list entries from a node's own config file, strike
//! counts, and evictions (a full table is a local matter). Expiry needs no message: every node
//! drops an expired block itself and prunes the set's due fields.
//!
//! Redis going away never touches the packet path: the queue to the publisher is bounded
//! (overflow counted in [`ClusterStats::dropped`]), both tasks reconnect with exponential
//! backoff, and what was made meanwhile reaches the set by reconciliation on reconnect.

mod feed;
mod publish;
pub mod view;
pub mod wire;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::blocks::{Event, ListKind, UnblockReason};
use crate::clock::Millis;
use crate::node::Node;

pub use view::ClusterView;
use wire::{list_field, Hello};

/// Batches waiting for the publisher. Beyond this (Redis away during an attack) new events are
/// not queued, and counted; reconciliation on reconnect still shares what the node holds.
pub const QUEUE: usize = 4096;
/// Events learnt from other nodes waiting for the local store.
pub const LEARNED_QUEUE: usize = 65_536;
/// Batches of learnt events (one per log page or set page, at most a few thousand events
/// each) waiting for the forwarder to the store; the feed waits when this many are queued.
/// Decouples applying from storing, so a full load is as fast as the engine, not the disk.
const STORE_BATCHES: usize = 128;
/// Nodes remembered for `/api/cluster`: the oldest contact gives way (node ids are written
/// by whoever can write to Redis).
pub const MAX_NODES: usize = 64;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a node writes its heartbeat entry, trims the log by age and prunes due fields.
const HEARTBEAT: Duration = Duration::from_secs(3);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long start-up waits for the first load of the cluster's blocks before serving anyway.
const FIRST_SYNC: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.redis_url: {0}")]
    Url(String),
    #[error("cluster.redis_ca: {0}")]
    Ca(String),
}

/// A node seen in the log.
#[derive(Debug, Clone, Default)]
pub struct NodeSeen {
    pub name: String,
    pub addr: String,
    /// Our wall clock when its last entry arrived.
    pub last_contact: Millis,
    /// Its clock when it wrote its last entry.
    pub last_sent: Millis,
    /// Arrival minus writing time of its last entry (clock skew included), ms.
    pub delay_ms: i64,
    pub entries: u64,
}

#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Events sent to Redis (republished ones included).
    pub published: AtomicU64,
    /// Events read from other nodes' log entries.
    pub received: AtomicU64,
    /// Events from other nodes that changed something here.
    pub applied: AtomicU64,
    /// Blocks and list entries this node published again because the shared set lacked them.
    pub reconciled: AtomicU64,
    /// Local blocks and list entries dropped at reconciliation because a newer tombstone said
    /// an operator removed them meanwhile.
    pub superseded: AtomicU64,
    /// Events not shared (publisher queue full) or not stored (learned queue full).
    pub dropped: AtomicU64,
    /// Log entries or set rows that could not be decoded (skipped).
    pub malformed: AtomicU64,
    /// Whether the feed is connected now.
    pub connected: AtomicBool,
    /// Attempts to publish that failed (connect or send; each is retried with backoff).
    pub publish_failures: AtomicU64,
    /// Wall-clock ms since the oldest events not yet published have been waiting (0: none).
    pub waiting_since_ms: AtomicU64,
    /// Reconnects caught up from the stream, and full loads of the set (the first one included).
    pub catchup_stream: AtomicU64,
    pub catchup_full: AtomicU64,
    /// Duration and size of the last full load.
    pub last_full_load_ms: AtomicU64,
    pub last_full_load_rows: AtomicU64,
    /// The last log entry ID read (text, for `/api/cluster`).
    pub last_id: Mutex<String>,
    pub nodes: Mutex<std::collections::HashMap<String, NodeSeen>>,
    /// This node.
    pub me: Mutex<(String, Hello)>,
    pub server: Mutex<String>,
}

impl ClusterStats {
    fn saw(&self, node: &str, hello: Option<&Hello>, sent_at: Millis, now: Millis) {
        let mut nodes = self.nodes.lock();
        if !nodes.contains_key(node) && nodes.len() >= MAX_NODES {
            let oldest = nodes
                .iter()
                .min_by_key(|(_, n)| n.last_contact)
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                nodes.remove(&k);
            }
        }
        let n = nodes.entry(node.to_string()).or_default();
        if let Some(h) = hello {
            n.name.clone_from(&h.name);
            n.addr.clone_from(&h.addr);
        }
        n.last_contact = now;
        n.last_sent = sent_at;
        // Both clocks are the writers' word: a forged one must not overflow the difference.
        let delay = i128::from(now) - i128::from(sent_at);
        n.delay_ms = i64::try_from(delay).unwrap_or(if delay < 0 { i64::MIN } else { i64::MAX });
        n.entries += 1;
    }

    /// The largest lag (now - the writing time of their last entry) over the other nodes, ms.
    pub fn max_lag_ms(&self, now: Millis) -> u64 {
        self.nodes
            .lock()
            .values()
            .map(|n| now.saturating_sub(n.last_sent))
            .max()
            .unwrap_or(0)
    }
}

/// A change for the shared set, alongside its log entry.
#[derive(Debug)]
enum Op {
    SetBlock(String, Vec<u8>, Option<Millis>),
    DelBlock(String, Millis),
    SetList(String, Vec<u8>),
    DelList(String, Millis),
}

#[derive(Debug, Default)]
struct Outgoing {
    ops: Vec<Op>,
    events: Vec<Event>,
}

impl Outgoing {
    /// Add one of this node's events; false when it is not shared.
    fn push(&mut self, ev: &Event, now: Millis) -> bool {
        match ev {
            Event::Blocked(b) if b.enforced => {
                let v = serde_json::to_vec(b).unwrap_or_default();
                self.ops
                    .push(Op::SetBlock(b.key.to_string(), v, b.expires_at));
            }
            Event::Unblocked {
                why: UnblockReason::Expired | UnblockReason::Evicted,
                ..
            } => return false,
            Event::Unblocked { key, .. } => self.ops.push(Op::DelBlock(key.to_string(), now)),
            Event::ListAdded { entry, .. } if entry.source == "config" => return false,
            Event::ListAdded { list, net, entry } => {
                let v = serde_json::to_vec(entry).unwrap_or_default();
                self.ops.push(Op::SetList(list_field(*list, *net), v));
            }
            Event::ListRemoved { list, net } => {
                self.ops.push(Op::DelList(list_field(*list, *net), now));
            }
            Event::Blocked(_) | Event::Strikes { .. } | Event::Alert { .. } => return false,
        }
        self.events.push(ev.clone());
        true
    }

    fn merge(&mut self, more: Outgoing) {
        self.ops.extend(more.ops);
        self.events.extend(more.events);
    }
}

/// What the cluster tasks are told at start.
#[derive(Debug, Clone)]
struct Opts {
    log_max_len: usize,
    log_max_age: Duration,
}

/// The cluster link of one node.
pub struct Cluster {
    node_id: Arc<str>,
    out: Option<mpsc::Sender<Outgoing>>,
    learned: Option<mpsc::Receiver<Event>>,
    publisher: JoinHandle<()>,
    feed: JoinHandle<()>,
    forwarder: JoinHandle<()>,
    pub stats: Arc<ClusterStats>,
}

/// The host name of this machine, for the nodes table when `cluster.node_name` is empty.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn clip(s: &str) -> String {
    s.chars().take(wire::MAX_NAME).collect()
}

/// A Redis client for `url`, trusting the CA in `redis_ca` (a PEM file) for `rediss://` when
/// set. The block sharing and the cluster-wide counting both connect with it.
pub fn redis_client(url: &str, redis_ca: &str) -> Result<redis::Client, ClusterError> {
    if redis_ca.is_empty() {
        return redis::Client::open(url).map_err(|e| ClusterError::Url(e.to_string()));
    }
    let ca = std::fs::read(redis_ca)
        .map_err(|e| ClusterError::Ca(format!("cannot read {redis_ca}: {e}")))?;
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(ca),
    };
    redis::Client::build_with_tls(url, certs).map_err(|e| ClusterError::Ca(e.to_string()))
}

impl Cluster {
    /// Connect to `url` and start sharing. Waits up to a few seconds for the cluster's current
    /// blocks (so they apply before the SIP sockets serve), then carries on in the background
    /// if Redis is not there yet.
    pub async fn start(url: &str, node: Arc<Node>) -> Result<Cluster, ClusterError> {
        let cfg = node.config();
        let client = redis_client(url, &cfg.cluster.redis_ca)?;
        let node_id: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        let server = client.get_connection_info().addr.to_string();
        let name = if cfg.cluster.node_name.is_empty() {
            host_name()
        } else {
            cfg.cluster.node_name.clone()
        };
        let addr = match (cfg.sip.public_address.as_str(), cfg.sip.listen_udp.first()) {
            ("", Some(a)) => a.to_string(),
            ("", None) => cfg
                .sip
                .listen_tcp
                .first()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            (p, _) => p.to_string(),
        };
        let hello = Hello {
            name: clip(&name),
            addr: clip(&addr),
        };
        let opts = Opts {
            log_max_len: cfg.cluster.log_max_len,
            log_max_age: cfg.cluster.log_max_age,
        };
        let stats = Arc::new(ClusterStats::default());
        *stats.me.lock() = (node_id.to_string(), hello.clone());
        *stats.server.lock() = server.clone();
        let (out_tx, out_rx) = mpsc::channel(QUEUE);
        let (learned_tx, learned_rx) = mpsc::channel(LEARNED_QUEUE);
        let (batch_tx, mut batch_rx) = mpsc::channel::<Vec<Event>>(STORE_BATCHES);
        let forwarder = tokio::spawn(async move {
            while let Some(batch) = batch_rx.recv().await {
                for ev in batch {
                    if learned_tx.send(ev).await.is_err() {
                        return;
                    }
                }
            }
        });
        let (synced_tx, synced_rx) = oneshot::channel();
        let publisher = tokio::spawn(
            publish::Publisher {
                client: client.clone(),
                node_id: node_id.clone(),
                stats: stats.clone(),
                opts,
                hello,
            }
            .run(out_rx),
        );
        let feed = feed::Feed {
            client,
            node_id: node_id.clone(),
            node,
            learned: batch_tx,
            republish: out_tx.downgrade(),
            stats: stats.clone(),
            server: server.clone(),
            pos: None,
        };
        let feed = tokio::spawn(feed.run(synced_tx));
        match tokio::time::timeout(FIRST_SYNC, synced_rx).await {
            Ok(Ok(())) => {}
            _ => tracing::warn!(
                target: "sipwarden::cluster",
                %server,
                "cluster blocks not loaded yet (Redis unreachable or the load still running); serving, they apply as they arrive"
            ),
        }
        tracing::info!(target: "sipwarden::cluster", %server, node = %node_id, "cluster sharing started");
        Ok(Cluster {
            node_id,
            out: Some(out_tx),
            learned: Some(learned_rx),
            publisher,
            feed,
            forwarder,
            stats,
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The events learnt from other nodes (for the local store). Taken once.
    pub fn take_learned(&mut self) -> Option<mpsc::Receiver<Event>> {
        self.learned.take()
    }

    /// Share this node's committed events; never waits. `unstored_removals` are list removals
    /// of entries from this node's config file, which stay local.
    pub fn publish(&self, events: &[Event], unstored_removals: &[(ListKind, IpNet)]) {
        let mut out = Outgoing::default();
        let now = crate::clock::wall_ms();
        for ev in events {
            if let Event::ListRemoved { list, net } = ev {
                if unstored_removals.contains(&(*list, *net)) {
                    continue;
                }
            }
            out.push(ev, now);
        }
        if out.ops.is_empty() {
            return;
        }
        let n = out.ops.len() as u64;
        let sent = self.out.as_ref().is_some_and(|tx| tx.try_send(out).is_ok());
        if !sent {
            self.stats.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Stop: give the publisher a moment to send what is queued, then stop both tasks.
    pub async fn close(mut self) {
        self.out = None;
        let _ = tokio::time::timeout(Duration::from_secs(2), &mut self.publisher).await;
        self.publisher.abort();
        self.feed.abort();
        self.forwarder.abort();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.feed.abort();
        self.forwarder.abort();
    }
}

/// Exponential backoff between reconnection attempts.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Backoff(BACKOFF_MIN)
    }

    fn reset(&mut self) {
        self.0 = BACKOFF_MIN;
    }

    fn next(&mut self) -> Duration {
        let d = self.0;
        self.0 = (self.0 * 2).min(BACKOFF_MAX);
        d
    }
}

#[derive(Debug, thiserror::Error)]
enum Lost {
    #[error("{0}")]
    Redis(#[from] redis::RedisError),
    #[error("timed out")]
    Timeout,
    #[error("the node is stopping")]
    Closed,
}

async fn timed<T>(
    d: Duration,
    f: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, Lost> {
    match tokio::time::timeout(d, f).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(Lost::Timeout),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let mut b = Backoff::new();
        assert_eq!(b.next(), BACKOFF_MIN);
        assert_eq!(b.next(), BACKOFF_MIN * 2);
        for _ in 0..20 {
            b.next();
        }
        assert_eq!(b.next(), BACKOFF_MAX);
        b.reset();
        assert_eq!(b.next(), BACKOFF_MIN);
    }

    #[test]
    fn the_nodes_table_is_bounded() {
        let s = ClusterStats::default();
        for i in 0..(MAX_NODES as u64 + 10) {
            s.saw(&format!("n{i}"), None, i, i);
        }
        let nodes = s.nodes.lock();
        assert_eq!(nodes.len(), MAX_NODES);
        assert!(!nodes.contains_key("n0"));
        assert!(nodes.contains_key(&format!("n{}", MAX_NODES + 9)));
    }

    #[test]
    fn expiries_and_evictions_are_not_shared() {
        let key = crate::blocks::BlockKey::whole("192.0.2.1/32".parse().unwrap());
        let mut o = Outgoing::default();
        for why in [UnblockReason::Expired, UnblockReason::Evicted] {
            let ev = Event::Unblocked {
                key,
                kind: crate::blocks::BlockType::Manual,
                why,
            };
            assert!(!o.push(&ev, 1));
        }
        let ev = Event::Unblocked {
            key,
            kind: crate::blocks::BlockType::Manual,
            why: UnblockReason::Manual,
        };
        assert!(o.push(&ev, 1));
        assert!(matches!(&o.ops[..], [Op::DelBlock(f, 1)] if f == "192.0.2.1"));
    }
}
