//! The policy server's internal API, as a cell polls it: HTTPS with the
//! cell's client certificate (mutual TLS), every step bounded by
//! `client_timeout`. One connection is kept open between requests (HTTP/1.1
//! keep-alive, as vxlan-policy-agent's Go client keeps one): a request on
//! a new mutual-TLS connection cost the client about 0.5 ms of CPU, on the
//! kept one about 0.03 ms (measured against the real policy server).
//! Failures name what to check: the file, the server's TLS alert, the
//! status it answered.

use std::{
    io::{BufReader, Write as _},
    net::{TcpStream, ToSocketAddrs as _},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use rustls::{
    AlertDescription, CertificateError, ClientConfig, ClientConnection, RootCertStore, StreamOwned,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _},
};

use super::{
    CfConfig,
    http::{self, ReadError},
    wire::PoliciesResponse,
};

/// The internal API's path prefix.
pub const INTERNAL_API: &str = "/networking/v1/internal";

/// The largest answer read from the policy server: a million policies are
/// about 170 MB of its JSON. A larger answer is refused, not read into
/// memory (a broken or hostile server cannot exhaust the agent's).
pub const MAX_ANSWER_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot use {key} {}: {cause}", path.display())]
    File { key: &'static str, path: PathBuf, cause: String },
    #[error("cannot reach the policy server at {url}: {cause}")]
    Connect { url: String, cause: std::io::Error },
    #[error(
        "the policy server at {url} refused this cell's client certificate {} (TLS alert {alert:?}) - is client_cert_file signed by the CA the policy server trusts, and still valid?",
        cert.display()
    )]
    Refused { url: String, cert: PathBuf, alert: AlertDescription },
    #[error(
        "the policy server at {url} presented a certificate that ca_cert_file {} did not sign",
        ca.display()
    )]
    UnknownCa { url: String, ca: PathBuf },
    #[error("the policy server's certificate does not name {host} (the host of {url})")]
    WrongName { url: String, host: String },
    #[error("TLS with the policy server at {url} failed: {cause}")]
    Tls { url: String, cause: rustls::Error },
    #[error("talking to the policy server at {url}: {cause}")]
    Io { url: String, cause: std::io::Error },
    #[error("the policy server at {url} answered HTTP {status} to GET {path}: {body}")]
    Status { url: String, path: String, status: u16, body: String },
    #[error("the policy server at {url} sent a malformed answer to GET {path}: {cause}")]
    Malformed { url: String, path: String, cause: String },
}

impl ServerError {
    /// A short label for metrics and status: what kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            ServerError::File { .. } => "files",
            ServerError::Connect { .. } | ServerError::Io { .. } => "unreachable",
            ServerError::Refused { .. } => "client_certificate_refused",
            ServerError::UnknownCa { .. } | ServerError::WrongName { .. } => "server_certificate",
            ServerError::Tls { .. } => "tls",
            ServerError::Status { status, .. } if *status >= 500 => "server_error",
            ServerError::Status { .. } => "refused",
            ServerError::Malformed { .. } => "malformed",
        }
    }
}

/// A connection to the policy server, read through a buffer (the framing
/// reads the head line by line).
type Connection = BufReader<StreamOwned<ClientConnection, TcpStream>>;

pub struct PolicyServerClient {
    url: String,
    authority: String,
    server_name: ServerName<'static>,
    config: Arc<ClientConfig>,
    timeout: Duration,
    ca: PathBuf,
    cert: PathBuf,
    /// The connection kept for the next request: none before the first
    /// and after any failure. Taken out for a request and put back after
    /// a whole answer, so no I/O happens under the lock (the pollers use
    /// a client from one thread at a time; two at once would each use a
    /// connection of their own).
    kept: Mutex<Option<Connection>>,
    /// TCP connections opened so far.
    connections_made: AtomicU64,
}

// The pollers each move their client to a thread of its own.
const _: () = {
    const fn shared<T: Send + Sync>() {}
    shared::<PolicyServerClient>()
};

