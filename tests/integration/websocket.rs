//! SIP over WebSocket (RFC 7118) with a tokio-tungstenite client: registration, the PBX's call
//! down the client's own connection, the `sip` subprotocol, frame limits, and upgrade failures
//! scored until the source is blocked and its open connection closed.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use sipwarden::stats::WsOutcome;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::harness::*;

type Ws = WebSocketStream<TcpStream>;

async fn ws_connect(addr: SocketAddr, protocol: Option<&str>) -> Result<Ws, WsError> {
    ws_connect_from("127.0.0.1", addr, protocol).await
}

/// Connect from the loopback address `ip` (the PBX's own address is never blocked).
async fn ws_connect_from(
    ip: &str,
    addr: SocketAddr,
    protocol: Option<&str>,
) -> Result<Ws, WsError> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(WsError::Io)?;
    sock.bind(format!("{ip}:0").parse().unwrap())
        .map_err(WsError::Io)?;
    let stream = sock.connect(addr).await.map_err(WsError::Io)?;
    let mut req = format!("ws://{addr}/").into_client_request()?;
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().unwrap());
    }
    let (ws, resp) = tokio_tungstenite::client_async(req, stream).await?;
    assert_eq!(
        resp.headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap()),
        protocol.map(|_| "sip")
    );
    Ok(ws)
}

/// The next SIP message on the connection (text frame), within [`WAIT`].
async fn ws_recv(ws: &mut Ws) -> String {
    loop {
        let m = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("a message in time")
            .expect("connection open")
            .expect("no error");
        match m {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// Wait (bounded) until the server closes the connection.
async fn closed(ws: &mut Ws) -> bool {
    for _ in 0..50 {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Err(_) => return false,
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return true,
            Ok(Some(Ok(_))) => continue,
        }
    }
    false
}

fn ws_proxy_cfg(c: &mut sipwarden::config::Config) {
    c.sip.listen_ws = vec!["127.0.0.1:0".parse().unwrap()];
}

#[tokio::test]
async fn a_websocket_client_registers_and_gets_its_calls_down_its_own_connection() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, ws_proxy_cfg).await;
    let mut ws = ws_connect(proxy.ws.unwrap(), Some("sip")).await.unwrap();
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        "WS df7jal23ls0d.invalid",
        "z9hG4bKwsreg",
        "1001",
        "1001",
        "ws-reg",
        1,
        "Contact: <sip:k3l9@df7jal23ls0d.invalid;transport=ws>;+sip.ice;reg-id=1\r\n",
    );
    ws.send(Message::text(reg)).await.unwrap();
    let (seen, from) = pbx.recv().await;
    let v = vias(&seen);
    assert!(v[0].starts_with("SIP/2.0/UDP 127.0.0.1:"), "{seen}");
    assert!(
        v[1].starts_with("SIP/2.0/WS df7jal23ls0d.invalid"),
        "{seen}"
    );
    assert!(v[1].contains("received=127.0.0.1"), "{seen}");
    let path = header(&seen, "Path").expect("Path").to_string();
    // The token names the WebSocket flow (`w`), the Path faces the PBX (UDP).
    assert!(path.starts_with("<sip:sww"), "{path}");
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    let ok = ws_recv(&mut ws).await;
    assert!(first_line(&ok).starts_with("SIP/2.0 200"), "{ok}");
    assert_eq!(vias(&ok).len(), 1, "our Via popped: {ok}");

    // The PBX calls the client: Request-URI its Contact (a host that does not exist), Route
    // the Path. The INVITE must come down the client's connection.
    let invite = format!(
        "INVITE sip:k3l9@df7jal23ls0d.invalid;transport=ws SIP/2.0\r\n\
Via: SIP/2.0/UDP {pbx};branch=z9hG4bKpbxinv\r\nRoute: {path}\r\nMax-Forwards: 70\r\n\
From: <sip:1002@pbx.test>;tag=p1\r\nTo: <sip:1001@pbx.test>\r\nCall-ID: ws-call\r\n\
CSeq: 1 INVITE\r\nContact: <sip:1002@{pbx}>\r\nContent-Length: 0\r\n\r\n",
        pbx = pbx.addr
    );
    pbx.send(proxy.udp, &invite).await;
    let got = ws_recv(&mut ws).await;
    assert!(
        first_line(&got).starts_with("INVITE sip:k3l9@df7jal23ls0d.invalid"),
        "{got}"
    );
    assert!(vias(&got)[0].starts_with("SIP/2.0/WS 127.0.0.1:"), "{got}");
    // Double Record-Route: the entry facing the client says transport=ws.
    let rr = headers(&got, "Record-Route");
    assert_eq!(rr.len(), 2, "{got}");
    assert!(rr.iter().any(|r| r.contains(";transport=ws")), "{got}");
    assert!(rr.iter().all(|r| r.contains("<sip:sww")), "{got}");
    assert!(header(&got, "Route").is_none(), "our Route popped: {got}");
    ws.send(Message::text(respond(&got, 200, "OK", "")))
        .await
        .unwrap();
    let (answer, _) = pbx.recv().await;
    assert!(first_line(&answer).starts_with("SIP/2.0 200"), "{answer}");
    assert_eq!(vias(&answer).len(), 1, "{answer}");

    let s = &proxy.node().stats;
    assert_eq!(s.ws.upgrades(WsOutcome::Ok), 1);
    assert_eq!(s.ws.open.load(Relaxed), 1);
    drop(ws);
    // The gauge goes down when the client leaves (bounded wait, no timing asserted).
    for _ in 0..100 {
        if s.ws.open.load(Relaxed) == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(s.ws.open.load(Relaxed), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_client_without_the_sip_subprotocol_is_refused_and_counted() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, ws_proxy_cfg).await;
    match ws_connect(proxy.ws.unwrap(), None).await {
        Err(WsError::Http(resp)) => {
            assert_eq!(resp.status(), 400);
            let body =
                String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default()).to_string();
            assert!(body.contains("\"sip\" subprotocol"), "{body}");
        }
        other => panic!("expected a 400, got {:?}", other.map(|_| ())),
    }
    let s = &proxy.node().stats;
    assert_eq!(s.ws.upgrades(WsOutcome::NoSubprotocol), 1);
    assert_eq!(s.ws.upgrades(WsOutcome::Ok), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn an_oversized_frame_closes_the_connection() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |c| {
        ws_proxy_cfg(c);
        c.websocket.max_frame_bytes = c.sip.max_message_bytes;
    })
    .await;
    let mut ws = ws_connect(proxy.ws.unwrap(), Some("sip")).await.unwrap();
    let big = "x".repeat(proxy.node().config().websocket.max_frame_bytes + 1);
    let _ = ws.send(Message::text(big)).await;
    assert!(closed(&mut ws).await, "connection closed");
    let s = &proxy.node().stats;
    assert_eq!(s.ws.oversized.load(Relaxed), 1);
    assert!(pbx.silent(100).await, "nothing forwarded");
    proxy.stop().await;
}

