use super::*;
use crate::blocks::{Block, BlockKey, BlockType, UnblockReason};
use parking_lot::Mutex;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

fn block(i: u32) -> Event {
    Event::Blocked(Block {
        key: BlockKey::whole(
            format!("127.3.{}.{}/32", i / 250, i % 250 + 1)
                .parse()
                .unwrap(),
        ),
        kind: BlockType::Scanner,
        device: "friendly-scanner".into(),
        reason: "User-Agent matches scanner pattern \"friendly-scanner\"".into(),
        blocked_at: 1_700_000_000_000,
        expires_at: Some(1_700_000_000_000 + 3_600_000),
        strikes: 1,
        hits: 1,
        evidence: vec![],
        packets: Vec::new(),
        enforced: true,
    })
}

#[test]
fn url_rule() {
    let t = SmtpTarget::parse("smtp://u%40x:p%3Aw@mail.example.com").unwrap();
    assert_eq!(t.security, Security::StartTls);
    assert_eq!(t.port, 587);
    assert_eq!(t.credentials, Some(("u@x".into(), "p:w".into())));
    assert!(!format!("{t:?}").contains("p:w"), "no password in Debug");
    let t = SmtpTarget::parse("smtps://mail.example.com").unwrap();
    assert_eq!((t.security, t.port), (Security::Implicit, 465));
    let t = SmtpTarget::parse("smtp://127.0.0.1:2525").unwrap();
    assert_eq!((t.security, t.port), (Security::Plain, 2525));
    let t = SmtpTarget::parse("smtp://[::1]:25").unwrap();
    assert_eq!((t.host.as_str(), t.security), ("::1", Security::Plain));
    let t = SmtpTarget::parse("smtp://relay.lan:25?tls=none").unwrap();
    assert_eq!(t.security, Security::Plain);
    for bad in [
        "http://x",
        "smtp://",
        "smtps://x?tls=none",
        "smtp://x?tls=maybe",
        "smtp://x/path",
        "not a url",
    ] {
        assert!(SmtpTarget::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn entries_match_the_webhook_events() {
    let e = Entry::of(&block(0)).unwrap();
    assert_eq!(e.section, Section::Blocked);
    assert!(e.line.contains("127.3.0.1"), "{}", e.line);
    assert!(e.line.contains("type SCANNER for 1h"), "{}", e.line);
    assert!(e.line.contains("friendly-scanner"), "{}", e.line);
    let a = Entry::of(&Event::Alert {
        kind: BlockType::Invite,
        source: "198.51.100.4/32".into(),
        message: "INVITE flood\r\nBcc: x@y".into(),
    })
    .unwrap();
    assert_eq!(a.section, Section::Alert(BlockType::Invite));
    assert!(!a.line.contains('\n') && !a.line.contains('\r'));
    assert!(Entry::of(&Event::Unblocked {
        key: BlockKey::whole("192.0.2.7/32".parse().unwrap()),
        kind: BlockType::Scanner,
        why: UnblockReason::Expired,
    })
    .is_none());
    let long = Entry::of(&Event::Alert {
        kind: BlockType::Register,
        source: "x".into(),
        message: "é".repeat(1000),
    })
    .unwrap();
    assert!(long.line.len() <= MAX_LINE + '…'.len_utf8());
}

#[test]
fn digest_is_bounded_and_sectioned() {
    let mut d = Digest::default();
    assert!(d.is_empty());
    for i in 0..1000 {
        d.add(Entry::of(&block(i)).unwrap());
    }
    d.add(Entry {
        section: Section::Alert(BlockType::Invite),
        line: "198.51.100.4/32: INVITE flood".into(),
    });
    assert_eq!(d.omitted(), 1001 - MAX_LINES as u64);
    let (subject, body) = d.render("pbx1");
    assert_eq!(
        subject,
        "sipwarden on pbx1: 1000 new blocks, 1 invite-flood episodes"
    );
    assert!(body.contains("New blocks (1000):"));
    assert!(body.contains("… and 800 more"));
    assert!(body.contains("INVITE-flood episodes (1):\n  … and 1 more"));
    assert!(body.lines().count() < MAX_LINES + 10);
}

/// A minimal SMTP receiver on loopback: enough of RFC 5321 for lettre without TLS.
async fn receiver() -> (u16, Arc<Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = l.local_addr().unwrap().port();
    let got = Arc::new(Mutex::new(Vec::new()));
    let g = got.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(serve(s, g.clone()));
        }
    });
    (port, got)
}

