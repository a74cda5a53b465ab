//! SIP over TLS: the acceptor (certificate store, handshake timeout, per-source cap on
//! connections in handshake, failures counted and scored), the listener, and the client side
//! towards a TLS upstream. A completed handshake hands the stream to the TCP connection code
//! (framing, caps, write queue, timeouts), which is generic over the stream.
#![deny(clippy::string_slice, clippy::indexing_slicing)]
#![warn(unreachable_pub)]

pub mod certs;
pub mod client;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use parking_lot::Mutex;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;

pub use certs::{CertError, CertStore, Reload};
pub use client::TlsUpstream;

use super::handler::Shared;
use crate::blocks::{BlockType, GateVerdict};
use crate::engine::anomaly::Anomaly;
use crate::node::Node;
use crate::stats::{TlsFailure, Transport};

/// How often the certificate files' mtimes are compared with the ones loaded.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);

/// A handshake that did not complete, and why.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("too many connections in handshake from this source")]
    Cap,
    #[error("handshake not finished within tls.handshake_timeout")]
    Timeout,
    #[error("handshake failed ({}): {error}", reason.as_str())]
    Failed {
        reason: TlsFailure,
        error: std::io::Error,
    },
}

impl HandshakeError {
    pub fn reason(&self) -> TlsFailure {
        match self {
            HandshakeError::Cap => TlsFailure::Cap,
            HandshakeError::Timeout => TlsFailure::Timeout,
            HandshakeError::Failed { reason, .. } => *reason,
        }
    }
}

/// What a failed `accept` of tokio-rustls says, as a metrics reason.
fn classify(e: &std::io::Error) -> TlsFailure {
    use std::io::ErrorKind as K;
    if let Some(r) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return match r {
            rustls::Error::PeerIncompatible(_) => TlsFailure::Incompatible,
            rustls::Error::AlertReceived(_) => TlsFailure::Alert,
            rustls::Error::NoCertificatesPresented | rustls::Error::InvalidCertificate(_) => {
                TlsFailure::ClientCertificate
            }
            _ => TlsFailure::Protocol,
        };
    }
    match e.kind() {
        K::InvalidData => TlsFailure::Protocol,
        _ => TlsFailure::Closed,
    }
}

/// Connections in handshake, per source net and in total. Entries exist only while a
/// handshake is in progress, so the map is bounded by the total cap.
#[derive(Default)]
struct InFlight {
    per_net: HashMap<IpNet, usize>,
    total: usize,
}

/// Terminates TLS for SIP (and, reused by the WebSocket side, for WSS): one per node, shared
/// by every TLS listener. Open connections keep the config they were accepted with; a reload
/// changes what the next handshake gets.
pub struct TlsAcceptor {
    node: Arc<Node>,
    store: CertStore,
    inflight: Mutex<InFlight>,
}

/// A place among the connections in handshake, released on drop (every way out of
/// [`TlsAcceptor::accept`], cancellation included).
struct Permit<'a> {
    a: &'a TlsAcceptor,
    net: IpNet,
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        let mut m = self.a.inflight.lock();
        m.total = m.total.saturating_sub(1);
        if let Some(n) = m.per_net.get_mut(&self.net) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.per_net.remove(&self.net);
            }
        }
        self.a.node.stats.tls.in_handshake.fetch_sub(1, Relaxed);
    }
}

impl TlsAcceptor {
    /// Load the certificates of `node`'s `[tls]`.
    pub fn new(node: Arc<Node>) -> Result<Arc<TlsAcceptor>, CertError> {
        let store = CertStore::load(&node.config().tls)?;
        Ok(Arc::new(TlsAcceptor {
            node,
            store,
            inflight: Mutex::new(InFlight::default()),
        }))
    }

    pub fn store(&self) -> &CertStore {
        &self.store
    }

    /// Connections in handshake now.
    pub fn in_handshake(&self) -> usize {
        self.inflight.lock().total
    }

