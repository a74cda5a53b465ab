//! Durability: state survives a restart and a `kill -9` of the real binary, blocks that expired
//! while the proxy was down stay gone, a reload keeps state and calls, an unreadable state file
//! stops the start, and blocks are shared between nodes through a real Redis.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use sipwarden::blocks::{BlockKey, BlockType, ListKind};
use sipwarden::config::Config;
use sipwarden::engine::Detection;
use sipwarden::node::Node;
use sipwarden::server;
use sipwarden::state::Store;

use crate::harness::*;

fn net(s: &str) -> IpNet {
    sipwarden::blocks::parse_net(s).unwrap()
}

/// Blocks (key -> kind, expiry, strikes, reason, evidence), lists and strikes, comparable.
type View = (
    BTreeMap<String, (BlockType, Option<u64>, u32, String, Vec<String>)>,
    Vec<(ListKind, String, String, u64, String)>,
    BTreeMap<String, (u32, u64)>,
);

fn view(node: &Node) -> View {
    node.inspect(|e| {
        let blocks = e
            .blocks()
            .map(|b| {
                (
                    b.key.to_string(),
                    (
                        b.kind,
                        b.expires_at,
                        b.strikes,
                        b.reason.clone(),
                        b.evidence.clone(),
                    ),
                )
            })
            .collect();
        let mut lists = Vec::new();
        for kind in [ListKind::Whitelist, ListKind::Blacklist] {
            for (n, en) in e.lists().entries(kind) {
                // Config entries are re-read from the file at each start: their time is new.
                let at = if en.source == "config" {
                    0
                } else {
                    en.added_at
                };
                lists.push((kind, n.to_string(), en.comment, at, en.source));
            }
        }
        lists.sort_by(|a, b| (a.0 as u8, &a.1).cmp(&(b.0 as u8, &b.1)));
        let strikes = e
            .strikes()
            .map(|(n, c, l)| (n.to_string(), (c, l)))
            .collect();
        (blocks, lists, strikes)
    })
}

fn state_path(dir: &tempfile::TempDir) -> String {
    dir.path().join("state.db").display().to_string()
}

/// Poll `f` every 20 ms for up to `secs`.
async fn eventually(secs: u64, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

fn options_from(n: u32, ua: &str) -> String {
    request(
        "OPTIONS",
        "sip:100@pbx.test",
        "UDP 10.9.9.9:5060",
        &format!("z9hG4bKdur{n}"),
        "100",
        "100",
        &format!("dur{n}"),
        1,
        "",
    )
    .replace("TestPhone/1.0", ua)
}

// ---- (a) in-process restart ------------------------------------------------------------

#[tokio::test]
async fn blocks_lists_and_strikes_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(&dir);
    let pbx = Ua::bind("127.0.0.1").await;
    let p = start(pbx.addr, |c| {
        c.state.path = path.clone();
        c.lists.blacklist = vec![net("203.0.113.0/24")];
    })
    .await;
    let node = p.node();
    let now = node.now();
    let hour = Some(Duration::from_secs(3600));
    for (key, d) in [
        (BlockKey::whole(net("192.0.2.10")), hour),
        (BlockKey::whole(net("192.0.2.11")), None),
        (BlockKey::with_port(net("192.0.2.12"), 5062), hour),
        (BlockKey::whole(net("2001:db8:1:2::/64")), hour),
        (BlockKey::whole(net("127.0.0.9")), hour),
    ] {
        node.with_engine_durable(|e| e.manual_block(now, key, d, "operator").unwrap())
            .await
            .unwrap();
    }
    node.with_engine_durable(|e| {
        e.list_add(
            now,
            ListKind::Whitelist,
            net("10.20.0.0/16"),
            "office",
            "api",
        );
        e.list_add(now, ListKind::Blacklist, net("198.51.100.0/24"), "", "api");
    })
    .await
    .unwrap();
    // A dynamic block with strikes and evidence, as a detector makes it.
    let made = node
        .with_engine_durable(|e| {
            e.block(
                now,
                Detection {
                    key: BlockKey::whole(net("192.0.2.20")),
                    kind: BlockType::Register,
                    reason: "5 failed REGISTERs within 1m".into(),
                    duration: Duration::from_secs(600),
                    evidence: vec!["REGISTER for 1001 -> 403 Forbidden".into()],
                },
                "friendly-scanner",
            )
        })
        .await
        .unwrap();
    assert!(made);
    let before = view(&node);
    assert_eq!(before.0.len(), 6);
    assert_eq!(before.2.len(), 1, "one strike record");
    p.stop().await;

    let p = start(pbx.addr, |c| {
        c.state.path = path.clone();
        c.lists.blacklist = vec![net("203.0.113.0/24")];
    })
    .await;
    assert_eq!(
        view(&p.node()),
        before,
        "everything as it was, expiry included"
    );

    // Restored before serving: the blocked source's first packet after the restart is dropped.
    let blocked = Ua::bind("127.0.0.9").await;
    blocked.send(p.udp, &options_from(1, "Yealink")).await;
    assert!(pbx.silent(300).await);
    let phone = Ua::bind("127.0.0.2").await;
    phone.send(p.udp, &options_from(2, "Yealink")).await;
    let (got, _) = pbx.recv().await;
    assert!(first_line(&got).starts_with("OPTIONS"));
    p.stop().await;

    // Config entries are not stored; run-time ones are.
    let s = Store::open(&path).unwrap();
    assert_eq!(s.counts().unwrap(), [6, 1, 1, 1]);
}

