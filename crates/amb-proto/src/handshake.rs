//! Why a tunnel handshake failed, in the few kinds operators count and alert on. Both
//! transports speak TLS 1.3, so both classify by the TLS alert the failing side sent.

use std::net::SocketAddr;
use std::sync::Arc;

/// The kind of a failed handshake.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HandshakeFailure {
    /// The peer's certificate does not chain to a trusted CA.
    UnknownCa,
    /// The peer's certificate is expired or not yet valid.
    Expired,
    /// The peer's certificate lacks the extended key usage of its role.
    WrongEku,
    /// The peer's certificate is otherwise unusable: malformed, for another name, revoked.
    BadCertificate,
    /// The peer presented no certificate.
    NoCertificate,
    /// The peer refused this side's certificate, or the handshake, with an alert.
    RefusedByPeer,
    /// The handshake did not finish in time.
    Timeout,
    /// Anything else: a protocol error, a connection lost halfway, no common ALPN.
    Other,
}

impl HandshakeFailure {
    /// Its name in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::UnknownCa => "unknown_ca",
            HandshakeFailure::Expired => "expired",
            HandshakeFailure::WrongEku => "wrong_eku",
            HandshakeFailure::BadCertificate => "bad_certificate",
            HandshakeFailure::NoCertificate => "no_certificate",
            HandshakeFailure::RefusedByPeer => "refused_by_peer",
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::Other => "other",
        }
    }

    /// The kind a TLS alert (RFC 8446 §6) sent by this side stands for.
    pub fn from_alert(alert: u8) -> Self {
        match alert {
            48 => HandshakeFailure::UnknownCa,
            45 => HandshakeFailure::Expired,
            43 => HandshakeFailure::WrongEku,
            116 => HandshakeFailure::NoCertificate,
            42 | 44 | 46 | 49 | 51 => HandshakeFailure::BadCertificate,
            _ => HandshakeFailure::Other,
        }
    }
}

/// One failed handshake a server saw.
#[derive(Clone, Debug)]
pub struct FailedHandshake {
    /// Who tried.
    pub peer: SocketAddr,
    /// `quic` or `tls`.
    pub transport: &'static str,
    /// Its kind.
    pub kind: HandshakeFailure,
    /// What went wrong, for the log.
    pub why: String,
}

/// Told of each handshake a server fails (it counts and logs them, at a bounded rate).
pub type OnFailedHandshake = Arc<dyn Fn(FailedHandshake) + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alerts_name_the_certificate_problem() {
        assert_eq!(
            HandshakeFailure::from_alert(48),
            HandshakeFailure::UnknownCa
        );
        assert_eq!(HandshakeFailure::from_alert(45), HandshakeFailure::Expired);
        assert_eq!(HandshakeFailure::from_alert(43), HandshakeFailure::WrongEku);
        assert_eq!(
            HandshakeFailure::from_alert(116),
            HandshakeFailure::NoCertificate
        );
        assert_eq!(
            HandshakeFailure::from_alert(42),
            HandshakeFailure::BadCertificate
        );
        assert_eq!(HandshakeFailure::from_alert(40), HandshakeFailure::Other);
    }
}
