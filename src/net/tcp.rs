//! TCP listener and connections (TLS connections too, once their handshake is done: the code is
//! generic over the stream): framing by Content-Length, CRLF keep-alives, caps on
//! connections in total and per address (IPv6: per prefix), idle and slow-message timeouts, and
//! one writer task per connection so responses and requests to a phone reuse the connection it
//! opened. The writer is bounded in bytes (`sip.tcp_write_queue_bytes`) and in time
//! (`sip.tcp_write_timeout`): a peer that does not read is cut off, not buffered.
#![deny(clippy::string_slice, clippy::indexing_slicing)]
#![warn(unreachable_pub)]

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::{timeout_at, Instant};

use super::handler::{Scratch, Shared};
use super::{conn_channel, handle_caught, ConnSlot, WriteClose, WriteQueue};
use crate::proxy::Inbound;
use crate::stats::{DropReason, Transport};
use crate::wire::frame::{next_frame, Frame};

/// Accept connections until `shutdown` resolves. The listener is shared so that the
/// supervisor can restart this loop on the same socket.
pub async fn serve(
    listener: Arc<TcpListener>,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    super::accept_each(&listener, "tcp", shutdown, |stream, peer| {
        if super::refuse_blocked(&shared, peer) {
            return;
        }
        let _ = stream.set_nodelay(true);
        let (rd, wr) = stream.into_split();
        tokio::spawn(run_conn(
            rd,
            wr,
            reset_tcp,
            peer,
            Transport::Tcp,
            shared.clone(),
        ));
    })
    .await;
}

/// Reset (RST, not FIN) a TCP connection whose writer gave up: nothing more for a peer that
/// does not read, and the kernel drops what is still buffered for it.
pub(crate) fn reset_tcp(wr: &OwnedWriteHalf) {
    let _ = socket2::SockRef::from(wr.as_ref()).set_linger(Some(Duration::ZERO));
}

/// Open a connection to the upstream PBX (when `upstream.transport = "tcp"`).
/// After a failed connect to the upstream, how long sends to it fail at once instead of
/// trying again (a PBX that is down is not dialled at packet rate).
pub const UPSTREAM_RETRY: Duration = Duration::from_secs(1);

/// Open the connection to the upstream (TCP, or TLS when `transport` says so) in the
/// background. Its entry and write queue exist at once: what is sent meanwhile queues behind
/// the connect instead of a receive loop waiting for it, and the next sender finds the entry
/// instead of connecting again (one attempt at a time). A failed attempt removes the entry,
/// dropping what queued, and for [`UPSTREAM_RETRY`] sends to the upstream fail at once.
pub fn start_upstream(
    shared: &Arc<Shared>,
    addr: SocketAddr,
    transport: Transport,
) -> Result<(), DropReason> {
    let now = shared.node.now();
    if shared.upstream_retry_at.load(Relaxed) > now {
        return Err(DropReason::NoRoute);
    }
    let cfg = shared.node.config();
    let (tx, rx, q) = conn_channel(cfg.sip.tcp_write_queue_bytes);
    // The upstream is not subject to the per-source caps. A second entry for the address is
    // refused: another sender started the attempt first, and its queue is used.
    let Some(slot) = shared
        .transports
        .conns
        .add_first(addr, tx, cfg.protection.ipv6_prefix)
    else {
        return Ok(());
    };
    let shared = shared.clone();
    tokio::spawn(async move {
        let conn = Conn { rx, q, slot };
        let failed = match transport {
            Transport::Tls => match super::tls::connect_upstream_stream(&shared, addr).await {
                Ok(tls) => {
                    let (rd, wr) = tokio::io::split(tls);
                    let io = Io {
                        rd,
                        wr,
                        reset: super::tls::no_reset,
                        peer: addr,
                        transport,
                    };
                    spawn_drive(io, conn, shared.clone());
                    return;
                }
                Err(()) => conn,
            },
            _ => match tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
            {
                Ok(Ok(stream)) => {
                    let _ = stream.set_nodelay(true);
                    let (rd, wr) = stream.into_split();
                    let io = Io {
                        rd,
                        wr,
                        reset: reset_tcp,
                        peer: addr,
                        transport,
                    };
                    spawn_drive(io, conn, shared.clone());
                    return;
                }
                Ok(Err(e)) => {
                    tracing::warn!(%addr, error = %e, "cannot connect to the upstream");
                    conn
                }
                Err(_) => {
                    tracing::warn!(%addr, "cannot connect to the upstream: timed out");
                    conn
                }
            },
        };
        let retry = shared.node.now() + UPSTREAM_RETRY.as_millis() as u64;
        shared.upstream_retry_at.store(retry, Relaxed);
        // Dropping the connection's slot takes its entry out of the table; what queued is lost.
        drop(failed);
    });
    Ok(())
}

