//! The toll-fraud guard on a real sipwarden: a call past its maximum duration is ended by
//! sipwarden (`fraud.on_max_duration = "bye"`), a BYE to each leg.

use std::time::Duration;

use crate::harness::*;
use sipwarden::config::{FraudRule, MaxDurationAction};
use sipwarden::stats::DropReason;

/// Waits for the guard's once-a-second tick to pass the 1 s maximum: generous, not a timing
/// assertion.
const BYE_WAIT: Duration = Duration::from_secs(15);

async fn recv_long(ua: &Ua) -> (String, std::net::SocketAddr) {
    let mut buf = vec![0u8; 65536];
    let (n, from) = tokio::time::timeout(BYE_WAIT, ua.sock.recv_from(&mut buf))
        .await
        .unwrap_or_else(|_| panic!("{} received nothing", ua.addr))
        .expect("recv");
    (String::from_utf8_lossy(&buf[..n]).into_owned(), from)
}

#[tokio::test]
async fn a_call_past_its_max_duration_gets_a_bye_on_both_legs() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |c| {
        c.fraud.enabled = true;
        c.fraud.on_max_duration = MaxDurationAction::Bye;
        c.fraud.rules = vec![FraudRule {
            max_duration: Duration::from_secs(1),
            ..FraudRule::default()
        }];
    })
    .await;
    let phone = Ua::bind("127.0.0.2").await;
    let contact = format!("Contact: <sip:1001@{}>\r\n", phone.addr);
    let invite = request(
        "INVITE",
        "sip:0044123@pbx.test",
        &format!("UDP {}", phone.addr),
        "z9hG4bKmd1",
        "1001",
        "0044123",
        "maxdur-1",
        1,
        &contact,
    );
    phone.send(proxy.udp, &invite).await;
    let (seen, from) = pbx.recv().await;
    assert!(first_line(&seen).starts_with("INVITE"), "{seen}");
    // The PBX answers as a record-routing proxy in front of the callee.
    let ok = respond(
        &seen,
        200,
        "OK",
        &format!("Contact: <sip:2000@{}>\r\n", pbx.addr),
    )
    .replacen(
        "SIP/2.0 200 OK\r\n",
        &format!("SIP/2.0 200 OK\r\nRecord-Route: <sip:{};lr>\r\n", pbx.addr),
        1,
    );
    pbx.send(from, &ok).await;
    let (answer, _) = phone.recv().await;
    assert!(first_line(&answer).starts_with("SIP/2.0 200"), "{answer}");
    let callee_to = header(&answer, "To").unwrap_or("").to_string();
    assert!(callee_to.contains("tag="), "{answer}");

    // The callee's leg: through the PBX, along the route past our own entry.
    let (bye, from) = recv_long(&pbx).await;
    assert_eq!(from, proxy.udp);
    assert_eq!(
        first_line(&bye),
        format!("BYE sip:2000@{} SIP/2.0", pbx.addr)
    );
    assert_eq!(
        headers(&bye, "Route"),
        vec![format!("<sip:{};lr>", pbx.addr)]
    );
    assert_eq!(
        header(&bye, "From"),
        Some("<sip:1001@pbx.test>;tag=fmaxdur-1")
    );
    assert_eq!(header(&bye, "To"), Some(callee_to.as_str()));
    assert_eq!(header(&bye, "Call-ID"), Some("maxdur-1"));
    assert!(
        header(&bye, "Reason").is_some_and(|r| r.contains("duration")),
        "{bye}"
    );
    assert_eq!(vias(&bye).len(), 1, "{bye}");
    // Not a branch sipwarden mints: the answers are dropped as not ours, never as forged.
    assert!(!branch(&vias(&bye)[0]).starts_with("z9hG4bKsw"), "{bye}");

    // The caller's leg: straight to the phone, From and To swapped.
    let (bye2, from) = recv_long(&phone).await;
    assert_eq!(from, proxy.udp);
    assert_eq!(
        first_line(&bye2),
        format!("BYE sip:1001@{} SIP/2.0", phone.addr)
    );
    assert!(header(&bye2, "Route").is_none(), "{bye2}");
    assert_eq!(header(&bye2, "From"), Some(callee_to.as_str()));
    assert_eq!(
        header(&bye2, "To"),
        Some("<sip:1001@pbx.test>;tag=fmaxdur-1")
    );

    // Both answer 200; the answers end at sipwarden (nothing forwarded, nobody blocked).
    phone.send(proxy.udp, &respond(&bye2, 200, "OK", "")).await;
    pbx.send(proxy.udp, &respond(&bye, 200, "OK", "")).await;
    assert!(pbx.silent(300).await);
    assert!(phone.silent(300).await);
    let node = proxy.node();
    assert_eq!(node.inspect(|e| e.fraud().active_calls()), 0);
    assert_eq!(node.inspect(|e| e.blocks().count()), 0);
    let forged = node.stats.dropped(DropReason::Forged);
    assert_eq!(forged, 0, "the answers to our BYEs are not forgeries");
    proxy.stop().await;
}
