//! Wiring: bind the sockets named in the config, then run every task until shutdown. `run`
//! takes already-bound sockets so tests can start a node on `127.0.0.1:0`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, TransportKind};
use crate::net::handler::Shared;
use crate::net::tls::{self, TlsAcceptor, TlsUpstream};
use crate::net::upstream::Resolver;
use crate::net::{tcp, udp, Conns, Transports};
use crate::node::Node;
use crate::proxy::{Advertised, Flow, Router, RouterConfig};
use crate::stats::Transport;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {what} {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{0}")]
    Other(String),
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

pub async fn bind(cfg: &Config) -> Result<Bound, ServerError> {
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
            udp_sockets(addr, udp_workers()).map_err(|source| ServerError::Bind {
                what: "SIP UDP",
                addr,
                source,
            })?,
        );
    }
    for &addr in &cfg.sip.listen_tcp {
        b.tcp
            .push(tcp_listener(addr).map_err(|source| ServerError::Bind {
                what: "SIP TCP",
                addr,
                source,
            })?);
    }
    for &addr in &cfg.sip.listen_tls {
        b.tls
            .push(tcp_listener(addr).map_err(|source| ServerError::Bind {
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
        b.wss
            .push(tcp_listener(addr).map_err(|source| ServerError::Bind {
                what: "SIP secure WebSocket",
                addr,
                source,
            })?);
    }
    for &addr in &cfg.sip.listen_ws {
        b.ws.push(tcp_listener(addr).map_err(|source| ServerError::Bind {
            what: "SIP WebSocket",
            addr,
            source,
        })?);
    }
    let addr = cfg.admin.listen;
    b.admin = Some(
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Bind {
                what: "admin",
                addr,
                source,
            })?,
    );
    if cfg.tftp.enabled {
        let addr = cfg.tftp.listen;
        b.tftp = Some(
            UdpSocket::bind(addr)
                .await
                .map_err(|source| ServerError::Bind {
                    what: "TFTP",
                    addr,
                    source,
                })?,
        );
    }
    Ok(b)
}

/// The local IP the kernel would use towards `peer` (for advertising when bound to 0.0.0.0).
fn local_ip_towards(peer: SocketAddr) -> Option<IpAddr> {
    let bind: SocketAddr = if peer.is_ipv4() {
        "0.0.0.0:0".parse().ok()?
    } else {
        "[::]:0".parse().ok()?
    };
    let s = std::net::UdpSocket::bind(bind).ok()?;
    s.connect(peer).ok()?;
    s.local_addr().ok().map(|a| a.ip())
}

fn advertised(cfg: &Config, local: SocketAddr, upstream: SocketAddr) -> Advertised {
    if !cfg.sip.public_address.is_empty() {
        return Advertised::new(&cfg.sip.public_address, local.port());
    }
    let ip = if local.ip().is_unspecified() {
        local_ip_towards(upstream).unwrap_or(local.ip())
    } else {
        local.ip()
    };
    Advertised::new(&ip.to_string(), local.port())
}

fn router_config(
    cfg: &Config,
    bound: &Bound,
    upstream: SocketAddr,
    keys: crate::proxy::Keys,
) -> RouterConfig {
    // Several sockets share each UDP address (SO_REUSEPORT): name each address once.
    let mut udp = Vec::new();
    for a in bound.udp.iter().filter_map(|s| s.local_addr().ok()) {
        if !udp.contains(&a) {
            udp.push(a);
        }
    }
    let tcp = bound
        .tcp
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .collect::<Vec<_>>();
    let tls = bound
        .tls
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .collect::<Vec<_>>();
    let pick = |v: &[SocketAddr]| {
        v.iter()
            .find(|a| a.is_ipv4() == upstream.is_ipv4())
            .or(v.first())
            .map(|a| advertised(cfg, *a, upstream))
    };
    let ws = bound
        .ws
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .collect::<Vec<_>>();
    let wss = bound
        .wss
        .iter()
        .chain(
            bound
                .tls
                .iter()
                .zip(bound.tls_with_wss.iter())
                .filter(|(_, w)| **w)
                .map(|(l, _)| l),
        )
        .filter_map(|s| s.local_addr().ok())
        .collect::<Vec<_>>();
    let mut aliases: Vec<Advertised> = udp
        .iter()
        .chain(tcp.iter())
        .chain(tls.iter())
        .chain(ws.iter())
        .chain(wss.iter())
        .map(|a| advertised(cfg, *a, upstream))
        .collect();
    for a in udp
        .iter()
        .chain(tcp.iter())
        .chain(tls.iter())
        .chain(ws.iter())
        .chain(wss.iter())
    {
        if !a.ip().is_unspecified() {
            aliases.push(Advertised::new(&a.ip().to_string(), a.port()));
        }
    }
    let sockets = udp
        .iter()
        .map(|a| (Transport::Udp, *a))
        .chain(tcp.iter().map(|a| (Transport::Tcp, *a)))
        .chain(tls.iter().map(|a| (Transport::Tls, *a)))
        .collect();
    RouterConfig {
        udp: pick(&udp),
        tcp: pick(&tcp),
        tls: pick(&tls),
        ws: pick(&ws),
        wss: pick(&wss),
        aliases,
        incoming: cfg.upstream.incoming,
        nat: cfg.sip.nat_detection,
        keys,
        sockets,
    }
}

/// Close the TCP, TLS and WebSocket connections of sources that are blocked now (the connection code
/// also checks on every read; this catches a connection that stays silent, or one in a call).
/// The PBX's connections are never closed this way.
fn close_blocked(shared: &Shared) {
    let node = &shared.node;
    let now = node.now();
    let n = shared.transports.conns.close_where(|a| {
        matches!(
            node.gate().check(now, a),
            crate::blocks::GateVerdict::Blocked { .. }
        ) && !node.with_engine(|e| e.is_upstream(a.ip()))
    });
    if n > 0 {
        tracing::info!(connections = n, "closed the connections of blocked sources");
    }
}

fn upstream_flow(cfg: &Config, addr: SocketAddr) -> Flow {
    Flow {
        transport: match cfg.upstream.transport {
            TransportKind::Udp => Transport::Udp,
            TransportKind::Tcp => Transport::Tcp,
            TransportKind::Tls => Transport::Tls,
        },
        addr,
    }
}

/// The routing keys: the configured `sip.flow_key`, else the one an earlier run stored, else a
/// new one; stored before anything is routed so a crash right after start keeps it too.
fn routing_keys(
    cfg: &Config,
    store: &crate::state::Store,
    now: crate::clock::Millis,
) -> Result<crate::proxy::Keys, ServerError> {
    use crate::proxy::keys;
    let configured = keys::parse_hex_key(&cfg.sip.flow_key);
    let stored = store.routing_keys()?;
    let mut fresh = [0u8; 16];
    rand::fill(&mut fresh);
    let grace = cfg.sip.flow_key_grace.as_millis() as u64;
    let (k, save) = keys::resolve(configured, stored.as_ref(), now, grace, fresh);
    if let Some(s) = save {
        store.set_routing_keys(&s)?;
        tracing::info!(
            configured = configured.is_some(),
            previous_kept = s.previous.is_some(),
            "routing key stored"
        );
    }
    Ok(k)
}

/// A request to reload the config file, answered with the outcome.
pub type ReloadRequest = oneshot::Sender<Result<(), String>>;

/// A started node: its tasks run until [`Running::shutdown`].
pub struct Running {
    pub node: Arc<Node>,
    /// Sends reload requests (what SIGHUP and the admin API use).
    pub reload: mpsc::Sender<ReloadRequest>,
    stop_tx: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    state: crate::state::Handle,
}

impl Running {
    /// Graceful shutdown: stop accepting, let tasks finish, flush state, close the store.
    pub async fn shutdown(self) {
        tracing::info!("shutting down");
        let _ = self.stop_tx.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        // Flush: acknowledged after everything queued before it is durable.
        self.node.flush().await;
        self.state.close().await;
    }
}

/// Run a node until `shutdown` resolves. `config_path` enables reload (SIGHUP, API).
pub async fn run(
    cfg: Config,
    config_path: Option<PathBuf>,
    bound: Bound,
    shutdown: impl Future<Output = ()>,
) -> Result<Arc<Node>, ServerError> {
    let running = start(cfg, config_path, bound).await?;
    shutdown.await;
    let node = running.node.clone();
    running.shutdown().await;
    Ok(node)
}

/// Start every task of a node on already-bound sockets.
pub async fn start(
    cfg: Config,
    config_path: Option<PathBuf>,
    bound: Bound,
) -> Result<Running, ServerError> {
    let (node, events_rx) = Node::new(cfg.clone());
    // Restore before anything serves: a source blocked before the restart (or the crash) is
    // dropped from the first packet on.
    let store = crate::state::Store::open(&cfg.state.path)?;
    let restored = crate::state::restore(&node, &store)?;
    let keys = routing_keys(&cfg, &store, node.now())?;
    tracing::info!(
        path = %cfg.state.path,
        blocks = restored.blocks,
        list_entries = restored.list_entries,
        strikes = restored.strikes,
        expired_while_down = restored.stale_blocks,
        undecodable = restored.undecodable,
        "state restored"
    );
    let cluster = if cfg.cluster.redis_url.is_empty() {
        None
    } else {
        Some(crate::cluster::Cluster::start(&cfg.cluster.redis_url, node.clone()).await?)
    };
    let counts = crate::cluster_count::SharedCounts::for_config(&cfg);
    node.with_engine(|e| e.set_shared_counts(counts.clone()));
    let state = crate::state::Handle::spawn(events_rx, node.clone(), Some(store), cluster);
    crate::hep::start(&node).await; // HEP export task (hep.address)

    let resolver = Arc::new(Resolver::new());
    let target = cfg.upstream_target();
    let first = match resolver.resolve(&target).await {
        Ok(r) => r,
        Err(e) => {
            return Err(ServerError::Other(format!(
                "upstream.address: cannot resolve {}: {e}",
                cfg.upstream.address
            )))
        }
    };
    let Some(&upstream_addr) = first.addrs.first() else {
        return Err(ServerError::Other(format!(
            "upstream.address: {} resolved to no address",
            cfg.upstream.address
        )));
    };
    node.with_engine(|e| e.set_upstream(first.addrs.iter().map(|a| a.ip()).collect()));
    let mut router = Router::new(
        router_config(&cfg, &bound, upstream_addr, keys),
        upstream_flow(&cfg, upstream_addr),
    );
    router.set_upstreams(upstream_flow(&cfg, upstream_addr), &first.addrs);
    tracing::info!(
        upstream = %upstream_addr,
        udp = ?router.config().udp,
        tcp = ?router.config().tcp,
        incoming = ?cfg.upstream.incoming,
        mode = ?cfg.protection.mode,
        "sipwarden running"
    );

    let udp: Vec<Arc<UdpSocket>> = bound.udp.into_iter().map(Arc::new).collect();
    let udp4 = udp
        .iter()
        .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv4()))
        .cloned();
    let udp6 = udp
        .iter()
        .find(|s| s.local_addr().is_ok_and(|a| a.is_ipv6()))
        .cloned();
    let shared = Arc::new(Shared {
        node: node.clone(),
        router: arc_swap::ArcSwap::from_pointee(router),
        transports: Transports {
            udp4,
            udp6,
            conns: Arc::new(Conns::default()),
        },
        max_message_bytes: cfg.sip.max_message_bytes,
        tls_upstream: TlsUpstream::from_config(&cfg)
            .map_err(|e| ServerError::Other(format!("tls.upstream_ca: {e}")))?,
    });
    // Certificates are loaded before anything serves: a TLS listener without them is an error.
    let tls_acceptor = if bound.tls.is_empty() && bound.wss.is_empty() {
        None
    } else {
        Some(TlsAcceptor::new(node.clone()).map_err(|e| ServerError::Other(format!("tls: {e}")))?)
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = {
        let stop_rx = stop_rx.clone();
        move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        }
    };
    let mut tasks = Vec::new();
    if counts.is_enabled() {
        let (url, ca) = (cfg.cluster.redis_url.clone(), cfg.cluster.redis_ca.clone());
        let every = cfg.cluster.count_interval;
        let link = crate::cluster_count::link::run(url, ca, counts, node.clock, every, stopped());
        tasks.push(tokio::spawn(link));
    }
    // Listener tasks run supervised: one that ends (a panic that escaped, an error) is
    // restarted, counted and logged, and /healthz fails until it serves again.
    for sock in &udp {
        let name = match sock.local_addr() {
            Ok(a) => format!("udp:{a}"),
            Err(_) => "udp".to_string(),
        };
        // One receive task per socket (several sockets per address, see `udp_sockets`).
        let (sock, shared, stopped) = (sock.clone(), shared.clone(), stopped.clone());
        tasks.push(supervise(node.clone(), &name, stop_rx.clone(), move || {
            udp::serve(sock.clone(), shared.clone(), stopped())
        }));
    }
    for l in bound.tcp {
        let name = match l.local_addr() {
            Ok(a) => format!("tcp:{a}"),
            Err(_) => "tcp".to_string(),
        };
        let (l, shared, stopped) = (Arc::new(l), shared.clone(), stopped.clone());
        tasks.push(supervise(node.clone(), &name, stop_rx.clone(), move || {
            tcp::serve(l.clone(), shared.clone(), stopped())
        }));
    }
    for l in bound.ws {
        let name = match l.local_addr() {
            Ok(a) => format!("ws:{a}"),
            Err(_) => "ws".to_string(),
        };
        let (l, shared, stopped) = (Arc::new(l), shared.clone(), stopped.clone());
        tasks.push(supervise(node.clone(), &name, stop_rx.clone(), move || {
            crate::net::ws::serve(l.clone(), shared.clone(), Transport::Ws, stopped())
        }));
    }

    if let Some(acceptor) = &tls_acceptor {
        for (l, with_wss) in bound.tls.into_iter().zip(bound.tls_with_wss) {
            let name = match l.local_addr() {
                Ok(a) if with_wss => format!("tls+wss:{a}"),
                Ok(a) => format!("tls:{a}"),
                Err(_) => "tls".to_string(),
            };
            let (l, shared, stopped) = (Arc::new(l), shared.clone(), stopped.clone());
            let acceptor = acceptor.clone();
            // One handshake table per listener, kept across restarts of its loop.
            let wss = with_wss.then(|| Arc::new(crate::net::ws::Pending::default()));
            tasks.push(supervise(node.clone(), &name, stop_rx.clone(), move || {
                tls::serve(
                    l.clone(),
                    acceptor.clone(),
                    shared.clone(),
                    wss.clone(),
                    stopped(),
                )
            }));
        }
        for l in bound.wss {
            let name = match l.local_addr() {
                Ok(a) => format!("wss:{a}"),
                Err(_) => "wss".to_string(),
            };
            let (l, shared, stopped) = (Arc::new(l), shared.clone(), stopped.clone());
            let acceptor = acceptor.clone();
            tasks.push(supervise(node.clone(), &name, stop_rx.clone(), move || {
                crate::net::ws::serve_wss(l.clone(), acceptor.clone(), shared.clone(), stopped())
            }));
        }
        tasks.push(tokio::spawn(acceptor.clone().watch(stopped())));
    }

    // Expire blocks once a second; send the BYEs of calls the toll-fraud guard ended.
    {
        let node = node.clone();
        let shared = shared.clone();
        let stop = stopped();
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = every.tick() => {
                        let now = node.now();
                        let byes = node.with_engine(|e| {
                            e.tick(now);
                            e.take_fraud_byes()
                        });
                        close_blocked(&shared);
                        for d in &byes {
                            shared.send_fraud_byes(d).await;
                        }
                    }
                }
            }
        }));
    }

    // Re-resolve a host-name upstream when its TTL runs out.
    if let Some(ttl) = first.ttl {
        let (shared, resolver, target) = (shared.clone(), resolver.clone(), target.clone());
        let stop = stopped();
        tasks.push(tokio::spawn(async move {
            let mut wait = ttl;
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                match resolver.resolve(&target).await {
                    Ok(r) => {
                        wait = r.ttl.unwrap_or(crate::net::upstream::MAX_TTL);
                        let cfg = shared.node.config();
                        if let Some(&a) = r.addrs.first() {
                            let mut next = Router::clone(&shared.router.load());
                            next.set_upstreams(upstream_flow(&cfg, a), &r.addrs);
                            shared.router.store(Arc::new(next));
                        }
                        shared.node.with_engine(|e| e.set_upstream(r.addrs.iter().map(|a| a.ip()).collect()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "upstream re-resolution failed; keeping the previous address");
                        wait = crate::net::upstream::MIN_TTL * 6;
                    }
                }
            }
        }));
    }

    // Threat feeds (src/feeds): pulled until stop.
    {
        let (node, stop) = (node.clone(), stopped());
        tasks.push(tokio::spawn(async move {
            tokio::select! { _ = stop => {}, _ = crate::feeds::run(node) => {} }
        }));
    }
    // Reload: SIGHUP and the admin API both come through this channel.
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    // The address the admin API is really bound to: a reload cannot move it, so the token rule
    // is checked against it, not against the file's (possibly changed) `admin.listen`.
    let admin_bound = bound.admin.as_ref().and_then(|l| l.local_addr().ok());
    {
        let node = node.clone();
        let stop = stopped();
        let tls_acceptor = tls_acceptor.clone();
        tasks.push(tokio::spawn(async move {
            tokio::pin!(stop);
            loop {
                let req = tokio::select! {
                    _ = &mut stop => return,
                    r = reload_rx.recv() => match r { Some(r) => r, None => return },
                };
                let result = match &config_path {
                    None => Err("no config file to reload".to_string()),
                    Some(p) => reload(&node, p, admin_bound),
                };
                if let Err(e) = &result {
                    tracing::error!(error = %e, "config reload refused; the running config is unchanged");
                }
                // Certificates are re-read on every reload request, even when the config
                // file itself did not change (the usual certificate renewal).
                if let Some(a) = tls_acceptor.clone() {
                    let _ = tokio::task::spawn_blocking(move || a.reload(true)).await;
                }
                let _ = req.send(result);
            }
        }));
    }
    #[cfg(unix)]
    {
        let reload_tx = reload_tx.clone();
        let stop = stopped();
        tasks.push(tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = hup.recv() => {
                        let (tx, rx) = oneshot::channel();
                        if reload_tx.send(tx).await.is_ok() {
                            let _ = rx.await;
                        }
                    }
                }
            }
        }));
    }
    // The admin surface: dashboard, JSON API, /metrics (wired by the admin module's author).
    if let Some(listener) = bound.admin {
        let (node, reload, stop) = (node.clone(), reload_tx.clone(), stopped());
        tasks.push(tokio::spawn(async move {
            if let Err(e) = crate::admin::serve(listener, node, Some(reload), stop).await {
                tracing::error!(error = %e, "admin API stopped");
            }
        }));
    }
    // The TFTP provisioning guard, sharing the block table with SIP.
    if let Some(sock) = bound.tftp {
        let name = match sock.local_addr() {
            Ok(a) => format!("tftp:{a}"),
            Err(_) => "tftp".to_string(),
        };
        let (sock, n, stopped) = (Arc::new(sock), node.clone(), stopped.clone());
        tasks.push(supervise(node.clone(), &name, stop_rx.clone(), move || {
            crate::net::tftp::run(sock.clone(), n.clone(), stopped())
        }));
    }

    Ok(Running {
        node,
        reload: reload_tx,
        stop_tx,
        tasks,
        state,
    })
}

