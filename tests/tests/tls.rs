//! Platform TLS on 61443: real curl and openssl from container namespaces,
//! names resolved by the agent's DNS.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    sync::Arc,
    time::Duration,
};

use integration_tests::{
    daemon::{Daemon, policy_args},
    netns::NetNs,
    require_root,
    topology::{GATEWAY, Host},
    traffic::{curl_https, http_echo_server, http_server},
};

/// The subject alternative names the listener at `ip:61443` presents now.
fn sans(ns: &NetNs, ca: &str, ip: Ipv4Addr) -> String {
    let script = format!(
        "openssl s_client -connect {ip}:61443 -servername backend.apps.internal -CAfile {ca} </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName"
    );
    let out = ns.command("sh").args(["-c", &script]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A kept-alive TLS connection from `ns` to `ip:61443` for `name`.
fn tls_connection(
    ns: &NetNs,
    ca: &str,
    ip: Ipv4Addr,
    name: &'static str,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject as _};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let conn = rustls::ClientConnection::new(Arc::new(config), ServerName::try_from(name).unwrap())
        .unwrap();
    let tcp = ns.run(move || TcpStream::connect((ip, 61443))).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

fn get(stream: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> String {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: backend.apps.internal\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    let n = stream.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn tls_on_61443_needs_a_policy_and_follows_the_routes() {
    require_root();
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "");
    let (a, b) = (host.container(0), host.container(1));
    for (c, app) in [(a, "frontend"), (b, "backend")] {
        daemon.register(c, app);
    }
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    http_server(&b.ns, b.ip, 8080, "hello from backend");
    a.ns.use_nameserver(GATEWAY);
    let ca = daemon.state_dir().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let url = "https://backend.apps.internal:61443/";

    let (ok, out) = curl_https(&a.ns, ca, url, &[]);
    assert!(!ok, "61443 needs a policy: {out}");
    daemon.allow("frontend", "backend", "tcp", "61443");
    let (ok, out) = curl_https(&a.ns, ca, url, &[]);
    assert!(ok && out.contains("hello from backend"), "{out}");
    // 61443 is not on the host.
    let (ok, _) = curl_https(&host.ns, ca, &format!("https://{GATEWAY}:61443/"), &["--insecure"]);
    assert!(!ok);

    assert!(
        sans(&a.ns, ca, b.ip).contains("DNS:backend.apps.internal"),
        "{}",
        sans(&a.ns, ca, b.ip)
    );
    assert!(sans(&a.ns, ca, b.ip).contains(&format!("IP Address:{}", b.ip)));

    // An open connection, then a second route: the next handshake names both.
    let mut open = tls_connection(&a.ns, ca, b.ip, "backend.apps.internal");
    assert!(get(&mut open).contains("hello from backend"));
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "api"]);
    let names = sans(&a.ns, ca, b.ip);
    assert!(
        names.contains("DNS:backend.apps.internal") && names.contains("DNS:api.apps.internal"),
        "{names}"
    );
    let (ok, out) = curl_https(&a.ns, ca, "https://api.apps.internal:61443/", &[]);
    assert!(ok && out.contains("hello from backend"), "{out}");

    // Unmapped: the removed name fails verification (pinned to the address,
    // as DNS no longer has it); the open connection goes on.
    daemon.cli_ok(&["unmap-route", "backend", "apps.internal", "--hostname", "backend"]);
    let resolve = format!("backend.apps.internal:61443:{}", b.ip);
    let (ok, out) = curl_https(&a.ns, ca, url, &["--resolve", &resolve]);
    assert!(!ok && out.contains("no alternative certificate subject name matches"), "{out}");
    assert!(
        get(&mut open).contains("hello from backend"),
        "the open connection survived the re-issue"
    );
}

#[test]
fn a_policy_on_the_app_port_allows_its_tls_port_and_tls_only_allows_nothing_else() {
    require_root();
    let host = Host::new(3);
    let daemon = Daemon::start(&host.ns, "");
    let (a, b, w) = (host.container(0), host.container(1), host.container(2));
    for (c, app) in [(a, "frontend"), (b, "backend"), (w, "worker")] {
        daemon.register(c, app);
    }
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    http_server(&b.ns, b.ip, 8080, "hello from backend");
    for c in [a, w] {
        c.ns.use_nameserver(GATEWAY);
    }
    let ca = daemon.state_dir().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let tls_url = "https://backend.apps.internal:61443/";
    let plain_url = format!("http://{}:8080/", b.ip);

    // The instance's port mapping, as CF_INSTANCE_PORTS.
    let ports = daemon.instance_ports(b.ip);
    assert_eq!(
        ports["CF_INSTANCE_PORTS"],
        serde_json::json!([{"internal": 8080, "internal_tls_proxy": 61443}])
    );

    // A policy on the app port also allows the TLS port fronting it.
    daemon.allow("frontend", "backend", "tcp", "8080");
    assert!(curl_https(&a.ns, ca, &plain_url, &[]).0, "plaintext to 8080");
    let (ok, out) = curl_https(&a.ns, ca, tls_url, &[]);
    assert!(ok && out.contains("hello from backend"), "TLS through the allowance: {out}");

    // TLS only: encrypted or nothing.
    let tls_only = policy_args("add-network-policy", "worker", "backend", "tcp", "8080");
    daemon.cli_ok(&[&tls_only[..], &["--tls-only"]].concat());
    assert!(!curl_https(&w.ns, ca, &plain_url, &[]).0, "plaintext denied for a TLS-only policy");
    let (ok, out) = curl_https(&w.ns, ca, tls_url, &[]);
    assert!(ok && out.contains("hello from backend"), "{out}");
    let listed: serde_json::Value =
        serde_json::from_str(&daemon.cli_ok(&["network-policies", "--json", "--source", "worker"]))
            .unwrap();
    assert_eq!(listed["policies"][0]["tls_only"], true);

    // TLS-only must cover the fronted port.
    let out = daemon.cli(&[
        "add-network-policy",
        "worker",
        "--destination-app",
        "backend",
        "--protocol",
        "tcp",
        "--port",
        "9000",
        "--tls-only",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cover port 8080"));
}

#[test]
fn the_tls_upstream_port_is_configurable_per_app() {
    require_root();
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "[tls_app_ports]\nadmin = 9090");
    let (a, b) = (host.container(0), host.container(1));
    daemon.register(a, "frontend");
    daemon.register(b, "admin");
    daemon.cli_ok(&["map-route", "admin", "apps.internal", "--hostname", "admin"]);
    http_server(&b.ns, b.ip, 9090, "hello from admin");
    a.ns.use_nameserver(GATEWAY);
    let ca = daemon.state_dir().join("ca.pem");
    let ports = daemon.instance_ports(b.ip);
    assert_eq!(
        ports["CF_INSTANCE_PORTS"],
        serde_json::json!([{"internal": 9090, "internal_tls_proxy": 61443}])
    );
    // A policy on the app's own port (9090) allows the TLS port fronting it.
    daemon.allow("frontend", "admin", "tcp", "9090");
    let (ok, out) =
        curl_https(&a.ns, ca.to_str().unwrap(), "https://admin.apps.internal:61443/", &[]);
    assert!(ok && out.contains("hello from admin"), "{out}");
}

#[test]
fn mtls_admits_only_identities_a_policy_allows_and_names_the_source_app() {
    require_root();
    let host = Host::new(3);
    let daemon = Daemon::start(&host.ns, "mtls_apps = [\"backend\"]");
    let (a, b, w) = (host.container(0), host.container(1), host.container(2));
    for (c, app) in [(a, "frontend"), (b, "backend"), (w, "worker")] {
        daemon.register(c, app);
    }
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    http_echo_server(&b.ns, b.ip, 8080);
    a.ns.use_nameserver(GATEWAY);
    let ca = daemon.state_dir().join("ca.pem");
    let ca = ca.to_str().unwrap();
    let url = "https://backend.apps.internal:61443/";

    // Every instance has an identity naming its app (CF_INSTANCE_CERT/KEY).
    let identity = |ip| {
        let ports = daemon.instance_ports(ip);
        let path = |key: &str| ports[key].as_str().expect(key).to_owned();
        (path("CF_INSTANCE_CERT"), path("CF_INSTANCE_KEY"))
    };
    let (front_cert, front_key) = identity(a.ip);
    let (worker_cert, worker_key) = identity(w.ip);
    let subject = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in", &front_cert])
        .output()
        .unwrap();
    let subject = String::from_utf8_lossy(&subject.stdout).into_owned();
    assert!(subject.contains("OU = app:frontend"), "{subject}");
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(&front_key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the identity key is private");

    // A policy on the app port (its allowance opens 61443 in the kernel).
    daemon.allow("frontend", "backend", "tcp", "8080");

    // No client certificate: refused.
    let (ok, out) = curl_https(&a.ns, ca, url, &[]);
    assert!(!ok && out.contains("alert certificate required"), "no certificate: {out}");

    // frontend's own identity: admitted, and the app is told who called,
    // whatever the client claimed.
    let with = |cert: &str, key: &str, extra: &[&str]| {
        let mut args = vec!["--cert", cert, "--key", key];
        args.extend_from_slice(extra);
        curl_https(&a.ns, ca, url, &args)
    };
    let (ok, out) = with(&front_cert, &front_key, &["-H", "X-Source-App: admin"]);
    assert!(ok, "{out}");
    assert!(out.contains("x-source-app: frontend"), "{out}");
    assert!(!out.contains("admin"), "the client's own header was replaced: {out}");
    assert!(out.contains("x-forwarded-client-cert: "), "{out}");

    // worker's identity, from an address the kernel lets through: no policy
    // allows worker, so the handshake is refused.
    let (ok, out) = with(&worker_cert, &worker_key, &[]);
    assert!(!ok && out.contains("alert access denied"), "an identity no policy allows: {out}");

    // A certificate naming frontend that the platform CA did not issue.
    let forged = daemon.state_dir().join("forged");
    std::fs::create_dir_all(&forged).unwrap();
    let (forged_cert, forged_key) = (forged.join("cert.pem"), forged.join("key.pem"));
    let made = std::process::Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"])
        .args(["-subj", "/OU=app:frontend/CN=forged", "-days", "1", "-keyout"])
        .arg(&forged_key)
        .arg("-out")
        .arg(&forged_cert)
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    let (ok, out) = with(forged_cert.to_str().unwrap(), forged_key.to_str().unwrap(), &[]);
    assert!(!ok && out.contains("alert certificate unknown"), "another CA's certificate: {out}");

    // A policy for worker: its identity is admitted at the next handshake.
    daemon.allow("worker", "backend", "tcp", "61443");
    let (ok, out) = with(&worker_cert, &worker_key, &[]);
    assert!(ok && out.contains("x-source-app: worker"), "{out}");

    // Apps not listed keep plain platform TLS: no certificate asked for.
    daemon.cli_ok(&["map-route", "frontend", "apps.internal", "--hostname", "frontend"]);
    http_server(&a.ns, a.ip, 8080, "hello from frontend");
    b.ns.use_nameserver(GATEWAY);
    daemon.allow("backend", "frontend", "tcp", "61443");
    let (ok, out) = curl_https(&b.ns, ca, "https://frontend.apps.internal:61443/", &[]);
    assert!(ok && out.contains("hello from frontend"), "{out}");
}

/// `openssl x509 -noout ARG` on a PEM file.
fn x509(path: &str, arg: &str) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", arg, "-in", path])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

#[test]
fn identities_are_short_lived_and_rotate_under_an_open_mtls_connection() {
    require_root();
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "mtls_apps = [\"backend\"]\nidentity_validity = \"6s\"");
    let (a, b) = (host.container(0), host.container(1));
    for (c, app) in [(a, "frontend"), (b, "backend")] {
        daemon.register(c, app);
    }
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    http_echo_server(&b.ns, b.ip, 8080);
    daemon.allow("frontend", "backend", "tcp", "8080");
    let ports = daemon.instance_ports(a.ip);
    let cert = ports["CF_INSTANCE_CERT"].as_str().unwrap().to_owned();
    let key = ports["CF_INSTANCE_KEY"].as_str().unwrap().to_owned();
    let first = std::fs::read_to_string(&cert).unwrap();
    let (start, end) = (x509(&cert, "-startdate"), x509(&cert, "-enddate"));
    println!("first identity: {start}, {end}");

    // An mTLS connection with frontend's identity, kept open.
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject as _};
    let ca = daemon.state_dir().join("ca.pem");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&ca).unwrap()).unwrap();
    let chain: Vec<CertificateDer> =
        CertificateDer::pem_file_iter(&cert).unwrap().map(Result::unwrap).collect();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, PrivateKeyDer::from_pem_file(&key).unwrap())
        .unwrap();
    let name = ServerName::try_from("backend.apps.internal").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let ip = b.ip;
    let tcp = a.ns.run(move || TcpStream::connect((ip, 61443))).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut open = rustls::StreamOwned::new(conn, tcp);
    assert!(get_whole(&mut open).contains("x-source-app: frontend"));

    // Re-issued when a third of the 6 s is left: new files, replaced whole.
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&cert).unwrap() == first {
        assert!(started.elapsed() < Duration::from_secs(15), "the identity was not rotated");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rotated_after = started.elapsed();
    let end2 = x509(&cert, "-enddate");
    assert_ne!(end2, end, "a new expiry");
    assert_eq!(x509(&cert, "-subject"), x509(&first_path(&daemon, &first), "-subject"));
    println!("rotated after {:.1} s: {end2}", rotated_after.as_secs_f64());

    // The open connection was not dropped; a new one with the new identity
    // is admitted.
    let reply = get_whole(&mut open);
    assert!(reply.contains("x-source-app: frontend"), "{reply}");
    let (ok, out) = curl_https(
        &a.ns,
        ca.to_str().unwrap(),
        &format!("https://{}:61443/", b.ip),
        &["--cert", &cert, "--key", &key],
    );
    assert!(ok && out.contains("x-source-app: frontend"), "{out}");
}

/// One request on a kept-alive connection and its whole response (headers
/// and `Content-Length` bytes of body).
fn get_whole(stream: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>) -> String {
    stream.write_all(b"GET / HTTP/1.1\r\nHost: backend.apps.internal\r\n\r\n").unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if got.len() >= end + 4 + length {
                return text;
            }
        }
    }
}

/// The first identity, written beside the state for openssl to read.
fn first_path(daemon: &Daemon, pem: &str) -> String {
    let path = daemon.dir.join("first-identity.pem");
    std::fs::write(&path, pem).unwrap();
    path.to_str().unwrap().to_owned()
}
