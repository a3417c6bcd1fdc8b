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

/// Peers separated by commas, as `--peer` and `AMB_PEER` take them: `a:7443,b:7443`. The
/// commas of an etcd key's endpoint list (`etcd://h1:2379,h2:2379/amb`) stay inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerList(pub Vec<PeerSpec>);

impl FromStr for PeerList {
    type Err = PeerSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut items: Vec<String> = Vec::new();
        for piece in s.split(',') {
            match items.last_mut() {
                // An etcd URL's endpoints run until its key's first `/`.
                Some(open) if open.starts_with("etcd") && !has_path(open) => {
                    open.push(',');
                    open.push_str(piece);
                }
                _ => items.push(piece.to_owned()),
            }
        }
        items
            .iter()
            .map(|p| p.parse())
            .collect::<Result<_, _>>()
            .map(PeerList)
    }
}

/// Whether an `etcd://` URL has reached its key.
fn has_path(url: &str) -> bool {
    url.split_once("://")
        .is_some_and(|(_, rest)| rest.contains('/'))
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
        let list: PeerList = "a:1,etcd://h1:2379,h2:2379/amb,srv:_x._tcp.y,b:2"
            .parse()
            .unwrap();
        let texts: Vec<String> = list.0.iter().map(ToString::to_string).collect();
        assert_eq!(
            texts,
            ["a:1", "etcd://h1:2379,h2:2379/amb", "srv:_x._tcp.y", "b:2"]
        );
        for bad in ["big-server", "big-server:x", ":7443", "srv:a b"] {
            assert!(bad.parse::<PeerSpec>().is_err(), "{bad}");
        }
    }
}
