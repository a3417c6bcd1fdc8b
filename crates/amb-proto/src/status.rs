//! What a server answers a stream open with, and the codes that reset a stream later.
//!
//! The same meanings travel as one status byte over QUIC, and over HTTP/2 as an HTTP status
//! with that byte in an [`REFUSAL_HEADER`] (two refusals share 502, two 503).

use std::fmt;

/// Why a server refused to open a stream. Each maps to one HTTP status and one QUIC status byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// The stream-open request was malformed (bad header, bad route name, not a CONNECT).
    BadRequest,
    /// The peer is authenticated but not authorized for this route.
    Forbidden,
    /// The server has no route of that name.
    UnknownRoute,
    /// The upstream refused or reset the connection, or could not be resolved.
    UpstreamRefused,
    /// The upstream did not accept the connection in time.
    UpstreamTimeout,
    /// The server is at a connection or stream limit, or shutting down.
    Unavailable,
    /// Every upstream of the route is down (marked so by failed dials or health checks).
    NoHealthyUpstream,
    /// The upstream refused the credentials the route sends for the app (Redis `AUTH`).
    UpstreamAuth,
}

impl Refusal {
    /// Whether the client caused this refusal (and so spends its [`crate::RefusalBudget`]).
    pub fn is_client_fault(self) -> bool {
        matches!(
            self,
            Refusal::BadRequest | Refusal::Forbidden | Refusal::UnknownRoute
        )
    }

    /// Every refusal, for exhaustive tests and tables.
    pub const ALL: [Refusal; 8] = [
        Refusal::BadRequest,
        Refusal::Forbidden,
        Refusal::UnknownRoute,
        Refusal::UpstreamRefused,
        Refusal::UpstreamTimeout,
        Refusal::Unavailable,
        Refusal::NoHealthyUpstream,
        Refusal::UpstreamAuth,
    ];

    /// Its name in metrics and access logs.
    pub fn name(self) -> &'static str {
        match self {
            Refusal::BadRequest => "bad_request",
            Refusal::Forbidden => "forbidden",
            Refusal::UnknownRoute => "unknown_route",
            Refusal::UpstreamRefused => "upstream_refused",
            Refusal::UpstreamTimeout => "upstream_timeout",
            Refusal::Unavailable => "unavailable",
            Refusal::NoHealthyUpstream => "no_healthy_upstream",
            Refusal::UpstreamAuth => "upstream_auth",
        }
    }

    /// The HTTP status carried in the HTTP/2 CONNECT response.
    pub fn http_status(self) -> u16 {
        match self {
            Refusal::BadRequest => 400,
            Refusal::Forbidden => 403,
            Refusal::UnknownRoute => 404,
            Refusal::UpstreamRefused | Refusal::UpstreamAuth => 502,
            Refusal::Unavailable | Refusal::NoHealthyUpstream => 503,
            Refusal::UpstreamTimeout => 504,
        }
    }

    /// The refusal an HTTP/2 answer stands for: its [`REFUSAL_HEADER`] if it has a known one,
    /// else its status (see [`from_http_status`](Self::from_http_status)).
    pub fn from_http(status: u16, refusal_header: Option<&[u8]>) -> Option<Refusal> {
        let by_status = Refusal::from_http_status(status)?;
        let by_header = refusal_header
            .and_then(|h| std::str::from_utf8(h).ok()?.parse::<u8>().ok())
            .and_then(|byte| Refusal::from_status_byte(byte).err())
            .filter(|r| r.http_status() == status);
        Some(by_header.unwrap_or(by_status))
    }

    /// The refusal an HTTP status stands for; `None` for 2xx. Unknown codes map by class.
    pub fn from_http_status(status: u16) -> Option<Refusal> {
        Some(match status {
            200..=299 => return None,
            403 | 401 => Refusal::Forbidden,
            404 => Refusal::UnknownRoute,
            502 => Refusal::UpstreamRefused,
            504 => Refusal::UpstreamTimeout,
            503 | 429 => Refusal::Unavailable,
            500..=599 => Refusal::UpstreamRefused,
            _ => Refusal::BadRequest,
        })
    }

    /// The status byte a QUIC server writes instead of [`STATUS_OPEN`].
    pub fn status_byte(self) -> u8 {
        match self {
            Refusal::BadRequest => 1,
            Refusal::Forbidden => 2,
            Refusal::UnknownRoute => 3,
            Refusal::UpstreamRefused => 4,
            Refusal::UpstreamTimeout => 5,
            Refusal::Unavailable => 6,
            Refusal::NoHealthyUpstream => 7,
            Refusal::UpstreamAuth => 8,
        }
    }

    /// Decodes a QUIC status byte: `Ok(())` for [`STATUS_OPEN`], `Err(refusal)` otherwise.
    /// Unknown bytes read as [`Refusal::BadRequest`], so a newer server never looks like success.
    pub fn from_status_byte(byte: u8) -> Result<(), Refusal> {
        match byte {
            STATUS_OPEN => Ok(()),
            2 => Err(Refusal::Forbidden),
            3 => Err(Refusal::UnknownRoute),
            4 => Err(Refusal::UpstreamRefused),
            5 => Err(Refusal::UpstreamTimeout),
            6 => Err(Refusal::Unavailable),
            7 => Err(Refusal::NoHealthyUpstream),
            8 => Err(Refusal::UpstreamAuth),
            _ => Err(Refusal::BadRequest),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::BadRequest => "malformed stream open",
            Refusal::Forbidden => "peer not authorized for this route",
            Refusal::UnknownRoute => "unknown route",
            Refusal::UpstreamRefused => "upstream refused the connection",
            Refusal::UpstreamTimeout => "upstream connect timed out",
            Refusal::Unavailable => "server at capacity or shutting down",
            Refusal::NoHealthyUpstream => "no healthy upstream",
            Refusal::UpstreamAuth => "upstream auth refused",
        })
    }
}

