//! The QUIC stream-open header. Version 1: `[1][route length: u8][route bytes]`. Version 2
//! adds the app's connection: `[2][route length][route][family: u8][source IP][destination
//! IP][source port: u16][destination port: u16]`, family 4 or 6, big-endian as in PROXY
//! protocol v2; two IPv4 addresses are always written as family 4, so each header has one
//! encoding. A client writes version 2 only on a connection whose
//! ALPN is [`ALPN_QUIC_2`](crate::ALPN_QUIC_2), so a server of before version 2 never sees one.
//!
//! The client writes it at the start of every bidirectional stream, followed at once by the
//! app's first bytes; the server answers with one status byte before any upstream bytes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{BufMut, Bytes, BytesMut};

use crate::route::{RouteName, RouteNameError, MAX_ROUTE_LEN};
use crate::WIRE_VERSION;

/// The header version that carries the app's connection.
pub const WIRE_VERSION_APP: u8 = 2;

/// Longest possible header, so a server can bound what it reads before deciding.
pub const MAX_HEADER_LEN: usize = 2 + MAX_ROUTE_LEN + 1 + 36;

/// The app's connection as the client ambassador accepted it: where the app connected from,
/// and the address it connected to. What a server's PROXY protocol header tells the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AppAddrs {
    /// The app's address.
    pub source: SocketAddr,
    /// The address the app connected to (the client ambassador's listener).
    pub destination: SocketAddr,
}

impl AppAddrs {
    /// Both addresses in one family: IPv4 when both are (or map to) IPv4, else IPv6, as a
    /// PROXY header and this header carry them.
    pub fn one_family(self) -> Self {
        let (s, d) = (self.source, self.destination);
        match (s.ip().to_canonical(), d.ip().to_canonical()) {
            (IpAddr::V4(si), IpAddr::V4(di)) => AppAddrs {
                source: SocketAddr::new(si.into(), s.port()),
                destination: SocketAddr::new(di.into(), d.port()),
            },
            (si, di) => AppAddrs {
                source: SocketAddr::new(IpAddr::V6(v6(si)), s.port()),
                destination: SocketAddr::new(IpAddr::V6(v6(di)), d.port()),
            },
        }
    }
}

fn v6(ip: IpAddr) -> Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}

/// A decoded stream-open header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenHeader {
    /// The route the client asks for.
    pub route: RouteName,
    /// The app's connection, if the client told it (version 2).
    pub app: Option<AppAddrs>,
    /// How many bytes of the input the header took; app bytes start there.
    pub len: usize,
}

/// Why a stream-open header is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The client speaks another wire version.
    #[error("stream header has wire version {0}; this server speaks versions {WIRE_VERSION} and {WIRE_VERSION_APP}")]
    Version(u8),
    /// The route name is not valid.
    #[error("stream header has a bad route name: {0}")]
    Route(#[from] RouteNameError),
    /// The app's addresses are of no known family.
    #[error("stream header has app addresses of unknown family {0}")]
    Family(u8),
    /// Two IPv4 addresses written as IPv6 (the encoder writes them as IPv4).
    #[error("stream header has IPv4 app addresses written as IPv6")]
    MappedV4,
}

/// Encodes the header that opens a stream to `route`: version 2 with the app's connection if
/// given (the server speaks it), else version 1.
pub fn encode_open_header(route: &RouteName, app: Option<AppAddrs>) -> Bytes {
    let name = route.as_str().as_bytes();
    let mut buf = BytesMut::with_capacity(2 + name.len() + app.map_or(0, |_| 37));
    buf.put_u8(if app.is_some() {
        WIRE_VERSION_APP
    } else {
        WIRE_VERSION
    });
    // A RouteName is at most MAX_ROUTE_LEN (63) bytes, so its length fits in one byte.
    buf.put_u8(name.len() as u8);
    buf.put_slice(name);
    if let Some(app) = app {
        let app = app.one_family();
        match (app.source.ip(), app.destination.ip()) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                buf.put_u8(4);
                buf.put_slice(&s.octets());
                buf.put_slice(&d.octets());
            }
            (s, d) => {
                buf.put_u8(6);
                buf.put_slice(&v6(s).octets());
                buf.put_slice(&v6(d).octets());
            }
        }
        buf.put_u16(app.source.port());
        buf.put_u16(app.destination.port());
    }
    buf.freeze()
}

