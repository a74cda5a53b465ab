//! The node's counter model: packet counters shared by every socket task, the state events the
//! state task counts ([`EventCounters`]), and the background links' health. The admin surface
//! only reads it, through one [`Snapshot`] from which `/metrics`, `/api/stats` and the CLI are
//! all rendered. The counters every packet touches (packets in, drops, forwards) are
//! [`Counter`]s: one cache line per core slot, so two cores counting the same event never write
//! the same word; the rest are plain atomics.
//!
//! - [`events`]: blocks, would-be blocks, unblocks and alerts since start, and the last hour.
//! - [`snapshot`]: the one read every view renders.

pub mod events;
pub mod snapshot;

pub use events::{EventCounters, EventCounts};
pub use snapshot::Snapshot;

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;

use parking_lot::Mutex;

/// Why a packet was not forwarded. The names are the `reason` label in metrics and stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Source in the block table.
    Blocked,
    /// Source in the static blacklist.
    Blacklisted,
    /// Not a SIP message we can read (attacker garbage, truncated, oversized).
    Malformed,
    /// Parsed, but broken in a way the anomaly detector scores (missing headers, CSeq mismatch).
    Anomaly,
    /// User-Agent of a known scanner.
    Scanner,
    /// Behaviour of a scanner (enumeration, OPTIONS sweep, account protection).
    Pattern,
    /// INVITE over the per-source rate.
    InviteRate,
    /// Packet flood from one source.
    Flood,
    /// No way to reach the destination (unknown flow, closed TCP connection, bad Via).
    NoRoute,
    /// Max-Forwards exhausted or a loop.
    Loop,
    /// A response that is not for us (top Via not ours).
    NotOurs,
    /// The send itself failed (socket error, full TCP queue).
    SendFailed,
    /// A response through a Via of ours whose branch MAC does not verify: one we did not cause.
    Forged,
    /// A request of the PBX for a flow that is unknown (token that does not verify) or gone
    /// (closed TCP connection): answered 430 Flow Failed.
    FlowFailed,
}

impl DropReason {
    pub const ALL: [DropReason; 14] = [
        DropReason::Blocked,
        DropReason::Blacklisted,
        DropReason::Malformed,
        DropReason::Anomaly,
        DropReason::Scanner,
        DropReason::Pattern,
        DropReason::InviteRate,
        DropReason::Flood,
        DropReason::NoRoute,
        DropReason::Loop,
        DropReason::NotOurs,
        DropReason::SendFailed,
        DropReason::Forged,
        DropReason::FlowFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::Blocked => "blocked",
            DropReason::Blacklisted => "blacklisted",
            DropReason::Malformed => "malformed",
            DropReason::Anomaly => "anomaly",
            DropReason::Scanner => "scanner",
            DropReason::Pattern => "pattern",
            DropReason::InviteRate => "invite_rate",
            DropReason::Flood => "flood",
            DropReason::NoRoute => "no_route",
            DropReason::Loop => "loop",
            DropReason::NotOurs => "not_ours",
            DropReason::SendFailed => "send_failed",
            DropReason::Forged => "forged",
            DropReason::FlowFailed => "flow_failed",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    /// SIP over a plain WebSocket (RFC 7118), behind a TLS-terminating load balancer.
    Ws,
    /// SIP over a WebSocket over TLS (RFC 7118).
    Wss,
    Tls,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
            Transport::Tls => "tls",
        }
    }

    /// A connection-oriented transport: the way back to a peer is the connection it opened.
    /// (TCP and TLS messages are framed out of the stream; a WebSocket message is one SIP
    /// message.)
    pub fn is_stream(self) -> bool {
        !matches!(self, Transport::Udp)
    }
}

