//! Discovery end to end: where the services are comes from Docker-links variables
//! (`--from-env`), DNS SRV records served by a real dnsmasq, or an etcd registry; the sets change
//! while amb runs. Real redis-servers behind real `amb server`s, over QUIC and TLS.

mod support;

use std::process::Command;
use std::time::Duration;

use amb_pki::LeafSpec;
use support::*;
use tokio::io::BufReader;

per_transport!(
    docker_links_variables_configure_both_sides,
    srv_peers_follow_their_records_by_priority_and_weight,
    srv_upstreams_follow_their_records,
    etcd_registered_servers_come_and_go_and_survive_an_etcd_restart,
    etcd_keys_are_a_routes_upstreams,
    an_etcd_over_tls_is_reached_with_its_ca_and_a_client_certificate,
    a_watch_that_fell_behind_a_compaction_reads_the_registry_again,
);

/// `srv-host` for `target:port` with `priority` and `weight`, and the target's address.
fn srv(service: &str, target: &str, port: u16, priority: u16, weight: u16) -> [String; 2] {
    [
        format!("srv-host={service},{target},{port},{priority},{weight}"),
        format!("host-record={target},127.0.0.1"),
    ]
}

/// `amb client --peer PEER` (a discovered set) with a tunnel wait no fresh connection may
/// spend: one that waited for a server gone from the set fails its 5 s exchange.
fn discovering_client(pki: &Pki, t: Transport, peer: &str, extra: &[&str]) -> Amb {
    let mut args: Vec<String> = ["client", "--listen", "0", "--peer", peer, "--transport"]
        .map(String::from)
        .to_vec();
    args.extend([t.flag(), "--tunnel-wait", "60s"].map(String::from));
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(pki.cert_flags("client"));
    Amb::spawn(&args)
}

const AMB_SRV: &str = "_amb._tcp.test.internal";

/// Two `amb server`s, each before its own redis and with a certificate for its own name only,
/// published as SRV records; a client with `--peer srv:...` verifies each against its target
/// name, spreads by weight within a priority, follows record changes for new connections while
/// a connection opened before stays up, and falls to the next priority when the lowest is gone.
async fn srv_peers_follow_their_records_by_priority_and_weight(t: Transport) {
    let pki = Pki::new();
    let names = ["amb-a.test.internal", "amb-b.test.internal"];
    for name in names {
        let leaf = pki
            .ca
            .issue(&LeafSpec::server(&[name.to_owned()], 30))
            .unwrap();
        pki.write_leaf(name, &leaf);
    }
    let redis = [Redis::start(), Redis::start()];
    let mut servers = [0, 1].map(|i| {
        let mut args: Vec<String> = ["server", "--listen", "127.0.0.1:0", "--upstream"]
            .map(String::from)
            .to_vec();
        args.push(format!("127.0.0.1:{}", redis[i].port));
        args.extend(pki.cert_flags(names[i]));
        Amb::spawn(&args)
    });
    let ports = servers.each_ref().map(|s| s.server_addr().port());
    let records = |list: &[(usize, u16, u16)]| -> Vec<String> {
        list.iter()
            .flat_map(|&(i, priority, weight)| srv(AMB_SRV, names[i], ports[i], priority, weight))
            .collect()
    };
    let mut dns = Dnsmasq::start(&records(&[(0, 10, 1), (1, 10, 3)]));
    let peer = format!("srv:{AMB_SRV}");
    let client = discovering_client(&pki, t, &peer, &["--dns-server", &dns.addr()]);
    for name in names {
        client.log.wait_for(&["tunnel connection up", name]);
    }
    let listen = client.listen_addr();

    // Weights 1 and 3 within one priority.
    for _ in 0..200 {
        assert!(incr(listen).await);
    }
    let (a, b) = (hits(&redis[0]), hits(&redis[1]));
    assert_eq!(a + b, 200);
    assert!((20..=80).contains(&a), "weights 1:3 gave {a}:{b}");

    // Only B is listed: new connections follow at once; one is held open there.
    dns.replace(&records(&[(1, 10, 1)]));
    client.log.wait_for_nth(&["discovered set changed"], 2);
    let before = hits(&redis[1]);
    let mut held = BufReader::new(tokio::net::TcpStream::connect(listen).await.unwrap());
    assert!(incr_on(&mut held).await);
    assert_eq!(hits(&redis[1]), before + 1, "the held connection is on B");

    // A is back at a lower priority value than B: every new connection goes to A, while the
    // held connection on B goes on.
    dns.replace(&records(&[(0, 10, 1), (1, 20, 1)]));
    client.log.wait_for_nth(&["discovered set changed"], 3);
    client
        .log
        .wait_for_nth(&["tunnel connection up", names[0]], 2);
    let (a, b) = (hits(&redis[0]), hits(&redis[1]));
    for _ in 0..50 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&redis[0]) - a, hits(&redis[1]) - b), (50, 0));
    assert!(
        incr_on(&mut held).await,
        "the connection opened before the change stays up"
    );

    // A goes away: B, the next priority, takes every new connection at once.
    servers[0].signal("TERM");
    servers[0].wait_exit(Duration::from_secs(20));
    let b = hits(&redis[1]);
    for _ in 0..20 {
        assert!(incr(listen).await);
    }
    assert_eq!(hits(&redis[1]) - b, 20);
}

