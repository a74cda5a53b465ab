//! Stateless proxying (RFC 3261 §16.11, RFC 3581), sans-I/O: given a parsed message and where it
//! came from, decide where it goes and splice the edits (Via, Max-Forwards, Record-Route, Path,
//! Contact) into the original bytes.
//!
//! Requests from phones always go to the upstream PBX. Requests from the PBX find the phone by
//! a flow token in our Route entry (Path / Record-Route), by a rewritten Contact (`contact`
//! mode), or by the Request-URI. Responses follow the Via chain.

mod contact;
pub mod flow;
mod route;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};

use crate::config::IncomingMode;
use crate::stats::{DropReason, Transport};
use crate::util::keyed_hash64;
use crate::wire::uri::{NameAddr, Uri};
use crate::wire::via::{Rport, Via, ViaTransport};
use crate::wire::{reply, split_commas, Edits, HeaderName, Message, Method, Span};

pub use flow::Flow;

/// Branches we mint start with this; the next byte says whether the request had credentials.
pub const BRANCH_PREFIX: &[u8] = b"z9hG4bKsw";

/// How we name ourselves on one transport: `host:port` as written into headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Advertised {
    pub host: String,
    pub port: u16,
}

impl Advertised {
    pub fn new(host: &str, port: u16) -> Self {
        let host = match host.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
            _ => host.to_string(),
        };
        Self { host, port }
    }
}

#[derive(Debug, Clone)]
pub struct RouterConfig {
    pub udp: Option<Advertised>,
    pub tcp: Option<Advertised>,
    /// Other names we answer to (listen IPs), for recognising our own Route entries.
    pub aliases: Vec<Advertised>,
    pub incoming: IncomingMode,
    /// Key for flow tokens and branches.
    pub key: [u8; 16],
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    pub transport: Transport,
    pub src: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the output buffer to `to`.
    Forward {
        to: Flow,
    },
    /// Send the output buffer (a response we generated) back to `to`.
    Reply {
        to: Flow,
    },
    Drop(DropReason),
}

/// What a response from the PBX says about a phone's request, for the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerInfo {
    pub phone: SocketAddr,
    pub had_credentials: bool,
}

pub struct Router {
    cfg: RouterConfig,
    upstream: Flow,
}

impl Router {
    pub fn new(cfg: RouterConfig, upstream: Flow) -> Self {
        Self { cfg, upstream }
    }

    pub fn set_upstream(&mut self, upstream: Flow) {
        self.upstream = upstream;
    }

