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

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::{self, File},
    io::Write as _,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::{
        fd::AsRawFd as _,
        unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use base64::Engine as _;
use hyper::{Request, body::Incoming};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls::{
    CertificateError, DigitallySignedStruct, ServerConfig, SignatureScheme,
    client::danger::HandshakeSignatureValid,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime, pem::PemObject as _},
    server::{
        ClientHello, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::state::{INTERNAL_DOMAIN, State};

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
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// The header carrying the verified source app to an mTLS app.
pub const SOURCE_APP_HEADER: &str = "x-source-app";
/// The header carrying the verified client certificate (base64 DER, as
/// Cloud Foundry's gorouter does).
pub const CLIENT_CERT_HEADER: &str = "x-forwarded-client-cert";

/// An instance identity: PEM certificate and PKCS#8 key.
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

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

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TlsError {
    let path = path.to_path_buf();
    move |source| TlsError::Io { what, path, source }
}

fn this_year() -> i32 {
    let secs = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    1970 + (secs / 31_556_952) as i32
}

/// The CA's parameters: the same every time, so an issuer rebuilt from the
/// stored key names the stored certificate's subject.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "policy-agent");
    name.push(DnType::CommonName, "policy-agent platform CA");
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = date_time_ymd(2025, 1, 1);
    params.not_after = date_time_ymd(2045, 1, 1);
    params
}

/// The platform CA, created on first start and kept in the state directory
/// (`ca.pem`, the bundle clients trust; `ca-key.pem`, mode 0600).
pub struct PlatformCa {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    bundle: PathBuf,
}

impl PlatformCa {
    pub fn load_or_create(state_dir: &Path) -> Result<Self, TlsError> {
        fs::create_dir_all(state_dir).map_err(io("create", state_dir))?;
        let (cert_path, key_path) = (state_dir.join("ca.pem"), state_dir.join("ca-key.pem"));
        let key = match fs::read_to_string(&key_path) {
            Ok(pem) => KeyPair::from_pem(&pem)?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::generate()?;
                let cert = ca_params().self_signed(&key)?;
                let tmp = key_path.with_extension("pem.tmp");
                fs::write(&tmp, key.serialize_pem()).map_err(io("write", &tmp))?;
                fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))
                    .map_err(io("chmod", &tmp))?;
                fs::write(&cert_path, cert.pem()).map_err(io("write", &cert_path))?;
                fs::rename(&tmp, &key_path).map_err(io("rename into", &key_path))?;
                info!(bundle = %cert_path.display(), "created the platform CA");
                key
            }
            Err(e) => return Err(io("read", &key_path)(e)),
        };
        let ca_der = CertificateDer::from_pem_file(&cert_path).map_err(|e| {
            io("parse", &cert_path)(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                e.to_string(),
            ))
        })?;
        Ok(Self { issuer: Issuer::new(ca_params(), key), ca_der, bundle: cert_path })
    }

    /// The CA bundle clients point `--cacert` / `SSL_CERT_FILE` at.
    pub fn bundle(&self) -> &Path {
        &self.bundle
    }

    /// An instance identity: subject `CN=IP, OU=app:APP`, the instance's
    /// address as its one SAN, usable as client and server certificate.
    pub fn issue_identity(&self, app: &str, ip: Ipv4Addr) -> Result<Identity, TlsError> {
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::IpAddress(IpAddr::V4(ip))];
        params.distinguished_name.push(DnType::CommonName, ip.to_string());
        params.distinguished_name.push(DnType::OrganizationalUnitName, format!("app:{app}"));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        let year = this_year();
        params.not_before = date_time_ymd(year - 1, 1, 1);
        params.not_after = date_time_ymd(year + 2, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
    }

    /// A verifier of client certificates: the platform CA's, then the
    /// policies'.
    fn client_verifier(
        &self,
        destination: &str,
        authorize: &Authorizer,
    ) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let chain =
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()?;
        Ok(Arc::new(PolicyClientVerifier {
            chain,
            destination: destination.to_owned(),
            authorize: authorize.clone(),
        }))
    }

    /// A certificate for one instance: its app's routes and its address.
    pub fn issue(
        &self,
        app: &str,
        hostnames: &[String],
        ip: Ipv4Addr,
    ) -> Result<Arc<CertifiedKey>, TlsError> {
        let names: Vec<String> =
            hostnames.iter().map(|h| format!("{h}.{INTERNAL_DOMAIN}")).collect();
        let mut params = CertificateParams::new(names)?;
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(ip)));
        params.distinguished_name.push(DnType::CommonName, app);
        let year = this_year();
        params.not_before = date_time_ymd(year - 1, 1, 1);
        params.not_after = date_time_ymd(year + 2, 1, 1);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let chain = vec![cert.der().clone(), self.ca_der.clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)?;
        Ok(Arc::new(CertifiedKey::new(chain, signing)))
    }
}

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
    netns: PathBuf,
    hostnames: Vec<String>,
    app_port: u16,
    client_auth: bool,
}

