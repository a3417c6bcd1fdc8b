//! Property tests for the engine's parsers of operator input: `--listen` specs and upstreams.

use amb_engine::{ListenSpec, Upstream};
use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig { cases: 2048, ..ProptestConfig::default() })]

    #[test]
    fn listen_parser_never_panics(input in ".{0,60}") {
        let _ = input.parse::<ListenSpec>();
    }

    #[test]
    fn bare_port_always_binds_loopback(port in any::<u16>(), route in proptest::option::of("[a-z][a-z0-9-]{0,10}")) {
        let input = match &route {
            Some(r) => format!("{port}={r}"),
            None => port.to_string(),
        };
        let spec: ListenSpec = input.parse().unwrap();
        prop_assert!(spec.addr.ip().is_loopback());
        prop_assert_eq!(spec.addr.port(), port);
        prop_assert_eq!(spec.route.as_str(), route.as_deref().unwrap_or("default"));
    }

    #[test]
    fn upstream_parser_never_panics(input in ".{0,60}") {
        if let Ok(up) = input.parse::<Upstream>() {
            prop_assert_eq!(up.to_string(), input);
        }
    }
}
