//! The agent daemon in a test host namespace, driven only through its CLI
//! and its HTTP API (curl), with real traffic between container namespaces.

use std::{collections::BTreeSet, time::Duration};

use integration_tests::{
    daemon::Daemon,
    require_root,
    topology::Host,
    traffic::{
        LONG, SHORT, SteadyFlows, echo_once, ping, tcp_connect, tcp_echo_server, tcp_echo_works,
        udp_echo_server, udp_echo_works, udp_socket,
    },
};
use policy_agent::{Maps, dataplane::addr_key};
use policy_api::Client;
use policy_common::{maps::PairKey, ports::Allowance};
use serde_json::{Value, json};

const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/cf-policy-server");
const APP_A: &str = "1081ceac-f5c4-47a8-95e8-88e1e302efb5";
const APP_B: &str = "38f08df0-19df-4439-b4e9-61096d4301ea";
const APP_C: &str = "308e7ef1-63f1-4a6c-978c-2e527cbb1c36";
const POLICIES: &str = "/networking/v1/external/policies";

fn fixture(name: &str) -> String {
    std::fs::read_to_string(format!("{FIXTURES}/{name}")).expect("fixture")
}

fn policy_set(body: &Value) -> BTreeSet<String> {
    body["policies"].as_array().expect("policies array").iter().map(Value::to_string).collect()
}

/// Registers container `i` as an instance of `app` through the CLI.
fn add_endpoint(daemon: &Daemon, host: &Host, i: usize, app: &str) {
    daemon.register(host.container(i), app);
}

#[test]
fn cloud_foundry_json_round_trips_and_is_enforced() {
    require_root();
    let host = Host::new(4);
    let daemon = Daemon::start(&host.ns, "");
    // Policies first: they name apps with no endpoints yet.
    let post = fixture("external-policies-post.json");
    assert_eq!(daemon.curl("POST", POLICIES, Some(&post)), (200, json!({})));
    let (status, listed) = daemon.curl("GET", POLICIES, None);
    let want: Value =
        serde_json::from_str(&fixture("external-policies-get-response.json")).unwrap();
    assert_eq!(status, 200);
    assert_eq!(listed["total_policies"], want["total_policies"]);
    assert_eq!(policy_set(&listed), policy_set(&want));
    let tags: Value = serde_json::from_str(&fixture("external-tags-response.json")).unwrap();
    assert_eq!(daemon.curl("GET", "/networking/v1/external/tags", None), (200, tags));
    // Filters.
    let count = |query: &str| {
        daemon.curl("GET", &format!("{POLICIES}?{query}"), None).1["total_policies"].clone()
    };
    assert_eq!(count(&format!("source_id={APP_C}")), 1);
    assert_eq!(count(&format!("id={APP_B}")), 1);
    assert_eq!(count(&format!("dest_id={APP_B},{APP_C}")), 2);
    assert_eq!(count(&format!("source_id={APP_A}&dest_id={APP_C}")), 0);

    // The endpoints appear; the policies take effect.
    for (i, app) in [(0, APP_A), (1, APP_B), (2, APP_C), (3, APP_C)] {
        add_endpoint(&daemon, &host, i, app);
    }
    let (a, b, c2, c3) =
        (host.container(0), host.container(1), host.container(2), host.container(3));
    for port in [1234, 1235, 1236] {
        tcp_echo_server(&b.ns, b.ip, port);
    }
    tcp_echo_server(&c2.ns, c2.ip, 1234);
    assert!(tcp_echo_works(&a.ns, b.ip, 1234, LONG));
    assert!(tcp_echo_works(&a.ns, b.ip, 1235, LONG));
    assert!(!tcp_echo_works(&a.ns, b.ip, 1236, SHORT), "outside the range");
    assert!(tcp_echo_works(&c3.ns, c2.ip, 1234, LONG), "an app may reach its own instances");
    assert!(!tcp_echo_works(&a.ns, c2.ip, 1234, SHORT), "no policy from A to C");

    // UDP through the cf verb.
    daemon.allow(APP_A, APP_B, "udp", "5353");
    udp_echo_server(&b.ns, b.ip, 5353);
    udp_echo_server(&b.ns, b.ip, 5354);
    let socket = udp_socket(&a.ns, None);
    assert!(udp_echo_works(&socket, b.ip, 5353, 64, LONG));
    assert!(!udp_echo_works(&socket, b.ip, 5354, 64, SHORT));
    let table = daemon.cli_ok(&["network-policies", "--source", APP_A]);
    assert!(table.contains("udp") && table.contains("1234-1235"), "{table}");

    // Deleting with the same body removes them and cuts what they allowed.
    let mut open = tcp_connect(&a.ns, None, b.ip, 1234, LONG).unwrap();
    assert!(echo_once(&mut open));
    assert_eq!(daemon.curl("POST", &format!("{POLICIES}/delete"), Some(&post)), (200, json!({})));
    assert_eq!(
        daemon.curl("GET", &format!("{POLICIES}?source_id={APP_C}"), None).1["total_policies"],
        0
    );
    open.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    assert!(!echo_once(&mut open), "the open connection is cut");
    assert!(!tcp_echo_works(&a.ns, b.ip, 1234, SHORT));
    assert!(udp_echo_works(&socket, b.ip, 5353, 64, LONG), "the other policy stays");
}

