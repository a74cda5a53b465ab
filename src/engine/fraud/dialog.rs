//! What sipwarden needs to end a record-routed call itself (`fraud.on_max_duration = "bye"`):
//! learnt from the phone's INVITE and the PBX's 2xx as they pass, and the two BYEs built from it.
//!
//! Memory: one [`Dialog`] per tracked call with a max-duration rule (so at most
//! `fraud.max_calls`), at most [`MAX_FIELD`] bytes per value, [`MAX_ROUTES`] Record-Route
//! entries and [`MAX_DIALOG_BYTES`] in all (a typical dialog takes about 500). Values come from
//! the wire: a dialog with a value holding CR, LF or NUL, or over a cap, is not learnt (no BYE is
//! sent for that call, it is alerted instead), so nothing an attacker writes can add a header to
//! our BYEs or grow the table past its bound.

use std::net::SocketAddr;

use crate::stats::Transport;
use crate::wire::uri::{NameAddr, Uri};
use crate::wire::{split_commas, HeaderName, Message, Span};

/// Longest header value kept (Call-ID, From, To, Contact URI, one route entry).
pub const MAX_FIELD: usize = 512;
/// Record-Route entries kept; a 2xx with more is not learnt.
pub const MAX_ROUTES: usize = 6;
/// All the values of one dialog together.
pub const MAX_DIALOG_BYTES: usize = 2048;
/// CSeq of our BYE towards the caller: the callee's own CSeq is unknown to a stateless proxy,
/// so one high below 2**31 (RFC 3261 §8.1.1.5) that a callee is unlikely to have reached.
pub const CALLER_BYE_CSEQ: u32 = 2_000_000_000;
/// Added to the INVITE's CSeq for our BYE towards the callee: room for the caller's re-INVITEs.
pub const CALLEE_CSEQ_STEP: u32 = 100_000;

/// One answered call, as seen on the wire.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dialog {
    pub call_id: Box<[u8]>,
    /// The caller's From value (with its tag) and the 2xx's To value (with the callee's tag).
    pub from: Box<[u8]>,
    pub to: Box<[u8]>,
    /// The caller's Contact URI (from the INVITE) and the callee's (from the 2xx).
    pub caller_contact: Box<[u8]>,
    pub callee_contact: Box<[u8]>,
    /// The 2xx's Record-Route entries in message order (the callee's side first).
    pub routes: Vec<Box<[u8]>>,
    pub invite_cseq: u32,
    /// Where the caller is: the flow the 2xx was forwarded to.
    pub caller: Option<(Transport, SocketAddr)>,
}

/// A BYE to send and where: to the caller's flow, or to the upstream (the PBX).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bye {
    pub to_upstream: bool,
    pub caller: Option<(Transport, SocketAddr)>,
    pub bytes: Vec<u8>,
}

fn field(v: &[u8]) -> Option<Box<[u8]>> {
    let ok =
        !v.is_empty() && v.len() <= MAX_FIELD && !v.iter().any(|b| matches!(b, b'\r' | b'\n' | 0));
    ok.then(|| v.into())
}

/// The URI of a name-addr header (Contact), without angle brackets.
fn uri_of<'a>(msg: &Message<'a>, name: HeaderName) -> &'a [u8] {
    msg.header(name)
        .and_then(|h| NameAddr::parse(msg.buf, h.value))
        .map_or(&b""[..], |na| na.uri.of(msg.buf))
}

impl Dialog {
    /// From the caller's INVITE: its Contact (None when absent or unfit).
    pub fn from_invite(msg: &Message<'_>) -> Option<Dialog> {
        Some(Dialog {
            caller_contact: field(uri_of(msg, HeaderName::Contact))?,
            ..Dialog::default()
        })
    }

    /// From the PBX's 2xx to the INVITE, forwarded to the caller at `caller`. False when the
    /// answer lacks something a BYE needs (then the call is alerted, not ended).
    pub fn learn_answer(&mut self, msg: &Message<'_>, caller: (Transport, SocketAddr)) -> bool {
        let buf = msg.buf;
        let mut routes = Vec::new();
        for h in msg.all(HeaderName::RecordRoute) {
            for sp in split_commas(h.value.of(buf), h.value.start as usize) {
                if routes.len() == MAX_ROUTES {
                    return false;
                }
                let Some(r) = field(sp.of(buf)) else {
                    return false;
                };
                routes.push(r);
            }
        }
        let (Some(call_id), Some(from), Some(to), Some(contact), Some((cseq, _))) = (
            field(msg.call_id()),
            msg.value(HeaderName::From).and_then(field),
            msg.value(HeaderName::To).and_then(field),
            field(uri_of(msg, HeaderName::Contact)),
            msg.cseq(),
        ) else {
            return false;
        };
        let total = call_id.len()
            + from.len()
            + to.len()
            + contact.len()
            + self.caller_contact.len()
            + routes.iter().map(|r| r.len()).sum::<usize>();
        if total > MAX_DIALOG_BYTES {
            return false;
        }
        self.call_id = call_id;
        self.from = from;
        self.to = to;
        self.callee_contact = contact;
        self.routes = routes;
        self.invite_cseq = cseq;
        self.caller = Some(caller);
        true
    }

