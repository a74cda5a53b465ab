//! TCP listener and connections: framing by Content-Length, CRLF keep-alives, caps on
//! connections in total and per address, idle and slow-message timeouts, and one writer task
//! per connection so responses and requests to a phone reuse the connection it opened.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{timeout_at, Instant};

use super::handler::{Scratch, Shared};
use super::udp::canonical;
use super::TCP_WRITE_QUEUE;
use crate::proxy::Inbound;
use crate::stats::{DropReason, Transport};
use crate::wire::frame::{next_frame, Frame};

pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "tcp accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        };
        let peer = canonical(peer);
        let now = shared.node.now();
        if shared.node.with_engine(|e| e.is_blocked(now, peer)) {
            shared.node.stats.drop(DropReason::Blocked);
            continue;
        }
        tokio::spawn(run_conn(stream, peer, shared.clone()));
    }
}

/// Open a connection to the upstream PBX (when `upstream.transport = "tcp"`).
pub async fn connect_upstream(shared: &Arc<Shared>, addr: SocketAddr) -> Result<(), DropReason> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .map_err(|_| DropReason::NoRoute)?
        .map_err(|e| {
            tracing::warn!(%addr, error = %e, "cannot connect to the upstream");
            DropReason::NoRoute
        })?;
    let (tx, rx) = mpsc::channel(TCP_WRITE_QUEUE);
    // The upstream is not subject to the per-source caps.
    if !shared
        .transports
        .conns
        .add(addr, tx, usize::MAX, usize::MAX)
    {
        return Err(DropReason::NoRoute);
    }
    spawn_drive(stream, addr, rx, shared.clone());
    Ok(())
}

async fn run_conn(stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    let cfg = shared.node.config();
    let (tx, rx) = mpsc::channel(TCP_WRITE_QUEUE);
    if !shared.transports.conns.add(
        peer,
        tx,
        cfg.sip.max_connections,
        cfg.sip.max_connections_per_ip,
    ) {
        shared
            .node
            .stats
            .tcp_rejected
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tracing::debug!(%peer, "tcp connection refused: connection cap reached");
        return;
    }
    drive(stream, peer, rx, shared).await;
}

/// A plain function between the packet path and the connection task, so the compiler does not
/// have to prove `Send` through the cycle handler -> connect_upstream -> drive -> handler.
fn spawn_drive(
    stream: TcpStream,
    peer: SocketAddr,
    rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
) {
    let fut: std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
        Box::pin(drive(stream, peer, rx, shared));
    tokio::spawn(fut);
}

/// Read and write one registered connection until it closes; unregister it after.
async fn drive(
    stream: TcpStream,
    peer: SocketAddr,
    mut rx: mpsc::Receiver<Bytes>,
    shared: Arc<Shared>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    shared.node.stats.tcp_connections.fetch_add(1, Relaxed);
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let writer = tokio::spawn(async move {
        while let Some(b) = rx.recv().await {
            if wr.write_all(&b).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let cfg = shared.node.config();
    let max = shared.max_message_bytes;
    let idle = cfg.sip.tcp_idle_timeout;
    let slow = cfg.sip.tcp_message_timeout;
    let mut buf = BytesMut::with_capacity(4096);
    let mut scratch = Scratch::default();
    let inb = Inbound {
        transport: Transport::Tcp,
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
                        let _ = tx.try_send(Bytes::from_static(b"\r\n"));
                    }
                }
                Ok(Frame::Skip(n)) => buf.advance(n),
                Ok(Frame::Message(n)) => {
                    let msg = buf.split_to(n);
                    partial_since = None;
                    idle_deadline = Instant::now() + idle;
                    shared.handle(inb, &msg, &mut scratch).await;
                }
                Err(err) => {
                    let now = shared.node.now();
                    let trusted = shared.node.with_engine(|e| e.is_upstream(peer.ip()));
                    if !trusted {
                        shared.node.with_engine(|e| {
                            e.on_malformed(now, peer, err, &buf[..buf.len().min(200)])
                        });
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
        match timeout_at(deadline, rd.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(_)) => {
                // A blocked source's connection is cut as soon as it speaks again.
                let now = shared.node.now();
                if shared.node.with_engine(|e| e.is_blocked(now, peer)) {
                    shared.node.stats.drop(DropReason::Blocked);
                    break;
                }
            }
            Err(_) => {
                tracing::debug!(%peer, partial = partial_since.is_some(), "closing tcp connection: timeout");
                break;
            }
        }
    }
    shared.transports.conns.remove(peer);
    writer.abort();
    shared.node.stats.tcp_connections.fetch_sub(1, Relaxed);
}

/// Bind a listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
