//! Country of an address, from a MaxMind DB (MMDB) country database, for the block table's
//! "country" column. Optional: without `geoip.database` the column shows "-".
//!
//! Where operators get a database (both free, both refreshed monthly, both in the GeoIP2-Country
//! layout read here):
//! - DB-IP "IP to Country Lite" (`dbip-country-lite-YYYY-MM.mmdb`), CC BY 4.0, no account needed:
//!   <https://db-ip.com/db/download/ip-to-country-lite>.
//! - MaxMind GeoLite2-Country (`GeoLite2-Country.mmdb`), with a free MaxMind account; their
//!   `geoipupdate` tool keeps it current.
//!
//! City databases (GeoLite2-City, dbip-city-lite) work too: they carry the same country record.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use maxminddb::Reader;
use serde::Deserialize;

use crate::blocks::canonical_ip;

/// An open country database, held in memory (country databases are a few MB).
pub struct GeoIp {
    reader: Reader<Vec<u8>>,
    path: PathBuf,
}

impl std::fmt::Debug for GeoIp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoIp")
            .field("path", &self.path)
            .field("type", &self.reader.metadata.database_type)
            .finish()
    }
}

/// The part of a GeoIP2-Country record we read; other fields are skipped.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow)]
    country: Option<Named<'a>>,
    /// Where the network is registered; used when the database has no `country` for it
    /// (anycast and some satellite ranges).
    #[serde(borrow)]
    registered_country: Option<Named<'a>>,
}

#[derive(Deserialize)]
struct Named<'a> {
    iso_code: Option<&'a str>,
    #[serde(borrow)]
    names: Option<BTreeMap<&'a str, &'a str>>,
}

impl Named<'_> {
    fn display(&self) -> Option<String> {
        let name = self.names.as_ref().and_then(|n| n.get("en").copied());
        name.or(self.iso_code)
            .filter(|s| !s.is_empty())
            .map(|s| s.chars().filter(|c| !c.is_control()).collect())
    }
}

impl GeoIp {
    /// Open and check a database file. The error says which file and what is wrong with it.
    ///
    /// The reader indexes the file by offsets taken from the file itself, and a corrupt file can
    /// make it panic; opening catches that and probes a few lookups, so a bad file is refused
    /// here rather than failing later on a request.
    pub fn open(path: impl AsRef<Path>) -> Result<GeoIp, String> {
        let path = path.as_ref();
        let err = |e: &dyn std::fmt::Display| format!("geoip database {}: {e}", path.display());
        let buf = std::fs::read(path).map_err(|e| err(&e))?;
        let probe = std::panic::catch_unwind(move || {
            let reader = Reader::from_source(buf)?;
            for ip in ["1.1.1.1", "192.0.2.1", "2001:db8::1", "2a00::1"] {
                if let Ok(ip) = ip.parse::<IpAddr>() {
                    if ip.is_ipv4() || reader.metadata.ip_version == 6 {
                        let _ = reader.lookup::<Record<'_>>(ip);
                    }
                }
            }
            Ok::<_, maxminddb::MaxMindDbError>(reader)
        });
        match probe {
            Ok(Ok(reader)) => Ok(GeoIp {
                reader,
                path: path.to_path_buf(),
            }),
            Ok(Err(e)) => Err(err(&e)),
            Err(_) => Err(err(&"corrupt database (the reader failed on it)")),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `database_type` from the file's metadata, e.g. `GeoLite2-Country`, `DBIP-Country-Lite`.
    pub fn database_type(&self) -> &str {
        &self.reader.metadata.database_type
    }

    /// The English country name (the ISO code when the database has no English name), or
    /// `None` when the address is not in the database (private ranges, unallocated space).
    pub fn country(&self, ip: IpAddr) -> Option<String> {
        let ip = canonical_ip(ip);
        if ip.is_ipv6() && self.reader.metadata.ip_version == 4 {
            return None;
        }
        match self.reader.lookup::<Record<'_>>(ip) {
            Ok(Some(r)) => r
                .country
                .as_ref()
                .and_then(Named::display)
                .or_else(|| r.registered_country.as_ref().and_then(Named::display)),
            Ok(None) => None,
            Err(e) => {
                tracing::debug!(%ip, error = %e, "geoip lookup failed");
                None
            }
        }
    }
}

/// A minimal MMDB writer, for tests and fixtures: builds real database files that the
/// `maxminddb` reader opens, with GeoIP2-Country shaped records.
#[cfg(any(test, feature = "test-util"))]
pub mod testdb {
    use ipnet::IpNet;

