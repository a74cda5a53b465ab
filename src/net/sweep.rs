//! The once-a-second sweep: expire blocks, close the connections of sources blocked since they
//! connected, and send the BYEs of calls the toll-fraud guard ended.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::net::handler::Shared;

/// Expire blocks once a second; send the BYEs of calls the toll-fraud guard ended. Runs until
/// `stop` resolves.
pub async fn run(shared: Arc<Shared>, stop: impl Future<Output = ()>) {
    let node = &shared.node;
    let mut every = tokio::time::interval(Duration::from_secs(1));
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return,
            _ = every.tick() => {
                let now = node.now();
                let byes = node.with_engine(|e| {
                    e.tick(now);
                    e.take_fraud_byes()
                });
                close_blocked(&shared);
                for d in &byes {
                    shared.send_fraud_byes(d).await;
                }
            }
        }
    }
}

/// Close the TCP, TLS and WebSocket connections of sources that are blocked now (the connection code
/// also checks on every read; this catches a connection that stays silent, or one in a call).
/// The PBX's connections are never closed this way.
fn close_blocked(shared: &Shared) {
    let node = &shared.node;
    let now = node.now();
    let n = shared.transports.conns.close_where(|a| {
        matches!(
            node.gate().check(now, a),
            crate::blocks::GateVerdict::Blocked { .. }
        ) && !node.with_engine(|e| e.is_upstream(a.ip()))
    });
    if n > 0 {
        tracing::info!(connections = n, "closed the connections of blocked sources");
    }
}
