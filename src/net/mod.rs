//! Sockets: UDP and TCP SIP listeners, the TCP connection table, upstream resolution, and the
//! per-packet handler that joins the engine and the router.

pub mod bind;
pub mod handler;
pub mod routing;
pub mod sweep;
pub mod tcp;
pub mod tftp;
pub mod tls;
pub mod udp;
pub mod upstream;
pub mod ws;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use futures_util::FutureExt;
use ipnet::IpNet;
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, Notify};

use crate::proxy::{Flow, Inbound};
use crate::stats::{DropReason, Transport};

/// Messages queued to one TCP connection's writer. The real bound is in bytes
/// (`sip.tcp_write_queue_bytes`); this one only caps the channel's slots.
pub const TCP_WRITE_QUEUE: usize = 256;

/// Why a connection's write side gave up (kept in [`WriteQueue`], counted when it closes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum WriteClose {
    /// Still open.
    Open = 0,
    /// A message did not fit in `sip.tcp_write_queue_bytes` (or the channel's slots).
    Overflow = 1,
    /// One write took longer than `sip.tcp_write_timeout`.
    Timeout = 2,
    /// The source got blocked ([`Conns::close_where`]).
    Blocked = 3,
}

/// What the senders of one connection and its writer task share: the bytes in flight and the
/// reason the connection is being closed.
#[derive(Debug)]
pub struct WriteQueue {
    queued: AtomicUsize,
    cap: usize,
    closed: AtomicU8,
    /// Woken when a sender closes the connection (the connection task waits on it).
    pub(crate) close: Notify,
}

impl WriteQueue {
    /// Bytes accepted and not yet written to the socket.
    pub fn queued(&self) -> usize {
        self.queued.load(Relaxed)
    }

    pub fn closed(&self) -> WriteClose {
        match self.closed.load(Relaxed) {
            1 => WriteClose::Overflow,
            2 => WriteClose::Timeout,
            3 => WriteClose::Blocked,
            _ => WriteClose::Open,
        }
    }

    /// Mark the connection closing (the first reason wins) and wake its task.
    pub(crate) fn close_with(&self, why: WriteClose) {
        if self
            .closed
            .compare_exchange(0, why as u8, Relaxed, Relaxed)
            .is_ok()
        {
            self.close.notify_one();
        }
    }

    /// The writer wrote (or gave up on) `n` bytes.
    pub(crate) fn written(&self, n: usize) {
        self.queued.fetch_sub(n, Relaxed);
    }
}

/// The sending side of one TCP connection, bounded in bytes.
#[derive(Debug, Clone)]
pub struct ConnTx {
    tx: mpsc::Sender<Bytes>,
    q: Arc<WriteQueue>,
}

/// A connection's sender, the writer's receiver, and the queue they share.
pub fn conn_channel(cap_bytes: usize) -> (ConnTx, mpsc::Receiver<Bytes>, Arc<WriteQueue>) {
    let (tx, rx) = mpsc::channel(TCP_WRITE_QUEUE);
    let q = Arc::new(WriteQueue {
        queued: AtomicUsize::new(0),
        cap: cap_bytes,
        closed: AtomicU8::new(0),
        close: Notify::new(),
    });
    (ConnTx { tx, q: q.clone() }, rx, q)
}

impl ConnTx {
    /// Queue a message. One that does not fit closes the connection: a peer this far behind
    /// is not reading, and dropping a message on a reliable transport would lose it for good.
    pub fn send(&self, b: Bytes) -> Result<(), DropReason> {
        if self.q.closed() != WriteClose::Open {
            return Err(DropReason::SendFailed);
        }
        let len = b.len();
        let before = self.q.queued.fetch_add(len, Relaxed);
        if before.saturating_add(len) > self.q.cap {
            self.q.written(len);
            self.q.close_with(WriteClose::Overflow);
            return Err(DropReason::SendFailed);
        }
        self.tx.try_send(b).map_err(|_| {
            self.q.written(len);
            self.q.close_with(WriteClose::Overflow);
            DropReason::SendFailed
        })
    }
}

