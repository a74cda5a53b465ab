//! The block ledger: blocks, lists, strikes, feeds, the fraud guard and the state changes they
//! make. The detectors ([`super::detectors`]) decide; the ledger records, enforces (through the
//! drop gate it keeps in step) and queues [`Event`]s for the state task.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use lru::LruCache;

use super::track::nonzero;
use super::{fraud, Strike};
use crate::blocks::{
    canonical_ip, source_net, table::clip, Block, BlockKey, BlockTable, BlockType, Event, Gate,
    ListEntry, ListKind, Lists, Policy, UnblockReason,
};
use crate::clock::Millis;
use crate::config::{Config, Mode};

/// The block ledger: the block table and its drop gate, the lists, strike memory, the feed
/// list, the toll-fraud guard and the queue of state changes. One per node, behind one lock
/// that the packet path takes only to make a block (or for the fraud guard, when it is on):
/// clean packets never touch it.
pub struct Ledger {
    pub(super) cfg: Config,
    pub(super) table: BlockTable,
    pub(super) lists: Lists,
    /// The PBX's addresses: one list, shared with the packet path, which reads it without the
    /// ledger's lock.
    pub(super) upstream: std::sync::Arc<arc_swap::ArcSwap<Vec<IpAddr>>>,
    pub(super) strikes: LruCache<IpNet, Strike>,
    pub(super) events: Vec<Event>,
    /// The lists changed since the gate's policy was last published (restore batches many
    /// changes; see [`Ledger::sync_gate`]).
    pub(super) lists_dirty: bool,
    pub(super) fraud: fraud::FraudGuard,
    pub(super) feeds: crate::feeds::list::FeedList,
    /// A copy of `feeds` for lock-free lookups on the packet path, replaced when it changes.
    pub(super) feed_copy: std::sync::Arc<arc_swap::ArcSwap<crate::feeds::list::FeedList>>,
    /// Cluster-wide counts (disabled on a single node); see [`crate::cluster_count`].
    pub(super) shared: crate::cluster_count::SharedCounts,
}

impl Ledger {
    pub fn new(cfg: &Config, now: Millis) -> Ledger {
        let cap = cfg.protection.tracked_sources;
        let mut l = Ledger {
            cfg: cfg.clone(),
            table: BlockTable::new(cfg.protection.max_blocks),
            lists: Lists::default(),
            upstream: Default::default(),
            strikes: LruCache::new(nonzero(cap)),
            events: Vec::new(),
            lists_dirty: false,
            fraud: fraud::FraudGuard::new(&cfg.fraud, rand::random()),
            feeds: crate::feeds::list::FeedList::new(cfg.feeds.max_entries),
            feed_copy: Default::default(),
            shared: crate::cluster_count::SharedCounts::disabled(),
        };
        l.lists
            .replace_config(ListKind::Whitelist, &cfg.lists.whitelist, now);
        l.lists
            .replace_config(ListKind::Blacklist, &cfg.lists.blacklist, now);
        l.publish_policy();
        l
    }

    /// Count REGISTER failures and INVITEs per source across the cluster through `shared`.
    pub(super) fn set_shared_counts(&mut self, shared: crate::cluster_count::SharedCounts) {
        self.shared = shared;
    }

    /// The cluster-wide counts handle (disabled on a single node), for the TFTP guard and
    /// `/metrics`.
    pub fn shared_counts(&self) -> &crate::cluster_count::SharedCounts {
        &self.shared
    }

    /// The lock-free drop gate this engine keeps in step with its block table, lists and
    /// policy: the packet path asks it before taking the engine's lock.
    pub fn gate(&self) -> &std::sync::Arc<Gate> {
        self.table.gate()
    }

    /// Publish the lists and policy to the gate if a batch of changes ([`Ledger::restore`])
    /// left them unpublished. Cheap when nothing changed; the node calls it after every engine
    /// entry.
    pub fn sync_gate(&mut self) {
        if self.lists_dirty {
            self.publish_policy();
        }
    }

    /// Copy the lists and the policy that reads them into the gate. O(list entries): lists
    /// change at operator pace (and the automatic blacklist is bounded).
    pub(crate) fn publish_policy(&mut self) {
        self.lists_dirty = false;
        let p = &self.cfg.protection;
        self.table.gate().set_policy(Policy {
            lists: self.lists.clone(),
            observe: p.mode == Mode::Observe,
            reply_403: p.blocked_reply == crate::config::BlockedReply::Forbidden,
            ipv6_prefix: p.ipv6_prefix,
        });
    }

