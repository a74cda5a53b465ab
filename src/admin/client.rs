//! The admin subcommands (`sipwarden blocks|block|unblock|whitelist|blacklist|reload|stats`):
//! HTTP calls to a running node's API at `admin.listen`, with `admin.token`, printed as aligned
//! tables (or the API's JSON with `--json`).

use std::io::Write;
use std::time::{Duration, UNIX_EPOCH};

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use super::api::{BlockRequest, BlockRow, ListRequest, ListRow, UnblockResult};
use super::stats_view::StatsView;
use crate::cli::{BlocksAction, Command, ListAction};
use crate::config::Config;

/// A path segment: everything but unreserved characters is escaped (`/` in a CIDR, `:` in
/// IPv6 and ports, `[`).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC.remove(b'.').remove(b'-').remove(b'_');

/// Longer than the server's own reload timeout, so its answer arrives first.
const TIMEOUT: Duration = Duration::from_secs(40);

/// Run one admin subcommand against the node configured in `cfg` and print the result.
pub async fn run(cfg: &Config, cmd: &Command) -> Result<(), String> {
    let text = execute(cfg, cmd).await?;
    let mut out = std::io::stdout().lock();
    // A closed pipe (`| head`) is not an error worth reporting.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
    Ok(())
}

/// Run one admin subcommand; the text it would print.
pub async fn execute(cfg: &Config, cmd: &Command) -> Result<String, String> {
    let api = Api::new(cfg)?;
    Ok(match cmd {
        Command::Run | Command::Check => {
            return Err("not an admin subcommand".into());
        }
        Command::Blocks { action, json } => {
            let json = *json || matches!(action, Some(BlocksAction::List { json: true }));
            let raw = api.call(Method::GET, "/api/blocks", None).await?;
            if json {
                pretty(&raw)
            } else {
                blocks_table(&parse::<Vec<BlockRow>>(&raw)?)
            }
        }
        Command::Block(args) => {
            let req = BlockRequest {
                ip: args.ip.clone(),
                duration: args.duration.clone(),
                reason: args.reason.clone(),
            };
            let raw = api
                .call(Method::POST, "/api/blocks", Some(json(&req)?))
                .await?;
            let row: BlockRow = parse(&raw)?;
            let how = match row.unblock_in_secs {
                Some(s) => format!("for {}", fmt_secs(s)),
                None => "permanently".into(),
            };
            format!("blocked {} {how}: {}\n", row.target(), row.reason)
        }
        Command::Unblock { ip } => {
            let path = format!("/api/blocks/{}", seg(ip));
            let res: UnblockResult = parse(&api.call(Method::DELETE, &path, None).await?)?;
            let items: Vec<String> = res
                .unblocked
                .iter()
                .map(|u| {
                    let target = BlockRow {
                        ip: u.ip.clone(),
                        port: u.port,
                        ..blank_row()
                    }
                    .target();
                    format!("{target} ({})", u.kind)
                })
                .collect();
            format!("unblocked {}\n", items.join(", "))
        }
        Command::Whitelist { action } => list(&api, "whitelist", action).await?,
        Command::Blacklist { action } => list(&api, "blacklist", action).await?,
        Command::Reload => {
            api.call(Method::POST, "/api/reload", None).await?;
            "config reloaded\n".into()
        }
        Command::Stats { json } => {
            let raw = api.call(Method::GET, "/api/stats", None).await?;
            if *json {
                pretty(&raw)
            } else {
                stats_text(&parse::<StatsView>(&raw)?)
            }
        }
        Command::Fraud { json } => {
            let raw = api.call(Method::GET, "/api/fraud", None).await?;
            if *json {
                pretty(&raw)
            } else {
                fraud_text(&parse::<serde_json::Value>(&raw)?)
            }
        }
        Command::Feeds { json } => {
            let raw = api.call(Method::GET, "/api/feeds", None).await?;
            if *json {
                pretty(&raw)
            } else {
                feeds_text(&parse::<serde_json::Value>(&raw)?)
            }
        }
        Command::Cluster { json } => {
            let raw = api.call(Method::GET, "/api/cluster", None).await?;
            if *json {
                pretty(&raw)
            } else {
                cluster_text(&parse::<serde_json::Value>(&raw)?)
            }
        }
    })
}

