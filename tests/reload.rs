//! Certificate reload without a restart: on SIGHUP, and when the files change on disk. New
//! handshakes use the new files; files that do not load leave the running certificates in
//! place; a client renews its tunnel connections with the new certificate before letting the
//! old ones go, so app connections on them finish undisturbed.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::time::Duration;

use amb_pki::{LeafSpec, TlsFiles};
use support::raw::Resumer;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

per_transport!(
    sighup_reloads_the_server_certificate,
    a_changed_client_ca_is_taken_without_a_signal,
    files_that_do_not_load_leave_the_running_certificates,
    a_reloaded_client_certificate_renews_the_tunnel_connections,
    a_reload_of_unchanged_files_keeps_the_tunnel_connections,
    a_trust_change_drains_the_connections_verified_before,
    a_client_that_no_longer_trusts_the_server_lets_its_connections_go,
);

/// The leaf certificate (DER) in `<name>.pem`.
fn leaf(pki: &Pki, name: &str) -> Vec<u8> {
    amb_pki::load_certs(&pki.path(&format!("{name}.pem"))).unwrap()[0].to_vec()
}

/// A server for an echo upstream, with extra flags, and a raw client with `client.pem`.
async fn served(pki: &Pki, extra: &[&str]) -> (Upstream, Amb, std::net::SocketAddr, Resumer) {
    let upstream = Upstream::echo().await;
    let up = upstream.addr.to_string();
    let mut args = vec!["--upstream", up.as_str()];
    args.extend_from_slice(extra);
    let server = Amb::server(pki, 0, &args);
    let addr = server.server_addr();
    (upstream, server, addr, Resumer::new(pki, "client"))
}

async fn sighup_reloads_the_server_certificate(t: Transport) {
    let pki = Pki::new();
    let (_upstream, server, addr, client) = served(&pki, &["--reload-check", "0s"]).await;
    let before = client.open(t, addr, "default").await.unwrap();
    assert_eq!(before.status, 200);
    assert_eq!(before.server_cert, leaf(&pki, "server"));

    pki.write_leaf("server", &pki.ca.issue(&LeafSpec::server(&[], 30)).unwrap());
    let renewed = leaf(&pki, "server");
    assert_ne!(renewed, before.server_cert);
    server.signal("HUP");
    server
        .log
        .wait_for(&["reload requested", "certificates reloaded"]);
    let after = client.open(t, addr, "default").await.unwrap();
    assert_eq!(after.status, 200);
    assert!(
        after.server_cert == renewed,
        "the old certificate after SIGHUP"
    );
}

async fn a_changed_client_ca_is_taken_without_a_signal(t: Transport) {
    let pki = Pki::new();
    let (upstream, server, addr, client) = served(&pki, &["--reload-check", "100ms"]).await;
    assert_eq!(client.open(t, addr, "default").await.unwrap().status, 200);

    trust_only_a_new_ca(&pki);
    server
        .log
        .wait_for(&["certificate files changed", "certificates reloaded"]);
    client
        .assert_turned_away(t, addr, &server, &upstream, 1)
        .await;
}

/// The operator moves clients to a new CA: the server's CA file is replaced as deployment
/// tools do, a new file renamed over the old one.
fn trust_only_a_new_ca(pki: &Pki) {
    let new = Pki::new();
    let staged = pki.path("ca.pem.new");
    std::fs::copy(new.path("ca.pem"), &staged).unwrap();
    std::fs::rename(&staged, pki.path("ca.pem")).unwrap();
}

async fn files_that_do_not_load_leave_the_running_certificates(t: Transport) {
    let pki = Pki::new();
    let (_upstream, server, addr, client) = served(&pki, &["--reload-check", "0s"]).await;
    let running = leaf(&pki, "server");
    // A rotation caught half way: a new key beside the old certificate.
    let other = pki.ca.issue(&LeafSpec::server(&[], 30)).unwrap();
    std::fs::write(pki.path("server.key"), &other.key_pem).unwrap();
    server.signal("HUP");
    let line = server
        .log
        .wait_for(&["reload requested", "the running certificates stay in use"]);
    assert!(
        line.contains("server.key"),
        "the files are not named: {line}"
    );
    let opened = client.open(t, addr, "default").await.unwrap();
    assert_eq!(opened.status, 200);
    assert!(opened.server_cert == running, "not the running certificate");
}

/// Echoes `msg` over an open app connection.
async fn echo_on(tcp: &mut TcpStream, msg: &[u8]) {
    tcp.write_all(msg).await.unwrap();
    let mut got = vec![0u8; msg.len()];
    tokio::time::timeout(READY, tcp.read_exact(&mut got))
        .await
        .expect("no echo in time")
        .unwrap();
    assert_eq!(got, msg);
}

