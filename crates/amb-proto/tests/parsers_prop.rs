//! Property tests for every parser of untrusted input in amb-proto: the stream-open header,
//! route names, SANs and the authorization decision. They run on stable in CI; failing cases
//! proptest finds are kept in `proptest-regressions/` and replayed first.

use amb_proto::header::MAX_HEADER_LEN;
use amb_proto::{
    decode_open_header, encode_open_header, AllowList, PeerIdentity, Refusal, RouteName,
    RouteTable, San,
};
use proptest::prelude::*;

fn route_name() -> impl Strategy<Value = RouteName> {
    "[a-z0-9][a-z0-9._-]{0,62}".prop_map(|s| s.parse().unwrap())
}

fn san() -> impl Strategy<Value = San> {
    prop_oneof![
        "[a-z0-9][a-z0-9.-]{0,30}".prop_map(San::Dns),
        "[a-z]{1,8}://[a-z0-9./_-]{1,30}".prop_map(San::Uri),
        any::<[u8; 4]>().prop_map(|b| San::Ip(std::net::IpAddr::from(b))),
        any::<[u8; 16]>().prop_map(|b| San::Ip(std::net::IpAddr::from(b))),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn header_round_trips_with_any_trailing_bytes(route in route_name(), tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut wire = encode_open_header(&route, None).to_vec();
        let header_len = wire.len();
        wire.extend_from_slice(&tail);
        let decoded = decode_open_header(&wire).unwrap().unwrap();
        prop_assert_eq!(decoded.route, route);
        prop_assert_eq!(decoded.len, header_len);
        prop_assert_eq!(&wire[decoded.len..], &tail[..]);
    }

    #[test]
    fn header_decoder_never_panics_and_never_overreads(input in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(Some(h)) = decode_open_header(&input) {
            prop_assert!(h.len <= input.len());
            prop_assert!(h.len <= MAX_HEADER_LEN);
            // What was accepted is exactly what the encoder writes.
            prop_assert_eq!(&encode_open_header(&h.route, h.app)[..], &input[..h.len]);
        }
    }

    #[test]
    fn route_parser_accepts_only_its_alphabet(input in proptest::collection::vec(any::<u8>(), 0..80)) {
        if let Ok(route) = RouteName::from_bytes(&input) {
            prop_assert!(!input.is_empty() && input.len() <= 63);
            prop_assert!(input.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(b)));
            prop_assert_eq!(route.to_string().parse::<RouteName>().unwrap(), route);
        }
    }

    #[test]
    fn san_parser_never_panics_and_round_trips(input in ".{0,80}") {
        if let Ok(san) = input.parse::<San>() {
            prop_assert_eq!(san.to_string().parse::<San>().unwrap(), san);
        }
    }

    #[test]
    fn san_display_parses_back(s in san()) {
        prop_assert_eq!(s.to_string().parse::<San>().unwrap(), s);
    }

    #[test]
    fn allow_list_is_exact_and_typed(allowed in san(), presented in proptest::collection::vec(san(), 0..4), route in route_name()) {
        let table = RouteTable::new([(route.clone(), ())].into_iter().collect(), Some(AllowList::new(vec![allowed.clone()]).unwrap()));
        let peer = PeerIdentity { sans: presented.clone() };
        let expected = presented.iter().any(|p| allowed.matches(p));
        let decided = table.decide(&peer, &route);
        prop_assert_eq!(decided.is_ok(), expected);
        if !expected {
            prop_assert_eq!(decided, Err(Refusal::Forbidden));
        }
        // Type confusion: the same text under another SAN type never matches.
        let confused = match &allowed {
            San::Dns(n) => San::Uri(n.clone()),
            San::Uri(u) => San::Dns(u.clone()),
            San::Ip(ip) => San::Dns(ip.to_string()),
        };
        prop_assert!(!allowed.matches(&confused));
    }
}
