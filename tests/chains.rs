//! Client certificate chains: intermediates within the allowed depth work; a chain deeper than
//! allowed, and a mesh of cross-signed intermediates built to make path building explode, are
//! rejected with a log line, at a bounded CPU cost, while the server keeps serving.

mod support;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use support::*;

per_transport!(
    client_chain_through_two_intermediates_is_accepted,
    client_chain_deeper_than_allowed_is_rejected,
);

fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

fn key() -> KeyPair {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap()
}

/// A second trusted root, with its issuer handle; the server trusts it beside the test CA.
fn trusted_root(pki: &Pki) -> Issuer<'static, KeyPair> {
    let (params, key) = (ca_params("amb chain-test root"), key());
    let root = params.self_signed(&key).unwrap();
    let bundle = format!("{}{}", pki.ca.cert_pem, root.pem());
    std::fs::write(pki.path("ca.pem"), bundle).unwrap();
    Issuer::new(params, key)
}

/// Writes `<name>.pem` (the client leaf, then `intermediates` leaf-side first) and `<name>.key`.
fn write_client_chain(
    pki: &Pki,
    name: &str,
    issuer: &Issuer<'_, impl rcgen::SigningKey>,
    intermediates: &[String],
) {
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, "client");
    params.subject_alt_names = vec![
        SanType::DnsName("client".try_into().unwrap()),
        SanType::URI("spiffe://amb/client".try_into().unwrap()),
    ];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let key = key();
    let leaf = params.signed_by(&key, issuer).unwrap();
    let chain: String = std::iter::once(leaf.pem())
        .chain(intermediates.iter().cloned())
        .collect();
    pki.write_leaf(
        name,
        &amb_pki::IssuedLeaf {
            cert_pem: chain,
            key_pem: key.serialize_pem(),
        },
    );
}

/// A straight chain root → `depth` intermediates → client leaf.
fn chain_of_depth(pki: &Pki, name: &str, depth: usize) {
    let mut issuer = trusted_root(pki);
    let mut intermediates = Vec::new();
    for level in 1..=depth {
        let (params, key) = (ca_params(&format!("intermediate {level}")), key());
        intermediates.insert(0, params.signed_by(&key, &issuer).unwrap().pem());
        issuer = Issuer::new(params, key);
    }
    write_client_chain(pki, name, &issuer, &intermediates);
}

async fn client_chain_through_two_intermediates_is_accepted(t: Transport) {
    let pki = Pki::new();
    chain_of_depth(&pki, "chained", 2);
    let upstream = Upstream::echo().await;
    let server = Amb::server(&pki, 0, &["--upstream", &upstream.addr.to_string()]);
    let client = Amb::client(&pki, "chained", server.server_addr(), t, &[]);
    client.wait_tunnel_up();
    assert!(echo_works(client.listen_addr()).await);
}

async fn client_chain_deeper_than_allowed_is_rejected(t: Transport) {
    let pki = Pki::new();
    // webpki builds no path through more than six intermediates; amb refuses a longer chain
    // before path building starts.
    chain_of_depth(&pki, "deep", 8);
    let upstream = Upstream::echo().await;
    let server = Amb::server(&pki, 0, &["--upstream", &upstream.addr.to_string()]);
    let addr = server.server_addr();
    let deep = Amb::client(&pki, "deep", addr, t, &[]);
    server.log.wait_for(&[
        "handshake failed",
        t.flag(),
        "8 intermediate certificates; at most 6",
    ]);
    deep.log.wait_for(&["tunnel connect failed"]);
    // Others are still served.
    let client = Amb::client(&pki, "client", addr, t, &[]);
    client.wait_tunnel_up();
    assert!(echo_works(client.listen_addr()).await);
    assert_eq!(
        upstream.accepted(),
        1,
        "only the good client's stream was dialed"
    );
}

/// Writes a client chain through `layers` names with `per_layer` certificates each, every one
/// cross-signed by the next layer's key. Every candidate issuer verifies (so loop detection,
/// which compares name and key, prunes nothing), and a path builder without a budget would try
/// `per_layer^layers` paths. The top layer chains to nothing trusted.
fn write_mesh(pki: &Pki, name: &str, layers: usize, per_layer: u64) {
    let names: Vec<(CertificateParams, KeyPair)> = (0..=layers)
        .map(|layer| (ca_params(&format!("amb mesh layer {layer}")), key()))
        .collect();
    let mut mesh = Vec::new();
    for pair in names.windows(2) {
        let ((params, key), (above_params, above_key)) = (&pair[0], &pair[1]);
        let above = Issuer::from_params(above_params, above_key);
        for serial in 1..=per_layer {
            let mut params = params.clone();
            params.serial_number = Some(rcgen::SerialNumber::from(serial));
            mesh.push(params.signed_by(key, &above).unwrap().pem());
        }
    }
    let (bottom_params, bottom_key) = &names[0];
    write_client_chain(
        pki,
        name,
        &Issuer::from_params(bottom_params, bottom_key),
        &mesh,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_signed_intermediate_meshes_are_rejected_at_bounded_cpu() {
    let pki = Pki::new();
    trusted_root(&pki);
    // 6 layers of 8: 48 intermediates, 8^6 paths. Uncapped, webpki spent 3.6 CPU seconds on
    // each such handshake before giving up at its path-building budget.
    write_mesh(&pki, "big-mesh", 6, 8);
    // 3 layers of 2: exactly the cap of six intermediates, so it reaches path building.
    write_mesh(&pki, "capped-mesh", 3, 2);

    let upstream = Upstream::echo().await;
    let server = Amb::server(
        &pki,
        0,
        &[
            "--upstream",
            &upstream.addr.to_string(),
            "--transport",
            "tls",
            "--metrics",
            "127.0.0.1:0",
        ],
    );
    let addr = server.server_addr();
    let metrics = metrics_addr(&server);
    const ATTEMPTS: usize = 20;
    for (mesh, reason, kind) in [
        (
            "big-mesh",
            "48 intermediate certificates; at most 6",
            "bad_certificate",
        ),
        ("capped-mesh", "UnknownIssuer", "unknown_ca"),
    ] {
        let cpu_before = cpu_seconds(server.child.id());
        for _ in 0..ATTEMPTS {
            assert!(raw::tls_rejected(&pki, mesh, addr).await, "{mesh} got in");
        }
        // One line a second per kind says why; the metrics count each.
        server.log.wait_for(&["handshake failed", "tls", reason]);
        let failures = format!(
            r#"amb_handshake_failures_total{{direction="accepted",transport="tls",reason="{kind}"}}"#
        );
        wait_sample(metrics, &failures, ATTEMPTS as f64).await;
        let cpu = cpu_seconds(server.child.id()) - cpu_before;
        eprintln!("{ATTEMPTS} {mesh} handshakes cost the server {cpu:.2} CPU seconds");
        assert!(
            cpu < 2.0,
            "{ATTEMPTS} {mesh} handshakes cost {cpu:.2} CPU seconds"
        );
    }
    assert!(
        !raw::tls_rejected(&pki, "client", addr).await,
        "a good client after the meshes"
    );
    assert_eq!(upstream.accepted(), 0);
}
