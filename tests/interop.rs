//! Interoperability with services and clients that speak TLS themselves: a route to a
//! `redis-server` that accepts only TLS with a client certificate (`upstream-tls`), client-only
//! mode to it (`--tls-upstream`), and `redis-cli --tls` straight to `amb server`. Real redis,
//! real binaries.

mod support;

use support::*;

per_transport!(a_route_reaches_a_tls_only_redis_and_refuses_a_wrong_ca_or_name,);

async fn a_route_reaches_a_tls_only_redis_and_refuses_a_wrong_ca_or_name(t: Transport) {
    let pki = Pki::new();
    let redis = Redis::start_tls(&pki);
    let other = Pki::new();
    let stranger = Redis::start_tls(&other);
    let path = |pki: &Pki, name: &str| pki.path(name).display().to_string();
    let route = |name: &str, ca: &str, server_name: &str| {
        format!(
            "\n[[server.route]]\nname = \"{name}\"\nupstream = \"127.0.0.1:{}\"\n\
             upstream-tls = {{ ca = \"{ca}\", server-name = \"{server_name}\", cert = \"{}\", key = \"{}\" }}\n",
            redis.port,
            path(&pki, "client.pem"),
            path(&pki, "client.key"),
        )
    };
    let config = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nmetrics = \"127.0.0.1:0\"\n",
        path(&pki, "server.pem"),
        path(&pki, "server.key"),
        path(&pki, "ca.pem"),
    ) + &route("redis", &path(&pki, "ca.pem"), "localhost")
        + "health-check = \"redis\"\nhealth-interval = \"200ms\"\n"
        + &route("wrong-ca", &path(&other, "ca.pem"), "localhost")
        + &route("wrong-name", &path(&pki, "ca.pem"), "redis.example")
        // Two upstreams, the second with a certificate of another CA: it is marked down and
        // every connection lands on the first.
        + &format!(
            "\n[[server.route]]\nname = \"pair\"\nupstreams = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n\
             upstream-tls = {{ ca = \"{}\", server-name = \"localhost\", cert = \"{}\", key = \"{}\" }}\n",
            redis.port,
            stranger.port,
            path(&pki, "ca.pem"),
            path(&pki, "client.pem"),
            path(&pki, "client.key"),
        );
    let file = pki.path("amb.toml");
    std::fs::write(&file, config).unwrap();
    let server = Amb::spawn(&[
        "server".into(),
        "--config".into(),
        file.display().to_string(),
    ]);
    let listens = [
        "--listen",
        "0=redis",
        "--listen",
        "0=wrong-ca",
        "--listen",
        "0=wrong-name",
        "--listen",
        "0=pair",
    ];
    let client = Amb::client(&pki, "client", server.server_addr(), t, &listens);
    client.wait_tunnel_up();

    // The health check speaks TLS, with the client certificate, too.
    server
        .log
        .wait_for(&["upstream health: unchecked → up", "route=redis"]);
    let good = client.listen_addr_for("redis");
    assert_eq!(
        resp_call(good, &["SET", "greeting", "over TLS"])
            .await
            .unwrap(),
        "+OK\r\n"
    );
    assert_eq!(redis.cli(&["get", "greeting"]).as_deref(), Some("over TLS"));

    let pair = client.listen_addr_for("pair");
    for i in 0..10 {
        let key = format!("pair-{i}");
        assert_eq!(
            resp_call(pair, &["SET", &key, "x"]).await.unwrap(),
            "+OK\r\n",
            "connection {i} of the pair failed"
        );
    }
    assert_eq!(redis.cli(&["exists", "pair-9"]).as_deref(), Some("1"));

    // A certificate of another CA, or one that does not name the server name: refused
    // (502), with the certificate problem as the reason.
    let metrics = metrics_addr(&server);
    for (route, problem) in [
        ("wrong-ca", "invalid peer certificate"),
        ("wrong-name", "not valid for name"),
    ] {
        assert_reset_after_write(client.listen_addr_for(route), b"*1\r\n$4\r\nPING\r\n").await;
        server
            .log
            .wait_for(&["stream refused", &format!("route={route}"), problem]);
        let series =
            format!(r#"amb_refusals_total{{side="server",route="{route}",reason="upstream_tls"}}"#);
        wait_sample(metrics, &series, 1.0).await;
    }
}

