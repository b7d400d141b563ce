//! `[cf]` in cluster mode: two hosts on etcd, both following CF's real
//! policy server (on the underlay). The policies and the server's tags
//! are the cluster's state: both hosts ask for every host's apps, so
//! their changes agree; an app on one host is judged on the other by the
//! same tag, carried in the tunnel's header.

use integration_tests::{
    cf::PolicyServer,
    cluster::{Etcd, Underlay, frontend_and_backend, hosts_configured, reaches},
    eventually, require_root,
    traffic::LONG,
};

const TAGS: &str = "/networking/v1/external/tags";

#[test]
fn hosts_of_a_cluster_follow_one_policy_server_with_its_tags() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let server =
        PolicyServer::builder().internal_host(Underlay::ETCD_ADDRESS).start_in(&underlay.ns);
    let (cert, key) = server.client_identity();
    let cf = format!(
        "[cf]\npolicy_server_url = \"{}\"\nca_cert_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\n",
        server.internal_url(),
        server.ca_file().display(),
        cert.display(),
        key.display()
    );
    let cells = hosts_configured(&mut underlay, 2, 2, &cf);
    let (a, b) = (&cells[0], &cells[1]);
    let (_, backend_a) = frontend_and_backend(a);
    let (_, backend_b) = frontend_and_backend(b);
    assert!(!reaches(a, backend_b, 8080), "default deny");

    server.add_policies(&[("frontend", "backend", "tcp", 8080, 8080)]);
    assert!(
        eventually(LONG + LONG, || reaches(a, backend_b, 8080) && reaches(b, backend_a, 8080)),
        "frontend -> backend:8080 across hosts, both ways:\n{}\n{}",
        a.daemon.log(),
        b.daemon.log()
    );
    assert!(reaches(a, backend_a, 8080), "and on the same host");
    assert!(!reaches(a, backend_b, 9000), "another port");
    let served = server.internal_get("policies?id=frontend");
    let tag = |end: &str| {
        u32::from_str_radix(served["policies"][0][end]["tag"].as_str().expect("tag"), 16)
            .expect("hex")
    };
    for cell in [a, b] {
        assert_eq!(cell.daemon.tag("frontend"), tag("source"), "{}: the server's tag", cell.name);
        assert_eq!(cell.daemon.tag("backend"), tag("destination"), "{}", cell.name);
    }
    assert_eq!(a.daemon.get(TAGS), b.daemon.get(TAGS), "one tag per app on every host");
    let body = r#"{"policies":[{"source":{"id":"backend"},"destination":{"id":"frontend","protocol":"tcp","ports":{"start":1,"end":1}}}]}"#;
    for cell in [a, b] {
        let (status, _) = cell.daemon.curl("POST", "/networking/v1/external/policies", Some(body));
        assert_eq!(status, 409, "{}: writes are the policy server's", cell.name);
    }

    server.delete_policies(&[("frontend", "backend", "tcp", 8080, 8080)]);
    assert!(
        eventually(LONG + LONG, || !reaches(a, backend_b, 8080) && !reaches(b, backend_a, 8080)),
        "deleted at the server: denied on both hosts"
    );
}
