//! Discovered sets: a name standing for endpoints that a discovery service lists and changes
//! while amb runs (`srv:_redis._tcp.example.internal`), instead of a fixed list.

use std::fmt;
use std::str::FromStr;

/// Where a set of upstreams or peers is discovered.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Discovery {
    /// DNS SRV records of this name (RFC 2782): each a target host and port, with a priority
    /// (lowest first) and a weight within it.
    Srv(String),
}

/// Why a discovery name is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: write srv:NAME with NAME a DNS name such as _redis._tcp.example.internal")]
pub struct DiscoveryError(String);

impl Discovery {
    /// Whether `text` names a discovered set (rather than an address).
    pub fn is_discovery(text: &str) -> bool {
        text.trim_start().starts_with("srv:")
    }
}

impl FromStr for Discovery {
    type Err = DiscoveryError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DiscoveryError(s.to_owned());
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn srv_names_parse_and_print_as_written() {
        let srv: Discovery = "srv:_Redis._tcp.example.internal.".parse().unwrap();
        assert_eq!(srv, Discovery::Srv("_redis._tcp.example.internal".into()));
        assert_eq!(srv.to_string(), "srv:_redis._tcp.example.internal");
        for bad in ["srv:", "srv:a..b", "srv:a b", "dns:x", "srv:a/b"] {
            assert!(bad.parse::<Discovery>().is_err(), "{bad}");
        }
        assert!(Discovery::is_discovery("srv:x"));
        assert!(!Discovery::is_discovery("x:1"));
    }
}