#[test]
fn bad_input_gets_400_naming_the_problem_and_changes_nothing() {
    require_root();
    let host = Host::new(1);
    let daemon = Daemon::start(&host.ns, "max_policies_per_source = 3\nmax_body_bytes = 65536");
    let one = |src: &str, proto: &str, start: Value, end: Value| json!({"source": {"id": src}, "destination": {"id": "b", "protocol": proto, "ports": {"start": start, "end": end}}});
    let good = json!({"policies": [one("a", "tcp", json!(80), json!(80))]}).to_string();
    assert_eq!(daemon.curl("POST", POLICIES, Some(&good)).0, 200);
    let snapshot = daemon.curl("GET", POLICIES, None);
    let stored = daemon.stored_state();

    let huge = format!(
        "{{\"policies\": [{}]}}",
        vec![one("a", "tcp", json!(1), json!(1)).to_string(); 1000].join(",")
    );
    // (body, field named in the 400, whether a delete of it is refused too)
    let cases: Vec<(String, &str, bool)> = vec![
        ("{not json".into(), "body", true),
        ("{}".into(), "policies", true),
        (json!({"policies": []}).to_string(), "policies", true),
        (json!({"policies": [one("a", "sctp", json!(1), json!(1))]}).to_string(), "policies[0].destination.protocol", true),
        (json!({"policies": [one("a", "icmp", json!(1), json!(1))]}).to_string(), "policies[0].destination.ports", true),
        (json!({"policies": [one("a", "tcp", json!(0), json!(1))]}).to_string(), "policies[0].destination.ports.start", true),
        (json!({"policies": [one("a", "tcp", json!(1), json!(65536))]}).to_string(), "policies[0].destination.ports.end", true),
        (json!({"policies": [one("a", "tcp", json!(90), json!(80))]}).to_string(), "policies[0].destination.ports", true),
        (json!({"policies": [one("a", "tcp", json!("80"), json!(80))]}).to_string(), "policies[0].destination.ports.start", true),
        (json!({"policies": [one("", "tcp", json!(1), json!(1))]}).to_string(), "policies[0].source.id", true),
        (json!({"policies": [one(&"x".repeat(300), "tcp", json!(1), json!(1))]}).to_string(), "policies[0].source.id", true),
        (
            json!({"policies": [{"source": {"id": "a", "tag": "0001"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 1, "end": 1}}}]}).to_string(),
            "policies[0].source.tag",
            true,
        ),
        // One bad policy in a batch: none of the batch applies.
        (
            json!({"policies": [one("a", "tcp", json!(81), json!(81)), one("a", "udp", json!(70000), json!(70000))]}).to_string(),
            "policies[1].destination.ports.start",
            true,
        ),
        // Over the per-source limit (a has 1, the batch brings 3 more).
        (
            json!({"policies": [one("a", "tcp", json!(1), json!(1)), one("a", "tcp", json!(2), json!(2)), one("a", "tcp", json!(3), json!(3))]}).to_string(),
            "policies",
            false, // the limit only applies to adds
        ),
        (huge, "body", true),
    ];
    for (body, field, refused_on_delete) in &cases {
        for path in [POLICIES.to_owned(), format!("{POLICIES}/delete")] {
            let (status, reply) = daemon.curl("POST", &path, Some(body));
            if path.ends_with("delete") && !refused_on_delete {
                assert_eq!(status, 200, "{path}: {reply}");
                continue;
            }
            assert_eq!(status, 400, "{path} {body:.80}: {reply}");
            assert_eq!(reply["field"], *field, "{path} {body:.80}: {reply}");
            assert!(reply["error"].as_str().is_some_and(|e| !e.is_empty()));
        }
        assert_eq!(daemon.curl("GET", POLICIES, None), snapshot, "state changed after {body:.80}");
    }
    assert_eq!(daemon.stored_state(), stored, "stored state changed");
    assert!(daemon.curl("GET", POLICIES, None).1.to_string().contains("\"start\":80"));

    // Adding an existing policy and deleting a missing one are not errors.
    assert_eq!(daemon.curl("POST", POLICIES, Some(&good)).0, 200);
    let missing = json!({"policies": [one("zz", "udp", json!(9), json!(9))]}).to_string();
    assert_eq!(daemon.curl("POST", &format!("{POLICIES}/delete"), Some(&missing)).0, 200);
    assert_eq!(daemon.curl("GET", POLICIES, None), snapshot);

    // Endpoints.
    let c = host.container(0);
    for (body, field) in [
        (json!({"app": "a", "ip": "10.255.0.300", "ifname": c.host_ifname}), "ip"),
        (json!({"app": "", "ip": c.ip.to_string(), "ifname": c.host_ifname}), "app"),
        (json!({"app": "a", "ip": c.ip.to_string(), "ifname": "nosuchif0"}), "ifname"),
        (json!({"app": "a", "ip": c.ip.to_string()}), "ifname"),
    ] {
        let (status, reply) = daemon.curl("POST", "/v1/endpoints", Some(&body.to_string()));
        assert_eq!((status, reply["field"].clone()), (400, json!(field)), "{body}: {reply}");
    }
    assert_eq!(daemon.curl("GET", "/v1/endpoints", None).1, json!({"endpoints": []}));

    // The CLI prints the agent's error and exits non-zero.
    let out = daemon.cli(&[
        "add-network-policy",
        "a",
        "--destination-app",
        "b",
        "--protocol",
        "tcp",
        "--port",
        "70000",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("70000"));
    let out = daemon.cli(&[
        "endpoint",
        "add",
        "--app",
        "a",
        "--ip",
        &c.ip.to_string(),
        "--ifname",
        "nosuchif0",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interface nosuchif0 not found"),
        "{out:?}"
    );
}

#[test]
fn a_full_kernel_map_is_reported_and_nothing_is_half_applied() {
    require_root();
    let host = Host::new(1);
    let daemon = Daemon::start(&host.ns, "[capacities]\npolicies = 3");
    let pair = |src: &str, dst: &str| json!({"source": {"id": src}, "destination": {"id": dst, "protocol": "tcp", "ports": {"start": 80, "end": 80}}});
    let first = json!({"policies": [pair("a", "b"), pair("a", "c")]}).to_string();
    assert_eq!(daemon.curl("POST", POLICIES, Some(&first)).0, 200);
    let snapshot = daemon.curl("GET", POLICIES, None);
    let tables = Maps::open_pinned(&daemon.maps_dir()).unwrap();
    let counters = tables.policy_counter_ids().unwrap();
    // New pairs go to the kernel in one batch write: the first fits, the
    // second finds the map full, and the one written is taken back.
    let batch =
        json!({"policies": [pair("a", "b"), pair("d", "e"), pair("f", "g"), pair("h", "i")]})
            .to_string();
    let (status, reply) = daemon.curl("POST", POLICIES, Some(&batch));
    assert_eq!(status, 507, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("POLICIES is full"), "{reply}");
    assert_eq!(daemon.curl("GET", POLICIES, None), snapshot);
    assert_eq!(tables.pairs().len(), 2, "kernel and desired state agree");
    assert_eq!(tables.policy_counter_ids().unwrap(), counters, "no counters left behind");
    // Room for exactly one more: a batch of one is written whole.
    let one = json!({"policies": [pair("d", "e")]}).to_string();
    assert_eq!(daemon.curl("POST", POLICIES, Some(&one)).0, 200);
    assert_eq!(tables.pairs().len(), 3);
}

#[test]
fn kill_9_under_traffic_loses_nothing_and_keeps_acknowledged_writes() {
    require_root();
    let host = Host::new(2);
    let mut daemon = Daemon::start(&host.ns, "");
    add_endpoint(&daemon, &host, 0, "frontend");
    add_endpoint(&daemon, &host, 1, "backend");
    daemon.allow("frontend", "backend", "udp", "9000");
    let (a, b) = (host.container(0), host.container(1));
    let flows = SteadyFlows::start(&a.ns, &b.ns, b.ip, 9000, 9001);
    std::thread::sleep(Duration::from_millis(300));
    // A write acknowledged right before the kill must survive it.
    daemon.allow("frontend", "backend", "tcp", "443");
    daemon.kill9();
    std::thread::sleep(Duration::from_millis(300));
    daemon.spawn();
    std::thread::sleep(Duration::from_millis(300));
    daemon.kill9();
    daemon.spawn();
    std::thread::sleep(Duration::from_millis(300));
    let counts = flows.finish();
    assert!(counts.sent > 500, "{counts:?}");
    assert_eq!(counts.allowed_received, counts.sent, "allowed packets lost: {counts:?}");
    assert_eq!(counts.denied_received, 0, "denied packets passed: {counts:?}");
    let listed = daemon.cli_ok(&["network-policies"]);
    assert!(listed.contains("9000") && listed.contains("443"), "{listed}");
    assert_eq!(
        daemon.curl("GET", "/v1/endpoints", None).1["endpoints"].as_array().unwrap().len(),
        2
    );
    tcp_echo_server(&b.ns, b.ip, 443);
    assert!(tcp_echo_works(&a.ns, b.ip, 443, LONG), "the acknowledged policy is enforced");
    println!("kill -9 twice under traffic: {counts:?}");
}

#[test]
fn policy_churn_never_changes_the_verdict_of_an_unchanged_flow() {
    require_root();
    use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::IndexedRandom as _};
    let host = Host::new(3);
    let daemon = Daemon::start(&host.ns, "");
    for (i, app) in ["a", "b", "c"].into_iter().enumerate() {
        add_endpoint(&daemon, &host, i, app);
    }
    daemon.allow("a", "b", "udp", "9000");
    let (a, b) = (host.container(0), host.container(1));
    let flows = SteadyFlows::start(&a.ns, &b.ns, b.ip, 9000, 9001);
    let client = Client::new(&daemon.socket);
    let mut rng = StdRng::seed_from_u64(7);
    let mut live: Vec<Value> = Vec::new();
    let mut operations = 0;
    while operations < 3000 {
        let batch: Vec<Value> = if live.len() > 200 || (!live.is_empty() && rng.random_bool(0.4)) {
            let n = rng.random_range(1..=live.len().min(20));
            live.drain(..n).collect()
        } else {
            (0..rng.random_range(1..20))
                .map(|_| {
                    let src = *["a", "b", "c", "d"].choose(&mut rng).unwrap();
                    let dst = *["a", "b", "c", "e"].choose(&mut rng).unwrap();
                    let protocol = *["tcp", "udp"].choose(&mut rng).unwrap();
                    // Never touch a→b udp around the two steady flows.
                    let start: u16 = if (src, dst, protocol) == ("a", "b", "udp") {
                        rng.random_range(9100..20000)
                    } else {
                        rng.random_range(1..60000)
                    };
                    let end = start + rng.random_range(0..50);
                    let p = json!({"source": {"id": src}, "destination": {"id": dst, "protocol": protocol, "ports": {"start": start, "end": end}}});
                    live.push(p.clone());
                    p
                })
                .collect()
        };
        let removing = !live.iter().any(|l| l == &batch[0]);
        let path = if removing { format!("{POLICIES}/delete") } else { POLICIES.to_owned() };
        let reply = client.request("POST", &path, Some(&json!({"policies": batch}))).unwrap();
        assert_eq!(reply.status, 200, "{}", reply.body);
        operations += batch.len();
    }
    std::thread::sleep(Duration::from_millis(200));
    let counts = flows.finish();
    assert!(counts.sent > 200, "{counts:?}");
    assert_eq!(
        counts.allowed_received, counts.sent,
        "an allowed flow lost packets during churn: {counts:?}"
    );
    assert_eq!(counts.denied_received, 0, "a denied flow got through during churn: {counts:?}");
    println!("{operations} policy changes under traffic: {counts:?}");
}

