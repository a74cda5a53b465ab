//! The embedded store at `state.path` (redb): run-time list entries, blocks with their expiry and
//! strike counts. One write transaction per batch of events, committed with
//! `Durability::Immediate` (fsync) before anything about them is logged or acknowledged.
//!
//! Layout, one table per kind of row, values as JSON so a row stays readable across versions:
//! - `blocks`: `BlockKey` text (`1.2.3.4`, `1.2.3.4:5062`, `2001:db8::/64`) -> `Block`
//! - `whitelist`, `blacklist`: CIDR text -> `ListEntry` (entries from the config file are not
//!   stored: they come from the file)
//! - `strikes`: source CIDR text -> (count, last strike in unix ms)
//! - `meta`: `schema` -> [`SCHEMA`]

use std::path::{Path, PathBuf};

use crate::proxy::keys::StoredKeys;
use ipnet::IpNet;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};

use crate::blocks::{Block, BlockKey, Event, ListEntry, ListKind};
use crate::clock::Millis;

const BLOCKS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("blocks");
const WHITELIST: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("whitelist");
const BLACKLIST: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("blacklist");
const STRIKES: TableDefinition<'_, &str, (u32, u64)> = TableDefinition::new("strikes");
const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
/// The routing key (flow tokens, Via branches): `current` (16 bytes), `previous` (16 bytes +
/// retirement time, unix ms, big-endian).
const ROUTING_KEYS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("routing_keys");
/// Whole-state snapshots of detectors, JSON: `fraud` (calls up and toll-fraud counters),
/// `feeds` (threat-feed entries and pull positions). Written every few seconds and at stop.
const SNAPSHOTS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");

/// The layout version this build writes and reads. A file written by a newer build is refused
/// rather than half-read.
pub const SCHEMA: u64 = 1;

/// Where list entries from the config file come from; they are never stored.
const CONFIG_SOURCE: &str = "config";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error(
        "state.path {}: the state store is in use by another process (is another sipwarden \
         running on the same file?)",
        path.display()
    )]
    Locked { path: PathBuf },
    #[error("state.path {}: cannot open the state store: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Deliberately fatal: starting empty would silently drop the operator's lists and blocks.
    #[error(
        "state.path {}: the state store is unreadable ({detail}). Refusing to start without the \
         saved blocks and lists; if the file is damaged, move it aside to start with empty state \
         (the lists in the config file still apply)",
        path.display()
    )]
    Damaged { path: PathBuf, detail: String },
    #[error(
        "state.path {}: written by a newer sipwarden (schema {found}, this build reads {SCHEMA})",
        path.display()
    )]
    Schema { path: PathBuf, found: u64 },
    #[error("state.path {}: {what}: {error}", path.display())]
    Db {
        path: PathBuf,
        what: &'static str,
        error: Box<redb::Error>,
    },
}

/// Everything the store holds, decoded.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub lists: Vec<(ListKind, IpNet, ListEntry)>,
    pub blocks: Vec<Block>,
    /// (source, strikes, last strike), oldest first.
    pub strikes: Vec<(IpNet, u32, Millis)>,
    /// Rows that could not be decoded (left in place, reported).
    pub undecodable: usize,
}

/// What a commit found, for the cluster filter.
#[derive(Debug, Default)]
pub struct Applied {
    /// `ListRemoved` events whose CIDR had no stored row: entries from the config file, which
    /// are this node's own business and not shared.
    pub unstored_removals: Vec<(ListKind, IpNet)>,
}

pub struct Store {
    db: Database,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn list_table(list: ListKind) -> TableDefinition<'static, &'static str, &'static [u8]> {
    match list {
        ListKind::Whitelist => WHITELIST,
        ListKind::Blacklist => BLACKLIST,
    }
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StateError {
    let path = path.to_path_buf();
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StateError::Locked { path },
        redb::DatabaseError::Storage(redb::StorageError::Io(error))
            if error.kind() != std::io::ErrorKind::InvalidData =>
        {
            StateError::Io { path, error }
        }
        e => StateError::Damaged {
            path,
            detail: e.to_string(),
        },
    }
}

