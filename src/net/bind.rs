//! Binding policy: the sockets named in the config, bound before anything runs (UDP with
//! SO_REUSEPORT, one socket per worker; IPv6 listeners IPv6-only; large buffers).

use std::net::SocketAddr;

use tokio::net::{TcpListener, UdpSocket};

use crate::config::Config;

/// A listen address that could not be bound: which listener, where, and the OS's reason.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind {what} {addr}: {source}")]
pub struct BindError {
    pub what: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Sockets bound from the config, before anything runs.
pub struct Bound {
    pub udp: Vec<UdpSocket>,
    pub tcp: Vec<TcpListener>,
    /// `sip.listen_tls`: TCP listeners whose connections start with a TLS handshake.
    pub tls: Vec<TcpListener>,
    /// `sip.listen_ws`: plain WebSocket listeners.
    pub ws: Vec<TcpListener>,
    /// `sip.listen_wss` addresses not in `sip.listen_tls`: WSS-only listeners.
    pub wss: Vec<TcpListener>,
    /// For each of `tls`: its address is also in `sip.listen_wss` (one port for both).
    pub tls_with_wss: Vec<bool>,
    pub admin: Option<TcpListener>,
    pub tftp: Option<UdpSocket>,
}

/// UDP sockets per listen address, each with its own receive task: one per core keeps every
/// core busy under load without the tasks sharing one socket's queue. Capped at 8.
fn udp_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

/// `n` sockets bound to `addr` with SO_REUSEPORT, so the kernel spreads datagrams over them by
/// flow hash. The first binds `addr` (an ephemeral port when it says 0); the others join its
/// actual address. Linux lets only sockets of the same user join a reuse-port group; the
/// first bind still fails if another program holds the port without SO_REUSEPORT.
fn udp_sockets(addr: SocketAddr, n: usize) -> std::io::Result<Vec<UdpSocket>> {
    // Without SO_REUSEPORT (other systems) a second bind would fail: one socket.
    let n = if cfg!(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    )) {
        n
    } else {
        1
    };
    if n > 1 && addr.port() != 0 {
        // A plain bind first: if another process (a second sipwarden started by mistake) holds
        // the port, even with SO_REUSEPORT, this fails instead of us silently sharing its
        // datagrams. The probe is closed before our group binds.
        drop(udp_socket(addr, false)?);
    }
    let first = udp_socket(addr, n > 1)?;
    let actual = first.local_addr()?;
    let mut v = vec![first];
    for _ in 1..n {
        v.push(udp_socket(actual, true)?);
    }
    Ok(v)
}

/// One UDP socket on `addr`: IPv6-only for an IPv6 address, 4 MiB buffers, non-blocking, and
/// SO_REUSEPORT when `reuse_port` (where the system has it).
fn udp_socket(addr: SocketAddr, reuse_port: bool) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // IPv6 only: list "0.0.0.0:5060" and "[::]:5060" side by side for both families.
        s.set_only_v6(true)?;
    }
    // Large buffers absorb bursts (a REGISTER storm after a power cut) instead of dropping.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    ))]
    if reuse_port {
        s.set_reuse_port(true)?;
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_os = "macos"
    )))]
    let _ = reuse_port;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// A TCP listener on `addr`: IPv6-only for an IPv6 address, SO_REUSEADDR (a restart does not
/// wait for TIME_WAIT), backlog 1024.
fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Bind every address the config names (SIP over UDP, TCP, TLS, WS and WSS, the admin API, TFTP
/// when enabled), before anything runs; the first that fails is the error.
pub async fn bind(cfg: &Config) -> Result<Bound, BindError> {
    let mut b = Bound {
        udp: Vec::new(),
        tcp: Vec::new(),
        tls: Vec::new(),
        ws: Vec::new(),
        wss: Vec::new(),
        tls_with_wss: Vec::new(),
        admin: None,
        tftp: None,
    };
    for &addr in &cfg.sip.listen_udp {
        b.udp.extend(
            udp_sockets(addr, udp_workers()).map_err(|source| BindError {
                what: "SIP UDP",
                addr,
                source,
            })?,
        );
    }
    for &addr in &cfg.sip.listen_tcp {
        b.tcp.push(tcp_listener(addr).map_err(|source| BindError {
            what: "SIP TCP",
            addr,
            source,
        })?);
    }
    for &addr in &cfg.sip.listen_tls {
        b.tls.push(tcp_listener(addr).map_err(|source| BindError {
            what: "SIP TLS",
            addr,
            source,
        })?);
    }
    b.tls_with_wss = cfg
        .sip
        .listen_tls
        .iter()
        .map(|a| cfg.sip.listen_wss.contains(a))
        .collect();
    for &addr in cfg
        .sip
        .listen_wss
        .iter()
        .filter(|a| !cfg.sip.listen_tls.contains(a))
    {
        b.wss.push(tcp_listener(addr).map_err(|source| BindError {
            what: "SIP secure WebSocket",
            addr,
            source,
        })?);
    }
    for &addr in &cfg.sip.listen_ws {
        b.ws.push(tcp_listener(addr).map_err(|source| BindError {
            what: "SIP WebSocket",
            addr,
            source,
        })?);
    }
    let addr = cfg.admin.listen;
    b.admin = Some(TcpListener::bind(addr).await.map_err(|source| BindError {
        what: "admin",
        addr,
        source,
    })?);
    if cfg.tftp.enabled {
        let addr = cfg.tftp.listen;
        b.tftp = Some(UdpSocket::bind(addr).await.map_err(|source| BindError {
            what: "TFTP",
            addr,
            source,
        })?);
    }
    Ok(b)
}