#[test]
fn deleting_an_endpoint_removes_every_entry_naming_it() {
    require_root();
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "");
    add_endpoint(&daemon, &host, 0, "frontend");
    add_endpoint(&daemon, &host, 1, "backend");
    daemon.allow("frontend", "backend", "tcp", "8080");
    let (a, b) = (host.container(0), host.container(1));
    tcp_echo_server(&b.ns, b.ip, 8080);
    assert!(tcp_echo_works(&a.ns, b.ip, 8080, LONG));
    let tables = Maps::open_pinned(&daemon.maps_dir()).unwrap();
    let names_b = |t: &Maps| {
        let key = addr_key(b.ip);
        (
            t.endpoint(b.ip).is_some(),
            t.veths().iter().any(|(_, ip, _)| *ip == b.ip),
            t.connections().iter().any(|(k, _)| k.addr_lo == key || k.addr_hi == key),
        )
    };
    assert_eq!(names_b(&tables), (true, true, true));
    daemon.cli_ok(&["endpoint", "del", "--ip", &b.ip.to_string()]);
    assert_eq!(names_b(&tables), (false, false, false));
    let status: Value = serde_json::from_str(&daemon.cli_ok(&["status", "--json"])).unwrap();
    let attached = status["attached"].to_string();
    assert!(!attached.contains(&b.host_ifname) && attached.contains(&a.host_ifname), "{attached}");
    assert_eq!(status["overlay"], serde_json::json!({"network": "10.255.0.0", "slots": 65536}));
    assert!(daemon.stored_state().endpoint(b.ip).is_none());
    // Deleting it again is fine.
    daemon.cli_ok(&["endpoint", "del", "--ip", &b.ip.to_string()]);
}

