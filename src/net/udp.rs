//! UDP listener: one receive loop per socket (several sockets per address with SO_REUSEPORT),
//! each with its own buffers; what it sends over UDP leaves from the same socket.
//!
//! Datagrams are taken from the kernel in batches of up to [`BATCH`] per `recvmmsg(2)` call
//! (nix's safe wrapper): under a flood one system call serves many packets, and at low rates a
//! batch is simply one datagram. Each buffer holds `sip.max_message_bytes` + 1 bytes, so an
//! oversized datagram still arrives as more than the limit (the kernel truncates it and sets
//! `MSG_TRUNC`) and is counted as such.
//!
//! What a batch of more than one datagram sends back out of the same socket (forwards and our
//! replies) is queued ([`SendQueue`]) and leaves in one `sendmmsg(2)` at the end of the batch,
//! in the order it was queued, so order per destination holds. A batch of one datagram sends
//! at once, as before.
#![deny(clippy::string_slice, clippy::indexing_slicing)]
#![warn(unreachable_pub)]

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use nix::sys::socket::{recvmmsg, sendmmsg, MsgFlags, MultiHeaders, SockaddrStorage};
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

/// Datagrams queued during one receive batch, sent with `sendmmsg(2)` when it ends.
///
/// Bounded in count by [`SEND_QUEUE`] (a batch of `BATCH` datagrams sends at most one message
/// for each) and so in bytes by `SEND_QUEUE` x the largest message we send; a push beyond the
/// bound is refused and the caller flushes first, which keeps the order.
#[derive(Debug, Default)]
pub struct SendQueue {
    /// Queueing is on only inside a batch of more than one datagram.
    on: bool,
    bytes: Vec<u8>,
    items: Vec<(SocketAddr, std::ops::Range<usize>)>,
}

/// At most this many datagrams wait in a [`SendQueue`].
pub const SEND_QUEUE: usize = BATCH;

impl SendQueue {
    /// Queue `bytes` for `to`; false (nothing queued) when queueing is off or the queue is full.
    pub fn push(&mut self, to: SocketAddr, bytes: &[u8]) -> bool {
        if !self.on || self.items.len() >= SEND_QUEUE {
            return false;
        }
        let start = self.bytes.len();
        self.bytes.extend_from_slice(bytes);
        self.items.push((to, start..self.bytes.len()));
        true
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Turn queueing on or off (off: every send goes out at once).
    pub fn set_on(&mut self, on: bool) {
        self.on = on;
    }

    /// Send everything queued from `sock`, in order, and empty the queue (keeping its
    /// allocations). Returns how many datagrams could not be sent: one whose send fails is
    /// skipped and counted, the rest still go.
    pub async fn flush(&mut self, sock: &UdpSocket) -> u64 {
        let fd = sock.as_raw_fd();
        let (mut done, mut failed) = (0, 0);
        while done < self.items.len() {
            match sock
                .async_io(Interest::WRITABLE, || self.send_now(fd, done))
                .await
            {
                Ok(n) if n > 0 => done += n,
                _ => {
                    failed += 1;
                    done += 1;
                }
            }
        }
        self.items.clear();
        self.bytes.clear();
        failed
    }

    /// One non-blocking `sendmmsg` of the queued datagrams from index `from` (nix's safe
    /// wrapper); how many the kernel took, or the error of the first (`WouldBlock`: wait).
    fn send_now(&self, fd: std::os::fd::RawFd, from: usize) -> io::Result<usize> {
        let items = self.items.get(from..).unwrap_or_default();
        let bytes: &[u8] = &self.bytes;
        // A Vec, not a SmallVec: the slices borrow for as long as the call's headers do.
        let iovs: Vec<[io::IoSlice<'_>; 1]> = items
            .iter()
            .map(|(_, r)| [io::IoSlice::new(bytes.get(r.clone()).unwrap_or_default())])
            .collect();
        let addrs: smallvec::SmallVec<[Option<SockaddrStorage>; SEND_QUEUE]> = items
            .iter()
            .map(|(a, _)| Some(SockaddrStorage::from(*a)))
            .collect();
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(iovs.len(), None);
        let sent = sendmmsg(fd, &mut headers, &iovs, addrs, [], MsgFlags::MSG_DONTWAIT)
            .map_err(io::Error::from)?;
        Ok(sent.count())
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
                Ok(n) => {
                    // Sends of a batch of several datagrams wait for its end (one sendmmsg).
                    scratch.queue_udp(n > 1);
                    for (dgram, src) in batch.datagrams() {
                        let Some(src) = src else { continue };
                        let inb = Inbound { transport: Transport::Udp, src: canonical(src) };
                        handle_caught(&shared, inb, dgram, &mut scratch).await;
                    }
                    scratch.flush_udp(&shared.node.stats).await;
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
    async fn a_send_queue_keeps_order_and_counts_a_failed_datagram() {
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let r1 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let r2 = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let (a1, a2) = (r1.local_addr().unwrap(), r2.local_addr().unwrap());
        let mut q = SendQueue::default();
        assert!(!q.push(a1, b"off"), "queueing is off outside a batch");
        q.set_on(true);
        assert!(q.push(a1, b"one"));
        // An IPv6 destination on an IPv4 socket: the kernel refuses this one only.
        assert!(q.push("[::1]:9".parse().unwrap(), b"bad"));
        assert!(q.push(a1, b"two"));
        assert!(q.push(a2, b"three"));
        assert_eq!(q.flush(&tx).await, 1);
        assert!(q.is_empty());
        let mut buf = [0u8; 16];
        for (r, want) in [(&r1, &b"one"[..]), (&r1, b"two"), (&r2, b"three")] {
            let n = r.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], want);
        }
        for i in 0..SEND_QUEUE {
            assert!(q.push(a2, &[i as u8]));
        }
        assert!(!q.push(a2, b"full"), "bounded");
        assert_eq!(q.flush(&tx).await, 0);
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
