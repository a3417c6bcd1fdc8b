//! Discovery end to end: where the services are comes from Docker-links variables
//! (`--from-env`), DNS SRV records served by a real dnsmasq, or an etcd registry; the sets change
//! while amb runs. Real redis-servers behind real `amb server`s, over QUIC and TLS.

mod support;

use std::process::Command;

use support::*;

per_transport!(docker_links_variables_configure_both_sides);

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