    /// Fold the packets the gate dropped into the block rows' hits (for readers of the table).
    pub fn fold_gate_hits(&mut self) {
        self.table.fold_gate_hits();
    }

    /// Apply a reloaded config: thresholds, lists from the file and scanner patterns change;
    /// blocks, strikes and run-time list entries stay.
    pub(super) fn reconfigure(&mut self, cfg: &Config, now: Millis) {
        let cap = cfg.protection.tracked_sources;
        self.table.set_max(cfg.protection.max_blocks);
        self.strikes.resize(nonzero(cap));
        self.fraud.reconfigure(&cfg.fraud);
        self.shared
            .set_periods(crate::cluster_count::Periods::from_config(cfg));
        for kind in [ListKind::Whitelist, ListKind::Blacklist] {
            let nets = match kind {
                ListKind::Whitelist => &cfg.lists.whitelist,
                ListKind::Blacklist => &cfg.lists.blacklist,
            };
            let (added, removed) = self.lists.replace_config(kind, nets, now);
            for net in removed {
                self.events.push(Event::ListRemoved { list: kind, net });
            }
            for net in added {
                let entry = ListEntry {
                    comment: String::new(),
                    added_at: now,
                    source: "config".into(),
                };
                if kind == ListKind::Whitelist {
                    self.unblock_covered(net, UnblockReason::Whitelisted);
                }
                self.events.push(Event::ListAdded {
                    list: kind,
                    net,
                    entry,
                });
            }
        }
        self.cfg = cfg.clone();
        self.publish_policy();
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The PBX's addresses (after name resolution): never blocked, and trusted by the packet
    /// path, which reads the same list.
    pub fn set_upstream(&mut self, ips: Vec<IpAddr>) {
        let ips: Vec<IpAddr> = ips.into_iter().map(canonical_ip).collect();
        self.upstream.store(std::sync::Arc::new(ips));
    }

    pub fn is_upstream(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.upstream.load().contains(&ip)
    }

    pub(super) fn observe(&self) -> bool {
        self.cfg.protection.mode == Mode::Observe
    }

    /// Let the caller record the device (User-Agent) seen from a source for a block made from
    /// a response (responses carry the PBX's Server header, not the phone's UA).
    pub fn note_device(&mut self, key: &BlockKey, device: &str) {
        if let Some(b) = self.table.get_mut(key) {
            if b.device.is_empty() {
                b.device = device.to_string();
            }
        }
    }

    // ---- blocks ---------------------------------------------------------------------------

    /// Remove blocks on `net` (all its port blocks too when `port` is None). Returns them.
    /// The detectors' counters for `net` are the engine's to forget ([`super::Engine::forget`]).
    pub fn unblock(&mut self, net: IpNet, port: Option<u16>) -> Vec<Block> {
        let removed = match port {
            Some(p) => self
                .table
                .remove(&BlockKey::with_port(net, p))
                .into_iter()
                .collect(),
            None => self.table.remove_net(net),
        };
        for b in &removed {
            self.events.push(Event::Unblocked {
                key: b.key,
                kind: b.kind,
                why: UnblockReason::Manual,
            });
        }
        removed
    }

    fn unblock_covered(&mut self, net: IpNet, why: UnblockReason) {
        for b in self.table.remove_net(net) {
            self.events.push(Event::Unblocked {
                key: b.key,
                kind: b.kind,
                why,
            });
        }
    }

    /// Expire blocks whose time is up. Call about once a second.
    /// An operational alert from outside the packet path (a certificate that does not load):
    /// logged, counted and notified like the engine's own.
    pub fn alert(&mut self, kind: BlockType, source: String, message: String) {
        self.events.push(Event::Alert {
            kind,
            source,
            message,
        });
    }

    pub fn tick(&mut self, now: Millis) {
        self.fraud_tick(now);
        for b in self.table.expire(now) {
            self.events.push(Event::Unblocked {
                key: b.key,
                kind: b.kind,
                why: UnblockReason::Expired,
            });
        }
    }

    pub fn blocks(&self) -> impl Iterator<Item = &Block> {
        self.table.iter()
    }

    pub fn block_table(&self) -> &BlockTable {
        &self.table
    }

    /// Is this source blocked (for the TFTP relay and other guards sharing the table)?
    pub fn is_blocked(&mut self, now: Millis, src: SocketAddr) -> bool {
        self.table
            .check(now, src, self.cfg.protection.ipv6_prefix)
            .is_some()
            || (self.lists.blacklisted(src.ip()).is_some() && !self.observe())
    }

    pub fn is_whitelisted(&self, ip: IpAddr) -> bool {
        self.lists.is_whitelisted(ip) || self.is_upstream(ip)
    }

    // ---- lists ---------------------------------------------------------------------------

    pub fn lists(&self) -> &Lists {
        &self.lists
    }

    pub fn list_add(
        &mut self,
        now: Millis,
        list: ListKind,
        net: IpNet,
        comment: &str,
        source: &str,
    ) -> ListEntry {
        let net = net.trunc();
        let entry = ListEntry {
            comment: clip(comment),
            added_at: now,
            source: source.to_string(),
        };
        self.lists.add(list, net, entry.clone());
        if list == ListKind::Whitelist {
            self.unblock_covered(net, UnblockReason::Whitelisted);
        }
        self.publish_policy();
        self.events.push(Event::ListAdded {
            list,
            net,
            entry: entry.clone(),
        });
        entry
    }

    pub fn list_remove(&mut self, list: ListKind, net: IpNet) -> bool {
        let net = net.trunc();
        let removed = self.lists.remove(list, net).is_some();
        if removed {
            self.publish_policy();
            self.events.push(Event::ListRemoved { list, net });
            if list == ListKind::Blacklist {
                // A source that was auto-blacklisted keeps a permanent table entry: drop it too.
                for b in self.table.remove_net(net) {
                    if b.expires_at.is_some() {
                        self.table.insert(b);
                    } else {
                        self.events.push(Event::Unblocked {
                            key: b.key,
                            kind: b.kind,
                            why: UnblockReason::Manual,
                        });
                    }
                }
            }
        }
        removed
    }

    // ---- state exchange ---------------------------------------------------------------------

    /// Take the queued state changes, oldest first.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.events)
    }

