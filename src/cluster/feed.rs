//! The feed task: catches up on every (re)connect (from the stream, or by a full load of the
//! set), reconciles the set with what this node holds, then follows the log with `XREAD BLOCK`.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::wire::{self, Body, Entry, StreamId};
use super::{timed, Backoff, ClusterStats, Lost, Outgoing};
use super::{CONNECT_TIMEOUT, OP_TIMEOUT};
use crate::blocks::{Block, Event, ListKind, UnblockReason};
use crate::clock::{wall_ms, Millis};
use crate::engine::Ledger;
use crate::node::Node;

/// How long one XREAD waits for new entries before asking again (also how soon a dead link
/// is noticed when the socket stays silent).
const BLOCK_MS: u64 = 2000;
/// Entries per XREAD, rows per HSCAN, events applied under one engine lock: bounds each
/// reply in memory (entries are capped at `wire::MAX_ENTRY`) and each lock hold.
const READ_COUNT: usize = 500;
const SCAN_COUNT: usize = 5000;
const APPLY_BATCH: usize = 1000;
/// Events per republished batch at reconciliation.
const REPUBLISH_BATCH: usize = 512;

/// Where this node is in the log of one Redis dataset.
#[derive(Debug, Clone)]
pub(super) struct Pos {
    id: StreamId,
    epoch: String,
}

pub(super) struct Feed {
    pub client: redis::Client,
    pub node_id: Arc<str>,
    pub node: Arc<Node>,
    pub learned: mpsc::Sender<Vec<Event>>,
    pub republish: mpsc::WeakSender<Outgoing>,
    pub stats: Arc<ClusterStats>,
    pub server: String,
    pub pos: Option<Pos>,
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// The field/value pairs of an HSCAN page or HGETALL reply (RESP2: a flat array; RESP3: a map).
fn pairs(v: &Value) -> Vec<(&[u8], &[u8])> {
    match v {
        Value::Array(a) => a
            .chunks(2)
            .filter_map(|p| Some((bulk(p.first()?)?, bulk(p.get(1)?)?)))
            .collect(),
        Value::Map(m) => m
            .iter()
            .filter_map(|(k, v)| Some((bulk(k)?, bulk(v)?)))
            .collect(),
        _ => Vec::new(),
    }
}

fn names(v: &Value) -> HashSet<Vec<u8>> {
    match v {
        Value::Array(a) => a.iter().filter_map(bulk).map(<[u8]>::to_vec).collect(),
        _ => HashSet::new(),
    }
}

type Conn = redis::aio::MultiplexedConnection;

impl Feed {
    pub(super) async fn run(mut self, synced: oneshot::Sender<()>) {
        let mut synced = Some(synced);
        let mut backoff = Backoff::new();
        let mut down_logged = false;
        loop {
            let e = self.session(&mut synced, &mut backoff).await;
            if self.stats.connected.swap(false, Ordering::Relaxed) {
                down_logged = false;
            }
            if matches!(e, Lost::Closed) {
                return;
            }
            if !down_logged {
                tracing::warn!(target: "sipwarden::cluster", server = %self.server, error = %e, "no cluster feed from Redis; reconnecting");
                down_logged = true;
            }
            tokio::time::sleep(backoff.next()).await;
        }
    }

    /// One connection's life: catch up, reconcile, follow the log until it fails.
    async fn session(
        &mut self,
        synced: &mut Option<oneshot::Sender<()>>,
        backoff: &mut Backoff,
    ) -> Lost {
        let t = Instant::now();
        let (mut cmd, blk, how, rows) = match self.connect_and_catch_up().await {
            Ok(x) => x,
            Err(e) => return e,
        };
        let caught_up_ms = t.elapsed().as_millis() as u64;
        // The set is enforced here now: serving may start while reconciliation runs.
        if let Some(s) = synced.take() {
            let _ = s.send(());
        }
        self.stats.connected.store(true, Ordering::Relaxed);
        backoff.reset();
        let t = Instant::now();
        let (re, gone) = match self.reconcile(&mut cmd).await {
            Ok(x) => x,
            Err(e) => return e,
        };
        tracing::info!(
            target: "sipwarden::cluster",
            server = %self.server,
            caught_up_by = how,
            rows,
            caught_up_ms,
            republished = re,
            superseded = gone,
            reconcile_ms = t.elapsed().as_millis() as u64,
            "cluster feed connected"
        );
        self.follow(cmd, blk).await
    }

