//! Reading certificate chains and private keys from PEM files.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::PkiError;

/// Reads every certificate in a PEM file; at least one must be there.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    parse_certs(&read(path)?, path)
}

/// Reads a whole file, naming it if that fails.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, PkiError> {
    std::fs::read(path).map_err(|e| PkiError::io(path, e))
}

/// Every certificate in `pem`, read from `path`; at least one must be there.
pub(crate) fn parse_certs(
    pem: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::BadPem {
            path: path.to_owned(),
            what: format!("not a PEM certificate file: {e}"),
        })?;
    if certs.is_empty() {
        return Err(PkiError::BadPem {
            path: path.to_owned(),
            what: "holds no CERTIFICATE block".into(),
        });
    }
    Ok(certs)
}

/// The permission bits of a file that group or others can access; `None` if they cannot.
fn open_to_others(path: &Path) -> Result<Option<u32>, PkiError> {
    let meta = std::fs::metadata(path).map_err(|e| PkiError::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    Ok((mode & 0o077 != 0).then_some(mode))
}

/// Whether a private key with these permission bits and owner may be used by a process
/// running as `euid`: only its owner may read it, or, as PostgreSQL allows, it is owned by
/// root and only read through its group by a process that is not root (a Kubernetes Secret
/// mounted with `defaultMode: 0440` and the pod's `fsGroup`).
fn key_mode_allowed(mode: u32, owner: u32, euid: u32) -> bool {
    mode & 0o077 == 0 || (owner == 0 && euid != 0 && mode & 0o037 == 0)
}

/// The permission bits of a key that this process must not use; `None` if it may.
fn key_open_to_others(path: &Path) -> Result<Option<u32>, PkiError> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| PkiError::io(path, e))?;
    let mode = meta.permissions().mode() & 0o777;
    let euid = rustix::process::geteuid().as_raw();
    Ok((!key_mode_allowed(mode, meta.uid(), euid)).then_some(mode))
}

/// Reads a secret (a password) from its file, refusing a file that group or others can
/// access, as private keys are; one trailing newline is not part of it.
pub fn read_secret(path: &Path) -> Result<String, PkiError> {
    if let Some(mode) = open_to_others(path)? {
        return Err(PkiError::SecretPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    let bytes = read(path)?;
    let text = String::from_utf8(bytes).map_err(|_| PkiError::BadPem {
        path: path.to_owned(),
        what: "a secret file must hold UTF-8 text".into(),
    })?;
    let secret = text.strip_suffix('\n').unwrap_or(&text);
    Ok(secret.strip_suffix('\r').unwrap_or(secret).to_owned())
}

/// Reads a private key, refusing a file that group or others can access (but see
/// [`key_mode_allowed`]).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, PkiError> {
    if let Some(mode) = key_open_to_others(path)? {
        return Err(PkiError::KeyPermissions {
            path: path.to_owned(),
            mode,
        });
    }
    PrivateKeyDer::from_pem_slice(&read(path)?).map_err(|e| PkiError::BadPem {
        path: path.to_owned(),
        what: format!("holds no usable private key: {e}"),
    })
}

/// Writes `contents` to `path`, with mode 0600 for secrets; refuses to replace a file unless
/// `force`.
pub(crate) fn write_file(
    path: &Path,
    contents: &str,
    secret: bool,
    force: bool,
) -> Result<(), PkiError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if !force && path.exists() {
        return Err(PkiError::Exists {
            path: path.to_owned(),
        });
    }
    let mode = if secret { 0o600 } else { 0o644 };
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(|e| PkiError::io(path, e))?;
    // `mode` applies only at creation; tighten an existing file too.
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|()| file.write_all(contents.as_bytes()))
        .map_err(|e| PkiError::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_readable_key_is_refused_and_missing_file_says_what_to_do() {
        let dir = std::env::temp_dir().join(format!("amb-pki-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("k.key");
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        write_file(&key, &pair.serialize_pem(), true, true).unwrap();
        assert!(load_key(&key).is_ok());
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = load_key(&key).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        let err = load_certs(&dir.join("absent.pem")).unwrap_err().to_string();
        assert!(err.contains("amb certs init"), "{err}");
        assert!(matches!(
            write_file(&key, "x", true, false),
            Err(PkiError::Exists { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_root_owned_key_may_be_read_through_its_group_by_a_process_not_root() {
        assert!(key_mode_allowed(0o600, 1000, 1000));
        assert!(key_mode_allowed(0o400, 0, 0));
        // Kubernetes: a Secret owned by root, group fsGroup, mode 0440, read by uid 10001.
        assert!(key_mode_allowed(0o440, 0, 10001));
        assert!(key_mode_allowed(0o640, 0, 10001));
        // Root itself never needs the group's permission; others never get one.
        assert!(!key_mode_allowed(0o640, 0, 0));
        assert!(!key_mode_allowed(0o644, 0, 10001));
        assert!(!key_mode_allowed(0o660, 0, 10001));
        assert!(!key_mode_allowed(0o640, 1000, 1000));
    }
}
