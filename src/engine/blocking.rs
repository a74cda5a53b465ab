//! Making blocks: escalation by strikes, the automatic blacklist (bounded, and aggregated into
//! prefixes where the operator allows), and admission into the bounded block table.
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::time::Duration;

use ipnet::IpNet;

use super::{push_evidence, Detection, Ledger, Strike};
use crate::blocks::evidence::Packet;
use crate::blocks::table::{clip, Admit};
use crate::blocks::{Block, BlockKey, BlockType, Event, ListEntry, ListKind, UnblockReason};
use crate::clock::Millis;

/// The `source` of automatic blacklist entries.
const AUTO: &str = "auto";

impl Ledger {
    /// Make (or refresh) a block. Returns true when a new block was made. Never blocks the
    /// upstream or a whitelisted source. Repeat blocks of the same source last longer; after
    /// `register.block_threshold` dynamic blocks the source joins the static blacklist (up to
    /// `protection.max_auto_blacklist` entries, aggregated per `protection.aggregate_*`).
    pub fn block(&mut self, now: Millis, d: Detection, device: &str) -> bool {
        self.block_with(now, d, device, Vec::new())
    }

    /// [`Ledger::block`] with the packets captured from the source, for the block's ladder.
    pub fn block_with(
        &mut self,
        now: Millis,
        d: Detection,
        device: &str,
        packets: Vec<Packet>,
    ) -> bool {
        if self.is_upstream(d.key.net.addr()) || self.lists.whitelist_covers(d.key.net) {
            return false;
        }
        let enforced = !self.observe();
        if let Some(b) = self.table.get_mut(&d.key) {
            if !b.is_expired(now) && (b.enforced || !enforced) {
                for e in d.evidence {
                    push_evidence(&mut b.evidence, e);
                }
                b.hits += 1;
                return false;
            }
        }
        let p = &self.cfg.protection;
        // The strike this block would be; committed only once the block is made.
        let strike = {
            let mut s = self.strikes.peek(&d.key.net).copied().unwrap_or_default();
            if s.count > 0 && now.saturating_sub(s.last) > p.strike_memory.as_millis() as Millis {
                s.count = 0;
            }
            if enforced {
                s.count = s.count.saturating_add(1);
                s.last = now;
            }
            s
        };
        let factor = (p.escalation as u64).saturating_pow(strike.count.saturating_sub(1).min(30));
        let duration = d
            .duration
            .saturating_mul(factor.min(u32::MAX as u64) as u32)
            .min(p.max_block_time.max(d.duration));
        let threshold = self.cfg.register.block_threshold;
        let to_blacklist =
            enforced && threshold > 0 && strike.count >= threshold && d.key.port.is_none();
        let device = device.to_string();
        let mut block = Block {
            key: d.key,
            kind: d.kind,
            device,
            reason: d.reason,
            blocked_at: now,
            expires_at: Some(now.saturating_add(duration.as_millis() as Millis)),
            strikes: strike.count.max(1),
            hits: 1,
            evidence: Vec::new(),
            packets,
            enforced,
        };
        for e in d.evidence {
            push_evidence(&mut block.evidence, e);
        }
        let mut listed = false;
        if to_blacklist {
            match self.auto_blacklist(now, d.key.net, block.kind, strike.count) {
                Some(net) if net == d.key.net => {
                    listed = true;
                    block.expires_at = None;
                    block.reason = format!(
                        "{} ({} blocks: now on the static blacklist)",
                        block.reason, strike.count
                    );
                }
                // Folded into a prefix entry, which carries the table row.
                Some(_) => return self.commit_strike(d.key.net, strike),
                None => {
                    block.reason = format!(
                        "{} ({} blocks; the automatic blacklist is full)",
                        block.reason, strike.count
                    );
                }
            }
        }
        match self.table.insert(block.clone()) {
            Admit::Stored => {}
            Admit::Evicted(ev) => self.events.push(Event::Unblocked {
                key: ev.key,
                kind: ev.kind,
                why: UnblockReason::Evicted,
            }),
            // Full of costlier blocks: the blacklist entry (if any) still enforces it.
            Admit::Refused(_) => {
                return listed && self.commit_strike(d.key.net, strike);
            }
        }
        self.commit_strike(d.key.net, strike);
        self.events.push(Event::Blocked(block));
        true
    }

    fn commit_strike(&mut self, net: IpNet, strike: Strike) -> bool {
        self.strikes.put(net, strike);
        self.events.push(Event::Strikes {
            net,
            strikes: strike.count,
            last: strike.last,
        });
        true
    }

    /// Put `net` on the static blacklist after `strikes` blocks. Returns the entry that now
    /// covers it: `net` itself, or the prefix it was aggregated into; `None` when the
    /// automatic blacklist is full (`protection.max_auto_blacklist`), so permanent entries an
    /// attacker can cause, possibly for spoofed sources, stay bounded.
    fn auto_blacklist(
        &mut self,
        now: Millis,
        net: IpNet,
        kind: BlockType,
        strikes: u32,
    ) -> Option<IpNet> {
        if let Some(prefix) = self.aggregate_into(now, net) {
            return Some(prefix);
        }
        let autos = self
            .lists
            .entries(ListKind::Blacklist)
            .iter()
            .filter(|(_, e)| e.source == AUTO)
            .count();
        let p = &self.cfg.protection;
        if autos >= p.max_auto_blacklist.min(p.max_blocks / 2) {
            return None;
        }
        let entry = ListEntry {
            comment: format!("auto: {strikes} blocks, last {kind}"),
            added_at: now,
            source: AUTO.into(),
        };
        self.list_insert(net, entry);
        Some(net)
    }

