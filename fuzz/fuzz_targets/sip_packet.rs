//! The whole packet path on arbitrary bytes, sans I/O: pre-check, parse, engine verdict,
//! router. Not only "no panic": whatever the router forwards must itself parse and be the same
//! message (method or status, Call-ID, body) with exactly one Via more (a request) or one fewer
//! (a response), and every header the router has no reason to edit byte for byte as it was;
//! whatever it answers must be a response to it; and a message that parses as a datagram must
//! come out of the TCP framer whole and identical.
//!
//! Input: one flags byte (bit 0: sent by the PBX, bit 1: over TCP, bit 2: contact mode, bit 3:
//! round trip, bits 4-5: NAT detection mode), then the message.
//!
//! Tokens we mint are hard to guess, so the input may name them: `$TOK` / `$TKT` become a valid
//! UDP / TCP flow token for the phone, `$SWC` a valid contact-mode `swc=` value, `$OWN` our
//! own address (`192.0.2.10:5060`). `fuzz/sip.dict` lists them with every header name and
//! parameter we read. Oracles on top of the ones above: nothing is ever sent to one of our own
//! sockets, and a request from the PBX goes only to a flow we minted or to the IP literal its
//! Request-URI names.
//!
//! Round trip (bit 3, a phone's request): the router forwards it, then the PBX's answer built
//! from what the PBX received (its Via lines, Call-ID, CSeq, From, To) must verify, go back to
//! exactly the phone, and carry the request's credentials fingerprint.

#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use sipwarden::blocks::GateVerdict;
use sipwarden::config::{Config, IncomingMode, NatDetection};
use sipwarden::engine::{Engine, Seen, Trust, Verdict, What};
use sipwarden::proxy::{
    credentials_fingerprint, flow, Action, Advertised, Flow, Inbound, Keys, Router, RouterConfig,
};
use sipwarden::stats::Transport;
use sipwarden::wire::frame::{next_frame, Frame};
use sipwarden::wire::scan::MAX_HEADERS;
use sipwarden::wire::{parse, split_commas, Edits, Framing, HeaderName, Message, ParseError};

const NOW: u64 = 1_700_000_000_000;
const MAX: usize = 65_536;
const PBX: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1)), 5080);
const PHONE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)), 5062);

fn engine() -> Engine {
    let mut cfg = Config::default();
    cfg.upstream.address = PBX.to_string();
    // Small tables: a fresh engine per input must be cheap.
    cfg.protection.tracked_sources = 64;
    cfg.protection.max_blocks = 64;
    // Building the scanner automaton dominates a fresh engine: keep one pattern.
    cfg.scanners.user_agents = vec!["friendly-scanner".into()];
    let e = Engine::new(&cfg, NOW);
    e.set_upstream(vec![PBX.ip()]);
    e
}

const OWN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)), 5060);

fn keys() -> Keys {
    Keys::new([7; 16], Some([9; 16]))
}

fn router(incoming: IncomingMode, nat: NatDetection, upstream: Transport) -> Router {
    let me = Advertised::new("192.0.2.10", 5060);
    let cfg = RouterConfig {
        udp: Some(me.clone()),
        tcp: Some(me.clone()),
        tls: Some(me.clone()),
        ws: Some(me.clone()),
        wss: Some(me.clone()),
        aliases: vec![me],
        incoming,
        nat,
        keys: keys(),
        sockets: vec![
            (Transport::Udp, OWN),
            (Transport::Tcp, OWN),
            (Transport::Tls, OWN),
            (Transport::Ws, OWN),
            (Transport::Wss, OWN),
        ],
    };
    Router::new(
        cfg,
        Flow {
            transport: upstream,
            addr: PBX,
        },
    )
}

/// The flows our placeholders name.
fn minted() -> [Flow; 2] {
    [
        Flow {
            transport: Transport::Udp,
            addr: PHONE,
        },
        Flow {
            transport: Transport::Tcp,
            addr: PHONE,
        },
    ]
}

