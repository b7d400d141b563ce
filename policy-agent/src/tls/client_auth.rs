//! Mutual TLS for the apps in `mtls_apps`: a client certificate is
//! accepted only if the platform CA issued it and it names an app that a
//! policy allows to reach the destination's TLS port.

use std::{collections::BTreeSet, sync::Arc};

use rustls::{CertificateError, pki_types::CertificateDer, server::danger::ClientCertVerifier};
use tracing::info;

use super::Trust;

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

/// A verifier of client certificates for the listener of `destination`:
/// accepted only if a trusted platform CA issued it (this host's, or in a
/// cluster any host's) and it names an app that a policy allows to reach
/// `destination`, at the time of the handshake.
pub(super) fn client_verifier(
    trust: &Arc<Trust>,
    destination: &str,
    authorize: &Authorizer,
) -> Arc<dyn ClientCertVerifier> {
    let (destination, authorize) = (destination.to_owned(), authorize.clone());
    trust.client_verifier(Some(Arc::new(move |end_entity: &CertificateDer<'_>| {
        let refuse = Err(rustls::Error::InvalidCertificate(
            CertificateError::ApplicationVerificationFailure,
        ));
        let Some(source) = identity_app(end_entity) else {
            info!(destination, "mTLS: refused a certificate naming no app");
            return refuse;
        };
        if !(authorize.0)(&source, &destination) {
            info!(source, destination, "mTLS: refused, no policy allows it");
            return refuse;
        }
        Ok(())
    })))
}