/// The TCP connection table: who is connected, and the writer queue of each connection.
///
/// The per-address cap counts IPv4 addresses exactly and IPv6 sources per
/// `protection.ipv6_prefix` (one attacker owns a whole /64: counting exact addresses would
/// give him 2^64 times the cap).
#[derive(Default)]
pub struct Conns {
    map: Mutex<ConnMap>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct ConnMap {
    by_addr: HashMap<SocketAddr, (u64, ConnTx)>,
    per_net: HashMap<IpNet, usize>,
    /// Live connections (a replaced `by_addr` entry still counts until its slot drops).
    total: usize,
}

/// A connection's place in [`Conns`], released when dropped: on every way out of the
/// connection's task, panics included, so no attacker can leak the per-address cap.
pub struct ConnSlot {
    conns: Arc<Conns>,
    peer: SocketAddr,
    net: IpNet,
    id: u64,
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        let mut m = self.conns.map.lock();
        if m.by_addr
            .get(&self.peer)
            .is_some_and(|(id, _)| *id == self.id)
        {
            m.by_addr.remove(&self.peer);
        }
        m.total = m.total.saturating_sub(1);
        if let Some(n) = m.per_net.get_mut(&self.net) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.per_net.remove(&self.net);
            }
        }
    }
}

impl Conns {
    /// Register a connection if the caps allow it; it stays registered while the slot lives.
    pub fn add(
        self: &Arc<Self>,
        peer: SocketAddr,
        tx: ConnTx,
        max_total: usize,
        max_per_ip: usize,
        ipv6_prefix: u8,
    ) -> Option<ConnSlot> {
        self.insert(peer, tx, max_total, max_per_ip, ipv6_prefix, true)
    }

    /// As [`Conns::add`] (no caps), but only when no connection to `peer` is registered: for
    /// the one connection to the upstream, so two senders never open two.
    pub fn add_first(
        self: &Arc<Self>,
        peer: SocketAddr,
        tx: ConnTx,
        ipv6_prefix: u8,
    ) -> Option<ConnSlot> {
        self.insert(peer, tx, usize::MAX, usize::MAX, ipv6_prefix, false)
    }

    fn insert(
        self: &Arc<Self>,
        peer: SocketAddr,
        tx: ConnTx,
        max_total: usize,
        max_per_ip: usize,
        ipv6_prefix: u8,
        replace: bool,
    ) -> Option<ConnSlot> {
        let net = crate::blocks::source_net(peer.ip(), ipv6_prefix);
        let id = self.next_id.fetch_add(1, Relaxed);
        let mut m = self.map.lock();
        let n = m.per_net.get(&net).copied().unwrap_or(0);
        if m.total >= max_total || n >= max_per_ip || (!replace && m.by_addr.contains_key(&peer)) {
            return None;
        }
        m.per_net.insert(net, n + 1);
        m.total += 1;
        m.by_addr.insert(peer, (id, tx));
        Some(ConnSlot {
            conns: self.clone(),
            peer,
            net,
            id,
        })
    }

    pub fn get(&self, peer: &SocketAddr) -> Option<ConnTx> {
        self.map.lock().by_addr.get(peer).map(|(_, tx)| tx.clone())
    }

    pub fn len(&self) -> usize {
        self.map.lock().total
    }

