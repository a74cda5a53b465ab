use super::*;

const INVITE: &[u8] = b"INVITE sip:bob@biloxi.com SIP/2.0\r\n\
Via: SIP/2.0/UDP pc33.atlanta.com;branch=z9hG4bK776asdhds\r\n\
Max-Forwards: 70\r\n\
To: Bob <sip:bob@biloxi.com>\r\n\
From: Alice <sip:alice@atlanta.com>;tag=1928301774\r\n\
Call-ID: a84b4c76e66710@pc33.atlanta.com\r\n\
CSeq: 314159 INVITE\r\n\
Contact: <sip:alice@pc33.atlanta.com>\r\n\
Content-Type: application/sdp\r\n\
Content-Length: 4\r\n\
\r\n\
v=0\n";

#[test]
fn scans_request() {
    let m = parse(INVITE, Framing::Datagram).unwrap();
    assert_eq!(m.method(), Some(Method::Invite));
    assert_eq!(m.request_uri().unwrap().of(INVITE), b"sip:bob@biloxi.com");
    assert_eq!(m.headers.len(), 9);
    assert_eq!(m.call_id(), b"a84b4c76e66710@pc33.atlanta.com");
    assert_eq!(m.cseq(), Some((314159, &b"INVITE"[..])));
    assert_eq!(m.max_forwards(), Some(Ok(70)));
    assert_eq!(m.body.of(INVITE), b"v=0\n");
}

#[test]
fn compact_folded_and_lf_only() {
    let raw = b"OPTIONS sip:x@y SIP/2.0\nv: SIP/2.0/UDP h\n ;branch=z9hG4bKa\ni: 1\nl: 0\n\n";
    let m = parse(raw, Framing::Datagram).unwrap();
    let via = m.value(HeaderName::Via).unwrap();
    assert!(via.starts_with(b"SIP/2.0/UDP h") && via.ends_with(b";branch=z9hG4bKa"));
    assert_eq!(m.call_id(), b"1");
    assert_eq!(m.content_length, Some(0));
}

#[test]
fn response_line() {
    let raw = b"SIP/2.0 401 Unauthorized\r\nVia: SIP/2.0/UDP h;branch=z9hG4bKa\r\n\r\n";
    let m = parse(raw, Framing::Datagram).unwrap();
    assert_eq!(m.status(), Some(401));
    let raw = b"SIP/2.0 99 Nope\r\n\r\n";
    assert_eq!(
        parse(raw, Framing::Datagram).unwrap_err(),
        ParseError::BadStartLine
    );
}

#[test]
fn content_length_rules() {
    let mut trunc = INVITE.to_vec();
    trunc.truncate(INVITE.len() - 2);
    assert_eq!(
        parse(&trunc, Framing::Datagram).unwrap_err(),
        ParseError::Truncated
    );
    let mut extra = INVITE.to_vec();
    extra.extend_from_slice(b"garbage");
    let m = parse(&extra, Framing::Datagram).unwrap();
    assert_eq!(m.framed(), INVITE, "bytes past Content-Length are dropped");
    let bad = b"OPTIONS sip:x@y SIP/2.0\r\nContent-Length: -1\r\n\r\n";
    assert_eq!(
        parse(bad, Framing::Datagram).unwrap_err(),
        ParseError::BadContentLength
    );
    let two = b"OPTIONS sip:x@y SIP/2.0\r\nl: 1\r\nContent-Length: 2\r\n\r\nab";
    assert_eq!(
        parse(two, Framing::Datagram).unwrap_err(),
        ParseError::BadContentLength
    );
}

#[test]
fn garbage_is_an_error_not_a_panic() {
    for raw in [
        &b""[..],
        b"\r\n\r\n",
        b"\x00\x01\x02\xff",
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"INVITE sip:x SIP/2.0",
        b"INVITE sip:x SIP/2.0\r\nNoColon\r\n\r\n",
        b"INVITE  SIP/2.0\r\n\r\n",
        b"SIP/2.0 200\r\n : x\r\n\r\n",
        b" folded-first: x\r\n",
    ] {
        assert!(
            parse(raw, Framing::Datagram).is_err(),
            "{:?}",
            String::from_utf8_lossy(raw)
        );
    }
}

#[test]
fn header_count_is_bounded() {
    let mut raw = b"OPTIONS sip:x@y SIP/2.0\r\n".to_vec();
    for _ in 0..=MAX_HEADERS {
        raw.extend_from_slice(b"X: y\r\n");
    }
    raw.extend_from_slice(b"\r\n");
    assert_eq!(
        parse(&raw, Framing::Datagram).unwrap_err(),
        ParseError::TooManyHeaders
    );
}

#[test]
fn rfc4475_integer_fields_and_request_uri() {
    // §3.1.1.1: leading zeros, and a CSeq folded over two lines.
    let raw =
        b"INVITE sip:a@b SIP/2.0\r\nMax-Forwards: 0068\r\ncseq: 0009\r\n  INVITE\r\nl: 0\r\n\r\n";
    let m = parse(raw, Framing::Datagram).unwrap();
    assert_eq!(m.max_forwards(), Some(Ok(68)));
    assert_eq!(m.cseq(), Some((9, &b"INVITE"[..])));
    let raw = b"OPTIONS sip:a@b SIP/2.0\r\nMax-Forwards: 0256\r\nl: 0\r\n\r\n";
    assert_eq!(
        parse(raw, Framing::Datagram).unwrap().max_forwards(),
        Some(Err(()))
    );
    // §3.1.2.7: a Request-URI in angle brackets is no URI.
    let raw = b"INVITE <sip:user@example.com> SIP/2.0\r\nl: 0\r\n\r\n";
    assert_eq!(
        parse(raw, Framing::Datagram).unwrap_err(),
        ParseError::BadStartLine
    );
    let raw = b"OPTIONS soap.beep://192.0.2.103:3002 SIP/2.0\r\nl: 0\r\n\r\n";
    assert!(parse(raw, Framing::Datagram).is_ok());
}

#[test]
fn token_table_is_the_rfc_3261_token_set() {
    for b in 0..=255u8 {
        let rfc = b.is_ascii_alphanumeric() || b"-.!%*_+`'~".contains(&b);
        assert_eq!(is_token(b), rfc, "byte {b}");
    }
}

#[test]
fn commas_and_params_outside_quotes_and_brackets() {
    let v = br#""a, \"b" <sip:x;p=1,2>;q=1 , c;x="y;z";w"#;
    let parts: Vec<&[u8]> = crate::wire::split_commas(v, 0).map(|s| s.of(v)).collect();
    assert_eq!(
        parts,
        [&br#""a, \"b" <sip:x;p=1,2>;q=1"#[..], br#"c;x="y;z";w"#]
    );
    let c = parts.get(1).copied().unwrap_or_default();
    let ps: Vec<(&[u8], Option<&[u8]>)> = crate::wire::params(c, 0, c.len() + 10)
        .map(|(n, v)| (n.of(c), v.map(|v| v.of(c))))
        .collect();
    assert_eq!(ps, [(&b"x"[..], Some(&br#""y;z""#[..])), (b"w", None)]);
}
