//! TLS benchmark helper for bench/tls.sh (loopback only, bounded in count and time):
//!   tls_bench handshakes ADDR SECONDS CONCURRENCY   full handshakes (no resumption) per second
//!   tls_bench idle ADDR N SECONDS                   open N TLS connections and hold them idle
//!   tls_bench server ADDR CERT KEY                  a bare tokio-rustls acceptor (the baseline)
//! Run: `cargo run --release --example tls_bench -- handshakes 127.0.0.1:5761 5 16`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// At most this many connections or handshakes in one run, whatever the arguments say.
const MAX: u64 = 2_000_000;

#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for NoVerify {
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

fn connector() -> tokio_rustls::TlsConnector {
    let p = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(p)))
        .with_no_client_auth();
    // Every handshake a full one.
    cfg.resumption = rustls::client::Resumption::disabled();
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

fn name() -> ServerName<'static> {
    ServerName::try_from("sip.bench.test").expect("name")
}

async fn handshakes(addr: SocketAddr, secs: u64, conc: u64) {
    let c = connector();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..conc.clamp(1, 256) {
        let (c, done, failed) = (c.clone(), done.clone(), failed.clone());
        tasks.push(tokio::spawn(async move {
            while Instant::now() < end && done.load(Relaxed) < MAX {
                let r = async {
                    let tcp = TcpStream::connect(addr).await?;
                    let mut s = c.connect(name(), tcp).await?;
                    s.shutdown().await
                };
                match tokio::time::timeout(Duration::from_secs(5), r).await {
                    Ok(Ok(())) => done.fetch_add(1, Relaxed),
                    _ => failed.fetch_add(1, Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let el = t0.elapsed().as_secs_f64();
    let n = done.load(Relaxed);
    println!(
        "handshakes {n} failed {} seconds {el:.2} per_second {:.0}",
        failed.load(Relaxed),
        n as f64 / el
    );
}

async fn idle(addr: SocketAddr, n: u64, secs: u64) {
    let c = connector();
    let mut held = Vec::new();
    let mut failed = 0u64;
    for _ in 0..n.min(MAX) {
        let r = async {
            let tcp = TcpStream::connect(addr).await?;
            c.connect(name(), tcp).await
        };
        match tokio::time::timeout(Duration::from_secs(5), r).await {
            Ok(Ok(s)) => held.push(s),
            _ => failed += 1,
        }
    }
    println!("idle_open {} failed {failed}", held.len());
    tokio::time::sleep(Duration::from_secs(secs.min(600))).await;
    drop(held);
}

async fn server(addr: SocketAddr, cert: &str, key: &str) {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .expect("cert")
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_file(key).expect("key");
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .expect("pair");
    let acc = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let l = TcpListener::bind(addr).await.expect("bind");
    println!("listening {addr}");
    loop {
        let Ok((s, _)) = l.accept().await else {
            continue;
        };
        let acc = acc.clone();
        tokio::spawn(async move {
            if let Ok(Ok(mut t)) = tokio::time::timeout(Duration::from_secs(5), acc.accept(s)).await
            {
                let mut b = [0u8; 1024];
                while matches!(t.read(&mut b).await, Ok(n) if n > 0) {}
            }
        });
    }
}

#[tokio::main]
async fn main() {
    let a: Vec<String> = std::env::args().collect();
    let arg = |i: usize| a.get(i).cloned().unwrap_or_default();
    let num = |i: usize, d: u64| arg(i).parse().unwrap_or(d);
    let addr: SocketAddr = arg(2).parse().unwrap_or_else(|_| {
        eprintln!("usage: tls_bench handshakes|idle|server ADDR ...");
        std::process::exit(2)
    });
    assert!(addr.ip().is_loopback(), "loopback only");
    match arg(1).as_str() {
        "handshakes" => handshakes(addr, num(3, 5).min(60), num(4, 16)).await,
        "idle" => idle(addr, num(3, 1000), num(4, 10)).await,
        "server" => server(addr, &arg(3), &arg(4)).await,
        _ => eprintln!("usage: tls_bench handshakes|idle|server ADDR ..."),
    }
}
