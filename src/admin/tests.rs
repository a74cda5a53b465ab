//! The admin API driven through the router: every route, auth, bad input, and the exact
//! Prometheus lines a change produces.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::Router;
use serde_json::Value;
use tower::ServiceExt;

use super::{router, ReloadTx};
use crate::blocks::{Block, BlockKey, BlockType, Event, UnblockReason};
use crate::config::Config;
use crate::node::Node;

struct T {
    app: Router,
    node: Arc<Node>,
}

fn setup_with(cfg: Config, reload: Option<ReloadTx>) -> T {
    let (node, rx) = Node::new(cfg);
    tokio::spawn(crate::state::run(rx, node.clone()));
    T {
        app: router(node.clone(), reload),
        node,
    }
}

fn setup() -> T {
    setup_with(Config::default(), None)
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    text: String,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or(Value::Null)
    }

    fn error(&self) -> String {
        self.json()["error"].as_str().unwrap_or("").to_string()
    }
}

impl T {
    async fn req(
        &self,
        method: &str,
        uri: &str,
        body: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let given = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
        let mut b = Request::builder().method(method).uri(uri);
        if !given("host") {
            b = b.header("host", "127.0.0.1:8080");
        }
        if let Some(body) = body {
            b = b.header("content-length", body.len());
            if !given("content-type") {
                b = b.header("content-type", "application/json");
            }
        }
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b.body(Body::from(body.unwrap_or("").to_string())).unwrap();
        let r = self.app.clone().oneshot(req).await.unwrap();
        let status = r.status();
        let headers = r.headers().clone();
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap();
        Resp {
            status,
            headers,
            text: String::from_utf8_lossy(&bytes).into_owned(),
        }
    }

    async fn get(&self, uri: &str) -> Resp {
        self.req("GET", uri, None, &[]).await
    }

    async fn post(&self, uri: &str, body: &str) -> Resp {
        self.req("POST", uri, Some(body), &[]).await
    }

    async fn delete(&self, uri: &str) -> Resp {
        self.req("DELETE", uri, None, &[]).await
    }

    fn block_count(&self) -> usize {
        self.node.inspect(|e| e.blocks().count())
    }
}

#[tokio::test]
async fn health_dashboard_and_unknown_paths() {
    let t = setup();
    let r = t.get("/healthz").await;
    assert_eq!((r.status, r.text.as_str()), (StatusCode::OK, "ok"));
    let r = t.get("/").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(r.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("connect-src 'self'"));
    assert!(r.text.contains("<title>sipwarden"));
    let r = t.get("/api/nope").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error(), "no such API endpoint: GET /api/nope");
    assert_eq!(t.get("/nope").await.status, StatusCode::NOT_FOUND);
    let r = t.req("PUT", "/api/blocks", Some("{}"), &[]).await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(r.error(), "PUT is not allowed on /api/blocks");
}

#[tokio::test]
async fn manual_blocks_listed_with_every_field() {
    let t = setup();
    let r = t
        .post(
            "/api/blocks",
            r#"{"ip":"192.0.2.1","duration":"1h","reason":"brute force"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["ip"], "192.0.2.1");
    assert_eq!(r.json()["unblock_in_secs"], 3600);

    let r = t.get("/api/blocks").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.headers["x-total-count"], "1");
    let rows = r.json();
    let row = &rows[0];
    let mut keys: Vec<&str> = row
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "blocked_at",
            "country",
            "device",
            "evidence",
            "hits",
            "ip",
            "observe",
            "permanent",
            "port",
            "reason",
            "strikes",
            "type",
            "unblock_in_secs"
        ]
    );
    assert_eq!(row["ip"], "192.0.2.1");
    assert_eq!(row["port"], Value::Null);
    assert_eq!(row["country"], "-");
    assert_eq!(row["type"], "MANUAL");
    assert_eq!(row["reason"], "brute force");
    assert_eq!(row["permanent"], false);
    assert_eq!(row["observe"], false);
    assert_eq!(row["evidence"], serde_json::json!([]));
    let at = row["blocked_at"].as_u64().unwrap();
    assert!(at.abs_diff(t.node.now() / 1000) <= 1, "unix seconds");

    // Port block, IPv6 (tracked per /64), permanent.
    let r = t.post("/api/blocks", r#"{"ip":"192.0.2.2:5062"}"#).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        (r.json()["ip"].clone(), r.json()["port"].clone()),
        ("192.0.2.2".into(), 5062.into())
    );
    assert_eq!(r.json()["permanent"], true);
    assert_eq!(r.json()["unblock_in_secs"], Value::Null);
    let r = t
        .post("/api/blocks", r#"{"ip":"2001:db8::1","duration":"10m"}"#)
        .await;
    assert_eq!(r.json()["ip"], "2001:db8::/64");
    assert_eq!(t.block_count(), 3);
    assert!(t.node.inspect(|e| e
        .block_table()
        .get(&BlockKey::with_port("192.0.2.2/32".parse().unwrap(), 5062))
        .is_some()));
}

