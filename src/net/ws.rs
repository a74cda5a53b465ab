//! SIP over WebSocket (RFC 7118): the HTTP upgrade with the `sip` subprotocol, then one SIP
//! message per WebSocket message. Generic over the byte stream, so the same code serves plain
//! `sip.listen_ws` (behind a TLS-terminating load balancer) and `sip.listen_wss` (after the TLS
//! handshake). A connection sits in the same table as TCP ([`super::Conns`]): responses and the
//! PBX's requests for a WebSocket client go down its own connection, through a write queue
//! bounded in bytes.
#![deny(clippy::string_slice, clippy::indexing_slicing)]
#![warn(unreachable_pub)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use ipnet::IpNet;
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::{timeout, Instant};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{header, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::handler::{Scratch, Shared};
use super::{conn_channel, handle_caught, WriteClose};
use crate::blocks::GateVerdict;
use crate::engine::anomaly::Anomaly;
use crate::proxy::Inbound;
use crate::stats::{DropReason, Transport, WsOutcome};

/// Connections of one listener still in the upgrade, per source network and in total. Bounded
/// by `websocket.max_handshakes_per_ip` and `sip.max_connections`: an attacker who opens
/// connections and never finishes the upgrade holds at most that many sockets, each for at most
/// `websocket.handshake_timeout`.
#[derive(Default)]
pub struct Pending {
    inner: Mutex<PendingMap>,
}

#[derive(Default)]
struct PendingMap {
    per_net: HashMap<IpNet, usize>,
    total: usize,
}

/// A place in [`Pending`], released on drop (every way out of the upgrade, panics included).
pub(crate) struct PendingSlot {
    pending: Arc<Pending>,
    net: IpNet,
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        let mut m = self.pending.inner.lock();
        m.total = m.total.saturating_sub(1);
        if let Some(n) = m.per_net.get_mut(&self.net) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.per_net.remove(&self.net);
            }
        }
    }
}

impl Pending {
    pub(crate) fn enter(
        self: &Arc<Self>,
        net: IpNet,
        per_net: usize,
        total: usize,
    ) -> Option<PendingSlot> {
        let mut m = self.inner.lock();
        let n = m.per_net.get(&net).copied().unwrap_or(0);
        // The map holds at most `total` keys.
        if n >= per_net || m.total >= total {
            return None;
        }
        m.per_net.insert(net, n + 1);
        m.total += 1;
        Some(PendingSlot {
            pending: self.clone(),
            net,
        })
    }
}

/// Accept WebSocket connections on a plain TCP listener until `shutdown` resolves.
pub async fn serve(
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    transport: Transport,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let pending = Arc::new(Pending::default());
    super::accept_each(&listener, "websocket", shutdown, |stream, peer| {
        let Some(admit) = admit(&shared, &pending, peer) else {
            return;
        };
        let _ = stream.set_nodelay(true);
        tokio::spawn(run(stream, peer, shared.clone(), transport, admit));
    })
    .await;
}

/// Accept WSS connections on a listener of its own (`sip.listen_wss` not shared with
/// `sip.listen_tls`): the checks, then the TLS handshake, then the WebSocket upgrade.
pub async fn serve_wss(
    listener: Arc<TcpListener>,
    acceptor: Arc<super::tls::TlsAcceptor>,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    let pending = Arc::new(Pending::default());
    super::accept_each(&listener, "wss", shutdown, |stream, peer| {
        // Blocked sources and addresses over the cap cost no TLS handshake.
        let Some(admit) = admit(&shared, &pending, peer) else {
            return;
        };
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            // The TLS acceptor counts and scores its own failures.
            let Ok(tls) = acceptor.accept(stream, peer).await else {
                return;
            };
            // Blocked while in handshake (by this flood or anything else): no upgrade.
            if super::refuse_blocked(&shared, peer) {
                return;
            }
            run(tls, peer, shared, Transport::Wss, admit).await;
        });
    })
    .await;
}

/// The first bytes of a WebSocket upgrade request.
const GET: &[u8] = b"GET ";