    /// Connect, then catch up from the stream or by a full load; returns the two connections,
    /// the path taken and how many entries or rows it read.
    async fn connect_and_catch_up(&mut self) -> Result<(Conn, Conn, &'static str, usize), Lost> {
        let mut cmd = timed(
            CONNECT_TIMEOUT,
            self.client.get_multiplexed_async_connection(),
        )
        .await?;
        // XREAD BLOCK holds its connection: it gets one of its own.
        let blk = timed(
            CONNECT_TIMEOUT,
            self.client.get_multiplexed_async_connection(),
        )
        .await?;
        let fresh = format!("{:016x}", rand::random::<u64>());
        let epoch: Value = timed(
            OP_TIMEOUT,
            redis::pipe()
                .cmd("SET")
                .arg(wire::EPOCH_KEY)
                .arg(&fresh)
                .arg("NX")
                .ignore()
                .cmd("GET")
                .arg(wire::EPOCH_KEY)
                .query_async(&mut cmd),
        )
        .await?;
        let epoch = match &epoch {
            Value::Array(a) => a.first().and_then(bulk),
            v => bulk(v),
        }
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .unwrap_or(fresh);
        let resume = match &self.pos {
            Some(p) if p.epoch == epoch => {
                let first: Value = timed(
                    OP_TIMEOUT,
                    redis::cmd("XRANGE")
                        .arg(wire::LOG_KEY)
                        .arg("-")
                        .arg("+")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut cmd),
                )
                .await?;
                // Trimming removes the oldest entries: if the first one left is not after our
                // position, nothing we have not seen was trimmed.
                matches!(wire::first_id(&first), Some(f) if f <= p.id).then_some(p.id)
            }
            _ => None,
        };
        let (how, rows) = match resume {
            Some(id) => {
                let n = self.catch_up(&mut cmd, id).await?;
                self.stats.catchup_stream.fetch_add(1, Ordering::Relaxed);
                ("stream", n)
            }
            None => {
                let n = self.full_load(&mut cmd).await?;
                self.stats.catchup_full.fetch_add(1, Ordering::Relaxed);
                ("full load", n)
            }
        };
        if let Some(p) = self.pos.as_mut() {
            p.epoch = epoch;
        }
        Ok((cmd, blk, how, rows))
    }

    /// Read the log from `id` until the end; returns how many entries.
    async fn catch_up(&mut self, cmd: &mut Conn, mut id: StreamId) -> Result<usize, Lost> {
        let mut total = 0;
        loop {
            let v: Value = timed(
                OP_TIMEOUT,
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("STREAMS")
                    .arg(wire::LOG_KEY)
                    .arg(id.to_string())
                    .query_async(cmd),
            )
            .await?;
            let entries = wire::reply_entries(&v);
            let n = entries.len();
            total += n;
            self.on_entries(entries).await?;
            match &self.pos {
                Some(p) if p.id > id && n >= READ_COUNT => id = p.id,
                _ => return Ok(total),
            }
        }
    }