/// How many bytes the header starting `buf` takes, as far as `buf` tells: a server reads
/// that many before it decodes again (never past the header, so no app byte is read early).
pub fn open_header_needs(buf: &[u8]) -> usize {
    let (Some(&version), Some(&route_len)) = (buf.first(), buf.get(1)) else {
        return 2;
    };
    let after_route = 2 + usize::from(route_len);
    if version != WIRE_VERSION_APP {
        return after_route;
    }
    match buf.get(after_route) {
        Some(4) => after_route + 1 + 12,
        Some(6) => after_route + 1 + 36,
        // Not yet read, or a family the decoder refuses.
        _ => after_route + 1,
    }
}

/// Decodes a header from the start of `buf`.
///
/// `Ok(None)` means more bytes are needed: at most [`MAX_HEADER_LEN`] in all, so a server never
/// buffers more than that before it decides. Bytes after the header are the app's and are
/// left untouched.
pub fn decode_open_header(buf: &[u8]) -> Result<Option<OpenHeader>, HeaderError> {
    let Some(&version) = buf.first() else {
        return Ok(None);
    };
    if version != WIRE_VERSION && version != WIRE_VERSION_APP {
        return Err(HeaderError::Version(version));
    }
    let Some(&len) = buf.get(1) else {
        return Ok(None);
    };
    let len = usize::from(len);
    if len > MAX_ROUTE_LEN {
        return Err(RouteNameError::TooLong(len).into());
    }
    if len == 0 {
        return Err(RouteNameError::Empty.into());
    }
    let Some(name) = buf.get(2..2 + len) else {
        return Ok(None);
    };
    let route = RouteName::from_bytes(name)?;
    let mut at = 2 + len;
    let mut app = None;
    if version == WIRE_VERSION_APP {
        let Some(&family) = buf.get(at) else {
            return Ok(None);
        };
        let ip_len = match family {
            4 => 4,
            6 => 16,
            other => return Err(HeaderError::Family(other)),
        };
        at += 1;
        {
            let Some(block) = buf.get(at..at + 2 * ip_len + 4) else {
                return Ok(None);
            };
            let ip = |bytes: &[u8]| -> IpAddr {
                match bytes.len() {
                    4 => Ipv4Addr::from(<[u8; 4]>::try_from(bytes).unwrap_or_default()).into(),
                    _ => Ipv6Addr::from(<[u8; 16]>::try_from(bytes).unwrap_or_default()).into(),
                }
            };
            let port = |bytes: &[u8]| u16::from_be_bytes([bytes[0], bytes[1]]);
            let ports = &block[2 * ip_len..];
            let addrs = AppAddrs {
                source: SocketAddr::new(ip(&block[..ip_len]), port(&ports[..2])),
                destination: SocketAddr::new(ip(&block[ip_len..2 * ip_len]), port(&ports[2..])),
            };
            if addrs.one_family() != addrs {
                return Err(HeaderError::MappedV4);
            }
            app = Some(addrs);
            at += 2 * ip_len + 4;
        }
    }
    Ok(Some(OpenHeader {
        route,
        app,
        len: at,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_trailing_app_bytes() {
        let route: RouteName = "redis".parse().unwrap();
        let mut wire = encode_open_header(&route, None).to_vec();
        wire.extend_from_slice(b"PING\r\n");
        let h = decode_open_header(&wire).unwrap().unwrap();
        assert_eq!(h.route, route);
        assert_eq!(&wire[h.len..], b"PING\r\n");
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let app = AppAddrs {
            source: "[2001:db8::7]:50000".parse().unwrap(),
            destination: "[::1]:6379".parse().unwrap(),
        };
        for wire in [
            encode_open_header(&"pg-main".parse().unwrap(), None),
            encode_open_header(&"pg-main".parse().unwrap(), Some(app)),
        ] {
            for cut in 0..wire.len() {
                assert_eq!(decode_open_header(&wire[..cut]), Ok(None), "prefix {cut}");
                let needs = open_header_needs(&wire[..cut]);
                assert!(
                    needs > cut && needs <= wire.len(),
                    "prefix {cut} needs {needs}"
                );
            }
            assert_eq!(open_header_needs(&wire), wire.len());
            assert!(wire.len() <= MAX_HEADER_LEN);
        }
    }

    #[test]
    fn rejects_other_versions_and_bad_lengths() {
        assert_eq!(
            decode_open_header(&[3, 1, b'a']),
            Err(HeaderError::Version(3))
        );
        assert_eq!(
            decode_open_header(&[WIRE_VERSION_APP, 1, b'a', 5]),
            Err(HeaderError::Family(5))
        );
        assert!(matches!(
            decode_open_header(&[WIRE_VERSION, 0]),
            Err(HeaderError::Route(RouteNameError::Empty))
        ));
        assert!(matches!(
            decode_open_header(&[WIRE_VERSION, 200]),
            Err(HeaderError::Route(RouteNameError::TooLong(200)))
        ));
        assert!(decode_open_header(&[WIRE_VERSION, 3, b'a', b':', b'1']).is_err());
    }

    #[test]
    fn version_2_carries_the_apps_connection_in_one_family() {
        let route: RouteName = "redis".parse().unwrap();
        let v4 = AppAddrs {
            source: "192.0.2.7:50000".parse().unwrap(),
            destination: "127.0.0.1:6379".parse().unwrap(),
        };
        let mut wire = encode_open_header(&route, Some(v4)).to_vec();
        assert_eq!(wire.len(), 2 + 5 + 1 + 12);
        wire.extend_from_slice(b"PING\r\n");
        let h = decode_open_header(&wire).unwrap().unwrap();
        assert_eq!((h.route, h.app), (route.clone(), Some(v4)));
        assert_eq!(&wire[h.len..], b"PING\r\n");

        // A v4-mapped source beside a v6 destination: both as IPv6.
        let mixed = AppAddrs {
            source: "[::ffff:192.0.2.7]:1".parse().unwrap(),
            destination: "[2001:db8::1]:2".parse().unwrap(),
        };
        let h = decode_open_header(&encode_open_header(&route, Some(mixed)))
            .unwrap()
            .unwrap();
        assert_eq!(h.app, Some(mixed.one_family()));
        assert_eq!(h.len, 2 + 5 + 1 + 36);
        // v4-mapped on both sides: IPv4.
        let mapped = AppAddrs {
            source: "[::ffff:10.0.0.1]:1".parse().unwrap(),
            destination: "[::ffff:10.0.0.2]:2".parse().unwrap(),
        };
        assert_eq!(
            mapped.one_family().source,
            "10.0.0.1:1".parse::<SocketAddr>().unwrap()
        );
        // One encoding per header: no family 0, no IPv4 written as IPv6.
        assert_eq!(
            decode_open_header(&[WIRE_VERSION_APP, 1, b'a', 0, b'x']),
            Err(HeaderError::Family(0))
        );
        let mut as_v6 = vec![WIRE_VERSION_APP, 1, b'a', 6];
        for _ in 0..2 {
            as_v6.extend_from_slice(&"::ffff:10.0.0.1".parse::<Ipv6Addr>().unwrap().octets());
        }
        as_v6.extend_from_slice(&[0, 1, 0, 2]);
        assert_eq!(decode_open_header(&as_v6), Err(HeaderError::MappedV4));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A small deterministic sweep over short inputs; the fuzz target goes further.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let len = (seed % 80) as usize;
            let bytes: Vec<u8> = (0..len).map(|i| (seed >> (i % 56)) as u8).collect();
            let mut input = bytes.clone();
            if let Some(first) = input.first_mut() {
                *first = WIRE_VERSION;
            }
            for buf in [&bytes, &input] {
                if let Ok(Some(h)) = decode_open_header(buf) {
                    assert!(h.len <= buf.len() && h.len <= MAX_HEADER_LEN);
                }
            }
        }
    }
}
