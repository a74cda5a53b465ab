//! The relay against an in-process TFTP server and client on loopback sockets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio::time::timeout;

use super::run;
use crate::blocks::BlockType;
use crate::config::Config;
use crate::node::{Batch, Node};
use crate::stats::Stats;
use crate::tftp::codec::{Mode, Options, Packet, Request};

const WAIT: Duration = Duration::from_millis(700);

/// File contents the fake server serves for `name`: names `file-<len>` exist, `missing-*`
/// answer "file not found", `silent-*` get no answer.
fn content(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

type Uploads = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

/// A minimal TFTP server: each request gets its own transfer socket, as real servers do.
/// Completed uploads (WRQ) are recorded.
async fn fake_server() -> (SocketAddr, Uploads) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let uploads = Uploads::default();
    let up = uploads.clone();
    tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            let Ok((n, peer)) = sock.recv_from(&mut buf).await else {
                return;
            };
            match Packet::decode(&buf[..n]) {
                Ok(Packet::Rrq(r)) => {
                    let name = String::from_utf8_lossy(r.filename).into_owned();
                    tokio::spawn(serve(peer, name, r.options.blksize()));
                }
                Ok(Packet::Wrq(r)) => {
                    let name = String::from_utf8_lossy(r.filename).into_owned();
                    tokio::spawn(receive(peer, name, up.clone()));
                }
                _ => {}
            }
        }
    });
    (addr, uploads)
}

async fn receive(peer: SocketAddr, name: String, uploads: Uploads) {
    let tid = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    tid.connect(peer).await.unwrap();
    let mut buf = vec![0u8; 2048];
    let mut file = Vec::new();
    let mut expect: u16 = 1;
    let _ = tid.send(&Packet::Ack { block: 0 }.to_vec().unwrap()).await;
    while let Ok(Ok(n)) = timeout(WAIT, tid.recv(&mut buf)).await {
        let Ok(Packet::Data { block, data }) = Packet::decode(&buf[..n]) else {
            return;
        };
        if block == expect {
            file.extend_from_slice(data);
            expect = expect.wrapping_add(1);
        }
        let _ = tid.send(&Packet::Ack { block }.to_vec().unwrap()).await;
        if data.len() < 512 {
            uploads.lock().push((name, file));
            return;
        }
    }
}

async fn serve(peer: SocketAddr, name: String, blksize: Option<u16>) {
    let tid = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    tid.connect(peer).await.unwrap();
    if name.starts_with("silent") {
        return;
    }
    let Some(len) = name
        .strip_prefix("file-")
        .and_then(|l| l.parse::<usize>().ok())
    else {
        let e = Packet::Error {
            code: 1,
            message: b"File not found",
        };
        let _ = tid.send(&e.to_vec().unwrap()).await;
        return;
    };
    let data = content(len);
    let mut buf = vec![0u8; 70_000];
    let blk = match blksize {
        Some(b) => {
            let v = b.to_string();
            let mut o = Options::new();
            o.push(b"blksize", v.as_bytes()).unwrap();
            if !exchange(&tid, &Packet::Oack(o).to_vec().unwrap(), 0, &mut buf).await {
                return;
            }
            b as usize
        }
        None => 512,
    };
    let mut block: u16 = 1;
    let mut off = 0;
    loop {
        let end = (off + blk).min(data.len());
        let pkt = Packet::Data {
            block,
            data: &data[off..end],
        }
        .to_vec()
        .unwrap();
        if !exchange(&tid, &pkt, block, &mut buf).await {
            return;
        }
        if end - off < blk {
            return;
        }
        off = end;
        block = block.wrapping_add(1);
    }
}

/// Send `pkt` until `ack` comes back (3 tries).
async fn exchange(tid: &UdpSocket, pkt: &[u8], ack: u16, buf: &mut [u8]) -> bool {
    for _ in 0..3 {
        if tid.send(pkt).await.is_err() {
            return false;
        }
        if let Ok(Ok(n)) = timeout(WAIT, tid.recv(buf)).await {
            if let Ok(Packet::Ack { block }) = Packet::decode(&buf[..n]) {
                if block == ack {
                    return true;
                }
            }
        }
    }
    false
}

#[derive(Debug, PartialEq)]
enum Got {
    File(Vec<u8>),
    Error(u16),
    Nothing,
}