/// The two halves of a connection's stream, and who is at the other end.
struct Io<R, W> {
    rd: R,
    wr: W,
    /// How to cut the connection hard when its writer gives up (see [`reset_tcp`]).
    reset: fn(&W),
    peer: SocketAddr,
    transport: Transport,
}

/// Register a phone's connection (if the caps allow it) and drive it until it closes.
pub(crate) async fn run_conn<R, W>(
    rd: R,
    wr: W,
    reset: fn(&W),
    peer: SocketAddr,
    transport: Transport,
    shared: Arc<Shared>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let cfg = shared.node.config();
    let (tx, rx, q) = conn_channel(cfg.sip.tcp_write_queue_bytes);
    let Some(slot) = shared.transports.conns.add(
        peer,
        tx,
        cfg.sip.max_connections,
        cfg.sip.max_connections_per_ip,
        cfg.protection.ipv6_prefix,
    ) else {
        shared.node.stats.tcp_rejected.fetch_add(1, Relaxed);
        tracing::debug!(%peer, transport = transport.as_str(), "connection refused: connection cap reached");
        return;
    };
    let io = Io {
        rd,
        wr,
        reset,
        peer,
        transport,
    };
    drive(io, Conn { rx, q, slot }, shared).await;
}

/// A registered connection's writer side: its queue and its place in the table.
struct Conn {
    rx: mpsc::Receiver<Bytes>,
    q: Arc<WriteQueue>,
    slot: ConnSlot,
}

/// A plain function between the packet path and the connection task, so the compiler does not
/// have to prove `Send` through the cycle handler -> start_upstream -> drive -> handler.
fn spawn_drive<R, W>(io: Io<R, W>, conn: Conn, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(drive(io, conn, shared));
    tokio::spawn(fut);
}

