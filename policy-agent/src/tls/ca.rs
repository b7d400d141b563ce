//! The platform CA: issues route certificates for the 61443 listeners,
//! instance identities (`CF_INSTANCE_CERT`) and API identities.
//!
//! - **One host** ([`Sharing::SingleHost`]): created on first start and
//!   kept in the state directory, `ca.pem` (also the bundle clients trust)
//!   and `ca-key.pem` (mode 0600).
//! - **Cluster** ([`Sharing::Cluster`]): every host's agent has a CA of its
//!   own, `host-ca.pem` and `host-ca-key.pem` (mode 0600), created on first
//!   start and kept; its key never leaves the host. `ca.pem` is then the
//!   trust bundle, every host's CA certificate, which `cluster::cas` keeps
//!   from the certificates (only) the hosts publish in etcd.
//!
//! The CA is made on first start only (`load_or_create`, the agent);
//! everything else (`api-identity`) only [`PlatformCa::load`]s it.

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData as _, SanType, date_time_ymd,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};
use serde::{Deserialize, Serialize};
use tracing::info;

use super::{TlsError, io};
use crate::state::INTERNAL_DOMAIN;

/// An instance identity: PEM certificate and PKCS#8 key.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

fn this_year() -> i32 {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

/// Whose CA this is: the only one of a single host, or one host's among
/// the cluster's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Sharing {
    SingleHost,
    Cluster { host: String },
}

impl Sharing {
    /// The CA's common name: each host's differs, so that a client (or an
    /// operator) holding the cluster's bundle tells them apart.
    fn common_name(&self) -> String {
        match self {
            Sharing::SingleHost => "policy-agent platform CA".to_owned(),
            Sharing::Cluster { host } => format!("policy-agent host CA {host}"),
        }
    }
}

/// Where a host's CA is kept (`GET /v1/status` shows them as
/// `platform_ca`, which is how `api-identity` finds them).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaFiles {
    /// This host's CA certificate.
    pub certificate: PathBuf,
    /// Its private key (mode 0600).
    pub key: PathBuf,
    /// What clients trust (`--cacert`, `SSL_CERT_FILE`): this CA alone on
    /// one host, every host's CA in a cluster.
    pub bundle: PathBuf,
}

impl CaFiles {
    pub fn new(state_dir: &Path, sharing: &Sharing) -> Self {
        let bundle = state_dir.join("ca.pem");
        match sharing {
            Sharing::SingleHost => {
                Self { certificate: bundle.clone(), key: state_dir.join("ca-key.pem"), bundle }
            }
            Sharing::Cluster { .. } => Self {
                certificate: state_dir.join("host-ca.pem"),
                key: state_dir.join("host-ca-key.pem"),
                bundle,
            },
        }
    }
}

/// A new CA's parameters.
fn ca_params(common_name: String) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "policy-agent");
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = date_time_ymd(2025, 1, 1);
    params.not_after = date_time_ymd(2045, 1, 1);
    params
}

/// A host's platform CA (see the module's notes for its files).
pub struct PlatformCa {
    issuer: Issuer<'static, KeyPair>,
    /// How long instance identities and route certificates are valid.
    validity: std::time::Duration,
    ca_der: CertificateDer<'static>,
    ca_pem: String,
    files: CaFiles,
}

