//! Reverse tunnels: the service side (`amb server --peer`) dials the app side (`amb client
//! --accept`), which still opens the streams. Real redis, the real binary, both transports.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::netns::Netns;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

per_transport!(
    redis_works_through_a_reverse_pair_and_the_server_binds_nothing,
    a_killed_service_side_is_refused_at_once_and_back_within_2s,
    two_service_sides_share_a_route_and_losing_one_costs_nothing,
    a_dialer_off_the_allow_list_is_turned_away_and_gets_no_stream,
    a_draining_service_side_finishes_its_streams,
    an_egress_only_service_side_is_reached_only_in_reverse,
    a_service_side_follows_its_reloaded_routes,
    an_app_side_reloaded_allow_list_lets_a_service_side_go,
    a_service_side_follows_its_reloaded_peers,
    a_frozen_service_side_is_let_go_and_comes_back,
    an_app_side_restarted_is_redialed_within_2s,
    a_service_side_closes_an_app_side_its_allow_list_does_not_admit,
);

/// The identity of the test PKI's server certificate: what the app side allows in.
const SERVICE_SIDE: &str = "dns:localhost";

/// `amb client --accept` on a free loopback port, its listener on another, over `t`.
fn app_side(pki: &Pki, t: Transport, allow: &str, extra: &[&str]) -> Amb {
    let mut args: Vec<String> = [
        "client",
        "--listen",
        "0",
        "--accept",
        "127.0.0.1:0",
        "--allow",
        allow,
        "--transport",
        t.flag(),
    ]
    .map(String::from)
    .into();
    args.extend(pki.cert_flags("client"));
    args.extend(extra.iter().map(|s| s.to_string()));
    Amb::spawn(&args)
}

/// Where the app side takes service-side ambassadors.
fn accept_addr(app: &Amb) -> SocketAddr {
    let line = app.log.wait_for(&["accepting service-side ambassadors"]);
    field(&line, "accept").parse().unwrap()
}

/// `amb server --peer` dialing `peer` over `t`, serving `upstream` as the default route.
fn service_side(pki: &Pki, t: Transport, upstream: &str, peer: &str, extra: &[&str]) -> Amb {
    let mut args: Vec<String> = [
        "server",
        "--upstream",
        upstream,
        "--peer",
        peer,
        "--transport",
        t.flag(),
    ]
    .map(String::from)
    .into();
    args.extend(pki.cert_flags("server"));
    args.extend(extra.iter().map(|s| s.to_string()));
    Amb::spawn(&args)
}

/// Waits until the app side has `n` service sides' tunnel connections (all of each pool).
fn wait_connected(app: &Amb, t: Transport, n: usize) {
    let connected = [
        "service-side ambassador connected",
        "direction=\"accepted\"",
    ];
    app.log.wait_for_nth(&connected, t.pool_size() * n);
}

/// A reverse pair before a real redis, connected.
struct Pair {
    pki: Pki,
    redis: Redis,
    app: Amb,
    service: Amb,
}

impl Pair {
    fn start(t: Transport) -> Self {
        let pki = Pki::new();
        let redis = Redis::start();
        let app = app_side(&pki, t, SERVICE_SIDE, &[]);
        let peer = format!("localhost:{}", accept_addr(&app).port());
        let upstream = format!("127.0.0.1:{}", redis.port);
        let service = service_side(&pki, t, &upstream, &peer, &[]);
        wait_connected(&app, t, 1);
        Pair {
            pki,
            redis,
            app,
            service,
        }
    }
}

