//! Header names the proxy and the detectors care about, recognised in long and compact form
//! (RFC 3261 §7.3.3) without allocating.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderName {
    Via,
    From,
    To,
    CallId,
    CSeq,
    Contact,
    ContentLength,
    ContentType,
    MaxForwards,
    Route,
    RecordRoute,
    Path,
    UserAgent,
    Authorization,
    ProxyAuthorization,
    Supported,
    Require,
    ProxyRequire,
    Expires,
    Subject,
    Event,
    ReferTo,
    Other,
}

impl HeaderName {
    /// Classify a header name (already trimmed). Compact forms: v f t i m l c s k o r b u e.
    pub fn parse(name: &[u8]) -> HeaderName {
        use HeaderName::*;
        if name.len() == 1 {
            return match super::at(name, 0).to_ascii_lowercase() {
                b'v' => Via,
                b'f' => From,
                b't' => To,
                b'i' => CallId,
                b'm' => Contact,
                b'l' => ContentLength,
                b'c' => ContentType,
                b'k' => Supported,
                b's' => Subject,
                b'o' => Event,
                b'r' => ReferTo,
                _ => Other,
            };
        }
        let eq = |s: &str| name.eq_ignore_ascii_case(s.as_bytes());
        match name.len() {
            3 if eq("via") => Via,
            4 if eq("from") => From,
            2 if eq("to") => To,
            7 if eq("call-id") => CallId,
            4 if eq("cseq") => CSeq,
            7 if eq("contact") => Contact,
            14 if eq("content-length") => ContentLength,
            12 if eq("content-type") => ContentType,
            12 if eq("max-forwards") => MaxForwards,
            5 if eq("route") => Route,
            12 if eq("record-route") => RecordRoute,
            4 if eq("path") => Path,
            10 if eq("user-agent") => UserAgent,
            13 if eq("authorization") => Authorization,
            19 if eq("proxy-authorization") => ProxyAuthorization,
            9 if eq("supported") => Supported,
            7 if eq("require") => Require,
            13 if eq("proxy-require") => ProxyRequire,
            7 if eq("expires") => Expires,
            7 if eq("subject") => Subject,
            5 if eq("event") => Event,
            8 if eq("refer-to") => ReferTo,
            _ => Other,
        }
    }

    /// Headers that may carry several comma-separated values in one line.
    pub fn is_list(self) -> bool {
        matches!(
            self,
            HeaderName::Via
                | HeaderName::Route
                | HeaderName::RecordRoute
                | HeaderName::Path
                | HeaderName::Contact
        )
    }
}

#[cfg(test)]
mod tests {
    use super::HeaderName::{self, *};

    #[test]
    fn long_and_compact_forms() {
        for (s, h) in [
            ("Via", Via),
            ("v", Via),
            ("V", Via),
            ("cALL-iD", CallId),
            ("i", CallId),
            ("l", ContentLength),
            ("Content-Length", ContentLength),
            ("m", Contact),
            ("X-Foo", Other),
            ("", Other),
        ] {
            assert_eq!(HeaderName::parse(s.as_bytes()), h, "{s}");
        }
    }
}