async fn a_reloaded_client_certificate_renews_the_tunnel_connections(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let allow = [
        "--allow",
        "uri:spiffe://amb/client",
        "--allow",
        "uri:spiffe://amb/renewed",
    ];
    let up = upstream.addr.to_string();
    let mut args = vec!["--upstream", up.as_str()];
    args.extend_from_slice(&allow);
    let server = Amb::server(&pki, 0, &args);
    let client = Amb::client(
        &pki,
        "client",
        server.server_addr(),
        t,
        &["--reload-check", "0s"],
    );
    client.wait_pool_up(t);
    let mut before = TcpStream::connect(client.listen_addr()).await.unwrap();
    echo_on(&mut before, b"before the reload").await;

    pki.write_leaf(
        "client",
        &pki.ca.issue(&LeafSpec::client("renewed", 30)).unwrap(),
    );
    client.signal("HUP");
    client
        .log
        .wait_for_nth(&["tunnel connection renewed"], t.pool_size());

    // The app connection made before runs on over the old tunnel connection.
    echo_on(&mut before, b"after the reload").await;
    drop(before);
    server
        .log
        .wait_for(&["connection ended", "end=ok", "spiffe://amb/client at"]);
    // A new one goes over a connection made with the new certificate.
    assert!(echo_works(client.listen_addr()).await);
    server
        .log
        .wait_for(&["connection ended", "end=ok", "spiffe://amb/renewed at"]);
}

async fn a_reload_of_unchanged_files_keeps_the_tunnel_connections(t: Transport) {
    let pki = Pki::new();
    let (_upstream, server, addr, _) = served(&pki, &[]).await;
    let client = Amb::client(&pki, "client", addr, t, &["--reload-check", "0s"]);
    client.wait_pool_up(t);
    let mut before = TcpStream::connect(client.listen_addr()).await.unwrap();
    echo_on(&mut before, b"before the reload").await;

    // Each file written again with the bytes it held (new times, as a config tool that
    // renders on every sync leaves them), then a SIGHUP.
    for name in ["client.pem", "client.key", "ca.pem"] {
        let path = pki.path(name);
        std::fs::write(&path, std::fs::read(&path).unwrap()).unwrap();
    }
    client.signal("HUP");
    client
        .log
        .wait_for(&["reload requested", "nothing to reload"]);
    echo_on(&mut before, b"after the reload").await;

    // The files are still checked: a key made readable by others is refused, naming it, and
    // once mended the same contents again change nothing.
    let key = pki.path("client.key");
    let mode = |bits| std::fs::set_permissions(&key, std::fs::Permissions::from_mode(bits));
    mode(0o644).unwrap();
    client.signal("HUP");
    client.log.wait_for(&[
        "client.key: private key is readable by group or others",
        "the running certificates stay in use",
    ]);
    mode(0o600).unwrap();
    client.signal("HUP");
    client
        .log
        .wait_for_nth(&["reload requested", "nothing to reload"], 2);

    assert!(echo_works(client.listen_addr()).await);
    echo_on(&mut before, b"at the end").await;
    let handshakes = until_still(Duration::from_millis(200), || {
        server.log.count(&["tunnel connection up"])
    })
    .await;
    assert_eq!(
        handshakes,
        t.pool_size(),
        "no handshake since the pool came up"
    );
    assert_eq!(client.log.count(&["tunnel connection renewed"]), 0);
}

async fn a_trust_change_drains_the_connections_verified_before(t: Transport) {
    let pki = Pki::new();
    let server_flags = ["--reload-check", "0s", "--drain-timeout", "3s"];
    let (upstream, server, addr, _) = served(&pki, &server_flags).await;
    // The client shares the CA file; it must not reload it and turn the server away first.
    let client_flags = ["--tunnel-wait", "1s", "--reload-check", "0s"];
    let client = Amb::client(&pki, "client", addr, t, &client_flags);
    client.wait_pool_up(t);
    let mut before = TcpStream::connect(client.listen_addr()).await.unwrap();
    echo_on(&mut before, b"before the change").await;

    // The client's certificate is from the CA the server no longer trusts. Its pool was
    // verified under the old trust, so the server drains it and the client must connect
    // again, which it cannot.
    trust_only_a_new_ca(&pki);
    server.signal("HUP");
    server
        .log
        .wait_for_nth(&["the trusted CAs changed: draining"], t.pool_size());
    // A stream that was running goes on over its drained connection, for a while.
    echo_on(&mut before, b"after the change").await;
    client.log.wait_for(&["tunnel connect failed"]);
    server
        .log
        .wait_for(&["handshake failed", t.flag(), "invalid peer certificate"]);
    let mut after = TcpStream::connect(client.listen_addr()).await.unwrap();
    assert_reset(&mut after).await;
    // Then the drained connection is closed, whatever its client does.
    server.log.wait_for(&[
        "closing tunnel connection",
        "still open 3s after the trusted CAs changed",
    ]);
    assert_reset(&mut before).await;
    assert_eq!(upstream.accepted(), 1, "only the stream before the change");
}

