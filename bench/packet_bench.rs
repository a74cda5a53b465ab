//! Packet-path benchmark on loopback, everything in one run so the ratios compare like with
//! like. The machines here are small and noisy, so the figure of merit is CPU time per packet
//! of the receiving process (utime+stime from /proc), not wall-clock rate: it does not care
//! whether a sender or a neighbour stole the core meanwhile. Capacity = 1 s / CPU per packet.
//!
//! 1. a blocked source's packets: sipwarden (release binary) vs a bare UDP receive loop, both
//!    a blocking one (the kernel's floor) and one on the same socket setup as sipwarden's
//!    (socket2 with 4 MiB buffers and SO_REUSEPORT, non-blocking, tokio `recv_from` on a
//!    two-worker runtime), and sipwarden's own batched `recvmmsg` receive with nothing behind it;
//! 2. clean traffic forwarded through the protection pipeline vs the same traffic from a
//!    whitelisted source (which skips every detector).
//!
//! `packet_bench callgrind BIN...` instead counts instructions per blocked packet under
//! `valgrind --tool=callgrind` for each binary (repeatable on a noisy machine): counters are
//! zeroed once the proxy is up and the source blocked, `CG_PACKETS` packets are sent, the
//! counters dumped, and an idle window of the same length is subtracted.
//!
//! `packet_bench forward-cg` counts instructions per clean forwarded packet (REGISTER, INVITE,
//! 200 OK, ACK) under callgrind, in process: `Shared::handle` driven on a loopback socket by
//! `bench/forward_cg.rs`, one valgrind run per message kind, only that kind's phase collected.
//!
//! Every phase sends a bounded number of datagrams and stops by itself.
//! Run: `bench/packets.sh` (builds the release binary and this example, then runs it).

use std::io::Read;
use std::net::{SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "forward_cg.rs"]
mod forward_cg;

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

/// A socket set up as sipwarden sets up its own (4 MiB buffers, SO_REUSEPORT, non-blocking)
/// and a two-worker tokio runtime, for the bare loops.
fn sipwarden_like(addr: &str) -> (socket2::Socket, tokio::runtime::Runtime) {
    let addr: SocketAddr = addr.parse().expect("addr");
    let raw =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).expect("socket");
    raw.set_recv_buffer_size(4 << 20).ok();
    raw.set_send_buffer_size(4 << 20).ok();
    raw.set_reuse_port(true).ok();
    raw.set_nonblocking(true).expect("nonblocking");
    raw.bind(&addr.into()).expect("bind sink");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    (raw, rt)
}

/// The bare loop on sipwarden's socket setup: same options, tokio `recv_from` on a two-worker
/// runtime. Counts datagrams until 1 s of silence, then prints the count.
fn sink_async(addr: &str) {
    let (raw, rt) = sipwarden_like(addr);
    let n = rt.block_on(async move {
        let sock = tokio::net::UdpSocket::from_std(raw.into()).expect("tokio socket");
        let mut buf = vec![0u8; 65536];
        let mut n = 0u64;
        let mut wait = Duration::from_secs(20);
        while let Ok(Ok(_)) = tokio::time::timeout(wait, sock.recv_from(&mut buf)).await {
            n += 1;
            wait = Duration::from_secs(1);
        }
        n
    });
    println!("{n}");
}

/// The bare batched loop on sipwarden's socket setup: sipwarden's own `recvmmsg` receive
/// (`net::udp::Batch`, up to 32 datagrams per call) with nothing behind it.
fn sink_mmsg(addr: &str) {
    let (raw, rt) = sipwarden_like(addr);
    let n = rt.block_on(async move {
        let sock = tokio::net::UdpSocket::from_std(raw.into()).expect("tokio socket");
        let mut batch = sipwarden::net::udp::Batch::new(16385);
        let mut n = 0u64;
        let mut wait = Duration::from_secs(20);
        while let Ok(Ok(k)) = tokio::time::timeout(wait, batch.recv(&sock)).await {
            n += batch.datagrams().take(k).count() as u64;
            wait = Duration::from_secs(1);
        }
        n
    });
    println!("{n}");
}

