//! What a client may hold of the agent: connections per listener and per
//! source address, time to send a request, memory for request bodies; and
//! accept loops that back off when the process runs out of descriptors
//! instead of spinning. A container can exhaust only its own share.
//!
//! ```toml
//! [limits]
//! api_connections = 256          # API (socket and TCP), at once
//! dns_tcp_connections = 256      # DNS over TCP
//! tls_connections = 1024         # each 61443 listener
//! metrics_connections = 16
//! per_source_connections = 32    # from one address, on any TCP listener
//! header_timeout_seconds = 10    # request headers, and idle keep-alive
//! request_timeout_seconds = 30   # a request body
//! body_budget_bytes = 33554432   # request bodies held in memory at once
//! ```

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::warn;

/// `[limits]` in the configuration.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    pub api_connections: usize,
    pub dns_tcp_connections: usize,
    pub tls_connections: usize,
    pub metrics_connections: usize,
    pub per_source_connections: usize,
    pub header_timeout_seconds: u64,
    pub request_timeout_seconds: u64,
    pub body_budget_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            api_connections: 256,
            dns_tcp_connections: 256,
            tls_connections: 1024,
            metrics_connections: 16,
            per_source_connections: 32,
            header_timeout_seconds: 10,
            request_timeout_seconds: 30,
            body_budget_bytes: 32 << 20,
        }
    }
}

impl Limits {
    pub fn header_timeout(&self) -> Duration {
        Duration::from_secs(self.header_timeout_seconds.max(1))
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds.max(1))
    }
}

/// Admits connections to one listener: at most `total` at once, and at
/// most `per_source` from one address.
pub struct Gate {
    name: &'static str,
    total: usize,
    per_source: usize,
    open: Mutex<(usize, HashMap<IpAddr, usize>)>,
    refused: AtomicU64,
    last_warned: Mutex<Option<Instant>>,
}

/// One admitted connection; its place is given back on drop.
pub struct Ticket {
    gate: Arc<Gate>,
    source: Option<IpAddr>,
}

impl Gate {
    pub fn new(name: &'static str, total: usize, per_source: usize) -> Arc<Self> {
        Arc::new(Self {
            name,
            total: total.max(1),
            per_source: per_source.max(1),
            open: Mutex::new((0, HashMap::new())),
            refused: AtomicU64::new(0),
            last_warned: Mutex::new(None),
        })
    }

    /// A ticket for a connection from `source` (None: a Unix socket peer),
    /// or None when the listener or the source is at its limit.
    pub fn admit(self: &Arc<Self>, source: Option<IpAddr>) -> Option<Ticket> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_source = source.map_or(0, |ip| open.1.get(&ip).copied().unwrap_or(0));
        if open.0 >= self.total || (source.is_some() && from_source >= self.per_source) {
            drop(open);
            self.refused.fetch_add(1, Ordering::Relaxed);
            self.warn_refused(source);
            return None;
        }
        open.0 += 1;
        if let Some(ip) = source {
            *open.1.entry(ip).or_default() += 1;
        }
        Some(Ticket { gate: self.clone(), source })
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).0
    }

    /// Connections refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    fn warn_refused(&self, source: Option<IpAddr>) {
        let mut last = self.last_warned.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            *last = Some(Instant::now());
            warn!(
                listener = self.name,
                source = ?source,
                limit = self.total,
                per_source = self.per_source,
                refused = self.refused(),
                "connection refused: at the connection limit"
            );
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 -= 1;
        if let Some(ip) = self.source
            && let Some(n) = open.1.get_mut(&ip)
        {
            *n -= 1;
            if *n == 0 {
                open.1.remove(&ip);
            }
        }
    }
}

/// Pauses an accept loop after errors that say the process or the system
/// is out of something (descriptors, buffers, memory): 10 ms doubling to 1 s,
/// reset by the next successful accept. Per-connection errors (a client
/// that reset before it was accepted) do not pause.
#[derive(Default)]
pub struct Backoff {
    next: Option<Duration>,
    last_warned: Option<Instant>,
}

