//! The JSON API handlers and the shapes they exchange (the CLI client reads the same types).
//!
//! Times are unix seconds (`blocked_at`, `added_at`, `history.start`, `time`). Changes wait
//! until the state task has made them durable before answering 200.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use parking_lot::Mutex;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::target::{net_text, parse_list_net, parse_target};
use super::{ApiError, AppState};
use crate::blocks::{Block, BlockKey, BlockType, ListEntry, ListKind};
use crate::clock::Millis;
use crate::geoip::GeoIp;

type St = State<Arc<AppState>>;

/// One row of the block table, as `GET /api/blocks` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockRow {
    /// Address, or IPv6 prefix (`2001:db8::/64`).
    pub ip: String,
    /// Set when only this (address, port) is blocked (a device behind a shared NAT).
    pub port: Option<u16>,
    /// English country name, `-` when unknown or without a database.
    pub country: String,
    #[serde(rename = "type")]
    pub kind: BlockType,
    pub device: String,
    pub reason: String,
    /// Unix seconds.
    pub blocked_at: u64,
    /// `None` when permanent.
    pub unblock_in_secs: Option<u64>,
    pub permanent: bool,
    pub strikes: u32,
    pub hits: u64,
    pub evidence: Vec<String>,
    /// A would-be block in observe mode: shown, nothing dropped.
    pub observe: bool,
}

impl BlockRow {
    pub fn of(b: &Block, now: Millis, country: Option<String>) -> Self {
        BlockRow {
            ip: b.key.ip_text(),
            port: b.key.port,
            country: country.unwrap_or_else(|| "-".into()),
            kind: b.kind,
            device: b.device.clone(),
            reason: b.reason.clone(),
            blocked_at: b.blocked_at / 1000,
            unblock_in_secs: b.unblock_in_secs(now),
            permanent: b.expires_at.is_none(),
            strikes: b.strikes,
            hits: b.hits,
            evidence: b.evidence.clone(),
            observe: !b.enforced,
        }
    }

    /// `1.2.3.4`, `1.2.3.4:5062`, `[2001:db8::]/64:5062`.
    pub fn target(&self) -> String {
        match self.port {
            None => self.ip.clone(),
            Some(p) if self.ip.contains(':') => format!("[{}]:{p}", self.ip),
            Some(p) => format!("{}:{p}", self.ip),
        }
    }
}

/// Body of `POST /api/blocks`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockRequest {
    pub ip: String,
    /// `90s`, `10m`, `1h`, `7d`; permanent when absent or null.
    #[serde(default)]
    pub duration: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlocksQuery {
    /// At most this many rows, newest first. `X-Total-Count` says how many matched.
    pub limit: Option<usize>,
    /// Case-insensitive text that must occur in the IP, type, device, reason or country.
    pub q: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unblocked {
    pub ip: String,
    pub port: Option<u16>,
    #[serde(rename = "type")]
    pub kind: BlockType,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnblockResult {
    pub unblocked: Vec<Unblocked>,
}

/// One entry of the whitelist or blacklist.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ListRow {
    pub cidr: String,
    pub comment: String,
    /// Unix seconds.
    pub added_at: u64,
    /// `config`, `api`, `auto` (after repeated blocks) or `cluster`.
    pub source: String,
}

impl ListRow {
    fn of(net: ipnet::IpNet, e: &ListEntry) -> Self {
        ListRow {
            cidr: net.to_string(),
            comment: e.comment.clone(),
            added_at: e.added_at / 1000,
            source: e.source.clone(),
        }
    }
}

/// Body of `POST /api/whitelist` and `/api/blacklist`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    pub cidr: String,
    #[serde(default)]
    pub comment: Option<String>,
}

// ---- geoip ---------------------------------------------------------------------------------

/// The country database named by `geoip.database`, reopened when the path (after a reload) or
/// the file (a monthly update) changes. The file is looked at no more than every
/// [`GEO_RECHECK`].
#[derive(Default)]
pub struct GeoCache {
    inner: Mutex<GeoState>,
}

#[derive(Default)]
struct GeoState {
    path: String,
    mtime: Option<SystemTime>,
    checked: Option<Instant>,
    db: Option<Arc<GeoIp>>,
}

