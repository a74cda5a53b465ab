//! The packet pipeline, sans-I/O: one received message in, what to send out. In order: the
//! drop gate (no lock, no parse), the size limit, the parse, the route, and one engine entry
//! ([`crate::engine::Engine::inspect`]) whose verdict decides between the routed action, our
//! own answer and a drop. The socket layer (`net/`) only receives, calls [`decide`] and sends.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::net::SocketAddr;

use crate::blocks::{BlockType, GateVerdict, LocalHits};
use crate::engine::{anomaly, Seen, Trust, Verdict, What};
use crate::node::Node;
use crate::proxy::{Action, Inbound, Router};
use crate::stats::{DropReason, Transport};
use crate::wire::{parse, Edits, Framing, ParseError};

/// What [`decide`] wants sent: `action` with the bytes it wrote to `out`; `request` when the
/// action forwards a request (for the counters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Send {
    pub action: Action,
    pub request: bool,
}

/// Where the pipeline writes: the router's edit list and the output buffer (reused for every
/// packet), and the gate's per-loop hit counts (UDP).
pub struct Work<'a> {
    pub edits: &'a mut Edits,
    pub out: &'a mut Vec<u8>,
    pub hits: &'a mut LocalHits,
}

/// Decide what to do with one whole message (a datagram, a message cut from a TCP stream, a
/// WebSocket message) from `inb`. `has_conn(addr)`: is there an open stream connection to
/// `addr` (a PBX request for a phone whose TCP connection is gone is answered 430 at once).
/// Drops are counted here; `None` means nothing to send.
pub fn decide(
    node: &Node,
    router: &Router,
    max_message_bytes: usize,
    inb: &Inbound,
    bytes: &[u8],
    w: Work<'_>,
    has_conn: impl Fn(SocketAddr) -> bool,
) -> Option<Send> {
    let stats = &node.stats;
    stats.packet_in(inb.transport);
    if inb.transport == Transport::Udp && anomaly::is_keepalive(bytes) {
        stats
            .keepalives
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return None;
    }
    if router.is_own_socket(inb) {
        // Our own packet coming back (a forged Via or Contact made us send to ourselves).
        stats.drop(DropReason::Loop);
        return None;
    }
    let from_upstream = router.is_upstream(inb);
    let now = node.now();
    // The gate first: a blocked or blacklisted source is dropped here, without a lock and
    // without parsing.
    let trust = if from_upstream {
        Trust::Upstream
    } else {
        let gate = node.gate();
        let verdict = match inb.transport {
            Transport::Udp => gate.check_local(now, inb.src, w.hits),
            _ => gate.check(now, inb.src),
        };
        match verdict {
            GateVerdict::Blocked { kind, reply_403 } => {
                // HEP capture of a blocked source's drops only for `hep.only = "blocked"`.
                stats.hep.received_blocked(inb.transport, inb.src, bytes);
                stats.drop(if kind == BlockType::Blacklist {
                    DropReason::Blacklisted
                } else {
                    DropReason::Blocked
                });
                return if reply_403 {
                    forbidden(router, inb, bytes, w.out)
                } else {
                    None
                };
            }
            GateVerdict::Whitelisted => Trust::Whitelisted,
            GateVerdict::Inspect => Trust::Inspect,
        }
    };
    stats.hep.received(inb.transport, inb.src, bytes);
    let engine = node.engine();
    let seen = |what| Seen {
        transport: inb.transport,
        src: inb.src,
        trust,
        what,
    };
    let parsed = if bytes.len() > max_message_bytes {
        Err(ParseError::Oversized)
    } else {
        parse(bytes, framing(inb.transport))
    };
    let msg = match parsed {
        Ok(m) => m,
        Err(err) => {
            if trust == Trust::Inspect {
                engine.inspect(now, seen(What::Unparsed { err, bytes }));
                node.send_events();
            } else {
                tracing::debug!(src = %inb.src, %err, "unparseable message from a trusted source");
            }
            stats.drop(DropReason::Malformed);
            return None;
        }
    };
    let Work { edits, out, .. } = w;
    if msg.is_request() {
        let our_dialog = trust == Trust::Inspect && router.is_our_dialog(&msg);
        let action = router.route_request(inb, &msg, from_upstream, edits, out);
        let forged = action == Action::Drop(DropReason::Forged);
        let verdict = engine.inspect(
            now,
            seen(What::Request {
                msg: &msg,
                our_dialog,
                forged,
            }),
        );
        node.send_events();
        match verdict {
            Verdict::Forward => {}
            Verdict::Drop(r) => {
                stats.drop(r);
                return None;
            }
            Verdict::Reply {
                code,
                reason,
                retry_after,
            } => {
                let extra = retry_after.map_or(String::new(), |s| format!("Retry-After: {s}\r\n"));
                let action = router.reply(inb, &msg, code, reason, &extra, out);
                if code == 503 {
                    stats.drop(DropReason::InviteRate);
                }
                return Some(Send {
                    action,
                    request: false,
                });
            }
        }
        let action = match action {
            Action::Forward { to, target } => {
                if let Some(t) = target {
                    tracing::debug!(src = %inb.src, target = %t.flow.addr, transport = t.flow.transport.as_str(), why = t.why, "nat detection");
                }
                // The PBX's request for a phone whose stream connection is gone: 430 Flow
                // Failed (RFC 5626 §5.3) at once rather than a timeout.
                if from_upstream
                    && to.transport.is_stream()
                    && to != router.upstream()
                    && !has_conn(to.addr)
                {
                    router.flow_failed(inb, &msg, out)
                } else {
                    action
                }
            }
            a => a,
        };
        Some(Send {
            action,
            request: true,
        })
    } else {
        let (action, info) = router.route_response(inb, &msg, from_upstream, edits, out);
        let forged = action == Action::Drop(DropReason::Forged);
        let to = match action {
            Action::Forward { to, .. } => Some((to.transport, to.addr)),
            _ => None,
        };
        let verdict = engine.inspect(
            now,
            seen(What::Response {
                msg: &msg,
                answer: info.map(|i| (i.phone, i.attempt)),
                to,
                forged,
            }),
        );
        node.send_events();
        match verdict {
            Verdict::Drop(r) => {
                stats.drop(r);
                None
            }
            _ => Some(Send {
                action,
                request: false,
            }),
        }
    }
}

/// `protection.blocked_reply = "403"`: a blocked source's request is answered 403 (its
/// responses and ACKs are not answered).
fn forbidden(router: &Router, inb: &Inbound, bytes: &[u8], out: &mut Vec<u8>) -> Option<Send> {
    let msg = parse(bytes, framing(inb.transport)).ok()?;
    if !msg.is_request() {
        return None;
    }
    Some(Send {
        action: router.reply(inb, &msg, 403, "Forbidden", "", out),
        request: false,
    })
}

/// How a message of this transport is delimited: a datagram or a WebSocket message is one whole
/// message (RFC 7118 §5: no Content-Length needed); on a TCP stream Content-Length frames it.
pub fn framing(t: Transport) -> Framing {
    match t {
        Transport::Udp | Transport::Ws | Transport::Wss => Framing::Datagram,
        Transport::Tcp | Transport::Tls => Framing::Stream,
    }
}

#[cfg(test)]
mod tests;
