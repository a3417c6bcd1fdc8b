//! Transport `auto`, the client's default: QUIC where it works, else TLS. A server serving TLS
//! only is reached at once; a client whose UDP is dropped (nftables in its own network
//! namespace) carries over TLS, and new app connections go back to QUIC once UDP passes again.

mod support;

use std::time::{Duration, Instant};

use support::netns::Netns;
use support::*;

/// `amb client` args with no `--transport` (so `auto`), for `peer`, listening on `listen`.
fn auto_client_args(pki: &Pki, listen: &str, peer: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["client", "--listen", listen, "--peer", peer]
        .map(String::from)
        .into();
    args.extend(["--server-name".into(), "localhost".into()]);
    args.extend(pki.cert_flags("client"));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_reaches_a_server_that_serves_tls_only_within_2s() {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let up = upstream.addr.to_string();
    let server = Amb::server(&pki, 0, &["--upstream", &up, "--transport", "tls"]);
    let peer = format!("localhost:{}", server.server_addr().port());
    let started = Instant::now();
    let client = Amb::spawn(&auto_client_args(&pki, "0", &peer, &[]));
    assert!(echo_works(client.listen_addr()).await);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "first echo {took:?} after the start"
    );
    client
        .log
        .wait_for(&["carrying new app connections over tls", "transport=\"tls\""]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_moves_to_tls_when_udp_is_dropped_and_back_to_quic() {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let ns = Netns::new();
    let mut server_args: Vec<String> = ["server", "--listen", &format!("{}:0", ns.host_ip)]
        .map(String::from)
        .into();
    server_args.extend(pki.cert_flags("server"));
    server_args.extend(["--upstream".into(), upstream.addr.to_string()]);
    let server = Amb::spawn(&server_args);
    let port = server.server_addr().port();

    // UDP to the server is dropped inside the client's namespace before it starts.
    ns.drop_udp_to(port, true);
    let peer = format!("{}:{port}", ns.host_ip);
    let listen = format!("{}:0", ns.ns_ip);
    let args = auto_client_args(&pki, &listen, &peer, &["--handshake-timeout", "3s"]);
    let client = Amb::spawn_shell(&format!("exec {} {AMB} {}", ns.prefix(), args.join(" ")));
    let listen = client.listen_addr();
    assert!(echo_works(listen).await, "no echo over TLS");
    client
        .log
        .wait_for(&["carrying new app connections over tls", "transport=\"tls\""]);
    assert_eq!(
        client
            .log
            .count(&["tunnel connection up", "transport=\"quic\""]),
        0,
        "QUIC came up through the drop: the firewall is not real"
    );

    // UDP passes again: QUIC comes up, and new app connections go over it.
    ns.drop_udp_to(port, false);
    client
        .log
        .wait_for(&["tunnel connection up", "transport=\"quic\""]);
    assert!(echo_works(listen).await, "no echo after UDP came back");
    client
        .log
        .wait_for(&["carrying new app connections over quic again"]);
}