/// Why a TLS handshake did not complete. The names are the `reason` label in metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsFailure {
    /// Not finished within `tls.handshake_timeout`.
    Timeout,
    /// Over `tls.max_handshakes_per_ip` (or the total cap) when it arrived.
    Cap,
    /// No protocol version or cipher suite in common (TLS 1.0/1.1 clients end here).
    Incompatible,
    /// The client sent a fatal alert (typically: it does not trust our certificate).
    Alert,
    /// The client certificate is missing or does not verify (`tls.verify_client`).
    ClientCertificate,
    /// Not TLS, or TLS that breaks the protocol.
    Protocol,
    /// The client closed or reset the connection during the handshake.
    Closed,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 7] = [
        TlsFailure::Timeout,
        TlsFailure::Cap,
        TlsFailure::Incompatible,
        TlsFailure::Alert,
        TlsFailure::ClientCertificate,
        TlsFailure::Protocol,
        TlsFailure::Closed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TlsFailure::Timeout => "timeout",
            TlsFailure::Cap => "cap",
            TlsFailure::Incompatible => "incompatible",
            TlsFailure::Alert => "alert",
            TlsFailure::ClientCertificate => "client_certificate",
            TlsFailure::Protocol => "protocol",
            TlsFailure::Closed => "closed",
        }
    }
}

/// TLS counters: handshakes by outcome, failures by reason, certificate reloads by outcome.
#[derive(Debug, Default)]
pub struct TlsStats {
    pub handshakes_ok: AtomicU64,
    failures: [AtomicU64; TlsFailure::ALL.len()],
    /// Connections in handshake now (a gauge).
    pub in_handshake: AtomicU64,
    pub reloads_ok: AtomicU64,
    pub reloads_failed: AtomicU64,
}

impl TlsStats {
    pub fn failed(&self, r: TlsFailure) {
        inc(&self.failures[r as usize]);
    }

    pub fn failures(&self, r: TlsFailure) -> u64 {
        self.failures[r as usize].load(Ordering::Relaxed)
    }

    /// Failed handshakes, every reason together.
    pub fn handshakes_failed(&self) -> u64 {
        TlsFailure::ALL.iter().map(|r| self.failures(*r)).sum()
    }
}

/// Core slots of a [`Counter`]. Threads beyond this share slots (still correct, only slower):
/// 16 cache lines, 1 KiB per counter.
const SLOTS: usize = 16;

static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's slot, given out round-robin on first use.
    static SLOT: Cell<usize> = const { Cell::new(usize::MAX) };
}

fn slot() -> usize {
    SLOT.with(|s| {
        let v = s.get();
        if v != usize::MAX {
            return v;
        }
        let v = NEXT_SLOT.fetch_add(1, Ordering::Relaxed) % SLOTS;
        s.set(v);
        v
    })
}

/// A counter incremented from many cores at packet rate: each thread adds to its own
/// cache-padded cell, a read sums them (exact once the writers are done, monotonic always).
#[derive(Debug, Default)]
pub struct Counter {
    cells: [CachePadded<AtomicU64>; SLOTS],
}

impl Counter {
    pub fn add(&self, n: u64) {
        if let Some(c) = self.cells.get(slot()) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.cells
            .iter()
            .fold(0u64, |a, c| a.wrapping_add(c.load(Ordering::Relaxed)))
    }
}

/// What [`Stats::get`] reads: a plain atomic or a [`Counter`].
pub trait Read {
    fn read(&self) -> u64;
}

impl Read for AtomicU64 {
    fn read(&self) -> u64 {
        self.load(Ordering::Relaxed)
    }
}