// ---- (c) expiry while down ----------------------------------------------------------------

#[tokio::test]
async fn a_block_that_expires_while_down_is_gone_after_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(&dir);
    let pbx = Ua::bind("127.0.0.1").await;
    let p = start(pbx.addr, |c| c.state.path = path.clone()).await;
    let node = p.node();
    let now = node.now();
    node.with_engine_durable(|e| {
        e.manual_block(
            now,
            BlockKey::whole(net("127.0.0.11")),
            Some(Duration::from_millis(300)),
            "short",
        )
        .unwrap();
        e.manual_block(
            now,
            BlockKey::whole(net("127.0.0.12")),
            Some(Duration::from_secs(3600)),
            "long",
        )
        .unwrap();
    })
    .await
    .unwrap();
    p.stop().await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    let p = start(pbx.addr, |c| c.state.path = path.clone()).await;
    let keys: Vec<String> = p
        .node()
        .inspect(|e| e.blocks().map(|b| b.key.to_string()).collect());
    assert_eq!(keys, vec!["127.0.0.12".to_string()]);
    let freed = Ua::bind("127.0.0.11").await;
    freed.send(p.udp, &options_from(3, "Yealink")).await;
    let (got, _) = pbx.recv().await;
    assert!(first_line(&got).starts_with("OPTIONS"));
    p.stop().await;
    let s = Store::open(&path).unwrap();
    assert_eq!(s.counts().unwrap()[0], 1, "the expired row was deleted");
}

#[tokio::test]
async fn an_unreadable_state_file_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = state_path(&dir);
    std::fs::write(
        &path,
        b"this is not a redb file, it is a text file\n".repeat(2000),
    )
    .unwrap();
    let mut cfg = Config::default();
    cfg.sip.listen_udp = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.sip.listen_tcp = vec!["127.0.0.1:0".parse().unwrap()];
    cfg.admin.listen = "127.0.0.1:0".parse().unwrap();
    cfg.upstream.address = "127.0.0.1:5080".into();
    cfg.state.path = path.clone();
    let cfg = cfg.validate().unwrap();
    let bound = server::bind(&cfg).await.unwrap();
    let err = match server::start(cfg, None, bound).await {
        Ok(_) => panic!("started on an unreadable state file"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("state.path") && err.contains(&path), "{err}");
}

// ---- (b) kill -9 of the real binary -----------------------------------------------------------

fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real `sipwarden` binary on loopback ports, logging to a file.
struct Binary {
    child: Child,
    sip: SocketAddr,
    admin: SocketAddr,
    log: PathBuf,
    config: PathBuf,
}

impl Binary {
    fn write_config(dir: &Path, pbx: SocketAddr) -> (PathBuf, SocketAddr, SocketAddr) {
        Self::write_config_with(dir, pbx, "[log]\nlevel = \"info\"\n")
    }

