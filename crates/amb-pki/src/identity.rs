//! A verified peer's identity, read from its end-entity certificate.

use std::net::IpAddr;

use amb_proto::{PeerIdentity, San};
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

/// Reads the typed SANs of `cert`. Only DNS, URI and IP SANs count; a certificate without them
/// has an empty identity, which no allow-list matches (there is no CN fallback). DNS and URI
/// SANs that break the `--allow` syntax are ignored.
pub fn peer_identity(cert: &CertificateDer<'_>) -> PeerIdentity {
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(cert) else {
        return PeerIdentity::default();
    };
    let Ok(Some(san)) = parsed.subject_alternative_name() else {
        return PeerIdentity::default();
    };
    let sans = san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            // The same syntax rules as `--allow` entries: a name with spaces, control bytes or
            // other junk is dropped, so it can neither match nor reach a log line.
            GeneralName::DNSName(n) => format!("dns:{n}").parse().ok(),
            GeneralName::URI(u) => format!("uri:{u}").parse().ok(),
            GeneralName::IPAddress(raw) => ip_from_bytes(raw).map(San::Ip),
            _ => None,
        })
        .collect();
    PeerIdentity { sans }
}

fn ip_from_bytes(raw: &[u8]) -> Option<IpAddr> {
    match raw.len() {
        4 => <[u8; 4]>::try_from(raw).ok().map(IpAddr::from),
        16 => <[u8; 16]>::try_from(raw).ok().map(IpAddr::from),
        _ => None,
    }
}
