//! The state task: takes the engine's state changes in order, makes them durable, then logs
//! them (so a block that was logged survives a crash), acknowledges them (so an API call that
//! answered 200 survives a crash), counts them in the node's
//! [`Stats`](crate::stats::Stats) and fans them out to the cluster.
//!
//! - [`store`]: the redb file at `state.path`.
//! - [`restore()`]: start-up, before the SIP sockets serve.
//!
//! Under attack the engine makes blocks faster than one fsync each: the task drains every batch
//! already waiting into one write transaction (at most [`MAX_EVENTS_PER_COMMIT`] events), so the
//! cost of a commit is shared. The disk work runs on tokio's blocking pool, never on the threads
//! that serve packets.
//!
//! Decisions an operator should know:
//! - A state file that cannot be read stops the start ([`StateError::Damaged`] names
//!   `state.path` and says to move the file aside): starting empty would quietly unblock every
//!   attacker and drop the run-time lists. A file left by a crash is not damaged: redb recovers
//!   it at open.
//! - A failed commit (disk full) is logged (rate-limited) and retried every second; the changes
//!   stay enforced in memory, and the waiting acknowledgements are dropped rather than sent.
//! - Events learnt from the cluster are stored too (not logged above debug, not shared again),
//!   so a node restarting while Redis is away keeps them.

pub mod health;
pub mod restore;
pub mod store;

#[cfg(test)]
mod tests;

pub use restore::{restore, Restored};
pub use store::{Applied, Snapshot, StateError, Store, SCHEMA};

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::blocks::Event;
use crate::cluster::Cluster;
use crate::node::{Batch, Node, EVENT_QUEUE};

/// Events written in one transaction at most: bounds the time an acknowledgement waits behind
/// a burst.
pub const MAX_EVENTS_PER_COMMIT: usize = 4096;
/// Events kept for another attempt after a failed commit (a full or failing disk); beyond
/// this the oldest are given up (they stay enforced in memory).
pub const MAX_RETRY_EVENTS: usize = EVENT_QUEUE;
const RETRY_EVERY: Duration = Duration::from_secs(1);
/// How often strike rows older than `protection.strike_memory` are deleted.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
/// Detector snapshots (toll-fraud counters, feed entries) are saved this often and at stop: a
/// crash loses at most this much counting.
const SNAPSHOT_EVERY: Duration = Duration::from_secs(10);
/// Store errors are logged at most this often (with a count of those in between).
const ERROR_LOG_EVERY: Duration = Duration::from_secs(10);

/// The running state task.
pub struct Handle {
    stop: oneshot::Sender<()>,
    join: JoinHandle<()>,
    stats: Arc<StateStats>,
}

/// What the state task has written since start.
#[derive(Debug, Default)]
pub struct StateStats {
    /// Write transactions committed (one per drained group of batches).
    pub commits: AtomicU64,
    /// Events in those transactions.
    pub events: AtomicU64,
    /// Total and largest time spent in a commit, in microseconds.
    pub commit_micros: AtomicU64,
    pub max_commit_micros: AtomicU64,
    /// Commits that failed (the events are retried).
    pub failures: AtomicU64,
    /// Events waiting for another attempt after a failed commit (a gauge).
    pub retrying: AtomicU64,
}

impl Handle {
    /// Start the state task of `node`, writing to `store` and sharing through `cluster`.
    pub fn spawn(
        rx: mpsc::Receiver<Batch>,
        node: Arc<Node>,
        store: Option<Store>,
        cluster: Option<Cluster>,
    ) -> Handle {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = Task::new(node, store, cluster);
        let stats = task.stats.clone();
        let join = tokio::spawn(task.run(rx, async move {
            let _ = stopped.await;
        }));
        Handle { stop, join, stats }
    }

    pub fn stats(&self) -> Arc<StateStats> {
        self.stats.clone()
    }

