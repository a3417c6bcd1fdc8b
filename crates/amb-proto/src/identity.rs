//! Peer identities (the subject alternative names of a verified certificate) and allow-lists
//! that match them exactly and by type.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// One subject alternative name, typed. A DNS name never matches a URI, and so on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum San {
    /// A `dNSName` SAN, e.g. `client.example`.
    Dns(String),
    /// A `uniformResourceIdentifier` SAN, e.g. `spiffe://amb/client`.
    Uri(String),
    /// An `iPAddress` SAN.
    Ip(IpAddr),
}

/// Why a `dns:`/`uri:`/`ip:` string is not a SAN.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SanParseError {
    /// No recognised type prefix.
    #[error("{0:?} has no SAN type; write dns:NAME, uri:URI or ip:ADDRESS")]
    NoType(String),
    /// The value after the prefix is empty or malformed.
    #[error("{input:?} is not a valid SAN: {why}")]
    Invalid {
        /// The whole input.
        input: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

impl FromStr for San {
    type Err = SanParseError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let invalid = |why| SanParseError::Invalid {
            input: input.to_owned(),
            why,
        };
        let (kind, value) = input
            .split_once(':')
            .ok_or_else(|| SanParseError::NoType(input.to_owned()))?;
        match kind {
            "dns" => {
                if value.is_empty() || value.len() > 253 {
                    return Err(invalid("a DNS name has 1 to 253 bytes"));
                }
                if !value
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'*' | b'_'))
                {
                    return Err(invalid(
                        "a DNS name holds only letters, digits, '-', '.', '_' and '*'",
                    ));
                }
                Ok(San::Dns(value.to_owned()))
            }
            "uri" => {
                let Some((scheme, rest)) = value.split_once("://") else {
                    return Err(invalid(
                        "a URI SAN needs a scheme, e.g. spiffe://domain/name",
                    ));
                };
                if scheme.is_empty()
                    || rest.is_empty()
                    || value.bytes().any(|b| b <= b' ' || b >= 0x7f)
                {
                    return Err(invalid(
                        "a URI SAN is printable ASCII with a scheme and a body",
                    ));
                }
                Ok(San::Uri(value.to_owned()))
            }
            "ip" => value
                .parse()
                .map(San::Ip)
                .map_err(|_| invalid("not an IPv4 or IPv6 address")),
            _ => Err(SanParseError::NoType(input.to_owned())),
        }
    }
}

impl fmt::Display for San {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            San::Dns(n) => write!(f, "dns:{n}"),
            San::Uri(u) => write!(f, "uri:{u}"),
            San::Ip(ip) => write!(f, "ip:{ip}"),
        }
    }
}

impl San {
    /// Exact, typed equality. DNS names compare ASCII case-insensitively, as DNS does; nothing
    /// else is folded: no wildcard expansion, no trailing-dot trimming, no CN fallback.
    pub fn matches(&self, other: &San) -> bool {
        match (self, other) {
            (San::Dns(a), San::Dns(b)) => a.eq_ignore_ascii_case(b),
            (San::Uri(a), San::Uri(b)) => a == b,
            (San::Ip(a), San::Ip(b)) => a == b,
            _ => false,
        }
    }
}

/// Who a verified peer is: the SANs of its end-entity certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerIdentity {
    /// The certificate's subject alternative names, in certificate order.
    pub sans: Vec<San>,
}

impl fmt::Display for PeerIdentity {
    /// The most specific name: the first URI SAN, else the first DNS SAN, else the first SAN.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let best = self
            .sans
            .iter()
            .find(|s| matches!(s, San::Uri(_)))
            .or_else(|| self.sans.iter().find(|s| matches!(s, San::Dns(_))))
            .or_else(|| self.sans.first());
        match best {
            Some(san) => san.fmt(f),
            None => f.write_str("<no SAN>"),
        }
    }
}

/// The identities allowed in: a peer is let through when one of its SANs equals an entry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AllowList {
    entries: Vec<San>,
}

/// Why an allow-list entry is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("allow-list entry {0}: wildcards are not allowed; list each identity exactly")]
pub struct WildcardError(pub String);

impl AllowList {
    /// Builds an allow-list. Wildcard DNS entries are refused: matching is exact.
    pub fn new(entries: Vec<San>) -> Result<Self, WildcardError> {
        if let Some(bad) = entries
            .iter()
            .find(|s| matches!(s, San::Dns(n) if n.contains('*')))
        {
            return Err(WildcardError(bad.to_string()));
        }
        Ok(AllowList { entries })
    }

    /// Whether `peer` holds an allowed identity.
    pub fn permits(&self, peer: &PeerIdentity) -> bool {
        peer.sans
            .iter()
            .any(|have| self.entries.iter().any(|want| want.matches(have)))
    }

    /// Whether the list has no entries (and so permits no one).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn san(s: &str) -> San {
        s.parse().unwrap()
    }

    fn peer(sans: &[&str]) -> PeerIdentity {
        PeerIdentity {
            sans: sans.iter().map(|s| san(s)).collect(),
        }
    }

    #[test]
    fn parses_typed_sans() {
        assert_eq!(san("dns:a.example"), San::Dns("a.example".into()));
        assert_eq!(san("uri:spiffe://amb/c"), San::Uri("spiffe://amb/c".into()));
        assert_eq!(san("ip:127.0.0.1"), San::Ip("127.0.0.1".parse().unwrap()));
        assert_eq!(san("ip:::1"), San::Ip("::1".parse().unwrap()));
        for bad in [
            "a.example",
            "dns:",
            "dns:a b",
            "uri:nope",
            "uri:spiffe://",
            "ip:1.2.3",
            "cn:x",
        ] {
            assert!(bad.parse::<San>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn matching_is_exact_and_typed() {
        let allow =
            AllowList::new(vec![san("uri:spiffe://amb/client"), san("dns:api.example")]).unwrap();
        assert!(allow.permits(&peer(&["uri:spiffe://amb/client"])));
        assert!(
            allow.permits(&peer(&["dns:API.example"])),
            "DNS is case-insensitive"
        );
        // A URI value presented as a DNS SAN does not match, nor the other way round.
        assert!(!allow.permits(&PeerIdentity {
            sans: vec![San::Dns("spiffe://amb/client".into())]
        }));
        assert!(!allow.permits(&peer(&["uri:dns://api.example"])));
        assert!(
            !allow.permits(&peer(&["dns:api.example."])),
            "no trailing-dot folding"
        );
        assert!(
            !allow.permits(&peer(&["dns:*.example"])),
            "no wildcard expansion"
        );
        assert!(!allow.permits(&peer(&["uri:spiffe://amb/client/"])));
        assert!(!allow.permits(&peer(&["uri:SPIFFE://amb/client"])));
        assert!(!allow.permits(&peer(&[])));
    }

    #[test]
    fn wildcard_entries_are_refused() {
        assert!(AllowList::new(vec![san("dns:*.example")]).is_err());
    }

    #[test]
    fn display_prefers_uri() {
        assert_eq!(
            peer(&["dns:c", "uri:spiffe://amb/c"]).to_string(),
            "uri:spiffe://amb/c"
        );
        assert_eq!(peer(&["ip:10.0.0.1", "dns:c"]).to_string(), "dns:c");
        assert_eq!(PeerIdentity::default().to_string(), "<no SAN>");
    }
}

/// A verified peer: its identity and where it connects from, for decisions and log lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    /// The identity read from its certificate.
    pub identity: PeerIdentity,
    /// Its address as seen by this side.
    pub addr: std::net::SocketAddr,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} at {}", self.identity, self.addr)
    }
}
