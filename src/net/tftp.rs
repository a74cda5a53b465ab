//! The TFTP relay in front of the provisioning server. One task owns the listen socket and the
//! [`Guard`]; each accepted RRQ/WRQ gets a transfer task with two fresh sockets: a transfer ID
//! toward the client (bound on the listen IP) and one toward `tftp.upstream`, whose transfer ID
//! is learnt from the server's first answer. The transfer relays DATA/ACK/ERROR/OACK both ways,
//! checking each packet's type against the direction, and reports how it ended so the guard can
//! see file-name guessing.
//!
//! Requests the guard limits are dropped without an answer (see [`crate::tftp::guard`]), as are
//! requests from blocked sources, requests over the transfer caps, and malformed packets; each
//! is counted in [`crate::stats::Stats`] (`tftp_limited`, `tftp_dropped`, `tftp_malformed`). A
//! transfer the server never answered counts against the client's file name only if the server
//! answered someone within the last minute: a dead provisioning server does not get phones
//! blocked.
//!
//! Bounds: `tftp.max_transfers` transfers in total and `tftp.max_transfers_per_ip` per source
//! (two sockets and one buffer of the requested block size each, so at most
//! `max_transfers * 64 KiB` of buffers); every transfer ends after [`ANSWER_TIMEOUT`] without
//! a server answer or its idle timeout without traffic; the guard's LRU caps tracked sources.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::{Id, JoinError, JoinSet};
use tokio::time::{sleep_until, Instant};

use crate::blocks::source_net;
use crate::clock::Millis;
use crate::config::Mode as ProtectionMode;
use crate::engine::Detection;
use crate::node::Node;
use crate::tftp::codec::{Packet, Request, DEFAULT_BLKSIZE, MAX_BLKSIZE};
use crate::tftp::guard::{Admit, Guard, Outcome, Req, Settings, WINDOW};
use crate::util::{hash64, printable};

/// The listen socket's read buffer: larger than any valid request (512 bytes,
/// [`crate::tftp::codec::MAX_REQUEST`]) so an oversized one is seen whole and counted as
/// malformed, not read truncated.
const LISTEN_BUF: usize = 2048;
/// How long a transfer waits for the server's first answer. The client retransmits its request
/// meanwhile (each retransmission is re-sent upstream by the same transfer).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle timeout once the transfer runs: three times the negotiated `timeout` option (5 s when
/// none), within these limits. A client that asks for `timeout 255` does not hold a slot for
/// 13 minutes.
pub const MIN_IDLE: Duration = Duration::from_secs(15);
pub const MAX_IDLE: Duration = Duration::from_secs(60);
/// After the server acknowledges the last block of an upload: keep relaying this long so the
/// client's retransmitted final DATA (if our ACK to it was lost) is still answered. Downloads
/// end as soon as the client acknowledges the last block.
pub const LINGER: Duration = Duration::from_secs(1);
/// How often a running transfer re-reads the block table (a block made on SIP ends a TFTP
/// transfer from the same source within this time).
const RECHECK_MS: Millis = 1000;
/// Retransmitted requests queued to a transfer waiting for its first answer.
const RESEND_QUEUE: usize = 2;

/// One transfer as the listen task knows it.
struct Active {
    client: SocketAddr,
    net: IpNet,
    op: &'static str,
    filename: Box<[u8]>,
    request_hash: u64,
    resend: mpsc::Sender<()>,
    /// Not whitelisted: the guard sees the outcome.
    guarded: bool,
    device: String,
}

struct Relay {
    node: Arc<Node>,
    guard: Guard,
    /// Bound by `tftp.max_transfers` (entries are only added below the cap).
    active: HashMap<Id, Active>,
    by_client: HashMap<SocketAddr, Id>,
    per_source: HashMap<IpNet, usize>,
    tasks: JoinSet<Outcome>,
    bind_ip: IpAddr,
    /// When the upstream last answered a request: a transfer that got no answer while the
    /// server looks down says nothing about the client's file name.
    upstream_seen: Millis,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// Run the relay on a bound listen socket until `shutdown` resolves; open transfers are then
/// aborted (their sockets close with them).
pub async fn run(
    socket: impl Into<Arc<UdpSocket>>,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()>,
) {
    // Shared so that the supervisor can restart the relay on the same socket.
    let socket: Arc<UdpSocket> = socket.into();
    let bind_ip = socket
        .local_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    let cfg = node.config();
    tracing::info!(
        listen = ?socket.local_addr().ok(),
        upstream = %cfg.tftp.upstream,
        "TFTP relay running"
    );
    let mut relay = Relay {
        guard: {
            let mut g = Guard::new(Settings::from_config(&cfg));
            g.set_shared(node.inspect(|e| e.shared_counts().clone()));
            g
        },
        node,
        active: HashMap::new(),
        by_client: HashMap::new(),
        per_source: HashMap::new(),
        tasks: JoinSet::new(),
        bind_ip,
        upstream_seen: 0,
    };
    drop(cfg);
    let mut buf = vec![0u8; LISTEN_BUF];
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, src)) => relay.on_datagram(src, &buf[..n]),
                // ICMP errors and the like: the socket stays usable.
                Err(e) => tracing::debug!(error = %e, "TFTP receive error"),
            },
            Some(done) = relay.tasks.join_next_with_id() => relay.on_done(done),
        }
    }
    relay.tasks.shutdown().await;
}

