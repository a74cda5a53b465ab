//! Start-up: load the store into the engine before any SIP socket serves, and delete the rows
//! that no longer apply (blocks that expired while the proxy was down, sources since
//! whitelisted, strikes older than `protection.strike_memory`).

use std::collections::HashSet;

use crate::blocks::{BlockKey, Event};
use crate::node::Node;

use super::store::{StateError, Store};

/// What a restore loaded and dropped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    pub blocks: usize,
    pub list_entries: usize,
    pub strikes: usize,
    /// Block rows deleted because they expired while the proxy was down (or no longer apply).
    pub stale_blocks: usize,
    pub stale_strikes: usize,
    pub undecodable: usize,
}

/// Feed everything in `store` to the node's engine ([`crate::engine::Engine::restore`], which
/// queues no events), lists first so a whitelisted source's old block stays gone.
pub fn restore(node: &Node, store: &Store) -> Result<Restored, StateError> {
    let snap = store.load()?;
    let now = node.now();
    let memory = node.config().protection.strike_memory.as_millis() as u64;
    let strikes_before = now.saturating_sub(memory);
    let mut out = Restored {
        list_entries: snap.lists.len(),
        undecodable: snap.undecodable,
        ..Restored::default()
    };
    let stored: Vec<BlockKey> = snap.blocks.iter().map(|b| b.key).collect();
    node.with_engine(|e| {
        for (list, net, entry) in snap.lists {
            e.restore(now, Event::ListAdded { list, net, entry });
        }
        for b in snap.blocks {
            e.restore(now, Event::Blocked(b));
        }
        // Oldest first, so the newest survive if the strike memory is smaller than the file.
        for (net, strikes, last) in snap.strikes {
            if last >= strikes_before {
                out.strikes += 1;
                e.restore(now, Event::Strikes { net, strikes, last });
            }
        }
    });
    for name in crate::engine::SNAPSHOT_NAMES {
        if let Some(bytes) = store.snapshot(name)? {
            if !node.with_engine(|e| e.restore_snapshot(now, name, &bytes)) {
                out.undecodable += 1;
            }
        }
    }
    let kept: HashSet<BlockKey> = node.inspect(|e| e.blocks().map(|b| b.key).collect());
    let stale: Vec<BlockKey> = stored.into_iter().filter(|k| !kept.contains(k)).collect();
    out.blocks = kept.len();
    let (stale_blocks, stale_strikes) = store.forget(&stale, strikes_before)?;
    out.stale_blocks = stale_blocks;
    out.stale_strikes = stale_strikes;
    Ok(out)
}