/// The HTTP/2 response header carrying a refusal's status byte, so that refusals sharing an
/// HTTP status are told apart.
pub const REFUSAL_HEADER: &str = "amb-refusal";

/// The QUIC status byte for "stream open, upstream bytes follow".
pub const STATUS_OPEN: u8 = 0;

/// Why a live stream was reset. The numbers are HTTP/2 error codes, and QUIC uses the same
/// numbers as application error codes, so a log line reads the same for both transports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ResetCode(pub u32);

impl ResetCode {
    /// The local app or upstream aborted its connection (TCP RST or read error).
    pub const CANCEL: ResetCode = ResetCode(0x8);
    /// The TCP connection on the far side failed.
    pub const CONNECT_ERROR: ResetCode = ResetCode(0xa);
    /// The stream was refused before any work (limits, shutdown).
    pub const REFUSED: ResetCode = ResetCode(0x7);
    /// A protocol violation by the peer.
    pub const PROTOCOL: ResetCode = ResetCode(0x1);
}

impl fmt::Display for ResetCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match *self {
            ResetCode::CANCEL => "cancel",
            ResetCode::CONNECT_ERROR => "connect error",
            ResetCode::REFUSED => "refused",
            ResetCode::PROTOCOL => "protocol error",
            _ => "code",
        };
        write!(f, "{name} (0x{:x})", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_status_round_trips() {
        for r in Refusal::ALL {
            let header = r.status_byte().to_string();
            assert_eq!(
                Refusal::from_http(r.http_status(), Some(header.as_bytes())),
                Some(r)
            );
            let by_status = match r {
                Refusal::NoHealthyUpstream => Refusal::Unavailable,
                Refusal::UpstreamAuth => Refusal::UpstreamRefused,
                r => r,
            };
            assert_eq!(Refusal::from_http_status(r.http_status()), Some(by_status));
        }
        // A header that contradicts the status, or is garbage, is ignored.
        assert_eq!(
            Refusal::from_http(502, Some(b"7")),
            Some(Refusal::UpstreamRefused)
        );
        assert_eq!(
            Refusal::from_http(503, Some(b"x")),
            Some(Refusal::Unavailable)
        );
        assert_eq!(Refusal::from_http_status(200), None);
        assert_eq!(Refusal::from_http_status(418), Some(Refusal::BadRequest));
    }

    #[test]
    fn status_byte_round_trips_and_unknown_is_never_open() {
        for r in Refusal::ALL {
            assert_ne!(r.status_byte(), STATUS_OPEN);
            assert_eq!(Refusal::from_status_byte(r.status_byte()), Err(r));
        }
        assert_eq!(Refusal::from_status_byte(STATUS_OPEN), Ok(()));
        for b in 9..=255u8 {
            assert_eq!(Refusal::from_status_byte(b), Err(Refusal::BadRequest));
        }
    }
}
