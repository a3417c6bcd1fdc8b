use super::*;

fn parse(text: &str) -> Result<ConfigFile, String> {
    ConfigFile::parse(Path::new("amb.toml"), text).map_err(|e| e.to_string())
}

const EXAMPLE: &str = r#"
[server]
listen = "0.0.0.0:7443"
transport = "both"
certs-dir = "/etc/amb/certs"
allow = ["uri:spiffe://amb/web", "uri:spiffe://amb/worker"]
connect-timeout = "2s"

[[server.route]]
name = "redis"
upstream = "10.0.0.5:6379"
allow = ["uri:spiffe://amb/web"]

[[server.route]]
name = "pg"
upstream = "unix:/var/run/postgresql/.s.PGSQL.5432"

[client]
peer = "big-server:7443"
transport = "quic"

[[client.listen]]
listen = "6379"
route = "redis"

[[client.listen]]
listen = "5432"
route = "pg"
peer = "db-host:7443"
"#;

#[test]
fn the_documented_shape_parses_into_specs() {
    let file = parse(EXAMPLE).unwrap();
    let server = file.server.unwrap();
    assert_eq!(server.transport, Some(ServerTransport::Both));
    assert_eq!(
        server.connect_timeout.unwrap().get(),
        std::time::Duration::from_secs(2)
    );
    assert_eq!(server.routes.len(), 2);
    let redis = server.routes[0].upstream_set(&Default::default()).unwrap();
    assert_eq!(redis.to_string(), "10.0.0.5:6379");
    assert_eq!(server.routes[0].allow.as_ref().unwrap().get_ref().len(), 1);
    let client = file.client.unwrap();
    let specs: Vec<_> = client.listeners.iter().map(|l| l.spec().unwrap()).collect();
    assert_eq!(
        specs[0].addr,
        "127.0.0.1:6379".parse().unwrap(),
        "loopback by default"
    );
    assert_eq!(specs[0].route.as_str(), "redis");
    assert!(specs[0].peers.is_empty());
    assert_eq!(specs[1].peers[0].to_string(), "db-host:7443");
}

#[test]
fn an_unknown_key_is_named_with_its_line() {
    let err = parse("[server]\nlisten = \"0.0.0.0:1\"\nupstreams = [\"a:1\"]\n").unwrap_err();
    assert!(err.starts_with("amb.toml:3: "), "{err}");
    assert!(err.contains("unknown field `upstreams`"), "{err}");
    let err = parse("[sever]\n").unwrap_err();
    assert!(err.contains("unknown field `sever`"), "{err}");
}

#[test]
fn a_wrong_type_or_value_is_named_with_its_line() {
    let err = parse("[server]\nmax-streams = \"many\"\n").unwrap_err();
    assert!(err.starts_with("amb.toml:2: "), "{err}");
    assert!(err.contains("max-streams"), "{err}");
    let err =
        parse("[server]\n\n[[server.route]]\nname = \"r\"\nupstream = \"redis\"\n").unwrap_err();
    assert!(err.starts_with("amb.toml:5: "), "{err}");
    assert!(err.contains("not HOST:PORT"), "{err}");
    let err = parse("[client]\ntunnel-wait = \"soon\"\n").unwrap_err();
    assert!(
        err.starts_with("amb.toml:2: ") && err.contains("tunnel-wait"),
        "{err}"
    );
    let err = parse("[server]\nallow = [\"dns:*.x\"]\n").unwrap_err();
    assert!(err.starts_with("amb.toml:2: "), "{err}");
}

#[test]
fn duplicates_are_refused() {
    let twice = "[server]\n[[server.route]]\nname = \"r\"\nupstream = \"a:1\"\n[[server.route]]\nname = \"r\"\nupstream = \"b:1\"\n";
    let err = parse(twice).unwrap_err();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("amb.toml:6: route r is given twice"),
        "{err}"
    );
    let default_twice =
        "[server]\nupstream = \"a:1\"\n[[server.route]]\nname = \"default\"\nupstream = \"b:1\"\n";
    assert!(parse(default_twice)
        .unwrap_err()
        .contains("route default is given twice"));
    let ports = "[client]\n[[client.listen]]\nlisten = \"6379\"\n[[client.listen]]\nlisten = \"127.0.0.1:6379\"\n";
    let err = parse(ports).unwrap_err();
    assert!(
        err.starts_with("amb.toml:5: listen 127.0.0.1:6379 is given twice"),
        "{err}"
    );
}

