//! Packet-path benchmark on loopback, everything in one run so the ratios compare like with
//! like. The machines here are small and noisy, so the figure of merit is CPU time per packet
//! of the receiving process (utime+stime from /proc), not wall-clock rate: it does not care
//! whether a sender or a neighbour stole the core meanwhile. Capacity = 1 s / CPU per packet.
//!
//! 1. a blocked source's packets: sipwarden (release binary) vs a bare UDP receive loop;
//! 2. clean traffic forwarded through the protection pipeline vs the same traffic from a
//!    whitelisted source (which skips every detector).
//!
//! Every phase sends a bounded number of datagrams and stops by itself.
//! Run: `bench/packets.sh` (builds the release binary and this example, then runs it).

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PACKETS: u64 = 200_000;
/// Pause between bursts so the receiver, not the kernel's buffer, sees most packets.
const BURST: u64 = 64;

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

/// Send `PACKETS` datagrams in small bursts, yielding between bursts.
fn blast(from: &str, to: SocketAddr) {
    let sock = UdpSocket::bind(from).expect("bind sender");
    let msgs: Vec<Vec<u8>> = (0..64).map(invite).collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for i in 0..PACKETS {
        let _ = sock.send_to(&msgs[(i % 64) as usize], to);
        if i % BURST == BURST - 1 {
            std::thread::yield_now();
            if Instant::now() > deadline {
                break;
            }
        }
    }
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which is in parentheses and may contain spaces).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat; here indexes 11 and 12.
    (ticks(11) + ticks(12)) / 100.0
}

/// The bare loop: count datagrams until 1 s of silence, then print the count.
fn sink(addr: &str) {
    let raw =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    raw.set_recv_buffer_size(4 << 20).ok();
    raw.bind(&addr.parse::<SocketAddr>().expect("addr").into())
        .expect("bind sink");
    let sock: UdpSocket = raw.into();
    sock.set_read_timeout(Some(Duration::from_millis(300))).ok();
    let mut buf = [0u8; 65536];
    let mut n = 0u64;
    let mut idle = 0;
    let mut started = false;
    loop {
        match sock.recv(&mut buf) {
            Ok(_) => {
                n += 1;
                idle = 0;
                started = true;
            }
            Err(_) => {
                idle += 1;
                if (started && idle >= 3) || idle > 200 {
                    break;
                }
            }
        }
    }
    println!("{n}");
}

fn free_port(ip: &str) -> u16 {
    UdpSocket::bind(format!("{ip}:0"))
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Proxy {
    child: Child,
    admin: String,
    sip: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(bin: &PathBuf, pbx: SocketAddr) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let sip: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let admin = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let cfg = format!(
        "[sip]\nlisten_udp = [\"{sip}\"]\nlisten_tcp = []\n\
[upstream]\naddress = \"{pbx}\"\n\
[flood]\npackets_per_second = 100000000\n\
[invite]\nrate_limit = 100000000\nburst = 100000000\n\
[admin]\nlisten = \"{admin}\"\n\
[state]\npath = \"{}\"\n[log]\nlevel = \"warn\"\n",
        dir.path().join("state.db").display()
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, cfg).expect("write config");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&path)
        .stdout(Stdio::null())
        .spawn()
        .expect("start sipwarden");
    let p = Proxy {
        child,
        admin,
        sip,
        _dir: dir,
    };
    for _ in 0..100 {
        if http(&p.admin, "GET", "/healthz", "").is_some() {
            return p;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("sipwarden did not start");
}

/// A minimal HTTP/1.0 client for the admin API (no extra dependencies for the bench).
fn http(addr: &str, method: &str, path: &str, body: &str) -> Option<String> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn stat(p: &Proxy, pick: impl Fn(&serde_json::Value) -> u64) -> u64 {
    let body = http(&p.admin, "GET", "/api/stats", "").unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    pick(&v)
}

/// Run one phase against sipwarden: CPU seconds used and packets handled (per `pick`).
fn proxy_phase(p: &Proxy, from: &str, pick: impl Fn(&serde_json::Value) -> u64) -> (f64, u64) {
    let before = stat(p, &pick);
    let cpu0 = cpu_secs(p.child.id());
    blast(from, p.sip);
    // Let the receive queue drain.
    let mut last = stat(p, &pick);
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = stat(p, &pick);
        if now == last {
            break;
        }
        last = now;
    }
    (cpu_secs(p.child.id()) - cpu0, last - before)
}

fn line(name: &str, cpu: f64, n: u64) -> f64 {
    let us = if n > 0 {
        cpu * 1e6 / n as f64
    } else {
        f64::NAN
    };
    println!(
        "{name:<36} {n:>8} packets  {us:>7.2} µs CPU/packet  capacity {:>9.0} packets/s per core",
        1e6 / us
    );
    us
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("sink") {
        sink(args.get(2).map_or("127.0.0.1:0", String::as_str));
        return;
    }
    let me = std::env::current_exe().expect("exe");
    let bin = std::env::var_os("SIPWARDEN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/sipwarden"));

    // 1a. The bare receive loop, in its own process like sipwarden.
    let sink_addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let mut bare = Command::new(&me)
        .args(["sink", &sink_addr.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sink");
    std::thread::sleep(Duration::from_millis(200));
    let pid = bare.id();
    let cpu0 = cpu_secs(pid);
    blast("127.0.0.9:0", sink_addr);
    std::thread::sleep(Duration::from_millis(100));
    let bare_cpu = cpu_secs(pid) - cpu0;
    let mut out = String::new();
    if let Some(mut so) = bare.stdout.take() {
        let _ = so.read_to_string(&mut out);
    }
    let _ = bare.wait();
    let bare_n: u64 = out.trim().parse().unwrap_or(0);

    // The PBX for the forwarding phases: a socket nobody reads (the kernel drops the excess).
    let pbx = UdpSocket::bind("127.0.0.1:0").expect("bind pbx");
    let p = start_proxy(&bin, pbx.local_addr().expect("pbx addr"));
    http(
        &p.admin,
        "POST",
        "/api/blocks",
        r#"{"ip":"127.0.0.9","reason":"bench"}"#,
    )
    .expect("block");
    // 1b. sipwarden dropping a blocked source.
    let (drop_cpu, drop_n) = proxy_phase(&p, "127.0.0.9:0", |v| {
        v["dropped"]["blocked"].as_u64().unwrap_or(0)
    });
    // 2a. Clean traffic through every detector.
    let fwd = |v: &serde_json::Value| v["forwarded"]["requests"].as_u64().unwrap_or(0);
    let (prot_cpu, prot_n) = proxy_phase(&p, "127.0.0.2:0", fwd);
    // 2b. The same from a whitelisted source.
    http(
        &p.admin,
        "POST",
        "/api/whitelist",
        r#"{"cidr":"127.0.0.3/32"}"#,
    )
    .expect("whitelist");
    let (wl_cpu, wl_n) = proxy_phase(&p, "127.0.0.3:0", fwd);
    drop(p);

    println!("{PACKETS} INVITEs (~700 bytes) sent per phase on loopback");
    let b = line("bare UDP receive loop", bare_cpu, bare_n);
    let d = line("sipwarden: blocked source dropped", drop_cpu, drop_n);
    let pr = line("sipwarden: clean, all detectors", prot_cpu, prot_n);
    let w = line("sipwarden: clean, whitelisted", wl_cpu, wl_n);
    println!(
        "ratio blocked-drop capacity / bare receive capacity = {:.2}",
        b / d
    );
    println!(
        "ratio protected / unprotected forwarding capacity   = {:.2}",
        w / pr
    );
}
