//! Phones register and call through sipwarden to a PBX, over UDP and TCP.

use crate::harness::*;
use sipwarden::config::IncomingMode;
use std::time::Duration;

const NAT_VIA: &str = "UDP 192.168.1.50:5060";
const NAT_CONTACT: &str = "Contact: <sip:1001@192.168.1.50:5060;line=abc>;expires=3600\r\n";

/// REGISTER, 401 challenge, REGISTER with credentials, 200: returns the REGISTER the PBX saw
/// last.
async fn register(phone: &Ua, pbx: &Ua, proxy: &Proxy, call_id: &str) -> String {
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        NAT_VIA,
        "z9hG4bKreg1",
        "1001",
        "1001",
        call_id,
        1,
        NAT_CONTACT,
    );
    phone.send(proxy.udp, &reg).await;
    let (seen, from) = pbx.recv().await;
    assert_eq!(from, proxy.udp);
    let v = vias(&seen);
    assert_eq!(v.len(), 2, "{seen}");
    assert!(
        branch(&v[0]).starts_with("z9hG4bKsw"),
        "our Via on top: {seen}"
    );
    assert!(
        v[1].contains("received=127.0.0.2")
            && v[1].contains(&format!("rport={}", phone.addr.port())),
        "{}",
        v[1]
    );
    assert_eq!(header(&seen, "Max-Forwards"), Some("69"));
    pbx.send(
        from,
        &respond(
            &seen,
            401,
            "Unauthorized",
            "WWW-Authenticate: Digest realm=\"pbx.test\", nonce=\"n1\"\r\n",
        ),
    )
    .await;
    let (challenge, _) = phone.recv().await;
    assert!(first_line(&challenge).starts_with("SIP/2.0 401"));
    assert_eq!(vias(&challenge).len(), 1, "our Via popped: {challenge}");

    let auth = format!("{NAT_CONTACT}Authorization: Digest username=\"1001\", realm=\"pbx.test\", nonce=\"n1\", uri=\"sip:pbx.test\", response=\"00\"\r\n");
    let reg2 = request(
        "REGISTER",
        "sip:pbx.test",
        NAT_VIA,
        "z9hG4bKreg2",
        "1001",
        "1001",
        call_id,
        2,
        &auth,
    );
    phone.send(proxy.udp, &reg2).await;
    let (seen2, from) = pbx.recv().await;
    let contact = header(&seen2, "Contact").unwrap_or("").to_string();
    let path = header(&seen2, "Path")
        .map(|p| format!("Path: {p}\r\n"))
        .unwrap_or_default();
    pbx.send(
        from,
        &respond(&seen2, 200, "OK", &format!("Contact: {contact}\r\n{path}")),
    )
    .await;
    let (ok, _) = phone.recv().await;
    assert!(first_line(&ok).starts_with("SIP/2.0 200"), "{ok}");
    assert_eq!(
        header(&ok, "Contact"),
        Some(NAT_CONTACT.trim_end().trim_start_matches("Contact: ")),
        "the phone sees its own Contact"
    );
    seen2
}

