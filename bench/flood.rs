//! Load generator for `bench/flood.sh`: many loopback sources at once.
//!
//! - `flood seed DST N`: one scanner OPTIONS (User-Agent friendly-scanner) from each of N
//!   sources 127.3.0.0 + i, paced at about 20,000 a second, so sipwarden blocks every one of them
//!   (a block table of N entries, made the way an attack makes it).
//! - `flood blast DST SOURCES SECS`: INVITEs round-robin from the first SOURCES of those sources,
//!   as fast as one core sends, for at most SECS seconds and at most 50 million datagrams.
//!
//! Prints what it sent. Loopback only; every loop is bounded in count and time.

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

fn source(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(127, 3, 0, 0)) + i)
}

fn options(i: u32) -> Vec<u8> {
    format!(
        "OPTIONS sip:100@127.0.0.1 SIP/2.0\r\n\
Via: SIP/2.0/UDP {ip}:5060;branch=z9hG4bK-seed-{i}\r\n\
Max-Forwards: 70\r\n\
From: \"sipvicious\" <sip:100@{ip}>;tag=s{i}\r\n\
To: <sip:100@127.0.0.1>\r\n\
Call-ID: seed-{i}@{ip}\r\n\
CSeq: 1 OPTIONS\r\n\
User-Agent: friendly-scanner\r\n\
Content-Length: 0\r\n\r\n",
        ip = source(i)
    )
    .into_bytes()
}

fn invite(i: u32) -> Vec<u8> {
    format!(
        "INVITE sip:1002@127.0.0.1 SIP/2.0\r\n\
Via: SIP/2.0/UDP {ip}:5060;branch=z9hG4bK-blast-{i}\r\n\
Max-Forwards: 70\r\n\
From: <sip:1001@{ip}>;tag=b{i}\r\n\
To: <sip:1002@127.0.0.1>\r\n\
Call-ID: blast-{i}@{ip}\r\n\
CSeq: 1 INVITE\r\n\
Contact: <sip:1001@{ip}:5060>\r\n\
Content-Length: 0\r\n\r\n",
        ip = source(i)
    )
    .into_bytes()
}

fn bind(i: u32) -> Option<UdpSocket> {
    UdpSocket::bind(SocketAddr::from((source(i), 0))).ok()
}

fn seed(dst: SocketAddr, n: u32) {
    let t0 = Instant::now();
    let mut sent = 0u32;
    for i in 0..n {
        if let Some(s) = bind(i) {
            if s.send_to(&options(i), dst).is_ok() {
                sent += 1;
            }
        }
        // ~20,000 a second: 200 per 10 ms.
        if i % 200 == 199 {
            let due = Duration::from_millis(u64::from(i / 200 + 1) * 10);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        if t0.elapsed() > Duration::from_secs(120) {
            break;
        }
    }
    println!(
        "seed: {sent} sources sent one scanner OPTIONS in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}

fn blast(dst: SocketAddr, sources: u32, secs: u64) {
    let socks: Vec<(UdpSocket, Vec<u8>)> = (0..sources)
        .filter_map(|i| bind(i).map(|s| (s, invite(i))))
        .collect();
    if socks.is_empty() {
        println!("blast: no source could bind");
        return;
    }
    let t0 = Instant::now();
    let limit = Duration::from_secs(secs);
    let mut sent = 0u64;
    'outer: while sent < 50_000_000 {
        for (s, m) in &socks {
            if s.send_to(m, dst).is_ok() {
                sent += 1;
            }
        }
        if t0.elapsed() > limit {
            break 'outer;
        }
    }
    let el = t0.elapsed().as_secs_f64();
    println!(
        "blast: {sent} INVITEs from {} sources in {el:.1} s ({:.0}/s)",
        socks.len(),
        sent as f64 / el
    );
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| args.get(i).map(String::as_str).unwrap_or("");
    let Ok(dst) = arg(2).parse::<SocketAddr>() else {
        eprintln!("usage: flood seed DST N | flood blast DST SOURCES SECS");
        std::process::exit(2);
    };
    match arg(1) {
        "seed" => seed(dst, arg(3).parse().unwrap_or(1000)),
        "blast" => blast(
            dst,
            arg(3).parse().unwrap_or(10_000),
            arg(4).parse().unwrap_or(10),
        ),
        _ => {
            eprintln!("usage: flood seed DST N | flood blast DST SOURCES SECS");
            std::process::exit(2);
        }
    }
}