/// Replace the placeholders with tokens minted by the real key.
fn substitute(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if memchr_dollar(bytes).is_none() {
        return std::borrow::Cow::Borrowed(bytes);
    }
    let k = keys();
    let [u, t] = minted();
    let tok = flow::to_string(&k, &u);
    let tkt = flow::to_string(&k, &t);
    let swc = format!("swc={tok}.c2lwOjEwMDFAMTkyLjE2OC4xLjUwOjUwNjA");
    let mut out = Vec::with_capacity(bytes.len() + 64);
    let mut i = 0;
    while i < bytes.len() {
        let rest = &bytes[i..];
        let (rep, n): (&[u8], usize) = if rest.starts_with(b"$TOK") {
            (tok.as_bytes(), 4)
        } else if rest.starts_with(b"$TKT") {
            (tkt.as_bytes(), 4)
        } else if rest.starts_with(b"$SWC") {
            (swc.as_bytes(), 4)
        } else if rest.starts_with(b"$OWN") {
            (b"192.0.2.10:5060", 4)
        } else {
            (&rest[..1], 1)
        };
        out.extend_from_slice(rep);
        i += n;
    }
    std::borrow::Cow::Owned(out)
}

fn memchr_dollar(b: &[u8]) -> Option<usize> {
    b.iter().position(|c| *c == b'$')
}

/// The PBX's answer to the request it received from us: its Vias, From, To, Call-ID, CSeq.
fn pbx_answer(fwd: &Message<'_>, code: u16) -> Vec<u8> {
    let mut out = format!("SIP/2.0 {code} Fuzz\r\n").into_bytes();
    for h in &fwd.headers {
        let name: &[u8] = match h.name {
            HeaderName::Via => b"Via",
            HeaderName::From => b"From",
            HeaderName::To => b"To",
            HeaderName::CallId => b"Call-ID",
            HeaderName::CSeq => b"CSeq",
            _ => continue,
        };
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        out.extend_from_slice(h.value.of(fwd.buf));
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"Content-Length: 0\r\n\r\n");
    out
}

/// Via elements, parseable or not, in all Via headers.
fn vias(m: &Message<'_>) -> usize {
    m.all(HeaderName::Via)
        .map(|h| split_commas(h.value.of(m.buf), h.value.start as usize).count())
        .sum()
}

/// The header lines the router has no business touching, in order.
fn untouched<'a>(m: &Message<'a>, edited: &[HeaderName]) -> Vec<&'a [u8]> {
    m.headers
        .iter()
        .filter(|h| !edited.contains(&h.name))
        .map(|h| h.line.of(m.buf))
        .collect()
}

/// Headers the router may add to a request: Via, Max-Forwards, two Record-Route, Path,
/// Content-Length. A message already near the scanner's header limit may go over it.
const ADDED: usize = 6;

fn check_forwarded_request(orig: &Message<'_>, out: &[u8], from_upstream: bool) {
    let fwd = match parse(out, Framing::Datagram) {
        Ok(m) => m,
        Err(ParseError::TooManyHeaders) if orig.headers.len() + ADDED > MAX_HEADERS => return,
        Err(e) => panic!("forwarded request does not parse: {e}\n{}", show(out)),
    };
    assert!(fwd.is_request(), "forwarded request became a response");
    assert_eq!(fwd.method_bytes(), orig.method_bytes(), "method changed");
    if !from_upstream {
        // From a phone the Request-URI is never touched (from the PBX, contact mode restores it).
        let (a, b) = (orig.request_uri(), fwd.request_uri());
        assert_eq!(
            a.map(|s| s.of(orig.buf)),
            b.map(|s| s.of(fwd.buf)),
            "Request-URI changed"
        );
    }
    assert_eq!(fwd.call_id(), orig.call_id(), "Call-ID changed");
    assert_eq!(
        vias(&fwd),
        vias(orig) + 1,
        "not exactly one Via more:\n{}\n----\n{}",
        show(orig.framed()),
        show(out)
    );
    assert_eq!(fwd.body.of(out), orig.body.of(orig.buf), "body changed");
    assert_eq!(fwd.content_length, Some(fwd.body.len()), "Content-Length");
    use HeaderName::*;
    let edited = [
        Via,
        MaxForwards,
        Route,
        RecordRoute,
        Path,
        Contact,
        ContentLength,
    ];
    assert_eq!(
        untouched(&fwd, &edited),
        untouched(orig, &edited),
        "other headers changed"
    );
    let mf = match orig.max_forwards() {
        Some(Ok(n)) => n.saturating_sub(1),
        _ => 69,
    };
    assert_eq!(fwd.max_forwards(), Some(Ok(mf)), "Max-Forwards");
}