    pub enum Value {
        Str(String),
        U16(u16),
        U32(u32),
        U64(u64),
        Map(Vec<(String, Value)>),
        Array(Vec<Value>),
    }

    /// A GeoIP2-Country record: `{"country": {"iso_code", "names": {"en"}}}`.
    pub fn country(iso: &str, name_en: &str) -> Value {
        Value::Map(vec![(
            "country".into(),
            Value::Map(vec![
                ("iso_code".into(), Value::Str(iso.into())),
                (
                    "names".into(),
                    Value::Map(vec![("en".into(), Value::Str(name_en.into()))]),
                ),
            ]),
        )])
    }

    fn control(out: &mut Vec<u8>, kind: u8, size: usize) {
        let (bits, extra): (u8, Vec<u8>) = match size {
            0..=28 => (size as u8, vec![]),
            29..=284 => (29, vec![(size - 29) as u8]),
            285..=65_820 => (30, ((size - 285) as u16).to_be_bytes().to_vec()),
            _ => (31, ((size - 65_821) as u32).to_be_bytes()[1..].to_vec()),
        };
        if kind <= 7 {
            out.push((kind << 5) | bits);
        } else {
            out.push(bits);
            out.push(kind - 7);
        }
        out.extend(extra);
    }

    fn uint(out: &mut Vec<u8>, kind: u8, v: u64) {
        let bytes = v.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        control(out, kind, 8 - skip);
        out.extend(&bytes[skip..]);
    }

    pub fn encode(out: &mut Vec<u8>, v: &Value) {
        match v {
            Value::Str(s) => {
                control(out, 2, s.len());
                out.extend(s.as_bytes());
            }
            Value::U16(n) => uint(out, 5, u64::from(*n)),
            Value::U32(n) => uint(out, 6, u64::from(*n)),
            Value::U64(n) => uint(out, 9, *n),
            Value::Map(kv) => {
                control(out, 7, kv.len());
                for (k, v) in kv {
                    encode(out, &Value::Str(k.clone()));
                    encode(out, v);
                }
            }
            Value::Array(items) => {
                control(out, 11, items.len());
                for v in items {
                    encode(out, v);
                }
            }
        }
    }

    #[derive(Clone, Copy)]
    enum Rec {
        Empty,
        Node(usize),
        Data(usize),
    }

    /// An IPv6 database (IPv4 networks live under `::/96`, as in the real ones) with 24-bit
    /// records. `build_epoch` is fixed so the output is reproducible.
    pub fn build(database_type: &str, networks: &[(IpNet, Value)]) -> Vec<u8> {
        let mut data = Vec::new();
        let mut nodes: Vec<[Rec; 2]> = vec![[Rec::Empty; 2]];
        for (net, value) in networks {
            let offset = data.len();
            encode(&mut data, value);
            let (bits, len) = match net {
                IpNet::V4(n) => (u128::from(u32::from(n.network())), 96 + n.prefix_len()),
                IpNet::V6(n) => (u128::from(n.network()), n.prefix_len()),
            };
            let mut node = 0;
            for i in 0..usize::from(len) {
                let bit = ((bits >> (127 - i)) & 1) as usize;
                if i + 1 == usize::from(len) {
                    nodes[node][bit] = Rec::Data(offset);
                    break;
                }
                node = match nodes[node][bit] {
                    Rec::Node(n) => n,
                    other => {
                        // Empty, or a shorter network being split: both halves inherit it.
                        let fill = if let Rec::Data(_) = other {
                            other
                        } else {
                            Rec::Empty
                        };
                        nodes.push([fill; 2]);
                        let n = nodes.len() - 1;
                        nodes[node][bit] = Rec::Node(n);
                        n
                    }
                };
            }
        }
        let count = nodes.len();
        let mut out = Vec::new();
        for node in &nodes {
            for rec in node {
                let v = match *rec {
                    Rec::Empty => count,
                    Rec::Node(n) => n,
                    Rec::Data(off) => count + 16 + off,
                };
                out.extend(&(v as u32).to_be_bytes()[1..]);
            }
        }
        out.extend([0u8; 16]);
        out.extend(&data);
        out.extend(b"\xab\xcd\xefMaxMind.com");
        let meta = Value::Map(vec![
            ("binary_format_major_version".into(), Value::U16(2)),
            ("binary_format_minor_version".into(), Value::U16(0)),
            ("build_epoch".into(), Value::U64(1_700_000_000)),
            ("database_type".into(), Value::Str(database_type.into())),
            (
                "description".into(),
                Value::Map(vec![(
                    "en".into(),
                    Value::Str("sipwarden test database".into()),
                )]),
            ),
            ("ip_version".into(), Value::U16(6)),
            (
                "languages".into(),
                Value::Array(vec![Value::Str("en".into())]),
            ),
            ("node_count".into(), Value::U32(count as u32)),
            ("record_size".into(), Value::U16(24)),
        ]);
        encode(&mut out, &meta);
        out
    }