    pub fn upstream(&self) -> Flow {
        self.upstream
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    fn advertised(&self, t: Transport) -> &Advertised {
        let (first, other) = match t {
            Transport::Udp => (&self.cfg.udp, &self.cfg.tcp),
            Transport::Tcp => (&self.cfg.tcp, &self.cfg.udp),
        };
        // At least one listener exists (config validation); fall back to the other transport.
        first
            .as_ref()
            .or(other.as_ref())
            .unwrap_or(&self.cfg.aliases[0])
    }

    /// Is `host:port` one of our addresses?
    pub fn is_ours(&self, host: &[u8], port: Option<u16>) -> bool {
        let port = port.unwrap_or(5060);
        self.cfg
            .udp
            .iter()
            .chain(self.cfg.tcp.iter())
            .chain(self.cfg.aliases.iter())
            .any(|a| a.port == port && host.eq_ignore_ascii_case(a.host.as_bytes()))
    }

    /// Build a response of ours to `msg` into `out`.
    pub fn reply(
        &self,
        inb: &Inbound,
        msg: &Message<'_>,
        code: u16,
        reason: &str,
        extra: &str,
        out: &mut Vec<u8>,
    ) -> Action {
        if reply::build(msg, code, reason, extra, out) {
            Action::Reply {
                to: Flow {
                    transport: inb.transport,
                    addr: inb.src,
                },
            }
        } else {
            Action::Drop(DropReason::Loop)
        }
    }

    /// Route a request. `from_upstream`: sent by the PBX (towards a phone).
    pub fn route_request(
        &self,
        inb: &Inbound,
        msg: &Message<'_>,
        from_upstream: bool,
        edits: &mut Edits,
        out: &mut Vec<u8>,
    ) -> Action {
        edits.clear();
        let buf = msg.buf;
        let method = msg.method().unwrap_or(Method::Other);
        let Some(top) = top_via(msg) else {
            return Action::Drop(DropReason::Malformed);
        };

        // URI scheme (§16.3 step 2): what a PBX can route.
        let scheme_ok = msg.request_uri().is_some_and(|s| {
            let u = s.of(buf);
            let scheme = &u[..memchr::memchr(b':', u).unwrap_or(0)];
            [&b"sip"[..], b"sips", b"tel"]
                .iter()
                .any(|k| scheme.eq_ignore_ascii_case(k))
        });
        if !scheme_ok {
            return self.reply(inb, msg, 416, "Unsupported URI Scheme", "", out);
        }

        // Max-Forwards (RFC 3261 §16.6 step 3).
        match (msg.header(HeaderName::MaxForwards), msg.max_forwards()) {
            (Some(_), Some(Ok(0))) => {
                return self.reply(inb, msg, 483, "Too Many Hops", "", out);
            }
            (Some(h), Some(Ok(n))) => edits.replace_fmt(h.value, format_args!("{}", n - 1)),
            (Some(h), _) => edits.replace(h.value, b"69"),
            (None, _) => edits.insert(msg.headers_end, b"Max-Forwards: 69\r\n"),
        }

        // Loop detection (§16.3 step 4): our Via already carrying this request's loop hash.
        if self.looped(msg, self.loop_hash(msg, 0)) {
            return self.reply(inb, msg, 482, "Loop Detected", "", out);
        }

        // Proxy-Require (§16.3 step 5): we support no proxy extension.
        if msg.has(HeaderName::ProxyRequire) {
            let mut unsupported = String::from("Unsupported: ");
            let tags = msg.all(HeaderName::ProxyRequire).flat_map(|h| {
                split_commas(h.value.of(buf), h.value.start as usize)
                    .map(|t| String::from_utf8_lossy(t.of(buf)).into_owned())
            });
            for (i, t) in tags.enumerate() {
                if i > 0 {
                    unsupported.push_str(", ");
                }
                unsupported.push_str(&t);
            }
            unsupported.push_str("\r\n");
            return self.reply(inb, msg, 420, "Bad Extension", &unsupported, out);
        }

        // received / rport on the sender's Via (§18.2.1, RFC 3581; rport always filled).
        self.stamp_via(buf, &top, inb.src, edits);

        // Our own Route entries: pop them, learning the flow token they carry.
        let popped = route::pop_ours(self, msg, edits);
        // The loop part of our branch covers the Route set as we forward it.
        let loop_hash = self.loop_hash(msg, popped.count);

        let ruri = msg.request_uri().and_then(|s| Uri::parse(buf, s));
        let dest = if from_upstream {
            let mut dest = popped.flow;
            if let Some(u) = ruri {
                if let Some((flow, original)) = contact::decode_uri(&self.cfg.key, buf, &u) {
                    dest = dest.or(Some(flow));
                    edits.replace(u.whole, &original);
                }
            }
            match dest.or_else(|| ruri.and_then(|u| uri_flow(buf, &u))) {
                Some(d) => d,
                None => return Action::Drop(DropReason::NoRoute),
            }
        } else {
            self.upstream
        };

        // Our Via on top, with a deterministic branch (§16.11).
        let mut tx = [0u8; 8];
        tx.copy_from_slice(&self.tx_hash(buf, &top, msg).to_be_bytes());
        let creds = if msg.has_credentials() { 'a' } else { 'n' };
        let via_at = msg
            .header(HeaderName::Via)
            .map_or(msg.headers_end, |h| h.line.start as usize);
        let me = self.advertised(dest.transport);
        edits.insert_fmt(
            via_at,
            format_args!(
                "Via: SIP/2.0/{} {}:{};branch=z9hG4bKsw{creds}{:016x}.{:08x};rport\r\n",
                via_proto(dest.transport),
                me.host,
                me.port,
                u64::from_be_bytes(tx),
                loop_hash
            ),
        );

        let phone = if from_upstream {
            dest
        } else {
            Flow {
                transport: inb.transport,
                addr: inb.src,
            }
        };

        // Record-Route on dialog-creating requests outside a dialog.
        if method.creates_dialog() && !has_to_tag(msg) {
            route::record_route(self, msg, inb.transport, dest.transport, &phone, edits);
        }

        if !from_upstream && method == Method::Register && self.cfg.incoming == IncomingMode::Path {
            route::add_path(self, msg, &phone, edits);
        }
        if !from_upstream
            && self.cfg.incoming == IncomingMode::Contact
            && (method == Method::Register || method.creates_dialog())
        {
            contact::rewrite(self, msg, &phone, edits);
        }
        finish(msg, edits, out);
        Action::Forward { to: dest }
    }

    /// Route a response by its Via chain. Returns what it says about a phone's request when it
    /// comes from the PBX.
    pub fn route_response(
        &self,
        inb: &Inbound,
        msg: &Message<'_>,
        from_upstream: bool,
        edits: &mut Edits,
        out: &mut Vec<u8>,
    ) -> (Action, Option<AnswerInfo>) {
        edits.clear();
        let buf = msg.buf;
        // A response whose CSeq cannot be read matches no transaction (RFC 4475 §3.1.2.5).
        if msg.cseq().is_none() {
            return (Action::Drop(DropReason::Malformed), None);
        }
        let mut vias = msg.all(HeaderName::Via).flat_map(|h| {
            split_commas(h.value.of(buf), h.value.start as usize).map(move |e| (h, e))
        });
        let Some((top_h, top_el)) = vias.next() else {
            return (Action::Drop(DropReason::Malformed), None);
        };
        let Some(top) = Via::parse(buf, top_el) else {
            return (Action::Drop(DropReason::Malformed), None);
        };
        let branch = top.branch(buf);
        if !branch.starts_with(BRANCH_PREFIX) || !self.is_ours(top.host.of(buf), top.port) {
            return (Action::Drop(DropReason::NotOurs), None);
        }
        let had_credentials = branch.get(BRANCH_PREFIX.len()) == Some(&b'a');
        let Some((_, next_el)) = vias.next() else {
            return (Action::Drop(DropReason::NoRoute), None);
        };
        let Some(next) = Via::parse(buf, next_el) else {
            return (Action::Drop(DropReason::Malformed), None);
        };
        // Pop our Via: the whole line, or our element and its comma.
        if top_h.value.start == top_el.start && next_el.start > top_h.value.end {
            edits.delete(top_h.line);
        } else {
            edits.delete(Span::new(top_el.start as usize, next_el.start as usize));
        }
        let Some(to) = via_destination(buf, &next) else {
            return (Action::Drop(DropReason::NoRoute), None);
        };

        let is_register = msg.cseq().is_some_and(|(_, m)| m == b"REGISTER");
        if self.cfg.incoming == IncomingMode::Contact {
            if from_upstream && is_register {
                contact::restore(self, msg, edits);
            } else if !from_upstream {
                let code = msg.status().unwrap_or(0);
                let dialog = msg
                    .cseq()
                    .is_some_and(|(_, m)| Method::parse(m).creates_dialog());
                if dialog && (101..300).contains(&code) {
                    let phone = Flow {
                        transport: inb.transport,
                        addr: inb.src,
                    };
                    contact::rewrite(self, msg, &phone, edits);
                }
            }
        }
        finish(msg, edits, out);
        let info = from_upstream.then_some(AnswerInfo {
            phone: to.addr,
            had_credentials,
        });
        (Action::Forward { to }, info)
    }

    fn stamp_via(&self, buf: &[u8], top: &Via, src: SocketAddr, edits: &mut Edits) {
        let ip = crate::blocks::canonical_ip(src.ip());
        let end = top.element.end as usize;
        match top.rport {
            Rport::Empty(name) => {
                edits.insert_fmt(name.end as usize, format_args!("={}", src.port()))
            }
            Rport::Value(v, _) => edits.replace_fmt(v, format_args!("{}", src.port())),
            Rport::Absent => edits.insert_fmt(end, format_args!(";rport={}", src.port())),
        }
        // After rport: an empty `;rport` at the very end takes its value at the same offset.
        match top.received {
            Some(r) => edits.replace_fmt(r, format_args!("{ip}")),
            None => edits.insert_fmt(end, format_args!(";received={ip}")),
        }
        let _ = buf;
    }

    /// The transaction part of our branch: the same for a request, its retransmissions, its
    /// CANCEL and its non-2xx ACK (all share the sender's branch), different otherwise.
    fn tx_hash(&self, buf: &[u8], top: &Via, msg: &Message<'_>) -> u64 {
        let branch = top.branch(buf);
        let sent_by = top.host.of(buf);
        let port = top.port.unwrap_or(0).to_be_bytes();
        // The magic cookie alone identifies nothing (RFC 4475 §3.2.1): fall back to RFC 2543.
        if branch.len() > b"z9hG4bK".len() && branch.starts_with(b"z9hG4bK") {
            keyed_hash64(&self.cfg.key, &[branch, sent_by, &port])
        } else {
            // RFC 2543 peers: no unique branch; use the transaction's identifying headers.
            let ruri = msg.request_uri().map_or(&b""[..], |s| s.of(buf));
            let cseq = msg.cseq().map_or(0, |c| c.0).to_be_bytes();
            keyed_hash64(
                &self.cfg.key,
                &[
                    branch,
                    sent_by,
                    &port,
                    ruri,
                    msg.call_id(),
                    &cseq,
                    from_tag(msg),
                ],
            )
        }
    }

    /// The loop part of our branch: what stays the same if the request comes back unchanged.
    ///
    /// The Route set is part of it (§16.6 step 8), without the first `skip` entries (ours,
    /// popped when forwarding): a request that spirals through us twice (phone -> us -> PBX ->
    /// us -> phone) differs only there, and a spiral is not a loop; a request that comes back
    /// with the Route set we sent it with is. CANCEL and the ACK of a non-2xx carry the
    /// INVITE's Route set, so they still get the INVITE's branch.
    fn loop_hash(&self, msg: &Message<'_>, skip: usize) -> u32 {
        use std::hash::Hasher;
        let ruri = msg.request_uri().map_or(&b""[..], |s| s.of(msg.buf));
        let cseq = msg.cseq().map_or(0, |c| c.0).to_be_bytes();
        let mut h = siphasher::sip::SipHasher13::new_with_key(&self.cfg.key);
        for part in [ruri, msg.call_id(), &cseq, from_tag(msg)] {
            h.write(part);
            h.write_u8(0xff);
        }
        let routes = msg
            .all(HeaderName::Route)
            .flat_map(|r| split_commas(r.value.of(msg.buf), r.value.start as usize))
            .skip(skip);
        for r in routes {
            h.write(r.of(msg.buf));
            h.write_u8(0xfe);
        }
        h.finish() as u32
    }

    fn looped(&self, msg: &Message<'_>, loop_hash: u32) -> bool {
        let buf = msg.buf;
        let mut want = [0u8; 8];
        let hex = format_hex8(loop_hash, &mut want);
        msg.all(HeaderName::Via)
            .flat_map(|h| split_commas(h.value.of(buf), h.value.start as usize))
            .filter_map(|el| Via::parse(buf, el))
            .any(|v| {
                let b = v.branch(buf);
                b.starts_with(BRANCH_PREFIX)
                    && b.ends_with(hex)
                    && self.is_ours(v.host.of(buf), v.port)
            })
    }
}

/// Apply the edits into `out`, adding a Content-Length when the sender left it out (a UDP
/// message may; a TCP hop needs it).
fn finish(msg: &Message<'_>, edits: &mut Edits, out: &mut Vec<u8>) {
    if msg.content_length.is_none() {
        edits.insert_fmt(
            msg.headers_end,
            format_args!("Content-Length: {}\r\n", msg.body.len()),
        );
    }
    edits.apply(msg.framed(), out);
}

fn format_hex8(v: u32, out: &mut [u8; 8]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (i, o) in out.iter_mut().enumerate() {
        *o = HEX[((v >> (28 - 4 * i)) & 0xf) as usize];
    }
    &out[..]
}

fn via_proto(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "UDP",
        Transport::Tcp => "TCP",
    }
}