/// `PING` on an open app connection: `Some(true)` for `+PONG`, `Some(false)` for a reset or
/// an end, `None` if nothing came within 5 s (hung).
async fn ping_on(tcp: &mut BufReader<TcpStream>) -> Option<bool> {
    let exchange = async {
        if tcp.get_mut().write_all(b"PING\r\n").await.is_err() {
            return false;
        }
        let mut line = String::new();
        tcp.read_line(&mut line).await.is_ok() && line == "+PONG\r\n"
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
}

/// A fresh app connection's `PING` (see [`ping_on`]).
/// A reset that comes before the connect completes is a refusal too.
async fn ping(listen: SocketAddr) -> Option<bool> {
    match TcpStream::connect(listen).await {
        Ok(tcp) => ping_on(&mut BufReader::new(tcp)).await,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Some(false),
        Err(e) => panic!("connect to the app side's listener: {e}"),
    }
}

/// Asserts that a dialing server listens nowhere: no TCP socket listens (but its metrics
/// endpoint, if it has one), and no UDP socket is bound to the default tunnel port (a QUIC
/// dialer's own socket is bound to a port of its own).
fn assert_no_listener(server: &Amb) {
    let metrics = (server.log.count(&["metrics endpoint listening"]) > 0)
        .then(|| format!("{} ", metrics_addr(server)));
    let out = std::process::Command::new("ss")
        .args(["-Hlntup"])
        .output()
        .expect("ss(8) must be installed");
    let owner = format!("pid={},", server.child.id());
    let text = String::from_utf8_lossy(&out.stdout);
    let listening: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(&owner))
        .filter(|line| line.starts_with("tcp") || line.contains(":7443 "))
        .filter(|line| metrics.as_ref().is_none_or(|m| !line.contains(m.as_str())))
        .collect();
    assert!(
        listening.is_empty(),
        "the dialing server listens: {listening:?}"
    );
}

async fn redis_works_through_a_reverse_pair_and_the_server_binds_nothing(t: Transport) {
    let pki = Pki::new();
    let redis = Redis::start();
    let metrics = ["--metrics", "127.0.0.1:0"];
    let app = app_side(&pki, t, SERVICE_SIDE, &metrics);
    let port = accept_addr(&app).port();
    let peer = format!("localhost:{port}");
    let upstream = format!("127.0.0.1:{}", redis.port);
    let service = service_side(&pki, t, &upstream, &peer, &metrics);
    wait_connected(&app, t, 1);
    let listen = app.listen_addr();
    for _ in 0..20 {
        assert!(incr(listen).await, "INCR through the reverse pair");
    }
    assert_eq!(hits(&redis), 20);
    assert_no_listener(&service);

    // The metrics say which way each tunnel connection was made, on both sides.
    let (app_metrics, service_metrics) = (metrics_addr(&app), metrics_addr(&service));
    let accepted = format!(
        r#"amb_tunnel_connections{{direction="accepted",peer="",transport="{}"}}"#,
        t.flag()
    );
    assert_eq!(
        sample(&scrape(app_metrics).await, &accepted),
        Some(t.pool_size() as f64)
    );
    let dialed = format!(
        r#"amb_tunnel_connections{{direction="dialed",peer="{peer}",transport="{}"}}"#,
        t.flag()
    );
    assert_eq!(
        sample(&scrape(service_metrics).await, &dialed),
        Some(t.pool_size() as f64)
    );
    let served = r#"amb_connections_total{side="server",route="default",end="ok"}"#;
    wait_sample(service_metrics, served, 20.0).await;
    assert_eq!(curl(app_metrics, "/readyz").await.0, 200);

    // With the service side gone, refusals are counted under their own reason.
    drop(service);
    app.log
        .wait_for_nth(&["service-side ambassador lost"], t.pool_size());
    assert_reset_after_write(listen, b"hello").await;
    let refused = r#"amb_refusals_total{side="client",route="default",reason="no_ambassador"}"#;
    wait_sample(app_metrics, refused, 1.0).await;
    assert_ne!(curl(app_metrics, "/readyz").await.0, 200);
}

