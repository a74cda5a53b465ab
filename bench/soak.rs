//! Helper programs for bench/soak.sh, one per subcommand (std and socket2 only):
//!
//!   soak sink IP:PORT STOPFILE            the PBX: answers REGISTER 401/200/403, INVITE 200/404,
//!                                         BYE/OPTIONS 200, ignores ACK
//!   soak flood 4|6 TARGET COUNT RATE      one packet from each of COUNT distinct source addresses
//!                                         (127.16.0.1 up for IPv4; one /64 each under 2001:db8::/32
//!                                         for IPv6), RATE packets per second, eight kinds in turn
//!   soak slowloris TARGET IPS PER_IP SECS PER_IP TCP connections from each of IPS addresses
//!                                         (127.0.1.1 up): byte-at-a-time headers, idle, CRLF
//!                                         keep-alives; reports how long each lived
//!   soak phone udp|tcp PROXY LOCAL_IP STOPFILE
//!                                         a legitimate phone: REGISTER (401, then 200), INVITE 200,
//!                                         ACK, BYE 200, over and over; reports failures
//!
//! Every subcommand prints one summary line starting with its name.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, Socket, Type};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = match a.as_slice() {
        ["sink", addr, stop] => sink(addr.parse().unwrap_or_else(|_| usage()), Path::new(stop)),
        ["flood", fam, target, count, rate] => flood(
            fam == &"6",
            target.parse().unwrap_or_else(|_| usage()),
            count.parse().unwrap_or_else(|_| usage()),
            rate.parse().unwrap_or_else(|_| usage()),
        ),
        ["slowloris", target, ips, per_ip, secs] => slowloris(
            target.parse().unwrap_or_else(|_| usage()),
            ips.parse().unwrap_or_else(|_| usage()),
            per_ip.parse().unwrap_or_else(|_| usage()),
            secs.parse().unwrap_or_else(|_| usage()),
        ),
        ["phone", t, proxy, ip, stop] => phone(
            t == &"tcp",
            proxy.parse().unwrap_or_else(|_| usage()),
            ip.parse().unwrap_or_else(|_| usage()),
            Path::new(stop),
        ),
        _ => usage(),
    };
    if let Err(e) = r {
        eprintln!("soak: {e}");
        std::process::exit(1);
    }
}

fn usage() -> ! {
    eprintln!("usage: see the top of bench/soak.rs");
    std::process::exit(2)
}

// ---- a little SIP --------------------------------------------------------------------------

/// Header lines of a message, names lower-cased and compact forms expanded.
fn headers(msg: &str) -> Vec<(String, &str)> {
    let head = msg.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| {
            let n = n.trim().to_ascii_lowercase();
            let n = match n.as_str() {
                "v" => "via",
                "f" => "from",
                "t" => "to",
                "i" => "call-id",
                "m" => "contact",
                "l" => "content-length",
                other => other,
            }
            .to_string();
            (n, v.trim())
        })
        .collect()
}

fn header<'a>(h: &[(String, &'a str)], name: &str) -> Option<&'a str> {
    h.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
}

fn user_of(v: &str) -> &str {
    let s = v.split("sip:").nth(1).unwrap_or("");
    s.split(['@', ';', '>']).next().unwrap_or("")
}

/// The PBX's answer to a request: its Via, From, To (tagged), Call-ID, CSeq, Record-Route.
fn answer(req: &str, code: u16, reason: &str, extra: &str) -> String {
    let h = headers(req);
    let mut out = format!("SIP/2.0 {code} {reason}\r\n");
    for (n, v) in &h {
        match n.as_str() {
            "via" => out += &format!("Via: {v}\r\n"),
            "record-route" => out += &format!("Record-Route: {v}\r\n"),
            "from" => out += &format!("From: {v}\r\n"),
            "call-id" => out += &format!("Call-ID: {v}\r\n"),
            "cseq" => out += &format!("CSeq: {v}\r\n"),
            "to" if v.contains("tag=") => out += &format!("To: {v}\r\n"),
            "to" => out += &format!("To: {v};tag=pbx{code}\r\n"),
            _ => {}
        }
    }
    out + extra + "Content-Length: 0\r\n\r\n"
}

