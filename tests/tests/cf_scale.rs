//! Cloud Foundry's largest validated deployment in the real policy
//! server: 20,000 apps and 60,000 policies, every one touching this
//! cell's apps (so the cell fetches and enforces all of them), written
//! in one transaction; the time from the commit to the first allowed
//! connection and the agent's own fetch-and-apply time are printed.

use std::time::{Duration, Instant};

use integration_tests::{
    cf::PolicyServer,
    daemon::Daemon,
    eventually, require_root,
    topology::Host,
    traffic::{LONG, SHORT, tcp_echo_server, tcp_echo_works},
};

#[test]
fn sixty_thousand_policies_from_the_policy_server() {
    require_root();
    let host = Host::new(2);
    let server = PolicyServer::start_in(&host.ns);
    let (cert, key) = server.client_identity();
    let daemon = Daemon::start(
        &host.ns,
        &format!(
            "max_body_bytes = 67108864\n[cf]\npolicy_server_url = \"{}\"\nca_cert_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
            server.internal_url(),
            server.ca_file().display(),
            cert.display(),
            key.display()
        ),
    );
    let (a, b) = (host.container(0), host.container(1));
    daemon.register(a, "app-0");
    daemon.register(b, "app-1");
    for port in [8080, 9001, 9003] {
        tcp_echo_server(&b.ns, b.ip, port);
    }
    // Every app (app-0 .. app-19999, tags 1 .. 20000) may reach app-1 on
    // three ports: 60,000 policies, 20,000 app pairs.
    let written = Instant::now();
    server.put_policies_in_bulk("app-", 20_000, 1, &[8080, 9001, 9002]);
    let in_db = written.elapsed();
    assert!(
        eventually(Duration::from_secs(60), || tcp_echo_works(&a.ns, b.ip, 8080, SHORT)),
        "app-0 -> app-1:8080 not allowed within 60 s:\n{}",
        daemon.log()
    );
    let allowed = written.elapsed();
    let status = daemon.get("/v1/status");
    let follow = &status["policy_server"];
    assert_eq!(follow["set"]["policies"], 60_000, "{follow}");
    assert_eq!(follow["set"]["apps"], 20_000, "{follow}");
    let (_, listed) = daemon.curl("GET", "/networking/v1/external/policies", None);
    assert_eq!(listed["total_policies"], 60_000);
    assert!(tcp_echo_works(&a.ns, b.ip, 9001, LONG));
    assert!(!tcp_echo_works(&a.ns, b.ip, 9003, SHORT), "no policy on 9003");
    assert!(!tcp_echo_works(&b.ns, a.ip, 8080, SHORT), "nothing to app-0");
    assert_eq!(daemon.tag("app-0"), 1, "the server's tags");
    assert_eq!(daemon.tag("app-19999"), 20_000, "the server's tags");
    println!(
        "60,000 policies, 20,000 apps: written in the database in {in_db:.2?}; \
         commit -> first allowed connection {allowed:.2?}; \
         the agent's fetch and apply: {} s",
        follow["last_poll_seconds"]
    );
}
