//! Feeds against a local HTTP server that speaks APIBAN's documented request/response format
//! and serves a plain list (the real services are not reachable from the test machines).
#![allow(clippy::indexing_slicing)]

use std::sync::Mutex;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use super::*;
use crate::config::Config;
use crate::engine::{Engine, Pre};

#[derive(Default)]
struct Fake {
    ids: Mutex<Vec<String>>,
}

/// APIBAN: pages by ID; 100 -> two addresses and ID 1700; 1700 -> one more and ID 1800;
/// 1800 -> 400 {"ipaddress":["no new bans"],"ID":"none"}. A body other than
/// {"set":"sip","id":"N"} -> 400 (the format of github.com/palner/apiban's Go client).
async fn apiban_get(
    State(f): State<Arc<Fake>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer KEY") {
        return (
            StatusCode::UNAUTHORIZED,
            Json(json!({"ID": "unauthorized"})),
        );
    }
    // The body APIBAN's own client sends: {"set": "sip", "id": "100"}, both strings.
    if body["set"].as_str() != Some("sip") || !body["id"].is_string() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"ipaddress": "bad request", "ID": "bad request"})),
        );
    }
    let id = body["id"].as_str().unwrap_or("").to_string();
    f.ids.lock().unwrap().push(id.clone());
    match id.as_str() {
        "100" => (
            StatusCode::OK,
            Json(json!({"ipaddress": ["203.0.113.5", "203.0.113.6"], "ID": "1700"})),
        ),
        "1700" => (
            StatusCode::OK,
            Json(json!({"ipaddress": ["198.51.100.9"], "ID": "1800"})),
        ),
        _ => (
            StatusCode::BAD_REQUEST,
            Json(json!({"ipaddress": ["no new bans"], "ID": "none"})),
        ),
    }
}

async fn server() -> (String, Arc<Fake>) {
    let fake = Arc::new(Fake::default());
    let app = Router::new()
        .route("/api/get", post(apiban_get))
        .route(
            "/voipbl.txt",
            get(|| async { "# VoIPBL\n45.0.0.0/24\n10.0.0.1\n192.0.2.77 ; comment\ngarbage\n" }),
        )
        .with_state(fake.clone());
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.ok() });
    (format!("http://{addr}"), fake)
}

fn cfg(base: &str) -> Config {
    let mut c = Config::default();
    c.feeds.apiban_key = "KEY".into();
    c.feeds.apiban_url = format!("{base}/api");
    c.feeds.lists = vec![format!("{base}/voipbl.txt")];
    c.lists.whitelist = vec!["198.51.100.0/24".parse().unwrap()];
    c
}

#[test]
fn parse_formats() {
    let (ips, id) = parse_apiban(
        200,
        br#"{"ipaddress":["1.2.3.4","bad","10.0.0.1"],"ID":"123"}"#,
    )
    .unwrap();
    assert_eq!((ips.len(), id), (1, Some(123)));
    assert_eq!(
        parse_apiban(400, br#"{"ipaddress":["no new bans"],"ID":"none"}"#)
            .unwrap()
            .1,
        None
    );
    assert!(parse_apiban(400, br#"{"ipaddress":"rate limit exceeded","ID":"none"}"#).is_err());
    assert!(parse_apiban(400, br#"{"ID":"unauthorized"}"#).is_err());
    assert!(parse_apiban(200, b"<html>").is_err());
    let (nets, bad) = list::parse_plain("1.2.3.4\n# c\n5.6.7.0/24 x\n127.0.0.1\n::1\nzz\n", 10);
    assert_eq!((nets.len(), bad), (2, 3));
}

#[tokio::test]
async fn incremental_pulls_expiry_whitelist_and_restart() {
    let (base, fake) = server().await;
    let c = cfg(&base);
    let t0 = crate::clock::wall_ms();
    let _ = t0;
    let (node, _rx) = Node::new(c.clone());
    let http = reqwest::Client::new();
    let mut apiban = None;
    pull_all(&node, &http, &mut apiban).await;
    assert_eq!(*fake.ids.lock().unwrap(), ["100", "1700", "1800"]);
    // A second round asks only from the last ID.
    pull_all(&node, &http, &mut apiban).await;
    assert_eq!(
        fake.ids.lock().unwrap().last().map(String::as_str),
        Some("1800")
    );
    let now = node.now();
    let pre = |ip: &str| {
        node.engine()
            .precheck(now, format!("{ip}:5060").parse().unwrap())
    };
    assert_eq!(
        pre("203.0.113.5"),
        Pre::Blocked {
            kind: crate::blocks::BlockType::Feed,
            reply_403: false
        }
    );
    assert_eq!(
        pre("45.0.0.200"),
        Pre::Blocked {
            kind: crate::blocks::BlockType::Feed,
            reply_403: false
        }
    );
    // Whitelisted: never listed, never blocked. Private addresses are not taken from feeds.
    assert_eq!(pre("198.51.100.9"), Pre::Whitelisted);
    assert_eq!(pre("10.0.0.1"), Pre::Inspect);
    // The FEED block shows its feed.
    let reason = node.inspect(|e| {
        e.blocks()
            .find(|b| b.kind == crate::blocks::BlockType::Feed && b.key.ip_text() == "203.0.113.5")
            .map(|b| b.reason.clone())
    });
    assert!(reason.unwrap().contains("apiban"));
    let status: Vec<_> = node.inspect(|e| e.feeds().status().cloned().collect());
    assert_eq!(status.len(), 2);
    assert!(status
        .iter()
        .all(|s| s.last_update.is_some() && s.last_error.is_empty()));
    assert_eq!(
        status.iter().find(|s| s.name == "apiban").unwrap().next_id,
        Some(1800)
    );

    // Restart: the snapshot brings back entries and the APIBAN position.
    let snaps = node.inspect(|e| e.durable_snapshots());
    let feeds = snaps.iter().find(|(n, _)| *n == "feeds").unwrap().1.clone();
    let mut e2 = Engine::new(&c, now);
    assert!(e2.ledger_mut().restore_snapshot(now, "feeds", &feeds));
    assert_eq!(e2.ledger_mut().feeds().len(), 4);
    assert!(matches!(
        e2.precheck(now, "203.0.113.6:5060".parse().unwrap()),
        Pre::Blocked { .. }
    ));
    // Expiry: not listed again within entry_lifetime, gone.
    let later = now + c.feeds.entry_lifetime.as_millis() as u64 + 1;
    e2.ledger_mut()
        .feed_update(later, "apiban", "", &[], None, None);
    assert_eq!(e2.ledger_mut().feeds().len(), 0);
    assert_eq!(
        e2.precheck(later, "45.0.0.7:5060".parse().unwrap()),
        Pre::Inspect
    );
}

#[tokio::test]
async fn a_wrong_key_is_reported_not_fatal() {
    let (base, _) = server().await;
    let mut c = cfg(&base);
    c.feeds.apiban_key = "WRONG".into();
    let (node, _rx) = Node::new(c.clone());
    let mut apiban = None;
    pull_all(&node, &reqwest::Client::new(), &mut apiban).await;
    let s: Vec<_> = node.inspect(|e| e.feeds().status().cloned().collect());
    assert!(s
        .iter()
        .any(|s| s.name == "apiban" && s.last_error.contains("unauthorized")));
}
