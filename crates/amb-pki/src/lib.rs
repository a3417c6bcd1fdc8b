//! Certificates for amb: loading PEM files safely, building TLS 1.3-only rustls configurations
//! whose verifiers are strict about chains, validity and extended key usage, reading a peer's
//! typed identity, and issuing a development CA and leaves with rcgen.

mod check;
mod config;
mod error;
mod files;
mod identity;
mod issue;
mod reverse;
mod upstream;
mod verify;

pub use check::{
    check_files, describe_certificate, expiries, Expiry, Finding, Severity, EXPIRY_WARNING_DAYS,
};
pub use config::{client_config, server_config, FilesContents, FilesStamp, TlsFiles};
pub use error::PkiError;
pub use files::{load_certs, load_key, read_secret};
pub use identity::peer_identity;
pub use issue::{
    init_dev_pki, issue_leaf_in_dir, CertAuthority, InitOptions, IssuedLeaf, LeafRole, LeafSpec,
};
pub use reverse::{reverse_accept_config, reverse_dial_config};
pub use upstream::ServiceTlsFiles;
pub use verify::{TooManyIntermediates, MAX_INTERMEDIATES};

/// Re-exported so callers name rustls types without a direct dependency.
pub use rustls;
pub use rustls_pki_types::{CertificateDer, ServerName};
