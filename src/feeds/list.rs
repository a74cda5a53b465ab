//! The feed list, sans-I/O: addresses and prefixes from threat feeds with the feed that listed
//! them and their expiry. Its own list, looked up after the whitelist (which always wins);
//! bounded by `feeds.max_entries` (entries past it are refused and counted).
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use serde::{Deserialize, Serialize};

use crate::blocks::canonical_ip;
use crate::clock::Millis;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeedEntry {
    pub feed: Box<str>,
    /// Last time a pull listed it; it expires `entry_lifetime` after that.
    pub seen: Millis,
    pub expires: Millis,
}

/// What the dashboard and `/api/feeds` show per feed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedStatus {
    pub name: String,
    pub url: String,
    pub entries: usize,
    pub last_update: Option<Millis>,
    pub last_error: String,
    /// APIBAN: the ID the next incremental pull starts from.
    pub next_id: Option<u64>,
    pub refused: u64,
    /// Pulls since the feed was first configured (kept with the snapshot).
    #[serde(default)]
    pub pulls_ok: u64,
    #[serde(default)]
    pub pulls_failed: u64,
}

#[derive(Default, Clone)]
pub struct FeedList {
    v4: PrefixMap<Ipv4Net, FeedEntry>,
    v6: PrefixMap<Ipv6Net, FeedEntry>,
    len: usize,
    max: usize,
    status: BTreeMap<String, FeedStatus>,
}

/// A snapshot for the state store.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Snapshot {
    pub entries: Vec<(IpNet, FeedEntry)>,
    pub status: Vec<FeedStatus>,
}

impl FeedList {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            ..Self::default()
        }
    }

    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The feed entry covering `ip`, if not expired.
    pub fn lookup(&self, now: Millis, ip: IpAddr) -> Option<(IpNet, &FeedEntry)> {
        let hit = match canonical_ip(ip) {
            IpAddr::V4(a) => self
                .v4
                .get_lpm(&Ipv4Net::from(a))
                .map(|(n, e)| (IpNet::V4(*n), e)),
            IpAddr::V6(a) => self
                .v6
                .get_lpm(&Ipv6Net::from(a))
                .map(|(n, e)| (IpNet::V6(*n), e)),
        };
        hit.filter(|(_, e)| e.expires > now)
    }

    /// Add or refresh an entry. False when the list is full.
    pub fn upsert(&mut self, net: IpNet, feed: &str, now: Millis, lifetime: Millis) -> bool {
        let entry = FeedEntry {
            feed: feed.into(),
            seen: now,
            expires: now.saturating_add(lifetime),
        };
        let existed = match net.trunc() {
            IpNet::V4(n) => {
                if !self.v4.contains_key(&n) && self.len >= self.max {
                    return false;
                }
                self.v4.insert(n, entry).is_some()
            }
            IpNet::V6(n) => {
                if !self.v6.contains_key(&n) && self.len >= self.max {
                    return false;
                }
                self.v6.insert(n, entry).is_some()
            }
        };
        if !existed {
            self.len += 1;
        }
        true
    }

    /// Drop expired entries; returns how many.
    pub fn expire(&mut self, now: Millis) -> usize {
        let before = self.len;
        self.v4.retain(|_, e| e.expires > now);
        self.v6.retain(|_, e| e.expires > now);
        self.len = self.v4.iter().count() + self.v6.iter().count();
        self.recount();
        before.saturating_sub(self.len)
    }

    fn recount(&mut self) {
        for s in self.status.values_mut() {
            s.entries = 0;
        }
        let feeds: Vec<Box<str>> = self
            .v4
            .iter()
            .map(|(_, e)| e.feed.clone())
            .chain(self.v6.iter().map(|(_, e)| e.feed.clone()))
            .collect();
        for f in feeds {
            if let Some(s) = self.status.get_mut(&*f) {
                s.entries += 1;
            }
        }
    }

    pub fn status_mut(&mut self, name: &str, url: &str) -> &mut FeedStatus {
        self.status
            .entry(name.to_string())
            .or_insert_with(|| FeedStatus {
                name: name.to_string(),
                url: url.to_string(),
                ..FeedStatus::default()
            })
    }

    /// After a pull: recount entries per feed.
    pub fn finish_pull(&mut self) {
        self.recount();
    }

    pub fn status(&self) -> impl Iterator<Item = &FeedStatus> {
        self.status.values()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            entries: self
                .v4
                .iter()
                .map(|(n, e)| (IpNet::V4(*n), e.clone()))
                .chain(self.v6.iter().map(|(n, e)| (IpNet::V6(*n), e.clone())))
                .collect(),
            status: self.status.values().cloned().collect(),
        }
    }

    /// Load a snapshot (at start); expired entries are skipped.
    pub fn restore(&mut self, now: Millis, snap: Snapshot) {
        for s in snap.status {
            self.status.insert(s.name.clone(), s);
        }
        for (net, e) in snap.entries {
            if e.expires > now {
                let lifetime = e.expires - e.seen;
                // Past max_entries (lowered since) the rest are dropped.
                let _ = self.upsert(net, &e.feed, e.seen, lifetime);
            }
        }
        self.recount();
    }
}

/// Parse a plain list (VoIPBL format): one address or CIDR a line, `#` and `;` comments,
/// anything else on a line after whitespace ignored. Returns the entries and the count of
/// lines that were not addresses. Stops after `max` entries.
pub fn parse_plain(text: &str, max: usize) -> (Vec<IpNet>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("").trim();
        let Some(word) = line.split_whitespace().next() else {
            continue;
        };
        match crate::blocks::parse_net(word) {
            Ok(n) if !is_special(n) => out.push(n),
            _ => bad += 1,
        }
        if out.len() >= max {
            break;
        }
    }
    (out, bad)
}

/// Entries no feed may list: loopback, private, link-local, unspecified, a default route.
pub fn is_special(net: IpNet) -> bool {
    let ip = canonical_ip(net.addr());
    net.prefix_len() < 8
        || ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || match ip {
            IpAddr::V4(a) => a.is_private() || a.is_link_local() || a.is_broadcast(),
            IpAddr::V6(a) => {
                let first = a.segments().first().copied().unwrap_or(0);
                (first & 0xfe00) == 0xfc00 || (first & 0xffc0) == 0xfe80
            }
        }
}
