//! rustls configurations: TLS 1.3 only, aws-lc-rs with AES-128-GCM first, mutual
//! authentication always, no session resumption (so a trust change takes effect at once).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::{NoServerSessionStorage, WebPkiClientVerifier};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::CertificateDer;

use crate::files::{parse_certs, read};
use crate::verify::{StrictClientVerifier, StrictServerVerifier};
use crate::{load_certs, load_key, PkiError};

/// The three files one side of the tunnel needs: its chain, its key, and the CA it trusts.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    /// PEM chain presented to the peer, leaf first.
    pub cert: PathBuf,
    /// PEM private key of the leaf; must not be group- or world-accessible.
    pub key: PathBuf,
    /// PEM CA certificate(s) the peer must chain to.
    pub ca: PathBuf,
}

impl TlsFiles {
    /// The well-known names in a certs directory: `<role>.pem`, `<role>.key`, `ca.pem`.
    pub fn in_dir(dir: &Path, role: &str) -> Self {
        TlsFiles {
            cert: dir.join(format!("{role}.pem")),
            key: dir.join(format!("{role}.key")),
            ca: dir.join("ca.pem"),
        }
    }

    /// What the three files look like on disk (size, modification and change times and inode
    /// of each, symlinks followed, so a swapped Kubernetes secret and a `chmod` count), to
    /// notice a change without reading them.
    pub fn stamp(&self) -> FilesStamp {
        use std::os::unix::fs::MetadataExt;
        FilesStamp([&self.cert, &self.key, &self.ca].map(|path| {
            let m = std::fs::metadata(path).ok()?;
            Some(FileStamp {
                len: m.len(),
                modified: m.modified().ok(),
                changed: (m.ctime(), m.ctime_nsec()),
                inode: (m.dev(), m.ino()),
            })
        }))
    }

    /// What the three files hold, each read once: a digest of the chain and the key, and the
    /// CA certificates. Equal contents mean a reload would change nothing; a CA file rewritten
    /// with the same certificates (other comments around them) counts as equal.
    pub fn contents(&self) -> Result<FilesContents, PkiError> {
        use sha2::{Digest, Sha256};
        let mut chain_and_key = Sha256::new();
        for path in [&self.cert, &self.key] {
            let bytes = read(path)?;
            // Length-prefixed, so bytes moved from one file to the other are a change.
            chain_and_key.update((bytes.len() as u64).to_le_bytes());
            chain_and_key.update(&bytes);
        }
        Ok(FilesContents {
            chain_and_key: chain_and_key.finalize().into(),
            ca: parse_certs(&read(&self.ca)?, &self.ca)?,
        })
    }

    pub(crate) fn roots(&self) -> Result<Arc<RootCertStore>, PkiError> {
        let mut roots = RootCertStore::empty();
        for ca in load_certs(&self.ca)? {
            roots.add(ca).map_err(|e| PkiError::Trust {
                path: self.ca.clone(),
                why: e.to_string(),
            })?;
        }
        Ok(Arc::new(roots))
    }
}

impl std::fmt::Display for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}, {}, {}",
            self.cert.display(),
            self.key.display(),
            self.ca.display()
        )
    }
}

/// A [`TlsFiles::stamp`]: equal stamps mean the files were, in all likelihood, not changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilesStamp([Option<FileStamp>; 3]);

/// A [`TlsFiles::contents`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilesContents {
    /// SHA-256 over the chain and key files (no copy of the key is kept).
    chain_and_key: [u8; 32],
    /// The CA certificates.
    pub ca: Vec<CertificateDer<'static>>,
}

/// One file's size, modification time, change time (a `chmod` or `chown` moves it) and inode.
#[derive(Clone, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    modified: Option<std::time::SystemTime>,
    changed: (i64, i64),
    inode: (u64, u64),
}

