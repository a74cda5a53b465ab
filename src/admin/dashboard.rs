//! The dashboard: one self-contained HTML page (inline CSS and JS, no external assets) compiled
//! into the binary. It polls the JSON API; everything it shows from the network (User-Agents,
//! evidence) is attacker text and is inserted as text, never as HTML.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde::{Deserialize, Serialize};

use super::api::{self, BlockRow};
use super::target::parse_target;
use super::{ApiError, AppState};
use crate::blocks::evidence::Packet;
use crate::blocks::BlockKey;

const PAGE: &str = include_str!("dashboard.html");

/// Content-Security-Policy: the page may talk to its own origin only, load nothing from
/// elsewhere, and not be framed.
const CSP: &str = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                   img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; \
                   frame-ancestors 'none'";

pub(crate) async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        PAGE,
    )
}

/// One block with its captured packets (`GET /api/blocks/{ip}`, `{ip}` as in DELETE: an
/// address, `ip:port` for an (address, port) block, or an IPv6 prefix), for the detail view's
/// ladder. The list (`GET /api/blocks`) leaves the packets out to stay small.
#[derive(Debug, Serialize, Deserialize)]
pub struct BlockDetail {
    #[serde(flatten)]
    pub row: BlockRow,
    /// Oldest first.
    pub packets: Vec<Packet>,
}

pub(crate) async fn block_detail(
    State(st): State<Arc<AppState>>,
    ip: Result<Path<String>, PathRejection>,
) -> Result<Json<BlockDetail>, ApiError> {
    let ip = api::path_arg(ip)?;
    let cfg = st.node.config();
    let t = parse_target(&ip, cfg.protection.ipv6_prefix).map_err(ApiError::bad)?;
    let key = BlockKey {
        net: t.net,
        port: t.port,
    };
    let now = st.node.now();
    let block = st
        .node
        .inspect(|e| e.block_table().get(&key).cloned())
        .filter(|b| !b.is_expired(now))
        .ok_or_else(|| ApiError::new(StatusCode::NOT_FOUND, format!("no block on {ip}")))?;
    let geo = st.geo.get(&cfg.geoip.database);
    Ok(Json(BlockDetail {
        row: BlockRow::of(&block, now, api::country(geo.as_deref(), &block.key)),
        packets: block.packets,
    }))
}
