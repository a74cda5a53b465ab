//! The client side towards a PBX on TLS (`upstream.transport = "tls"`): its certificate is
//! verified against `tls.upstream_ca` for `upstream.tls_server_name` (default: the host of
//! `upstream.address`), which is also the SNI sent.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::certs::{load_roots, provider, CertError};
use crate::config::Config;

/// Time allowed for the TCP connect and the TLS handshake towards the PBX, together.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach the PBX over TLS.
pub struct TlsUpstream {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl TlsUpstream {
    /// Build from `[upstream]`; `None` when the upstream is not on TLS.
    pub fn from_config(cfg: &Config) -> Result<Option<TlsUpstream>, CertError> {
        if cfg.upstream.transport != crate::config::TransportKind::Tls {
            return Ok(None);
        }
        let roots = load_roots(&cfg.tls.upstream_ca)?;
        let host = if cfg.upstream.tls_server_name.is_empty() {
            cfg.upstream_target().host
        } else {
            cfg.upstream.tls_server_name.clone()
        };
        let name = ServerName::try_from(host.clone()).map_err(|e| CertError {
            path: "upstream.tls_server_name".into(),
            message: format!("{host:?}: {e}"),
        })?;
        let config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| CertError {
                path: "upstream".into(),
                message: e.to_string(),
            })?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Some(TlsUpstream {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            name,
        }))
    }

    /// Connect and verify the PBX's certificate.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let go = async {
            let tcp = TcpStream::connect(addr).await?;
            let _ = tcp.set_nodelay(true);
            self.connector.connect(self.name.clone(), tcp).await
        };
        tokio::time::timeout(CONNECT_TIMEOUT, go)
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "tls connect timeout"))?
    }
}