#[tokio::test]
async fn register_and_incoming_call_behind_nat_path_mode() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let phone = Ua::bind("127.0.0.2").await;
    let seen = register(&phone, &pbx, &proxy, "reg-path").await;
    let path = header(&seen, "Path").expect("Path added");
    assert!(path.contains(";lr") && path.contains(";ob"), "{path}");

    // The PBX calls the phone: Request-URI is the private Contact, Route is the Path.
    let invite = format!(
        "INVITE sip:1001@192.168.1.50:5060;line=abc SIP/2.0\r\n\
Via: SIP/2.0/UDP {pbx};branch=z9hG4bKpbx1\r\n\
Route: {path}\r\n\
Max-Forwards: 70\r\n\
From: <sip:1002@pbx.test>;tag=p1\r\nTo: <sip:1001@pbx.test>\r\n\
Call-ID: in-1\r\nCSeq: 1 INVITE\r\nContact: <sip:1002@{pbx}>\r\nContent-Length: 0\r\n\r\n",
        pbx = pbx.addr
    );
    pbx.send(proxy.udp, &invite).await;
    let (got, from) = phone.recv().await;
    assert_eq!(from, proxy.udp);
    assert_eq!(
        first_line(&got),
        "INVITE sip:1001@192.168.1.50:5060;line=abc SIP/2.0"
    );
    assert!(header(&got, "Route").is_none(), "our Route popped: {got}");
    let rr = headers(&got, "Record-Route");
    assert_eq!(rr.len(), 1, "{got}");
    assert_eq!(vias(&got).len(), 2);

    // 180 and 200 back to the PBX.
    for (code, reason) in [(180, "Ringing"), (200, "OK")] {
        phone
            .send(
                proxy.udp,
                &respond(
                    &got,
                    code,
                    reason,
                    "Contact: <sip:1001@192.168.1.50:5060>\r\n",
                ),
            )
            .await;
        let (resp, _) = pbx.recv().await;
        assert!(first_line(&resp).starts_with(&format!("SIP/2.0 {code}")));
        assert_eq!(vias(&resp).len(), 1, "{resp}");
    }
    // The phone hangs up: in-dialog BYE routed by the Record-Route.
    let bye = request(
        "BYE",
        &format!("sip:1002@{}", pbx.addr),
        NAT_VIA,
        "z9hG4bKbye",
        "1001",
        "1002",
        "in-1",
        2,
        &format!("Route: {}\r\n", rr[0]),
    );
    phone.send(proxy.udp, &bye).await;
    let (b, _) = pbx.recv().await;
    assert!(first_line(&b).starts_with("BYE"));
    assert!(header(&b, "Route").is_none());
    proxy.stop().await;
}

#[tokio::test]
async fn contact_mode_rewrites_and_restores() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |c| c.upstream.incoming = IncomingMode::Contact).await;
    let phone = Ua::bind("127.0.0.2").await;
    let seen = register(&phone, &pbx, &proxy, "reg-contact").await;
    assert!(header(&seen, "Path").is_none());
    let contact = header(&seen, "Contact").unwrap();
    assert!(
        contact.contains(&proxy.udp.to_string()) && contact.contains("swc="),
        "{contact}"
    );
    let uri = contact.trim_start_matches('<').split('>').next().unwrap();

    let invite = format!(
        "INVITE {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {pbx};branch=z9hG4bKpbx2\r\nMax-Forwards: 70\r\n\
From: <sip:1002@pbx.test>;tag=p2\r\nTo: <sip:1001@pbx.test>\r\nCall-ID: in-2\r\nCSeq: 1 INVITE\r\n\
Contact: <sip:1002@{pbx}>\r\nContent-Length: 0\r\n\r\n",
        pbx = pbx.addr
    );
    pbx.send(proxy.udp, &invite).await;
    let (got, _) = phone.recv().await;
    assert_eq!(
        first_line(&got),
        "INVITE sip:1001@192.168.1.50:5060;line=abc SIP/2.0",
        "original URI restored"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn tcp_phone_udp_pbx() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let mut phone = TcpUa::connect(proxy.tcp).await;
    let contact = "Contact: <sip:1003@10.0.0.9:5060;transport=tcp>\r\n";
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        "TCP 10.0.0.9:5060",
        "z9hG4bKt1",
        "1003",
        "1003",
        "tcp-1",
        1,
        contact,
    );
    phone.send(&reg).await;
    let (seen, from) = pbx.recv().await;
    let v = vias(&seen);
    assert!(
        v[0].starts_with("SIP/2.0/UDP"),
        "UDP towards the PBX: {}",
        v[0]
    );
    assert!(
        v[1].starts_with("SIP/2.0/TCP") && v[1].contains(&format!("rport={}", phone.addr.port()))
    );
    let path = header(&seen, "Path").unwrap().to_string();
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    let ok = phone.recv().await;
    assert!(
        first_line(&ok).starts_with("SIP/2.0 200"),
        "response over the phone's connection: {ok}"
    );

    // An incoming call reaches the phone over its own connection; Record-Route is doubled
    // because the two sides use different transports.
    let invite = format!(
        "INVITE sip:1003@10.0.0.9:5060;transport=tcp SIP/2.0\r\nVia: SIP/2.0/UDP {pbx};branch=z9hG4bKpbx3\r\n\
Route: {path}\r\nMax-Forwards: 70\r\nFrom: <sip:1002@pbx.test>;tag=p3\r\nTo: <sip:1003@pbx.test>\r\n\
Call-ID: in-3\r\nCSeq: 1 INVITE\r\nContact: <sip:1002@{pbx}>\r\nContent-Length: 0\r\n\r\n",
        pbx = pbx.addr
    );
    pbx.send(proxy.udp, &invite).await;
    let got = phone.recv().await;
    assert!(first_line(&got).starts_with("INVITE"));
    let rr = headers(&got, "Record-Route");
    assert_eq!(rr.len(), 2, "{got}");
    assert!(
        rr[0].contains("transport=tcp"),
        "top entry faces the phone: {}",
        rr[0]
    );
    assert!(vias(&got)[0].starts_with("SIP/2.0/TCP"));
    phone.send(&respond(&got, 486, "Busy Here", "")).await;
    let (busy, _) = pbx.recv().await;
    assert!(first_line(&busy).starts_with("SIP/2.0 486"));

    // CRLF keep-alive ping gets a pong.
    phone.send("\r\n\r\n").await;
    proxy.stop().await;
}

