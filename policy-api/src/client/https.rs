//! The client's HTTPS transport (feature `tls`): the agent's TCP API
//! (`listen`) with an API identity — a client certificate and key minted
//! by `policy-agent api-identity` — and the agent's certificate checked
//! against its platform CA (`--cacert`).
//! Failures say which side refused what, and what to check.

use std::{
    io::{Read, Write},
    net::TcpStream,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, RootCertStore, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};

/// How long to wait for the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum HttpsError {
    #[error("--server {server:?} {why}")]
    Server { server: String, why: &'static str },
    #[error("cannot read the {what} {}: {cause}", path.display())]
    Read { what: &'static str, path: PathBuf, cause: std::io::Error },
    #[error("{} holds no {what} (PEM)", path.display())]
    NoPem { what: &'static str, path: PathBuf },
    #[error("{} is not a CA certificate: {cause}", path.display())]
    BadCa { path: PathBuf, cause: rustls::Error },
    #[error(
        "the client certificate {} and key {} cannot be used together: {cause} - are they one identity from `policy-agent api-identity`?",
        cert.display(), key.display()
    )]
    Identity { cert: PathBuf, key: PathBuf, cause: rustls::Error },
    #[error(
        "cannot reach the agent at {server}: {cause} - is this the agent's `listen` address, and the port open?"
    )]
    Connect { server: String, cause: std::io::Error },
    #[error(
        "the agent at {server} presented a certificate that {} did not sign (unknown CA) - is --cacert that agent's platform CA (the CA bundle `api-identity` names)?",
        cacert.display()
    )]
    UnknownCa { server: String, cacert: PathBuf },
    #[error(
        "the agent at {server} presented a certificate that does not name {host} - connect by its `listen` address, localhost or its host name"
    )]
    WrongName { server: String, host: String },
    #[error(
        "the agent at {server} rejected this client certificate (TLS alert {alert:?}) - is this identity from this agent's platform CA?"
    )]
    Rejected { server: String, alert: AlertDescription },
    #[error("TLS with the agent at {server} failed: {cause}")]
    Handshake { server: String, cause: rustls::Error },
}

/// The files of an API identity and the CA that signs the agent's
/// certificate.
#[derive(Clone, Debug)]
pub struct Identity {
    /// The client certificate (`NAME.pem`).
    pub cert: PathBuf,
    /// Its key (`NAME-key.pem`).
    pub key: PathBuf,
    /// The agent's platform CA bundle (its `ca.pem`).
    pub cacert: PathBuf,
}

/// An agent's TCP API and the identity to use it with.
pub struct Https {
    url: String,
    /// `HOST:PORT`: where to connect, and the `Host` header.
    authority: String,
    host: String,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
    cacert: PathBuf,
}

impl Https {
    /// `server` is `https://HOST:PORT` (a trailing `/` is taken; IPv6
    /// hosts in brackets). Reads the identity and the CA now, so that a
    /// missing or wrong file is named before anything is sent.
    pub fn new(server: &str, identity: &Identity) -> Result<Self, HttpsError> {
        let (authority, host) = parse_server(server)?;
        let server_name = ServerName::try_from(host.clone()).map_err(|_| HttpsError::Server {
            server: server.to_owned(),
            why: "has no valid host",
        })?;
        let mut roots = RootCertStore::empty();
        for ca in pem_certs("CA certificate (--cacert)", &identity.cacert)? {
            roots
                .add(ca)
                .map_err(|cause| HttpsError::BadCa { path: identity.cacert.clone(), cause })?;
        }
        let certs = pem_certs("client certificate (--cert)", &identity.cert)?;
        let key_pem = read("client key (--key)", &identity.key)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| HttpsError::NoPem {
            what: "private key (--key)",
            path: identity.key.clone(),
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let identity_error = |cause| HttpsError::Identity {
            cert: identity.cert.clone(),
            key: identity.key.clone(),
            cause,
        };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(identity_error)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(identity_error)?;
        Ok(Self {
            url: format!("https://{authority}"),
            authority,
            host,
            server_name,
            config: Arc::new(config),
            cacert: identity.cacert.clone(),
        })
    }

    /// `https://HOST:PORT`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// `HOST:PORT`.
    pub fn authority(&self) -> &str {
        &self.authority
    }

    pub(super) fn connect(&self, timeout: Option<Duration>) -> Result<HttpsStream, HttpsError> {
        let connect_error = |cause| HttpsError::Connect { server: self.url.clone(), cause };
        let addrs = std::net::ToSocketAddrs::to_socket_addrs(&self.authority.as_str())
            .map_err(connect_error)?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(tcp) => {
                    tcp.set_read_timeout(timeout).map_err(connect_error)?;
                    let tls = ClientConnection::new(self.config.clone(), self.server_name.clone())
                        .map_err(|cause| HttpsError::Handshake {
                            server: self.url.clone(),
                            cause,
                        })?;
                    return Ok(HttpsStream(StreamOwned::new(tls, tcp)));
                }
                Err(e) => last = e,
            }
        }
        Err(connect_error(last))
    }

    /// An I/O failure on the connection, as what TLS says it is: the
    /// agent's certificate refused here, or this identity refused there
    /// (in TLS 1.3 that alert arrives on the first read).
    pub(super) fn explain(&self, e: std::io::Error) -> super::ClientError {
        let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
            return e.into();
        };
        let server = self.url.clone();
        let explained = match tls {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                HttpsError::UnknownCa { server, cacert: self.cacert.clone() }
            }
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => HttpsError::WrongName { server, host: self.host.clone() },
            rustls::Error::AlertReceived(
                alert @ (AlertDescription::BadCertificate
                | AlertDescription::UnknownCA
                | AlertDescription::CertificateUnknown
                | AlertDescription::CertificateRequired
                | AlertDescription::CertificateExpired
                | AlertDescription::CertificateRevoked
                | AlertDescription::UnsupportedCertificate
                | AlertDescription::AccessDenied
                | AlertDescription::DecryptError),
            ) => HttpsError::Rejected { server, alert: *alert },
            other => HttpsError::Handshake { server, cause: other.clone() },
        };
        explained.into()
    }
}