/// First wait before restarting a listener that ended; doubled on each quick failure.
const RESTART_MIN: Duration = Duration::from_millis(100);
/// Longest wait between restarts (a listener that fails at once keeps failing at this pace).
const RESTART_MAX: Duration = Duration::from_secs(5);
/// A listener that ran this long before ending is restarted after [`RESTART_MIN`] again.
const RESTART_STABLE: Duration = Duration::from_secs(30);

async fn stop_requested(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Run a listener task (`make` builds it, again after each end) until `stop` turns true. A task
/// that ends while not stopping, by panic or by returning, is restarted after a backoff, counted
/// in `sipwarden_listener_restarts_total{listener=name}` and logged; while it is down its slot
/// in [`crate::stats::Listeners`] says "not serving", which fails `/healthz`.
pub(crate) fn supervise<F, Fut>(
    node: Arc<Node>,
    name: &str,
    mut stop: watch::Receiver<bool>,
    mut make: F,
) -> tokio::task::JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listeners = &node.stats.listeners;
    let slot = listeners.register(name);
    let name = name.to_string();
    tokio::spawn(async move {
        let listeners = &node.stats.listeners;
        let mut backoff = RESTART_MIN;
        loop {
            let started = tokio::time::Instant::now();
            let mut task = tokio::spawn(make());
            listeners.set_serving(slot, true);
            let ended = tokio::select! {
                _ = stop_requested(&mut stop) => {
                    // The task watches the same signal and returns by itself; one that does not
                    // within a second is aborted.
                    if tokio::time::timeout(Duration::from_secs(1), &mut task).await.is_err() {
                        task.abort();
                    }
                    listeners.set_serving(slot, false);
                    return;
                }
                r = &mut task => r,
            };
            listeners.set_serving(slot, false);
            if *stop.borrow() {
                return;
            }
            listeners.restarted(slot);
            if started.elapsed() >= RESTART_STABLE {
                backoff = RESTART_MIN;
            }
            match ended {
                Err(e) if e.is_panic() => tracing::error!(
                    listener = %name, retry_in = ?backoff,
                    "listener task panicked; restarting it"
                ),
                _ => tracing::error!(
                    listener = %name, retry_in = ?backoff,
                    "listener task ended unexpectedly; restarting it"
                ),
            }
            tokio::select! {
                _ = stop_requested(&mut stop) => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(RESTART_MAX);
        }
    })
}

/// Load, validate and apply the config file. Listener addresses need a restart; everything
/// else (lists, thresholds, scanner patterns, mode) changes in place without losing state.
/// `admin_bound` is where the admin API is actually listening (see [`check_reload`]). On error
/// the running config stays in force and the message goes back to the SIGHUP/API caller.
pub fn reload(
    node: &Node,
    path: &std::path::Path,
    admin_bound: Option<SocketAddr>,
) -> Result<(), String> {
    let cfg = Config::load(path).map_err(|e| e.to_string())?;
    let old = node.config();
    check_reload(&cfg, admin_bound)?;
    if cfg.sip.listen_udp != old.sip.listen_udp
        || cfg.sip.listen_tcp != old.sip.listen_tcp
        || cfg.sip.listen_tls != old.sip.listen_tls
        || cfg.upstream.transport != old.upstream.transport
        || cfg.tls.upstream_ca != old.tls.upstream_ca
        || cfg.upstream.tls_server_name != old.upstream.tls_server_name
        || cfg.sip.listen_ws != old.sip.listen_ws
        || cfg.sip.listen_wss != old.sip.listen_wss
        || cfg.admin.listen != old.admin.listen
        || cfg.upstream.address != old.upstream.address
        || cfg.state.path != old.state.path
        || cfg.cluster.redis_url != old.cluster.redis_url
        || cfg.cluster.shared_counters != old.cluster.shared_counters
        || cfg.cluster.count_interval != old.cluster.count_interval
        || cfg.tftp.enabled != old.tftp.enabled
        || cfg.tftp.listen != old.tftp.listen
        || cfg.notify.webhook != old.notify.webhook
        || cfg.notify.email_to != old.notify.email_to
        || cfg.notify.email_from != old.notify.email_from
        || cfg.notify.smtp_url != old.notify.smtp_url
        || cfg.notify.digest != old.notify.digest
        || cfg.sip.flow_key != old.sip.flow_key
        || cfg.sip.nat_detection != old.sip.nat_detection
    {
        tracing::warn!(
            "listen addresses, upstream.address/transport/tls_server_name, tls.upstream_ca, state.path, cluster.redis_url/shared_counters/count_interval, tftp.enabled/listen, notify.webhook/email_*/smtp_url/digest, sip.flow_key and sip.nat_detection change only on restart"
        );
    }
    node.reconfigure(cfg);
    tracing::info!(path = %path.display(), "config reloaded");
    Ok(())
}

/// The rules a reloaded config must meet beyond [`Config::validate`], which judges the file on
/// its own. `admin.listen` changes only on restart, so a file that moves it to loopback and drops
/// the token would otherwise leave the API, still bound to a public address, open to anyone.
pub fn check_reload(new: &Config, admin_bound: Option<SocketAddr>) -> Result<(), String> {
    if let Some(a) = admin_bound {
        if !a.ip().is_loopback() && new.admin.token.is_empty() {
            return Err(format!(
                "admin.token: required while the admin API is bound to {a}, a non-loopback \
                 address (admin.listen changes only on restart)"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node_with_token(token: &str) -> Arc<Node> {
        let mut cfg = Config::default();
        cfg.admin.listen = "0.0.0.0:8080".parse().unwrap();
        cfg.admin.token = token.into();
        Node::new(cfg).0
    }

    #[test]
    fn reload_refuses_dropping_the_token_of_a_public_admin_api() {
        let node = node_with_token("secret");
        let f = tempfile::NamedTempFile::new().unwrap();
        // Valid on its own (loopback needs no token), but the API stays on 0.0.0.0 until restart.
        std::fs::write(
            f.path(),
            "[admin]\nlisten = \"127.0.0.1:8080\"\ntoken = \"\"\n[register]\nhit_count = 9\n",
        )
        .unwrap();
        let bound = Some("0.0.0.0:8080".parse().unwrap());
        let err = reload(&node, f.path(), bound).unwrap_err();
        assert!(err.starts_with("admin.token: required"), "{err}");
        assert!(err.contains("0.0.0.0:8080"), "{err}");
        // The running config is untouched.
        assert_eq!(node.config().admin.token, "secret");
        assert_eq!(node.config().register.hit_count, 5);

        // With a token the same change is accepted; on a loopback API none is needed.
        std::fs::write(f.path(), "[admin]\ntoken = \"new\"\n").unwrap();
        reload(&node, f.path(), bound).unwrap();
        assert_eq!(node.config().admin.token, "new");
        std::fs::write(f.path(), "[register]\nhit_count = 9\n").unwrap();
        reload(&node, f.path(), Some("127.0.0.1:8080".parse().unwrap())).unwrap();
        assert_eq!(node.config().register.hit_count, 9);
    }

    async fn health(node: &Arc<Node>) -> (u16, String) {
        use tower::ServiceExt;
        let req = axum::http::Request::builder()
            .uri("/healthz")
            .body(axum::body::Body::empty())
            .unwrap();
        let r = crate::admin::router(node.clone(), None)
            .oneshot(req)
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn metrics(node: &Arc<Node>) -> String {
        crate::admin::metrics::render(&node.snapshot())
    }

    type BoxFut = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

    #[tokio::test(start_paused = true)]
    async fn a_listener_that_dies_is_restarted_and_healthz_fails_meanwhile() {
        let node = Node::new(Config::default()).0;
        let (stop_tx, stop_rx) = watch::channel(false);
        let (die_tx, die_rx) = oneshot::channel::<()>();
        let mut die_rx = Some(die_rx);
        let runs = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (r, stop_inner) = (runs.clone(), stop_rx.clone());
        let sup = supervise(node.clone(), "udp:127.0.0.1:5060", stop_rx, move || {
            r.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let fut: BoxFut = match die_rx.take() {
                // The first run panics when told to.
                Some(rx) => Box::pin(async move {
                    let _ = rx.await;
                    panic!("injected listener panic");
                }),
                None => {
                    let mut stop = stop_inner.clone();
                    Box::pin(async move { stop_requested(&mut stop).await })
                }
            };
            fut
        });
        let settle = || async {
            for _ in 0..100 {
                tokio::task::yield_now().await;
            }
        };
        settle().await;
        assert_eq!(health(&node).await, (200, "ok".into()));
        die_tx.send(()).unwrap();
        settle().await;
        // Down during the backoff (the clock is paused, so the test sees it deterministically).
        let (status, body) = health(&node).await;
        assert_eq!(status, 503);
        assert!(body.contains("udp:127.0.0.1:5060"), "{body}");
        let m = metrics(&node).await;
        assert!(
            m.contains("sipwarden_listener_restarts_total{listener=\"udp:127.0.0.1:5060\"} 1"),
            "{m}"
        );
        assert!(
            m.contains("sipwarden_listener_up{listener=\"udp:127.0.0.1:5060\"} 0"),
            "{m}"
        );
        tokio::time::advance(RESTART_MIN).await;
        settle().await;
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(health(&node).await, (200, "ok".into()));
        assert!(metrics(&node)
            .await
            .contains("sipwarden_listener_up{listener=\"udp:127.0.0.1:5060\"} 1"));
        // A requested stop is not a failure: no restart.
        stop_tx.send(true).unwrap();
        sup.await.unwrap();
        assert_eq!(runs.load(std::sync::atomic::Ordering::SeqCst), 2);
        assert_eq!(node.stats.listeners.states()[0].restarts, 1);
    }

    fn register(via_host: std::net::SocketAddr, transport: &str, call_id: &str) -> String {
        format!(
            "REGISTER sip:pbx.test SIP/2.0\r\n\
Via: SIP/2.0/{transport} {via_host};branch=z9hG4bK{call_id};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:1001@pbx.test>;tag=f1\r\nTo: <sip:1001@pbx.test>\r\n\
Call-ID: {call_id}\r\nCSeq: 1 REGISTER\r\n\
Contact: <sip:1001@{via_host}>\r\nContent-Length: 0\r\n\r\n"
        )
    }

    /// Bounded wait for a condition the node reaches asynchronously (no timing is asserted).
    async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("never happened: {what}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panic_on_the_packet_path_does_not_stop_serving() {
        use crate::net::PANIC_PROBE;
        use std::sync::atomic::Ordering::Relaxed;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let wait = Duration::from_secs(5);
        let dir = tempfile::tempdir().unwrap();
        let pbx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = Config::default();
        cfg.sip.listen_udp = vec!["127.0.0.1:0".parse().unwrap()];
        cfg.sip.listen_tcp = vec!["127.0.0.1:0".parse().unwrap()];
        cfg.sip.max_connections_per_ip = 1;
        cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
        cfg.upstream.address = pbx.local_addr().unwrap().to_string();
        cfg.state.path = dir.path().join("state.db").display().to_string();
        let cfg = cfg.validate().unwrap();
        let bound = bind(&cfg).await.unwrap();
        let udp = bound.udp[0].local_addr().unwrap();
        let tcp = bound.tcp[0].local_addr().unwrap();
        let running = start(cfg, None, bound).await.unwrap();
        let node = running.node.clone();
        let mut probe = PANIC_PROBE.to_vec();
        probe.extend_from_slice(b"Content-Length: 0\r\n\r\n");
        let mut buf = vec![0u8; 65536];

        // UDP: eight panicking datagrams, then a phone is still served.
        let phone = UdpSocket::bind("127.0.0.2:0").await.unwrap();
        for _ in 0..8 {
            phone.send_to(&probe, udp).await.unwrap();
        }
        eventually("8 panics counted", || node.stats.panics.load(Relaxed) == 8).await;
        let reg = register(phone.local_addr().unwrap(), "UDP", "udp-after-panic");
        phone.send_to(reg.as_bytes(), udp).await.unwrap();
        let (n, _) = tokio::time::timeout(wait, pbx.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("udp-after-panic"));
        assert_eq!(health(&node).await, (200, "ok".into()));
        let m = metrics(&node).await;
        assert!(m.lines().any(|l| l == "sipwarden_panics_total 8"), "{m}");
        assert!(
            m.contains(&format!(
                "sipwarden_listener_restarts_total{{listener=\"udp:{udp}\"}} 0"
            )),
            "{m}"
        );

        // TCP, one connection allowed per address: the panic closes the connection and frees
        // its slot, so the same address connects again and is served.
        let connect = || async {
            let s = tokio::net::TcpSocket::new_v4().unwrap();
            s.bind("127.0.0.3:0".parse().unwrap()).unwrap();
            s.connect(tcp).await.unwrap()
        };
        let mut c = connect().await;
        c.write_all(&probe).await.unwrap();
        let n = tokio::time::timeout(wait, c.read(&mut buf))
            .await
            .unwrap()
            .unwrap_or(0);
        assert_eq!(n, 0, "the connection is closed after the panic");
        eventually("9 panics counted", || node.stats.panics.load(Relaxed) == 9).await;
        eventually("the slot is released", || {
            node.stats.tcp_open.load(Relaxed) == 0
        })
        .await;
        let mut c = connect().await;
        let reg = register(c.local_addr().unwrap(), "TCP", "tcp-after-panic");
        c.write_all(reg.as_bytes()).await.unwrap();
        let (n, _) = tokio::time::timeout(wait, pbx.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).contains("tcp-after-panic"));
        assert_eq!(node.stats.tcp_rejected.load(Relaxed), 0);
        assert_eq!(node.stats.tcp_connections.load(Relaxed), 2);
        running.shutdown().await;
    }
}