#[tokio::test]
async fn cancel_and_non_2xx_ack_keep_the_invite_branch() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let phone = Ua::bind("127.0.0.2").await;
    let inv = request(
        "INVITE",
        "sip:1002@pbx.test",
        NAT_VIA,
        "z9hG4bKinv",
        "1001",
        "1002",
        "c-1",
        1,
        "Contact: <sip:1001@192.168.1.50>\r\n",
    );
    phone.send(proxy.udp, &inv).await;
    let (seen_inv, _) = pbx.recv().await;
    assert_eq!(headers(&seen_inv, "Record-Route").len(), 1);
    // Retransmission: same branch.
    phone.send(proxy.udp, &inv).await;
    let (again, _) = pbx.recv().await;
    assert_eq!(branch(&vias(&again)[0]), branch(&vias(&seen_inv)[0]));

    let cancel = request(
        "CANCEL",
        "sip:1002@pbx.test",
        NAT_VIA,
        "z9hG4bKinv",
        "1001",
        "1002",
        "c-1",
        1,
        "",
    );
    phone.send(proxy.udp, &cancel).await;
    let (seen_cancel, _) = pbx.recv().await;
    assert!(first_line(&seen_cancel).starts_with("CANCEL"));
    assert_eq!(branch(&vias(&seen_cancel)[0]), branch(&vias(&seen_inv)[0]));

    pbx.send(
        proxy.udp,
        &respond(&seen_inv, 487, "Request Terminated", ""),
    )
    .await;
    let (r, _) = phone.recv().await;
    assert!(first_line(&r).starts_with("SIP/2.0 487"));
    let to = header(&r, "To").unwrap();
    let ack = request(
        "ACK",
        "sip:1002@pbx.test",
        NAT_VIA,
        "z9hG4bKinv",
        "1001",
        "1002",
        "c-1",
        1,
        "",
    )
    .replace("To: <sip:1002@pbx.test>", &format!("To: {to}"));
    phone.send(proxy.udp, &ack).await;
    let (seen_ack, _) = pbx.recv().await;
    assert!(first_line(&seen_ack).starts_with("ACK"));
    assert_eq!(
        branch(&vias(&seen_ack)[0]),
        branch(&vias(&seen_inv)[0]),
        "non-2xx ACK matches the INVITE transaction"
    );

    // A re-INVITE inside the dialog gets a new branch and no new Record-Route.
    let reinv = request(
        "INVITE",
        "sip:1002@pbx.test",
        NAT_VIA,
        "z9hG4bKre",
        "1001",
        "1002",
        "c-1",
        3,
        "",
    )
    .replace("To: <sip:1002@pbx.test>", "To: <sip:1002@pbx.test>;tag=x");
    phone.send(proxy.udp, &reinv).await;
    let (seen_re, _) = pbx.recv().await;
    assert!(headers(&seen_re, "Record-Route").is_empty());
    assert_ne!(branch(&vias(&seen_re)[0]), branch(&vias(&seen_inv)[0]));
    proxy.stop().await;
}