/// The bookkeeping of one open connection, undone on drop: on every way out of [`drive`],
/// a panic included (the slot in the table is released by its own drop, after this one).
struct Open {
    shared: Arc<Shared>,
    q: Arc<WriteQueue>,
    writer: AbortHandle,
    _slot: ConnSlot,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.writer.abort();
        let s = &self.shared.node.stats;
        s.tcp_open.fetch_sub(1, Relaxed);
        match self.q.closed() {
            WriteClose::Open => {}
            WriteClose::Overflow => {
                s.tcp_write_overflows.fetch_add(1, Relaxed);
            }
            WriteClose::Timeout => {
                s.tcp_write_timeouts.fetch_add(1, Relaxed);
            }
            WriteClose::Blocked => {
                s.conns_closed_blocked.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Write queued messages until the queue closes, a write fails, or one write takes longer
/// than `timeout` (the peer stopped reading: the connection is reset, not drained).
pub(crate) async fn write_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut rx: mpsc::Receiver<Bytes>,
    q: Arc<WriteQueue>,
    timeout: Duration,
    reset: fn(&W),
) {
    while let Some(b) = rx.recv().await {
        let r = tokio::time::timeout(timeout, wr.write_all(&b)).await;
        q.written(b.len());
        match r {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return,
            Err(_) => {
                q.close_with(WriteClose::Timeout);
                reset(&wr);
                return;
            }
        }
    }
    let _ = tokio::time::timeout(timeout, wr.shutdown()).await;
}

/// Read and write one registered connection until it closes; unregister it after.
async fn drive<R, W>(io: Io<R, W>, conn: Conn, shared: Arc<Shared>)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let Conn { rx, q, slot } = conn;
    let Io {
        mut rd,
        wr,
        reset,
        peer,
        transport,
    } = io;
    let cfg = shared.node.config();
    shared.node.stats.tcp_connections.fetch_add(1, Relaxed);
    shared.node.stats.tcp_open.fetch_add(1, Relaxed);
    let mut writer = tokio::spawn(write_loop(
        wr,
        rx,
        q.clone(),
        cfg.sip.tcp_write_timeout,
        reset,
    ));
    let _open = Open {
        shared: shared.clone(),
        q: q.clone(),
        writer: writer.abort_handle(),
        _slot: slot,
    };
    let max = shared.max_message_bytes;
    let idle = cfg.sip.tcp_idle_timeout;
    let slow = cfg.sip.tcp_message_timeout;
    let mut buf = BytesMut::with_capacity(4096);
    let mut scratch = Scratch::default();
    let inb = Inbound {
        transport,
        src: peer,
    };
    // When the partial message at the head of the buffer began arriving.
    let mut partial_since: Option<Instant> = None;
    let mut idle_deadline = Instant::now() + idle;
    'conn: loop {
        // Frame everything already buffered.
        loop {
            match next_frame(&buf, max) {
                Ok(Frame::Incomplete) => break,
                Ok(Frame::Ping(n)) => {
                    buf.advance(n);
                    shared.node.stats.keepalives.fetch_add(1, Relaxed);
                    if let Some(tx) = shared.transports.conns.get(&peer) {
                        let _ = tx.send(Bytes::from_static(b"\r\n"));
                    }
                }
                Ok(Frame::Skip(n)) => buf.advance(n),
                Ok(Frame::Message(n)) => {
                    let msg = buf.split_to(n);
                    partial_since = None;
                    idle_deadline = Instant::now() + idle;
                    if !handle_caught(&shared, inb, &msg, &mut scratch).await {
                        // Whatever state the panic left, this connection is not worth keeping.
                        break 'conn;
                    }
                }
                Err(err) => {
                    let now = shared.node.now();
                    let trusted = shared.node.with_engine(|e| e.is_upstream(peer.ip()));
                    if !trusted {
                        let head = buf.get(..buf.len().min(200)).unwrap_or_default();
                        shared.node.on_anomaly(
                            now,
                            peer,
                            crate::engine::Anomaly::from_parse(err),
                            head,
                        );
                    }
                    shared.node.stats.drop(DropReason::Malformed);
                    tracing::debug!(%peer, %err, "closing tcp connection: unframeable input");
                    break 'conn;
                }
            }
        }
        if buf.is_empty() {
            partial_since = None;
        } else if partial_since.is_none() {
            partial_since = Some(Instant::now());
        }
        let deadline = match partial_since {
            Some(t) => (t + slow).min(idle_deadline),
            None => idle_deadline,
        };
        buf.reserve(4096);
        let read = tokio::select! {
            r = timeout_at(deadline, rd.read_buf(&mut buf)) => r,
            // The writer gave up (write error or timeout): so does the connection.
            _ = &mut writer => {
                tracing::debug!(%peer, why = ?q.closed(), "closing tcp connection: writer ended");
                break 'conn;
            }
            // A message did not fit in the write queue, or the source got blocked.
            _ = q.close.notified() => {
                tracing::debug!(%peer, why = ?q.closed(), "closing connection");
                break 'conn;
            }
        };
        match read {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {
                // A blocked source's connection is cut as soon as it speaks again (the gate:
                // no engine lock per read).
                if super::refuse_blocked(&shared, peer) {
                    break;
                }
            }
            Err(_) => {
                tracing::debug!(%peer, partial = partial_since.is_some(), "closing tcp connection: timeout");
                break;
            }
        }
    }
}

