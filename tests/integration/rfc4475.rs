//! RFC 4475 torture messages (`tests/fixtures/rfc4475/*.dat`, bit-exact) through a real
//! sipwarden: valid requests reach the PBX and its answer comes back, requests the RFC wants a
//! proxy to answer get that answer, invalid messages never reach the PBX, and the proxy keeps
//! serving. Each message comes from its own loopback address (anomaly scoring would otherwise
//! block the sender half way through) and over the transport its top Via names.
//!
//! Where sipwarden departs from the RFC's wording, the table says so and why. The common case:
//! for a malformed request the RFC suggests a 400; sipwarden drops it silently and scores the
//! source instead. A security proxy does not answer garbage: an answer reflects traffic towards
//! a spoofed source and tells a scanner what is listening.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use sipwarden::node::Node;
use sipwarden::proxy::{top_via, BRANCH_PREFIX};
use sipwarden::stats::DropReason;
use sipwarden::wire::frame::{next_frame, Frame};
use sipwarden::wire::via::{Via, ViaTransport};
use sipwarden::wire::{parse, split_commas, Framing, HeaderName, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::harness::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Forwarded to the PBX, unchanged but for our edits; the PBX's 200 reaches the phone.
    Forward,
    /// Answered by sipwarden with this status; nothing reaches the PBX.
    Reply(u16),
    /// Dropped: nothing reaches the PBX, nothing comes back.
    Drop,
    /// A response. Sent by a phone it is not ours and is dropped; sent by the PBX with our Via
    /// on top it reaches the phone when `valid`, and is dropped otherwise.
    Response { valid: bool },
}

use Expect::*;

/// (file, RFC section, treatment). Comments give the RFC's words where we differ.
const CASES: &[(&str, &str, Expect)] = &[
    // 3.1.1 Valid messages: parsers must accept them; a proxy forwards them.
    ("wsinv", "3.1.1.1", Forward),
    // The PBX answers 404/501 to the unknown method, as the RFC expects of the far end.
    ("intmeth", "3.1.1.2", Forward),
    ("esc01", "3.1.1.3", Forward),
    ("escnull", "3.1.1.4", Forward),
    ("esc02", "3.1.1.5", Forward),
    ("lwsdisp", "3.1.1.6", Forward),
    ("longreq", "3.1.1.7", Forward),
    // Only the REGISTER is forwarded; the INVITE after it in the datagram is noise.
    ("dblreq", "3.1.1.8", Forward),
    ("semiuri", "3.1.1.9", Forward),
    ("transports", "3.1.1.10", Forward),
    ("mpart01", "3.1.1.11", Forward),
    ("unreason", "3.1.1.12", Response { valid: true }),
    ("noreason", "3.1.1.13", Response { valid: true }),
    // 3.1.2 Invalid messages. RFC: "respond with 400 Bad Request" for most; we drop (see top).
    ("badinv01", "3.1.2.1", Drop),
    ("clerr", "3.1.2.2", Drop),
    ("ncl", "3.1.2.3", Drop),
    ("scalar02", "3.1.2.4", Drop),
    ("scalarlg", "3.1.2.5", Response { valid: false }),
    ("quotbal", "3.1.2.6", Drop),
    ("ltgtruri", "3.1.2.7", Drop),
    ("lwsruri", "3.1.2.8", Drop),
    ("lwsstart", "3.1.2.9", Drop),
    ("trws", "3.1.2.10", Drop),
    // RFC: reject, or strip the headers; forwarding them is forbidden. We reject.
    ("escruri", "3.1.2.11", Drop),
    // RFC: acceptable to reject, "though an element shouldn't do that unless the contents of
    // the Date header field were actually important". Ours does not read Date: forwarded.
    ("baddate", "3.1.2.12", Forward),
    ("regbadct", "3.1.2.13", Drop),
    ("badaspec", "3.1.2.14", Drop),
    ("baddn", "3.1.2.15", Drop),
    // RFC: 505 Version Not Supported. We drop: an unparseable start line gets no answer.
    ("badvers", "3.1.2.16", Drop),
    ("mismatch01", "3.1.2.17", Drop),
    // RFC: 501 (or 400). We drop, as for any CSeq/method mismatch.
    ("mismatch02", "3.1.2.18", Drop),
    ("bigcode", "3.1.2.19", Response { valid: false }),
    // 3.2 Transaction layer. RFC: reject, or fall back to RFC 2543 transaction matching. We
    // forward with a branch derived from the RFC 2543 identifiers.
    ("badbranch", "3.2.1", Forward),
    // 3.3 Application layer.
    ("insuf", "3.3.1", Drop),
    ("unkscm", "3.3.2", Reply(416)),
    // RFC: 416 when the element never accepts the scheme. A PBX routes sip, sips and tel.
    ("novelsc", "3.3.3", Reply(416)),
    // A proxy forwards it; the registrar (the PBX) rejects the non-SIP AOR.
    ("unksm2", "3.3.4", Forward),
    // 420 Bad Extension listing the Proxy-Require tags: we support no proxy extension.
    ("bext01", "3.3.5", Reply(420)),
    ("invut", "3.3.6", Forward),
    ("regaut01", "3.3.7", Forward),
    ("multi01", "3.3.8", Drop),
    ("mcl01", "3.3.9", Drop),
    // A proxy must not send a response to the broadcast address.
    ("bcast", "3.3.10", Response { valid: false }),
    ("zeromf", "3.3.11", Reply(483)),
    ("cparam01", "3.3.12", Forward),
    ("cparam02", "3.3.13", Forward),
    ("regescrt", "3.3.14", Forward),
    ("sdp01", "3.3.15", Forward),
    // 3.4 Backward compatibility: no branch, no From tag, no Max-Forwards, no Content-Length.
    ("inv2543", "3.4.1", Forward),
    // In the archive, described nowhere: a request line without a SIP version.
    ("test", "-", Drop),
];

