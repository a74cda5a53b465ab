//! The operator surface on `admin.listen`: the dashboard at `/`, the JSON API under `/api/`,
//! `/metrics` for Prometheus and `/healthz`; and the CLI client that talks to it.
//!
//! Security decisions, all in [`guard`]:
//! - With `admin.token` set, every `/api/` call needs `Authorization: Bearer TOKEN` (compared in
//!   constant time; the token is read from the live config, so a reload can rotate it).
//! - Without a token (allowed on loopback only) the API still refuses what a web page in the
//!   operator's browser could forge: a `Host` that is not an IP literal or `localhost`
//!   (DNS rebinding), a cross-origin `Origin` on a change, and a change whose body is not
//!   declared `application/json` (which a form or `no-cors` fetch cannot send).
//! - Bodies are capped at [`MAX_BODY`]; bad input is a 400 that changes nothing.

pub mod api;
pub mod client;
mod dashboard;
pub mod history;
pub mod metrics;
pub mod stats_view;
pub mod target;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use tokio::sync::{mpsc, oneshot};

use crate::node::Node;

/// Largest request body accepted: the API's bodies are a few hundred bytes.
pub const MAX_BODY: usize = 64 * 1024;

/// How the API asks the main task to reload the config file; the answer says whether it worked.
pub type ReloadTx = mpsc::Sender<oneshot::Sender<Result<(), String>>>;

/// Shared by every handler.
pub(crate) struct AppState {
    pub node: Arc<Node>,
    pub reload: Option<ReloadTx>,
    pub geo: api::GeoCache,
}

/// Serve the admin surface on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    node: Arc<Node>,
    reload: Option<ReloadTx>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "admin API and dashboard listening");
    }
    axum::serve(listener, router(node, reload))
        .with_graceful_shutdown(shutdown)
        .await
}

/// The whole admin router (also what the tests drive with `oneshot`).
pub fn router(node: Arc<Node>, reload: Option<ReloadTx>) -> Router {
    let state = Arc::new(AppState {
        node,
        reload,
        geo: api::GeoCache::default(),
    });
    let api = Router::new()
        .route("/blocks", get(api::list_blocks).post(api::add_block))
        .route(
            "/blocks/{*ip}",
            get(dashboard::block_detail).delete(api::remove_block),
        )
        .route("/whitelist", get(api::whitelist).post(api::whitelist_add))
        .route("/whitelist/{*cidr}", delete(api::whitelist_remove))
        .route("/blacklist", get(api::blacklist).post(api::blacklist_add))
        .route("/blacklist/{*cidr}", delete(api::blacklist_remove))
        .route("/stats", get(stats_view::stats))
        .route("/fraud", get(api::fraud))
        .route("/feeds", get(api::feeds))
        .route("/cluster", get(api::cluster))
        .route("/reload", post(api::reload))
        .fallback(api_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), guard));
    Router::new()
        .route("/", get(dashboard::page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_handler))
        .nest("/api", api)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .with_state(state)
}

/// A JSON error: `{"error": "..."}` with a status.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }

    pub fn bad(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<crate::node::NotDurable> for ApiError {
    fn from(e: crate::node::NotDurable) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"sipwarden\""),
            );
        }
        r
    }
}

/// Constant-time comparison (for the token): the time depends on the lengths only.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn host_is_literal(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// Authentication and the anti-forgery checks described in the module docs.
async fn guard(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let token = st.node.config().admin.token.clone();
    let h = req.headers();
    if token.is_empty() {
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
        if let Some(host) = host.filter(|h| !host_is_literal(h)) {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "Host {host:?} refused: without admin.token the API answers only to an IP \
                     address or localhost (DNS rebinding protection); set admin.token to use a \
                     host name"
                ),
            )
            .into_response();
        }
    } else {
        let given = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match given {
            Some(t) if ct_eq(t.as_bytes(), token.as_bytes()) => {}
            Some(_) => {
                return ApiError::new(StatusCode::UNAUTHORIZED, "wrong bearer token")
                    .into_response()
            }
            None => {
                return ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "missing Authorization: Bearer TOKEN (admin.token is set)",
                )
                .into_response()
            }
        }
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        if let Err(e) = same_origin(h) {
            return e.into_response();
        }
    }
    next.run(req).await
}

/// A change must not come from another web origin, and a body must be declared JSON.
fn same_origin(h: &HeaderMap) -> Result<(), ApiError> {
    if let Some(origin) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = h
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let origin_host = origin.split_once("://").map_or("", |(_, rest)| rest);
        if origin_host != host {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!("cross-origin request from {origin:?} refused"),
            ));
        }
    }
    let has_body = h
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "0")
        || h.contains_key(header::TRANSFER_ENCODING);
    if has_body {
        let ct = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/json") {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!("Content-Type must be application/json, not {ct:?}"),
            ));
        }
    }
    Ok(())
}

/// `GET /healthz`: 200 `ok` while every listener task is serving; 503 naming the ones that are
/// not (a listener being restarted by the supervisor), so a load balancer or monitor notices.
async fn healthz(State(st): State<Arc<AppState>>) -> Response {
    let down = st.node.stats.listeners.not_serving();
    if down.is_empty() {
        (StatusCode::OK, "ok").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not serving: {}\n", down.join(", ")),
        )
            .into_response()
    }
}

async fn metrics_handler(State(st): State<Arc<AppState>>) -> Response {
    let body = metrics::render(&st.node.snapshot());
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn api_not_found(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such API endpoint: {method} /api{}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed on /api{}", uri.path()),
    )
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, format!("not found: {}", uri.path()))
}
