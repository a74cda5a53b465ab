//! Authentication failures learnt from the PBX's answers: REGISTER (and INVITE) brute force,
//! NAT-aware blocking, extension enumeration, password guessing across accounts, and one account
//! attacked from many sources.

use std::net::SocketAddr;

use ipnet::IpNet;
use lru::LruCache;

use super::track::{nonzero, Distinct, Window};
use super::Detection;
use crate::blocks::{source_net, BlockKey, BlockType};
use crate::clock::Millis;
use crate::config::Config;
use crate::util::hash64;

/// With good history at an address, its whole-address block still comes once failures reach
/// this many times `hit_count`: a device cycling through ports is not let off for ever.
pub const NAT_WHOLE_FACTOR: u32 = 10;
/// Evidence lines kept per tracked source.
const EVIDENCE: usize = 3;
/// A retransmitted request's answer within this long is not counted again (64*T1).
const RETRANSMIT_WINDOW: Millis = 32_000;

#[derive(Debug, Default)]
struct SourceAuth {
    fails: Window,
    users_failed: Distinct<32>,
    users_challenged: Distinct<32>,
    creds_at: Millis,
    good_at: Millis,
    evidence: Vec<String>,
}

#[derive(Debug, Default)]
struct Account {
    sources: Distinct<32>,
    protected_until: Millis,
}

/// What the PBX said about one request, as the response router saw it.
pub struct Answer<'a> {
    pub phone: SocketAddr,
    pub method: &'a [u8],
    pub code: u16,
    pub user: &'a [u8],
    pub had_credentials: bool,
    pub call_id: &'a [u8],
    pub cseq: u32,
    pub evidence: String,
}

pub struct AuthTracker {
    sources: LruCache<IpNet, SourceAuth>,
    ports: LruCache<(IpNet, u16), Window>,
    users: LruCache<u64, Window>,
    good_users: LruCache<u64, Millis>,
    accounts: LruCache<u64, Account>,
    seen: LruCache<u64, Millis>,
}

impl AuthTracker {
    pub fn new(cap: usize) -> Self {
        let n = nonzero(cap);
        Self {
            sources: LruCache::new(n),
            ports: LruCache::new(n),
            users: LruCache::new(n),
            good_users: LruCache::new(n),
            accounts: LruCache::new(n),
            seen: LruCache::new(n),
        }
    }

    pub fn resize(&mut self, cap: usize) {
        let n = nonzero(cap);
        self.sources.resize(n);
        self.ports.resize(n);
        self.users.resize(n);
        self.good_users.resize(n);
        self.accounts.resize(n);
        self.seen.resize(n);
    }

    pub fn tracked(&self) -> usize {
        self.sources.len() + self.ports.len() + self.users.len() + self.accounts.len()
    }

    /// A request carrying credentials: this source answers challenges, as phones do and
    /// enumerators do not.
    pub fn saw_credentials(&mut self, now: Millis, net: IpNet) {
        self.sources
            .get_or_insert_mut(net, SourceAuth::default)
            .creds_at = now;
    }

    /// Is `user` under attack, and has this source no recent success for it?
    pub fn refuse(&mut self, now: Millis, net: IpNet, user: &[u8]) -> bool {
        let fp = hash64(&[user]);
        let protected = self
            .accounts
            .peek(&fp)
            .is_some_and(|a| a.protected_until > now);
        protected && self.good_users.peek(&pair(net, user)).is_none()
    }

