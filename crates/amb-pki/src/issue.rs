//! Issuing a development CA and leaf certificates with rcgen: ECDSA P-256, a real CA
//! (basicConstraints CA, keyCertSign), leaves with exactly the EKU of their role.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use amb_proto::San;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

use crate::files::write_file;
use crate::PkiError;

/// What a leaf certificate is for; it gets the matching extended key usage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LeafRole {
    /// serverAuth: the tunnel endpoint `amb server` presents.
    Server,
    /// clientAuth: the identity `amb client` presents.
    Client,
}

/// Everything that varies between leaves. Tests use odd specs (expired, wrong EKU) on purpose.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// Subject common name, for humans only: amb never authorizes by CN.
    pub common_name: String,
    /// Subject alternative names.
    pub sans: Vec<San>,
    /// Extended key usages to list; empty leaves the extension out.
    pub usages: Vec<LeafRole>,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// How far in the past `not_before` is set, to tolerate clock skew between hosts.
const BACKDATE: Duration = Duration::minutes(5);

impl LeafSpec {
    /// A server leaf valid for `localhost`, `127.0.0.1` and each of `names` (IPs become IP SANs).
    pub fn server(names: &[String], days: i64) -> Self {
        let mut sans = vec![
            San::Dns("localhost".into()),
            San::Ip(IpAddr::from([127, 0, 0, 1])),
        ];
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => San::Ip(ip),
                Err(_) => San::Dns(name.clone()),
            };
            if !sans.contains(&san) {
                sans.push(san);
            }
        }
        Self::new("amb server", sans, LeafRole::Server, days)
    }

    /// A client leaf for `name`: DNS SAN `name` and URI SAN `spiffe://amb/<name>`.
    pub fn client(name: &str, days: i64) -> Self {
        let sans = vec![
            San::Dns(name.into()),
            San::Uri(format!("spiffe://amb/{name}")),
        ];
        Self::new(name, sans, LeafRole::Client, days)
    }

    fn new(common_name: &str, sans: Vec<San>, role: LeafRole, days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        LeafSpec {
            common_name: common_name.into(),
            sans,
            usages: vec![role],
            not_before: now - BACKDATE,
            not_after: now + Duration::days(days),
        }
    }
}

/// A leaf certificate and its private key, both PEM.
#[derive(Clone, Debug)]
pub struct IssuedLeaf {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The PKCS#8 private key, PEM.
    pub key_pem: String,
}

/// A certificate authority that can sign leaves.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM: what peers put in their trust store.
    pub cert_pem: String,
}

fn rcgen_err(what: &str) -> impl FnOnce(rcgen::Error) -> PkiError + '_ {
    move |source| PkiError::Issue {
        what: what.to_owned(),
        source,
    }
}

fn san_type(san: &San) -> Result<SanType, PkiError> {
    let ia5 = |s: &str| {
        s.to_owned()
            .try_into()
            .map_err(|_| PkiError::BadName(format!("{san} is not an ASCII name")))
    };
    Ok(match san {
        San::Dns(n) => SanType::DnsName(ia5(n)?),
        San::Uri(u) => SanType::URI(ia5(u)?),
        San::Ip(ip) => SanType::IpAddress(*ip),
    })
}