    fn permit(&self, peer: SocketAddr) -> Option<Permit<'_>> {
        let cfg = self.node.config();
        let net = crate::blocks::source_net(peer.ip(), cfg.protection.ipv6_prefix);
        let mut m = self.inflight.lock();
        let n = m.per_net.get(&net).copied().unwrap_or(0);
        // The total is bounded like the connections themselves (`sip.max_connections`).
        if n >= cfg.tls.max_handshakes_per_ip || m.total >= cfg.sip.max_connections {
            return None;
        }
        m.per_net.insert(net, n + 1);
        m.total += 1;
        self.node.stats.tls.in_handshake.fetch_add(1, Relaxed);
        Some(Permit { a: self, net })
    }

    /// Run the server handshake on `tcp` from `peer`, within `tls.handshake_timeout` and the
    /// per-source cap. Counts the outcome; a failure is scored against the source through the
    /// anomaly detector, so a handshake flood ends in a block.
    pub async fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let r = self.handshake(tcp, peer).await;
        match &r {
            Ok(_) => {
                self.node.stats.tls.handshakes_ok.fetch_add(1, Relaxed);
            }
            Err(e) => self.failed(peer, e),
        }
        r
    }

    async fn handshake(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
    ) -> Result<TlsStream<TcpStream>, HandshakeError> {
        let Some(_permit) = self.permit(peer) else {
            return Err(HandshakeError::Cap);
        };
        let _ = tcp.set_nodelay(true);
        let timeout = self.node.config().tls.handshake_timeout;
        let acceptor = tokio_rustls::TlsAcceptor::from(self.store.server_config());
        match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
            Err(_) => Err(HandshakeError::Timeout),
            Ok(Err(error)) => Err(HandshakeError::Failed {
                reason: classify(&error),
                error,
            }),
            Ok(Ok(s)) => Ok(s),
        }
    }

    fn failed(&self, peer: SocketAddr, e: &HandshakeError) {
        let reason = e.reason();
        self.node.stats.tls.failed(reason);
        tracing::debug!(%peer, reason = reason.as_str(), error = %e, "tls handshake failed");
        let now = self.node.now();
        if self.node.gate().check(now, peer) == GateVerdict::Inspect {
            let sample = format!("TLS handshake: {}", reason.as_str());
            if !self.node.engine().is_upstream(peer.ip()) {
                self.node
                    .on_anomaly(now, peer, Anomaly::TlsHandshake, sample.as_bytes());
            }
        }
    }

    /// Re-read the certificates when the config or a file changed (always with `force`):
    /// counted, logged, and a failure alerts. The old certificates stay on failure.
    pub fn reload(&self, force: bool) -> Reload {
        let cfg = self.node.config();
        let r = self.store.reload(&cfg.tls, force);
        let s = &self.node.stats.tls;
        match &r {
            Reload::Unchanged => {}
            Reload::Swapped => {
                s.reloads_ok.fetch_add(1, Relaxed);
                tracing::info!(certificate = %cfg.tls.certificate, sni = cfg.tls.sni.len(), "tls certificates reloaded");
            }
            Reload::Failed(msg) => {
                s.reloads_failed.fetch_add(1, Relaxed);
                tracing::error!(error = %msg, "tls certificate reload failed; the previous certificates stay in force");
                let message =
                    format!("TLS certificate reload failed, previous certificates kept: {msg}");
                self.node
                    .with_engine(|e| e.alert(BlockType::Anomaly, "tls".into(), message));
            }
        }
        r
    }

    /// Poll the files every [`RELOAD_POLL`] until `shutdown` resolves.
    pub async fn watch(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        tokio::pin!(shutdown);
        let mut every = tokio::time::interval(RELOAD_POLL);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = &mut shutdown => return,
                _ = every.tick() => {
                    // File reads and key parsing: off the runtime's worker threads.
                    let me = self.clone();
                    let _ = tokio::task::spawn_blocking(move || me.reload(false)).await;
                }
            }
        }
    }
}

/// Accept TLS connections until `shutdown` resolves: blocked sources are refused before the
/// handshake, each handshake runs in its own task, and a finished one becomes a SIP
/// connection like a TCP one.
///
/// `wss`: the port is shared with `sip.listen_wss`; after the handshake a connection whose
/// first bytes are `GET ` is a WebSocket upgrade ([`super::ws::split_wss`]).
pub async fn serve(
    listener: Arc<TcpListener>,
    acceptor: Arc<TlsAcceptor>,
    shared: Arc<Shared>,
    wss: Option<Arc<super::ws::Pending>>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    super::accept_each(&listener, "tls", shutdown, |stream, peer| {
        if super::refuse_blocked(&shared, peer) {
            return;
        }
        let (acceptor, shared, wss) = (acceptor.clone(), shared.clone(), wss.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream, peer).await else {
                return;
            };
            // Blocked while in handshake (by this flood or anything else): no connection.
            if super::refuse_blocked(&shared, peer) {
                return;
            }
            if let Some(pending) = wss {
                if let Some(tls) = super::ws::split_wss(tls, peer, &shared, &pending).await {
                    let (rd, wr) = tokio::io::split(tls);
                    super::tcp::run_conn(rd, wr, no_reset, peer, Transport::Tls, shared).await;
                }
                return;
            }
            let (rd, wr) = tokio::io::split(tls);
            super::tcp::run_conn(rd, wr, no_reset, peer, Transport::Tls, shared).await;
        });
    })
    .await;
}

/// A TLS stream cannot be reset from its write half; a stuck writer ends with a normal close.
pub(crate) fn no_reset<W>(_: &W) {}

/// Open a TLS connection to the upstream PBX (`upstream.transport = "tls"`).
/// Connect to the upstream over TLS (`upstream.transport = "tls"`); `Err` is logged here.
pub(crate) async fn connect_upstream_stream(
    shared: &Arc<Shared>,
    addr: SocketAddr,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, ()> {
    let Some(up) = shared.tls_upstream.as_ref() else {
        return Err(());
    };
    up.connect(addr).await.map_err(|e| {
        tracing::warn!(%addr, error = %e, "cannot connect to the upstream over TLS");
    })
}