    /// Write what is still queued, stop, and close the store cleanly. Call after
    /// [`Node::flush`] so everything the node made is in.
    pub async fn close(self) {
        let _ = self.stop.send(());
        let mut join = self.join;
        if tokio::time::timeout(Duration::from_secs(10), &mut join)
            .await
            .is_err()
        {
            tracing::error!("the state task did not finish in time; stopping it");
            join.abort();
        }
    }
}

/// A state task without a store or cluster: logs and acknowledges (tests, tools).
pub async fn run(rx: mpsc::Receiver<Batch>, node: Arc<Node>) {
    Task::new(node, None, None)
        .run(rx, std::future::pending())
        .await;
}

/// What became of a commit.
enum Outcome {
    Durable(Applied),
    /// No store configured (tests, tools): nothing to wait for.
    NoStore,
    /// The store refused the write (the error), or its writer died (none).
    Failed(Option<StateError>),
}

struct Task {
    node: Arc<Node>,
    store: Option<Arc<Store>>,
    cluster: Option<Cluster>,
    /// Webhook alerts for new blocks and alerts (`notify.webhook`, read at start).
    notifier: crate::notify::Notifier,
    /// E-mail digests of the same events (`notify.email_to`, read at start).
    mailer: crate::notify::email::Mailer,
    /// Block and unblock log lines are attacker-driven: at most [`LOG_LINES_PER_SEC`] a second.
    log_budget: LogBudget,
    /// Events whose commit failed, written again before the next ones.
    retry: Vec<Event>,
    errors: ErrorLog,
    stats: Arc<StateStats>,
}

#[derive(Default)]
struct ErrorLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl ErrorLog {
    fn report(&mut self, what: &str, err: &dyn std::fmt::Display) {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < ERROR_LOG_EVERY)
        {
            self.suppressed += 1;
            return;
        }
        tracing::error!(
            target: "sipwarden::state",
            error = %err,
            suppressed = self.suppressed,
            "{what}"
        );
        self.last = Some(now);
        self.suppressed = 0;
    }
}

async fn recv_learned(rx: &mut Option<mpsc::Receiver<Event>>) -> Option<Event> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// Take `first` and every batch already waiting, up to the commit limit.
fn drain(first: Batch, rx: &mut mpsc::Receiver<Batch>) -> Vec<Batch> {
    let mut n = first.events.len();
    let mut out = vec![first];
    while n < MAX_EVENTS_PER_COMMIT {
        match rx.try_recv() {
            Ok(b) => {
                n += b.events.len();
                out.push(b);
            }
            Err(_) => break,
        }
    }
    out
}