    /// Load the whole set (lists, then blocks); returns how many rows. The log position is
    /// taken first, so changes made during the load are read again after it (applying twice
    /// is harmless).
    async fn full_load(&mut self, cmd: &mut Conn) -> Result<usize, Lost> {
        let t = Instant::now();
        let tail: Value = timed(
            OP_TIMEOUT,
            redis::cmd("XREVRANGE")
                .arg(wire::LOG_KEY)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query_async(cmd),
        )
        .await?;
        let tail = wire::first_id(&tail).unwrap_or_default();
        let mut rows = 0;
        // The next page is fetched (on a clone of the connection) while this one is decoded
        // and applied.
        let fetch = |conn: &Conn, key: &'static str, cursor: u64| {
            let mut conn = conn.clone();
            tokio::spawn(async move {
                timed(
                    OP_TIMEOUT,
                    redis::cmd("HSCAN")
                        .arg(key)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(SCAN_COUNT)
                        .query_async::<Value>(&mut conn),
                )
                .await
            })
        };
        for key in [wire::LISTS_KEY, wire::BLOCKS_KEY] {
            let mut pending = fetch(cmd, key, 0);
            loop {
                let page = pending.await.map_err(|_| Lost::Closed)??;
                let Value::Array(parts) = &page else {
                    break;
                };
                let next = parts
                    .first()
                    .and_then(bulk)
                    .and_then(|c| std::str::from_utf8(c).ok())
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0);
                let ahead = (next != 0).then(|| fetch(cmd, key, next));
                let evs = parts
                    .get(1)
                    .map(|v| self.decode_rows(key, &pairs(v)))
                    .unwrap_or_default();
                rows += evs.len();
                self.apply_all(evs).await?;
                match ahead {
                    Some(p) => pending = p,
                    None => break,
                }
            }
        }
        self.pos = Some(Pos {
            id: tail,
            epoch: String::new(),
        });
        *self.stats.last_id.lock() = tail.to_string();
        self.stats
            .last_full_load_ms
            .store(t.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.stats
            .last_full_load_rows
            .store(rows as u64, Ordering::Relaxed);
        Ok(rows)
    }

    fn decode_rows(&self, key: &str, rows: &[(&[u8], &[u8])]) -> Vec<Event> {
        let now = self.node.now();
        let mut out = Vec::with_capacity(rows.len());
        for (field, value) in rows {
            let ev = if value.len() > wire::MAX_ENTRY {
                None
            } else if key == wire::LISTS_KEY {
                let lf = std::str::from_utf8(field)
                    .ok()
                    .and_then(wire::parse_list_field);
                match (lf, serde_json::from_slice(value)) {
                    (Some((list, net)), Ok(entry)) => Some(Event::ListAdded { list, net, entry }),
                    _ => None,
                }
            } else {
                match serde_json::from_slice::<Block>(value) {
                    Ok(b) if b.is_expired(now) => continue,
                    Ok(b) => Some(Event::Blocked(b)),
                    Err(_) => None,
                }
            };
            match ev {
                Some(ev) => out.push(ev),
                None => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        out
    }

    /// Publish again what this node holds and the set lacks, unless a newer tombstone removed
    /// it; drop here what such a tombstone removed. Returns (republished, superseded).
    async fn reconcile(&mut self, cmd: &mut Conn) -> Result<(usize, usize), Lost> {
        let (blocks, lists, tombs): (Value, Value, Value) = timed(
            OP_TIMEOUT,
            redis::pipe()
                .cmd("HKEYS")
                .arg(wire::BLOCKS_KEY)
                .cmd("HKEYS")
                .arg(wire::LISTS_KEY)
                .cmd("HGETALL")
                .arg(wire::TOMBS_KEY)
                .query_async(cmd),
        )
        .await?;
        let blocks = names(&blocks);
        let lists = names(&lists);
        let tombs: HashMap<Vec<u8>, Millis> = pairs(&tombs)
            .into_iter()
            .filter_map(|(k, v)| {
                let t = std::str::from_utf8(v).ok()?.parse().ok()?;
                Some((k.to_vec(), t))
            })
            .collect();
        let now = self.node.now();
        let removed_after =
            |field: &str, at: Millis| tombs.get(field.as_bytes()).is_some_and(|&t| t >= at);
        let (missing, gone) = self.node.inspect(|e| {
            let mut missing = Vec::new();
            let mut gone = Vec::new();
            for b in e.block_table().iter() {
                if !b.enforced || b.is_expired(now) {
                    continue;
                }
                let f = b.key.to_string();
                if blocks.contains(f.as_bytes()) {
                    continue;
                }
                if removed_after(&f, b.blocked_at) {
                    gone.push(Event::Unblocked {
                        key: b.key,
                        kind: b.kind,
                        why: UnblockReason::Manual,
                    });
                } else {
                    missing.push(Event::Blocked(b.clone()));
                }
            }
            for list in [ListKind::Whitelist, ListKind::Blacklist] {
                for (net, entry) in e.lists().entries(list) {
                    if entry.source == "config" {
                        continue;
                    }
                    let f = wire::list_field(list, net);
                    if lists.contains(f.as_bytes()) {
                        continue;
                    }
                    if removed_after(&f, entry.added_at) {
                        gone.push(Event::ListRemoved { list, net });
                    } else {
                        missing.push(Event::ListAdded { list, net, entry });
                    }
                }
            }
            (missing, gone)
        });
        let n_gone = gone.len();
        if n_gone > 0 {
            let learned = self.node.with_engine(|e| {
                gone.into_iter()
                    .inspect(|ev| e.restore(now, ev.clone()))
                    .collect::<Vec<_>>()
            });
            self.stats
                .superseded
                .fetch_add(n_gone as u64, Ordering::Relaxed);
            self.store(learned).await?;
        }
        let n = missing.len();
        let wall = wall_ms();
        for chunk in missing.chunks(REPUBLISH_BATCH) {
            let mut out = Outgoing::default();
            for ev in chunk {
                out.push(ev, wall);
            }
            let Some(tx) = self.republish.upgrade() else {
                return Err(Lost::Closed);
            };
            if tx.send(out).await.is_err() {
                return Err(Lost::Closed);
            }
        }
        self.stats.reconciled.fetch_add(n as u64, Ordering::Relaxed);
        Ok((n, n_gone))
    }

    /// Follow the log until the link fails.
    async fn follow(&mut self, _cmd: Conn, mut blk: Conn) -> Lost {
        loop {
            let id = self.pos.as_ref().map(|p| p.id).unwrap_or_default();
            let v: Value = match timed(
                OP_TIMEOUT + Duration::from_millis(BLOCK_MS),
                redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(READ_COUNT)
                    .arg("BLOCK")
                    .arg(BLOCK_MS)
                    .arg("STREAMS")
                    .arg(wire::LOG_KEY)
                    .arg(id.to_string())
                    .query_async(&mut blk),
            )
            .await
            {
                Ok(v) => v,
                Err(e) => return e,
            };
            if let Err(e) = self.on_entries(wire::reply_entries(&v)).await {
                return e;
            }
        }
    }

    /// Apply a page of log entries in order and advance the position past them.
    async fn on_entries(
        &mut self,
        entries: Vec<Result<Entry, Option<StreamId>>>,
    ) -> Result<(), Lost> {
        let mut last = None;
        let mut evs = Vec::new();
        let now = wall_ms();
        for e in entries {
            match e {
                Ok(e) => {
                    last = Some(e.id);
                    if *e.node == *self.node_id {
                        continue;
                    }
                    match e.body {
                        Body::Heartbeat(h) => self.stats.saw(&e.node, Some(&h), e.sent_at, now),
                        Body::Events(v) => {
                            self.stats.saw(&e.node, None, e.sent_at, now);
                            self.stats
                                .received
                                .fetch_add(v.len() as u64, Ordering::Relaxed);
                            evs.extend(v);
                        }
                    }
                }
                Err(id) => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    if id.is_some() {
                        last = id;
                    }
                }
            }
        }
        self.apply_all(evs).await?;
        if let Some(id) = last {
            match self.pos.as_mut() {
                Some(p) => p.id = p.id.max(id),
                None => {
                    self.pos = Some(Pos {
                        id,
                        epoch: String::new(),
                    })
                }
            }
            *self.stats.last_id.lock() = id.to_string();
        }
        Ok(())
    }

    /// Apply other nodes' events, a batch per engine lock, and queue what changed for the
    /// local store (the engine first: a joining node enforces 100k blocks before its store
    /// has written them).
    async fn apply_all(&self, evs: Vec<Event>) -> Result<(), Lost> {
        let mut it = evs.into_iter().peekable();
        while it.peek().is_some() {
            let batch: Vec<Event> = it.by_ref().take(APPLY_BATCH).collect();
            let now = self.node.now();
            let learned = self.node.with_engine(|e| {
                batch
                    .into_iter()
                    .filter_map(|ev| apply(e, now, ev))
                    .collect::<Vec<_>>()
            });
            self.stats
                .applied
                .fetch_add(learned.len() as u64, Ordering::Relaxed);
            self.store(learned).await?;
        }
        Ok(())
    }

    /// Hand what was applied to the store forwarder, in order (waits when
    /// [`super::STORE_BATCHES`] batches are queued).
    async fn store(&self, evs: Vec<Event>) -> Result<(), Lost> {
        if evs.is_empty() {
            return Ok(());
        }
        tracing::debug!(target: "sipwarden::cluster", events = evs.len(), "applied from the cluster");
        let n = evs.len() as u64;
        if self.learned.send(evs).await.is_err() {
            self.stats.dropped.fetch_add(n, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// A list entry from the cluster broader than an IPv4 /8 or an IPv6 /16 is refused: no honest
/// operator whitelists or blacklists a large part of the Internet through a peer, and two
/// halves (`0.0.0.0/1`, `128.0.0.0/1`) would otherwise do what `/0` may not.
fn too_broad(net: IpNet) -> bool {
    match net {
        IpNet::V4(n) => n.prefix_len() < 8,
        IpNet::V6(n) => n.prefix_len() < 16,
    }
}

/// Apply one event from another node; returns it (as stored) when it changed anything here.
/// The engine itself refuses blocks covering the whitelist or the PBX.
pub(super) fn apply(e: &mut Ledger, now: Millis, ev: Event) -> Option<Event> {
    let local_source = |e: &Ledger, list: ListKind, net: IpNet| {
        e.lists()
            .entries(list)
            .into_iter()
            .find(|(n, _)| *n == net)
            .map(|(_, en)| en.source)
    };
    match ev {
        Event::Blocked(mut b) => {
            if b.is_expired(now) || !b.enforced {
                return None;
            }
            // What goes to the local store is held to the same bounds as what is enforced.
            crate::blocks::evidence::bound(&mut b);
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
            if too_broad(net) || local_source(e, list, net).as_deref() == Some("config") {
                return None;
            }
            entry.source = "cluster".into();
            let ev = Event::ListAdded { list, net, entry };
            e.restore(now, ev.clone());
            Some(ev)
        }
        Event::ListRemoved { list, net } => match local_source(e, list, net).as_deref() {
            None | Some("config") => None,
            Some(_) => {
                e.restore(now, ev.clone());
                Some(ev)
            }
        },
        Event::Strikes { .. } | Event::Alert { .. } => None,
    }
}

#[cfg(test)]
mod tests;
