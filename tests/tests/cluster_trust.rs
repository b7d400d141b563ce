//! What etcd gives away about the cluster's platform TLS: nothing that
//! mints a certificate a host trusts. Each host's agent has a CA of its own
//! (its key never leaves the host); etcd holds the hosts' CA certificates,
//! from which every agent keeps a trust bundle. A CA with its key found in
//! etcd (as older agents shared one, and as an attacker who can write etcd
//! would plant one) is deleted and never trusted. Real etcd over mutual
//! TLS, real agents, real curl and openssl.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    cluster::{ClusterHost, Etcd, Underlay, hosts_configured},
    eventually, require_root,
    topology::GATEWAY,
    traffic::{curl_https, http_echo_server},
};
use serde_json::json;

/// Every host serves its API over HTTPS on its own addresses.
const API: &str = "listen = \"0.0.0.0:9091\"";
const LEGACY_KEY: &str = "/policy-agent/ca";

fn bundle(h: &ClusterHost) -> PathBuf {
    h.daemon.state_dir().join("ca.pem")
}

/// The CA certificates in a host's trust bundle.
fn bundle_size(h: &ClusterHost) -> usize {
    std::fs::read_to_string(bundle(h)).unwrap_or_default().matches("BEGIN CERTIFICATE").count()
}

/// Waits until every host's bundle holds every host's CA, the same
/// everywhere.
fn wait_for_one_bundle(cells: &[ClusterHost]) {
    let same = || {
        let first = std::fs::read(bundle(&cells[0])).unwrap_or_default();
        cells.iter().all(|h| {
            bundle_size(h) == cells.len() && std::fs::read(bundle(h)).unwrap_or_default() == first
        })
    };
    assert!(
        eventually(Duration::from_secs(10), same),
        "every host's bundle holds every host's CA: {:?}",
        cells.iter().map(bundle_size).collect::<Vec<_>>()
    );
}