/// `amb client --tls-upstream`: no amb server, each app connection its own TLS connection to
/// the service, verified against --ca and presenting --cert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_only_mode_reaches_a_tls_only_redis_and_refuses_a_wrong_name() {
    let pki = Pki::new();
    let redis = Redis::start_tls(&pki);
    let path = |name: &str| pki.path(name).display().to_string();
    let direct = |extra: &[&str]| {
        let mut args: Vec<String> = [
            "client",
            "--listen",
            "0",
            "--metrics",
            "127.0.0.1:0",
            "--tls-upstream",
            &format!("localhost:{}", redis.port),
            "--ca",
            &path("ca.pem"),
        ]
        .map(String::from)
        .into();
        args.extend(extra.iter().map(|s| s.to_string()));
        Amb::spawn(&args)
    };
    let identity = ["--cert", &path("client.pem"), "--key", &path("client.key")];
    let client = direct(&identity);
    let listen = client.listen_addr();
    assert_eq!(
        resp_call(listen, &["SET", "greeting", "straight"])
            .await
            .unwrap(),
        "+OK\r\n"
    );
    assert_eq!(redis.cli(&["get", "greeting"]).as_deref(), Some("straight"));
    assert_eq!(
        resp_call(listen, &["GET", "greeting"]).await.unwrap(),
        "$8\r\nstraight\r\n"
    );
    let metrics = metrics_addr(&client);
    let ok = r#"amb_connections_total{side="client",route="default",end="ok"}"#;
    wait_sample(metrics, ok, 2.0).await;

    // A server name the certificate lacks: refused at the handshake, the app reset.
    let wrong = direct(&[&identity[..], &["--server-name", "redis.example"]].concat());
    assert_reset_after_write(wrong.listen_addr(), b"*1\r\n$4\r\nPING\r\n").await;
    let refused = r#"amb_refusals_total{side="client",route="default",reason="upstream_tls"}"#;
    wait_sample(metrics_addr(&wrong), refused, 1.0).await;

    // No client certificate, which this redis demands: the app is reset, not answered.
    let anonymous = direct(&[]);
    assert_reset_after_write(anonymous.listen_addr(), b"*1\r\n$4\r\nPING\r\n").await;

    // The same from a config file's [client] part.
    let file = pki.path("direct.toml");
    std::fs::write(
        &file,
        format!(
            "[client]\ntls-upstream = \"localhost:{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[[client.listen]]\nlisten = \"0\"\n",
            redis.port,
            path("ca.pem"),
            path("client.pem"),
            path("client.key")
        ),
    )
    .unwrap();
    let configured = Amb::spawn(&[
        "client".into(),
        "--config".into(),
        file.display().to_string(),
    ]);
    assert_eq!(
        resp_call(configured.listen_addr(), &["GET", "greeting"])
            .await
            .unwrap(),
        "$8\r\nstraight\r\n"
    );
}