async fn serve(s: tokio::net::TcpStream, g: Arc<Mutex<Vec<String>>>) -> Option<()> {
    let (r, mut w) = s.into_split();
    let mut r = BufReader::new(r);
    w.write_all(b"220 test ESMTP\r\n").await.ok()?;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await.ok()? == 0 {
            return None;
        }
        let verb = line.get(..4).unwrap_or("").to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250 test\r\n",
            "DATA" => {
                w.write_all(b"354 go\r\n").await.ok()?;
                let mut msg = String::new();
                loop {
                    line.clear();
                    if r.read_line(&mut line).await.ok()? == 0 {
                        return None;
                    }
                    if line == ".\r\n" {
                        break;
                    }
                    msg.push_str(&line);
                }
                g.lock().push(msg);
                b"250 queued\r\n"
            }
            "QUIT" => {
                w.write_all(b"221 bye\r\n").await.ok()?;
                return None;
            }
            _ => b"250 ok\r\n",
        };
        w.write_all(reply).await.ok()?;
    }
}

fn options(port: u16, digest: Duration) -> MailOptions {
    MailOptions {
        target: SmtpTarget::parse(&format!("smtp://127.0.0.1:{port}")).unwrap(),
        from: parse_mailbox("sipwarden <sipwarden@localhost>").unwrap(),
        to: vec![parse_mailbox("noc@example.com").unwrap()],
        digest,
    }
}

async fn until(what: &str, f: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// "New blocks (N):" summed over all mails.
fn blocks_mailed(mails: &[String]) -> u64 {
    mails
        .iter()
        .filter_map(|m| {
            let rest = m.split("New blocks (").nth(1)?;
            rest.split(')').next()?.parse::<u64>().ok()
        })
        .sum()
}

#[tokio::test]
async fn mails_a_block_then_digests_a_flood() {
    let (port, got) = receiver().await;
    let stats = Arc::new(NotifyStats::default());
    let m = Mailer::spawn(options(port, Duration::from_secs(2)), stats.clone());
    assert!(m.is_enabled());
    m.notify(&block(0));
    until("the first mail", || got.lock().len() == 1).await;
    let first = got.lock()[0].clone();
    assert!(first.contains("To: noc@example.com"), "{first}");
    assert!(first.contains("127.3.0.1"), "{first}");
    assert!(first.contains("SCANNER"), "{first}");
    assert!(first.contains("friendly-scanner"), "{first}");
    let t = std::time::Instant::now();
    for i in 1..=1000 {
        m.notify(&block(i));
    }
    until("all blocks mailed", || blocks_mailed(&got.lock()) == 1001).await;
    let mails = got.lock().clone();
    // The flood goes out as one digest per 2 s period it spans: a few mails, not a thousand
    // (the bound follows the time the flood took on this machine, not a fixed guess).
    let periods = t.elapsed().as_secs() / 2 + 1;
    assert!(
        mails.len() as u64 <= 2 + periods,
        "{} mails over {periods} periods",
        mails.len()
    );
    assert_eq!(NotifyStats::get(&stats.sent), mails.len() as u64);
    assert_eq!(NotifyStats::get(&stats.dropped), 0);
    assert!(mails.iter().all(|m| m.len() < 200 * 1024));
}

#[tokio::test]
async fn unreachable_server_counts_failures_and_keeps_the_digest() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    let stats = Arc::new(NotifyStats::default());
    let m = Mailer::spawn(options(port, Duration::from_secs(1)), stats.clone());
    m.notify(&block(0));
    until("a failure", || NotifyStats::get(&stats.failed) >= 1).await;
    assert_eq!(NotifyStats::get(&stats.sent), 0);
}

#[test]
fn disabled_does_nothing() {
    let m = Mailer::disabled();
    m.notify(&block(0));
    assert!(!m.is_enabled());
    let n = crate::config::Notify::default();
    assert!(MailOptions::from_config(&n).is_none());
}
