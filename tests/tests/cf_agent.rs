//! The agent with Cloud Foundry's real policy server as its source of
//! policies and tags (`[cf]`): policies written through the server's
//! external API (as `cf add-network-policy` does) reach real traffic
//! between container namespaces within two polls, with the server's tags;
//! deletes cut open connections; a container registered later is allowed
//! at once (the forced poll); the server down changes nothing, also
//! across a restart; a refused client certificate is named.
//!
//! The policy server runs inside the test's host namespace (its loopback),
//! the agent beside it, as on a cell that reaches its policy server.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use integration_tests::{
    cf::PolicyServer,
    daemon::Daemon,
    eventually, require_root,
    topology::Host,
    traffic::{
        LONG, SHORT, echo_once, tcp_connect, tcp_echo_server, tcp_echo_works, udp_echo_server,
        udp_echo_works, udp_socket,
    },
};
use serde_json::Value;

/// The `[cf]` section for `server`, with the client identity `identity`.
fn cf_section(server: &PolicyServer, identity: (PathBuf, PathBuf), poll: &str) -> String {
    let (cert, key) = identity;
    format!(
        "[cf]\npolicy_server_url = \"{}\"\nca_cert_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\npoll_interval = \"{poll}\"\nclient_timeout = \"2s\"\n",
        server.internal_url(),
        server.ca_file().display(),
        cert.display(),
        key.display(),
    )
}

/// Polls until `check` holds, returning how long that took; panics after
/// `within` naming `what`.
fn time_until(
    daemon: &Daemon,
    within: Duration,
    what: &str,
    check: impl FnMut() -> bool,
) -> Duration {
    let started = Instant::now();
    assert!(eventually(within, check), "{what} not within {within:?}:\n{}", daemon.log());
    started.elapsed()
}

fn policy_server_status(daemon: &Daemon) -> Value {
    daemon.get("/v1/status")["policy_server"].clone()
}

#[test]
fn policies_from_the_policy_server_reach_traffic() {
    require_root();
    let host = Host::new(4);
    let server = PolicyServer::start_in(&host.ns);
    let daemon = Daemon::start(&host.ns, &cf_section(&server, server.client_identity(), "1s"));
    for (i, app) in [(0, "app-a"), (1, "app-b"), (2, "app-c"), (3, "app-b")] {
        daemon.register(host.container(i), app);
    }
    let (a, b, c, b2) =
        (host.container(0), host.container(1), host.container(2), host.container(3));
    for port in [8080, 9090] {
        tcp_echo_server(&b.ns, b.ip, port);
    }
    tcp_echo_server(&b2.ns, b2.ip, 8080);
    tcp_echo_server(&a.ns, a.ip, 8080);
    udp_echo_server(&b.ns, b.ip, 5353);
    assert!(!tcp_echo_works(&a.ns, b.ip, 8080, SHORT), "no policy yet");

    // Written at the server: in force within two polls (2 s), with the
    // server's tags.
    server.add_policies(&[("app-a", "app-b", "tcp", 8080, 8080)]);
    let took = time_until(&daemon, Duration::from_secs(5), "app-a -> app-b:8080", || {
        tcp_echo_works(&a.ns, b.ip, 8080, SHORT)
    });
    println!("policy server write -> first allowed connection: {took:.2?}");
    assert!(took < Duration::from_secs(3), "took {took:?}, more than two polls");
    assert!(tcp_echo_works(&a.ns, b2.ip, 8080, LONG), "every instance of app-b");
    assert!(!tcp_echo_works(&a.ns, b.ip, 9090, SHORT), "another port");
    assert!(!tcp_echo_works(&c.ns, b.ip, 8080, SHORT), "another source app");
    assert!(!tcp_echo_works(&b.ns, a.ip, 8080, SHORT), "the other way");
    let served = server.internal_get("policies?id=app-a");
    let hex = |end: &str| {
        u32::from_str_radix(served["policies"][0][end]["tag"].as_str().expect("tag"), 16)
            .expect("hex tag")
    };
    assert_eq!(daemon.tag("app-a"), hex("source"), "app-a's tag is the server's");
    assert_eq!(daemon.tag("app-b"), hex("destination"), "app-b's tag is the server's");
    assert!(daemon.tag("app-c") >= 1 << 24, "an app no policy names: a tag that never travels");

    // Ranges and UDP.
    server.add_policies(&[
        ("app-c", "app-b", "tcp", 9000, 9100),
        ("app-a", "app-b", "udp", 5353, 5353),
    ]);
    time_until(&daemon, Duration::from_secs(5), "app-c -> app-b:9090", || {
        tcp_echo_works(&c.ns, b.ip, 9090, SHORT)
    });
    assert!(udp_echo_works(&udp_socket(&a.ns, None), b.ip, 5353, 64, LONG), "udp policy");
    assert!(!tcp_echo_works(&c.ns, b.ip, 8080, SHORT), "outside the range");

    // Reads show what is in force; writes are the server's.
    let (status, listed) = daemon.curl("GET", "/networking/v1/external/policies", None);
    assert_eq!((status, listed["total_policies"].as_u64()), (200, Some(3)), "{listed}");
    let body = r#"{"policies":[{"source":{"id":"app-c"},"destination":{"id":"app-a","protocol":"tcp","ports":{"start":1,"end":1}}}]}"#;
    let (status, refused) = daemon.curl("POST", "/networking/v1/external/policies", Some(body));
    assert_eq!(status, 409, "{refused}");
    assert!(refused["error"].as_str().unwrap_or("").contains("policy server"), "{refused}");
    let out = daemon.cli(&[
        "add-network-policy",
        "app-c",
        "--destination-app",
        "app-a",
        "--protocol",
        "tcp",
        "--port",
        "8080",
    ]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("cf add-network-policy"), "{said}");
    let (status, _) = daemon.curl("POST", "/networking/v1/external/policies/delete", Some(body));
    assert_eq!(status, 409);
    let follow = policy_server_status(&daemon);
    assert_eq!(follow["state"], "following", "{follow}");
    assert_eq!(follow["set"]["policies"], 3, "{follow}");

    // Deleted at the server: an open connection is cut.
    let mut open = tcp_connect(&a.ns, None, b.ip, 8080, LONG).expect("connect");
    assert!(echo_once(&mut open));
    server.delete_policies(&[("app-a", "app-b", "tcp", 8080, 8080)]);
    time_until(&daemon, Duration::from_secs(5), "the open connection cut", || {
        !echo_once(&mut open)
    });
    assert!(!tcp_echo_works(&a.ns, b.ip, 8080, SHORT));
    assert!(tcp_echo_works(&c.ns, b.ip, 9090, LONG), "the other policies stay");
}

