//! Sockets: UDP and TCP SIP listeners, the TCP connection table, upstream resolution, and the
//! per-packet handler that joins the engine and the router.

pub mod handler;
pub mod tcp;
pub mod tftp;
pub mod udp;
pub mod upstream;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::proxy::Flow;
use crate::stats::{DropReason, Transport};

/// Messages queued to one TCP connection's writer; a peer that does not read is cut off
/// rather than buffered without bound.
pub const TCP_WRITE_QUEUE: usize = 256;

/// The TCP connection table: who is connected, and the writer queue of each connection.
#[derive(Default)]
pub struct Conns {
    map: Mutex<ConnMap>,
}

#[derive(Default)]
struct ConnMap {
    by_addr: HashMap<SocketAddr, mpsc::Sender<Bytes>>,
    per_ip: HashMap<IpAddr, usize>,
}

impl Conns {
    /// Register a connection if the caps allow it.
    pub fn add(
        &self,
        peer: SocketAddr,
        tx: mpsc::Sender<Bytes>,
        max_total: usize,
        max_per_ip: usize,
    ) -> bool {
        let mut m = self.map.lock();
        let n = m.per_ip.get(&peer.ip()).copied().unwrap_or(0);
        if m.by_addr.len() >= max_total || n >= max_per_ip {
            return false;
        }
        m.per_ip.insert(peer.ip(), n + 1);
        m.by_addr.insert(peer, tx);
        true
    }

    pub fn remove(&self, peer: SocketAddr) {
        let mut m = self.map.lock();
        if m.by_addr.remove(&peer).is_some() {
            if let Some(n) = m.per_ip.get_mut(&peer.ip()) {
                *n -= 1;
                if *n == 0 {
                    m.per_ip.remove(&peer.ip());
                }
            }
        }
    }

    pub fn get(&self, peer: &SocketAddr) -> Option<mpsc::Sender<Bytes>> {
        self.map.lock().by_addr.get(peer).cloned()
    }

    pub fn len(&self) -> usize {
        self.map.lock().by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
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
            // IPv6 listeners are IPv6-only (server::udp_socket): v4 peers need a v4 socket.
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
            Transport::Tcp => {
                let tx = self.conns.get(&to.addr).ok_or(DropReason::NoRoute)?;
                tx.try_send(Bytes::copy_from_slice(bytes))
                    .map_err(|_| DropReason::SendFailed)
            }
        }
    }
}