/// On a port shared by SIP over TLS and WSS (an address in both `sip.listen_tls` and
/// `sip.listen_wss`), after the TLS handshake: read the first bytes. `GET ` is a WebSocket
/// upgrade, handled here to its end (`None` comes back); anything else (a SIP request line, a
/// CRLF keep-alive, nothing within `websocket.handshake_timeout`) is SIP over TLS, and the
/// stream comes back with the bytes read put back in front.
pub async fn split_wss<S>(
    mut stream: S,
    peer: SocketAddr,
    shared: &Arc<Shared>,
    pending: &Arc<Pending>,
) -> Option<Rewind<S>>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 4];
    let mut n = 0usize;
    let deadline = Instant::now() + shared.node.config().websocket.handshake_timeout;
    // At most 4 bytes, and only while they still spell the start of `GET `.
    while n < head.len() && head.get(..n) == GET.get(..n) {
        let Some(buf) = head.get_mut(n..) else { break };
        match tokio::time::timeout_at(deadline, stream.read(buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return None,
            Ok(Ok(k)) => n += k,
            Err(_) => break,
        }
    }
    let head = Bytes::copy_from_slice(head.get(..n).unwrap_or_default());
    let stream = Rewind::new(head.clone(), stream);
    if head.as_ref() != GET {
        return Some(stream);
    }
    let admitted = admit(shared, pending, peer)?;
    run(stream, peer, shared.clone(), Transport::Wss, admitted).await;
    None
}

/// What [`admit`] decided for a new connection: it may go on to the upgrade.
pub(crate) struct Admitted {
    _slot: PendingSlot,
    /// Whitelisted: its upgrade failures are not scored.
    whitelisted: bool,
}

/// The checks before any byte of the upgrade is read: a blocked source is refused (a block
/// refuses new connections before any work), and so is an address over its handshake cap.
pub(crate) fn admit(
    shared: &Arc<Shared>,
    pending: &Arc<Pending>,
    peer: SocketAddr,
) -> Option<Admitted> {
    let stats = &shared.node.stats;
    let now = shared.node.now();
    let verdict = shared.node.gate().check(now, peer);
    if let GateVerdict::Blocked { .. } = verdict {
        stats.ws.upgrade(WsOutcome::Blocked);
        stats.drop(DropReason::Blocked);
        return None;
    }
    let cfg = shared.node.config();
    let net = crate::blocks::source_net(peer.ip(), cfg.protection.ipv6_prefix);
    let Some(slot) = pending.enter(
        net,
        cfg.websocket.max_handshakes_per_ip,
        cfg.sip.max_connections,
    ) else {
        stats.ws.upgrade(WsOutcome::Capped);
        tracing::debug!(%peer, "websocket refused: handshakes in progress over the cap");
        return None;
    };
    Some(Admitted {
        _slot: slot,
        whitelisted: verdict == GateVerdict::Whitelisted,
    })
}

/// The upgrade request itself is bounded by tungstenite (64 KiB, 512 reads) and in time by
/// `websocket.handshake_timeout`.
///
/// The tungstenite limits from the config: one WebSocket message (and frame) at most
/// `websocket.max_frame_bytes`, instead of the crate's 64 MiB default that would let one
/// connection make us buffer that much.
fn ws_config(shared: &Shared) -> WebSocketConfig {
    let cfg = shared.node.config();
    let max = cfg.websocket.max_frame_bytes;
    WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        .read_buffer_size(max.min(16 * 1024))
        .write_buffer_size(0)
        .max_write_buffer_size(cfg.sip.tcp_write_queue_bytes.saturating_add(max))
}

/// What the upgrade callback saw, for the outcome counter and the block evidence.
#[derive(Default)]
struct Seen {
    refused: bool,
    /// `GET /path` and the User-Agent, clipped.
    line: String,
}

/// The `sip` subprotocol among the comma-separated offers of `Sec-WebSocket-Protocol`.
fn offers_sip(req: &Request) -> bool {
    req.headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim().eq_ignore_ascii_case("sip"))
}