#[tokio::test]
async fn bad_block_requests_are_400_and_change_nothing() {
    let t = setup();
    for (body, want) in [
        (r#"{"ip":"1.2.3"}"#, "is not an IP address or CIDR"),
        (
            r#"{"ip":"192.0.2.1","colour":"red"}"#,
            "unknown field `colour`",
        ),
        (
            r#"{"ip":"192.0.2.1","duration":"soon"}"#,
            "duration \"soon\"",
        ),
        (r#"{"ip":"192.0.2.1","duration":"0s"}"#, "must be positive"),
        (r#"{"ip":"10.0.0.0/8"}"#, "is a range"),
        (r#"{"ip":"192.0.2.1:0"}"#, "not a port"),
        (r#"{"duration":"1h"}"#, "missing field `ip`"),
        (r#"{"ip":5}"#, "invalid type"),
        ("not json", "bad JSON body"),
        ("", "bad JSON body"),
    ] {
        let r = t.post("/api/blocks", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}: {}", r.text);
        assert!(r.error().contains(want), "{body}: {}", r.error());
    }
    let r = t
        .req(
            "POST",
            "/api/blocks",
            Some(r#"{"ip":"192.0.2.1"}"#),
            &[("content-type", "text/plain")],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert!(r.error().contains("application/json"));
    let r = t.get("/api/blocks?color=red").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("color"), "{}", r.error());
    let big = format!(
        r#"{{"ip":"192.0.2.1","reason":"{}"}}"#,
        "x".repeat(super::MAX_BODY)
    );
    assert_eq!(
        t.post("/api/blocks", &big).await.status,
        StatusCode::PAYLOAD_TOO_LARGE
    );
    assert_eq!(t.block_count(), 0);
}

#[tokio::test]
async fn unblock_by_address_port_and_prefix() {
    let t = setup();
    for ip in [
        "192.0.2.1",
        "192.0.2.2:5062",
        "192.0.2.2:5064",
        "2001:db8::1",
    ] {
        let r = t.post("/api/blocks", &format!(r#"{{"ip":"{ip}"}}"#)).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    }
    let r = t.delete("/api/blocks/192.0.2.2%3A5062").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        r.json(),
        serde_json::json!({"unblocked": [{"ip": "192.0.2.2", "port": 5062, "type": "MANUAL"}]})
    );
    assert_eq!(t.block_count(), 3);
    // Without a port: every block on the address.
    let r = t.delete("/api/blocks/192.0.2.2").await;
    assert_eq!(r.json()["unblocked"].as_array().map(Vec::len), Some(1));
    // The prefix, percent-encoded or not.
    let r = t.delete("/api/blocks/2001%3Adb8%3A%3A%2F64").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(t.block_count(), 1);
    let r = t.delete("/api/blocks/192.0.2.1").await;
    assert_eq!(r.status, StatusCode::OK);
    let r = t.delete("/api/blocks/192.0.2.1").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error(), "no block on 192.0.2.1");
    let r = t.delete("/api/blocks/not-an-ip").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert!(r.error().contains("not an IP address"));
}

#[tokio::test]
async fn filter_and_limit_newest_first() {
    let t = setup();
    for ip in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
        t.post(
            "/api/blocks",
            &format!(r#"{{"ip":"{ip}","reason":"r-{ip}"}}"#),
        )
        .await;
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    let r = t.get("/api/blocks?limit=2").await;
    assert_eq!(r.headers["x-total-count"], "3");
    let rows = r.json();
    let ips: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["ip"].as_str())
        .collect();
    assert_eq!(ips, ["192.0.2.3", "192.0.2.2"]);
    let r = t.get("/api/blocks?q=R-192.0.2.1").await;
    assert_eq!(r.headers["x-total-count"], "1");
    assert_eq!(r.json()[0]["ip"], "192.0.2.1");
    let r = t.get("/api/blocks?limit=x").await;
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn whitelist_and_blacklist_round_trip() {
    let t = setup();
    t.post("/api/blocks", r#"{"ip":"10.1.2.3"}"#).await;
    let r = t
        .post(
            "/api/whitelist",
            r#"{"cidr":"10.0.0.0/8","comment":"office"}"#,
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["cidr"], "10.0.0.0/8");
    assert_eq!(r.json()["source"], "api");
    assert_eq!(
        t.block_count(),
        0,
        "whitelisting lifts the blocks it covers"
    );
    let r = t.get("/api/whitelist").await;
    let list = r.json();
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    assert_eq!(list[0]["comment"], "office");
    assert!(list[0]["added_at"].as_u64().unwrap() > 1_600_000_000);
    // A whitelisted address cannot be blocked.
    let r = t.post("/api/blocks", r#"{"ip":"10.9.9.9"}"#).await;
    assert_eq!(r.status, StatusCode::CONFLICT);
    assert!(r.error().contains("whitelisted"));

    let r = t.delete("/api/whitelist/10.0.0.0%2F8").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json()["removed"], "10.0.0.0/8");
    let r = t.delete("/api/whitelist/10.0.0.0%2F8").await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(r.error(), "10.0.0.0/8 is not on the whitelist");

    let r = t
        .post("/api/blacklist", r#"{"cidr":"2001:db8:bad::/48"}"#)
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(
        t.get("/api/blacklist").await.json()[0]["cidr"],
        "2001:db8:bad::/48"
    );
    // Unencoded slash works too.
    assert_eq!(
        t.delete("/api/blacklist/2001:db8:bad::/48").await.status,
        StatusCode::OK
    );
    assert_eq!(t.get("/api/blacklist").await.json(), serde_json::json!([]));

    for (body, want) in [
        (r#"{"cidr":"10.0.0.0/33"}"#, "not an IP address or CIDR"),
        (
            r#"{"cidr":"10.0.0.0/8","note":"x"}"#,
            "unknown field `note`",
        ),
        (r#"{"comment":"x"}"#, "missing field `cidr`"),
    ] {
        let r = t.post("/api/blacklist", body).await;
        assert_eq!(r.status, StatusCode::BAD_REQUEST, "{body}");
        assert!(r.error().contains(want), "{body}: {}", r.error());
    }
    assert_eq!(
        t.delete("/api/whitelist/nonsense").await.status,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(t.get("/api/blacklist").await.json(), serde_json::json!([]));
}

#[tokio::test]
async fn stats_counts_and_history() {
    let t = setup();
    t.post("/api/blocks", r#"{"ip":"192.0.2.1"}"#).await;
    t.node.stats.packet_in(crate::stats::Transport::Udp);
    t.node.stats.drop(crate::stats::DropReason::Scanner);
    t.node
        .stats
        .events
        .record(&scanner_block(t.node.now()), t.node.now());
    let s = t.get("/api/stats").await.json();
    assert_eq!(s["mode"], "enforce");
    assert_eq!(
        s["packets_in"],
        serde_json::json!({"udp": 1, "tcp": 0, "tls": 0, "ws": 0, "total": 1})
    );
    assert_eq!(s["tls"]["failures"]["timeout"], 0);
    assert_eq!(s["tls"]["reloads_failed"], 0);
    assert_eq!(s["dropped"]["scanner"], 1);
    assert_eq!(
        s["dropped"].as_object().map(|o| o.len()),
        Some(crate::stats::DropReason::ALL.len())
    );
    assert_eq!(s["dropped_total"], 1);
    assert_eq!(s["active_blocks"]["total"], 1);
    assert_eq!(s["active_blocks"]["by_type"]["MANUAL"], 1);
    assert_eq!(
        s["lists"],
        serde_json::json!({"whitelist": 0, "blacklist": 0})
    );
    assert_eq!(s["panics"], 0);
    assert_eq!(s["listeners"], serde_json::json!([]));
    assert_eq!(
        s["tcp"],
        serde_json::json!({"connections": 0, "accepted": 0, "rejected": 0, "write_overflows": 0, "write_timeouts": 0})
    );
    let h = &s["history"];
    assert_eq!(h["step_secs"], 60);
    assert_eq!(h["alerts"].as_array().map(Vec::len), Some(60));
    assert_eq!(h["blocks"]["SCANNER"][59], 1);
}

fn scanner_block(now: u64) -> Event {
    Event::Blocked(Block {
        key: BlockKey::whole("203.0.113.9/32".parse().unwrap()),
        kind: BlockType::Scanner,
        device: "friendly-scanner".into(),
        reason: "scanner".into(),
        blocked_at: now,
        expires_at: Some(now + 60_000),
        strikes: 1,
        hits: 1,
        evidence: vec![],
        packets: Vec::new(),
        enforced: true,
    })
}

#[tokio::test]
async fn reload_answers_with_the_result() {
    let t = setup();
    let r = t.post("/api/reload", "").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);

    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<tokio::sync::oneshot::Sender<Result<(), String>>>(1);
    tokio::spawn(async move {
        let mut n = 0;
        while let Some(done) = rx.recv().await {
            n += 1;
            let _ = done.send(if n == 1 {
                Ok(())
            } else {
                Err("register.hit_count: must be greater than 0".into())
            });
        }
    });
    let t = setup_with(Config::default(), Some(tx));
    let r = t.req("POST", "/api/reload", None, &[]).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
    assert_eq!(r.json(), serde_json::json!({"reloaded": true}));
    let r = t.req("POST", "/api/reload", None, &[]).await;
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(r.error().contains("register.hit_count"));
}

#[tokio::test]
async fn token_required_on_api_only() {
    let mut cfg = Config::default();
    cfg.admin.token = "s3cret-token".into();
    let t = setup_with(cfg, None);
    let r = t.get("/api/blocks").await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert!(r.error().contains("Bearer"));
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"sipwarden\"");
    let r = t
        .req(
            "GET",
            "/api/stats",
            None,
            &[("authorization", "Bearer wrong")],
        )
        .await;
    assert_eq!(
        (r.status, r.error().as_str()),
        (StatusCode::UNAUTHORIZED, "wrong bearer token")
    );
    let r = t
        .req(
            "POST",
            "/api/blocks",
            Some(r#"{"ip":"192.0.2.1"}"#),
            &[("authorization", "Basic czNjcmV0LXRva2Vu")],
        )
        .await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(t.block_count(), 0);
    let auth = [("authorization", "Bearer s3cret-token")];
    let r = t
        .req(
            "GET",
            "/api/stats",
            None,
            &[("authorization", "bearer s3cret-token")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "the scheme is case-insensitive");
    let r = t
        .req("POST", "/api/blocks", Some(r#"{"ip":"192.0.2.1"}"#), &auth)
        .await;
    assert_eq!(r.status, StatusCode::OK);
    // With a token, a host name is fine (a reverse proxy in front).
    let r = t
        .req(
            "GET",
            "/api/blocks",
            None,
            &[auth[0], ("host", "pbx-guard.example.net")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK);
    for open in ["/", "/healthz", "/metrics"] {
        assert_eq!(t.get(open).await.status, StatusCode::OK, "{open}");
    }
    assert!(
        super::ct_eq(b"abc", b"abc")
            && !super::ct_eq(b"abc", b"abd")
            && !super::ct_eq(b"abc", b"ab")
    );
}

#[tokio::test]
async fn forged_browser_requests_refused_without_token() {
    let t = setup();
    // DNS rebinding: a page on evil.example resolved to 127.0.0.1.
    let r = t
        .req("GET", "/api/blocks", None, &[("host", "evil.example:8080")])
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.error().contains("DNS rebinding"));
    assert_eq!(
        t.req("GET", "/api/blocks", None, &[("host", "localhost:8080")])
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        t.req("GET", "/api/blocks", None, &[("host", "[::1]:8080")])
            .await
            .status,
        StatusCode::OK
    );
    // A cross-origin change.
    let r = t
        .req(
            "POST",
            "/api/whitelist",
            Some(r#"{"cidr":"0.0.0.0/0"}"#),
            &[("origin", "http://evil.example")],
        )
        .await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(t.get("/api/whitelist").await.json(), serde_json::json!([]));
    // The dashboard's own origin is fine.
    let r = t
        .req(
            "POST",
            "/api/whitelist",
            Some(r#"{"cidr":"192.0.2.0/24"}"#),
            &[("origin", "http://127.0.0.1:8080")],
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.text);
}

#[tokio::test]
async fn country_from_geoip_database() {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), crate::geoip::testdb::fixture()).unwrap();
    let mut cfg = Config::default();
    cfg.geoip.database = f.path().display().to_string();
    let t = setup_with(cfg, None);
    t.post("/api/blocks", r#"{"ip":"192.0.2.1"}"#).await;
    t.post("/api/blocks", r#"{"ip":"10.0.0.1"}"#).await;
    let rows = t.get("/api/blocks").await.json();
    let by_ip = |ip: &str| {
        rows.as_array()
            .unwrap()
            .iter()
            .find(|r| r["ip"] == ip)
            .map(|r| r["country"].clone())
    };
    assert_eq!(by_ip("192.0.2.1"), Some("Testland".into()));
    assert_eq!(by_ip("10.0.0.1"), Some("-".into()));
    let r = t.get("/api/blocks?q=testland").await;
    assert_eq!(r.headers["x-total-count"], "1");
}

#[tokio::test]
async fn metrics_exact_lines() {
    let t = setup();
    let s = &t.node.stats;
    s.packet_in(crate::stats::Transport::Udp);
    s.packet_in(crate::stats::Transport::Udp);
    s.packet_in(crate::stats::Transport::Tcp);
    s.packet_in(crate::stats::Transport::Tls);
    s.tls
        .handshakes_ok
        .fetch_add(4, std::sync::atomic::Ordering::Relaxed);
    s.tls.failed(crate::stats::TlsFailure::Timeout);
    s.tls.failed(crate::stats::TlsFailure::Incompatible);
    s.tls.failed(crate::stats::TlsFailure::Incompatible);
    s.tls
        .reloads_failed
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    s.forwarded(true);
    s.drop(crate::stats::DropReason::Blocked);
    s.latency(8);
    s.latency(40);
    s.latency(100_000);
    // Two panics in the same second: both counted (one logged).
    assert!(s.panic_caught(1_700_000_000));
    assert!(!s.panic_caught(1_700_000_000));
    s.tcp_write_overflows
        .fetch_add(3, std::sync::atomic::Ordering::Relaxed);
    s.tcp_open
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let udp = s.listeners.register("udp:0.0.0.0:5060");
    s.listeners.set_serving(udp, true);
    let tcp = s.listeners.register("tcp:0.0.0.0:5060");
    s.listeners.restarted(tcp);
    t.post("/api/blocks", r#"{"ip":"192.0.2.1"}"#).await;
    let now = t.node.now();
    t.node.stats.events.record(&scanner_block(now), now);
    t.node.stats.events.record(
        &Event::Unblocked {
            key: BlockKey::whole("203.0.113.9/32".parse().unwrap()),
            kind: BlockType::Scanner,
            why: UnblockReason::Expired,
        },
        now,
    );
    let r = t.get("/metrics").await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(r.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/openmetrics-text"));
    let lines: Vec<&str> = r.text.lines().collect();
    for want in [
        "# TYPE sipwarden_sip_packets_received counter",
        "sipwarden_sip_packets_received_total{transport=\"udp\"} 2",
        "sipwarden_sip_packets_received_total{transport=\"tcp\"} 1",
        "sipwarden_sip_packets_received_total{transport=\"tls\"} 1",
        "# TYPE sipwarden_tls_handshakes counter",
        "sipwarden_tls_handshakes_total{outcome=\"ok\"} 4",
        "sipwarden_tls_handshakes_total{outcome=\"failed\"} 3",
        "sipwarden_tls_handshake_failures_total{reason=\"timeout\"} 1",
        "sipwarden_tls_handshake_failures_total{reason=\"incompatible\"} 2",
        "sipwarden_tls_handshake_failures_total{reason=\"cap\"} 0",
        "sipwarden_tls_handshakes_in_progress 0",
        "sipwarden_tls_certificate_reloads_total{outcome=\"ok\"} 0",
        "sipwarden_tls_certificate_reloads_total{outcome=\"failed\"} 1",
        "sipwarden_connections_closed_blocked_total 0",
        "sipwarden_sip_forwarded_total{kind=\"request\"} 1",
        "sipwarden_sip_forwarded_total{kind=\"response\"} 0",
        "sipwarden_sip_dropped_total{reason=\"blocked\"} 1",
        "sipwarden_sip_dropped_total{reason=\"send_failed\"} 0",
        "# TYPE sipwarden_blocks_active gauge",
        "sipwarden_blocks_active{type=\"MANUAL\"} 1",
        "sipwarden_blocks_active{type=\"SCANNER\"} 0",
        "sipwarden_blocks_observed_active 0",
        "sipwarden_list_entries{list=\"whitelist\"} 0",
        "sipwarden_blocks_total{type=\"SCANNER\"} 1",
        // The manual block above, counted by the state task before it answered.
        "sipwarden_blocks_total{type=\"MANUAL\"} 1",
        "sipwarden_observed_blocks_total{type=\"SCANNER\"} 0",
        "sipwarden_unblocks_total{type=\"SCANNER\",why=\"expired\"} 1",
        "sipwarden_unblocks_total{type=\"SCANNER\",why=\"manual\"} 0",
        "sipwarden_alerts_total 0",
        "sipwarden_tftp_requests_total 0",
        "sipwarden_panics_total 2",
        "# TYPE sipwarden_tcp_connections_open gauge",
        "sipwarden_tcp_connections_open 1",
        "sipwarden_tcp_write_overflows_total 3",
        "sipwarden_tcp_write_timeouts_total 0",
        "# TYPE sipwarden_listener_restarts counter",
        "sipwarden_listener_restarts_total{listener=\"udp:0.0.0.0:5060\"} 0",
        "sipwarden_listener_restarts_total{listener=\"tcp:0.0.0.0:5060\"} 1",
        "# TYPE sipwarden_listener_up gauge",
        "sipwarden_listener_up{listener=\"udp:0.0.0.0:5060\"} 1",
        "sipwarden_listener_up{listener=\"tcp:0.0.0.0:5060\"} 0",
        "# TYPE sipwarden_forward_latency_seconds histogram",
        "# UNIT sipwarden_forward_latency_seconds seconds",
        "sipwarden_forward_latency_seconds_sum 0.100048",
        "sipwarden_forward_latency_seconds_count 3",
        "sipwarden_forward_latency_seconds_bucket{le=\"0.00001\"} 1",
        "sipwarden_forward_latency_seconds_bucket{le=\"0.000025\"} 1",
        "sipwarden_forward_latency_seconds_bucket{le=\"0.00005\"} 2",
        "sipwarden_forward_latency_seconds_bucket{le=\"0.025\"} 2",
        "sipwarden_forward_latency_seconds_bucket{le=\"+Inf\"} 3",
        "sipwarden_build_info{version=\"0.1.0\"} 1",
        "# EOF",
    ] {
        assert!(lines.contains(&want), "missing {want:?} in\n{}", r.text);
    }
    assert_eq!(lines.last(), Some(&"# EOF"));
}

/// A dashboard to look at by hand, with made-up attacks:
/// `SIPWARDEN_DEMO_ADDR=127.0.0.1:8099 [SIPWARDEN_DEMO_TOKEN=t] cargo test --lib admin::tests::dashboard_demo -- --ignored`
/// then open http://127.0.0.1:8099/ (runs until interrupted).
#[tokio::test(flavor = "multi_thread")]
#[ignore = "manual: serves a demo dashboard until interrupted"]
async fn dashboard_demo() {
    use crate::engine::Detection;
    use std::time::Duration;
    let addr = std::env::var("SIPWARDEN_DEMO_ADDR").unwrap_or_else(|_| "127.0.0.1:8099".into());
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), crate::geoip::testdb::fixture()).unwrap();
    let mut cfg = Config::default();
    cfg.geoip.database = f.path().display().to_string();
    cfg.admin.token = std::env::var("SIPWARDEN_DEMO_TOKEN").unwrap_or_default();
    let (node, rx) = Node::new(cfg);
    tokio::spawn(crate::state::run(rx, node.clone()));
    let now = node.now();
    type Attack = (
        &'static str,
        Option<u16>,
        BlockType,
        &'static str,
        &'static str,
        u64,
    );
    let attacks: [Attack; 7] = [
        (
            "192.0.2.7",
            None,
            BlockType::Scanner,
            "friendly-scanner",
            "User-Agent matches scanner pattern \"friendly-scanner\"",
            86_400,
        ),
        (
            "198.51.100.23",
            None,
            BlockType::Register,
            "Yealink SIP-T46S 66.86.0.15",
            "6 failed REGISTERs within 60s (403/401 with credentials)",
            3_400,
        ),
        (
            "203.0.113.50",
            Some(5062),
            BlockType::Register,
            "Grandstream GXP2170",
            "NAT-aware: 5 failures from this port; other devices behind 203.0.113.50 authenticated",
            1_800,
        ),
        (
            "2001:db8:42::1",
            None,
            BlockType::Scan,
            "",
            "extension enumeration: 41 distinct users answered 404 within 60s",
            7_000,
        ),
        (
            "192.0.2.99",
            None,
            BlockType::Flood,
            "sipsak 0.9.8",
            "more than 200 packets per second",
            420,
        ),
        (
            "198.51.100.77",
            None,
            BlockType::Anomaly,
            "",
            "protocol anomalies scored 6 within 1m (last: missing Call-ID)",
            45,
        ),
        (
            "203.0.113.8",
            None,
            BlockType::Invite,
            "PolycomVVX-VVX_411-UA/6.4",
            "INVITE flood: over 10/s",
            600,
        ),
    ];
    for (ip, port, kind, device, reason, secs) in attacks {
        let net = crate::blocks::parse_net(ip).unwrap();
        let net = crate::blocks::source_net(net.addr(), 64);
        let key = BlockKey { net, port };
        let d = Detection {
            key,
            kind,
            reason: reason.into(),
            duration: Duration::from_secs(secs),
            evidence: vec![
                format!("OPTIONS sip:100@pbx.example.com SIP/2.0 UA={device}"),
                "REGISTER sip:pbx.example.com SIP/2.0 -> 403 Forbidden".into(),
            ],
        };
        node.with_engine(|e| e.block(now, d, device));
    }
    let now = node.now();
    node.with_engine(|e| {
        e.list_add(
            now,
            crate::blocks::ListKind::Whitelist,
            "10.20.0.0/16".parse().unwrap(),
            "head office phones",
            "api",
        );
        e.list_add(
            now,
            crate::blocks::ListKind::Blacklist,
            "203.0.113.128/25".parse().unwrap(),
            "auto: 3 blocks, last REGISTER",
            "auto",
        );
    });
    for m in 0..60u64 {
        let at = now - m * 60_000;
        let n = (m * 7 % 11) as usize;
        for i in 0..n {
            let kind = BlockType::ALL[(i + m as usize) % 5];
            let mut b = match scanner_block(at) {
                Event::Blocked(b) => b,
                _ => unreachable!(),
            };
            b.kind = kind;
            node.stats.events.record(&Event::Blocked(b), at);
        }
        if m % 13 == 0 {
            node.stats.events.record(
                &Event::Alert {
                    kind: BlockType::Invite,
                    source: "x".into(),
                    message: "x".into(),
                },
                at,
            );
        }
    }
    let s = &node.stats;
    for i in 0..120_000u64 {
        s.packet_in(if i % 5 == 0 {
            crate::stats::Transport::Tcp
        } else {
            crate::stats::Transport::Udp
        });
        if i % 9 == 0 {
            s.drop(crate::stats::DropReason::ALL[(i as usize / 9) % 8]);
        } else {
            s.forwarded(i % 2 == 0);
        }
    }
    let l = tokio::net::TcpListener::bind(&addr).await.unwrap();
    let ticker = node.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            for _ in 0..37 {
                ticker.stats.packet_in(crate::stats::Transport::Udp);
                ticker.stats.forwarded(true);
            }
            ticker.stats.drop(crate::stats::DropReason::Blocked);
            let now = ticker.now();
            ticker.with_engine(|e| e.tick(now));
        }
    });
    super::serve(l, node, None, std::future::pending())
        .await
        .unwrap();
}

/// `/metrics`, `/api/stats` and the CLI rendered from one snapshot show the same numbers.
#[tokio::test]
async fn one_snapshot_renders_the_same_numbers_in_metrics_json_and_cli() {
    use std::sync::atomic::Ordering::Relaxed;

    use crate::stats::{DropReason, TlsFailure, Transport, WsOutcome};

    // No state task: this test attaches the links' counters itself and counts the state
    // events as the state task would.
    let (node, mut rx) = Node::new(Config::default());
    let now = node.now();
    node.with_engine(|e| {
        let d = crate::engine::Detection {
            key: BlockKey::whole("192.0.2.1".parse::<std::net::IpAddr>().unwrap().into()),
            kind: BlockType::Manual,
            reason: "test".into(),
            duration: std::time::Duration::from_secs(60),
            evidence: vec![],
        };
        e.block(now, d, "");
    });
    while let Ok(batch) = rx.try_recv() {
        for ev in &batch.events {
            node.stats.events.record(ev, now);
        }
    }
    let t = T {
        app: router(node.clone(), None),
        node,
    };
    let s = &t.node.stats;
    // A distinct value per counter, so a field read from the wrong counter shows.
    for (tr, n) in [
        (Transport::Udp, 3),
        (Transport::Tcp, 1),
        (Transport::Tls, 2),
        (Transport::Wss, 4),
    ] {
        for _ in 0..n {
            s.packet_in(tr);
        }
    }
    for (i, r) in DropReason::ALL.iter().enumerate() {
        for _ in 0..i {
            s.drop(*r);
        }
    }
    for _ in 0..6 {
        s.forwarded(true);
    }
    s.forwarded(false);
    s.replies_sent.store(8, Relaxed);
    s.keepalives.store(9, Relaxed);
    s.tcp_connections.store(10, Relaxed);
    s.tcp_open.store(2, Relaxed);
    s.tcp_rejected.store(11, Relaxed);
    s.tls.handshakes_ok.store(12, Relaxed);
    s.tls.failed(TlsFailure::Timeout);
    s.tls.failed(TlsFailure::Alert);
    s.ws.upgrade(WsOutcome::Ok);
    s.ws.open.store(1, Relaxed);
    s.tftp_requests.store(13, Relaxed);
    s.alerts.store(14, Relaxed);
    s.events_dropped.store(15, Relaxed);
    s.panics.store(16, Relaxed);
    s.latency(30);
    let st = Arc::new(crate::state::StateStats::default());
    st.commits.store(17, Relaxed);
    st.failures.store(18, Relaxed);
    st.events.store(19, Relaxed);
    s.health.attach_state(st);
    let n = Arc::new(crate::notify::NotifyStats::default());
    n.sent.store(20, Relaxed);
    n.suppressed.store(21, Relaxed);
    s.health.attach_notify(n);
    let cl = Arc::new(crate::cluster::ClusterStats::default());
    cl.published.store(22, Relaxed);
    cl.superseded.store(23, Relaxed);
    cl.last_full_load_rows.store(24, Relaxed);
    s.health.attach_cluster(cl);
    s.events.record(
        &Event::Unblocked {
            key: BlockKey::whole("203.0.113.9/32".parse().unwrap()),
            kind: BlockType::Scanner,
            why: UnblockReason::Expired,
        },
        now,
    );

    let snap = t.node.snapshot();
    let text = super::metrics::render(&snap);
    let view = super::stats_view::StatsView::from(&snap);
    let json = serde_json::to_value(&view).unwrap();
    let cli = super::client::stats_text(&view);
    // What the handlers serve is rendered from a snapshot the same way (nothing moved since).
    let mut served = t.get("/api/stats").await.json();
    let mut taken = json.clone();
    for v in [&mut served, &mut taken] {
        let o = v.as_object_mut().unwrap();
        o.remove("time");
        o.remove("history");
    }
    assert_eq!(served, taken);
    assert_eq!(t.get("/metrics").await.text, text);

    let metric = |series: &str| -> u64 {
        let line = text
            .lines()
            .find(|l| l.strip_prefix(series).is_some_and(|r| r.starts_with(' ')))
            .unwrap_or_else(|| panic!("no {series} in\n{text}"));
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64
    };
    let pairs = [
        (
            "/packets_in/udp",
            "sipwarden_sip_packets_received_total{transport=\"udp\"}",
        ),
        (
            "/packets_in/tcp",
            "sipwarden_sip_packets_received_total{transport=\"tcp\"}",
        ),
        (
            "/packets_in/tls",
            "sipwarden_sip_packets_received_total{transport=\"tls\"}",
        ),
        (
            "/packets_in/ws",
            "sipwarden_sip_packets_received_total{transport=\"ws\"}",
        ),
        (
            "/forwarded/requests",
            "sipwarden_sip_forwarded_total{kind=\"request\"}",
        ),
        (
            "/forwarded/responses",
            "sipwarden_sip_forwarded_total{kind=\"response\"}",
        ),
        ("/replies_sent", "sipwarden_sip_replies_sent_total"),
        ("/keepalives", "sipwarden_sip_keepalives_total"),
        (
            "/active_blocks/by_type/MANUAL",
            "sipwarden_blocks_active{type=\"MANUAL\"}",
        ),
        ("/active_blocks/observe", "sipwarden_blocks_observed_active"),
        (
            "/blocks_made/MANUAL",
            "sipwarden_blocks_total{type=\"MANUAL\"}",
        ),
        (
            "/unblocks/expired",
            "sipwarden_unblocks_total{type=\"SCANNER\",why=\"expired\"}",
        ),
        (
            "/lists/whitelist",
            "sipwarden_list_entries{list=\"whitelist\"}",
        ),
        ("/tracked_sources", "sipwarden_tracked_sources"),
        ("/alerts", "sipwarden_alerts_total"),
        ("/events_dropped", "sipwarden_state_events_dropped_total"),
        ("/tcp/connections", "sipwarden_tcp_connections_open"),
        ("/tcp/accepted", "sipwarden_tcp_connections_total"),
        ("/tcp/rejected", "sipwarden_tcp_rejected_total"),
        (
            "/tls/handshakes_ok",
            "sipwarden_tls_handshakes_total{outcome=\"ok\"}",
        ),
        (
            "/tls/handshakes_failed",
            "sipwarden_tls_handshakes_total{outcome=\"failed\"}",
        ),
        ("/ws/open", "sipwarden_ws_connections_open"),
        ("/panics", "sipwarden_panics_total"),
        ("/tftp/requests", "sipwarden_tftp_requests_total"),
        ("/latency/count", "sipwarden_forward_latency_seconds_count"),
        ("/health/state/commits", "sipwarden_state_commits_total"),
        (
            "/health/state/failures",
            "sipwarden_state_commit_failures_total",
        ),
        ("/health/state/queue_depth", "sipwarden_state_queue_depth"),
        (
            "/health/cluster/published",
            "sipwarden_cluster_published_total",
        ),
        (
            "/health/cluster/superseded",
            "sipwarden_cluster_superseded_total",
        ),
        (
            "/health/notify/sent",
            "sipwarden_notifications_total{outcome=\"sent\"}",
        ),
        (
            "/health/notify/suppressed",
            "sipwarden_notifications_total{outcome=\"suppressed\"}",
        ),
    ];
    for (ptr, series) in pairs {
        let j = json.pointer(ptr).and_then(Value::as_u64);
        assert_eq!(j, Some(metric(series)), "{ptr} against {series}");
    }
    // Every label value of the keyed families, zeros included.
    let families = [
        ("/dropped", "sipwarden_sip_dropped_total{reason=\"{}\"}"),
        (
            "/active_blocks/by_type",
            "sipwarden_blocks_active{type=\"{}\"}",
        ),
        ("/blocks_made", "sipwarden_blocks_total{type=\"{}\"}"),
        (
            "/observed_blocks",
            "sipwarden_observed_blocks_total{type=\"{}\"}",
        ),
        (
            "/tls/failures",
            "sipwarden_tls_handshake_failures_total{reason=\"{}\"}",
        ),
        (
            "/ws/upgrades",
            "sipwarden_ws_upgrades_total{outcome=\"{}\"}",
        ),
    ];
    for (ptr, pattern) in families {
        let map = json.pointer(ptr).and_then(Value::as_object).unwrap();
        assert!(!map.is_empty(), "{ptr}");
        for (k, v) in map {
            let series = pattern.replace("{}", k);
            assert_eq!(v.as_u64(), Some(metric(&series)), "{ptr}/{k}");
        }
    }
    assert_eq!(
        view.dropped_total,
        (0..DropReason::ALL.len() as u64).sum::<u64>()
    );
    assert_eq!(view.active_blocks.total, 1);
    for want in [
        "packets in         10 (udp 3, tcp 1, tls 2, ws 4)",
        "forwarded          6 requests, 1 responses",
        "active blocks      1 (MANUAL 1)",
        "blocks             1 made, 1 lifted since start",
        "tcp                2 open, 10 accepted, 11 refused",
        "panics             16",
        "state store        17 commits, 18 failed, 0 queued, 0 waiting for a retry",
        "notifications      20 sent, 0 failed, 0 dropped, 21 suppressed",
    ] {
        assert!(
            cli.lines().any(|l| l.trim_end() == want),
            "missing {want:?} in\n{cli}"
        );
    }
}