/// A TFTP client: fetch `name` through `relay` from a socket bound on `from`.
async fn fetch(relay: SocketAddr, from: Ipv4Addr, name: &str, blksize: Option<u16>) -> Got {
    let sock = UdpSocket::bind((from, 0)).await.unwrap();
    let v = blksize.map(|b| b.to_string()).unwrap_or_default();
    let mut options = Options::new();
    if blksize.is_some() {
        options.push(b"blksize", v.as_bytes()).unwrap();
    }
    let rrq = Packet::Rrq(Request {
        filename: name.as_bytes(),
        mode: Mode::Octet,
        options,
    })
    .to_vec()
    .unwrap();
    sock.send_to(&rrq, relay).await.unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 70_000];
    let mut blk = 512;
    let mut expect: u16 = 1;
    loop {
        let Ok(Ok((n, tid))) = timeout(WAIT, sock.recv_from(&mut buf)).await else {
            return Got::Nothing;
        };
        assert_eq!(
            tid.ip(),
            relay.ip(),
            "answers come from the relay's address"
        );
        assert_ne!(
            tid.port(),
            relay.port(),
            "answers come from a transfer port"
        );
        match Packet::decode(&buf[..n]).unwrap() {
            Packet::Oack(o) => {
                blk = o.blksize().unwrap_or(512) as usize;
                let ack = Packet::Ack { block: 0 }.to_vec().unwrap();
                sock.send_to(&ack, tid).await.unwrap();
            }
            Packet::Data { block, data } => {
                if block == expect {
                    out.extend_from_slice(data);
                    expect = expect.wrapping_add(1);
                }
                let ack = Packet::Ack { block }.to_vec().unwrap();
                sock.send_to(&ack, tid).await.unwrap();
                if data.len() < blk {
                    return Got::File(out);
                }
            }
            Packet::Error { code, .. } => return Got::Error(code),
            other => panic!("unexpected {other:?}"),
        }
    }
}

struct Harness {
    relay: SocketAddr,
    uploads: Uploads,
    node: Arc<Node>,
    _events: tokio::sync::mpsc::Receiver<Batch>,
    _stop: oneshot::Sender<()>,
}

async fn start(edit: impl FnOnce(&mut Config)) -> Harness {
    let (upstream, uploads) = fake_server().await;
    let mut cfg = Config::default();
    cfg.tftp.enabled = true;
    cfg.tftp.upstream = upstream;
    edit(&mut cfg);
    let (node, events) = Node::new(cfg);
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let relay = sock.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(run(sock, node.clone(), async move {
        let _ = stopped.await;
    }));
    Harness {
        relay,
        uploads,
        node,
        _events: events,
        _stop: stop,
    }
}

fn get(c: &AtomicU64) -> u64 {
    Stats::get(c)
}

const LO: Ipv4Addr = Ipv4Addr::LOCALHOST;

#[tokio::test]
async fn relays_files_with_and_without_blksize() {
    let h = start(|_| {}).await;
    for (len, blk) in [
        (0, None),
        (1500, None),
        (1024, None),
        (100_000, Some(1428)),
        (70_000, Some(8)),
    ] {
        let got = fetch(h.relay, LO, &format!("file-{len}"), blk).await;
        assert_eq!(got, Got::File(content(len)), "file-{len} blksize {blk:?}");
    }
    let s = &h.node.stats;
    assert_eq!(get(&s.tftp_requests), 5);
    assert_eq!(get(&s.tftp_transfers), 5);
    assert_eq!(get(&s.tftp_malformed), 0);
}

#[tokio::test]
async fn relays_uploads() {
    let h = start(|c| c.tftp.max_transfers_per_ip = 1).await;
    let sock = UdpSocket::bind((LO, 0)).await.unwrap();
    let wrq = Packet::Wrq(Request {
        filename: b"log.txt",
        mode: Mode::Octet,
        options: Options::new(),
    });
    sock.send_to(&wrq.to_vec().unwrap(), h.relay).await.unwrap();
    let file = content(1100);
    let mut buf = vec![0u8; 2048];
    let (n, tid) = sock.recv_from(&mut buf).await.unwrap();
    assert_eq!(Packet::decode(&buf[..n]), Ok(Packet::Ack { block: 0 }));
    for (i, chunk) in file.chunks(512).enumerate() {
        let block = i as u16 + 1;
        let data = Packet::Data { block, data: chunk };
        sock.send_to(&data.to_vec().unwrap(), tid).await.unwrap();
        let n = timeout(WAIT, sock.recv(&mut buf)).await.unwrap().unwrap();
        assert_eq!(Packet::decode(&buf[..n]), Ok(Packet::Ack { block }));
    }
    wait_for(|| h.uploads.lock().len() == 1).await;
    assert_eq!(h.uploads.lock()[0], ("log.txt".to_string(), file));
    // A client that sends ACKs on a write (wrong direction) is not relayed.
    sock.send_to(b"\x00\x04\x00\x09", tid).await.unwrap();
    wait_for(|| get(&h.node.stats.tftp_dropped) == 1).await;
}

