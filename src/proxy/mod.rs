//! Stateless proxying (RFC 3261 §16.11, RFC 3581), sans-I/O: given a parsed message and where it
//! came from, decide where it goes and splice the edits (Via, Max-Forwards, Record-Route, Path,
//! Contact) into the original bytes.
//!
//! Requests from phones always go to the upstream PBX. Requests from the PBX find the phone by
//! a flow token in our Route entry (Path / Record-Route), by a rewritten Contact (`contact`
//! mode), or by the Request-URI; a token that does not verify is answered 430 Flow Failed, never
//! routed to what the Request-URI names. Responses follow the Via chain, but only through a Via
//! of ours whose branch MAC verifies (see [`branch`]): a response we did not cause goes nowhere.
//!
//! Trust is bound to the flow, not the IP: only packets from the configured upstream (transport,
//! address, port) are the PBX's; and nothing from or to one of our own sockets is ever handled.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

pub mod branch;
mod contact;
pub mod flow;
pub mod keys;
pub mod nat;
mod route;
#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};

use crate::config::{IncomingMode, NatDetection};
use crate::stats::{DropReason, Transport};
use crate::util::hash64;
use crate::wire::edit::{push_dec, push_ip};
use crate::wire::uri::{NameAddr, Uri};
use crate::wire::via::{Rport, Via, ViaTransport};
use crate::wire::{reply, split_commas, Edits, HeaderName, Message, Method, Span};

use branch::{Binding, Branch};
pub use flow::Flow;
pub use keys::Keys;
pub use nat::Target;

/// Branches we mint start with this.
pub const BRANCH_PREFIX: &[u8] = branch::MARK;

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
    /// Our WebSocket listeners (`sip.listen_ws`, `sip.listen_wss`), named in the Record-Route
    /// entry that faces a WebSocket client. Also in `aliases`, so Route entries naming them
    /// are recognised as ours.
    pub ws: Option<Advertised>,
    pub wss: Option<Advertised>,
    pub tls: Option<Advertised>,
    /// Other names we answer to (listen IPs), for recognising our own Route entries.
    pub aliases: Vec<Advertised>,
    pub incoming: IncomingMode,
    pub nat: NatDetection,
    /// Keys for flow tokens and branches.
    pub keys: Keys,
    /// The sockets we listen on: a packet from one of them is our own coming back, and we
    /// never send to one.
    pub sockets: Vec<(Transport, SocketAddr)>,
}

/// Where a message came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inbound {
    pub transport: Transport,
    pub src: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Send the output buffer to `to`. `target`: the NAT decision made for the sender, when
    /// this message minted a flow token (for the debug log).
    Forward {
        to: Flow,
        target: Option<Target>,
    },
    /// Send the output buffer (a response we generated) back to `to`.
    Reply {
        to: Flow,
    },
    /// Send the output buffer (our 430 Flow Failed) back to the PBX at `to`.
    FlowFailed {
        to: Flow,
    },
    Drop(DropReason),
}

/// What a response from the PBX says about a phone's request, for the engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerInfo {
    pub phone: SocketAddr,
    /// The fingerprint of the credentials the request carried (`None`: it carried none).
    pub attempt: Option<u64>,
}

impl AnswerInfo {
    pub fn had_credentials(&self) -> bool {
        self.attempt.is_some()
    }
}

#[derive(Clone)]
pub struct Router {
    cfg: RouterConfig,
    /// Where requests from phones go.
    upstream: Flow,
    /// Every resolved address of the PBX (for trust); `upstream` is the first.
    upstreams: Vec<SocketAddr>,
    /// What we call ourselves if the config named no listener at all (validation prevents it).
    fallback: Advertised,
}

impl Router {
    pub fn new(cfg: RouterConfig, upstream: Flow) -> Self {
        Self {
            cfg,
            upstream,
            upstreams: vec![upstream.addr],
            fallback: Advertised::new("127.0.0.1", 5060),
        }
    }

