//! One running sipwarden: the engine (detector shards and the block ledger), the counters, the config, and the channel
//! that carries state changes to the state task (persistence, cluster, notifications, logs).

use std::sync::Arc;

use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use crate::blocks::{Event, Gate};
use crate::clock::{Clock, Millis};
use crate::config::Config;
use crate::engine::{Engine, Ledger};
use crate::stats::Stats;

/// Queued state changes waiting for the state task. Bounded: an attacker who makes blocks
/// faster than the disk takes them loses persistence of some (never their enforcement, which is
/// in memory); `Stats::events_dropped` counts them.
pub const EVENT_QUEUE: usize = 65_536;

/// A batch of events, with an acknowledgement sent once they are durable.
pub struct Batch {
    pub events: Vec<Event>,
    pub ack: Option<oneshot::Sender<()>>,
}

/// A change is in force in memory but the state store did not confirm it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the change is in force but could not be saved: the state store is failing (see the log)")]
pub struct NotDurable;

pub struct Node {
    config: RwLock<Arc<Config>>,
    engine: Engine,
    /// The engine's drop gate, read by the packet path without any lock.
    gate: Arc<Gate>,
    pub stats: Stats,
    pub clock: Clock,
    events: mpsc::Sender<Batch>,
}

impl Node {
    /// A node and the receiving end of its state-change channel (for the state task).
    pub fn new(cfg: Config) -> (Arc<Node>, mpsc::Receiver<Batch>) {
        let clock = Clock::new();
        let (tx, rx) = mpsc::channel(EVENT_QUEUE);
        let engine = Engine::new(&cfg, clock.now());
        let gate = engine.gate().clone();
        let node = Node {
            config: RwLock::new(Arc::new(cfg)),
            gate,
            engine,
            stats: Stats::default(),
            clock,
            events: tx,
        };
        (Arc::new(node), rx)
    }

    pub fn now(&self) -> Millis {
        self.clock.now()
    }

    /// Batches of state changes waiting for the state task (a health gauge).
    pub fn event_queue_depth(&self) -> usize {
        self.events.max_capacity() - self.events.capacity()
    }

    pub fn config(&self) -> Arc<Config> {
        self.config.read().clone()
    }

    /// Swap in a validated config; the engine keeps its state.
    pub fn reconfigure(&self, cfg: Config) {
        let now = self.now();
        self.engine.reconfigure(&cfg, now);
        self.send_events();
        *self.config.write() = Arc::new(cfg);
    }

    /// The engine, for the packet path: its entries lock one detector shard, and the ledger
    /// only to make a block. Call [`Node::send_events`] after an entry.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Hand the state changes the engine queued to the state task without waiting. A
    /// lock-free check when there are none.
    pub fn send_events(&self) {
        if !self.engine.has_events() {
            return;
        }
        let events = self.engine.take_events();
        if events.is_empty() {
            return;
        }
        let n = events.len() as u64;
        if self.events.try_send(Batch { events, ack: None }).is_err() {
            self.stats
                .events_dropped
                .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Score an anomaly from `src` (outside a message: a TLS handshake, a WebSocket upgrade, an
    /// unframeable stream), then hand any block it made to the state task.
    pub fn on_anomaly(
        &self,
        now: Millis,
        src: std::net::SocketAddr,
        what: crate::engine::Anomaly,
        sample: &[u8],
    ) {
        self.engine.on_anomaly(now, src, what, sample);
        self.send_events();
    }

    /// Run `f` on the block ledger, then hand any state changes it made to the state task
    /// without waiting.
    pub fn with_engine<R>(&self, f: impl FnOnce(&mut Ledger) -> R) -> R {
        let r = self.engine.with_ledger(f);
        self.send_events();
        r
    }

    /// Run `f` on the engine and wait until the state changes it made are durable. For the
    /// admin API: `Ok` means the change survives a crash; `Err(NotDurable)` means it is in force
    /// but the store could not save it (the state task logs why).
    pub async fn with_engine_durable<R>(
        &self,
        f: impl FnOnce(&mut Ledger) -> R,
    ) -> Result<R, NotDurable> {
        // The events are taken in the same lock hold as the change: a packet's
        // `send_events` in between cannot carry them off unacknowledged.
        let (r, events) = self.engine.with_ledger(|l| {
            let r = f(l);
            (r, l.take_events())
        });
        if events.is_empty() {
            return Ok(r);
        }
        let (tx, rx) = oneshot::channel();
        let batch = Batch {
            events,
            ack: Some(tx),
        };
        if self.events.send(batch).await.is_err() {
            return Err(NotDurable);
        }
        match rx.await {
            Ok(()) => Ok(r),
            Err(_) => Err(NotDurable),
        }
    }

    /// Wait until every state change queued so far is durable.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        let batch = Batch {
            events: Vec::new(),
            ack: Some(tx),
        };
        if self.events.send(batch).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// Read-only access to the engine (block table, lists) for the admin surface. The hits
    /// the gate counted are folded into the block rows first, so readers see them.
    pub fn inspect<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        let mut l = self.engine.ledger();
        l.fold_gate_hits();
        f(&l)
    }

    /// As [`Node::inspect`] without folding the gate's hits first: for a reader that walks the
    /// table in several short lock holds and folded once at its start.
    pub fn peek<R>(&self, f: impl FnOnce(&Ledger) -> R) -> R {
        f(&self.engine.ledger())
    }

    /// Every counter of the node, read once (what `/metrics`, `/api/stats` and the CLI show).
    pub fn snapshot(&self) -> crate::stats::Snapshot {
        crate::stats::Snapshot::take(self)
    }

    /// The drop gate: is a source blocked, without the engine's lock.
    pub fn gate(&self) -> &Gate {
        &self.gate
    }
}
