use super::*;

fn err(text: &str) -> String {
    match Config::from_toml(text) {
        Ok(_) => panic!("accepted: {text}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn empty_file_is_the_default_config() {
    let c = Config::from_toml("").unwrap();
    assert_eq!(c.register.hit_count, 5);
    assert_eq!(
        c.sip.listen_udp,
        vec!["0.0.0.0:5060".parse::<SocketAddr>().unwrap()]
    );
    assert_eq!(c.upstream.incoming, IncomingMode::Path);
}

/// The shipped proxy.toml parses, and says exactly what the defaults are.
#[test]
fn shipped_proxy_toml_is_valid_and_matches_the_defaults() {
    let text = include_str!("../../proxy.toml");
    let shipped = Config::from_toml(text).unwrap();
    let default = Config::from_toml("").unwrap();
    assert_eq!(shipped.to_toml(), default.to_toml());
}

/// The README's annotated config is the shipped file, byte for byte.
#[test]
fn readme_shows_the_shipped_config() {
    let readme = include_str!("../../README.md");
    let text = include_str!("../../proxy.toml");
    assert!(
        readme.contains(text.trim()),
        "README.md must embed proxy.toml verbatim"
    );
}

#[test]
fn unknown_keys_wrong_types_and_bad_values_name_the_key() {
    assert!(
        err("[register]\nhit_cont = 5\n").contains("register"),
        "{}",
        err("[register]\nhit_cont = 5\n")
    );
    assert!(err("[register]\nhit_cont = 5\n").contains("hit_cont"));
    assert!(err("[bogus]\nx = 1\n").contains("bogus"));
    assert!(err("[register]\nhit_count = \"five\"\n").contains("register.hit_count"));
    assert!(err("[register]\nblock_time = \"soon\"\n").contains("register.block_time"));
    assert!(err("[register]\nhit_count = 0\n").contains("register.hit_count"));
    assert!(err("[protection]\nipv6_prefix = 129\n").contains("protection.ipv6_prefix"));
    assert!(err("[protection]\nmode = \"panic\"\n").contains("protection.mode"));
    assert!(err("[lists]\nwhitelist = [\"10.0.0.0/33\"]\n").contains("lists.whitelist"));
    assert!(err("[upstream]\naddress = \"pbx:99999\"\n").contains("upstream.address"));
    assert!(err("[sip]\nlisten_udp = [\"nowhere\"]\n").contains("sip.listen_udp"));
    assert!(err("[admin]\nlisten = \"0.0.0.0:8080\"\n").contains("admin.token"));
    assert!(err("[protection]\naggregate_ipv4 = 4\n").contains("protection.aggregate_ipv4"));
    assert!(err("[protection]\naggregate_ipv6 = 129\n").contains("protection.aggregate_ipv6"));
    assert!(err("[protection]\naggregate_after = 1\n").contains("protection.aggregate_after"));
    assert!(
        err("[protection]\nmax_auto_blacklist = -1\n").contains("protection.max_auto_blacklist")
    );
    assert!(Config::from_toml("[protection]\nipv6_prefix = 48\n").is_ok());
    assert!(Config::from_toml("[admin]\nlisten = \"0.0.0.0:8080\"\ntoken = \"s3cret\"\n").is_ok());
}

#[test]
fn upstream_forms() {
    let u = |s: &str| parse_upstream(s, TransportKind::Udp);
    assert_eq!(
        u("127.0.0.1:5080").unwrap().literal(),
        Some("127.0.0.1:5080".parse().unwrap())
    );
    assert_eq!(u("pbx.example.com").unwrap().port, None);
    assert_eq!(u("pbx.example.com:5070").unwrap().port, Some(5070));
    let t = u("sip:pbx.example.com;transport=tcp").unwrap();
    assert_eq!(
        (t.host.as_str(), t.transport),
        ("pbx.example.com", TransportKind::Tcp)
    );
    assert_eq!(
        u("[2001:db8::1]:5060").unwrap().literal(),
        Some("[2001:db8::1]:5060".parse().unwrap())
    );
    assert!(u("").is_err());
    assert!(u("bad host").is_err());
    assert!(u("sip:x;transport=sctp").is_err());
}

/// Every example config in examples/ and docker/ is valid.
#[test]
fn example_configs_are_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut n = 0;
    for dir in ["examples", "docker"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                if let Err(e) = Config::load(&path) {
                    panic!("{}: {e}", path.display());
                }
                n += 1;
            }
        }
    }
    assert!(n >= 4, "found {n} example configs");
}