/// A route whose upstreams are SRV records: new connections follow the records as they
/// change; a connection opened before stays where it is.
async fn srv_upstreams_follow_their_records(t: Transport) {
    let pki = Pki::new();
    let redis = [Redis::start(), Redis::start()];
    let service = "_redis._tcp.test.internal";
    let records = |list: &[usize]| -> Vec<String> {
        list.iter()
            .flat_map(|&i| {
                srv(
                    service,
                    &format!("redis-{i}.test.internal"),
                    redis[i].port,
                    10,
                    1,
                )
            })
            .collect()
    };
    let mut dns = Dnsmasq::start(&records(&[0]));
    let route = format!("redis=srv:{service}");
    // `amb check --connect` looks the records up and dials each target.
    let check = Command::new(AMB)
        .args([
            "check",
            "server",
            "--route",
            &route,
            "--dns-server",
            &dns.addr(),
            "--connect",
        ])
        .args(pki.cert_flags("server"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&check.stdout);
    let target = format!("redis-0.test.internal:{}", redis[0].port);
    assert!(check.status.success(), "{said}");
    assert!(
        said.contains(&format!(
            "ok: route redis: upstream {target} accepted a connection"
        )),
        "{said}"
    );
    let server = Amb::server(&pki, 0, &["--route", &route, "--dns-server", &dns.addr()]);
    let publish = |list: &[usize]| dns.replace(&records(list));
    route_follows_its_discovered_upstreams(t, &pki, &redis, &server, publish).await;
}

/// Over `server`'s route `redis`, whose set lists the first of `redis` now: new connections
/// follow the set as `publish` lists both, then the second only; one opened before stays.
async fn route_follows_its_discovered_upstreams(
    t: Transport,
    pki: &Pki,
    redis: &[Redis; 2],
    server: &Amb,
    mut publish: impl FnMut(&[usize]),
) {
    let client = Amb::client(
        pki,
        "client",
        server.server_addr(),
        t,
        &["--listen", "0=redis"],
    );
    let listen = client.listen_addr_for("redis");
    for _ in 0..10 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&redis[0]), hits(&redis[1])), (10, 0));
    let mut held = BufReader::new(tokio::net::TcpStream::connect(listen).await.unwrap());
    assert!(incr_on(&mut held).await);

    // Both listed: new connections use both.
    publish(&[0, 1]);
    server.log.wait_for_nth(&["discovered set changed"], 2);
    for _ in 0..60 {
        assert!(incr(listen).await);
    }
    let (a, b) = (hits(&redis[0]), hits(&redis[1]));
    assert!(b >= 10 && a >= 21, "both used: {a}, {b}");

    // Only the second: every new connection goes there; the held one stays on the first.
    publish(&[1]);
    server.log.wait_for_nth(&["discovered set changed"], 3);
    for _ in 0..20 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&redis[0]), hits(&redis[1])), (a, b + 20));
    assert!(incr_on(&mut held).await);
    assert_eq!(
        hits(&redis[0]),
        a + 1,
        "the held connection is still on the first"
    );
}

/// The server's route and the client's listener both come from link variables, as the seed's
/// ambassador containers had them: `redis-cli` through the pair reaches the redis.
async fn docker_links_variables_configure_both_sides(t: Transport) {
    let pki = Pki::new();
    let redis = Redis::start();
    let upstream = format!("tcp://127.0.0.1:{}", redis.port);
    let mut args = vec!["server", "--listen", "127.0.0.1:0", "--from-env"];
    let flags = pki.cert_flags("server");
    args.extend(flags.iter().map(String::as_str));
    let server = Amb::spawn_env(&args, &[("REDIS_PORT_6379_TCP", &upstream)]);
    let peer = format!("tcp://localhost:{}", server.server_addr().port());
    let port = free_port();
    let variable = format!("REDIS_PORT_{port}_TCP");
    let mut args = vec!["client", "--from-env", "--transport", t.flag()];
    let flags = pki.cert_flags("client");
    args.extend(flags.iter().map(String::as_str));
    let client = Amb::spawn_env(&args, &[(&variable, &peer)]);
    let listen = client.listen_addr_for("redis");
    assert_eq!(listen.to_string(), format!("127.0.0.1:{port}"));
    let set = blocking(move || redis_cli(listen.port(), &["set", "linked", "yes"])).await;
    assert_eq!(set.as_deref(), Some("OK"));
    assert_eq!(
        redis_cli(redis.port, &["get", "linked"]).as_deref(),
        Some("yes")
    );
}

