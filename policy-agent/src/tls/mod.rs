//! Platform TLS on port 61443: one listener per app instance, made inside
//! the instance's network namespace and served by the agent's runtime (no
//! process per container). It terminates TLS with a certificate from the
//! platform CA naming the app's internal routes and the instance's address,
//! and forwards the plaintext to the app's port inside the same namespace.
//! Mapping or unmapping a route re-issues the certificate: the next
//! handshake uses the new one; open connections are not touched.
//!
//! Every instance also gets an identity certificate and key naming its app
//! (Cloud Foundry's `CF_INSTANCE_CERT` / `CF_INSTANCE_KEY`). Apps listed in
//! `mtls_apps` require one from their clients: the handshake fails unless
//! the certificate comes from the platform CA and names an app that a policy
//! allows to reach the destination's 61443; the verified source app is
//! passed to the app in `X-Source-App` (and the certificate, base64 DER, in
//! `X-Forwarded-Client-Cert`), replacing whatever the client sent.

mod ca;
mod client_auth;
mod proxy;
mod trust;

use std::path::{Path, PathBuf};

pub use ca::{CaFiles, Identity, PlatformCa, Sharing, pem_of};
pub use client_auth::{
    Authorizer, CLIENT_CERT_HEADER, ClientAuth, SOURCE_APP_HEADER, identity_app,
};
pub use proxy::{TlsProxies, instance_ports};
pub use trust::Trust;

/// The platform TLS port, as in Cloud Foundry.
pub const TLS_PORT: u16 = 61443;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    #[error(
        "no platform CA in {}: the agent makes it at its first start; start it with this \
         configuration, or name the running agent's (--config)",
        key.parent().unwrap_or(key).display()
    )]
    NoCa { key: PathBuf },
    #[error("{certificate} is not the certificate of the key {key}: restore the pair")]
    KeyMismatch { certificate: PathBuf, key: PathBuf },
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

pub(crate) fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_path_buf();
    move |source| TlsError::Io { what, path, source }
}
