//! The whitelist and the static blacklist: CIDR tables with longest-prefix lookup.

use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixMap;
use serde::{Deserialize, Serialize};

use super::canonical_ip;
use crate::clock::Millis;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ListKind {
    Whitelist,
    Blacklist,
}

impl ListKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ListKind::Whitelist => "whitelist",
            ListKind::Blacklist => "blacklist",
        }
    }
}

/// Where an entry came from: `config` entries are replaced on reload, the others (`api`,
/// `auto` after repeated blocks, `cluster` from another node) are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    pub comment: String,
    pub added_at: Millis,
    pub source: String,
}

#[derive(Debug, Default, Clone)]
struct CidrMap {
    v4: PrefixMap<Ipv4Net, ListEntry>,
    v6: PrefixMap<Ipv6Net, ListEntry>,
}

impl CidrMap {
    fn lookup(&self, ip: IpAddr) -> Option<(IpNet, &ListEntry)> {
        match canonical_ip(ip) {
            IpAddr::V4(a) => self
                .v4
                .get_lpm(&Ipv4Net::from(a))
                .map(|(n, e)| (IpNet::V4(*n), e)),
            IpAddr::V6(a) => self
                .v6
                .get_lpm(&Ipv6Net::from(a))
                .map(|(n, e)| (IpNet::V6(*n), e)),
        }
    }

    /// Does any entry overlap `net` (contain it or lie inside it)?
    fn covers(&self, net: IpNet) -> bool {
        self.lookup(net.addr()).is_some() || self.iter().any(|(n, _)| net.contains(&n.addr()))
    }

    fn insert(&mut self, net: IpNet, e: ListEntry) -> bool {
        match net.trunc() {
            IpNet::V4(n) => self.v4.insert(n, e).is_none(),
            IpNet::V6(n) => self.v6.insert(n, e).is_none(),
        }
    }

    fn remove(&mut self, net: IpNet) -> Option<ListEntry> {
        match net.trunc() {
            IpNet::V4(n) => self.v4.remove(&n),
            IpNet::V6(n) => self.v6.remove(&n),
        }
    }

    fn iter(&self) -> impl Iterator<Item = (IpNet, &ListEntry)> {
        self.v4
            .iter()
            .map(|(n, e)| (IpNet::V4(*n), e))
            .chain(self.v6.iter().map(|(n, e)| (IpNet::V6(*n), e)))
    }

    fn len(&self) -> usize {
        self.v4.iter().count() + self.v6.iter().count()
    }
}

#[derive(Debug, Default, Clone)]
pub struct Lists {
    white: CidrMap,
    black: CidrMap,
}

impl Lists {
    fn map(&self, list: ListKind) -> &CidrMap {
        match list {
            ListKind::Whitelist => &self.white,
            ListKind::Blacklist => &self.black,
        }
    }

    fn map_mut(&mut self, list: ListKind) -> &mut CidrMap {
        match list {
            ListKind::Whitelist => &mut self.white,
            ListKind::Blacklist => &mut self.black,
        }
    }

    pub fn is_whitelisted(&self, ip: IpAddr) -> bool {
        self.white.lookup(ip).is_some()
    }

    pub fn whitelist_covers(&self, net: IpNet) -> bool {
        self.white.covers(net)
    }

    /// The blacklist entry covering `ip`.
    pub fn blacklisted(&self, ip: IpAddr) -> Option<(IpNet, &ListEntry)> {
        self.black.lookup(ip)
    }

    /// Add or replace; returns true when the CIDR was new.
    pub fn add(&mut self, list: ListKind, net: IpNet, entry: ListEntry) -> bool {
        self.map_mut(list).insert(net, entry)
    }

    pub fn remove(&mut self, list: ListKind, net: IpNet) -> Option<ListEntry> {
        self.map_mut(list).remove(net)
    }

    pub fn entries(&self, list: ListKind) -> Vec<(IpNet, ListEntry)> {
        self.map(list).iter().map(|(n, e)| (n, e.clone())).collect()
    }

    pub fn len(&self, list: ListKind) -> usize {
        self.map(list).len()
    }

    /// Replace the entries that came from the config file with `nets`, keeping the others.
    /// Returns the (added, removed) CIDRs.
    pub fn replace_config(
        &mut self,
        list: ListKind,
        nets: &[IpNet],
        now: Millis,
    ) -> (Vec<IpNet>, Vec<IpNet>) {
        let map = self.map_mut(list);
        let old: Vec<IpNet> = map
            .iter()
            .filter(|(_, e)| e.source == "config")
            .map(|(n, _)| n)
            .collect();
        let removed: Vec<IpNet> = old
            .iter()
            .filter(|n| !nets.iter().any(|m| m.trunc() == **n))
            .copied()
            .collect();
        for n in &removed {
            map.remove(*n);
        }
        let mut added = Vec::new();
        for n in nets {
            let n = n.trunc();
            if map.lookup(n.addr()).map(|(m, _)| m) == Some(n) {
                continue;
            }
            map.insert(
                n,
                ListEntry {
                    comment: String::new(),
                    added_at: now,
                    source: "config".into(),
                },
            );
            added.push(n);
        }
        (added, removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e() -> ListEntry {
        ListEntry {
            comment: String::new(),
            added_at: 0,
            source: "api".into(),
        }
    }

    #[test]
    fn longest_prefix_and_mapped_v4() {
        let mut l = Lists::default();
        l.add(ListKind::Whitelist, "10.0.0.0/8".parse().unwrap(), e());
        l.add(ListKind::Blacklist, "2001:db8::/32".parse().unwrap(), e());
        assert!(l.is_whitelisted("10.1.2.3".parse().unwrap()));
        assert!(l.is_whitelisted("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!l.is_whitelisted("11.1.2.3".parse().unwrap()));
        assert!(l.blacklisted("2001:db8:5::1".parse().unwrap()).is_some());
        assert!(l
            .remove(ListKind::Whitelist, "10.0.0.0/8".parse().unwrap())
            .is_some());
        assert!(!l.is_whitelisted("10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn reload_replaces_only_config_entries() {
        let mut l = Lists::default();
        l.add(ListKind::Blacklist, "192.0.2.0/24".parse().unwrap(), e());
        l.replace_config(
            ListKind::Blacklist,
            &["198.51.100.0/24".parse().unwrap()],
            0,
        );
        let (added, removed) =
            l.replace_config(ListKind::Blacklist, &["203.0.113.0/24".parse().unwrap()], 0);
        assert_eq!(added.len(), 1);
        assert_eq!(removed, vec!["198.51.100.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(l.len(ListKind::Blacklist), 2);
    }
}
