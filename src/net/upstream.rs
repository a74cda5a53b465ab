//! Finding the PBX: an IP literal as is; a host name through DNS (RFC 3263: SRV
//! `_sip._udp`/`_sip._tcp` when no port is given, then A/AAAA), re-resolved when the answer's
//! TTL runs out.

use std::net::SocketAddr;
use std::time::Duration;

use hickory_resolver::TokioResolver;

use crate::config::{TransportKind, UpstreamTarget};

/// Shortest and longest time between re-resolutions, whatever the TTL says.
pub const MIN_TTL: Duration = Duration::from_secs(5);
pub const MAX_TTL: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    #[error("no DNS resolver: {0}")]
    NoResolver(String),
    #[error("{host}: {message}")]
    Lookup { host: String, message: String },
}

/// Resolved addresses, best first, and how long they are good for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub addrs: Vec<SocketAddr>,
    pub ttl: Option<Duration>,
}

pub struct Resolver {
    inner: Option<TokioResolver>,
}

impl Resolver {
    pub fn new() -> Self {
        let inner = TokioResolver::builder_tokio().ok().map(|b| b.build());
        Self { inner }
    }

    pub async fn resolve(&self, t: &UpstreamTarget) -> Result<Resolved, ResolveError> {
        if let Some(sa) = t.literal() {
            return Ok(Resolved {
                addrs: vec![sa],
                ttl: None,
            });
        }
        let r = self.inner.as_ref().ok_or_else(|| {
            ResolveError::NoResolver("cannot read the system resolver config".into())
        })?;
        let lookup_err = |e: hickory_resolver::ResolveError, host: &str| ResolveError::Lookup {
            host: host.to_string(),
            message: e.to_string(),
        };
        let mut addrs = Vec::new();
        let mut valid_until: Option<std::time::Instant> = None;
        if t.port.is_none() {
            let proto = match t.transport {
                TransportKind::Udp => "_udp",
                TransportKind::Tcp => "_tcp",
                TransportKind::Tls => "_tcp",
            };
            let scheme = if t.transport == TransportKind::Tls {
                "_sips"
            } else {
                "_sip"
            };
            let name = format!("{scheme}.{proto}.{}.", t.host.trim_end_matches('.'));
            if let Ok(srv) = r.srv_lookup(name.as_str()).await {
                valid_until = Some(srv.as_lookup().valid_until());
                let mut records: Vec<_> = srv.iter().cloned().collect();
                records.sort_by_key(|s| (s.priority(), std::cmp::Reverse(s.weight())));
                for s in records {
                    let target = s.target().to_utf8();
                    if let Ok(ips) = r.lookup_ip(target.as_str()).await {
                        valid_until = valid_until.min(Some(ips.valid_until()));
                        addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, s.port())));
                    }
                }
            }
        }
        if addrs.is_empty() {
            let ips = r
                .lookup_ip(t.host.as_str())
                .await
                .map_err(|e| lookup_err(e, &t.host))?;
            valid_until = Some(ips.valid_until());
            let port = t.port.unwrap_or(5060);
            addrs.extend(ips.iter().map(|ip| SocketAddr::new(ip, port)));
        }
        if addrs.is_empty() {
            return Err(ResolveError::Lookup {
                host: t.host.clone(),
                message: "no addresses".into(),
            });
        }
        let ttl = valid_until.map(|v| {
            v.saturating_duration_since(std::time::Instant::now())
                .clamp(MIN_TTL, MAX_TTL)
        });
        Ok(Resolved { addrs, ttl })
    }
}

impl Default for Resolver {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_upstream;

    #[tokio::test]
    async fn literals_need_no_dns() {
        let r = Resolver::new();
        for (s, want) in [
            ("127.0.0.10:5080", "127.0.0.10:5080"),
            ("sip:127.0.0.1;transport=tcp", "127.0.0.1:5060"),
            ("[::1]:5070", "[::1]:5070"),
        ] {
            let t = parse_upstream(s, TransportKind::Udp).unwrap();
            let got = r.resolve(&t).await.unwrap();
            assert_eq!(got.addrs, vec![want.parse::<SocketAddr>().unwrap()], "{s}");
            assert_eq!(got.ttl, None);
        }
    }

    #[tokio::test]
    async fn localhost_resolves_from_hosts_file() {
        let r = Resolver::new();
        let t = parse_upstream("localhost:5080", TransportKind::Udp).unwrap();
        // /etc/hosts is consulted first; no network involved.
        if let Ok(got) = r.resolve(&t).await {
            assert!(got
                .addrs
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 5080));
        }
    }
}