    fn write_config_with(
        dir: &Path,
        pbx: SocketAddr,
        extra: &str,
    ) -> (PathBuf, SocketAddr, SocketAddr) {
        let port = loop {
            // The same number free for UDP and TCP.
            let p = free_udp_port();
            if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
                break p;
            }
        };
        let sip: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let admin: SocketAddr = format!("127.0.0.1:{}", free_tcp_port()).parse().unwrap();
        let config = dir.join("proxy.toml");
        std::fs::write(
            &config,
            format!(
                "[sip]\nlisten_udp = [\"{sip}\"]\nlisten_tcp = [\"{sip}\"]\n\
                 [upstream]\naddress = \"{pbx}\"\n\
                 [admin]\nlisten = \"{admin}\"\n\
                 [state]\npath = \"{}\"\n{extra}",
                dir.join("state.db").display()
            ),
        )
        .unwrap();
        (config, sip, admin)
    }

    fn start(dir: &Path, config: &Path, sip: SocketAddr, admin: SocketAddr, run: u32) -> Binary {
        let log = dir.join(format!("run{run}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sipwarden"))
            .arg("run")
            .arg("-c")
            .arg(config)
            .env_remove("RUST_LOG")
            .stdout(Stdio::from(out.try_clone().unwrap()))
            .stderr(Stdio::from(out))
            .spawn()
            .expect("spawn sipwarden");
        Binary {
            child,
            sip,
            admin,
            log,
            config: config.to_path_buf(),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until SIP is served: a phone's OPTIONS reaches the PBX.
    async fn wait_sip(&mut self, phone: &Ua, pbx: &Ua) {
        for n in 0..100 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sipwarden exited: {status}\n{}", self.log_text());
            }
            phone
                .send(self.sip, &options_from(9000 + n, "Yealink"))
                .await;
            if !pbx.silent(100).await {
                // Drain any duplicate from earlier attempts.
                while !pbx.silent(50).await {}
                return;
            }
        }
        panic!("sipwarden never served SIP\n{}", self.log_text());
    }

    /// SIGTERM, then expect a clean exit (status 0) with the store closed.
    async fn terminate(mut self) {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success());
        let mut status = None;
        for _ in 0..200 {
            if let Some(s) = self.child.try_wait().unwrap() {
                status = Some(s);
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let status = status.unwrap_or_else(|| panic!("no exit after SIGTERM\n{}", self.log_text()));
        assert!(status.success(), "{status}\n{}", self.log_text());
        assert!(
            self.log_text().contains("state store closed"),
            "{}",
            self.log_text()
        );
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the binary logged is durable: a scanner block logged just before `kill -9` is in the
/// file, restored before the restarted binary serves, and its expiry is not reset.
#[tokio::test]
async fn kill9_keeps_a_logged_block_with_its_expiry() {
    let dir = tempfile::tempdir().unwrap();
    let pbx = Ua::bind("127.0.0.1").await;
    let phone = Ua::bind("127.0.0.2").await;
    let scanner = Ua::bind("127.0.0.7").await;
    let (config, sip, admin) = Binary::write_config(dir.path(), pbx.addr);
    let mut bin = Binary::start(dir.path(), &config, sip, admin, 1);
    bin.wait_sip(&phone, &pbx).await;

    scanner
        .send(sip, &options_from(1, "friendly-scanner"))
        .await;
    let logged = eventually(5, || bin.log_text().contains("blocked")).await;
    assert!(logged, "block logged\n{}", bin.log_text());
    bin.kill9();

    let path = dir.path().join("state.db");
    let first = {
        let s = Store::open(&path).expect("state file readable after kill -9");
        let snap = s.load().unwrap();
        let b = snap
            .blocks
            .iter()
            .find(|b| b.key.to_string() == "127.0.0.7")
            .cloned()
            .expect("the logged block is on disk");
        assert_eq!(b.kind, BlockType::Scanner);
        assert!(b.expires_at.is_some());
        assert_eq!(snap.strikes.len(), 1);
        b
    };

    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut bin = Binary::start(dir.path(), &config, sip, admin, 2);
    bin.wait_sip(&phone, &pbx).await;
    assert!(
        bin.log_text().contains("state restored"),
        "{}",
        bin.log_text()
    );
    // The scanner, now with an innocent User-Agent, is still dropped.
    scanner.send(sip, &options_from(2, "Yealink")).await;
    assert!(pbx.silent(300).await, "restored block enforced");
    bin.kill9();

    let s = Store::open(&path).unwrap();
    let snap = s.load().unwrap();
    let again = snap
        .blocks
        .iter()
        .find(|b| b.key.to_string() == "127.0.0.7")
        .cloned()
        .expect("still blocked");
    assert_eq!(again.expires_at, first.expires_at, "expiry not reset");
    assert_eq!(again.blocked_at, first.blocked_at);
}

async fn api(
    http: &reqwest::Client,
    bin: &Binary,
    method: reqwest::Method,
    path: &str,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let url = format!("http://{}{path}", bin.admin);
    let mut req = http.request(method, &url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{url}: {e}"));
    let status = resp.status();
    let text = resp.text().await.unwrap();
    assert!(status.is_success(), "{url}: {status} {text}");
    serde_json::from_str(&text).unwrap_or(serde_json::Value::Null)
}

impl Binary {
    /// Wait until the admin API answers.
    async fn wait_admin(&mut self, http: &reqwest::Client) {
        let url = format!("http://{}/healthz", self.admin);
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("sipwarden exited: {status}\n{}", self.log_text());
            }
            if let Ok(r) = http.get(&url).send().await {
                if r.status().is_success() {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("admin API never answered at {url}\n{}", self.log_text());
    }

    /// A start of the same binary on the same config and ports, for after this one is gone.
    fn restart_later(&self, dir: &Path, run: u32) -> impl FnOnce() -> Binary {
        let (dir, config, sip, admin) =
            (dir.to_path_buf(), self.config.clone(), self.sip, self.admin);
        move || Binary::start(&dir, &config, sip, admin, run)
    }
}

fn row<'a>(rows: &'a serde_json::Value, key: &str, want: &str) -> Option<&'a serde_json::Value> {
    rows.as_array()?.iter().find(|r| r[key] == want)
}

/// What the admin API answered 200 for survives `kill -9` right after the answer: list entries
/// with their comments, a manual block with its remaining time counting on (not reset), and a
/// short block that ran out while the process was dead is gone.
#[tokio::test]
async fn kill9_keeps_what_the_api_confirmed() {
    use reqwest::Method;
    let dir = tempfile::tempdir().unwrap();
    let pbx = Ua::bind("127.0.0.1").await;
    let phone = Ua::bind("127.0.0.2").await;
    let (config, sip, admin) = Binary::write_config(dir.path(), pbx.addr);
    let http = reqwest::Client::new();
    let mut bin = Binary::start(dir.path(), &config, sip, admin, 1);
    bin.wait_admin(&http).await;
    bin.wait_sip(&phone, &pbx).await;

    api(
        &http,
        &bin,
        Method::POST,
        "/api/whitelist",
        Some(serde_json::json!({"cidr": "10.40.0.0/16", "comment": "head office"})),
    )
    .await;
    api(
        &http,
        &bin,
        Method::POST,
        "/api/blacklist",
        Some(serde_json::json!({"cidr": "198.51.100.0/24", "comment": "known bad"})),
    )
    .await;
    let long = api(
        &http,
        &bin,
        Method::POST,
        "/api/blocks",
        Some(serde_json::json!({"ip": "127.0.0.35", "duration": "1h", "reason": "manual test"})),
    )
    .await;
    api(
        &http,
        &bin,
        Method::POST,
        "/api/blocks",
        Some(serde_json::json!({"ip": "192.0.2.36", "duration": "2s"})),
    )
    .await;
    assert_eq!(long["unblock_in_secs"], 3600, "{long}");
    let next = bin.restart_later(dir.path(), 2);
    bin.kill9();

    tokio::time::sleep(Duration::from_millis(2200)).await;
    let mut bin = next();
    bin.wait_admin(&http).await;
    bin.wait_sip(&phone, &pbx).await;

    let blocks = api(&http, &bin, Method::GET, "/api/blocks", None).await;
    let b = row(&blocks, "ip", "127.0.0.35").unwrap_or_else(|| panic!("block kept: {blocks}"));
    let left = b["unblock_in_secs"].as_u64().unwrap();
    assert!(
        (3500..=3598).contains(&left),
        "remaining time counts on: {left}"
    );
    assert_eq!(b["blocked_at"], long["blocked_at"]);
    assert_eq!(b["reason"], "manual test");
    assert_eq!(b["type"], "MANUAL");
    assert!(
        row(&blocks, "ip", "192.0.2.36").is_none(),
        "expired while down: {blocks}"
    );
    let white = api(&http, &bin, Method::GET, "/api/whitelist", None).await;
    let w = row(&white, "cidr", "10.40.0.0/16").unwrap_or_else(|| panic!("{white}"));
    assert_eq!(w["comment"], "head office");
    assert_eq!(w["source"], "api");
    let black = api(&http, &bin, Method::GET, "/api/blacklist", None).await;
    let b = row(&black, "cidr", "198.51.100.0/24").unwrap_or_else(|| panic!("{black}"));
    assert_eq!(b["comment"], "known bad");

    // And enforced: the blocked source's packets are dropped after the restart.
    let blocked = Ua::bind("127.0.0.35").await;
    blocked.send(sip, &options_from(40, "Yealink")).await;
    assert!(pbx.silent(300).await);

    // SIGTERM: a clean exit that closes the store.
    bin.terminate().await;
}

/// The IPs the binary logged as blocked (JSON log lines).
fn logged_blocks(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "blocked")
        .filter_map(|v| v["fields"]["ip"].as_str().map(str::to_string))
        .collect()
}

/// `kill -9` while scanners from many addresses are being blocked, three times over: every
/// block the binary logged before it died is on disk, and the store always opens again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_under_load_loses_nothing_that_was_logged() {
    let dir = tempfile::tempdir().unwrap();
    let pbx = Ua::bind("127.0.0.1").await;
    let phone = Ua::bind("127.0.0.2").await;
    let (config, sip, admin) = Binary::write_config_with(
        dir.path(),
        pbx.addr,
        "[log]\nlevel = \"info\"\nformat = \"json\"\n",
    );
    let mut scanners = Vec::new();
    for i in 0..240u32 {
        scanners.push(Ua::bind(&format!("127.0.{}.{}", 10 + i / 80, 10 + i % 80)).await);
    }
    let scanners = Arc::new(scanners);
    let mut all_logged = Vec::new();
    for round in 0..3u32 {
        let mut bin = Binary::start(dir.path(), &config, sip, admin, round + 1);
        bin.wait_sip(&phone, &pbx).await;
        let s = scanners.clone();
        let flood = tokio::spawn(async move {
            for (n, ua) in s.iter().enumerate().skip(round as usize * 80).take(80) {
                let _ = ua
                    .sock
                    .send_to(options_from(100 + n as u32, "sipvicious").as_bytes(), sip)
                    .await;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        });
        // Die somewhere in the middle of the flood.
        tokio::time::sleep(Duration::from_millis(60 + 25 * round as u64)).await;
        let log_before = bin.log_text();
        bin.kill9();
        let _ = flood.await;
        let logged = logged_blocks(&log_before);
        assert!(!logged.is_empty(), "round {round}: blocks were logged");
        println!(
            "round {round}: {} of 80 blocks logged before kill -9",
            logged.len()
        );
        all_logged.extend(logged);

        let store = Store::open(dir.path().join("state.db"))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let on_disk: Vec<String> = store
            .load()
            .unwrap()
            .blocks
            .iter()
            .map(|b| b.key.to_string())
            .collect();
        for ip in &all_logged {
            assert!(
                on_disk.contains(ip),
                "round {round}: logged {ip} not on disk"
            );
        }
    }
}

// ---- (d) reload --------------------------------------------------------------------------------

/// A node started from a config file, so reload has something to read.
async fn start_from_file(pbx: SocketAddr, dir: &Path, toml_extra: &str) -> (Proxy, PathBuf) {
    let path = dir.join("proxy.toml");
    let state = dir.join("state.db");
    let base = format!(
        "[sip]\nlisten_udp = [\"127.0.0.1:0\"]\nlisten_tcp = [\"127.0.0.1:0\"]\n\
         [upstream]\naddress = \"{pbx}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
         [state]\npath = \"{}\"\n{toml_extra}",
        state.display()
    );
    std::fs::write(&path, base).unwrap();
    let cfg = Config::load(&path).unwrap();
    let bound = server::bind(&cfg).await.unwrap();
    let udp = bound.udp[0].local_addr().unwrap();
    let tcp = bound.tcp[0].local_addr().unwrap();
    let running = server::start(cfg, Some(path.clone()), bound).await.unwrap();
    let proxy = Proxy {
        udp,
        udp6: None,
        tcp,
        ws: None,
        running: Some(running),
        _dir: tempfile::tempdir().unwrap(),
    };
    (proxy, path)
}

fn rewrite(path: &Path, pbx: SocketAddr, toml_extra: &str) {
    let state = path.with_file_name("state.db");
    std::fs::write(
        path,
        format!(
            "[sip]\nlisten_udp = [\"127.0.0.1:0\"]\nlisten_tcp = [\"127.0.0.1:0\"]\n\
             [upstream]\naddress = \"{pbx}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n\
             [state]\npath = \"{}\"\n{toml_extra}",
            state.display()
        ),
    )
    .unwrap();
}

async fn reload(p: &Proxy) -> Result<(), String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    p.running.as_ref().unwrap().reload.send(tx).await.unwrap();
    rx.await.unwrap()
}