/// aws-lc-rs, TLS 1.3 suites only, AES-128-GCM first (fastest with AES-NI).
pub(crate) fn provider() -> Arc<CryptoProvider> {
    let mut provider = aws_lc_rs::default_provider();
    provider.cipher_suites = vec![
        aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256,
        aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384,
        aws_lc_rs::cipher_suite::TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

/// A server configuration that demands a client certificate chaining to `files.ca` with the
/// clientAuth EKU, and offers exactly `alpn`.
pub fn server_config(files: &TlsFiles, alpn: &[u8]) -> Result<Arc<ServerConfig>, PkiError> {
    let provider = provider();
    let verifier = StrictClientVerifier(webpki_client_verifier(files, &provider)?);
    server_config_with(
        files,
        amb_proto::alpn_offers(alpn),
        Arc::new(verifier),
        provider,
    )
}

/// A client configuration that presents `files.cert`, demands a server certificate chaining to
/// `files.ca` with the serverAuth EKU, and offers exactly `alpn`.
pub fn client_config(files: &TlsFiles, alpn: &[u8]) -> Result<Arc<ClientConfig>, PkiError> {
    let provider = provider();
    let webpki = WebPkiServerVerifier::builder_with_provider(files.roots()?, provider.clone())
        .build()
        .map_err(|e| PkiError::Trust {
            path: files.ca.clone(),
            why: e.to_string(),
        })?;
    let verifier = Arc::new(StrictServerVerifier(webpki));
    client_config_with(files, amb_proto::alpn_offers(alpn), verifier, provider)
}

/// webpki's check of a client certificate against `files.ca` (chain, validity, clientAuth).
pub(crate) fn webpki_client_verifier(
    files: &TlsFiles,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
    WebPkiClientVerifier::builder_with_provider(files.roots()?, provider.clone())
        .build()
        .map_err(|e| PkiError::Trust {
            path: files.ca.clone(),
            why: e.to_string(),
        })
}

/// A server configuration of amb's: TLS 1.3 only, the peer checked by `verifier` (mandatory),
/// `files.cert` presented, `alpns` offered, no session resumption or early data.
pub(crate) fn server_config_with(
    files: &TlsFiles,
    alpns: Vec<Vec<u8>>,
    verifier: Arc<dyn ClientCertVerifier>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ServerConfig>, PkiError> {
    let tls = |source| PkiError::Tls {
        files: files.to_string(),
        source,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(tls)?;
    config.alpn_protocols = alpns;
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    config.max_early_data_size = 0;
    Ok(Arc::new(config))
}

/// A client configuration of amb's: TLS 1.3 only, the peer checked by `verifier`,
/// `files.cert` presented, `alpns` offered, no session resumption or early data.
pub(crate) fn client_config_with(
    files: &TlsFiles,
    alpns: Vec<Vec<u8>>,
    verifier: Arc<dyn ServerCertVerifier>,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<ClientConfig>, PkiError> {
    let tls = |source| PkiError::Tls {
        files: files.to_string(),
        source,
    };
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(load_certs(&files.cert)?, load_key(&files.key)?)
        .map_err(tls)?;
    config.alpn_protocols = alpns;
    config.resumption = Resumption::disabled();
    config.enable_early_data = false;
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_stamp_moves_with_the_bytes_the_mode_and_a_swapped_file() {
        let dir = std::env::temp_dir().join(format!("amb-pki-stamp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = TlsFiles::in_dir(&dir, "server");
        for path in [&files.cert, &files.key, &files.ca] {
            std::fs::write(path, "x").unwrap();
        }
        let first = files.stamp();
        assert_eq!(files.stamp(), first, "nothing changed");
        // The fix a failed load asks for: the same bytes, another mode.
        std::fs::set_permissions(&files.key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let chmodded = files.stamp();
        assert_ne!(chmodded, first);
        // A new file renamed over the old one, same size, as deployment tools write.
        let staged = dir.join("ca.pem.new");
        std::fs::write(&staged, "y").unwrap();
        std::fs::rename(&staged, &files.ca).unwrap();
        assert_ne!(files.stamp(), chmodded);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
