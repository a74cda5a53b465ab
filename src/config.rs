//! `proxy.toml`: serde structs with a default for every key, strict parsing (an unknown key is an
//! error that names it), and one `validate()` pass that turns raw values into a checked [`Config`].

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// A configuration problem, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub sip: Sip,
    pub upstream: Upstream,
    pub protection: Protection,
    pub lists: Lists,
    pub register: Register,
    pub invite: Invite,
    pub scanners: Scanners,
    pub patterns: Patterns,
    pub flood: Flood,
    pub anomaly: Anomaly,
    pub tftp: Tftp,
    pub admin: Admin,
    pub state: State,
    pub notify: Notify,
    pub hep: Hep,
    pub geoip: Geoip,
    pub cluster: Cluster,
    pub log: Log,
    pub fraud: Fraud,
    pub feeds: Feeds,
    pub tls: Tls,
    pub websocket: Websocket,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sip {
    pub listen_udp: Vec<SocketAddr>,
    pub listen_tcp: Vec<SocketAddr>,
    /// SIP over TLS (RFC 3261 §26.2); empty: off. Needs `tls.certificate` and `tls.private_key`.
    pub listen_tls: Vec<SocketAddr>,
    /// SIP over plain WebSocket (RFC 7118), for deployments behind a TLS-terminating load
    /// balancer; browsers only connect to `wss://` themselves. Limits in `[websocket]`.
    pub listen_ws: Vec<SocketAddr>,
    /// SIP over secure WebSocket (RFC 7118) for WebRTC softphones; needs `tls.certificate`. An
    /// address that is also in `listen_tls` is one port for both: each connection is classified
    /// by its first request line after the TLS handshake (`GET ` is a WebSocket upgrade).
    pub listen_wss: Vec<SocketAddr>,
    /// Host advertised in Via, Record-Route and Path; empty: the listen address.
    pub public_address: String,
    pub max_message_bytes: usize,
    /// Bound on live TCP connections from phones, in total and per source address: a slow-loris
    /// attacker can open connections far faster than phones need them.
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    /// A TCP connection with no complete message for this long is closed.
    #[serde(with = "humantime_serde")]
    pub tcp_idle_timeout: Duration,
    /// A message whose first byte arrived this long ago and is still incomplete closes the
    /// connection (byte-at-a-time headers).
    #[serde(with = "humantime_serde")]
    pub tcp_message_timeout: Duration,
    /// Bytes queued to one TCP connection's writer. A peer that does not read what we send it
    /// (or reads slower than it makes us send) would otherwise grow our memory without bound:
    /// a message that does not fit closes the connection (SIP over TCP has no retransmission
    /// to lose it silently to; a live phone reconnects).
    pub tcp_write_queue_bytes: usize,
    /// One write that does not complete in this long (the peer stopped reading) closes the
    /// connection.
    #[serde(with = "humantime_serde")]
    pub tcp_write_timeout: Duration,
    /// How requests for a phone find it: `auto` (its flow when behind NAT, on outbound or on a
    /// connection, else its Contact), `always-flow`, or `never` (always the Contact).
    pub nat_detection: NatDetection,
    /// The key that signs flow tokens and Via branches, as 32 hex digits. Empty: generated once
    /// and kept in the state store. Set the same value on every node of a cluster.
    pub flow_key: String,
    /// After the key changes, tokens signed with the previous key are accepted this long (at
    /// least the longest registration lifetime, so no phone becomes unreachable).
    #[serde(with = "humantime_serde")]
    pub flow_key_grace: Duration,
}

/// `sip.nat_detection`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NatDetection {
    Auto,
    AlwaysFlow,
    Never,
}

impl Default for Sip {
    fn default() -> Self {
        Self {
            listen_udp: vec![SocketAddr::from(([0, 0, 0, 0], 5060))],
            listen_tcp: vec![SocketAddr::from(([0, 0, 0, 0], 5060))],
            listen_tls: Vec::new(),
            listen_ws: Vec::new(),
            listen_wss: Vec::new(),
            public_address: String::new(),
            max_message_bytes: 16384,
            max_connections: 4096,
            max_connections_per_ip: 64,
            tcp_idle_timeout: Duration::from_secs(900),
            tcp_message_timeout: Duration::from_secs(10),
            nat_detection: NatDetection::Auto,
            flow_key: String::new(),
            flow_key_grace: Duration::from_secs(7 * 24 * 3600),
            tcp_write_queue_bytes: 256 * 1024,
            tcp_write_timeout: Duration::from_secs(10),
        }
    }
}

/// `[websocket]`: limits of SIP over WebSocket (`sip.listen_ws`, `sip.listen_wss`). A WebSocket
/// connection also counts against `sip.max_connections` and `sip.max_connections_per_ip`, and
/// its write queue is `sip.tcp_write_queue_bytes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Websocket {
    /// Largest WebSocket message and frame accepted, in bytes. One SIP message per WebSocket
    /// message; the SIP message itself is still held to `sip.max_message_bytes`. A bigger frame
    /// closes the connection and scores the source (the crate would otherwise buffer up to
    /// 64 MiB per connection by default).
    pub max_frame_bytes: usize,
    /// The HTTP upgrade must complete within this long (slow-loris guard).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Connections from one address (IPv6: per `protection.ipv6_prefix`) still in the upgrade.
    pub max_handshakes_per_ip: usize,
    /// A WebSocket ping this often; a browser answers it, so a dead peer is found.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// A connection with no frame at all (pongs included) for this long is closed.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
}