#[tokio::test]
async fn max_forwards_zero_gets_483_and_garbage_is_dropped() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let phone = Ua::bind("127.0.0.2").await;
    let opt = request(
        "OPTIONS",
        "sip:pbx.test",
        NAT_VIA,
        "z9hG4bKmf",
        "1001",
        "1001",
        "mf-1",
        1,
        "",
    )
    .replace("Max-Forwards: 70", "Max-Forwards: 0");
    phone.send(proxy.udp, &opt).await;
    let (r, _) = phone.recv().await;
    assert!(first_line(&r).starts_with("SIP/2.0 483"), "{r}");
    phone.send(proxy.udp, "\x00\x01garbage\r\n\r\n").await;
    phone
        .send(
            proxy.udp,
            "INVITE sip:x SIP/2.0\r\nVia: SIP/2.0/UDP h\r\nContent-Length: 99\r\n\r\nshort",
        )
        .await;
    assert!(pbx.silent(300).await, "nothing broken reaches the PBX");
    let node = proxy.node();
    assert!(node.stats.dropped(sipwarden::stats::DropReason::Malformed) >= 2);
    proxy.stop().await;
}

/// A call from one phone to another through a PBX that proxies (as Kamailio does): the
/// INVITE spirals through sipwarden twice, responses and the BYE follow the Via and
/// Record-Route chains.
#[tokio::test]
async fn call_phone_to_phone_through_the_pbx() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let a = Ua::bind("127.0.0.2").await;
    let b = Ua::bind("127.0.0.4").await;
    // B registers (no challenge in this fake PBX).
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        "UDP 10.1.1.4:5060",
        "z9hG4bKb",
        "1002",
        "1002",
        "rb",
        1,
        "Contact: <sip:1002@10.1.1.4:5060>\r\n",
    );
    b.send(proxy.udp, &reg).await;
    let (seen, from) = pbx.recv().await;
    let b_path = header(&seen, "Path").unwrap().to_string();
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    b.recv().await;

    // A calls 1002.
    let inv = request(
        "INVITE",
        "sip:1002@pbx.test",
        "UDP 10.1.1.2:5060",
        "z9hG4bKa1",
        "1001",
        "1002",
        "call-ab",
        1,
        "Contact: <sip:1001@10.1.1.2:5060>\r\n",
    );
    a.send(proxy.udp, &inv).await;
    let (at_pbx, _) = pbx.recv().await;
    // The PBX proxies to B: new Request-URI, Route = B's Path, its own Via and Record-Route.
    let mut fwd = at_pbx.replacen("INVITE sip:1002@pbx.test SIP/2.0\r\n", &format!(
        "INVITE sip:1002@10.1.1.4:5060 SIP/2.0\r\nRoute: {b_path}\r\nRecord-Route: <sip:{};lr>\r\nVia: SIP/2.0/UDP {};branch=z9hG4bKpbxfwd\r\n",
        pbx.addr, pbx.addr
    ), 1);
    fwd = fwd.replace("Max-Forwards: 69", "Max-Forwards: 68");
    pbx.send(proxy.udp, &fwd).await;
    let (at_b, _) = b.recv().await;
    assert_eq!(first_line(&at_b), "INVITE sip:1002@10.1.1.4:5060 SIP/2.0");
    assert_eq!(vias(&at_b).len(), 4, "A, us, PBX, us: {at_b}");
    let rr: Vec<String> = headers(&at_b, "Record-Route")
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(rr.len(), 3, "{at_b}");

    // B answers 100, 180, 200; the PBX relays each (pops its Via) to us; A gets them.
    for (code, reason) in [(180, "Ringing"), (200, "OK")] {
        b.send(
            proxy.udp,
            &respond(&at_b, code, reason, "Contact: <sip:1002@10.1.1.4:5060>\r\n"),
        )
        .await;
        let (r_pbx, _) = pbx.recv().await;
        assert_eq!(vias(&r_pbx).len(), 3);
        let top = format!("Via: {}\r\n", headers(&r_pbx, "Via")[0]);
        let relayed = r_pbx.replacen(&top, "", 1);
        pbx.send(proxy.udp, &relayed).await;
        let (r_a, _) = a.recv().await;
        assert!(
            first_line(&r_a).starts_with(&format!("SIP/2.0 {code}")),
            "{r_a}"
        );
        assert_eq!(vias(&r_a).len(), 1);
    }
    // A's ACK and BYE follow the route set (Record-Route reversed).
    let route: Vec<&str> = rr.iter().rev().map(|s| s.as_str()).collect();
    let bye = request(
        "BYE",
        "sip:1002@10.1.1.4:5060",
        "UDP 10.1.1.2:5060",
        "z9hG4bKbye",
        "1001",
        "1002",
        "call-ab",
        2,
        &format!("Route: {}\r\n", route.join(", ")),
    )
    .replace(
        "To: <sip:1002@pbx.test>",
        "To: <sip:1002@pbx.test>;tag=resp200",
    );
    a.send(proxy.udp, &bye).await;
    let (bye_pbx, _) = pbx.recv().await;
    let remaining = header(&bye_pbx, "Route").unwrap_or("");
    assert!(
        remaining.starts_with(&format!("<sip:{};lr>", pbx.addr)),
        "ours popped, the PBX's next: {remaining}"
    );
    proxy.stop().await;
}

