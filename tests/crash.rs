//! A server process that dies without a word (`kill -9`): its clients' app connections are
//! reset within seconds, over QUIC as over TLS, and a server restarted on the same port is
//! recognised at once.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

per_transport!(
    a_killed_server_resets_every_app_connection_within_3s,
    a_server_killed_and_restarted_is_redialed_within_1s,
);

/// A real redis behind a server and a client, with the tunnel up.
fn redis_pair(t: Transport) -> (Pki, Redis, Amb, Amb) {
    let pki = Pki::new();
    let redis = Redis::start();
    let upstream = format!("127.0.0.1:{}", redis.port);
    let server = Amb::server(&pki, 0, &["--upstream", &upstream]);
    let client = Amb::client(&pki, "client", server.server_addr(), t, &[]);
    client.wait_pool_up(t);
    (pki, redis, server, client)
}

/// `PING` over an open app connection: whether `+PONG` came back within 5 s.
async fn ping_on(tcp: &mut BufReader<TcpStream>) -> bool {
    let exchange = async {
        tcp.get_mut().write_all(b"PING\r\n").await.ok()?;
        let mut line = String::new();
        tcp.read_line(&mut line).await.ok()?;
        Some(line == "+PONG\r\n")
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), exchange).await,
        Ok(Some(true))
    )
}

async fn a_killed_server_resets_every_app_connection_within_3s(t: Transport) {
    const APPS: usize = 20;
    let (_pki, _redis, server, client) = redis_pair(t);
    let mut apps = Vec::new();
    for _ in 0..APPS {
        let mut tcp = BufReader::new(TcpStream::connect(client.listen_addr()).await.unwrap());
        assert!(ping_on(&mut tcp).await);
        apps.push(tcp.into_inner());
    }
    server.signal("KILL");
    let killed = Instant::now();
    let ends: Vec<_> = apps
        .into_iter()
        .map(|mut tcp| {
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let read = tokio::time::timeout(READY, tcp.read(&mut buf)).await;
                (read.map(|r| r.map_err(|e| e.kind())), killed.elapsed())
            })
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for end in ends {
        let (read, after) = end.await.unwrap();
        slowest = slowest.max(after);
        assert_eq!(
            read,
            Ok(Err(std::io::ErrorKind::ConnectionReset)),
            "an app connection of the killed server was not reset"
        );
        assert!(
            after < Duration::from_secs(3),
            "an app connection was reset only {after:?} after the kill"
        );
    }
    eprintln!("{t:?}: {APPS} app connections reset at most {slowest:?} after the kill");
}

async fn a_server_killed_and_restarted_is_redialed_within_1s(t: Transport) {
    let (pki, redis, server, client) = redis_pair(t);
    let listen = client.listen_addr();
    let mut tcp = BufReader::new(TcpStream::connect(listen).await.unwrap());
    assert!(ping_on(&mut tcp).await);
    let port = server.server_addr().port();
    server.signal("KILL");
    blocking(move || drop(server)).await;
    let upstream = format!("127.0.0.1:{}", redis.port);
    let restarted = Amb::server(&pki, port, &["--upstream", &upstream]);
    restarted.server_addr();
    let up = Instant::now();
    // New app connections, one after another, from the moment the new server listens. The
    // first may meet the old connection before the client knows it is gone, and be reset: its
    // packet draws the new server's stateless reset. The next is answered within 1 s, and
    // every one after it too.
    let mut answered = None;
    let (mut failed_before, mut failed_after) = (0, 0);
    while up.elapsed() < Duration::from_secs(2) {
        let ok = match TcpStream::connect(listen).await {
            Ok(tcp) => ping_on(&mut BufReader::new(tcp)).await,
            Err(_) => false,
        };
        match (ok, answered) {
            (true, None) => answered = Some(up.elapsed()),
            (false, Some(_)) => failed_after += 1,
            (false, None) => failed_before += 1,
            (true, Some(_)) => {}
        }
    }
    let first = answered.unwrap_or_else(|| {
        panic!(
            "no app connection answered within 2 s of the restart; client log:\n{}",
            client.log.text()
        )
    });
    assert!(
        first < Duration::from_secs(1),
        "the first app connection answered {first:?} after the restart"
    );
    eprintln!("{t:?}: first answer {first:?} after the restart, {failed_before} reset before");
    assert!(
        failed_before <= 1,
        "{failed_before} app connections failed first"
    );
    assert_eq!(
        failed_after, 0,
        "app connections failed after one was answered"
    );
}