struct Running {
    wanted: Wanted,
    cert: Arc<CurrentCert>,
    task: JoinHandle<()>,
}

/// The per-instance listeners.
pub struct TlsProxies {
    ca: PlatformCa,
    /// Where each instance's port mapping is written (`<ip>.json`).
    instances_dir: PathBuf,
    client_auth: ClientAuth,
    running: Mutex<BTreeMap<Ipv4Addr, Running>>,
}

/// An instance's ports in the shape of Cloud Foundry's `CF_INSTANCE_PORTS`,
/// with the paths of its identity (`CF_INSTANCE_CERT`, `CF_INSTANCE_KEY`).
pub fn instance_ports(
    ip: Ipv4Addr,
    app_port: u16,
    (cert, key): (&Path, &Path),
) -> serde_json::Value {
    serde_json::json!({
        "CF_INSTANCE_IP": ip.to_string(),
        "CF_INSTANCE_PORTS": [{"internal": app_port, "internal_tls_proxy": TLS_PORT}],
        "CF_INSTANCE_CERT": cert,
        "CF_INSTANCE_KEY": key,
    })
}

/// Runs `f` with the calling thread in the network namespace at `netns`
/// and returns it to its own namespace before returning: sockets made in
/// `f` belong to `netns`. Synchronous, so no other task runs on the thread
/// meanwhile.
fn in_netns<T>(netns: &Path, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
    let target = File::open(netns)?;
    let own = File::open("/proc/thread-self/ns/net")?;
    // SAFETY: setns on valid namespace fds; affects only this thread.
    if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let result = f();
    // SAFETY: as above; back to the thread's own namespace.
    if unsafe { libc::setns(own.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        // The thread is stranded in the container's namespace: no safe way on.
        panic!(
            "cannot return to the agent's network namespace: {}",
            std::io::Error::last_os_error()
        );
    }
    result
}

impl TlsProxies {
    pub fn new(ca: PlatformCa, instances_dir: PathBuf, client_auth: ClientAuth) -> Self {
        Self { ca, instances_dir, client_auth, running: Mutex::new(BTreeMap::new()) }
    }

    fn ports_file(&self, ip: Ipv4Addr) -> PathBuf {
        self.instances_dir.join(format!("{ip}.json"))
    }

    /// Where an instance's identity certificate and key are written.
    pub fn identity_files(&self, ip: Ipv4Addr) -> (PathBuf, PathBuf) {
        (
            self.instances_dir.join(format!("{ip}-cert.pem")),
            self.instances_dir.join(format!("{ip}-key.pem")),
        )
    }

    /// Writes the instance's identity and port mapping where the container
    /// can read them (each file replaced whole; the key mode 0600).
    fn write_instance(&self, ip: Ipv4Addr, app: &str, app_port: u16) -> Result<(), TlsError> {
        let dir = &self.instances_dir;
        fs::create_dir_all(dir).map_err(io("create", dir))?;
        let identity = self.ca.issue_identity(app, ip)?;
        let (cert, key) = self.identity_files(ip);
        let ports = instance_ports(ip, app_port, (&cert, &key)).to_string();
        for (path, text, mode) in [
            (&key, &identity.key_pem, 0o600),
            (&cert, &identity.cert_pem, 0o644),
            (&self.ports_file(ip), &ports, 0o644),
        ] {
            let tmp = path.with_extension("tmp");
            let _ = fs::remove_file(&tmp);
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&tmp)
                .map_err(io("create", &tmp))?;
            file.write_all(text.as_bytes()).map_err(io("write", &tmp))?;
            fs::rename(&tmp, path).map_err(io("rename into", path))?;
        }
        Ok(())
    }

    fn remove_instance(&self, ip: Ipv4Addr) {
        let (cert, key) = self.identity_files(ip);
        for path in [self.ports_file(ip), cert, key] {
            let _ = fs::remove_file(path);
        }
    }

    pub fn bundle(&self) -> &Path {
        self.ca.bundle()
    }

    /// Brings the listeners in line with the state: one per endpoint that
    /// has a network namespace; certificates re-issued where the app's
    /// routes changed. Call from the async runtime.
    pub fn sync(&self, state: &State) {
        let mut routes_of: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (host, app) in state.routes() {
            routes_of.entry(app.as_str()).or_default().push(host.clone());
        }
        let wanted: BTreeMap<Ipv4Addr, Wanted> = state
            .endpoints()
            .filter_map(|e| {
                Some((
                    e.ip,
                    Wanted {
                        app: e.app.clone(),
                        netns: e.netns.clone()?,
                        hostnames: routes_of.get(e.app.as_str()).cloned().unwrap_or_default(),
                        app_port: state.tls_front(&e.app)?.app_port,
                        client_auth: self.client_auth.apps.contains(&e.app),
                    },
                ))
            })
            .collect();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        running.retain(|ip, r| {
            let keep = wanted.get(ip).is_some_and(|w| {
                w.netns == r.wanted.netns
                    && w.app == r.wanted.app
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
                    match self.ca.issue(&want.app, &want.hostnames, ip) {
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
                Ok(r) => {
                    if let Err(e) = self.write_instance(ip, &want.app, want.app_port) {
                        warn!(%ip, error = %e, "cannot write the instance's identity and ports");
                    }
                    running.insert(ip, r);
                }
                Err(e) => {
                    warn!(%ip, netns = %want.netns.display(), error = %e, "cannot start the TLS listener")
                }
            }
        }
    }

    fn start(&self, ip: Ipv4Addr, want: &Wanted) -> Result<Running, TlsError> {
        let cert =
            Arc::new(CurrentCert(RwLock::new(self.ca.issue(&want.app, &want.hostnames, ip)?)));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder =
            ServerConfig::builder_with_provider(provider).with_safe_default_protocol_versions()?;
        let builder = if want.client_auth {
            builder.with_client_cert_verifier(
                self.ca.client_verifier(&want.app, &self.client_auth.authorize)?,
            )
        } else {
            builder.with_no_client_auth()
        };
        let config = builder.with_cert_resolver(cert.clone());
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listen = SocketAddr::from((ip, TLS_PORT));
        let listener = in_netns(&want.netns, || {
            let l = std::net::TcpListener::bind(listen)?;
            l.set_nonblocking(true)?;
            Ok(l)
        })
        .map_err(io("listen in", &want.netns))?;
        let listener =
            tokio::net::TcpListener::from_std(listener).map_err(io("listen in", &want.netns))?;
        let (netns, upstream) = (want.netns.clone(), SocketAddr::from((ip, want.app_port)));
        let http = want.client_auth;
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, peer)) = listener.accept().await else { continue };
                let (acceptor, netns) = (acceptor.clone(), netns.clone());
                tokio::spawn(async move {
                    if let Err(e) = proxy(client, acceptor, &netns, upstream, http).await {
                        debug!(%peer, error = %e, "TLS connection ended");
                    }
                });
            }
        });
        info!(%ip, app = want.app, names = ?want.hostnames, mtls = want.client_auth, "TLS listener on {listen}");
        Ok(Running { wanted: want.clone(), cert, task })
    }
}

