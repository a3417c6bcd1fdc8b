//! Multiplexer abuse by an authenticated peer, with raw clients that break the rules a
//! well-behaved library enforces: HTTP/2 rapid reset (HEADERS then RST_STREAM in a loop), its
//! QUIC counterpart, and streams opened past the advertised limit. Each case must end with the
//! abusive connection closed and a log line naming the peer, memory bounded, no storm of dials
//! toward the upstream, and the server still serving a well-behaved client.

mod support;

use std::time::Duration;

use support::raw::{frame, open_header, quic_connect, RawH2};
use support::*;

/// Streams the abuser sends in all; the server must cut it off long before.
const ATTEMPTS: u32 = 20_000;
/// Upstream dials allowed for all those attempts: the refusal budget's burst with room for
/// its refill and for streams that opened before their cancel arrived.
const MAX_DIALS: usize = 300;
/// Growth of the server's resident memory the abuse may cause.
const MAX_GROWTH_KIB: u64 = 32 * 1024;

fn start(pki: &Pki, upstream: &Upstream, extra: &[&str]) -> (Amb, std::net::SocketAddr) {
    let upstream = upstream.addr.to_string();
    let mut args = vec!["--upstream", upstream.as_str()];
    args.extend_from_slice(extra);
    let server = Amb::server(pki, 0, &args);
    let addr = server.server_addr();
    (server, addr)
}

/// A well-behaved client still gets through, and the server grew by less than the bound.
async fn server_still_serves(
    pki: &Pki,
    server: &Amb,
    addr: std::net::SocketAddr,
    t: Transport,
    rss_before: u64,
) {
    let client = Amb::client(pki, "client", addr, t, &[]);
    client.wait_tunnel_up();
    assert!(
        echo_works(client.listen_addr()).await,
        "a real client after the abuse"
    );
    let growth = rss_kib(server.child.id()).saturating_sub(rss_before);
    assert!(growth < MAX_GROWTH_KIB, "server grew by {growth} KiB");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_rapid_reset_closes_the_connection_without_a_dial_storm() {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let (server, addr) = start(&pki, &upstream, &["--transport", "tls"]);
    let rss_before = rss_kib(server.child.id());

    let mut raw = RawH2::connect(&pki, "client", addr).await;
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
    let code = tokio::time::timeout(READY, raw.goaway())
        .await
        .expect("the server kept the abusive connection open");
    assert_eq!(code, Some(frame::ENHANCE_YOUR_CALM), "GOAWAY code");
    server
        .log
        .wait_for(&["closing tunnel connection", "spiffe://amb/client", "tls"]);
    let dials = upstream.accepted();
    eprintln!("{dials} upstream dials for {sent} cancelled streams");
    assert!(
        dials <= MAX_DIALS,
        "{dials} upstream dials for {sent} cancelled streams"
    );
    server_still_serves(&pki, &server, addr, Transport::Tls, rss_before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_streams_past_the_advertised_limit_are_refused() {
    let pki = Pki::new();
    // Echo holds each connection until the stream ends, so streams stay live.
    let upstream = Upstream::echo().await;
    let (server, addr) = start(
        &pki,
        &upstream,
        &["--transport", "tls", "--max-streams", "16"],
    );
    let rss_before = rss_kib(server.child.id());

    let mut raw = RawH2::connect(&pki, "client", addr).await;
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
    server
        .log
        .wait_for(&["closing tunnel connection", "spiffe://amb/client", "tls"]);
    let dials = upstream.accepted();
    assert!(dials <= 16, "{dials} upstream dials with --max-streams 16");
    server_still_serves(&pki, &server, addr, Transport::Tls, rss_before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_rapid_reset_closes_the_connection_without_a_dial_storm() {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let (server, addr) = start(&pki, &upstream, &["--transport", "quic"]);
    let rss_before = rss_kib(server.child.id());

    let conn = quic_connect(&pki, "client", addr).await;
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
    let closed = tokio::time::timeout(READY, conn.closed())
        .await
        .expect("the server kept the abusive connection open");
    assert!(
        closed.to_string().contains("too many refused streams"),
        "closed with: {closed}"
    );
    server
        .log
        .wait_for(&["closing tunnel connection", "spiffe://amb/client", "quic"]);
    let dials = upstream.accepted();
    eprintln!("{dials} upstream dials for {sent} cancelled streams");
    assert!(
        dials <= MAX_DIALS,
        "{dials} upstream dials for {sent} cancelled streams"
    );
    server_still_serves(&pki, &server, addr, Transport::Quic, rss_before).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_streams_are_capped_at_the_advertised_limit() {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let (server, addr) = start(
        &pki,
        &upstream,
        &["--transport", "quic", "--max-streams", "16"],
    );
    let rss_before = rss_kib(server.child.id());

    let conn = quic_connect(&pki, "client", addr).await;
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
    assert_eq!(upstream.accepted(), 16);
    drop(held);
    server_still_serves(&pki, &server, addr, Transport::Quic, rss_before).await;
}
