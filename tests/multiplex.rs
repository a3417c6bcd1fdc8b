//! Multiplexer abuse by an authenticated peer, with raw clients that break the rules a
//! well-behaved library enforces: HTTP/2 rapid reset (HEADERS then RST_STREAM in a loop), its
//! QUIC counterpart, and streams opened past the advertised limit. Each case must end with the
//! abusive connection closed and a log line naming the peer, memory bounded, no storm of dials
//! toward the upstream, and the server still serving a well-behaved client.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::raw::{expect_closed_for_abuse, frame, open_header, quic_connect, RawH2};
use support::*;

/// Streams the abuser sends in all; the server must cut it off long before.
const ATTEMPTS: u32 = 20_000;
/// Upstream dials allowed for all those attempts: the refusal budget's burst with room for
/// its refill and for streams that opened before their cancel arrived.
const MAX_DIALS: usize = 300;
/// Growth of the server's resident memory the abuse may cause.
const MAX_GROWTH_KIB: u64 = 32 * 1024;

/// An `amb server` with an echo upstream (which holds each connection until its stream ends,
/// so streams stay live), and its memory before the abuse.
struct Target {
    pki: Pki,
    upstream: Upstream,
    server: Amb,
    addr: SocketAddr,
    rss_before: u64,
}

impl Target {
    async fn start(extra: &[&str]) -> Self {
        let pki = Pki::new();
        let upstream = Upstream::echo().await;
        let up = upstream.addr.to_string();
        let mut args = vec!["--upstream", up.as_str()];
        args.extend_from_slice(extra);
        let server = Amb::server(&pki, 0, &args);
        let addr = server.server_addr();
        let rss_before = rss_kib(server.child.id());
        Target {
            pki,
            upstream,
            server,
            addr,
            rss_before,
        }
    }

    /// The server logged closing the abusive connection, naming the peer.
    fn assert_closed_logged(&self, t: Transport) {
        self.server
            .log
            .wait_for(&["closing tunnel connection", "spiffe://amb/client", t.flag()]);
    }

    /// The verdict after the abuse: the server dialed the upstream at most `max_dials` times, a
    /// well-behaved client still gets through, and the server grew by less than the bound.
    async fn assert_contained(&self, t: Transport, max_dials: usize, what: &str) {
        let dials = self.upstream.accepted();
        eprintln!("{dials} upstream dials for {what}");
        assert!(dials <= max_dials, "{dials} upstream dials for {what}");
        let client = Amb::client(&self.pki, "client", self.addr, t, &[]);
        client.wait_tunnel_up();
        assert!(
            echo_works(client.listen_addr()).await,
            "a real client after the abuse"
        );
        let growth = rss_kib(self.server.child.id()).saturating_sub(self.rss_before);
        assert!(growth < MAX_GROWTH_KIB, "server grew by {growth} KiB");
    }
}

per_transport!(
    streams_cancelled_while_the_server_dials_spend_the_budget,
    a_client_gone_while_the_server_dials_is_not_blamed,
);

/// Streams the server accepted and is dialing for: well past the refusal budget's burst (64)
/// plus what it refills (16/s) while the dials complete.
const DIALING: u32 = 200;

/// A client whose streams the server accepted, each waiting for its upstream dial.
enum DialingClient {
    H2(RawH2),
    Quic(
        quinn::Connection,
        Vec<(quinn::SendStream, quinn::RecvStream)>,
    ),
}

/// A server whose upstream's connects hang (until `gate` is released), and a client with
/// [`DIALING`] streams the server accepted and is dialing for.
async fn streams_dialing(t: Transport) -> (Stalled, Pki, Amb, DialingClient) {
    let gate = Stalled::new().await;
    let pki = Pki::new();
    let up = gate.addr.to_string();
    let args = [
        "--transport",
        t.flag(),
        "--upstream",
        &up,
        "--connect-timeout",
        "60s",
    ];
    let server = Amb::server(&pki, 0, &args);
    let addr = server.server_addr();
    let client = match t {
        Transport::Tls => {
            let mut raw = RawH2::connect(&pki, "client", addr).await;
            for i in 0..DIALING {
                raw.connect_request(2 * i + 1, "default");
            }
            raw.flush().await.unwrap();
            DialingClient::H2(raw)
        }
        Transport::Quic => {
            let conn = quic_connect(&pki, "client", addr).await;
            let mut streams = Vec::new();
            for _ in 0..DIALING {
                let (mut send, recv) = conn.open_bi().await.unwrap();
                send.write_all(&open_header("default")).await.unwrap();
                streams.push((send, recv));
            }
            DialingClient::Quic(conn, streams)
        }
    };
    gate.wait_connecting(DIALING as usize);
    (gate, pki, server, client)
}

