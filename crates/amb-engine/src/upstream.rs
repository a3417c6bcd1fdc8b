//! Dialing the configured upstream of a route. The server never dials anything else.

use std::fmt;
use std::time::Duration;

use amb_proto::Refusal;
use tokio::net::TcpStream;

/// A route's upstream: `host:port`, resolved at every dial so DNS changes are followed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream(String);

/// Why an upstream address is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream {0:?} is not HOST:PORT (e.g. redis:6379 or 10.0.0.5:5432)")]
pub struct UpstreamParseError(String);

impl std::str::FromStr for Upstream {
    type Err = UpstreamParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UpstreamParseError(s.to_owned());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if host.is_empty() || host.contains(|c: char| c.is_whitespace() || c == '/') {
            return Err(bad());
        }
        match port.parse::<u16>() {
            Ok(p) if p > 0 => Ok(Upstream(s.to_owned())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A failed upstream dial: the refusal to answer with, and the detail to log.
#[derive(Debug)]
pub struct DialFailure {
    /// What the client is told.
    pub refusal: Refusal,
    /// What is logged.
    pub detail: String,
}

impl Upstream {
    /// Connects, trying each resolved address in turn, all within `timeout`.
    pub async fn dial(&self, timeout: Duration) -> Result<TcpStream, DialFailure> {
        let attempt = async {
            let addrs = tokio::net::lookup_host(&self.0)
                .await
                .map_err(|e| DialFailure {
                    refusal: Refusal::UpstreamRefused,
                    detail: format!("resolving {}: {e}", self.0),
                })?;
            let mut last = None;
            for addr in addrs {
                match TcpStream::connect(addr).await {
                    Ok(tcp) => {
                        let _ = tcp.set_nodelay(true);
                        return Ok(tcp);
                    }
                    Err(e) => last = Some(format!("{addr}: {e}")),
                }
            }
            Err(DialFailure {
                refusal: Refusal::UpstreamRefused,
                detail: last.unwrap_or_else(|| format!("{} resolved to no address", self.0)),
            })
        };
        tokio::time::timeout(timeout, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(DialFailure {
                    refusal: Refusal::UpstreamTimeout,
                    detail: format!("no answer from {} within {timeout:?}", self.0),
                })
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port() {
        for ok in ["redis:6379", "10.0.0.5:5432", "[::1]:6379", "db.internal:1"] {
            assert!(ok.parse::<Upstream>().is_ok(), "{ok}");
        }
        for bad in [
            "redis",
            ":6379",
            "redis:0",
            "redis:99999",
            "redis:x",
            "a b:1",
            "http://x:1",
        ] {
            assert!(bad.parse::<Upstream>().is_err(), "{bad}");
        }
    }
}
