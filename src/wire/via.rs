//! One Via element: `SIP/2.0/UDP host:port;branch=..;received=..;rport`.

use super::{at, params, parse_port, sub, tail, trim, Span};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ViaTransport {
    Udp,
    Tcp,
    Tls,
    /// RFC 7118 §5: `SIP/2.0/WS` and `SIP/2.0/WSS`.
    Ws,
    Wss,
    Other,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rport {
    Absent,
    /// `;rport` with no value: the client asks us to fill it in (RFC 3581). The span is the
    /// parameter name, so a value can be appended at its end.
    Empty(Span),
    Value(Span, Option<u16>),
}

/// Spans are absolute offsets into the message buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Via {
    pub element: Span,
    pub transport: ViaTransport,
    /// The host, brackets included for IPv6.
    pub host: Span,
    pub port: Option<u16>,
    pub branch: Option<Span>,
    pub received: Option<Span>,
    pub rport: Rport,
}

impl Via {
    /// Parse the Via element `buf[el]`.
    pub fn parse(buf: &[u8], el: Span) -> Option<Via> {
        let (s, e) = (el.start as usize, el.end as usize);
        let slice = buf.get(s..e)?;
        // sent-protocol: name / version / transport, LWS allowed around the slashes.
        let mut pos = 0;
        let mut transport = ViaTransport::Other;
        for i in 0..3 {
            while pos < slice.len() && super::is_lws(at(slice, pos)) {
                pos += 1;
            }
            let ts = pos;
            while pos < slice.len()
                && !super::is_lws(at(slice, pos))
                && at(slice, pos) != b'/'
                && at(slice, pos) != b';'
            {
                pos += 1;
            }
            let tok = sub(slice, ts, pos);
            if tok.is_empty() {
                return None;
            }
            if i == 2 {
                transport = if tok.eq_ignore_ascii_case(b"UDP") {
                    ViaTransport::Udp
                } else if tok.eq_ignore_ascii_case(b"TCP") {
                    ViaTransport::Tcp
                } else if tok.eq_ignore_ascii_case(b"TLS") {
                    ViaTransport::Tls
                } else if tok.eq_ignore_ascii_case(b"WS") {
                    ViaTransport::Ws
                } else if tok.eq_ignore_ascii_case(b"WSS") {
                    ViaTransport::Wss
                } else {
                    ViaTransport::Other
                };
                break;
            }
            while pos < slice.len() && super::is_lws(at(slice, pos)) {
                pos += 1;
            }
            if pos >= slice.len() || at(slice, pos) != b'/' {
                return None;
            }
            pos += 1;
        }
        let sb_start = s + pos;
        let sb_end = super::find(b';', tail(slice, pos)).map_or(e, |i| s + pos + i);
        let (hs, he) = trim(buf, sb_start, sb_end);
        if hs == he {
            return None;
        }
        let hostport = sub(buf, hs, he);
        let (host, port) = if at(hostport, 0) == b'[' {
            let close = super::find(b']', hostport)?;
            let rest = tail(hostport, close + 1);
            let port = match rest.strip_prefix(b":") {
                Some(p) => Some(parse_port(trim_slice(p))?),
                None if rest.iter().all(|b| super::is_lws(*b)) => None,
                None => return None,
            };
            (Span::new(hs, hs + close + 1), port)
        } else {
            match super::find(b':', hostport) {
                Some(i) => {
                    let (h0, h1) = trim(buf, hs, hs + i);
                    (
                        Span::new(h0, h1),
                        Some(parse_port(trim_slice(tail(hostport, i + 1)))?),
                    )
                }
                None => (Span::new(hs, he), None),
            }
        };
        // sent-by is a host name or an IP literal, and the parameters are `;name[=value]` with
        // token, host or quoted-string values. Anything else (angle brackets, stray quotes,
        // control bytes) is garbage that would make our edits change the element structure.
        let host_ok = host.of(buf).iter().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'[' | b']' | b':')
        });
        if host.is_empty() || !host_ok || !super::params_well_formed(sub(buf, sb_end, e)) {
            return None;
        }
        let mut via = Via {
            element: el,
            transport,
            host,
            port,
            branch: None,
            received: None,
            rport: Rport::Absent,
        };
        for (name, value) in params(buf, sb_end, e) {
            let n = name.of(buf);
            if n.eq_ignore_ascii_case(b"branch") {
                via.branch = value;
            } else if n.eq_ignore_ascii_case(b"received") {
                via.received = value;
            } else if n.eq_ignore_ascii_case(b"rport") {
                via.rport = match value {
                    Some(v) if !v.is_empty() => Rport::Value(v, parse_port(v.of(buf))),
                    _ => Rport::Empty(name),
                };
            }
        }
        Some(via)
    }

    pub fn branch<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        self.branch.map_or(&b""[..], |b| b.of(buf))
    }
}

fn trim_slice(b: &[u8]) -> &[u8] {
    let (s, e) = trim(b, 0, b.len());
    sub(b, s, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(s: &str) -> Option<(Via, Vec<u8>)> {
        let b = s.as_bytes().to_vec();
        let v = Via::parse(&b, Span::new(0, b.len()))?;
        Some((v, b))
    }

    #[test]
    fn parses_common_and_odd_forms() {
        let (v, b) = via("SIP/2.0/UDP 192.0.2.1:5062;branch=z9hG4bK776;rport").unwrap();
        assert_eq!(v.transport, ViaTransport::Udp);
        assert_eq!(v.host.of(&b), b"192.0.2.1");
        assert_eq!(v.port, Some(5062));
        assert_eq!(v.branch(&b), b"z9hG4bK776");
        assert!(matches!(v.rport, Rport::Empty(_)));

        let (v, b) =
            via("SIP / 2.0 / TCP [2001:db8::9]:5060 ; received=1.2.3.4 ; rport=9").unwrap();
        assert_eq!(v.transport, ViaTransport::Tcp);
        assert_eq!(v.host.of(&b), b"[2001:db8::9]");
        assert_eq!(
            v.received.map(|r| r.of(&b).to_vec()),
            Some(b"1.2.3.4".to_vec())
        );
        assert!(matches!(v.rport, Rport::Value(_, Some(9))));

        let (v, b) = via("SIP/2.0/UDP pc33.example.com").unwrap();
        assert_eq!(v.host.of(&b), b"pc33.example.com");
        assert_eq!(v.port, None);
    }

    #[test]
    fn rejects_garbage() {
        assert!(via("").is_none());
        assert!(via("SIP/2.0").is_none());
        assert!(via("SIP/2.0/UDP host:99999").is_none());
        assert!(via("SIP/2.0/UDP [::1").is_none());
        assert!(via("SIP/2.0/UDP ;branch=x").is_none());
        assert!(via("SIP/2.0/UDP h;received=1.2.3.4\u{17} <sip:x").is_none());
        assert!(via("SIP/2.0/UDP h;branch=\"unterminated").is_none());
        assert!(via("SIP/2.0/UDP h<x>;branch=z9hG4bK1").is_none());
        assert!(via("SIP/2.0/UDP 192.0.2.15;;").is_none());
        assert!(
            via("SIP/2.0/UDP h;x=\"a\\\";received=1\"").is_some_and(|(v, _)| v.received.is_none())
        );
    }
}
