//! `upstream.incoming = "contact"`: for PBXs without Path support, the Contact a phone registers
//! (and puts in dialogs) is rewritten to point at us, carrying the flow token and the original
//! URI; the PBX's requests to it are restored before they reach the phone, and so are the
//! Contacts in the PBX's REGISTER answers.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::{flow, Flow, Router};
use crate::stats::Transport;
use crate::wire::uri::{NameAddr, Uri};
use crate::wire::{split_commas, Edits, HeaderName, Message};

const PARAM: &[u8] = b"swc";

/// Every Contact URI of `msg`: the name-addr, its URI, and whether it is in angle brackets.
fn contacts<'m>(msg: &'m Message<'_>) -> impl Iterator<Item = (NameAddr, Uri, bool)> + 'm {
    let buf = msg.buf;
    msg.all(HeaderName::Contact)
        .flat_map(move |h| split_commas(h.value.of(buf), h.value.start as usize))
        .filter_map(move |el| {
            let na = NameAddr::parse(buf, el)?;
            let uri = Uri::parse(buf, na.uri)?;
            let bracketed = na.uri.start > 0 && buf[na.uri.start as usize - 1] == b'<';
            Some((na, uri, bracketed))
        })
}

/// Rewrite every Contact URI in `msg` to point at us.
pub fn rewrite(r: &Router, msg: &Message<'_>, phone: &Flow, edits: &mut Edits) {
    let buf = msg.buf;
    let up = r.upstream.transport;
    let adv = r.advertised(up);
    let token = flow::to_string(&r.cfg.key, phone);
    for (na, uri, bracketed) in contacts(msg) {
        if uri.param(buf, PARAM).is_some() {
            continue;
        }
        let original = na.uri.of(buf);
        let user = uri.user(buf);
        let (open, close) = if bracketed { ("", "") } else { ("<", ">") };
        edits.replace_fmt(
            na.uri,
            format_args!(
                "{open}sip:{}{}{}:{}{};swc={}.{}{close}",
                String::from_utf8_lossy(user),
                if user.is_empty() { "" } else { "@" },
                adv.host,
                adv.port,
                if up == Transport::Tcp {
                    ";transport=tcp"
                } else {
                    ""
                },
                token,
                URL_SAFE_NO_PAD.encode(original)
            ),
        );
    }
}

/// Decode a URI we rewrote: the phone's flow and its original URI.
pub fn decode_uri(key: &[u8; 16], buf: &[u8], uri: &Uri) -> Option<(Flow, Vec<u8>)> {
    let v = uri.param(buf, PARAM)??.of(buf);
    let dot = memchr::memchr(b'.', v)?;
    let flow = flow::decode(key, &v[..dot])?;
    let original = URL_SAFE_NO_PAD.decode(&v[dot + 1..]).ok()?;
    // The original must itself be a SIP URI, not something an attacker smuggled in.
    Uri::parse(&original, crate::wire::Span::new(0, original.len()))?;
    Some((flow, original))
}

/// Put the phones' own Contacts back into a REGISTER answer from the PBX.
pub fn restore(r: &Router, msg: &Message<'_>, edits: &mut Edits) {
    let buf = msg.buf;
    for (na, uri, bracketed) in contacts(msg) {
        let Some((_, original)) = decode_uri(&r.cfg.key, buf, &uri) else {
            continue;
        };
        if bracketed {
            edits.replace(na.uri, &original);
        } else {
            edits.replace_fmt(
                na.uri,
                format_args!("<{}>", String::from_utf8_lossy(&original)),
            );
        }
    }
}