#[test]
fn a_listener_must_name_a_route_the_same_file_serves() {
    let text = "[server]\nupstream = \"a:1\"\n[client]\n[[client.listen]]\nlisten = \"1\"\nroute = \"pg\"\n";
    let err = parse(text).unwrap_err();
    assert!(
        err.starts_with("amb.toml:5: listen 127.0.0.1:1 asks for route pg"),
        "{err}"
    );
    // A client-only file may name any route: its server is elsewhere.
    parse("[client]\n[[client.listen]]\nlisten = \"1\"\nroute = \"pg\"\n").unwrap();
}

#[test]
fn malformed_addresses_are_refused() {
    let err = parse("[client]\n[[client.listen]]\nlisten = \"localhost:1\"\n").unwrap_err();
    assert!(err.starts_with("amb.toml:3: listen: "), "{err}");
    let err = parse("[server]\nlisten = \"7443\"\n").unwrap_err();
    assert!(err.starts_with("amb.toml:2: "), "{err}");
    let err = parse("[client]\npeer = \"big-server\"\n").unwrap_err();
    assert!(err.contains("not HOST:PORT"), "{err}");
}

#[test]
fn the_commented_reference_in_examples_parses() {
    let text = include_str!("../../../examples/amb.toml");
    let file = parse(text).unwrap();
    let server = file.server.unwrap();
    assert_eq!(server.routes.len(), 4);
    let api = server.routes[2].upstream_set(&Default::default()).unwrap();
    assert_eq!(api.members().len(), 2);
    let search = server.routes[3].upstream_set(&Default::default()).unwrap();
    assert_eq!(
        search.discovery(),
        Some(&amb_spec::Discovery::Srv(
            "_search._tcp.example.internal".into()
        ))
    );
    assert_eq!(file.client.unwrap().listeners.len(), 2);
}

#[test]
fn a_route_takes_several_upstreams_with_weights_and_a_balance_mode() {
    let text = "[server]\nbalance = \"round-robin\"\n\n[[server.route]]\nname = \"redis\"\n\
                upstreams = [\"10.0.0.1:6379\", \"10.0.0.2:6379 weight=3\"]\nbalance = \"failover\"\n\n\
                [[server.route]]\nname = \"pg\"\nupstream = \"a:1,b:1\"\n";
    let server = parse(text).unwrap().server.unwrap();
    let default = RouteDefaults {
        balance: server.balance.as_ref().unwrap().0,
        health: None,
    };
    let redis = server.routes[0].upstream_set(&default).unwrap();
    assert_eq!(redis.balance, amb_spec::Balance::Failover);
    assert_eq!(redis.members()[1].weight, 3);
    let pg = server.routes[1].upstream_set(&default).unwrap();
    assert_eq!(pg.members().len(), 2);
    assert_eq!(
        pg.balance,
        amb_spec::Balance::RoundRobin,
        "the part's balance"
    );

    for (route, says) in [
        (
            "upstreams = [\"a:1\", \"a:1\"]",
            "route r: upstream a:1 is given twice",
        ),
        (
            "upstream = \"a:1\"\nupstreams = [\"b:1\"]",
            "route r: give `upstream` or `upstreams`, not both",
        ),
        ("", "route r: give `upstream` or `upstreams`"),
    ] {
        let err = parse(&format!(
            "[server]\n[[server.route]]\nname = \"r\"\n{route}\n"
        ))
        .unwrap_err();
        assert!(
            err.starts_with("amb.toml:3: ") && err.contains(says),
            "{err}"
        );
    }
    let err = parse("[server]\n[[server.route]]\nname = \"r\"\nupstreams = [\"a:1 weight=0\"]\n")
        .unwrap_err();
    assert!(
        err.starts_with("amb.toml:4: ") && err.contains("weight=N"),
        "{err}"
    );
    let err = parse("[server]\nbalance = \"random\"\n").unwrap_err();
    assert!(
        err.starts_with("amb.toml:2: ") && err.contains("least-conn"),
        "{err}"
    );
}