/// Run a sink (`mode` = "sink", "sink-async" or "sink-mmsg") in its own process: CPU seconds and packets.
fn bare_phase(me: &PathBuf, mode: &str) -> (f64, u64) {
    let sink_addr: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .unwrap();
    let mut bare = Command::new(me)
        .args([mode, &sink_addr.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start sink");
    std::thread::sleep(Duration::from_millis(300));
    let pid = bare.id();
    let cpu0 = cpu_secs(pid);
    blast("127.0.0.9:0", sink_addr);
    std::thread::sleep(Duration::from_millis(100));
    let cpu = cpu_secs(pid) - cpu0;
    let mut out = String::new();
    if let Some(mut so) = bare.stdout.take() {
        let _ = so.read_to_string(&mut out);
    }
    let _ = bare.wait();
    (cpu, out.trim().parse().unwrap_or(0))
}

/// Packets sent in the measured callgrind window (valgrind runs the proxy ~50x slower).
const CG_PACKETS: u64 = 3_000;

/// The "summary:"/"totals:" instruction count of the newest callgrind dump in `dir`.
fn newest_dump_ir(dir: &std::path::Path) -> Option<u64> {
    let newest = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("cg.out"))
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())?;
    let text = std::fs::read_to_string(newest.path()).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("summary:").or(l.strip_prefix("totals:")))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn callgrind_control(args: &[&str]) {
    let _ = Command::new("callgrind_control")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Instructions per blocked packet for one binary under callgrind.
fn callgrind(bin: &str) -> Option<f64> {
    let dir = tempfile::tempdir().ok()?;
    let pbx = UdpSocket::bind("127.0.0.1:0").ok()?;
    let sip: SocketAddr = format!("127.0.0.1:{}", free_port("127.0.0.1"))
        .parse()
        .ok()?;
    let admin = format!("127.0.0.1:{}", free_port("127.0.0.1"));
    let cfg = format!(
        "[sip]\nlisten_udp = [\"{sip}\"]\nlisten_tcp = []\n[upstream]\naddress = \"{}\"\n\
[admin]\nlisten = \"{admin}\"\n[state]\npath = \"{}\"\n[log]\nlevel = \"warn\"\n",
        pbx.local_addr().ok()?,
        dir.path().join("state.db").display()
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, cfg).ok()?;
    let out = format!("--callgrind-out-file={}/cg.out", dir.path().display());
    let child = Command::new("valgrind")
        .args(["--tool=callgrind", &out, bin, "-c"])
        .arg(&path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let p = Proxy {
        child,
        admin,
        sip,
        _dir: tempfile::tempdir().ok()?,
    };
    let up = (0..600).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        http(&p.admin, "GET", "/healthz", "").is_some()
    });
    if !up {
        eprintln!("{bin}: did not start under valgrind");
        return None;
    }
    http(
        &p.admin,
        "POST",
        "/api/blocks",
        r#"{"ip":"127.0.0.9","reason":"bench"}"#,
    )?;
    let blocked = |v: &serde_json::Value| v["dropped"]["blocked"].as_u64().unwrap_or(0);
    let sock = UdpSocket::bind("127.0.0.9:0").ok()?;
    let msgs: Vec<Vec<u8>> = (0..64).map(invite).collect();
    let send = |n: u64| {
        for i in 0..n {
            let _ = sock.send_to(&msgs[(i % 64) as usize], p.sip);
            if i % 25 == 24 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    // Warm up (first-packet allocations, lazy statics), then settle.
    send(200);
    std::thread::sleep(Duration::from_secs(3));
    let before = stat(&p, blocked);
    let pid = p.child.id().to_string();
    let window = Duration::from_secs(8);
    callgrind_control(&["-z", &pid]);
    let t0 = Instant::now();
    send(CG_PACKETS);
    std::thread::sleep(window.saturating_sub(t0.elapsed()));
    callgrind_control(&["-d", &pid]);
    std::thread::sleep(Duration::from_millis(500));
    let busy = newest_dump_ir(dir.path())?;
    let handled = stat(&p, blocked).saturating_sub(before);
    // The same window with no traffic: timers, the expiry sweep, the runtime's idle work.
    callgrind_control(&["-z", &pid]);
    std::thread::sleep(window);
    callgrind_control(&["-d", &pid]);
    std::thread::sleep(Duration::from_millis(500));
    let idle = newest_dump_ir(dir.path())?;
    drop(p);
    if handled == 0 {
        return None;
    }
    let per = busy.saturating_sub(idle) as f64 / handled as f64;
    println!(
        "callgrind {bin}: {handled} blocked packets, {busy} Ir busy, {idle} Ir idle window: {per:.0} instructions/packet"
    );
    Some(per)
}

/// Instructions per clean forwarded packet, per message kind: this binary's `forward KIND`
/// under callgrind, collecting only the measured phase. Prints one line per kind.
fn callgrind_forward(me: &std::path::Path) {
    for kind in forward_cg::KINDS {
        let Ok(dir) = tempfile::tempdir() else { return };
        let out = format!("--callgrind-out-file={}/cg.out", dir.path().display());
        let run = Command::new("valgrind")
            .args([
                "--tool=callgrind",
                &out,
                "--toggle-collect=*forward_cg::measured*",
            ])
            .arg(me)
            .args(["forward", kind])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .output();
        let Ok(run) = run else {
            eprintln!("valgrind did not run");
            return;
        };
        let report = String::from_utf8_lossy(&run.stdout);
        let forwarded = report
            .lines()
            .find(|l| l.starts_with(&format!("forward {kind}:")))
            .unwrap_or("")
            .to_string();
        match newest_dump_ir(dir.path()) {
            Some(ir) if run.status.success() => println!(
                "callgrind clean forward {kind:<8} {:>7.0} instructions/packet ({forwarded})",
                ir as f64 / forward_cg::FWD_PACKETS as f64
            ),
            _ => println!("callgrind clean forward {kind}: no result ({forwarded})"),
        }
    }
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
    match args.get(1).map(String::as_str) {
        Some("sink") => {
            sink(args.get(2).map_or("127.0.0.1:0", String::as_str));
            return;
        }
        Some("sink-async") => {
            sink_async(args.get(2).map_or("127.0.0.1:0", String::as_str));
            return;
        }
        Some("sink-mmsg") => {
            sink_mmsg(args.get(2).map_or("127.0.0.1:0", String::as_str));
            return;
        }
        Some("forward") => {
            forward_cg::main(args.get(2).map_or("none", String::as_str));
            return;
        }
        Some("forward-cg") => {
            let me = std::env::current_exe().expect("exe");
            callgrind_forward(&me);
            return;
        }
        Some("callgrind") => {
            let bins: Vec<&String> = args.iter().skip(2).collect();
            let r: Vec<Option<f64>> = bins.iter().map(|b| callgrind(b)).collect();
            if let [Some(before), Some(after)] = r[..] {
                println!(
                    "ratio instructions per blocked packet after / before = {:.2}",
                    after / before
                );
            }
            return;
        }
        _ => {}
    }
    let me = std::env::current_exe().expect("exe");
    let bin = std::env::var_os("SIPWARDEN_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/sipwarden"));

    // 1a. The bare receive loops, each in its own process like sipwarden.
    let (bare_cpu, bare_n) = bare_phase(&me, "sink");
    let (same_cpu, same_n) = bare_phase(&me, "sink-async");
    let (mmsg_cpu, mmsg_n) = bare_phase(&me, "sink-mmsg");

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
    let b = line("bare UDP receive loop (blocking)", bare_cpu, bare_n);
    let s = line("bare loop, sipwarden's socket setup", same_cpu, same_n);
    let m = line("bare recvmmsg loop, same setup", mmsg_cpu, mmsg_n);
    let d = line("sipwarden: blocked source dropped", drop_cpu, drop_n);
    let pr = line("sipwarden: clean, all detectors", prot_cpu, prot_n);
    let w = line("sipwarden: clean, whitelisted", wl_cpu, wl_n);
    println!(
        "ratio blocked-drop capacity / bare receive capacity = {:.2}",
        b / d
    );
    println!(
        "ratio blocked-drop capacity / bare loop, same socket setup = {:.2}",
        s / d
    );
    println!(
        "ratio blocked-drop capacity / bare recvmmsg loop     = {:.2}",
        m / d
    );
    println!(
        "ratio protected / unprotected forwarding capacity   = {:.2}",
        w / pr
    );
}
