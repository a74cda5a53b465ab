//! What the cluster keeps in Redis and how it is read back: key names, log entries, stream IDs,
//! hash fields. Everything read here was possibly written by a hostile or broken node, so every
//! decoder returns `None` (counted as malformed by the caller) rather than failing the batch.

use ipnet::IpNet;
use redis::Value;
use serde::{Deserialize, Serialize};

use crate::blocks::{Event, ListKind};
use crate::clock::Millis;

/// The log of changes (a Redis Stream), trimmed by length at every XADD and by age every
/// heartbeat.
pub const LOG_KEY: &str = "sipwarden:log";
/// The current blocks: field = block key, value = the block as JSON.
pub const BLOCKS_KEY: &str = "sipwarden:blocks";
/// Expiry of the fields of [`BLOCKS_KEY`]: member = field, score = `expires_at` (unix ms).
/// Redis 7.0 has no per-field hash expiry (HEXPIRE is 7.4), so a sorted set carries it and
/// every node prunes what is due ([`PRUNE`]). Permanent blocks have no member.
pub const BLOCKS_EXP_KEY: &str = "sipwarden:blocks:exp";
/// The run-time list entries: field = `whitelist 10.0.0.0/8`, value = the entry as JSON.
pub const LISTS_KEY: &str = "sipwarden:lists";
/// Tombstones of operator unblocks and list removals: field = a block key or a list field,
/// value = when (unix ms). Reconciliation does not republish what a tombstone younger than the
/// local copy removed. Kept [`TOMBSTONE_TTL`] (expiry in [`TOMBS_EXP_KEY`]).
pub const TOMBS_KEY: &str = "sipwarden:removed";
pub const TOMBS_EXP_KEY: &str = "sipwarden:removed:exp";
/// A random value set once per Redis dataset: when it changes, Redis lost its data (a restart
/// without persistence, a FLUSHALL) and the stream position a node holds means nothing.
pub const EPOCH_KEY: &str = "sipwarden:epoch";

pub const TOMBSTONE_TTL: Millis = 24 * 3600 * 1000;

/// A log entry larger than this is skipped as malformed. A node writes at most
/// [`MAX_ENTRY_WRITE`], so only a broken or hostile writer reaches it.
pub const MAX_ENTRY: usize = 64 * 1024;
/// The size a node aims for when it packs events into one entry.
pub const MAX_ENTRY_WRITE: usize = 32 * 1024;
/// Node ids and names longer than this are malformed (they key the nodes table).
pub const MAX_NAME: usize = 64;

/// Remove at most 1000 due members of a sorted set (KEYS[2]) and their hash fields (KEYS[1]).
pub const PRUNE: &str =
    "local f = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, 1000) \
if #f > 0 then redis.call('HDEL', KEYS[1], unpack(f)) redis.call('ZREM', KEYS[2], unpack(f)) end \
return #f";

/// A stream entry ID, `ms-seq`, ordered as Redis orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct StreamId(pub u64, pub u64);

impl StreamId {
    pub fn parse(s: &[u8]) -> Option<StreamId> {
        let s = std::str::from_utf8(s).ok()?;
        let (ms, seq) = s.split_once('-')?;
        Some(StreamId(ms.parse().ok()?, seq.parse().ok()?))
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.0, self.1)
    }
}

/// What a heartbeat entry says about its node.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub name: String,
    pub addr: String,
}

/// The body of one log entry.
#[derive(Debug, Clone, PartialEq)]
pub enum Body {
    Events(Vec<Event>),
    Heartbeat(Hello),
}

/// One decoded log entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub id: StreamId,
    pub node: String,
    /// The writer's wall clock when it wrote the entry (unix ms).
    pub sent_at: Millis,
    pub body: Body,
}

/// The XADD field/value pairs of an entry (the ID is Redis's).
pub fn entry_fields(node: &str, sent_at: Millis, body: &Body) -> Vec<(&'static str, Vec<u8>)> {
    let (kind, data) = match body {
        Body::Events(evs) => ("e", serde_json::to_vec(evs).unwrap_or_default()),
        Body::Heartbeat(h) => ("h", serde_json::to_vec(h).unwrap_or_default()),
    };
    vec![
        ("n", node.as_bytes().to_vec()),
        ("t", sent_at.to_string().into_bytes()),
        ("k", kind.as_bytes().to_vec()),
        ("d", data),
    ]
}

