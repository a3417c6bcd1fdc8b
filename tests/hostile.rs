//! Hostile peers and broken processes: each case must end in a clear log line, with the server
//! still serving others. Cases that involve the tunnel run over QUIC and over TLS.

mod support;

use std::time::{Duration, Instant};

use rand::{Rng, RngCore};
use support::raw::{open_header, quic_connect};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

per_transport!(
    refused_stream_flood_closes_the_connection,
    kill_9_of_the_server_resets_every_live_app_socket,
    abortive_closes_alternating_leave_nothing_behind,
    max_connections_cap_refuses_quickly,
);

/// A connection that the server must drop: it reads to EOF or an error within `READY`.
async fn assert_dropped(tcp: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(READY, tcp.read(&mut buf))
            .await
            .expect("server kept the connection open")
        {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_both_ports_is_dropped_and_service_continues() {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let server = Amb::server(
        &pki,
        0,
        &[
            "--upstream",
            &upstream.addr.to_string(),
            "--handshake-timeout",
            "3s",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let addr = server.server_addr();

    let mut random = vec![0u8; 4096];
    rand::rng().fill_bytes(&mut random);
    let payloads: [&[u8]; 3] = [b"PING\r\n", b"GET / HTTP/1.1\r\nHost: amb\r\n\r\n", &random];
    for payload in payloads {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        let _ = tcp.write_all(payload).await;
        assert_dropped(&mut tcp).await;
    }
    let failures =
        r#"amb_handshake_failures_total{direction="accepted",transport="tls",reason="other"}"#;
    wait_sample(metrics_addr(&server), failures, 3.0).await;
    server
        .log
        .wait_for(&["transport=\"tls\"", "handshake failed"]);

    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for _ in 0..2000 {
        let len = rand::rng().random_range(1..1400);
        let mut datagram = vec![0u8; len];
        rand::rng().fill_bytes(&mut datagram);
        let _ = udp.send_to(&datagram, addr).await;
    }

    for t in [Transport::Quic, Transport::Tls] {
        let client = Amb::client(&pki, "client", addr, t, &[]);
        client.wait_tunnel_up();
        assert!(
            echo_works(client.listen_addr()).await,
            "{t:?} after garbage"
        );
    }
    assert!(server.child.id() > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls12_only_client_is_refused_at_the_handshake() {
    let pki = Pki::new();
    let server = Amb::server(
        &pki,
        0,
        &["--upstream", "127.0.0.1:9", "--transport", "tls"],
    );
    let addr = server.server_addr();
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(amb_pki::load_certs(&pki.path("ca.pem")).unwrap().remove(0))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(
        rustls::crypto::aws_lc_rs::default_provider().into(),
    )
    .with_protocol_versions(&[&rustls::version::TLS12])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    assert!(
        connector.connect(name, tcp).await.is_err(),
        "a TLS 1.2-only client got a session"
    );
    server
        .log
        .wait_for(&["handshake failed", "incompatible", "Tls12"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_handshakes_time_out_while_real_clients_connect() {
    raise_nofile(65_536);
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let server = Amb::server(
        &pki,
        0,
        &[
            "--upstream",
            &upstream.addr.to_string(),
            "--handshake-timeout",
            "4s",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let addr = server.server_addr();

    // 800 handshakes that never complete: a TLS record header and then silence...
    let mut stalled = Vec::new();
    for _ in 0..800 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00])
            .await
            .unwrap();
        stalled.push(tcp);
    }
    // ...and a few that dribble one byte per second.
    let dribblers: Vec<_> = (0..5)
        .map(|_| {
            tokio::spawn(async move {
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                for byte in [
                    0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
                ] {
                    if tcp.write_all(&[byte]).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            })
        })
        .collect();

    // Real clients get through while all of that is pending.
    for t in [Transport::Tls, Transport::Quic] {
        let started = Instant::now();
        let client = Amb::client(&pki, "client", addr, t, &[]);
        client.wait_tunnel_up();
        let took = started.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "{t:?} client needed {took:?} beside stalled handshakes"
        );
        assert!(echo_works(client.listen_addr()).await);
    }

    // Every stalled handshake is dropped after the timeout, and said so.
    for tcp in &mut stalled {
        assert_dropped(tcp).await;
    }
    let timeouts =
        r#"amb_handshake_failures_total{direction="accepted",transport="tls",reason="timeout"}"#;
    wait_until(metrics_addr(&server), timeouts, |n| n >= 800.0).await;
    server.log.wait_for(&["handshake timed out"]);
    for d in dribblers {
        d.abort();
    }
}

async fn refused_stream_flood_closes_the_connection(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let server = Amb::server(&pki, 0, &["--upstream", &upstream.addr.to_string()]);
    let client = Amb::client(
        &pki,
        "client",
        server.server_addr(),
        t,
        &["--listen", "0=unknown"],
    );
    let ups = client.wait_pool_up(t);
    let flood = client.listen_addr_for("unknown");
    for _ in 0..300 {
        if let Ok(mut tcp) = TcpStream::connect(flood).await {
            let _ = tcp.write_all(b"x").await;
            let mut buf = [0u8; 16];
            let _ = tokio::time::timeout(READY, tcp.read(&mut buf)).await;
        }
        if server.log.count(&["too many refused streams"]) > 0 {
            break;
        }
    }
    server.log.wait_for(&[
        "closing tunnel connection: too many refused streams",
        "spiffe://amb/client",
    ]);
    client.log.wait_for(&["tunnel connection lost"]);
    assert_eq!(upstream.accepted(), 0, "refused streams never dial");
    // The client reconnects (the one connection that was closed), and well-behaved streams work.
    client.wait_reconnected(ups, 1);
    assert!(echo_works(client.listen_addr()).await);
}

async fn kill_9_of_the_server_resets_every_live_app_socket(t: Transport) {
    raise_nofile(65_536);
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let up = upstream.addr.to_string();
    let server = Amb::server(&pki, 0, &["--upstream", &up]);
    let addr = server.server_addr();
    let client = Amb::client(&pki, "client", addr, t, &["--idle-timeout", "2s"]);
    let ups = client.wait_pool_up(t);
    let mut live = Vec::new();
    for i in 0..100u32 {
        let mut tcp = TcpStream::connect(client.listen_addr()).await.unwrap();
        tcp.write_all(&i.to_be_bytes()).await.unwrap();
        let mut back = [0u8; 4];
        tcp.read_exact(&mut back).await.unwrap();
        assert_eq!(back, i.to_be_bytes());
        live.push(tcp);
    }
    drop(server); // SIGKILL
    for tcp in &mut live {
        assert_reset(tcp).await;
    }
    client.log.wait_for(&["tunnel connection lost"]);
    let _server = Amb::server(&pki, addr.port(), &["--upstream", &up]);
    client.wait_reconnected(ups, t.pool_size());
    assert!(echo_works(client.listen_addr()).await);
}

async fn abortive_closes_alternating_leave_nothing_behind(t: Transport) {
    // The upstream reports how each connection ended; on "rst" it aborts the connection itself.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<&'static str>();
    let upstream = Upstream::start(move |mut tcp: TcpStream| {
        let tx = tx.clone();
        async move {
            let mut buf = [0u8; 64];
            loop {
                match tcp.read(&mut buf).await {
                    Ok(0) => {
                        let _ = tx.send("fin");
                        return;
                    }
                    Ok(n) if &buf[..n] == b"rst" => {
                        let _ = tcp.set_zero_linger();
                        return drop(tcp);
                    }
                    Ok(n) => {
                        if tcp.write_all(&buf[..n]).await.is_err() {
                            {
                                let _ = tx.send("reset");
                                return;
                            }
                        }
                    }
                    Err(_) => {
                        let _ = tx.send("reset");
                        return;
                    }
                }
            }
        }
    })
    .await;
    let pki = Pki::new();
    let (mut server, client) = {
        let server = Amb::server(&pki, 0, &["--upstream", &upstream.addr.to_string()]);
        let client = Amb::client(&pki, "client", server.server_addr(), t, &[]);
        client.wait_tunnel_up();
        (server, client)
    };
    for round in 0..40 {
        let mut tcp = TcpStream::connect(client.listen_addr()).await.unwrap();
        tcp.write_all(b"hello").await.unwrap();
        let mut back = [0u8; 5];
        tcp.read_exact(&mut back).await.unwrap();
        if round % 2 == 0 {
            // The app aborts: the upstream must see a reset, not a clean end.
            tcp.set_zero_linger().unwrap();
            drop(tcp);
            let seen = tokio::time::timeout(READY, rx.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                seen, "reset",
                "round {round}: app RST reached the upstream as {seen}"
            );
        } else {
            // The upstream aborts: the app must see a reset.
            tcp.write_all(b"rst").await.unwrap();
            assert_reset(&mut tcp).await;
        }
    }
    assert!(echo_works(client.listen_addr()).await);
    assert_eq!(
        tokio::time::timeout(READY, rx.recv()).await.unwrap(),
        Some("fin")
    );
    // No stream is left behind on the server: once the last clean one is done, it drains with
    // zero live streams.
    server.log.wait_for(&["connection ended", "end=ok"]);
    server.signal("TERM");
    server.log.wait_for(&["shutting down", "live_streams=0"]);
    let status = blocking(move || server.wait_exit(READY)).await;
    assert!(status.success());
}

async fn max_connections_cap_refuses_quickly(t: Transport) {
    // An upstream that holds connections open without answering.
    let upstream = Upstream::start(|mut tcp: TcpStream| async move {
        let mut buf = [0u8; 64];
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    let pki = Pki::new();
    let server = Amb::server(
        &pki,
        0,
        &[
            "--upstream",
            &upstream.addr.to_string(),
            "--max-connections",
            "6",
        ],
    );
    let client = Amb::client(
        &pki,
        "client",
        server.server_addr(),
        t,
        &["--max-connections", "4"],
    );
    client.wait_tunnel_up();
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut tcp = TcpStream::connect(client.listen_addr()).await.unwrap();
        tcp.write_all(b"hold").await.unwrap();
        held.push(tcp);
    }
    // Wait until the four streams reached the upstream, then the fifth is reset at once.
    while upstream.accepted() < 4 {
        tokio::task::yield_now().await;
    }
    let started = Instant::now();
    assert_reset_after_write(client.listen_addr(), b"x").await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "cap took {:?}",
        started.elapsed()
    );
    client.log.wait_for(&["at --max-connections 4"]);

    // The server's own cap: a second client pushes it past 6 streams.
    let other = Amb::client(&pki, "client", server.server_addr(), t, &[]);
    other.wait_tunnel_up();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(other.listen_addr()).await.unwrap();
        tcp.write_all(b"hold").await.unwrap();
        held.push(tcp);
    }
    while upstream.accepted() < 6 {
        tokio::task::yield_now().await;
    }
    assert_reset_after_write(other.listen_addr(), b"x").await;
    server
        .log
        .wait_for(&["stream refused: at --max-connections"]);
    other.log.wait_for(&["refused by server", "capacity"]);
    assert_eq!(upstream.accepted(), 6);
}

/// A QUIC client that ignores the server's drain notice and keeps opening streams: they are
/// served only until it has had the notice (a round trip after its acknowledgement), then
/// refused, so the drain ends once the live stream does instead of running to its timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_client_ignoring_the_drain_notice_is_refused_and_the_drain_ends() {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let up = upstream.addr.to_string();
    let mut server = Amb::server(&pki, 0, &["--upstream", &up, "--drain-timeout", "60s"]);
    let conn = quic_connect(&pki, "client", server.server_addr()).await;
    let (mut live_send, mut live_recv) = conn.open_bi().await.unwrap();
    live_send.write_all(&open_header("default")).await.unwrap();
    live_send.write_all(b"hi").await.unwrap();
    let mut opened = [0u8; 3];
    live_recv.read_exact(&mut opened).await.unwrap();
    assert_eq!(opened, [amb_proto::status::STATUS_OPEN, b'h', b'i']);

    server.signal("TERM");
    server.log.wait_for(&["shutting down"]);
    let deadline = Instant::now() + READY;
    let mut served = 0;
    loop {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(&open_header("default")).await.unwrap();
        send.finish().unwrap();
        let mut status = [0u8; 1];
        recv.read_exact(&mut status).await.unwrap();
        if status[0] != amb_proto::status::STATUS_OPEN {
            break;
        }
        served += 1;
        assert!(
            Instant::now() < deadline,
            "{served} streams still served after the drain notice"
        );
    }
    server
        .log
        .wait_for(&["stream refused", "opened after the drain notice"]);

    // The live stream still carries data both ways; its end ends the drain.
    live_send.write_all(b"after").await.unwrap();
    live_send.finish().unwrap();
    let rest = live_recv.read_to_end(64).await.unwrap();
    assert_eq!(rest, b"after");
    let status = blocking(move || server.wait_exit(READY)).await;
    assert!(status.success(), "server exit status {status:?}");
}