#[tokio::test]
async fn reload_keeps_state_and_the_call_in_progress() {
    let dir = tempfile::tempdir().unwrap();
    let pbx = Ua::bind("127.0.0.1").await;
    let (p, cfg_path) = start_from_file(
        pbx.addr,
        dir.path(),
        "[lists]\nblacklist = [\"203.0.113.0/24\"]\n[register]\nhit_count = 5\n",
    )
    .await;
    let node = p.node();
    let now = node.now();
    node.with_engine_durable(|e| {
        e.manual_block(
            now,
            BlockKey::whole(net("127.0.0.9")),
            Some(Duration::from_secs(3600)),
            "kept",
        )
        .unwrap();
        e.list_add(now, ListKind::Blacklist, net("198.51.100.0/24"), "", "api");
    })
    .await
    .unwrap();

    // A call: the INVITE is forwarded...
    let phone = Ua::bind("127.0.0.2").await;
    let via = "UDP 192.168.1.50:5060";
    let inv = request(
        "INVITE",
        "sip:1002@pbx.test",
        via,
        "z9hG4bKrl1",
        "1001",
        "1002",
        "reload-call",
        1,
        "Contact: <sip:1001@192.168.1.50>\r\n",
    );
    phone.send(p.udp, &inv).await;
    let (seen_inv, _) = pbx.recv().await;
    let rr = header(&seen_inv, "Record-Route").unwrap().to_string();

    // ... then the config changes under it.
    rewrite(
        &cfg_path,
        pbx.addr,
        "[lists]\nblacklist = [\"192.0.2.0/24\"]\nwhitelist = [\"10.30.0.0/16\"]\n\
         [register]\nhit_count = 9\n",
    );
    reload(&p).await.expect("valid config reloads");
    let cfg = node.config();
    assert_eq!(cfg.register.hit_count, 9);
    let (blocks, lists, _) = view(&node);
    assert!(blocks.contains_key("127.0.0.9"), "blocks kept");
    let nets: Vec<&str> = lists.iter().map(|l| l.1.as_str()).collect();
    assert!(nets.contains(&"192.0.2.0/24") && nets.contains(&"10.30.0.0/16"));
    assert!(!nets.contains(&"203.0.113.0/24"), "old config entry gone");
    assert!(nets.contains(&"198.51.100.0/24"), "run-time entry kept");

    // 200, ACK and BYE still pass.
    pbx.send(
        p.udp,
        &respond(
            &seen_inv,
            200,
            "OK",
            &format!("Contact: <sip:1002@{}>\r\n", pbx.addr),
        ),
    )
    .await;
    let (ok, _) = phone.recv().await;
    assert!(first_line(&ok).starts_with("SIP/2.0 200"), "{ok}");
    let to = header(&ok, "To").unwrap().to_string();
    for (method, cseq, br) in [("ACK", 1, "z9hG4bKrl2"), ("BYE", 2, "z9hG4bKrl3")] {
        let req = request(
            method,
            &format!("sip:1002@{}", pbx.addr),
            via,
            br,
            "1001",
            "1002",
            "reload-call",
            cseq,
            &format!("Route: {rr}\r\n"),
        )
        .replace("To: <sip:1002@pbx.test>", &format!("To: {to}"));
        phone.send(p.udp, &req).await;
        let (seen, _) = pbx.recv().await;
        assert!(first_line(&seen).starts_with(method), "{seen}");
        if method == "BYE" {
            pbx.send(p.udp, &respond(&seen, 200, "OK", "")).await;
            let (r, _) = phone.recv().await;
            assert!(first_line(&r).starts_with("SIP/2.0 200"), "{r}");
        }
    }

    // An invalid config is refused with the key named; the running one stays.
    rewrite(
        &cfg_path,
        pbx.addr,
        "[register]\nhit_count = 1\nno_such_key = true\n",
    );
    let err = reload(&p).await.expect_err("invalid config refused");
    assert!(err.contains("no_such_key"), "{err}");
    assert_eq!(node.config().register.hit_count, 9, "old config kept");
    rewrite(&cfg_path, pbx.addr, "[register]\nhit_count = 0\n");
    let err = reload(&p).await.expect_err("impossible value refused");
    assert!(err.contains("register.hit_count"), "{err}");
    assert_eq!(node.config().register.hit_count, 9);
    let opt = options_from(7, "Yealink");
    phone.send(p.udp, &opt).await;
    let (got, _) = pbx.recv().await;
    assert!(first_line(&got).starts_with("OPTIONS"), "still serving");
    p.stop().await;

    // The config-file entries were never stored; the run-time ones were.
    let s = Store::open(dir.path().join("state.db")).unwrap();
    assert_eq!(s.counts().unwrap(), [1, 0, 1, 0]);
}

