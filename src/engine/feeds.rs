//! The engine's side of the threat feeds: the feed list is looked up before parsing, after the
//! whitelist (which always wins); a listed source's first packet puts a FEED block in the table
//! (expiring with the entry) so the operator sees it with its feed, and later packets hit the
//! table in O(1).
#![deny(clippy::string_slice, clippy::indexing_slicing)]

use std::net::SocketAddr;

use ipnet::IpNet;

use crate::blocks::{Block, BlockKey, BlockType, Event};
use crate::clock::Millis;
use crate::feeds::list::{FeedList, Snapshot};

use super::{Ledger, Pre};

impl Ledger {
    /// From `precheck`, after the whitelist: `Some` drops the packet.
    pub(super) fn feed_check(&mut self, now: Millis, src: SocketAddr) -> Option<Pre> {
        let (net, entry) = self.feeds.lookup(now, src.ip())?;
        let feed = entry.feed.to_string();
        let expires = entry.expires;
        let enforced = !self.observe();
        let key = BlockKey::whole(crate::blocks::source_net(
            src.ip(),
            self.cfg.protection.ipv6_prefix,
        ));
        if self.table.get(&key).is_none() {
            let b = Block {
                key,
                kind: BlockType::Feed,
                device: String::new(),
                reason: format!("listed by feed {feed} ({net})"),
                blocked_at: now,
                expires_at: Some(expires),
                strikes: 0,
                hits: 1,
                evidence: vec![format!("feed {feed}: {net}")],
                packets: Vec::new(),
                enforced,
            };
            self.table.insert(b.clone());
            self.events.push(Event::Blocked(b));
        }
        enforced.then_some(Pre::Blocked {
            kind: BlockType::Feed,
            reply_403: false,
        })
    }

    pub fn feeds(&self) -> &FeedList {
        &self.feeds
    }

    /// Apply one feed's pull: entries to add or refresh. Whitelisted and special addresses are
    /// skipped (they are never blocked anyway; keeping them out keeps the list honest).
    pub fn feed_update(
        &mut self,
        now: Millis,
        feed: &str,
        url: &str,
        nets: &[IpNet],
        next_id: Option<u64>,
        error: Option<String>,
    ) -> usize {
        let lifetime = self.cfg.feeds.entry_lifetime.as_millis() as Millis;
        self.feeds.set_max(self.cfg.feeds.max_entries);
        let mut added = 0;
        let mut refused = 0;
        for net in nets {
            if self.lists.whitelist_covers(*net) || self.lists.is_whitelisted(net.addr()) {
                continue;
            }
            if self.feeds.upsert(*net, feed, now, lifetime) {
                added += 1;
            } else {
                refused += 1;
            }
        }
        let s = self.feeds.status_mut(feed, url);
        if next_id.is_some() {
            s.next_id = next_id;
        }
        s.refused += refused;
        match error {
            Some(e) => {
                s.last_error = e;
                s.pulls_failed += 1;
            }
            None => {
                s.pulls_ok += 1;
                s.last_error.clear();
                s.last_update = Some(now);
            }
        }
        self.feeds.expire(now);
        self.feed_copy
            .store(std::sync::Arc::new(self.feeds.clone()));
        added
    }

    pub(super) fn feeds_snapshot(&self) -> Snapshot {
        self.feeds.snapshot()
    }

    pub(super) fn feeds_restore(&mut self, now: Millis, s: Snapshot) {
        self.feeds.set_max(self.cfg.feeds.max_entries);
        self.feeds.restore(now, s);
        self.feed_copy
            .store(std::sync::Arc::new(self.feeds.clone()));
    }
}