#[tokio::test]
async fn finished_transfers_free_their_slot() {
    let h = start(|c| c.tftp.max_transfers_per_ip = 1).await;
    for _ in 0..3 {
        assert_eq!(
            fetch(h.relay, LO, "file-600", None).await,
            Got::File(content(600))
        );
        // The slot is freed as soon as the relay has read the last ACK (the client sends it
        // and returns at once: give the relay a moment).
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Refusals end the transfer at once.
    for _ in 0..3 {
        assert_eq!(fetch(h.relay, LO, "missing-x", None).await, Got::Error(1));
    }
    assert_eq!(get(&h.node.stats.tftp_dropped), 0);
}

#[tokio::test]
async fn transfer_caps_drop_excess_requests() {
    let h = start(|c| {
        c.tftp.max_transfers_per_ip = 2;
        c.tftp.max_transfers = 3;
    })
    .await;
    let send = |from: Ipv4Addr, name: &'static str| {
        let relay = h.relay;
        async move {
            let s = UdpSocket::bind((from, 0)).await.unwrap();
            let rrq = Packet::Rrq(Request {
                filename: name.as_bytes(),
                mode: Mode::Octet,
                options: Options::new(),
            });
            s.send_to(&rrq.to_vec().unwrap(), relay).await.unwrap();
            s
        }
    };
    // Unanswered requests hold their slots.
    let _a = send(LO, "silent-1").await;
    let _b = send(LO, "silent-2").await;
    let _c = send(LO, "silent-3").await;
    wait_for(|| get(&h.node.stats.tftp_dropped) == 1).await;
    assert_eq!(get(&h.node.stats.tftp_transfers), 2);
    let _d = send(Ipv4Addr::new(127, 0, 0, 2), "silent-4").await;
    let _e = send(Ipv4Addr::new(127, 0, 0, 3), "silent-5").await;
    wait_for(|| get(&h.node.stats.tftp_dropped) == 2).await;
    assert_eq!(get(&h.node.stats.tftp_transfers), 3);
}

#[tokio::test]
async fn retransmitted_requests_are_not_new_requests() {
    let h = start(|c| c.tftp.max_transfers_per_ip = 1).await;
    let s = UdpSocket::bind((LO, 0)).await.unwrap();
    let rrq = Packet::Rrq(Request {
        filename: b"silent-1",
        mode: Mode::Octet,
        options: Options::new(),
    })
    .to_vec()
    .unwrap();
    for _ in 0..5 {
        s.send_to(&rrq, h.relay).await.unwrap();
    }
    wait_for(|| get(&h.node.stats.tftp_requests) == 1).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get(&h.node.stats.tftp_requests), 1);
    assert_eq!(get(&h.node.stats.tftp_transfers), 1);
    assert_eq!(get(&h.node.stats.tftp_dropped), 0);
}

#[tokio::test]
async fn guessing_blocks_the_source_on_the_shared_table() {
    let h = start(|c| c.tftp.not_found_limit = 5).await;
    for i in 0..5 {
        let name = format!("missing-SEP00112233445{i}.cnf.xml");
        assert_eq!(fetch(h.relay, LO, &name, None).await, Got::Error(1));
    }
    wait_for(|| h.node.inspect(|e| e.blocks().count()) == 1).await;
    let (kind, evidence, device) = h.node.inspect(|e| {
        let b = e.blocks().next().unwrap();
        (b.kind, b.evidence.clone(), b.device.clone())
    });
    assert_eq!(kind, BlockType::Tftp);
    assert_eq!(device, "TFTP octet");
    assert!(
        evidence
            .iter()
            .any(|e| e.contains("missing-SEP001122334454.cnf.xml -> ERROR 1")),
        "{evidence:?}"
    );
    // Blocked: even an existing file is not served; other sources still are.
    assert_eq!(fetch(h.relay, LO, "file-10", None).await, Got::Nothing);
    assert!(get(&h.node.stats.tftp_dropped) >= 1);
    let other = Ipv4Addr::new(127, 0, 0, 2);
    assert_eq!(
        fetch(h.relay, other, "file-10", None).await,
        Got::File(content(10))
    );
    // The block is the SIP side's block too.
    let now = h.node.now();
    let src = SocketAddr::new(IpAddr::V4(LO), 5060);
    assert!(h.node.with_engine(|e| e.is_blocked(now, src)));
}

