//! UDP listener: one receive loop per socket (several sockets per address with SO_REUSEPORT),
//! each with its own buffers; what it sends over UDP leaves from the same socket.
//!
//! Datagrams are taken from the kernel in batches of up to [`BATCH`] per `recvmmsg(2)` call
//! (nix's safe wrapper): under a flood one system call serves many packets, and at low rates a
//! batch is simply one datagram. Each buffer holds `sip.max_message_bytes` + 1 bytes, so an
//! oversized datagram still arrives as more than the limit (the kernel truncates it and sets
//! `MSG_TRUNC`) and is counted as such.
#![deny(clippy::string_slice, clippy::indexing_slicing)]
#![warn(unreachable_pub)]

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::handle_caught;
use super::handler::{Scratch, Shared};
use crate::proxy::Inbound;
use crate::stats::Transport;

/// Datagrams per `recvmmsg` call. 32 buffers of 16 KiB (the default message limit) is 512 KiB
/// per socket; beyond 32 the gain per call is small and the latency of the batch's last packet
/// grows.
pub const BATCH: usize = 32;

/// What one `recvmmsg` call returned for one buffer.
#[derive(Clone, Copy)]
struct Meta {
    len: usize,
    src: Option<SocketAddr>,
}

/// A socket's receive buffers: `BATCH` buffers of `size` bytes in one allocation, reused for
/// every call. The kernel-facing headers are made afresh per call: nix's `MultiHeaders` holds raw
/// pointers (not `Send`, so it cannot live across an await in a task), and it keeps the address
/// length the kernel wrote last time, which must not leak from one call into the next.
pub struct Batch {
    size: usize,
    bufs: Vec<u8>,
    metas: [Meta; BATCH],
    filled: usize,
}

impl Batch {
    /// Buffers of `size` bytes each (at least 1).
    pub fn new(size: usize) -> Batch {
        let size = size.max(1);
        Batch {
            size,
            bufs: vec![0u8; size * BATCH],
            metas: [Meta { len: 0, src: None }; BATCH],
            filled: 0,
        }
    }

    /// Wait until the socket is readable and take up to `BATCH` datagrams from it.
    pub async fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        let fd = sock.as_raw_fd();
        self.filled = 0;
        let n = sock
            .async_io(Interest::READABLE, || self.recv_now(fd))
            .await?;
        self.filled = n;
        Ok(n)
    }

    /// One non-blocking `recvmmsg`; `WouldBlock` when the socket is empty.
    fn recv_now(&mut self, fd: std::os::fd::RawFd) -> io::Result<usize> {
        let size = self.size;
        let mut chunks = self.bufs.chunks_mut(size);
        let mut iovs: [[io::IoSliceMut<'_>; 1]; BATCH] =
            std::array::from_fn(|_| [io::IoSliceMut::new(chunks.next().unwrap_or_default())]);
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let got = recvmmsg(
            fd,
            &mut headers,
            iovs.iter_mut(),
            MsgFlags::MSG_DONTWAIT,
            None,
        )
        .map_err(io::Error::from)?;
        let mut n = 0;
        for (msg, meta) in got.zip(self.metas.iter_mut()) {
            *meta = Meta {
                len: msg.bytes.min(size),
                src: msg.address.as_ref().and_then(socket_addr),
            };
            n += 1;
        }
        Ok(n)
    }

    /// The datagrams of the last call: bytes and sender (None: the kernel gave no address).
    pub fn datagrams(&self) -> impl Iterator<Item = (&[u8], Option<SocketAddr>)> {
        self.metas
            .iter()
            .take(self.filled)
            .zip(self.bufs.chunks(self.size))
            .map(|(m, buf)| (buf.get(..m.len).unwrap_or_default(), m.src))
    }
}

fn socket_addr(s: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = s.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    s.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
}

/// Receive datagrams until `shutdown` resolves. A panic while handling one datagram is caught
/// and counted ([`handle_caught`]): the loop goes on with the next.
pub async fn serve(
    sock: Arc<UdpSocket>,
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    // One byte more than the limit, to tell an oversized datagram from one that fits exactly.
    let mut batch = Batch::new(shared.max_message_bytes + 1);
    let mut scratch = Scratch::for_socket(sock.clone());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            r = batch.recv(&sock) => match r {
                Ok(_) => {
                    for (dgram, src) in batch.datagrams() {
                        let Some(src) = src else { continue };
                        let inb = Inbound { transport: Transport::Udp, src: canonical(src) };
                        handle_caught(&shared, inb, dgram, &mut scratch).await;
                    }
                    shared.end_batch(&mut scratch);
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

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_carries_each_datagram_with_its_sender_and_truncates_oversized_ones() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        a.send_to(b"one", to).unwrap();
        b.send_to(b"two", to).unwrap();
        a.send_to(&[7u8; 100], to).unwrap();
        let mut batch = Batch::new(11);
        let mut got = Vec::new();
        while got.len() < 3 {
            batch.recv(&rx).await.unwrap();
            got.extend(batch.datagrams().map(|(d, s)| (d.to_vec(), s.unwrap())));
        }
        assert_eq!(got[0], (b"one".to_vec(), a.local_addr().unwrap()));
        assert_eq!(got[1], (b"two".to_vec(), b.local_addr().unwrap()));
        // Longer than the buffer: cut to the buffer, so the handler sees "more than the limit".
        assert_eq!(got[2].0.len(), 11);
    }

    #[tokio::test]
    async fn ipv6_senders_come_through() {
        let Ok(rx) = UdpSocket::bind("[::1]:0").await else {
            return; // no IPv6 loopback on this machine
        };
        let to = rx.local_addr().unwrap();
        let a = std::net::UdpSocket::bind("[::1]:0").unwrap();
        a.send_to(b"six", to).unwrap();
        let mut batch = Batch::new(64);
        batch.recv(&rx).await.unwrap();
        let (d, s) = batch.datagrams().next().unwrap();
        assert_eq!((d, s), (&b"six"[..], Some(a.local_addr().unwrap())));
    }
}
