//! `upstream.incoming = "contact"`: for PBXs without Path support, the Contact a phone registers
//! (and puts in dialogs) is rewritten to point at us, carrying the flow token and the original
//! URI; the PBX's requests to it are restored before they reach the phone, and so are the
//! Contacts in the PBX's REGISTER answers.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::{flow, Flow, Keys, Router};
use crate::wire::uri::{NameAddr, Uri};
use crate::wire::{split_commas, Edits, HeaderName, Message};

/// The URI parameter carrying our encoding: `swc=TOKEN.BASE64(original URI)`.
pub const PARAM: &[u8] = b"swc";

/// Every Contact URI of `msg`: the name-addr, its URI, and whether it is in angle brackets.
fn contacts<'m>(msg: &'m Message<'_>) -> impl Iterator<Item = (NameAddr, Uri, bool)> + 'm {
    let buf = msg.buf;
    msg.all(HeaderName::Contact)
        .flat_map(move |h| split_commas(h.value.of(buf), h.value.start as usize))
        .filter_map(move |el| {
            let na = NameAddr::parse(buf, el)?;
            let uri = Uri::parse(buf, na.uri)?;
            let bracketed = (na.uri.start as usize)
                .checked_sub(1)
                .and_then(|i| buf.get(i))
                == Some(&b'<');
            Some((na, uri, bracketed))
        })
}

/// Rewrite every Contact URI in `msg` to point at us. A Contact that already carries an
/// encoding like ours (forged, copied from another phone's registration, or ours from an
/// earlier hop) is encoded again like any other: the PBX only ever sees our own fresh
/// encoding, and a foreign one is inert inside the original we restore to the phone.
pub fn rewrite(r: &Router, msg: &Message<'_>, phone: &Flow, edits: &mut Edits) {
    let buf = msg.buf;
    let up = r.upstream.transport;
    let adv = r.advertised(up);
    let token = flow::to_string(&r.cfg.keys, phone);
    for (na, uri, bracketed) in contacts(msg) {
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
                super::route::transport_param(up),
                token,
                URL_SAFE_NO_PAD.encode(original)
            ),
        );
    }
}

/// Decode a URI we rewrote: the phone's flow and its original URI. `Ok(None)`: not one of
/// ours; `Err(())`: it carries our parameter but it does not verify (answered 430).
#[allow(clippy::result_unit_err)]
pub fn decode_uri(keys: &Keys, buf: &[u8], uri: &Uri) -> Result<Option<(Flow, Vec<u8>)>, ()> {
    let Some(v) = uri.param(buf, PARAM) else {
        return Ok(None);
    };
    let v = v.ok_or(())?.of(buf);
    let dot = memchr::memchr(b'.', v).ok_or(())?;
    let (tok, rest) = v.split_at_checked(dot).ok_or(())?;
    let flow = flow::decode(keys, tok).ok_or(())?;
    let original = URL_SAFE_NO_PAD
        .decode(rest.get(1..).ok_or(())?)
        .map_err(|_| ())?;
    // The original must itself be a SIP URI, not something an attacker smuggled in.
    Uri::parse(&original, crate::wire::Span::new(0, original.len())).ok_or(())?;
    Ok(Some((flow, original)))
}

/// Put the phones' own Contacts back into a REGISTER answer from the PBX.
pub fn restore(r: &Router, msg: &Message<'_>, edits: &mut Edits) {
    let buf = msg.buf;
    for (na, uri, bracketed) in contacts(msg) {
        let Ok(Some((_, original))) = decode_uri(&r.cfg.keys, buf, &uri) else {
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
