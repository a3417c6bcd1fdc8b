//! Verifiers that add one rule to webpki's: the end-entity certificate must *carry* the
//! extended key usage for its role. webpki accepts a leaf with no EKU extension at all; amb does
//! not, so a certificate minted for something else cannot stand in for a client or server. And
//! a peer may present at most [`MAX_INTERMEDIATES`] intermediates: path building over a pile of
//! cross-signed ones costs seconds of CPU per handshake, before the peer is authenticated.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

/// Most intermediate certificates a peer may present. webpki accepts no path with more than six,
/// so more can only be padding, and bounding them bounds the paths a chain search may try.
pub const MAX_INTERMEDIATES: usize = 6;

/// A peer presented more intermediates than any acceptable path could use.
#[derive(thiserror::Error)]
#[error(
    "the peer presented {0} intermediate certificates; at most {MAX_INTERMEDIATES} are accepted"
)]
pub struct TooManyIntermediates(pub usize);

impl std::fmt::Debug for TooManyIntermediates {
    // rustls prints a certificate error's cause with Debug: make that the message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

pub(crate) fn bound_intermediates(intermediates: &[CertificateDer<'_>]) -> Result<(), Error> {
    if intermediates.len() > MAX_INTERMEDIATES {
        let cause = TooManyIntermediates(intermediates.len());
        return Err(Error::InvalidCertificate(CertificateError::Other(
            OtherError(Arc::new(cause)),
        )));
    }
    Ok(())
}

/// Which extended key usage a leaf must list.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Eku {
    ServerAuth,
    ClientAuth,
}

pub(crate) fn require_eku(cert: &CertificateDer<'_>, eku: Eku) -> Result<(), Error> {
    let bad = || Error::InvalidCertificate(CertificateError::InvalidPurpose);
    let (_, parsed) = x509_parser::parse_x509_certificate(cert)
        .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let ext = parsed
        .extended_key_usage()
        .map_err(|_| bad())?
        .ok_or_else(bad)?;
    let listed = match eku {
        Eku::ServerAuth => ext.value.server_auth,
        Eku::ClientAuth => ext.value.client_auth,
    };
    if listed {
        Ok(())
    } else {
        Err(bad())
    }
}

/// The handshake-signature methods both verifiers pass straight to the webpki verifier they wrap.
macro_rules! delegate_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls12_signature(message, cert, dss)
        }
        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, Error> {
            self.0.verify_tls13_signature(message, cert, dss)
        }
        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.supported_verify_schemes()
        }
    };
}
pub(crate) use delegate_signature_checks;

/// Client-certificate verifier: webpki chain and validity checks, plus a mandatory clientAuth EKU.
#[derive(Debug)]
pub(crate) struct StrictClientVerifier(pub(crate) Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for StrictClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        true
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        bound_intermediates(intermediates)?;
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        require_eku(end_entity, Eku::ClientAuth)?;
        Ok(verified)
    }
    delegate_signature_checks!();
}

/// Server-certificate verifier: webpki chain, validity and name checks, plus a mandatory
/// serverAuth EKU.
#[derive(Debug)]
pub(crate) struct StrictServerVerifier(pub(crate) Arc<dyn ServerCertVerifier>);

impl ServerCertVerifier for StrictServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        bound_intermediates(intermediates)?;
        let verified = self.0.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        require_eku(end_entity, Eku::ServerAuth)?;
        Ok(verified)
    }
    delegate_signature_checks!();
}
