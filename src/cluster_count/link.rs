//! The counting link's I/O: its own Redis connections (one to publish, one subscription), a
//! round every `cluster.count_interval`, reconnects with backoff. Redis away never touches the
//! packet path: rounds taken while it is away are lost (counted in `publish_failures`), so the
//! cluster falls back to per-node counting until it returns.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;

use super::{SharedCounts, CHANNEL};
use crate::clock::Clock;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const OP_TIMEOUT: Duration = Duration::from_secs(2);
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const PING_EVERY: Duration = Duration::from_secs(5);
/// An empty round after this long without one, well inside any sane `cluster.peer_timeout`.
const HEARTBEAT: Duration = Duration::from_secs(1);

async fn timed<T>(
    d: Duration,
    f: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, String> {
    match tokio::time::timeout(d, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("timed out".to_string()),
    }
}

/// Run the link until `shutdown` resolves: publish this node's rounds, apply the others'.
pub async fn run(
    url: String,
    redis_ca: String,
    counts: SharedCounts,
    clock: Clock,
    interval: Duration,
    shutdown: impl Future<Output = ()>,
) {
    let client = match crate::cluster::redis_client(&url, &redis_ca) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(target: "sipwarden::cluster", error = %e, "cluster counting off: bad cluster.redis_url");
            return;
        }
    };
    tracing::info!(target: "sipwarden::cluster", node = counts.node_id().unwrap_or(""), every = ?interval, "cluster-wide counting on");
    tokio::select! {
        _ = shutdown => {}
        _ = publisher(client.clone(), counts.clone(), clock, interval) => {}
        _ = subscriber(client, counts, clock) => {}
    }
}

async fn publisher(client: redis::Client, counts: SharedCounts, clock: Clock, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let mut retry_at = tokio::time::Instant::now();
    let mut backoff = BACKOFF_MIN;
    let mut last_sent = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        counts.expire_peers(clock.now());
        let round = match counts.take_round() {
            Some(r) => r,
            // Nothing counted: an empty round now and then keeps this node known to the
            // others (the peers gauge) without costing a message every interval.
            None if last_sent.elapsed() >= HEARTBEAT => counts.empty_round(),
            None => continue,
        };
        let Some(stats) = counts.stats() else { return };
        if conn.is_none() && tokio::time::Instant::now() >= retry_at {
            match timed(CONNECT_TIMEOUT, client.get_multiplexed_async_connection()).await {
                Ok(c) => {
                    conn = Some(c);
                    backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    tracing::debug!(target: "sipwarden::cluster", error = %e, "count publisher cannot connect");
                    retry_at = tokio::time::Instant::now() + backoff;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
        let Some(c) = conn.as_mut() else {
            stats.publish_failures.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let Ok(payload) = serde_json::to_vec(&round) else {
            continue;
        };
        let sent = timed(
            OP_TIMEOUT,
            redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(payload)
                .query_async::<i64>(c),
        )
        .await;
        match sent {
            Ok(_) => {
                last_sent = tokio::time::Instant::now();
                stats.rounds.fetch_add(1, Ordering::Relaxed);
                stats
                    .entries_sent
                    .fetch_add(round.entries.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(target: "sipwarden::cluster", error = %e, "count round not published");
                stats.publish_failures.fetch_add(1, Ordering::Relaxed);
                conn = None;
            }
        }
    }
}

async fn subscriber(client: redis::Client, counts: SharedCounts, clock: Clock) {
    let mut backoff = BACKOFF_MIN;
    loop {
        match timed(CONNECT_TIMEOUT, client.get_async_pubsub()).await {
            Ok(pubsub) => {
                let (mut sink, mut stream) = pubsub.split();
                if timed(OP_TIMEOUT, sink.subscribe(CHANNEL)).await.is_ok() {
                    backoff = BACKOFF_MIN;
                    tracing::debug!(target: "sipwarden::cluster", "count subscriber connected");
                    // A ping now and then: a silent partition would otherwise leave the
                    // subscription waiting for ever.
                    let mut ping = tokio::time::interval(PING_EVERY);
                    ping.tick().await;
                    loop {
                        tokio::select! {
                            m = stream.next() => match m {
                                Some(m) => {
                                    counts.apply(clock.now(), m.get_payload_bytes());
                                }
                                None => break,
                            },
                            _ = ping.tick() => {
                                if timed(OP_TIMEOUT, sink.ping::<redis::Value>()).await.is_err() {
                                    break;
                                }
                            }
                        }
                    }
                }
            }
            Err(e) => {
                tracing::debug!(target: "sipwarden::cluster", error = %e, "count subscriber cannot connect");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}
