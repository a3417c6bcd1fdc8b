//! `HOST:PORT`, where HOST is a name or an IP address (IPv6 in brackets).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

/// A host and port as written: an address dialed as it is, or a name to look up.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum HostPort {
    /// An IP address and port.
    Addr(SocketAddr),
    /// A DNS name and port.
    Name {
        /// The name, without a port.
        host: String,
        /// The port.
        port: u16,
    },
}

impl HostPort {
    /// Parses `host:port` (`[v6]:port` for IPv6). `None` when the host is empty or holds
    /// whitespace or `/`, or the port is not in 1..=65535.
    pub fn parse(s: &str) -> Option<Self> {
        let (host, port) = s.rsplit_once(':')?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return None;
        }
        let port = port.parse::<u16>().ok().filter(|p| *p > 0)?;
        Some(match host.parse::<IpAddr>() {
            Ok(ip) => HostPort::Addr(SocketAddr::new(ip, port)),
            Err(_) => HostPort::Name {
                host: host.to_owned(),
                port,
            },
        })
    }

    /// The host: the name, or the IP address without brackets.
    pub fn host(&self) -> String {
        match self {
            HostPort::Addr(addr) => addr.ip().to_string(),
            HostPort::Name { host, .. } => host.clone(),
        }
    }

    /// The port.
    pub fn port(&self) -> u16 {
        match self {
            HostPort::Addr(addr) => addr.port(),
            HostPort::Name { port, .. } => *port,
        }
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPort::Addr(addr) => addr.fmt(f),
            HostPort::Name { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names() {
        assert_eq!(
            HostPort::parse("[::1]:6379"),
            Some(HostPort::Addr("[::1]:6379".parse().unwrap()))
        );
        assert_eq!(
            HostPort::parse("10.0.0.5:5432"),
            Some(HostPort::Addr("10.0.0.5:5432".parse().unwrap()))
        );
        let name = HostPort::parse("db.internal:1").unwrap();
        assert_eq!((name.host().as_str(), name.port()), ("db.internal", 1));
        assert_eq!(name.to_string(), "db.internal:1");
        for bad in [
            "redis",
            ":1",
            "a:0",
            "a:70000",
            "a:x",
            "a b:1",
            "http://x:1",
        ] {
            assert_eq!(HostPort::parse(bad), None, "{bad}");
        }
    }
}
