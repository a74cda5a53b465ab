//! The block table: O(1) lookup by source before any parsing, expiry by time, a hard cap.
//!
//! When the table is full, a new block must make room, and an attacker who can cheaply make
//! blocks (one spoofed UDP packet with a scanner User-Agent blocks its claimed source) must not
//! be able to flush the blocks that cost a real attacker effort. So blocks give way by cost
//! ([`Block::cost`]: how much evidence of effort the block stands for, then the source's
//! strikes, then packets dropped since), never by nearness to expiry alone: the cheapest block
//! goes, and a new block no costlier than the cheapest one held is the one not stored
//! (incumbents win ties). Operator blocks and permanent blocks never give way.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{gate::Gate, source_net, BlockKey, BlockType};
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
    /// The captured packets behind the block, for the ladder view (at most
    /// [`super::evidence::PACKETS`]). Absent in state written before they were kept.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub packets: Vec<super::evidence::Packet>,
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

    /// Whether this block may give way to a costlier one when the table is full: not a
    /// permanent block, not one the operator made.
    pub fn evictable(&self) -> bool {
        self.expires_at.is_some() && rank(self.kind) != UNEVICTABLE
    }

    /// What this block is worth keeping, compared in order: the effort its type stands for,
    /// how often the source was blocked before, and packets dropped because of it.
    pub fn cost(&self) -> (u8, u32, u64) {
        (rank(self.kind), self.strikes, self.hits)
    }
}

/// The rank of [`UNEVICTABLE`] block types.
const UNEVICTABLE: u8 = u8::MAX;

/// The effort a block type stands for, cheapest first. A SCANNER block takes one packet (a
/// spoofable datagram); ANOMALY a few; FLOOD a second of packets; SCAN (enumeration, sweeps)
/// and TFTP tens of requests; REGISTER and INVITE (password guessing) `hit_count` requests the
/// PBX itself answered with a failure. Operator (MANUAL) and BLACKLIST blocks never give way.
pub fn rank(kind: BlockType) -> u8 {
    match kind {
        BlockType::Scanner | BlockType::Feed => 0,
        BlockType::Anomaly => 1,
        BlockType::Flood => 2,
        BlockType::Scan | BlockType::Tftp => 3,
        BlockType::Invite | BlockType::Register | BlockType::Fraud => 4,
        BlockType::Blacklist | BlockType::Manual => UNEVICTABLE,
    }
}

/// When the cheapest (type, strikes) class holds several blocks, this many of them (soonest
/// expiring first) are compared by hits to pick the victim: bounded work per eviction.
const VICTIM_SAMPLE: usize = 16;

/// What [`BlockTable::insert`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Admit {
    /// Stored (new, or replacing the block with the same key).
    Stored,
    /// Stored; this cheaper block gave way.
    Evicted(Block),
    /// Not stored: the table is full of blocks at least as costly. Returned to the caller.
    Refused(Block),
}

