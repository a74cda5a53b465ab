//! In-process phones and a PBX speaking raw SIP to a real sipwarden on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use sipwarden::config::Config;
use sipwarden::node::Node;
use sipwarden::server::{self, Running};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

pub const WAIT: Duration = Duration::from_secs(3);

pub struct Proxy {
    pub udp: SocketAddr,
    /// The IPv6 UDP listener, when the config has one.
    pub udp6: Option<SocketAddr>,
    pub tcp: SocketAddr,
    /// The plain WebSocket listener, when the config has one.
    pub ws: Option<SocketAddr>,
    pub running: Option<Running>,
    pub _dir: tempfile::TempDir,
}

impl Proxy {
    pub fn node(&self) -> Arc<Node> {
        self.running
            .as_ref()
            .map(|r| r.node.clone())
            .expect("running")
    }

    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// Start sipwarden on 127.0.0.1 (random ports) in front of `pbx`.
pub async fn start(pbx: SocketAddr, tune: impl FnOnce(&mut Config)) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::default();
    cfg.sip.listen_udp = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.sip.listen_tcp = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.upstream.address = pbx.to_string();
    cfg.state.path = dir.path().join("state.db").display().to_string();
    tune(&mut cfg);
    let cfg = cfg.validate().expect("valid test config");
    let bound = server::bind(&cfg).await.expect("bind");
    let udp = bound.udp[0].local_addr().unwrap();
    let udp6 = bound
        .udp
        .iter()
        .filter_map(|s| s.local_addr().ok())
        .find(|a| a.is_ipv6());
    let tcp = bound.tcp[0].local_addr().unwrap();
    let ws = bound.ws.first().and_then(|l| l.local_addr().ok());
    let running = server::start(cfg, None, bound).await.expect("start");
    Proxy {
        udp,
        udp6,
        tcp,
        ws,
        running: Some(running),
        _dir: dir,
    }
}

/// A UDP endpoint: a phone or the PBX.
pub struct Ua {
    pub sock: UdpSocket,
    pub addr: SocketAddr,
}

impl Ua {
    pub async fn bind(ip: &str) -> Ua {
        let sock = UdpSocket::bind(format!("{ip}:0")).await.expect("bind ua");
        let addr = sock.local_addr().unwrap();
        Ua { sock, addr }
    }

    pub async fn send(&self, to: SocketAddr, msg: &str) {
        self.sock.send_to(msg.as_bytes(), to).await.expect("send");
    }

    pub async fn recv(&self) -> (String, SocketAddr) {
        let mut buf = vec![0u8; 65536];
        let (n, from) = tokio::time::timeout(WAIT, self.sock.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("{} received nothing", self.addr))
            .expect("recv");
        (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
    }

    /// Nothing arrives within `ms`.
    pub async fn silent(&self, ms: u64) -> bool {
        let mut buf = vec![0u8; 65536];
        tokio::time::timeout(Duration::from_millis(ms), self.sock.recv_from(&mut buf))
            .await
            .is_err()
    }
}

/// A phone on TCP.
pub struct TcpUa {
    pub stream: TcpStream,
    pub addr: SocketAddr,
    buf: Vec<u8>,
}

impl TcpUa {
    pub async fn connect(to: SocketAddr) -> TcpUa {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.3:0".parse().unwrap()).unwrap();
        let stream = sock.connect(to).await.expect("connect");
        let addr = stream.local_addr().unwrap();
        TcpUa {
            stream,
            addr,
            buf: Vec::new(),
        }
    }

    pub async fn send(&mut self, msg: &str) {
        self.stream.write_all(msg.as_bytes()).await.expect("write");
    }

    /// One whole message, framed by Content-Length.
    pub async fn recv(&mut self) -> String {
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let cl: usize = header(&head, "Content-Length")
                    .or_else(|| header(&head, "l"))
                    .and_then(|v| v.trim().parse().ok())
                    .unwrap_or(0);
                let total = end + 4 + cl;
                if self.buf.len() >= total {
                    let msg: Vec<u8> = self.buf.drain(..total).collect();
                    return String::from_utf8_lossy(&msg).into_owned();
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("tcp phone received nothing")
                .expect("read");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

fn find(h: &[u8], n: &[u8]) -> Option<usize> {
    h.windows(n.len()).position(|w| w == n)
}

/// The first value of header `name` (case-insensitive, long form only unless asked).
pub fn header<'a>(msg: &'a str, name: &str) -> Option<&'a str> {
    headers(msg, name).into_iter().next()
}

pub fn headers<'a>(msg: &'a str, name: &str) -> Vec<&'a str> {
    let head = msg.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
        .map(|(_, v)| v.trim())
        .collect()
}

pub fn first_line(msg: &str) -> &str {
    msg.split("\r\n").next().unwrap_or("")
}

/// All Via values, top first, one per element.
pub fn vias(msg: &str) -> Vec<String> {
    headers(msg, "Via")
        .into_iter()
        .flat_map(|v| v.split(',').map(|s| s.trim().to_string()))
        .collect()
}

pub fn branch(via: &str) -> &str {
    via.split(';')
        .find_map(|p| p.trim().strip_prefix("branch="))
        .unwrap_or("")
}

/// Build a response to `req`: its Vias, From, To (tagged), Call-ID, CSeq, Record-Route, plus
/// `extra` header lines.
pub fn respond(req: &str, code: u16, reason: &str, extra: &str) -> String {
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for v in headers(req, "Via") {
        out += &format!("Via: {v}\r\n");
    }
    for rr in headers(req, "Record-Route") {
        out += &format!("Record-Route: {rr}\r\n");
    }
    let to = header(req, "To").unwrap_or("");
    let to = if to.contains("tag=") {
        to.to_string()
    } else {
        format!("{to};tag=resp{code}")
    };
    out += &format!(
        "From: {}\r\nTo: {to}\r\nCall-ID: {}\r\nCSeq: {}\r\n{extra}Content-Length: 0\r\n\r\n",
        header(req, "From").unwrap_or(""),
        header(req, "Call-ID").unwrap_or(""),
        header(req, "CSeq").unwrap_or(""),
    );
    out
}

/// A request from a phone at `via_host` (what the phone believes its address is).
#[allow(clippy::too_many_arguments)]
pub fn request(
    method: &str,
    ruri: &str,
    via: &str,
    branch: &str,
    from_user: &str,
    to_user: &str,
    call_id: &str,
    cseq: u32,
    extra: &str,
) -> String {
    format!(
        "{method} {ruri} SIP/2.0\r\n\
Via: SIP/2.0/{via};branch={branch};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:{from_user}@pbx.test>;tag=f{call_id}\r\n\
To: <sip:{to_user}@pbx.test>\r\n\
Call-ID: {call_id}\r\n\
CSeq: {cseq} {method}\r\n\
User-Agent: TestPhone/1.0\r\n\
{extra}Content-Length: 0\r\n\r\n"
    )
}
