//! TLS toward a service that speaks it itself (a Redis on `--tls-port`, a managed database):
//! the service's certificate verified as strictly as a peer's, a client certificate presented
//! when one is given. Unlike the tunnel, no ALPN is offered and TLS 1.2 is accepted beside 1.3
//! (with rustls's forward-secret AEAD suites only), since the service is not amb.

use std::path::PathBuf;
use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::aws_lc_rs;
use rustls::{ClientConfig, RootCertStore};

use crate::files::read;
use crate::verify::StrictServerVerifier;
use crate::{load_certs, load_key, PkiError};

/// The files TLS toward a service is made from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ServiceTlsFiles {
    /// PEM CA certificate(s) the service's certificate must chain to.
    pub ca: PathBuf,
    /// A PEM chain and its key to present, for a service that asks for a client certificate.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ServiceTlsFiles {
    /// A client configuration: the service's chain must reach `ca`, be valid now, carry the
    /// serverAuth EKU and name the server name each connection gives (exact, typed SANs).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, PkiError> {
        let mut provider = aws_lc_rs::default_provider();
        // TLS 1.3's suites first, AES-128-GCM leading, as for the tunnel.
        provider
            .cipher_suites
            .sort_by_key(|suite| suite.version().version != rustls::ProtocolVersion::TLSv1_3);
        let provider = Arc::new(provider);
        let mut roots = RootCertStore::empty();
        for ca in load_certs(&self.ca)? {
            roots.add(ca).map_err(|e| self.untrusted(e.to_string()))?;
        }
        let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .build()
            .map_err(|e| self.untrusted(e.to_string()))?;
        let tls = |source| PkiError::Tls {
            files: self.to_string(),
            source,
        };
        let builder = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(tls)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(StrictServerVerifier(webpki)));
        let config = match &self.identity {
            Some((cert, key)) => builder
                .with_client_auth_cert(load_certs(cert)?, load_key(key)?)
                .map_err(tls)?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// SHA-256 over the files' contents: equal digests mean a reload would change nothing.
    pub fn digest(&self) -> Result<[u8; 32], PkiError> {
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        let identity = self.identity.iter().flat_map(|(cert, key)| [cert, key]);
        for path in std::iter::once(&self.ca).chain(identity) {
            let bytes = read(path)?;
            // Length-prefixed, so bytes moved from one file to the next are a change.
            digest.update((bytes.len() as u64).to_le_bytes());
            digest.update(&bytes);
        }
        Ok(digest.finalize().into())
    }

    fn untrusted(&self, why: String) -> PkiError {
        PkiError::Trust {
            path: self.ca.clone(),
            why,
        }
    }
}

impl std::fmt::Display for ServiceTlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ca {}", self.ca.display())?;
        if let Some((cert, key)) = &self.identity {
            write!(f, ", cert {}, key {}", cert.display(), key.display())?;
        }
        Ok(())
    }
}