/// Streams cancelled after the server accepted them, while it dials their upstream, spend the
/// refusal budget when the dial completes: more of them than the budget's burst close the
/// connection. The upstream's connects hang until the test releases them, so every cancel
/// lands mid-dial.
async fn streams_cancelled_while_the_server_dials_spend_the_budget(t: Transport) {
    let (mut gate, _pki, server, client) = streams_dialing(t).await;
    let cancel = quinn::VarInt::from_u32(frame::CANCEL);
    match client {
        DialingClient::H2(mut raw) => {
            for i in 0..DIALING {
                raw.reset(2 * i + 1, frame::CANCEL);
            }
            raw.round_trip().await;
            gate.release();
            raw.expect_calm_goaway().await;
        }
        DialingClient::Quic(conn, mut streams) => {
            for (send, recv) in &mut streams {
                let _ = send.reset(cancel);
                let _ = recv.stop(cancel);
            }
            // A stream for an unknown route, refused at once: once its answer is back, the
            // server has read every frame sent before it.
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(&open_header("unknown")).await.unwrap();
            let mut status = [0u8; 1];
            recv.read_exact(&mut status).await.unwrap();
            assert_ne!(status[0], amb_proto::status::STATUS_OPEN);
            gate.release();
            expect_closed_for_abuse(&conn).await;
        }
    }
    server.log.wait_for(&[
        "too many refused streams (last: stream cancelled before it opened)",
        "spiffe://amb/client",
        t.flag(),
    ]);
}