    /// Close every connection whose peer matches `f` (a source that just got blocked: its open
    /// connections must not outlive the block). Their tasks wake and end; returns how many.
    pub fn close_where(&self, f: impl Fn(SocketAddr) -> bool) -> usize {
        let m = self.map.lock();
        let mut n = 0;
        for (addr, (_, tx)) in m.by_addr.iter() {
            if tx.q.closed() == WriteClose::Open && f(*addr) {
                tx.q.close_with(WriteClose::Blocked);
                n += 1;
            }
        }
        n
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A message whose handling panics in a test build, to exercise the catch below.
#[cfg(test)]
pub(crate) const PANIC_PROBE: &[u8] = b"OPTIONS sip:sipwarden-test-panic@invalid SIP/2.0\r\n";

/// Handle one message, catching a panic so that one bad packet cannot end the receive loop
/// (or a TCP connection's bookkeeping) it arrived on. Returns false after a panic; the caller's
/// scratch space has been reset then.
pub(crate) async fn handle_caught(
    shared: &Arc<handler::Shared>,
    inb: Inbound,
    bytes: &[u8],
    scratch: &mut handler::Scratch,
) -> bool {
    let run = async {
        #[cfg(test)]
        if bytes.starts_with(PANIC_PROBE) {
            panic!("test panic probe from {}", inb.src);
        }
        shared.handle(inb, bytes, scratch).await;
    };
    let Err(payload) = AssertUnwindSafe(run).catch_unwind().await else {
        return true;
    };
    *scratch = handler::Scratch::default();
    let now_s = crate::clock::wall_ms() / 1000;
    if shared.node.stats.panic_caught(now_s) {
        let what = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        // The message may quote attacker bytes: bounded, and Debug-escaped.
        let what: String = what.chars().take(200).collect();
        tracing::error!(
            src = %inb.src,
            transport = inb.transport.as_str(),
            panic = ?what,
            total = crate::stats::Stats::get(&shared.node.stats.panics),
            "panic while handling a message; the listener keeps serving (logged at most once a second)"
        );
    }
    false
}

/// Every way out: the UDP sockets (one per address family) and the TCP connections.
pub struct Transports {
    pub udp4: Option<Arc<UdpSocket>>,
    pub udp6: Option<Arc<UdpSocket>>,
    pub conns: Arc<Conns>,
}

impl Transports {
    fn udp_for(&self, addr: &SocketAddr) -> Option<&Arc<UdpSocket>> {
        match addr {
            // IPv6 listeners are IPv6-only (bind::udp_socket): v4 peers need a v4 socket.
            SocketAddr::V4(_) => self.udp4.as_ref(),
            SocketAddr::V6(_) => self.udp6.as_ref(),
        }
    }

    /// Send on an existing transport. A TCP flow with no live connection is `NoRoute`; the
    /// caller may open one (towards the upstream) with [`tcp::connect`].
    pub async fn send(&self, to: Flow, bytes: &[u8]) -> Result<(), DropReason> {
        match to.transport {
            Transport::Udp => {
                let sock = self.udp_for(&to.addr).ok_or(DropReason::NoRoute)?;
                sock.send_to(bytes, to.addr)
                    .await
                    .map(|_| ())
                    .map_err(|_| DropReason::SendFailed)
            }
            // A WebSocket connection sits in the same table; its writer frames each message.
            Transport::Tcp | Transport::Tls | Transport::Ws | Transport::Wss => {
                let tx = self.conns.get(&to.addr).ok_or(DropReason::NoRoute)?;
                tx.send(Bytes::copy_from_slice(bytes))
            }
        }
    }
}

/// Accept connections on `listener` until `shutdown` resolves, handing each to `each` with its
/// peer's canonical address. An accept error (out of descriptors, ...) is logged and retried
/// after 50 ms. One loop for the TCP, TLS and WebSocket listeners.
pub(crate) async fn accept_each(
    listener: &tokio::net::TcpListener,
    what: &'static str,
    shutdown: impl std::future::Future<Output = ()>,
    mut each: impl FnMut(tokio::net::TcpStream, SocketAddr),
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(listener = what, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            }
        };
        each(stream, udp::canonical(peer));
    }
}

/// A connection from a source the drop gate blocks: refused before a byte is read or a
/// handshake is made, and counted as a blocked drop. Lock-free, like the packet path.
pub(crate) fn refuse_blocked(shared: &handler::Shared, peer: SocketAddr) -> bool {
    let now = shared.node.now();
    let blocked = matches!(
        shared.node.gate().check(now, peer),
        crate::blocks::GateVerdict::Blocked { .. }
    );
    if blocked {
        shared.node.stats.drop(DropReason::Blocked);
    }
    blocked
}