    /// The two BYEs: to the caller (directly: we are its first hop) and to the callee (through
    /// the PBX, along the route set past our own entries). `via`: our host:port for the Via;
    /// `is_ours(host, port)` recognises our own Record-Route entries; `branch`: a unique branch
    /// suffix (the responses are not ours to route: the branch does not look like one we mint
    /// ([`crate::proxy::BRANCH_PREFIX`]), so they are dropped as not ours, never scored as forged).
    pub fn byes(
        &self,
        via: impl Fn(Transport) -> String,
        upstream: Transport,
        branch: u64,
        is_ours: impl Fn(&[u8], Option<u16>) -> bool,
    ) -> Vec<Bye> {
        let mut out = Vec::with_capacity(2);
        let Some(caller) = self.caller else {
            return out;
        };
        // Route set as the caller uses it: the Record-Route reversed; our entries come first.
        let mut route: Vec<&[u8]> = self.routes.iter().rev().map(|r| &r[..]).collect();
        while route.first().is_some_and(|r| entry_is_ours(r, &is_ours)) {
            route.remove(0);
        }
        let reason = "Reason: SIP;cause=200;text=\"maximum call duration (sipwarden)\"\r\n";
        let build = |ruri: &[u8],
                     route: &[&[u8]],
                     from: &[u8],
                     to: &[u8],
                     cseq: u32,
                     t: Transport,
                     b: u64| {
            let mut m = Vec::with_capacity(512);
            m.extend_from_slice(b"BYE ");
            m.extend_from_slice(ruri);
            m.extend_from_slice(b" SIP/2.0\r\n");
            let tr = match t {
                Transport::Udp => "UDP",
                Transport::Tcp => "TCP",
                Transport::Ws => "WS",
                Transport::Wss => "WSS",
                Transport::Tls => "TLS",
            };
            let host = via(t);
            m.extend_from_slice(
                format!("Via: SIP/2.0/{tr} {host};branch=z9hG4bKend{b:016x}\r\n").as_bytes(),
            );
            for r in route {
                m.extend_from_slice(b"Route: ");
                m.extend_from_slice(r);
                m.extend_from_slice(b"\r\n");
            }
            m.extend_from_slice(b"Max-Forwards: 70\r\nFrom: ");
            m.extend_from_slice(from);
            m.extend_from_slice(b"\r\nTo: ");
            m.extend_from_slice(to);
            m.extend_from_slice(b"\r\nCall-ID: ");
            m.extend_from_slice(&self.call_id);
            m.extend_from_slice(
                format!("\r\nCSeq: {cseq} BYE\r\n{reason}Content-Length: 0\r\n\r\n").as_bytes(),
            );
            m
        };
        // To the callee, as the caller: From/To as the caller has them.
        out.push(Bye {
            to_upstream: true,
            caller: None,
            bytes: build(
                &self.callee_contact,
                &route,
                &self.from,
                &self.to,
                self.invite_cseq.saturating_add(CALLEE_CSEQ_STEP),
                upstream,
                branch,
            ),
        });
        // To the caller, as the callee: From and To swapped, no route (we are its next hop).
        out.push(Bye {
            to_upstream: false,
            caller: Some(caller),
            bytes: build(
                &self.caller_contact,
                &[],
                &self.to,
                &self.from,
                CALLER_BYE_CSEQ,
                caller.0,
                branch ^ 1,
            ),
        });
        out
    }
}

fn entry_is_ours(entry: &[u8], is_ours: &impl Fn(&[u8], Option<u16>) -> bool) -> bool {
    NameAddr::parse(entry, Span::new(0, entry.len()))
        .and_then(|na| Uri::parse(entry, na.uri))
        .is_some_and(|u| is_ours(u.host.of(entry), u.port))
}
