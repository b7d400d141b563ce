//! Platform TLS on port 61443: one listener per app instance, made inside
//! the instance's network namespace and served by the agent's runtime (no
//! process per container). It terminates TLS with a certificate from the
//! platform CA naming the app's internal routes and the instance's address,
//! and forwards the plaintext to the app's port inside the same namespace.
//! Mapping or unmapping a route re-issues the certificate: the next
//! handshake uses the new one; open connections are not touched.

use std::{
    collections::BTreeMap,
    fs::{self, File},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    os::{fd::AsRawFd as _, unix::fs::PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject as _},
    server::{ClientHello, ResolvesServerCert},
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
    running: Mutex<BTreeMap<Ipv4Addr, Running>>,
}

/// An instance's ports in the shape of Cloud Foundry's `CF_INSTANCE_PORTS`.
pub fn instance_ports(ip: Ipv4Addr, app_port: u16) -> serde_json::Value {
    serde_json::json!({
        "CF_INSTANCE_IP": ip.to_string(),
        "CF_INSTANCE_PORTS": [{"internal": app_port, "internal_tls_proxy": TLS_PORT}],
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
    pub fn new(ca: PlatformCa, instances_dir: PathBuf) -> Self {
        Self { ca, instances_dir, running: Mutex::new(BTreeMap::new()) }
    }

    fn ports_file(&self, ip: Ipv4Addr) -> PathBuf {
        self.instances_dir.join(format!("{ip}.json"))
    }

    /// Writes the instance's port mapping where the container can read it.
    fn write_ports(&self, ip: Ipv4Addr, app_port: u16) -> std::io::Result<()> {
        fs::create_dir_all(&self.instances_dir)?;
        let path = self.ports_file(ip);
        let tmp = path.with_extension("json.tmp");
        fs::write(&tmp, instance_ports(ip, app_port).to_string())?;
        fs::rename(&tmp, &path)
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
            });
            if !keep {
                r.task.abort();
                let _ = fs::remove_file(self.ports_file(*ip));
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
                    if let Err(e) = self.write_ports(ip, want.app_port) {
                        warn!(%ip, error = %e, "cannot write the instance's port mapping");
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
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
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
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, peer)) = listener.accept().await else { continue };
                let (acceptor, netns) = (acceptor.clone(), netns.clone());
                tokio::spawn(async move {
                    if let Err(e) = proxy(client, acceptor, &netns, upstream).await {
                        debug!(%peer, error = %e, "TLS connection ended");
                    }
                });
            }
        });
        info!(%ip, app = want.app, names = ?want.hostnames, "TLS listener on {listen}");
        Ok(Running { wanted: want.clone(), cert, task })
    }
}

/// One connection: handshake, then plaintext both ways to the app.
async fn proxy(
    client: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    netns: &Path,
    upstream: SocketAddr,
) -> std::io::Result<()> {
    let mut tls =
        tokio::time::timeout(Duration::from_secs(10), acceptor.accept(client)).await.map_err(
            |_| std::io::Error::new(std::io::ErrorKind::TimedOut, "handshake timed out"),
        )??;
    // The upstream socket is made in the container's namespace.
    let socket = in_netns(netns, tokio::net::TcpSocket::new_v4)?;
    let mut app = socket.connect(upstream).await?;
    tokio::io::copy_bidirectional(&mut tls, &mut app).await?;
    Ok(())
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
        fs::remove_dir_all(&dir).unwrap();
    }
}
