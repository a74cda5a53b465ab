//! E-mail alerts through SMTP (lettre, rustls): the same events as the webhook, gathered into a
//! digest so an attack makes a few mails, not thousands.
//!
//! Bounds, because an attack is exactly when alerts pile up:
//! - the queue holds [`QUEUE`] entries; beyond that they are dropped and counted (the state task
//!   never waits for SMTP);
//! - at most one mail per `notify.digest`: the first event after a quiet period is mailed at
//!   once, everything after it waits for the next period and goes into one mail;
//! - a digest lists at most [`MAX_LINES`] entries (each at most [`MAX_LINE`] bytes) and counts
//!   the rest, so its size does not depend on the attack;
//! - a failed send is counted and its digest kept (still bounded) for the next period.
//!
//! The SMTP URL rule ([`SmtpTarget::parse`]): `smtps://` is implicit TLS (port 465);
//! `smtp://` is STARTTLS, required (port 587) — except for a loopback host or with `?tls=none`,
//! which speak plain SMTP (a local relay or a test receiver). Credentials come from the URL's
//! user info (percent-encoded).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use lettre::message::header::ContentType;
use lettre::message::Mailbox;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::NotifyStats;
use crate::blocks::Event;

/// Entries waiting for the mail task.
pub const QUEUE: usize = 1024;
/// Entries listed in one mail; the rest are counted per section.
pub const MAX_LINES: usize = 200;
/// Bytes of one listed entry (a reason quotes attacker data such as a User-Agent).
pub const MAX_LINE: usize = 400;
/// Per SMTP conversation.
const TIMEOUT: Duration = Duration::from_secs(30);

/// How the SMTP URL says to connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// `smtps://`: TLS from the first byte.
    Implicit,
    /// `smtp://`: STARTTLS, refused if the server does not offer it.
    StartTls,
    /// `smtp://` to a loopback host or with `?tls=none`.
    Plain,
}

/// A parsed `notify.smtp_url`.
#[derive(Clone, PartialEq, Eq)]
pub struct SmtpTarget {
    pub host: String,
    pub port: u16,
    pub security: Security,
    /// User and password, percent-decoded.
    pub credentials: Option<(String, String)>,
}

impl std::fmt::Debug for SmtpTarget {
    // The password stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpTarget")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("security", &self.security)
            .field("user", &self.credentials.as_ref().map(|c| &c.0))
            .finish()
    }
}

impl SmtpTarget {
    /// Parse `smtp[s]://[user:pass@]host[:port][?tls=none]` (see the module docs for the rule).
    pub fn parse(url: &str) -> Result<SmtpTarget, String> {
        let u = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
        let implicit = match u.scheme() {
            "smtps" => true,
            "smtp" => false,
            _ => return Err("must be an smtp:// or smtps:// URL".into()),
        };
        let host = match u.host_str() {
            Some(h) if !h.is_empty() => h.trim_start_matches('[').trim_end_matches(']').to_string(),
            _ => return Err("has no host".into()),
        };
        if !matches!(u.path(), "" | "/") {
            return Err("must not have a path".into());
        }
        let mut tls_none = false;
        for (k, v) in u.query_pairs() {
            match (k.as_ref(), v.as_ref()) {
                ("tls", "none") if !implicit => tls_none = true,
                ("tls", "none") => return Err("tls=none contradicts smtps://".into()),
                _ => return Err(format!("unknown query parameter {k:?} (only tls=none)")),
            }
        }
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|a| a.is_loopback());
        let security = if implicit {
            Security::Implicit
        } else if tls_none || loopback {
            Security::Plain
        } else {
            Security::StartTls
        };
        let port = u.port().unwrap_or(if implicit { 465 } else { 587 });
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8()
                .map(|c| c.into_owned())
                .map_err(|_| "user info is not UTF-8".to_string())
        };
        let credentials = if u.username().is_empty() {
            None
        } else {
            Some((decode(u.username())?, decode(u.password().unwrap_or(""))?))
        };
        Ok(SmtpTarget {
            host,
            port,
            security,
            credentials,
        })
    }

    fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, String> {
        let tls = |h: &str| TlsParameters::new(h.to_string()).map_err(|e| e.to_string());
        let tls = match self.security {
            Security::Implicit => Tls::Wrapper(tls(&self.host)?),
            Security::StartTls => Tls::Required(tls(&self.host)?),
            Security::Plain => Tls::None,
        };
        let mut b = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(self.host.as_str())
            .port(self.port)
            .tls(tls)
            .timeout(Some(TIMEOUT));
        if let Some((user, pass)) = &self.credentials {
            b = b.credentials(Credentials::new(user.clone(), pass.clone()));
        }
        Ok(b.build())
    }
}

