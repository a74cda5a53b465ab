//! The packet path's I/O, for UDP datagrams and stream-framed messages alike: hand each
//! message to the pipeline ([`crate::pipeline`]), send what it decides.

use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;

use super::Transports;
use crate::blocks::LocalHits;
use crate::node::Node;
use crate::proxy::{Action, Flow, Inbound, Router};
use crate::stats::{DropReason, Transport};
use crate::wire::Edits;

/// Everything the packet path shares between sockets.
pub struct Shared {
    pub node: Arc<Node>,
    /// Read on every packet, written only on upstream re-resolution: a snapshot swap, so
    /// readers never wait and never touch a shared lock word.
    pub router: ArcSwap<Router>,
    pub transports: Transports,
    pub max_message_bytes: usize,
    /// The PBX over TLS (`upstream.transport = "tls"`), else `None`.
    pub tls_upstream: Option<super::tls::TlsUpstream>,
    /// Until when (node millis) sends to a stream upstream fail at once after a failed
    /// connect ([`super::tcp::start_upstream`]).
    pub upstream_retry_at: std::sync::atomic::AtomicU64,
}

/// Per-task scratch space, reused for every packet: the clean path allocates nothing once
/// these have grown to the size of the largest message seen.
#[derive(Default)]
pub struct Scratch {
    edits: Edits,
    out: Vec<u8>,
    /// The UDP socket this task receives on: UDP replies and forwards of the same address
    /// family leave from it, so they carry the address the request arrived on.
    udp: Option<Box<LocalUdp>>,
    /// Drops at the gate counted here, added to the gate's entries at the end of each receive
    /// batch ([`Shared::end_batch`]): no per-packet write to a counter other cores share.
    hits: LocalHits,
}

/// A receive task's own UDP socket, with its address family read once at the start (not a
/// `getsockname(2)` per send), and the sends it holds until the end of a receive batch.
pub struct LocalUdp {
    sock: Arc<UdpSocket>,
    v4: bool,
    /// Only this task uses it; a lock because the packet path holds `&LocalUdp` across awaits.
    queue: parking_lot::Mutex<super::udp::SendQueue>,
}

impl Scratch {
    /// Scratch for a receive task on `sock`.
    pub fn for_socket(sock: Arc<UdpSocket>) -> Scratch {
        let v4 = sock.local_addr().is_ok_and(|a| a.is_ipv4());
        let queue = parking_lot::Mutex::default();
        Scratch {
            udp: Some(Box::new(LocalUdp { sock, v4, queue })),
            ..Scratch::default()
        }
    }

    /// Hold this task's UDP sends until [`Scratch::flush_udp`] (`on`), or send each at once.
    pub fn queue_udp(&mut self, on: bool) {
        if let Some(l) = &self.udp {
            l.queue.lock().set_on(on);
        }
    }

    /// Send what [`Scratch::queue_udp`] held, in order (one `sendmmsg`); failures are counted
    /// as send failures, as a direct send's are.
    pub async fn flush_udp(&mut self, stats: &crate::stats::Stats) {
        if let Some(l) = &self.udp {
            let mut q = std::mem::take(&mut *l.queue.lock());
            if !q.is_empty() {
                for _ in 0..q.flush(&l.sock).await {
                    stats.drop(DropReason::SendFailed);
                }
            }
            *l.queue.lock() = q;
        }
    }
}

impl Shared {
    /// After a receive batch: the gate drops counted in `scratch` reach the block rows.
    pub fn end_batch(&self, scratch: &mut Scratch) {
        if !scratch.hits.is_empty() {
            scratch.hits.flush(self.node.gate());
        }
    }

    /// Handle one whole message (a datagram, or a message cut from a TCP stream): the
    /// pipeline decides ([`crate::pipeline::decide`]), this sends.
    pub async fn handle(self: &Arc<Self>, inb: Inbound, bytes: &[u8], scratch: &mut Scratch) {
        let t0 = Instant::now();
        let Scratch {
            edits,
            out,
            udp,
            hits,
        } = scratch;
        let decision = {
            // One snapshot of the router for the whole packet (re-resolution swaps it).
            let router = self.router.load();
            let work = crate::pipeline::Work { edits, out, hits };
            crate::pipeline::decide(
                &self.node,
                &router,
                self.max_message_bytes,
                &inb,
                bytes,
                work,
                |a| self.transports.conns.get(&a).is_some(),
            )
        };
        let Some(d) = decision else { return };
        if self
            .send(d.action, out, d.request, udp.as_deref(), inb.src)
            .await
        {
            self.node.stats.latency(t0.elapsed().as_micros() as u64);
        }
    }

