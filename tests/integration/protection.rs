//! Attacks against a real sipwarden: what is blocked never reaches the PBX, good phones keep
//! working.

use crate::harness::*;
use sipwarden::blocks::BlockType;
use sipwarden::stats::DropReason;

fn options(ua: &str, n: u32) -> String {
    request(
        "OPTIONS",
        "sip:100@pbx.test",
        "UDP 10.9.9.9:5060",
        &format!("z9hG4bKo{n}"),
        "100",
        "100",
        &format!("o{n}"),
        1,
        "",
    )
    .replace("TestPhone/1.0", ua)
}

#[tokio::test]
async fn scanner_is_blocked_and_never_reaches_the_pbx() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let scanner = Ua::bind("127.0.0.7").await;
    let phone = Ua::bind("127.0.0.2").await;
    scanner
        .send(proxy.udp, &options("friendly-scanner", 1))
        .await;
    scanner
        .send(proxy.udp, &options("Totally Legit Phone", 2))
        .await;
    assert!(
        pbx.silent(300).await,
        "neither the scan nor the next packet is forwarded"
    );
    phone.send(proxy.udp, &options("Yealink SIP-T46S", 3)).await;
    let (got, _) = pbx.recv().await;
    assert!(first_line(&got).starts_with("OPTIONS"));
    let node = proxy.node();
    let blocks: Vec<_> = node.inspect(|e| e.blocks().cloned().collect());
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].kind, BlockType::Scanner);
    assert_eq!(blocks[0].device, "friendly-scanner");
    assert_eq!(node.stats.dropped(DropReason::Scanner), 1);
    assert_eq!(node.stats.dropped(DropReason::Blocked), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn blacklisted_range_and_403_reply() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |c| {
        c.lists.blacklist = vec!["127.0.0.8/32".parse().unwrap()];
        c.protection.blocked_reply = sipwarden::config::BlockedReply::Forbidden;
    })
    .await;
    let bad = Ua::bind("127.0.0.8").await;
    bad.send(proxy.udp, &options("Phone", 1)).await;
    let (r, _) = bad.recv().await;
    assert!(first_line(&r).starts_with("SIP/2.0 403"), "{r}");
    assert!(pbx.silent(200).await);
    proxy.stop().await;
}

/// The PBX rejects every authenticated REGISTER from one phone: after hit_count failures the
/// phone is blocked; a second phone elsewhere keeps registering.
#[tokio::test]
async fn register_brute_force_through_the_proxy() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let attacker = Ua::bind("127.0.0.4").await;
    // A new guess each time (the same credentials again would be the same attempt).
    let auth = |i: u32| format!("Authorization: Digest username=\"1004\", response=\"bad{i}\"\r\n");
    for i in 0..5u32 {
        let reg = request(
            "REGISTER",
            "sip:pbx.test",
            "UDP 10.0.0.4:5060",
            &format!("z9hG4bKg{i}"),
            "1004",
            "1004",
            "guess",
            i + 1,
            &auth(i),
        );
        attacker.send(proxy.udp, &reg).await;
        let (seen, from) = pbx.recv().await;
        pbx.send(from, &respond(&seen, 403, "Forbidden", "")).await;
        let (r, _) = attacker.recv().await;
        assert!(first_line(&r).starts_with("SIP/2.0 403"));
    }
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        "UDP 10.0.0.4:5060",
        "z9hG4bKg9",
        "1004",
        "1004",
        "guess",
        9,
        &auth(9),
    );
    attacker.send(proxy.udp, &reg).await;
    assert!(pbx.silent(300).await, "blocked after 5 failures");
    let blocks: Vec<_> = proxy.node().inspect(|e| e.blocks().cloned().collect());
    assert_eq!(blocks.len(), 1);
    assert_eq!(blocks[0].kind, BlockType::Register);
    assert_eq!(
        blocks[0].device, "TestPhone/1.0",
        "device learnt from the requests"
    );
    assert!(
        blocks[0].evidence.iter().any(|e| e.contains("403")),
        "{:?}",
        blocks[0].evidence
    );

    let good = Ua::bind("127.0.0.2").await;
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        "UDP 10.0.0.2:5060",
        "z9hG4bKok",
        "1001",
        "1001",
        "ok",
        1,
        "",
    );
    good.send(proxy.udp, &reg).await;
    let (seen, _) = pbx.recv().await;
    assert!(first_line(&seen).starts_with("REGISTER"));
    proxy.stop().await;
}

#[tokio::test]
async fn invite_flood_is_limited_while_another_caller_gets_through() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |c| {
        c.invite.rate_limit = 5;
        c.invite.burst = 5;
    })
    .await;
    let flooder = Ua::bind("127.0.0.6").await;
    for i in 0..30u32 {
        let inv = request(
            "INVITE",
            "sip:900@pbx.test",
            "UDP 10.0.0.6:5060",
            &format!("z9hG4bKf{i}"),
            "666",
            "900",
            &format!("f{i}"),
            1,
            "",
        );
        flooder.send(proxy.udp, &inv).await;
    }
    let mut rejected = 0;
    while !flooder.silent(200).await {
        rejected += 1;
    }
    // silent() consumed one message per loop turn that was not silent.
    assert!(
        rejected >= 20,
        "most of the flood is answered 503: {rejected}"
    );
    let mut forwarded = 0;
    while !pbx.silent(200).await {
        forwarded += 1;
    }
    assert!(
        forwarded <= 6,
        "only the burst reaches the PBX: {forwarded}"
    );
    let caller = Ua::bind("127.0.0.2").await;
    let inv = request(
        "INVITE",
        "sip:1002@pbx.test",
        "UDP 10.0.0.2:5060",
        "z9hG4bKgood",
        "1001",
        "1002",
        "good",
        1,
        "",
    );
    caller.send(proxy.udp, &inv).await;
    let (seen, _) = pbx.recv().await;
    assert!(first_line(&seen).starts_with("INVITE"));
    proxy.stop().await;
}