/// Read buffer for a transfer: the largest block the request could negotiate, plus the header
/// and one byte to detect oversized datagrams.
fn transfer_buf(req: &Request<'_>) -> usize {
    let o = &req.options;
    let asked = [
        o.blksize().map(u64::from),
        // tftpd-hpa's power-of-two variant.
        o.number(b"blksize2"),
    ]
    .into_iter()
    .flatten()
    .max()
    .unwrap_or(0);
    let blk = asked.clamp(DEFAULT_BLKSIZE as u64, MAX_BLKSIZE as u64) as usize;
    4 + blk + 1
}

fn idle_timeout(req: &Request<'_>) -> Duration {
    let t = u64::from(req.options.timeout().unwrap_or(5));
    Duration::from_secs(t * 3).clamp(MIN_IDLE, MAX_IDLE)
}

/// The block table's "device" column for a TFTP client: mode and option names, which tell
/// clients apart.
fn device(req: &Request<'_>) -> String {
    let mut s = format!("TFTP {}", req.mode.as_str());
    let names: Vec<String> = req.options.iter().map(|(n, _)| printable(n, 16)).collect();
    if !names.is_empty() {
        s.push(' ');
        s.push_str(&names.join(","));
    }
    s
}

impl Relay {
    fn on_datagram(&mut self, src: SocketAddr, bytes: &[u8]) {
        let node = self.node.clone();
        let stats = &node.stats;
        let now = node.now();
        // Cheapest first: the shared block table, before any parsing.
        let (blocked, trusted) = node.with_engine(|e| {
            if e.is_blocked(now, src) {
                (true, false)
            } else {
                (false, e.is_whitelisted(src.ip()))
            }
        });
        if blocked {
            inc(&stats.tftp_dropped);
            return;
        }
        let pkt = match Packet::decode(bytes) {
            Ok(p) => p,
            Err(e) => {
                inc(&stats.tftp_malformed);
                tracing::trace!(%src, error = %e, "malformed TFTP request");
                return;
            }
        };
        let (op, req) = match &pkt {
            Packet::Rrq(r) => ("RRQ", r),
            Packet::Wrq(r) => ("WRQ", r),
            // DATA/ACK/ERROR/OACK belong on a transfer's own port, not here.
            _ => {
                inc(&stats.tftp_dropped);
                return;
            }
        };
        let request_hash = hash64(&[bytes]);
        if let Some(a) = self.by_client.get(&src).and_then(|id| self.active.get(id)) {
            if a.request_hash == request_hash {
                // A retransmission of a request in progress: not a new request.
                let _ = a.resend.try_send(());
                return;
            }
        }
        inc(&stats.tftp_requests);
        let cfg = node.config();
        let net = source_net(src.ip(), cfg.protection.ipv6_prefix);
        if !trusted {
            self.guard.set_settings(Settings::from_config(&cfg));
            let (admit, detection) = self.guard.on_request(
                now,
                src.ip(),
                Req {
                    op,
                    filename: req.filename,
                },
            );
            if let Some(d) = detection {
                self.block(now, d, &device(req));
            }
            if let Admit::Limited { new_episode } = admit {
                inc(&stats.tftp_limited);
                if new_episode {
                    tracing::info!(
                        source = %net,
                        hit_count = cfg.tftp.hit_count,
                        limited_rate = cfg.tftp.limited_rate,
                        "TFTP requests over hit_count per minute: limiting the source"
                    );
                }
                if cfg.protection.mode != ProtectionMode::Observe {
                    return;
                }
            }
        }
        let per = self.per_source.get(&net).copied().unwrap_or(0);
        if self.active.len() >= cfg.tftp.max_transfers || per >= cfg.tftp.max_transfers_per_ip {
            inc(&stats.tftp_dropped);
            tracing::debug!(source = %net, active = self.active.len(), "TFTP transfer cap reached");
            return;
        }
        let (resend_tx, resend_rx) = mpsc::channel(RESEND_QUEUE);
        let transfer = Transfer {
            node: node.clone(),
            client: src,
            bind_ip: self.bind_ip,
            upstream: cfg.tftp.upstream,
            request: bytes.to_vec(),
            read: op == "RRQ",
            buf_len: transfer_buf(req),
            idle: idle_timeout(req),
            resend: resend_rx,
        };
        let id = self.tasks.spawn(transfer.run()).id();
        self.active.insert(
            id,
            Active {
                client: src,
                net,
                op,
                filename: req.filename.into(),
                request_hash,
                resend: resend_tx,
                guarded: !trusted,
                device: device(req),
            },
        );
        self.by_client.insert(src, id);
        self.per_source.insert(net, per + 1);
        inc(&stats.tftp_transfers);
    }

