//! Config reload (SIGHUP, admin API): the file is loaded and validated again and applied in
//! place; what only a restart can change is named in the log, and a file that would leave a
//! public admin API without a token is refused.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::net::tls::TlsAcceptor;
use crate::node::Node;

/// A request to reload the config file, answered with the outcome.
pub type ReloadRequest = oneshot::Sender<Result<(), String>>;

/// Answer reload requests (SIGHUP and the admin API both send them) until `stop` resolves or
/// every sender is gone. `config_path` is the file to reload (none: every request is refused);
/// `admin_bound` is where the admin API really listens (see [`check_reload`]). The TLS
/// certificates are re-read on every request.
pub async fn serve(
    mut reload_rx: mpsc::Receiver<ReloadRequest>,
    node: Arc<Node>,
    config_path: Option<PathBuf>,
    admin_bound: Option<SocketAddr>,
    tls_acceptor: Option<Arc<TlsAcceptor>>,
    stop: impl Future<Output = ()>,
) {
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
}

/// Turn each SIGHUP into a reload request on `reload_tx` and wait for its answer, until `stop`
/// resolves.
#[cfg(unix)]
pub async fn on_sighup(reload_tx: mpsc::Sender<ReloadRequest>, stop: impl Future<Output = ()>) {
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
    use std::sync::Arc;

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