const GEO_RECHECK: Duration = Duration::from_secs(10);

impl GeoCache {
    pub fn get(&self, path: &str) -> Option<Arc<GeoIp>> {
        if path.is_empty() {
            return None;
        }
        let mut g = self.inner.lock();
        if g.path == path && g.checked.is_some_and(|t| t.elapsed() < GEO_RECHECK) {
            return g.db.clone();
        }
        let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if g.path != path || g.mtime != mtime || g.checked.is_none() {
            g.db = match GeoIp::open(path) {
                Ok(db) => {
                    tracing::info!(path, kind = db.database_type(), "geoip database loaded");
                    Some(Arc::new(db))
                }
                Err(e) => {
                    tracing::warn!("{e}; the country column shows \"-\"");
                    None
                }
            };
            g.path = path.to_string();
            g.mtime = mtime;
        }
        g.checked = Some(Instant::now());
        g.db.clone()
    }
}

pub(crate) fn country(geo: Option<&GeoIp>, key: &BlockKey) -> Option<String> {
    geo.and_then(|g| g.country(key.net.addr()))
}

// ---- helpers -------------------------------------------------------------------------------

fn body_json<T: DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|r| ApiError::new(r.status(), r.body_text()))?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad(format!("bad JSON body: {e}")))
}

pub(crate) fn path_arg(p: Result<Path<String>, PathRejection>) -> Result<String, ApiError> {
    p.map(|Path(s)| s)
        .map_err(|r| ApiError::bad(format!("bad path: {}", r.body_text())))
}

fn parse_duration(s: &str) -> Result<Duration, ApiError> {
    let d = humantime::parse_duration(s.trim()).map_err(|e| {
        ApiError::bad(format!(
            "duration {s:?}: {e} (use a duration like \"90s\", \"10m\", \"1h\", \"7d\")"
        ))
    })?;
    if d.is_zero() {
        return Err(ApiError::bad(format!(
            "duration {s:?}: must be positive (leave it out for a permanent block)"
        )));
    }
    Ok(d)
}

fn matches(b: &Block, q: &str) -> bool {
    let has = |s: &str| s.to_lowercase().contains(q);
    has(&b.key.to_string())
        || has(b.kind.as_str())
        || has(&b.device)
        || has(&b.reason)
        || (q == "observe" && !b.enforced)
}

// ---- blocks --------------------------------------------------------------------------------

/// Blocks matched or copied per hold of the engine lock when listing (see [`list_blocks`]):
/// about a tenth of a millisecond of the packet path's time each.
const LIST_CHUNK: usize = 512;

pub(crate) async fn list_blocks(
    State(st): St,
    query: Result<Query<BlocksQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|r| ApiError::bad(r.body_text()))?;
    let node = &st.node;
    let now = node.now();
    let q = query
        .q
        .map(|q| q.trim().to_lowercase())
        .filter(|q| !q.is_empty());
    let geo = st.geo.get(&node.config().geoip.database);
    // The packet path takes the engine lock for every clean packet, so a table of 100 000
    // blocks is read in short holds: one pass collecting keys (a few bytes per block), then
    // matching and copying rows in chunks of LIST_CHUNK keys, letting the lock go between
    // chunks. Country lookups, sorting and encoding happen outside it. A block that goes away
    // between two holds is left out.
    // `peek`, not `inspect`: folding the gate's hits into every row would walk the whole gate
    // under the lock; each copied row adds its own unfolded hits instead.
    let mut found: Vec<(Millis, BlockKey, bool)> = node.peek(|e| {
        e.blocks()
            .filter(|b| !b.is_expired(now))
            .map(|b| (b.blocked_at, b.key, q.is_none()))
            .collect()
    });
    if let Some(q) = q.as_deref() {
        for chunk in found.chunks_mut(LIST_CHUNK) {
            node.peek(|e| {
                for f in chunk.iter_mut() {
                    f.2 = e.block_table().get(&f.1).is_some_and(|b| matches(b, q));
                }
            });
            tokio::task::yield_now().await;
        }
        if let Some(g) = geo.as_deref() {
            for f in found.iter_mut().filter(|f| !f.2) {
                f.2 = country(Some(g), &f.1).is_some_and(|c| c.to_lowercase().contains(q));
            }
        }
    }
    found.retain(|f| f.2);
    let total = found.len();
    found.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    found.truncate(query.limit.unwrap_or(usize::MAX));
    let mut rows: Vec<BlockRow> = Vec::with_capacity(found.len());
    for chunk in found.chunks(LIST_CHUNK) {
        let copied: Vec<(BlockKey, BlockRow)> = node.peek(|e| {
            chunk
                .iter()
                .filter_map(|f| e.block_table().get(&f.1))
                .map(|b| {
                    let mut row = BlockRow::of(b, now, None);
                    row.hits = e.block_table().hits(b);
                    (b.key, row)
                })
                .collect()
        });
        rows.extend(copied.into_iter().map(|(key, mut row)| {
            if let Some(c) = country(geo.as_deref(), &key) {
                row.country = c;
            }
            row
        }));
        tokio::task::yield_now().await;
    }
    // Encoding megabytes of JSON is a blocking job: off the workers the receive loops run on.
    let body = tokio::task::spawn_blocking(move || serde_json::to_vec(&rows))
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("listing blocks: {e}"),
            )
        })?
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("listing blocks: {e}"),
            )
        })?;
    let mut r = (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    r.headers_mut()
        .insert("x-total-count", HeaderValue::from(total as u64));
    Ok(r)
}

