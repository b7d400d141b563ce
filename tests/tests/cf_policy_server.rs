//! Cloud Foundry's real policy server, as the tests run it
//! (`integration_tests::cf`): a policy written through the external API
//! shows up on the internal mutual-TLS API the cells poll, with the
//! policy server's tags, and goes when deleted; the internal API refuses
//! clients without a certificate of its CA. Started in a test's network
//! namespace, every process lives there, and `policy-server-internal`
//! killed and started again serves what the database holds. The agent's
//! client polls it over one kept connection, chunked answers too, and
//! opens a new one once the server is back from a restart.

use std::{os::unix::fs::MetadataExt as _, time::Instant};

use integration_tests::{
    cf::{INTERNAL_API, Policy, PolicyServer},
    netns::NetNs,
};

fn last_updated(server: &PolicyServer) -> u64 {
    let value = server.internal_get("policies_last_updated");
    value.as_u64().unwrap_or_else(|| panic!("policies_last_updated is not an integer: {value}"))
}

fn is_tag(value: &serde_json::Value) -> bool {
    value.as_str().is_some_and(|t| {
        t.len() == 4 && t.chars().all(|c| c.is_ascii_digit() || ('A'..='F').contains(&c))
    })
}

#[test]
fn policy_written_externally_is_served_internally() {
    integration_tests::require_root();
    let server = PolicyServer::start();
    println!("policy server started in {:.1?}", server.startup);

    let before = last_updated(&server);
    let policy = ("app-a", "app-b", "tcp", 8080, 8080);
    server.add_policies(&[policy]);

    let listed = server.internal_get("policies?id=app-a");
    assert_eq!(listed["total_policies"], 1, "{listed}");
    let served = &listed["policies"][0];
    assert_eq!(served["source"]["id"], "app-a", "{listed}");
    assert_eq!(served["destination"]["id"], "app-b", "{listed}");
    assert_eq!(served["destination"]["protocol"], "tcp", "{listed}");
    assert_eq!(served["destination"]["ports"]["start"], 8080, "{listed}");
    assert_eq!(served["destination"]["ports"]["end"], 8080, "{listed}");
    assert!(is_tag(&served["source"]["tag"]), "source tag: {listed}");
    assert!(is_tag(&served["destination"]["tag"]), "destination tag: {listed}");
    assert_ne!(served["source"]["tag"], served["destination"]["tag"], "{listed}");
    // The destination's side too: a cell hosting only app-b asks for it.
    let by_destination = server.internal_get("policies?id=app-b");
    assert_eq!(by_destination["total_policies"], 1, "{by_destination}");
    let after_add = last_updated(&server);
    assert!(after_add > before, "policies_last_updated did not grow: {before} -> {after_add}");

    let refused = server.internal_get_as("policies", None);
    assert!(refused.is_err(), "no client certificate, yet answered: {refused:?}");
    let stranger = server.internal_get_as("policies", Some(server.stranger_identity()));
    assert!(stranger.is_err(), "a certificate from another CA, yet answered: {stranger:?}");
    println!("refused without a certificate: {}", refused.unwrap_err());
    println!("refused from another CA: {}", stranger.unwrap_err());

    server.delete_policies(&[policy]);
    let listed = server.internal_get("policies?id=app-a");
    assert_eq!(listed["total_policies"], 0, "{listed}");
    let after_delete = last_updated(&server);
    assert!(after_delete > after_add, "policies_last_updated did not grow on delete");
}

/// Every process of `server` is the program itself (nsenter exec'd it, so
/// the PID we signal is the right one) and lives in `ns`.
fn assert_all_in(server: &PolicyServer, ns: &NetNs) {
    let netns = std::fs::metadata(ns.path()).expect("netns file").ino();
    for (name, pid) in server.processes() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_else(|e| panic!("{name} (PID {pid}): {e}"));
        // The kernel keeps 15 bytes of a command's name.
        assert!(name.starts_with(comm.trim_end()), "PID {pid} is {comm:?}, not {name}");
        let inode = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .unwrap_or_else(|e| panic!("{name}'s netns: {e}"))
            .ino();
        assert_eq!(inode, netns, "{name} (PID {pid}) is not in {}", ns.name());
    }
}

