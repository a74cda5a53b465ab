//! The certificate store: PEM files -> a rustls `ServerConfig`, behind an `ArcSwap` so a reload
//! (SIGHUP, or a file whose mtime changed) serves the NEXT handshake while open connections
//! keep the config they were accepted with. A pair that does not load keeps the old one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};

use crate::config::{Tls, TlsVersion, VerifyClient};

/// A file that did not load, or a pair that does not fit together; names the file.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct CertError {
    pub path: String,
    pub message: String,
}

fn cert_err(path: &str, message: impl std::fmt::Display) -> CertError {
    CertError {
        path: path.to_string(),
        message: message.to_string(),
    }
}

/// The crypto provider every TLS config of ours uses (ring, already in the tree).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The PEM certificates of a file, in order; an empty file is an error.
pub fn load_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| cert_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(path, e))?;
    if certs.is_empty() {
        return Err(cert_err(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

/// A CA file as a root store (client certificates, the upstream PBX).
pub fn load_roots(path: &str) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs(path)? {
        roots.add(c).map_err(|e| cert_err(path, e))?;
    }
    Ok(roots)
}

fn load_pair(
    cert: &str,
    key: &str,
    provider: &CryptoProvider,
) -> Result<Arc<CertifiedKey>, CertError> {
    let chain = load_certs(cert)?;
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| cert_err(key, e))?;
    CertifiedKey::from_der(chain, key_der, provider)
        .map(Arc::new)
        .map_err(|e| cert_err(key, format!("does not fit {cert}: {e}")))
}

/// Picks the certificate by the client's SNI: an exact name, then `*.` + the parent domain,
/// then the default pair.
#[derive(Debug)]
struct SniResolver {
    names: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    fn pick(&self, name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = name else {
            return self.default.clone();
        };
        // SNI is a DNS name (rustls has checked it): at most 253 bytes, so this allocation is
        // bounded, and lower case makes the lookup case-insensitive.
        let name = name.to_ascii_lowercase();
        if let Some(k) = self.names.get(&name) {
            return k.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.names.get(&format!("*.{parent}")) {
                return k.clone();
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.pick(hello.server_name()))
    }
}

/// Build the server config of `[tls]`: every file read now, every pair checked.
pub fn server_config(t: &Tls) -> Result<ServerConfig, CertError> {
    let provider = provider();
    let default = load_pair(&t.certificate, &t.private_key, &provider)?;
    let mut names = HashMap::new();
    for e in &t.sni {
        let pair = load_pair(&e.certificate, &e.private_key, &provider)?;
        names.insert(e.name.to_ascii_lowercase(), pair);
    }
    let versions: &[&'static rustls::SupportedProtocolVersion] = match t.min_version {
        TlsVersion::V12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V13 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| cert_err("tls.min_version", e))?;
    let builder = match t.verify_client {
        VerifyClient::Off => builder.with_no_client_auth(),
        v => {
            let roots = Arc::new(load_roots(&t.client_ca)?);
            let vb = WebPkiClientVerifier::builder_with_provider(roots, provider);
            let vb = if v == VerifyClient::Optional {
                vb.allow_unauthenticated()
            } else {
                vb
            };
            let verifier = vb.build().map_err(|e| cert_err(&t.client_ca, e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_cert_resolver(Arc::new(SniResolver { names, default }));
    // Phones do not negotiate ALPN for SIP; the WebSocket side may set "http/1.1" on a copy.
    cfg.alpn_protocols = Vec::new();
    Ok(cfg)
}

/// What a reload did.
#[derive(Debug, PartialEq, Eq)]
pub enum Reload {
    /// Nothing changed on disk or in the config.
    Unchanged,
    /// The next handshake gets the new certificates.
    Swapped,
    /// A file did not load: the old certificates stay in force.
    Failed(String),
}

/// The live server config and what it was built from.
pub struct CertStore {
    current: ArcSwap<ServerConfig>,
    watched: Mutex<Watched>,
}

struct Watched {
    cfg: Tls,
    /// Every file the config names, with the mtime it had at the last attempt (loaded or not:
    /// a bad file is reported once, not on every poll, and retried when it changes again).
    mtimes: Vec<(PathBuf, Option<SystemTime>)>,
}

fn files(t: &Tls) -> Vec<PathBuf> {
    let mut v = vec![PathBuf::from(&t.certificate), PathBuf::from(&t.private_key)];
    for e in &t.sni {
        v.push(PathBuf::from(&e.certificate));
        v.push(PathBuf::from(&e.private_key));
    }
    if !t.client_ca.is_empty() {
        v.push(PathBuf::from(&t.client_ca));
    }
    v
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn stamp(t: &Tls) -> Vec<(PathBuf, Option<SystemTime>)> {
    files(t)
        .into_iter()
        .map(|p| {
            let m = mtime(&p);
            (p, m)
        })
        .collect()
}

impl CertStore {
    /// Load `[tls]`; an error here stops the start (a TLS listener without a certificate).
    pub fn load(t: &Tls) -> Result<CertStore, CertError> {
        let mtimes = stamp(t);
        let cfg = server_config(t)?;
        Ok(CertStore {
            current: ArcSwap::from_pointee(cfg),
            watched: Mutex::new(Watched {
                cfg: t.clone(),
                mtimes,
            }),
        })
    }

    /// The config the next handshake uses.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.current.load_full()
    }

    /// Rebuild from `t` when it differs from the config in force, when a file's mtime changed,
    /// or always with `force` (SIGHUP). On failure the old certificates stay.
    pub fn reload(&self, t: &Tls, force: bool) -> Reload {
        let mut w = self.watched.lock();
        let now = stamp(t);
        let same_cfg = w.cfg == *t;
        if !force && same_cfg && now == w.mtimes {
            return Reload::Unchanged;
        }
        w.mtimes = now;
        w.cfg = t.clone();
        match server_config(t) {
            Ok(cfg) => {
                self.current.store(Arc::new(cfg));
                Reload::Swapped
            }
            Err(e) => Reload::Failed(e.to_string()),
        }
    }
}