impl Backoff {
    /// Call with every accept result; returns the accepted value, or None
    /// after sleeping as long as the error calls for.
    pub async fn accepted<T>(&mut self, listener: &str, result: io::Result<T>) -> Option<T> {
        match result {
            Ok(v) => {
                self.next = None;
                Some(v)
            }
            Err(e) => {
                let pause = self.pause(&e)?;
                if self.last_warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    self.last_warned = Some(Instant::now());
                    warn!(listener, error = %e, pause_ms = pause.as_millis() as u64, "cannot accept connections; pausing");
                }
                tokio::time::sleep(pause).await;
                None
            }
        }
    }

    /// How long to pause after `e` (None: go on at once).
    fn pause(&mut self, e: &io::Error) -> Option<Duration> {
        let resource = matches!(
            e.raw_os_error(),
            Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
        );
        if !resource {
            return None;
        }
        let pause = self.next.unwrap_or(Duration::from_millis(10));
        self.next = Some((pause * 2).min(Duration::from_secs(1)));
        Some(pause)
    }
}

/// A listener the HTTP server accepts from.
pub trait Accept: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    /// The next connection and its source address (None for a Unix socket).
    fn accept_one(&self) -> impl Future<Output = io::Result<(Self::Io, Option<IpAddr>)>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Io = tokio::net::TcpStream;
    async fn accept_one(&self) -> io::Result<(Self::Io, Option<IpAddr>)> {
        let (s, peer) = self.accept().await?;
        Ok((s, Some(peer.ip())))
    }
}

impl Accept for tokio::net::UnixListener {
    type Io = tokio::net::UnixStream;
    async fn accept_one(&self) -> io::Result<(Self::Io, Option<IpAddr>)> {
        Ok((self.accept().await?.0, None))
    }
}

/// What happens on a connection before HTTP: nothing ([`Plain`]) or a TLS
/// handshake that also says who the client is. The `Caller` is put in
/// every request's extensions.
pub trait Handshake<I>: Clone + Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    type Caller: Clone + Send + Sync + 'static;
    fn handshake(&self, io: I)
    -> impl Future<Output = io::Result<(Self::Io, Self::Caller)>> + Send;
}

/// No handshake: HTTP on the connection as accepted.
#[derive(Clone)]
pub struct Plain;

impl<I: AsyncRead + AsyncWrite + Unpin + Send + 'static> Handshake<I> for Plain {
    type Io = I;
    type Caller = ();
    async fn handshake(&self, io: I) -> io::Result<(I, ())> {
        Ok((io, ()))
    }
}

/// Serves `router` over HTTP/1.1 on `listener` within `gate`, the handshake
/// and headers (and idle keep-alive) within `header_timeout`, until `stop`;
/// then gives open connections 5 s to finish.
pub async fn serve_http<L: Accept, H: Handshake<L::Io>>(
    name: &'static str,
    listener: L,
    handshake: H,
    router: axum::Router,
    gate: Arc<Gate>,
    header_timeout: Duration,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    use hyper_util::{rt::TokioIo, rt::TokioTimer, service::TowerToHyperService};
    let mut backoff = Backoff::default();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept_one() => accepted,
            () = stopped(stop.clone()) => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
        };
        let Some((io, source)) = backoff.accepted(name, accepted).await else { continue };
        let Some(ticket) = gate.admit(source) else { continue }; // dropped: closed
        let (router, stop, handshake) = (router.clone(), stop.clone(), handshake.clone());
        connections.spawn(async move {
            let _ticket = ticket;
            let Ok(Ok((io, caller))) =
                tokio::time::timeout(header_timeout, handshake.handshake(io)).await
            else {
                return;
            };
            let service = TowerToHyperService::new(router.layer(axum::Extension(caller)));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(TokioIo::new(io), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stopped(stop) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(6), async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// Resolves when `stop` turns true (or its sender is gone).
async fn stopped(mut stop: tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gate_holds_its_totals_and_each_source_to_its_share() {
        let gate = Gate::new("test", 3, 2);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let a1 = gate.admit(Some(a)).unwrap();
        let _a2 = gate.admit(Some(a)).unwrap();
        assert!(gate.admit(Some(a)).is_none(), "a's share is used");
        let _b1 = gate.admit(Some(b)).unwrap();
        assert!(gate.admit(Some(b)).is_none(), "the listener is full");
        assert!(gate.admit(None).is_none());
        drop(a1);
        assert_eq!(gate.open(), 2);
        assert!(gate.admit(Some(a)).is_some(), "a place given back is taken again");
        assert_eq!(gate.refused(), 3);
    }

    #[test]
    fn accept_pauses_only_when_out_of_resources() {
        let mut b = Backoff::default();
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let reset = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(b.pause(&reset), None);
        assert_eq!(b.pause(&emfile), Some(Duration::from_millis(10)));
        assert_eq!(b.pause(&emfile), Some(Duration::from_millis(20)));
        for _ in 0..10 {
            b.pause(&emfile);
        }
        assert_eq!(b.pause(&emfile), Some(Duration::from_secs(1)));
    }
}
