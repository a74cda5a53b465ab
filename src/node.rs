//! One running sipwarden: the engine behind a lock, the counters, the config, and the channel
//! that carries state changes to the state task (persistence, cluster, notifications, logs).

use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use tokio::sync::{mpsc, oneshot};

use crate::blocks::{Event, Gate};
use crate::clock::{Clock, Millis};
use crate::config::Config;
use crate::engine::Engine;
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
    engine: Mutex<Engine>,
    /// The engine's drop gate, read by the packet path without the engine lock.
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
            engine: Mutex::new(engine),
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
        self.with_engine(|e| e.reconfigure(&cfg, now));
        *self.config.write() = Arc::new(cfg);
    }

    /// Run `f` on the engine, then hand any state changes it made to the state task without
    /// waiting. For the packet path.
    pub fn with_engine<R>(&self, f: impl FnOnce(&mut Engine) -> R) -> R {
        let (r, events) = {
            let mut e = self.engine.lock();
            let r = f(&mut e);
            e.sync_gate();
            let ev = if e.has_events() {
                e.take_events()
            } else {
                Vec::new()
            };
            (r, ev)
        };
        if !events.is_empty() {
            let n = events.len() as u64;
            if self.events.try_send(Batch { events, ack: None }).is_err() {
                self.stats
                    .events_dropped
                    .fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            }
        }
        r
    }

    /// Run `f` on the engine and wait until the state changes it made are durable. For the
    /// admin API: `Ok` means the change survives a crash; `Err(NotDurable)` means it is in force
    /// but the store could not save it (the state task logs why).
    pub async fn with_engine_durable<R>(
        &self,
        f: impl FnOnce(&mut Engine) -> R,
    ) -> Result<R, NotDurable> {
        let (r, events) = {
            let mut e = self.engine.lock();
            let r = f(&mut e);
            e.sync_gate();
            (r, e.take_events())
        };
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
    pub fn inspect<R>(&self, f: impl FnOnce(&Engine) -> R) -> R {
        let mut e = self.engine.lock();
        e.fold_gate_hits();
        f(&e)
    }

    /// As [`Node::inspect`] without folding the gate's hits first: for a reader that walks the
    /// table in several short lock holds and folded once at its start.
    pub fn peek<R>(&self, f: impl FnOnce(&Engine) -> R) -> R {
        f(&self.engine.lock())
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
