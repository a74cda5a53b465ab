//! SIP URIs and name-addr values (`"Bob" <sip:bob@host;lr>;tag=1`), as spans.

use super::{params, parse_port, trim, Span};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uri {
    pub whole: Span,
    pub user: Option<Span>,
    /// Host, brackets included for IPv6.
    pub host: Span,
    pub port: Option<u16>,
    /// From the first `;` (included) to `?` or the end.
    pub params: Span,
}

impl Uri {
    /// Parse `buf[sp]` as a sip: or sips: URI.
    pub fn parse(buf: &[u8], sp: Span) -> Option<Uri> {
        let (s, e) = trim(buf, sp.start as usize, sp.end as usize);
        let slice = &buf[s..e];
        let colon = memchr::memchr(b':', slice)?;
        let scheme = &slice[..colon];
        if !(scheme.eq_ignore_ascii_case(b"sip") || scheme.eq_ignore_ascii_case(b"sips")) {
            return None;
        }
        let rest_start = s + colon + 1;
        // The user part ends at the last '@' before any ';' or '?' of the host part.
        let hdr_q = memchr::memchr(b'?', &buf[rest_start..e]).map_or(e, |i| rest_start + i);
        let at = memchr::memrchr(b'@', &buf[rest_start..hdr_q]).map(|i| rest_start + i);
        let (user, host_start) = match at {
            Some(a) => {
                let ue = memchr::memchr(b':', &buf[rest_start..a]).map_or(a, |i| rest_start + i);
                (Some(Span::new(rest_start, ue)), a + 1)
            }
            None => (None, rest_start),
        };
        let params_start =
            memchr::memchr(b';', &buf[host_start..hdr_q]).map_or(hdr_q, |i| host_start + i);
        let hostport = &buf[host_start..params_start];
        if hostport.is_empty() {
            return None;
        }
        let (host, port) = if hostport[0] == b'[' {
            let close = memchr::memchr(b']', hostport)?;
            let port = match &hostport[close + 1..] {
                [] => None,
                [b':', p @ ..] => Some(parse_port(p)?),
                _ => return None,
            };
            (Span::new(host_start, host_start + close + 1), port)
        } else {
            match memchr::memchr(b':', hostport) {
                Some(i) => (
                    Span::new(host_start, host_start + i),
                    Some(parse_port(&hostport[i + 1..])?),
                ),
                None => (Span::new(host_start, params_start), None),
            }
        };
        if host.is_empty() {
            return None;
        }
        Some(Uri {
            whole: Span::new(s, e),
            user,
            host,
            port,
            params: Span::new(params_start, hdr_q),
        })
    }

    /// The value of URI parameter `name`: `Some(None)` for a flag like `;lr`.
    pub fn param(&self, buf: &[u8], name: &[u8]) -> Option<Option<Span>> {
        params(buf, self.params.start as usize, self.params.end as usize)
            .find(|(n, _)| n.of(buf).eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn user<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        self.user.map_or(&b""[..], |u| u.of(buf))
    }
}

/// A name-addr or addr-spec header value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NameAddr {
    /// The URI, without angle brackets.
    pub uri: Span,
    /// Header parameters after the URI (`;tag=..`, `;expires=..`), from the first `;`.
    pub params: Span,
}

impl NameAddr {
    pub fn parse(buf: &[u8], sp: Span) -> Option<NameAddr> {
        let (s, e) = trim(buf, sp.start as usize, sp.end as usize);
        let slice = &buf[s..e];
        // Skip a quoted display name, which may contain '<'.
        let mut i = 0;
        if slice.first() == Some(&b'"') {
            i = 1;
            let mut esc = false;
            while i < slice.len() {
                match slice[i] {
                    _ if esc => esc = false,
                    b'\\' => esc = true,
                    b'"' => break,
                    _ => {}
                }
                i += 1;
            }
        }
        match memchr::memchr(b'<', &slice[i.min(slice.len())..]) {
            Some(lt) => {
                let lt = i + lt;
                let gt = memchr::memchr(b'>', &slice[lt..])? + lt;
                Some(NameAddr {
                    uri: Span::new(s + lt + 1, s + gt),
                    params: Span::new(s + gt + 1, e),
                })
            }
            None => {
                let semi = memchr::memchr(b';', slice).unwrap_or(slice.len());
                let (us, ue) = trim(buf, s, s + semi);
                Some(NameAddr {
                    uri: Span::new(us, ue),
                    params: Span::new(s + semi, e),
                })
            }
        }
    }

    pub fn param(&self, buf: &[u8], name: &[u8]) -> Option<Option<Span>> {
        params(buf, self.params.start as usize, self.params.end as usize)
            .find(|(n, _)| n.of(buf).eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    pub fn tag<'a>(&self, buf: &'a [u8]) -> Option<&'a [u8]> {
        self.param(buf, b"tag").flatten().map(|s| s.of(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(b: &[u8]) -> Span {
        Span::new(0, b.len())
    }

    #[test]
    fn uri_parts() {
        let b = b"sip:alice:pw@[2001:db8::1]:5070;transport=tcp;lr?Subject=x";
        let u = Uri::parse(b, span(b)).unwrap();
        assert_eq!(u.user(b), b"alice");
        assert_eq!(u.host.of(b), b"[2001:db8::1]");
        assert_eq!(u.port, Some(5070));
        assert_eq!(
            u.param(b, b"transport").flatten().map(|s| s.of(b)),
            Some(&b"tcp"[..])
        );
        assert_eq!(u.param(b, b"lr"), Some(None));
        let b = b"sip:example.com";
        let u = Uri::parse(b, span(b)).unwrap();
        assert_eq!(u.user, None);
        assert_eq!(u.host.of(b), b"example.com");
        assert!(Uri::parse(b"http://x", span(b"http://x")).is_none());
        assert!(Uri::parse(b"sip:", span(b"sip:")).is_none());
        assert!(Uri::parse(b"sip:h:70000", span(b"sip:h:70000")).is_none());
    }

    #[test]
    fn name_addr_forms() {
        let b = br#""Bob <boss>" <sip:bob@biloxi.com;lr>;tag=a6c85cf"#;
        let n = NameAddr::parse(b, span(b)).unwrap();
        assert_eq!(n.uri.of(b), b"sip:bob@biloxi.com;lr");
        assert_eq!(n.tag(b), Some(&b"a6c85cf"[..]));
        let b = b"sip:bob@biloxi.com;tag=1";
        let n = NameAddr::parse(b, span(b)).unwrap();
        assert_eq!(n.uri.of(b), b"sip:bob@biloxi.com");
        assert_eq!(n.tag(b), Some(&b"1"[..]));
    }
}