#[test]
fn policy_server_in_a_namespace() {
    integration_tests::require_root();
    let ns = NetNs::new(integration_tests::unique_name("cfps"));
    let mut server = PolicyServer::start_in(&ns);
    println!("policy server started in {} in {:.1?}", ns.name(), server.startup);
    assert_all_in(&server, &ns);

    let first = ("app-a", "app-b", "tcp", 8080, 8080);
    server.add_policies(&[first]);
    let listed = server.internal_get("policies?id=app-a");
    assert_eq!(listed["total_policies"], 1, "{listed}");
    assert!(is_tag(&listed["policies"][0]["source"]["tag"]), "{listed}");

    let killed = Instant::now();
    server.kill_internal();
    let down = server.internal_get_as("policies?id=app-a", Some(server.client_identity()));
    assert!(down.is_err(), "policy-server-internal killed, yet answered: {down:?}");
    println!("killed: {}", down.unwrap_err());
    // The external API writes on while the cells cannot poll.
    let second = ("app-a", "app-c", "udp", 53, 53);
    server.add_policies(&[second]);
    server.start_internal();
    println!("policy-server-internal killed and back in {:.1?}", killed.elapsed());
    assert_all_in(&server, &ns);

    let again = server.internal_get("policies?id=app-a");
    assert_eq!(again["total_policies"], 2, "{again}");
    let policies = again["policies"].as_array().expect("policies array");
    // The tags live in the database: the restart keeps them.
    assert!(policies.contains(&listed["policies"][0]), "{listed} lost in {again}");
    assert!(
        policies
            .iter()
            .any(|p| p["destination"]["id"] == "app-c" && p["destination"]["protocol"] == "udp"),
        "the policy written while down is not served: {again}"
    );
}

/// The TCP connections established from `ns` to `port`, as `ss` lists
/// them (the client's ends: the server's have `port` as their source).
fn connections_to(ns: &NetNs, port: u16) -> usize {
    let out = ns
        .command("ss")
        .args(["-tnH", "state", "established", "dport", "=", &format!(":{port}")])
        .output()
        .expect("run ss");
    assert!(out.status.success(), "ss: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.trim().is_empty()).count()
}

/// The headers the internal API answers `path` with (curl's `-i`).
fn headers(server: &PolicyServer, ns: &NetNs, path: &str) -> String {
    let (cert, key) = server.client_identity();
    let out = ns
        .command("curl")
        .args(["-sS", "-i", "--max-time", "10", "--cacert"])
        .arg(server.ca_file())
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg(format!("{}{INTERNAL_API}/{path}", server.internal_url()))
        .output()
        .expect("run curl");
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("\r\n\r\n").next().unwrap_or_default().to_ascii_lowercase()
}

#[test]
fn a_cell_polls_over_one_kept_connection() {
    integration_tests::require_root();
    let ns = NetNs::new(integration_tests::unique_name("cfka"));
    let mut server = PolicyServer::start_in(&ns);
    let client = server.cell_client();
    let port = server.internal_port();
    // Their answer is over the 2 KiB Go's server buffers: it comes chunked.
    let policies: Vec<Policy> =
        (0..40).map(|i| ("app-a", "app-b", "tcp", 1000 + i, 1000 + i)).collect();
    server.add_policies(&policies);
    let head = headers(&server, &ns, "policies?id=app-a");
    assert!(head.contains("transfer-encoding: chunked"), "not chunked: {head}");
    let head = headers(&server, &ns, "policies_last_updated");
    assert!(head.contains("content-length:"), "no length: {head}");

    let poll = || ns.run(|| client.last_updated()).unwrap_or_else(|e| panic!("poll: {e}"));
    let updated = poll();
    for _ in 0..5 {
        assert_eq!(poll(), updated);
        let listed = ns
            .run(|| client.policies(&["app-a".to_owned()]))
            .unwrap_or_else(|e| panic!("policies: {e}"));
        assert_eq!(listed.policies.len(), 40, "{:?}", listed.total_policies);
    }
    assert_eq!(client.connections_made(), 1, "eleven requests, one connection");
    assert_eq!(connections_to(&ns, port), 1, "the connection is kept open");

    // Killed and started again between two polls: the kept connection
    // is closed; the next poll goes on a new one and is answered.
    server.kill_internal();
    server.start_internal();
    assert_eq!(poll(), updated, "the first poll after the restart");
    assert_eq!(client.connections_made(), 2, "a new connection after the restart");
    assert_eq!(connections_to(&ns, port), 1, "the closed one is gone");

    // Down: unreachable, as before; back: answered.
    server.kill_internal();
    let down = ns.run(|| client.last_updated());
    let error = down.expect_err("policy-server-internal killed, yet answered");
    assert_eq!(error.kind(), "unreachable", "{error}");
    server.start_internal();
    assert_eq!(poll(), updated);
    assert_eq!(client.connections_made(), 3);
}
