//! Shared threat feeds: APIBAN (v2: `POST {apiban_url}/get` with `Authorization: Bearer KEY`
//! and a JSON body `{"set": "sip", "id": "ID"}` (both strings), incremental by ID from 100; the
//! answer is `{"ipaddress": [...], "ID": "next"}`, with `{"ipaddress": ["no new bans"],
//! "ID": "none"}` (HTTP 400) once nothing is new, `{"ID": "unauthorized"}` for a bad key and
//! `{"ipaddress": "rate limit exceeded"}` past the rate limit; format as APIBAN's own Go client
//! speaks it, github.com/palner/apiban `clients/go/apiban/apiban.go`: `ApiGetJson{set, id}`,
//! `Banned`, `queryServerv2`, `processBadRequest`)
//! and plain address/CIDR lists by URL (VoIPBL format), pulled every `feeds.interval` into
//! the engine's feed list ([`list::FeedList`]).
//!
//! Bounds: one answer is read up to `feeds.max_bytes`; APIBAN is asked at most
//! [`APIBAN_REQUESTS`] times per [`APIBAN_WINDOW`] (its published limit is 11 per 2 minutes);
//! entries over `feeds.max_entries` are refused and counted.

pub mod list;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::config::Feeds;
use crate::node::Node;

pub const APIBAN_REQUESTS: usize = 10;
pub const APIBAN_WINDOW: Duration = Duration::from_secs(120);
/// The APIBAN set sipwarden pulls: the SIP attackers (APIBAN's client default).
pub const APIBAN_SET: &str = "sip";
/// The first ID of an APIBAN pull: everything active.
pub const APIBAN_FIRST_ID: u64 = 100;
/// Pages of one APIBAN pull (each page is one request).
const APIBAN_PAGES: usize = 10;

#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("HTTP {0}")]
    Status(u16),
    #[error("answer over {0} bytes")]
    TooLarge(usize),
    #[error("bad answer: {0}")]
    Format(String),
    #[error("APIBAN: {0}")]
    Apiban(String),
}

/// Read a body up to `max` bytes.
async fn body(mut resp: reqwest::Response, max: usize) -> Result<Vec<u8>, FeedError> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len() + chunk.len() > max {
            return Err(FeedError::TooLarge(max));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

#[derive(Debug, Deserialize)]
struct ApibanAnswer {
    #[serde(default)]
    ipaddress: serde_json::Value,
    #[serde(rename = "ID", default)]
    id: serde_json::Value,
}

/// One page of APIBAN's answer: the addresses and the next ID (`None`: nothing new).
pub fn parse_apiban(status: u16, body: &[u8]) -> Result<(Vec<IpNet>, Option<u64>), FeedError> {
    let a: ApibanAnswer =
        serde_json::from_slice(body).map_err(|e| FeedError::Format(e.to_string()))?;
    let id = match &a.id {
        serde_json::Value::String(s) if s == "none" => None,
        serde_json::Value::String(s) if s == "unauthorized" => {
            return Err(FeedError::Apiban("unauthorized".into()))
        }
        serde_json::Value::String(s) => Some(
            s.parse::<u64>()
                .map_err(|_| FeedError::Format(format!("ID {s:?}")))?,
        ),
        serde_json::Value::Number(n) => n.as_u64(),
        _ => None,
    };
    if let serde_json::Value::String(s) = &a.ipaddress {
        // {"ipaddress": "rate limit exceeded"} and other refusals.
        return Err(FeedError::Apiban(crate::util::printable(s.as_bytes(), 80)));
    }
    if status != 200 && id.is_some() {
        return Err(FeedError::Status(status));
    }
    let ips = match &a.ipaddress {
        serde_json::Value::Array(v) => v
            .iter()
            .filter_map(|x| x.as_str())
            .filter_map(|s| crate::blocks::parse_net(s).ok())
            .filter(|n| !list::is_special(*n))
            .collect(),
        _ => Vec::new(),
    };
    Ok((ips, id))
}

/// The APIBAN client's memory: where the next pull starts, and recent request times.
#[derive(Debug)]
pub struct Apiban {
    pub next_id: u64,
    sent: VecDeque<tokio::time::Instant>,
}

impl Apiban {
    pub fn new(next_id: Option<u64>) -> Self {
        Self {
            next_id: next_id.unwrap_or(APIBAN_FIRST_ID).max(APIBAN_FIRST_ID),
            sent: VecDeque::new(),
        }
    }

    /// One request allowed now by the rate limit? Records it when so.
    fn admit(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        while self
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= APIBAN_WINDOW)
        {
            self.sent.pop_front();
        }
        if self.sent.len() >= APIBAN_REQUESTS {
            return false;
        }
        self.sent.push_back(now);
        true
    }

    /// Pull every page that is new since `next_id` (within the rate limit).
    pub async fn pull(
        &mut self,
        http: &reqwest::Client,
        cfg: &Feeds,
    ) -> Result<Vec<IpNet>, FeedError> {
        let url = format!("{}/get", cfg.apiban_url.trim_end_matches('/'));
        let mut out = Vec::new();
        for _ in 0..APIBAN_PAGES {
            if !self.admit() {
                break;
            }
            let resp = http
                .post(&url)
                .bearer_auth(&cfg.apiban_key)
                .json(&serde_json::json!({
                    "set": APIBAN_SET,
                    "id": self.next_id.to_string(),
                }))
                .send()
                .await?;
            let status = resp.status().as_u16();
            if status == 401 || status == 403 {
                return Err(FeedError::Apiban(
                    "unauthorized (check feeds.apiban_key)".into(),
                ));
            }
            if status != 200 && status != 400 {
                return Err(FeedError::Status(status));
            }
            let b = body(resp, cfg.max_bytes).await?;
            let (ips, next) = parse_apiban(status, &b)?;
            out.extend(ips);
            match next {
                Some(id) if id > self.next_id => self.next_id = id,
                _ => break,
            }
            if out.len() >= cfg.max_entries {
                break;
            }
        }
        Ok(out)
    }
}