pub(crate) async fn add_block(
    State(st): St,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<BlockRow>, ApiError> {
    let req: BlockRequest = body_json(body)?;
    let cfg = st.node.config();
    let t = parse_target(&req.ip, cfg.protection.ipv6_prefix).map_err(ApiError::bad)?;
    if t.range {
        return Err(ApiError::bad(format!(
            "{} is a range: the block table holds single IPv4 addresses and IPv6 /{} prefixes; \
             put ranges on the blacklist",
            net_text(t.net),
            cfg.protection.ipv6_prefix
        )));
    }
    let duration = req.duration.as_deref().map(parse_duration).transpose()?;
    let reason = req.reason.unwrap_or_default();
    let key = BlockKey {
        net: t.net,
        port: t.port,
    };
    let now = st.node.now();
    let block = st
        .node
        .with_engine_durable(|e| e.manual_block(now, key, duration, reason.trim()))
        .await?
        .map_err(|m| ApiError::new(StatusCode::CONFLICT, m))?;
    let geo = st.geo.get(&cfg.geoip.database);
    Ok(Json(BlockRow::of(
        &block,
        now,
        country(geo.as_deref(), &block.key),
    )))
}

pub(crate) async fn remove_block(
    State(st): St,
    ip: Result<Path<String>, PathRejection>,
) -> Result<Json<UnblockResult>, ApiError> {
    let ip = path_arg(ip)?;
    let cfg = st.node.config();
    let t = parse_target(&ip, cfg.protection.ipv6_prefix).map_err(ApiError::bad)?;
    let removed = st
        .node
        .with_engine_durable(|e| e.unblock(t.net, t.port))
        .await?;
    st.node.engine().forget(&removed);
    if removed.is_empty() {
        let listed = st.node.inspect(|e| {
            e.lists()
                .blacklisted(t.net.addr())
                .map(|(n, _)| n.to_string())
        });
        let what = match t.port {
            Some(p) => format!("{}:{p}", net_text(t.net)),
            None => net_text(t.net),
        };
        let hint = listed.map_or(String::new(), |n| {
            format!(" (it is covered by blacklist entry {n}: remove that instead)")
        });
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no block on {what}{hint}"),
        ));
    }
    Ok(Json(UnblockResult {
        unblocked: removed
            .iter()
            .map(|b| Unblocked {
                ip: b.key.ip_text(),
                port: b.key.port,
                kind: b.kind,
            })
            .collect(),
    }))
}

// ---- lists ---------------------------------------------------------------------------------

fn list_rows(st: &AppState, kind: ListKind) -> Vec<ListRow> {
    st.node.inspect(|e| {
        e.lists()
            .entries(kind)
            .iter()
            .map(|(n, e)| ListRow::of(*n, e))
            .collect()
    })
}