/// One connection: handshake, then plaintext both ways to the app; with
/// client certificates, HTTP/1.1 requests carrying the verified source app.
async fn proxy(
    client: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    netns: &Path,
    upstream: SocketAddr,
    http: bool,
) -> std::io::Result<()> {
    let mut tls =
        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(client)).await.map_err(
            |_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
        )??;
    // The upstream socket is made in the container's namespace.
    let socket = in_netns(netns, tokio::net::TcpSocket::new_v4)?;
    let mut app = socket.connect(upstream).await?;
    if http {
        return proxy_http(tls, app).await;
    }
    tokio::io::copy_bidirectional(&mut tls, &mut app).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_survives_a_restart_and_issues_route_certificates() {
        let dir = std::env::temp_dir().join(format!("platform-ca-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let ca = PlatformCa::load_or_create(&dir).unwrap();
        let first = fs::read(dir.join("ca.pem")).unwrap();
        assert_eq!(
            fs::metadata(dir.join("ca-key.pem")).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = PlatformCa::load_or_create(&dir).unwrap();
        assert_eq!(fs::read(dir.join("ca.pem")).unwrap(), first, "the CA is kept");
        assert_eq!(again.ca_der, ca.ca_der);
        let cert = again
            .issue("backend", &["backend".into(), "api".into()], Ipv4Addr::new(10, 255, 0, 2))
            .unwrap();
        assert_eq!(cert.cert.len(), 2, "leaf and CA");
        assert_eq!(identity_app(&cert.cert[0]), None, "a route certificate is no identity");

        let identity = again.issue_identity("frontend", Ipv4Addr::new(10, 255, 0, 3)).unwrap();
        let der = CertificateDer::from_pem_slice(identity.cert_pem.as_bytes()).unwrap();
        assert_eq!(identity_app(&der).as_deref(), Some("frontend"));
        assert!(PrivateKeyDer::from_pem_slice(identity.key_pem.as_bytes()).is_ok());
        assert_eq!(identity_app(b"not a certificate"), None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
