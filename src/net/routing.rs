//! What the router is told at start: the addresses our bound sockets advertise (Via,
//! Record-Route, Path), the upstream flow, and the durable routing keys; then, while running,
//! the upstream's addresses as DNS changes them.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, TransportKind, UpstreamTarget};
use crate::net::bind::Bound;
use crate::net::handler::Shared;
use crate::net::upstream::Resolver;
use crate::proxy::{Advertised, Flow, Router, RouterConfig};
use crate::state::StateError;
use crate::stats::Transport;

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

/// The address advertised for a socket bound to `local`: `sip.public_address` when set, else
/// the local address, or (bound to 0.0.0.0 / [::]) the local IP the kernel uses towards `upstream`.
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

/// The router's view of the bound sockets: one advertised address per transport (of the
/// upstream's family when there is one), every alias a request may name us by, and our sockets.
pub fn router_config(
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

/// The flow towards the PBX at `addr` over `upstream.transport`.
pub fn upstream_flow(cfg: &Config, addr: SocketAddr) -> Flow {
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
pub fn routing_keys(
    cfg: &Config,
    store: &crate::state::Store,
    now: crate::clock::Millis,
) -> Result<crate::proxy::Keys, StateError> {
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

/// Re-resolve a host-name upstream when its TTL runs out (first after `ttl`), and hand the new
/// addresses to the router and the engine; on failure the previous address is kept and the
/// next try comes sooner. Runs until `stop` resolves.
pub async fn follow_upstream(
    shared: Arc<Shared>,
    resolver: Arc<Resolver>,
    target: UpstreamTarget,
    ttl: Duration,
    stop: impl Future<Output = ()>,
) {
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
                // The engine keeps a lock-free copy beside the ledger's: both are updated.
                shared
                    .node
                    .engine()
                    .set_upstream(r.addrs.iter().map(|a| a.ip()).collect());
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream re-resolution failed; keeping the previous address");
                wait = crate::net::upstream::MIN_TTL * 6;
            }
        }
    }
}