    pub fn set_upstream(&mut self, upstream: Flow) {
        self.set_upstreams(upstream, &[upstream.addr]);
    }

    /// The PBX: where phones' requests go, and every address it may send from.
    pub fn set_upstreams(&mut self, upstream: Flow, all: &[SocketAddr]) {
        self.upstream = upstream;
        self.upstreams = all.iter().map(|a| canonical(*a)).collect();
        if !self.upstreams.contains(&canonical(upstream.addr)) {
            self.upstreams.push(canonical(upstream.addr));
        }
    }

    /// Is this packet the PBX's? Bound to the flow: over UDP the exact (address, port) the PBX
    /// is configured at; over TCP (when the upstream transport is TCP) a connection from the
    /// PBX's address, since a TCP source cannot be spoofed and the PBX opens its own
    /// connections from ephemeral ports. Never a packet from one of our own sockets.
    pub fn is_upstream(&self, inb: &Inbound) -> bool {
        if inb.transport != self.upstream.transport || self.is_own_socket(inb) {
            return false;
        }
        let src = canonical(inb.src);
        match inb.transport {
            Transport::Udp => self.upstreams.contains(&src),
            Transport::Tcp | Transport::Tls => self.upstreams.iter().any(|a| a.ip() == src.ip()),
            // The PBX is never reached over a WebSocket.
            Transport::Ws | Transport::Wss => false,
        }
    }

    /// Did this packet come from one of our own listening sockets (a message we sent to
    /// ourselves, bounced by a forged Via or Contact)?
    pub fn is_own_socket(&self, inb: &Inbound) -> bool {
        inb.transport == Transport::Udp
            && self.is_self(Flow {
                transport: Transport::Udp,
                addr: inb.src,
            })
    }

    /// Is `to` one of our own sockets? Then sending there would talk to ourselves.
    pub fn is_self(&self, to: Flow) -> bool {
        let to_ip = crate::blocks::canonical_ip(to.addr.ip());
        self.cfg.sockets.iter().any(|(t, a)| {
            *t == to.transport
                && a.port() == to.addr.port()
                && (crate::blocks::canonical_ip(a.ip()) == to_ip
                    || (a.ip().is_unspecified()
                        && a.is_ipv4() == to_ip.is_ipv4()
                        && (to_ip.is_loopback() || self.is_local_ip(to_ip))))
        })
    }

    /// A Contact naming one of our sockets or the PBX is no way to reach a phone: requests for
    /// it would come back to us or go to the PBX itself (a loop an attacker could start).
    fn not_a_phone(&self, a: SocketAddr) -> bool {
        self.is_self(Flow {
            transport: Transport::Udp,
            addr: a,
        }) || self.upstreams.contains(&canonical(a))
    }

    /// One of the addresses we advertise (the host's own addresses as far as we know them).
    fn is_local_ip(&self, ip: IpAddr) -> bool {
        self.cfg
            .udp
            .iter()
            .chain(self.cfg.tcp.iter())
            .chain(self.cfg.tls.iter())
            .chain(self.cfg.aliases.iter())
            .any(|a| host_ip(a.host.as_bytes()).map(crate::blocks::canonical_ip) == Some(ip))
    }

    pub fn upstream(&self) -> Flow {
        self.upstream
    }

    pub fn config(&self) -> &RouterConfig {
        &self.cfg
    }

    fn advertised(&self, t: Transport) -> &Advertised {
        let (first, other, third) = match t {
            Transport::Udp => (&self.cfg.udp, &self.cfg.tcp, &self.cfg.tls),
            Transport::Tcp => (&self.cfg.tcp, &self.cfg.udp, &self.cfg.tls),
            Transport::Tls => (&self.cfg.tls, &self.cfg.tcp, &self.cfg.udp),
            Transport::Ws => (&self.cfg.ws, &self.cfg.wss, &self.cfg.tcp),
            Transport::Wss => (&self.cfg.wss, &self.cfg.ws, &self.cfg.tls),
        };
        // At least one listener exists (config validation); fall back to another transport.
        first
            .as_ref()
            .or(other.as_ref())
            .or(third.as_ref())
            .or(self.cfg.udp.as_ref())
            .or(self.cfg.aliases.first())
            .unwrap_or(&self.fallback)
    }