fn check_forwarded_response(orig: &Message<'_>, out: &[u8]) {
    let fwd = match parse(out, Framing::Datagram) {
        Ok(m) => m,
        Err(ParseError::TooManyHeaders) if orig.headers.len() + 1 > MAX_HEADERS => return,
        Err(e) => panic!("forwarded response does not parse: {e}\n{}", show(out)),
    };
    assert_eq!(fwd.status(), orig.status(), "status changed");
    assert_eq!(fwd.call_id(), orig.call_id(), "Call-ID changed");
    assert_eq!(
        vias(&fwd) + 1,
        vias(orig),
        "not exactly one Via fewer:\n{}\n----\n{}",
        show(orig.framed()),
        show(out)
    );
    assert_eq!(fwd.body.of(out), orig.body.of(orig.buf), "body changed");
    assert_eq!(fwd.content_length, Some(fwd.body.len()), "Content-Length");
    let edited = [
        HeaderName::Via,
        HeaderName::Contact,
        HeaderName::ContentLength,
    ];
    assert_eq!(
        untouched(&fwd, &edited),
        untouched(orig, &edited),
        "other headers changed"
    );
}

fn check_reply(orig: &Message<'_>, out: &[u8]) {
    let r = match parse(out, Framing::Datagram) {
        Ok(m) => m,
        Err(e) => panic!("our reply does not parse: {e}\n{}", show(out)),
    };
    assert!(
        matches!(r.status(), Some(403 | 416 | 420 | 430 | 482 | 483 | 503)),
        "unexpected reply {:?}",
        r.status()
    );
    assert_eq!(r.call_id(), orig.call_id(), "reply Call-ID");
    assert_eq!(vias(&r), vias(orig), "reply Vias");
}

/// A message that parses as a datagram, sent on a TCP stream, is framed whole: the framer skips
/// the leading CRLFs the scanner skips and cuts exactly the bytes the scanner used.
fn check_framing(m: &Message<'_>) {
    let framed = m.framed();
    // On a stream, Content-Length is mandatory.
    if m.content_length.is_none() || framed.len() > MAX {
        return;
    }
    let mut pos = 0;
    let len = loop {
        match next_frame(&framed[pos..], MAX) {
            Ok(Frame::Ping(n)) | Ok(Frame::Skip(n)) => pos += n,
            Ok(Frame::Message(n)) => break n,
            other => panic!("datagram not framed on TCP: {other:?}\n{}", show(framed)),
        }
    };
    assert_eq!(pos + len, framed.len(), "framed length");
    let s = match parse(&framed[pos..], Framing::Stream) {
        Ok(s) => s,
        Err(e) => panic!("framed message does not parse: {e}"),
    };
    assert_eq!(s.headers.len(), m.headers.len(), "header count");
    for (a, b) in s.headers.iter().zip(m.headers.iter()) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.value.of(s.buf), b.value.of(m.buf));
    }
    assert_eq!(s.body.of(s.buf), m.body.of(m.buf), "body");
}

fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(&b[..b.len().min(2000)]).into_owned()
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, raw)) = data.split_first() else {
        return;
    };
    let subst = substitute(raw);
    let bytes: &[u8] = &subst;
    let from_upstream = flags & 1 != 0;
    // Bits 1 and 6-7 pick the transport the packet arrived on: UDP, TCP, and (bit 6) their
    // secure and WebSocket cousins.
    let transport = match (flags & 2 != 0, flags & 0x40 != 0, flags & 0x80 != 0) {
        (false, false, _) => Transport::Udp,
        (true, false, _) => Transport::Tcp,
        (true, true, _) => Transport::Tls,
        (false, true, false) => Transport::Ws,
        (false, true, true) => Transport::Wss,
    };
    // The PBX is reached over UDP, TCP or TLS, never a WebSocket: its packets arrive over UDP
    // when a WebSocket transport was picked.
    let transport = match transport {
        Transport::Ws | Transport::Wss if from_upstream => Transport::Udp,
        t => t,
    };
    let incoming = if flags & 4 != 0 {
        IncomingMode::Contact
    } else {
        IncomingMode::Path
    };
    let round_trip = flags & 8 != 0 && !from_upstream;
    let nat = match (flags >> 4) & 3 {
        1 => NatDetection::AlwaysFlow,
        2 => NatDetection::Never,
        _ => NatDetection::Auto,
    };
    let src = if from_upstream { PBX } else { PHONE };
    let inb = Inbound { transport, src };
    let engine = engine();
    let upstream = match transport {
        Transport::Ws | Transport::Wss => Transport::Udp,
        t => t,
    };
    let router = router(incoming, nat, upstream);
    assert_eq!(router.is_upstream(&inb), from_upstream);
    assert!(!router.is_own_socket(&inb));
    // As the pipeline runs it: the gate first, then one engine entry after parse and route.
    let trust = if from_upstream {
        Trust::Upstream
    } else {
        match engine.gate().check(NOW, src) {
            GateVerdict::Blocked { .. } => return,
            GateVerdict::Whitelisted => Trust::Whitelisted,
            GateVerdict::Inspect => Trust::Inspect,
        }
    };
    let seen = |what| Seen {
        transport,
        src,
        trust,
        what,
    };

    if let Ok(d) = parse(bytes, Framing::Datagram) {
        check_framing(&d);
        let again = parse(d.framed(), Framing::Datagram).expect("framed bytes parse again");
        assert_eq!(again.headers.len(), d.headers.len());
    }

    // As the handler frames them: a WebSocket message is one frame, like a datagram.
    let framing = match transport {
        Transport::Udp | Transport::Ws | Transport::Wss => Framing::Datagram,
        Transport::Tcp | Transport::Tls => Framing::Stream,
    };
    let msg = match parse(bytes, framing) {
        Ok(m) => m,
        Err(err) => {
            engine.inspect(NOW, seen(What::Unparsed { err, bytes }));
            return;
        }
    };
    let (mut edits, mut out) = (Edits::new(), Vec::new());
    if msg.is_request() {
        let our_dialog = trust == Trust::Inspect && router.is_our_dialog(&msg);
        let action = router.route_request(&inb, &msg, from_upstream, &mut edits, &mut out);
        let forged = action == Action::Drop(sipwarden::stats::DropReason::Forged);
        match engine.inspect(
            NOW,
            seen(What::Request {
                msg: &msg,
                our_dialog,
                forged,
            }),
        ) {
            Verdict::Forward => {}
            Verdict::Drop(_) => return,
            Verdict::Reply { code, reason, .. } => {
                if let Action::Reply { to } = router.reply(&inb, &msg, code, reason, "", &mut out) {
                    assert_eq!(to.addr, src);
                    check_reply(&msg, &out);
                }
                return;
            }
        }
        match action {
            Action::Forward { to, .. } => {
                assert!(!router.is_self(to), "forwarded to ourselves: {to:?}");
                check_forwarded_request(&msg, &out, from_upstream);
                if from_upstream && !minted().contains(&to) {
                    // Not a flow we minted: only the IP literal the PBX's Request-URI names
                    // (as received: the forwarded copy may not parse again when our edits
                    // take it over the header limit), compared as an address, not as text.
                    let named = msg
                        .request_uri()
                        .and_then(|s| sipwarden::wire::uri::Uri::parse(msg.buf, s))
                        .and_then(|u| sipwarden::proxy::host_ip(u.host.of(msg.buf)));
                    assert_eq!(
                        named.map(sipwarden::blocks::canonical_ip),
                        Some(sipwarden::blocks::canonical_ip(to.addr.ip())),
                        "routed to {to:?}, not named by the Request-URI"
                    );
                }
                if round_trip && transport == Transport::Udp {
                    round_trip_answer(&router, &msg, &out, &engine);
                }
            }
            Action::Reply { to } | Action::FlowFailed { to } => {
                assert_eq!(to.addr, src);
                check_reply(&msg, &out);
            }
            Action::Drop(_) => {}
        }
    } else {
        let (action, info) = router.route_response(&inb, &msg, from_upstream, &mut edits, &mut out);
        assert!(info.is_none() || from_upstream);
        let to = match action {
            Action::Forward { to, .. } => Some((to.transport, to.addr)),
            _ => None,
        };
        let verdict = engine.inspect(
            NOW,
            seen(What::Response {
                msg: &msg,
                answer: info.map(|i| (i.phone, i.attempt)),
                to,
                forged: action == Action::Drop(sipwarden::stats::DropReason::Forged),
            }),
        );
        if let (Action::Forward { to, .. }, Verdict::Forward) = (action, verdict) {
            assert!(!router.is_self(to), "response sent to ourselves");
            check_forwarded_response(&msg, &out);
            assert!(!to.addr.ip().is_unspecified() && to.addr.port() != 0);
        }
    }
});