/// The upgrade callback: answer with `Sec-WebSocket-Protocol: sip`, or refuse 400. (The
/// signature is tungstenite's `Callback`.)
#[allow(clippy::result_large_err)]
fn negotiate(
    req: &Request,
    mut resp: Response,
    seen: &Mutex<Seen>,
) -> Result<Response, ErrorResponse> {
    let ua = req
        .headers()
        .get(header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let line = format!("{} {} UA={ua}", req.method(), req.uri());
    let mut s = seen.lock();
    s.line = line.chars().take(160).collect();
    if !offers_sip(req) {
        s.refused = true;
        let mut e = ErrorResponse::new(Some(
            "sipwarden: this is a SIP WebSocket endpoint (RFC 7118); offer the \"sip\" subprotocol\n"
                .to_string(),
        ));
        *e.status_mut() = StatusCode::BAD_REQUEST;
        return Err(e);
    }
    resp.headers_mut().insert(
        header::SEC_WEBSOCKET_PROTOCOL,
        HeaderValue::from_static("sip"),
    );
    Ok(resp)
}

/// Score a source for a WebSocket fault through the engine's anomaly path.
fn score(shared: &Shared, peer: SocketAddr, why: &'static str, sample: &str) {
    let now = shared.node.now();
    shared
        .node
        .on_anomaly(now, peer, Anomaly::WebSocket(why), sample.as_bytes());
}

/// Upgrade one connection and carry SIP on it until it closes. `stream` is a TCP stream or a
/// TLS stream (`transport` says which name the connection gets: `Ws` or `Wss`).
#[allow(clippy::result_large_err)] // the upgrade callback's type is tungstenite's
pub(crate) async fn run<S>(
    stream: S,
    peer: SocketAddr,
    shared: Arc<Shared>,
    transport: Transport,
    admitted: Admitted,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stats = &shared.node.stats;
    let cfg = shared.node.config();
    // The place in the connection table first: a source over its connection cap costs no
    // upgrade work.
    let (tx, mut rx, q) = conn_channel(cfg.sip.tcp_write_queue_bytes);
    let Some(_slot) = shared.transports.conns.add(
        peer,
        tx,
        cfg.sip.max_connections,
        cfg.sip.max_connections_per_ip,
        cfg.protection.ipv6_prefix,
    ) else {
        stats.ws.upgrade(WsOutcome::Capped);
        stats
            .tcp_rejected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return;
    };
    let seen = Mutex::new(Seen::default());
    let upgrade = tokio_tungstenite::accept_hdr_async_with_config(
        stream,
        |req: &Request, resp: Response| negotiate(req, resp, &seen),
        Some(ws_config(&shared)),
    );
    let result = timeout(cfg.websocket.handshake_timeout, upgrade).await;
    let line = std::mem::take(&mut seen.lock().line);
    let fail = |o: WsOutcome, why: &'static str| {
        stats.ws.upgrade(o);
        if !admitted.whitelisted {
            score(&shared, peer, why, &line);
        }
        tracing::debug!(%peer, why, request = %line, "websocket upgrade refused");
    };
    let mut ws = match result {
        Ok(Ok(ws)) => ws,
        Err(_) => return fail(WsOutcome::Timeout, "upgrade not finished in time"),
        Ok(Err(_)) if seen.lock().refused => {
            return fail(WsOutcome::NoSubprotocol, "no \"sip\" subprotocol offered")
        }
        // The peer went away mid-upgrade: counted, not scored (a browser tab closing).
        Ok(Err(WsError::Io(_) | WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
            stats.ws.upgrade(WsOutcome::BadRequest);
            return;
        }
        Ok(Err(_)) => return fail(WsOutcome::BadRequest, "not a WebSocket upgrade request"),
    };
    drop(admitted);
    stats.ws.upgrade(WsOutcome::Ok);
    let _open = OpenGauge::new(&shared);

    let ws_cfg = &cfg.websocket;
    let inb = Inbound {
        transport,
        src: peer,
    };
    let mut scratch = Scratch::default();
    let mut idle_deadline = Instant::now() + ws_cfg.idle_timeout;
    let mut ping =
        tokio::time::interval_at(Instant::now() + ws_cfg.ping_interval, ws_cfg.ping_interval);
    let write_timeout = cfg.sip.tcp_write_timeout;
    let why: &str = loop {
        tokio::select! {
            m = timeout_at_opt(idle_deadline, ws.next()) => {
                let m = match m {
                    None => break "idle timeout",
                    Some(None) => break "closed by peer",
                    Some(Some(m)) => m,
                };
                idle_deadline = Instant::now() + ws_cfg.idle_timeout;
                let bytes: Bytes = match m {
                    Ok(Message::Text(t)) => t.into(),
                    Ok(Message::Binary(b)) => b,
                    Ok(Message::Close(_)) => break "closed by peer",
                    Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => continue,
                    Err(WsError::Capacity(_)) => {
                        stats.ws.oversized.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        stats.drop(DropReason::Malformed);
                        score(&shared, peer, "message or frame over websocket.max_frame_bytes", "");
                        break "oversized frame";
                    }
                    Err(WsError::Protocol(_) | WsError::Utf8(_)) => {
                        stats.drop(DropReason::Malformed);
                        score(&shared, peer, "broken WebSocket frame", "");
                        break "protocol error";
                    }
                    Err(_) => break "read error",
                };
                // A keep-alive (CRLF) carries no message.
                if bytes.iter().all(|b| matches!(b, b'\r' | b'\n')) {
                    stats.keepalives.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                if !handle_caught(&shared, inb, &bytes, &mut scratch).await {
                    break "panic while handling a message";
                }
            }
            b = rx.recv() => {
                let Some(b) = b else { break "queue closed" };
                let len = b.len();
                // A text frame when the message is UTF-8 (what browsers' SIP stacks expect).
                let msg = match tokio_tungstenite::tungstenite::Utf8Bytes::try_from(b.clone()) {
                    Ok(t) => Message::Text(t),
                    Err(_) => Message::Binary(b),
                };
                let r = timeout(write_timeout, ws.send(msg)).await;
                q.written(len);
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break "write error",
                    Err(_) => {
                        q.close_with(WriteClose::Timeout);
                        stats.tcp_write_timeouts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        break "write timeout";
                    }
                }
            }
            // A message did not fit in the write queue, or the source got blocked: the server
            // closes the connections of blocked sources every second (`Conns::close_where`).
            _ = q.close.notified() => {
                if q.closed() == WriteClose::Blocked {
                    stats.conns_closed_blocked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    stats.drop(DropReason::Blocked);
                    let close = CloseFrame { code: CloseCode::Policy, reason: "blocked".into() };
                    let _ = timeout(std::time::Duration::from_secs(1), ws.close(Some(close))).await;
                    break "source blocked";
                }
                stats.tcp_write_overflows.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                break "write queue full";
            }
            _ = ping.tick() => {
                if timeout(write_timeout, ws.send(Message::Ping(Bytes::new()))).await.map_or(true, |r| r.is_err()) {
                    break "ping not sent";
                }
            }
        }
    };
    tracing::debug!(%peer, why, transport = transport.as_str(), "websocket connection closed");
}

/// `fut` with a deadline: `None` when the deadline passed first.
async fn timeout_at_opt<F: std::future::Future>(deadline: Instant, fut: F) -> Option<F::Output> {
    tokio::time::timeout_at(deadline, fut).await.ok()
}

/// The open-connections gauge, decremented on every way out.
struct OpenGauge(Arc<Shared>);

impl OpenGauge {
    fn new(shared: &Arc<Shared>) -> Self {
        shared
            .node
            .stats
            .ws
            .open
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(shared.clone())
    }
}

impl Drop for OpenGauge {
    fn drop(&mut self) {
        self.0
            .node
            .stats
            .ws
            .open
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// A stream with bytes already read from it put back in front: for a port shared by SIP over
/// TLS and WSS, the bytes read to classify a connection (`GET ` or a SIP request line) are
/// replayed to whoever handles it.
pub struct Rewind<S> {
    head: Bytes,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(head: Bytes, inner: S) -> Self {
        Self { head, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.head.is_empty() {
            let n = self.head.len().min(buf.remaining());
            let part = self.head.split_to(n);
            buf.put_slice(&part);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
#[path = "ws_tests.rs"]
mod tests;
