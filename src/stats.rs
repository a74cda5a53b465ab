//! Packet counters shared by every socket task: plain atomics on the hot path, rendered by the
//! admin surface as `/api/stats` and Prometheus text.

use std::sync::atomic::{AtomicU64, Ordering};

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
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
        }
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub packets_in_udp: AtomicU64,
    pub packets_in_tcp: AtomicU64,
    pub requests_forwarded: AtomicU64,
    pub responses_forwarded: AtomicU64,
    /// Responses sipwarden generated itself (403, 483, 503, ...).
    pub replies_sent: AtomicU64,
    pub keepalives: AtomicU64,
    dropped: [AtomicU64; DropReason::ALL.len()],
    pub tcp_connections: AtomicU64,
    pub tcp_rejected: AtomicU64,
    pub alerts: AtomicU64,
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
}

/// Upper bounds (µs) of the forwarding latency histogram.
pub const LATENCY_BUCKETS_US: [u64; 8] = [10, 25, 50, 100, 250, 1000, 5000, 25000];

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    pub fn packet_in(&self, t: Transport) {
        inc(match t {
            Transport::Udp => &self.packets_in_udp,
            Transport::Tcp => &self.packets_in_tcp,
        });
    }

    pub fn drop(&self, r: DropReason) {
        inc(&self.dropped[r.index()]);
    }

    pub fn dropped(&self, r: DropReason) -> u64 {
        self.dropped[r.index()].load(Ordering::Relaxed)
    }

    pub fn forwarded(&self, request: bool) {
        inc(if request {
            &self.requests_forwarded
        } else {
            &self.responses_forwarded
        });
    }

    pub fn latency(&self, us: u64) {
        self.latency_sum_us.fetch_add(us, Ordering::Relaxed);
        inc(&self.latency_count);
        if let Some(i) = LATENCY_BUCKETS_US.iter().position(|b| us <= *b) {
            inc(&self.latency_buckets[i]);
        }
    }

    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}