/// Pack events into groups whose JSON stays under [`MAX_ENTRY_WRITE`] (one oversized event
/// still gets an entry of its own).
pub fn pack(events: &[Event]) -> Vec<Vec<Event>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut size = 0;
    for ev in events {
        let n = serde_json::to_vec(ev).map(|v| v.len() + 1).unwrap_or(0);
        if !cur.is_empty() && size + n > MAX_ENTRY_WRITE {
            out.push(std::mem::take(&mut cur));
            size = 0;
        }
        size += n;
        cur.push(ev.clone());
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn bulk(v: &Value) -> Option<&[u8]> {
    match v {
        Value::BulkString(b) => Some(b),
        Value::SimpleString(s) => Some(s.as_bytes()),
        _ => None,
    }
}

/// Decode one `[id, [field, value, ...]]` entry. `Err(id)`: the entry is malformed (the ID,
/// when readable, still advances the reader past it).
pub fn decode_entry(v: &Value) -> Result<Entry, Option<StreamId>> {
    let Value::Array(parts) = v else {
        return Err(None);
    };
    let id = parts.first().and_then(bulk).and_then(StreamId::parse);
    let id_or = |_| id;
    let Some(Value::Array(kv)) = parts.get(1) else {
        return Err(id);
    };
    let (mut node, mut sent, mut kind, mut data) = (None, None, None, None);
    for pair in kv.chunks(2) {
        let (Some(k), Some(v)) = (pair.first().and_then(bulk), pair.get(1).and_then(bulk)) else {
            return Err(id);
        };
        match k {
            b"n" => node = Some(v),
            b"t" => sent = Some(v),
            b"k" => kind = Some(v),
            b"d" => data = Some(v),
            _ => {}
        }
    }
    let id = id.ok_or(None)?;
    let node = node
        .filter(|n| !n.is_empty() && n.len() <= MAX_NAME)
        .and_then(|n| std::str::from_utf8(n).ok())
        .ok_or(Some(id))?;
    let sent_at = sent
        .and_then(|t| std::str::from_utf8(t).ok())
        .and_then(|t| t.parse().ok())
        .ok_or(Some(id))?;
    let data = data.filter(|d| d.len() <= MAX_ENTRY).ok_or(Some(id))?;
    let body = match kind {
        Some(b"e") => Body::Events(serde_json::from_slice(data).map_err(id_or)?),
        Some(b"h") => {
            let h: Hello = serde_json::from_slice(data).map_err(id_or)?;
            if h.name.len() > MAX_NAME || h.addr.len() > MAX_NAME {
                return Err(Some(id));
            }
            Body::Heartbeat(h)
        }
        _ => return Err(Some(id)),
    };
    Ok(Entry {
        id,
        node: node.to_string(),
        sent_at,
        body,
    })
}

/// The entries of an XREAD/XRANGE reply, each decoded or not. XREAD answers
/// `[[key, [entries]]]` (nil when nothing came), XRANGE `[entries]`.
pub fn reply_entries(v: &Value) -> Vec<Result<Entry, Option<StreamId>>> {
    let entries = match v {
        Value::Array(streams) => match streams.first() {
            // XREAD: the first element is [key, entries].
            Some(Value::Array(s)) if s.first().and_then(bulk) == Some(LOG_KEY.as_bytes()) => {
                match s.get(1) {
                    Some(Value::Array(e)) => e.as_slice(),
                    _ => &[],
                }
            }
            _ => streams.as_slice(),
        },
        _ => &[],
    };
    entries.iter().map(decode_entry).collect()
}

/// The first entry ID of an XRANGE/XREVRANGE `COUNT 1` reply.
pub fn first_id(v: &Value) -> Option<StreamId> {
    match v {
        Value::Array(e) => e.first().and_then(|e| match e {
            Value::Array(p) => p.first().and_then(bulk).and_then(StreamId::parse),
            _ => None,
        }),
        _ => None,
    }
}

pub fn list_field(list: ListKind, net: IpNet) -> String {
    format!("{} {net}", list.as_str())
}

pub fn parse_list_field(s: &str) -> Option<(ListKind, IpNet)> {
    let (l, n) = s.split_once(' ')?;
    let list = match l {
        "whitelist" => ListKind::Whitelist,
        "blacklist" => ListKind::Blacklist,
        _ => return None,
    };
    Some((list, n.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, kv: &[(&str, &str)]) -> Value {
        let mut f = Vec::new();
        for (k, v) in kv {
            f.push(b(k));
            f.push(b(v));
        }
        Value::Array(vec![b(id), Value::Array(f)])
    }

    #[test]
    fn list_fields_round_trip() {
        let net: IpNet = "2001:db8::/48".parse().unwrap();
        let f = list_field(ListKind::Blacklist, net);
        assert_eq!(f, "blacklist 2001:db8::/48");
        assert_eq!(parse_list_field(&f), Some((ListKind::Blacklist, net)));
        assert_eq!(parse_list_field("greylist 10.0.0.0/8"), None);
        assert_eq!(parse_list_field("whitelist nonsense"), None);
    }

    #[test]
    fn stream_ids_order_numerically() {
        let a = StreamId::parse(b"999-5").unwrap();
        let c = StreamId::parse(b"1000-0").unwrap();
        assert!(a < c);
        assert_eq!(c.to_string(), "1000-0");
        assert_eq!(StreamId::parse(b"1000"), None);
        assert_eq!(StreamId::parse(b"x-1"), None);
    }

    #[test]
    fn entries_round_trip_and_hostile_ones_are_skipped_by_id() {
        let hb = Body::Heartbeat(Hello {
            name: "n1".into(),
            addr: "127.0.0.71:5860".into(),
        });
        let mut kv = Vec::new();
        for (k, v) in entry_fields("abc", 42, &hb) {
            kv.push(Value::BulkString(k.as_bytes().to_vec()));
            kv.push(Value::BulkString(v));
        }
        let good = Value::Array(vec![b("5-1"), Value::Array(kv)]);
        let e = decode_entry(&good).unwrap();
        assert_eq!(
            (e.id, e.node.as_str(), e.sent_at),
            (StreamId(5, 1), "abc", 42)
        );
        assert_eq!(e.body, hb);

        let huge = "x".repeat(MAX_ENTRY + 1);
        let long_node = "n".repeat(MAX_NAME + 1);
        let bad = [
            entry(
                "6-0",
                &[("n", "a"), ("t", "1"), ("k", "e"), ("d", "{not json")],
            ),
            entry("6-1", &[("n", "a"), ("t", "1"), ("k", "e"), ("d", &huge)]),
            entry(
                "6-2",
                &[("n", &long_node), ("t", "1"), ("k", "h"), ("d", "{}")],
            ),
            entry("6-3", &[("n", "a"), ("t", "soon"), ("k", "h"), ("d", "{}")]),
            entry("6-4", &[("n", "a"), ("t", "1"), ("k", "?"), ("d", "[]")]),
            entry(
                "6-5",
                &[
                    ("n", "a"),
                    ("t", "1"),
                    ("k", "e"),
                    ("d", "[{\"Blocked\":1}]"),
                ],
            ),
        ];
        for (i, v) in bad.iter().enumerate() {
            assert_eq!(
                decode_entry(v),
                Err(Some(StreamId(6, i as u64))),
                "entry {i}"
            );
        }
        assert_eq!(decode_entry(&Value::Int(3)), Err(None));
        assert_eq!(decode_entry(&Value::Array(vec![b("junk")])), Err(None));

        let xread = Value::Array(vec![Value::Array(vec![
            b(LOG_KEY),
            Value::Array(vec![good.clone(), Value::Nil, bad[0].clone()]),
        ])]);
        let r = reply_entries(&xread);
        assert_eq!(r.len(), 3);
        assert!(r[0].is_ok());
        assert_eq!(r[1], Err(None));
        assert_eq!(first_id(&Value::Array(vec![good])), Some(StreamId(5, 1)));
        assert!(reply_entries(&Value::Nil).is_empty());
    }

    #[test]
    fn packing_keeps_entries_under_the_write_cap() {
        let ev = Event::ListRemoved {
            list: ListKind::Whitelist,
            net: "10.0.0.0/8".parse().unwrap(),
        };
        let one = serde_json::to_vec(&ev).unwrap().len() + 1;
        let n = 3 * MAX_ENTRY_WRITE / one;
        let groups = pack(&vec![ev; n]);
        assert!(groups.len() >= 3);
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), n);
        for g in &groups {
            assert!(serde_json::to_vec(g).unwrap().len() <= MAX_ENTRY_WRITE);
        }
    }
}
