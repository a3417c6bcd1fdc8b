//! Trust changes: a client whose identity leaves the allow-list, or whose CA is no longer
//! trusted, is kept out even if it kept session state from before. The server issues no session
//! tickets and accepts no 0-RTT, so every connection is a full handshake with a full certificate
//! check and a fresh authorization of every stream. Here the trust changes at a restart;
//! `tests/reload.rs` changes it without one.

mod support;

use std::net::SocketAddr;

use rustls::HandshakeKind;
use support::raw::Resumer;
use support::*;

per_transport!(
    every_connection_is_a_full_handshake,
    removed_identity_is_refused_despite_earlier_sessions,
    changed_ca_rejects_the_old_client_despite_earlier_sessions,
);

fn server_allowing(pki: &Pki, port: u16, upstream: &Upstream, allow: &str) -> Amb {
    Amb::server(
        pki,
        port,
        &["--upstream", &upstream.addr.to_string(), "--allow", allow],
    )
}

async fn every_connection_is_a_full_handshake(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let server = server_allowing(&pki, 0, &upstream, "uri:spiffe://amb/client");
    let addr = server.server_addr();
    let client = Resumer::new(&pki, "client");
    for attempt in 0..3 {
        let opened = client.open(t, addr, "default").await.unwrap();
        assert_eq!(opened.status, 200);
        assert_eq!(
            opened.handshake,
            HandshakeKind::Full,
            "connection {attempt} resumed a session"
        );
    }
    // Nothing to resume with: the server never handed out a ticket.
    assert_eq!(client.tickets(), 0, "the server issued session tickets");
}

/// Before the change: the client is let in once (keeping whatever session state the server
/// gives it), then the server stops. Returns the PKI, the upstream, the address to restart on,
/// and the client.
async fn served_once_then_stopped(t: Transport) -> (Pki, Upstream, SocketAddr, Resumer) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let mut server = server_allowing(&pki, 0, &upstream, "uri:spiffe://amb/client");
    let addr = server.server_addr();
    let client = Resumer::new(&pki, "client");
    assert_eq!(client.open(t, addr, "default").await.unwrap().status, 200);
    server.signal("TERM");
    server.wait_exit(READY);
    (pki, upstream, addr, client)
}

async fn removed_identity_is_refused_despite_earlier_sessions(t: Transport) {
    let (pki, upstream, addr, client) = served_once_then_stopped(t).await;
    // The operator takes the client off the allow-list; same certificates, same port.
    let server = server_allowing(&pki, addr.port(), &upstream, "uri:spiffe://amb/other");
    server.server_addr();
    let opened = client.open(t, addr, "default").await.unwrap();
    assert_eq!(opened.handshake, HandshakeKind::Full);
    assert_eq!(opened.status, 403, "a removed identity opened a stream");
    server
        .log
        .wait_for(&["stream refused", "not authorized", "spiffe://amb/client"]);
    assert_eq!(upstream.accepted(), 1, "only the stream before the change");
}

async fn changed_ca_rejects_the_old_client_despite_earlier_sessions(t: Transport) {
    let (pki, upstream, addr, client) = served_once_then_stopped(t).await;
    // The operator moves clients to a new CA: the server keeps its certificate (so the old
    // client still trusts it and only the server can turn it away) but trusts only the new CA.
    let new = Pki::new();
    let up = upstream.addr.to_string();
    let (cert, key, ca) = (
        pki.path("server.pem"),
        pki.path("server.key"),
        new.path("ca.pem"),
    );
    let args = [
        "server",
        "--listen",
        &addr.to_string(),
        "--upstream",
        &up,
        "--allow",
        "uri:spiffe://amb/client",
        "--cert",
        cert.to_str().unwrap(),
        "--key",
        key.to_str().unwrap(),
        "--ca",
        ca.to_str().unwrap(),
    ];
    let server = Amb::spawn(&args.map(String::from));
    server.server_addr();
    client
        .assert_turned_away(t, addr, &server, &upstream, 1)
        .await;
}