#[tokio::test]
async fn sip_blocks_apply_to_tftp() {
    let h = start(|_| {}).await;
    let now = h.node.now();
    let key = crate::blocks::BlockKey::whole(crate::blocks::source_net(IpAddr::V4(LO), 64));
    h.node
        .with_engine(|e| e.manual_block(now, key, None, "test"))
        .unwrap();
    assert_eq!(fetch(h.relay, LO, "file-10", None).await, Got::Nothing);
    assert_eq!(get(&h.node.stats.tftp_dropped), 1);
    assert_eq!(get(&h.node.stats.tftp_requests), 0);
}

#[tokio::test]
async fn requests_over_hit_count_are_limited_not_answered() {
    let h = start(|c| {
        c.tftp.hit_count = 3;
        c.tftp.limited_rate = 1;
    })
    .await;
    for _ in 0..4 {
        assert_eq!(
            fetch(h.relay, LO, "file-10", None).await,
            Got::File(content(10))
        );
    }
    assert_eq!(fetch(h.relay, LO, "file-10", None).await, Got::Nothing);
    assert_eq!(get(&h.node.stats.tftp_limited), 1);
    // Retries of a file the source was served are not guesses: no block.
    assert_eq!(h.node.inspect(|e| e.blocks().count()), 0);
}

#[tokio::test]
async fn whitelisted_sources_are_never_limited_or_blocked() {
    let h = start(|c| {
        c.tftp.hit_count = 1;
        c.tftp.limited_rate = 1;
        c.tftp.not_found_limit = 2;
        c.lists.whitelist = vec!["127.0.0.1/32".parse().unwrap()];
    })
    .await;
    for _ in 0..5 {
        assert_eq!(fetch(h.relay, LO, "missing-a", None).await, Got::Error(1));
    }
    assert_eq!(get(&h.node.stats.tftp_limited), 0);
    assert_eq!(h.node.inspect(|e| e.blocks().count()), 0);
}

#[tokio::test]
async fn malformed_and_stray_packets_are_dropped_and_counted() {
    let h = start(|_| {}).await;
    let s = UdpSocket::bind((LO, 0)).await.unwrap();
    for junk in [
        &b"\x00\x01no-terminator"[..],
        b"\x00\x01f\x00binary\x00",
        b"\x00\x09",
        b"\x00\x01f\x00octet\x00blksize\x00999999\x00",
        &[0u8; 1500][..],
    ] {
        s.send_to(junk, h.relay).await.unwrap();
    }
    // DATA/ACK on the listen port are not requests.
    s.send_to(b"\x00\x04\x00\x01", h.relay).await.unwrap();
    wait_for(|| get(&h.node.stats.tftp_malformed) == 5).await;
    wait_for(|| get(&h.node.stats.tftp_dropped) == 1).await;
    assert_eq!(get(&h.node.stats.tftp_transfers), 0);
    // The relay still works.
    assert_eq!(
        fetch(h.relay, LO, "file-3", None).await,
        Got::File(content(3))
    );
}

async fn wait_for(mut cond: impl FnMut() -> bool) {
    for _ in 0..200 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(cond(), "condition not reached within 2 s");
}

#[tokio::test(start_paused = true)]
async fn abandoned_transfers_time_out_and_free_their_slot() {
    let h = start(|c| c.tftp.max_transfers_per_ip = 1).await;
    let s = UdpSocket::bind((LO, 0)).await.unwrap();
    let rrq = |name: &'static [u8]| {
        Packet::Rrq(Request {
            filename: name,
            mode: Mode::Octet,
            options: Options::new(),
        })
        .to_vec()
        .unwrap()
    };
    s.send_to(&rrq(b"silent-1"), h.relay).await.unwrap();
    wait_for(|| get(&h.node.stats.tftp_transfers) == 1).await;
    // The slot is held while the server may still answer...
    s.send_to(&rrq(b"silent-2"), h.relay).await.unwrap();
    wait_for(|| get(&h.node.stats.tftp_dropped) == 1).await;
    // ...and freed once nothing came for ANSWER_TIMEOUT.
    tokio::time::sleep(super::ANSWER_TIMEOUT + Duration::from_secs(1)).await;
    s.send_to(&rrq(b"silent-3"), h.relay).await.unwrap();
    wait_for(|| get(&h.node.stats.tftp_transfers) == 2).await;
    assert_eq!(get(&h.node.stats.tftp_dropped), 1);
}