// ---- cluster -------------------------------------------------------------------------------------

/// A throwaway redis-server on a free loopback port.
struct Redis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Redis {
    fn binary() -> Option<PathBuf> {
        ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
    }

    async fn start_on(port: u16) -> Option<Redis> {
        let bin = Self::binary()?;
        let dir = tempfile::tempdir().unwrap();
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let r = Redis {
            child,
            port,
            _dir: dir,
        };
        let up = eventually(5, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        })
        .await;
        assert!(up, "redis-server did not start on {port}");
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn stop(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn has_block(node: &Arc<Node>, ip: &str) -> bool {
    node.inspect(|e| e.blocks().any(|b| b.key.to_string() == ip))
}

fn list_source(node: &Arc<Node>, list: ListKind, cidr: &str) -> Option<String> {
    node.inspect(|e| {
        e.lists()
            .entries(list)
            .into_iter()
            .find(|(n, _)| n.to_string() == cidr)
            .map(|(_, en)| en.source)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_shares_blocks_between_nodes() {
    let Some(redis) = Redis::start_on(free_tcp_port()).await else {
        println!("SKIPPED: redis-server is not installed");
        return;
    };
    let dir_b = tempfile::tempdir().unwrap();
    let path_b = state_path(&dir_b);
    let pbx = Ua::bind("127.0.0.1").await;
    let url = redis.url();
    let a = start(pbx.addr, |c| c.cluster.redis_url = url.clone()).await;
    let b = start(pbx.addr, |c| {
        c.cluster.redis_url = url.clone();
        c.state.path = path_b.clone();
    })
    .await;
    let (na, nb) = (a.node(), b.node());
    let now = na.now();
    let hour = Some(Duration::from_secs(3600));

    // A block on A appears on B, with the same expiry; and B drops its packets.
    na.with_engine_durable(|e| {
        e.manual_block(now, BlockKey::whole(net("127.0.0.21")), hour, "seen on A")
            .unwrap()
    })
    .await
    .unwrap();
    assert!(eventually(5, || has_block(&nb, "127.0.0.21")).await);
    let exp = |n: &Arc<Node>| {
        n.inspect(|e| {
            e.blocks()
                .find(|b| b.key.to_string() == "127.0.0.21")
                .and_then(|b| b.expires_at)
        })
    };
    assert_eq!(exp(&na), exp(&nb));
    let attacker = Ua::bind("127.0.0.21").await;
    attacker.send(b.udp, &options_from(11, "Yealink")).await;
    assert!(pbx.silent(300).await, "blocked on B too");

    // Run-time list entries travel too, marked as learnt from the cluster; config ones do not.
    na.with_engine_durable(|e| {
        e.list_add(
            now,
            ListKind::Blacklist,
            net("198.51.100.0/24"),
            "bad net",
            "api",
        )
    })
    .await
    .unwrap();
    assert!(
        eventually(5, || list_source(
            &nb,
            ListKind::Blacklist,
            "198.51.100.0/24"
        )
        .as_deref()
            == Some("cluster"))
        .await
    );

    // An unblock on A unblocks on B.
    na.with_engine_durable(|e| e.unblock(net("127.0.0.21"), None))
        .await
        .unwrap();
    assert!(eventually(5, || !has_block(&nb, "127.0.0.21")).await);

    // A block made on B (a detector, not the API) reaches A; no echo comes back to B as an
    // event (B's own block stays exactly as B made it).
    let scanner = Ua::bind("127.0.0.22").await;
    scanner
        .send(b.udp, &options_from(12, "friendly-scanner"))
        .await;
    assert!(eventually(5, || has_block(&na, "127.0.0.22")).await);

    // A node that starts later loads the current blocks from Redis before serving.
    na.with_engine_durable(|e| {
        e.manual_block(now, BlockKey::whole(net("127.0.0.23")), hour, "older")
            .unwrap()
    })
    .await
    .unwrap();
    assert!(eventually(5, || has_block(&nb, "127.0.0.23")).await);
    let c = start(pbx.addr, |c| c.cluster.redis_url = url.clone()).await;
    let nc = c.node();
    assert!(has_block(&nc, "127.0.0.22") && has_block(&nc, "127.0.0.23"));
    assert!(
        !has_block(&nc, "127.0.0.21"),
        "unblocked ones are not loaded"
    );
    assert_eq!(
        list_source(&nc, ListKind::Blacklist, "198.51.100.0/24").as_deref(),
        Some("cluster")
    );

    // Redis goes away and comes back on the same port: sharing resumes.
    let port = redis.stop();
    na.with_engine_durable(|e| {
        e.manual_block(
            now,
            BlockKey::whole(net("127.0.0.24")),
            hour,
            "during outage",
        )
        .unwrap()
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let redis = Redis::start_on(port).await.unwrap();
    assert!(
        eventually(20, || has_block(&nb, "127.0.0.24")).await,
        "shared after Redis came back"
    );
    na.with_engine_durable(|e| {
        e.manual_block(now, BlockKey::whole(net("127.0.0.25")), hour, "after")
            .unwrap()
    })
    .await
    .unwrap();
    assert!(eventually(20, || has_block(&nb, "127.0.0.25")).await);

    // What B learnt is in B's own store too (a restart without Redis keeps it).
    c.stop().await;
    b.stop().await;
    a.stop().await;
    drop(redis);
    let s = Store::open(&path_b).unwrap();
    let snap = s.load().unwrap();
    let keys: Vec<String> = snap.blocks.iter().map(|b| b.key.to_string()).collect();
    for ip in ["127.0.0.22", "127.0.0.23", "127.0.0.24", "127.0.0.25"] {
        assert!(keys.contains(&ip.to_string()), "{ip} in {keys:?}");
    }
    assert!(!keys.contains(&"127.0.0.21".to_string()));
    assert!(snap.lists.iter().any(|(k, n, e)| *k == ListKind::Blacklist
        && n.to_string() == "198.51.100.0/24"
        && e.source == "cluster"));
}

#[tokio::test]
async fn a_node_starts_while_redis_is_down() {
    if Redis::binary().is_none() {
        println!("SKIPPED: redis-server is not installed");
        return;
    }
    let port = free_tcp_port();
    let pbx = Ua::bind("127.0.0.1").await;
    let url = format!("redis://127.0.0.1:{port}/");
    let t = Instant::now();
    let a = start(pbx.addr, |c| c.cluster.redis_url = url.clone()).await;
    assert!(t.elapsed() < Duration::from_secs(6), "start is not held up");
    let phone = Ua::bind("127.0.0.2").await;
    phone.send(a.udp, &options_from(21, "Yealink")).await;
    let (got, _) = pbx.recv().await;
    assert!(
        first_line(&got).starts_with("OPTIONS"),
        "serves without Redis"
    );
    let na = a.node();
    let now = na.now();
    na.with_engine_durable(|e| {
        e.manual_block(
            now,
            BlockKey::whole(net("127.0.0.31")),
            Some(Duration::from_secs(3600)),
            "",
        )
        .unwrap()
    })
    .await
    .unwrap();
    let redis = Redis::start_on(port).await.unwrap();
    let b = start(pbx.addr, |c| c.cluster.redis_url = url.clone()).await;
    assert!(
        eventually(20, || has_block(&b.node(), "127.0.0.31")).await,
        "A's queued block reaches Redis once it is up, and B loads it"
    );
    a.stop().await;
    b.stop().await;
    drop(redis);
}
