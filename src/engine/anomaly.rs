//! Protocol anomalies: what makes a packet broken, and how much each kind counts towards a
//! source's score.
//!
//! A request is held to what its sender wrote. In a dialog we record-routed, several values
//! were chosen by the other party and are only echoed (the remote tag and display name in
//! To/From, the remote target as Request-URI, Route built from Record-Route): a defect there
//! says nothing about the sender, so it is neither fatal nor scored (Kamailio forwards such
//! requests too).
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use crate::wire::uri::{name_addr_well_formed, Uri};
use crate::wire::via::Via;
use crate::wire::{split_commas, HeaderName, Message, ParseError};

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
    /// A header that must appear once appears more often (RFC 4475 §3.3.8).
    Duplicate(&'static str),
    /// A From, To or Contact value that is not a name-addr or addr-spec.
    BadAddress(&'static str),
    /// A sip/sips Request-URI that does not parse or carries `?headers` (RFC 4475 §3.1.2.11).
    BadRequestUri,
    /// A response through a Via that looks like ours but whose branch MAC does not verify, or a
    /// request whose own Via claims to be ours: an attempt to make us route what we did not
    /// cause.
    ForgedResponse,
    /// A refused WebSocket upgrade (not an upgrade, no `sip` subprotocol, too slow) or a
    /// broken or oversized WebSocket frame.
    WebSocket(&'static str),
    /// A TLS handshake that failed, timed out or went over `tls.max_handshakes_per_ip`.
    TlsHandshake,
}

impl Anomaly {
    /// What a parse error says about its sender.
    pub fn from_parse(err: crate::wire::ParseError) -> Anomaly {
        match err {
            crate::wire::ParseError::NotSip => Anomaly::NotSip,
            e => Anomaly::Malformed(e),
        }
    }

    /// Weight towards `anomaly.threshold`. Things a buggy phone may do count 1; things only an
    /// attack tool does count more.
    pub fn weight(self) -> u32 {
        match self {
            Anomaly::Malformed(ParseError::Oversized | ParseError::TooManyHeaders) => 2,
            Anomaly::NotSip => 2,
            Anomaly::ForgedResponse => 2,
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
            Anomaly::Duplicate(h) => format!("more than one {h}"),
            Anomaly::BadAddress(h) => format!("malformed {h}"),
            Anomaly::BadRequestUri => "malformed Request-URI".into(),
            Anomaly::ForgedResponse => "forged Via of ours (branch does not verify)".into(),
            Anomaly::WebSocket(why) => format!("websocket: {why}"),
            Anomaly::TlsHandshake => "TLS handshake failed".into(),
        }
    }
}

/// The headers every request and response must carry (RFC 3261 §8.1.1).
fn missing_mandatory(msg: &Message<'_>) -> Option<Anomaly> {
    [
        (HeaderName::Via, "Via"),
        (HeaderName::From, "From"),
        (HeaderName::To, "To"),
        (HeaderName::CallId, "Call-ID"),
        (HeaderName::CSeq, "CSeq"),
    ]
    .into_iter()
    .find(|(h, _)| !msg.has(*h))
    .map(|(_, name)| Anomaly::MissingHeader(name))
}

/// Checks on a parsed request beyond what the scan enforces (RFC 3261 §8.1.1, §8.2.2).
/// `our_dialog`: an in-dialog request of a dialog we record-routed (the router decides); then
/// the To/From values and the Request-URI, which the other party chose, are not checked.
/// Out-of-dialog requests get the full strictness.
pub fn check_request(msg: &Message<'_>, our_dialog: bool) -> Option<Anomaly> {
    if let Some(a) = missing_mandatory(msg) {
        return Some(a);
    }
    let Some((_, cseq_method)) = msg.cseq() else {
        return Some(Anomaly::CSeqMismatch);
    };
    if cseq_method != msg.method_bytes() {
        return Some(Anomaly::CSeqMismatch);
    }
    for (h, name) in [
        (HeaderName::CallId, "Call-ID"),
        (HeaderName::CSeq, "CSeq"),
        (HeaderName::From, "From"),
        (HeaderName::To, "To"),
        (HeaderName::MaxForwards, "Max-Forwards"),
    ] {
        if msg.all(h).nth(1).is_some() {
            return Some(Anomaly::Duplicate(name));
        }
    }
    let buf = msg.buf;
    // Every Via element must parse, not just the top one we stamp (RFC 4475 §3.1.2.1).
    let bad_via = msg
        .all(HeaderName::Via)
        .flat_map(|h| split_commas(h.value.of(buf), h.value.start as usize))
        .any(|el| Via::parse(buf, el).is_none());
    if bad_via {
        return Some(Anomaly::BadVia);
    }
    for (h, name) in [(HeaderName::From, "From"), (HeaderName::To, "To")] {
        if !our_dialog
            && msg
                .header(h)
                .is_some_and(|h| !name_addr_well_formed(buf, h.value))
        {
            return Some(Anomaly::BadAddress(name));
        }
    }
    let bad_contact = msg
        .all(HeaderName::Contact)
        .flat_map(|h| split_commas(h.value.of(buf), h.value.start as usize))
        .any(|el| el.of(buf) != b"*" && !name_addr_well_formed(buf, el));
    if bad_contact {
        return Some(Anomaly::BadAddress("Contact"));
    }
    if let Some(ruri) = msg.request_uri().filter(|_| !our_dialog) {
        let u = ruri.of(buf);
        let starts = |p: &[u8]| u.get(..p.len()).is_some_and(|h| h.eq_ignore_ascii_case(p));
        let sip = u.len() > 4 && (starts(b"sip:") || starts(b"sips:"));
        if sip && Uri::parse(buf, ruri).is_none_or(|u| u.has_headers()) {
            return Some(Anomaly::BadRequestUri);
        }
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
    if let Some(a) = missing_mandatory(msg) {
        return Some(a);
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
    buf.len() >= 20
        && buf.first().is_some_and(|b| b & 0xc0 == 0)
        && buf.get(4..8) == Some(&[0x21, 0x12, 0xa4, 0x42][..])
}

/// Anomaly scores per source: each anomaly adds its weight to the source's sliding window;
/// `anomaly.threshold` within `anomaly.monit_period` is a block. The last three anomalies are
/// kept as the block's evidence.
pub struct AnomalyScore {
    sources: lru::LruCache<ipnet::IpNet, (super::track::Window, Vec<String>)>,
}

impl AnomalyScore {
    pub fn new(cap: usize) -> Self {
        Self {
            sources: lru::LruCache::new(super::track::nonzero(cap)),
        }
    }

    pub fn resize(&mut self, cap: usize) {
        self.sources.resize(super::track::nonzero(cap));
    }

    /// Score `what` (seen in `sample`) for `net`: the block to make when the threshold is
    /// reached.
    pub fn add(
        &mut self,
        now: crate::clock::Millis,
        cfg: &crate::config::Config,
        net: ipnet::IpNet,
        what: Anomaly,
        sample: &[u8],
    ) -> Option<super::Detection> {
        let period = cfg.anomaly.monit_period.as_millis() as crate::clock::Millis;
        let (w, ev) = self
            .sources
            .get_or_insert_mut(net, || (super::track::Window::default(), Vec::new()));
        let score = w.add(now, period, what.weight());
        if ev.len() >= 3 {
            ev.remove(0);
        }
        let first_line = sample.split(|b| *b == b'\n').next().unwrap_or(b"");
        ev.push(crate::blocks::table::clip(&format!(
            "{}: {}",
            what.describe(),
            crate::util::printable(first_line, 80)
        )));
        if score < cfg.anomaly.threshold {
            return None;
        }
        Some(super::Detection {
            key: crate::blocks::BlockKey::whole(net),
            kind: crate::blocks::BlockType::Anomaly,
            reason: format!(
                "protocol anomalies scored {score} within {} (last: {})",
                humantime::format_duration(cfg.anomaly.monit_period),
                what.describe()
            ),
            duration: cfg.anomaly.block_time,
            evidence: ev.clone(),
        })
    }

    /// Does `net` have a live score (for `hep.only = "blocked"`)? No side effects.
    pub fn is_scored(
        &self,
        now: crate::clock::Millis,
        cfg: &crate::config::Config,
        net: ipnet::IpNet,
    ) -> bool {
        let period = cfg.anomaly.monit_period.as_millis() as crate::clock::Millis;
        self.sources
            .peek(&net)
            .is_some_and(|(w, _)| w.estimate(now, period) > 0)
    }

    pub fn len(&self) -> usize {
        self.sources.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }
}