/// Each malformed variable is named in the error, and nothing starts.
#[test]
fn malformed_link_variables_are_each_named_and_nothing_starts() {
    let pki = Pki::new();
    for side in ["server", "client"] {
        let out = Command::new(AMB)
            .arg(side)
            .arg("--from-env")
            .args(pki.cert_flags(side))
            .env("CACHE_PORT_x_TCP", "tcp://10.0.0.1:6379")
            .env("DB_PORT_5432_TCP", "10.0.0.2:5432")
            .env("GOOD_PORT_80_TCP", "tcp://10.0.0.3:80")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{side}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        for named in ["CACHE_PORT_x_TCP", "DB_PORT_5432_TCP"] {
            assert!(stderr.contains(named), "{side}: {stderr}");
        }
        assert!(!stderr.contains("GOOD_PORT_80_TCP"), "{side}: {stderr}");
    }
}

/// Waits (up to 30 s: a lease runs 10 s) until `count` servers are registered.
async fn until_registered(etcd: &Etcd, count: usize, why: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while etcd.keys("/amb/servers/").len() != count {
        assert!(std::time::Instant::now() < deadline, "{why}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `amb server --upstream REDIS --register etcd://.../amb/servers/NAME`.
fn registered_server(pki: &Pki, etcd: &Etcd, redis: &Redis, name: &str) -> Amb {
    let upstream = format!("127.0.0.1:{}", redis.port);
    let register = etcd.url(&format!("amb/servers/{name}"));
    Amb::server(pki, 0, &["--upstream", &upstream, "--register", &register])
}

/// Servers register in a real etcd; a client with `--peer etcd://.../amb/servers` balances over
/// them, follows a `kill -9` (its lease expires), a newcomer, a graceful leaver, and an etcd
/// restart, without a restart of its own.
async fn etcd_registered_servers_come_and_go_and_survive_an_etcd_restart(t: Transport) {
    let pki = Pki::new();
    let mut etcd = Etcd::start();
    let redis = [Redis::start(), Redis::start(), Redis::start()];
    let mut a = registered_server(&pki, &etcd, &redis[0], "a");
    let b = registered_server(&pki, &etcd, &redis[1], "b");
    for server in [&a, &b] {
        server.log.wait_for(&["registered"]);
    }
    let client = discovering_client(&pki, t, &etcd.url("amb/servers"), &[]);
    client
        .log
        .wait_for_nth(&["tunnel connection up"], 2 * t.pool_size());
    let listen = client.listen_addr();
    for _ in 0..60 {
        assert!(incr(listen).await);
    }
    let (on_a, on_b) = (hits(&redis[0]), hits(&redis[1]));
    assert!(on_a >= 10 && on_b >= 10, "both used: {on_a}, {on_b}");

    // kill -9: no deregistration; the lease runs out (10 s) and the client lets it go.
    let changes = client.log.count(&["discovered set changed"]);
    a.signal("KILL");
    a.wait_exit(Duration::from_secs(5));
    until_registered(&etcd, 1, "the lease did not expire").await;
    client
        .log
        .wait_for_nth(&["discovered set changed"], changes + 1);
    let b_before = hits(&redis[1]);
    for _ in 0..20 {
        assert!(incr(listen).await);
    }
    assert_eq!(
        hits(&redis[1]) - b_before,
        20,
        "all on the server still registered"
    );

    // A third registers: it takes connections with no restart anywhere.
    let c = registered_server(&pki, &etcd, &redis[2], "c");
    c.log.wait_for(&["registered"]);
    let port_c = c.server_addr().port().to_string();
    client.log.wait_for(&["tunnel connection up", &port_c]);
    for _ in 0..40 {
        assert!(incr(listen).await);
    }
    assert!(hits(&redis[2]) >= 5, "the newcomer got {}", hits(&redis[2]));

    // etcd goes away: nothing breaks meanwhile; it comes back and the watch goes on.
    etcd.stop();
    for _ in 0..20 {
        assert!(incr(listen).await);
    }
    etcd.start_again();
    client.log.wait_for(&["registry reachable again"]);
    // A graceful leaver deregisters at once: no new connection reaches it.
    drop(c);
    let (on_b, on_c) = (hits(&redis[1]), hits(&redis[2]));
    let changes = client.log.count(&["discovered set changed"]);
    until_registered(&etcd, 1, "c did not leave the registry").await;
    client
        .log
        .wait_for_nth(&["discovered set changed"], changes + 1);
    for _ in 0..20 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&redis[1]) - on_b, hits(&redis[2]) - on_c), (20, 0));
}

