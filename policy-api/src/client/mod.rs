//! A small blocking HTTP/1.1 client for the agent's API (what the CLI
//! verbs and the CNI plugin use). One request per connection, over the
//! agent's Unix socket or — with the `tls` feature — over HTTPS to its TCP
//! API (`listen`) with an API identity (`policy-agent api-identity`).

pub mod http;
#[cfg(feature = "tls")]
pub mod https;

use std::{
    fmt,
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

/// How long a reply may take (a write waits for the kernel and the store;
/// in cluster mode for etcd).
const REPLY_TIMEOUT: Duration = Duration::from_secs(60);

// The I/O errors are named in the messages, not chained as sources: the
// CLI prints the chain (`{:#}`), the CNI plugin only the message.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the agent at {}: {cause} - is `policy-agent run` running?", socket.display())]
    Connect { socket: PathBuf, cause: std::io::Error },
    #[error("talking to the agent: {0}")]
    Io(std::io::Error),
    #[error("the agent sent a malformed response: {0}")]
    Malformed(String),
    #[cfg(feature = "tls")]
    #[error(transparent)]
    Https(#[from] https::HttpsError),
}

impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        Self::Io(e)
    }
}

/// Where the agent's API is.
pub enum Transport {
    /// The agent's Unix socket (no identity: the socket's mode decides).
    Unix(PathBuf),
    /// The agent's TCP API: HTTPS with an API identity.
    #[cfg(feature = "tls")]
    Https(https::Https),
}

impl fmt::Display for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Transport::Unix(socket) => write!(f, "{}", socket.display()),
            #[cfg(feature = "tls")]
            Transport::Https(https) => write!(f, "{}", https.url()),
        }
    }
}

pub struct Client {
    transport: Transport,
}

/// A response: HTTP status and JSON body.
pub struct Response {
    pub status: u16,
    pub body: Value,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The error message of a failed request.
    pub fn error(&self) -> String {
        self.body
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| self.body.to_string())
    }
}

/// A connection to the agent, either kind.
trait Connection: Read + Write {}
impl<T: Read + Write> Connection for T {}

impl Client {
    /// A client of the agent's Unix socket.
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self { transport: Transport::Unix(socket.into()) }
    }

    pub fn with_transport(transport: Transport) -> Self {
        Self { transport }
    }

    /// Where this client talks to (a socket's path, a server's URL).
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// The socket this client talks to (None: a remote agent).
    pub fn socket(&self) -> Option<&Path> {
        match &self.transport {
            Transport::Unix(socket) => Some(socket),
            #[cfg(feature = "tls")]
            Transport::Https(_) => None,
        }
    }

    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Response, ClientError> {
        let exchanged = self
            .connect(Some(REPLY_TIMEOUT))
            .and_then(|stream| http::exchange(stream, self.host(), method, path, body));
        exchanged.map_err(|e| self.explain(e))
    }

    /// [`Self::request`] with the body's JSON already written out (a bulk
    /// load whose requests are made before it starts).
    pub fn request_bytes(
        &self,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<Response, ClientError> {
        let exchanged = self
            .connect(Some(REPLY_TIMEOUT))
            .and_then(|stream| http::exchange_bytes(stream, self.host(), method, path, body));
        exchanged.map_err(|e| self.explain(e))
    }

    /// `GET path`, calling `on_line` with each line of the body as it
    /// arrives (a streamed, chunked response) until the server ends it or
    /// `on_line` returns false. Returns the HTTP status.
    pub fn stream_lines(
        &self,
        path: &str,
        on_line: impl FnMut(&str) -> bool,
    ) -> Result<u16, ClientError> {
        let streamed = self
            .connect(None)
            .and_then(|stream| http::stream_lines(stream, self.host(), "GET", path, None, on_line));
        streamed.map_err(|e| self.explain(e))
    }

    fn connect(&self, timeout: Option<Duration>) -> Result<Box<dyn Connection>, ClientError> {
        match &self.transport {
            Transport::Unix(socket) => {
                let stream = UnixStream::connect(socket)
                    .map_err(|cause| ClientError::Connect { socket: socket.clone(), cause })?;
                stream.set_read_timeout(timeout)?;
                Ok(Box::new(stream))
            }
            #[cfg(feature = "tls")]
            Transport::Https(https) => Ok(Box::new(https.connect(timeout)?)),
        }
    }

    /// The `Host` header.
    fn host(&self) -> &str {
        match &self.transport {
            Transport::Unix(_) => "localhost",
            #[cfg(feature = "tls")]
            Transport::Https(https) => https.authority(),
        }
    }

    /// A failure as its transport knows it (a TLS alert the agent sent,
    /// say, arrives as an I/O error on the first read).
    fn explain(&self, e: ClientError) -> ClientError {
        match (&self.transport, e) {
            #[cfg(feature = "tls")]
            (Transport::Https(https), ClientError::Io(e)) => https.explain(e),
            (_, e) => e,
        }
    }
}
