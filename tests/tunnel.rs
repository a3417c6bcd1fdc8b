//! End-to-end scenarios through the real `amb` binary, each run over QUIC and over TLS.

mod support;

use std::time::Duration;

use rand::{Rng, RngCore};
use sha2::{Digest, Sha256};
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

per_transport!(
    redis_ping_set_get_and_10mb_value,
    a_unix_socket_upstream_carries_redis_and_half_closes,
    two_hundred_concurrent_echo_connections,
    half_close_client_first,
    half_close_upstream_speaks_first,
    upstream_down_resets_then_recovers,
    server_restart_client_reconnects,
    server_crash_client_reconnects_at_once,
    unknown_route_is_refused_without_dial,
    identity_not_allowed_is_refused_without_dial,
    sigterm_drains_live_connections,
    connections_made_during_a_drain_go_to_the_next_server,
    client_sigterm_delivers_the_last_bytes,
    a_drain_cut_short_warns_per_app_connection,
    streams_over_the_server_limit_wait_then_reset,
    open_waiting_for_credit_moves_to_the_next_tunnel,
    a_lost_server_is_one_warning_at_the_client,
    a_lost_client_is_one_warning_at_the_server,
);

/// A server for `upstream` (route `default`) and a client for it, both ready.
fn pair(
    pki: &Pki,
    upstream: &str,
    transport: Transport,
    server_extra: &[&str],
    client_extra: &[&str],
) -> (Amb, Amb) {
    let mut extra = vec!["--upstream", upstream];
    extra.extend_from_slice(server_extra);
    let server = Amb::server(pki, 0, &extra);
    let client = Amb::client(pki, "client", server.server_addr(), transport, client_extra);
    client.wait_tunnel_up();
    (server, client)
}

/// The usual start of a scenario: a PKI, an echo upstream, and a ready (server, client) pair
/// for it.
async fn echo_pair(
    t: Transport,
    server_extra: &[&str],
    client_extra: &[&str],
) -> (Pki, Upstream, Amb, Amb) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let (server, client) = pair(
        &pki,
        &upstream.addr.to_string(),
        t,
        server_extra,
        client_extra,
    );
    (pki, upstream, server, client)
}

/// Writes a RESP command.
fn resp(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

async fn redis_ping_set_get_and_10mb_value(t: Transport) {
    let pki = Pki::new();
    let redis = Redis::start();
    // By name, as operators write it: looked up through the system resolver.
    let upstream = format!("localhost:{}", redis.port);
    let (server, client) = pair(&pki, &upstream, t, &[], &[]);
    let port = client.listen_addr().port();

    let cli = move |args: &'static [&'static str]| blocking(move || redis_cli(port, args));
    assert_eq!(cli(&["ping"]).await.as_deref(), Some("PONG"));
    assert_eq!(
        cli(&["set", "greeting", "hello"]).await.as_deref(),
        Some("OK")
    );
    assert_eq!(cli(&["get", "greeting"]).await.as_deref(), Some("hello"));

    let mut value = vec![0u8; 10 << 20];
    rand::rng().fill_bytes(&mut value);
    let mut tcp = TcpStream::connect(client.listen_addr()).await.unwrap();
    let (mut r, mut w) = tcp.split();
    let writer = async {
        w.write_all(&resp(&[b"SET", b"big", &value])).await.unwrap();
        w.write_all(&resp(&[b"GET", b"big"])).await.unwrap();
    };
    let want_len = 5 + format!("${}\r\n", value.len()).len() + value.len() + 2;
    let reader = async {
        let mut got = vec![0u8; want_len];
        r.read_exact(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(writer, reader);
    assert_eq!(&got[..5], b"+OK\r\n");
    let header = format!("${}\r\n", value.len());
    assert_eq!(&got[5..5 + header.len()], header.as_bytes());
    let body = &got[5 + header.len()..got.len() - 2];
    assert!(body == &value[..], "10 MB value came back altered");
    server.log.wait_for(&["upstream resolved", &upstream]);
}

async fn a_unix_socket_upstream_carries_redis_and_half_closes(t: Transport) {
    let pki = Pki::new();
    let dir = TempDir::new("unix-upstream");
    let socket = dir.0.join("redis.sock");
    let redis = Redis::start_with(&["--unixsocket", socket.to_str().unwrap()]);
    let (server, client) = pair(&pki, &format!("unix:{}", socket.display()), t, &[], &[]);
    let port = client.listen_addr().port();
    let cli = move |args: &'static [&'static str]| blocking(move || redis_cli(port, args));
    assert_eq!(cli(&["set", "over", "unix"]).await.as_deref(), Some("OK"));
    // Set through the tunnel, read back over redis's own TCP port: the same server.
    assert_eq!(
        redis_cli(redis.port, &["get", "over"]).as_deref(),
        Some("unix")
    );
    drop((server, client));

    // Half-close both ways over the Unix socket, as over TCP (half_close_* below).
    let greeter = dir.0.join("greeter.sock");
    let listener = tokio::net::UnixListener::bind(&greeter).unwrap();
    let upstream =
        tokio::spawn(async move { greet_then_read(listener.accept().await.unwrap().0).await });
    let (_server, client) = pair(&pki, &format!("unix:{}", greeter.display()), t, &[], &[]);
    assert_eq!(app_after_a_greeting(&client).await, b"hello from upstream");
    let got = tokio::time::timeout(READY, upstream)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"bye");

    // The app ends first; the upstream answers only after reading to the end, so amb must shut
    // down the Unix socket's write side.
    let counter = dir.0.join("counter.sock");
    let listener = tokio::net::UnixListener::bind(&counter).unwrap();
    tokio::spawn(async move { count_then_answer(listener.accept().await.unwrap().0).await });
    let (_server, client) = pair(&pki, &format!("unix:{}", counter.display()), t, &[], &[]);
    assert_eq!(app_ending_first(&client).await, b"got 100000 bytes");

    // A socket nobody listens on: the app connection is reset, and the server names the path.
    let missing = dir.0.join("missing.sock");
    let (server, client) = pair(&pki, &format!("unix:{}", missing.display()), t, &[], &[]);
    assert_reset_after_write(client.listen_addr(), b"anyone there?").await;
    server
        .log
        .wait_for(&["stream refused", &missing.display().to_string()]);
}

