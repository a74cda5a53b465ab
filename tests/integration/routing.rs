//! Routing continuity and the router's defences: restarts, separate registration agents,
//! CANCEL of authenticated INVITEs, 430 Flow Failed, forged and bounced responses, trust bound
//! to the upstream's flow.

use std::net::SocketAddr;
use std::time::Duration;

use crate::harness::*;
use sipwarden::stats::DropReason;

const NAT_VIA: &str = "UDP 192.168.1.50:5060";

/// REGISTER through the proxy with `contact` (a whole Contact header line) from `phone`, whose
/// Via says `via`; the PBX answers 200. Returns the Path the PBX saw.
async fn register_via(phone: &Ua, pbx: &Ua, proxy: SocketAddr, via: &str, contact: &str) -> String {
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        via,
        &format!("z9hG4bKreg{}", phone.addr.port()),
        "1001",
        "1001",
        &format!("reg-{}", phone.addr.port()),
        1,
        contact,
    );
    phone.send(proxy, &reg).await;
    let (seen, from) = pbx.recv().await;
    let path = header(&seen, "Path").expect("Path added").to_string();
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    let (ok, _) = phone.recv().await;
    assert!(first_line(&ok).starts_with("SIP/2.0 200"), "{ok}");
    path
}

/// The PBX's INVITE to a registered phone: Request-URI its Contact, Route the Path.
fn pbx_invite(pbx: &Ua, ruri: &str, path: &str, call: &str) -> String {
    format!(
        "INVITE {ruri} SIP/2.0\r\nVia: SIP/2.0/UDP {pbx};branch=z9hG4bK{call}\r\nRoute: {path}\r\n\
Max-Forwards: 70\r\nFrom: <sip:1002@pbx.test>;tag=p-{call}\r\nTo: <sip:1001@pbx.test>\r\n\
Call-ID: {call}\r\nCSeq: 1 INVITE\r\nContact: <sip:1002@{pbx}>\r\nContent-Length: 0\r\n\r\n",
        pbx = pbx.addr
    )
}

fn free_port(ip: &str) -> SocketAddr {
    let s = std::net::UdpSocket::bind(format!("{ip}:0")).unwrap();
    let a = s.local_addr().unwrap();
    drop(s);
    a
}

