//! Wiring: bind the sockets named in the config, then run every task until shutdown. `run`
//! takes already-bound sockets so tests can start a node on `127.0.0.1:0`.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch};

use crate::config::{Config, TransportKind};
use crate::net::handler::Shared;
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
    pub admin: Option<TcpListener>,
    pub tftp: Option<UdpSocket>,
}

/// UDP receive loops per socket: one per core keeps both busy under load.
fn udp_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8))
}

fn udp_socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // IPv6 only: list "0.0.0.0:5060" and "[::]:5060" side by side for both families.
        s.set_only_v6(true)?;
    }
    // Large buffers absorb bursts (a REGISTER storm after a power cut) instead of dropping.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
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
        admin: None,
        tftp: None,
    };
    for &addr in &cfg.sip.listen_udp {
        b.udp
            .push(udp_socket(addr).map_err(|source| ServerError::Bind {
                what: "SIP UDP",
                addr,
                source,
            })?);
    }
    for &addr in &cfg.sip.listen_tcp {
        b.tcp
            .push(tcp_listener(addr).map_err(|source| ServerError::Bind {
                what: "SIP TCP",
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

fn router_config(cfg: &Config, bound: &Bound, upstream: SocketAddr) -> RouterConfig {
    let udp = bound
        .udp
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .collect::<Vec<_>>();
    let tcp = bound
        .tcp
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .collect::<Vec<_>>();
    let pick = |v: &[SocketAddr]| {
        v.iter()
            .find(|a| a.is_ipv4() == upstream.is_ipv4())
            .or(v.first())
            .map(|a| advertised(cfg, *a, upstream))
    };
    let mut aliases: Vec<Advertised> = udp
        .iter()
        .chain(tcp.iter())
        .map(|a| advertised(cfg, *a, upstream))
        .collect();
    for a in udp.iter().chain(tcp.iter()) {
        if !a.ip().is_unspecified() {
            aliases.push(Advertised::new(&a.ip().to_string(), a.port()));
        }
    }
    let mut key = [0u8; 16];
    rand::fill(&mut key);
    RouterConfig {
        udp: pick(&udp),
        tcp: pick(&tcp),
        aliases,
        incoming: cfg.upstream.incoming,
        key,
    }
}

fn upstream_flow(cfg: &Config, addr: SocketAddr) -> Flow {
    Flow {
        transport: match cfg.upstream.transport {
            TransportKind::Udp => Transport::Udp,
            TransportKind::Tcp => Transport::Tcp,
        },
        addr,
    }
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
    let state = crate::state::Handle::spawn(events_rx, node.clone(), Some(store), cluster);

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
    let upstream_addr = first.addrs[0];
    node.with_engine(|e| e.set_upstream(first.addrs.iter().map(|a| a.ip()).collect()));
    let router = Router::new(
        router_config(&cfg, &bound, upstream_addr),
        upstream_flow(&cfg, upstream_addr),
    );
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
        router: RwLock::new(router),
        transports: Transports {
            udp4,
            udp6,
            conns: Arc::new(Conns::default()),
        },
        max_message_bytes: cfg.sip.max_message_bytes,
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = Vec::new();
    for sock in &udp {
        for _ in 0..udp_workers() {
            tasks.push(tokio::spawn(udp::serve(
                sock.clone(),
                shared.clone(),
                stopped(),
            )));
        }
    }
    for l in bound.tcp {
        tasks.push(tokio::spawn(tcp::serve(l, shared.clone(), stopped())));
    }

    // Expire blocks once a second.
    {
        let node = node.clone();
        let stop = stopped();
        tasks.push(tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            tokio::pin!(stop);
            loop {
                tokio::select! {
                    _ = &mut stop => return,
                    _ = every.tick() => {
                        let now = node.now();
                        node.with_engine(|e| e.tick(now));
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
                        shared.router.write().set_upstream(upstream_flow(&cfg, r.addrs[0]));
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

    // Reload: SIGHUP and the admin API both come through this channel.
    let (reload_tx, mut reload_rx) = mpsc::channel::<ReloadRequest>(4);
    // The address the admin API is really bound to: a reload cannot move it, so the token rule
    // is checked against it, not against the file's (possibly changed) `admin.listen`.
    let admin_bound = bound.admin.as_ref().and_then(|l| l.local_addr().ok());
    {
        let node = node.clone();
        let stop = stopped();
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
        let (node, stop) = (node.clone(), stopped());
        tasks.push(tokio::spawn(crate::net::tftp::run(sock, node, stop)));
    }

    Ok(Running {
        node,
        reload: reload_tx,
        stop_tx,
        tasks,
        state,
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
        || cfg.admin.listen != old.admin.listen
        || cfg.upstream.address != old.upstream.address
        || cfg.state.path != old.state.path
        || cfg.cluster.redis_url != old.cluster.redis_url
        || cfg.tftp.enabled != old.tftp.enabled
        || cfg.tftp.listen != old.tftp.listen
        || cfg.notify.webhook != old.notify.webhook
    {
        tracing::warn!(
            "listen addresses, upstream.address, state.path, cluster.redis_url, tftp.enabled/listen and notify.webhook change only on restart"
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
}