async fn two_hundred_concurrent_echo_connections(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let (_server, client) = pair(&pki, &upstream.addr.to_string(), t, &[], &[]);
    let addr = client.listen_addr();
    let tasks: Vec<_> = (0..200)
        .map(|_| {
            tokio::spawn(async move {
                let len = rand::rng().random_range(1..256 << 10);
                let mut payload = vec![0u8; len];
                rand::rng().fill_bytes(&mut payload);
                let mut tcp = TcpStream::connect(addr).await.unwrap();
                let (mut r, mut w) = tcp.split();
                let send = async {
                    w.write_all(&payload).await.unwrap();
                    w.shutdown().await.unwrap();
                };
                let recv = async {
                    let mut got = Vec::new();
                    r.read_to_end(&mut got).await.unwrap();
                    got
                };
                let ((), got) = tokio::join!(send, recv);
                assert_eq!(
                    Sha256::digest(&got),
                    Sha256::digest(&payload),
                    "payload of {len} bytes altered"
                );
            })
        })
        .collect();
    for task in tasks {
        tokio::time::timeout(READY * 3, task)
            .await
            .expect("echo timed out")
            .unwrap();
    }
    assert_eq!(upstream.accepted(), 200);
}

async fn half_close_client_first(t: Transport) {
    let upstream = Upstream::start(|tcp: TcpStream| count_then_answer(tcp)).await;
    let pki = Pki::new();
    let (_server, client) = pair(&pki, &upstream.addr.to_string(), t, &[], &[]);
    assert_eq!(app_ending_first(&client).await, b"got 100000 bytes");
}

async fn half_close_upstream_speaks_first(t: Transport) {
    let (heard, mut what_it_heard) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Upstream::start(move |tcp: TcpStream| {
        let heard = heard.clone();
        async move {
            let _ = heard.send(greet_then_read(tcp).await);
        }
    })
    .await;
    let pki = Pki::new();
    let (_server, client) = pair(&pki, &upstream.addr.to_string(), t, &[], &[]);
    assert_eq!(app_after_a_greeting(&client).await, b"hello from upstream");
    let got = tokio::time::timeout(READY, what_it_heard.recv()).await;
    assert_eq!(got.unwrap().unwrap(), b"bye");
}

/// Upstream of a half-close the app begins: reads to the app's FIN, then answers with the
/// count.
async fn count_then_answer(mut socket: impl AsyncRead + AsyncWrite + Unpin) {
    let mut got = Vec::new();
    socket.read_to_end(&mut got).await.unwrap();
    socket
        .write_all(format!("got {} bytes", got.len()).as_bytes())
        .await
        .unwrap();
}