/// A mail address as `notify.email_to` / `email_from` take it (`a@b` or `Name <a@b>`).
pub fn parse_mailbox(s: &str) -> Result<Mailbox, String> {
    s.parse::<Mailbox>().map_err(|e| format!("{s:?}: {e}"))
}

/// Which part of the digest an entry belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Section {
    Blocked,
    WouldBlock,
    /// An alert of this type (INVITE: flood episodes; REGISTER: accounts under attack; FRAUD:
    /// fraud thresholds).
    Alert(crate::blocks::BlockType),
}

impl Section {
    fn title(self) -> String {
        match self {
            Section::Blocked => "New blocks".into(),
            Section::WouldBlock => "Would block (observe mode)".into(),
            Section::Alert(crate::blocks::BlockType::Invite) => "INVITE-flood episodes".into(),
            Section::Alert(crate::blocks::BlockType::Register) => "Accounts under attack".into(),
            Section::Alert(crate::blocks::BlockType::Fraud) => "Fraud thresholds".into(),
            Section::Alert(k) => format!("{k} alerts"),
        }
    }
}

/// One event, rendered as a line when it is queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub section: Section,
    pub line: String,
}

fn clip(mut s: String) -> String {
    if s.len() > MAX_LINE {
        let mut end = MAX_LINE;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    // One entry, one line: an attacker's CR/LF must not shape the mail.
    s.replace(['\r', '\n'], " ")
}

fn clock(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

impl Entry {
    /// The entry for `ev`, `None` for events that are not mailed (the same as the webhook's).
    pub fn of(ev: &Event) -> Option<Entry> {
        match ev {
            Event::Blocked(b) => {
                let how = match b.expires_at {
                    Some(e) => format!(
                        "for {}",
                        humantime::format_duration(Duration::from_secs(
                            e.saturating_sub(b.blocked_at) / 1000
                        ))
                    ),
                    None => "permanently".into(),
                };
                let device = if b.device.is_empty() {
                    String::new()
                } else {
                    format!(" device {:?}", b.device)
                };
                Some(Entry {
                    section: if b.enforced {
                        Section::Blocked
                    } else {
                        Section::WouldBlock
                    },
                    line: clip(format!(
                        "{} {} type {} {how}{device}: {}",
                        clock(b.blocked_at),
                        b.key,
                        b.kind,
                        b.reason
                    )),
                })
            }
            Event::Alert {
                kind,
                source,
                message,
            } => Some(Entry {
                section: Section::Alert(*kind),
                line: clip(format!("{source}: {message}")),
            }),
            _ => None,
        }
    }
}

/// What happened since the last mail: bounded whatever the attack.
#[derive(Debug, Default)]
pub struct Digest {
    /// Per section in order of first appearance: count and listed lines. A handful of
    /// sections at most (one per event kind).
    sections: Vec<(Section, u64, Vec<String>)>,
    listed: usize,
}

impl Digest {
    pub fn add(&mut self, e: Entry) {
        let i = match self.sections.iter().position(|s| s.0 == e.section) {
            Some(i) => i,
            None => {
                self.sections.push((e.section, 0, Vec::new()));
                self.sections.len() - 1
            }
        };
        let Some(s) = self.sections.get_mut(i) else {
            return;
        };
        s.1 += 1;
        if self.listed < MAX_LINES {
            self.listed += 1;
            s.2.push(e.line);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }

    /// Entries counted but not listed.
    pub fn omitted(&self) -> u64 {
        self.sections.iter().map(|s| s.1).sum::<u64>() - self.listed as u64
    }

    /// Subject and plain-text body.
    pub fn render(&self, host: &str) -> (String, String) {
        let at = if host.is_empty() {
            String::new()
        } else {
            format!(" on {host}")
        };
        let summary: Vec<String> = self
            .sections
            .iter()
            .map(|(s, n, _)| format!("{n} {}", s.title().to_lowercase()))
            .collect();
        let subject = format!("sipwarden{at}: {}", summary.join(", "));
        let mut body = format!("sipwarden{at} since the last mail:\n");
        for (s, n, listed) in &self.sections {
            body.push_str(&format!("\n{} ({n}):\n", s.title()));
            for l in listed {
                body.push_str("  ");
                body.push_str(l);
                body.push('\n');
            }
            let more = n.saturating_sub(listed.len() as u64);
            if more > 0 {
                body.push_str(&format!("  … and {more} more (see the dashboard)\n"));
            }
        }
        (subject, body)
    }
}

/// A handle to the mail task; cheap to clone. A disabled mailer ignores everything.
#[derive(Clone, Debug)]
pub struct Mailer {
    tx: Option<mpsc::Sender<Entry>>,
    stats: Arc<NotifyStats>,
}

/// What the mail task needs, validated.
#[derive(Debug, Clone)]
pub struct MailOptions {
    pub target: SmtpTarget,
    pub from: Mailbox,
    pub to: Vec<Mailbox>,
    pub digest: Duration,
}

impl MailOptions {
    /// From `[notify]`; `None` when e-mail is off (no recipients or no URL). The config check
    /// already refused bad values; one that slips through is logged and turns mail off.
    pub fn from_config(n: &crate::config::Notify) -> Option<MailOptions> {
        if n.email_to.is_empty() || n.smtp_url.is_empty() {
            return None;
        }
        let parsed = (|| {
            let target = SmtpTarget::parse(&n.smtp_url)?;
            let from = if n.email_from.is_empty() {
                parse_mailbox(&format!("sipwarden <sipwarden@{}>", mail_domain()))?
            } else {
                parse_mailbox(&n.email_from)?
            };
            let to = n
                .email_to
                .iter()
                .map(|t| parse_mailbox(t))
                .collect::<Result<Vec<_>, _>>()?;
            Ok::<_, String>(MailOptions {
                target,
                from,
                to,
                digest: n.digest,
            })
        })();
        match parsed {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::error!(error = %e, "notify e-mail settings unusable; e-mail alerts are off");
                None
            }
        }
    }
}

/// The host name if it can be a mail domain, else `localhost`.
fn mail_domain() -> String {
    let h = super::host_name();
    if !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        h
    } else {
        "localhost".into()
    }
}

impl Mailer {
    pub fn disabled() -> Mailer {
        Mailer {
            tx: None,
            stats: Arc::default(),
        }
    }

    /// Start the mail task (inside a tokio runtime); its outcomes count in `stats`, shared with
    /// the webhook so `/metrics` shows all notifications.
    pub fn spawn(opts: MailOptions, stats: Arc<NotifyStats>) -> Mailer {
        let transport = match opts.target.transport() {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(error = %e, "cannot build the SMTP client; e-mail alerts are off");
                return Mailer { tx: None, stats };
            }
        };
        let (tx, rx) = mpsc::channel(QUEUE);
        let worker = Worker {
            transport,
            opts,
            stats: stats.clone(),
        };
        tokio::spawn(worker.run(rx));
        Mailer {
            tx: Some(tx),
            stats,
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queue `ev` for the next digest if it is mailed. Never waits.
    pub fn notify(&self, ev: &Event) {
        let Some(tx) = &self.tx else { return };
        let Some(e) = Entry::of(ev) else { return };
        if tx.try_send(e).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Worker {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    opts: MailOptions,
    stats: Arc<NotifyStats>,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Entry>) {
        let mut digest = Digest::default();
        // No mail before this instant (one per digest period).
        let mut next = Instant::now();
        loop {
            if digest.is_empty() {
                match rx.recv().await {
                    Some(e) => digest.add(e),
                    None => break,
                }
                continue;
            }
            tokio::select! {
                m = rx.recv() => match m {
                    Some(e) => digest.add(e),
                    None => break,
                },
                _ = tokio::time::sleep_until(next) => {
                    next = Instant::now() + self.opts.digest;
                    if self.send(&digest).await {
                        digest = Digest::default();
                    }
                }
            }
        }
        if !digest.is_empty() {
            tokio::time::sleep_until(next).await;
            self.send(&digest).await;
        }
    }

    /// One mail; true if the server took it.
    async fn send(&self, d: &Digest) -> bool {
        let (subject, body) = d.render(&super::host_name());
        let mut b = Message::builder()
            .from(self.opts.from.clone())
            .subject(subject)
            .header(ContentType::TEXT_PLAIN);
        for t in &self.opts.to {
            b = b.to(t.clone());
        }
        let host = &self.opts.target.host;
        let msg = match b.body(body) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "cannot build the alert mail");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                return false;
            }
        };
        match self.transport.send(msg).await {
            Ok(_) => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .suppressed
                    .fetch_add(d.omitted(), Ordering::Relaxed);
                true
            }
            Err(e) => {
                tracing::warn!(smtp = %host, error = %crate::util::error_chain(&e), "alert mail not sent; kept for the next digest");
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests;
