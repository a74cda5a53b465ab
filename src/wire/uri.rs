//! SIP URIs and name-addr values (`"Bob" <sip:bob@host;lr>;tag=1`), as spans.

use super::{at, params, params_well_formed, parse_port, quoted_end, sub, tail, trim, Span};

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
        let slice = sub(buf, s, e);
        let colon = super::find(b':', slice)?;
        let scheme = sub(slice, 0, colon);
        if !(scheme.eq_ignore_ascii_case(b"sip") || scheme.eq_ignore_ascii_case(b"sips")) {
            return None;
        }
        let rest_start = s + colon + 1;
        // The user part ends at the last '@': a user may contain ';', '?' and '/' (RFC 3261
        // user-unreserved; RFC 4475 §3.1.1.2), but neither parameters nor headers may hold an
        // unescaped '@'. Headers start at the first '?' after the host.
        let at_sign = super::rfind(b'@', sub(buf, rest_start, e)).map(|i| rest_start + i);
        let host_from = at_sign.map_or(rest_start, |a| a + 1);
        let hdr_q = super::find(b'?', sub(buf, host_from, e)).map_or(e, |i| host_from + i);
        let (user, host_start) = match at_sign {
            Some(a) => {
                let ue = super::find(b':', sub(buf, rest_start, a)).map_or(a, |i| rest_start + i);
                (Some(Span::new(rest_start, ue)), a + 1)
            }
            None => (None, rest_start),
        };
        let params_start =
            super::find(b';', sub(buf, host_start, hdr_q)).map_or(hdr_q, |i| host_start + i);
        let hostport = sub(buf, host_start, params_start);
        if hostport.is_empty() {
            return None;
        }
        let (host, port) = if at(hostport, 0) == b'[' {
            let close = super::find(b']', hostport)?;
            let port = match tail(hostport, close + 1) {
                [] => None,
                [b':', p @ ..] => Some(parse_port(p)?),
                _ => return None,
            };
            (Span::new(host_start, host_start + close + 1), port)
        } else {
            match super::find(b':', hostport) {
                Some(i) => (
                    Span::new(host_start, host_start + i),
                    Some(parse_port(tail(hostport, i + 1))?),
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

    /// Whether the URI carries `?headers`, which a Request-URI must not (RFC 3261 §19.1.1).
    pub fn has_headers(&self) -> bool {
        self.params.end < self.whole.end
    }
}

/// Syntax check of one name-addr or addr-spec with its header parameters (a From, To or one
/// Contact element), beyond what [`NameAddr::parse`] needs to find the URI: a terminated
/// quoted display name (RFC 4475 §3.1.2.6), an unquoted display name of tokens only (§3.1.2.15),
/// no LWS inside `<>` (§3.1.2.14), no `?headers` outside `<>` (§3.1.2.13), a URI with a scheme,
/// and `;name[=value]` parameters. Lenient where real phones are: no LWS needed before `<`
/// (§3.1.1.6) and UTF-8 allowed in an unquoted display name.
pub fn name_addr_well_formed(buf: &[u8], sp: Span) -> bool {
    let (s, e) = trim(buf, sp.start as usize, sp.end as usize);
    let Some(v) = buf.get(s..e) else {
        return false;
    };
    let is_display = |b: &u8| super::scan::is_token(*b) || super::is_lws(*b) || *b >= 0x80;
    let rest = if v.first() == Some(&b'"') {
        let Some(close) = quoted_end(v) else {
            return false;
        };
        let (a, b) = trim(v, close, v.len());
        let after = sub(v, a, b);
        if after.first() != Some(&b'<') {
            return false;
        }
        after
    } else if let Some(lt) = super::find(b'<', v) {
        if !sub(v, 0, lt).iter().all(is_display) {
            return false;
        }
        tail(v, lt)
    } else {
        // addr-spec: the URI runs to the first ';', and may not hold '?' or ','.
        let semi = super::find(b';', v).unwrap_or(v.len());
        let (a, b) = trim(v, 0, semi);
        let uri = sub(v, a, b);
        return has_scheme(uri)
            && !uri
                .iter()
                .any(|c| super::is_lws(*c) || matches!(c, b'?' | b',' | b'"' | b'<' | b'>'))
            && params_well_formed(tail(v, semi));
    };
    // `rest` starts at '<'.
    let Some(gt) = super::find(b'>', rest) else {
        return false;
    };
    let uri = sub(rest, 1, gt);
    has_scheme(uri)
        && !uri.iter().any(|c| super::is_lws(*c) || *c == b'<')
        && params_well_formed(tail(rest, gt + 1))
}

fn has_scheme(uri: &[u8]) -> bool {
    let Some(colon) = super::find(b':', uri) else {
        return false;
    };
    colon + 1 < uri.len()
        && at(uri, 0).is_ascii_alphabetic()
        && sub(uri, 0, colon)
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'))
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
        let slice = sub(buf, s, e);
        // Skip a quoted display name, which may contain '<'.
        let mut i = 0;
        if slice.first() == Some(&b'"') {
            i = 1;
            let mut esc = false;
            while i < slice.len() {
                match at(slice, i) {
                    _ if esc => esc = false,
                    b'\\' => esc = true,
                    b'"' => break,
                    _ => {}
                }
                i += 1;
            }
        }
        match super::find(b'<', tail(slice, i.min(slice.len()))) {
            Some(lt) => {
                let lt = i + lt;
                let gt = super::find(b'>', tail(slice, lt))? + lt;
                Some(NameAddr {
                    uri: Span::new(s + lt + 1, s + gt),
                    params: Span::new(s + gt + 1, e),
                })
            }
            None => {
                let semi = super::find(b';', slice).unwrap_or(slice.len());
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
    fn name_addr_syntax() {
        for (v, ok) in [
            (
                &br#""Bob <boss>" <sip:bob@biloxi.com;lr>;tag=a6c85cf"#[..],
                true,
            ),
            (b"sip:bob@biloxi.com;tag=1", true),
            (b"caller<sip:caller@example.com>;tag=323", true),
            (b"sip:vivekg@example.com ;   tag    = 1918181833n", true),
            (b"\"J \\\\\\\"\" <sip:j@example.com>  ;\r\n  tag = 98", true),
            (
                br#"<sip:a@b>;+sip.instance="<urn:uuid:1>";reg-id=1;q=0.5"#,
                true,
            ),
            (b"<name:John_Smith>", true),
            (b"isbn:2983792873", true),
            (br#""Mr. J. User <sip:j.user@example.com>"#, false),
            (b"Bell, Alexander <sip:a.g.bell@example.com>;tag=43", false),
            (br#""Watson, Thomas" < sip:t.watson@example.org >"#, false),
            (
                b"sip:user@example.com?Route=%3Csip:sip.example.com%3E",
                false,
            ),
            (br#""Joe" <sip:joe@example.org>;;;;"#, false),
            (b"<sip:a@b", false),
            (b"", false),
            (b"<>", false),
        ] {
            assert_eq!(
                name_addr_well_formed(v, span(v)),
                ok,
                "{}",
                String::from_utf8_lossy(v)
            );
        }
    }

    #[test]
    fn user_part_may_hold_question_mark() {
        let b = b"sip:1_unusual.URI~(to-be!sure)&isn't+it$/crazy?,/;;*:&it+has=1,weird!*pas$wo~d_too.(doesn't-it)@example.com";
        let u = Uri::parse(b, span(b)).unwrap();
        assert_eq!(u.host.of(b), b"example.com");
        assert!(!u.has_headers());
        let b = b"sip:user@example.com?Route=%3Csip:example.com%3E";
        let u = Uri::parse(b, span(b)).unwrap();
        assert_eq!(u.host.of(b), b"example.com");
        assert!(u.has_headers());
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