#[test]
fn sigterm_leaves_enforcement_in_place_and_teardown_removes_it() {
    require_root();
    let host = Host::new(2);
    let mut daemon = Daemon::start(&host.ns, "");
    add_endpoint(&daemon, &host, 0, "frontend");
    add_endpoint(&daemon, &host, 1, "backend");
    daemon.allow("frontend", "backend", "tcp", "8080");
    let (a, b) = (host.container(0), host.container(1));
    tcp_echo_server(&b.ns, b.ip, 8080);
    tcp_echo_server(&b.ns, b.ip, 8081);
    assert!(daemon.stop().success(), "clean exit on SIGTERM:\n{}", daemon.log());
    assert!(!daemon.socket.exists(), "socket removed");
    assert!(tcp_echo_works(&a.ns, b.ip, 8080, LONG), "still allowed with the agent stopped");
    assert!(!tcp_echo_works(&a.ns, b.ip, 8081, SHORT), "still denied with the agent stopped");
    let status = daemon.cli(&["status"]);
    assert!(!status.status.success());
    assert!(String::from_utf8_lossy(&status.stderr).contains("is `policy-agent run` running?"));
    daemon.cli_ok(&["teardown", "--config", daemon.config.to_str().unwrap()]);
    assert!(!daemon.pin_dir().exists());
    assert!(tcp_echo_works(&a.ns, b.ip, 8081, LONG), "no enforcement after teardown");
}