async fn a_client_that_no_longer_trusts_the_server_lets_its_connections_go(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let server = Amb::server(&pki, 0, &["--upstream", &upstream.addr.to_string()]);
    // Its own CA file, so the server's stays as it is.
    let client_ca = pki.path("client-ca.pem");
    std::fs::copy(pki.path("ca.pem"), &client_ca).unwrap();
    let peer = format!("localhost:{}", server.server_addr().port());
    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let args = [
        "client",
        "--listen",
        "0",
        "--peer",
        &peer,
        "--transport",
        t.flag(),
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--ca",
        client_ca.to_str().unwrap(),
        "--tunnel-wait",
        "1s",
        "--reload-check",
        "0s",
    ];
    let client = Amb::spawn(&args.map(String::from));
    client.wait_pool_up(t);
    let mut before = TcpStream::connect(client.listen_addr()).await.unwrap();
    echo_on(&mut before, b"before the change").await;

    // The client now trusts only another CA: the server's certificate fails its check.
    std::fs::copy(Pki::new().path("ca.pem"), &client_ca).unwrap();
    client.signal("HUP");
    client.log.wait_for_nth(&["leaves the pool"], t.pool_size());
    // App connections on the old connections finish there; new ones find no tunnel.
    echo_on(&mut before, b"after the change").await;
    let mut after = TcpStream::connect(client.listen_addr()).await.unwrap();
    assert_reset(&mut after).await;
    assert_eq!(
        upstream.accepted(),
        1,
        "only the app connection from before"
    );
}

/// A QUIC client whose first packet reached the server before its CA was replaced, and whose
/// connection is accepted after the server took the new CA: quinn keeps the configuration an
/// endpoint had when a client's first packet came, so the server must accept with the newest
/// one itself. Otherwise the client, verified by the old CA, would be labelled with the new
/// trust and never drained. In process, with the amb-quic server and a quinn client, on one
/// thread, so what the server's endpoint saw when is known.
#[tokio::test]
async fn a_quic_handshake_begun_before_a_ca_change_is_verified_under_the_new_ca() {
    let pki = Pki::new();
    let server_files = TlsFiles::in_dir(&pki.path(""), "server");
    let config = |files: &TlsFiles| amb_pki::server_config(files, amb_proto::ALPN_QUIC).unwrap();
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = socket.local_addr().unwrap();

    // The client's first packet waits in the server socket's queue.
    let client_tls = amb_pki::client_config(
        &TlsFiles::in_dir(&pki.path(""), "client"),
        amb_proto::ALPN_QUIC,
    )
    .unwrap();
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    let connecting = endpoint.connect(addr, "localhost").unwrap();
    yield_until("the client's first packet", || udp_queued(addr.port()) > 0).await;

    // The server's endpoint reads it with the configuration of the old CA...
    let (tls, tls_rx) = tokio::sync::watch::channel(config(&server_files));
    let (trust, trust_rx) = tokio::sync::watch::channel(0u64);
    let limits = amb_proto::Limits::default();
    let failed: amb_proto::OnFailedHandshake = Arc::new(|_| {});
    let reset = amb_quic::ResetKey::derive(b"a test key");
    let server =
        amb_quic::QuicServer::new(socket, tls_rx, trust_rx, limits, failed, &reset).unwrap();
    yield_until("the server reading the client's first packet", || {
        udp_queued(addr.port()) == 0
    })
    .await;

    // ...then the CA file is replaced and reloaded (the configuration first, then the
    // generation, as the reloader does), and only then does the server accept.
    trust_only_a_new_ca(&pki);
    tls.send_replace(config(&server_files));
    trust.send_replace(1);
    let (_stop, stop) = tokio::sync::watch::channel(false);
    // Holds each connection it is given open, as the engine would.
    let handler = |accepted: amb_quic::QuicAccepted, _verified_under| async move {
        let _conn = accepted.into_connection().await;
        std::future::pending::<()>().await
    };
    tokio::spawn(async move { amb_quic::serve(&server, stop, handler).await });

    let closed = match connecting.await {
        Err(e) => e,
        Ok(conn) => tokio::time::timeout(READY, conn.closed())
            .await
            .expect("a client of the CA no longer trusted kept its connection"),
    };
    assert!(
        closed.to_string().contains("invalid peer certificate"),
        "closed with: {closed}"
    );
}