#[tokio::test]
async fn upgrade_failures_block_the_source_and_close_its_open_connection() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, ws_proxy_cfg).await;
    let addr = proxy.ws.unwrap();
    let bad = "127.0.0.4";
    let mut open = ws_connect_from(bad, addr, Some("sip")).await.unwrap();
    let mut good = ws_connect_from("127.0.0.2", addr, Some("sip"))
        .await
        .unwrap();
    let threshold = proxy.node().config().anomaly.threshold;
    for _ in 0..threshold {
        assert!(ws_connect_from(bad, addr, Some("chat")).await.is_err());
    }
    let node = proxy.node();
    let now = node.now();
    assert!(node.with_engine(|e| e.is_blocked(now, "127.0.0.4:1".parse().unwrap())));
    // The open connection is closed by the block; a new one gets no upgrade.
    assert!(
        closed(&mut open).await,
        "open connection closed by the block"
    );
    assert!(ws_connect_from(bad, addr, Some("sip")).await.is_err());
    // Another address is untouched.
    good.send(Message::text(request(
        "OPTIONS",
        "sip:pbx.test",
        "WS good.invalid",
        "z9hG4bKgood",
        "1001",
        "1001",
        "ws-good",
        1,
        "",
    )))
    .await
    .unwrap();
    let (opt, _) = pbx.recv().await;
    assert!(first_line(&opt).starts_with("OPTIONS"), "{opt}");
    let s = &node.stats;
    assert_eq!(s.ws.upgrades(WsOutcome::NoSubprotocol), threshold as u64);
    assert!(s.ws.upgrades(WsOutcome::Blocked) >= 1);
    proxy.stop().await;
}

