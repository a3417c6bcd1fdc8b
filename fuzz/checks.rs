//! The properties every fuzz target checks, one function per parser of untrusted input.
//!
//! Shared by the libFuzzer targets (`fuzz_targets/*.rs`, nightly) and by the stable test
//! `tests/fuzz_corpus.rs`, which replays the committed corpus through the same functions, so
//! every interesting input found once stays a regression test in `cargo test`.

use amb_proto::header::MAX_HEADER_LEN;
use amb_proto::{
    decode_open_header, encode_open_header, AllowList, PeerIdentity, Refusal, RouteName,
    RouteTable, San,
};
use amb_spec::{ListenerSpec, UpstreamSpec};

/// A property check over one input; it panics when the property fails.
pub type Check = fn(&[u8]);

/// The target names, which are also the corpus directory names under `fuzz/corpus/`.
pub const TARGETS: &[(&str, Check)] = &[
    ("open_header", open_header),
    ("route_name", route_name),
    ("san_allow", san_allow),
    ("listen_spec", listen_spec),
    ("upstream", upstream),
    ("peer_identity", peer_identity),
];

/// The QUIC stream-open header: never reads past its bound, and what it accepts is exactly what
/// the encoder writes. An incomplete prefix asks for more only while under the bound.
pub fn open_header(data: &[u8]) {
    match decode_open_header(data) {
        Ok(Some(header)) => {
            assert!(header.len <= data.len() && header.len <= MAX_HEADER_LEN);
            assert_eq!(
                &encode_open_header(&header.route, header.app)[..],
                &data[..header.len]
            );
        }
        Ok(None) => assert!(data.len() < MAX_HEADER_LEN, "needs more after the bound"),
        Err(_) => {}
    }
}

/// Route names: only the documented alphabet and length, and they round-trip.
pub fn route_name(data: &[u8]) {
    if let Ok(route) = RouteName::from_bytes(data) {
        assert!(!data.is_empty() && data.len() <= 63);
        assert!(data
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(b)));
        assert_eq!(route.as_str().as_bytes(), data);
        assert_eq!(route.as_str().parse::<RouteName>().as_ref(), Ok(&route));
    }
}

/// SANs from `--allow` and the authorization decision: parsing round-trips, and a peer is let
/// in exactly when one of its SANs equals an allowed entry of the same type.
///
/// Input: `allowed SAN \n presented SAN \n presented SAN ...`.
pub fn san_allow(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let Some(Ok(allowed)) = lines.next().map(str::parse::<San>) else {
        return;
    };
    assert_eq!(allowed.to_string().parse::<San>().as_ref(), Ok(&allowed));
    let presented: Vec<San> = lines.filter_map(|l| l.parse().ok()).collect();
    for san in &presented {
        assert_eq!(san.to_string().parse::<San>().as_ref(), Ok(san));
    }
    let Ok(allow) = AllowList::new(vec![allowed.clone()]) else {
        assert!(matches!(&allowed, San::Dns(n) if n.contains('*')));
        return;
    };
    let route = RouteName::default_route();
    let table = RouteTable::new([(route.clone(), ())].into_iter().collect(), Some(allow));
    let peer = PeerIdentity { sans: presented };
    let expected = peer.sans.iter().any(|p| match (&allowed, p) {
        (San::Dns(a), San::Dns(b)) => a.eq_ignore_ascii_case(b),
        (San::Uri(a), San::Uri(b)) => a == b,
        (San::Ip(a), San::Ip(b)) => a == b,
        _ => false,
    });
    match table.decide(&peer, &route) {
        Ok(()) => assert!(expected, "{peer:?} let in by {allowed}"),
        Err(refusal) => {
            assert!(!expected, "{peer:?} refused by {allowed}");
            assert_eq!(refusal, Refusal::Forbidden);
        }
    }
}

/// `--listen` specs: a bare port binds loopback only, and the route part is a valid route.
pub fn listen_spec(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(spec) = text.parse::<ListenerSpec>() {
        let addr = text.split_once('=').map_or(text, |(a, _)| a);
        if addr.parse::<u16>().is_ok() {
            assert!(spec.addr.ip().is_loopback(), "{text:?} bound {}", spec.addr);
        }
        assert_eq!(
            spec.route.as_str().parse::<RouteName>().as_ref(),
            Ok(&spec.route)
        );
    }
}

/// `--upstream` / `--route` addresses: accepted ones are `unix:` and an absolute path with no NUL, or
/// HOST:PORT with a non-zero port and no whitespace or path, and print back unchanged.
pub fn upstream(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(up) = text.parse::<UpstreamSpec>() {
        assert_eq!(up.to_string(), text);
        if let Some(path) = text.strip_prefix("unix:") {
            assert!(path.starts_with('/') && !path.contains('\0') && path.len() < 108);
            return;
        }
        let (host, port) = text.rsplit_once(':').expect("accepted without a port");
        assert!(port.parse::<u16>().is_ok_and(|p| p > 0));
        assert!(!host.is_empty() && !host.contains(char::is_whitespace) && !host.contains('/'));
    }
}

/// A peer certificate's SANs: any DER at all yields an identity without panicking, and every SAN
/// it yields prints as text that parses back to the same SAN, so logs and allow-lists agree.
pub fn peer_identity(data: &[u8]) {
    let identity = amb_pki::peer_identity(&amb_pki::CertificateDer::from(data));
    for san in &identity.sans {
        assert_eq!(san.to_string().parse::<San>().as_ref(), Ok(san));
    }
    let _ = identity.to_string();
}