impl PlatformCa {
    /// The CA in `state_dir`, made there if it has none yet (the agent, at
    /// start).
    pub fn load_or_create(state_dir: &Path, sharing: &Sharing) -> Result<Self, TlsError> {
        fs::create_dir_all(state_dir).map_err(io("create", state_dir))?;
        let files = CaFiles::new(state_dir, sharing);
        match fs::metadata(&files.key) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => create(&files, sharing)?,
            Err(e) => return Err(io("read", &files.key)(e)),
        }
        Self::load(files)
    }

    /// The CA kept in `files`; never makes one.
    pub fn load(files: CaFiles) -> Result<Self, TlsError> {
        let key_pem = fs::read_to_string(&files.key).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => TlsError::NoCa { key: files.key.clone() },
            _ => io("read", &files.key)(e),
        })?;
        let key = KeyPair::from_pem(&key_pem)?;
        let ca_pem =
            fs::read_to_string(&files.certificate).map_err(io("read", &files.certificate))?;
        let ca_der = CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| {
            io("parse", &files.certificate)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.to_string(),
            ))
        })?;
        let public_key = x509_parser::parse_x509_certificate(&ca_der)
            .map(|(_, cert)| cert.public_key().raw.to_vec())
            .unwrap_or_default();
        if public_key != key.subject_public_key_info() {
            return Err(TlsError::KeyMismatch {
                certificate: files.certificate.clone(),
                key: files.key.clone(),
            });
        }
        // The issuer names exactly the stored certificate's subject.
        let issuer = Issuer::from_ca_cert_der(&ca_der, key)?;
        let ca_pem = pem_of(&ca_der);
        Ok(Self {
            issuer,
            validity: std::time::Duration::from_secs(24 * 3600),
            ca_der,
            ca_pem,
            files,
        })
    }

    /// Instance identities and route certificates valid for `validity`.
    pub fn with_validity(mut self, validity: std::time::Duration) -> Self {
        self.validity = validity;
        self
    }

    pub fn validity(&self) -> std::time::Duration {
        self.validity
    }

    /// From five minutes ago (clock skew) to `validity` from now.
    fn validity_window(&self, params: &mut CertificateParams) {
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + self.validity;
    }

    /// The CA's own certificate.
    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    /// The CA's own certificate, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The CA bundle clients point `--cacert` / `SSL_CERT_FILE` at.
    pub fn bundle(&self) -> &Path {
        &self.files.bundle
    }

    /// Where the CA is kept.
    pub fn files(&self) -> &CaFiles {
        &self.files
    }

    /// An instance identity: subject `CN=IP, OU=app:APP`, the instance's
    /// addresses as its SANs (IPv4, and IPv6 on a dual-stack network),
    /// usable as client and server certificate.
    pub fn issue_identity(&self, app: &str, addresses: &[IpAddr]) -> Result<Identity, TlsError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans(addresses);
        let first = addresses.first().map(IpAddr::to_string).unwrap_or_default();
        params.distinguished_name.push(DnType::CommonName, first);
        params.distinguished_name.push(DnType::OrganizationalUnitName, format!("app:{app}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        self.validity_window(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A client identity for the TCP API: subject `CN=NAME, OU=api:ROLE`,
    /// client authentication only, valid for `days`.
    pub fn issue_api_identity(
        &self,
        role: &str,
        name: &str,
        days: u32,
    ) -> Result<Identity, TlsError> {
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(DnType::OrganizationalUnitName, format!("api:{role}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(i64::from(days.max(1)));
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A server certificate for the agent's own TCP API: `names` and `ips`.
    pub fn issue_server(
        &self,
        names: &[String],
        ips: &[IpAddr],
    ) -> Result<Arc<CertifiedKey>, TlsError> {
        let mut params = CertificateParams::new(names.to_vec())?;
        params.subject_alt_names.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.distinguished_name.push(DnType::CommonName, "policy-agent API");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let year = this_year();
        params.not_before = date_time_ymd(year - 1, 1, 1);
        params.not_after = date_time_ymd(year + 2, 1, 1);
        self.certified(&params)
    }

    fn certified(&self, params: &CertificateParams) -> Result<Arc<CertifiedKey>, TlsError> {
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = vec![cert.der().clone(), self.ca_der.clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)?;
        Ok(Arc::new(CertifiedKey::new(chain, signing)))
    }

    /// A certificate for one instance: its app's routes and its addresses.
    pub fn issue(
        &self,
        app: &str,
        hostnames: &[String],
        addresses: &[IpAddr],
    ) -> Result<Arc<CertifiedKey>, TlsError> {
        let names: Vec<String> =
            hostnames.iter().map(|h| format!("{h}.{INTERNAL_DOMAIN}")).collect();
        let mut params = CertificateParams::new(names)?;
        params.subject_alt_names.extend(sans(addresses));
        params.distinguished_name.push(DnType::CommonName, app);
        self.validity_window(&mut params);
        self.certified(&params)
    }
}

/// Makes a CA in `files`: the certificate first, readable (clients trust
/// it), the key last and owner-only from its creation (its presence means
/// the CA is whole).
fn create(files: &CaFiles, sharing: &Sharing) -> Result<(), TlsError> {
    let key = KeyPair::generate()?;
    let cert = ca_params(sharing.common_name()).self_signed(&key)?;
    policy_api::files::replace(&files.certificate, cert.pem().as_bytes(), 0o644)
        .map_err(io("write", &files.certificate))?;
    policy_api::files::replace(&files.key, key.serialize_pem().as_bytes(), 0o600)
        .map_err(io("write", &files.key))?;
    info!(certificate = %files.certificate.display(), "created the platform CA");
    Ok(())
}

/// A certificate as PEM.
pub fn pem_of(der: &CertificateDer<'_>) -> String {
    use base64::Engine as _;
    let text = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in text.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        pem.push('\n');
    }
    pem.push_str("-----END CERTIFICATE-----\n");
    pem
}

/// An instance's addresses as SANs.
fn sans(addresses: &[IpAddr]) -> Vec<SanType> {
    addresses.iter().copied().map(SanType::IpAddress).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity_app;
    use std::os::unix::fs::PermissionsExt as _;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("platform-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_ca_survives_a_restart_and_issues_route_certificates() {
        let dir = scratch("single");
        let ca = PlatformCa::load_or_create(&dir, &Sharing::SingleHost).unwrap();
        let first = fs::read(dir.join("ca.pem")).unwrap();
        assert_eq!(mode(&dir.join("ca-key.pem")), 0o600);
        let again = PlatformCa::load_or_create(&dir, &Sharing::SingleHost).unwrap();
        assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), first, "the CA is kept");
        assert_eq!(again.ca_der, ca.ca_der);
        assert_eq!(again.bundle(), dir.join("ca.pem"));
        let cert = again
            .issue("backend", &["backend".into(), "api".into()], &[[10, 255, 0, 2].into()])
            .unwrap();
        assert_eq!(cert.cert.len(), 2, "leaf and CA");
        assert_eq!(identity_app(&cert.cert[0]), None, "a route certificate is no identity");

        let identity = again.issue_identity("frontend", &[[10, 255, 0, 3].into()]).unwrap();
        let der = CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).unwrap();
        assert_eq!(identity_app(&der).as_deref(), Some("frontend"));
        assert!(PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).is_ok());
        assert_eq!(identity_app(b"not a certificate"), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_cluster_host_keeps_its_own_ca_beside_the_bundle() {
        let dir = scratch("cluster");
        let sharing = Sharing::Cluster { host: "cell-7".into() };
        let ca = PlatformCa::load_or_create(&dir, &sharing).unwrap();
        assert_eq!(mode(&dir.join("host-ca-key.pem")), 0o600);
        assert!(!dir.join("ca-key.pem").exists() && !dir.join("ca.pem").exists());
        assert_eq!(ca.bundle(), dir.join("ca.pem"), "the bundle is the cluster's");
        let (_, cert) = x509_parser::parse_x509_certificate(&ca.ca_der).unwrap();
        assert_eq!(cert.subject().to_string(), "O=policy-agent, CN=policy-agent host CA cell-7");
        assert_eq!(ca.ca_pem(), fs::read_to_string(dir.join("host-ca.pem")).unwrap());
        // Issued certificates name the stored CA as their issuer.
        let identity = ca.issue_api_identity("admin", "ops", 1).unwrap();
        let der = CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(leaf.issuer(), cert.subject());
        assert!(leaf.verify_signature(Some(cert.public_key())).is_ok());
        let again = PlatformCa::load_or_create(&dir, &sharing).unwrap();
        assert_eq!(again.ca_der, ca.ca_der, "kept across restarts");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn loading_never_creates_a_ca_and_checks_the_key_is_the_certificates() {
        let dir = scratch("load");
        let files = CaFiles::new(&dir, &Sharing::SingleHost);
        let err = PlatformCa::load(files.clone()).err().unwrap();
        assert!(matches!(err, TlsError::NoCa { .. }), "{err}");
        assert!(!dir.exists(), "nothing made");

        PlatformCa::load_or_create(&dir, &Sharing::SingleHost).unwrap();
        let other = scratch("load-other");
        PlatformCa::load_or_create(&other, &Sharing::SingleHost).unwrap();
        fs::copy(other.join("ca-key.pem"), &files.key).unwrap();
        let err = PlatformCa::load(files).err().unwrap();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        fs::remove_dir_all(&dir).unwrap();
        fs::remove_dir_all(&other).unwrap();
    }
}
