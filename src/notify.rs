//! Webhook notifications: one JSON POST per new block and per alert, sent by a background task
//! so the caller never waits.
//!
//! Bounds, because an attack is exactly when notifications pile up:
//! - the queue holds [`Options::queue`] messages; beyond that they are dropped and counted;
//! - at most [`Options::per_window`] messages per [`Options::window`] (20 a minute): the rest are
//!   counted and summed up in one `"suppressed"` message when the window ends;
//! - a failed POST (connection error, 5xx, 408, 429) is retried [`Options::attempts`] times with
//!   exponential backoff; a 4xx is not retried. Failures are logged (host only: webhook URLs
//!   often carry a secret in their path).
//!
//! Every payload has a `text` field, so Slack- and Mattermost-style incoming webhooks show it
//! as is; the other fields are for machines.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::blocks::Event;

pub mod email;

/// Limits of the notifier; [`Options::default`] is what production uses.
#[derive(Debug, Clone)]
pub struct Options {
    /// Messages sent per window before suppression.
    pub per_window: u32,
    pub window: Duration,
    /// POST attempts per message (1 = no retry).
    pub attempts: u32,
    /// Delay before the first retry; doubled each time, at most [`MAX_BACKOFF`].
    pub backoff: Duration,
    /// Messages waiting to be sent.
    pub queue: usize,
    /// Per POST.
    pub timeout: Duration,
}

pub const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Default for Options {
    fn default() -> Self {
        Self {
            per_window: 20,
            window: Duration::from_secs(60),
            attempts: 5,
            backoff: Duration::from_secs(1),
            queue: 1024,
            timeout: Duration::from_secs(10),
        }
    }
}

/// What happened to notifications since start.
#[derive(Debug, Default)]
pub struct NotifyStats {
    pub sent: AtomicU64,
    /// Given up after all attempts, or refused with a 4xx.
    pub failed: AtomicU64,
    /// Not queued: the queue was full.
    pub dropped: AtomicU64,
    /// Over the rate limit, summed up in a "suppressed" message.
    pub suppressed: AtomicU64,
}

impl NotifyStats {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

/// A handle to the notification task; cheap to clone. A disabled notifier ignores everything.
#[derive(Clone, Debug)]
pub struct Notifier {
    tx: Option<mpsc::Sender<Value>>,
    stats: Arc<NotifyStats>,
}

impl Notifier {
    /// Start the notification task for `url` (must run inside a tokio runtime). An empty URL
    /// gives a disabled notifier; so does an invalid one, with an error logged (the config
    /// check already refuses anything but http:// and https://).
    pub fn spawn(url: &str) -> Notifier {
        Self::spawn_with(url, Options::default())
    }

