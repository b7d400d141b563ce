//! The CLI against a remote agent: the real `policy-agent` binary with
//! `--server https://HOST:PORT --cert --key --cacert` (or the environment)
//! drives an agent's TCP API with identities its `api-identity` minted,
//! and gets what the socket gives; a read-only identity cannot write, and a
//! wrong CA on either side is refused saying so. Everything runs inside
//! the test's own network namespace, over its loopback.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output},
};

use integration_tests::{agent::agent_bin, daemon::Daemon, require_root, topology::Host};
use serde_json::Value;

/// The agent's TCP API inside the test's namespace, and its `listen`.
const SERVER: &str = "https://127.0.0.1:9093";
const LISTEN: &str = "listen = \"0.0.0.0:9093\"";

/// An API identity's files.
struct Identity {
    cert: PathBuf,
    key: PathBuf,
}

/// `policy-agent ARGS` inside `host`'s namespace, with `env` set and no
/// socket the CLI could fall back to.
fn cli_in(host: &Host, env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = host.ns.command(agent_bin().to_str().expect("a UTF-8 path"));
    cmd.args(args).env("POLICY_AGENT_SOCKET", "/nonexistent/agent.sock");
    for var in
        ["POLICY_AGENT_SERVER", "POLICY_AGENT_CERT", "POLICY_AGENT_KEY", "POLICY_AGENT_CACERT"]
    {
        cmd.env_remove(var);
    }
    for (var, value) in env {
        cmd.env(var, value);
    }
    cmd.output().expect("run policy-agent")
}

