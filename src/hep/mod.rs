//! HEP v3 export (`[hep]`): a copy of every SIP message sipwarden receives and sends, on both
//! legs, to sngrep, Homer or heplify-server, which see the plain SIP whatever the transport.
//!
//! The packet path decides what to keep first ([`Filter`]: `only`, `sample`; a blocked
//! source's dropped packets are kept only with `only = "blocked"`), and only then copies the
//! message into a bounded queue ([`Tap::received`], [`Tap::sent`]); a background task encodes
//! ([`encode`]) and sends. Skipped messages are counted
//! (`sipwarden_hep_packets_total{outcome="filtered"}`). Bounds: at most
//! [`QUEUE`] messages and [`QUEUE_BYTES`] bytes wait (an attack is exactly when captures pile
//! up); beyond that captures are dropped and counted, never waited for.
//!
//! Addresses: the peer is exact; sipwarden's side is the first `sip.listen_udp` /
//! `sip.listen_tcp` address (for an unspecified listen address, the local address the system
//! picks towards the PBX), so a ladder shows three columns: phone, sipwarden, PBX.

pub mod encode;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::config::{Config, HepOnly};
use crate::node::Node;
use crate::state::health::HepStats;
use crate::stats::Transport;

/// Captures waiting for the export task.
pub const QUEUE: usize = 4096;
/// Bytes of captures waiting, at most (4096 messages of 16 KiB would be 64 MiB).
pub const QUEUE_BYTES: usize = 8 << 20;
/// A lost TCP collector is reconnected at most this often; captures meanwhile are dropped.
const RECONNECT_EVERY: Duration = Duration::from_secs(1);

/// Where `hep.address` points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Udp(String),
    Tcp(String),
}

impl Target {
    /// `""` (off), `host:port` (UDP) or `tcp:host:port`; `udp:host:port` is accepted too.
    pub fn parse(s: &str) -> Result<Option<Target>, String> {
        if s.is_empty() {
            return Ok(None);
        }
        let (tcp, rest) = match s.split_once(':') {
            Some(("tcp", r)) => (true, r),
            Some(("udp", r)) => (false, r),
            _ => (false, s),
        };
        let port = rest
            .rsplit_once(':')
            .and_then(|(h, p)| (!h.is_empty()).then_some(p))
            .and_then(|p| p.parse::<u16>().ok())
            .filter(|p| *p != 0);
        if port.is_none() {
            return Err("must be host:port or tcp:host:port".into());
        }
        let host = rest.to_string();
        Ok(Some(if tcp {
            Target::Tcp(host)
        } else {
            Target::Udp(host)
        }))
    }
}

struct Capture {
    secs: u32,
    micros: u32,
    tcp: bool,
    src: SocketAddr,
    dst: SocketAddr,
    bytes: Vec<u8>,
}

struct TapInner {
    tx: mpsc::Sender<Capture>,
    queued: Arc<AtomicUsize>,
    stats: Arc<HepStats>,
    filter: Filter,
    /// For `only = "blocked"`: asks the engine whether an address is a suspect. Weak: the
    /// node owns the tap.
    node: Weak<Node>,
    local_udp: SocketAddr,
    local_tcp: SocketAddr,
}

/// What `[hep] only` and `sample` keep, decided on the packet path before anything is copied.
#[derive(Debug, Clone)]
pub struct Filter {
    pub only: HepOnly,
    /// Keep a Call-ID when its keyed hash is at most this (`u64::MAX`: all, 0 with
    /// `sample = 0`: none).
    keep_below: Option<u64>,
    /// A per-process key, so an attacker cannot choose Call-IDs that dodge (or flood) the
    /// sample.
    key: [u8; 16],
}

impl Filter {
    pub fn new(only: HepOnly, sample: f64, key: [u8; 16]) -> Filter {
        let keep_below = if sample >= 1.0 {
            Some(u64::MAX)
        } else if sample > 0.0 {
            Some((sample * u64::MAX as f64) as u64)
        } else {
            None
        };
        Filter {
            only,
            keep_below,
            key,
        }
    }

    /// Whether `bytes` passes the cheap filters: the dialog test and the Call-ID sample (all
    /// messages of one Call-ID are kept or left out together).
    pub fn keeps(&self, bytes: &[u8]) -> bool {
        if self.only == HepOnly::Dialogs && !encode::is_dialog(bytes) {
            return false;
        }
        match self.keep_below {
            Some(u64::MAX) => true,
            None => false,
            Some(max) => {
                let id = encode::call_id(bytes).unwrap_or_default();
                crate::util::keyed_hash64(&self.key, &[id]) <= max
            }
        }
    }
}