impl Task {
    fn new(node: Arc<Node>, store: Option<Store>, cluster: Option<Cluster>) -> Task {
        let notifier = crate::notify::Notifier::spawn(&node.config().notify.webhook);
        let stats: Arc<StateStats> = Arc::default();
        node.stats.health.attach_state(stats.clone());
        node.stats.health.attach_notify(notifier.shared_stats());
        let mailer = match crate::notify::email::MailOptions::from_config(&node.config().notify) {
            Some(o) => crate::notify::email::Mailer::spawn(o, notifier.shared_stats()),
            None => crate::notify::email::Mailer::disabled(),
        };
        if let Some(c) = &cluster {
            node.stats.health.attach_cluster(c.stats.clone());
        }
        Task {
            node,
            store: store.map(Arc::new),
            cluster,
            notifier,
            mailer,
            log_budget: LogBudget::default(),
            retry: Vec::new(),
            errors: ErrorLog::default(),
            stats,
        }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Batch>, stop: impl Future<Output = ()>) {
        let mut learned = self.cluster.as_mut().and_then(|c| c.take_learned());
        let start = tokio::time::Instant::now() + PRUNE_EVERY;
        let mut prune = tokio::time::interval_at(start, PRUNE_EVERY);
        prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut snap =
            tokio::time::interval_at(tokio::time::Instant::now() + SNAPSHOT_EVERY, SNAPSHOT_EVERY);
        snap.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::pin!(stop);
        loop {
            // Unbiased: a flood of local events does not starve what the cluster shares.
            tokio::select! {
                b = rx.recv() => match b {
                    Some(b) => {
                        let batches = drain(b, &mut rx);
                        self.commit(batches).await;
                    }
                    None => break,
                },
                ev = recv_learned(&mut learned) => match ev {
                    Some(ev) => {
                        let mut evs = vec![ev];
                        while evs.len() < MAX_EVENTS_PER_COMMIT {
                            match learned.as_mut().map(|r| r.try_recv()) {
                                Some(Ok(ev)) => evs.push(ev),
                                _ => break,
                            }
                        }
                        self.commit_learned(evs).await;
                    }
                    None => learned = None,
                },
                _ = tokio::time::sleep(RETRY_EVERY), if !self.retry.is_empty() => {
                    self.commit(Vec::new()).await;
                }
                _ = prune.tick() => self.prune().await,
                _ = snap.tick() => self.save_snapshots().await,
                _ = &mut stop => {
                    while let Ok(b) = rx.try_recv() {
                        let batches = drain(b, &mut rx);
                        self.commit(batches).await;
                    }
                    if !self.retry.is_empty() {
                        self.commit(Vec::new()).await;
                    }
                    self.save_snapshots().await;
                    break;
                }
            }
        }
        if let Some(c) = self.cluster.take() {
            c.close().await;
        }
        if let Some(store) = self.store.take() {
            let path = store.path().display().to_string();
            // Dropping the last handle closes the file cleanly (no repair at the next start).
            drop(store);
            tracing::info!(target: "sipwarden::state", path, "state store closed");
        }
    }

