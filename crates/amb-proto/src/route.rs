//! Route names: what a client asks the server for, never an address.

use std::fmt;
use std::str::FromStr;

/// Longest route name accepted, in bytes.
pub const MAX_ROUTE_LEN: usize = 63;

/// A validated route name such as `redis` or `pg-main`.
///
/// Lowercase ASCII letters, digits, `-`, `_` and `.`, 1 to 63 bytes, starting with a letter or
/// digit. The same string is valid as an HTTP/2 `:authority`, so both transports carry it as is.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteName(String);

/// Why a string is not a route name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteNameError {
    /// The name is empty.
    #[error("route name is empty")]
    Empty,
    /// The name is longer than [`MAX_ROUTE_LEN`].
    #[error("route name is {0} bytes long; at most {MAX_ROUTE_LEN} are allowed")]
    TooLong(usize),
    /// The name holds a byte outside the allowed set.
    #[error("route name {name:?} has {byte:?} at byte {at}; use lowercase letters, digits, '-', '_' or '.', starting with a letter or digit")]
    BadByte {
        /// The rejected name, lossily decoded.
        name: String,
        /// The offending character.
        byte: char,
        /// Its byte offset.
        at: usize,
    },
}

impl RouteName {
    /// The route a plain `--upstream` names and a plain `--listen PORT` asks for.
    pub fn default_route() -> Self {
        RouteName("default".to_owned())
    }

    /// Validates raw bytes from the wire.
    pub fn from_bytes(raw: &[u8]) -> Result<Self, RouteNameError> {
        if raw.is_empty() {
            return Err(RouteNameError::Empty);
        }
        if raw.len() > MAX_ROUTE_LEN {
            return Err(RouteNameError::TooLong(raw.len()));
        }
        for (at, &b) in raw.iter().enumerate() {
            let ok = b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || (at > 0 && matches!(b, b'-' | b'_' | b'.'));
            if !ok {
                return Err(RouteNameError::BadByte {
                    name: String::from_utf8_lossy(raw).into_owned(),
                    byte: char::from(b),
                    at,
                });
            }
        }
        // Every byte is ASCII, so this cannot fail.
        Ok(RouteName(String::from_utf8_lossy(raw).into_owned()))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for RouteName {
    type Err = RouteNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::from_bytes(s.as_bytes())
    }
}

impl fmt::Display for RouteName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_names() {
        for ok in ["redis", "pg-main", "a", "api.v2", "x_1", "0db"] {
            assert_eq!(ok.parse::<RouteName>().unwrap().as_str(), ok);
        }
    }

    #[test]
    fn rejects_addresses_and_odd_bytes() {
        for bad in [
            "",
            "Redis",
            "-x",
            ".x",
            "redis:6379",
            "10.0.0.1:22",
            "a b",
            "é",
            "a/b",
            "a\0",
        ] {
            assert!(
                bad.parse::<RouteName>().is_err(),
                "{bad:?} must be rejected"
            );
        }
        assert_eq!(
            "a".repeat(64).parse::<RouteName>(),
            Err(RouteNameError::TooLong(64))
        );
        assert!("a".repeat(63).parse::<RouteName>().is_ok());
    }

    #[test]
    fn non_utf8_is_rejected_not_panicking() {
        assert!(RouteName::from_bytes(&[0xff, 0xfe]).is_err());
    }
}