#[test]
fn a_container_registered_later_is_allowed_at_once() {
    require_root();
    let host = Host::new(2);
    let server = PolicyServer::start_in(&host.ns);
    // Polls an hour apart: only the registration's forced poll can bring
    // the policy in.
    let daemon = Daemon::start(&host.ns, &cf_section(&server, server.client_identity(), "1h"));
    let (a, b) = (host.container(0), host.container(1));
    daemon.register(b, "app-b");
    tcp_echo_server(&b.ns, b.ip, 8080);
    server.add_policies(&[("app-a", "app-b", "tcp", 8080, 8080)]);
    daemon.register(a, "app-a");
    assert!(
        tcp_echo_works(&a.ns, b.ip, 8080, LONG),
        "allowed as soon as registered:\n{}",
        daemon.log()
    );
}

#[test]
fn the_server_down_changes_nothing_also_across_a_restart() {
    require_root();
    let host = Host::new(2);
    let mut server = PolicyServer::start_in(&host.ns);
    let mut daemon = Daemon::start(&host.ns, &cf_section(&server, server.client_identity(), "1s"));
    let (a, b) = (host.container(0), host.container(1));
    daemon.register(a, "app-a");
    daemon.register(b, "app-b");
    for port in [8080, 9090] {
        tcp_echo_server(&b.ns, b.ip, port);
    }
    server.add_policies(&[("app-a", "app-b", "tcp", 8080, 8080)]);
    time_until(&daemon, Duration::from_secs(5), "app-a -> app-b:8080", || {
        tcp_echo_works(&a.ns, b.ip, 8080, SHORT)
    });

    server.kill_internal();
    time_until(&daemon, Duration::from_secs(5), "the failure in status", || {
        policy_server_status(&daemon)["state"] == "failing"
    });
    let follow = policy_server_status(&daemon);
    assert_eq!(follow["last_error"]["kind"], "unreachable", "{follow}");
    assert!(follow["set_age_seconds"].as_f64().is_some(), "{follow}");
    assert!(tcp_echo_works(&a.ns, b.ip, 8080, LONG), "enforcement unchanged while it is down");
    assert!(!tcp_echo_works(&a.ns, b.ip, 9090, SHORT));
    let out = daemon.cli(&[
        "add-network-policy",
        "app-a",
        "--destination-app",
        "app-b",
        "--protocol",
        "tcp",
        "--port",
        "9090",
    ]);
    assert!(!out.status.success(), "a write while the server is down");
    assert!(daemon.log().contains("cannot reach the policy server"), "{}", daemon.log());

    // Restarted while the server is down: the same enforcement at once.
    daemon.stop();
    daemon.spawn();
    assert!(tcp_echo_works(&a.ns, b.ip, 8080, LONG), "after the restart:\n{}", daemon.log());
    assert!(!tcp_echo_works(&a.ns, b.ip, 9090, SHORT));
    let follow = policy_server_status(&daemon);
    assert!(follow["set"]["policies"] == 1, "the set's date survives the restart: {follow}");

    // Back: the server's deletes apply again.
    server.start_internal();
    server.delete_policies(&[("app-a", "app-b", "tcp", 8080, 8080)]);
    time_until(&daemon, Duration::from_secs(20), "the delete after the outage", || {
        !tcp_echo_works(&a.ns, b.ip, 8080, SHORT)
    });
    assert_eq!(policy_server_status(&daemon)["state"], "following");
}

#[test]
fn a_refused_client_certificate_is_named() {
    require_root();
    let host = Host::new(1);
    let server = PolicyServer::start_in(&host.ns);
    let (cert, _) = server.stranger_identity();
    let daemon = Daemon::start(&host.ns, &cf_section(&server, server.stranger_identity(), "1s"));
    daemon.register(host.container(0), "app-a");
    time_until(&daemon, Duration::from_secs(5), "the refusal in status", || {
        policy_server_status(&daemon)["state"] == "failing"
    });
    let follow = policy_server_status(&daemon);
    let error = &follow["last_error"];
    assert_eq!(error["kind"], "client_certificate_refused", "{follow}");
    let message = error["message"].as_str().unwrap_or("");
    assert!(message.contains(&cert.display().to_string()), "names the certificate: {message}");
    assert!(daemon.log().contains("refused this cell's client certificate"), "{}", daemon.log());
}
