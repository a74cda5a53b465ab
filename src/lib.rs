//! sipwarden: a SIP security proxy that stands in front of a PBX, forwards clean traffic both
//! ways and blocks attackers itself.
//!
//! # Layout
//! - [`config`]: `proxy.toml`, strictly parsed and validated once.
//! - [`wire`]: the SIP wire format: zero-copy scan, framing, splice edits. No I/O.
//! - [`proxy`]: stateless RFC 3261 §16.11 routing decisions (Via, Record-Route, Path, flows):
//!   authenticated branches, flow tokens under a durable routing key, NAT detection.
//! - [`pipeline`]: one received message in, what to send out: gate, parse, route, one engine
//!   entry. Sans-I/O; `net` only receives and sends.
//! - [`engine`]: the protection decisions, sans-I/O: one verdict per packet, from detectors
//!   sharded by source and one block ledger a clean packet never locks.
//! - [`blocks`]: the block table, white- and blacklists, state events, and the lock-free gate
//!   the packet path checks before anything else.
//! - [`feeds`]: threat-feed clients (APIBAN, plain address lists).
//! - [`state`]: the state task: durable store (redb), restore at start.
//! - [`cluster`]: block sharing between nodes through Redis.
//! - [`cluster_count`]: cluster-wide counting (REGISTER failures, INVITE and TFTP rates).
//! - [`hep`]: HEP v3 export of every SIP message to sngrep or Homer (pure encoder, bounded queue).
//! - [`net`]: sockets: binding policy, UDP, TCP, TFTP relay, upstream resolution, what the
//!   router advertises, the once-a-second sweep.
//! - [`tftp`]: the TFTP codec and the provisioning guard's decisions (sans-I/O).
//! - [`admin`]: HTTP API, dashboard, metrics, CLI client.
//! - [`reload`]: config reload on SIGHUP or from the API, checked against what is running.
//! - [`supervise`]: restarts a listener task that ended, counted, with `/healthz` failing meanwhile.
//! - [`server`]: the wiring of a node: binds, builds the shared state, starts every task.
//! - [`stats`]: the node's counter model, and the one snapshot `/metrics`, `/api/stats` and the
//!   CLI all render.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod blocks;
pub mod cli;
pub mod clock;
pub mod cluster;
pub mod cluster_count;
pub mod config;
pub mod engine;
pub mod feeds;
pub mod geoip;
pub mod hep;
pub mod net;
pub mod node;
pub mod notify;
pub mod pipeline;
pub mod proxy;
pub mod reload;
pub mod server;
pub mod state;
pub mod stats;
pub mod supervise;
#[cfg(test)]
pub(crate) mod test_util;
pub mod tftp;
pub mod util;
pub mod wire;
