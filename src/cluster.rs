//! Scale-out: nodes that share `cluster.redis_url` share their blocks and run-time list entries,
//! so an attacker blocked on one node is blocked on all.
//!
//! How:
//! - After its local commit, the state task hands this node's `Blocked`, `Unblocked` and list
//!   events to [`Cluster::publish`], which never waits: a bounded queue feeds the publisher task.
//! - The publisher writes them, in one MULTI/EXEC, to two hashes (`sipwarden:blocks`, field =
//!   block key; `sipwarden:lists`, field = `whitelist 10.0.0.0/8`) and publishes them on the
//!   `sipwarden:events` channel, tagged with this node's random id.
//! - The subscriber applies other nodes' messages with [`Engine::restore`], which queues no
//!   events: nothing learnt is published again (and our own messages are skipped by id). What it
//!   learns also goes to the local store, so a restart without Redis keeps it.
//! - On (re)connect the subscriber subscribes first, then loads both hashes: a node that starts
//!   late, or was cut off, catches up with every current block.
//!
//! Not shared: blocks made in observe mode, list entries from a node's own config file, strike
//! counts, and evictions (a full table is a local matter). Expiry is local: every node drops an
//! expired block itself and deletes the hash field only if it still holds an expired block.
//!
//! Limits: a node that is cut off from Redis misses the unblocks made meanwhile (the blocks run
//! out on their own time). Redis going away never touches the packet path: the queue to the
//! publisher is bounded (overflow counted in [`ClusterStats::dropped`]) and both tasks reconnect
//! with exponential backoff.
//!
//! [`Engine::restore`]: crate::engine::Engine::restore

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::blocks::{Block, Event, ListKind, UnblockReason};
use crate::clock::Millis;
use crate::node::Node;

pub const CHANNEL: &str = "sipwarden:events";
pub const BLOCKS_KEY: &str = "sipwarden:blocks";
pub const LISTS_KEY: &str = "sipwarden:lists";

/// Batches waiting for the publisher. Beyond this (Redis away during an attack) new events are
/// not shared, and counted.
pub const QUEUE: usize = 4096;
/// Events learnt from other nodes waiting for the local store.
pub const LEARNED_QUEUE: usize = 65_536;
/// Events per published message: keeps each message (and a subscriber's parse) small.
const EVENTS_PER_MESSAGE: usize = 256;
/// A message larger than this is not parsed (a broken or hostile publisher).
const MAX_MESSAGE: usize = 4 << 20;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const OP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the subscriber checks its connection is alive (a silent partition would otherwise
/// leave it waiting forever).
const PING_EVERY: Duration = Duration::from_secs(10);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);
/// How long start-up waits for the first load of the cluster's blocks before serving anyway.
const FIRST_SYNC: Duration = Duration::from_secs(3);

/// Delete a hash field only if it still holds a block that has expired: another node may have
/// blocked the same source again in the meantime.
const DEL_EXPIRED: &str = "local v = redis.call('HGET', KEYS[1], ARGV[1]) \
if v then local ok, b = pcall(cjson.decode, v) \
if ok and b.expires_at ~= nil and b.expires_at ~= cjson.null and tonumber(b.expires_at) <= tonumber(ARGV[2]) then \
return redis.call('HDEL', KEYS[1], ARGV[1]) end end return 0";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster.redis_url: {0}")]
    Url(String),
}

#[derive(Debug, Default)]
pub struct ClusterStats {
    /// Events sent to Redis.
    pub published: AtomicU64,
    /// Events from other nodes applied here.
    pub applied: AtomicU64,
    /// Events not shared (publisher queue full) or not stored (learned queue full).
    pub dropped: AtomicU64,
    /// Messages or rows that could not be decoded.
    pub malformed: AtomicU64,
    /// Whether the subscriber is connected now.
    pub connected: AtomicBool,
    /// Attempts to publish that failed (connect or send; each is retried with backoff).
    pub publish_failures: AtomicU64,
    /// Wall-clock ms since the oldest events not yet published have been waiting (0: none).
    pub waiting_since_ms: AtomicU64,
}

/// One message on the channel.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    node: String,
    events: Vec<Event>,
}

