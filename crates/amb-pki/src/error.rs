use std::path::PathBuf;

/// Everything that can go wrong loading or issuing certificates. Messages name the file and
/// say what to do.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// A certificate or key file is absent.
    #[error("{path}: file not found; run `amb certs init` or pass --cert/--key/--ca")]
    Missing {
        /// The file looked for.
        path: PathBuf,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file is not the PEM it should be.
    #[error("{path}: {what}")]
    BadPem {
        /// The file.
        path: PathBuf,
        /// What was expected or wrong.
        what: String,
    },
    /// A secret (password) file can be read by group or others.
    #[error(
        "{path}: secret is readable by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    SecretPermissions {
        /// The secret file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A private key file can be read by group or others.
    #[error(
        "{path}: private key is readable by group or others (mode {mode:o}); run `chmod 600 {path}` \
         (a key read through its group must be owned by root, mode 640 or 440)"
    )]
    KeyPermissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// A file exists and would be overwritten.
    #[error("{path}: already exists; pass --force to overwrite it")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// rustls refused the configuration (key does not match certificate, no usable CA...).
    #[error("TLS configuration from {files}: {source}")]
    Tls {
        /// The files the configuration came from.
        files: String,
        /// What rustls said.
        source: rustls::Error,
    },
    /// The trust anchors could not be used.
    #[error("{path}: no usable CA certificate: {why}")]
    Trust {
        /// The CA file.
        path: PathBuf,
        /// Why.
        why: String,
    },
    /// rcgen could not issue a certificate.
    #[error("issuing {what}: {source}")]
    Issue {
        /// What was being issued.
        what: String,
        /// What rcgen said.
        source: rcgen::Error,
    },
    /// A name given for a certificate is unusable.
    #[error("{0}")]
    BadName(String),
}

impl PkiError {
    pub(crate) fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        if source.kind() == std::io::ErrorKind::NotFound {
            PkiError::Missing {
                path: path.to_owned(),
            }
        } else {
            PkiError::Io {
                path: path.to_owned(),
                source,
            }
        }
    }
}
