//! NAT detection: where requests for a phone should go. The flow (the address its packets come
//! from, or its TCP connection) when it is behind NAT, uses outbound or a connection-oriented
//! transport; otherwise the Contact it registered, like Kamailio's `nat_uac_test` +
//! `add_path_received` only when NAT is detected. `sip.nat_detection` picks the rule.

use std::net::{IpAddr, SocketAddr};

use super::{host_ip, Flow, Inbound};
use crate::config::NatDetection;
use crate::stats::Transport;
use crate::wire::uri::{NameAddr, Uri};
use crate::wire::via::Via;
use crate::wire::{split_commas, HeaderName, Message};

/// The decision and why, for the debug log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub flow: Flow,
    pub why: &'static str,
}

/// Where requests for the sender of `msg` (a REGISTER or a dialog-creating request or
/// response from a phone) should go. `is_ours` recognises our own addresses and the PBX's,
/// which are never a target.
pub fn target(
    mode: NatDetection,
    inb: &Inbound,
    top: Option<&Via>,
    msg: &Message<'_>,
    is_ours: impl Fn(SocketAddr) -> bool,
) -> Target {
    let flow = Flow {
        transport: inb.transport,
        addr: inb.src,
    };
    let by_flow = |why| Target { flow, why };
    match decide(mode, inb, top, msg) {
        Ok(addr) if !is_ours(addr) => Target {
            flow: Flow {
                transport: Transport::Udp,
                addr,
            },
            why: "Contact reachable directly (no NAT detected)",
        },
        Ok(_) => by_flow("Contact names sipwarden or the PBX"),
        Err(why) => by_flow(why),
    }
}

/// The Contact address to use, or why the flow is used instead.
fn decide(
    mode: NatDetection,
    inb: &Inbound,
    top: Option<&Via>,
    msg: &Message<'_>,
) -> Result<SocketAddr, &'static str> {
    if mode == NatDetection::AlwaysFlow {
        return Err("nat_detection = always-flow");
    }
    if inb.transport != Transport::Udp {
        return Err("connection-oriented transport: the connection is the way back");
    }
    let buf = msg.buf;
    let Some((na, uri)) = first_contact(msg) else {
        return Err("no Contact");
    };
    if uri
        .param(buf, b"transport")
        .flatten()
        .is_some_and(|t| !t.of(buf).eq_ignore_ascii_case(b"udp"))
    {
        return Err("Contact transport is not UDP");
    }
    let Some(ip) = host_ip(uri.host.of(buf)) else {
        return Err("Contact host is not an IP address");
    };
    let contact = SocketAddr::new(crate::blocks::canonical_ip(ip), uri.port.unwrap_or(5060));
    if mode == NatDetection::Never {
        return Ok(contact);
    }
    if uri.param(buf, b"ob").is_some() || na.param(buf, b"reg-id").is_some() {
        return Err("outbound (RFC 5626 ;ob / reg-id): the flow is the way back");
    }
    let Some(via) = top else {
        return Err("no readable Via");
    };
    let sent_by = host_ip(via.host.of(buf)).map(crate::blocks::canonical_ip);
    if sent_by != Some(inb.src.ip()) {
        return Err("Via sent-by differs from the source address (NAT)");
    }
    if via.port.unwrap_or(5060) != inb.src.port() {
        return Err("Via port differs from the source port (NAT)");
    }
    if contact.ip() != inb.src.ip() && !is_global(contact.ip()) {
        return Err("private Contact behind another address (NAT)");
    }
    if !usable(contact) {
        return Err("Contact address is not a unicast address");
    }
    Ok(contact)
}

fn first_contact(msg: &Message<'_>) -> Option<(NameAddr, Uri)> {
    let buf = msg.buf;
    let h = msg.header(HeaderName::Contact)?;
    let el = split_commas(h.value.of(buf), h.value.start as usize).next()?;
    let na = NameAddr::parse(buf, el)?;
    let uri = Uri::parse(buf, na.uri)?;
    Some((na, uri))
}

fn usable(a: SocketAddr) -> bool {
    a.port() != 0
        && match a.ip() {
            IpAddr::V4(v) => !(v.is_unspecified() || v.is_broadcast() || v.is_multicast()),
            IpAddr::V6(v) => !(v.is_unspecified() || v.is_multicast()),
        }
}

/// A globally routable address: not private, loopback, link-local, CGNAT, documentation or
/// unique-local. A Contact naming another host is only believed when it is one of these.
fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v) => {
            let o = v.octets();
            !(v.is_private()
                || v.is_loopback()
                || v.is_link_local()
                || v.is_unspecified()
                || v.is_broadcast()
                || v.is_multicast()
                || v.is_documentation()
                || (o[0] == 100 && (o[1] & 0xc0) == 64)
                || (o[0] == 192 && o[1] == 0 && o[2] == 0))
        }
        IpAddr::V6(v) => {
            let s = v.segments();
            !(v.is_loopback()
                || v.is_unspecified()
                || v.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00
                || (s[0] & 0xffc0) == 0xfe80
                || (s[0] == 0x2001 && s[1] == 0x0db8))
        }
    }
}