async fn a_killed_service_side_is_refused_at_once_and_back_within_2s(t: Transport) {
    let Pair {
        pki,
        redis,
        app,
        service,
    } = Pair::start(t);
    let listen = app.listen_addr();
    assert_eq!(ping(listen).await, Some(true));
    let peer = format!("localhost:{}", accept_addr(&app).port());
    service.signal("KILL");
    let killed = Instant::now();
    // Fresh app connections, one after another: each ends (never hangs), and from at most
    // 3 s after the kill each is refused at once.
    let mut last_slow = Duration::ZERO;
    while killed.elapsed() < Duration::from_millis(3500) {
        let started = Instant::now();
        let answer = ping(listen).await;
        assert_ne!(
            answer,
            None,
            "an app connection hung after the kill; app side log:\n{}",
            app.log.text()
        );
        assert_ne!(answer, Some(true), "answered by a killed service side");
        if started.elapsed() > Duration::from_millis(200) {
            last_slow = killed.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        last_slow < Duration::from_secs(3),
        "app connections were still slow to be refused {last_slow:?} after the kill"
    );
    eprintln!("{t:?}: refused at once from {last_slow:?} after the kill");

    blocking(move || drop(service)).await;
    let upstream = format!("127.0.0.1:{}", redis.port);
    let restarted = Instant::now();
    let _service = service_side(&pki, t, &upstream, &peer, &[]);
    let answered = loop {
        if ping(listen).await == Some(true) {
            break restarted.elapsed();
        }
        assert!(
            restarted.elapsed() < READY,
            "no answer after the restart; app side log:\n{}",
            app.log.text()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    eprintln!("{t:?}: answered {answered:?} after the restart");
    assert!(
        answered < Duration::from_secs(2),
        "the first answer came {answered:?} after the restart"
    );
}

async fn two_service_sides_share_a_route_and_losing_one_costs_nothing(t: Transport) {
    let pki = Pki::new();
    let redis = [Redis::start(), Redis::start()];
    let app = app_side(&pki, t, SERVICE_SIDE, &[]);
    let peer = format!("localhost:{}", accept_addr(&app).port());
    let mut services: Vec<Amb> = redis
        .iter()
        .map(|r| service_side(&pki, t, &format!("127.0.0.1:{}", r.port), &peer, &[]))
        .collect();
    wait_connected(&app, t, 2);
    let listen = app.listen_addr();
    for _ in 0..40 {
        assert!(incr(listen).await);
    }
    let (a, b) = (hits(&redis[0]), hits(&redis[1]));
    assert_eq!(a + b, 40);
    assert!(a >= 5 && b >= 5, "both service sides used: {a} and {b}");

    // A loop of fresh connections while one service side goes away: a crash over TLS (the
    // kernel resets its connections at once), a shutdown over QUIC (a crash is noticed only
    // after the liveness deadline, tests/crash.rs).
    let stop = Arc::new(AtomicBool::new(false));
    let (done, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let looping = {
        let (stop, done, failed) = (stop.clone(), done.clone(), failed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let counter = if incr(listen).await { &done } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    yield_until("20 connections before", || {
        done.load(Ordering::Relaxed) >= 20
    })
    .await;
    let gone = &mut services[0];
    gone.signal(match t {
        Transport::Tls => "KILL",
        Transport::Quic => "TERM",
    });
    blocking({
        let mut gone = services.remove(0);
        move || {
            gone.wait_exit(Duration::from_secs(20));
        }
    })
    .await;
    let after = done.load(Ordering::Relaxed);
    yield_until("50 connections after", || {
        done.load(Ordering::Relaxed) >= after + 50
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    looping.await.unwrap();
    // Over TLS the one connection live on the killed side when it died may be reset.
    let allowed = match t {
        Transport::Tls => 1,
        Transport::Quic => 0,
    };
    let failures = failed.load(Ordering::Relaxed);
    assert!(
        failures <= allowed,
        "{failures} fresh connections failed while a service side went away"
    );
    // Every answered INCR was counted at a redis; a failed one may have been, before its reply
    // was lost.
    let (total, counted) = (
        done.load(Ordering::Relaxed),
        hits(&redis[0]) + hits(&redis[1]),
    );
    assert!(
        (40 + total..=40 + total + failures).contains(&counted),
        "{counted} INCRs counted for {total} answered and {failures} failed"
    );
}

async fn a_dialer_off_the_allow_list_is_turned_away_and_gets_no_stream(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let app = app_side(&pki, t, "dns:another-host", &[]);
    let peer = format!("localhost:{}", accept_addr(&app).port());
    let service = service_side(&pki, t, &upstream.addr.to_string(), &peer, &[]);
    app.log.wait_for(&["turned away"]);
    let listen = app.listen_addr();
    for _ in 0..5 {
        let started = Instant::now();
        assert_reset_after_write(listen, b"hello").await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "refused only after {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        upstream.accepted(),
        0,
        "the turned-away side served a stream"
    );
    assert_eq!(
        service.log.count(&["tunnel connection up"]),
        0,
        "the turned-away side took its tunnel connection for accepted"
    );
}

async fn a_draining_service_side_finishes_its_streams(t: Transport) {
    let Pair {
        app,
        mut service,
        pki: _pki,
        redis: _redis,
    } = Pair::start(t);
    let listen = app.listen_addr();
    let mut live = BufReader::new(TcpStream::connect(listen).await.unwrap());
    assert_eq!(ping_on(&mut live).await, Some(true));
    service.signal("TERM");
    // Drained: new app connections are refused at once, the live one runs on.
    app.log.wait_for(&["draining"]);
    let refused = Instant::now();
    assert_eq!(
        ping(listen).await,
        Some(false),
        "a new connection after the drain"
    );
    assert!(refused.elapsed() < Duration::from_secs(1));
    assert_eq!(
        ping_on(&mut live).await,
        Some(true),
        "the live connection was cut"
    );
    drop(live);
    let status = blocking(move || service.wait_exit(Duration::from_secs(20))).await;
    assert!(status.success(), "the service side exited with {status}");
}

/// The service side in a network namespace whose firewall drops every new inbound
/// connection (nftables, input hook): it can only dial out.
async fn an_egress_only_service_side_is_reached_only_in_reverse(t: Transport) {
    let pki = Pki::new();
    let ns = Netns::new();
    ns.exec(&["nft", "add", "table", "inet", "egress"]);
    ns.exec(&[
        "nft",
        "add chain inet egress in { type filter hook input priority 0 ; policy accept ; }",
    ]);
    ns.exec(&["nft", "add rule inet egress in iif != lo ct state new drop"]);
    // The service and its ambassador, inside.
    let redis_port = free_port();
    let mut redis = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "redis-server", "--port"])
        .arg(redis_port.to_string())
        .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let in_ns = |args: Vec<String>| {
        Amb::spawn_shell(&format!("exec {} {AMB} {}", ns.prefix(), args.join(" ")))
    };

    // Forward, the app side dialing in: no tunnel connection comes up.
    let mut forward_server: Vec<String> = ["server", "--listen", &format!("{}:0", ns.ns_ip)]
        .map(String::from)
        .into();
    forward_server.extend(pki.cert_flags("server"));
    forward_server.extend(["--upstream".into(), format!("127.0.0.1:{redis_port}")]);
    forward_server.extend(["--transport".into(), t.flag().into()]);
    let forward_server = in_ns(forward_server);
    let port = forward_server.server_addr().port();
    let mut forward: Vec<String> = ["client", "--listen", "0", "--transport", t.flag()]
        .map(String::from)
        .into();
    forward.extend(["--peer".into(), format!("{}:{port}", ns.ns_ip)]);
    forward.extend(["--server-name".into(), "localhost".into()]);
    forward.extend(["--tunnel-wait".into(), "1s".into()]);
    forward.extend(["--handshake-timeout".into(), "1s".into()]);
    forward.extend(pki.cert_flags("client"));
    let forward = Amb::spawn(&forward);
    let forward_listen = forward.listen_addr();
    forward.log.wait_for(&["tunnel connect failed"]);
    assert_ne!(
        ping(forward_listen).await,
        Some(true),
        "reached through the firewall"
    );
    assert_eq!(
        forward.log.count(&["tunnel connection up"]),
        0,
        "a tunnel connection came in through the firewall: it is not real"
    );

    // Reverse, the service side dialing out: redis answers.
    let mut app_args: Vec<String> = [
        "client",
        "--listen",
        "0",
        "--accept",
        &format!("{}:0", ns.host_ip),
        "--allow",
        SERVICE_SIDE,
        "--transport",
        t.flag(),
    ]
    .map(String::from)
    .into();
    app_args.extend(pki.cert_flags("client"));
    let app = Amb::spawn(&app_args);
    let accept = accept_addr(&app);
    let mut service: Vec<String> = ["server", "--transport", t.flag()].map(String::from).into();
    service.extend(pki.cert_flags("server"));
    service.extend(["--upstream".into(), format!("127.0.0.1:{redis_port}")]);
    service.extend(["--peer".into(), accept.to_string()]);
    let _service = in_ns(service);
    wait_connected(&app, t, 1);
    let listen = app.listen_addr();
    for _ in 0..10 {
        assert!(incr(listen).await, "INCR through the reverse pair");
    }
    let _ = redis.kill();
    let _ = redis.wait();
}

#[test]
fn accept_without_an_allow_list_exits_before_binding() {
    let pki = Pki::new();
    let port = free_port();
    let mut args: Vec<String> = ["client", "--listen", &port.to_string()]
        .map(String::from)
        .into();
    args.extend(["--accept".into(), "127.0.0.1:0".into()]);
    args.extend(pki.cert_flags("client"));
    let mut app = Amb::spawn(&args);
    let status = app.wait_exit(READY);
    assert!(!status.success(), "accepted without an allow-list");
    assert!(
        app.log.text().contains("--allow"),
        "the error does not say what to give: {}",
        app.log.text()
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "the listener was bound"
    );
}

/// `--peer` and `--accept` together would leave the accepted tunnels carrying nothing: the
/// client refuses to start, saying so.
#[test]
fn peer_and_accept_together_are_refused() {
    let pki = Pki::new();
    let mut args: Vec<String> = ["client", "--listen", "0", "--peer", "localhost:7443"]
        .map(String::from)
        .into();
    args.extend(["--accept", "127.0.0.1:0", "--allow", "dns:redis-host"].map(String::from));
    args.extend(pki.cert_flags("client"));
    let mut app = Amb::spawn(&args);
    assert!(
        !app.wait_exit(READY).success(),
        "started with --peer and --accept"
    );
    assert!(
        app.log.text().contains("--accept"),
        "the error does not name --accept: {}",
        app.log.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_tunnels_carry_a_config_files_listeners() {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let dir = TempDir::new("reverse-config");
    let app_port = free_port();
    let [cert, key, ca] = ["client.pem", "client.key", "ca.pem"].map(|f| pki.path(f));
    let app_config = dir.0.join("app.toml");
    std::fs::write(
        &app_config,
        format!(
            "[client]\naccept = \"127.0.0.1:0\"\nallow = [\"{SERVICE_SIDE}\"]\ntransport = \"tls\"\n\
             cert = {cert:?}\nkey = {key:?}\nca = {ca:?}\n\n[[client.listen]]\nlisten = \"{app_port}\"\nroute = \"echo\"\n"
        ),
    )
    .unwrap();
    let app = Amb::spawn(&[
        "client".into(),
        "--config".into(),
        app_config.display().to_string(),
    ]);
    let accept = accept_addr(&app);
    let [cert, key] = ["server.pem", "server.key"].map(|f| pki.path(f));
    let service_config = dir.0.join("service.toml");
    std::fs::write(
        &service_config,
        format!(
            "[server]\npeers = [\"localhost:{}\"]\ntransport = \"tls\"\ncert = {cert:?}\nkey = {key:?}\nca = {ca:?}\n\n\
             [[server.route]]\nname = \"echo\"\nupstream = \"{}\"\n",
            accept.port(),
            upstream.addr
        ),
    )
    .unwrap();
    let service = Amb::spawn(&[
        "server".into(),
        "--config".into(),
        service_config.display().to_string(),
    ]);
    wait_connected(&app, Transport::Tls, 1);
    assert!(echo_works(SocketAddr::from(([127, 0, 0, 1], app_port))).await);
    assert_no_listener(&service);
}

/// Behind NAT the service side is the QUIC client: a new source address (the relay's socket
/// toward the app side moved) keeps its connection, mid-transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_side_behind_nat_keeps_its_quic_connection_across_an_address_change() {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let app = app_side(&pki, Transport::Quic, SERVICE_SIDE, &[]);
    let relay = support::impair::Relay::start(accept_addr(&app)).await;
    relay.link.delay_ms.store(2, Ordering::SeqCst);
    let peer = format!("localhost:{}", relay.addr.port());
    let _service = service_side(
        &pki,
        Transport::Quic,
        &upstream.addr.to_string(),
        &peer,
        &[],
    );
    wait_connected(&app, Transport::Quic, 1);
    let rebind = async {
        let new = relay.rebind_udp().await;
        assert_ne!(new.port(), 0);
    };
    echo_exact(app.listen_addr(), 16 << 20, rebind).await;
    assert_eq!(
        app.log.count(&["service-side ambassador lost"]),
        0,
        "the address change dropped the tunnel connection"
    );
    assert!(echo_works(app.listen_addr()).await);
}

/// The certificate keys of a config file part, for `pki`'s `role` certificate.
fn cert_keys(pki: &Pki, role: &str) -> String {
    let [cert, key, ca] = [
        format!("{role}.pem"),
        format!("{role}.key"),
        "ca.pem".into(),
    ]
    .map(|f| pki.path(&f));
    format!("cert = {cert:?}\nkey = {key:?}\nca = {ca:?}\n")
}

async fn a_service_side_follows_its_reloaded_routes(t: Transport) {
    let pki = Pki::new();
    let (first, second) = (Upstream::echo().await, Upstream::echo().await);
    let app = app_side(&pki, t, SERVICE_SIDE, &[]);
    let peer = format!("localhost:{}", accept_addr(&app).port());
    let dir = TempDir::new("reverse-reload");
    let config = dir.0.join("service.toml");
    let write = |upstream: SocketAddr| {
        let text = format!(
            "[server]\npeers = [\"{peer}\"]\ntransport = \"{}\"\n{}upstream = \"{upstream}\"\n",
            t.flag(),
            cert_keys(&pki, "server")
        );
        std::fs::write(&config, text).unwrap();
    };
    write(first.addr);
    let service = Amb::spawn(&[
        "server".into(),
        "--config".into(),
        config.display().to_string(),
    ]);
    wait_connected(&app, t, 1);
    let listen = app.listen_addr();
    assert!(echo_works(listen).await);
    assert_eq!(first.accepted(), 1);

    write(second.addr);
    service.signal("HUP");
    // New app connections follow the reloaded route over the same tunnel connections.
    let deadline = Instant::now() + READY;
    while second.accepted() == 0 {
        assert!(
            echo_works(listen).await,
            "an app connection failed across the reload"
        );
        assert!(
            Instant::now() < deadline,
            "the reloaded route was never taken"
        );
    }
    assert!(echo_works(listen).await);
    assert_eq!(
        app.log
            .count(&["service-side ambassador connected", "direction="]),
        t.pool_size(),
        "the reload redialed"
    );
}

async fn an_app_side_reloaded_allow_list_lets_a_service_side_go(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let dir = TempDir::new("reverse-allow");
    let config = dir.0.join("app.toml");
    let port = free_port();
    let write = |allow: &str| {
        let text = format!(
            "[client]\naccept = \"127.0.0.1:0\"\nallow = [\"{allow}\"]\ntransport = \"{}\"\n{}\n\
             [[client.listen]]\nlisten = \"{port}\"\n",
            t.flag(),
            cert_keys(&pki, "client")
        );
        std::fs::write(&config, text).unwrap();
    };
    write(SERVICE_SIDE);
    let app = Amb::spawn(&[
        "client".into(),
        "--config".into(),
        config.display().to_string(),
    ]);
    let peer = format!("localhost:{}", accept_addr(&app).port());
    let _service = service_side(&pki, t, &upstream.addr.to_string(), &peer, &[]);
    wait_connected(&app, t, 1);
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    assert!(echo_works(listen).await);

    write("dns:someone-else");
    app.signal("HUP");
    app.log.wait_for(&["no longer on the allow-list"]);
    let served = upstream.accepted();
    for _ in 0..3 {
        assert_reset_after_write(listen, b"hello").await;
    }
    assert_eq!(
        upstream.accepted(),
        served,
        "a revoked service side got a stream"
    );
}

async fn a_service_side_follows_its_reloaded_peers(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let (first, second) = (
        app_side(&pki, t, SERVICE_SIDE, &[]),
        app_side(&pki, t, SERVICE_SIDE, &[]),
    );
    let peer = |app: &Amb| format!("localhost:{}", accept_addr(app).port());
    let dir = TempDir::new("reverse-peers");
    let config = dir.0.join("service.toml");
    let write = |peer: String| {
        let text = format!(
            "[server]\npeers = [\"{peer}\"]\ntransport = \"{}\"\n{}upstream = \"{}\"\n",
            t.flag(),
            cert_keys(&pki, "server"),
            upstream.addr
        );
        std::fs::write(&config, text).unwrap();
    };
    write(peer(&first));
    let service = Amb::spawn(&[
        "server".into(),
        "--config".into(),
        config.display().to_string(),
    ]);
    wait_connected(&first, t, 1);
    assert!(echo_works(first.listen_addr()).await);

    // The file now names the second app side: it is dialed, the first is let go (drained).
    write(peer(&second));
    service.signal("HUP");
    wait_connected(&second, t, 1);
    assert!(echo_works(second.listen_addr()).await);
    first.log.wait_for(&["draining"]);
    // Not served any more: its app connections are reset.
    assert_reset_after_write(first.listen_addr(), b"hello").await;
}

/// A service side that stops answering (SIGSTOP: its host froze) is let go by the app side as
/// a forward client lets go of a silent server: over QUIC at the 2 s liveness deadline, over
/// TLS at the keep-alive's idle timeout (2 s here); app connections are then refused at once.
/// Thawed, it finds its connections gone and dials again.
async fn a_frozen_service_side_is_let_go_and_comes_back(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let app = app_side(&pki, t, SERVICE_SIDE, &["--idle-timeout", "2s"]);
    let peer = format!("localhost:{}", accept_addr(&app).port());
    let service = service_side(
        &pki,
        t,
        &upstream.addr.to_string(),
        &peer,
        &["--idle-timeout", "2s"],
    );
    wait_connected(&app, t, 1);
    let listen = app.listen_addr();
    assert!(echo_works(listen).await);

    service.pause();
    let frozen = Instant::now();
    app.log
        .wait_for_nth(&["service-side ambassador lost"], t.pool_size());
    let let_go = frozen.elapsed();
    eprintln!("{t:?}: a frozen service side let go after {let_go:?}");
    assert!(
        let_go < Duration::from_secs(6),
        "let go only after {let_go:?}"
    );
    let refused = Instant::now();
    assert_reset_after_write(listen, b"hello").await;
    assert!(refused.elapsed() < Duration::from_secs(1));

    service.resume();
    wait_connected(&app, t, 2);
    assert!(
        echo_works(listen).await,
        "no echo once the service side thawed; app side:\n{}\nservice side:\n{}",
        app.log.text(),
        service.log.text()
    );
}

/// The app side restarted on its address: the service side finds its tunnel connections gone
/// at once (over QUIC the restarted app side answers with a stateless reset made with the key
/// derived from its own; over TLS the next keep-alive PING, every second, draws the kernel's
/// reset) and redials.
async fn an_app_side_restarted_is_redialed_within_2s(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let app = app_side(&pki, t, SERVICE_SIDE, &[]);
    let accept = accept_addr(&app);
    let peer = format!("localhost:{}", accept.port());
    let _service = service_side(&pki, t, &upstream.addr.to_string(), &peer, &[]);
    wait_connected(&app, t, 1);
    app.signal("KILL");
    blocking(move || drop(app)).await;

    let restarted = Instant::now();
    let mut args: Vec<String> = ["client", "--listen", "0", "--accept", &accept.to_string()]
        .map(String::from)
        .into();
    args.extend([
        "--allow".into(),
        SERVICE_SIDE.into(),
        "--transport".into(),
        t.flag().into(),
    ]);
    args.extend(pki.cert_flags("client"));
    let app = Amb::spawn(&args);
    let listen = app.listen_addr();
    wait_connected(&app, t, 1);
    let redialed = restarted.elapsed();
    eprintln!("{t:?}: redialed {redialed:?} after the app side's restart");
    assert!(
        redialed < Duration::from_secs(2),
        "redialed only after {redialed:?}"
    );
    assert!(echo_works(listen).await);
}

/// A service side whose server-wide allow-list does not admit the app side closes its tunnel
/// connections (and redials, backing off) instead of serving 403s the app side would keep
/// choosing it for.
async fn a_service_side_closes_an_app_side_its_allow_list_does_not_admit(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let app = app_side(&pki, t, SERVICE_SIDE, &[]);
    let peer = format!("localhost:{}", accept_addr(&app).port());
    let service = service_side(
        &pki,
        t,
        &upstream.addr.to_string(),
        &peer,
        &["--allow", "uri:spiffe://amb/someone-else"],
    );
    service
        .log
        .wait_for_nth(&["tunnel connection ended after"], 2);
    let listen = app.listen_addr();
    assert_reset_after_write(listen, b"hello").await;
    assert_eq!(upstream.accepted(), 0);
}
