//! A route's upstream as configured: `host:port`, or `unix:PATH` for a service on this host.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::HostPort;

/// A route's upstream, as the user wrote it: plain data, compared by what was written.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct UpstreamSpec {
    text: String,
    target: UpstreamTarget,
}

/// Where an upstream is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamTarget {
    /// Over TCP, at an address or a name to look up.
    Tcp(HostPort),
    /// A Unix socket on this host, by absolute path.
    Unix(PathBuf),
}

/// Why an upstream address is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream {0:?} is not HOST:PORT, or unix:PATH with an absolute PATH of at most 107 bytes (e.g. redis:6379, 10.0.0.5:5432 or unix:/run/redis/redis.sock)")]
pub struct UpstreamSpecError(String);

impl UpstreamSpec {
    /// Where it is.
    pub fn target(&self) -> &UpstreamTarget {
        &self.target
    }
}

impl FromStr for UpstreamSpec {
    type Err = UpstreamSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || UpstreamSpecError(s.to_owned());
        let target = match s.strip_prefix("unix:") {
            Some(path) => {
                // Absolute, so a dial does not depend on the working directory; and short
                // enough for a socket address (no NUL, at most 107 bytes), so it fails here,
                // not per dial.
                let fits = std::os::unix::net::SocketAddr::from_pathname(path).is_ok();
                if !path.starts_with('/') || !fits {
                    return Err(bad());
                }
                UpstreamTarget::Unix(path.into())
            }
            None => UpstreamTarget::Tcp(HostPort::parse(s).ok_or_else(bad)?),
        };
        Ok(UpstreamSpec {
            text: s.to_owned(),
            target,
        })
    }
}

impl fmt::Display for UpstreamSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_host_port_and_unix_paths() {
        for ok in [
            "redis:6379",
            "10.0.0.5:5432",
            "[::1]:6379",
            "db.internal:1",
            "unix:/run/redis/redis.sock",
        ] {
            let spec = ok.parse::<UpstreamSpec>().unwrap();
            assert_eq!(spec.to_string(), ok);
        }
        for bad in [
            "redis",
            ":6379",
            "redis:0",
            "redis:99999",
            "redis:x",
            "a b:1",
            "http://x:1",
            "unix:",
            "unix:/run/a\0b",
            "unix:relative.sock",
            "unix:6379",
        ] {
            assert!(bad.parse::<UpstreamSpec>().is_err(), "{bad}");
        }
        // A socket path holds at most 107 bytes.
        let path = |len: usize| format!("unix:/{}", "a".repeat(len - 1));
        assert!(path(107).parse::<UpstreamSpec>().is_ok());
        assert!(path(108).parse::<UpstreamSpec>().is_err());
    }

    #[test]
    fn only_names_are_looked_up() {
        let target = |s: &str| s.parse::<UpstreamSpec>().unwrap().target;
        assert_eq!(
            target("10.0.0.5:5432"),
            UpstreamTarget::Tcp(HostPort::Addr("10.0.0.5:5432".parse().unwrap()))
        );
        assert!(matches!(
            target("localhost:6379"),
            UpstreamTarget::Tcp(HostPort::Name { .. })
        ));
        assert_eq!(
            target("unix:/run/r.sock"),
            UpstreamTarget::Unix("/run/r.sock".into())
        );
    }

    #[test]
    fn specs_compare_by_what_was_written() {
        let a: UpstreamSpec = "redis:6379".parse().unwrap();
        assert_eq!(a, "redis:6379".parse().unwrap());
        assert_ne!(a, "redis:6380".parse().unwrap());
    }
}