fn sink(addr: SocketAddr, stop: &Path) -> Res<()> {
    let sock = UdpSocket::bind(addr)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut buf = vec![0u8; 65536];
    let mut counts: HashMap<String, u64> = HashMap::new();
    while !stop.exists() {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(e) => return Err(e.into()),
        };
        let msg = String::from_utf8_lossy(&buf[..n]);
        if msg.starts_with("SIP/2.0 ") {
            *counts.entry("responses".into()).or_default() += 1;
            continue;
        }
        let method = msg.split(' ').next().unwrap_or("").to_string();
        *counts.entry(method.clone()).or_default() += 1;
        let h = headers(&msg);
        let user = user_of(header(&h, "to").unwrap_or(""));
        let resp = match method.as_str() {
            "ACK" => continue,
            "REGISTER" if header(&h, "authorization").is_none() => answer(
                &msg,
                401,
                "Unauthorized",
                "WWW-Authenticate: Digest realm=\"soak\", nonce=\"n\"\r\n",
            ),
            "REGISTER" if user == "legit" => answer(&msg, 200, "OK", ""),
            "REGISTER" => answer(&msg, 403, "Forbidden", ""),
            "INVITE" if user == "legit-callee" => answer(
                &msg,
                200,
                "OK",
                &format!("Contact: <sip:legit-callee@{addr}>\r\n"),
            ),
            "INVITE" => answer(&msg, 404, "Not Found", ""),
            _ => answer(&msg, 200, "OK", ""),
        };
        let _ = sock.send_to(resp.as_bytes(), from);
    }
    let mut c: Vec<_> = counts.into_iter().collect();
    c.sort();
    println!("sink: received {c:?}");
    Ok(())
}

// ---- a million sources ---------------------------------------------------------------------

fn source(v6: bool, i: u64) -> IpAddr {
    if v6 {
        // One /64 per source under 2001:db8::/32.
        let (hi, lo) = ((i >> 16) as u16, i as u16);
        IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, hi, lo, 0, 0, 0, 1))
    } else {
        // 127.16.0.1 up, skipping .0 and .255 in the last octet.
        let n = i;
        let c = (n % 254 + 1) as u8;
        let b = ((n / 254) % 256) as u8;
        let a = (16 + n / (254 * 256)) as u8;
        IpAddr::V4(Ipv4Addr::new(127, a, b, c))
    }
}