/// `redis-cli --tls` with a client certificate straight to `amb server`: no amb client. It
/// reaches the route its SNI names, else `--tls-route`; without a certificate, or with one of
/// another CA, it is refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standard_tls_clients_reach_amb_server_directly() {
    let pki = Pki::new();
    let (main, cache) = (Redis::start(), Redis::start());
    let routes = [
        "--route".to_owned(),
        format!("main=127.0.0.1:{}", main.port),
        "--route".to_owned(),
        format!("cache=127.0.0.1:{}", cache.port),
        "--tls-route".to_owned(),
        "main".to_owned(),
        "--metrics".to_owned(),
        "127.0.0.1:0".to_owned(),
    ];
    let routes: Vec<&str> = routes.iter().map(String::as_str).collect();
    let server = Amb::server(&pki, 0, &routes);
    let port = server.server_addr().port();
    let path = |pki: &Pki, name: &str| pki.path(name).display().to_string();
    let ca = path(&pki, "ca.pem");
    let tls_cli = |identity: Option<&Pki>, args: &[&str]| {
        let mut flags = vec!["--tls".to_owned(), "--cacert".to_owned(), ca.clone()];
        if let Some(pki) = identity {
            flags.extend(["--cert".into(), path(pki, "client.pem")]);
            flags.extend(["--key".into(), path(pki, "client.key")]);
        }
        let flags: Vec<&str> = flags
            .iter()
            .map(String::as_str)
            .chain(args.iter().copied())
            .collect();
        redis_cli(port, &flags)
    };

    // No SNI naming a route: the --tls-route.
    assert_eq!(
        tls_cli(Some(&pki), &["set", "k", "main"]).as_deref(),
        Some("OK")
    );
    assert_eq!(main.cli(&["get", "k"]).as_deref(), Some("main"));
    // The SNI names a route.
    assert_eq!(
        tls_cli(Some(&pki), &["--sni", "cache", "set", "k", "cache"]).as_deref(),
        Some("OK")
    );
    assert_eq!(cache.cli(&["get", "k"]).as_deref(), Some("cache"));
    // An SNI naming no route falls back to the --tls-route, never to an address.
    assert_eq!(
        tls_cli(Some(&pki), &["--sni", "redis.example", "get", "k"]).as_deref(),
        Some("main")
    );

    // No certificate, or one of another CA: refused at the handshake, counted, nothing dialed.
    let metrics = metrics_addr(&server);
    assert_eq!(tls_cli(None, &["get", "k"]), None);
    let series = r#"amb_handshake_failures_total{direction="accepted",transport="tls",reason="no_certificate"}"#;
    wait_sample(metrics, series, 1.0).await;
    let stranger = Pki::new();
    assert_eq!(tls_cli(Some(&stranger), &["get", "k"]), None);
    let main_ok = r#"amb_connections_total{side="server",route="main",end="ok"}"#;
    let text = wait_sample(metrics, main_ok, 2.0).await;
    // The allow-lists hold as for tunnels: a verified client not on the list gets nothing.
    let guarded = Amb::server(
        &pki,
        0,
        &[
            "--upstream",
            &format!("127.0.0.1:{}", main.port),
            "--allow",
            "uri:spiffe://amb/someone-else",
        ],
    );
    let guarded_port = guarded.server_addr().port();
    let mut flags: Vec<String> = [
        "--tls",
        "--cacert",
        &ca,
        "--cert",
        &path(&pki, "client.pem"),
    ]
    .map(String::from)
    .into();
    flags.extend([
        "--key".into(),
        path(&pki, "client.key"),
        "get".into(),
        "k".into(),
    ]);
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    assert_eq!(redis_cli(guarded_port, &flags), None);

    let refused = r#"amb_connections_total{side="server",route="main",end="refused"}"#;
    assert!(
        matches!(sample(&text, refused), None | Some(0.0)),
        "a refused handshake reached a route"
    );
}

/// A client-only process follows its config file as the other modes do: a listener added and
/// the service moved to another TLS redis (its files read again) take effect without a
/// restart; a removed listener stops accepting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_only_process_follows_its_file() {
    let pki = Pki::new();
    let (first, second) = (Redis::start_tls(&pki), Redis::start_tls(&pki));
    let path = |name: &str| pki.path(name).display().to_string();
    let (one, two) = (free_port(), free_port());
    let config = |service: &Redis, ports: &[u16]| {
        let mut text = format!(
            "[client]\ntls-upstream = \"localhost:{}\"\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\
             reload-check = \"100ms\"\n",
            service.port,
            path("ca.pem"),
            path("client.pem"),
            path("client.key")
        );
        for port in ports {
            text += &format!("\n[[client.listen]]\nlisten = \"{port}\"\n");
        }
        text
    };
    let file = pki.path("direct.toml");
    std::fs::write(&file, config(&first, &[one])).unwrap();
    let client = Amb::spawn(&[
        "client".into(),
        "--config".into(),
        file.display().to_string(),
    ]);
    client.log.wait_for(&["amb client listening"]);
    let at = |port: u16| std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let set = |port: u16, value: &'static str| async move {
        resp_call(at(port), &["SET", "greeting", value])
            .await
            .unwrap()
    };
    assert_eq!(set(one, "first").await, "+OK\r\n");
    assert_eq!(first.cli(&["get", "greeting"]).as_deref(), Some("first"));

    // A listener added, the service moved: both listeners carry to the second redis.
    std::fs::write(&file, config(&second, &[one, two])).unwrap();
    client.log.wait_for(&["config file reloaded", "changes=2"]);
    assert_eq!(set(one, "second").await, "+OK\r\n");
    assert_eq!(set(two, "second, again").await, "+OK\r\n");
    assert_eq!(
        second.cli(&["get", "greeting"]).as_deref(),
        Some("second, again")
    );
    assert_eq!(first.cli(&["get", "greeting"]).as_deref(), Some("first"));

    // The first listener removed: it no longer accepts; the other carries on.
    std::fs::write(&file, config(&second, &[two])).unwrap();
    client.log.wait_for(&["config file reloaded", "changes=1"]);
    yield_until("the removed listener to close", || {
        std::net::TcpStream::connect(at(one)).is_err()
    })
    .await;
    assert_eq!(set(two, "still").await, "+OK\r\n");
}
