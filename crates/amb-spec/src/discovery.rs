//! Discovered sets: a name standing for endpoints that a discovery service lists and changes
//! while amb runs (`srv:_redis._tcp.example.internal`, `etcd://h1:2379,h2:2379/services/redis`),
//! instead of a fixed list.

use std::fmt;
use std::str::FromStr;

use crate::HostPort;

/// Where a set of upstreams or peers is discovered.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Discovery {
    /// DNS SRV records of this name (RFC 2782): each a target host and port, with a priority
    /// (lowest first) and a weight within it.
    Srv(String),
    /// The keys under a prefix of an etcd registry, each value a `HOST:PORT`.
    Etcd(EtcdKey),
}

/// A key (or prefix) of an etcd cluster: `etcd://HOST:PORT[,HOST:PORT...]/KEY`, or
/// `etcds://...` for an etcd served over TLS.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EtcdKey {
    /// The cluster's client endpoints.
    pub endpoints: Vec<String>,
    /// Whether they are reached over TLS.
    pub tls: bool,
    /// The key, `/` first and none last: a registration's own key, or the prefix whose keys
    /// (`KEY/...`) a watch lists.
    pub key: String,
}

/// Why a discovery name is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: write srv:NAME (a DNS name such as _redis._tcp.example.internal) or etcd://HOST:PORT[,HOST:PORT...]/KEY (etcds:// for TLS)")]
pub struct DiscoveryError(String);

impl Discovery {
    /// Whether `text` names a discovered set (rather than an address).
    pub fn is_discovery(text: &str) -> bool {
        let text = text.trim_start();
        ["srv:", "etcd://", "etcds://"]
            .iter()
            .any(|scheme| text.starts_with(scheme))
    }
}

impl FromStr for EtcdKey {
    type Err = DiscoveryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DiscoveryError(s.to_owned());
        let text = s.trim();
        let (tls, rest) = match (text.strip_prefix("etcd://"), text.strip_prefix("etcds://")) {
            (Some(rest), _) => (false, rest),
            (_, Some(rest)) => (true, rest),
            _ => return Err(err()),
        };
        let (hosts, key) = rest.split_once('/').ok_or_else(err)?;
        let key = key.trim_end_matches('/');
        let endpoints = hosts
            .split(',')
            .map(|h| HostPort::parse(h).map(|_| h.to_owned()))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(err)?;
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(err());
        }
        Ok(EtcdKey {
            endpoints,
            tls,
            key: format!("/{key}"),
        })
    }
}

impl fmt::Display for EtcdKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "etcds" } else { "etcd" };
        write!(f, "{scheme}://{}{}", self.endpoints.join(","), self.key)
    }
}

impl FromStr for Discovery {
    type Err = DiscoveryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DiscoveryError(s.to_owned());
        if s.trim_start().starts_with("etcd") {
            return s.parse().map(Discovery::Etcd);
        }
        let name = s.trim().strip_prefix("srv:").ok_or_else(err)?;
        let name = name.strip_suffix('.').unwrap_or(name);
        let label_ok = |l: &str| {
            (1..=63).contains(&l.len())
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        };
        if name.len() > 253 || !name.split('.').all(label_ok) {
            return Err(err());
        }
        Ok(Discovery::Srv(name.to_ascii_lowercase()))
    }
}

impl fmt::Display for Discovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Discovery::Srv(name) => write!(f, "srv:{name}"),
            Discovery::Etcd(key) => key.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etcd_keys_name_their_endpoints_and_key() {
        let key: Discovery = "etcd://h1:2379,10.0.0.2:2379/services/redis/"
            .parse()
            .unwrap();
        let Discovery::Etcd(etcd) = &key else {
            panic!("{key:?}")
        };
        assert_eq!(etcd.endpoints, ["h1:2379", "10.0.0.2:2379"]);
        assert_eq!((etcd.tls, etcd.key.as_str()), (false, "/services/redis"));
        assert_eq!(
            key.to_string(),
            "etcd://h1:2379,10.0.0.2:2379/services/redis"
        );
        let tls: EtcdKey = "etcds://etcd:2379/amb".parse().unwrap();
        assert!(tls.tls);
        for bad in [
            "etcd://h1:2379",
            "etcd://h1/x",
            "etcd://h1:2379/",
            "etcdx://h:1/x",
            "etcd://:1/x",
        ] {
            assert!(bad.parse::<Discovery>().is_err(), "{bad}");
        }
    }

    #[test]
    fn srv_names_parse_and_print_as_written() {
        let srv: Discovery = "srv:_Redis._tcp.example.internal.".parse().unwrap();
        assert_eq!(srv, Discovery::Srv("_redis._tcp.example.internal".into()));
        assert_eq!(srv.to_string(), "srv:_redis._tcp.example.internal");
        for bad in ["srv:", "srv:a..b", "srv:a b", "dns:x", "srv:a/b"] {
            assert!(bad.parse::<Discovery>().is_err(), "{bad}");
        }
        assert!(Discovery::is_discovery("srv:x"));
        assert!(Discovery::is_discovery("etcd://h:2379/x"));
        assert!(!Discovery::is_discovery("x:1"));
    }
}
