//! The QUIC stream-open header: `[version: u8][route length: u8][route bytes]`.
//!
//! The client writes it at the start of every bidirectional stream, followed at once by the
//! app's first bytes; the server answers with one status byte before any upstream bytes.

use bytes::{BufMut, Bytes, BytesMut};

use crate::route::{RouteName, RouteNameError, MAX_ROUTE_LEN};
use crate::WIRE_VERSION;

/// Longest possible header, so a server can bound what it reads before deciding.
pub const MAX_HEADER_LEN: usize = 2 + MAX_ROUTE_LEN;

/// A decoded stream-open header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenHeader {
    /// The route the client asks for.
    pub route: RouteName,
    /// How many bytes of the input the header took; app bytes start there.
    pub len: usize,
}

/// Why a stream-open header is rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The client speaks another wire version.
    #[error("stream header has wire version {0}; this server speaks version {WIRE_VERSION}")]
    Version(u8),
    /// The route name is not valid.
    #[error("stream header has a bad route name: {0}")]
    Route(#[from] RouteNameError),
}

/// Encodes the header that opens a stream to `route`.
pub fn encode_open_header(route: &RouteName) -> Bytes {
    let name = route.as_str().as_bytes();
    let mut buf = BytesMut::with_capacity(2 + name.len());
    buf.put_u8(WIRE_VERSION);
    // A RouteName is at most MAX_ROUTE_LEN (63) bytes, so its length fits in one byte.
    buf.put_u8(name.len() as u8);
    buf.put_slice(name);
    buf.freeze()
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
    if version != WIRE_VERSION {
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
    Ok(Some(OpenHeader {
        route: RouteName::from_bytes(name)?,
        len: 2 + len,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_with_trailing_app_bytes() {
        let route: RouteName = "redis".parse().unwrap();
        let mut wire = encode_open_header(&route).to_vec();
        wire.extend_from_slice(b"PING\r\n");
        let h = decode_open_header(&wire).unwrap().unwrap();
        assert_eq!(h.route, route);
        assert_eq!(&wire[h.len..], b"PING\r\n");
    }

    #[test]
    fn every_prefix_asks_for_more() {
        let wire = encode_open_header(&"pg-main".parse().unwrap());
        for cut in 0..wire.len() {
            assert_eq!(decode_open_header(&wire[..cut]), Ok(None), "prefix {cut}");
        }
    }

    #[test]
    fn rejects_other_versions_and_bad_lengths() {
        assert_eq!(
            decode_open_header(&[2, 1, b'a']),
            Err(HeaderError::Version(2))
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