    /// The database the dashboard browser test uses (`tests/dashboard/test-country.mmdb`):
    /// documentation and loopback ranges mapped to made-up countries.
    pub fn fixture() -> Vec<u8> {
        let net = |s: &str| s.parse::<IpNet>().unwrap_or_else(|_| IpNet::default());
        build(
            "sipwarden-Test-Country",
            &[
                (net("127.0.0.0/8"), country("XL", "Loopbackia")),
                (net("192.0.2.0/24"), country("XA", "Testland")),
                (net("198.51.100.0/24"), country("XB", "Examplestan")),
                (net("203.0.113.0/24"), country("XC", "Docmark")),
                (net("2001:db8::/32"), country("XD", "Sixland")),
            ],
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), bytes).unwrap();
        f
    }

    #[test]
    fn looks_up_v4_v6_and_mapped_addresses() {
        let f = write(&testdb::fixture());
        let g = GeoIp::open(f.path()).unwrap();
        assert_eq!(g.database_type(), "sipwarden-Test-Country");
        let c = |s: &str| g.country(s.parse().unwrap());
        assert_eq!(c("192.0.2.77").as_deref(), Some("Testland"));
        assert_eq!(c("198.51.100.1").as_deref(), Some("Examplestan"));
        assert_eq!(c("::ffff:198.51.100.1").as_deref(), Some("Examplestan"));
        assert_eq!(c("127.0.0.7").as_deref(), Some("Loopbackia"));
        assert_eq!(c("2001:db8:1:2::5").as_deref(), Some("Sixland"));
        assert_eq!(c("10.1.2.3"), None);
        assert_eq!(c("2001:db9::1"), None);
    }

    #[test]
    fn iso_code_when_no_english_name_and_registered_country_fallback() {
        use testdb::Value;
        let rec = Value::Map(vec![(
            "registered_country".into(),
            Value::Map(vec![("iso_code".into(), Value::Str("SI".into()))]),
        )]);
        let f = write(&testdb::build(
            "GeoLite2-Country",
            &[("192.0.2.0/25".parse().unwrap(), rec)],
        ));
        let g = GeoIp::open(f.path()).unwrap();
        assert_eq!(
            g.country("192.0.2.1".parse().unwrap()).as_deref(),
            Some("SI")
        );
        assert_eq!(g.country("192.0.2.200".parse().unwrap()), None);
    }

    #[test]
    fn corrupt_search_tree_is_refused_at_open() {
        let mut db = testdb::fixture();
        // Point the root's records far past the end of the file.
        db[..6].copy_from_slice(&[0x7f, 0xff, 0xff, 0x7f, 0xff, 0xff]);
        let f = write(&db);
        // Whatever the reader makes of it, open either refuses it or gives a usable reader.
        if let Ok(g) = GeoIp::open(f.path()) {
            let _ = g.country("192.0.2.1".parse().unwrap());
        }
        let mut db = testdb::fixture();
        let n = db.len();
        db.truncate(n - 40);
        assert!(
            GeoIp::open(write(&db).path()).is_err(),
            "truncated metadata"
        );
    }

    #[test]
    fn open_errors_name_the_file() {
        let f = write(b"this is not a database");
        let err = GeoIp::open(f.path()).unwrap_err();
        assert!(err.contains(&f.path().display().to_string()), "{err}");
        let err = GeoIp::open("/nonexistent/x.mmdb").unwrap_err();
        assert!(err.contains("/nonexistent/x.mmdb"), "{err}");
    }

    /// The browser test's database is generated by [`testdb::fixture`]; this keeps the committed
    /// file current. `SIPWARDEN_WRITE_FIXTURES=1 cargo test --lib geoip` rewrites it.
    #[test]
    fn dashboard_fixture_is_current() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/dashboard/test-country.mmdb");
        let want = testdb::fixture();
        if std::env::var_os("SIPWARDEN_WRITE_FIXTURES").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} is stale: rerun with SIPWARDEN_WRITE_FIXTURES=1",
            path.display()
        );
    }
}
