//! Contention benchmark: N threads (1, then 2) hammering
//! - the drop path: the blocked-source check through the lock-free drop gate as a receive loop
//!   runs it (gate lookup, hit counted in the loop's own `LocalHits` and flushed every 32
//!   packets as after a `recvmmsg` batch, packet and drop counters); once more with every
//!   thread dropping the same single source (a flood: the worst case for shared counters);
//! - the forward path: a clean INVITE from a phone through the whole sans-I/O pipeline
//!   (`pipeline::decide`: gate, parse, route with its edits, one engine entry on the sender's
//!   detector shard), each thread its own phones;
//! - for comparison, the same blocked check behind one shared `Mutex` (how every packet met the
//!   engine before the gate and the shards).
//!
//! Prints throughput per thread for each N and the ratio N=2 / N=1: a path that holds
//! per-thread throughput scales with cores; one behind a shared lock falls.
//!
//! Each thread checks its own 1,024 blocked sources (an attack from many addresses). Every phase
//! is bounded in count (`OPS` per thread) and in time (`PHASE_MAX`). Figures: operations per
//! second of wall time and per second of the thread's own CPU time (from /proc/thread-self,
//! 10 ms resolution), since this machine is shared.
//! Run: `cargo run --release --example contention`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sipwarden::blocks::{source_net, BlockKey, GateVerdict, LocalHits};
use sipwarden::config::{Config, IncomingMode, NatDetection};
use sipwarden::engine::Pre;
use sipwarden::node::Node;
use sipwarden::pipeline::{decide, Work};
use sipwarden::proxy::{Action, Advertised, Flow, Inbound, Keys, Router, RouterConfig};
use sipwarden::stats::{DropReason, Transport};
use sipwarden::wire::Edits;

const OPS: u64 = 4_000_000;

/// Operations per thread: `OPS`, or `CONTENTION_OPS` (rounded up to whole rounds of sources).
fn ops() -> u64 {
    std::env::var("CONTENTION_OPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(OPS)
}
const PHASE_MAX: Duration = Duration::from_secs(6);
const SOURCES: u32 = 1024;

fn source(thread: u32, i: u32) -> SocketAddr {
    let ip = std::net::Ipv4Addr::from(0x0a00_0000 + thread * 0x10000 + i);
    SocketAddr::from((ip, 5060))
}

/// utime + stime of the calling thread, in seconds.
fn thread_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

#[derive(Clone, Copy)]
enum Path {
    Gate,
    GateOneSource,
    Forward,
    MutexBlocked,
}

/// The router as the shipped layout builds it: listening on 192.0.2.10:5060, the PBX on
/// 127.0.0.1:5080 over UDP.
fn router() -> Router {
    let me = Advertised::new("192.0.2.10", 5060);
    let cfg = RouterConfig {
        tls: None,
        udp: Some(me.clone()),
        tcp: None,
        ws: None,
        wss: None,
        aliases: vec![me],
        incoming: IncomingMode::Path,
        nat: NatDetection::Auto,
        keys: Keys::new([3; 16], None),
        sockets: vec![(Transport::Udp, "192.0.2.10:5060".parse().expect("addr"))],
    };
    let pbx = Flow {
        transport: Transport::Udp,
        addr: "127.0.0.1:5080".parse().expect("addr"),
    };
    Router::new(cfg, pbx)
}

/// A phone's INVITE (a new call each time, as a call generator sends them).
fn invite(src: SocketAddr, n: u64) -> Vec<u8> {
    format!(
        "INVITE sip:2000@192.0.2.10 SIP/2.0\r\nVia: SIP/2.0/UDP {src};branch=z9hG4bK-{n}\r\n\
Max-Forwards: 70\r\nFrom: <sip:1000@192.0.2.10>;tag={n}\r\nTo: <sip:2000@192.0.2.10>\r\n\
Call-ID: {n}@bench\r\nCSeq: 1 INVITE\r\nContact: <sip:1000@{src}>\r\n\
User-Agent: bench-phone\r\nContent-Type: application/sdp\r\nContent-Length: 0\r\n\r\n"
    )
    .into_bytes()
}

/// Run `threads` threads on `path`; per-thread (ops/s wall, ops/s CPU), averaged.
fn phase(node: &Arc<Node>, path: Path, threads: u32) -> (f64, f64) {
    let start = Arc::new(std::sync::Barrier::new(threads as usize));
    let lock = Arc::new(parking_lot::Mutex::new(()));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (node, start, lock) = (node.clone(), start.clone(), lock.clone());
            std::thread::spawn(move || {
                // Clean sources live in another /16 than the blocked ones.
                let base = match path {
                    Path::Forward => t + 100,
                    _ => t,
                };
                let srcs: Vec<SocketAddr> = match path {
                    Path::GateOneSource => vec![source(0, 0); SOURCES as usize],
                    _ => (0..SOURCES).map(|i| source(base, i)).collect(),
                };
                // Each phone's INVITEs, made before the clock starts (16 calls per phone).
                let invites: Vec<Vec<u8>> = match path {
                    Path::Forward => (0..SOURCES as u64 * 16)
                        .map(|n| {
                            invite(
                                srcs[(n % u64::from(SOURCES)) as usize],
                                n + u64::from(t) * 1_000_000,
                            )
                        })
                        .collect(),
                    _ => Vec::new(),
                };
                let router = router();
                let (mut edits, mut out) = (Edits::default(), Vec::new());
                let mut local = LocalHits::default();
                start.wait();
                let now = node.now();
                let (t0, c0) = (Instant::now(), thread_cpu());
                let mut done = 0u64;
                let mut blocked = 0u64;
                'outer: while done < ops() {
                    for (i, s) in srcs.iter().enumerate() {
                        let b = match path {
                            Path::Gate | Path::GateOneSource => {
                                node.stats.packet_in(Transport::Udp);
                                let v = node.gate().check_local(now, *s, &mut local);
                                let b = matches!(v, GateVerdict::Blocked { .. });
                                if b {
                                    node.stats.drop(DropReason::Blocked);
                                }
                                if i % 32 == 31 {
                                    local.flush(node.gate());
                                }
                                b
                            }
                            Path::Forward => {
                                let n = (done as usize + i) % invites.len().max(1);
                                let inb = Inbound {
                                    transport: Transport::Udp,
                                    src: *s,
                                };
                                let work = Work {
                                    edits: &mut edits,
                                    out: &mut out,
                                    hits: &mut local,
                                };
                                let d =
                                    decide(&node, &router, 65_535, &inb, &invites[n], work, |_| {
                                        false
                                    });
                                assert!(
                                    matches!(d.map(|d| d.action), Some(Action::Forward { .. })),
                                    "a clean INVITE is forwarded"
                                );
                                false
                            }
                            Path::MutexBlocked => {
                                let _one = lock.lock();
                                matches!(node.engine().precheck(now, *s), Pre::Blocked { .. })
                            }
                        };
                        blocked += u64::from(b);
                    }
                    done += u64::from(SOURCES);
                    if t0.elapsed() > PHASE_MAX {
                        break 'outer;
                    }
                }
                let wall = t0.elapsed().as_secs_f64();
                let cpu = (thread_cpu() - c0).max(0.01);
                let expect_blocked = !matches!(path, Path::Forward);
                assert_eq!(blocked == done, expect_blocked, "verdicts as expected");
                (done as f64 / wall, done as f64 / cpu)
            })
        })
        .collect();
    let r: Vec<(f64, f64)> = handles.into_iter().filter_map(|h| h.join().ok()).collect();
    let n = r.len().max(1) as f64;
    (
        r.iter().map(|x| x.0).sum::<f64>() / n,
        r.iter().map(|x| x.1).sum::<f64>() / n,
    )
}

