//! The CA certificates this host trusts for client certificates (the TCP
//! API's API identities, the instance identities of `mtls_apps`): its own
//! CA on one host; in a cluster every host's, a set that changes while the
//! agent runs (`cluster::cas` follows it in etcd). Every verifier handed
//! out asks the current set at each handshake, so a host that joins is
//! trusted by listeners that started before it.

use std::sync::{Arc, RwLock};

use rustls::{
    DigitallySignedStruct, DistinguishedName, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::TlsError;

/// The trusted CAs, replaceable as a whole.
pub struct Trust {
    current: RwLock<Current>,
}

struct Current {
    cas: Vec<CertificateDer<'static>>,
    verifier: Arc<dyn ClientCertVerifier>,
}

impl Trust {
    pub fn new(cas: Vec<CertificateDer<'static>>) -> Result<Arc<Self>, TlsError> {
        let verifier = verifier(&cas)?;
        Ok(Arc::new(Self { current: RwLock::new(Current { cas, verifier }) }))
    }

    /// Trusts `cas` from the next handshake on; false if they are the
    /// ones trusted already.
    pub fn replace(&self, cas: Vec<CertificateDer<'static>>) -> Result<bool, TlsError> {
        if self.read().cas == cas {
            return Ok(false);
        }
        let verifier = verifier(&cas)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Current { cas, verifier };
        Ok(true)
    }

    /// The CA certificates trusted now.
    pub fn cas(&self) -> Vec<CertificateDer<'static>> {
        self.read().cas.clone()
    }

    /// A verifier of client certificates that asks the trusted set of the
    /// moment, then `then` (if any) about a certificate the set accepts.
    pub fn client_verifier(
        self: &Arc<Self>,
        then: Option<Arc<AfterChain>>,
    ) -> Arc<dyn ClientCertVerifier> {
        Arc::new(Following { trust: self.clone(), then })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Current> {
        self.current.read().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> Arc<dyn ClientCertVerifier> {
        self.read().verifier.clone()
    }
}

fn verifier(cas: &[CertificateDer<'static>]) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        roots.add(ca.clone())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?)
}

/// What else a client certificate must pass once a trusted CA's chain
/// verified (the `mtls_apps` listeners: a policy allowing its app).
pub type AfterChain = dyn Fn(&CertificateDer<'_>) -> Result<(), rustls::Error> + Send + Sync;

/// The verifier of the trusted set of the moment.
struct Following {
    trust: Arc<Trust>,
    then: Option<Arc<AfterChain>>,
}

impl std::fmt::Debug for Following {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Following({:?}, then: {})", self.trust, self.then.is_some())
    }
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Trust({} CAs)", self.read().cas.len())
    }
}

impl ClientCertVerifier for Following {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    /// No hints: the set changes under a configuration that borrows them,
    /// and clients here (curl, openssl, rustls with one identity) send
    /// their one certificate whatever the hints say.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.trust.now().verify_client_cert(end_entity, intermediates, now)?;
        match &self.then {
            Some(then) => then(end_entity).map(|()| verified),
            None => Ok(verified),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust.now().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.trust.now().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.trust.now().supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tls::{PlatformCa, Sharing};
    use rustls::pki_types::pem::PemObject as _;

    fn ca(name: &str) -> (PlatformCa, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("trust-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ca = PlatformCa::load_or_create(&dir, &Sharing::Cluster { host: name.into() }).unwrap();
        (ca, dir)
    }

    fn verifies(trust: &Arc<Trust>, ca: &PlatformCa) -> bool {
        let identity = ca.issue_api_identity("admin", "ops", 1).unwrap();
        let der = CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).unwrap();
        trust.client_verifier(None).verify_client_cert(&der, &[], UnixTime::now()).is_ok()
    }

    #[test]
    fn a_verifier_follows_the_trusted_set() {
        let ((a, dir_a), (b, dir_b)) = (ca("a"), ca("b"));
        let trust = Trust::new(vec![a.ca_der().clone()]).unwrap();
        assert!(verifies(&trust, &a));
        assert!(!verifies(&trust, &b), "b is not trusted yet");
        assert!(trust.replace(vec![a.ca_der().clone(), b.ca_der().clone()]).unwrap());
        assert!(!trust.replace(vec![a.ca_der().clone(), b.ca_der().clone()]).unwrap(), "same");
        assert!(verifies(&trust, &a) && verifies(&trust, &b), "either host's");
        trust.replace(vec![b.ca_der().clone()]).unwrap();
        assert!(!verifies(&trust, &a), "a is no longer trusted");
        std::fs::remove_dir_all(dir_a).unwrap();
        std::fs::remove_dir_all(dir_b).unwrap();
    }
}