    pub fn has_events(&self) -> bool {
        !self.events.is_empty()
    }

    /// Load state saved earlier (at start) or learnt from another node, without queuing events
    /// for it again. Expired blocks are skipped; whitelisted ones too.
    pub fn restore(&mut self, now: Millis, ev: Event) {
        match ev {
            Event::Blocked(mut b) => {
                crate::blocks::evidence::bound(&mut b);
                if !b.is_expired(now)
                    && !self.lists.whitelist_covers(b.key.net)
                    && !self.is_upstream(b.key.net.addr())
                {
                    self.table.insert(b);
                }
            }
            Event::Unblocked { key, .. } => {
                self.table.remove(&key);
            }
            Event::ListAdded { list, net, entry } => {
                self.lists.add(list, net, entry);
                self.lists_dirty = true;
                if list == ListKind::Whitelist {
                    for b in self.table.remove_net(net) {
                        drop(b);
                    }
                }
            }
            Event::ListRemoved { list, net } => {
                self.lists.remove(list, net);
                self.lists_dirty = true;
            }
            Event::Strikes { net, strikes, last } => {
                let s = self.strikes.get_or_insert_mut(net, Strike::default);
                if last >= s.last {
                    *s = Strike {
                        count: strikes,
                        last,
                    };
                }
            }
            Event::Alert { .. } => {}
        }
    }

    /// The strike memory, for persistence snapshots.
    pub fn strikes(&self) -> impl Iterator<Item = (IpNet, u32, Millis)> + '_ {
        self.strikes.iter().map(|(n, s)| (*n, s.count, s.last))
    }

    /// Entries held by the ledger's own bounded maps (strike memory, fraud guard).
    pub fn tracked(&self) -> usize {
        self.strikes.len() + self.fraud.tracked()
    }

    /// The lock-free copy of the feed list the ledger keeps in step.
    pub(super) fn feed_copy(
        &self,
    ) -> std::sync::Arc<arc_swap::ArcSwap<crate::feeds::list::FeedList>> {
        self.feed_copy.clone()
    }

    /// Is `a` blocked or blacklisted right now (for `hep.only = "blocked"`)? No side effects.
    pub fn is_listed(&self, now: Millis, a: SocketAddr) -> bool {
        let net = source_net(a.ip(), self.cfg.protection.ipv6_prefix);
        self.table
            .get(&BlockKey::whole(net))
            .or_else(|| self.table.get(&BlockKey::with_port(net, a.port())))
            .is_some_and(|b| !b.is_expired(now))
            || self.lists.blacklisted(a.ip()).is_some()
    }
}
