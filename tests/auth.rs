//! Who gets in: every rejection happens at the handshake or before any upstream dial, and is
//! logged with the peer and the reason. Each case runs over QUIC and over TLS.

mod support;

use std::sync::Arc;
use std::time::Duration;

use amb_pki::{CertAuthority, LeafRole, LeafSpec};
use support::*;
use time::OffsetDateTime;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

per_transport!(
    client_cert_from_another_ca_is_rejected,
    server_auth_only_cert_as_client_is_rejected,
    client_cert_without_any_eku_is_rejected,
    expired_client_cert_is_rejected,
    client_without_certificate_is_rejected,
    client_refuses_server_with_wrong_name,
    listen_port_binds_loopback_only,
    ca_certificate_presented_as_leaf_is_rejected,
    self_signed_client_cert_is_rejected,
    not_yet_valid_client_cert_is_rejected,
    san_type_confusion_is_not_authorized,
    san_wildcard_case_and_trailing_dot_tricks_are_not_authorized,
);

async fn ca_certificate_presented_as_leaf_is_rejected(t: Transport) {
    let pki = Pki::new();
    // The CA's own certificate and key, presented as a client identity.
    std::fs::copy(pki.path("ca.pem"), pki.path("ca-as-leaf.pem")).unwrap();
    let key = pki.ca.key_pem();
    pki.write_leaf(
        "ca-as-leaf",
        &amb_pki::IssuedLeaf {
            cert_pem: pki.ca.cert_pem.clone(),
            key_pem: key,
        },
    );
    expect_rejected(t, &pki, "ca-as-leaf", "CaUsedAsEndEntity").await;
}

async fn self_signed_client_cert_is_rejected(t: Transport) {
    let pki = Pki::new();
    // A leaf (not a CA) that signs itself, with the right SANs and EKU.
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(vec!["client".to_string()]).unwrap();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let cert = params.self_signed(&key).unwrap();
    pki.write_leaf(
        "self-signed",
        &amb_pki::IssuedLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        },
    );
    expect_rejected(t, &pki, "self-signed", "UnknownIssuer").await;
}

async fn not_yet_valid_client_cert_is_rejected(t: Transport) {
    let pki = Pki::new();
    let mut spec = LeafSpec::client("client", 30);
    spec.not_before = OffsetDateTime::now_utc() + time::Duration::days(1);
    pki.write_leaf("future", &pki.ca.issue(&spec).unwrap());
    expect_rejected(t, &pki, "future", "not valid yet").await;
}

/// A client whose certificate carries exactly `sans` is refused by a server that allows only
/// `allow`: the handshake succeeds (the CA signed it), the stream is refused with 403.
async fn expect_forbidden(t: Transport, sans: Vec<amb_proto::San>, allow: &str) {
    let pki = Pki::new();
    let mut spec = LeafSpec::client("client", 30);
    spec.sans = sans;
    pki.write_leaf("tricky", &pki.ca.issue(&spec).unwrap());
    let upstream = Upstream::echo().await;
    let server = Amb::server(
        &pki,
        0,
        &["--upstream", &upstream.addr.to_string(), "--allow", allow],
    );
    let client = Amb::client(&pki, "tricky", server.server_addr(), t, &[]);
    client.wait_tunnel_up();
    assert_reset_after_write(client.listen_addr(), b"hi").await;
    server
        .log
        .wait_for(&["stream refused: peer not authorized"]);
    assert_eq!(upstream.accepted(), 0);
}

async fn san_type_confusion_is_not_authorized(t: Transport) {
    // The allowed URI, carried as a DNS SAN.
    let sans = vec![amb_proto::San::Dns("spiffe://amb/client".into())];
    expect_forbidden(t, sans, "uri:spiffe://amb/client").await;
}

async fn san_wildcard_case_and_trailing_dot_tricks_are_not_authorized(t: Transport) {
    use amb_proto::San;
    // A wildcard SAN does not stand for the allowed name; nor does a trailing dot; nor does a
    // URI differing only in case.
    expect_forbidden(t, vec![San::Dns("*.example".into())], "dns:client.example").await;
    expect_forbidden(
        t,
        vec![San::Dns("client.example.".into())],
        "dns:client.example",
    )
    .await;
    expect_forbidden(
        t,
        vec![San::Uri("spiffe://amb/Client".into())],
        "uri:spiffe://amb/client",
    )
    .await;
}

/// Runs `amb client` with the leaf `name` against a server for an echo upstream, expects the
/// server to log a handshake failure containing `reason`, the app connection to be reset, and
/// no upstream dial.
async fn expect_rejected(t: Transport, pki: &Pki, name: &str, reason: &str) {
    let upstream = Upstream::echo().await;
    let server = Amb::server(pki, 0, &["--upstream", &upstream.addr.to_string()]);
    let client = Amb::client(pki, name, server.server_addr(), t, &["--tunnel-wait", "1s"]);
    server
        .log
        .wait_for(&["handshake failed", reason, "127.0.0.1"]);
    client.log.wait_for(&["tunnel connect failed"]);
    assert_reset_after_write(client.listen_addr(), b"let me in").await;
    client.log.wait_for(&[
        "no tunnel connection within",
        "resetting the app connection",
    ]);
    assert_eq!(
        upstream.accepted(),
        0,
        "a rejected client must cause no upstream dial"
    );
}

async fn client_cert_from_another_ca_is_rejected(t: Transport) {
    let pki = Pki::new();
    let other = CertAuthority::generate("some other CA").unwrap();
    pki.write_leaf(
        "stranger",
        &other.issue(&LeafSpec::client("client", 30)).unwrap(),
    );
    expect_rejected(t, &pki, "stranger", "UnknownIssuer").await;
}