#[tokio::test]
async fn tokens_survive_a_restart_and_a_foreign_key_gets_430() {
    let pbx = Ua::bind("127.0.0.1").await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.db").display().to_string();
    let listen = free_port("127.0.0.1");
    let fixed = |c: &mut sipwarden::config::Config| {
        c.sip.listen_udp = vec![listen];
        c.sip.listen_tcp = vec![listen];
    };
    let s1 = state.clone();
    let proxy = start(pbx.addr, |c| {
        fixed(c);
        c.state.path = s1;
    })
    .await;
    let phone = Ua::bind("127.0.0.2").await;
    let contact = "Contact: <sip:1001@192.168.1.50:5060>\r\n";
    let path = register_via(&phone, &pbx, proxy.udp, NAT_VIA, contact).await;
    proxy.stop().await;

    // Same state file, same address: the token minted before the restart still routes.
    let s2 = state.clone();
    let proxy = start(pbx.addr, |c| {
        fixed(c);
        c.state.path = s2;
    })
    .await;
    pbx.send(
        proxy.udp,
        &pbx_invite(&pbx, "sip:1001@192.168.1.50:5060", &path, "after-restart"),
    )
    .await;
    let (got, _) = phone.recv().await;
    assert!(first_line(&got).starts_with("INVITE"), "{got}");
    proxy.stop().await;

    // A fresh state file (a new key): the token does not verify and the PBX hears 430 at once,
    // instead of the INVITE going to the private Contact the Request-URI names.
    let proxy = start(pbx.addr, fixed).await;
    pbx.send(
        proxy.udp,
        &pbx_invite(&pbx, "sip:1001@127.0.0.2:5060", &path, "other-key"),
    )
    .await;
    let (resp, _) = pbx.recv().await;
    assert!(first_line(&resp).starts_with("SIP/2.0 430"), "{resp}");
    assert!(phone.silent(300).await, "nothing reaches the phone");
    assert_eq!(proxy.node().stats.dropped(DropReason::FlowFailed), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn two_nodes_sharing_the_key_verify_each_others_tokens() {
    let pbx = Ua::bind("127.0.0.1").await;
    let key = "00112233445566778899aabbccddeeff";
    // One cluster name and port, two hosts (127.0.0.1 and 127.0.0.6).
    let port = free_port("127.0.0.6").port();
    let node = |ip: &'static str| {
        move |c: &mut sipwarden::config::Config| {
            let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
            c.sip.listen_udp = vec![addr];
            c.sip.listen_tcp = vec![addr];
            c.sip.public_address = "sip.cluster.test".into();
            c.sip.flow_key = key.into();
        }
    };
    let a = start(pbx.addr, node("127.0.0.6")).await;
    let b = start(pbx.addr, node("127.0.0.7")).await;
    let phone = Ua::bind("127.0.0.2").await;
    let path = register_via(
        &phone,
        &pbx,
        a.udp,
        NAT_VIA,
        "Contact: <sip:1001@192.168.1.50:5060>\r\n",
    )
    .await;
    assert!(path.contains("sip.cluster.test"), "{path}");
    // The PBX's INVITE reaches node B: the token minted by A verifies there.
    pbx.send(
        b.udp,
        &pbx_invite(&pbx, "sip:1001@192.168.1.50:5060", &path, "via-b"),
    )
    .await;
    let (got, from) = phone.recv().await;
    assert!(first_line(&got).starts_with("INVITE"), "{got}");
    assert_eq!(from, b.udp);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn separate_registration_agent_gets_calls_at_its_contact() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let agent = Ua::bind("127.0.0.2").await;
    let device = Ua::bind("127.0.0.2").await;
    let via = format!("UDP {}", agent.addr);
    let contact = format!("Contact: <sip:1001@{}>\r\n", device.addr);
    let path = register_via(&agent, &pbx, proxy.udp, &via, &contact).await;
    for i in 0..3 {
        let call = format!("agent-{i}");
        pbx.send(
            proxy.udp,
            &pbx_invite(&pbx, &format!("sip:1001@{}", device.addr), &path, &call),
        )
        .await;
        let (got, _) = device.recv().await;
        assert!(first_line(&got).starts_with("INVITE"), "{got}");
        assert!(
            agent.silent(100).await,
            "nothing goes to the REGISTER's port"
        );
    }

    // A NAT phone (private Contact, Via naming its private address) still gets its calls on
    // the flow, and so does one using outbound (;ob) whatever its Contact says.
    let nat = Ua::bind("127.0.0.3").await;
    let path = register_via(
        &nat,
        &pbx,
        proxy.udp,
        NAT_VIA,
        "Contact: <sip:1001@192.168.1.50:5060>\r\n",
    )
    .await;
    pbx.send(
        proxy.udp,
        &pbx_invite(&pbx, "sip:1001@192.168.1.50:5060", &path, "nat-1"),
    )
    .await;
    assert!(first_line(&nat.recv().await.0).starts_with("INVITE"));
    let ob = Ua::bind("127.0.0.4").await;
    let other = Ua::bind("127.0.0.4").await;
    let path = register_via(
        &ob,
        &pbx,
        proxy.udp,
        &format!("UDP {}", ob.addr),
        &format!("Contact: <sip:1001@{};ob>\r\n", other.addr),
    )
    .await;
    pbx.send(
        proxy.udp,
        &pbx_invite(&pbx, &format!("sip:1001@{}", other.addr), &path, "ob-1"),
    )
    .await;
    assert!(first_line(&ob.recv().await.0).starts_with("INVITE"));
    assert!(other.silent(100).await);
    proxy.stop().await;
}

#[tokio::test]
async fn cancel_of_an_authenticated_invite_gets_the_invite_branch() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let phone = Ua::bind("127.0.0.2").await;
    let creds = "Proxy-Authorization: Digest username=\"1001\", realm=\"pbx.test\", nonce=\"n\", uri=\"sip:1002@pbx.test\", response=\"0123\"\r\n";
    let inv = request(
        "INVITE",
        "sip:1002@pbx.test",
        NAT_VIA,
        "z9hG4bKauthinv",
        "1001",
        "1002",
        "cancel-auth",
        2,
        creds,
    );
    phone.send(proxy.udp, &inv).await;
    let (seen_inv, from) = pbx.recv().await;
    let our_inv = vias(&seen_inv)[0].clone();
    assert!(
        our_inv.contains(";swa="),
        "the attempt rides on our Via: {our_inv}"
    );
    pbx.send(from, &respond(&seen_inv, 180, "Ringing", ""))
        .await;
    let _ = phone.recv().await;

    let cancel = request(
        "CANCEL",
        "sip:1002@pbx.test",
        NAT_VIA,
        "z9hG4bKauthinv",
        "1001",
        "1002",
        "cancel-auth",
        2,
        "",
    );
    phone.send(proxy.udp, &cancel).await;
    let (seen_cancel, _) = pbx.recv().await;
    assert_eq!(
        branch(&vias(&seen_cancel)[0]),
        branch(&our_inv),
        "the PBX can match the CANCEL to its INVITE"
    );
    pbx.send(from, &respond(&seen_cancel, 200, "OK", "")).await;
    assert!(first_line(&phone.recv().await.0).starts_with("SIP/2.0 200"));
    pbx.send(from, &respond(&seen_inv, 487, "Request Terminated", ""))
        .await;
    let (t487, _) = phone.recv().await;
    assert!(first_line(&t487).starts_with("SIP/2.0 487"), "{t487}");
    let ack = request(
        "ACK",
        "sip:1002@pbx.test",
        NAT_VIA,
        "z9hG4bKauthinv",
        "1001",
        "1002",
        "cancel-auth",
        2,
        "",
    );
    phone.send(proxy.udp, &ack).await;
    let (seen_ack, _) = pbx.recv().await;
    assert!(first_line(&seen_ack).starts_with("ACK"));
    assert_eq!(branch(&vias(&seen_ack)[0]), branch(&our_inv));
    proxy.stop().await;
}