#[test]
fn fraud_and_feeds_keys_are_checked() {
    assert!(err("[fraud]\nreject_code = 404").contains("fraud.reject_code"));
    assert!(err("[fraud]\n[[fraud.rules]]\ngroup = \"mars\"").contains("fraud.rules[0].group"));
    assert!(err("[fraud]\n[[fraud.rules]]\nhours = \"8-99\"").contains("fraud.rules[0].hours"));
    assert!(err("[fraud]\n[[fraud.rules]]\nbogus = 1").contains("fraud.rules"));
    assert!(err("[fraud.prefix_groups]\nx = [\"00a\"]").contains("fraud.prefix_groups.x"));
    assert!(err("[feeds]\ninterval = \"10s\"").contains("feeds.interval"));
    assert!(err("[feeds]\nlists = [\"ftp://x\"]").contains("feeds.lists"));
    let c = Config::from_toml("[fraud]\nenabled = true\nrules = []").unwrap();
    assert!(c.fraud.enabled && c.fraud.rules.is_empty());
}

#[test]
fn email_alert_keys() {
    let ok = "[notify]\nemail_to = [\"NOC <noc@example.com>\"]\nsmtp_url = \"smtp://u:p@mail.example.com\"\ndigest = \"5m\"\n";
    let c = Config::from_toml(ok).unwrap();
    assert_eq!(c.notify.digest, Duration::from_secs(300));
    assert!(
        err("[notify]\nemail_to = [\"not an address\"]\nsmtp_url = \"smtp://x\"\n")
            .contains("notify.email_to")
    );
    assert!(err("[notify]\nemail_to = [\"a@b.c\"]\n").contains("notify.smtp_url"));
    assert!(err("[notify]\nsmtp_url = \"smtp://x\"\n").contains("notify.email_to"));
    assert!(
        err("[notify]\nemail_to = [\"a@b.c\"]\nsmtp_url = \"http://x\"\n")
            .contains("notify.smtp_url")
    );
    assert!(err("[notify]\nemail_from = \"@\"\n").contains("notify.email_from"));
    assert!(err("[notify]\ndigest = \"0s\"\n").contains("notify.digest"));
}

#[test]
fn tls_keys_are_checked_and_named() {
    assert!(err("[sip]\nlisten_tls = [\"127.0.0.1:5061\"]\n").contains("tls.certificate"));
    assert!(err("[tls]\ncertificate = \"a.pem\"\n").contains("tls.private_key"));
    assert!(err("[tls]\nmin_version = \"1.1\"\n").contains("tls.min_version"));
    assert!(err("[tls]\nverify_client = \"required\"\n").contains("tls.client_ca"));
    assert!(err("[tls]\nhandshake_timeout = \"0s\"\n").contains("tls.handshake_timeout"));
    assert!(err("[tls]\nmax_handshakes_per_ip = 0\n").contains("tls.max_handshakes_per_ip"));
    assert!(err("[tls]\nbogus = 1\n").contains("bogus"));
    let sni = "[tls]\ncertificate = \"a\"\nprivate_key = \"b\"\n\
               sni = [{ name = \"bad name\", certificate = \"c\", private_key = \"d\" }]\n";
    assert!(err(sni).contains("tls.sni[0].name"));
    assert!(err("[upstream]\ntransport = \"tls\"\n").contains("tls.upstream_ca"));
    assert!(
        err("[upstream]\ntls_server_name = \"not a name!\"\n").contains("upstream.tls_server_name")
    );
    let ok = Config::from_toml(
        "[sip]\nlisten_tls = [\"[::1]:5061\"]\n[tls]\ncertificate = \"a\"\nprivate_key = \"b\"\n\
         min_version = \"1.3\"\nupstream_ca = \"ca.pem\"\n\
         sni = [{ name = \"*.example.com\", certificate = \"c\", private_key = \"d\" }]\n\
         [upstream]\naddress = \"sip:pbx.example.com;transport=tls\"\n",
    )
    .unwrap();
    assert_eq!(ok.tls.min_version, TlsVersion::V13);
    assert_eq!(ok.upstream_target().transport, TransportKind::Tls);
}
