//! The server a client dials: `HOST:PORT`, where HOST is also the name its certificate must
//! be valid for unless another is given; or `srv:NAME`, the servers SRV records list.

use std::fmt;
use std::str::FromStr;

use crate::{Discovery, HostPort};

/// A peer, as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerSpec {
    text: String,
    kind: PeerKind,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum PeerKind {
    Addr(HostPort),
    Discovered(Discovery),
}

/// Why a peer is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--peer {0:?} is not HOST:PORT (e.g. big-server:7443, 10.0.0.5:7443 or [fd00::5]:7443) nor srv:NAME (e.g. srv:_amb._tcp.example.internal)")]
pub struct PeerSpecError(String);

impl PeerSpec {
    /// One server at `addr` (e.g. an SRV record's target).
    pub fn at(addr: HostPort) -> Self {
        PeerSpec {
            text: addr.to_string(),
            kind: PeerKind::Addr(addr),
        }
    }

    /// Its address or name; `None` for a discovered set.
    pub fn addr(&self) -> Option<&HostPort> {
        match &self.kind {
            PeerKind::Addr(addr) => Some(addr),
            PeerKind::Discovered(_) => None,
        }
    }

    /// Where its servers are discovered, if they are.
    pub fn discovery(&self) -> Option<&Discovery> {
        match &self.kind {
            PeerKind::Addr(_) => None,
            PeerKind::Discovered(discovery) => Some(discovery),
        }
    }
}

impl FromStr for PeerSpec {
    type Err = PeerSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || PeerSpecError(s.to_owned());
        let kind = match Discovery::is_discovery(s) {
            true => PeerKind::Discovered(s.parse().map_err(|_| err())?),
            false => PeerKind::Addr(HostPort::parse(s).ok_or_else(err)?),
        };
        Ok(PeerSpec {
            text: s.to_owned(),
            kind,
        })
    }
}

impl fmt::Display for PeerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_names_the_server() {
        let host = |s: &str| s.parse::<PeerSpec>().unwrap().addr().unwrap().host();
        assert_eq!(host("[::1]:7443"), "::1");
        assert_eq!(host("big-server:7443"), "big-server");
        assert_eq!(
            "big-server:7443".parse::<PeerSpec>().unwrap().to_string(),
            "big-server:7443"
        );
        let srv: PeerSpec = "srv:_amb._tcp.example.internal".parse().unwrap();
        assert_eq!(
            srv.discovery(),
            Some(&Discovery::Srv("_amb._tcp.example.internal".into()))
        );
        for bad in ["big-server", "big-server:x", ":7443", "srv:a b"] {
            assert!(bad.parse::<PeerSpec>().is_err(), "{bad}");
        }
    }
}