    /// Write `events` (after any waiting retries) in one transaction. Returns the events and
    /// the outcome.
    async fn write(&mut self, events: Vec<Event>) -> (Vec<Event>, Outcome) {
        let Some(store) = self.store.clone() else {
            return (events, Outcome::NoStore);
        };
        if events.is_empty() && self.retry.is_empty() {
            return (events, Outcome::Durable(Applied::default()));
        }
        let retry = std::mem::take(&mut self.retry);
        let stats = self.stats.clone();
        let res = tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            let r = if retry.is_empty() {
                store.apply(&events)
            } else {
                let mut all = retry.clone();
                all.extend(events.iter().cloned());
                store.apply(&all)
            };
            let micros = t.elapsed().as_micros() as u64;
            if r.is_ok() {
                stats.commits.fetch_add(1, Ordering::Relaxed);
                stats
                    .events
                    .fetch_add((retry.len() + events.len()) as u64, Ordering::Relaxed);
                stats.commit_micros.fetch_add(micros, Ordering::Relaxed);
                stats.max_commit_micros.fetch_max(micros, Ordering::Relaxed);
            } else {
                stats.failures.fetch_add(1, Ordering::Relaxed);
            }
            (retry, events, r)
        })
        .await;
        match res {
            Ok((_, events, Ok(a))) => (events, Outcome::Durable(a)),
            Ok((retry, events, Err(e))) => {
                self.retry = retry;
                (events, Outcome::Failed(Some(e)))
            }
            Err(join) => {
                self.errors
                    .report("the state store writer failed; state changes lost", &join);
                (Vec::new(), Outcome::Failed(None))
            }
        }
    }

    /// Commit this node's events, then log, count, share and acknowledge them.
    async fn commit(&mut self, batches: Vec<Batch>) {
        let mut events = Vec::new();
        let mut acks = Vec::new();
        for b in batches {
            events.extend(b.events);
            acks.extend(b.ack);
        }
        let (events, outcome) = self.write(events).await;
        let applied = match outcome {
            Outcome::Durable(a) => a,
            Outcome::NoStore => Applied::default(),
            Outcome::Failed(e) => {
                if let Some(e) = e {
                    self.errors.report(
                        "cannot write state changes to the store; they are enforced but would \
                         not survive a restart; retrying",
                        &e,
                    );
                }
                // Not durable: the acknowledgements are dropped, not sent, so a caller that
                // checks can tell.
                acks.clear();
                self.keep_for_retry(&events);
                Applied::default()
            }
        };
        for ev in &events {
            if self.log_budget.admit(ev) {
                log_event(&self.node, ev);
            }
            self.node.stats.events.record(ev, crate::clock::wall_ms());
            self.notifier.notify(ev);
            self.mailer.notify(ev);
        }
        if let Some(c) = &self.cluster {
            c.publish(&events, &applied.unstored_removals);
        }
        for ack in acks {
            let _ = ack.send(());
        }
        self.stats
            .retrying
            .store(self.retry.len() as u64, Ordering::Relaxed);
    }

    fn keep_for_retry(&mut self, events: &[Event]) {
        self.retry.extend(events.iter().cloned());
        if self.retry.len() > MAX_RETRY_EVENTS {
            let over = self.retry.len() - MAX_RETRY_EVENTS;
            self.retry.drain(..over);
            self.node
                .stats
                .events_dropped
                .fetch_add(over as u64, Ordering::Relaxed);
        }
    }

    /// Store what other nodes shared (already applied to the engine). Not logged beyond
    /// debug, not shared again.
    async fn commit_learned(&mut self, events: Vec<Event>) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let res = tokio::task::spawn_blocking(move || store.apply(&events)).await;
        match res {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self
                .errors
                .report("cannot store blocks learnt from the cluster", &e),
            Err(e) => self
                .errors
                .report("cannot store blocks learnt from the cluster", &e),
        }
    }

    async fn save_snapshots(&mut self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let snaps = self.node.inspect(|e| e.durable_snapshots());
        if snaps.is_empty() {
            return;
        }
        match tokio::task::spawn_blocking(move || store.set_snapshots(&snaps)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.errors.report("cannot save snapshots", &e),
            Err(e) => self.errors.report("cannot save snapshots", &e),
        }
    }

    async fn prune(&mut self) {
        let Some(store) = self.store.clone() else {
            return;
        };
        let memory = self.node.config().protection.strike_memory.as_millis() as u64;
        let before = self.node.now().saturating_sub(memory);
        match tokio::task::spawn_blocking(move || store.forget(&[], before)).await {
            Ok(Ok((_, n))) if n > 0 => {
                tracing::debug!(target: "sipwarden::state", strikes = n, "forgot old strikes");
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => self.errors.report("cannot prune old strikes", &e),
            Err(e) => self.errors.report("cannot prune old strikes", &e),
        }
    }
}

/// Block and unblock lines logged per second before they are summarised: an attacker with a
/// million addresses must not be able to fill the disk through the log.
pub const LOG_LINES_PER_SEC: u32 = 50;

#[derive(Default)]
struct LogBudget {
    window: Option<Instant>,
    lines: u32,
    blocks: u64,
    unblocks: u64,
}

impl LogBudget {
    /// Whether to log `ev` one line by itself; a summary of what was held back is logged when
    /// the next second starts.
    fn admit(&mut self, ev: &Event) -> bool {
        if !matches!(ev, Event::Blocked(_) | Event::Unblocked { .. }) {
            return true;
        }
        let now = Instant::now();
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            if self.blocks + self.unblocks > 0 {
                tracing::warn!(
                    target: "sipwarden::blocks",
                    blocks = self.blocks,
                    unblocks = self.unblocks,
                    "more blocks and unblocks than {LOG_LINES_PER_SEC} a second: not logged one by one (the block table has them all)"
                );
            }
            *self = LogBudget {
                window: Some(now),
                ..LogBudget::default()
            };
        }
        if self.lines < LOG_LINES_PER_SEC {
            self.lines += 1;
            return true;
        }
        match ev {
            Event::Blocked(_) => self.blocks += 1,
            _ => self.unblocks += 1,
        }
        false
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