    /// Is `host:port` one of our addresses?
    pub fn is_ours(&self, host: &[u8], port: Option<u16>) -> bool {
        let port = port.unwrap_or(5060);
        self.cfg
            .udp
            .iter()
            .chain(self.cfg.tcp.iter())
            .chain(self.cfg.tls.iter())
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
        // A sender's own Via naming us with our branch mark: a forgery (a request we sent never
        // reaches us again without another hop's Via on top, and our own sockets' packets are
        // dropped before this). Forwarded, it would make the PBX's answer look like a bounce.
        if top.branch(buf).starts_with(BRANCH_PREFIX) && self.is_ours(top.host.of(buf), top.port) {
            return Action::Drop(DropReason::Forged);
        }

        // URI scheme (§16.3 step 2): what a PBX can route.
        let scheme_ok = msg.request_uri().is_some_and(|s| {
            let u = s.of(buf);
            let scheme = u.split(|b| *b == b':').next().unwrap_or(b"");
            u.contains(&b':')
                && [&b"sip"[..], b"sips", b"tel"]
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
            (Some(h), Some(Ok(n))) => {
                edits.replace_with(h.value, |w| push_dec(w, u64::from(n) - 1))
            }
            (Some(h), _) => edits.replace(h.value, b"69"),
            (None, _) => edits.insert(msg.headers_end, b"Max-Forwards: 69\r\n"),
        }

        // Loop detection (§16.3 step 4): our Via already carrying this request's loop hash.
        // The hash of the request as it arrives, computed only when a Via may be ours.
        let mut unpopped_loop_hash = None;
        if self.looped(msg, &mut unpopped_loop_hash) {
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
        self.stamp_via(&top, inb.src, edits);
        // Where the response to this request will go, as we stamped it: what our branch binds.
        let Some(next_hop) = stamped_hop(&top, inb) else {
            return Action::Drop(DropReason::Malformed);
        };

        // Our own Route entries: pop them, learning the flow token they carry.
        let popped = route::pop_ours(self, msg, edits);
        // The loop part of our branch covers the Route set as we forward it.
        let loop_hash = match (popped.count, unpopped_loop_hash) {
            (0, Some(h)) => h,
            (n, _) => self.loop_hash(msg, n),
        };

        let ruri = msg.request_uri().and_then(|s| Uri::parse(buf, s));
        let dest = if from_upstream {
            let mut dest = popped.flow;
            let mut failed = popped.failed;
            if let Some(u) = ruri {
                match contact::decode_uri(&self.cfg.keys, buf, &u) {
                    Ok(Some((flow, original))) => {
                        dest = dest.or(Some(flow));
                        edits.replace(u.whole, &original);
                    }
                    Ok(None) => {}
                    Err(()) => failed = true,
                }
            }
            match (dest, failed) {
                (Some(d), _) => d,
                // A token that does not verify (another key, a restart without the stored key,
                // a forgery): never fall back to what the Request-URI names (RFC 5626 §5.3).
                (None, true) => return self.flow_failed(inb, msg, out),
                (None, false) => match ruri.and_then(|u| uri_flow(buf, &u)) {
                    Some(d) => d,
                    None => return Action::Drop(DropReason::NoRoute),
                },
            }
        } else {
            self.upstream
        };
        if self.is_self(dest) {
            return Action::Drop(DropReason::Loop);
        }

        // Our Via on top, with a deterministic, authenticated branch (§16.11).
        let binding = Binding {
            call_id: msg.call_id(),
            cseq: msg.cseq().map_or(0, |c| c.0),
            next_hop,
        };
        let br = Branch::mint(&self.cfg.keys, self.tx_hash(&top, msg), loop_hash, &binding);
        let via_at = msg
            .header(HeaderName::Via)
            .map_or(msg.headers_end, |h| h.line.start as usize);
        let me = self.advertised(dest.transport);
        let attempt =
            credentials_fingerprint(msg).map(|fp| branch::attempt_param(&self.cfg.keys, &br, fp));
        edits.insert_with(via_at, |w| {
            w.extend_from_slice(b"Via: SIP/2.0/");
            w.extend_from_slice(via_proto(dest.transport).as_bytes());
            w.push(b' ');
            w.extend_from_slice(me.host.as_bytes());
            w.push(b':');
            push_dec(w, me.port.into());
            w.extend_from_slice(b";branch=");
            w.extend_from_slice(&br.text());
            if let Some(a) = attempt {
                w.extend_from_slice(b";swa=");
                w.extend_from_slice(&a);
            }
            w.extend_from_slice(b";rport\r\n");
        });

        // Who requests in this dialog or registration should reach: the phone's flow or its
        // Contact (NAT detection), or for the PBX's requests the phone they are going to.
        let dialog = method.creates_dialog() && !has_to_tag(msg);
        let registering = !from_upstream && method == Method::Register;
        let target = if from_upstream {
            None
        } else if dialog || registering {
            Some(nat::target(self.cfg.nat, inb, Some(&top), msg, |a| {
                self.not_a_phone(a)
            }))
        } else {
            None
        };
        let phone = match (&target, from_upstream) {
            (Some(t), _) => t.flow,
            (None, true) => dest,
            (None, false) => Flow {
                transport: inb.transport,
                addr: inb.src,
            },
        };

        // Record-Route on dialog-creating requests outside a dialog.
        if dialog {
            route::record_route(self, msg, inb.transport, dest.transport, &phone, edits);
        }
        if registering && self.cfg.incoming == IncomingMode::Path {
            route::add_path(self, msg, &phone, edits);
        }
        if !from_upstream
            && self.cfg.incoming == IncomingMode::Contact
            && (method == Method::Register || method.creates_dialog())
        {
            contact::rewrite(self, msg, &phone, edits);
        }
        finish(msg, edits, out);
        Action::Forward { to: dest, target }
    }

    /// 430 Flow Failed (RFC 5626 §5.3) for a request of the PBX whose flow is unknown or gone,
    /// so it can fork or fail fast instead of waiting for a timeout.
    pub fn flow_failed(&self, inb: &Inbound, msg: &Message<'_>, out: &mut Vec<u8>) -> Action {
        match self.reply(inb, msg, 430, "Flow Failed", "", out) {
            Action::Reply { to } => Action::FlowFailed { to },
            // An ACK is never answered: nothing to do but drop it.
            _ => Action::Drop(DropReason::FlowFailed),
        }
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
        let Some((cseq, cseq_method)) = msg.cseq() else {
            return (Action::Drop(DropReason::Malformed), None);
        };
        let mut vias = msg.all(HeaderName::Via).flat_map(|h| {
            split_commas(h.value.of(buf), h.value.start as usize).map(move |e| (h, e))
        });
        let Some((top_h, top_el)) = vias.next() else {
            return (Action::Drop(DropReason::Malformed), None);
        };
        let Some(top) = Via::parse(buf, top_el) else {
            return (Action::Drop(DropReason::Malformed), None);
        };
        let branch_text = top.branch(buf);
        if !branch_text.starts_with(BRANCH_PREFIX) || !self.is_ours(top.host.of(buf), top.port) {
            return (Action::Drop(DropReason::NotOurs), None);
        }
        // Ours by its looks: from here on anything that does not verify is a forgery.
        let Some(br) = Branch::parse(branch_text) else {
            return (Action::Drop(DropReason::Forged), None);
        };
        let Some((_, next_el)) = vias.next() else {
            return (Action::Drop(DropReason::Forged), None);
        };
        let Some(next) = Via::parse(buf, next_el) else {
            return (Action::Drop(DropReason::Forged), None);
        };
        // Two Vias of ours in a row: a response made to bounce off us.
        if next.branch(buf).starts_with(BRANCH_PREFIX) && self.is_ours(next.host.of(buf), next.port)
        {
            return (Action::Drop(DropReason::Forged), None);
        }
        let Some(to) = via_destination(buf, &next) else {
            return (Action::Drop(DropReason::Forged), None);
        };
        let binding = Binding {
            call_id: msg.call_id(),
            cseq,
            next_hop: to,
        };
        if !br.verify(&self.cfg.keys, &binding) {
            return (Action::Drop(DropReason::Forged), None);
        }
        let attempt = match via_param(buf, &top, branch::ATTEMPT_PARAM) {
            None => None,
            Some(v) => match branch::parse_attempt(&self.cfg.keys, branch_text, v) {
                Some(fp) => Some(fp),
                None => return (Action::Drop(DropReason::Forged), None),
            },
        };
        if self.is_self(to) {
            return (Action::Drop(DropReason::Loop), None);
        }
        // Pop our Via: the whole line, or our element and its comma.
        if top_h.value.start == top_el.start && next_el.start > top_h.value.end {
            edits.delete(top_h.line);
        } else {
            edits.delete(Span::new(top_el.start as usize, next_el.start as usize));
        }

        let is_register = cseq_method == b"REGISTER";
        if self.cfg.incoming == IncomingMode::Contact {
            if from_upstream && is_register {
                contact::restore(self, msg, edits);
            } else if !from_upstream {
                let code = msg.status().unwrap_or(0);
                let dialog = Method::parse(cseq_method).creates_dialog();
                if dialog && (101..300).contains(&code) {
                    let target = nat::target(self.cfg.nat, inb, None, msg, |a| self.not_a_phone(a));
                    contact::rewrite(self, msg, &target.flow, edits);
                }
            }
        }
        finish(msg, edits, out);
        let info = from_upstream.then_some(AnswerInfo {
            phone: to.addr,
            attempt,
        });
        (Action::Forward { to, target: None }, info)
    }

    /// Is `msg` an in-dialog request (To tag) whose top Route is one of our Record-Route
    /// entries with a token that verifies: a request of a dialog we forwarded?
    pub fn is_our_dialog(&self, msg: &Message<'_>) -> bool {
        if !has_to_tag(msg) {
            return false;
        }
        let buf = msg.buf;
        msg.header(HeaderName::Route)
            .and_then(|h| split_commas(h.value.of(buf), h.value.start as usize).next())
            .and_then(|el| NameAddr::parse(buf, el))
            .and_then(|n| Uri::parse(buf, n.uri))
            .is_some_and(|u| {
                self.is_ours(u.host.of(buf), u.port)
                    && flow::decode(&self.cfg.keys, u.user(buf)).is_some()
            })
    }

    fn stamp_via(&self, top: &Via, src: SocketAddr, edits: &mut Edits) {
        let ip = crate::blocks::canonical_ip(src.ip());
        let end = top.element.end as usize;
        let port = u64::from(src.port());
        match top.rport {
            Rport::Empty(name) => edits.insert_with(name.end as usize, |w| {
                w.push(b'=');
                push_dec(w, port);
            }),
            Rport::Value(v, _) => edits.replace_with(v, |w| push_dec(w, port)),
            Rport::Absent => edits.insert_with(end, |w| {
                w.extend_from_slice(b";rport=");
                push_dec(w, port);
            }),
        }
        // After rport: an empty `;rport` at the very end takes its value at the same offset.
        match top.received {
            Some(r) => edits.replace_with(r, |w| push_ip(w, ip)),
            None => edits.insert_with(end, |w| {
                w.extend_from_slice(b";received=");
                push_ip(w, ip);
            }),
        }
    }

    /// The transaction part of our branch: the same for a request, its retransmissions, its
    /// CANCEL and its non-2xx ACK (all share the sender's branch and sent-by), different
    /// otherwise. Nothing that a CANCEL does not carry (credentials, method) goes in.
    fn tx_hash(&self, top: &Via, msg: &Message<'_>) -> u64 {
        let buf = msg.buf;
        let branch = top.branch(buf);
        let sent_by = top.host.of(buf);
        let port = top.port.unwrap_or(0).to_be_bytes();
        // The magic cookie alone identifies nothing (RFC 4475 §3.2.1): fall back to RFC 2543.
        if branch.len() > b"z9hG4bK".len() && branch.starts_with(b"z9hG4bK") {
            self.cfg
                .keys
                .mac(keys::Domain::Transaction, &[branch, sent_by, &port])
        } else {
            // RFC 2543 peers: no unique branch; use the transaction's identifying headers.
            let ruri = msg.request_uri().map_or(&b""[..], |s| s.of(buf));
            let cseq = msg.cseq().map_or(0, |c| c.0).to_be_bytes();
            self.cfg.keys.mac(
                keys::Domain::Transaction,
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
        let ruri = msg.request_uri().map_or(&b""[..], |s| s.of(msg.buf));
        let cseq = msg.cseq().map_or(0, |c| c.0).to_be_bytes();
        let routes = msg
            .all(HeaderName::Route)
            .flat_map(|r| split_commas(r.value.of(msg.buf), r.value.start as usize))
            .skip(skip)
            .map(|r| r.of(msg.buf));
        // On the stack for up to 8 Route entries: no allocation per request.
        let mut parts: smallvec::SmallVec<[&[u8]; 12]> = smallvec::SmallVec::new();
        parts.extend_from_slice(&[ruri, msg.call_id(), &cseq, from_tag(msg)]);
        parts.extend(routes);
        self.cfg.keys.mac(keys::Domain::Loop, &parts) as u32
    }

    /// Does a Via of ours carry the loop hash of `msg` as it arrived (kept in `hash` once
    /// computed, for the caller to reuse)?
    fn looped(&self, msg: &Message<'_>, hash: &mut Option<u32>) -> bool {
        let buf = msg.buf;
        // Only a Via header whose text holds our branch prefix can hold a branch of ours
        // (`Branch::parse` wants it at the start of the value): one substring search per
        // header instead of parsing every element of every Via, and no hash without one.
        msg.all(HeaderName::Via)
            .filter(|h| memchr::memmem::find(h.value.of(buf), branch::PREFIX).is_some())
            .flat_map(|h| split_commas(h.value.of(buf), h.value.start as usize))
            .filter_map(|el| Via::parse(buf, el))
            .any(|v| {
                Branch::parse(v.branch(buf)).is_some_and(|b| {
                    b.loop_hash == *hash.get_or_insert_with(|| self.loop_hash(msg, 0))
                }) && self.is_ours(v.host.of(buf), v.port)
            })
    }
}

/// Where the response to a request from `inb` goes, from its top Via as we stamp it.
fn stamped_hop(top: &Via, inb: &Inbound) -> Option<Flow> {
    let transport = match top.transport {
        ViaTransport::Tcp => Transport::Tcp,
        ViaTransport::Udp => Transport::Udp,
        // A WebSocket client's Via names a host that does not exist (RFC 7118 §5: `*.invalid`):
        // received/rport name its connection, which is the way back (only over a connection).
        ViaTransport::Ws if inb.transport.is_stream() => Transport::Ws,
        ViaTransport::Wss if inb.transport.is_stream() => Transport::Wss,
        ViaTransport::Tls => Transport::Tls,
        _ => return None,
    };
    Some(Flow {
        transport,
        addr: canonical(inb.src),
    })
}

/// A fingerprint of the credentials a request carries (every Authorization and
/// Proxy-Authorization value), or `None` without credentials: two guesses differ, a
/// retransmission is the same attempt.
pub fn credentials_fingerprint(msg: &Message<'_>) -> Option<u64> {
    if !msg.has_credentials() {
        return None;
    }
    let buf = msg.buf;
    let mut h = 0u64;
    for hd in msg
        .all(HeaderName::Authorization)
        .chain(msg.all(HeaderName::ProxyAuthorization))
    {
        h = hash64(&[&h.to_be_bytes(), hd.value.of(buf)]);
    }
    Some(h)
}

/// A parameter of a Via element by name.
fn via_param<'a>(buf: &'a [u8], v: &Via, name: &[u8]) -> Option<&'a [u8]> {
    crate::wire::params(buf, v.host.end as usize, v.element.end as usize)
        .find(|(n, _)| n.of(buf).eq_ignore_ascii_case(name))
        .and_then(|(_, val)| val)
        .map(|s| s.of(buf))
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(crate::blocks::canonical_ip(a.ip()), a.port())
}

/// Apply the edits into `out`, adding a Content-Length when the sender left it out (a UDP
/// message may; a TCP hop needs it).
fn finish(msg: &Message<'_>, edits: &mut Edits, out: &mut Vec<u8>) {
    if msg.content_length.is_none() {
        edits.insert_with(msg.headers_end, |w| {
            w.extend_from_slice(b"Content-Length: ");
            push_dec(w, msg.body.len() as u64);
            w.extend_from_slice(b"\r\n");
        });
    }
    edits.apply(msg.framed(), out);
}

fn via_proto(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "UDP",
        Transport::Tcp => "TCP",
        Transport::Ws => "WS",
        Transport::Wss => "WSS",
        Transport::Tls => "TLS",
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
    let start = host.iter().position(|b| *b != b'[').unwrap_or(host.len());
    let end = host
        .iter()
        .rposition(|b| *b != b']')
        .map_or(start, |i| i + 1);
    let h = host.get(start..end.max(start)).unwrap_or_default();
    // Dotted quads, the common case, without going through `str` parsing.
    if !h.contains(&b':') {
        return parse_ipv4(h).map(IpAddr::V4);
    }
    std::str::from_utf8(h).ok()?.parse().ok()
}

/// A dotted-quad IPv4 address, as strict as `Ipv4Addr::from_str`: four decimal octets of one to
/// three digits, no leading zero, each at most 255.
fn parse_ipv4(b: &[u8]) -> Option<std::net::Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = b.split(|c| *c == b'.');
    for o in octets.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || (p.len() > 1 && p.first() == Some(&b'0')) {
            return None;
        }
        let mut n = 0u16;
        for d in p {
            if !d.is_ascii_digit() {
                return None;
            }
            n = n * 10 + u16::from(d - b'0');
        }
        *o = u8::try_from(n).ok()?;
    }
    parts
        .next()
        .is_none()
        .then_some(std::net::Ipv4Addr::from(octets))
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
        ViaTransport::Ws => Transport::Ws,
        ViaTransport::Wss => Transport::Wss,
        ViaTransport::Tls => Transport::Tls,
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
        Some(t) if t.eq_ignore_ascii_case(b"ws") => Transport::Ws,
        Some(t) if t.eq_ignore_ascii_case(b"wss") => Transport::Wss,
        Some(t) if t.eq_ignore_ascii_case(b"tls") => Transport::Tls,
        None => Transport::Udp,
        Some(_) => return None,
    };
    Some(Flow {
        transport,
        addr: SocketAddr::new(ip, u.port.unwrap_or(5060)),
    })
}
