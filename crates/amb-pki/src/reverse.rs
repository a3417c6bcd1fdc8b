//! Configurations for reverse tunnels, where the service side dials the app side: identities
//! follow the role, not the dial direction. The service side presents its server certificate
//! as a TLS client and checks the app side's client certificate (clientAuth EKU); the app side
//! presents its client certificate as a TLS server and checks the dialer's server certificate
//! (serverAuth EKU). Names are checked by the engine's allow-lists, not by a host name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::ParsedCertificate;
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::config::{client_config_with, provider, server_config_with, webpki_client_verifier};
use crate::verify::{
    bound_intermediates, delegate_signature_checks, require_eku, Eku, StrictClientVerifier,
};
use crate::{PkiError, TlsFiles};

/// The service side's configuration: dials the app side presenting `files.cert` (a server
/// certificate), demands a certificate chaining to `files.ca` with the clientAuth EKU, and
/// offers exactly `alpn`.
pub fn reverse_dial_config(files: &TlsFiles, alpn: &[u8]) -> Result<Arc<ClientConfig>, PkiError> {
    let provider = provider();
    let verifier = AppSideVerifier(StrictClientVerifier(webpki_client_verifier(
        files, &provider,
    )?));
    client_config_with(files, vec![alpn.to_vec()], Arc::new(verifier), provider)
}

/// The app side's configuration: accepts service-side ambassadors presenting `files.cert` (a
/// client certificate), demands a certificate chaining to `files.ca` with the serverAuth EKU,
/// and offers exactly `alpn`.
pub fn reverse_accept_config(files: &TlsFiles, alpn: &[u8]) -> Result<Arc<ServerConfig>, PkiError> {
    let provider = provider();
    let verifier = ServiceSideVerifier {
        roots: files.roots()?,
        algorithms: provider.signature_verification_algorithms,
    };
    server_config_with(files, vec![alpn.to_vec()], Arc::new(verifier), provider)
}

/// The service side's check of the app side it dialed: as a server checks its clients (chain,
/// validity, clientAuth EKU), whatever name was dialed.
#[derive(Debug)]
struct AppSideVerifier(StrictClientVerifier);

impl ServerCertVerifier for AppSideVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.0
            .verify_client_cert(end_entity, intermediates, now)
            .map(|_| ServerCertVerified::assertion())
    }
    delegate_signature_checks!();
}

/// The app side's check of a service-side ambassador that dialed it: as a client checks its
/// server (chain, validity, serverAuth EKU); its identity is then held against the app side's
/// allow-list.
#[derive(Debug)]
struct ServiceSideVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for ServiceSideVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        bound_intermediates(intermediates)?;
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        require_eku(end_entity, Eku::ServerAuth)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}
