//! What an operator types to name a block or a list entry, checked and normalised:
//! `1.2.3.4`, `1.2.3.4:5062`, `2001:db8::1` (its /64, see `protection.ipv6_prefix`),
//! `2001:db8::/64`, `[2001:db8::]/64:5062`, `[2001:db8::1]:5062`, `10.0.0.0/8`.

use ipnet::{IpNet, Ipv4Net};

use crate::blocks::{parse_net, source_net};

/// A block-table target: the tracked unit (an IPv4 address or an IPv6 prefix) or, when
/// `range` is set, a wider CIDR (acceptable for unblocking everything inside it, not for a
/// block: the table matches exact sources).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub net: IpNet,
    pub port: Option<u16>,
    pub range: bool,
}

/// Parse a block target. Single addresses become the unit sipwarden tracks them by.
pub fn parse_target(s: &str, ipv6_prefix: u8) -> Result<Target, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("missing IP address".into());
    }
    let (host, port) = split_port(s)?;
    let net = parse_list_net(&host)?;
    let unit = match net {
        IpNet::V4(n) => n.prefix_len() == 32,
        IpNet::V6(n) => n.prefix_len() >= ipv6_prefix,
    };
    let net = if unit {
        source_net(net.addr(), ipv6_prefix)
    } else {
        net
    };
    if port.is_some() && !unit {
        return Err(format!(
            "{s:?}: a port block needs a single address, not a range"
        ));
    }
    Ok(Target {
        net,
        port,
        range: !unit,
    })
}

fn split_port(s: &str) -> Result<(String, Option<u16>), String> {
    let port_of = |p: &str| -> Result<Option<u16>, String> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(format!("{s:?}: {p:?} is not a port (1-65535)")),
            Ok(n) => Ok(Some(n)),
        }
    };
    if let Some(rest) = s.strip_prefix('[') {
        let Some((inner, after)) = rest.split_once(']') else {
            return Err(format!("{s:?}: missing ']'"));
        };
        // `[2001:db8::]/64:5062`: a prefix length may follow the bracket.
        let (host, port) = match after.strip_prefix('/') {
            Some(a) => {
                let (len, p) = a.split_once(':').unwrap_or((a, ""));
                (format!("{inner}/{len}"), p)
            }
            None => match after.strip_prefix(':') {
                Some(p) => (inner.to_string(), p),
                None if after.is_empty() => (inner.to_string(), ""),
                None => return Err(format!("{s:?} is not an address, [address]:port or CIDR")),
            },
        };
        let port = if port.is_empty() {
            None
        } else {
            port_of(port)?
        };
        return Ok((host, port));
    }
    match s.split_once(':') {
        Some((h, p)) if !p.contains(':') => Ok((h.to_string(), port_of(p)?)),
        _ => Ok((s.to_string(), None)),
    }
}

/// Parse a whitelist/blacklist CIDR (or a single address). IPv4-mapped IPv6 is stored as the
/// IPv4 network it names, since lookups see the IPv4 address.
pub fn parse_list_net(s: &str) -> Result<IpNet, String> {
    let net = parse_net(s)?;
    if let IpNet::V6(n) = net {
        if let (Some(v4), true) = (n.addr().to_ipv4_mapped(), n.prefix_len() >= 96) {
            return Ipv4Net::new(v4, n.prefix_len() - 96)
                .map(IpNet::V4)
                .map_err(|e| e.to_string());
        }
    }
    Ok(net)
}

/// The text an operator reads for a net: plain address for single hosts, CIDR otherwise.
pub fn net_text(net: IpNet) -> String {
    match net {
        IpNet::V4(n) if n.prefix_len() == 32 => n.addr().to_string(),
        IpNet::V6(n) if n.prefix_len() == 128 => n.addr().to_string(),
        n => n.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Result<(String, Option<u16>, bool), String> {
        parse_target(s, 64).map(|t| (net_text(t.net), t.port, t.range))
    }

    #[test]
    fn addresses_ports_and_prefixes() {
        assert_eq!(t("1.2.3.4"), Ok(("1.2.3.4".into(), None, false)));
        assert_eq!(
            t(" 1.2.3.4:5062 "),
            Ok(("1.2.3.4".into(), Some(5062), false))
        );
        assert_eq!(t("2001:db8::1"), Ok(("2001:db8::/64".into(), None, false)));
        assert_eq!(
            t("2001:db8::/64"),
            Ok(("2001:db8::/64".into(), None, false))
        );
        assert_eq!(
            t("2001:db8:0:0:1::/80"),
            Ok(("2001:db8::/64".into(), None, false))
        );
        assert_eq!(
            t("[2001:db8::1]:5062"),
            Ok(("2001:db8::/64".into(), Some(5062), false))
        );
        assert_eq!(
            t("[2001:db8::]/64:5062"),
            Ok(("2001:db8::/64".into(), Some(5062), false))
        );
        assert_eq!(
            t("[2001:db8::/64]:5062"),
            Ok(("2001:db8::/64".into(), Some(5062), false))
        );
        assert_eq!(t("::ffff:1.2.3.4"), Ok(("1.2.3.4".into(), None, false)));
        assert_eq!(t("10.0.0.0/8"), Ok(("10.0.0.0/8".into(), None, true)));
        assert_eq!(t("2001:db8::/48"), Ok(("2001:db8::/48".into(), None, true)));
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        for (input, want) in [
            ("", "missing IP"),
            ("1.2.3", "not an IP address"),
            ("1.2.3.4:0", "not a port"),
            ("1.2.3.4:99999", "not a port"),
            ("1.2.3.4:x", "not a port"),
            ("[2001:db8::1", "missing ']'"),
            ("[2001:db8::1]x", "not an address"),
            ("10.0.0.0/8:5060", "needs a single address"),
            ("300.1.1.1", "not an IP address"),
            ("1.2.3.4/33", "not an IP address"),
        ] {
            let err = t(input).unwrap_err();
            assert!(err.contains(want), "{input:?}: {err}");
        }
    }

    #[test]
    fn list_nets() {
        assert_eq!(
            parse_list_net("::ffff:10.0.0.0/104").map(net_text),
            Ok("10.0.0.0/8".into())
        );
        assert_eq!(
            parse_list_net("10.1.2.3/8").map(net_text),
            Ok("10.0.0.0/8".into())
        );
        assert!(parse_list_net("10.0.0.0/40").is_err());
    }
}