/// A self-signed certificate for `localhost` (written to `dir`) and a TLS client trusting it.
fn tls_pair(dir: &std::path::Path) -> (String, String, tokio_rustls::TlsConnector) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join("wss.pem"), dir.join("wss.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ck.cert.der().clone()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    (
        cert.display().to_string(),
        key.display().to_string(),
        tokio_rustls::TlsConnector::from(Arc::new(cfg)),
    )
}

async fn tls_connect(
    c: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    c.connect(name, tcp).await.unwrap()
}

#[tokio::test]
async fn tls_and_wss_share_one_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, connector) = tls_pair(dir.path());
    // One address in both lists: it must be a fixed port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |c| {
        c.sip.listen_tls = vec![port];
        c.sip.listen_wss = vec![port];
        c.tls.certificate = cert;
        c.tls.private_key = key;
    })
    .await;

    // A WebRTC client: TLS, then the upgrade.
    let tls = tls_connect(&connector, port).await;
    let mut req = format!("wss://localhost:{}/", port.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "sip".parse().unwrap());
    let (mut wss, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        "WSS abc.invalid",
        "z9hG4bKwssreg",
        "1001",
        "1001",
        "wss-reg",
        1,
        "Contact: <sip:u1@abc.invalid;transport=ws>\r\n",
    );
    wss.send(Message::text(reg)).await.unwrap();
    let (seen, from) = pbx.recv().await;
    assert!(
        vias(&seen)[1].starts_with("SIP/2.0/WSS abc.invalid"),
        "{seen}"
    );
    assert!(
        header(&seen, "Path").unwrap().starts_with("<sip:swx"),
        "{seen}"
    );
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    let ok = match tokio::time::timeout(WAIT, wss.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
        other => panic!("{other:?}"),
    };
    assert!(first_line(&ok).starts_with("SIP/2.0 200"), "{ok}");

    // A desk phone: SIP over TLS on the same port.
    let mut phone = tls_connect(&connector, port).await;
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        "TLS 10.0.0.7:5061",
        "z9hG4bKtlsreg",
        "1002",
        "1002",
        "tls-reg",
        1,
        "Contact: <sip:1002@10.0.0.7:5061;transport=tls>\r\n",
    );
    phone.write_all(reg.as_bytes()).await.unwrap();
    let (seen, from) = pbx.recv().await;
    assert!(vias(&seen)[1].starts_with("SIP/2.0/TLS 10.0.0.7"), "{seen}");
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(WAIT, phone.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let ok = String::from_utf8_lossy(&buf[..n]).to_string();
    assert!(first_line(&ok).starts_with("SIP/2.0 200"), "{ok}");

    let s = &proxy.node().stats;
    assert_eq!(s.ws.upgrades(WsOutcome::Ok), 1);
    assert_eq!(s.tls.handshakes_ok.load(Relaxed), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn wss_on_a_port_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, connector) = tls_pair(dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |c| {
        c.sip.listen_wss = vec![port];
        c.tls.certificate = cert;
        c.tls.private_key = key;
    })
    .await;
    let tls = tls_connect(&connector, port).await;
    let mut req = format!("wss://localhost:{}/", port.port())
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "sip".parse().unwrap());
    let (mut wss, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let opt = request(
        "OPTIONS",
        "sip:pbx.test",
        "WSS own.invalid",
        "z9hG4bKwssown",
        "1001",
        "1001",
        "wss-own",
        1,
        "",
    );
    wss.send(Message::text(opt)).await.unwrap();
    let (seen, from) = pbx.recv().await;
    assert!(
        vias(&seen)[1].starts_with("SIP/2.0/WSS own.invalid"),
        "{seen}"
    );
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    let ok = ws_recv_tls(&mut wss).await;
    assert!(first_line(&ok).starts_with("SIP/2.0 200"), "{ok}");
    assert_eq!(proxy.node().stats.ws.upgrades(WsOutcome::Ok), 1);
    proxy.stop().await;
}

async fn ws_recv_tls(
    ws: &mut WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>,
) -> String {
    loop {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => return t.to_string(),
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            other => panic!("{other:?}"),
        }
    }
}
