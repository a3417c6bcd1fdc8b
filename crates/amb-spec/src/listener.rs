//! Client listener specs: `[ADDR:]PORT[=ROUTE]`. A bare port binds loopback only, so a
//! plaintext listener is never exposed by accident.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;

use amb_proto::RouteName;

use crate::PeerSpec;

/// One local listener and the route its connections ask for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerSpec {
    /// Where to listen.
    pub addr: SocketAddr,
    /// The route to open for each connection.
    pub route: RouteName,
    /// The server its connections go to, when not the client's own `--peer`.
    pub peer: Option<PeerSpec>,
}

/// Why a listener spec is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--listen {input:?}: {why}; write PORT, ADDR:PORT, or either followed by =ROUTE (e.g. 6379=redis)")]
pub struct ListenerSpecError {
    input: String,
    why: String,
}

impl FromStr for ListenerSpec {
    type Err = ListenerSpecError;
    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let err = |why: String| ListenerSpecError {
            input: input.to_owned(),
            why,
        };
        let (addr, route) = match input.split_once('=') {
            Some((addr, route)) => (
                addr,
                route
                    .parse()
                    .map_err(|e: amb_proto::RouteNameError| err(e.to_string()))?,
            ),
            None => (input, RouteName::default_route()),
        };
        let addr = match addr.parse::<u16>() {
            Ok(port) => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
            Err(_) => addr
                .parse::<SocketAddr>()
                .map_err(|_| err(format!("{addr:?} is neither a port nor an IP:PORT address")))?,
        };
        Ok(ListenerSpec {
            addr,
            route,
            peer: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_port_is_loopback_and_default_route() {
        let s: ListenerSpec = "6379".parse().unwrap();
        assert_eq!(s.addr, "127.0.0.1:6379".parse().unwrap());
        assert_eq!(s.route.as_str(), "default");
    }

    #[test]
    fn address_and_route() {
        let s: ListenerSpec = "0.0.0.0:5432=pg".parse().unwrap();
        assert_eq!(s.addr, "0.0.0.0:5432".parse().unwrap());
        assert_eq!(s.route.as_str(), "pg");
        let s: ListenerSpec = "[::1]:1=a".parse().unwrap();
        assert_eq!(s.addr, "[::1]:1".parse().unwrap());
        for bad in ["", "x", "6379=", "6379=Bad", "70000", "localhost:1"] {
            assert!(bad.parse::<ListenerSpec>().is_err(), "{bad}");
        }
    }
}