/// The first element of the first Via.
pub fn top_via(msg: &Message<'_>) -> Option<Via> {
    let h = msg.header(HeaderName::Via)?;
    let el = split_commas(h.value.of(msg.buf), h.value.start as usize).next()?;
    Via::parse(msg.buf, el)
}

fn from_tag<'a>(msg: &Message<'a>) -> &'a [u8] {
    msg.header(HeaderName::From)
        .and_then(|h| NameAddr::parse(msg.buf, h.value))
        .and_then(|n| n.tag(msg.buf))
        .unwrap_or(b"")
}

fn has_to_tag(msg: &Message<'_>) -> bool {
    msg.header(HeaderName::To)
        .and_then(|h| NameAddr::parse(msg.buf, h.value))
        .and_then(|n| n.tag(msg.buf))
        .is_some()
}

/// Parse a host that must be an IP literal (brackets allowed).
pub fn host_ip(host: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(host).ok()?;
    s.trim_start_matches('[').trim_end_matches(']').parse().ok()
}

/// Where a response goes: `received` (or the sent-by IP) and `rport` (or the sent-by port).
fn via_destination(buf: &[u8], v: &Via) -> Option<Flow> {
    let ip = match v.received {
        Some(r) => host_ip(r.of(buf))?,
        None => host_ip(v.host.of(buf))?,
    };
    let port = match v.rport {
        Rport::Value(_, Some(p)) => p,
        _ => v.port.unwrap_or(5060),
    };
    // Never a broadcast, multicast or unspecified address, nor port 0 (RFC 4475 §3.3.10: a
    // response must not become a way to reach every host on a network).
    let unicast = match ip {
        IpAddr::V4(a) => !(a.is_broadcast() || a.is_multicast() || a.is_unspecified()),
        IpAddr::V6(a) => !(a.is_multicast() || a.is_unspecified()),
    };
    if !unicast || port == 0 {
        return None;
    }
    let transport = match v.transport {
        ViaTransport::Tcp => Transport::Tcp,
        ViaTransport::Udp => Transport::Udp,
        _ => return None,
    };
    Some(Flow {
        transport,
        addr: SocketAddr::new(ip, port),
    })
}

/// A Request-URI that names an IP directly (a phone reachable without NAT help).
fn uri_flow(buf: &[u8], u: &Uri) -> Option<Flow> {
    let ip = host_ip(u.host.of(buf))?;
    let transport = match u.param(buf, b"transport").flatten().map(|s| s.of(buf)) {
        Some(t) if t.eq_ignore_ascii_case(b"tcp") => Transport::Tcp,
        Some(t) if t.eq_ignore_ascii_case(b"udp") => Transport::Udp,
        None => Transport::Udp,
        Some(_) => return None,
    };
    Some(Flow {
        transport,
        addr: SocketAddr::new(ip, u.port.unwrap_or(5060)),
    })
}
