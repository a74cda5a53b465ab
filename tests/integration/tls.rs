//! SIP over TLS through a real sipwarden: a phone registers on TLS to a PBX on UDP, the PBX's
//! INVITE comes back down the phone's own TLS connection, and a block closes it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::{CertificateDer, ServerName};
use sipwarden::blocks::BlockKey;
use sipwarden::config::Config;
use sipwarden::server;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::harness::*;

/// A phone on TLS from 127.0.0.3, trusting the test CA.
struct TlsUa {
    stream: TlsStream<TcpStream>,
    buf: Vec<u8>,
}

impl TlsUa {
    async fn connect(to: SocketAddr, ca: &CertificateDer<'static>) -> TlsUa {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.3:0".parse().unwrap()).unwrap();
        let tcp = sock.connect(to).await.expect("connect");
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("sip.example.test").unwrap(), tcp)
            .await
            .expect("handshake");
        TlsUa {
            stream,
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, msg: &str) {
        self.stream.write_all(msg.as_bytes()).await.expect("write");
    }

    /// One message framed by Content-Length, or `None` when the connection closes.
    async fn recv(&mut self) -> Option<String> {
        loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let cl: usize = header(&head, "Content-Length")
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                if self.buf.len() >= end + 4 + cl {
                    let msg: Vec<u8> = self.buf.drain(..end + 4 + cl).collect();
                    return Some(String::from_utf8_lossy(&msg).into_owned());
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("tls phone received nothing")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

#[tokio::test]
async fn a_tls_phone_registers_gets_its_call_down_its_connection_and_a_block_closes_it() {
    let pbx = Ua::bind("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["sip.example.test".to_string()]).unwrap();
    let (cert, key) = (dir.path().join("c.pem"), dir.path().join("c.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();

    let mut cfg = Config::default();
    cfg.sip.listen_udp = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.sip.listen_tcp = vec![];
    cfg.sip.listen_tls = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.tls.certificate = cert.display().to_string();
    cfg.tls.private_key = key.display().to_string();
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.upstream.address = pbx.addr.to_string();
    cfg.state.path = dir.path().join("state.db").display().to_string();
    let cfg = cfg.validate().unwrap();
    let bound = server::bind(&cfg).await.unwrap();
    let tls_addr = bound.tls[0].local_addr().unwrap();
    let udp = bound.udp[0].local_addr().unwrap();
    let running = server::start(cfg, None, bound).await.unwrap();
    let node = running.node.clone();

    let mut phone = TlsUa::connect(tls_addr, ck.cert.der()).await;
    let reg = request(
        "REGISTER",
        "sips:pbx.test",
        "TLS 10.0.0.9:5061",
        "z9hG4bKtlsreg",
        "1004",
        "1004",
        "tls-reg",
        1,
        "Contact: <sip:1004@10.0.0.9:5061;transport=tls>\r\n",
    );
    phone.send(&reg).await;
    let (seen, from) = pbx.recv().await;
    let path = header(&seen, "Path").expect("Path added").to_string();
    assert!(path.contains(";lr"), "{path}");
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    let ok = phone.recv().await.expect("200");
    assert!(first_line(&ok).starts_with("SIP/2.0 200"), "{ok}");
    assert!(vias(&ok)[0].contains("TLS 10.0.0.9:5061"), "{ok}");

    // The PBX calls the phone: the INVITE goes down the TLS connection, and our Record-Route
    // facing the phone names TLS.
    let invite = format!(
        "INVITE sip:1004@10.0.0.9:5061;transport=tls SIP/2.0\r\nVia: SIP/2.0/UDP {p};branch=z9hG4bKtlsinv\r\n\
Route: {path}\r\nRecord-Route: <sip:{p};lr>\r\nMax-Forwards: 70\r\nFrom: <sip:1002@pbx.test>;tag=p1\r\n\
To: <sip:1004@pbx.test>\r\nCall-ID: tls-inv\r\nCSeq: 1 INVITE\r\nContact: <sip:1002@{p}>\r\n\
Content-Length: 0\r\n\r\n",
        p = pbx.addr
    );
    pbx.send(udp, &invite).await;
    let got = phone.recv().await.expect("INVITE on the TLS connection");
    assert!(first_line(&got).starts_with("INVITE"), "{got}");
    assert!(vias(&got)[0].contains("SIP/2.0/TLS"), "{got}");
    let rr = headers(&got, "Record-Route");
    assert!(rr.iter().any(|r| r.contains("transport=tls")), "{rr:?}");
    assert!(
        node.stats
            .tls
            .handshakes_ok
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 1
    );

    // Block the phone's address: its silent connection is closed within the next sweep.
    let now = node.now();
    node.with_engine(|e| {
        e.manual_block(
            now,
            BlockKey::whole("127.0.0.3/32".parse().unwrap()),
            None,
            "test",
        )
    })
    .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), phone.recv()).await;
    assert!(
        matches!(closed, Ok(None)),
        "connection still open: {closed:?}"
    );
    assert_eq!(
        node.stats
            .conns_closed_blocked
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    running.shutdown().await;
}
