//! Who is blocked and who never is: the block table (dynamic, manual and permanent blocks with
//! their evidence), the CIDR white- and blacklists, and the events that persistence, cluster sync
//! and notifications consume.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

pub mod evidence;
pub mod gate;
mod lists;
pub mod table;

pub use gate::{Gate, GateVerdict, LocalHits, Policy};
pub use lists::{ListEntry, ListKind, Lists};
pub use table::{Block, BlockTable, Hit};

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// Why a source is blocked; the names are the block table's "type" column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum BlockType {
    Register,
    Invite,
    Scanner,
    Scan,
    Anomaly,
    Flood,
    Tftp,
    Blacklist,
    Manual,
    /// A toll-fraud rule (the reason names the account and prefix group).
    Fraud,
    /// A shared threat feed (the reason names the feed).
    Feed,
}

impl BlockType {
    pub const ALL: [BlockType; 11] = [
        BlockType::Register,
        BlockType::Invite,
        BlockType::Scanner,
        BlockType::Scan,
        BlockType::Anomaly,
        BlockType::Flood,
        BlockType::Tftp,
        BlockType::Blacklist,
        BlockType::Manual,
        BlockType::Fraud,
        BlockType::Feed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BlockType::Register => "REGISTER",
            BlockType::Invite => "INVITE",
            BlockType::Scanner => "SCANNER",
            BlockType::Scan => "SCAN",
            BlockType::Anomaly => "ANOMALY",
            BlockType::Flood => "FLOOD",
            BlockType::Tftp => "TFTP",
            BlockType::Blacklist => "BLACKLIST",
            BlockType::Manual => "MANUAL",
            BlockType::Fraud => "FRAUD",
            BlockType::Feed => "FEED",
        }
    }
}

impl fmt::Display for BlockType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a block covers: a whole source (an IPv4 address or an IPv6 prefix) or one
/// (address, port) behind a NAT that other good devices share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockKey {
    pub net: IpNet,
    pub port: Option<u16>,
}

impl BlockKey {
    pub fn whole(net: IpNet) -> Self {
        Self { net, port: None }
    }

    pub fn with_port(net: IpNet, port: u16) -> Self {
        Self {
            net,
            port: Some(port),
        }
    }

    /// The text an operator types and the API shows: `1.2.3.4`, `2001:db8::/64`, and for a port
    /// block `1.2.3.4:5062` / `[2001:db8::]/64:5062`.
    pub fn ip_text(&self) -> String {
        match self.net {
            IpNet::V4(n) if n.prefix_len() == 32 => n.addr().to_string(),
            IpNet::V6(n) if n.prefix_len() == 128 => n.addr().to_string(),
            n => n.to_string(),
        }
    }
}

impl fmt::Display for BlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            None => f.write_str(&self.ip_text()),
            Some(p) if self.net.addr().is_ipv6() => write!(f, "[{}]:{p}", self.ip_text()),
            Some(p) => write!(f, "{}:{p}", self.ip_text()),
        }
    }
}

/// The unit a source is tracked and blocked by: the address itself for IPv4, its prefix of
/// `ipv6_prefix` bits for IPv6 (one attacker owns a whole /64). IPv4-mapped IPv6 addresses are
/// treated as the IPv4 address they carry.
pub fn source_net(ip: IpAddr, ipv6_prefix: u8) -> IpNet {
    match ip {
        IpAddr::V4(v4) => IpNet::V4(Ipv4Net::from(v4)),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::from(v4)),
            None => {
                let len = ipv6_prefix.min(128);
                let net = Ipv6Net::new(v6, len).unwrap_or_else(|_| Ipv6Net::from(v6));
                IpNet::V6(net.trunc())
            }
        },
    }
}

/// Parse an operator's IP or CIDR (`1.2.3.4`, `10.0.0.0/8`, `2001:db8::1`, `2001:db8::/48`).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    let s = s.trim();
    if let Ok(n) = s.parse::<IpNet>() {
        return Ok(n.trunc());
    }
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(IpNet::from(ip));
    }
    Err(format!("{s:?} is not an IP address or CIDR"))
}

/// The normalised source of a packet.
pub fn source_of(addr: SocketAddr, ipv6_prefix: u8) -> (IpNet, u16) {
    (source_net(addr.ip(), ipv6_prefix), addr.port())
}

/// Strip IPv4-mapped IPv6 to plain IPv4 (dual-stack sockets report those).
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// A change to durable state. The engine queues these; persistence, cluster sync, metrics and
/// notifications consume them in that order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    Blocked(Block),
    Unblocked {
        key: BlockKey,
        kind: BlockType,
        why: UnblockReason,
    },
    ListAdded {
        list: ListKind,
        net: IpNet,
        entry: ListEntry,
    },
    ListRemoved {
        list: ListKind,
        net: IpNet,
    },
    Strikes {
        net: IpNet,
        strikes: u32,
        last: Millis,
    },
    /// An alert that is not a block (an INVITE flood episode, an account under attack).
    Alert {
        kind: BlockType,
        source: String,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnblockReason {
    Expired,
    Manual,
    Evicted,
    Whitelisted,
    /// An automatic blacklist entry replaced by the prefix that covers it.
    Aggregated,
}
