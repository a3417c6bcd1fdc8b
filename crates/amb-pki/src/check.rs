//! What `amb check` says of one side's certificate files: each problem a handshake would hit,
//! found without a peer. The files are loaded as amb loads them (existence, PEM, key
//! permissions, key matching its certificate), then the leaf is verified against the CA file by
//! the same strict verifier a peer runs (chain, validity, the role's EKU, names), and the
//! certificates' expiry is read.

use std::fmt;

use rustls::client::danger::ServerCertVerifier;
use rustls::client::WebPkiServerVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use crate::config::provider;
use crate::verify::{StrictClientVerifier, StrictServerVerifier};
use crate::{client_config, load_certs, server_config, LeafRole, TlsFiles};

/// A certificate with fewer days than this left is reported.
pub const EXPIRY_WARNING_DAYS: i64 = 7;

/// How bad a finding is: an error stops amb from working; a warning will, later.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    /// amb would refuse to start, or every handshake would fail.
    Error,
    /// Works now; will not for long.
    Warning,
}

/// One problem with one side's files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// How bad.
    pub severity: Severity,
    /// What is wrong, naming the file.
    pub message: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        write!(f, "{level}: {}", self.message)
    }
}

fn error(message: String) -> Finding {
    Finding {
        severity: Severity::Error,
        message,
    }
}

/// Checks the files of a side playing `role`. A server certificate is checked for each of
/// `names` (the names clients will dial), or for its own first name when none are given.
pub fn check_files(files: &TlsFiles, role: LeafRole, names: &[String]) -> Vec<Finding> {
    let built = match role {
        LeafRole::Server => server_config(files, b"h2").map(drop),
        LeafRole::Client => client_config(files, b"h2").map(drop),
    };
    if let Err(e) = built {
        return vec![error(e.to_string())];
    }
    let (chain, roots) = match (load_certs(&files.cert), files.roots()) {
        (Ok(chain), Ok(roots)) => (chain, roots),
        (Err(e), _) | (_, Err(e)) => return vec![error(e.to_string())],
    };
    let Some((leaf, intermediates)) = chain.split_first() else {
        return vec![error(format!("{}: no certificate", files.cert.display()))];
    };
    let now = UnixTime::now();
    let fails = |e: rustls::Error| {
        error(format!(
            "{} does not verify against {} as a {} certificate: {e}",
            files.cert.display(),
            files.ca.display(),
            role_name(role)
        ))
    };
    let mut findings = Vec::new();
    match role {
        LeafRole::Client => {
            let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map(StrictClientVerifier);
            match verifier {
                Ok(v) => {
                    if let Err(e) = v.verify_client_cert(leaf, intermediates, now) {
                        findings.push(fails(e));
                    }
                }
                Err(e) => findings.push(error(format!("{}: {e}", files.ca.display()))),
            }
        }
        LeafRole::Server => {
            let verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
                .build()
                .map(|v| StrictServerVerifier(v));
            let names = match names {
                [] => first_name(leaf).into_iter().collect(),
                names => names.to_vec(),
            };
            match verifier {
                Ok(v) => {
                    for name in names {
                        let Ok(server_name) = ServerName::try_from(name.clone()) else {
                            findings.push(error(format!("{name:?} is not a valid server name")));
                            continue;
                        };
                        if let Err(e) =
                            v.verify_server_cert(leaf, intermediates, &server_name, &[], now)
                        {
                            findings.push(error(format!(
                                "{} does not verify against {} as the server certificate \
                                 for {name}: {e}",
                                files.cert.display(),
                                files.ca.display(),
                            )));
                        }
                    }
                }
                Err(e) => findings.push(error(format!("{}: {e}", files.ca.display()))),
            }
        }
    }
    let ca = load_certs(&files.ca).unwrap_or_default();
    for (path, cert) in chain
        .iter()
        .take(1)
        .map(|c| (&files.cert, c))
        .chain(ca.iter().map(|c| (&files.ca, c)))
    {
        if let Some(days) = days_left(cert) {
            if (0..EXPIRY_WARNING_DAYS).contains(&days) {
                findings.push(Finding {
                    severity: Severity::Warning,
                    message: format!(
                        "{} expires in {days} day(s): renew it (a reload takes the new one)",
                        path.display()
                    ),
                });
            }
        }
    }
    findings
}

fn role_name(role: LeafRole) -> &'static str {
    match role {
        LeafRole::Server => "server",
        LeafRole::Client => "client",
    }
}

/// What a certificate says of itself, for a report: its typed SANs and its expiry, e.g.
/// `dns:big-server, uri:spiffe://amb/server; expires in 364 day(s)`.
pub fn describe_certificate(cert: &CertificateDer<'_>) -> String {
    let identity = crate::peer_identity(cert);
    let names = match identity.to_string() {
        none if none.is_empty() => "no SANs".to_owned(),
        names => names,
    };
    match days_left(cert) {
        Some(days) if days < 0 => format!("{names}; expired {} day(s) ago", -days),
        Some(days) => format!("{names}; expires in {days} day(s)"),
        None => format!("{names}; not a parsable X.509 certificate"),
    }
}

/// One certificate a side has loaded, and when it expires (for metrics).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expiry {
    /// The side's own leaf (`false`), or a CA it trusts (`true`).
    pub is_ca: bool,
    /// The subject's common name, else the whole subject.
    pub subject: String,
    /// The end of its validity.
    pub not_after: std::time::SystemTime,
}

/// The expiry of the leaf in `files.cert` and of each CA in `files.ca`; files or certificates
/// that do not parse are left out (loading them reports those).
pub fn expiries(files: &TlsFiles) -> Vec<Expiry> {
    let leaf = load_certs(&files.cert)
        .ok()
        .and_then(|c| c.into_iter().next());
    let cas = load_certs(&files.ca).unwrap_or_default();
    let leaf = leaf.into_iter().map(|cert| (false, cert));
    leaf.chain(cas.into_iter().map(|cert| (true, cert)))
        .filter_map(|(is_ca, cert)| {
            let (_, parsed) = X509Certificate::from_der(&cert).ok()?;
            let subject = parsed.subject();
            let cn = subject
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok());
            let subject = cn.map_or_else(|| subject.to_string(), str::to_owned);
            let secs = u64::try_from(parsed.validity().not_after.timestamp()).unwrap_or(0);
            let not_after = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            Some(Expiry {
                is_ca,
                subject,
                not_after,
            })
        })
        .collect()
}

/// Whole days until `cert` expires (negative once expired).
fn days_left(cert: &CertificateDer<'_>) -> Option<i64> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    let left = parsed.validity().not_after.timestamp() - UnixTime::now().as_secs() as i64;
    Some(left.div_euclid(86_400))
}

/// The certificate's first DNS or IP SAN, as a server name.
fn first_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    parsed
        .extensions()
        .iter()
        .find_map(|ext| match ext.parsed_extension() {
            ParsedExtension::SubjectAlternativeName(san) => {
                san.general_names.iter().find_map(|name| match name {
                    GeneralName::DNSName(dns) => Some((*dns).to_owned()),
                    GeneralName::IPAddress(ip) => match ip.len() {
                        4 => Some(
                            std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*ip).ok()?).to_string(),
                        ),
                        16 => Some(
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*ip).ok()?).to_string(),
                        ),
                        _ => None,
                    },
                    _ => None,
                })
            }
            _ => None,
        })
}