#[test]
fn a_route_may_check_its_upstreams_actively() {
    let text = "[server]\nhealth-check = \"tcp\"\n\n[[server.route]]\nname = \"cache\"\n\
                upstreams = [\"a:1\", \"b:1\"]\nhealth-check = \"redis-master\"\nhealth-interval = \"500ms\"\n\n\
                [[server.route]]\nname = \"pg\"\nupstream = \"c:1\"\n";
    let server = parse(text).unwrap().server.unwrap();
    let defaults = RouteDefaults {
        balance: Default::default(),
        health: server.health_check.as_ref().map(|k| amb_spec::HealthCheck {
            kind: k.0,
            interval: amb_spec::DEFAULT_HEALTH_INTERVAL,
        }),
    };
    let cache = server.routes[0]
        .upstream_set(&defaults)
        .unwrap()
        .health
        .unwrap();
    assert_eq!(cache.kind, amb_spec::HealthCheckKind::RedisMaster);
    assert_eq!(cache.interval, std::time::Duration::from_millis(500));
    let pg = server.routes[1]
        .upstream_set(&defaults)
        .unwrap()
        .health
        .unwrap();
    assert_eq!(pg.kind, amb_spec::HealthCheckKind::Tcp, "the part's check");
    let err = parse(
        "[server]\n[[server.route]]\nname = \"r\"\nupstream = \"a:1\"\nhealth-check = \"http\"\n",
    )
    .unwrap_err();
    assert!(
        err.starts_with("amb.toml:5: ") && err.contains("redis-master"),
        "{err}"
    );
    let err = parse(
        "[server]\n[[server.route]]\nname = \"r\"\nupstream = \"a:1\"\nhealth-interval = \"1s\"\n",
    )
    .unwrap_err();
    assert!(
        err.contains("`health-interval` without a `health-check`"),
        "{err}"
    );
}

#[test]
fn redis_auth_names_exactly_one_place_for_the_password() {
    let route = |auth: &str| {
        format!("[server]\n[[server.route]]\nname = \"r\"\nupstream = \"a:1\"\nredis-auth = {{ {auth} }}\n")
    };
    let file = parse(&route(
        "user = \"app\", password-file = \"/run/secrets/redis\"",
    ))
    .unwrap();
    let auth = file.server.unwrap().routes[0]
        .redis_auth
        .clone()
        .unwrap()
        .into_inner();
    assert_eq!(auth.user.as_deref(), Some("app"));
    assert_eq!(
        auth.password_source(),
        Ok(PasswordSource::File(std::path::Path::new(
            "/run/secrets/redis"
        )))
    );
    let file = parse(&route("password-env = \"REDIS_PASSWORD\"")).unwrap();
    let auth = file.server.unwrap().routes[0]
        .redis_auth
        .clone()
        .unwrap()
        .into_inner();
    assert_eq!(
        auth.password_source(),
        Ok(PasswordSource::Env("REDIS_PASSWORD"))
    );
    for bad in [
        "user = \"app\"",
        "password-file = \"/x\", password-env = \"Y\"",
    ] {
        let err = parse(&route(bad)).unwrap_err();
        assert!(
            err.starts_with("amb.toml:5: route r: redis-auth: give"),
            "{err}"
        );
    }
    let err = parse(&route("password = \"inline\"")).unwrap_err();
    assert!(err.contains("unknown field `password`"), "{err}");
}

#[test]
fn a_client_and_its_listeners_may_name_several_peers() {
    let text = "[client]\npeer = \"a:7443\"\npeers = [\"b:7443\", \"a:7443\"]\npeer-balance = \"failover\"\n\
                [[client.listen]]\nlisten = \"6379\"\n\n[[client.listen]]\nlisten = \"5432\"\npeers = [\"c:1\", \"d:1\"]\n";
    let client = parse(text).unwrap().client.unwrap();
    let names =
        |peers: Vec<amb_spec::PeerSpec>| peers.iter().map(ToString::to_string).collect::<Vec<_>>();
    assert_eq!(
        names(client.peer_list()),
        ["a:7443", "b:7443"],
        "peer first, each once"
    );
    assert_eq!(
        client.peer_balance.as_ref().unwrap().0,
        amb_spec::Balance::Failover
    );
    assert!(client.listeners[0].spec().unwrap().peers.is_empty());
    assert_eq!(
        names(client.listeners[1].spec().unwrap().peers),
        ["c:1", "d:1"]
    );
}