#[tokio::test]
async fn a_gone_tcp_flow_gets_430() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let mut phone = TcpUa::connect(proxy.tcp).await;
    let reg = request(
        "REGISTER",
        "sip:pbx.test",
        "TCP 10.0.0.9:5060",
        "z9hG4bKtcpgone",
        "1003",
        "1003",
        "tcp-gone",
        1,
        "Contact: <sip:1003@10.0.0.9:5060;transport=tcp>\r\n",
    );
    phone.send(&reg).await;
    let (seen, from) = pbx.recv().await;
    let path = header(&seen, "Path").unwrap().to_string();
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    let _ = phone.recv().await;
    drop(phone);
    tokio::time::sleep(Duration::from_millis(100)).await;
    pbx.send(
        proxy.udp,
        &pbx_invite(&pbx, "sip:1003@10.0.0.9:5060;transport=tcp", &path, "gone"),
    )
    .await;
    let (resp, _) = pbx.recv().await;
    assert!(first_line(&resp).starts_with("SIP/2.0 430"), "{resp}");
    proxy.stop().await;
}

#[tokio::test]
async fn forged_responses_go_nowhere_and_score_the_forger() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |c| c.anomaly.threshold = 5).await;
    let phone = Ua::bind("127.0.0.2").await;
    let victim = Ua::bind("127.0.0.9").await;
    let attacker = Ua::bind("127.0.0.5").await;
    let inv = request(
        "INVITE",
        "sip:1002@pbx.test",
        NAT_VIA,
        "z9hG4bKreal",
        "1001",
        "1002",
        "forge-1",
        1,
        "",
    );
    phone.send(proxy.udp, &inv).await;
    let (seen, _) = pbx.recv().await;
    let ours = vias(&seen)[0].clone();
    // The real branch of ours, but a second Via steering the response to the victim; then one
    // steering it back to ourselves (to arrive "from the PBX"); then a made-up branch.
    let steer = |second: &str, top: &str| {
        format!(
            "SIP/2.0 403 Forbidden\r\nVia: {top}\r\nVia: {second}\r\nFrom: <sip:1001@pbx.test>;tag=f\r\n\
To: <sip:1002@pbx.test>;tag=t\r\nCall-ID: forge-1\r\nCSeq: 1 INVITE\r\nContent-Length: 0\r\n\r\n"
        )
    };
    let to_victim = format!("SIP/2.0/UDP {};branch=z9hG4bKreal", victim.addr);
    let to_self = format!(
        "SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx;received=127.0.0.1;rport={}",
        proxy.udp.port()
    );
    let made_up = ours.replace(
        branch(&ours),
        "z9hG4bKsw2000000000000000000000000000000000000000",
    );
    attacker.send(proxy.udp, &steer(&to_victim, &ours)).await;
    attacker.send(proxy.udp, &steer(&to_self, &ours)).await;
    attacker.send(proxy.udp, &steer(&to_victim, &made_up)).await;
    assert!(victim.silent(300).await, "nothing reaches the victim");
    assert!(phone.silent(100).await, "nothing reaches the phone either");
    let node = proxy.node();
    assert_eq!(node.stats.dropped(DropReason::Forged), 3);
    assert!(
        node.inspect(|e| e.blocks().any(|b| b.key.net.addr() == attacker.addr.ip())),
        "the forger is blocked"
    );
    // The real answer, from the PBX, still gets through.
    pbx.send(proxy.udp, &respond(&seen, 486, "Busy Here", ""))
        .await;
    assert!(first_line(&phone.recv().await.0).starts_with("SIP/2.0 486"));
    proxy.stop().await;
}

