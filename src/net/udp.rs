//! UDP listener: one receive loop per socket (several sockets per address with SO_REUSEPORT),
//! each with its own buffers; what it sends over UDP leaves from the same socket.
#![deny(clippy::string_slice, clippy::indexing_slicing)]
#![warn(unreachable_pub)]

use std::sync::Arc;

use tokio::net::UdpSocket;

use super::handle_caught;
use super::handler::{Scratch, Shared};
use crate::proxy::Inbound;
use crate::stats::Transport;

/// Receive datagrams until `shutdown` resolves. A panic while handling one datagram is caught
/// and counted ([`handle_caught`]): the loop goes on with the next.
pub async fn serve(
    sock: Arc<UdpSocket>,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    // One byte more than the limit, to tell an oversized datagram from one that fits exactly.
    let mut buf = vec![0u8; shared.max_message_bytes.max(65_535) + 1];
    let mut scratch = Scratch::for_socket(sock.clone());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            r = sock.recv_from(&mut buf) => match r {
                Ok((n, src)) => {
                    let inb = Inbound { transport: Transport::Udp, src: canonical(src) };
                    let Some(dgram) = buf.get(..n) else { continue };
                    handle_caught(&shared, inb, dgram, &mut scratch).await;
                }
                Err(e) => {
                    // ICMP port unreachable surfaces here on some systems; keep serving.
                    tracing::debug!(error = %e, "udp receive error");
                }
            }
        }
    }
}

/// IPv4-mapped addresses from dual-stack sockets become plain IPv4.
pub fn canonical(a: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(crate::blocks::canonical_ip(a.ip()), a.port())
}
