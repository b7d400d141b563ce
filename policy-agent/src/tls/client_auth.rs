//! Mutual TLS for the apps in `mtls_apps`: a client certificate is
//! accepted only if the platform CA issued it and it names an app that a
//! policy allows to reach the destination's TLS port.

use std::{collections::BTreeSet, sync::Arc};

use rustls::{
    CertificateError, DigitallySignedStruct, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, UnixTime},
    server::{
        WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};
use tracing::info;

use super::{PlatformCa, TlsError};

/// The header carrying the verified source app to an mTLS app.
pub const SOURCE_APP_HEADER: &str = "x-source-app";
/// The header carrying the verified client certificate (base64 DER, as
/// Cloud Foundry's gorouter does).
pub const CLIENT_CERT_HEADER: &str = "x-forwarded-client-cert";

/// The app an instance identity certificate names (subject
/// `OU=app:APP`), if `der` is one.
pub fn identity_app(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    cert.subject()
        .iter_organizational_unit()
        .find_map(|ou| ou.as_str().ok()?.strip_prefix("app:").map(str::to_owned))
}

/// Whether a policy lets the source app reach the destination app's TLS
/// port: `(source, destination) -> allowed`, asked at every mTLS handshake.
#[derive(Clone)]
pub struct Authorizer(Arc<AuthorizeFn>);

type AuthorizeFn = dyn Fn(&str, &str) -> bool + Send + Sync;

impl Authorizer {
    pub fn new(f: impl Fn(&str, &str) -> bool + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Authorizer")
    }
}

/// Which apps require client certificates, and who may connect.
#[derive(Clone, Debug)]
pub struct ClientAuth {
    pub apps: BTreeSet<String>,
    pub authorize: Authorizer,
}

/// Accepts a client certificate only if the platform CA issued it and it
/// names an app that a policy allows to reach `destination`.
#[derive(Debug)]
struct PolicyClientVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    destination: String,
    authorize: Authorizer,
}

impl ClientCertVerifier for PolicyClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.chain.verify_client_cert(end_entity, intermediates, now)?;
        let refuse = Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
        let Some(source) = identity_app(end_entity) else {
            info!(destination = self.destination, "mTLS: refused a certificate naming no app");
            return refuse;
        };
        if !(self.authorize.0)(&source, &self.destination) {
            info!(source, destination = self.destination, "mTLS: refused, no policy allows it");
            return refuse;
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// A verifier of client certificates: the platform CA's, then the
/// policies'.
pub(super) fn client_verifier(
    ca: &PlatformCa,
    destination: &str,
    authorize: &Authorizer,
) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.ca_der().clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
    Ok(Arc::new(PolicyClientVerifier {
        chain,
        destination: destination.to_owned(),
        authorize: authorize.clone(),
    }))
}