#[tokio::test]
async fn the_pbx_ip_on_another_port_is_a_phone() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let local = Ua::bind("127.0.0.1").await;
    let target = Ua::bind("127.0.0.9").await;
    // A request naming another host, from the PBX's IP but not its port: it goes to the PBX
    // like any phone's request, never to the host its Request-URI names.
    let inv = request(
        "INVITE",
        &format!("sip:1002@{}", target.addr),
        &format!("UDP {}", local.addr),
        "z9hG4bKlocal",
        "1001",
        "1002",
        "local-1",
        1,
        "",
    );
    local.send(proxy.udp, &inv).await;
    let (seen, from) = pbx.recv().await;
    assert!(first_line(&seen).starts_with("INVITE"));
    assert!(target.silent(200).await);
    // Answered by the PBX like any call (no 482 Loop Detected).
    pbx.send(from, &respond(&seen, 200, "OK", "")).await;
    assert!(first_line(&local.recv().await.0).starts_with("SIP/2.0 200"));
    // And a scanner there is a scanner: dropped, not relayed.
    let scan = inv
        .replace("TestPhone/1.0", "friendly-scanner")
        .replace("local-1", "local-2");
    local.send(proxy.udp, &scan).await;
    assert!(
        pbx.silent(200).await,
        "the scanner's request is not forwarded"
    );
    assert!(target.silent(100).await);
    proxy.stop().await;
}

#[tokio::test]
async fn a_contact_naming_the_pbx_or_us_is_never_a_target() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    for (i, bad) in [pbx.addr, proxy.udp].into_iter().enumerate() {
        // A local process (the PBX's own address, another port) registers a Contact naming
        // the PBX or sipwarden: the PBX's calls go down its flow, never back into a loop.
        let phone = Ua::bind("127.0.0.1").await;
        let path = register_via(
            &phone,
            &pbx,
            proxy.udp,
            &format!("UDP {}", phone.addr),
            &format!("Contact: <sip:1001@{bad}>\r\n"),
        )
        .await;
        pbx.send(
            proxy.udp,
            &pbx_invite(
                &pbx,
                &format!("sip:1001@{bad}"),
                &path,
                &format!("loop-{i}"),
            ),
        )
        .await;
        let (got, _) = phone.recv().await;
        assert!(first_line(&got).starts_with("INVITE"), "{got}");
        assert!(
            pbx.silent(200).await,
            "the PBX does not get its own INVITE back"
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn a_request_whose_via_claims_to_be_ours_is_dropped_and_scored() {
    let pbx = Ua::bind("127.0.0.1").await;
    let proxy = start(pbx.addr, |_| {}).await;
    let attacker = Ua::bind("127.0.0.5").await;
    // Found by the fuzzer: forwarded, the PBX's answer would carry two Vias of ours in a row.
    let via = format!(
        "UDP {};branch=z9hG4bKsw20123456789abcdef01234567fedcba9876543210",
        proxy.udp
    );
    let inv = request(
        "INVITE",
        "sip:1002@pbx.test",
        &via,
        "x",
        "1001",
        "1002",
        "ours-1",
        1,
        "",
    )
    .replace(";branch=x;rport", ";rport");
    attacker.send(proxy.udp, &inv).await;
    assert!(pbx.silent(300).await, "not forwarded");
    assert_eq!(proxy.node().stats.dropped(DropReason::Forged), 1);
    proxy.stop().await;
}