/// A client that disconnects while the server dials for its streams did not cancel them: when
/// the dials complete and the streams cannot open, nothing is charged to it and it is not logged
/// as an abuser (over TLS this failed before the connection marked itself closing).
async fn a_client_gone_while_the_server_dials_is_not_blamed(t: Transport) {
    let (mut gate, _pki, server, client) = streams_dialing(t).await;
    match client {
        DialingClient::H2(raw) => raw.close().await,
        DialingClient::Quic(conn, _streams) => conn.close(quinn::VarInt::from_u32(0), b"bye"),
    }
    let deadline = std::time::Instant::now() + READY;
    // Ended with its streams still dialing: one line counting them.
    while server
        .log
        .count(&["tunnel connection lost", "streams_cut_off"])
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the server did not see the client go"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let line = server.log.wait_for(&["tunnel connection lost"]);
    assert_eq!(
        field(&line, "streams_cut_off"),
        DIALING.to_string(),
        "{line}"
    );
    gate.release();
    server
        .log
        .wait_for_nth(&["stream lost before it opened"], DIALING as usize);
    let text = server.log.text();
    let warned = text
        .lines()
        .filter(|l| l.contains("stream lost before it opened") && l.contains("WARN"));
    assert_eq!(
        warned.count(),
        0,
        "the streams of a client that went away are not warnings, one per stream:\n{text}"
    );
    assert_eq!(
        server.log.count(&["too many refused streams"]),
        0,
        "a client that went away was blamed:\n{}",
        server.log.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_closes_the_connection_without_a_dial_storm() {
    let target = Target::start(&["--transport", "tls"]).await;
    let mut raw = RawH2::connect(&target.pki, "client", target.addr).await;
    let mut sent = 0;
    while sent < ATTEMPTS {
        for _ in 0..100 {
            let stream = 2 * sent + 1;
            raw.connect_request(stream, "default");
            raw.reset(stream, frame::CANCEL);
            sent += 1;
        }
        if raw.flush().await.is_err() {
            break;
        }
    }
    raw.expect_calm_goaway().await;
    target.assert_closed_logged(Transport::Tls);
    let what = format!("{sent} cancelled streams");
    target
        .assert_contained(Transport::Tls, MAX_DIALS, &what)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_past_the_advertised_limit_are_refused() {
    let target = Target::start(&["--transport", "tls", "--max-streams", "16"]).await;
    let mut raw = RawH2::connect(&target.pki, "client", target.addr).await;
    // The server advertises at most 16 concurrent streams; open far more without waiting.
    for i in 0..ATTEMPTS {
        raw.connect_request(2 * i + 1, "default");
        if i % 100 == 99 && raw.flush().await.is_err() {
            break;
        }
    }
    let _ = raw.flush().await;
    let (mut refused, mut goaway) = (0, None);
    while let Ok(Some((kind, _, _, payload))) = tokio::time::timeout(READY, raw.frames.recv()).await
    {
        match kind {
            frame::RST_STREAM
                if u32::from_be_bytes(payload[..4].try_into().unwrap())
                    == frame::REFUSED_STREAM =>
            {
                refused += 1
            }
            frame::GOAWAY => {
                goaway = Some(u32::from_be_bytes(payload[4..8].try_into().unwrap()));
                break;
            }
            _ => {}
        }
    }
    eprintln!("{refused} streams refused before GOAWAY");
    assert!(refused > 0, "no stream past the limit was refused");
    assert_eq!(
        goaway,
        Some(frame::ENHANCE_YOUR_CALM),
        "GOAWAY after {refused} refused streams"
    );
    target.assert_closed_logged(Transport::Tls);
    target
        .assert_contained(Transport::Tls, 16, "--max-streams 16")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_rapid_reset_closes_the_connection_without_a_dial_storm() {
    let target = Target::start(&["--transport", "quic"]).await;
    let conn = quic_connect(&target.pki, "client", target.addr).await;
    let header = open_header("default");
    let mut sent = 0;
    while sent < ATTEMPTS {
        let Ok(Ok((mut send, mut recv))) = tokio::time::timeout(READY, conn.open_bi()).await else {
            break;
        };
        if send.write_all(&header).await.is_err() {
            break;
        }
        let _ = send.reset(quinn::VarInt::from_u32(frame::CANCEL));
        let _ = recv.stop(quinn::VarInt::from_u32(frame::CANCEL));
        sent += 1;
    }
    expect_closed_for_abuse(&conn).await;
    target.assert_closed_logged(Transport::Quic);
    let what = format!("{sent} cancelled streams");
    target
        .assert_contained(Transport::Quic, MAX_DIALS, &what)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_streams_are_capped_at_the_advertised_limit() {
    let target = Target::start(&["--transport", "quic", "--max-streams", "16"]).await;
    let conn = quic_connect(&target.pki, "client", target.addr).await;
    let header = open_header("default");
    let mut held = Vec::new();
    // Open streams as fast as the transport lets us; the 17th must wait for credit.
    loop {
        match tokio::time::timeout(Duration::from_secs(2), conn.open_bi()).await {
            Ok(Ok((mut send, recv))) => {
                send.write_all(&header).await.unwrap();
                held.push((send, recv));
                assert!(
                    held.len() <= 16,
                    "opened {} streams past a limit of 16",
                    held.len()
                );
            }
            Ok(Err(e)) => panic!("connection lost: {e}"),
            Err(_) => break,
        }
    }
    assert_eq!(held.len(), 16);
    // Every held stream is answered and dialed: the limit is the only thing that stopped us.
    for (_, recv) in &mut held {
        let mut status = [0u8; 1];
        recv.read_exact(&mut status).await.unwrap();
        assert_eq!(status[0], amb_proto::status::STATUS_OPEN);
    }
    assert_eq!(target.upstream.accepted(), 16);
    drop(held);
    target
        .assert_contained(Transport::Quic, 16, "--max-streams 16")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_is_not_blamed_on_the_client() {
    // Streams that fail because their connection went away are not cancels by the client: a
    // client that disconnects with many streams pending must not be logged as an abuser.
    let target = Target::start(&["--transport", "quic"]).await;
    let conn = quic_connect(&target.pki, "client", target.addr).await;
    let mut pending = Vec::new();
    for _ in 0..100 {
        // One byte of the header: the server waits for the rest.
        let (mut send, recv) = conn.open_bi().await.unwrap();
        send.write_all(&open_header("default")[..1]).await.unwrap();
        pending.push((send, recv));
    }
    // quinn hands streams to the server in order, so once a later stream is answered, all 100
    // are waiting for their headers.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&open_header("default")).await.unwrap();
    let mut status = [0u8; 1];
    recv.read_exact(&mut status).await.unwrap();
    assert_eq!(status[0], amb_proto::status::STATUS_OPEN);
    conn.close(quinn::VarInt::from_u32(0), b"bye");
    target
        .server
        .log
        .wait_for_nth(&["stream dropped before its header: connection lost"], 100);
    assert_eq!(
        target.server.log.count(&["too many refused streams"]),
        0,
        "a lost connection was blamed on the client:\n{}",
        target.server.log.text()
    );
    target
        .assert_contained(Transport::Quic, 1, "one opened stream")
        .await;
}
