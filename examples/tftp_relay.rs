//! The TFTP relay alone (no SIP, no admin surface), for `tests/interop/tftp.sh` and for trying
//! the guard against a provisioning server by hand:
//!
//! ```text
//! cargo run --release --example tftp_relay -- -c proxy.toml
//! ```
//!
//! Uses the `[tftp]`, `[protection]` and `[lists]` tables of the config. Besides the usual logs
//! it prints one stdout line per block (`BLOCK <source> <TYPE> reason=... evidence=[...]`) and
//! the TFTP counters (`STATS requests=...`) whenever they change, so scripts can grep them.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use sipwarden::blocks::Event;
use sipwarden::config::Config;
use sipwarden::node::Node;
use sipwarden::stats::Stats;

fn stats_line(node: &Node) -> String {
    let s = &node.stats;
    format!(
        "STATS requests={} transfers={} limited={} dropped={} malformed={}",
        Stats::get(&s.tftp_requests),
        Stats::get(&s.tftp_transfers),
        Stats::get(&s.tftp_limited),
        Stats::get(&s.tftp_dropped),
        Stats::get(&s.tftp_malformed),
    )
}

async fn report(node: Arc<Node>, mut events: tokio::sync::mpsc::Receiver<sipwarden::node::Batch>) {
    let mut every = tokio::time::interval(Duration::from_secs(1));
    let mut last = String::new();
    loop {
        tokio::select! {
            batch = events.recv() => {
                let Some(batch) = batch else { return };
                for ev in batch.events {
                    if let Event::Blocked(b) = ev {
                        println!(
                            "BLOCK {} {} device={:?} reason={:?} evidence={:?}",
                            b.key, b.kind, b.device, b.reason, b.evidence
                        );
                    }
                }
                if let Some(ack) = batch.ack {
                    let _ = ack.send(());
                }
            }
            _ = every.tick() => {
                let now = node.now();
                node.with_engine(|e| e.tick(now));
                let line = stats_line(&node);
                if line != last {
                    println!("{line}");
                    last = line;
                }
            }
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut path = PathBuf::from("proxy.toml");
    while let Some(a) = args.next() {
        match a.as_str() {
            "-c" | "--config" => {
                path = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or_else(|| anyhow::anyhow!("-c needs a path"))?;
            }
            other => {
                anyhow::bail!("unknown argument {other:?} (usage: tftp_relay [-c proxy.toml])")
            }
        }
    }
    let cfg = Config::load(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let listen = cfg.tftp.listen;
    let (node, events) = Node::new(cfg);
    let socket = tokio::net::UdpSocket::bind(listen).await?;
    tokio::spawn(report(node.clone(), events));
    sipwarden::net::tftp::run(socket, node.clone(), async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await;
    println!("{}", stats_line(&node));
    Ok(())
}