#[test]
fn upstream_tls_takes_a_ca_and_a_client_certificate_whole_or_not_at_all() {
    let route = |tls: &str| {
        format!("[server]\n[[server.route]]\nname = \"r\"\nupstream = \"a:1\"\nupstream-tls = {{ {tls} }}\n")
    };
    let file = parse(&route(
        "ca = \"/ca.pem\", server-name = \"redis.internal\", cert = \"/c.pem\", key = \"/c.key\"",
    ))
    .unwrap();
    let tls = file.server.unwrap().routes[0]
        .upstream_tls
        .clone()
        .unwrap()
        .into_inner();
    assert_eq!(tls.server_name.as_deref(), Some("redis.internal"));
    assert_eq!(
        tls.identity(),
        Ok(Some((Path::new("/c.pem"), Path::new("/c.key"))))
    );
    let bare = parse(&route("ca = \"/ca.pem\"")).unwrap();
    let tls = bare.server.unwrap().routes[0].upstream_tls.clone().unwrap();
    assert_eq!(tls.get_ref().identity(), Ok(None));

    let err = parse(&route("ca = \"/ca.pem\", cert = \"/c.pem\"")).unwrap_err();
    assert!(
        err.starts_with("amb.toml:5: route r: upstream-tls: give `cert` and `key` together"),
        "{err}"
    );
    let err = parse(&route("cert = \"/c.pem\", key = \"/c.key\"")).unwrap_err();
    assert!(err.contains("missing field `ca`"), "{err}");
    let err = parse(&route("ca = \"/ca.pem\", verify = false")).unwrap_err();
    assert!(err.contains("unknown field `verify`"), "{err}");
}

#[test]
fn proxy_protocol_is_v2_or_refused_with_its_line() {
    let route = |value: &str| {
        format!("[server]\n[[server.route]]\nname = \"r\"\nupstream = \"a:1\"\nproxy-protocol = \"{value}\"\n")
    };
    let file = parse(&route("v2")).unwrap();
    let set = file.server.unwrap().routes[0]
        .upstream_set(&RouteDefaults::default())
        .unwrap();
    assert_eq!(set.proxy_protocol, Some(amb_spec::ProxyProtocol::V2));
    let err = parse(&route("v1")).unwrap_err();
    assert!(
        err.starts_with("amb.toml:5") && err.contains("proxy-protocol \"v1\": write v2"),
        "{err}"
    );
}

/// Every key the file takes is in the commented reference, `examples/amb.toml`: each table's
/// keys as serde lists them on meeting an unknown one, each found as `key = ` or `# key = `.
#[test]
fn the_commented_reference_names_every_key() {
    let reference = include_str!("../../../examples/amb.toml");
    let route = "[server]\n[[server.route]]\nname = \"r\"\nupstream = \"a:1\"\n";
    let tables = [
        "[server]\n".to_owned(),
        route.to_owned(),
        format!("{route}[server.route.redis-auth]\n"),
        format!("{route}[server.route.upstream-tls]\n"),
        "[client]\n".to_owned(),
        "[client]\n[[client.listen]]\nlisten = \"1\"\n".to_owned(),
    ];
    let documented = |key: &str| {
        reference.lines().any(|line| {
            let line = line.trim_start_matches("# ");
            line.strip_prefix(key)
                .is_some_and(|rest| rest.starts_with(" = "))
        })
    };
    for table in tables {
        let err = parse(&format!("{table}no-such-key = 1\n")).unwrap_err();
        let (_, expected) = err
            .split_once("expected one of ")
            .unwrap_or_else(|| panic!("{table}: {err}"));
        // `a`, `b`, `c` (at `no-such-key = 1`)
        let expected = expected.split(" (at ").next().unwrap_or(expected);
        let keys: Vec<&str> = expected
            .split(", ")
            .map(|k| k.trim().trim_matches('`'))
            .collect();
        assert!(keys.len() > 1, "{table}: {err}");
        for key in keys {
            assert!(
                documented(key),
                "{key} ({table}) is not in examples/amb.toml"
            );
        }
    }
}