/// App side of it: 100,000 bytes and its FIN, then the answer, read to the upstream's FIN.
async fn app_ending_first(client: &Amb) -> Vec<u8> {
    let mut tcp = TcpStream::connect(client.listen_addr()).await.unwrap();
    tcp.write_all(&[7u8; 100_000]).await.unwrap();
    tcp.shutdown().await.unwrap();
    tokio::time::timeout(READY, read_all(&mut tcp))
        .await
        .unwrap()
        .unwrap()
}

/// Upstream of a half-close it begins: greets, ends its side, and returns what it still reads.
async fn greet_then_read(mut socket: impl AsyncRead + AsyncWrite + Unpin) -> Vec<u8> {
    socket.write_all(b"hello from upstream").await.unwrap();
    socket.shutdown().await.unwrap();
    let mut got = Vec::new();
    socket.read_to_end(&mut got).await.unwrap();
    got
}

/// App side of it: the greeting, read to the upstream's FIN; then, its own side still open,
/// `bye` and its FIN.
async fn app_after_a_greeting(client: &Amb) -> Vec<u8> {
    let mut tcp = TcpStream::connect(client.listen_addr()).await.unwrap();
    let greeting = tokio::time::timeout(READY, read_all(&mut tcp))
        .await
        .unwrap()
        .unwrap();
    tcp.write_all(b"bye").await.unwrap();
    tcp.shutdown().await.unwrap();
    greeting
}

async fn upstream_down_resets_then_recovers(t: Transport) {
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream_addr = listener.local_addr().unwrap();
    drop(listener);
    // By name: the addresses of the first lookup keep being dialed until the upstream is back.
    let upstream = format!("localhost:{}", upstream_addr.port());
    let (server, client) = pair(&pki, &upstream, t, &[], &[]);

    let started = std::time::Instant::now();
    assert_reset_after_write(client.listen_addr(), b"anyone there?").await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "reset took {:?}",
        started.elapsed()
    );
    server.log.wait_for(&[
        "stream refused",
        "upstream refused",
        &upstream_addr.to_string(),
    ]);
    client
        .log
        .wait_for(&["refused by server", "upstream refused"]);

    // The upstream comes back on the same address: new connections work.
    let listener = tokio::net::TcpListener::bind(upstream_addr).await.unwrap();
    let _upstream = Upstream::start_on(listener, echo);
    assert!(echo_works(client.listen_addr()).await);
}

async fn server_restart_client_reconnects(t: Transport) {
    let (pki, upstream, mut server, client) = echo_pair(t, &[], &[]).await;
    let up = upstream.addr.to_string();
    let addr = server.server_addr();
    assert!(echo_works(client.listen_addr()).await);
    let ups = client.wait_pool_up(t);
    // A restart as systemd does it: SIGTERM, exit, start again on the same port.
    server.signal("TERM");
    let status = blocking(move || server.wait_exit(READY)).await;
    assert!(status.success());
    // The drain notice, or the close right behind it (no live stream to finish): either
    // retires the tunnel connection.
    client.log.wait_for(&["tunnel connection", "reconnecting"]);
    let _server = Amb::server(&pki, addr.port(), &["--upstream", &up]);
    client.wait_reconnected(ups, t.pool_size());
    assert!(echo_works(client.listen_addr()).await);
}

async fn server_crash_client_reconnects_at_once(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let up = upstream.addr.to_string();
    let server = Amb::server(&pki, 0, &["--upstream", &up]);
    let addr = server.server_addr();
    // QUIC learns of a vanished peer by its silence: the liveness deadline, not the idle timeout.
    let client = Amb::client(&pki, "client", addr, t, &[]);
    let ups = client.wait_pool_up(t);
    assert!(echo_works(client.listen_addr()).await);
    drop(server); // SIGKILL: no goodbye to the client.
    client.log.wait_for(&["tunnel connection lost"]);
    let _server = Amb::server(&pki, addr.port(), &["--upstream", &up]);
    client.wait_reconnected(ups, t.pool_size());
    assert!(echo_works(client.listen_addr()).await);
}

