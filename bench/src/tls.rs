//! Platform TLS through one 61443 listener, against plain TCP to the app's
//! port and against a per-container TLS terminator (haproxy, as Envoy is in
//! Cloud Foundry) in the same namespace with a certificate from the same
//! CA: handshakes per second, round-trip latency through the proxy, bulk
//! throughput on one connection, and memory for 1 to 1,000 instances.

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use integration_tests::{daemon::Daemon, netns::NetNs, topology::Host, unique_name};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};

use crate::report::{Report, outln, percentile};

/// The app: reads and discards; answers each 1-byte "ping" with "k".
fn sink(ns: &NetNs, ip: Ipv4Addr, port: u16) {
    let listener = ns.run(move || TcpListener::bind((ip, port))).expect("bind sink");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
                let _ = stream.set_nodelay(true);
                let mut buf = vec![0u8; 1 << 16];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        return;
                    }
                    if n == 1 && buf[0] == b'p' && stream.write_all(b"k").is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// A TLS endpoint that only reads and discards (rustls, one thread per
/// connection, the certificate and key in `pem`): the benchmark client's own
/// ceiling, with no proxy hop and no app behind it.
fn tls_sink(ns: &NetNs, addr: SocketAddr, pem: &Path) {
    use rustls::pki_types::PrivateKeyDer;
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(pem).expect("PEM").map(|c| c.expect("cert")).collect();
    let key = PrivateKeyDer::from_pem_file(pem).expect("key");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("certificate");
    let config = Arc::new(config);
    let listener = ns.run(move || TcpListener::bind(addr)).expect("bind TLS sink");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let conn = rustls::ServerConnection::new(config.clone()).expect("server");
            std::thread::spawn(move || {
                let mut tls = rustls::StreamOwned::new(conn, stream);
                let mut buf = vec![0u8; 1 << 16];
                while matches!(tls.read(&mut buf), Ok(n) if n > 0) {}
            });
        }
    });
}

fn client_config(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).expect("CA")).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    // Every connection a full handshake (no session resumption): what a
    // new client costs the terminator.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

/// Where a client connects: plain TCP, or TLS verified against the
/// platform CA for the server's IP address (a SAN of both terminators'
/// certificates).
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A connection of either kind.
trait Stream: std::io::Read + std::io::Write {
    /// Ends the sending side (TLS: close_notify first).
    fn finish(&mut self);
    /// The negotiated TLS 1.3 suite and key exchange, if TLS.
    fn suite(&self) -> Option<String>;
}

impl Stream for TcpStream {
    fn finish(&mut self) {
        self.shutdown(std::net::Shutdown::Write).expect("shutdown");
    }
    fn suite(&self) -> Option<String> {
        None
    }
}

impl Stream for rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    fn finish(&mut self) {
        self.conn.send_close_notify();
        self.flush().expect("flush");
        self.sock.shutdown(std::net::Shutdown::Write).expect("shutdown");
    }
    fn suite(&self) -> Option<String> {
        let suite = self.conn.negotiated_cipher_suite()?.suite();
        let group = self.conn.negotiated_key_exchange_group().map(|g| g.name());
        Some(format!("{suite:?} with {group:?}"))
    }
}

/// Connects from `ns` (completing the handshake for TLS).
fn open(ns: &NetNs, target: &Target) -> Box<dyn Stream> {
    let addr = target.addr;
    let tcp = ns.run(move || TcpStream::connect(addr)).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    tcp.set_nodelay(true).expect("nodelay");
    match &target.tls {
        None => Box::new(tcp),
        Some(config) => {
            let name = ServerName::IpAddress(addr.ip().into());
            let conn = rustls::ClientConnection::new(config.clone(), name).expect("client");
            let mut stream = rustls::StreamOwned::new(conn, tcp);
            while stream.conn.is_handshaking() {
                stream.conn.complete_io(&mut stream.sock).expect("handshake");
            }
            Box::new(stream)
        }
    }
}

fn ping(stream: &mut dyn Stream) {
    let mut reply = [0u8; 1];
    stream.write_all(b"p").expect("ping");
    stream.read_exact(&mut reply).expect("pong");
}

