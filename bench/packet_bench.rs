//! Packet-path benchmark, all on loopback, all in one run so the ratios compare like with like:
//!
//! 1. drop rate for a blocked source vs a bare UDP receive loop (the floor any proxy pays);
//! 2. forwarding rate for clean traffic with the protection pipeline vs without it (the same
//!    traffic from a whitelisted source skips every detector).
//!
//! Each phase sends a bounded number of datagrams for a bounded time and stops by itself.
//! Run: `cargo run --release --example packet_bench` (or `bench/packets.sh`).

use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sipwarden::blocks::{BlockKey, ListKind};
use sipwarden::config::Config;
use sipwarden::server;
use sipwarden::stats::DropReason;

const PACKETS: u64 = 300_000;
const PHASE_LIMIT: Duration = Duration::from_secs(4);

fn invite(i: u64) -> Vec<u8> {
    let sdp = "v=0\r\no=- 1 1 IN IP4 10.1.1.2\r\ns=-\r\nc=IN IP4 10.1.1.2\r\nt=0 0\r\nm=audio 4000 RTP/AVP 0 8 101\r\na=rtpmap:101 telephone-event/8000\r\n";
    format!(
        "INVITE sip:1002@pbx.test SIP/2.0\r\n\
Via: SIP/2.0/UDP 10.1.1.2:5060;branch=z9hG4bK{i:x};rport\r\n\
Max-Forwards: 70\r\n\
From: \"Alice\" <sip:1001@pbx.test>;tag=a{i}\r\n\
To: <sip:1002@pbx.test>\r\n\
Call-ID: {i:x}@10.1.1.2\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:1001@10.1.1.2:5060>\r\n\
User-Agent: Yealink SIP-T46S 66.86.0.15\r\n\
Allow: INVITE, ACK, CANCEL, BYE, OPTIONS, INFO, UPDATE, REFER, NOTIFY\r\n\
Supported: replaces, timer\r\n\
Content-Type: application/sdp\r\n\
Content-Length: {}\r\n\r\n{sdp}",
        sdp.len()
    )
    .into_bytes()
}

/// Blast `PACKETS` datagrams from `from` to `to` on a thread until done or `stop`.
fn blast(from: &str, to: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    let sock = UdpSocket::bind(from).expect("bind sender");
    let msgs: Vec<Vec<u8>> = (0..64).map(invite).collect();
    std::thread::spawn(move || {
        let mut sent = 0;
        while sent < PACKETS && !stop.load(Ordering::Relaxed) {
            if sock.send_to(&msgs[(sent % 64) as usize], to).is_ok() {
                sent += 1;
            }
        }
        sent
    })
}

/// Count datagrams arriving at `sink` until `PACKETS` or the phase limit; packets per second
/// between the first and the last.
fn sink_rate(sink: &UdpSocket) -> (u64, f64) {
    sink.set_read_timeout(Some(Duration::from_millis(300))).ok();
    let mut buf = [0u8; 4096];
    let mut n = 0u64;
    let mut first = None;
    let mut last = Instant::now();
    let deadline = Instant::now() + PHASE_LIMIT;
    while n < PACKETS && Instant::now() < deadline {
        match sink.recv(&mut buf) {
            Ok(_) => {
                let now = Instant::now();
                first.get_or_insert(now);
                last = now;
                n += 1;
            }
            Err(_) if first.is_some() => break,
            Err(_) => {}
        }
    }
    let secs = first.map_or(0.0, |f| (last - f).as_secs_f64());
    (n, if secs > 0.0 { n as f64 / secs } else { 0.0 })
}

/// Sample a counter until it stops moving; its rate between first and last change.
async fn counter_rate(read: impl Fn() -> u64) -> (u64, f64) {
    let start = read();
    let deadline = Instant::now() + PHASE_LIMIT;
    let mut first: Option<(Instant, u64)> = None;
    let mut last = (Instant::now(), start);
    let mut still = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let v = read();
        let now = Instant::now();
        if v != last.1 {
            first.get_or_insert((now, last.1));
            last = (now, v);
            still = 0;
        } else if first.is_some() {
            still += 1;
            if still > 10 {
                break;
            }
        }
        if v - start >= PACKETS {
            break;
        }
    }
    match first {
        Some((t0, v0)) if last.0 > t0 => (
            last.1 - start,
            (last.1 - v0) as f64 / (last.0 - t0).as_secs_f64(),
        ),
        _ => (last.1 - start, 0.0),
    }
}