/// App connections whose stream opens wait for credit (the server allows one stream) on a
/// tunnel that then dies silently are carried on the tunnel dialed next, within
/// `--tunnel-wait`, instead of being reset.
async fn open_waiting_for_credit_moves_to_the_next_tunnel(t: Transport) {
    let (pki, upstream, server, client) = echo_pair(
        t,
        &["--max-streams", "1"],
        &[
            "--connections",
            "1",
            "--idle-timeout",
            "2s",
            "--tunnel-wait",
            "30s",
        ],
    )
    .await;
    let up = upstream.addr.to_string();
    let addr = server.server_addr();
    let listen = client.listen_addr();
    let mut holder = TcpStream::connect(listen).await.unwrap();
    holder.write_all(b"held").await.unwrap();
    let mut echo = [0u8; 4];
    holder.read_exact(&mut echo).await.unwrap();
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(listen).await.unwrap();
        tcp.write_all(b"hi").await.unwrap();
        waiting.push(tcp);
    }
    drop(server); // SIGKILL: the client learns of it from silence or the kernel's reset.
    client.log.wait_for(&["tunnel connection lost"]);
    let _server = Amb::server(&pki, addr.port(), &["--upstream", &up]);
    for mut tcp in waiting {
        let mut reply = [0u8; 2];
        tokio::time::timeout(Duration::from_secs(30), tcp.read_exact(&mut reply))
            .await
            .expect("no reply within --tunnel-wait")
            .expect("the waiting app connection was reset instead of carried");
        assert_eq!(&reply, b"hi");
    }
    // Both waiting connections took the retry (a debug line each).
    client.log.wait_for_nth(&["trying another"], 2);
}

async fn unknown_route_is_refused_without_dial(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let server = Amb::server(&pki, 0, &["--route", &format!("known={}", upstream.addr)]);
    let client = Amb::client(
        &pki,
        "client",
        server.server_addr(),
        t,
        &["--listen", "0=unknown"],
    );
    client.wait_tunnel_up();
    // The second --listen (route `unknown`) is the one logged second.
    let addr = client.listen_addr_for("unknown");
    assert_reset_after_write(addr, b"hi").await;
    server.log.wait_for(&[
        "stream refused: unknown route",
        "route=unknown",
        "spiffe://amb/client",
    ]);
    client
        .log
        .wait_for(&["refused by server: unknown route", "route=unknown"]);
    assert_eq!(
        upstream.accepted(),
        0,
        "no upstream dial for an unknown route"
    );
}

async fn identity_not_allowed_is_refused_without_dial(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let (server, client) = pair(
        &pki,
        &upstream.addr.to_string(),
        t,
        &["--allow", "uri:spiffe://amb/someone-else"],
        &[],
    );
    assert_reset_after_write(client.listen_addr(), b"hi").await;
    server.log.wait_for(&[
        "stream refused: peer not authorized",
        "uri:spiffe://amb/client",
    ]);
    client
        .log
        .wait_for(&["refused by server: peer not authorized"]);
    assert_eq!(
        upstream.accepted(),
        0,
        "no upstream dial for an unauthorized peer"
    );
}

async fn sigterm_drains_live_connections(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let (mut server, client) = pair(&pki, &upstream.addr.to_string(), t, &[], &[]);
    let mut tcp = TcpStream::connect(client.listen_addr()).await.unwrap();
    tcp.write_all(b"before").await.unwrap();
    let mut buf = [0u8; 6];
    tcp.read_exact(&mut buf).await.unwrap();

    server.signal("TERM");
    server.log.wait_for(&["shutting down"]);
    // The live stream still carries data both ways, then ends cleanly.
    tcp.write_all(b"after").await.unwrap();
    tcp.shutdown().await.unwrap();
    let rest = tokio::time::timeout(READY, read_all(&mut tcp))
        .await
        .unwrap()
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nserver:\n{}\nclient:\n{}",
                server.log.text(),
                client.log.text()
            )
        });
    assert_eq!(rest, b"after");
    let status = blocking(move || {
        let status = server.wait_exit(READY);
        (status, server)
    })
    .await
    .0;
    assert!(status.success(), "server exit status {status:?}");
}

