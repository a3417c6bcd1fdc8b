//! The PROXY protocol v2 header a route with `proxy-protocol = "v2"` sends first on each
//! upstream connection: the app's original source and destination (as the client ambassador
//! told them), and the verified peer's identity in a TLV of its own, so the upstream can log
//! or authorize on who really called. amb never parses a PROXY header: one arriving from an
//! app is its data.

use amb_proto::{AppAddrs, PeerIdentity, San};
use ppp::v2::{Addresses, Builder, Command, Protocol, Version};

/// The TLV type that carries the peer's identity (the first URI SAN of its certificate, else
/// its first DNS SAN), in the range the PROXY protocol leaves to applications (0xE0–0xEF).
pub const PP2_TYPE_AMB_IDENTITY: u8 = 0xE0;

/// Who an upstream connection is for.
#[derive(Clone, Copy, Debug)]
pub struct Origin<'a> {
    /// The app's connection, if the client told it.
    pub app: Option<AppAddrs>,
    /// The verified peer.
    pub identity: &'a PeerIdentity,
}

/// The identity a PROXY header names: the first URI SAN, else the first DNS SAN.
fn identity_name(identity: &PeerIdentity) -> Option<&str> {
    let uri = identity.sans.iter().find_map(|san| match san {
        San::Uri(uri) => Some(uri.as_str()),
        _ => None,
    });
    uri.or_else(|| {
        identity.sans.iter().find_map(|san| match san {
            San::Dns(name) => Some(name.as_str()),
            _ => None,
        })
    })
}

/// The header for a connection made for `origin`: PROXY with the app's addresses and the
/// identity TLV; LOCAL (the ambassador's own connection, as a health check's) without one.
/// An error (an identity too long for a TLV) means no header: the caller refuses the stream.
pub fn proxy_v2_header(origin: Option<&Origin<'_>>) -> Result<Vec<u8>, String> {
    let header = match origin {
        Some(origin) => {
            let (addresses, protocol) = match origin.app {
                Some(app) => {
                    let app = app.one_family();
                    (
                        Addresses::from((app.source, app.destination)),
                        Protocol::Stream,
                    )
                }
                // A client of before version 2: who called is known, from where is not.
                None => (Addresses::Unspecified, Protocol::Unspecified),
            };
            let builder =
                Builder::with_addresses(Version::Two | Command::Proxy, protocol, addresses);
            match identity_name(origin.identity) {
                Some(name) => builder
                    .write_tlv(PP2_TYPE_AMB_IDENTITY, name.as_bytes())
                    .and_then(Builder::build),
                None => builder.build(),
            }
        }
        None => Builder::with_addresses(
            Version::Two | Command::Local,
            Protocol::Unspecified,
            Addresses::Unspecified,
        )
        .build(),
    };
    header.map_err(|e| format!("building the PROXY header: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Header, TypeLengthValue};

    fn identity(sans: &[San]) -> PeerIdentity {
        PeerIdentity {
            sans: sans.to_vec(),
        }
    }

    #[test]
    fn the_header_carries_the_apps_addresses_and_the_uri_san() {
        let peer = identity(&[
            San::Dns("web.internal".into()),
            San::Uri("spiffe://amb/web".into()),
        ]);
        let app = AppAddrs {
            source: "192.0.2.7:50000".parse().unwrap(),
            destination: "127.0.0.1:6379".parse().unwrap(),
        };
        let origin = Origin {
            app: Some(app),
            identity: &peer,
        };
        let bytes = proxy_v2_header(Some(&origin)).unwrap();
        let header = Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(header.command, Command::Proxy);
        assert_eq!(
            header.addresses,
            Addresses::from((app.source, app.destination))
        );
        let tlvs: Vec<TypeLengthValue<'_>> = header.tlvs().map(Result::unwrap).collect();
        assert_eq!(tlvs.len(), 1);
        assert_eq!(tlvs[0].kind, PP2_TYPE_AMB_IDENTITY);
        assert_eq!(&*tlvs[0].value, b"spiffe://amb/web");
    }

    #[test]
    fn a_dns_san_stands_in_for_a_missing_uri_and_v6_stays_v6() {
        let peer = identity(&[
            San::Ip("10.0.0.1".parse().unwrap()),
            San::Dns("worker".into()),
        ]);
        let app = AppAddrs {
            source: "[2001:db8::7]:1".parse().unwrap(),
            destination: "[::1]:2".parse().unwrap(),
        };
        let origin = Origin {
            app: Some(app),
            identity: &peer,
        };
        let bytes = proxy_v2_header(Some(&origin)).unwrap();
        let header = Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(
            header.addresses,
            Addresses::from((app.source, app.destination))
        );
        let tlv = header.tlvs().next().unwrap().unwrap();
        assert_eq!(&*tlv.value, b"worker");
    }

    #[test]
    fn without_an_origin_the_header_is_local() {
        let bytes = proxy_v2_header(None).unwrap();
        let header = Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(header.command, Command::Local);
        assert_eq!(header.addresses, Addresses::Unspecified);
        assert_eq!(header.tlvs().count(), 0);
        // An identity but no addresses (a client of before version 2): PROXY, unspecified.
        let peer = identity(&[San::Uri("spiffe://amb/old".into())]);
        let bytes = proxy_v2_header(Some(&Origin {
            app: None,
            identity: &peer,
        }))
        .unwrap();
        let header = Header::try_from(bytes.as_slice()).unwrap();
        assert_eq!(header.command, Command::Proxy);
        assert_eq!(header.addresses, Addresses::Unspecified);
    }
}