    /// Learn from a final response of the PBX. Returns a block to make, and an alert.
    pub fn on_answer(
        &mut self,
        now: Millis,
        cfg: &Config,
        a: &Answer<'_>,
    ) -> (Option<Detection>, Option<String>) {
        let net = source_net(a.phone.ip(), cfg.protection.ipv6_prefix);
        let is_register = a.method == b"REGISTER";
        if is_register && (200..300).contains(&a.code) {
            let s = self.sources.get_or_insert_mut(net, SourceAuth::default);
            s.good_at = now;
            self.good_users.put(pair(net, a.user), now);
            return (None, None);
        }
        let challenge = matches!(a.code, 401 | 407);
        let failure = matches!(a.code, 403 | 404) || (challenge && a.had_credentials);
        let enum_method = matches!(
            a.method,
            b"REGISTER" | b"INVITE" | b"OPTIONS" | b"SUBSCRIBE" | b"MESSAGE"
        );
        if !enum_method || !(failure || challenge) {
            return (None, None);
        }
        let id = hash64(&[
            a.phone.to_string().as_bytes(),
            a.call_id,
            &a.cseq.to_le_bytes(),
            &a.code.to_le_bytes(),
        ]);
        if self
            .seen
            .get(&id)
            .is_some_and(|t| now.saturating_sub(*t) < RETRANSMIT_WINDOW)
        {
            return (None, None);
        }
        self.seen.put(id, now);

        let patterns = &cfg.patterns;
        let reg = &cfg.register;
        let pperiod = patterns.monit_period.as_millis() as Millis;
        let rperiod = reg.monit_period.as_millis() as Millis;
        let good_window = reg.good_history.as_millis() as Millis;
        let user_fp = hash64(&[a.user]) as u32;
        let s = self.sources.get_or_insert_mut(net, SourceAuth::default);
        if s.evidence.len() >= EVIDENCE {
            s.evidence.remove(0);
        }
        s.evidence.push(a.evidence.clone());
        let good = s.good_at > 0 && now.saturating_sub(s.good_at) < good_window;
        let answers_challenges = s.creds_at > 0 && now.saturating_sub(s.creds_at) < pperiod;
        let evidence = s.evidence.clone();

        // Extension enumeration: many distinct users rejected or challenged without ever
        // answering a challenge.
        let enumerated = if a.code == 404
            || (a.code == 403 && !a.had_credentials)
            || (challenge && !answers_challenges)
        {
            let counter = if challenge {
                &mut s.users_challenged
            } else {
                &mut s.users_failed
            };
            counter.add(now, pperiod, user_fp)
        } else {
            0
        };
        if enumerated >= patterns.enumeration_users as usize {
            let key = if good {
                BlockKey::with_port(net, a.phone.port())
            } else {
                BlockKey::whole(net)
            };
            return (
                Some(Detection {
                    key,
                    kind: BlockType::Scan,
                    reason: format!(
                        "extension enumeration: {enumerated} distinct users rejected within {}",
                        humantime::format_duration(patterns.monit_period)
                    ),
                    duration: patterns.block_time,
                    evidence,
                }),
                None,
            );
        }
        if !failure || (a.code == 404 && !is_register) {
            return (None, None);
        }

        let n_ip = s.fails.add(now, rperiod, 1);
        let n_accounts = if a.had_credentials {
            s.users_failed.add(now, pperiod, user_fp)
        } else {
            0
        };
        let n_port = self
            .ports
            .get_or_insert_mut((net, a.phone.port()), Window::default)
            .add(now, rperiod, 1);
        let n_user = self
            .users
            .get_or_insert_mut(pair(net, a.user), Window::default)
            .add(now, rperiod, 1);

        let mut alert = None;
        let acct = self
            .accounts
            .get_or_insert_mut(hash64(&[a.user]), Account::default);
        let n_src = acct
            .sources
            .add(now, pperiod, hash64(&[net.to_string().as_bytes()]) as u32);
        if n_src >= patterns.sources_per_account as usize && acct.protected_until <= now {
            acct.protected_until = now + patterns.block_time.as_millis() as Millis;
            alert = Some(format!(
                "account {} attacked from {n_src} sources: only sources that registered it recently may try it for {}",
                crate::util::printable(a.user, 64),
                humantime::format_duration(patterns.block_time)
            ));
        }

        // Failures without credentials across several users are enumeration, not guessing.
        let enumerating = !a.had_credentials && enumerated >= 3;
        let kind = if enumerating {
            BlockType::Scan
        } else if is_register {
            BlockType::Register
        } else {
            BlockType::Invite
        };
        let what = String::from_utf8_lossy(a.method);
        let hit = reg.hit_count;
        let period = humantime::format_duration(reg.monit_period);
        let detection = if n_accounts >= patterns.accounts_per_source as usize {
            Some(Detection {
                key: if good {
                    BlockKey::with_port(net, a.phone.port())
                } else {
                    BlockKey::whole(net)
                },
                kind,
                reason: format!("password guessing across {n_accounts} accounts within {period}"),
                duration: reg.block_time,
                evidence,
            })
        } else if good {
            if n_port >= hit || n_user >= hit {
                Some(Detection {
                    key: BlockKey::with_port(net, a.phone.port()),
                    kind,
                    reason: format!(
                        "{} failed {what} for user {} from port {} within {period}; other devices at this address authenticated recently, so only this port is blocked",
                        n_port.max(n_user),
                        crate::util::printable(a.user, 64),
                        a.phone.port()
                    ),
                    duration: reg.block_time,
                    evidence,
                })
            } else if n_ip >= hit.saturating_mul(NAT_WHOLE_FACTOR) {
                Some(Detection {
                    key: BlockKey::whole(net),
                    kind,
                    reason: format!("{n_ip} failed {what} within {period} from an address with good devices (over {NAT_WHOLE_FACTOR}x hit_count)"),
                    duration: reg.block_time,
                    evidence,
                })
            } else {
                None
            }
        } else if n_ip >= hit {
            Some(Detection {
                key: BlockKey::whole(net),
                kind,
                reason: if enumerating {
                    format!("extension enumeration: {n_ip} {what} for {enumerated} distinct users rejected within {period}")
                } else {
                    format!("{n_ip} failed {what} within {period}")
                },
                duration: reg.block_time,
                evidence,
            })
        } else {
            None
        };
        (detection, alert)
    }

    /// Forget a source's counters (after it was blocked, or unblocked by an operator).
    pub fn reset(&mut self, net: IpNet) {
        if let Some(s) = self.sources.get_mut(&net) {
            s.fails = Window::default();
            s.users_failed = Distinct::default();
            s.users_challenged = Distinct::default();
            s.evidence.clear();
        }
    }

    pub fn reset_port(&mut self, net: IpNet, port: u16) {
        self.ports.pop(&(net, port));
    }
}

fn pair(net: IpNet, user: &[u8]) -> u64 {
    hash64(&[net.to_string().as_bytes(), user])
}