#[test]
fn the_api_is_also_served_on_tcp_when_configured() {
    require_root();
    let host = Host::new(1);
    // The host namespace is the test's own: any port is free there.
    let daemon = Daemon::start(&host.ns, "listen = \"127.0.0.1:9090\"\nlisten_plaintext = true");
    let post = fixture("external-policies-post.json");
    assert_eq!(daemon.curl("POST", POLICIES, Some(&post)).0, 200);
    let out = host
        .ns
        .command("curl")
        .args(["-s", "-f", "http://127.0.0.1:9090/networking/v1/external/policies"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed["total_policies"], 2);
}

#[test]
fn more_port_ranges_than_a_pair_holds_is_a_400() {
    require_root();
    let host = Host::new(1);
    let daemon = Daemon::start(&host.ns, "");
    let policies: Vec<Value> = (0..257)
        .map(|i| json!({"source": {"id": "a"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 1000 + i, "end": 1000 + i}}}))
        .collect();
    let (status, reply) =
        daemon.curl("POST", POLICIES, Some(&json!({"policies": policies}).to_string()));
    assert_eq!(status, 400, "{reply}");
    assert!(
        reply["reason"].as_str().unwrap().contains("more than 256 distinct port ranges"),
        "{reply}"
    );
    assert_eq!(daemon.curl("GET", POLICIES, None).1["total_policies"], 0);
}