impl Default for Websocket {
    fn default() -> Self {
        Self {
            max_frame_bytes: 65536,
            handshake_timeout: Duration::from_secs(5),
            max_handshakes_per_ip: 8,
            ping_interval: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(90),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Udp,
    Tcp,
    Tls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IncomingMode {
    Path,
    Contact,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upstream {
    /// ip:port, host:port or a SIP URI.
    pub address: String,
    pub transport: TransportKind,
    pub incoming: IncomingMode,
    /// Name the PBX's certificate must carry, also sent as SNI; empty: the upstream host.
    pub tls_server_name: String,
}

impl Default for Upstream {
    fn default() -> Self {
        Self {
            address: "127.0.0.1:5080".into(),
            transport: TransportKind::Udp,
            incoming: IncomingMode::Path,
            tls_server_name: String::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Enforce,
    Observe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockedReply {
    #[serde(rename = "drop")]
    Drop,
    #[serde(rename = "403")]
    Forbidden,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Protection {
    pub mode: Mode,
    pub ipv6_prefix: u8,
    pub blocked_reply: BlockedReply,
    /// Cap on the sources each detector tracks at once; the least recently seen are forgotten
    /// first, so a flood from millions of addresses costs bounded memory.
    pub tracked_sources: usize,
    /// Cap on the block table. When full, the cheapest block gives way to a costlier one
    /// (type, then strikes, then hits; operator and permanent blocks never), and a new block
    /// no costlier than every block held is not stored.
    pub max_blocks: usize,
    /// Cap on automatic static-blacklist entries (after `register.block_threshold` blocks):
    /// permanent entries an attacker can cause, possibly for spoofed sources, stay bounded.
    /// Once reached, repeat offenders get dynamic blocks of up to `max_block_time` instead.
    /// Never more than half of `max_blocks`, since permanent blocks never give way.
    pub max_auto_blacklist: usize,
    /// When `aggregate_after` automatically blacklisted sources fall in one prefix of this
    /// length, they are replaced by the prefix (0 = off; a length no shorter than the tracked
    /// source, /32 or `ipv6_prefix`, aggregates nothing). Never over a whitelisted address or
    /// the upstream; operator entries are never touched.
    pub aggregate_ipv4: u8,
    pub aggregate_ipv6: u8,
    pub aggregate_after: u32,
    /// Each repeat block of the same source lasts this many times longer than the previous one.
    pub escalation: u32,
    /// Upper bound for an escalated block.
    #[serde(with = "humantime_serde")]
    pub max_block_time: Duration,
    /// Strikes are forgotten after this long without a new block.
    #[serde(with = "humantime_serde")]
    pub strike_memory: Duration,
}

impl Default for Protection {
    fn default() -> Self {
        Self {
            mode: Mode::Enforce,
            ipv6_prefix: 64,
            blocked_reply: BlockedReply::Drop,
            tracked_sources: 100_000,
            max_blocks: 100_000,
            max_auto_blacklist: 10_000,
            aggregate_ipv4: 24,
            aggregate_ipv6: 48,
            aggregate_after: 4,
            escalation: 2,
            max_block_time: Duration::from_secs(7 * 86400),
            strike_memory: Duration::from_secs(7 * 86400),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Lists {
    pub whitelist: Vec<IpNet>,
    pub blacklist: Vec<IpNet>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Register {
    pub hit_count: u32,
    #[serde(with = "humantime_serde")]
    pub monit_period: Duration,
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
    pub block_threshold: u32,
    /// An address from which a device registered successfully within this window has "good
    /// history": another device's failures there block only the offending (address, port).
    #[serde(with = "humantime_serde")]
    pub good_history: Duration,
}

impl Default for Register {
    fn default() -> Self {
        Self {
            hit_count: 5,
            monit_period: Duration::from_secs(60),
            block_time: Duration::from_secs(3600),
            block_threshold: 3,
            good_history: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InviteAction {
    Reject,
    Drop,
    Block,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Invite {
    pub rate_limit: u32,
    pub burst: u32,
    pub action: InviteAction,
    pub notify: bool,
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
}

impl Default for Invite {
    fn default() -> Self {
        Self {
            rate_limit: 10,
            burst: 20,
            action: InviteAction::Reject,
            notify: true,
            block_time: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scanners {
    pub user_agents: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
}

impl Default for Scanners {
    fn default() -> Self {
        Self {
            user_agents: [
                "friendly-scanner",
                "sipvicious",
                "sipcli",
                "sip-scan",
                "VaxSIPUserAgent",
                "iWar",
                "sundayddr",
                "smap",
            ]
            .map(String::from)
            .to_vec(),
            block_time: Duration::from_secs(86400),
        }
    }
}

/// Behaviour of scanners that lie about their User-Agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Patterns {
    /// Distinct extensions answered 401/403/404 from one source within `monit_period` that make
    /// an enumeration (svwar).
    pub enumeration_users: u32,
    /// OPTIONS requests from one source within `monit_period` that make a sweep.
    pub options_sweep: u32,
    /// Distinct accounts failing authentication from one source within `monit_period`.
    pub accounts_per_source: u32,
    /// Distinct sources failing on one account within `monit_period`: the account is under
    /// attack and only sources that registered it successfully may keep trying.
    pub sources_per_account: u32,
    #[serde(with = "humantime_serde")]
    pub monit_period: Duration,
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
}

impl Default for Patterns {
    fn default() -> Self {
        Self {
            enumeration_users: 10,
            options_sweep: 30,
            accounts_per_source: 5,
            sources_per_account: 5,
            monit_period: Duration::from_secs(60),
            block_time: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Flood {
    pub packets_per_second: u32,
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
}

impl Default for Flood {
    fn default() -> Self {
        Self {
            packets_per_second: 200,
            block_time: Duration::from_secs(600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Anomaly {
    pub threshold: u32,
    #[serde(with = "humantime_serde")]
    pub monit_period: Duration,
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
}

impl Default for Anomaly {
    fn default() -> Self {
        Self {
            threshold: 5,
            monit_period: Duration::from_secs(60),
            block_time: Duration::from_secs(3600),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tftp {
    pub enabled: bool,
    pub listen: SocketAddr,
    pub upstream: SocketAddr,
    pub hit_count: u32,
    pub limited_rate: u32,
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
    /// "File not found" answers (or distinct file names) per source per minute that make a
    /// file-name guessing attack.
    pub not_found_limit: u32,
    /// Concurrent transfers per source and in total.
    pub max_transfers_per_ip: usize,
    pub max_transfers: usize,
}

impl Default for Tftp {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: SocketAddr::from(([0, 0, 0, 0], 69)),
            upstream: SocketAddr::from(([127, 0, 0, 1], 6969)),
            hit_count: 100,
            limited_rate: 10,
            block_time: Duration::from_secs(3600),
            not_found_limit: 20,
            max_transfers_per_ip: 8,
            max_transfers: 512,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    pub listen: SocketAddr,
    pub token: String,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            token: String::new(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct State {
    pub path: String,
}

impl Default for State {
    fn default() -> Self {
        Self {
            path: "sipwarden.db".into(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Notify {
    pub webhook: String,
    /// E-mail alert recipients (`a@b` or `Name <a@b>`); empty: no e-mail.
    pub email_to: Vec<String>,
    /// Sender; empty: `sipwarden@<host name>`.
    pub email_from: String,
    /// `smtp://user:pass@host:587` (STARTTLS), `smtps://…:465` (implicit TLS); plain SMTP only
    /// for a loopback host or with `?tls=none`.
    pub smtp_url: String,
    /// At most one mail per period, summarising everything since the last one.
    #[serde(with = "humantime_serde")]
    pub digest: Duration,
}

/// Recipients of one alert mail: a bound on what one event fans out to.
pub const MAX_EMAIL_TO: usize = 20;

impl Default for Notify {
    fn default() -> Self {
        Self {
            webhook: String::new(),
            email_to: Vec::new(),
            email_from: String::new(),
            smtp_url: String::new(),
            digest: Duration::from_secs(60),
        }
    }
}

/// HEP v3 export of every SIP message received and sent (to sngrep, Homer, heplify-server).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Hep {
    /// `host:port` (UDP) or `tcp:host:port`; empty: off.
    pub address: String,
    pub capture_id: u32,
    pub password: String,
    pub only: HepOnly,
    /// Fraction of Call-IDs exported (0.0–1.0), chosen by a keyed hash of the Call-ID so a
    /// sampled dialog is whole.
    pub sample: f64,
}

impl Default for Hep {
    fn default() -> Self {
        Self {
            address: String::new(),
            capture_id: 2001,
            password: String::new(),
            only: HepOnly::All,
            sample: 1.0,
        }
    }
}

/// Which messages `[hep]` exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HepOnly {
    /// Everything.
    All,
    /// Messages of INVITE dialogs (not REGISTER, OPTIONS, SUBSCRIBE/NOTIFY, MESSAGE).
    Dialogs,
    /// Messages from or to a source that is blocked or has an open anomaly record (what an
    /// attacker sent, including its packets dropped at the gate, and what was answered).
    Blocked,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Geoip {
    pub database: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Cluster {
    pub redis_url: String,
    /// PEM file of the CA that signed the Redis server's certificate, for `rediss://` with a
    /// private CA (empty: the system's roots and Mozilla's).
    pub redis_ca: String,
    /// How this node appears in `/api/cluster` (empty: the host name).
    pub node_name: String,
    /// Entries kept in the shared log (`XADD MAXLEN ~`): bounds Redis memory (entries are at
    /// most 32 KiB, usually well under 1 KiB). A node cut off for longer than the log covers
    /// reloads the whole set instead of catching up.
    pub log_max_len: usize,
    /// Entries older than this are trimmed from the log.
    #[serde(with = "humantime_serde")]
    pub log_max_age: Duration,
    /// Count REGISTER/auth failures, INVITE and TFTP rates cluster-wide (see
    /// [`crate::cluster_count`]); only with `redis_url`.
    pub shared_counters: bool,
    /// How often a node publishes its count deltas.
    #[serde(with = "humantime_serde")]
    pub count_interval: Duration,
    /// A peer not heard from for this long has its counts dropped.
    #[serde(with = "humantime_serde")]
    pub peer_timeout: Duration,
}

impl Default for Cluster {
    fn default() -> Self {
        Self {
            redis_url: String::new(),
            redis_ca: String::new(),
            node_name: String::new(),
            log_max_len: 100_000,
            log_max_age: Duration::from_secs(3600),
            shared_counters: true,
            count_interval: Duration::from_millis(100),
            peer_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// text | json
    pub format: LogFormat,
    /// tracing filter used when RUST_LOG is not set.
    pub level: String,
}

impl Default for Log {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// `fraud.rules[].per`: whose calls a rule counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FraudPer {
    Account,
    Source,
}

/// `fraud.rules[].action` at the critical threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FraudAction {
    /// Reject the call (`fraud.reject_code`).
    Reject,
    /// Reject it and block the account (per = "account") or the source (per = "source").
    Block,
    /// Let it through and alert.
    Alert,
}

/// `fraud.on_max_duration`: what happens when an answered call passes its rule's `max_duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaxDurationAction {
    /// Alert only; the call goes on.
    Alert,
    /// End the call: a BYE to each leg (record-routed calls whose INVITE and 2xx were seen),
    /// and an alert. In observe mode it alerts only.
    Bye,
}

/// One toll-fraud rule: limits on the calls of one account (or source) to one prefix group.
/// A limit of 0 is off. `warn_at` is the fraction of a limit that raises a warning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FraudRule {
    /// A key of `prefix_groups`; empty: every call.
    pub group: String,
    pub per: FraudPer,
    pub calls_per_minute: u32,
    pub calls_per_hour: u32,
    pub calls_per_day: u32,
    pub concurrent: u32,
    /// The same number dialled this many times in a row.
    pub same_number: u32,
    /// Distinct numbers within `distinct_window`.
    pub distinct_numbers: u32,
    #[serde(with = "humantime_serde")]
    pub distinct_window: Duration,
    /// An answered call longer than this raises an alert, or is ended (`fraud.on_max_duration`);
    /// "0s": off.
    #[serde(with = "humantime_serde")]
    pub max_duration: Duration,
    pub warn_at: f64,
    pub action: FraudAction,
    /// Hours of the day the rule applies, "8-18" (from 08:00 to 17:59, local to
    /// `fraud.utc_offset_minutes`; "22-6" wraps); empty: all day.
    pub hours: String,
    /// Days the rule applies: "mon-fri", "sat,sun"; empty: every day.
    pub days: String,
}

impl Default for FraudRule {
    fn default() -> Self {
        Self {
            group: String::new(),
            per: FraudPer::Account,
            calls_per_minute: 0,
            calls_per_hour: 0,
            calls_per_day: 0,
            concurrent: 0,
            same_number: 0,
            distinct_numbers: 0,
            distinct_window: Duration::from_secs(3600),
            max_duration: Duration::ZERO,
            warn_at: 0.8,
            action: FraudAction::Reject,
            hours: String::new(),
            days: String::new(),
        }
    }
}

/// Caps on the toll-fraud rules' limits: they size the per-subject windows (a limit of N keeps
/// up to N+1 timestamps or numbers per account), so they bound memory.
pub const FRAUD_MAX_RATE: u32 = 1000;
pub const FRAUD_MAX_RULES: usize = 32;

/// `[fraud]`: the toll-fraud guard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Fraud {
    pub enabled: bool,
    /// Named lists of number prefixes (dialled digits after any "sip:", "+" kept).
    pub prefix_groups: std::collections::BTreeMap<String, Vec<String>>,
    pub rules: Vec<FraudRule>,
    /// 403 (Forbidden) or 503 (Service Unavailable) for a rejected call.
    pub reject_code: u16,
    /// How long action = "block" blocks the account or source.
    #[serde(with = "humantime_serde")]
    pub block_time: Duration,
    /// Local time for `hours` and `days`, in minutes east of UTC.
    pub utc_offset_minutes: i32,
    /// Calls tracked at once and accounts/sources counted at once (each bound with its own
    /// least-recently-used eviction; see the engine's fraud module for the bytes per entry).
    pub max_calls: usize,
    pub max_subjects: usize,
    /// A call with no final answer after this long is over (408 / lost).
    #[serde(with = "humantime_serde")]
    pub setup_timeout: Duration,
    /// A call still up after this long without its BYE is forgotten (a lost BYE).
    #[serde(with = "humantime_serde")]
    pub call_timeout: Duration,
    /// A call past its rule's `max_duration`: "alert" (default: never cut a call by surprise)
    /// or "bye" (sipwarden ends it, a BYE to both legs, and alerts).
    pub on_max_duration: MaxDurationAction,
}

impl Default for Fraud {
    fn default() -> Self {
        let group = |p: &[&str]| p.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let mut groups = std::collections::BTreeMap::new();
        groups.insert("international".to_string(), group(&["00", "+"]));
        groups.insert(
            "premium".to_string(),
            group(&["0900", "0901", "0906", "0909", "1900", "+88"]),
        );
        groups.insert(
            "satellite".to_string(),
            group(&["00870", "00881", "00882", "+870", "+881", "+882"]),
        );
        Self {
            enabled: false,
            prefix_groups: groups,
            rules: vec![
                FraudRule {
                    group: "international".into(),
                    calls_per_minute: 5,
                    calls_per_hour: 30,
                    calls_per_day: 100,
                    concurrent: 3,
                    same_number: 10,
                    distinct_numbers: 20,
                    max_duration: Duration::from_secs(7200),
                    ..FraudRule::default()
                },
                FraudRule {
                    group: "premium".into(),
                    calls_per_hour: 3,
                    concurrent: 1,
                    action: FraudAction::Block,
                    ..FraudRule::default()
                },
                FraudRule {
                    group: "satellite".into(),
                    calls_per_day: 2,
                    concurrent: 1,
                    action: FraudAction::Block,
                    ..FraudRule::default()
                },
            ],
            reject_code: 403,
            block_time: Duration::from_secs(3600),
            utc_offset_minutes: 0,
            max_calls: 50_000,
            max_subjects: 20_000,
            setup_timeout: Duration::from_secs(180),
            call_timeout: Duration::from_secs(12 * 3600),
            on_max_duration: MaxDurationAction::Alert,
        }
    }
}

/// `[feeds]`: shared threat feeds pulled into a list of their own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Feeds {
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// APIBAN key; empty: APIBAN off.
    pub apiban_key: String,
    pub apiban_url: String,
    /// URLs of plain address/CIDR lists (one a line, `#` comments, VoIPBL format).
    pub lists: Vec<String>,
    /// A feed entry not seen again for this long expires.
    #[serde(with = "humantime_serde")]
    pub entry_lifetime: Duration,
    /// Entries held over all feeds; further ones are ignored (and counted).
    pub max_entries: usize,
    /// Bytes read from one list or one APIBAN answer.
    pub max_bytes: usize,
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for Feeds {
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(300),
            apiban_key: String::new(),
            apiban_url: "https://apiban.org/api".into(),
            lists: Vec::new(),
            entry_lifetime: Duration::from_secs(7 * 86400),
            max_entries: 200_000,
            max_bytes: 8 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

/// `[tls]`: certificates and limits of the TLS listeners (`sip.listen_tls`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain (leaf first); re-read on SIGHUP and when the file changes.
    pub certificate: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `certificate`.
    pub private_key: String,
    /// Per-name pairs chosen by the client's SNI; `certificate` is the fallback.
    pub sni: Vec<TlsSni>,
    /// Lowest protocol version accepted: "1.2" or "1.3".
    pub min_version: TlsVersion,
    /// PEM file of the CA(s) that sign client certificates; needed when `verify_client` is on.
    pub client_ca: String,
    /// `off`, `optional` (verify a certificate when one is sent) or `required`.
    pub verify_client: VerifyClient,
    /// A connection that has not completed its handshake in this long is closed: a client that
    /// opens connections and never speaks holds memory and a socket each.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Connections still in handshake per source address (IPv6: per `protection.ipv6_prefix`).
    /// A handshake costs the server a key exchange: one source must not hold many at once.
    pub max_handshakes_per_ip: usize,
    /// PEM file of the CA(s) that sign the PBX's certificate (`upstream.transport = "tls"`);
    /// the system's web roots are not trusted, so this is required for a TLS upstream.
    pub upstream_ca: String,
}

/// One `[[tls.sni]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSni {
    /// Server name, exact (`pbx.example.com`) or one wildcard label (`*.example.com`).
    pub name: String,
    pub certificate: String,
    pub private_key: String,
}

/// `tls.min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "1.2")]
    V12,
    #[serde(rename = "1.3")]
    V13,
}

/// `tls.verify_client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyClient {
    Off,
    Optional,
    Required,
}

impl Default for Tls {
    fn default() -> Self {
        Self {
            certificate: String::new(),
            private_key: String::new(),
            sni: Vec::new(),
            min_version: TlsVersion::V12,
            client_ca: String::new(),
            verify_client: VerifyClient::Off,
            handshake_timeout: Duration::from_secs(5),
            max_handshakes_per_ip: 16,
            upstream_ca: String::new(),
        }
    }
}

/// At most this many `[[tls.sni]]` entries (each holds a parsed key in memory).
pub const TLS_MAX_SNI: usize = 256;

fn validate_tls(c: &Config) -> Result<(), ConfigError> {
    let t = &c.tls;
    if !c.sip.listen_tls.is_empty() && (t.certificate.is_empty() || t.private_key.is_empty()) {
        let key = if t.certificate.is_empty() {
            "tls.certificate"
        } else {
            "tls.private_key"
        };
        return Err(invalid(key, "required when sip.listen_tls is set"));
    }
    if !c.sip.listen_wss.is_empty() && t.certificate.is_empty() {
        return Err(invalid(
            "tls.certificate",
            "required when sip.listen_wss is set",
        ));
    }
    if t.certificate.is_empty() != t.private_key.is_empty() {
        return Err(invalid(
            "tls.private_key",
            "tls.certificate and tls.private_key are set together",
        ));
    }
    if t.sni.len() > TLS_MAX_SNI {
        return Err(invalid("tls.sni", format!("at most {TLS_MAX_SNI} entries")));
    }
    for (i, e) in t.sni.iter().enumerate() {
        let n = e.name.strip_prefix("*.").unwrap_or(&e.name);
        let ok = !n.is_empty()
            && n.len() <= 253
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
        if !ok {
            return Err(invalid(
                &format!("tls.sni[{i}].name"),
                "a DNS name, optionally starting with \"*.\"",
            ));
        }
        if e.certificate.is_empty() || e.private_key.is_empty() {
            return Err(invalid(
                &format!("tls.sni[{i}].certificate"),
                "certificate and private_key are required",
            ));
        }
    }
    if t.verify_client != VerifyClient::Off && t.client_ca.is_empty() {
        return Err(invalid(
            "tls.client_ca",
            "required when tls.verify_client is optional or required",
        ));
    }
    positive("tls.handshake_timeout", t.handshake_timeout)?;
    nonzero("tls.max_handshakes_per_ip", t.max_handshakes_per_ip as u64)?;
    if c.upstream.transport == TransportKind::Tls && c.tls.upstream_ca.is_empty() {
        return Err(invalid(
            "tls.upstream_ca",
            "required when upstream.transport = \"tls\" (the CA that signs the PBX's certificate)",
        ));
    }
    let n = &c.upstream.tls_server_name;
    if !n.is_empty() && rustls::pki_types::ServerName::try_from(n.as_str()).is_err() {
        return Err(invalid(
            "upstream.tls_server_name",
            "must be a DNS name or an IP address",
        ));
    }
    Ok(())
}

/// Where the PBX is, as written in `upstream.address`, before name resolution.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    pub host: String,
    /// `None` when not given: SRV lookup for a host name, 5060 for an IP.
    pub port: Option<u16>,
    pub transport: TransportKind,
}

impl UpstreamTarget {
    /// The literal address, when the host is an IP.
    pub fn literal(&self) -> Option<SocketAddr> {
        let ip: IpAddr = self.host.parse().ok()?;
        Some(SocketAddr::new(ip, self.port.unwrap_or(5060)))
    }
}

/// Parse `ip:port`, `[v6]:port`, `host:port`, `host` or `sip:host[:port][;transport=tcp]`.
pub fn parse_upstream(s: &str, default_transport: TransportKind) -> Result<UpstreamTarget, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    let mut transport = default_transport;
    let rest = if let Some(r) = s.strip_prefix("sip:").or_else(|| s.strip_prefix("SIP:")) {
        let mut parts = r.split(';');
        let hostport = parts.next().unwrap_or("");
        for p in parts {
            if let Some(t) = p.strip_prefix("transport=") {
                transport = match t.to_ascii_lowercase().as_str() {
                    "udp" => TransportKind::Udp,
                    "tcp" => TransportKind::Tcp,
                    "tls" => TransportKind::Tls,
                    other => return Err(format!("unsupported transport {other:?}")),
                };
            }
        }
        hostport.rsplit('@').next().unwrap_or(hostport)
    } else {
        s
    };
    if let Ok(sa) = rest.parse::<SocketAddr>() {
        return Ok(UpstreamTarget {
            host: sa.ip().to_string(),
            port: Some(sa.port()),
            transport,
        });
    }
    if let Ok(ip) = rest.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(UpstreamTarget {
            host: ip.to_string(),
            port: None,
            transport,
        });
    }
    let (host, port) = match rest.rsplit_once(':') {
        Some((h, p)) => (
            h,
            Some(p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?),
        ),
        None => (rest, None),
    };
    let valid_host = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    if !valid_host {
        return Err(format!("bad host {host:?}"));
    }
    Ok(UpstreamTarget {
        host: host.to_string(),
        port,
        transport,
    })
}

impl Config {
    /// Parse TOML text strictly; the error names the offending key.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let de = toml::Deserializer::parse(text).map_err(|e| invalid("(syntax)", e.to_string()))?;
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let msg = inner.message().to_string();
            invalid(if key == "." { "(top level)" } else { &key }, msg)
        })?;
        cfg.validate()
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Config::from_toml(&text)
    }

    /// The checks serde cannot do: ranges, cross-key rules, non-empty lists.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let c = &self;
        if c.sip.listen_udp.is_empty() && c.sip.listen_tcp.is_empty() && c.sip.listen_tls.is_empty()
        {
            return Err(invalid(
                "sip.listen_udp",
                "no SIP listener: set listen_udp or listen_tcp",
            ));
        }
        if !(512..=65535).contains(&c.sip.max_message_bytes) {
            return Err(invalid("sip.max_message_bytes", "must be 512..=65535"));
        }
        nonzero("sip.max_connections", c.sip.max_connections as u64)?;
        nonzero(
            "sip.max_connections_per_ip",
            c.sip.max_connections_per_ip as u64,
        )?;
        positive("sip.tcp_idle_timeout", c.sip.tcp_idle_timeout)?;
        positive("sip.tcp_message_timeout", c.sip.tcp_message_timeout)?;
        if !c.sip.flow_key.is_empty()
            && crate::proxy::keys::parse_hex_key(&c.sip.flow_key).is_none()
        {
            return Err(invalid(
                "sip.flow_key",
                "must be 32 to 128 hex digits (e.g. from `openssl rand -hex 16`), or empty",
            ));
        }
        positive("sip.tcp_write_timeout", c.sip.tcp_write_timeout)?;
        if c.sip.tcp_write_queue_bytes < 2 * c.sip.max_message_bytes {
            return Err(invalid(
                "sip.tcp_write_queue_bytes",
                "must be at least twice sip.max_message_bytes (a forwarded message grows by the \
                 headers sipwarden adds)",
            ));
        }
        if !c.sip.public_address.is_empty() {
            let h = &c.sip.public_address;
            let ok = h.parse::<IpAddr>().is_ok()
                || h.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            if !ok {
                return Err(invalid(
                    "sip.public_address",
                    "must be an IP address or host name",
                ));
            }
        }
        parse_upstream(&c.upstream.address, c.upstream.transport)
            .map_err(|m| invalid("upstream.address", m))?;
        if !(1..=128).contains(&c.protection.ipv6_prefix) {
            return Err(invalid("protection.ipv6_prefix", "must be 1..=128"));
        }
        nonzero(
            "protection.tracked_sources",
            c.protection.tracked_sources as u64,
        )?;
        nonzero("protection.max_blocks", c.protection.max_blocks as u64)?;
        // A prefix no shorter than the tracked source (32, or ipv6_prefix) aggregates nothing.
        let a4 = c.protection.aggregate_ipv4;
        if a4 != 0 && !(8..=32).contains(&a4) {
            return Err(invalid(
                "protection.aggregate_ipv4",
                "must be 0 (off) or 8..=32",
            ));
        }
        let a6 = c.protection.aggregate_ipv6;
        if a6 != 0 && !(16..=128).contains(&a6) {
            return Err(invalid(
                "protection.aggregate_ipv6",
                "must be 0 (off) or 16..=128",
            ));
        }
        if c.protection.aggregate_after < 2 {
            return Err(invalid("protection.aggregate_after", "must be at least 2"));
        }
        nonzero("protection.escalation", c.protection.escalation as u64)?;
        nonzero("register.hit_count", c.register.hit_count as u64)?;
        positive("register.monit_period", c.register.monit_period)?;
        positive("register.block_time", c.register.block_time)?;
        nonzero("invite.rate_limit", c.invite.rate_limit as u64)?;
        nonzero("invite.burst", c.invite.burst as u64)?;
        positive("invite.block_time", c.invite.block_time)?;
        positive("scanners.block_time", c.scanners.block_time)?;
        if c.scanners.user_agents.iter().any(|u| u.trim().is_empty()) {
            return Err(invalid("scanners.user_agents", "empty pattern"));
        }
        nonzero(
            "patterns.enumeration_users",
            c.patterns.enumeration_users as u64,
        )?;
        nonzero("patterns.options_sweep", c.patterns.options_sweep as u64)?;
        nonzero(
            "patterns.accounts_per_source",
            c.patterns.accounts_per_source as u64,
        )?;
        nonzero(
            "patterns.sources_per_account",
            c.patterns.sources_per_account as u64,
        )?;
        positive("patterns.monit_period", c.patterns.monit_period)?;
        positive("patterns.block_time", c.patterns.block_time)?;
        nonzero(
            "flood.packets_per_second",
            c.flood.packets_per_second as u64,
        )?;
        positive("flood.block_time", c.flood.block_time)?;
        nonzero("anomaly.threshold", c.anomaly.threshold as u64)?;
        positive("anomaly.monit_period", c.anomaly.monit_period)?;
        positive("anomaly.block_time", c.anomaly.block_time)?;
        nonzero("tftp.hit_count", c.tftp.hit_count as u64)?;
        nonzero("tftp.limited_rate", c.tftp.limited_rate as u64)?;
        positive("tftp.block_time", c.tftp.block_time)?;
        nonzero("tftp.not_found_limit", c.tftp.not_found_limit as u64)?;
        nonzero(
            "tftp.max_transfers_per_ip",
            c.tftp.max_transfers_per_ip as u64,
        )?;
        nonzero("tftp.max_transfers", c.tftp.max_transfers as u64)?;
        if !c.admin.listen.ip().is_loopback() && c.admin.token.is_empty() {
            return Err(invalid(
                "admin.token",
                "required when admin.listen is not a loopback address",
            ));
        }
        if c.state.path.is_empty() {
            return Err(invalid("state.path", "must not be empty"));
        }
        let w = &c.notify.webhook;
        if !(w.is_empty() || w.starts_with("http://") || w.starts_with("https://")) {
            return Err(invalid(
                "notify.webhook",
                "must be an http:// or https:// URL",
            ));
        }
        validate_email(&c.notify)?;
        if let Err(e) = crate::hep::Target::parse(&c.hep.address) {
            return Err(invalid("hep.address", e));
        }
        if c.hep.password.len() > 255 {
            return Err(invalid("hep.password", "at most 255 bytes"));
        }
        if !(0.0..=1.0).contains(&c.hep.sample) {
            return Err(invalid("hep.sample", "must be between 0.0 and 1.0"));
        }
        let r = &c.cluster.redis_url;
        if !(r.is_empty() || r.starts_with("redis://") || r.starts_with("rediss://")) {
            return Err(invalid(
                "cluster.redis_url",
                "must be a redis:// or rediss:// (TLS) URL",
            ));
        }
        if !r.is_empty() {
            if let Err(e) = redis::Client::open(r.as_str()) {
                return Err(invalid("cluster.redis_url", e.to_string()));
            }
        }
        if !c.cluster.redis_ca.is_empty() && !r.starts_with("rediss://") {
            return Err(invalid(
                "cluster.redis_ca",
                "only with a rediss:// cluster.redis_url",
            ));
        }
        if c.cluster.node_name.len() > 64 {
            return Err(invalid("cluster.node_name", "at most 64 bytes"));
        }
        if !(1000..=10_000_000).contains(&c.cluster.log_max_len) {
            return Err(invalid("cluster.log_max_len", "between 1000 and 10000000"));
        }
        if c.cluster.log_max_age < Duration::from_secs(60) {
            return Err(invalid("cluster.log_max_age", "at least 60s"));
        }
        let ci = c.cluster.count_interval;
        if ci < Duration::from_millis(10) || ci > Duration::from_secs(10) {
            return Err(invalid(
                "cluster.count_interval",
                "must be between 10ms and 10s",
            ));
        }
        let pt = c.cluster.peer_timeout;
        // Idle nodes send an empty round every second (cluster_count::link): a shorter
        // timeout would drop live peers between two of them.
        if pt < ci.saturating_mul(3).max(Duration::from_secs(3)) || pt > Duration::from_secs(3600) {
            return Err(invalid(
                "cluster.peer_timeout",
                "must be at least 3s and 3 x cluster.count_interval, and at most 1h",
            ));
        }
        validate_fraud(&c.fraud)?;
        validate_feeds(&c.feeds)?;
        validate_tls(c)?;
        validate_websocket(c)?;
        tracing_subscriber::EnvFilter::try_new(&c.log.level)
            .map_err(|e| invalid("log.level", e.to_string()))?;
        Ok(self)
    }

    /// The effective configuration as TOML, for `sipwarden check`.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render: {e}\n"))
    }

    pub fn upstream_target(&self) -> UpstreamTarget {
        // validate() has checked this parses; fall back to the default rather than panic.
        parse_upstream(&self.upstream.address, self.upstream.transport).unwrap_or(UpstreamTarget {
            host: "127.0.0.1".into(),
            port: Some(5080),
            transport: self.upstream.transport,
        })
    }
}

fn validate_websocket(c: &Config) -> Result<(), ConfigError> {
    let w = &c.websocket;
    if !(c.sip.max_message_bytes..=1 << 20).contains(&w.max_frame_bytes) {
        return Err(invalid(
            "websocket.max_frame_bytes",
            "must be at least sip.max_message_bytes and at most 1048576",
        ));
    }
    positive("websocket.handshake_timeout", w.handshake_timeout)?;
    nonzero(
        "websocket.max_handshakes_per_ip",
        w.max_handshakes_per_ip as u64,
    )?;
    positive("websocket.ping_interval", w.ping_interval)?;
    if w.idle_timeout <= w.ping_interval {
        return Err(invalid(
            "websocket.idle_timeout",
            "must be longer than websocket.ping_interval (a live peer answers every ping)",
        ));
    }
    Ok(())
}

fn validate_fraud(f: &Fraud) -> Result<(), ConfigError> {
    if !matches!(f.reject_code, 403 | 503) {
        return Err(invalid("fraud.reject_code", "must be 403 or 503"));
    }
    positive("fraud.block_time", f.block_time)?;
    positive("fraud.setup_timeout", f.setup_timeout)?;
    positive("fraud.call_timeout", f.call_timeout)?;
    nonzero("fraud.max_calls", f.max_calls as u64)?;
    nonzero("fraud.max_subjects", f.max_subjects as u64)?;
    if !(-720..=840).contains(&f.utc_offset_minutes) {
        return Err(invalid("fraud.utc_offset_minutes", "must be -720..=840"));
    }
    for (name, prefixes) in &f.prefix_groups {
        let key = format!("fraud.prefix_groups.{name}");
        if name.is_empty() || prefixes.is_empty() || prefixes.len() > 256 {
            return Err(invalid(&key, "a named group of 1 to 256 prefixes"));
        }
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 16
                && p.bytes()
                    .enumerate()
                    .all(|(i, b)| b.is_ascii_digit() || (i == 0 && b == b'+'))
        };
        if let Some(p) = prefixes.iter().find(|p| !ok(p)) {
            return Err(invalid(
                &key,
                format!("{p:?}: a prefix is up to 16 digits, optionally after a leading +"),
            ));
        }
    }
    if f.rules.len() > FRAUD_MAX_RULES {
        return Err(invalid(
            "fraud.rules",
            format!("at most {FRAUD_MAX_RULES} rules"),
        ));
    }
    for (i, r) in f.rules.iter().enumerate() {
        let key = |k: &str| format!("fraud.rules[{i}].{k}");
        if !r.group.is_empty() && !f.prefix_groups.contains_key(&r.group) {
            return Err(invalid(
                &key("group"),
                format!("{:?} is not a key of fraud.prefix_groups", r.group),
            ));
        }
        for (k, v) in [
            ("calls_per_minute", r.calls_per_minute),
            ("same_number", r.same_number),
            ("distinct_numbers", r.distinct_numbers),
        ] {
            if v > FRAUD_MAX_RATE {
                return Err(invalid(&key(k), format!("at most {FRAUD_MAX_RATE}")));
            }
        }
        if !(r.warn_at > 0.0 && r.warn_at <= 1.0) {
            return Err(invalid(&key("warn_at"), "must be in (0, 1]"));
        }
        positive(&key("distinct_window"), r.distinct_window)?;
        if r.distinct_window > Duration::from_secs(86400) {
            return Err(invalid(&key("distinct_window"), "at most 1 day"));
        }
        crate::engine::fraud::parse_hours(&r.hours).map_err(|m| invalid(&key("hours"), m))?;
        crate::engine::fraud::parse_days(&r.days).map_err(|m| invalid(&key("days"), m))?;
    }
    Ok(())
}

fn validate_feeds(f: &Feeds) -> Result<(), ConfigError> {
    if f.interval < Duration::from_secs(60) {
        return Err(invalid(
            "feeds.interval",
            "at least 1m (APIBAN allows 11 requests per 2 minutes)",
        ));
    }
    positive("feeds.entry_lifetime", f.entry_lifetime)?;
    positive("feeds.timeout", f.timeout)?;
    nonzero("feeds.max_entries", f.max_entries as u64)?;
    if f.max_bytes < 1024 {
        return Err(invalid("feeds.max_bytes", "at least 1024"));
    }
    let url = |u: &str| u.starts_with("http://") || u.starts_with("https://");
    if !url(&f.apiban_url) {
        return Err(invalid(
            "feeds.apiban_url",
            "must be an http:// or https:// URL",
        ));
    }
    if f.apiban_key.bytes().any(|b| !b.is_ascii_graphic()) {
        return Err(invalid("feeds.apiban_key", "printable characters only"));
    }
    if let Some(u) = f.lists.iter().find(|u| !url(u)) {
        return Err(invalid(
            "feeds.lists",
            format!("{u:?} must be an http:// or https:// URL"),
        ));
    }
    Ok(())
}

fn validate_email(n: &Notify) -> Result<(), ConfigError> {
    use crate::notify::email::{parse_mailbox, SmtpTarget};
    if n.email_to.len() > MAX_EMAIL_TO {
        return Err(invalid(
            "notify.email_to",
            format!("at most {MAX_EMAIL_TO} recipients"),
        ));
    }
    for t in &n.email_to {
        parse_mailbox(t).map_err(|e| invalid("notify.email_to", e))?;
    }
    if !n.email_from.is_empty() {
        parse_mailbox(&n.email_from).map_err(|e| invalid("notify.email_from", e))?;
    }
    if !n.smtp_url.is_empty() {
        SmtpTarget::parse(&n.smtp_url).map_err(|e| invalid("notify.smtp_url", e))?;
    }
    if n.smtp_url.is_empty() != n.email_to.is_empty() {
        let key = if n.smtp_url.is_empty() {
            "notify.smtp_url"
        } else {
            "notify.email_to"
        };
        return Err(invalid(
            key,
            "notify.email_to and notify.smtp_url are set together (both or neither)",
        ));
    }
    if n.digest < Duration::from_secs(1) || n.digest > Duration::from_secs(86_400) {
        return Err(invalid("notify.digest", "must be between 1s and 1 day"));
    }
    Ok(())
}

fn nonzero(key: &str, v: u64) -> Result<(), ConfigError> {
    if v == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(())
}

fn positive(key: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        return Err(invalid(key, "must be a positive duration like \"90s\""));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