    pub fn spawn_with(url: &str, opts: Options) -> Notifier {
        let stats = Arc::new(NotifyStats::default());
        if url.is_empty() {
            return Notifier { tx: None, stats };
        }
        let url = match reqwest::Url::parse(url) {
            Ok(u) if matches!(u.scheme(), "http" | "https") => u,
            _ => {
                tracing::error!("notify.webhook is not an http(s) URL; notifications are off");
                return Notifier { tx: None, stats };
            }
        };
        let client = match reqwest::Client::builder()
            .timeout(opts.timeout)
            .user_agent(concat!("sipwarden/", env!("CARGO_PKG_VERSION")))
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the webhook HTTP client; notifications are off");
                return Notifier { tx: None, stats };
            }
        };
        let (tx, rx) = mpsc::channel(opts.queue.max(1));
        let worker = Worker {
            client,
            url,
            opts,
            stats: stats.clone(),
        };
        tokio::spawn(worker.run(rx));
        Notifier {
            tx: Some(tx),
            stats,
        }
    }

    pub fn disabled() -> Notifier {
        Notifier {
            tx: None,
            stats: Arc::default(),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queue a notification for `ev` if it is one (a new block, a would-be block in observe
    /// mode, an alert). Never waits.
    pub fn notify(&self, ev: &Event) {
        let Some(tx) = &self.tx else { return };
        let Some(msg) = payload(ev) else { return };
        if tx.try_send(msg).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn stats(&self) -> &NotifyStats {
        &self.stats
    }

    /// The counters, to show them in `/metrics` and `/api/stats`.
    pub fn shared_stats(&self) -> Arc<NotifyStats> {
        self.stats.clone()
    }
}

pub(crate) fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The JSON sent for an event, `None` for events that are not notified.
pub fn payload(ev: &Event) -> Option<Value> {
    let host = host_name();
    let at = if host.is_empty() {
        String::new()
    } else {
        format!(" on {host}")
    };
    match ev {
        Event::Blocked(b) => {
            let duration = b.expires_at.map(|e| e.saturating_sub(b.blocked_at) / 1000);
            let how = match duration {
                Some(s) => format!("for {}", humantime::format_duration(Duration::from_secs(s))),
                None => "permanently".into(),
            };
            let verb = if b.enforced {
                "blocked"
            } else {
                "would block (observe mode)"
            };
            let device = if b.device.is_empty() {
                String::new()
            } else {
                format!(", device {:?}", b.device)
            };
            Some(json!({
                "event": if b.enforced { "blocked" } else { "would_block" },
                "host": host,
                "ip": b.key.ip_text(),
                "port": b.key.port,
                "type": b.kind.as_str(),
                "device": b.device,
                "reason": b.reason,
                "blocked_at": b.blocked_at / 1000,
                "duration_secs": duration,
                "permanent": b.expires_at.is_none(),
                "strikes": b.strikes,
                "evidence": b.evidence,
                "text": format!("sipwarden{at}: {verb} {} {how} ({}{device}): {}", b.key, b.kind, b.reason),
            }))
        }
        Event::Alert {
            kind,
            source,
            message,
        } => Some(json!({
            "event": "alert",
            "host": host,
            "type": kind.as_str(),
            "source": source,
            "message": message,
            "text": format!("sipwarden{at}: {kind} alert from {source}: {message}"),
        })),
        _ => None,
    }
}

struct Worker {
    client: reqwest::Client,
    url: reqwest::Url,
    opts: Options,
    stats: Arc<NotifyStats>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Value>) {
        let mut window_start = Instant::now();
        let mut sent = 0u32;
        let mut suppressed = 0u64;
        loop {
            let msg = if suppressed > 0 {
                tokio::select! {
                    m = rx.recv() => m,
                    _ = tokio::time::sleep_until(window_start + self.opts.window) => {
                        self.post(&summary(suppressed, self.opts.window)).await;
                        window_start = Instant::now();
                        sent = 1;
                        suppressed = 0;
                        continue;
                    }
                }
            } else {
                rx.recv().await
            };
            let Some(msg) = msg else { break };
            if window_start.elapsed() >= self.opts.window {
                window_start = Instant::now();
                sent = 0;
            }
            if sent < self.opts.per_window {
                sent += 1;
                self.post(&msg).await;
            } else {
                suppressed += 1;
                self.stats.suppressed.fetch_add(1, Ordering::Relaxed);
            }
        }
        if suppressed > 0 {
            self.post(&summary(suppressed, self.opts.window)).await;
        }
    }

    async fn post(&self, body: &Value) {
        let host = self.url.host_str().unwrap_or("?");
        let mut delay = self.opts.backoff;
        let mut last = String::new();
        for attempt in 1..=self.opts.attempts.max(1) {
            match self.client.post(self.url.clone()).json(body).send().await {
                Ok(r) if r.status().is_success() => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(r)
                    if r.status().is_client_error()
                        && ![408, 429].contains(&r.status().as_u16()) =>
                {
                    tracing::warn!(webhook = host, status = %r.status(), "webhook refused a notification; not retrying");
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                Ok(r) => last = format!("HTTP {}", r.status()),
                Err(e) => last = crate::util::error_chain(&e),
            }
            tracing::debug!(webhook = host, attempt, error = %last, "webhook POST failed");
            if attempt < self.opts.attempts {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
        tracing::warn!(webhook = host, attempts = self.opts.attempts, error = %last, "webhook notification failed");
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
    }
}

fn summary(n: u64, window: Duration) -> Value {
    json!({
        "event": "suppressed",
        "host": host_name(),
        "count": n,
        "text": format!(
            "sipwarden: {n} more notification{} in the last {} not sent (rate limit); see the dashboard",
            if n == 1 { "" } else { "s" },
            humantime::format_duration(window)
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blocks::{Block, BlockKey, BlockType, UnblockReason};
    use axum::extract::State;
    use axum::http::StatusCode;
    use axum::routing::post;
    use axum::{Json, Router};
    use parking_lot::Mutex;

    #[derive(Default)]
    struct Receiver {
        got: Mutex<Vec<Value>>,
        /// Answer 500 to this many requests first.
        fail_first: AtomicU64,
        requests: AtomicU64,
        /// Answer this status instead of 200.
        status: Mutex<Option<StatusCode>>,
    }

    async fn receive(State(r): State<Arc<Receiver>>, Json(v): Json<Value>) -> StatusCode {
        r.requests.fetch_add(1, Ordering::SeqCst);
        if let Some(s) = *r.status.lock() {
            return s;
        }
        if r.fail_first.load(Ordering::SeqCst) > 0 {
            r.fail_first.fetch_sub(1, Ordering::SeqCst);
            return StatusCode::INTERNAL_SERVER_ERROR;
        }
        r.got.lock().push(v);
        StatusCode::OK
    }

    async fn receiver() -> (String, Arc<Receiver>) {
        let r = Arc::new(Receiver::default());
        let app = Router::new()
            .route("/hook/secret", post(receive))
            .with_state(r.clone());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook/secret", l.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(l, app).await });
        (url, r)
    }

    async fn until(what: &str, f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn block(enforced: bool) -> Event {
        Event::Blocked(Block {
            key: BlockKey::whole("192.0.2.7/32".parse().unwrap()),
            kind: BlockType::Scanner,
            device: "friendly-scanner".into(),
            reason: "User-Agent matches scanner pattern \"friendly-scanner\"".into(),
            blocked_at: 1_700_000_000_000,
            expires_at: Some(1_700_000_000_000 + 3_600_000),
            strikes: 1,
            hits: 1,
            evidence: vec!["OPTIONS sip:100@x SIP/2.0 UA=friendly-scanner".into()],
            packets: Vec::new(),
            enforced,
        })
    }

    fn alert() -> Event {
        Event::Alert {
            kind: BlockType::Invite,
            source: "198.51.100.4/32".into(),
            message: "INVITE flood".into(),
        }
    }

    fn fast() -> Options {
        Options {
            backoff: Duration::from_millis(5),
            ..Options::default()
        }
    }

    #[tokio::test]
    async fn posts_blocks_and_alerts_only() {
        let (url, r) = receiver().await;
        let n = Notifier::spawn_with(&url, fast());
        n.notify(&Event::Unblocked {
            key: BlockKey::whole("192.0.2.7/32".parse().unwrap()),
            kind: BlockType::Scanner,
            why: UnblockReason::Expired,
        });
        n.notify(&block(true));
        n.notify(&alert());
        n.notify(&block(false));
        until("3 messages", || r.got.lock().len() == 3).await;
        let got = r.got.lock().clone();
        assert_eq!(got[0]["event"], "blocked");
        assert_eq!(got[0]["ip"], "192.0.2.7");
        assert_eq!(got[0]["type"], "SCANNER");
        assert_eq!(got[0]["device"], "friendly-scanner");
        assert_eq!(got[0]["duration_secs"], 3600);
        assert_eq!(got[0]["permanent"], false);
        assert!(got[0]["text"]
            .as_str()
            .unwrap()
            .contains("blocked 192.0.2.7 for 1h (SCANNER, device \"friendly-scanner\")"));
        assert_eq!(got[1]["event"], "alert");
        assert_eq!(got[1]["type"], "INVITE");
        assert_eq!(got[1]["source"], "198.51.100.4/32");
        assert_eq!(got[2]["event"], "would_block");
        // The receiver records a message before its answer reaches the notifier, which counts
        // it as sent only then: wait for the count instead of racing it.
        until("3 counted as sent", || {
            NotifyStats::get(&n.stats().sent) == 3
        })
        .await;
    }

    #[tokio::test]
    async fn retries_with_backoff_then_delivers() {
        let (url, r) = receiver().await;
        r.fail_first.store(2, Ordering::SeqCst);
        let n = Notifier::spawn_with(&url, fast());
        n.notify(&alert());
        until("delivery", || r.got.lock().len() == 1).await;
        assert_eq!(r.requests.load(Ordering::SeqCst), 3);
        assert_eq!(NotifyStats::get(&n.stats().failed), 0);
    }

    #[tokio::test]
    async fn gives_up_after_bounded_attempts_and_on_4xx() {
        let (url, r) = receiver().await;
        *r.status.lock() = Some(StatusCode::SERVICE_UNAVAILABLE);
        let opts = Options {
            attempts: 3,
            ..fast()
        };
        let n = Notifier::spawn_with(&url, opts);
        n.notify(&alert());
        until("failure", || NotifyStats::get(&n.stats().failed) == 1).await;
        assert_eq!(r.requests.load(Ordering::SeqCst), 3);

        *r.status.lock() = Some(StatusCode::NOT_FOUND);
        n.notify(&alert());
        until("second failure", || {
            NotifyStats::get(&n.stats().failed) == 2
        })
        .await;
        assert_eq!(r.requests.load(Ordering::SeqCst), 4, "a 404 is not retried");

        // Nobody listening at all.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let dead = format!("http://{}/", l.local_addr().unwrap());
        drop(l);
        let n = Notifier::spawn_with(
            &dead,
            Options {
                attempts: 2,
                ..fast()
            },
        );
        n.notify(&alert());
        until("connection failure", || {
            NotifyStats::get(&n.stats().failed) == 1
        })
        .await;
    }

    #[tokio::test]
    async fn rate_limited_with_one_summary() {
        let (url, r) = receiver().await;
        let opts = Options {
            per_window: 3,
            window: Duration::from_millis(300),
            ..fast()
        };
        let n = Notifier::spawn_with(&url, opts);
        for _ in 0..10 {
            n.notify(&alert());
        }
        until("summary", || r.got.lock().len() == 4).await;
        let got = r.got.lock().clone();
        assert!(got[..3].iter().all(|m| m["event"] == "alert"));
        assert_eq!(got[3]["event"], "suppressed");
        assert_eq!(got[3]["count"], 7);
        assert_eq!(NotifyStats::get(&n.stats().suppressed), 7);
    }

    #[tokio::test]
    async fn full_queue_drops_and_counts() {
        // The port accepts connections but never answers: the worker is stuck on the first
        // message until its timeout.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/", l.local_addr().unwrap());
        let opts = Options {
            queue: 2,
            timeout: Duration::from_secs(30),
            ..fast()
        };
        let n = Notifier::spawn_with(&url, opts);
        for _ in 0..10 {
            n.notify(&alert());
        }
        let dropped = NotifyStats::get(&n.stats().dropped);
        assert!((7..=8).contains(&dropped), "dropped {dropped}");
        drop(l);
    }

    #[test]
    fn disabled_and_invalid_urls_do_nothing() {
        let n = Notifier::disabled();
        n.notify(&alert());
        assert!(!n.is_enabled());
        let n = Notifier::spawn("");
        assert!(!n.is_enabled());
        let n = Notifier::spawn("ftp://example.invalid/");
        assert!(!n.is_enabled());
    }
}