/// Everything under the agents' prefix, keys and values, read as etcd's
/// root.
fn everything_in_etcd(etcd: &Etcd) -> String {
    let out = etcd.ctl(&["get", "--prefix", "/policy-agent/"]);
    assert!(out.status.success(), "etcdctl get: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn legacy_ca_in_etcd(etcd: &Etcd) -> bool {
    let out = etcd.ctl(&["get", LEGACY_KEY]);
    assert!(out.status.success(), "etcdctl get: {}", String::from_utf8_lossy(&out.stderr));
    !out.stdout.is_empty()
}

/// `curl` from `from`'s namespace to the HTTPS API at `address` with the
/// client certificate `identity`, trusting `bundle`: (HTTP status, or 0 if
/// the connection or handshake failed; what curl printed).
fn curl_api(
    from: &ClusterHost,
    address: &str,
    bundle: &Path,
    identity: (&Path, &Path),
) -> (u16, String) {
    let out = from
        .host
        .ns
        .command("curl")
        .args(["-s", "-S", "--max-time", "5", "-w", "\n%{http_code}", "--cacert"])
        .arg(bundle)
        .arg("--cert")
        .arg(identity.0)
        .arg("--key")
        .arg(identity.1)
        .arg(format!("https://{address}:9091/v1/status"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let code = text.rsplit_once('\n').map_or("0", |(_, c)| c).trim().parse().unwrap_or(0);
    (code, text + &String::from_utf8_lossy(&out.stderr))
}

/// `policy-agent api-identity` against `h`'s running agent (its socket, no
/// `--config`): the certificate and key written to `out`.
fn api_identity(h: &ClusterHost, role: &str, name: &str, out: &Path) -> (PathBuf, PathBuf) {
    let out_s = out.to_str().unwrap();
    let said = h.daemon.cli_ok(&["api-identity", "--role", role, "--name", name, "--out", out_s]);
    assert!(said.contains(&format!("{role} identity")), "{said}");
    (out.join(format!("{name}.pem")), out.join(format!("{name}-key.pem")))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().expect("run openssl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success(), text + &String::from_utf8_lossy(&out.stderr))
}

#[test]
fn every_host_has_its_own_ca_and_etcd_holds_certificates_only() {
    require_root();
    let mut underlay = Underlay::new();
    let etcd = Etcd::start(&underlay);
    let cells = hosts_configured(&mut underlay, 2, 0, API);
    let (a, b) = (&cells[0], &cells[1]);
    wait_for_one_bundle(&cells);
    for h in &cells {
        let state = h.daemon.state_dir();
        assert_eq!(mode(&state.join("host-ca-key.pem")), 0o600, "{}", h.name);
        assert!(!state.join("ca-key.pem").exists(), "no shared CA key on {}", h.name);
        let (_, subject) = openssl(&[
            "x509",
            "-noout",
            "-subject",
            "-in",
            state.join("host-ca.pem").to_str().unwrap(),
        ]);
        assert!(subject.contains(&format!("policy-agent host CA {}", h.name)), "{subject}");
    }
    let host_ca =
        |h: &ClusterHost| std::fs::read(h.daemon.state_dir().join("host-ca.pem")).unwrap();
    assert_ne!(host_ca(a), host_ca(b), "a CA per host");

    // Read as etcd's root, every key under the prefix: certificates only.
    let everything = everything_in_etcd(&etcd);
    assert!(!everything.contains("PRIVATE KEY"), "a key in etcd:\n{everything}");
    for h in &cells {
        let key = format!("/policy-agent/cas/{}\n", h.name);
        assert!(everything.contains(&key), "{key} missing:\n{everything}");
    }
    assert!(!legacy_ca_in_etcd(&etcd));

    // An admin identity minted from A's CA (through A's socket) is taken
    // by A's API and, through the bundle, by B's; B's server certificate
    // verifies with A's bundle (across the underlay).
    let out = a.daemon.dir.join("identities");
    let ops = api_identity(a, "admin", "ops", &out);
    assert_eq!(mode(&ops.1), 0o600);
    let ops = (ops.0.as_path(), ops.1.as_path());
    let (status, said) = curl_api(a, "127.0.0.1", &bundle(a), ops);
    assert_eq!(status, 200, "A's identity on A: {said}");
    let (status, said) = curl_api(b, "127.0.0.1", &bundle(b), ops);
    assert_eq!(status, 200, "A's identity on B: {said}");
    let (status, said) = curl_api(a, &b.underlay.to_string(), &bundle(a), ops);
    assert_eq!(status, 200, "B's API from A, verified with A's bundle: {said}");
    // The status names where the CA is (what api-identity asked for).
    let status = a.daemon.get("/v1/status");
    let state = a.daemon.state_dir();
    assert_eq!(
        status["platform_ca"],
        json!({
            "certificate": state.join("host-ca.pem"),
            "key": state.join("host-ca-key.pem"),
            "bundle": state.join("ca.pem"),
        })
    );
}

#[test]
fn a_shared_ca_planted_in_etcd_is_deleted_and_mints_nothing() {
    require_root();
    let mut underlay = Underlay::new();
    let etcd = Etcd::start(&underlay);
    let mut cells = hosts_configured(&mut underlay, 2, 0, API);
    wait_for_one_bundle(&cells);
    for h in &mut cells {
        h.daemon.stop();
    }

    // The attacker's CA, with the platform CA's name, and an admin
    // identity from it, planted where older agents shared the cluster's CA.
    let pki = &underlay.pki;
    pki.make_ca("planted", "policy-agent platform CA");
    // openssl's -subj takes more attributes after the CN.
    pki.make_cert("mallory", "mallory/OU=api:admin", "extendedKeyUsage=clientAuth\n", "planted");
    let (planted, planted_key) = pki.identity("planted");
    let mallory = pki.identity("mallory");
    let mallory = (mallory.0.as_path(), mallory.1.as_path());
    let legacy = json!({
        "cert_pem": std::fs::read_to_string(&planted).unwrap(),
        "key_pem": std::fs::read_to_string(&planted_key).unwrap(),
    })
    .to_string();
    let plant = || {
        let out = etcd.ctl(&["put", LEGACY_KEY, &legacy]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    plant();
    assert!(everything_in_etcd(&etcd).contains("PRIVATE KEY"), "planted");

    // An agent starting onto it deletes it, and trusts and uses it not.
    cells[0].daemon.spawn();
    let a = &cells[0];
    assert!(!legacy_ca_in_etcd(&etcd), "deleted before the agent serves");
    assert!(a.daemon.log().contains("deleted a platform CA shared through etcd"));
    let bundle_a = bundle(a);
    let (verified, said) =
        openssl(&["verify", "-CAfile", bundle_a.to_str().unwrap(), mallory.0.to_str().unwrap()]);
    assert!(!verified, "the planted CA's certificate verifies with the bundle: {said}");
    let (status, said) = curl_api(a, "127.0.0.1", &bundle_a, mallory);
    assert_eq!(status, 0, "the planted CA's admin identity is refused: {said}");
    let ops = api_identity(a, "admin", "ops", &a.daemon.dir.join("identities"));
    let ops = (ops.0.as_path(), ops.1.as_path());
    let (status, said) = curl_api(a, "127.0.0.1", &bundle_a, ops);
    assert_eq!(status, 200, "an identity from A's own CA: {said}");

    cells[1].daemon.spawn();
    wait_for_one_bundle(&cells);
    let b = &cells[1];
    let (status, said) = curl_api(b, "127.0.0.1", &bundle(b), mallory);
    assert_eq!(status, 0, "refused by B too: {said}");

    // Planted again while the agents run: their watch deletes it.
    plant();
    assert!(eventually(Duration::from_secs(5), || !legacy_ca_in_etcd(&etcd)), "deleted");
    let warned = |h: &ClusterHost| h.daemon.log().matches("deleted a platform CA").count();
    assert_eq!(warned(&cells[0]) + warned(&cells[1]), 2, "one warning per deletion");

    // A state directory an older agent left: the shared CA's key (here,
    // the attacker's) beside a bundle of its certificate. It is removed at
    // start, and the bundle rebuilt from the hosts' CAs.
    cells[0].daemon.stop();
    let state = cells[0].daemon.state_dir();
    std::fs::copy(&planted, state.join("ca.pem")).unwrap();
    std::fs::copy(&planted_key, state.join("ca-key.pem")).unwrap();
    cells[0].daemon.spawn();
    let a = &cells[0];
    assert!(!state.join("ca-key.pem").exists(), "the shared CA's key is removed");
    assert!(a.daemon.log().contains("removed the key of the CA the whole cluster shared"));
    let (verified, said) =
        openssl(&["verify", "-CAfile", bundle_a.to_str().unwrap(), mallory.0.to_str().unwrap()]);
    assert!(!verified, "the kept bundle is not trusted: {said}");
    let (status, said) = curl_api(a, "127.0.0.1", &bundle_a, mallory);
    assert_eq!(status, 0, "{said}");
    let (status, said) = curl_api(a, "127.0.0.1", &bundle_a, ops);
    assert_eq!(status, 200, "{said}");
    wait_for_one_bundle(&cells);
    assert!(!everything_in_etcd(&etcd).contains("PRIVATE KEY"));
}

#[test]
fn an_instance_identity_from_one_host_passes_mtls_on_another() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let cells = hosts_configured(&mut underlay, 2, 1, "mtls_apps = [\"backend\"]");
    let (a, b) = (&cells[0], &cells[1]);
    let (frontend, backend) = (a.host.container(0), b.host.container(0));
    a.daemon.register(frontend, "frontend");
    b.daemon.register(backend, "backend");
    http_echo_server(&backend.ns, backend.ip, 8080);
    a.daemon.allow("frontend", "backend", "tcp", "8080");
    a.daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    frontend.ns.use_nameserver(GATEWAY);
    wait_for_one_bundle(&cells);
    // frontend's identity, issued by A's CA, presented to B's listener.
    let ports = a.daemon.instance_ports(frontend.ip);
    let (cert, key) =
        (ports["CF_INSTANCE_CERT"].as_str().unwrap(), ports["CF_INSTANCE_KEY"].as_str().unwrap());
    let (bundle_a, url) = (bundle(a), "https://backend.apps.internal:61443/");
    let curl =
        |identity: &[&str]| curl_https(&frontend.ns, bundle_a.to_str().unwrap(), url, identity).1;
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            last = curl(&["--cert", cert, "--key", key]);
            last.contains("x-source-app: frontend")
        }),
        "A's instance identity admitted by B's mTLS listener: {last}"
    );
    let without = curl(&[]);
    assert!(without.contains("alert certificate required"), "{without}");
}
