use super::*;

#[test]
fn pending_handshakes_are_capped_per_network_and_released() {
    let p = Arc::new(Pending::default());
    let net = |s: &str| crate::blocks::source_net(s.parse().unwrap(), 64);
    let a = p.enter(net("192.0.2.1"), 2, 3).expect("first");
    let _b = p.enter(net("192.0.2.1"), 2, 3).expect("second");
    assert!(p.enter(net("192.0.2.1"), 2, 3).is_none(), "per address");
    // One /64 is one source.
    let _c = p.enter(net("2001:db8::1"), 1, 3).expect("v6");
    assert!(p.enter(net("2001:db8::2"), 1, 3).is_none(), "same /64");
    assert!(p.enter(net("192.0.2.9"), 2, 3).is_none(), "total");
    drop(a);
    assert!(
        p.enter(net("192.0.2.1"), 2, 3).is_some(),
        "released on drop"
    );
}

#[test]
fn the_sip_subprotocol_is_found_among_the_offers() {
    let req = |v: Option<&str>| {
        let mut b = Request::builder().uri("/");
        if let Some(v) = v {
            b = b.header("Sec-WebSocket-Protocol", v);
        }
        b.body(()).unwrap()
    };
    assert!(offers_sip(&req(Some("sip"))));
    assert!(offers_sip(&req(Some("chat, SIP"))));
    assert!(!offers_sip(&req(Some("sips, chat"))));
    assert!(!offers_sip(&req(None)));
}

#[tokio::test]
async fn rewind_replays_the_peeked_bytes_first() {
    use tokio::io::AsyncReadExt;
    let (mut a, b) = tokio::io::duplex(64);
    tokio::io::AsyncWriteExt::write_all(&mut a, b"ET / HTTP/1.1")
        .await
        .unwrap();
    drop(a);
    let mut r = Rewind::new(Bytes::from_static(b"G"), b);
    let mut s = String::new();
    r.read_to_string(&mut s).await.unwrap();
    assert_eq!(s, "GET / HTTP/1.1");
}