/// New connections per second for `window` from one client, each doing one
/// round trip (TLS: a full handshake first).
fn connections_per_second(ns: &NetNs, target: &Target, window: Duration) -> f64 {
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < window {
        ping(&mut *open(ns, target));
        n += 1;
    }
    f64::from(n) / started.elapsed().as_secs_f64()
}

/// Round-trip times of `n` one-byte requests on one open connection.
fn round_trips(ns: &NetNs, target: &Target, n: usize) -> Vec<Duration> {
    let mut stream = open(ns, target);
    for _ in 0..100 {
        ping(&mut *stream); // warm up
    }
    let mut times: Vec<Duration> = (0..n)
        .map(|_| {
            let started = Instant::now();
            ping(&mut *stream);
            started.elapsed()
        })
        .collect();
    times.sort();
    times
}

/// MiB/s sending `total` bytes on one connection, until the app has read
/// them all (it closes when it sees the end of the stream).
fn throughput(ns: &NetNs, target: &Target, total: usize) -> f64 {
    let mut stream = open(ns, target);
    let chunk = vec![0x5au8; 1 << 16];
    let started = Instant::now();
    for _ in 0..total / chunk.len() {
        stream.write_all(&chunk).expect("send");
    }
    stream.finish();
    let mut rest = [0u8; 16];
    while matches!(stream.read(&mut rest), Ok(n) if n > 0) {}
    (total as f64 / (1 << 20) as f64) / started.elapsed().as_secs_f64()
}

/// haproxy as one container's TLS terminator, in the container's namespace:
/// TLS on `listen` to the app at `upstream`, the certificate and key in
/// `pem`. Killed by its PID on drop.
struct Haproxy {
    child: Child,
    dir: PathBuf,
}

impl Haproxy {
    const BINARY: &str = "/usr/sbin/haproxy";