/// A phone on IPv6 talks to a PBX on IPv4: the proxy bridges the families.
#[tokio::test]
async fn ipv6_phone_ipv4_pbx() {
    if std::net::UdpSocket::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipping");
        return;
    }
    let pbx = Ua::bind("127.0.0.1").await;
    let mut proxy = start(pbx.addr, |c| {
        c.sip.listen_udp.push("[::1]:0".parse().unwrap())
    })
    .await;
    let v6 = proxy.udp6.expect("ipv6 listener");
    let phone = Ua::bind("[::1]").await;
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        "UDP [2001:db8::5]:5060",
        "z9hG4bK6",
        "1001",
        "1001",
        "v6",
        1,
        "Contact: <sip:1001@[2001:db8::5]:5060>\r\n",
    );
    phone.send(v6, &reg).await;
    let (seen, from) = pbx.recv().await;
    let v = vias(&seen);
    assert!(v[1].contains("received=::1"), "{}", v[1]);
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    let (ok, _) = phone.recv().await;
    assert!(first_line(&ok).starts_with("SIP/2.0 200"), "{ok}");
    proxy.running.take().expect("running").shutdown().await;
}

/// An in-dialog BYE spirals through sipwarden twice (phone -> us -> PBX -> us -> phone) with
/// the same Request-URI, Call-ID, CSeq and From tag: only its Route set differs. That is a
/// spiral, not a loop; a request that really comes back unchanged is a loop (482).
#[tokio::test]
async fn in_dialog_spiral_is_not_a_loop_but_a_real_loop_is() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let a = Ua::bind("127.0.0.2").await;
    let b = Ua::bind("127.0.0.4").await;
    let ours_b = format!("<sip:{}@{};lr>", "x", proxy.udp); // no token: routes by R-URI
    let bye = request(
        "BYE",
        &format!("sip:1002@{}", b.addr),
        "UDP 10.1.1.2:5060",
        "z9hG4bKsp1",
        "1001",
        "1002",
        "spiral",
        2,
        &format!(
            "Route: <sip:{};lr>, <sip:{};lr>, {ours_b}\r\n",
            proxy.udp, pbx.addr
        ),
    )
    .replace("To: <sip:1002@pbx.test>", "To: <sip:1002@pbx.test>;tag=t");
    a.send(proxy.udp, &bye).await;
    let (at_pbx, _) = pbx.recv().await;
    // The PBX pops its own Route and sends the BYE on: to us again.
    let own = format!("<sip:{};lr>, ", pbx.addr);
    let again = at_pbx.replacen(&own, "", 1).replacen(
        "Via: ",
        &format!("Via: SIP/2.0/UDP {};branch=z9hG4bKpbxsp\r\nVia: ", pbx.addr),
        1,
    );
    pbx.send(proxy.udp, &again).await;
    let (at_b, _) = b.recv().await;
    assert!(
        first_line(&at_b).starts_with("BYE"),
        "spiral delivered: {at_b}"
    );

    // A real loop: the same request, Route set and all, comes back from the PBX.
    let looped = at_pbx.replacen(
        "Via: ",
        &format!("Via: SIP/2.0/UDP {};branch=z9hG4bKpbxlp\r\nVia: ", pbx.addr),
        1,
    );
    pbx.send(proxy.udp, &looped).await;
    let (r, _) = pbx.recv().await;
    assert!(first_line(&r).starts_with("SIP/2.0 482"), "{r}");
    proxy.stop().await;
}