impl PolicyServerClient {
    /// Reads the CA, the certificate and its key now, so that a missing
    /// or wrong file is named at start.
    pub fn new(cf: &CfConfig) -> Result<Self, ServerError> {
        let url = cf.policy_server_url.clone();
        let authority = url.trim_start_matches("https://").to_owned();
        let host = match authority.rsplit_once(':') {
            Some((host, _)) => host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            None => authority.clone(),
        };
        let server_name = ServerName::try_from(host.clone()).map_err(|_| ServerError::File {
            key: "policy_server_url",
            path: PathBuf::from(&url),
            cause: format!("{host:?} is not a host name or address"),
        })?;
        let mut roots = RootCertStore::empty();
        for ca in certs("ca_cert_file", &cf.ca_cert_file)? {
            roots.add(ca).map_err(|e| file_error("ca_cert_file", &cf.ca_cert_file, e))?;
        }
        let chain = certs("client_cert_file", &cf.client_cert_file)?;
        let key_pem = read("client_key_file", &cf.client_key_file)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .map_err(|e| file_error("client_key_file", &cf.client_key_file, e))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| file_error("client_cert_file", &cf.client_cert_file, e))?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| {
                file_error(
                    "client_cert_file",
                    &cf.client_cert_file,
                    format!(
                        "does not go with client_key_file {}: {e}",
                        cf.client_key_file.display()
                    ),
                )
            })?;
        Ok(Self {
            url,
            authority,
            server_name,
            config: Arc::new(config),
            timeout: cf.client_timeout,
            ca: cf.ca_cert_file.clone(),
            cert: cf.client_cert_file.clone(),
            kept: Mutex::new(None),
            connections_made: AtomicU64::new(0),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// How many TCP connections this client has opened: one for many
    /// requests while the server keeps it open.
    pub fn connections_made(&self) -> u64 {
        self.connections_made.load(Ordering::Relaxed)
    }

    /// `policies_last_updated`: when the server's policies last changed
    /// (a bare integer).
    pub fn last_updated(&self) -> Result<i64, ServerError> {
        let path = format!("{INTERNAL_API}/policies_last_updated");
        let body = self.get(&path)?;
        let text = String::from_utf8_lossy(&body);
        text.trim().parse().map_err(|_| self.malformed(&path, format!("not an integer: {text:?}")))
    }

    /// The policies whose source or destination is one of `ids`.
    pub fn policies(&self, ids: &[String]) -> Result<PoliciesResponse, ServerError> {
        let list: Vec<String> = ids.iter().map(|id| query_escape(id)).collect();
        let path = format!("{INTERNAL_API}/policies?id={}", list.join(","));
        let body = self.get(&path)?;
        serde_json::from_slice(&body).map_err(|e| self.malformed(&path, e.to_string()))
    }

    pub(super) fn malformed(&self, path: &str, cause: String) -> ServerError {
        ServerError::Malformed { url: self.url.clone(), path: path.to_owned(), cause }
    }

    /// One GET, on the kept connection if there is one; the body of a
    /// 200. A kept connection the server closed while it was idle (it
    /// may, at any time: RFC 9112 section 9.5) fails before a byte of the
    /// answer arrives; the request, a GET, goes once more on a new one
    /// (as section 9.3.1 allows). Any other failure is the request's,
    /// and the connection is dropped.
    pub(super) fn get(&self, path: &str) -> Result<Vec<u8>, ServerError> {
        let request = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: application/json\r\n\r\n",
            self.authority
        );
        let kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner).take();
        let (mut connection, answer) = match kept {
            Some(mut connection) => match exchange(&mut connection, &request) {
                Err(ReadError::NoAnswer(e)) if closed(&e) => self.exchange_anew(&request)?,
                answer => (connection, answer),
            },
            None => self.exchange_anew(&request)?,
        };
        let answer = match answer {
            Ok(answer) => answer,
            Err(ReadError::NoAnswer(e) | ReadError::Io(e)) => {
                return Err(self.explain(why_closed(connection.get_mut()).unwrap_or(e)));
            }
            Err(ReadError::Malformed(cause)) => return Err(self.malformed(path, cause)),
        };
        // Bytes past the answer were never asked for: the connection is
        // out of step.
        if answer.reusable && connection.buffer().is_empty() {
            *self.kept.lock().unwrap_or_else(PoisonError::into_inner) = Some(connection);
        }
        if answer.status != 200 {
            let body = String::from_utf8_lossy(&answer.body).chars().take(300).collect();
            return Err(ServerError::Status {
                url: self.url.clone(),
                path: path.to_owned(),
                status: answer.status,
                body,
            });
        }
        Ok(answer.body)
    }

    /// `request` on a new connection.
    fn exchange_anew(
        &self,
        request: &str,
    ) -> Result<(Connection, Result<http::Answer, ReadError>), ServerError> {
        let mut connection = BufReader::new(self.connect()?);
        let answer = exchange(&mut connection, request);
        Ok((connection, answer))
    }

    fn connect(&self) -> Result<StreamOwned<ClientConnection, TcpStream>, ServerError> {
        let connect_error = |cause| ServerError::Connect { url: self.url.clone(), cause };
        let addrs = self.authority.to_socket_addrs().map_err(connect_error)?;
        let mut last = std::io::Error::new(std::io::ErrorKind::NotFound, "no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, self.timeout) {
                Ok(tcp) => {
                    self.connections_made.fetch_add(1, Ordering::Relaxed);
                    tcp.set_read_timeout(Some(self.timeout)).map_err(connect_error)?;
                    tcp.set_write_timeout(Some(self.timeout)).map_err(connect_error)?;
                    let tls = ClientConnection::new(self.config.clone(), self.server_name.clone())
                        .map_err(|cause| ServerError::Tls { url: self.url.clone(), cause })?;
                    return Ok(StreamOwned::new(tls, tcp));
                }
                Err(e) => last = e,
            }
        }
        Err(connect_error(last))
    }

    /// An I/O failure on the connection, as what TLS says it is.
    fn explain(&self, e: std::io::Error) -> ServerError {
        let url = self.url.clone();
        let Some(tls) = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
            return ServerError::Io { url, cause: e };
        };
        match tls {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                ServerError::UnknownCa { url, ca: self.ca.clone() }
            }
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => ServerError::WrongName { url, host: self.server_name.to_str().into_owned() },
            rustls::Error::AlertReceived(alert) => {
                ServerError::Refused { url, cert: self.cert.clone(), alert: *alert }
            }
            other => ServerError::Tls { url, cause: other.clone() },
        }
    }
}

