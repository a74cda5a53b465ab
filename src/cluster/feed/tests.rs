//! The feed's decisions on hostile input: what a peer may not block or list, and set rows.

use super::*;
use crate::blocks::{BlockKey, BlockType, ListEntry};
use crate::engine::Engine;

const T0: Millis = 1_700_000_000_000;

fn block(ip: &str) -> Block {
    Block {
        key: BlockKey::whole(format!("{ip}/32").parse().unwrap()),
        kind: BlockType::Manual,
        device: String::new(),
        reason: "peer".into(),
        blocked_at: T0,
        expires_at: Some(T0 + 60_000),
        strikes: 1,
        hits: 0,
        evidence: Vec::new(),
        packets: Vec::new(),
        enforced: true,
    }
}

fn engine() -> Engine {
    let mut c = crate::config::Config::default();
    c.lists.whitelist = vec!["192.0.2.0/24".parse().unwrap()];
    let e = Engine::new(&c, T0);
    e.set_upstream(vec!["127.0.0.70".parse().unwrap()]);
    e
}

#[test]
fn peers_cannot_block_the_whitelist_or_the_pbx_or_list_everything() {
    let mut e = engine();
    for ip in ["192.0.2.5", "127.0.0.70"] {
        assert_eq!(
            apply(e.ledger_mut(), T0, Event::Blocked(block(ip))),
            None,
            "{ip}"
        );
    }
    let mut expired = block("203.0.113.9");
    expired.expires_at = Some(T0 - 1);
    assert_eq!(apply(e.ledger_mut(), T0, Event::Blocked(expired)), None);
    let entry = ListEntry {
        comment: String::new(),
        added_at: T0,
        source: "api".into(),
    };
    let all = Event::ListAdded {
        list: ListKind::Blacklist,
        net: "0.0.0.0/0".parse().unwrap(),
        entry: entry.clone(),
    };
    assert_eq!(apply(e.ledger_mut(), T0, all), None);
    // Nor two halves that together cover everything, in either family.
    for half in ["0.0.0.0/1", "128.0.0.0/1", "::/1", "8000::/1"] {
        let ev = Event::ListAdded {
            list: ListKind::Whitelist,
            net: half.parse().unwrap(),
            entry: entry.clone(),
        };
        assert_eq!(apply(e.ledger_mut(), T0, ev), None, "{half}");
    }
    let wl = e.ledger_mut().lists().entries(ListKind::Whitelist);
    assert!(wl.iter().all(|(n, _)| n.prefix_len() >= 8), "{wl:?}");
    assert!(e.ledger_mut().block_table().is_empty());
    assert!(e
        .ledger_mut()
        .lists()
        .entries(ListKind::Blacklist)
        .is_empty());

    let ok = apply(e.ledger_mut(), T0, Event::Blocked(block("203.0.113.9")));
    assert!(matches!(ok, Some(Event::Blocked(_))));
    let added = apply(
        e.ledger_mut(),
        T0,
        Event::ListAdded {
            list: ListKind::Blacklist,
            net: "198.51.100.0/24".parse().unwrap(),
            entry,
        },
    );
    match added {
        Some(Event::ListAdded { entry, .. }) => assert_eq!(entry.source, "cluster"),
        other => panic!("{other:?}"),
    }
    let key = block("203.0.113.9").key;
    let un = Event::Unblocked {
        key,
        kind: BlockType::Manual,
        why: UnblockReason::Manual,
    };
    assert!(apply(e.ledger_mut(), T0, un.clone()).is_some());
    assert_eq!(
        apply(e.ledger_mut(), T0, un),
        None,
        "nothing left to unblock"
    );
}

#[test]
fn set_rows_decode_or_count_as_malformed() {
    let v = Value::Array(vec![
        Value::BulkString(b"a".to_vec()),
        Value::BulkString(b"1".to_vec()),
        Value::Int(3),
    ]);
    assert_eq!(pairs(&v), vec![(&b"a"[..], &b"1"[..])]);
    assert!(pairs(&Value::Nil).is_empty());
    assert_eq!(names(&v).len(), 2);
}