/// A route's upstreams are the values under an etcd prefix: keys added and removed while
/// traffic runs move new connections; one opened before stays where it is.
async fn etcd_keys_are_a_routes_upstreams(t: Transport) {
    let pki = Pki::new();
    let etcd = Etcd::start();
    let redis = [Redis::start(), Redis::start()];
    let key = |i: usize| format!("/services/redis/r{i}");
    let value = |i: usize| format!("127.0.0.1:{}", redis[i].port);
    etcd.ctl(&["put", &key(0), &value(0)]).unwrap();
    let route = format!("redis={}", etcd.url("services/redis"));
    let server = Amb::server(&pki, 0, &["--route", &route]);
    // Each change is one put or delete: the set moves one step at a time.
    let publish = |list: &[usize]| {
        let done = match list {
            [0, 1] => etcd.ctl(&["put", &key(1), &value(1)]),
            _ => etcd.ctl(&["del", &key(0)]),
        };
        done.expect("etcdctl");
    };
    route_follows_its_discovered_upstreams(t, &pki, &redis, &server, publish).await;
}

/// `etcds://`: the registry's certificate is verified against `--etcd-ca`, and a registry that
/// checks clients admits the server with `--etcd-cert`/`--etcd-key` and no other.
async fn an_etcd_over_tls_is_reached_with_its_ca_and_a_client_certificate(t: Transport) {
    let pki = Pki::new();
    let etcd = Etcd::start_tls(&pki);
    let redis = Redis::start();
    let upstream = format!("127.0.0.1:{}", redis.port);
    etcd.ctl(&["put", "/services/redis/r0", &upstream]).unwrap();
    let route = format!("redis={}", etcd.url("services/redis"));
    let file = |name: &str| pki.path(name).display().to_string();
    let (ca, cert, key) = (file("ca.pem"), file("client.pem"), file("client.key"));
    let admitted = Amb::server(
        &pki,
        0,
        &[
            "--route",
            &route,
            "--etcd-ca",
            &ca,
            "--etcd-cert",
            &cert,
            "--etcd-key",
            &key,
        ],
    );
    let refused = Amb::server(&pki, 0, &["--route", &route, "--etcd-ca", &ca]);
    let through = |server: &Amb| {
        let listen = ["--listen", "0=redis", "--tunnel-wait", "60s"];
        Amb::client(&pki, "client", server.server_addr(), t, &listen)
    };
    let (admitted_client, refused_client) = (through(&admitted), through(&refused));
    for _ in 0..5 {
        assert!(incr(admitted_client.listen_addr_for("redis")).await);
        assert!(!incr(refused_client.listen_addr_for("redis")).await);
    }
    assert_eq!(hits(&redis), 5);
}

/// While the server is stopped (SIGSTOP), etcd restarts, its keys change and it compacts past
/// the revision the server's watch had reached: resumed, the server's watch is refused at that
/// revision, reads the whole prefix again, and new connections follow the registry as it is.
async fn a_watch_that_fell_behind_a_compaction_reads_the_registry_again(t: Transport) {
    let pki = Pki::new();
    let mut etcd = Etcd::start();
    let redis = [Redis::start(), Redis::start()];
    let key = |i: usize| format!("/services/redis/r{i}");
    let value = |i: usize| format!("127.0.0.1:{}", redis[i].port);
    etcd.ctl(&["put", &key(0), &value(0)]).unwrap();
    let route = format!("redis={}", etcd.url("services/redis"));
    let server = Amb::server(&pki, 0, &["--route", &route]);
    let listen = ["--listen", "0=redis", "--tunnel-wait", "60s"];
    let client = Amb::client(&pki, "client", server.server_addr(), t, &listen);
    let listen = client.listen_addr_for("redis");
    for _ in 0..5 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&redis[0]), hits(&redis[1])), (5, 0));

    server.pause();
    etcd.stop();
    etcd.start_again();
    etcd.ctl(&["put", &key(1), &value(1)]).unwrap();
    etcd.ctl(&["del", &key(0)]).unwrap();
    let status = etcd.ctl(&["get", "/", "--prefix", "-w", "json"]).unwrap();
    let revision = status
        .split("\"revision\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .unwrap_or_else(|| panic!("no revision in {status}"));
    etcd.ctl(&["compact", revision]).unwrap();
    let changes = server.log.count(&["discovered set changed"]);
    server.resume();

    server
        .log
        .wait_for_nth(&["discovered set changed"], changes + 1);
    for _ in 0..10 {
        assert!(incr(listen).await);
    }
    assert_eq!((hits(&redis[0]), hits(&redis[1])), (5, 10));
}
