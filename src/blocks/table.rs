//! The block table: O(1) lookup by source before any parsing, expiry by time, a hard cap.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{source_net, BlockKey, BlockType};
use crate::clock::Millis;

/// Evidence lines kept per block, and their length: enough for an operator to see why, small
/// enough that a hundred thousand blocks stay cheap.
pub const EVIDENCE_LINES: usize = 5;
pub const EVIDENCE_CHARS: usize = 160;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Block {
    pub key: BlockKey,
    pub kind: BlockType,
    /// The User-Agent (or TFTP client) seen from the source.
    pub device: String,
    pub reason: String,
    pub blocked_at: Millis,
    /// `None`: permanent until an operator removes it.
    pub expires_at: Option<Millis>,
    /// How many times this source has been blocked (this one included).
    pub strikes: u32,
    /// Packets dropped because of this block.
    pub hits: u64,
    pub evidence: Vec<String>,
    /// `false` in observe mode: shown as a would-be block, nothing is dropped.
    pub enforced: bool,
}

impl Block {
    pub fn unblock_in_secs(&self, now: Millis) -> Option<u64> {
        self.expires_at
            .map(|e| e.saturating_sub(now).div_ceil(1000))
    }

    pub fn is_expired(&self, now: Millis) -> bool {
        matches!(self.expires_at, Some(e) if e <= now)
    }
}

/// Clip an evidence line to [`EVIDENCE_CHARS`] on a char boundary.
pub fn clip(s: &str) -> String {
    match s.char_indices().nth(EVIDENCE_CHARS) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// What a lookup found for a packet's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hit {
    pub key: BlockKey,
    pub kind: BlockType,
}

#[derive(Debug)]
pub struct BlockTable {
    map: HashMap<BlockKey, Block>,
    /// Expiry order, for the periodic sweep and for eviction when the table is full.
    expiries: BTreeSet<(Millis, BlockKey)>,
    /// Number of (address, port) blocks: when zero the second lookup is skipped.
    port_blocks: usize,
    max: usize,
}

impl BlockTable {
    pub fn new(max: usize) -> Self {
        Self {
            map: HashMap::new(),
            expiries: BTreeSet::new(),
            port_blocks: 0,
            max: max.max(1),
        }
    }

