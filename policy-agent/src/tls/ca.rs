//! The platform CA: created on first start, kept in the state directory,
//! issuing route certificates for the 61443 listeners and instance
//! identities (`CF_INSTANCE_CERT`).

use std::{
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::SystemTime,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
    sign::CertifiedKey,
};
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

/// The CA's parameters: the same every time, so an issuer rebuilt from the
/// stored key names the stored certificate's subject.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "policy-agent");
    name.push(DnType::CommonName, "policy-agent platform CA");
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

/// The platform CA, created on first start and kept in the state directory
/// (`ca.pem`, the bundle clients trust; `ca-key.pem`, mode 0600).
pub struct PlatformCa {
    issuer: Issuer<'static, KeyPair>,
    /// How long instance identities and route certificates are valid.
    validity: std::time::Duration,
    ca_der: CertificateDer<'static>,
    bundle: PathBuf,
}

impl PlatformCa {
    pub fn load_or_create(state_dir: &Path) -> Result<Self, TlsError> {
        fs::create_dir_all(state_dir).map_err(io("create", state_dir))?;
        let (cert_path, key_path) = (state_dir.join("ca.pem"), state_dir.join("ca-key.pem"));
        let key = match fs::read_to_string(&key_path) {
            Ok(pem) => KeyPair::from_pem(&pem)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate()?;
                let cert = ca_params().self_signed(&key)?;
                // The bundle stays readable (clients trust it); the key is
                // owner-only from its creation and written last (its
                // presence means the CA is whole).
                crate::files::replace(&cert_path, cert.pem().as_bytes(), 0o644)
                    .map_err(io("write", &cert_path))?;
                crate::files::replace(&key_path, key.serialize_pem().as_bytes(), 0o600)
                    .map_err(io("write", &key_path))?;
                info!(bundle = %cert_path.display(), "created the platform CA");
                key
            }
            Err(e) => return Err(io("read", &key_path)(e)),
        };
        let ca_der = CertificateDer::from_pem_file(&cert_path).map_err(|e| {
            io("parse", &cert_path)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.to_string(),
            ))
        })?;
        Ok(Self {
            issuer: Issuer::new(ca_params(), key),
            validity: std::time::Duration::from_secs(24 * 3600),
            ca_der,
            bundle: cert_path,
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

    /// The CA bundle clients point `--cacert` / `SSL_CERT_FILE` at.
    pub fn bundle(&self) -> &Path {
        &self.bundle
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

/// An instance's addresses as SANs.
fn sans(addresses: &[IpAddr]) -> Vec<SanType> {
    addresses.iter().copied().map(SanType::IpAddress).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::identity_app;
    use std::os::unix::fs::PermissionsExt as _;

    #[test]
    fn the_ca_survives_a_restart_and_issues_route_certificates() {
        let dir = std::env::temp_dir().join(format!("platform-ca-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ca = PlatformCa::load_or_create(&dir).unwrap();
        let first = fs::read(dir.join("ca.pem")).unwrap();
        assert_eq!(
            fs::metadata(dir.join("ca-key.pem")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = PlatformCa::load_or_create(&dir).unwrap();
        assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), first, "the CA is kept");
        assert_eq!(again.ca_der, ca.ca_der);
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
}