/// A restart with a live connection: after SIGTERM the old server stops listening and tells the
/// client at once (h2 GOAWAY, QUIC drain notice), finishes its live stream and exits. An app
/// connection made meanwhile waits within `--tunnel-wait` and is carried by the server started
/// next on the same port, instead of being opened on, and refused by, the draining one.
async fn connections_made_during_a_drain_go_to_the_next_server(t: Transport) {
    let (pki, upstream, mut old, client) =
        echo_pair(t, &["--drain-timeout", "60s"], &["--tunnel-wait", "60s"]).await;
    let up = upstream.addr.to_string();
    let addr = old.server_addr();
    let ups = client.wait_pool_up(t);
    let mut live = TcpStream::connect(client.listen_addr()).await.unwrap();
    live.write_all(b"before").await.unwrap();
    let mut before = [0u8; 6];
    live.read_exact(&mut before).await.unwrap();

    old.signal("TERM");
    client
        .log
        .wait_for_nth(&["draining the tunnel connection"], t.pool_size());
    let refused = TcpStream::connect(addr).await.map(drop);
    assert_eq!(
        refused.map_err(|e| e.kind()),
        Err(std::io::ErrorKind::ConnectionRefused),
        "the draining server still listens"
    );
    // The client's redial is turned away at once (over QUIC too), not left to time out.
    client.log.wait_for(&["tunnel connect failed", "refused"]);
    let mut fresh = TcpStream::connect(client.listen_addr()).await.unwrap();
    fresh.write_all(b"fresh").await.unwrap();

    // The live stream still carries data both ways; its end lets the old server exit.
    live.write_all(b"after").await.unwrap();
    live.shutdown().await.unwrap();
    let rest = tokio::time::timeout(READY, read_all(&mut live)).await;
    assert_eq!(rest.unwrap().unwrap(), b"after");
    let (status, old) = blocking(move || (old.wait_exit(READY), old)).await;
    assert!(status.success(), "old server exit status {status:?}");
    let old_log = old.log.text();
    assert!(
        !old_log.contains("stream refused"),
        "the draining server was asked for a new stream:\n{old_log}"
    );

    let _new = Amb::server(&pki, addr.port(), &["--upstream", &up]);
    client.wait_reconnected(ups, 1);
    let mut reply = [0u8; 5];
    tokio::time::timeout(READY, fresh.read_exact(&mut reply))
        .await
        .expect("no reply from the next server")
        .unwrap_or_else(|e| {
            panic!(
                "the app connection made during the drain was reset ({e}):\nold server:\n{old_log}\nclient:\n{}",
                client.log.text()
            )
        });
    assert_eq!(&reply, b"fresh");
}

/// The client's own drain: after SIGTERM a live app connection, whose upstream already said
/// goodbye, sends its last 8 MiB and closes; every byte reaches the upstream before the client
/// exits, including what was still queued in the tunnel connection when the stream ended.
async fn client_sigterm_delivers_the_last_bytes(t: Transport) {
    let pki = Pki::new();
    let (received_tx, received_rx) = tokio::sync::mpsc::unbounded_channel();
    let upstream = Upstream::start(move |mut tcp: TcpStream| {
        let received_tx = received_tx.clone();
        async move {
            tcp.write_all(b"bye").await.unwrap();
            tcp.shutdown().await.unwrap();
            let got = read_all(&mut tcp).await.unwrap_or_default();
            let _ = received_tx.send((got.len(), Sha256::digest(&got).to_vec()));
        }
    })
    .await;
    let (server, mut client) = pair(&pki, &upstream.addr.to_string(), t, &[], &[]);
    let mut tcp = TcpStream::connect(client.listen_addr()).await.unwrap();
    assert_eq!(read_all(&mut tcp).await.unwrap(), b"bye");

    client.signal("TERM");
    client.log.wait_for(&["shutting down"]);
    let mut last = vec![0u8; 8 << 20];
    rand::rng().fill_bytes(&mut last);
    tcp.write_all(&last).await.unwrap();
    tcp.shutdown().await.unwrap();
    let (status, client) = blocking(move || (client.wait_exit(READY), client)).await;
    assert!(status.success(), "client exit status {status:?}");
    let mut received_rx = received_rx;
    let (len, digest) = tokio::time::timeout(READY, received_rx.recv())
        .await
        .expect("the upstream never saw the end of the stream")
        .unwrap();
    // The client's clean shutdown is no warning at the server.
    server.log.wait_for(&["tunnel connection ended"]);
    assert_eq!(
        server.log.count(&["WARN"]),
        0,
        "server:\n{}",
        server.log.text()
    );
    assert!(
        len == last.len() && digest == Sha256::digest(&last).to_vec(),
        "the upstream received {len} bytes, not the {} the app sent before the client exited; server:\n{}\nclient:\n{}",
        last.len(),
        server.log.text(),
        client.log.text()
    );
}