    fn on_done(&mut self, done: Result<(Id, Outcome), JoinError>) {
        let (id, outcome) = match done {
            Ok(v) => v,
            Err(e) => (e.id(), Outcome::Abandoned),
        };
        let Some(a) = self.active.remove(&id) else {
            return;
        };
        if self.by_client.get(&a.client) == Some(&id) {
            self.by_client.remove(&a.client);
        }
        if let Some(n) = self.per_source.get_mut(&a.net) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_source.remove(&a.net);
            }
        }
        let now = self.node.now();
        let outcome = match outcome {
            o @ (Outcome::Served | Outcome::Refused { .. }) => {
                self.upstream_seen = now;
                o
            }
            Outcome::NoAnswer if now.saturating_sub(self.upstream_seen) > WINDOW => {
                tracing::debug!("TFTP upstream silent: not counting the unanswered request");
                Outcome::Abandoned
            }
            o => o,
        };
        if a.guarded {
            let req = Req {
                op: a.op,
                filename: &a.filename,
            };
            if let Some(d) = self.guard.on_outcome(now, a.client.ip(), req, &outcome) {
                self.block(now, d, &a.device);
            }
        }
    }

    /// Block a source in the shared table (SIP and TFTP) and forget its guard state.
    fn block(&mut self, now: Millis, d: Detection, device: &str) {
        let net = d.key.net;
        let reason = d.reason.clone();
        let made = self.node.with_engine(|e| e.block(now, d, device));
        self.guard.forget(&net);
        if made {
            tracing::warn!(source = %net, %reason, "TFTP source blocked");
        }
    }
}

/// One relayed transfer.
struct Transfer {
    node: Arc<Node>,
    client: SocketAddr,
    bind_ip: IpAddr,
    upstream: SocketAddr,
    request: Vec<u8>,
    read: bool,
    buf_len: usize,
    idle: Duration,
    resend: mpsc::Receiver<()>,
}

/// What became of a packet in the loop below.
enum Step {
    /// Relayed: the transfer is alive.
    Continue,
    /// Not relayed (counted): does not keep the transfer alive.
    Dropped,
    End(Outcome),
}

struct State {
    server: Option<SocketAddr>,
    /// Block size in force: 512 until an OACK says otherwise.
    blksize: usize,
    /// The short block that ends the transfer, once seen.
    last_block: Option<u16>,
    done: bool,
    last_check: Millis,
}

impl State {
    /// What the transfer says about the file name so far.
    fn outcome(&self, otherwise: Outcome) -> Outcome {
        if self.server.is_some() {
            Outcome::Served
        } else {
            otherwise
        }
    }
}

impl Transfer {
    async fn run(mut self) -> Outcome {
        match self.relay().await {
            Ok(o) => o,
            Err(e) => {
                tracing::debug!(client = %self.client, error = %e, "TFTP transfer failed");
                Outcome::Abandoned
            }
        }
    }

