//! Platform TLS through one 61443 listener versus plain TCP to the app's
//! port, between two container namespaces: handshakes (new connections) per
//! second and bulk throughput.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use integration_tests::{daemon::Daemon, netns::NetNs, topology::Host};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};

use crate::report::{Report, outln};

/// The app: reads and discards; answers each 1-byte "ping" with "k".
fn sink(ns: &NetNs, ip: Ipv4Addr, port: u16) {
    let listener = ns.run(move || TcpListener::bind((ip, port))).expect("bind sink");
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            std::thread::spawn(move || {
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

fn client_config(ca: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).expect("CA")).expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// New connections per second for `window`, each doing one ping round trip.
fn connections_per_second(
    ns: &NetNs,
    ip: Ipv4Addr,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    window: Duration,
) -> f64 {
    let started = Instant::now();
    let mut n = 0u32;
    while started.elapsed() < window {
        let tcp = ns.run(move || TcpStream::connect((ip, port))).expect("connect");
        tcp.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
        let mut reply = [0u8; 1];
        match &tls {
            Some(config) => {
                let name = ServerName::try_from("backend.apps.internal").expect("name");
                let conn = rustls::ClientConnection::new(config.clone(), name).expect("client");
                let mut stream = rustls::StreamOwned::new(conn, tcp);
                stream.write_all(b"p").expect("ping");
                stream.read_exact(&mut reply).expect("pong");
            }
            None => {
                let mut tcp = tcp;
                tcp.write_all(b"p").expect("ping");
                tcp.read_exact(&mut reply).expect("pong");
            }
        }
        n += 1;
    }
    f64::from(n) / started.elapsed().as_secs_f64()
}

/// MiB/s sending `total` bytes on one connection, until the app has read
/// them all (it closes when it sees the end of the stream).
fn throughput(
    ns: &NetNs,
    ip: Ipv4Addr,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    total: usize,
) -> f64 {
    let tcp = ns.run(move || TcpStream::connect((ip, port))).expect("connect");
    tcp.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let chunk = vec![0x5au8; 1 << 16];
    let started = Instant::now();
    let mut rest = [0u8; 16];
    match tls {
        Some(config) => {
            let name = ServerName::try_from("backend.apps.internal").expect("name");
            let conn = rustls::ClientConnection::new(config, name).expect("client");
            let mut stream = rustls::StreamOwned::new(conn, tcp);
            for _ in 0..total / chunk.len() {
                stream.write_all(&chunk).expect("send");
            }
            stream.conn.send_close_notify();
            stream.flush().expect("flush");
            stream.sock.shutdown(std::net::Shutdown::Write).expect("shutdown");
            while matches!(stream.read(&mut rest), Ok(n) if n > 0) {}
        }
        None => {
            let mut tcp = tcp;
            for _ in 0..total / chunk.len() {
                tcp.write_all(&chunk).expect("send");
            }
            tcp.shutdown(std::net::Shutdown::Write).expect("shutdown");
            while matches!(tcp.read(&mut rest), Ok(n) if n > 0) {}
        }
    }
    (total as f64 / (1 << 20) as f64) / started.elapsed().as_secs_f64()
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
    sink(&b.ns, b.ip, 8080);
    let config = client_config(&daemon.state_dir().join("ca.pem"));
    let window = Duration::from_secs(if quick { 1 } else { 3 });
    let total = if quick { 64 << 20 } else { 512 << 20 };
    let plain_cps = connections_per_second(&a.ns, b.ip, 8080, None, window);
    let tls_cps = connections_per_second(&a.ns, b.ip, 61443, Some(config.clone()), window);
    let plain_tp = throughput(&a.ns, b.ip, 8080, None, total);
    let tls_tp = throughput(&a.ns, b.ip, 61443, Some(config), total);
    outln!(
        out,
        "\n### 6. Platform TLS\n\nOne 61443 listener (agent-terminated, forwarding to 8080) vs plain TCP to 8080, container to container\n"
    );
    outln!(out, "| measure | plain TCP to 8080 | TLS via 61443 | ratio |");
    outln!(out, "|---|---:|---:|---:|");
    outln!(
        out,
        "| new connections per second (one round trip each; TLS: full handshake) | {plain_cps:.0} | {tls_cps:.0} | {:.2} |",
        tls_cps / plain_cps
    );
    outln!(
        out,
        "| throughput, one connection, {} MiB (MiB/s) | {plain_tp:.0} | {tls_tp:.0} | {:.2} |",
        total >> 20,
        tls_tp / plain_tp
    );
    report.section(out);
}