/// At the server's `--max-streams`, a new app connection waits for a stream to end, up to
/// `--tunnel-wait`: carried if one ends in time, else reset with one log line saying why
/// (over TLS it used to wait inside h2 with no deadline and no word).
async fn streams_over_the_server_limit_wait_then_reset(t: Transport) {
    let (_pki, upstream, _server, client) = echo_pair(
        t,
        &["--max-streams", "1"],
        &["--connections", "1", "--tunnel-wait", "2s"],
    )
    .await;
    let listen = client.listen_addr();
    let mut holder = TcpStream::connect(listen).await.unwrap();
    holder.write_all(b"held").await.unwrap();
    let mut echo = [0u8; 4];
    holder.read_exact(&mut echo).await.unwrap();

    let started = std::time::Instant::now();
    assert_reset_after_write(listen, b"over").await;
    assert!(
        started.elapsed() >= Duration::from_millis(1900),
        "reset before --tunnel-wait ran out: {:?}",
        started.elapsed()
    );
    client
        .log
        .wait_for(&["no stream credit within 2s", "resetting"]);

    let mut waiting = TcpStream::connect(listen).await.unwrap();
    waiting.write_all(b"next").await.unwrap();
    drop(holder);
    let mut reply = [0u8; 4];
    tokio::time::timeout(READY, waiting.read_exact(&mut reply))
        .await
        .expect("no reply once the held stream ended")
        .expect("the waiting app connection was reset although a stream ended in time");
    assert_eq!(&reply, b"next");
    // The connection given up at --tunnel-wait left nothing behind to open later.
    assert_eq!(
        upstream.accepted(),
        2,
        "an app connection reset at --tunnel-wait still reached the upstream"
    );
}

/// `n` app connections through `listen`, each answered once and left open.
async fn live_connections(listen: std::net::SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut live = Vec::new();
    for _ in 0..n {
        let mut tcp = TcpStream::connect(listen).await.unwrap();
        tcp.write_all(b"hi").await.unwrap();
        let mut echo = [0u8; 2];
        tcp.read_exact(&mut echo).await.unwrap();
        live.push(tcp);
    }
    live
}

/// A server that dies under five live app connections costs the client one warning, which
/// counts them; each app connection is reset with a debug line only.
async fn a_lost_server_is_one_warning_at_the_client(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let (server, client) = pair(
        &pki,
        &upstream.addr.to_string(),
        t,
        &[],
        &["--connections", "1", "--idle-timeout", "2s"],
    );
    let mut live = live_connections(client.listen_addr(), 5).await;
    drop(server); // SIGKILL
    for tcp in &mut live {
        let _ = tokio::time::timeout(READY, read_all(tcp))
            .await
            .expect("an app connection outlived its tunnel connection");
    }
    assert_one_loss_warning(
        &client.log,
        "app_connections_reset",
        "client: connection reset",
    );
}

/// One `tunnel connection lost` warning whose `count_field` says 5, and each of the five
/// `per_stream` lines at debug level only.
fn assert_one_loss_warning(log: &Log, count_field: &str, per_stream: &str) {
    let line = log.wait_for(&["WARN", "tunnel connection lost"]);
    assert_eq!(field(&line, count_field), "5", "{line}");
    log.wait_for_nth(&["DEBUG", per_stream], 5);
    let warnings = (
        log.count(&["WARN", "tunnel connection lost"]),
        log.count(&["WARN", per_stream]),
    );
    assert_eq!(
        warnings,
        (1, 0),
        "one warning for the lost connection, none per stream:\n{}",
        log.text()
    );
}

/// A client that dies under five live streams costs the server one warning, which counts them;
/// each stream is reset with a debug line only.
async fn a_lost_client_is_one_warning_at_the_server(t: Transport) {
    let (_pki, _upstream, server, client) =
        echo_pair(t, &["--idle-timeout", "2s"], &["--connections", "1"]).await;
    let _live = live_connections(client.listen_addr(), 5).await;
    drop(client); // SIGKILL
    assert_one_loss_warning(&server.log, "streams_cut_off", "server: stream reset");
}

/// A drain that reaches `--drain-timeout` cuts off what still runs; the client warns for each
/// app connection it resets (the connection's retirement was only an info line).
async fn a_drain_cut_short_warns_per_app_connection(t: Transport) {
    let (_pki, _upstream, mut server, client) =
        echo_pair(t, &["--drain-timeout", "1s"], &["--connections", "1"]).await;
    let mut live = live_connections(client.listen_addr(), 1).await;
    server.signal("TERM");
    client.log.wait_for(&["draining the tunnel connection"]);
    let status = blocking(move || server.wait_exit(READY)).await;
    assert!(status.success(), "server exit status {status:?}");
    let _ = tokio::time::timeout(READY, read_all(&mut live[0]))
        .await
        .expect("the app connection outlived its server");
    client
        .log
        .wait_for(&["WARN", "connection reset", "the server's drain ended"]);
}