/// Clip an evidence line to [`EVIDENCE_CHARS`] characters.
pub fn clip(s: &str) -> String {
    let mut chars = s.chars();
    let head: String = chars.by_ref().take(EVIDENCE_CHARS).collect();
    if chars.next().is_some() {
        head + "…"
    } else {
        head
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
    /// Expiry order, for the periodic sweep.
    expiries: BTreeSet<(Millis, BlockKey)>,
    /// Evictable blocks, cheapest first: (type rank, strikes, expiry, key). Hits change on
    /// every dropped packet and are compared only within a bounded sample, so the hot path
    /// never touches this index.
    by_cost: BTreeSet<(u8, u32, Millis, BlockKey)>,
    /// Number of (address, port) blocks: when zero the second lookup is skipped.
    port_blocks: usize,
    max: usize,
    /// Blocks that gave way to costlier ones, and new blocks refused because the table was
    /// full of costlier ones, since start (`sipwarden_block_evictions_total`).
    evicted: u64,
    refused: u64,
    /// The lock-free mirror of the enforced blocks the packet path reads first: every change
    /// to `map` goes through `insert` and `remove`, which keep it in step.
    gate: Arc<Gate>,
}

impl BlockTable {
    pub fn new(max: usize) -> Self {
        Self::with_gate(max, Gate::new())
    }

    /// A table that mirrors its enforced blocks into `gate`.
    pub fn with_gate(max: usize, gate: Arc<Gate>) -> Self {
        Self {
            map: HashMap::new(),
            expiries: BTreeSet::new(),
            by_cost: BTreeSet::new(),
            port_blocks: 0,
            max: max.max(1),
            evicted: 0,
            refused: 0,
            gate,
        }
    }

    pub fn gate(&self) -> &Arc<Gate> {
        &self.gate
    }

    /// Add the packets the gate dropped since the last fold to the rows' `hits`. O(blocks):
    /// for readers of the whole table (the admin API, snapshots), not for the packet path.
    pub fn fold_gate_hits(&mut self) {
        let map = &mut self.map;
        self.gate.drain_hits(|k, n| {
            if let Some(b) = map.get_mut(k) {
                b.hits = b.hits.saturating_add(n);
            }
        });
    }

    /// A row's hits including those the gate counted and not yet folded.
    pub fn hits(&self, b: &Block) -> u64 {
        b.hits.saturating_add(self.gate.hits(&b.key))
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

    /// For evidence, hits and the device only: the key, type, strikes and expiry of a stored
    /// block index it and must change through [`BlockTable::insert`].
    pub fn get_mut(&mut self, key: &BlockKey) -> Option<&mut Block> {
        self.map.get_mut(key)
    }

    /// (blocks evicted, blocks refused) since start.
    pub fn evictions(&self) -> (u64, u64) {
        (self.evicted, self.refused)
    }

    /// Insert or replace. When the table is full, the cheapest evictable block gives way if
    /// the new one costs strictly more; otherwise the new block is refused.
    pub fn insert(&mut self, block: Block) -> Admit {
        let mut admit = Admit::Stored;
        if !self.map.contains_key(&block.key) && self.map.len() >= self.max {
            let victim = self.victim().filter(|v| block.cost() > v.1);
            match victim.and_then(|(k, _)| self.remove(&k)) {
                Some(v) => {
                    self.evicted += 1;
                    admit = Admit::Evicted(v);
                }
                None => {
                    self.refused += 1;
                    return Admit::Refused(block);
                }
            }
        }
        self.remove(&block.key);
        if let Some(e) = block.expires_at {
            self.expiries.insert((e, block.key));
        }
        if block.evictable() {
            self.by_cost.insert(cost_key(&block));
        }
        if block.key.port.is_some() {
            self.port_blocks += 1;
        }
        self.gate.put(&block);
        self.map.insert(block.key, block);
        admit
    }

    /// The cheapest evictable block and its cost: the lowest (type rank, strikes) class, and
    /// within it the least hit of the first [`VICTIM_SAMPLE`] by expiry.
    fn victim(&self) -> Option<(BlockKey, (u8, u32, u64))> {
        let (rank, strikes, _, _) = *self.by_cost.first()?;
        self.by_cost
            .iter()
            .take_while(|(r, s, _, _)| (*r, *s) == (rank, strikes))
            .take(VICTIM_SAMPLE)
            .filter_map(|(_, _, _, k)| self.map.get(k))
            .min_by_key(|b| self.hits(b))
            .map(|b| {
                let (rank, strikes, _) = b.cost();
                (b.key, (rank, strikes, self.hits(b)))
            })
    }

    /// Remove a block (its gate hits folded into the returned row).
    pub fn remove(&mut self, key: &BlockKey) -> Option<Block> {
        let mut b = self.map.remove(key)?;
        b.hits = b.hits.saturating_add(self.gate.remove(key));
        if let Some(e) = b.expires_at {
            self.expiries.remove(&(e, b.key));
        }
        self.by_cost.remove(&cost_key(&b));
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

fn cost_key(b: &Block) -> (u8, u32, Millis, BlockKey) {
    (
        rank(b.kind),
        b.strikes,
        b.expires_at.unwrap_or(Millis::MAX),
        b.key,
    )
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
            packets: Vec::new(),
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
        // As costly as the cheapest held: the incumbent stays.
        let refused = t.insert(block([10, 0, 0, 3], None, Some(900)));
        assert!(matches!(refused, Admit::Refused(_)));
        // One repeat offence more: the first block gives way.
        let mut b = block([10, 0, 0, 3], None, Some(900));
        b.strikes = 2;
        let evicted = t.insert(b);
        assert!(
            matches!(&evicted, Admit::Evicted(v) if v.key.net.addr() == IpAddr::from([10, 0, 0, 1])),
            "{evicted:?}"
        );
        assert_eq!(t.evictions(), (1, 1));
        assert_eq!(t.len(), 2);
        let gone = t.expire(900);
        assert_eq!(gone.len(), 1);
        assert_eq!(t.len(), 1);
    }

    fn typed(i: u32, kind: BlockType, expires: Millis) -> Block {
        let mut b = block(
            Ipv4Addr::from(0x0a00_0000 + i).octets(),
            None,
            Some(expires),
        );
        b.kind = kind;
        b
    }

    #[test]
    fn cheap_blocks_never_evict_costly_ones() {
        let mut t = BlockTable::new(100);
        // A real brute forcer, blocked for an hour, who keeps knocking.
        let mut brute = typed(0, BlockType::Register, 3_600_000);
        brute.hits = 40;
        let brute_key = brute.key;
        t.insert(brute);
        // A burst of one-packet scanner blocks from spoofed sources, expiring much sooner.
        for i in 1..10_000 {
            t.insert(typed(i, BlockType::Scanner, 60_000));
        }
        assert!(
            t.get(&brute_key).is_some(),
            "the brute forcer stays blocked"
        );
        assert_eq!(t.len(), 100);
        let (evicted, refused) = t.evictions();
        assert_eq!(evicted, 0);
        assert_eq!(refused, 10_000 - 100);
        // A costlier block evicts the cheapest: a scanner block, the least hit.
        t.check(0, SocketAddr::from(([10, 0, 0, 1], 5060)), 64);
        let admit = t.insert(typed(20_000, BlockType::Anomaly, 60_000));
        let Admit::Evicted(v) = admit else {
            panic!("{admit:?}")
        };
        assert_eq!(v.kind, BlockType::Scanner);
        assert_ne!(
            v.key.net.addr(),
            IpAddr::from([10, 0, 0, 1]),
            "hit one kept"
        );
    }

    #[test]
    fn operator_and_permanent_blocks_never_give_way() {
        let mut t = BlockTable::new(2);
        let mut manual = typed(1, BlockType::Manual, 1000);
        manual.strikes = 0;
        t.insert(manual);
        t.insert(block([10, 0, 0, 2], None, None));
        let mut costly = typed(3, BlockType::Register, 1000);
        costly.strikes = 9;
        assert!(matches!(t.insert(costly), Admit::Refused(_)));
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn clip_counts_characters() {
        let long = "é".repeat(EVIDENCE_CHARS + 5);
        let c = clip(&long);
        assert_eq!(c.chars().count(), EVIDENCE_CHARS + 1);
        assert!(c.ends_with('…'));
        assert_eq!(clip("short"), "short");
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