fn fixture(name: &str) -> Vec<u8> {
    let path = format!(
        "{}/tests/fixtures/rfc4475/{name}.dat",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// What the proxy did with messages, from its counters: every handled message ends in exactly
/// one of these, so waiting for the sum to move is waiting for the verdict, without sleeps
/// tuned to the machine.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    requests: u64,
    responses: u64,
    replies: u64,
    drops: u64,
}

impl Outcome {
    fn of(node: &Node) -> Outcome {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &node.stats;
        Outcome {
            requests: s.requests_forwarded.get(),
            responses: s.responses_forwarded.get(),
            replies: s.replies_sent.load(Relaxed),
            drops: DropReason::ALL.iter().map(|r| s.dropped(*r)).sum(),
        }
    }

    fn total(&self) -> u64 {
        self.requests + self.responses + self.replies + self.drops
    }

    fn minus(&self, o: &Outcome) -> Outcome {
        Outcome {
            requests: self.requests - o.requests,
            responses: self.responses - o.responses,
            replies: self.replies - o.replies,
            drops: self.drops - o.drops,
        }
    }
}

const FORWARDED: Outcome = Outcome {
    requests: 1,
    responses: 0,
    replies: 0,
    drops: 0,
};
const ROUTED: Outcome = Outcome {
    requests: 0,
    responses: 1,
    replies: 0,
    drops: 0,
};
const REPLIED: Outcome = Outcome {
    requests: 0,
    responses: 0,
    replies: 1,
    drops: 0,
};
const DROPPED: Outcome = Outcome {
    requests: 0,
    responses: 0,
    replies: 0,
    drops: 1,
};

/// Wait until the proxy has dealt with one more message than at `before`; return what it did.
async fn verdict(node: &Node, before: Outcome) -> Outcome {
    let deadline = Instant::now() + WAIT;
    loop {
        let now = Outcome::of(node);
        if now.total() > before.total() || Instant::now() > deadline {
            return now.minus(&before);
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// A phone on one loopback address, speaking UDP or TCP.
struct Phone {
    udp: Ua,
    tcp: Option<(TcpStream, Vec<u8>)>,
    ip: String,
}

impl Phone {
    async fn new(ip: &str) -> Phone {
        Phone {
            udp: Ua::bind(ip).await,
            tcp: None,
            ip: ip.to_string(),
        }
    }

    async fn send(&mut self, proxy: &Proxy, tcp: bool, bytes: &[u8]) {
        if !tcp {
            self.udp.sock.send_to(bytes, proxy.udp).await.expect("send");
            return;
        }
        if self.tcp.is_none() {
            let sock = TcpSocket::new_v4().expect("socket");
            sock.bind(format!("{}:0", self.ip).parse().expect("addr"))
                .expect("bind");
            let stream = sock.connect(proxy.tcp).await.expect("connect");
            self.tcp = Some((stream, Vec::new()));
        }
        if let Some((s, _)) = &mut self.tcp {
            s.write_all(bytes).await.expect("write");
        }
    }

    /// The next message for this phone, on the transport it used.
    async fn recv(&mut self, tcp: bool) -> Vec<u8> {
        match (&mut self.tcp, tcp) {
            (Some((stream, buf)), true) => loop {
                if let Ok(Frame::Message(n)) = next_frame(buf, 65536) {
                    return buf.drain(..n).collect();
                }
                let mut chunk = [0u8; 8192];
                let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
                    .await
                    .expect("tcp phone received nothing")
                    .expect("read");
                assert!(n > 0, "connection closed");
                buf.extend_from_slice(&chunk[..n]);
            },
            _ => recv_bytes(&self.udp).await.0,
        }
    }
}

/// Discard whatever a failed case left queued at `ua`.
fn drain(ua: &Ua) {
    let mut buf = vec![0u8; 65536];
    while ua.sock.try_recv_from(&mut buf).is_ok() {}
}

async fn recv_bytes(ua: &Ua) -> (Vec<u8>, SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (n, from) = tokio::time::timeout(WAIT, ua.sock.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{} received nothing", ua.addr))
        .expect("recv");
    buf.truncate(n);
    (buf, from)
}

fn via_elements(m: &Message<'_>) -> Vec<Via> {
    m.all(HeaderName::Via)
        .flat_map(|h| split_commas(h.value.of(m.buf), h.value.start as usize))
        .filter_map(|el| Via::parse(m.buf, el))
        .collect()
}

fn first_line(b: &[u8]) -> &[u8] {
    b.split(|c| *c == b'\n').next().unwrap_or(b"")
}

/// A 200 from the PBX to `req`: its Via, From, To, Call-ID and CSeq lines, verbatim.
fn pbx_ok(req: &Message<'_>) -> Vec<u8> {
    let mut out = b"SIP/2.0 200 OK\r\n".to_vec();
    for h in &req.headers {
        if matches!(
            h.name,
            HeaderName::Via
                | HeaderName::From
                | HeaderName::To
                | HeaderName::CallId
                | HeaderName::CSeq
        ) {
            out.extend_from_slice(h.line.of(req.buf));
        }
    }
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    out
}

/// The torture response as the PBX would send it through us: its Via headers replaced by
/// `vias` (ours on top, then where it goes), everything else byte for byte.
fn as_pbx_response(torture: &[u8], vias: &[&[u8]]) -> Vec<u8> {
    let head_end = torture
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(torture.len(), |i| i + 2);
    let (head, rest) = torture.split_at(head_end);
    let mut lines = head.split_inclusive(|c| *c == b'\n');
    let mut out = lines.next().unwrap_or(b"").to_vec();
    for v in vias {
        out.extend_from_slice(v);
    }
    for l in lines {
        let name = l.split(|c| *c == b':').next().unwrap_or(b"");
        let name = String::from_utf8_lossy(name).trim().to_ascii_lowercase();
        if name != "via" && name != "v" {
            out.extend_from_slice(l);
        }
    }
    out.extend_from_slice(rest);
    out
}

/// The Via header lines of a request the PBX received from us: ours, then the phone's.
fn forwarded_via_lines(fwd: &Message<'_>) -> Vec<Vec<u8>> {
    fwd.all(HeaderName::Via)
        .map(|h| h.line.of(fwd.buf).to_vec())
        .collect()
}

fn check_forwarded(name: &str, orig: &Message<'_>, fwd: &Message<'_>) -> Result<(), String> {
    let err = |what: &str| Err(format!("{name}: {what}"));
    if first_line(fwd.buf) != first_line(orig.framed()) {
        return err("start line changed");
    }
    if fwd.call_id() != orig.call_id() {
        return err("Call-ID changed");
    }
    if via_elements(fwd).len() != via_elements(orig).len() + 1 {
        return err("not exactly one Via more");
    }
    if !top_via(fwd).is_some_and(|v| v.branch(fwd.buf).starts_with(BRANCH_PREFIX)) {
        return err("our Via is not on top");
    }
    if fwd.body.of(fwd.buf) != orig.body.of(orig.buf) {
        return err("body changed");
    }
    let want_mf = match orig.max_forwards() {
        Some(Ok(n)) => n - 1,
        _ => 69,
    };
    if fwd.max_forwards() != Some(Ok(want_mf)) {
        return err(&format!("Max-Forwards is not {want_mf}"));
    }
    if fwd.content_length != Some(fwd.body.len()) {
        return err("Content-Length missing or wrong");
    }
    Ok(())
}

async fn run_case(
    proxy: &Proxy,
    pbx: &Ua,
    i: usize,
    name: &str,
    expect: Expect,
) -> Result<(), String> {
    let node = proxy.node();
    let bytes = fixture(name);
    let parsed = parse(&bytes, Framing::Datagram).ok();
    let tcp = parsed
        .as_ref()
        .and_then(top_via)
        .is_some_and(|v| v.transport == ViaTransport::Tcp);
    let mut phone = Phone::new(&format!("127.44.{}.1", i + 1)).await;

    let before = Outcome::of(&node);
    phone.send(proxy, tcp, &bytes).await;
    let got = verdict(&node, before).await;
    match expect {
        Forward => {
            if got != FORWARDED {
                return Err(format!("{name}: expected forward, got {got:?}"));
            }
            let (seen, _) = recv_bytes(pbx).await;
            let orig = parsed.ok_or(format!("{name}: does not parse"))?;
            let fwd = parse(&seen, Framing::Datagram).map_err(|e| format!("{name}: {e}"))?;
            check_forwarded(name, &orig, &fwd)?;
            if name == "dblreq" && seen.windows(6).any(|w| w == b"INVITE") {
                return Err("dblreq: the trailing INVITE was forwarded".into());
            }
            let before = Outcome::of(&node);
            pbx.sock
                .send_to(&pbx_ok(&fwd), proxy.udp)
                .await
                .expect("send");
            let got = verdict(&node, before).await;
            if got != ROUTED {
                return Err(format!("{name}: the PBX's 200 was not routed: {got:?}"));
            }
            let back = phone.recv(tcp).await;
            let resp = parse(&back, Framing::Datagram).map_err(|e| format!("{name}: {e}"))?;
            if resp.status() != Some(200)
                || resp.call_id() != orig.call_id()
                || via_elements(&resp).len() != via_elements(&orig).len()
            {
                return Err(format!("{name}: bad 200 at the phone"));
            }
        }
        Reply(code) => {
            if got != REPLIED {
                return Err(format!("{name}: expected {code}, got {got:?}"));
            }
            let back = phone.recv(tcp).await;
            let resp = parse(&back, Framing::Datagram).map_err(|e| format!("{name}: {e}"))?;
            let orig = parsed.ok_or(format!("{name}: does not parse"))?;
            if resp.status() != Some(code) || resp.call_id() != orig.call_id() {
                return Err(format!("{name}: expected {code}, got {:?}", resp.status()));
            }
            if code == 420 {
                let unsupported = resp
                    .headers
                    .iter()
                    .map(|h| h.line.of(resp.buf))
                    .find(|l| l.starts_with(b"Unsupported:"))
                    .unwrap_or(b"");
                let u = String::from_utf8_lossy(unsupported);
                if !(u.contains("noProxiesSupportThis") && u.contains("norDoAnyProxiesSupportThis"))
                {
                    return Err(format!("{name}: 420 without the tags: {u}"));
                }
            }
        }
        Drop => {
            if got != DROPPED {
                return Err(format!("{name}: expected drop, got {got:?}"));
            }
        }
        Response { valid } => {
            // From a phone: the top Via is not ours.
            if got != DROPPED {
                return Err(format!("{name}: a phone's stray response was not dropped"));
            }
            // From the PBX, answering a real request of this phone: same Call-ID and CSeq as
            // the torture response (our branch MAC binds them).
            let t = parse(&bytes, Framing::Datagram).ok();
            let call = t
                .as_ref()
                .map(|m| String::from_utf8_lossy(m.call_id()).into_owned())
                .filter(|c| !c.is_empty())
                .unwrap_or_else(|| format!("rfc4475-{name}"));
            let cseq = t.as_ref().and_then(|m| m.cseq()).map_or(1, |c| c.0);
            let req = request(
                "INVITE",
                "sip:2000@pbx.test",
                "UDP 192.168.1.9:5060",
                &format!("z9hG4bK{name}"),
                "1001",
                "2000",
                &call,
                cseq,
                "",
            );
            let sent = Outcome::of(&node);
            phone.send(proxy, false, req.as_bytes()).await;
            let (seen, _) = recv_bytes(pbx).await;
            // The receive loop counts the forward after sending it, on its own thread: wait
            // for the count so it is not taken for the response's.
            verdict(&node, sent).await;
            let fwd = parse(&seen, Framing::Datagram).map_err(|e| format!("{name}: {e}"))?;
            let lines = forwarded_via_lines(&fwd);
            let (ours, phones) = (lines[0].as_slice(), lines[1].as_slice());
            let resp = if name == "bcast" {
                // The torture's second Via (255.255.255.255) is where it would go next.
                let second = bytes
                    .split_inclusive(|c| *c == b'\n')
                    .filter(|l| l.starts_with(b"Via:"))
                    .nth(1)
                    .unwrap_or(b"");
                as_pbx_response(&bytes, &[ours, second])
            } else {
                as_pbx_response(&bytes, &[ours, phones])
            };
            let before = Outcome::of(&node);
            pbx.sock.send_to(&resp, proxy.udp).await.expect("send");
            let got = verdict(&node, before).await;
            match valid {
                true if got == ROUTED => {
                    let back = phone.recv(false).await;
                    if first_line(&back) != first_line(&bytes) {
                        return Err(format!("{name}: status line changed"));
                    }
                    let b = parse(&back, Framing::Datagram).map_err(|e| format!("{name}: {e}"))?;
                    let t = parse(&bytes, Framing::Datagram).map_err(|e| format!("{name}: {e}"))?;
                    if b.body.of(b.buf) != t.body.of(t.buf) {
                        return Err(format!("{name}: body changed"));
                    }
                }
                false if got == DROPPED => {}
                _ => return Err(format!("{name}: from the PBX, got {got:?}")),
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn torture_messages_get_the_treatment_the_rfc_asks() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let mut failures = Vec::new();
    for (i, (name, section, expect)) in CASES.iter().enumerate() {
        drain(&pbx);
        if let Err(e) = run_case(&proxy, &pbx, i, name, *expect).await {
            failures.push(format!("§{section} {e}"));
        }
    }
    // Every file of the archive is in the table.
    let dir = format!("{}/tests/fixtures/rfc4475", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("fixtures")
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|f| f.strip_suffix(".dat").map(str::to_string))
        .collect();
    files.sort();
    let mut named: Vec<String> = CASES.iter().map(|c| c.0.to_string()).collect();
    named.sort();
    assert_eq!(files, named, "fixtures and cases differ");

    // Still serving, and no valid sender was blocked on the way.
    let phone = Ua::bind("127.44.250.1").await;
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        "UDP 192.168.1.9:5060",
        "z9hG4bKalive",
        "1001",
        "1001",
        "rfc4475-alive",
        1,
        "",
    );
    drain(&pbx);
    phone.send(proxy.udp, &reg).await;
    let (seen, _) = pbx.recv().await;
    if !seen.starts_with("REGISTER ") {
        failures.push(format!("not serving any more: {seen}"));
    }
    let node = proxy.node();
    let now = node.now();
    for (i, (name, _, expect)) in CASES.iter().enumerate() {
        let src: SocketAddr = format!("127.44.{}.1:5060", i + 1).parse().expect("addr");
        if matches!(expect, Forward | Reply(_)) && node.with_engine(|e| e.is_blocked(now, src)) {
            failures.push(format!("{name}: sender blocked"));
        }
    }
    proxy.stop().await;
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}