fn fraud_text(v: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        v => v.to_string(),
    };
    let mut out = format!(
        "fraud guard {}: {} calls up, {} counted, {} accounts/sources tracked\n",
        if v["enabled"].as_bool() == Some(true) {
            "on"
        } else {
            "off"
        },
        s(&v["active_calls"]),
        s(&v["concurrent_total"]),
        s(&v["subjects"]),
    );
    let rows: Vec<Vec<String>> = v["rows"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|r| {
                    vec![
                        s(&r["subject"]),
                        s(&r["group"]),
                        s(&r["concurrent"]),
                        s(&r["calls_minute"]),
                        s(&r["calls_hour"]),
                        s(&r["calls_day"]),
                        format!("{:.0}%", r["ratio"].as_f64().unwrap_or(0.0) * 100.0),
                        r["blocked_for_secs"].as_u64().map_or("-".into(), fmt_secs),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    out.push_str(&table(
        &[
            "SUBJECT", "GROUP", "UP", "MIN", "HOUR", "DAY", "LOAD", "BLOCKED",
        ],
        &rows,
    ));
    if let Some(top) = v["top_destinations"].as_array().filter(|t| !t.is_empty()) {
        out.push_str("top destinations:");
        for t in top {
            out.push_str(&format!(" {} ({})", s(&t[0]), s(&t[1])));
        }
        out.push('\n');
    }
    out
}

fn cluster_text(v: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) if s.is_empty() => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        v => v.to_string(),
    };
    if v["configured"].as_bool() != Some(true) {
        return "single node (cluster.redis_url is empty)\n".into();
    }
    let rows: Vec<Vec<String>> = v["nodes"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|n| {
                    vec![
                        s(&n["name"]),
                        s(&n["id"]),
                        s(&n["addr"]),
                        s(&n["last_contact_ms_ago"]),
                        s(&n["lag_ms"]),
                        s(&n["delay_ms"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    let c = &v["counters"];
    format!(
        "node {} ({}), Redis {} {}\npublished {} received {} reconciled {} malformed {} catch-ups stream {} full {}\n{}",
        s(&v["name"]),
        s(&v["id"]),
        s(&v["redis"]),
        if v["link_up"].as_bool() == Some(true) { "up" } else { "DOWN" },
        s(&c["published"]),
        s(&c["received"]),
        s(&c["reconciled"]),
        s(&c["malformed"]),
        s(&c["catchup_stream"]),
        s(&c["catchup_full"]),
        table(
            &["NODE", "ID", "ADDRESS", "CONTACT(ms ago)", "LAG(ms)", "DELAY(ms)"],
            &rows
        )
    )
}

fn feeds_text(v: &serde_json::Value) -> String {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) if s.is_empty() => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        v => v.to_string(),
    };
    let rows: Vec<Vec<String>> = v["feeds"]
        .as_array()
        .map(|r| {
            r.iter()
                .map(|f| {
                    vec![
                        s(&f["name"]),
                        s(&f["entries"]),
                        s(&f["last_update"]),
                        s(&f["next_id"]),
                        s(&f["last_error"]),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    format!(
        "{} feed entries\n{}",
        s(&v["entries"]),
        table(
            &["FEED", "ENTRIES", "UPDATED(ms)", "NEXT ID", "ERROR"],
            &rows
        )
    )
}

async fn list(api: &Api, name: &str, action: &ListAction) -> Result<String, String> {
    let base = format!("/api/{name}");
    Ok(match action {
        ListAction::List { json } => {
            let raw = api.call(Method::GET, &base, None).await?;
            if *json {
                pretty(&raw)
            } else {
                list_table(name, &parse::<Vec<ListRow>>(&raw)?)
            }
        }
        ListAction::Add { cidr, comment } => {
            let req = ListRequest {
                cidr: cidr.clone(),
                comment: comment.clone(),
            };
            let row: ListRow = parse(&api.call(Method::POST, &base, Some(json(&req)?)).await?)?;
            format!("added {} to the {name}\n", row.cidr)
        }
        ListAction::Rm { cidr } => {
            let path = format!("{base}/{}", seg(cidr));
            let v: serde_json::Value = parse(&api.call(Method::DELETE, &path, None).await?)?;
            let net = v.get("removed").and_then(|r| r.as_str()).unwrap_or(cidr);
            format!("removed {net} from the {name}\n")
        }
    })
}

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(cfg: &Config) -> Result<Api, String> {
        let mut addr = cfg.admin.listen;
        // Listening on all addresses: talk to it over loopback.
        if addr.ip().is_unspecified() {
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        let http = reqwest::Client::builder()
            .timeout(TIMEOUT)
            .connect_timeout(Duration::from_secs(5))
            .no_proxy()
            .build()
            .map_err(|e| format!("cannot set up the HTTP client: {e}"))?;
        Ok(Api {
            base: format!("http://{addr}"),
            token: cfg.admin.token.clone(),
            http,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<String>,
    ) -> Result<String, String> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if !self.token.is_empty() {
            req = req.bearer_auth(&self.token);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req.send().await.map_err(|e| {
            format!(
                "cannot reach the sipwarden admin API at {}: {} (is sipwarden running, and is \
                 admin.listen in the config right?)",
                self.base,
                crate::util::error_chain(&e)
            )
        })?;
        let status = resp.status();
        let text = resp.text().await.map_err(|e| {
            format!(
                "reading the answer from {url}: {}",
                crate::util::error_chain(&e)
            )
        })?;
        if status.is_success() {
            return Ok(text);
        }
        let msg = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
            .unwrap_or_else(|| format!("HTTP {status}"));
        Err(if status == StatusCode::UNAUTHORIZED {
            format!("the admin API refused the request: {msg} (check admin.token in the config)")
        } else {
            msg
        })
    }
}

fn seg(s: &str) -> String {
    utf8_percent_encode(s.trim(), SEGMENT).to_string()
}

fn json<T: serde::Serialize>(v: &T) -> Result<String, String> {
    serde_json::to_string(v).map_err(|e| e.to_string())
}

fn parse<T: DeserializeOwned>(raw: &str) -> Result<T, String> {
    serde_json::from_str(raw).map_err(|e| format!("unexpected answer from the admin API: {e}"))
}

fn pretty(raw: &str) -> String {
    let mut s = serde_json::from_str::<serde_json::Value>(raw)
        .and_then(|v| serde_json::to_string_pretty(&v))
        .unwrap_or_else(|_| raw.to_string());
    s.push('\n');
    s
}

fn blank_row() -> BlockRow {
    BlockRow {
        ip: String::new(),
        port: None,
        country: String::new(),
        kind: crate::blocks::BlockType::Manual,
        device: String::new(),
        reason: String::new(),
        blocked_at: 0,
        unblock_in_secs: None,
        permanent: true,
        strikes: 0,
        hits: 0,
        evidence: Vec::new(),
        observe: false,
    }
}

/// `45s`, `4m 05s`, `1h 02m`, `3d 4h`.
pub fn fmt_secs(s: u64) -> String {
    let (d, h, m, sec) = (s / 86_400, s / 3600 % 24, s / 60 % 60, s % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{sec}s"),
        (0, 0, _) => format!("{m}m {sec:02}s"),
        (0, _, _) => format!("{h}h {m:02}m"),
        _ => format!("{d}d {h}h"),
    }
}

fn date(secs: u64) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(secs);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_string()
}

/// Attacker text (User-Agents, evidence) is printed to a terminal: no control characters
/// (escape sequences), and clipped to `max` characters.
fn cell(s: &str, max: usize) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i + 1 >= max && s.chars().count() > max {
            out.push('…');
            break;
        }
        out.push(if c.is_control() { '·' } else { c });
    }
    out
}

/// Left-aligned columns separated by two spaces; the last column is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut width: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<&str>, out: &mut String| {
        let n = cells.len();
        let mut l = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            l.push_str(c);
            if i + 1 < n {
                let pad = width[i] - c.chars().count() + 2;
                l.push_str(&" ".repeat(pad));
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(headers.to_vec(), &mut out);
    for r in rows {
        line(r.iter().map(String::as_str).collect(), &mut out);
    }
    out
}

fn blocks_table(rows: &[BlockRow]) -> String {
    if rows.is_empty() {
        return "no blocks\n".into();
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.target(),
                cell(&r.country, 24),
                format!("{}{}", r.kind, if r.observe { "*" } else { "" }),
                cell(if r.device.is_empty() { "-" } else { &r.device }, 30),
                r.unblock_in_secs
                    .map_or_else(|| "permanent".into(), fmt_secs),
                r.strikes.to_string(),
                r.hits.to_string(),
                cell(&r.reason, 70),
            ]
        })
        .collect();
    let mut out = table(
        &[
            "IP",
            "COUNTRY",
            "TYPE",
            "DEVICE",
            "UNBLOCK IN",
            "STRIKES",
            "HITS",
            "REASON",
        ],
        &body,
    );
    let observed = rows.iter().filter(|r| r.observe).count();
    out.push_str(&format!(
        "{} block{}",
        rows.len(),
        if rows.len() == 1 { "" } else { "s" }
    ));
    if observed > 0 {
        out.push_str(&format!(
            " (* {observed} observe-mode would-be block{}: nothing dropped)",
            if observed == 1 { "" } else { "s" }
        ));
    }
    out.push('\n');
    out
}

fn list_table(name: &str, rows: &[ListRow]) -> String {
    if rows.is_empty() {
        return format!("the {name} is empty\n");
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            vec![
                r.cidr.clone(),
                r.source.clone(),
                date(r.added_at),
                cell(&r.comment, 80),
            ]
        })
        .collect();
    table(&["CIDR", "SOURCE", "ADDED (UTC)", "COMMENT"], &body)
}

/// The `sipwarden stats` text: the `/api/stats` JSON (one snapshot of the node) as key/value
/// lines.
pub(crate) fn stats_text(s: &StatsView) -> String {
    let mut rows: Vec<Vec<String>> = Vec::new();
    let mut kv = |k: &str, v: String| rows.push(vec![k.to_string(), v]);
    kv("mode", s.mode.clone());
    kv(
        "packets in",
        format!(
            "{} (udp {}, tcp {}, tls {}, ws {})",
            s.packets_in.total,
            s.packets_in.udp,
            s.packets_in.tcp,
            s.packets_in.tls,
            s.packets_in.ws
        ),
    );
    kv(
        "forwarded",
        format!(
            "{} requests, {} responses",
            s.forwarded.requests, s.forwarded.responses
        ),
    );
    kv("replies sent", s.replies_sent.to_string());
    let mut drops: Vec<_> = s.dropped.iter().filter(|(_, n)| **n > 0).collect();
    drops.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let detail: Vec<String> = drops.iter().map(|(r, n)| format!("{r} {n}")).collect();
    kv(
        "dropped",
        if detail.is_empty() {
            s.dropped_total.to_string()
        } else {
            format!("{} ({})", s.dropped_total, detail.join(", "))
        },
    );
    let types: Vec<String> = s
        .active_blocks
        .by_type
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(t, n)| format!("{t} {n}"))
        .collect();
    let mut blocks = s.active_blocks.total.to_string();
    if !types.is_empty() {
        blocks.push_str(&format!(" ({})", types.join(", ")));
    }
    if s.active_blocks.observe > 0 {
        blocks.push_str(&format!(", {} would-be (observe)", s.active_blocks.observe));
    }
    kv("active blocks", blocks);
    kv(
        "lists",
        format!(
            "whitelist {}, blacklist {}",
            s.lists.whitelist, s.lists.blacklist
        ),
    );
    let made: u64 = s.blocks_made.values().sum();
    let lifted: u64 = s.unblocks.values().sum();
    kv(
        "blocks",
        format!("{made} made, {lifted} lifted since start"),
    );
    kv("alerts", s.alerts.to_string());
    kv(
        "tcp",
        format!(
            "{} open, {} accepted, {} refused",
            s.tcp.connections, s.tcp.accepted, s.tcp.rejected
        ),
    );
    let ws_ok = s.ws.upgrades.get("ok").copied().unwrap_or(0);
    kv(
        "websocket",
        format!(
            "{} open, {} upgrades, {} oversized",
            s.ws.open, ws_ok, s.ws.oversized
        ),
    );
    kv(
        "tls",
        format!(
            "{} handshakes, {} failed, {} in progress, reloads {} ok / {} failed",
            s.tls.handshakes_ok,
            s.tls.handshakes_failed,
            s.tls.in_handshake,
            s.tls.reloads_ok,
            s.tls.reloads_failed
        ),
    );
    kv(
        "tftp",
        format!(
            "{} requests, {} transfers, {} limited, {} dropped",
            s.tftp.requests, s.tftp.transfers, s.tftp.limited, s.tftp.dropped
        ),
    );
    kv(
        "latency",
        format!(
            "avg {} µs over {} messages",
            s.latency.avg_us, s.latency.count
        ),
    );
    let last_hour: u32 = s.history.blocks.values().flatten().sum();
    kv("blocks, last hour", last_hour.to_string());
    kv("panics", s.panics.to_string());
    let h = &s.health;
    kv(
        "state store",
        format!(
            "{} commits, {} failed, {} queued, {} waiting for a retry",
            h.state.commits, h.state.failures, h.state.queue_depth, h.state.retrying
        ),
    );
    let c = &h.cluster;
    kv(
        "cluster",
        if c.configured {
            format!(
                "{}, {} published ({} failed), {} applied, {} dropped, lag {} ms",
                if c.connected { "connected" } else { "DOWN" },
                c.published,
                c.publish_failures,
                c.applied,
                c.dropped,
                c.lag_ms
            )
        } else {
            "single node".into()
        },
    );
    let n = &h.notify;
    kv(
        "notifications",
        format!(
            "{} sent, {} failed, {} dropped, {} suppressed",
            n.sent, n.failed, n.dropped, n.suppressed
        ),
    );
    let mut t = table(&["", ""], &rows);
    // No header for a key/value list.
    t = t
        .split_once('\n')
        .map_or(t.clone(), |(_, rest)| rest.to_string());
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::BlockArgs;
    use crate::node::Node;

    /// A node with its admin API on 127.0.0.1:0; the config the CLI would read for it.
    async fn node_and_cli_config(token: &str) -> (Config, std::sync::Arc<Node>) {
        let mut cfg = Config::default();
        cfg.admin.token = token.into();
        let (node, rx) = Node::new(cfg.clone());
        tokio::spawn(crate::state::run(rx, node.clone()));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        cfg.admin.listen = l.local_addr().unwrap();
        tokio::spawn(super::super::serve(
            l,
            node.clone(),
            None,
            std::future::pending(),
        ));
        (cfg, node)
    }

    #[tokio::test]
    async fn commands_against_a_live_api() {
        let (cfg, node) = node_and_cli_config("tok").await;
        let run = |cmd: Command| {
            let cfg = cfg.clone();
            async move { execute(&cfg, &cmd).await }
        };
        let block = |ip: &str, d: Option<&str>| {
            Command::Block(BlockArgs {
                ip: ip.into(),
                duration: d.map(Into::into),
                reason: Some("toll fraud".into()),
            })
        };
        assert_eq!(
            run(block("192.0.2.44", Some("2h"))).await,
            Ok("blocked 192.0.2.44 for 2h 00m: toll fraud\n".into())
        );
        assert_eq!(
            run(block("[2001:db8::5]:5062", None)).await,
            Ok("blocked [2001:db8::/64]:5062 permanently: toll fraud\n".into())
        );
        let err = run(block("10.0.0.0/8", None)).await.unwrap_err();
        assert!(err.contains("is a range"), "{err}");

        let table = run(Command::Blocks {
            action: None,
            json: false,
        })
        .await
        .unwrap();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(
            lines[0],
            "IP                    COUNTRY  TYPE    DEVICE  UNBLOCK IN  STRIKES  HITS  REASON"
        );
        assert!(lines.contains(&"[2001:db8::/64]:5062  -        MANUAL  -       permanent   0        0     toll fraud"), "{table}");
        assert_eq!(lines.last(), Some(&"2 blocks"));
        let json = run(Command::Blocks {
            action: Some(BlocksAction::List { json: true }),
            json: false,
        })
        .await
        .unwrap();
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v.as_array().map(Vec::len), Some(2));

        assert_eq!(
            run(Command::Unblock {
                ip: "2001:db8::/64".into()
            })
            .await,
            Ok("unblocked [2001:db8::/64]:5062 (MANUAL)\n".into())
        );
        assert_eq!(
            run(Command::Unblock {
                ip: "192.0.2.99".into()
            })
            .await,
            Err("no block on 192.0.2.99".into())
        );

        let add = Command::Whitelist {
            action: ListAction::Add {
                cidr: "203.0.113.0/24".into(),
                comment: Some("branch".into()),
            },
        };
        assert_eq!(
            run(add).await,
            Ok("added 203.0.113.0/24 to the whitelist\n".into())
        );
        let list = run(Command::Whitelist {
            action: ListAction::List { json: false },
        })
        .await
        .unwrap();
        assert!(
            list.starts_with(
                "CIDR            SOURCE  ADDED (UTC)          COMMENT\n203.0.113.0/24  api     "
            ),
            "{list}"
        );
        let rm = || Command::Whitelist {
            action: ListAction::Rm {
                cidr: "203.0.113.0/24".into(),
            },
        };
        assert_eq!(
            run(rm()).await,
            Ok("removed 203.0.113.0/24 from the whitelist\n".into())
        );
        assert_eq!(
            run(rm()).await,
            Err("203.0.113.0/24 is not on the whitelist".into())
        );
        assert_eq!(
            run(Command::Blacklist {
                action: ListAction::List { json: false }
            })
            .await,
            Ok("the blacklist is empty\n".into())
        );

        node.stats.packet_in(crate::stats::Transport::Udp);
        let stats = run(Command::Stats { json: false }).await.unwrap();
        assert!(
            stats.contains("packets in         1 (udp 1, tcp 0, tls 0, ws 0)\n"),
            "{stats}"
        );
        assert!(
            stats.contains("active blocks      1 (MANUAL 1)\n"),
            "{stats}"
        );
        let err = run(Command::Reload).await.unwrap_err();
        assert!(err.contains("reload is not available"), "{err}");
    }

    #[tokio::test]
    async fn wrong_token_and_unreachable_node_are_explained() {
        let (mut cfg, _node) = node_and_cli_config("right").await;
        cfg.admin.token = "wrong".into();
        let err = execute(&cfg, &Command::Stats { json: true })
            .await
            .unwrap_err();
        assert!(
            err.contains("wrong bearer token") && err.contains("admin.token"),
            "{err}"
        );
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        cfg.admin.listen = l.local_addr().unwrap();
        drop(l);
        let err = execute(&cfg, &Command::Stats { json: true })
            .await
            .unwrap_err();
        assert!(
            err.contains("cannot reach the sipwarden admin API"),
            "{err}"
        );
    }

    #[test]
    fn formats() {
        assert_eq!(fmt_secs(45), "45s");
        assert_eq!(fmt_secs(245), "4m 05s");
        assert_eq!(fmt_secs(3720), "1h 02m");
        assert_eq!(fmt_secs(3 * 86_400 + 4 * 3600 + 5), "3d 4h");
        assert_eq!(date(0), "1970-01-01 00:00:00");
        assert_eq!(cell("a\x1b[31mb", 80), "a·[31mb");
        assert_eq!(cell("abcdef", 4), "abc…");
        assert_eq!(seg("2001:db8::/64"), "2001%3Adb8%3A%3A%2F64");
    }

    #[test]
    fn aligned_table() {
        let t = table(
            &["IP", "TYPE", "REASON"],
            &[
                vec!["1.2.3.4".into(), "SCANNER".into(), "ua".into()],
                vec!["2001:db8::/64".into(), "FLOOD".into(), "".into()],
            ],
        );
        assert_eq!(
            t,
            "IP             TYPE     REASON\n\
             1.2.3.4        SCANNER  ua\n\
             2001:db8::/64  FLOOD\n"
        );
    }
}
