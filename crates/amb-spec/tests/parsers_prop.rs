//! Property tests for the parsers of operator input: `--listen` specs, upstreams, peers.

use amb_spec::{ListenerSpec, PeerSpec, UpstreamSpec};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn listen_parser_never_panics(input in ".{0,60}") {
        let _ = input.parse::<ListenerSpec>();
    }

    #[test]
    fn bare_port_always_binds_loopback(port in any::<u16>(), route in proptest::option::of("[a-z][a-z0-9-]{0,10}")) {
        let input = match &route {
            Some(r) => format!("{port}={r}"),
            None => port.to_string(),
        };
        let spec: ListenerSpec = input.parse().unwrap();
        prop_assert!(spec.addr.ip().is_loopback());
        prop_assert_eq!(spec.addr.port(), port);
        prop_assert_eq!(spec.route.as_str(), route.as_deref().unwrap_or("default"));
    }

    #[test]
    fn upstream_parser_never_panics(input in ".{0,60}") {
        if let Ok(up) = input.parse::<UpstreamSpec>() {
            prop_assert_eq!(up.to_string(), input);
        }
    }

    #[test]
    fn peer_parser_never_panics(input in ".{0,60}") {
        if let Ok(peer) = input.parse::<PeerSpec>() {
            prop_assert_eq!(peer.to_string(), input);
        }
    }
}