/// Eight kinds in turn: what phones, scanners and broken clients send. Each source sends one,
/// so every kind leaves per-source state behind: detector windows, limiter cells, blocks.
fn flood_packet(i: u64, src: SocketAddr) -> Vec<u8> {
    let host = match src {
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
        SocketAddr::V4(a) => a.to_string(),
    };
    let (method, ua, auth) = match i % 8 {
        0 | 1 => ("OPTIONS", "Yealink SIP-T46S", ""),
        2 => ("REGISTER", "Yealink SIP-T46S", ""),
        3 => (
            "REGISTER",
            "Yealink SIP-T46S",
            "Authorization: Digest username=\"u\", realm=\"soak\", nonce=\"n\", uri=\"sip:pbx\", response=\"0\"\r\n",
        ),
        4 => ("INVITE", "Grandstream GXP2170", ""),
        5 => ("OPTIONS", "friendly-scanner", ""),
        6 => return b"GET / HTTP/1.0\r\nHost: pbx\r\n\r\n".to_vec(),
        _ => {
            return format!("OPTIONS sip:pbx SIP/2.0\r\nVia: SIP/2.0/UDP {host};branch=z9hG4bKb{i}\r\nl: 0\r\n\r\n")
                .into_bytes()
        }
    };
    format!(
        "{method} sip:u{i}@pbx SIP/2.0\r\n\
Via: SIP/2.0/UDP {host};branch=z9hG4bKf{i};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:u{i}@pbx>;tag=f{i}\r\n\
To: <sip:u{i}@pbx>\r\n\
Call-ID: flood-{i}@soak\r\n\
CSeq: 1 {method}\r\n\
Contact: <sip:u{i}@{host}>\r\n\
User-Agent: {ua}\r\n\
{auth}Content-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

fn flood(v6: bool, target: SocketAddr, count: u64, rate: u64) -> Res<()> {
    let t0 = Instant::now();
    let slot = Duration::from_millis(5);
    let per_slot = (rate / 200).max(1);
    let (mut sent, mut errors) = (0u64, 0u64);
    let mut next = Instant::now();
    let name = if v6 { "flood6" } else { "flood4" };
    for i in 0..count {
        let ip = source(v6, i);
        let r = UdpSocket::bind(SocketAddr::new(ip, 0)).and_then(|s| {
            let src = s.local_addr()?;
            s.send_to(&flood_packet(i, src), target)
        });
        match r {
            Ok(_) => sent += 1,
            Err(e) => {
                if errors == 0 {
                    eprintln!("{name}: {ip}: {e}");
                }
                errors += 1;
            }
        }
        if (i + 1) % per_slot == 0 {
            next += slot;
            if let Some(d) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        if (i + 1) % 100_000 == 0 {
            println!(
                "{name}: progress {} sources in {:.1}s",
                i + 1,
                t0.elapsed().as_secs_f64()
            );
        }
    }
    println!(
        "{name}: {sent} sources sent, {errors} errors, {:.1}s ({:.0}/s)",
        t0.elapsed().as_secs_f64(),
        sent as f64 / t0.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---- slow loris ----------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// Headers one byte every 500 ms, never finished.
    Drip,
    /// Connected, silent.
    Idle,
    /// A CRLF every second: keep-alive noise, never a message.
    Crlf,
}

struct Conn {
    sock: Socket,
    mode: Mode,
    opened: Instant,
    closed: Option<Duration>,
    next_write: Instant,
    sent: usize,
}

const DRIP: &[u8] =
    b"INVITE sip:slow@pbx SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.1.1;branch=z9hG4bKslow\r\nX-Pad: ";

fn slowloris(target: SocketAddr, ips: u8, per_ip: usize, secs: u64) -> Res<()> {
    let mut conns = Vec::new();
    let mut failed_connect = 0;
    for ip in 1..=ips {
        for j in 0..per_ip {
            let mode = [Mode::Drip, Mode::Idle, Mode::Crlf][j % 3];
            let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
            s.bind(&SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 1, ip)), 0).into())?;
            if s.connect(&target.into()).is_err() {
                failed_connect += 1;
                continue;
            }
            s.set_nonblocking(true)?;
            conns.push(Conn {
                sock: s,
                mode,
                opened: Instant::now(),
                closed: None,
                next_write: Instant::now(),
                sent: 0,
            });
        }
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 256];
    while Instant::now() < deadline && conns.iter().any(|c| c.closed.is_none()) {
        let now = Instant::now();
        for c in conns.iter_mut().filter(|c| c.closed.is_none()) {
            let mut s: &Socket = &c.sock;
            let gone = match s.read(&mut buf) {
                Ok(0) => true,
                Ok(_) => false,
                Err(e) => e.kind() != ErrorKind::WouldBlock,
            };
            let wrote_fail = if !gone && now >= c.next_write {
                let (bytes, every): (&[u8], u64) = match c.mode {
                    Mode::Drip => (&DRIP[c.sent % DRIP.len()..][..1], 500),
                    Mode::Crlf => (b"\r\n", 1000),
                    Mode::Idle => (b"", 1000),
                };
                c.next_write = now + Duration::from_millis(every);
                c.sent += 1;
                !bytes.is_empty() && s.write(bytes).is_err()
            } else {
                false
            };
            if gone || wrote_fail {
                c.closed = Some(c.opened.elapsed());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Cut within a second of connecting: refused by a connection cap.
    let refused = conns
        .iter()
        .filter(|c| c.closed.is_some_and(|d| d < Duration::from_secs(1)))
        .count();
    println!(
        "slowloris: {} connections from {ips} addresses ({per_ip} each), {failed_connect} failed to connect, {refused} cut at once (cap)",
        conns.len()
    );
    for mode in [Mode::Drip, Mode::Idle, Mode::Crlf] {
        let mut lives: Vec<f64> = conns
            .iter()
            .filter(|c| c.mode == mode)
            .filter_map(|c| c.closed)
            .filter(|d| *d >= Duration::from_secs(1))
            .map(|d| d.as_secs_f64())
            .collect();
        lives.sort_by(f64::total_cmp);
        let open = conns
            .iter()
            .filter(|c| c.mode == mode && c.closed.is_none())
            .count();
        let q = |p: f64| {
            lives
                .get(((lives.len() as f64 - 1.0) * p) as usize)
                .copied()
                .unwrap_or(f64::NAN)
        };
        println!(
            "slowloris: {mode:?}: {} admitted then cut after min {:.1}s / median {:.1}s / max {:.1}s, {open} still open at the end",
            lives.len(),
            q(0.0),
            q(0.5),
            q(1.0)
        );
    }
    Ok(())
}

// ---- a legitimate phone --------------------------------------------------------------------

enum Link {
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream, Vec<u8>),
}

impl Link {
    fn local(&self) -> Res<SocketAddr> {
        Ok(match self {
            Link::Udp(s, _) => s.local_addr()?,
            Link::Tcp(s, _) => s.local_addr()?,
        })
    }

    fn send(&mut self, msg: &str) -> Res<()> {
        match self {
            Link::Udp(s, to) => {
                s.send_to(msg.as_bytes(), *to)?;
            }
            Link::Tcp(s, _) => s.write_all(msg.as_bytes())?,
        }
        Ok(())
    }

    /// The next message, or None after `wait`.
    fn recv(&mut self, wait: Duration) -> Res<Option<String>> {
        let until = Instant::now() + wait;
        let mut chunk = vec![0u8; 65536];
        loop {
            if let Link::Tcp(_, buf) = self {
                if let Some(m) = take_frame(buf) {
                    return Ok(Some(m));
                }
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let r = match self {
                Link::Udp(s, _) => {
                    s.set_read_timeout(Some(left))?;
                    s.recv(&mut chunk)
                }
                Link::Tcp(s, _) => {
                    s.set_read_timeout(Some(left))?;
                    s.read(&mut chunk)
                }
            };
            match (r, &mut *self) {
                (Ok(0), Link::Tcp(..)) => return Err("connection closed".into()),
                (Ok(n), Link::Udp(..)) => {
                    return Ok(Some(String::from_utf8_lossy(&chunk[..n]).into_owned()))
                }
                (Ok(n), Link::Tcp(_, buf)) => buf.extend_from_slice(&chunk[..n]),
                (Err(e), _) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                (Err(e), _) => return Err(e.into()),
            }
        }
    }
}

fn take_frame(buf: &mut Vec<u8>) -> Option<String> {
    while buf.starts_with(b"\r\n") {
        buf.drain(..2);
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let cl: usize = header(&headers(&head), "content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if buf.len() < end + cl {
        return None;
    }
    let m: Vec<u8> = buf.drain(..end + cl).collect();
    Some(String::from_utf8_lossy(&m).into_owned())
}

struct Phone {
    link: Link,
    tcp: bool,
    n: u64,
}

impl Phone {
    fn request(
        &self,
        method: &str,
        ruri: &str,
        to: &str,
        call: &str,
        cseq: u32,
        extra: &str,
    ) -> Res<String> {
        let me = self.link.local()?;
        let t = if self.tcp { "TCP" } else { "UDP" };
        let n = self.n;
        Ok(format!(
            "{method} {ruri} SIP/2.0\r\n\
Via: SIP/2.0/{t} {me};branch=z9hG4bKlegit{n}x{cseq}{method};rport\r\n\
Max-Forwards: 70\r\n\
From: <sip:legit@pbx>;tag=legit{n}\r\n\
To: {to}\r\n\
Call-ID: {call}\r\n\
CSeq: {cseq} {method}\r\n\
Contact: <sip:legit@{me}{}>\r\n\
User-Agent: Yealink SIP-T46S 66.86.0.15\r\n\
{extra}Content-Length: 0\r\n\r\n",
            if self.tcp { ";transport=tcp" } else { "" }
        ))
    }

    /// Send and wait for the final response (UDP: retransmit at 0.5 s and 1.5 s).
    fn transact(&mut self, req: &str) -> Res<Option<String>> {
        let cseq = header(&headers(req), "cseq").unwrap_or("").to_string();
        let t0 = Instant::now();
        self.link.send(req)?;
        let mut resend = [500u64, 1500].into_iter();
        let mut next = resend.next();
        while t0.elapsed() < Duration::from_secs(3) {
            let wait = match (next, self.tcp) {
                (Some(ms), false) => Duration::from_millis(ms).saturating_sub(t0.elapsed()),
                _ => Duration::from_secs(3).saturating_sub(t0.elapsed()),
            };
            match self.link.recv(wait.max(Duration::from_millis(1)))? {
                Some(m) if m.starts_with("SIP/2.0 1") => {}
                Some(m) if header(&headers(&m), "cseq") == Some(cseq.as_str()) => {
                    return Ok(Some(m))
                }
                Some(_) => {}
                None if !self.tcp && next.is_some() => {
                    self.link.send(req)?;
                    next = resend.next();
                }
                None => {}
            }
        }
        Ok(None)
    }

    /// One cycle: REGISTER 401, REGISTER 200, INVITE 200, ACK, BYE 200.
    fn cycle(&mut self) -> Res<Result<(), String>> {
        self.n += 1;
        let n = self.n;
        let reg = format!("reg{n}@legit");
        let to = "<sip:legit@pbx>";
        let r = self.request("REGISTER", "sip:pbx", to, &reg, 1, "Expires: 300\r\n")?;
        match self.transact(&r)? {
            Some(m) if m.starts_with("SIP/2.0 401") => {}
            other => return Ok(Err(format!("REGISTER: {}", status(&other)))),
        }
        let auth = "Expires: 300\r\nAuthorization: Digest username=\"legit\", realm=\"soak\", nonce=\"n\", uri=\"sip:pbx\", response=\"0\"\r\n";
        let r = self.request("REGISTER", "sip:pbx", to, &reg, 2, auth)?;
        match self.transact(&r)? {
            Some(m) if m.starts_with("SIP/2.0 200") => {}
            other => return Ok(Err(format!("REGISTER+auth: {}", status(&other)))),
        }
        let call = format!("call{n}@legit");
        let callee = "<sip:legit-callee@pbx>";
        let r = self.request("INVITE", "sip:legit-callee@pbx", callee, &call, 1, "")?;
        let ok = match self.transact(&r)? {
            Some(m) if m.starts_with("SIP/2.0 200") => m,
            other => return Ok(Err(format!("INVITE: {}", status(&other)))),
        };
        let h = headers(&ok);
        let to_tagged = header(&h, "to").unwrap_or(callee).to_string();
        let target = header(&h, "contact")
            .map(|c| c.trim_matches(['<', '>']).to_string())
            .unwrap_or_else(|| "sip:legit-callee@pbx".into());
        let mut rr: Vec<&str> = h
            .iter()
            .filter(|(n, _)| n == "record-route")
            .flat_map(|(_, v)| v.split(','))
            .map(str::trim)
            .collect();
        rr.reverse();
        let route = if rr.is_empty() {
            String::new()
        } else {
            format!("Route: {}\r\n", rr.join(", "))
        };
        let ack = self.request("ACK", &target, &to_tagged, &call, 1, &route)?;
        self.link.send(&ack)?;
        let bye = self.request("BYE", &target, &to_tagged, &call, 2, &route)?;
        match self.transact(&bye)? {
            Some(m) if m.starts_with("SIP/2.0 200") => Ok(Ok(())),
            other => Ok(Err(format!("BYE: {}", status(&other)))),
        }
    }
}

fn status(m: &Option<String>) -> String {
    match m {
        Some(m) => m.lines().next().unwrap_or("").to_string(),
        None => "no answer".into(),
    }
}

fn phone(tcp: bool, proxy: SocketAddr, ip: IpAddr, stop: &Path) -> Res<()> {
    let link = if tcp {
        let s = Socket::new(
            Domain::for_address(proxy),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.bind(&SocketAddr::new(ip, 0).into())?;
        s.connect(&proxy.into())?;
        Link::Tcp(s.into(), Vec::new())
    } else {
        Link::Udp(UdpSocket::bind(SocketAddr::new(ip, 0))?, proxy)
    };
    let name = if tcp { "phone tcp" } else { "phone udp" };
    let mut p = Phone { link, tcp, n: 0 };
    let (mut ok, mut failed, mut worst) = (0u64, 0u64, Duration::ZERO);
    let mut last_err = String::new();
    let start = Instant::now();
    while !stop.exists() {
        let t0 = Instant::now();
        let r = p.cycle();
        let took = t0.elapsed();
        let at = t0.duration_since(start).as_secs_f64();
        match r {
            Ok(Ok(())) => ok += 1,
            Ok(Err(e)) => {
                failed += 1;
                println!("{name}: failure at {at:.1}s: {e}");
                last_err = e;
            }
            Err(e) => {
                failed += 1;
                last_err = e.to_string();
                println!("{name}: failure at {at:.1}s: {last_err}");
                if tcp {
                    break; // the connection is gone
                }
            }
        }
        if took > Duration::from_millis(500) {
            println!("{name}: slow cycle at {at:.1}s: {} ms", took.as_millis());
        }
        worst = worst.max(took);
        std::thread::sleep(Duration::from_millis(250));
    }
    println!(
        "{name}: {ok} calls ok, {failed} failed, slowest cycle {} ms{}",
        worst.as_millis(),
        if last_err.is_empty() {
            String::new()
        } else {
            format!(", last failure: {last_err}")
        }
    );
    Ok(())
}
