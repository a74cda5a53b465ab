//! The acceptor on loopback with certificates made by rcgen: SNI, reload, a bad file, versions,
//! the handshake timeout, the per-source cap, and failures scored into a block.
#![allow(clippy::indexing_slicing, clippy::unwrap_used)]

use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;
use crate::config::{Config, TlsSni, TlsVersion};

/// A self-signed pair for `names`, written as `<stem>.pem` / `<stem>.key`; returns the DER.
fn pair(dir: &Path, stem: &str, names: &[&str]) -> CertificateDer<'static> {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    std::fs::write(dir.join(format!("{stem}.pem")), ck.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{stem}.key")),
        ck.signing_key.serialize_pem(),
    )
    .unwrap();
    ck.cert.der().clone()
}

fn path(dir: &Path, f: &str) -> String {
    dir.join(f).display().to_string()
}

fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.tls.certificate = path(dir, "default.pem");
    c.tls.private_key = path(dir, "default.key");
    c.tls.sni = vec![TlsSni {
        name: "pbx.example.com".into(),
        certificate: path(dir, "pbx.pem"),
        private_key: path(dir, "pbx.key"),
    }];
    c
}

/// A client that trusts nothing in particular: the tests look at the certificate served.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

fn client(versions: &[&'static rustls::SupportedProtocolVersion]) -> tokio_rustls::TlsConnector {
    let p = certs::provider();
    let cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCert(p)))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

thread_local! {
    /// The node's event queue, kept for the test that looks at alerts (and kept open).
    static EVENTS: std::cell::RefCell<Option<tokio::sync::mpsc::Receiver<crate::node::Batch>>> =
        const { std::cell::RefCell::new(None) };
}

/// An acceptor on a loopback listener; every accepted stream is sent back to the test.
async fn server(
    cfg: Config,
) -> (
    Arc<TlsAcceptor>,
    Arc<Node>,
    SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<TlsStream<TcpStream>, HandshakeError>>,
) {
    let (node, rx) = Node::new(cfg);
    EVENTS.with(|e| *e.borrow_mut() = Some(rx));
    let acceptor = TlsAcceptor::new(node.clone()).unwrap();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    let a = acceptor.clone();
    tokio::spawn(async move {
        loop {
            let (s, peer) = l.accept().await.unwrap();
            let (a, tx) = (a.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tx.send(a.accept(s, peer).await);
            });
        }
    });
    (acceptor, node, addr, out)
}

async fn served_cert(
    addr: SocketAddr,
    sni: &str,
) -> (
    CertificateDer<'static>,
    tokio_rustls::client::TlsStream<TcpStream>,
) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from(sni.to_string()).unwrap();
    let s = client(&[&rustls::version::TLS13])
        .connect(name, tcp)
        .await
        .unwrap();
    let der = s.get_ref().1.peer_certificates().unwrap()[0].clone();
    (der, s)
}

#[tokio::test]
async fn sni_picks_the_pair_and_falls_back_to_the_default() {
    let dir = tempfile::tempdir().unwrap();
    let default = pair(dir.path(), "default", &["sip.example.net"]);
    let pbx = pair(dir.path(), "pbx", &["pbx.example.com"]);
    let (_a, _n, addr, _rx) = server(config(dir.path())).await;
    assert_eq!(served_cert(addr, "pbx.example.com").await.0, pbx);
    assert_eq!(served_cert(addr, "PBX.Example.COM").await.0, pbx);
    assert_eq!(served_cert(addr, "other.example.org").await.0, default);
    // No SNI at all (an IP address as the name).
    assert_eq!(served_cert(addr, "127.0.0.1").await.0, default);
}

#[tokio::test]
async fn a_reload_serves_the_next_handshake_and_keeps_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let old = pair(dir.path(), "default", &["sip.example.net"]);
    pair(dir.path(), "pbx", &["pbx.example.com"]);
    let (acceptor, node, addr, mut accepted) = server(config(dir.path())).await;
    let (der, mut open) = served_cert(addr, "sip.example.net").await;
    assert_eq!(der, old);
    let mut server_side = accepted.recv().await.unwrap().unwrap();

    assert_eq!(acceptor.reload(false), Reload::Unchanged);
    let new = pair(dir.path(), "default", &["sip.example.net"]);
    assert_eq!(acceptor.reload(false), Reload::Swapped);
    assert_eq!(node.stats.tls.reloads_ok.load(Relaxed), 1);
    assert_eq!(served_cert(addr, "sip.example.net").await.0, new);

    // The connection accepted before the reload still carries data both ways.
    open.write_all(b"OPTIONS").await.unwrap();
    let mut buf = [0u8; 7];
    server_side.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"OPTIONS");
    server_side.write_all(b"200").await.unwrap();
    let mut buf = [0u8; 3];
    open.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"200");
}

