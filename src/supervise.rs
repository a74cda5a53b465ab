//! The listener supervisor: a listener task that ends while the node is not stopping (a panic
//! that escaped, an error) is restarted after a backoff, counted and logged; `/healthz` fails
//! while it is down.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::node::Node;

/// First wait before restarting a listener that ended; doubled on each quick failure.
const RESTART_MIN: Duration = Duration::from_millis(100);
/// Longest wait between restarts (a listener that fails at once keeps failing at this pace).
const RESTART_MAX: Duration = Duration::from_secs(5);
/// A listener that ran this long before ending is restarted after [`RESTART_MIN`] again.
const RESTART_STABLE: Duration = Duration::from_secs(30);

pub(crate) async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Run a listener task (`make` builds it, again after each end) until `stop` turns true. A task
/// that ends while not stopping, by panic or by returning, is restarted after a backoff, counted
/// in `sipwarden_listener_restarts_total{listener=name}` and logged; while it is down its slot
/// in [`crate::stats::Listeners`] says "not serving", which fails `/healthz`.
pub(crate) fn supervise<F, Fut>(
    node: Arc<Node>,
    name: &str,
    mut stop: watch::Receiver<bool>,
    mut make: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listeners = &node.stats.listeners;
    let slot = listeners.register(name);
    let name = name.to_string();
    tokio::spawn(async move {
        let listeners = &node.stats.listeners;
        let mut backoff = RESTART_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let mut task = tokio::spawn(make());
            listeners.set_serving(slot, true);
            let ended = tokio::select! {
                _ = stop_requested(&mut stop) => {
                    // The task watches the same signal and returns by itself; one that does not
                    // within a second is aborted.
                    if tokio::time::timeout(Duration::from_secs(1), &mut task).await.is_err() {
                        task.abort();
                    }
                    listeners.set_serving(slot, false);
                    return;
                }
                r = &mut task => r,
            };
            listeners.set_serving(slot, false);
            if *stop.borrow() {
                return;
            }
            listeners.restarted(slot);
            if started.elapsed() >= RESTART_STABLE {
                backoff = RESTART_MIN;
            }
            match ended {
                Err(e) if e.is_panic() => tracing::error!(
                    listener = %name, retry_in = ?backoff,
                    "listener task panicked; restarting it"
                ),
                _ => tracing::error!(
                    listener = %name, retry_in = ?backoff,
                    "listener task ended unexpectedly; restarting it"
                ),
            }
            tokio::select! {
                _ = stop_requested(&mut stop) => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RESTART_MAX);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::test_util::{health, metrics};
    use tokio::sync::oneshot;

    type BoxFut = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

    #[tokio::test(start_paused = true)]
    async fn a_listener_that_dies_is_restarted_and_healthz_fails_meanwhile() {
        let node = Node::new(Config::default()).0;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (die_tx, die_rx) = oneshot::channel::<()>();
        let mut die_rx = Some(die_rx);
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (r, stop_inner) = (runs.clone(), stop_rx.clone());
        let sup = supervise(node.clone(), "udp:127.0.0.1:5060", stop_rx, move || {
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let fut: BoxFut = match die_rx.take() {
                // The first run panics when told to.
                Some(rx) => Box::pin(async move {
                    let _ = rx.await;
                    panic!("injected listener panic");
                }),
                None => {
                    let mut stop = stop_inner.clone();
                    Box::pin(async move { stop_requested(&mut stop).await })
                }
            };
            fut
        });
        let settle = || async {
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
        };
        settle().await;
        assert_eq!(health(&node).await, (200, "ok".into()));
        die_tx.send(()).unwrap();
        settle().await;
        // Down during the backoff (the clock is paused, so the test sees it deterministically).
        let (status, body) = health(&node).await;
        assert_eq!(status, 503);
        assert!(body.contains("udp:127.0.0.1:5060"), "{body}");
        let m = metrics(&node).await;
        assert!(
            m.contains("sipwarden_listener_restarts_total{listener=\"udp:127.0.0.1:5060\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("sipwarden_listener_up{listener=\"udp:127.0.0.1:5060\"} 0"),
            "{m}"
        );
        tokio::time::advance(RESTART_MIN).await;
        settle().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(health(&node).await, (200, "ok".into()));
        assert!(metrics(&node)
            .await
            .contains("sipwarden_listener_up{listener=\"udp:127.0.0.1:5060\"} 1"));
        // A requested stop is not a failure: no restart.
        stop_tx.send(true).unwrap();
        sup.await.unwrap();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(node.stats.listeners.states()[0].restarts, 1);
    }
}