/// The packet path's end of the exporter; disabled (does nothing) until [`start`] sets it.
#[derive(Default)]
pub struct Tap {
    inner: OnceLock<TapInner>,
}

impl std::fmt::Debug for Tap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.inner.get().is_some() {
            "Tap(on)"
        } else {
            "Tap(off)"
        })
    }
}

impl Tap {
    /// A message received from `peer` that passed the blocked-source gate.
    pub fn received(&self, t: Transport, peer: SocketAddr, bytes: &[u8]) {
        if let Some(i) = self.inner.get() {
            i.capture(t, peer, false, bytes, Suspect::Ask(peer, None));
        }
    }

    /// A message from a blocked source, dropped at the gate: exported only with
    /// `only = "blocked"` (an attack is mostly these, and HEP must keep up under one).
    pub fn received_blocked(&self, t: Transport, peer: SocketAddr, bytes: &[u8]) {
        if let Some(i) = self.inner.get() {
            if i.filter.only == HepOnly::Blocked {
                i.capture(t, peer, false, bytes, Suspect::Yes);
            } else {
                i.stats.filtered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// A message sent to `peer`, on behalf of what was received from `origin` (the relayed
    /// request's sender, the answered request's sender).
    pub fn sent(&self, t: Transport, peer: SocketAddr, bytes: &[u8], origin: Option<SocketAddr>) {
        if let Some(i) = self.inner.get() {
            i.capture(t, peer, true, bytes, Suspect::Ask(peer, origin));
        }
    }
}

/// Whether a capture involves a suspect (for `only = "blocked"`).
enum Suspect {
    Yes,
    /// Ask the engine about these addresses.
    Ask(SocketAddr, Option<SocketAddr>),
}

impl TapInner {
    fn capture(
        &self,
        t: Transport,
        peer: SocketAddr,
        outgoing: bool,
        bytes: &[u8],
        suspect: Suspect,
    ) {
        if !self.filter.keeps(bytes) || !self.involves_suspect(suspect) {
            self.stats.filtered.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let tcp = t.is_stream();
        let local = if tcp { self.local_tcp } else { self.local_udp };
        let local = same_family(local, peer.ip());
        let (src, dst) = if outgoing {
            (local, peer)
        } else {
            (peer, local)
        };
        if self.queued.fetch_add(bytes.len(), Ordering::Relaxed) + bytes.len() > QUEUE_BYTES {
            self.queued.fetch_sub(bytes.len(), Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let c = Capture {
            secs: ts.as_secs() as u32,
            micros: ts.subsec_micros(),
            tcp,
            src,
            dst,
            bytes: bytes.to_vec(),
        };
        if let Err(e) = self.tx.try_send(c) {
            let n = match e {
                mpsc::error::TrySendError::Full(c) | mpsc::error::TrySendError::Closed(c) => {
                    c.bytes.len()
                }
            };
            self.queued.fetch_sub(n, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// True unless `only = "blocked"` and none of the addresses is blocked or has an open
    /// anomaly record. That asks the engine (its lock, once per capture), only in that mode.
    fn involves_suspect(&self, s: Suspect) -> bool {
        if self.filter.only != HepOnly::Blocked {
            return true;
        }
        let (a, b) = match s {
            Suspect::Yes => return true,
            Suspect::Ask(a, b) => (a, b),
        };
        let Some(node) = self.node.upgrade() else {
            return false;
        };
        let now = node.now();
        let e = node.engine();
        e.is_suspect(now, a) || b.is_some_and(|b| e.is_suspect(now, b))
    }
}

/// An IPv4 peer of a dual-stack socket shows as `::ffff:a.b.c.d`; HEP needs one family.
fn same_family(local: SocketAddr, peer: IpAddr) -> SocketAddr {
    match (local.ip(), peer) {
        (IpAddr::V4(l), IpAddr::V6(_)) => SocketAddr::new(l.to_ipv6_mapped().into(), local.port()),
        (IpAddr::V6(l), IpAddr::V4(_)) => match l.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), local.port()),
            None => SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), local.port()),
        },
        _ => local,
    }
}

/// sipwarden's own address as shown in captures (see the module docs).
async fn local_address(listen: Option<SocketAddr>, cfg: &Config) -> SocketAddr {
    let fallback = SocketAddr::from(([127, 0, 0, 1], 5060));
    let Some(l) = listen else { return fallback };
    if !l.ip().is_unspecified() {
        return l;
    }
    let towards: Option<SocketAddr> = cfg.upstream.address.parse().ok();
    if let Some(to) = towards {
        if let Ok(s) = std::net::UdpSocket::bind(SocketAddr::new(l.ip(), 0)) {
            if s.connect(to).is_ok() {
                if let Ok(a) = s.local_addr() {
                    return SocketAddr::new(a.ip(), l.port());
                }
            }
        }
    }
    SocketAddr::new(fallback.ip(), l.port())
}

/// Start exporting for `node` when `hep.address` is set (read at start; a change needs a
/// restart). Must run inside a tokio runtime.
pub async fn start(node: &Arc<Node>) {
    let cfg = node.config();
    let target = match Target::parse(&cfg.hep.address) {
        Ok(Some(t)) => t,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(error = %e, "hep.address is invalid; HEP export is off");
            return;
        }
    };
    let stats = Arc::new(HepStats::default());
    node.stats.health.attach_hep(stats.clone());
    let (tx, rx) = mpsc::channel(QUEUE);
    let queued = Arc::new(AtomicUsize::new(0));
    let inner = TapInner {
        tx,
        queued: queued.clone(),
        stats: stats.clone(),
        filter: Filter::new(cfg.hep.only, cfg.hep.sample, rand::random()),
        node: Arc::downgrade(node),
        local_udp: local_address(cfg.sip.listen_udp.first().copied(), &cfg).await,
        local_tcp: local_address(cfg.sip.listen_tcp.first().copied(), &cfg).await,
    };
    if node.stats.hep.inner.set(inner).is_err() {
        return;
    }
    let w = Worker {
        target,
        capture_id: cfg.hep.capture_id,
        password: cfg.hep.password.clone().into_bytes(),
        stats,
        queued,
    };
    tracing::info!(address = %cfg.hep.address, "HEP export started");
    tokio::spawn(w.run(rx));
}

struct Worker {
    target: Target,
    capture_id: u32,
    password: Vec<u8>,
    stats: Arc<HepStats>,
    queued: Arc<AtomicUsize>,
}

enum Link {
    Udp(tokio::net::UdpSocket),
    Tcp(tokio::net::TcpStream),
}

impl Worker {
    async fn connect(&self) -> std::io::Result<Link> {
        match &self.target {
            Target::Udp(a) => {
                let to = tokio::net::lookup_host(a.as_str())
                    .await?
                    .next()
                    .ok_or_else(|| std::io::Error::other("no address"))?;
                let any: SocketAddr = if to.is_ipv4() {
                    ([0, 0, 0, 0], 0).into()
                } else {
                    (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
                };
                let s = tokio::net::UdpSocket::bind(any).await?;
                s.connect(to).await?;
                Ok(Link::Udp(s))
            }
            Target::Tcp(a) => {
                let s = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(a.as_str()),
                )
                .await
                .map_err(|_| std::io::Error::other("connect timeout"))??;
                let _ = s.set_nodelay(true);
                Ok(Link::Tcp(s))
            }
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<Capture>) {
        let mut link: Option<Link> = None;
        let mut last_try: Option<tokio::time::Instant> = None;
        let mut buf = Vec::with_capacity(encode::MAX_PACKET);
        while let Some(c) = rx.recv().await {
            self.queued.fetch_sub(c.bytes.len(), Ordering::Relaxed);
            let m = encode::Message {
                src: c.src,
                dst: c.dst,
                tcp: c.tcp,
                secs: c.secs,
                micros: c.micros,
                capture_id: self.capture_id,
                password: &self.password,
                correlation_id: encode::call_id(&c.bytes).unwrap_or_default(),
                payload: &c.bytes,
            };
            if encode::encode(&m, &mut buf).is_none() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if link.is_none() {
                let now = tokio::time::Instant::now();
                if last_try.is_some_and(|t| now.duration_since(t) < RECONNECT_EVERY) {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                last_try = Some(now);
                match self.connect().await {
                    Ok(l) => {
                        link = Some(l);
                        self.stats.connected.store(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot reach the HEP collector");
                        self.stats.failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                }
            }
            let ok = match link.as_mut() {
                // A refused datagram (nobody listening yet) is a failure, not a lost link.
                Some(Link::Udp(s)) => s.send(&buf).await.is_ok(),
                Some(Link::Tcp(s)) => {
                    let r = tokio::time::timeout(Duration::from_secs(5), s.write_all(&buf)).await;
                    if !matches!(r, Ok(Ok(()))) {
                        link = None;
                        self.stats.connected.store(0, Ordering::Relaxed);
                    }
                    matches!(r, Ok(Ok(())))
                }
                None => false,
            };
            let c = if ok {
                &self.stats.sent
            } else {
                &self.stats.failed
            };
            c.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        assert_eq!(Target::parse(""), Ok(None));
        assert_eq!(
            Target::parse("127.0.0.1:9060"),
            Ok(Some(Target::Udp("127.0.0.1:9060".into())))
        );
        assert_eq!(
            Target::parse("udp:127.0.0.1:9060"),
            Ok(Some(Target::Udp("127.0.0.1:9060".into())))
        );
        assert_eq!(
            Target::parse("tcp:homer.example:9061"),
            Ok(Some(Target::Tcp("homer.example:9061".into())))
        );
        assert_eq!(
            Target::parse("tcp:[::1]:9060"),
            Ok(Some(Target::Tcp("[::1]:9060".into())))
        );
        for bad in ["9060", "host", "host:0", "tcp:", ":9060", "host:99999"] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }

    /// The whole path: tap -> queue -> task -> UDP collector on loopback.
    #[tokio::test]
    async fn exports_both_directions_over_udp() {
        let collector = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = Config::default();
        cfg.sip.listen_udp = vec!["127.0.0.1:5460".parse().unwrap()];
        cfg.hep.address = collector.local_addr().unwrap().to_string();
        cfg.hep.only = HepOnly::Dialogs;
        let (node, _rx) = Node::new(cfg);
        start(&node).await;
        let phone: SocketAddr = "127.0.0.9:5062".parse().unwrap();
        let invite = b"INVITE sip:1@x SIP/2.0\r\nCall-ID: c1\r\nCSeq: 1 INVITE\r\n\r\n";
        node.stats
            .hep
            .received(Transport::Udp, phone, b"REGISTER sip:x SIP/2.0\r\n\r\n");
        node.stats.hep.received(Transport::Udp, phone, invite);
        node.stats.hep.sent(Transport::Udp, phone, invite, None);
        let mut buf = [0u8; 2048];
        let mut got = vec![];
        for _ in 0..2 {
            let n = collector.recv(&mut buf).await.unwrap();
            got.push(buf[..n].to_vec());
        }
        let find = |p: &[u8], t: u16| -> Vec<u8> {
            let mut i = 6;
            while i + 6 <= p.len() {
                let k = u16::from_be_bytes([p[i + 2], p[i + 3]]);
                let l = u16::from_be_bytes([p[i + 4], p[i + 5]]) as usize;
                if k == t {
                    return p[i + 6..i + l].to_vec();
                }
                i += l;
            }
            vec![]
        };
        assert_eq!(find(&got[0], 3), vec![127, 0, 0, 9]);
        assert_eq!(find(&got[0], 4), vec![127, 0, 0, 1]);
        assert_eq!(find(&got[0], 8), 5460u16.to_be_bytes());
        assert_eq!(find(&got[1], 3), vec![127, 0, 0, 1]);
        assert_eq!(find(&got[1], 4), vec![127, 0, 0, 9]);
        assert_eq!(find(&got[1], 0x11), b"c1");
        assert_eq!(find(&got[1], 0x0f), invite);
        let h = node.stats.health.snapshot(0);
        assert_eq!(h.hep_filtered, 1);
        assert_eq!(h.hep_dropped, 0);
    }

    const REGISTER: &[u8] = b"REGISTER sip:x SIP/2.0\r\nCall-ID: r1\r\nCSeq: 1 REGISTER\r\n\r\n";
    const OPTIONS: &[u8] = b"OPTIONS sip:x SIP/2.0\r\nCall-ID: o1\r\nCSeq: 1 OPTIONS\r\n\r\n";
    const BYE_OK: &[u8] = b"SIP/2.0 200 OK\r\nnot a header\r\nCall-ID: c1\r\nCSeq: 2 BYE\r\n\r\n";

    #[test]
    fn sample_key_is_checked() {
        let c = Config::from_toml("[hep]\nsample = 0.1\nonly = \"dialogs\"").unwrap();
        assert_eq!((c.hep.sample, c.hep.only), (0.1, HepOnly::Dialogs));
        assert_eq!(
            Config::from_toml("[hep]\nsample = 1").unwrap().hep.sample,
            1.0
        );
        for bad in ["sample = 1.5", "sample = -0.1", "sample = nan"] {
            let e = Config::from_toml(&format!("[hep]\n{bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("hep.sample"), "{bad}: {e}");
        }
    }

    #[test]
    fn dialogs_leave_out_register_and_options() {
        let f = Filter::new(HepOnly::Dialogs, 1.0, [0; 16]);
        assert!(!f.keeps(REGISTER));
        assert!(!f.keeps(OPTIONS));
        assert!(f.keeps(b"INVITE sip:1@x SIP/2.0\r\nCall-ID: c1\r\n\r\n"));
        assert!(f.keeps(BYE_OK), "a response by its CSeq method");
        let all = Filter::new(HepOnly::All, 1.0, [0; 16]);
        assert!(all.keeps(REGISTER) && all.keeps(OPTIONS));
        let none = Filter::new(HepOnly::All, 0.0, [0; 16]);
        assert!(!none.keeps(REGISTER));
    }

    /// A sample keeps about its share of Call-IDs, and every message of a kept Call-ID.
    #[test]
    fn sample_keeps_whole_dialogs() {
        let f = Filter::new(HepOnly::All, 0.25, [7; 16]);
        let mut kept = 0;
        for i in 0..4000 {
            let inv = format!("INVITE sip:1@x SIP/2.0\r\nCall-ID: call-{i}\r\n\r\n");
            let ok = format!("SIP/2.0 200 OK\r\ni: call-{i}\r\nCSeq: 1 INVITE\r\n\r\n");
            let bye = format!("BYE sip:1@x SIP/2.0\r\ncall-id:  call-{i} \r\n\r\n");
            let k = f.keeps(inv.as_bytes());
            assert_eq!(k, f.keeps(ok.as_bytes()), "call-{i}");
            assert_eq!(k, f.keeps(bye.as_bytes()), "call-{i}");
            kept += usize::from(k);
        }
        assert!((800..1200).contains(&kept), "kept {kept} of 4000 at 0.25");
    }

    async fn tap(only: HepOnly) -> (Arc<Node>, tokio::net::UdpSocket) {
        let collector = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut cfg = Config::default();
        cfg.sip.listen_udp = vec!["127.0.0.1:5461".parse().unwrap()];
        cfg.hep.address = collector.local_addr().unwrap().to_string();
        cfg.hep.only = only;
        let (node, _rx) = Node::new(cfg);
        start(&node).await;
        (node, collector)
    }

    /// A blocked source's drops are not even queued unless `only = "blocked"` asks for them;
    /// in that mode only suspects' messages are.
    #[tokio::test]
    async fn blocked_drops_only_for_only_blocked() {
        let attacker: SocketAddr = "192.0.2.66:5070".parse().unwrap();
        let phone: SocketAddr = "127.0.0.9:5062".parse().unwrap();
        let (node, _c) = tap(HepOnly::All).await;
        node.stats
            .hep
            .received_blocked(Transport::Udp, attacker, OPTIONS);
        let h = node.stats.health.snapshot(0);
        assert_eq!((h.hep_filtered, h.hep_dropped), (1, 0));

        let (node, collector) = tap(HepOnly::Blocked).await;
        let now = node.now();
        let key = crate::blocks::BlockKey::whole(crate::blocks::source_net(attacker.ip(), 64));
        node.with_engine(|e| e.manual_block(now, key, None, "test"))
            .unwrap();
        node.stats.hep.received(Transport::Udp, phone, REGISTER);
        node.stats
            .hep
            .received_blocked(Transport::Udp, attacker, OPTIONS);
        // Relayed on behalf of the attacker: kept; the phone's answer: not.
        node.stats.hep.sent(
            Transport::Udp,
            "127.0.0.1:5080".parse().unwrap(),
            OPTIONS,
            Some(attacker),
        );
        node.stats
            .hep
            .sent(Transport::Udp, phone, BYE_OK, Some(phone));
        let mut buf = [0u8; 2048];
        for _ in 0..2 {
            let n = collector.recv(&mut buf).await.unwrap();
            assert!(buf[..n].windows(7).any(|w| w == b"OPTIONS"));
        }
        let h = node.stats.health.snapshot(0);
        assert_eq!(h.hep_filtered, 2);
    }
}