async fn list_add(
    st: &AppState,
    kind: ListKind,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ListRow>, ApiError> {
    let req: ListRequest = body_json(body)?;
    let net = parse_list_net(&req.cidr).map_err(ApiError::bad)?;
    let comment = req.comment.unwrap_or_default();
    let now = st.node.now();
    let entry = st
        .node
        .with_engine_durable(|e| e.list_add(now, kind, net, comment.trim(), "api"))
        .await?;
    Ok(Json(ListRow::of(net.trunc(), &entry)))
}

async fn list_remove(
    st: &AppState,
    kind: ListKind,
    cidr: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let cidr = path_arg(cidr)?;
    let net = parse_list_net(&cidr).map_err(ApiError::bad)?.trunc();
    if st
        .node
        .with_engine_durable(|e| e.list_remove(kind, net))
        .await?
    {
        Ok(Json(serde_json::json!({ "removed": net.to_string() })))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("{net} is not on the {}", kind.as_str()),
        ))
    }
}

pub(crate) async fn whitelist(State(st): St) -> Json<Vec<ListRow>> {
    Json(list_rows(&st, ListKind::Whitelist))
}

pub(crate) async fn blacklist(State(st): St) -> Json<Vec<ListRow>> {
    Json(list_rows(&st, ListKind::Blacklist))
}

pub(crate) async fn whitelist_add(
    State(st): St,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ListRow>, ApiError> {
    list_add(&st, ListKind::Whitelist, body).await
}

pub(crate) async fn blacklist_add(
    State(st): St,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<ListRow>, ApiError> {
    list_add(&st, ListKind::Blacklist, body).await
}

pub(crate) async fn whitelist_remove(
    State(st): St,
    cidr: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    list_remove(&st, ListKind::Whitelist, cidr).await
}

pub(crate) async fn blacklist_remove(
    State(st): St,
    cidr: Result<Path<String>, PathRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    list_remove(&st, ListKind::Blacklist, cidr).await
}

// ---- reload ------------------------------------------------------------------------------------

/// How long `POST /api/reload` waits for the main task's answer.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

pub(crate) async fn reload(State(st): St) -> Result<Json<serde_json::Value>, ApiError> {
    let unavailable = |m: &str| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, m);
    let Some(tx) = &st.reload else {
        return Err(unavailable("reload is not available in this process"));
    };
    let (done, answer) = tokio::sync::oneshot::channel();
    tx.send(done)
        .await
        .map_err(|_| unavailable("the reload handler is not running"))?;
    match tokio::time::timeout(RELOAD_TIMEOUT, answer).await {
        Ok(Ok(Ok(()))) => Ok(Json(serde_json::json!({ "reloaded": true }))),
        // The config file is wrong: the old config stays in force.
        Ok(Ok(Err(msg))) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("reload failed, the running config is unchanged: {msg}"),
        )),
        Ok(Err(_)) => Err(unavailable("the reload handler dropped the request")),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "no answer from the reload handler within 30s",
        )),
    }
}

/// `GET /api/fraud`: the toll-fraud guard's accounts and sources near or over a threshold, calls
/// up, top destinations.
pub(crate) async fn fraud(State(st): St) -> Json<crate::engine::fraud::Report> {
    let now = st.node.now();
    Json(st.node.inspect(|e| e.fraud().report(now)))
}

/// `GET /api/cluster`: this node, the nodes seen in the shared log (last contact, lag), the
/// Redis link and the sharing counters.
pub(crate) async fn cluster(State(st): St) -> Json<crate::cluster::ClusterView> {
    Json(match st.node.stats.health.cluster() {
        Some(c) => crate::cluster::ClusterView::from_stats(c, crate::clock::wall_ms(), true),
        None => crate::cluster::ClusterView::single(),
    })
}

/// `GET /api/feeds`: each feed with its URL, entry count, last update and last error.
pub(crate) async fn feeds(State(st): St) -> Json<serde_json::Value> {
    let (total, feeds) = st.node.inspect(|e| {
        let f = e.feeds();
        (f.len(), f.status().cloned().collect::<Vec<_>>())
    });
    Json(serde_json::json!({ "entries": total, "feeds": feeds }))
}