impl Read for Counter {
    fn read(&self) -> u64 {
        self.get()
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub packets_in_udp: Counter,
    pub packets_in_tcp: Counter,
    pub packets_in_tls: Counter,
    pub requests_forwarded: Counter,
    pub responses_forwarded: Counter,
    /// Responses sipwarden generated itself (403, 483, 503, ...).
    pub replies_sent: AtomicU64,
    pub keepalives: AtomicU64,
    dropped: [Counter; DropReason::ALL.len()],
    /// TCP connections accepted (a counter: it only goes up).
    pub tcp_connections: AtomicU64,
    /// TCP connections open now (a gauge).
    pub tcp_open: AtomicU64,
    pub tcp_rejected: AtomicU64,
    /// TCP connections closed because their write queue went over `sip.tcp_write_queue_bytes`
    /// (a peer that does not read what we send it).
    pub tcp_write_overflows: AtomicU64,
    /// TCP connections closed because one write took longer than `sip.tcp_write_timeout`.
    pub tcp_write_timeouts: AtomicU64,
    /// Connections closed because their source got blocked (TCP, TLS and WebSocket).
    pub conns_closed_blocked: AtomicU64,
    pub tls: TlsStats,
    /// Panics caught on the packet path (a bug an attacker may be able to trigger at will).
    pub panics: AtomicU64,
    /// Unix second of the last panic logged: panic logs are limited to one a second.
    panic_logged_at: AtomicU64,
    /// Listener tasks and whether each is serving; `/healthz` fails while one is not.
    pub listeners: Listeners,
    /// Counters of the state store, Redis link, notifier and HEP exporter.
    pub health: crate::state::health::Health,
    /// The HEP exporter's end on the packet path (off unless `hep.address` is set).
    pub hep: crate::hep::Tap,
    pub alerts: AtomicU64,
    /// Blocks made and lifted, alerts, and their last hour: counted by the state task.
    pub events: EventCounters,
    /// State changes not persisted because the queue to the state task was full.
    pub events_dropped: AtomicU64,
    pub tftp_requests: AtomicU64,
    pub tftp_transfers: AtomicU64,
    pub tftp_limited: AtomicU64,
    pub tftp_dropped: AtomicU64,
    pub tftp_malformed: AtomicU64,
    /// Sum and count of forwarding latency (receive to send) in microseconds, and a histogram
    /// with buckets [`LATENCY_BUCKETS_US`].
    pub latency_sum_us: AtomicU64,
    pub latency_count: AtomicU64,
    pub latency_buckets: [AtomicU64; LATENCY_BUCKETS_US.len()],
    /// SIP over WebSocket (`sip.listen_ws`, `sip.listen_wss`).
    pub ws: WsStats,
}

/// How a WebSocket upgrade ended. The names are the `outcome` label in metrics and stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsOutcome {
    /// Upgraded with the `sip` subprotocol.
    Ok,
    /// The client offered no `sip` subprotocol (refused 400, scored).
    NoSubprotocol,
    /// Not a WebSocket upgrade request, or a broken one (scored).
    BadRequest,
    /// The handshake did not finish within `websocket.handshake_timeout` (scored).
    Timeout,
    /// Refused before the handshake: too many connections or handshakes from the address, or
    /// in total.
    Capped,
    /// Refused before the handshake: the source is blocked.
    Blocked,
}

impl WsOutcome {
    pub const ALL: [WsOutcome; 6] = [
        WsOutcome::Ok,
        WsOutcome::NoSubprotocol,
        WsOutcome::BadRequest,
        WsOutcome::Timeout,
        WsOutcome::Capped,
        WsOutcome::Blocked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WsOutcome::Ok => "ok",
            WsOutcome::NoSubprotocol => "no_subprotocol",
            WsOutcome::BadRequest => "bad_request",
            WsOutcome::Timeout => "timeout",
            WsOutcome::Capped => "capped",
            WsOutcome::Blocked => "blocked",
        }
    }
}

/// WebSocket counters: upgrades by outcome (counters), open connections (a gauge), and
/// connections closed for an oversized frame or message.
#[derive(Debug, Default)]
pub struct WsStats {
    upgrades: [AtomicU64; WsOutcome::ALL.len()],
    pub open: AtomicU64,
    pub oversized: AtomicU64,
    pub packets_in: Counter,
}

impl WsStats {
    pub fn upgrade(&self, o: WsOutcome) {
        inc(&self.upgrades[o as usize]);
    }

    pub fn upgrades(&self, o: WsOutcome) -> u64 {
        self.upgrades[o as usize].load(Ordering::Relaxed)
    }
}