    /// Send an action's output (UDP from `local` when given and of the right family), on
    /// behalf of what `origin` sent (for the HEP filter). Returns true when a forward went out.
    async fn send(
        self: &Arc<Self>,
        action: Action,
        out: &[u8],
        request: bool,
        local: Option<&LocalUdp>,
        origin: std::net::SocketAddr,
    ) -> bool {
        let stats = &self.node.stats;
        match action {
            Action::Drop(r) => {
                stats.drop(r);
                false
            }
            Action::Reply { to } => {
                if self.send_on(to, out, local).await.is_ok() {
                    stats.hep.sent(to.transport, to.addr, out, Some(origin)); // HEP capture: sent
                    stats
                        .replies_sent
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                false
            }
            Action::FlowFailed { to } => {
                stats.drop(DropReason::FlowFailed);
                if self.send_on(to, out, local).await.is_ok() {
                    stats.hep.sent(to.transport, to.addr, out, Some(origin)); // HEP capture: sent
                    stats
                        .replies_sent
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                false
            }
            Action::Forward { to, .. } => match self.send_to(to, out, local).await {
                Ok(()) => {
                    stats.hep.sent(to.transport, to.addr, out, Some(origin)); // HEP capture: sent
                    stats.forwarded(request);
                    true
                }
                Err(r) => {
                    stats.drop(r);
                    false
                }
            },
        }
    }

    /// Send on an existing transport; over UDP from `local` (the socket the packet arrived
    /// on) when it is of the destination's address family.
    async fn send_on(
        &self,
        to: Flow,
        out: &[u8],
        local: Option<&LocalUdp>,
    ) -> Result<(), DropReason> {
        if to.transport == Transport::Udp {
            if let Some(l) = local.filter(|l| l.v4 == to.addr.is_ipv4()) {
                // Inside a receive batch: queued, sent with the rest at its end. A full queue
                // is sent first, so nothing overtakes what waits in it.
                if l.queue.lock().push(to.addr, out) {
                    return Ok(());
                }
                let mut q = std::mem::take(&mut *l.queue.lock());
                if !q.is_empty() {
                    for _ in 0..q.flush(&l.sock).await {
                        self.node.stats.drop(DropReason::SendFailed);
                    }
                }
                *l.queue.lock() = q;
                return l
                    .sock
                    .send_to(out, to.addr)
                    .await
                    .map(|_| ())
                    .map_err(|_| DropReason::SendFailed);
            }
        }
        self.transports.send(to, out).await
    }

    /// Send, opening a TCP connection to the upstream on demand.
    async fn send_to(
        self: &Arc<Self>,
        to: Flow,
        out: &[u8],
        local: Option<&LocalUdp>,
    ) -> Result<(), DropReason> {
        match self.send_on(to, out, local).await {
            // The connection opens in the background; this message waits in its queue. The
            // router is read only on this rare path.
            Err(DropReason::NoRoute)
                if to.transport.is_stream() && to == self.router.load().upstream() =>
            {
                super::tcp::start_upstream(self, to.addr, to.transport)?;
                self.transports.send(to, out).await
            }
            r => r,
        }
    }

    /// End a call at its maximum duration (toll-fraud guard, `fraud.on_max_duration = "bye"`):
    /// a BYE to the callee through the PBX and one to the caller on its flow.
    pub async fn send_fraud_byes(self: &Arc<Self>, d: &crate::engine::fraud::dialog::Dialog) {
        let router = self.router.load();
        let cfg = router.config();
        let via = |t: Transport| {
            let a = match t {
                Transport::Udp => cfg.udp.as_ref().or(cfg.tcp.as_ref()),
                Transport::Tcp => cfg.tcp.as_ref().or(cfg.udp.as_ref()),
                Transport::Ws => cfg.ws.as_ref().or(cfg.wss.as_ref()),
                Transport::Wss => cfg.wss.as_ref().or(cfg.ws.as_ref()),
                Transport::Tls => cfg.tls.as_ref().or(cfg.tcp.as_ref()),
            };
            a.map_or_else(String::new, |a| format!("{}:{}", a.host, a.port))
        };
        let upstream = router.upstream();
        let branch = crate::util::hash64(&[&d.call_id]) ^ self.node.now();
        let byes = d.byes(via, upstream.transport, branch, |h, p| router.is_ours(h, p));
        drop(router);
        for b in byes {
            let to = match b.caller {
                Some((transport, addr)) if !b.to_upstream => Flow { transport, addr },
                _ => upstream,
            };
            match self.send_to(to, &b.bytes, None).await {
                Ok(()) => {
                    tracing::info!(to = %to.addr, call_id = %crate::util::printable(&d.call_id, 80), "max call duration: BYE sent")
                }
                Err(r) => {
                    tracing::warn!(to = %to.addr, reason = ?r, "max call duration: BYE not sent")
                }
            }
        }
    }
}