async fn server_auth_only_cert_as_client_is_rejected(t: Transport) {
    let pki = Pki::new();
    pki.write_leaf(
        "server-as-client",
        &pki.ca
            .issue(&LeafSpec::server(&["client".into()], 30))
            .unwrap(),
    );
    expect_rejected(t, &pki, "server-as-client", "extended key usage").await;
}

async fn client_cert_without_any_eku_is_rejected(t: Transport) {
    let pki = Pki::new();
    let mut spec = LeafSpec::client("client", 30);
    spec.usages.clear();
    pki.write_leaf("no-eku", &pki.ca.issue(&spec).unwrap());
    expect_rejected(t, &pki, "no-eku", "purpose").await;
}

async fn expired_client_cert_is_rejected(t: Transport) {
    let pki = Pki::new();
    let mut spec = LeafSpec::client("client", 30);
    spec.not_before = OffsetDateTime::now_utc() - time::Duration::days(10);
    spec.not_after = OffsetDateTime::now_utc() - time::Duration::days(1);
    pki.write_leaf("expired", &pki.ca.issue(&spec).unwrap());
    expect_rejected(t, &pki, "expired", "Expired").await;
}

async fn client_without_certificate_is_rejected(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let server = Amb::server(&pki, 0, &["--upstream", &upstream.addr.to_string()]);
    let addr = server.server_addr();
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        for ca in amb_pki::load_certs(&pki.path("ca.pem")).unwrap() {
            roots.add(ca).unwrap();
        }
        Arc::new(roots)
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    match t {
        Transport::Tls => {
            config.alpn_protocols = vec![b"h2".to_vec()];
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
            // TLS 1.3: the client may finish first; the rejection arrives on the next read.
            if let Ok(mut tls) = connector.connect(name, tcp).await {
                let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
                let mut buf = [0u8; 64];
                let read = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await;
                assert!(
                    !matches!(read, Ok(n) if n > 0),
                    "server answered a client without a certificate"
                );
            }
        }
        Transport::Quic => {
            config.alpn_protocols = vec![b"amb/1".to_vec()];
            let crypto =
                quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(config)).unwrap();
            let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
            endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
            let connecting = endpoint.connect(addr, "localhost").unwrap();
            if let Ok(Ok(conn)) = tokio::time::timeout(READY, connecting).await {
                // Rejected after the client's flight: the stream never gets an answer.
                let opened = async {
                    let (mut send, mut recv) = conn.open_bi().await?;
                    send.write_all(&[1, 7]).await?;
                    send.write_all(b"default").await?;
                    let mut status = [0u8; 1];
                    recv.read_exact(&mut status)
                        .await
                        .map_err(|e| anyhow_like(e.to_string()))?;
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(status)
                };
                let answer = tokio::time::timeout(READY, opened)
                    .await
                    .expect("no verdict in time");
                assert!(
                    answer.is_err(),
                    "server opened a stream for a client without a certificate"
                );
            }
        }
    }
    server.log.wait_for(&["handshake failed", "127.0.0.1"]);
    assert!(
        server.log.text().to_lowercase().contains("certificate"),
        "the log names the missing certificate:\n{}",
        server.log.text()
    );
    assert_eq!(upstream.accepted(), 0);
}

fn anyhow_like(msg: String) -> Box<dyn std::error::Error + Send + Sync> {
    msg.into()
}

async fn client_refuses_server_with_wrong_name(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let server = Amb::server(&pki, 0, &["--upstream", &upstream.addr.to_string()]);
    let client = Amb::client(
        &pki,
        "client",
        server.server_addr(),
        t,
        &[
            "--server-name",
            "not-the-server.example",
            "--tunnel-wait",
            "1s",
        ],
    );
    client.log.wait_for(&[
        "tunnel connect failed",
        "not valid for name",
        "not-the-server.example",
    ]);
    assert_reset_after_write(client.listen_addr(), b"hello?").await;
    assert_eq!(upstream.accepted(), 0);
}

async fn listen_port_binds_loopback_only(t: Transport) {
    let pki = Pki::new();
    let upstream = Upstream::echo().await;
    let server = Amb::server(&pki, 0, &["--upstream", &upstream.addr.to_string()]);
    let port = free_port();
    let client = Amb::client(&pki, "client", server.server_addr(), t, &[]);
    drop(client);
    // `--listen PORT` alone: the listener is 127.0.0.1 and nothing else, so another address of
    // this host (127.0.0.2 here, or any interface address) is refused.
    let mut args: Vec<String> = [
        "client",
        "--listen",
        &port.to_string(),
        "--transport",
        t.flag(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--peer".into(),
        format!("localhost:{}", server.server_addr().port()),
    ]);
    args.extend(pki.cert_flags("client"));
    let client = Amb::spawn(&args);
    let addr = client.listen_addr();
    assert_eq!(addr, std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    client.wait_tunnel_up();
    assert!(echo_works(addr).await);
    let other = std::net::SocketAddr::from(([127, 0, 0, 2], port));
    let refused = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(other)).await;
    assert!(
        matches!(refused, Ok(Err(_))),
        "listener reachable on {other}: {refused:?}"
    );
    // The registry of what is bound agrees: only 127.0.0.1:PORT.
    let ss = std::process::Command::new("ss")
        .args(["-Htln", &format!("sport = :{port}")])
        .output();
    if let Ok(out) = ss {
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.lines() {
            assert!(
                line.contains(&format!("127.0.0.1:{port}")),
                "unexpected listener: {line}"
            );
        }
    }
    let _ = LeafRole::Client;
}