/// After a failed write or read: what the server said before it closed.
/// In TLS 1.3 the client's handshake ends before the server has checked
/// the client's certificate; a server refusing it sends an alert and
/// closes, and the request being written meets a closed connection
/// (EPIPE) while the alert waits to be read.
fn why_closed(stream: &mut StreamOwned<ClientConnection, TcpStream>) -> Option<std::io::Error> {
    let StreamOwned { conn, sock } = stream;
    while conn.read_tls(sock).ok()? > 0 {
        if let Err(e) = conn.process_new_packets() {
            return Some(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
        }
    }
    None
}

/// Writes `request` and reads its answer, at most [`MAX_ANSWER_BYTES`]
/// of body. A request that cannot be written has no answer either.
fn exchange(connection: &mut Connection, request: &str) -> Result<http::Answer, ReadError> {
    let stream = connection.get_mut();
    stream
        .write_all(request.as_bytes())
        .and_then(|()| stream.flush())
        .map_err(ReadError::NoAnswer)?;
    http::read_answer(connection, MAX_ANSWER_BYTES)
}

/// Whether `e` says the server had closed the connection: the end of it
/// (with TLS's close_notify or without), or a reset. Not a timeout: a
/// server that does not answer in time is not asked twice.
fn closed(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe)
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, ServerError> {
    std::fs::read(path).map_err(|e| file_error(key, path, e))
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, ServerError> {
    let pem = read(key, path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| file_error(key, path, e))?;
    if certs.is_empty() {
        return Err(file_error(key, path, "holds no PEM certificate"));
    }
    Ok(certs)
}

fn file_error(key: &'static str, path: &Path, cause: impl std::fmt::Display) -> ServerError {
    ServerError::File { key, path: path.to_path_buf(), cause: cause.to_string() }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub(super) fn query_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_escaped() {
        assert_eq!(query_escape("app-a_1.x~"), "app-a_1.x~");
        assert_eq!(query_escape("a,b c&d"), "a%2Cb%20c%26d");
    }
}