/// Upper bounds (µs) of the forwarding latency histogram.
pub const LATENCY_BUCKETS_US: [u64; 8] = [10, 25, 50, 100, 250, 1000, 5000, 25000];

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    pub fn packet_in(&self, t: Transport) {
        match t {
            Transport::Udp => &self.packets_in_udp,
            Transport::Tcp => &self.packets_in_tcp,
            Transport::Ws | Transport::Wss => &self.ws.packets_in,
            Transport::Tls => &self.packets_in_tls,
        }
        .inc();
    }

    pub fn drop(&self, r: DropReason) {
        if let Some(c) = self.dropped.get(r.index()) {
            c.inc();
        }
    }

    pub fn dropped(&self, r: DropReason) -> u64 {
        self.dropped.get(r.index()).map_or(0, Counter::get)
    }

    pub fn forwarded(&self, request: bool) {
        if request {
            &self.requests_forwarded
        } else {
            &self.responses_forwarded
        }
        .inc();
    }

    pub fn latency(&self, us: u64) {
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        inc(&self.latency_count);
        if let Some(i) = LATENCY_BUCKETS_US.iter().position(|b| us <= *b) {
            inc(&self.latency_buckets[i]);
        }
    }

    pub fn get(c: &impl Read) -> u64 {
        c.read()
    }

    /// Count a caught panic; true when it should be logged (the first one in unix second
    /// `now_s`), so an attacker who found a panic cannot flood the log with it.
    pub fn panic_caught(&self, now_s: u64) -> bool {
        inc(&self.panics);
        let last = self.panic_logged_at.load(Ordering::Relaxed);
        last != now_s
            && self
                .panic_logged_at
                .compare_exchange(last, now_s, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }
}

/// The registry of listener tasks (UDP receive loops, TCP accept loops, the TFTP relay) that
/// the supervisor in `supervise` keeps up to date. One slot per task; several tasks (the UDP
/// workers of one socket) may share a name. Its size is fixed by the config, not by traffic.
#[derive(Debug, Default)]
pub struct Listeners {
    slots: Mutex<Vec<ListenerSlot>>,
}

#[derive(Debug, Clone)]
struct ListenerSlot {
    name: String,
    serving: bool,
    restarts: u64,
}

/// A listener's state as shown by `/metrics` and `/api/stats` (tasks of one name merged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerState {
    pub name: String,
    /// Every task of this name is serving.
    pub serving: bool,
    pub restarts: u64,
}

impl Listeners {
    /// Add a task (not serving until [`Listeners::set_serving`]); returns its slot.
    pub fn register(&self, name: &str) -> usize {
        let mut v = self.slots.lock();
        v.push(ListenerSlot {
            name: name.to_string(),
            serving: false,
            restarts: 0,
        });
        v.len() - 1
    }

    pub fn set_serving(&self, slot: usize, serving: bool) {
        if let Some(s) = self.slots.lock().get_mut(slot) {
            s.serving = serving;
        }
    }

    pub fn restarted(&self, slot: usize) {
        if let Some(s) = self.slots.lock().get_mut(slot) {
            s.restarts += 1;
        }
    }

    /// One entry per listener name, in registration order.
    pub fn states(&self) -> Vec<ListenerState> {
        let v = self.slots.lock();
        let mut out: Vec<ListenerState> = Vec::new();
        for s in v.iter() {
            match out.iter_mut().find(|o| o.name == s.name) {
                Some(o) => {
                    o.serving &= s.serving;
                    o.restarts += s.restarts;
                }
                None => out.push(ListenerState {
                    name: s.name.clone(),
                    serving: s.serving,
                    restarts: s.restarts,
                }),
            }
        }
        out
    }

    /// Names of the listeners with a task not serving now.
    pub fn not_serving(&self) -> Vec<String> {
        self.states()
            .into_iter()
            .filter(|s| !s.serving)
            .map(|s| s.name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_counter_sums_what_every_thread_added() {
        let c = std::sync::Arc::new(Counter::default());
        let hs: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.inc();
                    }
                    c.add(5);
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        assert_eq!(c.get(), 4 * 1005);
        let s = Stats::default();
        s.drop(DropReason::Blocked);
        s.drop(DropReason::Blocked);
        assert_eq!(s.dropped(DropReason::Blocked), 2);
        assert_eq!(Stats::get(&s.packets_in_udp), 0);
    }
}