    fn list_insert(&mut self, net: IpNet, entry: ListEntry) {
        self.lists.add(ListKind::Blacklist, net, entry.clone());
        self.publish_policy();
        self.events.push(Event::ListAdded {
            list: ListKind::Blacklist,
            net,
            entry,
        });
    }

    /// The aggregation prefix for `net` (`protection.aggregate_ipv4` / `aggregate_ipv6`), if
    /// aggregation is on and the prefix is wider than `net`.
    fn aggregate_prefix(&self, net: IpNet) -> Option<IpNet> {
        let p = &self.cfg.protection;
        let len = match net {
            IpNet::V4(_) => p.aggregate_ipv4,
            IpNet::V6(_) => p.aggregate_ipv6,
        };
        if len == 0 || len >= net.prefix_len() {
            return None;
        }
        IpNet::new(net.addr(), len).ok().map(|n| n.trunc())
    }

    /// When `net` and the automatic entries already in its aggregation prefix reach
    /// `protection.aggregate_after`, replace them by the prefix. Never over a whitelisted
    /// address or the upstream; entries the operator added are left alone. Returns the prefix
    /// when it now covers `net`.
    fn aggregate_into(&mut self, now: Millis, net: IpNet) -> Option<IpNet> {
        let prefix = self.aggregate_prefix(net)?;
        let after = self.cfg.protection.aggregate_after as usize;
        if after == 0
            || self.lists.whitelist_covers(prefix)
            || self.upstream.load().iter().any(|ip| prefix.contains(ip))
        {
            return None;
        }
        let members: Vec<IpNet> = self
            .lists
            .entries(ListKind::Blacklist)
            .into_iter()
            .filter(|(n, e)| e.source == AUTO && *n != prefix && prefix.contains(n))
            .map(|(n, _)| n)
            .collect();
        if members.len() + 1 < after {
            return None;
        }
        for m in &members {
            self.lists.remove(ListKind::Blacklist, *m);
            self.events.push(Event::ListRemoved {
                list: ListKind::Blacklist,
                net: *m,
            });
            if let Some(b) = self.table.remove(&BlockKey::whole(*m)) {
                self.events.push(Event::Unblocked {
                    key: b.key,
                    kind: b.kind,
                    why: UnblockReason::Aggregated,
                });
            }
        }
        let n = members.len() + 1;
        let entry = ListEntry {
            comment: format!("auto: {n} blacklisted sources aggregated"),
            added_at: now,
            source: AUTO.into(),
        };
        self.list_insert(prefix, entry);
        let block = Block {
            key: BlockKey::whole(prefix),
            kind: BlockType::Blacklist,
            device: String::new(),
            reason: format!("{n} sources in {prefix} reached the static blacklist: aggregated"),
            blocked_at: now,
            expires_at: None,
            strikes: 1,
            hits: 0,
            evidence: vec![clip(&format!("last: {net}"))],
            packets: Vec::new(),
            enforced: true,
        };
        // The table row is for the operator's view; the list entry enforces.
        if let Admit::Evicted(ev) = self.table.insert(block.clone()) {
            self.events.push(Event::Unblocked {
                key: ev.key,
                kind: ev.kind,
                why: UnblockReason::Evicted,
            });
        }
        if self.table.get(&block.key).is_some() {
            self.events.push(Event::Blocked(block));
        }
        Some(prefix)
    }

    /// A manual block from the operator.
    pub fn manual_block(
        &mut self,
        now: Millis,
        key: BlockKey,
        duration: Option<Duration>,
        reason: &str,
    ) -> Result<Block, String> {
        if self.is_upstream(key.net.addr()) {
            return Err(format!(
                "{} is the upstream PBX and cannot be blocked",
                key.ip_text()
            ));
        }
        if self.lists.whitelist_covers(key.net) {
            return Err(format!(
                "{} is whitelisted; remove it from the whitelist first",
                key.ip_text()
            ));
        }
        let block = Block {
            key,
            kind: BlockType::Manual,
            device: String::new(),
            reason: if reason.is_empty() {
                "blocked by the operator".into()
            } else {
                clip(reason)
            },
            blocked_at: now,
            expires_at: duration.map(|d| now.saturating_add(d.as_millis() as Millis)),
            strikes: self.strikes.peek(&key.net).map_or(0, |s| s.count),
            hits: 0,
            evidence: Vec::new(),
            packets: Vec::new(),
            enforced: true,
        };
        match self.table.insert(block.clone()) {
            Admit::Stored => {}
            Admit::Evicted(ev) => self.events.push(Event::Unblocked {
                key: ev.key,
                kind: ev.kind,
                why: UnblockReason::Evicted,
            }),
            Admit::Refused(_) => {
                return Err("the block table is full of permanent and operator blocks".into())
            }
        }
        self.events.push(Event::Blocked(block.clone()));
        Ok(block)
    }
}

#[cfg(test)]
mod tests;