    fn start(ns: &NetNs, listen: SocketAddr, upstream: SocketAddr, pem: &Path) -> Self {
        let dir = std::env::temp_dir().join(unique_name("haproxy"));
        fs::create_dir_all(&dir).expect("haproxy dir");
        let config = dir.join("haproxy.cfg");
        // A container's own proxy: 1,024 connections at most (Envoy's
        // sidecar in Cloud Foundry is sized per container too); TCP mode,
        // as the agent's listener forwards bytes.
        fs::write(
            &config,
            format!(
                "global\n    maxconn 1024\n\ndefaults\n    mode tcp\n    timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n\nfrontend tls\n    bind {listen} ssl crt {}\n    default_backend app\n\nbackend app\n    server app {upstream}\n",
                pem.display()
            ),
        )
        .expect("haproxy config");
        let log = fs::File::create(dir.join("haproxy.log")).expect("haproxy log");
        // nsenter execs haproxy: the child's PID is haproxy's.
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path().display()))
            .args([Self::BINARY, "-db", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start haproxy (`cargo xtask setup` installs it)");
        let proxy = Self { child, dir };
        let started = Instant::now();
        while ns.run(|| TcpStream::connect_timeout(&listen, Duration::from_millis(100))).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "haproxy did not start: {}",
                fs::read_to_string(proxy.dir.join("haproxy.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        proxy
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A process's proportional set size in MiB (shared pages split among the
/// processes sharing them), from `/proc/PID/smaps_rollup`.
fn pss_mib(pid: u32) -> f64 {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    let kib: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("Pss");
    kib / 1024.0
}

/// The certificate and key of an instance's identity (issued by the
/// platform CA, naming its address), as haproxy reads them: one PEM file.
fn identity_pem(daemon: &Daemon, ip: Ipv4Addr) -> PathBuf {
    let dir = daemon.state_dir().join("instances");
    let started = Instant::now();
    let (cert, key) = loop {
        let read = |suffix: &str| fs::read_to_string(dir.join(format!("{ip}-{suffix}.pem")));
        if let (Ok(cert), Ok(key)) = (read("cert"), read("key")) {
            break (cert, key);
        }
        assert!(started.elapsed() < Duration::from_secs(10), "no identity for {ip}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let pem = dir.join(format!("{ip}-haproxy.pem"));
    fs::write(&pem, cert + &key).expect("write PEM");
    pem
}

/// Memory of `counts` TLS instances: the agent's (one process serving all,
/// PSS added over its own with none) and haproxy's (one process each, their
/// PSS summed). Each instance is a veth into one namespace with its own
/// address (registering, attaching and TLS as for any endpoint).
fn memory(counts: &[usize]) -> Vec<(usize, f64, f64)> {
    let host = Host::new(0);
    let containers = NetNs::new(unique_name("many"));
    let daemon = Daemon::start(&host.ns, "log_level = \"warn\"");
    let agent_pid = daemon.pid().expect("agent running");
    let base = pss_mib(agent_pid);
    let address = |i: usize| Ipv4Addr::new(10, 254, (i / 250) as u8, (i % 250) as u8 + 1);
    let mut registered = 0;
    let mut rows = Vec::new();
    for &count in counts {
        let (mut here, mut there) = (String::new(), String::new());
        for i in registered..count {
            here.push_str(&format!(
                "link add tv{i} type veth peer name te{i} netns {}\nlink set tv{i} up\n",
                containers.name()
            ));
            there.push_str(&format!("link set te{i} up\naddr add {}/32 dev te{i}\n", address(i)));
        }
        for (ns, batch) in [(&host.ns, here), (&containers, there)] {
            let file = std::env::temp_dir().join(unique_name("batch"));
            fs::write(&file, batch).expect("ip batch");
            ns.ip(&["-batch", file.to_str().expect("path")]);
            let _ = fs::remove_file(file);
        }
        let netns = containers.path();
        for i in registered..count {
            let body = serde_json::json!({
                "app": format!("app-{i}"), "ip": address(i).to_string(),
                "ifname": format!("tv{i}"), "netns": netns,
            });
            let (status, reply) = daemon.curl("POST", "/v1/endpoints", Some(&body.to_string()));
            assert_eq!(status, 200, "{reply}");
        }
        registered = count;
        // The last listener up means all are (they start in order).
        let last = SocketAddr::from((address(count - 1), 61443));
        let started = Instant::now();
        while containers
            .run(|| TcpStream::connect_timeout(&last, Duration::from_millis(100)))
            .is_err()
        {
            assert!(started.elapsed() < Duration::from_secs(30), "listeners did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let ours = pss_mib(agent_pid) - base;
        let peers: Vec<Haproxy> = (0..count)
            .map(|i| {
                let ip = address(i);
                let pem = identity_pem(&daemon, ip);
                Haproxy::start(&containers, (ip, 61444).into(), (ip, 8080).into(), &pem)
            })
            .collect();
        let theirs: f64 = peers.iter().map(|p| pss_mib(p.child.id())).sum();
        rows.push((count, ours, theirs));
    }
    rows
}

pub fn run(quick: bool, report: &mut Report) {
    let mut out = String::new();
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "log_level = \"warn\"");
    let (a, b) = (host.container(0), host.container(1));
    for (c, app) in [(a, "frontend"), (b, "backend")] {
        daemon.register(c, app);
    }
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    daemon.allow("frontend", "backend", "tcp", "8080");
    daemon.allow("frontend", "backend", "tcp", "61444");
    daemon.allow("frontend", "backend", "tcp", "61445");
    sink(&b.ns, b.ip, 8080);
    let config = client_config(&daemon.state_dir().join("ca.pem"));
    let peer = Haproxy::start(
        &b.ns,
        (b.ip, 61444).into(),
        (b.ip, 8080).into(),
        &identity_pem(&daemon, b.ip),
    );
    let targets = [
        Target { addr: (b.ip, 8080).into(), tls: None },
        Target { addr: (b.ip, 61443).into(), tls: Some(config.clone()) },
        Target { addr: (b.ip, 61444).into(), tls: Some(config) },
    ];
    let window = Duration::from_secs(if quick { 1 } else { 3 });
    let total = if quick { 64 << 20 } else { 512 << 20 };
    let trips = if quick { 2_000 } else { 20_000 };
    let suites: Vec<String> =
        targets[1..].iter().map(|t| open(&a.ns, t).suite().unwrap_or_default()).collect();
    let cps: Vec<f64> = targets.iter().map(|t| connections_per_second(&a.ns, t, window)).collect();
    let rtt: Vec<Vec<Duration>> = targets.iter().map(|t| round_trips(&a.ns, t, trips)).collect();
    let tp: Vec<f64> = targets.iter().map(|t| throughput(&a.ns, t, total)).collect();
    let pem = identity_pem(&daemon, b.ip);
    tls_sink(&b.ns, (b.ip, 61445).into(), &pem);
    let ceiling = Target { addr: (b.ip, 61445).into(), tls: targets[1].tls.clone() };
    let client_ceiling = throughput(&a.ns, &ceiling, total);
    drop(peer);
    outln!(
        out,
        "\n### 6. Platform TLS\n\nContainer to container: plain TCP to the app's 8080; TLS through the agent's one 61443 listener (terminated in the agent, forwarded to 8080); TLS through haproxy {} as the container's own terminator (the peer: a process per container, as Envoy in Cloud Foundry) on 61444 → 8080 in the same namespace, TCP mode, with a certificate from the same platform CA (ECDSA P-256, naming the instance's address). Negotiated: ours {}, haproxy {}. One client: new connections each with one round trip (TLS: a full handshake); {trips} one-byte round trips on one open connection; {} MiB on one connection.\n",
        haproxy_version(),
        suites[0],
        suites[1],
        total >> 20
    );
    outln!(
        out,
        "| measure | plain TCP to 8080 | agent, 61443 | haproxy, 61444 | agent / plain | agent / haproxy |"
    );
    outln!(out, "|---|---:|---:|---:|---:|---:|");
    // One row: the three figures and the agent's ratios to the others.
    let row = |out: &mut String, what: &str, v: [f64; 3], decimals: usize| {
        outln!(
            *out,
            "| {what} | {:.decimals$} | {:.decimals$} | {:.decimals$} | {:.2} | {:.2} |",
            v[0],
            v[1],
            v[2],
            v[1] / v[0],
            v[1] / v[2]
        );
    };
    row(&mut out, "new connections per second", [cps[0], cps[1], cps[2]], 0);
    for (name, p) in [("p50", 0.5), ("p99", 0.99)] {
        let us = |i: usize| percentile(&rtt[i], p).as_secs_f64() * 1e6;
        row(
            &mut out,
            &format!("round trip through the proxy, {name} (µs)"),
            [us(0), us(1), us(2)],
            1,
        );
    }
    row(&mut out, "throughput, one connection (MiB/s)", [tp[0], tp[1], tp[2]], 0);
    outln!(
        out,
        "\nThe client's own ceiling on one connection: the same TLS client straight into a rustls endpoint in B that decrypts and discards (no proxy hop, no app): {client_ceiling:.0} MiB/s; the agent reaches {:.2}x of it, haproxy {:.2}x.",
        tp[1] / client_ceiling,
        tp[2] / client_ceiling
    );
    let counts: &[usize] = if quick { &[1, 10, 100] } else { &[1, 100, 1000] };
    let rows = memory(counts);
    outln!(
        out,
        "\nMemory of TLS instances (proportional set size, shared pages split among the processes sharing them): the agent serves every instance from one process (its growth over the agent with none), haproxy runs one process per instance (`maxconn 1024`; their sizes summed), idle.\n"
    );
    outln!(
        out,
        "| instances | agent, added (MiB) | per instance | haproxy, total (MiB) | per instance | haproxy / agent |"
    );
    outln!(out, "|---:|---:|---:|---:|---:|---:|");
    for (n, ours, theirs) in rows {
        outln!(
            out,
            "| {n} | {ours:.1} | {:.2} | {theirs:.1} | {:.2} | {:.0}× |",
            ours / n as f64,
            theirs / n as f64,
            theirs / ours.max(0.01)
        );
    }
    report.section(out);
}

fn haproxy_version() -> String {
    Command::new(Haproxy::BINARY)
        .arg("-v")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout).split_whitespace().nth(2).map(str::to_owned)
        })
        .unwrap_or_default()
}