/// `policy-agent --server SERVER --cert --key --cacert ARGS`.
fn remote(host: &Host, who: &Identity, cacert: &Path, args: &[&str]) -> Output {
    let mut all: Vec<&str> = vec!["--server", SERVER];
    for (flag, file) in [("--cert", who.cert.as_path()), ("--key", &who.key), ("--cacert", cacert)]
    {
        all.push(flag);
        all.push(file.to_str().expect("a UTF-8 path"));
    }
    all.extend_from_slice(args);
    cli_in(host, &[], &all)
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn succeeded(out: &Output) -> String {
    assert!(out.status.success(), "{}\n{}", stdout(out), stderr(out));
    stdout(out)
}

#[track_caller]
fn refused(out: &Output, says: &[&str]) {
    let said = stderr(out);
    assert!(!out.status.success(), "expected a refusal: {}\n{said}", stdout(out));
    for s in says {
        assert!(said.contains(s), "{said:?} does not say {s:?}");
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{text:?} is not JSON: {e}"))
}

/// The `status` lines that do not move while nothing changes (map
/// occupancy may: flows, conntrack).
fn steady_status(text: &str) -> String {
    // The "maps:" line is a table header: everything from it on (entries,
    // verdict counts) moves with traffic the test does not send, such as
    // the veth's own IPv6 neighbour discovery.
    text.lines().take_while(|l| !l.starts_with("maps:")).collect::<Vec<_>>().join("\n")
}

/// A CA of no agent, and an identity it signed that names an API role:
/// made with openssl, as an outsider would.
fn foreign_ca(dir: &Path) -> (PathBuf, Identity) {
    let file = |name: &str| dir.join(name).to_str().expect("a UTF-8 path").to_owned();
    let (ca, ca_key) = (file("other-ca.pem"), file("other-ca-key.pem"));
    let (cert, key, csr) = (file("intruder.pem"), file("intruder-key.pem"), file("intruder.csr"));
    let ext = file("client.ext");
    std::fs::write(&ext, "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n")
        .expect("write client.ext");
    let ec_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout"];
    for args in [
        [&["req", "-x509", "-days", "1", "-subj", "/CN=another platform CA"], &ec_key[..]]
            .concat()
            .into_iter()
            .chain([ca_key.as_str(), "-out", &ca])
            .collect::<Vec<_>>(),
        [&["req", "-subj", "/OU=api:admin/CN=intruder"], &ec_key[..]]
            .concat()
            .into_iter()
            .chain([key.as_str(), "-out", &csr])
            .collect(),
        // With extensions: an X.509 v3 certificate, as a client's must be.
        ["x509", "-req", "-days", "1", "-in", &csr, "-CA", &ca, "-CAkey", &ca_key]
            .into_iter()
            .chain(["-CAcreateserial", "-extfile", &ext, "-out", &cert])
            .collect(),
    ] {
        let out = Command::new("openssl").args(&args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    }
    (ca.into(), Identity { cert: cert.into(), key: key.into() })
}

#[test]
fn every_verb_works_on_a_remote_agent_as_on_its_socket() {
    require_root();
    let host = Host::new(1);
    let daemon = Daemon::start(&host.ns, LISTEN);
    daemon.register(host.container(0), "web");
    // Identities from the agent's own CA, as an operator mints them.
    let (cert, key) = daemon.api_identity("admin", "ops");
    let ops = Identity { cert, key };
    let (cert, key) = daemon.api_identity("read-only", "dashboard");
    let dashboard = Identity { cert, key };
    let ca = daemon.state_dir().join("ca.pem");

    // Writes and reads over HTTPS, each checked against the socket.
    let policy = ["frontend", "--destination-app", "web", "--protocol", "tcp", "--port", "8080"];
    let said =
        succeeded(&remote(&host, &ops, &ca, &[&["add-network-policy"], &policy[..]].concat()));
    assert!(said.contains("Adding network policy from app frontend to app web"), "{said}");
    let listed = json(&succeeded(&remote(&host, &ops, &ca, &["network-policies", "--json"])));
    assert_eq!(listed["total_policies"], 1, "{listed}");
    assert_eq!(listed, json(&daemon.cli_ok(&["network-policies", "--json"])));
    let table = succeeded(&remote(&host, &dashboard, &ca, &["network-policies"]));
    assert_eq!(table, daemon.cli_ok(&["network-policies"]));
    let endpoints = json(&succeeded(&remote(&host, &dashboard, &ca, &["endpoints", "--json"])));
    assert_eq!(endpoints["endpoints"][0]["app"], "web", "{endpoints}");
    assert_eq!(endpoints, json(&daemon.cli_ok(&["endpoints", "--json"])));
    let status = succeeded(&remote(&host, &dashboard, &ca, &["status"]));
    assert!(status.contains("policies:  1"), "{status}");
    assert_eq!(steady_status(&status), steady_status(&daemon.cli_ok(&["status"])));

    // A read-only identity reads but cannot write: the agent's own words.
    let out = remote(&host, &dashboard, &ca, &[&["remove-network-policy"], &policy[..]].concat());
    refused(&out, &["\"dashboard\" is a read-only API identity", "HTTP 403"]);
    assert_eq!(json(&daemon.cli_ok(&["network-policies", "--json"]))["total_policies"], 1);

    // The environment instead of flags; the admin removes the policy.
    let env = [
        ("POLICY_AGENT_SERVER", Path::new(SERVER)),
        ("POLICY_AGENT_CERT", ops.cert.as_path()),
        ("POLICY_AGENT_KEY", ops.key.as_path()),
        ("POLICY_AGENT_CACERT", ca.as_path()),
    ];
    succeeded(&cli_in(&host, &env, &[&["remove-network-policy"], &policy[..]].concat()));
    let listed = json(&succeeded(&cli_in(&host, &env, &["network-policies", "--json"])));
    assert_eq!(listed["total_policies"], 0, "{listed}");
    assert_eq!(listed, json(&daemon.cli_ok(&["network-policies", "--json"])));

    // A wrong CA, either way, is refused naming which.
    let (other_ca, intruder) = foreign_ca(&daemon.dir);
    let out = remote(&host, &ops, &other_ca, &["network-policies"]);
    refused(&out, &["unknown CA", "--cacert"]);
    let out = remote(&host, &intruder, &ca, &["network-policies"]);
    refused(&out, &["rejected this client certificate", "this agent's platform CA"]);

    // What is missing or wrong in the flags is named before anything is sent.
    let cert = ops.cert.to_str().expect("a UTF-8 path");
    refused(
        &cli_in(&host, &[], &["--server", SERVER, "--cert", cert, "status"]),
        &["--server https://127.0.0.1:9093 needs --key, --cacert"],
    );
    refused(&cli_in(&host, &[], &["--cert", cert, "status"]), &["--cert is for a remote agent"]);
    let http = SERVER.replace("https", "http");
    let out = cli_in(&host, &env[1..], &["--server", &http, "status"]);
    refused(&out, &["is plain HTTP"]);
    // Verbs that act on this host refuse --server.
    refused(&cli_in(&host, &env, &["teardown"]), &["`teardown` acts on this host itself"]);
}
