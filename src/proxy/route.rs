//! Our entries in Route, Record-Route and Path.

use super::{flow, Flow, Router};
use crate::stats::Transport;
use crate::wire::edit::push_dec;
use crate::wire::uri::{NameAddr, Uri};
use crate::wire::{split_commas, Edits, HeaderName, Message, Span};

#[derive(Debug, Default)]
pub struct Popped {
    pub count: usize,
    /// The flow named by the first popped entry that carried a token.
    pub flow: Option<Flow>,
    /// An entry of ours carried something that looks like a token but does not verify.
    pub failed: bool,
}

/// Pop the consecutive Route entries at the top that are ours (§16.4 loose routing).
pub fn pop_ours(r: &Router, msg: &Message<'_>, edits: &mut Edits) -> Popped {
    let buf = msg.buf;
    let mut popped = Popped::default();
    for h in msg.all(HeaderName::Route) {
        let mut remaining_at = None;
        for el in split_commas(h.value.of(buf), h.value.start as usize) {
            let uri = NameAddr::parse(buf, el).and_then(|n| Uri::parse(buf, n.uri));
            let Some(u) = uri else {
                remaining_at = Some(el.start);
                break;
            };
            // Ours by address only: a token alone proves nothing about where the entry points
            // (an attacker can copy one into a Route naming another host).
            if !r.is_ours(u.host.of(buf), u.port) {
                remaining_at = Some(el.start);
                break;
            }
            let user = u.user(buf);
            let token = flow::decode(&r.cfg.keys, user);
            popped.failed |= token.is_none() && flow::looks_like_token(user);
            popped.count += 1;
            popped.flow = popped.flow.or(token);
        }
        match remaining_at {
            None => edits.delete(h.line),
            Some(at) => {
                if at > h.value.start {
                    edits.delete(Span::new(h.value.start as usize, at as usize));
                }
                return popped;
            }
        }
    }
    popped
}

/// The `transport` URI parameter for our own entries. TLS is named `transport=tls` on a `sip:`
/// URI (what phones and PBXs that speak TLS send and accept), not as a `sips:` URI, which
/// would promise TLS on every hop to the end (RFC 5630).
pub(crate) fn transport_param(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "",
        Transport::Tcp => ";transport=tcp",
        Transport::Ws => ";transport=ws",
        Transport::Wss => ";transport=wss",
        Transport::Tls => ";transport=tls",
    }
}

/// Record-Route with the phone's flow token; two entries when the two sides differ (RFC 3261
/// §16.6 step 4, "double Record-Route"): the top one faces the next hop.
pub fn record_route(
    r: &Router,
    msg: &Message<'_>,
    in_t: Transport,
    out_t: Transport,
    phone: &Flow,
    edits: &mut Edits,
) {
    let at = msg
        .header(HeaderName::RecordRoute)
        .map_or(msg.headers_end, |h| h.line.start as usize);
    let out_adv = r.advertised(out_t);
    let in_adv = r.advertised(in_t);
    let entry = |w: &mut Vec<u8>, adv: &super::Advertised, t: Transport| {
        w.extend_from_slice(b"Record-Route: <sip:");
        flow::push_token(&r.cfg.keys, phone, w);
        push_host_port(w, adv);
        w.extend_from_slice(transport_param(t).as_bytes());
        w.extend_from_slice(b";lr>\r\n");
    };
    edits.insert_with(at, |w| entry(w, out_adv, out_t));
    if out_adv != in_adv || in_t != out_t {
        edits.insert_with(at, |w| entry(w, in_adv, in_t));
    }
}

/// Path (RFC 3327) on a phone's REGISTER: the PBX will route requests for this binding through
/// us, and the token names the phone's real transport address.
pub fn add_path(r: &Router, msg: &Message<'_>, phone: &Flow, edits: &mut Edits) {
    let at = msg
        .header(HeaderName::Path)
        .map_or(msg.headers_end, |h| h.line.start as usize);
    let up = r.upstream.transport;
    let adv = r.advertised(up);
    edits.insert_with(at, |w| {
        w.extend_from_slice(b"Path: <sip:");
        flow::push_token(&r.cfg.keys, phone, w);
        push_host_port(w, adv);
        w.extend_from_slice(transport_param(up).as_bytes());
        w.extend_from_slice(b";lr;ob>\r\n");
    });
}

/// `@host:port` of one of our names, as a flow token's URI continues.
fn push_host_port(w: &mut Vec<u8>, adv: &super::Advertised) {
    w.push(b'@');
    w.extend_from_slice(adv.host.as_bytes());
    w.push(b':');
    push_dec(w, adv.port.into());
}