    async fn relay(&mut self) -> io::Result<Outcome> {
        let client = UdpSocket::bind((self.bind_ip, 0)).await?;
        client.connect(self.client).await?;
        let any: IpAddr = if self.upstream.is_ipv4() {
            Ipv4Addr::UNSPECIFIED.into()
        } else {
            Ipv6Addr::UNSPECIFIED.into()
        };
        let up = UdpSocket::bind((any, 0)).await?;
        up.send_to(&self.request, self.upstream).await?;

        let mut buf = vec![0u8; self.buf_len];
        let mut st = State {
            server: None,
            blksize: DEFAULT_BLKSIZE as usize,
            last_block: None,
            done: false,
            last_check: self.node.now(),
        };
        let mut deadline = Instant::now() + ANSWER_TIMEOUT;
        loop {
            let waiting = st.server.is_none();
            tokio::select! {
                _ = sleep_until(deadline) => {
                    return Ok(st.outcome(Outcome::NoAnswer));
                }
                r = up.readable() => {
                    r?;
                    let (n, from) = match up.try_recv_from(&mut buf) {
                        Ok(v) => v,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        // ICMP port unreachable: the server is not there.
                        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                            return Ok(st.outcome(Outcome::Abandoned));
                        }
                        Err(e) => return Err(e),
                    };
                    match self.on_server_packet(&mut st, &up, &client, from, &buf[..n]).await? {
                        Step::End(o) => return Ok(o),
                        Step::Continue => deadline = Instant::now() + self.wait(&st),
                        Step::Dropped => {}
                    }
                }
                r = client.readable() => {
                    r?;
                    let n = match client.try_recv(&mut buf) {
                        Ok(n) => n,
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        // The client's port is closed: it is gone.
                        Err(_) => return Ok(st.outcome(Outcome::Abandoned)),
                    };
                    match self.on_client_packet(&mut st, &up, &buf[..n]).await? {
                        Step::End(o) => return Ok(o),
                        Step::Continue => deadline = Instant::now() + self.wait(&st),
                        Step::Dropped => {}
                    }
                }
                Some(()) = self.resend.recv(), if waiting => {
                    up.send_to(&self.request, self.upstream).await?;
                }
            }
        }
    }

    /// Decode a packet of the transfer; an oversized or malformed one is counted and `None`.
    fn decode<'b>(&self, bytes: &'b [u8]) -> Option<Packet<'b>> {
        let pkt = (bytes.len() < self.buf_len)
            .then(|| Packet::decode(bytes).ok())
            .flatten();
        if pkt.is_none() {
            inc(&self.node.stats.tftp_malformed);
        }
        pkt
    }

    fn wait(&self, st: &State) -> Duration {
        if st.done {
            LINGER
        } else {
            self.idle
        }
    }

    async fn on_server_packet(
        &self,
        st: &mut State,
        up: &UdpSocket,
        client: &UdpSocket,
        from: SocketAddr,
        bytes: &[u8],
    ) -> io::Result<Step> {
        let stats = &self.node.stats;
        // Only the upstream host, and once known only its transfer ID, may answer.
        if from.ip() != self.upstream.ip() || st.server.is_some_and(|s| s != from) {
            inc(&stats.tftp_dropped);
            return Ok(Step::Dropped);
        }
        let Some(pkt) = self.decode(bytes) else {
            return Ok(Step::Dropped);
        };
        let first = st.server.is_none();
        let end = match (&pkt, self.read) {
            (Packet::Error { code, message }, _) => Some(st.outcome(Outcome::Refused {
                code: *code,
                message: printable(message, 60),
            })),
            (Packet::Oack(o), _) if first => {
                let blk = o.blksize().map(u64::from).or_else(|| o.number(b"blksize2"));
                st.blksize = blk.map_or(DEFAULT_BLKSIZE as usize, |b| {
                    b.clamp(1, MAX_BLKSIZE as u64) as usize
                });
                None
            }
            (Packet::Data { block, data }, true) => {
                if data.len() < st.blksize {
                    st.last_block = Some(*block);
                }
                None
            }
            (Packet::Ack { block }, false) => {
                if st.last_block == Some(*block) {
                    st.done = true;
                }
                None
            }
            _ => {
                // A request, or a packet of the wrong direction for this transfer.
                inc(&stats.tftp_dropped);
                return Ok(Step::Dropped);
            }
        };
        if first {
            up.connect(from).await?;
            st.server = Some(from);
        }
        client.send(bytes).await?;
        Ok(end.map_or(Step::Continue, Step::End))
    }

    async fn on_client_packet(
        &self,
        st: &mut State,
        up: &UdpSocket,
        bytes: &[u8],
    ) -> io::Result<Step> {
        let stats = &self.node.stats;
        let now = self.node.now();
        if now.saturating_sub(st.last_check) >= RECHECK_MS {
            st.last_check = now;
            if self.node.with_engine(|e| e.is_blocked(now, self.client)) {
                return Ok(Step::End(Outcome::Abandoned));
            }
        }
        if st.server.is_none() {
            // Nothing to relay to before the server answers.
            inc(&stats.tftp_dropped);
            return Ok(Step::Dropped);
        }
        let Some(pkt) = self.decode(bytes) else {
            return Ok(Step::Dropped);
        };
        let end = match (&pkt, self.read) {
            (Packet::Error { .. }, _) => true,
            // The client has the whole file once it acknowledges the last block: end now, so
            // a phone fetching file after file never waits for a slot. Should this ACK be lost,
            // the server's retransmission finds the port closed and it gives up; the client
            // is not affected.
            (Packet::Ack { block }, true) => st.last_block == Some(*block),
            (Packet::Data { block, data }, false) => {
                if data.len() < st.blksize {
                    st.last_block = Some(*block);
                }
                false
            }
            _ => {
                inc(&stats.tftp_dropped);
                return Ok(Step::Dropped);
            }
        };
        up.send(bytes).await?;
        Ok(if end {
            Step::End(Outcome::Served)
        } else {
            Step::Continue
        })
    }
}

#[cfg(test)]
mod tests;