impl CertAuthority {
    /// A new self-signed CA with an ECDSA P-256 key, valid for ten years.
    pub fn generate(common_name: &str) -> Result<Self, PkiError> {
        let err = rcgen_err("the CA certificate");
        let key =
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_err("the CA key"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + Duration::days(3650);
        let cert = params.self_signed(&key).map_err(err)?;
        Ok(CertAuthority {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads the CA in `dir` (`ca.pem`, `ca.key`) to issue more leaves.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let (cert_path, key_path) = (dir.join("ca.pem"), dir.join("ca.key"));
        let cert_pem =
            std::fs::read_to_string(&cert_path).map_err(|e| PkiError::io(&cert_path, e))?;
        crate::load_key(&key_path)?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| PkiError::io(&key_path, e))?;
        let bad = |path: &Path| {
            let path = path.to_owned();
            move |e: rcgen::Error| PkiError::BadPem {
                path,
                what: e.to_string(),
            }
        };
        let key = KeyPair::from_pem(&key_pem).map_err(bad(&key_path))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(bad(&cert_path))?;
        Ok(CertAuthority { issuer, cert_pem })
    }

    /// The CA's private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a leaf with a fresh ECDSA P-256 key.
    pub fn issue(&self, spec: &LeafSpec) -> Result<IssuedLeaf, PkiError> {
        let what = format!("a leaf for {}", spec.common_name);
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(rcgen_err(&what))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, spec.common_name.as_str());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.subject_alt_names = spec.sans.iter().map(san_type).collect::<Result<_, _>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = spec
            .usages
            .iter()
            .map(|role| match role {
                LeafRole::Server => ExtendedKeyUsagePurpose::ServerAuth,
                LeafRole::Client => ExtendedKeyUsagePurpose::ClientAuth,
            })
            .collect();
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(rcgen_err(&what))?;
        Ok(IssuedLeaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// What `amb certs init` makes.
#[derive(Clone, Debug)]
pub struct InitOptions {
    /// Where to write the files.
    pub dir: PathBuf,
    /// Extra server names (DNS or IP), beyond `localhost` and `127.0.0.1`.
    pub server_names: Vec<String>,
    /// Client names; the client certificate carries a DNS and a SPIFFE URI SAN for each.
    pub client_names: Vec<String>,
    /// Replace existing files.
    pub force: bool,
}

/// Writes `ca`, `server` and `client` certificates and keys into `opts.dir`; keys are 0600.
/// Returns the files written.
pub fn init_dev_pki(opts: &InitOptions) -> Result<Vec<PathBuf>, PkiError> {
    let names = [
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ];
    if !opts.force {
        if let Some(existing) = names.iter().map(|n| opts.dir.join(n)).find(|p| p.exists()) {
            return Err(PkiError::Exists { path: existing });
        }
    }
    std::fs::create_dir_all(&opts.dir).map_err(|e| PkiError::io(&opts.dir, e))?;
    let ca = CertAuthority::generate("amb dev CA")?;
    let server = ca.issue(&LeafSpec::server(&opts.server_names, 825))?;
    let client_names = if opts.client_names.is_empty() {
        vec!["client".to_owned()]
    } else {
        opts.client_names.clone()
    };
    let mut client_spec = LeafSpec::client(&client_names[0], 825);
    for extra in &client_names[1..] {
        client_spec.sans.extend(LeafSpec::client(extra, 0).sans);
    }
    let client = ca.issue(&client_spec)?;
    let contents = [
        (ca.cert_pem.clone(), false),
        (ca.key_pem(), true),
        (server.cert_pem, false),
        (server.key_pem, true),
        (client.cert_pem, false),
        (client.key_pem, true),
    ];
    let mut written = Vec::new();
    for (name, (text, secret)) in names.iter().zip(contents) {
        let path = opts.dir.join(name);
        write_file(&path, &text, secret, true)?;
        written.push(path);
    }
    Ok(written)
}

/// Issues one more leaf from the CA in `dir`, written as `dir/<name>.pem` and `dir/<name>.key`.
pub fn issue_leaf_in_dir(
    dir: &Path,
    role: LeafRole,
    name: &str,
    extra_sans: &[San],
    days: i64,
    force: bool,
) -> Result<Vec<PathBuf>, PkiError> {
    if name.is_empty()
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || name.starts_with('.')
    {
        return Err(PkiError::BadName(format!(
            "{name:?} cannot name a certificate; use letters, digits, '-', '_' and '.'"
        )));
    }
    let ca = CertAuthority::load(dir)?;
    let mut spec = match role {
        LeafRole::Server => LeafSpec::server(&[name.to_owned()], days),
        LeafRole::Client => LeafSpec::client(name, days),
    };
    spec.sans.extend(extra_sans.iter().cloned());
    let leaf = ca.issue(&spec)?;
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    for path in [&cert, &key] {
        if !force && path.exists() {
            return Err(PkiError::Exists { path: path.clone() });
        }
    }
    write_file(&cert, &leaf.cert_pem, false, force)?;
    write_file(&key, &leaf.key_pem, true, force)?;
    Ok(vec![cert, key])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peer_identity;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn init_writes_a_ca_and_leaves_with_the_right_shape() {
        let dir = std::env::temp_dir().join(format!("amb-pki-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let opts = InitOptions {
            dir: dir.clone(),
            server_names: vec!["big-server".into(), "10.1.2.3".into()],
            client_names: vec![],
            force: false,
        };
        init_dev_pki(&opts).unwrap();
        for key in ["ca.key", "server.key", "client.key"] {
            let mode = std::fs::metadata(dir.join(key))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{key}");
        }
        assert!(matches!(init_dev_pki(&opts), Err(PkiError::Exists { .. })));

        let der = |name: &str| CertificateDer::from_pem_file(dir.join(name)).unwrap();
        let ca = der("ca.pem");
        let (_, ca) = x509_parser::parse_x509_certificate(&ca).unwrap();
        assert!(ca.is_ca());
        assert!(ca.key_usage().unwrap().unwrap().value.key_cert_sign());

        let server = der("server.pem");
        let id = peer_identity(&server);
        for want in [
            "dns:localhost",
            "ip:127.0.0.1",
            "dns:big-server",
            "ip:10.1.2.3",
        ] {
            assert!(id.sans.contains(&want.parse().unwrap()), "{want} in {id:?}");
        }
        let (_, parsed) = x509_parser::parse_x509_certificate(&server).unwrap();
        let eku = parsed.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(
            parsed.validity().not_before.timestamp()
                < OffsetDateTime::now_utc().unix_timestamp() - 60
        );

        let client = peer_identity(&der("client.pem"));
        assert_eq!(client.to_string(), "uri:spiffe://amb/client");

        issue_leaf_in_dir(
            &dir,
            LeafRole::Client,
            "app2",
            &["dns:extra.example".parse().unwrap()],
            30,
            false,
        )
        .unwrap();
        let app2 = peer_identity(&der("app2.pem"));
        assert!(app2.sans.contains(&"dns:extra.example".parse().unwrap()));
        assert_eq!(app2.to_string(), "uri:spiffe://amb/app2");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