/// The PBX answers what it received from us: the answer must verify and go back to exactly
/// the phone, with the request's credentials fingerprint.
fn round_trip_answer(router: &Router, req: &Message<'_>, fwd_bytes: &[u8], engine: &Engine) {
    let Ok(fwd) = parse(fwd_bytes, Framing::Datagram) else {
        return;
    };
    let answer = pbx_answer(&fwd, 403);
    let Ok(resp) = parse(&answer, Framing::Datagram) else {
        return;
    };
    let pbx = Inbound {
        transport: Transport::Udp,
        src: PBX,
    };
    let (mut edits, mut out) = (Edits::new(), Vec::new());
    let (action, info) = router.route_response(&pbx, &resp, true, &mut edits, &mut out);
    // The phone's own Via must be one we can route back to (UDP or TCP, parseable).
    let phone_via = sipwarden::proxy::top_via(req);
    let routable = phone_via.is_some_and(|v| {
        matches!(
            v.transport,
            sipwarden::wire::via::ViaTransport::Udp | sipwarden::wire::via::ViaTransport::Tcp
        )
    });
    if !routable || req.cseq().is_none() {
        return;
    }
    match action {
        Action::Forward { to, .. } => assert_eq!(to.addr, PHONE, "answer went elsewhere"),
        other => panic!(
            "the PBX's answer to our own request was not routed: {other:?}\n{}",
            show(&answer)
        ),
    }
    let info = info.expect("answer info");
    assert_eq!(info.phone, PHONE);
    assert_eq!(
        info.attempt,
        credentials_fingerprint(req),
        "attempt fingerprint"
    );
    let seen = Seen {
        transport: Transport::Udp,
        src: PBX,
        trust: Trust::Upstream,
        what: What::Response {
            msg: &resp,
            answer: Some((info.phone, info.attempt)),
            to: Some((Transport::Udp, PHONE)),
            forged: false,
        },
    };
    assert_eq!(engine.inspect(NOW, seen), Verdict::Forward);
}