/// Pull one plain list.
pub async fn pull_plain(
    http: &reqwest::Client,
    url: &str,
    cfg: &Feeds,
) -> Result<Vec<IpNet>, FeedError> {
    let resp = http.get(url).send().await?;
    let status = resp.status().as_u16();
    if status != 200 {
        return Err(FeedError::Status(status));
    }
    let b = body(resp, cfg.max_bytes).await?;
    let text = String::from_utf8_lossy(&b);
    Ok(list::parse_plain(&text, cfg.max_entries).0)
}

/// The name a plain list is shown under: its host and path, clipped.
pub fn list_name(url: &str) -> String {
    let s = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .unwrap_or(url);
    crate::util::printable(s.as_bytes(), 60)
}

/// One round: every configured feed, applied to the engine as it arrives.
pub async fn pull_all(node: &Node, http: &reqwest::Client, apiban: &mut Option<Apiban>) {
    let cfg = node.config().feeds.clone();
    if cfg.apiban_key.is_empty() {
        *apiban = None;
    } else {
        let a = apiban.get_or_insert_with(|| {
            let stored = node.inspect(|e| {
                e.feeds()
                    .status()
                    .find(|s| s.name == "apiban")
                    .and_then(|s| s.next_id)
            });
            Apiban::new(stored)
        });
        let r = a.pull(http, &cfg).await;
        let next = Some(a.next_id);
        apply(node, "apiban", &cfg.apiban_url, r, next);
    }
    for url in &cfg.lists {
        let r = pull_plain(http, url, &cfg).await;
        apply(node, &list_name(url), url, r, None);
    }
}

fn apply(node: &Node, feed: &str, url: &str, r: Result<Vec<IpNet>, FeedError>, next: Option<u64>) {
    let now = node.now();
    match r {
        Ok(nets) => {
            let added = node.with_engine(|e| e.feed_update(now, feed, url, &nets, next, None));
            tracing::info!(target: "sipwarden::feeds", feed, listed = nets.len(), added, "feed pulled");
        }
        Err(err) => {
            tracing::warn!(target: "sipwarden::feeds", feed, error = %err, "feed pull failed");
            node.with_engine(|e| e.feed_update(now, feed, url, &[], next, Some(err.to_string())));
        }
    }
}

/// The feeds task: a pull at start and every `feeds.interval` (read again after a reload).
pub async fn run(node: Arc<Node>) {
    let timeout = node.config().feeds.timeout;
    let Ok(http) = reqwest::Client::builder()
        .timeout(timeout)
        .user_agent(concat!("sipwarden/", env!("CARGO_PKG_VERSION")))
        .build()
    else {
        tracing::error!(target: "sipwarden::feeds", "cannot build the HTTP client; feeds off");
        return;
    };
    let mut apiban = None;
    loop {
        let cfg = node.config().feeds.clone();
        if !cfg.apiban_key.is_empty() || !cfg.lists.is_empty() {
            pull_all(&node, &http, &mut apiban).await;
        }
        tokio::time::sleep(cfg.interval).await;
    }
}