/// A TLS connection to the agent. The agent ends its replies with
/// `close_notify`; a connection cut without one reads as the end (the
/// body is JSON, so a cut one does not parse).
pub(super) struct HttpsStream(StreamOwned<ClientConnection, TcpStream>);

impl Read for HttpsStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
            other => other,
        }
    }
}

impl Write for HttpsStream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf).map_err(|e| self.why_closed().unwrap_or(e))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush().map_err(|e| self.why_closed().unwrap_or(e))
    }
}

impl HttpsStream {
    /// After a failed write: what the agent said before it closed. In TLS
    /// 1.3 the client's handshake ends before the agent has checked its
    /// certificate; an agent refusing it sends an alert and closes, and the
    /// request being written then meets a closed connection (EPIPE) while
    /// the alert waits to be read.
    fn why_closed(&mut self) -> Option<std::io::Error> {
        let StreamOwned { conn, sock } = &mut self.0;
        while conn.read_tls(sock).ok()? > 0 {
            if let Err(e) = conn.process_new_packets() {
                return Some(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
            }
        }
        None
    }
}

/// `https://HOST:PORT[/]` → (`HOST:PORT`, `HOST` without brackets).
fn parse_server(server: &str) -> Result<(String, String), HttpsError> {
    let bad = |why| HttpsError::Server { server: server.to_owned(), why };
    if server.starts_with("http://") {
        return Err(bad(
            "is plain HTTP: the agent's TCP API is HTTPS with client certificates (https://HOST:PORT)",
        ));
    }
    let rest = server.strip_prefix("https://").ok_or_else(|| bad("is not https://HOST:PORT"))?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains('/') || authority.contains('@') {
        return Err(bad("is not https://HOST:PORT (no path, no user)"));
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => (host, port),
        _ => {
            return Err(bad(
                "has no port: give the port of the agent's `listen` (https://HOST:PORT)",
            ));
        }
    };
    if port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(bad("has no valid port (1-65535)"));
    }
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if host.is_empty() {
        return Err(bad("has no host"));
    }
    Ok((authority.to_owned(), host.to_owned()))
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, HttpsError> {
    std::fs::read(path).map_err(|cause| HttpsError::Read { what, path: path.to_owned(), cause })
}

fn pem_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, HttpsError> {
    let pem = read(what, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(HttpsError::NoPem { what, path: path.to_owned() });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_are_https_host_port() {
        let ok = |s: &str| parse_server(s).unwrap();
        assert_eq!(ok("https://10.0.0.1:8443"), ("10.0.0.1:8443".into(), "10.0.0.1".into()));
        assert_eq!(ok("https://cell-0:8443/"), ("cell-0:8443".into(), "cell-0".into()));
        assert_eq!(ok("https://[fd00::1]:8443"), ("[fd00::1]:8443".into(), "fd00::1".into()));
        for (server, says) in [
            ("http://10.0.0.1:8443", "plain HTTP"),
            ("10.0.0.1:8443", "not https://"),
            ("https://10.0.0.1", "no port"),
            ("https://[fd00::1]", "no port"),
            ("https://10.0.0.1:0", "valid port"),
            ("https://10.0.0.1:8443/v1", "no path"),
            ("https://:8443", "no host"),
        ] {
            let e = parse_server(server).unwrap_err().to_string();
            assert!(e.contains(says), "{server}: {e}");
        }
    }

    #[test]
    fn missing_files_are_named() {
        let identity = Identity {
            cert: "/nonexistent/admin.pem".into(),
            key: "/nonexistent/admin-key.pem".into(),
            cacert: "/nonexistent/ca.pem".into(),
        };
        let e = Https::new("https://127.0.0.1:8443", &identity).err().unwrap().to_string();
        assert!(e.contains("CA certificate (--cacert) /nonexistent/ca.pem"), "{e}");
        let not_pem = Identity { cacert: "/etc/hostname".into(), ..identity };
        let e = Https::new("https://127.0.0.1:8443", &not_pem).err().unwrap().to_string();
        assert!(e.contains("/etc/hostname holds no CA certificate"), "{e}");
    }
}