    pub fn set_max(&mut self, max: usize) {
        self.max = max.max(1);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The enforced block covering `src`, if any, counting the hit. Expired entries are not
    /// matched (the sweep removes them and reports the unblock).
    pub fn check(&mut self, now: Millis, src: SocketAddr, ipv6_prefix: u8) -> Option<Hit> {
        let net = source_net(src.ip(), ipv6_prefix);
        let mut key = BlockKey::whole(net);
        if let Some(hit) = Self::hit(self.map.get_mut(&key), now) {
            return Some(hit);
        }
        if self.port_blocks == 0 {
            return None;
        }
        key.port = Some(src.port());
        Self::hit(self.map.get_mut(&key), now)
    }

    fn hit(block: Option<&mut Block>, now: Millis) -> Option<Hit> {
        let b = block?;
        if !b.enforced || b.is_expired(now) {
            return None;
        }
        b.hits += 1;
        Some(Hit {
            key: b.key,
            kind: b.kind,
        })
    }

    pub fn get(&self, key: &BlockKey) -> Option<&Block> {
        self.map.get(key)
    }

    pub fn get_mut(&mut self, key: &BlockKey) -> Option<&mut Block> {
        self.map.get_mut(key)
    }

    /// Insert or replace. Returns the block evicted to make room, if the table was full.
    pub fn insert(&mut self, block: Block) -> Option<Block> {
        let mut evicted = None;
        if !self.map.contains_key(&block.key) && self.map.len() >= self.max {
            let victim = self.expiries.iter().next().map(|(_, k)| *k);
            evicted = victim.and_then(|k| self.remove(&k));
            if evicted.is_none() {
                // Full of permanent blocks: keep what the operator set.
                return Some(block);
            }
        }
        self.remove(&block.key);
        if let Some(e) = block.expires_at {
            self.expiries.insert((e, block.key));
        }
        if block.key.port.is_some() {
            self.port_blocks += 1;
        }
        self.map.insert(block.key, block);
        evicted
    }

    pub fn remove(&mut self, key: &BlockKey) -> Option<Block> {
        let b = self.map.remove(key)?;
        if let Some(e) = b.expires_at {
            self.expiries.remove(&(e, b.key));
        }
        if b.key.port.is_some() {
            self.port_blocks -= 1;
        }
        Some(b)
    }

    /// Remove every block covering `net` (the whole-source block and its port blocks).
    pub fn remove_net(&mut self, net: ipnet::IpNet) -> Vec<Block> {
        let keys: Vec<BlockKey> = self
            .map
            .keys()
            .filter(|k| k.net == net || net.contains(&k.net.addr()))
            .copied()
            .collect();
        keys.iter().filter_map(|k| self.remove(k)).collect()
    }

    /// Remove and return every block whose time is up.
    pub fn expire(&mut self, now: Millis) -> Vec<Block> {
        let due: Vec<BlockKey> = self
            .expiries
            .iter()
            .take_while(|(e, _)| *e <= now)
            .map(|(_, k)| *k)
            .collect();
        due.iter().filter_map(|k| self.remove(k)).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Block> {
        self.map.values()
    }

    pub fn count_by_type(&self) -> HashMap<BlockType, usize> {
        let mut m = HashMap::new();
        for b in self.map.values().filter(|b| b.enforced) {
            *m.entry(b.kind).or_insert(0) += 1;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, Ipv4Addr};

    fn block(ip: [u8; 4], port: Option<u16>, expires: Option<Millis>) -> Block {
        let net = source_net(IpAddr::V4(Ipv4Addr::from(ip)), 64);
        Block {
            key: BlockKey { net, port },
            kind: BlockType::Register,
            device: "x".into(),
            reason: "test".into(),
            blocked_at: 0,
            expires_at: expires,
            strikes: 1,
            hits: 0,
            evidence: vec![],
            enforced: true,
        }
    }

    fn sa(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    #[test]
    fn whole_and_port_blocks() {
        let mut t = BlockTable::new(10);
        t.insert(block([10, 0, 0, 1], None, Some(1000)));
        t.insert(block([10, 0, 0, 2], Some(5062), Some(1000)));
        assert!(t.check(0, sa([10, 0, 0, 1], 1), 64).is_some());
        assert!(t.check(0, sa([10, 0, 0, 2], 5062), 64).is_some());
        assert!(t.check(0, sa([10, 0, 0, 2], 5060), 64).is_none());
        assert!(t.check(1000, sa([10, 0, 0, 1], 1), 64).is_none(), "expired");
        assert_eq!(
            t.get(&block([10, 0, 0, 1], None, None).key).map(|b| b.hits),
            Some(1)
        );
    }

    #[test]
    fn expiry_sweep_and_cap() {
        let mut t = BlockTable::new(2);
        t.insert(block([10, 0, 0, 1], None, Some(500)));
        t.insert(block([10, 0, 0, 2], None, None));
        let evicted = t.insert(block([10, 0, 0, 3], None, Some(900)));
        assert_eq!(
            evicted.map(|b| b.key.net.addr()),
            Some(Ipv4Addr::new(10, 0, 0, 1).into())
        );
        assert_eq!(t.len(), 2);
        let gone = t.expire(900);
        assert_eq!(gone.len(), 1);
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn ipv6_prefix_blocks_the_whole_prefix() {
        let mut t = BlockTable::new(10);
        let ip: IpAddr = "2001:db8:1:2::5".parse().unwrap();
        let key = BlockKey::whole(source_net(ip, 64));
        let mut b = block([0, 0, 0, 0], None, None);
        b.key = key;
        t.insert(b);
        let other: SocketAddr = "[2001:db8:1:2:ffff::1]:5060".parse().unwrap();
        let outside: SocketAddr = "[2001:db8:1:3::1]:5060".parse().unwrap();
        assert!(t.check(0, other, 64).is_some());
        assert!(t.check(0, outside, 64).is_none());
    }
}