#[derive(Debug)]
enum Op {
    Set(&'static str, String, Vec<u8>),
    Del(&'static str, String),
    DelExpired(String, Millis),
}

#[derive(Debug, Default)]
struct Outgoing {
    ops: Vec<Op>,
    events: Vec<Event>,
}

/// The cluster link of one node.
pub struct Cluster {
    node_id: Arc<str>,
    out: Option<mpsc::Sender<Outgoing>>,
    learned: Option<mpsc::Receiver<Event>>,
    publisher: JoinHandle<()>,
    subscriber: JoinHandle<()>,
    pub stats: Arc<ClusterStats>,
}

fn list_field(list: ListKind, net: IpNet) -> String {
    format!("{} {net}", list.as_str())
}

fn parse_list_field(s: &str) -> Option<(ListKind, IpNet)> {
    let (l, n) = s.split_once(' ')?;
    let list = match l {
        "whitelist" => ListKind::Whitelist,
        "blacklist" => ListKind::Blacklist,
        _ => return None,
    };
    Some((list, n.parse().ok()?))
}

impl Cluster {
    /// Connect to `url` and start sharing. Waits up to a few seconds for the cluster's current
    /// blocks (so they apply before the SIP sockets serve), then carries on in the background
    /// if Redis is not there yet.
    pub async fn start(url: &str, node: Arc<Node>) -> Result<Cluster, ClusterError> {
        let client = redis::Client::open(url).map_err(|e| ClusterError::Url(e.to_string()))?;
        let node_id: Arc<str> = format!("{:016x}", rand::random::<u64>()).into();
        let server = client.get_connection_info().addr.to_string();
        let stats = Arc::new(ClusterStats::default());
        let (out_tx, out_rx) = mpsc::channel(QUEUE);
        let (learned_tx, learned_rx) = mpsc::channel(LEARNED_QUEUE);
        let (synced_tx, synced_rx) = oneshot::channel();
        let publisher = tokio::spawn(publisher(
            client.clone(),
            node_id.clone(),
            out_rx,
            stats.clone(),
        ));
        let sub = Subscriber {
            client,
            node_id: node_id.clone(),
            node,
            learned: learned_tx,
            stats: stats.clone(),
            server: server.clone(),
        };
        let subscriber = tokio::spawn(sub.run(synced_tx));
        match tokio::time::timeout(FIRST_SYNC, synced_rx).await {
            Ok(Ok(())) => {}
            _ => tracing::warn!(
                target: "sipwarden::cluster",
                %server,
                "cluster blocks not loaded yet (Redis unreachable); serving, will load them on connect"
            ),
        }
        tracing::info!(target: "sipwarden::cluster", %server, node = %node_id, "cluster sharing started");
        Ok(Cluster {
            node_id,
            out: Some(out_tx),
            learned: Some(learned_rx),
            publisher,
            subscriber,
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
        for ev in events {
            match ev {
                Event::Blocked(b) if b.enforced => {
                    let v = serde_json::to_vec(b).unwrap_or_default();
                    out.ops.push(Op::Set(BLOCKS_KEY, b.key.to_string(), v));
                    out.events.push(ev.clone());
                }
                Event::Unblocked {
                    key,
                    why: UnblockReason::Expired,
                    ..
                } => out
                    .ops
                    .push(Op::DelExpired(key.to_string(), crate::clock::wall_ms())),
                Event::Unblocked {
                    why: UnblockReason::Evicted,
                    ..
                } => {}
                Event::Unblocked { key, .. } => {
                    out.ops.push(Op::Del(BLOCKS_KEY, key.to_string()));
                    out.events.push(ev.clone());
                }
                Event::ListAdded { entry, .. } if entry.source == "config" => {}
                Event::ListAdded { list, net, entry } => {
                    let v = serde_json::to_vec(entry).unwrap_or_default();
                    out.ops.push(Op::Set(LISTS_KEY, list_field(*list, *net), v));
                    out.events.push(ev.clone());
                }
                Event::ListRemoved { list, net } => {
                    if unstored_removals.contains(&(*list, *net)) {
                        continue;
                    }
                    out.ops.push(Op::Del(LISTS_KEY, list_field(*list, *net)));
                    out.events.push(ev.clone());
                }
                Event::Blocked(_) | Event::Strikes { .. } | Event::Alert { .. } => {}
            }
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
        self.subscriber.abort();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.subscriber.abort();
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
    #[error("connection closed")]
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

fn merge(into: &mut Outgoing, more: Outgoing) {
    into.ops.extend(more.ops);
    into.events.extend(more.events);
}

async fn send(
    conn: &mut redis::aio::MultiplexedConnection,
    node_id: &str,
    out: &Outgoing,
) -> Result<(), Lost> {
    let mut p = redis::pipe();
    p.atomic();
    for op in &out.ops {
        match op {
            Op::Set(key, field, value) => p.cmd("HSET").arg(*key).arg(field).arg(value).ignore(),
            Op::Del(key, field) => p.cmd("HDEL").arg(*key).arg(field).ignore(),
            Op::DelExpired(field, now) => p
                .cmd("EVAL")
                .arg(DEL_EXPIRED)
                .arg(1)
                .arg(BLOCKS_KEY)
                .arg(field)
                .arg(*now)
                .ignore(),
        };
    }
    for chunk in out.events.chunks(EVENTS_PER_MESSAGE) {
        let msg = Wire {
            node: node_id.to_string(),
            events: chunk.to_vec(),
        };
        let payload = serde_json::to_vec(&msg).unwrap_or_default();
        p.cmd("PUBLISH").arg(CHANNEL).arg(payload).ignore();
    }
    timed(OP_TIMEOUT, p.query_async::<()>(conn)).await
}

async fn publisher(
    client: redis::Client,
    node_id: Arc<str>,
    mut rx: mpsc::Receiver<Outgoing>,
    stats: Arc<ClusterStats>,
) {
    let mut backoff = Backoff::new();
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut down_logged = false;
    while let Some(mut out) = rx.recv().await {
        stats
            .waiting_since_ms
            .store(crate::clock::wall_ms().max(1), Ordering::Relaxed);
        while out.ops.len() < 4 * EVENTS_PER_MESSAGE {
            match rx.try_recv() {
                Ok(more) => merge(&mut out, more),
                Err(_) => break,
            }
        }
        loop {
            let c = match conn.as_mut() {
                Some(c) => c,
                None => {
                    match timed(CONNECT_TIMEOUT, client.get_multiplexed_async_connection()).await {
                        Ok(c) => conn.insert(c),
                        Err(e) => {
                            stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                            if !down_logged {
                                tracing::warn!(target: "sipwarden::cluster", error = %e, "cannot reach Redis to share blocks; retrying");
                                down_logged = true;
                            }
                            tokio::time::sleep(backoff.next()).await;
                            continue;
                        }
                    }
                }
            };
            match send(c, &node_id, &out).await {
                Ok(()) => {
                    if down_logged {
                        tracing::info!(target: "sipwarden::cluster", "Redis reachable again; sharing blocks");
                        down_logged = false;
                    }
                    backoff.reset();
                    stats
                        .published
                        .fetch_add(out.events.len() as u64, Ordering::Relaxed);
                    stats.waiting_since_ms.store(0, Ordering::Relaxed);
                    break;
                }
                Err(e) => {
                    stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                    if !down_logged {
                        tracing::warn!(target: "sipwarden::cluster", error = %e, "sharing blocks through Redis failed; retrying");
                        down_logged = true;
                    }
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }
}

struct Subscriber {
    client: redis::Client,
    node_id: Arc<str>,
    node: Arc<Node>,
    learned: mpsc::Sender<Event>,
    stats: Arc<ClusterStats>,
    server: String,
}

impl Subscriber {
    async fn run(self, synced: oneshot::Sender<()>) {
        let mut synced = Some(synced);
        let mut backoff = Backoff::new();
        let mut down_logged = false;
        loop {
            let e = self.session(&mut synced, &mut backoff).await;
            if self.stats.connected.swap(false, Ordering::Relaxed) {
                down_logged = false;
            }
            if !down_logged {
                tracing::warn!(target: "sipwarden::cluster", server = %self.server, error = %e, "no cluster feed from Redis; reconnecting");
                down_logged = true;
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// One connection's life: subscribe, load the hashes, apply messages until it fails.
    async fn session(
        &self,
        synced: &mut Option<oneshot::Sender<()>>,
        backoff: &mut Backoff,
    ) -> Lost {
        let pubsub = match timed(CONNECT_TIMEOUT, self.client.get_async_pubsub()).await {
            Ok(p) => p,
            Err(e) => return e,
        };
        let (mut sink, mut stream) = pubsub.split();
        if let Err(e) = timed(OP_TIMEOUT, sink.subscribe(CHANNEL)).await {
            return e;
        }
        let (blocks, lists) = match self.load().await {
            Ok(x) => x,
            Err(e) => return e,
        };
        if let Some(s) = synced.take() {
            let _ = s.send(());
        }
        self.stats.connected.store(true, Ordering::Relaxed);
        backoff.reset();
        tracing::info!(target: "sipwarden::cluster", server = %self.server, blocks, lists, "cluster feed connected");
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.tick().await;
        loop {
            tokio::select! {
                m = stream.next() => match m {
                    Some(m) => self.on_message(m.get_payload_bytes()),
                    None => return Lost::Closed,
                },
                _ = ping.tick() => {
                    if let Err(e) = timed(OP_TIMEOUT, sink.ping::<redis::Value>()).await {
                        return e;
                    }
                }
            }
        }
    }

    /// Load the current blocks and list entries; returns how many applied.
    async fn load(&self) -> Result<(usize, usize), Lost> {
        let mut conn = timed(
            CONNECT_TIMEOUT,
            self.client.get_multiplexed_async_connection(),
        )
        .await?;
        let now = self.node.now();
        let lists: HashMap<String, Vec<u8>> = timed(
            OP_TIMEOUT,
            redis::cmd("HGETALL").arg(LISTS_KEY).query_async(&mut conn),
        )
        .await?;
        let mut n_lists = 0;
        for (field, value) in lists {
            let entry = serde_json::from_slice(&value).ok();
            match (parse_list_field(&field), entry) {
                (Some((list, net)), Some(entry)) => {
                    n_lists += usize::from(self.apply(Event::ListAdded { list, net, entry }));
                }
                _ => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let blocks: HashMap<String, Vec<u8>> = timed(
            OP_TIMEOUT,
            redis::cmd("HGETALL").arg(BLOCKS_KEY).query_async(&mut conn),
        )
        .await?;
        let mut n_blocks = 0;
        let mut expired = Vec::new();
        for (field, value) in blocks {
            match serde_json::from_slice::<Block>(&value) {
                Ok(b) if b.is_expired(now) => expired.push(field),
                Ok(b) => n_blocks += usize::from(self.apply(Event::Blocked(b))),
                Err(_) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        if !expired.is_empty() {
            let mut p = redis::pipe();
            for f in &expired {
                p.cmd("EVAL")
                    .arg(DEL_EXPIRED)
                    .arg(1)
                    .arg(BLOCKS_KEY)
                    .arg(f)
                    .arg(now)
                    .ignore();
            }
            timed(OP_TIMEOUT, p.query_async::<()>(&mut conn)).await?;
        }
        Ok((n_blocks, n_lists))
    }

    fn on_message(&self, payload: &[u8]) {
        if payload.len() > MAX_MESSAGE {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let Ok(msg) = serde_json::from_slice::<Wire>(payload) else {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        if *msg.node == *self.node_id {
            return;
        }
        for ev in msg.events {
            self.apply(ev);
        }
    }

    /// Apply one event from another node; returns whether it changed anything here.
    fn apply(&self, ev: Event) -> bool {
        let now = self.node.now();
        let learned = self.node.with_engine(|e| {
            let local_source = |list: ListKind, net: IpNet| {
                e.lists()
                    .entries(list)
                    .into_iter()
                    .find(|(n, _)| *n == net)
                    .map(|(_, en)| en.source)
            };
            match ev {
                Event::Blocked(b) => {
                    if b.is_expired(now) {
                        return None;
                    }
                    let key = b.key;
                    e.restore(now, Event::Blocked(b.clone()));
                    e.block_table().get(&key).map(|_| Event::Blocked(b))
                }
                Event::Unblocked { key, .. } => {
                    e.block_table().get(&key)?;
                    e.restore(now, ev.clone());
                    Some(ev)
                }
                Event::ListAdded {
                    list,
                    net,
                    mut entry,
                } => {
                    let net = net.trunc();
                    if local_source(list, net).as_deref() == Some("config") {
                        return None;
                    }
                    entry.source = "cluster".into();
                    let ev = Event::ListAdded { list, net, entry };
                    e.restore(now, ev.clone());
                    Some(ev)
                }
                Event::ListRemoved { list, net } => match local_source(list, net).as_deref() {
                    None | Some("config") => None,
                    Some(_) => {
                        e.restore(now, ev.clone());
                        Some(ev)
                    }
                },
                Event::Strikes { .. } | Event::Alert { .. } => None,
            }
        });
        let Some(ev) = learned else { return false };
        self.stats.applied.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(target: "sipwarden::cluster", event = ?ev, "applied from the cluster");
        if self.learned.try_send(ev).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_fields_round_trip() {
        let net: IpNet = "2001:db8::/48".parse().unwrap();
        let f = list_field(ListKind::Blacklist, net);
        assert_eq!(f, "blacklist 2001:db8::/48");
        assert_eq!(parse_list_field(&f), Some((ListKind::Blacklist, net)));
        assert_eq!(parse_list_field("greylist 10.0.0.0/8"), None);
        assert_eq!(parse_list_field("whitelist nonsense"), None);
    }

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
}
