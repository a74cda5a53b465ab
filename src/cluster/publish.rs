//! The publisher task: writes this node's changes to the shared set and the log in one
//! MULTI/EXEC, and every [`HEARTBEAT`] a heartbeat entry, the log's age trim and the pruning of
//! due set fields (any node may prune: the sorted sets say what is due).

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::wire::{self, Body, Hello};
use super::{timed, Backoff, ClusterStats, Lost, Op, Opts, Outgoing};
use super::{CONNECT_TIMEOUT, HEARTBEAT, OP_TIMEOUT};
use crate::clock::wall_ms;

/// Ops merged into one transaction at most (a burst of blocks shares one round trip).
const OPS_PER_SEND: usize = 2048;

pub(super) struct Publisher {
    pub client: redis::Client,
    pub node_id: Arc<str>,
    pub stats: Arc<ClusterStats>,
    pub opts: Opts,
    pub hello: Hello,
}

fn xadd(p: &mut redis::Pipeline, node: &str, max_len: usize, body: &Body) {
    let c = p
        .cmd("XADD")
        .arg(wire::LOG_KEY)
        .arg("MAXLEN")
        .arg("~")
        .arg(max_len)
        .arg("*");
    for (k, v) in wire::entry_fields(node, wall_ms(), body) {
        c.arg(k).arg(v);
    }
    c.ignore();
}

/// Append the set changes of `ops` to a transaction.
fn set_ops(p: &mut redis::Pipeline, ops: &[Op]) {
    use wire::{BLOCKS_EXP_KEY, BLOCKS_KEY, LISTS_KEY, TOMBSTONE_TTL, TOMBS_EXP_KEY, TOMBS_KEY};
    for op in ops {
        match op {
            Op::SetBlock(field, value, expires) => {
                p.cmd("HSET").arg(BLOCKS_KEY).arg(field).arg(value).ignore();
                match expires {
                    Some(e) => p
                        .cmd("ZADD")
                        .arg(BLOCKS_EXP_KEY)
                        .arg(*e)
                        .arg(field)
                        .ignore(),
                    None => p.cmd("ZREM").arg(BLOCKS_EXP_KEY).arg(field).ignore(),
                };
                p.cmd("HDEL").arg(TOMBS_KEY).arg(field).ignore();
                p.cmd("ZREM").arg(TOMBS_EXP_KEY).arg(field).ignore();
            }
            Op::SetList(field, value) => {
                p.cmd("HSET").arg(LISTS_KEY).arg(field).arg(value).ignore();
                p.cmd("HDEL").arg(TOMBS_KEY).arg(field).ignore();
                p.cmd("ZREM").arg(TOMBS_EXP_KEY).arg(field).ignore();
            }
            Op::DelBlock(field, now) | Op::DelList(field, now) => {
                if matches!(op, Op::DelBlock(..)) {
                    p.cmd("HDEL").arg(BLOCKS_KEY).arg(field).ignore();
                    p.cmd("ZREM").arg(BLOCKS_EXP_KEY).arg(field).ignore();
                } else {
                    p.cmd("HDEL").arg(LISTS_KEY).arg(field).ignore();
                }
                p.cmd("HSET").arg(TOMBS_KEY).arg(field).arg(*now).ignore();
                p.cmd("ZADD")
                    .arg(TOMBS_EXP_KEY)
                    .arg(now.saturating_add(TOMBSTONE_TTL))
                    .arg(field)
                    .ignore();
            }
        }
    }
}

impl Publisher {
    pub(super) async fn run(self, mut rx: mpsc::Receiver<Outgoing>) {
        let mut backoff = Backoff::new();
        let mut conn: Option<redis::aio::MultiplexedConnection> = None;
        let mut down_logged = false;
        let mut hb = tokio::time::interval(HEARTBEAT);
        hb.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut out = tokio::select! {
                o = rx.recv() => match o {
                    Some(o) => o,
                    None => return,
                },
                _ = hb.tick() => {
                    if let Err(e) = self.heartbeat(&mut conn).await {
                        conn = None;
                        self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                        if !down_logged {
                            tracing::warn!(target: "sipwarden::cluster", error = %e, "cannot reach Redis for the heartbeat; retrying");
                            down_logged = true;
                        }
                    }
                    continue;
                }
            };
            self.stats
                .waiting_since_ms
                .store(wall_ms().max(1), Ordering::Relaxed);
            while out.ops.len() < OPS_PER_SEND {
                match rx.try_recv() {
                    Ok(more) => out.merge(more),
                    Err(_) => break,
                }
            }
            loop {
                match self.send(&mut conn, &out).await {
                    Ok(()) => {
                        if down_logged {
                            tracing::info!(target: "sipwarden::cluster", "Redis reachable again; sharing blocks");
                            down_logged = false;
                        }
                        backoff.reset();
                        self.stats
                            .published
                            .fetch_add(out.events.len() as u64, Ordering::Relaxed);
                        self.stats.waiting_since_ms.store(0, Ordering::Relaxed);
                        break;
                    }
                    Err(e) => {
                        self.stats.publish_failures.fetch_add(1, Ordering::Relaxed);
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

    async fn connect<'a>(
        &self,
        conn: &'a mut Option<redis::aio::MultiplexedConnection>,
    ) -> Result<&'a mut redis::aio::MultiplexedConnection, Lost> {
        if conn.is_none() {
            let c = timed(
                CONNECT_TIMEOUT,
                self.client.get_multiplexed_async_connection(),
            )
            .await?;
            *conn = Some(c);
        }
        conn.as_mut().ok_or(Lost::Closed)
    }

    async fn send(
        &self,
        conn: &mut Option<redis::aio::MultiplexedConnection>,
        out: &Outgoing,
    ) -> Result<(), Lost> {
        let c = self.connect(conn).await?;
        let mut p = redis::pipe();
        p.atomic();
        set_ops(&mut p, &out.ops);
        for group in wire::pack(&out.events) {
            xadd(
                &mut p,
                &self.node_id,
                self.opts.log_max_len,
                &Body::Events(group),
            );
        }
        timed(OP_TIMEOUT, p.query_async::<()>(c)).await
    }

    async fn heartbeat(
        &self,
        conn: &mut Option<redis::aio::MultiplexedConnection>,
    ) -> Result<(), Lost> {
        let c = self.connect(conn).await?;
        let now = wall_ms();
        let oldest = now.saturating_sub(self.opts.log_max_age.as_millis() as u64);
        let mut p = redis::pipe();
        xadd(
            &mut p,
            &self.node_id,
            self.opts.log_max_len,
            &Body::Heartbeat(self.hello.clone()),
        );
        p.cmd("XTRIM")
            .arg(wire::LOG_KEY)
            .arg("MINID")
            .arg("~")
            .arg(oldest)
            .ignore();
        for (h, z) in [
            (wire::BLOCKS_KEY, wire::BLOCKS_EXP_KEY),
            (wire::TOMBS_KEY, wire::TOMBS_EXP_KEY),
        ] {
            p.cmd("EVAL")
                .arg(wire::PRUNE)
                .arg(2)
                .arg(h)
                .arg(z)
                .arg(now)
                .ignore();
        }
        timed(OP_TIMEOUT, p.query_async::<()>(c)).await
    }
}