/// Run `f`, turning a panic into [`StateError::Damaged`]. redb 3.1 asserts on some damaged
/// files (one cut short panics in `PageManager::new`) instead of returning an error; at start-up
/// that must be the clear refusal, not a crash.
fn guarded<T>(path: &Path, f: impl FnOnce() -> Result<T, StateError>) -> Result<T, StateError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the store library panicked".into());
            Err(StateError::Damaged {
                path: path.to_path_buf(),
                detail,
            })
        }
    }
}

fn block_key(key: &BlockKey) -> String {
    key.to_string()
}

/// Page cache of the state store.
pub const STORE_CACHE_BYTES: usize = 16 << 20;

impl Store {
    /// Open (or create) the store. A file that is not a readable store is an error: the caller
    /// refuses to start rather than silently dropping the operator's lists and blocks.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StateError> {
        let path = path.as_ref().to_path_buf();
        guarded(&path, || {
            // redb's default page cache is 1 GiB; the store holds at most `max_blocks` small
            // rows, so a bounded cache keeps memory flat under a flood of new blocks.
            let db = Database::builder()
                .set_cache_size(STORE_CACHE_BYTES)
                .create(&path)
                .map_err(|e| open_error(&path, e))?;
            let store = Store {
                db,
                path: path.clone(),
            };
            store.init()?;
            Ok(store)
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn err<E: Into<redb::Error>>(&self, what: &'static str) -> impl FnOnce(E) -> StateError + '_ {
        move |e| StateError::Db {
            path: self.path.clone(),
            what,
            error: Box::new(e.into()),
        }
    }

    /// Create the tables and check the schema version.
    fn init(&self) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(self.err("begin"))?;
        {
            for t in [BLOCKS, WHITELIST, BLACKLIST] {
                tx.open_table(t).map_err(self.err("open table"))?;
            }
            tx.open_table(STRIKES).map_err(self.err("open table"))?;
            tx.open_table(ROUTING_KEYS)
                .map_err(self.err("open table"))?;
            tx.open_table(SNAPSHOTS).map_err(self.err("open table"))?;
            let mut meta = tx.open_table(META).map_err(self.err("open table"))?;
            let found = meta
                .get("schema")
                .map_err(self.err("read schema"))?
                .map(|v| v.value());
            match found {
                Some(v) if v > SCHEMA => {
                    return Err(StateError::Schema {
                        path: self.path.clone(),
                        found: v,
                    })
                }
                Some(_) => {}
                None => {
                    meta.insert("schema", SCHEMA)
                        .map_err(self.err("write schema"))?;
                }
            }
        }
        tx.commit().map_err(self.err("commit"))
    }

    /// A snapshot saved by [`Store::set_snapshot`], if any.
    pub fn snapshot(&self, name: &str) -> Result<Option<Vec<u8>>, StateError> {
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        let t = tx.open_table(SNAPSHOTS).map_err(self.err("open table"))?;
        let v = t.get(name).map_err(self.err("read snapshot"))?;
        Ok(v.map(|v| v.value().to_vec()))
    }

    /// Replace the snapshots named, in one durable transaction.
    pub fn set_snapshots(&self, snaps: &[(&str, Vec<u8>)]) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(self.err("begin"))?;
        {
            let mut t = tx.open_table(SNAPSHOTS).map_err(self.err("open table"))?;
            for (name, bytes) in snaps {
                t.insert(*name, bytes.as_slice())
                    .map_err(self.err("write snapshot"))?;
            }
        }
        tx.commit().map_err(self.err("commit"))
    }

    /// The routing keys kept by an earlier run, if any.
    pub fn routing_keys(&self) -> Result<Option<StoredKeys>, StateError> {
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        let t = tx
            .open_table(ROUTING_KEYS)
            .map_err(self.err("open table"))?;
        let current = t.get("current").map_err(self.err("read routing key"))?;
        let Some(current) = current.and_then(|v| <[u8; 16]>::try_from(v.value()).ok()) else {
            return Ok(None);
        };
        let previous = t
            .get("previous")
            .map_err(self.err("read routing key"))?
            .and_then(|v| {
                let b = v.value();
                let k = <[u8; 16]>::try_from(b.get(..16)?).ok()?;
                let at = u64::from_be_bytes(b.get(16..24)?.try_into().ok()?);
                Some((k, at))
            });
        Ok(Some(StoredKeys { current, previous }))
    }

    /// Keep the routing keys, durably, before the router uses them.
    pub fn set_routing_keys(&self, k: &StoredKeys) -> Result<(), StateError> {
        let tx = self.db.begin_write().map_err(self.err("begin"))?;
        {
            let mut t = tx
                .open_table(ROUTING_KEYS)
                .map_err(self.err("open table"))?;
            t.insert("current", &k.current[..])
                .map_err(self.err("write routing key"))?;
            match k.previous {
                Some((p, at)) => {
                    let mut v = [0u8; 24];
                    v[..16].copy_from_slice(&p);
                    v[16..].copy_from_slice(&at.to_be_bytes());
                    t.insert("previous", &v[..])
                        .map_err(self.err("write routing key"))?;
                }
                None => {
                    t.remove("previous")
                        .map_err(self.err("write routing key"))?;
                }
            }
        }
        tx.commit().map_err(self.err("commit"))
    }

    /// Read every row.
    pub fn load(&self) -> Result<Snapshot, StateError> {
        guarded(&self.path, || self.load_inner())
    }

    fn load_inner(&self) -> Result<Snapshot, StateError> {
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        let mut snap = Snapshot::default();
        for list in [ListKind::Whitelist, ListKind::Blacklist] {
            let t = tx
                .open_table(list_table(list))
                .map_err(self.err("open table"))?;
            for row in t.iter().map_err(self.err("read lists"))? {
                let (k, v) = row.map_err(self.err("read lists"))?;
                let net = k.value().parse::<IpNet>();
                let entry = serde_json::from_slice::<ListEntry>(v.value());
                match (net, entry) {
                    (Ok(net), Ok(entry)) => snap.lists.push((list, net, entry)),
                    _ => snap.undecodable += 1,
                }
            }
        }
        let t = tx.open_table(BLOCKS).map_err(self.err("open table"))?;
        for row in t.iter().map_err(self.err("read blocks"))? {
            let (_, v) = row.map_err(self.err("read blocks"))?;
            match serde_json::from_slice::<Block>(v.value()) {
                Ok(b) => snap.blocks.push(b),
                Err(_) => snap.undecodable += 1,
            }
        }
        let t = tx.open_table(STRIKES).map_err(self.err("open table"))?;
        for row in t.iter().map_err(self.err("read strikes"))? {
            let (k, v) = row.map_err(self.err("read strikes"))?;
            let (count, last) = v.value();
            match k.value().parse::<IpNet>() {
                Ok(net) => snap.strikes.push((net, count, last)),
                Err(_) => snap.undecodable += 1,
            }
        }
        snap.strikes.sort_by_key(|s| s.2);
        Ok(snap)
    }

    /// Write `events` in one transaction and commit it durably.
    pub fn apply(&self, events: &[Event]) -> Result<Applied, StateError> {
        let mut applied = Applied::default();
        let tx = self.db.begin_write().map_err(self.err("begin"))?;
        {
            let mut blocks = tx.open_table(BLOCKS).map_err(self.err("open table"))?;
            let mut white = tx.open_table(WHITELIST).map_err(self.err("open table"))?;
            let mut black = tx.open_table(BLACKLIST).map_err(self.err("open table"))?;
            let mut strikes = tx.open_table(STRIKES).map_err(self.err("open table"))?;
            for ev in events {
                match ev {
                    Event::Blocked(b) => {
                        // Serializing plain structs of strings and numbers cannot fail.
                        let v = serde_json::to_vec(b).unwrap_or_default();
                        blocks
                            .insert(block_key(&b.key).as_str(), v.as_slice())
                            .map_err(self.err("write block"))?;
                    }
                    Event::Unblocked { key, .. } => {
                        blocks
                            .remove(block_key(key).as_str())
                            .map_err(self.err("delete block"))?;
                    }
                    Event::ListAdded { list, net, entry } => {
                        let t = match list {
                            ListKind::Whitelist => &mut white,
                            ListKind::Blacklist => &mut black,
                        };
                        let k = net.to_string();
                        if entry.source == CONFIG_SOURCE {
                            // The file is the truth for these; an older stored row for the
                            // same CIDR (added at run time) is superseded.
                            t.remove(k.as_str())
                                .map_err(self.err("delete list entry"))?;
                        } else {
                            let v = serde_json::to_vec(entry).unwrap_or_default();
                            t.insert(k.as_str(), v.as_slice())
                                .map_err(self.err("write list entry"))?;
                        }
                    }
                    Event::ListRemoved { list, net } => {
                        let t = match list {
                            ListKind::Whitelist => &mut white,
                            ListKind::Blacklist => &mut black,
                        };
                        let found = t
                            .remove(net.to_string().as_str())
                            .map_err(self.err("delete list entry"))?
                            .is_some();
                        if !found {
                            applied.unstored_removals.push((*list, *net));
                        }
                    }
                    Event::Strikes {
                        net,
                        strikes: n,
                        last,
                    } => {
                        strikes
                            .insert(net.to_string().as_str(), (*n, *last))
                            .map_err(self.err("write strikes"))?;
                    }
                    Event::Alert { .. } => {}
                }
            }
        }
        tx.commit().map_err(self.err("commit"))?;
        Ok(applied)
    }

    /// Delete the given block rows and the strike rows older than `strikes_before`.
    pub fn forget(
        &self,
        blocks: &[BlockKey],
        strikes_before: Millis,
    ) -> Result<(usize, usize), StateError> {
        let tx = self.db.begin_write().map_err(self.err("begin"))?;
        let mut removed_blocks = 0;
        let removed_strikes;
        {
            let mut t = tx.open_table(BLOCKS).map_err(self.err("open table"))?;
            for k in blocks {
                if t.remove(block_key(k).as_str())
                    .map_err(self.err("delete block"))?
                    .is_some()
                {
                    removed_blocks += 1;
                }
            }
            let mut s = tx.open_table(STRIKES).map_err(self.err("open table"))?;
            let before = s.len().map_err(self.err("count strikes"))?;
            s.retain(|_, (_, last)| last >= strikes_before)
                .map_err(self.err("prune strikes"))?;
            removed_strikes =
                before.saturating_sub(s.len().map_err(self.err("count strikes"))?) as usize;
        }
        tx.commit().map_err(self.err("commit"))?;
        Ok((removed_blocks, removed_strikes))
    }

    /// Row counts (blocks, whitelist, blacklist, strikes), for tests and the startup log.
    pub fn counts(&self) -> Result<[u64; 4], StateError> {
        let tx = self.db.begin_read().map_err(self.err("begin read"))?;
        let mut out = [0u64; 4];
        for (i, t) in [BLOCKS, WHITELIST, BLACKLIST].into_iter().enumerate() {
            out[i] = tx
                .open_table(t)
                .map_err(self.err("open table"))?
                .len()
                .map_err(self.err("count"))?;
        }
        out[3] = tx
            .open_table(STRIKES)
            .map_err(self.err("open table"))?
            .len()
            .map_err(self.err("count"))?;
        Ok(out)
    }
}