fn config(pbx: SocketAddr) -> Config {
    let mut c = Config::default();
    c.sip.listen_udp = vec!["127.0.0.1:0".parse().unwrap()];
    c.sip.listen_tcp = vec![];
    c.admin.listen = "127.0.0.1:0".parse().unwrap();
    c.upstream.address = pbx.to_string();
    c.flood.packets_per_second = 10_000_000;
    c.invite.rate_limit = 10_000_000;
    c.invite.burst = 10_000_000;
    c.state.path = std::env::temp_dir()
        .join(format!("sipwarden-bench-{}.db", std::process::id()))
        .display()
        .to_string();
    c
}

async fn bare_loop() -> (u64, f64) {
    // 1a. Bare receive loop: tokio receive tasks that count and do nothing else, as many as
    // sipwarden runs per socket.
    let bare = Arc::new(
        tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind"),
    );
    let count = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let workers: Vec<_> = (0..std::thread::available_parallelism()
        .map_or(2, |n| n.get().clamp(1, 8)))
        .map(|_| {
            let (bare, count) = (bare.clone(), count.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                while bare.recv_from(&mut buf).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    let stop = Arc::new(AtomicBool::new(false));
    let sender = blast("127.0.0.9:0", bare.local_addr().unwrap(), stop.clone());
    let c2 = count.clone();
    let r = counter_rate(move || c2.load(Ordering::Relaxed)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    workers.iter().for_each(|w| w.abort());

    r
}

#[tokio::main(flavor = "multi_thread", worker_threads = 1)]
async fn main() {
    let (bare_n, bare_pps) = bare_loop().await;
    // 1b. sipwarden dropping a blocked source.
    let pbx = UdpSocket::bind("127.0.0.1:0").expect("bind pbx");
    let cfg = config(pbx.local_addr().unwrap())
        .validate()
        .expect("config");
    let bound = server::bind(&cfg).await.expect("bind sipwarden");
    let sip = bound.udp[0].local_addr().unwrap();
    let running = server::start(cfg, None, bound).await.expect("start");
    let node = running.node.clone();
    let now = node.now();
    node.with_engine(|e| {
        let net = sipwarden::blocks::parse_net("127.0.0.9").unwrap();
        e.manual_block(now, BlockKey::whole(net), None, "bench")
            .unwrap();
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sender = blast("127.0.0.9:0", sip, stop.clone());
    let n2 = node.clone();
    let (drop_n, drop_pps) = counter_rate(move || n2.stats.dropped(DropReason::Blocked)).await;
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();

    // 2a. Clean traffic through the whole protection pipeline.
    let stop = Arc::new(AtomicBool::new(false));
    let sender = blast("127.0.0.2:0", sip, stop.clone());
    let (fwd_n, fwd_pps) = tokio::task::block_in_place(|| sink_rate(&pbx));
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    while pbx.recv(&mut [0u8; 4096]).is_ok() {}

    // 2b. The same traffic from a whitelisted source: no detector runs.
    node.with_engine(|e| {
        let net = sipwarden::blocks::parse_net("127.0.0.3").unwrap();
        e.list_add(now, ListKind::Whitelist, net, "bench", "bench");
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sender = blast("127.0.0.3:0", sip, stop.clone());
    let (wl_n, wl_pps) = tokio::task::block_in_place(|| sink_rate(&pbx));
    stop.store(true, Ordering::Relaxed);
    let _ = sender.join();
    running.shutdown().await;
    // The baseline again, to see the noise of this machine within the run.
    let (bare2_n, bare2_pps) = bare_loop().await;
    let (bare_n, bare_pps) = if bare2_pps > bare_pps {
        (bare2_n, bare2_pps)
    } else {
        (bare_n, bare_pps)
    };

    println!(
        "packets per phase: at most {PACKETS}, at most {:?} each",
        PHASE_LIMIT
    );
    println!("bare UDP receive loop        {bare_pps:>12.0} pkt/s ({bare_n} packets)");
    println!("sipwarden, blocked source    {drop_pps:>12.0} pkt/s ({drop_n} packets)");
    println!("sipwarden, clean, protected  {fwd_pps:>12.0} pkt/s ({fwd_n} forwarded)");
    println!("sipwarden, clean, whitelisted{wl_pps:>12.0} pkt/s ({wl_n} forwarded)");
    println!(
        "ratio blocked-drop / bare receive      = {:.2}",
        drop_pps / bare_pps.max(1.0)
    );
    println!(
        "ratio protected / unprotected forward = {:.2}",
        fwd_pps / wl_pps.max(1.0)
    );
}
