//! The per-instance 61443 listeners: made in each container's network
//! namespace, terminating TLS and forwarding plaintext to the app port (or,
//! with client certificates, HTTP/1.1 requests carrying the verified source
//! app).

use std::{
    collections::BTreeMap,
    fs::{self, File},
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use base64::Engine as _;
use hyper::{Request, body::Incoming};
use hyper_util::rt::TokioIo;
use rustls::{
    ServerConfig,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use super::{
    CLIENT_CERT_HEADER, ClientAuth, PlatformCa, SOURCE_APP_HEADER, TLS_PORT, TlsError, Trust,
    client_auth::client_verifier, identity_app, io,
};
use crate::{
    limits::{Backoff, Gate},
    state::{Endpoint, State},
};

/// Serves the current certificate of one instance; swapped on re-issue.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// What one instance's listener serves.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Wanted {
    app: String,
    /// The instance's addresses, IPv4 first (see [`Endpoint::addresses`]):
    /// a listener and a SAN each.
    addresses: Vec<IpAddr>,
    netns: PathBuf,
    hostnames: Vec<String>,
    app_port: u16,
    client_auth: bool,
}

struct Running {
    wanted: Wanted,
    /// When the certificate and the instance identity are re-issued.
    renew_at: Instant,
    cert: Arc<CurrentCert>,
    task: JoinHandle<()>,
}

/// The per-instance listeners.
pub struct TlsProxies {
    ca: Arc<PlatformCa>,
    /// The CAs client certificates of `mtls_apps` may come from.
    trust: Arc<Trust>,
    /// Where each instance's port mapping is written (`<ip>.json`).
    instances_dir: PathBuf,
    client_auth: ClientAuth,
    /// Connections per listener and per source.
    connections: (usize, usize),
    running: Mutex<Listeners>,
    /// Generations handed out by [`TlsProxies::wanted`].
    generation: AtomicU64,
}

#[derive(Default)]
struct Listeners {
    /// The generation of the newest [`Wants`] applied.
    applied: u64,
    by_ip: BTreeMap<IpAddr, Running>,
}

/// The listeners a state wants, taken under the agent's lock and applied
/// after it is released ([`TlsProxies::apply`]): opening namespaces and
/// binding sockets never happens while the state is locked.
pub struct Wants {
    generation: u64,
    by_ip: BTreeMap<IpAddr, Wanted>,
}

/// An instance's ports in the shape of Cloud Foundry's `CF_INSTANCE_PORTS`,
/// with the paths of its identity (`CF_INSTANCE_CERT`, `CF_INSTANCE_KEY`).
pub fn instance_ports(ip: IpAddr, app_port: u16, (cert, key): (&Path, &Path)) -> serde_json::Value {
    serde_json::json!({
        "CF_INSTANCE_IP": ip.to_string(),
        "CF_INSTANCE_PORTS": [{"internal": app_port, "internal_tls_proxy": TLS_PORT}],
        "CF_INSTANCE_CERT": cert,
        "CF_INSTANCE_KEY": key,
    })
}

impl TlsProxies {
    pub fn new(
        ca: Arc<PlatformCa>,
        trust: Arc<Trust>,
        instances_dir: PathBuf,
        client_auth: ClientAuth,
        limits: &crate::limits::Limits,
    ) -> Self {
        Self {
            ca,
            trust,
            instances_dir,
            client_auth,
            connections: (limits.tls_connections, limits.per_source_connections),
            running: Mutex::new(Listeners::default()),
            generation: AtomicU64::new(0),
        }
    }

    fn ports_file(&self, ip: IpAddr) -> PathBuf {
        self.instances_dir.join(format!("{ip}.json"))
    }

    /// Where an instance's identity certificate and key are written.
    pub fn identity_files(&self, ip: IpAddr) -> (PathBuf, PathBuf) {
        (
            self.instances_dir.join(format!("{ip}-cert.pem")),
            self.instances_dir.join(format!("{ip}-key.pem")),
        )
    }

    /// Writes the instance's identity and port mapping where the container
    /// can read them (each file replaced whole; the key mode 0600).
    fn write_instance(&self, ip: IpAddr, want: &Wanted) -> Result<(), TlsError> {
        let dir = &self.instances_dir;
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let identity = self.ca.issue_identity(&want.app, &want.addresses)?;
        let (cert, key) = self.identity_files(ip);
        let ports = instance_ports(ip, want.app_port, (&cert, &key)).to_string();
        for (path, text, mode) in [
            (&key, &identity.key_pem, 0o600),
            (&cert, &identity.cert_pem, 0o644),
            (&self.ports_file(ip), &ports, 0o644),
        ] {
            policy_api::files::replace_unsynced(path, text.as_bytes(), mode)
                .map_err(io("write", path))?;
        }
        Ok(())
    }

    /// Writes the identity and port mapping of `endpoint`, which is about
    /// to be registered, if it will have a listener: so a registration
    /// whose identity cannot be stored (a full disk) is refused before
    /// anything changes. The listener's start writes them again.
    pub fn prepare(&self, endpoint: &Endpoint, state: &State) -> Result<(), TlsError> {
        let (Some(front), Some(netns)) = (state.tls_front(&endpoint.app), &endpoint.netns) else {
            return Ok(());
        };
        let want = Wanted {
            app: endpoint.app.to_string(),
            addresses: endpoint.addresses().collect(),
            netns: netns.clone(),
            hostnames: Vec::new(),
            app_port: front.app_port,
            client_auth: false,
        };
        self.write_instance(endpoint.ip, &want).inspect_err(|_| self.remove_instance(endpoint.ip))
    }

    /// Undoes [`prepare`](Self::prepare) after a refused registration,
    /// unless a listener already serves the address.
    pub fn unprepare(&self, ip: IpAddr) {
        let listeners = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if !listeners.by_ip.contains_key(&ip) {
            self.remove_instance(ip);
        }
    }

    fn remove_instance(&self, ip: IpAddr) {
        let (cert, key) = self.identity_files(ip);
        for path in [self.ports_file(ip), cert, key] {
            let _ = fs::remove_file(path);
        }
    }

    pub fn bundle(&self) -> &Path {
        self.ca.bundle()
    }

    /// What the state wants: one listener per local endpoint that has a
    /// network namespace and a TLS front. Cheap; take it under the agent's
    /// lock (its generation orders it against other writes) and
    /// [`apply`](Self::apply) it after.
    pub fn wanted(&self, state: &State) -> Wants {
        let mut routes_of: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (host, app) in state.routes() {
            routes_of.entry(app.as_str()).or_default().push(host.clone());
        }
        let by_ip: BTreeMap<IpAddr, Wanted> = state
            .local_endpoints()
            .filter_map(|e| {
                Some((
                    e.ip,
                    Wanted {
                        app: e.app.to_string(),
                        addresses: e.addresses().collect(),
                        netns: e.netns.clone()?,
                        hostnames: routes_of.get(e.app.as_str()).cloned().unwrap_or_default(),
                        app_port: state.tls_front(&e.app)?.app_port,
                        client_auth: self.client_auth.apps.contains(e.app.as_str()),
                    },
                ))
            })
            .collect();
        Wants { generation: self.generation.fetch_add(1, Ordering::SeqCst) + 1, by_ip }
    }

    /// Brings the listeners in line with `wants`: certificates re-issued
    /// where the app's routes changed. Call from the async runtime, without
    /// the agent's lock; wants older than ones already applied are skipped.
    pub fn apply(&self, wants: Wants) {
        let mut listeners = self.running.lock().unwrap_or_else(|p| p.into_inner());
        if wants.generation < listeners.applied {
            return; // a newer state was applied already
        }
        listeners.applied = wants.generation;
        let wanted = wants.by_ip;
        let running = &mut listeners.by_ip;
        running.retain(|ip, r| {
            let keep = wanted.get(ip).is_some_and(|w| {
                w.netns == r.wanted.netns
                    && w.app == r.wanted.app
                    && w.addresses == r.wanted.addresses
                    && w.app_port == r.wanted.app_port
                    && w.client_auth == r.wanted.client_auth
            });
            if !keep {
                r.task.abort();
                self.remove_instance(*ip);
                info!(%ip, "TLS listener stopped");
            }
            keep
        });
        for (ip, want) in wanted {
            if let Some(r) = running.get_mut(&ip) {
                if r.wanted.hostnames != want.hostnames {
                    match self.ca.issue(&want.app, &want.hostnames, &want.addresses) {
                        Ok(cert) => {
                            *r.cert.0.write().unwrap_or_else(|p| p.into_inner()) = cert;
                            info!(%ip, app = want.app, names = ?want.hostnames, "certificate re-issued");
                            r.wanted = want;
                        }
                        Err(e) => warn!(%ip, error = %e, "cannot re-issue the certificate"),
                    }
                }
                continue;
            }
            match self.start(ip, &want) {
                Ok(mut r) => {
                    if let Err(e) = self.write_instance(ip, &want) {
                        // Due now: `rotate_due` writes it once it can.
                        warn!(%ip, error = %e, "cannot write the instance's identity and ports; trying again");
                        r.renew_at = Instant::now();
                    }
                    running.insert(ip, r);
                }
                Err(e) => {
                    warn!(%ip, netns = %want.netns.display(), error = %e, "cannot start the TLS listener")
                }
            }
        }
    }

    fn start(&self, ip: IpAddr, want: &Wanted) -> Result<Running, TlsError> {
        // Opened and checked once; the connections' upstream sockets are
        // made in it through this descriptor.
        let ns = Arc::new(policy_api::netns::open(&want.netns).map_err(|e| {
            io("open", &want.netns)(std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
        })?);
        let cert = Arc::new(CurrentCert(RwLock::new(self.ca.issue(
            &want.app,
            &want.hostnames,
            &want.addresses,
        )?)));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder =
            ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
        let builder = if want.client_auth {
            builder.with_client_cert_verifier(client_verifier(
                &self.trust,
                &want.app,
                &self.client_auth.authorize,
            ))
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_cert_resolver(cert.clone());
        let acceptor = TlsAcceptor::from(Arc::new(config));
        // A listener on each address (IPv4 and, dual stack, IPv6); both
        // forward to the app at the endpoint's first address (IPv4 where it
        // has one, as apps listen there).
        let listen = SocketAddr::from((ip, TLS_PORT));
        let listen6 = want.addresses.get(1).map(|a| SocketAddr::from((*a, TLS_PORT)));
        let listeners = policy_api::netns::run_in(&ns, || {
            let bind = |addr: SocketAddr| -> std::io::Result<std::net::TcpListener> {
                let l = std::net::TcpListener::bind(addr)?;
                l.set_nonblocking(true)?;
                Ok(l)
            };
            Ok::<_, std::io::Error>((bind(listen)?, listen6.map(bind).transpose()?))
        })
        .map_err(io("listen in", &want.netns))?;
        let listener =
            tokio::net::TcpListener::from_std(listeners.0).map_err(io("listen in", &want.netns))?;
        let listener6 = listeners
            .1
            .map(tokio::net::TcpListener::from_std)
            .transpose()
            .map_err(io("listen in", &want.netns))?;
        let (netns, upstream) = (ns.clone(), SocketAddr::from((ip, want.app_port)));
        let http = want.client_auth;
        let gate = Gate::new("tls", self.connections.0, self.connections.1);
        let task = tokio::spawn(async move {
            let mut backoff = Backoff::default();
            loop {
                let accepted = match &listener6 {
                    None => listener.accept().await,
                    Some(listener6) => tokio::select! {
                        a = listener.accept() => a,
                        a = listener6.accept() => a,
                    },
                };
                let Some((client, peer)) = backoff.accepted("tls", accepted).await else {
                    continue;
                };
                let Some(ticket) = gate.admit(Some(peer.ip())) else { continue };
                let (acceptor, netns) = (acceptor.clone(), netns.clone());
                tokio::spawn(async move {
                    if let Err(e) = proxy(client, acceptor, &netns, upstream, http).await {
                        debug!(%peer, error = %e, "TLS connection ended");
                    }
                    drop(ticket);
                });
            }
        });
        info!(%ip, app = want.app, names = ?want.hostnames, mtls = want.client_auth, "TLS listener on {listen}");
        Ok(Running { wanted: want.clone(), renew_at: self.renew_at(), cert, task })
    }

    /// When a certificate issued now is re-issued: a third of its validity
    /// before it expires.
    fn renew_at(&self) -> Instant {
        Instant::now() + self.ca.validity() * 2 / 3
    }

    /// How often [`rotate_due`](Self::rotate_due) should run: also how soon
    /// an identity that could not be written (a full disk) is tried again.
    pub fn rotation_check_every(&self) -> Duration {
        (self.ca.validity() / 12).clamp(Duration::from_secs(1), Duration::from_secs(5))
    }

    /// Re-issues every certificate and instance identity whose renewal time
    /// has come. The listener's certificate is swapped in place (open
    /// connections are not touched; the next handshake gets the new one);
    /// the identity files are replaced whole.
    pub fn rotate_due(&self) {
        let mut listeners = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        for (ip, r) in listeners.by_ip.iter_mut().filter(|(_, r)| r.renew_at <= now) {
            match self.ca.issue(&r.wanted.app, &r.wanted.hostnames, &r.wanted.addresses) {
                Ok(cert) => *r.cert.0.write().unwrap_or_else(|p| p.into_inner()) = cert,
                Err(e) => {
                    warn!(%ip, error = %e, "cannot re-issue the certificate; trying again");
                    continue;
                }
            }
            if let Err(e) = self.write_instance(*ip, &r.wanted) {
                warn!(%ip, error = %e, "cannot re-issue the instance identity; trying again");
                continue;
            }
            r.renew_at = self.renew_at();
            info!(%ip, app = r.wanted.app, valid_for = ?self.ca.validity(), "certificate and instance identity rotated");
        }
    }
}

/// One connection: handshake, then plaintext both ways to the app; with
/// client certificates, HTTP/1.1 requests carrying the verified source app.
/// Each direction's copy buffer (per connection).
const COPY_BUFFER: usize = 64 << 10;

async fn proxy(
    client: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    netns: &File,
    upstream: SocketAddr,
    http: bool,
) -> std::io::Result<()> {
    // Small handshake flights and one-byte answers go out at once: with
    // Nagle's algorithm a write behind an unacknowledged one waits for the
    // peer's delayed ACK (tens of ms per new connection).
    client.set_nodelay(true)?;
    let mut tls =
        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(client)).await.map_err(
            |_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
        )??;
    // The upstream socket is made in the container's namespace.
    let new_socket = if upstream.is_ipv4() {
        tokio::net::TcpSocket::new_v4
    } else {
        tokio::net::TcpSocket::new_v6
    };
    let socket = policy_api::netns::run_in(netns, new_socket)?;
    let mut app = socket.connect(upstream).await?;
    app.set_nodelay(true)?;
    if http {
        return proxy_http(tls, app).await;
    }
    // Buffers of a TLS record's size and more (tokio's default is 8 KiB):
    // fewer reads, writes and records per byte.
    tokio::io::copy_bidirectional_with_sizes(&mut tls, &mut app, COPY_BUFFER, COPY_BUFFER).await?;
    Ok(())
}

fn http_error(e: hyper::Error) -> std::io::Error {
    std::io::Error::other(e)
}

/// Forwards HTTP/1.1 requests from a verified client to the app, each with
/// the client's app and certificate in headers (replacing any the client
/// sent), over one upstream connection.
async fn proxy_http(
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    app: tokio::net::TcpStream,
) -> std::io::Result<()> {
    let peer = tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned();
    // The verifier accepted only identities naming an allowed app.
    let Some((source, cert)) = peer.and_then(|c| Some((identity_app(&c)?, c))) else {
        return Err(std::io::Error::other("no verified client identity"));
    };
    let source = hyper::header::HeaderValue::from_str(&source).map_err(std::io::Error::other)?;
    let cert = hyper::header::HeaderValue::from_str(
        &base64::engine::general_purpose::STANDARD.encode(cert.as_ref()),
    )
    .map_err(std::io::Error::other)?;
    let (sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(app)).await.map_err(http_error)?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "upstream connection ended");
        }
    });
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let (sender, source, cert) = (sender.clone(), source.clone(), cert.clone());
        async move {
            let headers = request.headers_mut();
            headers.insert(SOURCE_APP_HEADER, source);
            headers.insert(CLIENT_CERT_HEADER, cert);
            let mut sender = sender.lock().await;
            sender.ready().await?;
            sender.send_request(request).await
        }
    });
    hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(tls), service)
        .await
        .map_err(http_error)
}
