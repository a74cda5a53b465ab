//! Protocol anomalies: what makes a packet broken, and how much each kind counts towards a
//! source's score.

use crate::wire::{HeaderName, Message, ParseError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anomaly {
    Malformed(ParseError),
    /// Bytes that are not SIP at all on a SIP port.
    NotSip,
    MissingHeader(&'static str),
    CSeqMismatch,
    BadMaxForwards,
    MaxForwardsExhausted,
    BadVia,
}

impl Anomaly {
    /// Weight towards `anomaly.threshold`. Things a buggy phone may do count 1; things only an
    /// attack tool does count more.
    pub fn weight(self) -> u32 {
        match self {
            Anomaly::Malformed(ParseError::Oversized | ParseError::TooManyHeaders) => 2,
            Anomaly::NotSip => 2,
            _ => 1,
        }
    }

    /// Whether the message must not be forwarded.
    pub fn is_fatal(self) -> bool {
        !matches!(self, Anomaly::BadMaxForwards)
    }

    pub fn describe(self) -> String {
        match self {
            Anomaly::Malformed(e) => e.to_string(),
            Anomaly::NotSip => "non-SIP bytes".into(),
            Anomaly::MissingHeader(h) => format!("missing {h}"),
            Anomaly::CSeqMismatch => "CSeq method does not match the request".into(),
            Anomaly::BadMaxForwards => "bad Max-Forwards".into(),
            Anomaly::MaxForwardsExhausted => "Max-Forwards exhausted".into(),
            Anomaly::BadVia => "unparseable Via".into(),
        }
    }
}

/// Checks on a parsed request beyond what the scan enforces (RFC 3261 §8.1.1, §8.2.2).
pub fn check_request(msg: &Message<'_>) -> Option<Anomaly> {
    for (h, name) in [
        (HeaderName::Via, "Via"),
        (HeaderName::From, "From"),
        (HeaderName::To, "To"),
        (HeaderName::CallId, "Call-ID"),
        (HeaderName::CSeq, "CSeq"),
    ] {
        if !msg.has(h) {
            return Some(Anomaly::MissingHeader(name));
        }
    }
    let Some((_, cseq_method)) = msg.cseq() else {
        return Some(Anomaly::CSeqMismatch);
    };
    if cseq_method != msg.method_bytes() {
        return Some(Anomaly::CSeqMismatch);
    }
    match msg.max_forwards() {
        Some(Err(())) => return Some(Anomaly::BadMaxForwards),
        Some(Ok(0)) => return Some(Anomaly::MaxForwardsExhausted),
        _ => {}
    }
    None
}

/// Checks on a parsed response.
pub fn check_response(msg: &Message<'_>) -> Option<Anomaly> {
    for (h, name) in [
        (HeaderName::Via, "Via"),
        (HeaderName::From, "From"),
        (HeaderName::To, "To"),
        (HeaderName::CallId, "Call-ID"),
        (HeaderName::CSeq, "CSeq"),
    ] {
        if !msg.has(h) {
            return Some(Anomaly::MissingHeader(name));
        }
    }
    if msg.cseq().is_none() {
        return Some(Anomaly::CSeqMismatch);
    }
    None
}

/// Keep-alives phones send on UDP (CRLF, NUL bytes, STUN binding requests): not SIP, not an
/// anomaly either.
pub fn is_keepalive(buf: &[u8]) -> bool {
    if !buf.is_empty() && buf.iter().all(|b| matches!(b, b'\r' | b'\n' | b' ' | 0)) {
        return true;
    }
    // STUN (RFC 5389): type with the top two bits clear and the magic cookie.
    buf.len() >= 20 && buf[0] & 0xc0 == 0 && buf[4..8] == [0x21, 0x12, 0xa4, 0x42]
}
