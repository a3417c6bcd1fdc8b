//! The server a client dials: `HOST:PORT`, where HOST is also the name its certificate must
//! be valid for unless another is given.

use std::fmt;
use std::str::FromStr;

use crate::HostPort;

/// A peer, as the user wrote it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PeerSpec {
    text: String,
    addr: HostPort,
}

/// Why a peer is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--peer {0:?} is not HOST:PORT (e.g. big-server:7443, 10.0.0.5:7443 or [fd00::5]:7443)")]
pub struct PeerSpecError(String);

impl PeerSpec {
    /// Its address or name.
    pub fn addr(&self) -> &HostPort {
        &self.addr
    }

    /// The host, without IPv6 brackets: the name the server's certificate must match unless
    /// another is configured.
    pub fn host(&self) -> String {
        self.addr.host()
    }
}

impl FromStr for PeerSpec {
    type Err = PeerSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let addr = HostPort::parse(s).ok_or_else(|| PeerSpecError(s.to_owned()))?;
        Ok(PeerSpec {
            text: s.to_owned(),
            addr,
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
        let host = |s: &str| s.parse::<PeerSpec>().unwrap().host();
        assert_eq!(host("[::1]:7443"), "::1");
        assert_eq!(host("big-server:7443"), "big-server");
        assert_eq!(
            "big-server:7443".parse::<PeerSpec>().unwrap().to_string(),
            "big-server:7443"
        );
        for bad in ["big-server", "big-server:x", ":7443"] {
            assert!(bad.parse::<PeerSpec>().is_err(), "{bad}");
        }
    }
}
