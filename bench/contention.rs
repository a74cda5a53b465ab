//! Contention benchmark: N threads (1, then 2) hammering the blocked-source check, once
//! through the lock-free drop gate as a receive loop runs it (gate lookup, hit counted in the
//! loop's own `LocalHits` and flushed every 32 packets as after a `recvmmsg` batch, packet and
//! drop counters), once more with every thread dropping the same single source (a flood: the
//! worst case for shared counters), and once through the engine's
//! `Mutex` (`Node::with_engine(precheck)`, the path every packet took before the gate), plus
//! the engine path that clean packets still take. Prints throughput per thread for each N and
//! the ratio N=2 / N=1: a path that holds per-thread throughput scales with cores; one behind a
//! shared lock falls.
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
use sipwarden::config::Config;
use sipwarden::engine::Pre;
use sipwarden::node::Node;
use sipwarden::stats::{DropReason, Transport};

const OPS: u64 = 4_000_000;
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
    MutexBlocked,
    EngineClean,
}

/// Run `threads` threads on `path`; per-thread (ops/s wall, ops/s CPU), averaged.
fn phase(node: &Arc<Node>, path: Path, threads: u32) -> (f64, f64) {
    let start = Arc::new(std::sync::Barrier::new(threads as usize));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (node, start) = (node.clone(), start.clone());
            std::thread::spawn(move || {
                // Clean sources live in another /16 than the blocked ones.
                let base = match path {
                    Path::EngineClean => t + 100,
                    _ => t,
                };
                let srcs: Vec<SocketAddr> = match path {
                    Path::GateOneSource => vec![source(0, 0); SOURCES as usize],
                    _ => (0..SOURCES).map(|i| source(base, i)).collect(),
                };
                let mut local = LocalHits::default();
                start.wait();
                let now = node.now();
                let (t0, c0) = (Instant::now(), thread_cpu());
                let mut done = 0u64;
                let mut blocked = 0u64;
                'outer: while done < OPS {
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
                            Path::MutexBlocked | Path::EngineClean => matches!(
                                node.with_engine(|e| e.precheck(now, *s)),
                                Pre::Blocked { .. }
                            ),
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
                let expect_blocked = !matches!(path, Path::EngineClean);
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
        ("engine Mutex: blocked source (before)", Path::MutexBlocked),
        ("engine Mutex: clean source precheck", Path::EngineClean),
    ] {
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