#[test]
fn icmp_policies_allow_ping_by_type_and_its_replies() {
    require_root();
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "");
    add_endpoint(&daemon, &host, 0, "frontend");
    add_endpoint(&daemon, &host, 1, "backend");
    let (a, b) = (host.container(0), host.container(1));
    let icmp = |verb: &str, extra: &[&str]| {
        let mut args = vec![verb, "frontend", "--destination-app", "backend", "--protocol", "icmp"];
        args.extend_from_slice(extra);
        daemon.cli_ok(&args)
    };
    assert!(!ping(&a.ns, b.ip), "denied without a policy");
    // A TCP policy on every port allows no ICMP; a timestamp policy no echo.
    daemon.allow("frontend", "backend", "tcp", "1-65535");
    icmp("add-network-policy", &["--icmp-type", "13"]);
    assert!(!ping(&a.ns, b.ip), "type 13 does not allow echo requests");
    let added = icmp("add-network-policy", &["--icmp-type", "8"]);
    assert!(added.contains("icmp type 8"), "{added}");
    assert!(ping(&a.ns, b.ip), "echo request allowed, its reply came back");
    assert!(!ping(&b.ns, a.ip), "the other way needs its own policy");

    // Listed in the API with icmp_type in place of ports, in the CLI's table,
    // and explained.
    let (_, listed) = daemon.curl("GET", &format!("{POLICIES}?source_id=frontend"), None);
    let destinations: Vec<&Value> =
        listed["policies"].as_array().unwrap().iter().map(|p| &p["destination"]).collect();
    assert!(
        destinations.contains(&&json!({"id": "backend", "protocol": "icmp", "icmp_type": 8})),
        "{listed}"
    );
    let table = daemon.cli_ok(&["network-policies", "--source", "frontend"]);
    assert!(table.contains("type 8") && table.contains("type 13"), "{table}");
    let (a_ip, b_ip) = (a.ip.to_string(), b.ip.to_string());
    let explained = daemon.cli_ok(&["explain", &a_ip, &b_ip, "icmp", "8", "--json"]);
    let explained: Value = serde_json::from_str(&explained).unwrap();
    assert_eq!(explained["verdict"], "allowed", "{explained}");
    let explained = daemon.cli_ok(&["explain", &b_ip, &a_ip, "icmp", "8"]);
    assert!(explained.contains("denied"), "{explained}");

    // Refused, naming the problem: ports on icmp, a code with no type, a type
    // out of range, ICMP fields on tcp, a TLS-only icmp policy.
    let body = |destination: Value| {
        json!({"policies": [{"source": {"id": "frontend"}, "destination": destination}]})
            .to_string()
    };
    for (destination, field) in [
        (json!({"id": "backend", "protocol": "icmp", "ports": {"start": 1, "end": 2}}), "ports"),
        (json!({"id": "backend", "protocol": "icmp", "icmp_code": 0}), "icmp_code"),
        (json!({"id": "backend", "protocol": "icmp", "icmp_type": 256}), "icmp_type"),
        (json!({"id": "backend", "protocol": "tcp", "port": 80, "icmp_type": 8}), "icmp_type"),
    ] {
        let (status, answer) = daemon.curl("POST", POLICIES, Some(&body(destination.clone())));
        assert_eq!(status, 400, "{destination}: {answer}");
        assert!(answer.to_string().contains(field), "{destination}: {answer}");
    }
    let out = daemon.cli(&[
        "add-network-policy",
        "frontend",
        "--destination-app",
        "backend",
        "--protocol",
        "icmp",
        "--port",
        "80",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no ports"));

    // Removed with the same verb: denied again. A policy for all of ICMP
    // (no type) allows echo too.
    icmp("remove-network-policy", &["--icmp-type", "8"]);
    assert!(!ping(&a.ns, b.ip), "removed");
    icmp("add-network-policy", &[]);
    assert!(ping(&a.ns, b.ip), "every ICMP type");
    let (_, listed) = daemon.curl("GET", &format!("{POLICIES}?source_id=frontend"), None);
    assert!(
        listed["policies"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["destination"] == json!({"id": "backend", "protocol": "icmp"})),
        "{listed}"
    );
}

/// How many of `n` datagrams from `socket` to the echo server at
/// `to:port` come back.
fn udp_echoes(socket: &std::net::UdpSocket, to: std::net::Ipv4Addr, port: u16, n: usize) -> usize {
    (0..n).filter(|_| udp_echo_works(socket, to, port, 64, Duration::from_millis(150))).count()
}

#[test]
fn an_endpoint_on_another_endpoints_veth_is_refused_and_the_holder_stays_policed() {
    require_root();
    let host = Host::new(3);
    let daemon = Daemon::start(&host.ns, "");
    add_endpoint(&daemon, &host, 0, "frontend");
    add_endpoint(&daemon, &host, 1, "backend");
    let (front, back, other) = (host.container(0), host.container(1), host.container(2));
    udp_echo_server(&back.ns, back.ip, 5353);
    udp_echo_server(&other.ns, other.ip, 5353);
    let socket = udp_socket(&front.ns, None);
    assert_eq!(udp_echoes(&socket, back.ip, 5353, 10), 0, "no policy: denied");
    let listed = daemon.curl("GET", "/v1/endpoints", None);
    let stored = daemon.stored_state();
    // The attack: another endpoint registered on backend's veth, by the API
    // and by the CLI, IPv4 or IPv6 only; then deleted (which used to detach
    // the veth and leave backend unpoliced).
    for ip in ["10.255.0.9", "fd00:255::9"] {
        let body = json!({"app": "intruder", "ip": ip, "ifname": back.host_ifname});
        let (status, reply) = daemon.curl("POST", "/v1/endpoints", Some(&body.to_string()));
        assert_eq!((status, &reply["field"]), (400, &json!("ifname")), "{reply}");
        let error = reply["error"].as_str().unwrap_or_default();
        assert!(
            error.contains(&format!("endpoint {} (app backend)", back.ip)),
            "names the holder: {error}"
        );
        let out = daemon.cli(&[
            "endpoint",
            "add",
            "--app",
            "intruder",
            "--ip",
            ip,
            "--ifname",
            &back.host_ifname,
        ]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(&back.ip.to_string()), "{stderr}");
        daemon.cli_ok(&["endpoint", "del", "--ip", ip]);
    }
    // Nor may an existing endpoint move onto it.
    add_endpoint(&daemon, &host, 2, "backend");
    let moved = json!({"app": "backend", "ip": other.ip.to_string(), "ifname": back.host_ifname});
    assert_eq!(daemon.curl("POST", "/v1/endpoints", Some(&moved.to_string())).0, 400);
    daemon.cli_ok(&["endpoint", "del", "--ip", &other.ip.to_string()]);
    // Nothing changed: listed, stored, attached, and real traffic to the
    // holder is still dropped.
    assert_eq!(daemon.curl("GET", "/v1/endpoints", None), listed);
    assert_eq!(daemon.stored_state(), stored);
    let status: Value = serde_json::from_str(&daemon.cli_ok(&["status", "--json"])).unwrap();
    assert!(status["attached"].to_string().contains(&back.host_ifname), "{status}");
    let tables = Maps::open_pinned(&daemon.maps_dir()).unwrap();
    let bound = tables.veths().iter().filter(|(_, ip, _)| *ip == back.ip).count();
    assert_eq!(bound, 1, "backend's veth is still bound to it");
    assert_eq!(udp_echoes(&socket, back.ip, 5353, 10), 0, "still policed: 10 of 10 dropped");
    // The control: a second endpoint on its own veth works, and the holder
    // re-registering itself is not refused.
    add_endpoint(&daemon, &host, 2, "backend");
    add_endpoint(&daemon, &host, 1, "backend");
    assert_eq!(udp_echoes(&socket, other.ip, 5353, 3), 0, "denied until a policy");
    daemon.allow("frontend", "backend", "udp", "5353");
    assert!(udp_echo_works(&socket, other.ip, 5353, 64, LONG), "the second endpoint");
    assert!(udp_echo_works(&socket, back.ip, 5353, 64, LONG), "the first");
}

/// A start makes the kernel the stored state in batch writes: pairs and
/// counters the state does not have go (here 300 left by a tool), and the
/// ones it has that the kernel lost come back.
#[test]
fn a_start_removes_what_the_state_does_not_hold_and_restores_what_it_does() {
    require_root();
    let host = Host::new(1);
    let mut daemon = Daemon::start(&host.ns, "");
    let pair = |src: &str| json!({"source": {"id": src}, "destination": {"id": "db", "protocol": "tcp", "ports": {"start": 5432, "end": 5432}}});
    let body = json!({"policies": [pair("a"), pair("b"), pair("c")]}).to_string();
    assert_eq!(daemon.curl("POST", POLICIES, Some(&body)).0, 200);
    daemon.stop();
    let mut tables = Maps::open_pinned(&daemon.maps_dir()).unwrap();
    let (wanted, counters) = (tables.pairs(), tables.policy_counter_ids().unwrap());
    assert_eq!(wanted.len(), 3);
    let allowance = Allowance { start: 80, end: 80, policy_id: 0 };
    for src in 1000..1300 {
        tables.allow(PairKey::new(src, 2000, 6), allowance).unwrap();
    }
    tables.add_new_policy_counters(&[90_001, 90_002]).unwrap();
    let lost = wanted[0].0;
    tables.set_pair(lost, &[]).unwrap();
    assert_eq!(tables.pairs().len(), 302);
    drop(tables);

    daemon.spawn();
    let tables = Maps::open_pinned(&daemon.maps_dir()).unwrap();
    let mut pairs = tables.pairs();
    pairs.sort_by_key(|(k, _)| *k);
    let mut want = wanted.clone();
    want.sort_by_key(|(k, _)| *k);
    assert_eq!(pairs, want, "exactly the stored state's pairs, the lost one back");
    assert_eq!(tables.policy_counter_ids().unwrap(), counters, "stale counters gone");
}