fn main() {
    let mut cfg = Config::default();
    // Clean sources must not trip the flood limiter during the run.
    cfg.flood.packets_per_second = 1_000_000_000;
    // Nor the INVITE rate limit: every phone here calls 16 times in a burst.
    cfg.invite.rate_limit = 1_000_000_000;
    cfg.invite.burst = 1_000_000_000;
    let cfg = cfg.validate().expect("config");
    let (node, _events) = Node::new(cfg);
    let now = node.now();
    node.with_engine(|e| {
        for t in 0..2 {
            for i in 0..SOURCES {
                let key = BlockKey::whole(source_net(source(t, i).ip(), 64));
                e.manual_block(now, key, None, "bench").expect("block");
            }
            let _ = e.take_events();
        }
    });
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("contention: {OPS} checks per thread (at most {PHASE_MAX:?}), {SOURCES} sources per thread, {cores} cores");
    println!(
        "{:<40} {:>3} {:>16} {:>16}",
        "path", "N", "Mops/s/thread", "Mops/CPU-s/thr"
    );
    for (name, path) in [
        ("gate: blocked sources (lock-free)", Path::Gate),
        ("gate: one source, every thread", Path::GateOneSource),
        ("forward: clean INVITE, whole pipeline", Path::Forward),
        ("one shared Mutex: blocked source", Path::MutexBlocked),
    ] {
        // CONTENTION_ONLY=forward (a word of the path's name) runs that path alone, e.g.
        // under callgrind.
        if let Ok(only) = std::env::var("CONTENTION_ONLY") {
            if !name.contains(only.as_str()) {
                continue;
            }
        }
        let one = phase(&node, path, 1);
        let two = phase(&node, path, 2);
        for (n, r) in [(1, one), (2, two)] {
            println!("{name:<40} {n:>3} {:>16.2} {:>16.2}", r.0 / 1e6, r.1 / 1e6);
        }
        println!(
            "{name:<40} ratio per-thread N=2/N=1: wall {:.2}, CPU {:.2}",
            two.0 / one.0,
            two.1 / one.1
        );
    }
}