/// Bind a listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::super::{conn_channel, Conns, WriteClose};
    use super::*;

    /// A connected pair on loopback with small kernel buffers; the server side never reads.
    async fn pair() -> (TcpStream, TcpStream) {
        let ls = tokio::net::TcpSocket::new_v4().unwrap();
        ls.set_recv_buffer_size(4096).unwrap();
        ls.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let l = ls.listen(4).unwrap();
        let cs = tokio::net::TcpSocket::new_v4().unwrap();
        cs.set_send_buffer_size(4096).unwrap();
        let client = cs.connect(l.local_addr().unwrap()).await.unwrap();
        let (server, _) = l.accept().await.unwrap();
        (client, server)
    }

    #[tokio::test]
    async fn a_peer_that_never_reads_costs_at_most_the_byte_cap() {
        let (client, _server) = pair().await;
        let (_rd, wr) = client.into_split();
        let cap = 64 * 1024;
        let (tx, rx, q) = conn_channel(cap);
        let writer = tokio::spawn(write_loop(
            wr,
            rx,
            q.clone(),
            Duration::from_secs(3600),
            reset_tcp,
        ));
        let msg = Bytes::from(vec![b'x'; 1000]);
        let mut accepted = 0usize;
        // 10 MB offered at most: far beyond what the kernel buffers of the pair can hold.
        for _ in 0..10_000 {
            if tx.send(msg.clone()).is_err() {
                break;
            }
            accepted += 1;
            assert!(q.queued() <= cap, "queued {} > cap {cap}", q.queued());
            tokio::task::yield_now().await;
        }
        assert!(accepted < 10_000, "every message was accepted");
        assert_eq!(q.closed(), WriteClose::Overflow);
        assert!(q.queued() <= cap);
        // Closed for good: later messages are refused even when they would fit.
        assert!(tx.send(Bytes::from_static(b"\r\n")).is_err());
        writer.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_write_that_does_not_complete_ends_the_writer_after_the_timeout() {
        let (client, _server) = pair().await;
        let (_rd, wr) = client.into_split();
        let (tx, rx, q) = conn_channel(64 << 20);
        for _ in 0..16 {
            tx.send(Bytes::from(vec![b'x'; 1 << 20])).unwrap();
        }
        // The clock is paused: it jumps to the write timeout once the writer is stuck.
        write_loop(wr, rx, q.clone(), Duration::from_secs(10), reset_tcp).await;
        assert_eq!(q.closed(), WriteClose::Timeout);
        assert!(tx.send(Bytes::from_static(b"\r\n")).is_err());
    }

    #[tokio::test]
    async fn connection_slots_per_ipv6_prefix_released_on_every_exit() {
        let conns = Arc::new(Conns::default());
        let tx = || conn_channel(1024).0;
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        let a = addr("[2001:db8:1:2::1]:5060");
        let same64 = addr("[2001:db8:1:2:ffff::9]:5070");
        let other64 = addr("[2001:db8:1:3::1]:5060");
        let slot_a = conns.add(a, tx(), 100, 1, 64).expect("first of its /64");
        assert!(conns.add(same64, tx(), 100, 1, 64).is_none(), "same /64");
        let _c = conns.add(other64, tx(), 100, 1, 64).expect("another /64");
        // With a /128 prefix every address counts on its own.
        let _d = conns.add(same64, tx(), 100, 1, 128).expect("another /128");
        // IPv4: exact addresses, every port counted.
        let v4 = conns.add(addr("192.0.2.1:5060"), tx(), 100, 1, 64).unwrap();
        assert!(conns
            .add(addr("192.0.2.1:5061"), tx(), 100, 1, 64)
            .is_none());
        assert_eq!(conns.len(), 4);
        // The total cap.
        assert!(conns.add(addr("192.0.2.2:5060"), tx(), 4, 10, 64).is_none());
        drop(v4);
        assert!(conns
            .add(addr("192.0.2.1:5061"), tx(), 100, 1, 64)
            .is_some());

        // A task that panics while holding its slot still releases it.
        let task = tokio::spawn(async move {
            let _slot = slot_a;
            panic!("injected panic in a connection task");
        });
        assert!(task.await.unwrap_err().is_panic());
        assert!(conns.get(&a).is_none());
        let _b = conns
            .add(a, tx(), 100, 1, 64)
            .expect("the /64's slot was released by the panicking task");
    }
}
