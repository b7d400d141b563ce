//! Who may use the API over TCP: a client certificate issued by the
//! platform CA naming an API role (`OU=api:admin` or `OU=api:read-only`),
//! minted with `policy-agent api-identity`. The Unix socket (mode 0660) is
//! the local administrator's and needs none.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use axum::{
    Json,
    extract::Request,
    http::{Method, StatusCode},
    middleware::Next,
    response::{IntoResponse as _, Response},
};
use rustls::ServerConfig;
use serde_json::json;
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tracing::info;

use crate::{
    limits::Handshake,
    tls::{PlatformCa, TlsError, Trust},
};

/// An API role, from the client certificate's `OU=api:ROLE`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Role {
    /// Every read and write.
    Admin,
    /// Reads only (dashboards).
    ReadOnly,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
        }
    }

    /// The role a certificate names, if it is an API identity.
    pub fn of(der: &[u8]) -> Option<Role> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
        let units: Option<Vec<&str>> =
            cert.subject().iter_organizational_unit().map(|ou| ou.as_str().ok()).collect();
        Self::of_units(&units?)
    }

    /// The role named by a subject's organizational units: exactly one
    /// `api:ROLE` of a known role. A subject naming two (`api:admin` and
    /// `api:read-only`), or an unknown role, is no API identity: which one
    /// counted would otherwise depend on their order.
    fn of_units(units: &[&str]) -> Option<Role> {
        let mut roles = units.iter().filter_map(|ou| ou.strip_prefix("api:"));
        let role = match roles.next()? {
            "admin" => Role::Admin,
            "read-only" => Role::ReadOnly,
            _ => return None,
        };
        roles.next().is_none().then_some(role)
    }
}

/// Who sent a request on the TCP listener: the certificate's role (None:
/// a platform certificate that is no API identity, e.g. an instance's) and
/// common name.
#[derive(Clone, Debug)]
pub struct Caller {
    pub role: Option<Role>,
    pub name: String,
}

/// The TLS handshake of the TCP API: a client certificate from a trusted
/// platform CA (this host's; in a cluster, any host's) is required.
#[derive(Clone)]
pub struct Mtls {
    acceptor: TlsAcceptor,
}

impl Mtls {
    /// A server certificate naming `listen`'s address (every local address
    /// when it is unspecified), `localhost` and this host's name.
    pub fn new(ca: &PlatformCa, trust: &Arc<Trust>, listen: SocketAddr) -> Result<Self, TlsError> {
        let mut ips = vec![IpAddr::from([127, 0, 0, 1])];
        if listen.ip().is_unspecified() {
            ips.extend(crate::dataplane::ipv4_addresses(None).into_iter().map(IpAddr::V4));
        } else {
            ips.push(listen.ip());
        }
        ips.sort();
        ips.dedup();
        let mut names = vec!["localhost".to_owned()];
        if let Some(host) = hostname() {
            names.push(host);
        }
        let cert = ca.issue_server(&names, &ips)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(trust.client_verifier(None))
            .with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(cert)));
        info!(names = ?names, ips = ?ips, "TCP API: TLS with client certificates from the platform CA");
        Ok(Self { acceptor: TlsAcceptor::from(Arc::new(config)) })
    }
}

impl Handshake<TcpStream> for Mtls {
    type Io = TlsStream<TcpStream>;
    type Caller = Caller;

    async fn handshake(&self, io: TcpStream) -> std::io::Result<(Self::Io, Caller)> {
        let tls = self.acceptor.accept(io).await?;
        let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
        let leaf = leaf.ok_or_else(|| std::io::Error::other("no client certificate"))?;
        let name = x509_parser::parse_x509_certificate(&leaf)
            .ok()
            .and_then(|(_, c)| {
                Some(c.subject().iter_common_name().next()?.as_str().ok()?.to_owned())
            })
            .unwrap_or_default();
        Ok((tls, Caller { role: Role::of(&leaf), name }))
    }
}

/// Checks each request against its caller's role (requests on the Unix
/// socket carry no [`Caller`] and pass).
pub async fn authorize(request: Request, next: Next) -> Response {
    let refuse =
        |reason: String| (StatusCode::FORBIDDEN, Json(json!({"error": reason}))).into_response();
    match request.extensions().get::<Caller>() {
        None => next.run(request).await,
        Some(Caller { role: None, name }) => refuse(format!(
            "the client certificate {name:?} is not an API identity (mint one with `policy-agent api-identity`)"
        )),
        Some(Caller { role: Some(Role::ReadOnly), name })
            if !matches!(*request.method(), Method::GET | Method::HEAD) =>
        {
            refuse(format!("{name:?} is a read-only API identity: {} is a write", request.method()))
        }
        Some(_) => next.run(request).await,
    }
}

fn hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::Role;

    #[test]
    fn exactly_one_known_api_role_makes_an_api_identity() {
        assert_eq!(Role::of_units(&["api:admin"]), Some(Role::Admin));
        assert_eq!(Role::of_units(&["team-x", "api:read-only"]), Some(Role::ReadOnly));
        assert_eq!(Role::of_units(&[]), None);
        assert_eq!(Role::of_units(&["app:web"]), None, "an instance identity");
        assert_eq!(Role::of_units(&["app:api:admin"]), None);
        assert_eq!(Role::of_units(&["api:root"]), None);
        // Two roles, in either order: neither counts.
        assert_eq!(Role::of_units(&["api:admin", "api:read-only"]), None);
        assert_eq!(Role::of_units(&["api:read-only", "api:admin"]), None);
        assert_eq!(Role::of_units(&["api:admin", "api:admin"]), None);
    }
}