/// Upstream over TCP, opened on demand in the background: while the PBX refuses, a phone's
/// request is dropped at once (no receive loop waits for a connect) and for a second no new
/// attempt is made; once the PBX listens, two requests sent back to back both arrive, on the
/// one connection the first of them opened.
#[tokio::test]
async fn tcp_upstream_connects_in_the_background_once() {
    // The PBX's port, bound but not listening yet: connects are refused, and no other socket
    // can take the port in the meantime.
    let pbx_sock = tokio::net::TcpSocket::new_v4().unwrap();
    pbx_sock.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let pbx_addr = pbx_sock.local_addr().unwrap();
    let proxy = start(pbx_addr, |c| {
        c.upstream.transport = sipwarden::config::TransportKind::Tcp;
    })
    .await;
    let phone = Ua::bind("127.0.0.2").await;
    let opt = |n: u32| {
        request(
            "OPTIONS",
            "sip:pbx.test",
            &format!("UDP {}", phone.addr),
            &format!("z9hG4bKopt{n}"),
            "1001",
            "1001",
            &format!("bg-{n}"),
            1,
            "",
        )
    };
    phone.send(proxy.udp, &opt(1)).await;
    // Refused: the attempt fails and is counted as a drop, the listener stays responsive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listener = pbx_sock.listen(16).expect("pbx listens");
    // Past the retry pause, two requests back to back.
    tokio::time::sleep(sipwarden::net::tcp::UPSTREAM_RETRY + Duration::from_millis(200)).await;
    phone.send(proxy.udp, &opt(2)).await;
    phone.send(proxy.udp, &opt(3)).await;
    let (mut conn, _) = tokio::time::timeout(WAIT, listener.accept())
        .await
        .expect("sipwarden connects")
        .expect("accept");
    let mut got = String::new();
    let mut buf = vec![0u8; 65536];
    while !(got.contains("bg-2") && got.contains("bg-3")) {
        let n = tokio::time::timeout(WAIT, tokio::io::AsyncReadExt::read(&mut conn, &mut buf))
            .await
            .expect("both requests arrive")
            .expect("read");
        assert!(n > 0, "connection closed early: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(
        !got.contains("bg-1"),
        "the request sent while the PBX refused was dropped"
    );
    // One connection: no second connect is waiting.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.accept())
            .await
            .is_err(),
        "a second connection to the PBX"
    );
    proxy.stop().await;
}

/// The running node's engine knows the PBX as the upstream in both places it keeps it: the
/// ledger (never blocked) and the packet path's lock-free copy (never scored as a phone).
#[tokio::test]
async fn the_engine_knows_the_pbx_as_upstream() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let node = proxy.node();
    assert!(node.engine().is_upstream(pbx.addr.ip()));
    assert!(node.inspect(|l| l.is_upstream(pbx.addr.ip())));
    assert!(!node.engine().is_upstream("127.0.0.2".parse().unwrap()));
    proxy.stop().await;
}
