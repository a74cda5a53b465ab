//! Wiring: bind the sockets named in the config, then run every task until shutdown. `run`
//! takes already-bound sockets so tests can start a node on `127.0.0.1:0`.

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};

use crate::config::Config;
pub use crate::net::bind::{bind, BindError, Bound};
use crate::net::handler::Shared;
use crate::net::routing::{follow_upstream, router_config, routing_keys, upstream_flow};
use crate::net::tls::{self, TlsAcceptor, TlsUpstream};
use crate::net::upstream::Resolver;
use crate::net::{tcp, udp, Conns, Transports};
use crate::node::Node;
use crate::proxy::Router;
use crate::reload::ReloadRequest;
use crate::stats::Transport;
use crate::supervise::supervise;

/// Why a node could not start: a listen address, the state store, the cluster link, or a
/// config value that only shows its fault at start (an upstream that does not resolve, TLS files).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("{0}")]
    Other(String),
}

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
    node.engine().set_shared_counts(counts.clone());
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
    node.engine()
        .set_upstream(first.addrs.iter().map(|a| a.ip()).collect());
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
        upstream_retry_at: Default::default(),
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
        let name = listener_name("udp", sock.local_addr());
        // One receive task per socket (several sockets per address, see `net::bind::udp_sockets`).
        let (sock, shared, stopped) = (sock.clone(), shared.clone(), stopped.clone());
        tasks.push(supervise(node.clone(), &name, stop_rx.clone(), move || {
            udp::serve(sock.clone(), shared.clone(), stopped())
        }));
    }
    for l in bound.tcp {
        let name = listener_name("tcp", l.local_addr());
        let (l, shared, stopped) = (Arc::new(l), shared.clone(), stopped.clone());
        tasks.push(supervise(node.clone(), &name, stop_rx.clone(), move || {
            tcp::serve(l.clone(), shared.clone(), stopped())
        }));
    }
    for l in bound.ws {
        let name = listener_name("ws", l.local_addr());
        let (l, shared, stopped) = (Arc::new(l), shared.clone(), stopped.clone());
        tasks.push(supervise(node.clone(), &name, stop_rx.clone(), move || {
            crate::net::ws::serve(l.clone(), shared.clone(), Transport::Ws, stopped())
        }));
    }

    if let Some(acceptor) = &tls_acceptor {
        for (l, with_wss) in bound.tls.into_iter().zip(bound.tls_with_wss) {
            let kind = if with_wss { "tls+wss" } else { "tls" };
            let name = listener_name(kind, l.local_addr());
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
            let name = listener_name("wss", l.local_addr());
            let (l, shared, stopped) = (Arc::new(l), shared.clone(), stopped.clone());
            let acceptor = acceptor.clone();
            tasks.push(supervise(node.clone(), &name, stop_rx.clone(), move || {
                crate::net::ws::serve_wss(l.clone(), acceptor.clone(), shared.clone(), stopped())
            }));
        }
        tasks.push(tokio::spawn(acceptor.clone().watch(stopped())));
    }

    // Expire blocks once a second; close blocked connections; send fraud BYEs.
    let sweep = crate::net::sweep::run(shared.clone(), stopped());
    tasks.push(tokio::spawn(sweep));

    // Re-resolve a host-name upstream when its TTL runs out.
    if let Some(ttl) = first.ttl {
        let follow = follow_upstream(shared.clone(), resolver, target, ttl, stopped());
        tasks.push(tokio::spawn(follow));
    }

    // Threat feeds (src/feeds): pulled until stop.
    {
        let (node, stop) = (node.clone(), stopped());
        tasks.push(tokio::spawn(async move {
            tokio::select! { _ = stop => {}, _ = crate::feeds::run(node) => {} }
        }));
    }
    // Reload: SIGHUP and the admin API both come through this channel.
    let (reload_tx, reload_rx) = mpsc::channel::<ReloadRequest>(4);
    // The address the admin API is really bound to: a reload cannot move it, so the token rule
    // is checked against it, not against the file's (possibly changed) `admin.listen`.
    let admin_bound = bound.admin.as_ref().and_then(|l| l.local_addr().ok());
    let serve = crate::reload::serve(
        reload_rx,
        node.clone(),
        config_path,
        admin_bound,
        tls_acceptor.clone(),
        stopped(),
    );
    tasks.push(tokio::spawn(serve));
    #[cfg(unix)]
    {
        let hup = crate::reload::on_sighup(reload_tx.clone(), stopped());
        tasks.push(tokio::spawn(hup));
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
        let name = listener_name("tftp", sock.local_addr());
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

/// A listener's name in logs, `/healthz` and `sipwarden_listener_*{listener=...}`: `kind:addr`.
fn listener_name(kind: &str, addr: std::io::Result<std::net::SocketAddr>) -> String {
    match addr {
        Ok(a) => format!("{kind}:{a}"),
        Err(_) => kind.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{health, metrics};

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