#[tokio::test]
async fn a_bad_file_keeps_the_old_certificate_and_alerts() {
    let dir = tempfile::tempdir().unwrap();
    let old = pair(dir.path(), "default", &["sip.example.net"]);
    pair(dir.path(), "pbx", &["pbx.example.com"]);
    let (acceptor, node, addr, _rx) = server(config(dir.path())).await;
    std::fs::write(
        dir.path().join("default.pem"),
        "-----BEGIN CERTIFICATE-----\ngarbage",
    )
    .unwrap();
    assert!(matches!(acceptor.reload(false), Reload::Failed(_)));
    assert_eq!(node.stats.tls.reloads_failed.load(Relaxed), 1);
    // Reported once, not on every poll.
    assert_eq!(acceptor.reload(false), Reload::Unchanged);
    assert_eq!(served_cert(addr, "sip.example.net").await.0, old);
    // A key that does not fit the certificate is refused too.
    let other = tempfile::tempdir().unwrap();
    pair(other.path(), "x", &["x"]);
    pair(dir.path(), "default", &["sip.example.net"]);
    std::fs::copy(other.path().join("x.key"), dir.path().join("default.key")).unwrap();
    assert!(matches!(acceptor.reload(true), Reload::Failed(_)));
    assert_eq!(served_cert(addr, "sip.example.net").await.0, old);
    let mut alerts = 0;
    EVENTS.with(|rx| {
        let mut rx = rx.borrow_mut();
        let rx = rx.as_mut().unwrap();
        while let Ok(b) = rx.try_recv() {
            alerts += b
                .events
                .iter()
                .filter(|ev| matches!(ev, crate::blocks::Event::Alert { .. }))
                .count();
        }
    });
    assert_eq!(alerts, 2);
}

#[tokio::test]
async fn min_version_1_3_refuses_a_1_2_client() {
    let dir = tempfile::tempdir().unwrap();
    pair(dir.path(), "default", &["sip.example.net"]);
    pair(dir.path(), "pbx", &["pbx.example.com"]);
    let mut cfg = config(dir.path());
    cfg.tls.min_version = TlsVersion::V13;
    let (_a, node, addr, mut accepted) = server(cfg).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("sip.example.net").unwrap();
    assert!(client(&[&rustls::version::TLS12])
        .connect(name, tcp)
        .await
        .is_err());
    let e = accepted.recv().await.unwrap().unwrap_err();
    assert_eq!(e.reason(), TlsFailure::Incompatible, "{e}");
    assert_eq!(node.stats.tls.failures(TlsFailure::Incompatible), 1);
}

#[tokio::test(start_paused = true)]
async fn silent_connections_time_out_over_the_cap_are_refused_and_failures_block() {
    let dir = tempfile::tempdir().unwrap();
    pair(dir.path(), "default", &["sip.example.net"]);
    pair(dir.path(), "pbx", &["pbx.example.com"]);
    let mut cfg = config(dir.path());
    cfg.tls.max_handshakes_per_ip = 2;
    cfg.anomaly.threshold = 5;
    let (acceptor, node, addr, mut accepted) = server(cfg).await;
    // Two connections that never speak hold the two places; the third is refused at once.
    let _a = TcpStream::connect(addr).await.unwrap();
    let _b = TcpStream::connect(addr).await.unwrap();
    while acceptor.in_handshake() < 2 {
        tokio::task::yield_now().await;
    }
    let _c = TcpStream::connect(addr).await.unwrap();
    assert_eq!(
        accepted.recv().await.unwrap().unwrap_err().reason(),
        TlsFailure::Cap
    );
    // The clock is paused: it jumps to the handshake timeout once everything waits.
    for _ in 0..2 {
        let e = accepted.recv().await.unwrap().unwrap_err();
        assert_eq!(e.reason(), TlsFailure::Timeout);
    }
    assert_eq!(acceptor.in_handshake(), 0);
    // Garbage instead of a ClientHello.
    for _ in 0..2 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"OPTIONS sip:x SIP/2.0\r\n\r\n").await.unwrap();
        let e = accepted.recv().await.unwrap().unwrap_err();
        assert_eq!(e.reason(), TlsFailure::Protocol);
    }
    assert_eq!(node.stats.tls.handshakes_failed(), 5);
    let now = node.now();
    let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
    assert!(
        node.with_engine(|e| e.is_blocked(now, peer)),
        "five failures block the source"
    );
}

#[tokio::test]
async fn a_required_client_certificate_that_is_missing_fails_the_handshake() {
    let dir = tempfile::tempdir().unwrap();
    pair(dir.path(), "default", &["sip.example.net"]);
    pair(dir.path(), "pbx", &["pbx.example.com"]);
    pair(dir.path(), "clientca", &["phones.example.net"]);
    let mut cfg = config(dir.path());
    cfg.tls.verify_client = crate::config::VerifyClient::Required;
    cfg.tls.client_ca = path(dir.path(), "clientca.pem");
    let (_a, node, addr, mut accepted) = server(cfg).await;
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("sip.example.net").unwrap();
    // TLS 1.3: the client learns of the refusal only when it reads.
    if let Ok(mut s) = client(&[&rustls::version::TLS13]).connect(name, tcp).await {
        let _ = s.write_all(b"OPTIONS").await;
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
    }
    let e = accepted.recv().await.unwrap().unwrap_err();
    assert_eq!(e.reason(), TlsFailure::ClientCertificate, "{e}");
    assert_eq!(node.stats.tls.failures(TlsFailure::ClientCertificate), 1);
}
