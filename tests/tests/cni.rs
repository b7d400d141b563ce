//! The `policy-cni` plugin driven as garden-external-networker drives it:
//! the network configuration on stdin, `CNI_*` in the environment, in the
//! host's namespace, with the real agent and real traffic.

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use integration_tests::{
    cni::{Outcome, links, result_ip, run_plugin, run_plugin_with},
    daemon::Daemon,
    netns::NetNs,
    require_root,
    topology::container_on,
    traffic::{
        LONG, SHORT, ping, tcp_echo_server, tcp_echo_works, udp_echo_server, udp_echo_works,
        udp_socket,
    },
};
use serde_json::{Value, json};

const FIXTURE: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/cf-cni/garden-add-config.json"));

/// A network configuration for this daemon (garden's keys), `app` as
/// garden's `policy_group_id`.
fn config(daemon: &Daemon, version: &str, app: Option<&str>) -> Value {
    let mut c = json!({
        "cniVersion": version,
        "name": "policy-net",
        "type": "policy-cni",
        "agent_socket": daemon.socket,
        "data_dir": daemon.dir.join("cni"),
        "dns_servers": ["169.254.0.1"],
        "mtu": 0,
    });
    if let Some(app) = app {
        c["runtimeConfig"] = json!({"metadata": {"policy_group_id": app}});
    }
    c
}

fn endpoints(daemon: &Daemon) -> Vec<Value> {
    daemon.curl("GET", "/v1/endpoints", None).1["endpoints"].as_array().unwrap().clone()
}

fn leases(daemon: &Daemon) -> Vec<String> {
    std::fs::read_dir(daemon.dir.join("cni/policy-net"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.parse::<Ipv4Addr>().is_ok())
                .collect()
        })
        .unwrap_or_default()
}

fn plugin_links(host: &NetNs) -> Vec<String> {
    links(host).into_iter().filter(|l| l.starts_with("pc")).collect()
}

/// No endpoint, lease or plugin veth is left.
fn assert_nothing_left(daemon: &Daemon, host: &NetNs) {
    assert!(endpoints(daemon).is_empty(), "endpoints left: {:?}", endpoints(daemon));
    assert!(leases(daemon).is_empty(), "leases left: {:?}", leases(daemon));
    assert!(plugin_links(host).is_empty(), "veths left: {:?}", plugin_links(host));
}

/// A host namespace that forwards and a namespace outside it, joined by a
/// veth (`ifname` on the host, with `host_cidr`; `eth0` outside, with
/// `outside_cidrs`).
fn host_with_outside(ifname: &str, host_cidr: &str, outside_cidrs: &[&str]) -> (NetNs, NetNs) {
    let host = NetNs::new(integration_tests::unique_name("h"));
    host.sysctl("net.ipv4.ip_forward", "1");
    let outside = integration_tests::topology::outside(&host, ifname, host_cidr, outside_cidrs);
    (host, outside)
}

/// A host namespace that forwards, with an agent in it.
fn host_with_agent(extra_config: &str) -> (NetNs, Daemon) {
    let host = NetNs::new(integration_tests::unique_name("h"));
    host.sysctl("net.ipv4.ip_forward", "1");
    let daemon = Daemon::start(&host, extra_config);
    (host, daemon)
}

fn assert_failed(o: &Outcome, code: u64, says: &str) {
    assert!(!o.ok, "expected a failure: {}", o.out);
    assert_eq!(o.out["code"], code, "{} {}", o.out, o.stderr);
    let msg = o.out["msg"].as_str().unwrap_or_default();
    assert!(msg.contains(says), "{msg:?} does not say {says:?}: {}", o.out);
}

#[test]
fn garden_style_add_check_del_with_real_traffic() {
    require_root();
    let (host, daemon) = host_with_agent("");
    let (front_ns, back_ns) = (
        NetNs::new(integration_tests::unique_name("c")),
        NetNs::new(integration_tests::unique_name("c")),
    );
    // garden sends 0.3.1; another runtime 1.0.0.
    let front = run_plugin(
        &host,
        "ADD",
        "front-1",
        Some(&front_ns.path()),
        "eth0",
        &config(&daemon, "0.3.1", Some("frontend")),
    );
    assert!(front.ok, "{} {}", front.out, front.stderr);
    let back = run_plugin(
        &host,
        "ADD",
        "back-1",
        Some(&back_ns.path()),
        "eth0",
        &config(&daemon, "1.0.0", Some("backend")),
    );
    assert!(back.ok, "{} {}", back.out, back.stderr);
    // The result: interfaces, a /32 from the overlay, the route and DNS.
    let r = &front.out;
    assert_eq!(r["cniVersion"], "0.3.1");
    assert_eq!(r["ips"][0]["version"], "4", "0.3.x results carry the version");
    assert_eq!(r["ips"][0]["gateway"], "169.254.0.1");
    assert_eq!(r["routes"][0], json!({"dst": "0.0.0.0/0", "gw": "169.254.0.1"}));
    assert_eq!(r["dns"]["nameservers"], json!(["169.254.0.1"]));
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    assert_eq!(r["interfaces"][1]["sandbox"], front_ns.path().to_str().unwrap());
    assert!(back.out["ips"][0].get("version").is_none());
    let (front_ip, back_ip) = (result_ip(&front.out), result_ip(&back.out));
    assert_ne!(front_ip, back_ip);
    assert_eq!(front_ip.octets()[..2], [10, 255], "from the overlay");
    // Registered as their apps, with their host-side veths.
    let listed = endpoints(&daemon);
    let app_of = |ip: Ipv4Addr| {
        listed
            .iter()
            .find(|e| e["ip"] == ip.to_string())
            .map(|e| e["app"].as_str().unwrap().to_owned())
    };
    assert_eq!(app_of(front_ip).as_deref(), Some("frontend"));
    assert_eq!(app_of(back_ip).as_deref(), Some("backend"));
    // Denied by default, allowed by a policy.
    tcp_echo_server(&back_ns, back_ip, 8080);
    assert!(!tcp_echo_works(&front_ns, back_ip, 8080, SHORT), "default deny");
    daemon.allow("frontend", "backend", "tcp", "8080");
    assert!(tcp_echo_works(&front_ns, back_ip, 8080, LONG), "allowed by the policy");
    assert!(!tcp_echo_works(&back_ns, front_ip, 8080, SHORT), "not the reverse");
    // CHECK.
    let check = run_plugin(
        &host,
        "CHECK",
        "front-1",
        Some(&front_ns.path()),
        "eth0",
        &config(&daemon, "1.0.0", Some("frontend")),
    );
    assert!(check.ok, "{} {}", check.out, check.stderr);
    // DEL removes everything; DEL again is fine; CHECK then fails.
    for _ in 0..2 {
        let del = run_plugin(
            &host,
            "DEL",
            "front-1",
            Some(&front_ns.path()),
            "eth0",
            &config(&daemon, "0.3.1", Some("frontend")),
        );
        assert!(del.ok, "{} {}", del.out, del.stderr);
    }
    assert!(app_of(front_ip).is_some(), "(the list above was taken before)");
    assert!(endpoints(&daemon).iter().all(|e| e["ip"] != front_ip.to_string()), "deregistered");
    assert_eq!(leases(&daemon), [back_ip.to_string()], "lease released");
    assert_eq!(plugin_links(&host).len(), 1, "the veth is gone: {:?}", plugin_links(&host));
    assert!(!links(&front_ns).contains(&"eth0".to_owned()));
    let check = run_plugin(
        &host,
        "CHECK",
        "front-1",
        Some(&front_ns.path()),
        "eth0",
        &config(&daemon, "1.0.0", Some("frontend")),
    );
    assert_failed(&check, 102, "no lease");
    // DEL with the namespace already gone (a runtime that removed it first).
    drop(back_ns);
    let del = run_plugin(&host, "DEL", "back-1", None, "eth0", &config(&daemon, "1.0.0", None));
    assert!(del.ok, "{} {}", del.out, del.stderr);
    assert_nothing_left(&daemon, &host);
}

#[test]
fn dual_stack_containers_get_an_ipv6_address_policed_like_their_ipv4_one() {
    require_root();
    let (host, daemon) = host_with_agent("");
    let namespaces = [
        NetNs::new(integration_tests::unique_name("c")),
        NetNs::new(integration_tests::unique_name("c")),
    ];
    let dual = |app: &str| {
        let mut c = config(&daemon, "1.0.0", Some(app));
        c["ipv6_prefix"] = json!("fd00:255::/96");
        c
    };
    let mut ips6 = Vec::new();
    for (i, (ns, app)) in namespaces.iter().zip(["frontend", "backend"]).enumerate() {
        let added =
            run_plugin(&host, "ADD", &format!("dual-{i}"), Some(&ns.path()), "eth0", &dual(app));
        assert!(added.ok, "{} {}", added.out, added.stderr);
        // The IPv6 address is the prefix with the IPv4 address in its last
        // 32 bits, a /128 via fe80::1.
        let ip = result_ip(&added.out);
        let ip6: std::net::Ipv6Addr = format!("fd00:255::{ip}").parse().unwrap();
        assert_eq!(added.out["ips"][1]["address"], format!("{ip6}/128"), "{}", added.out);
        assert_eq!(added.out["ips"][1]["gateway"], "fe80::1");
        assert!(
            added.out["routes"]
                .as_array()
                .unwrap()
                .contains(&json!({"dst": "::/0", "gw": "fe80::1"}))
        );
        let listed = endpoints(&daemon);
        let entry = listed.iter().find(|e| e["ip"] == ip.to_string()).expect("registered");
        assert_eq!(entry["ips"], json!([ip.to_string(), ip6.to_string()]));
        ips6.push(ip6);
    }
    let (front, back) = (&namespaces[0], &namespaces[1]);
    tcp_echo_server(back, ips6[1], 8080);
    assert!(!tcp_echo_works(front, ips6[1], 8080, SHORT), "default deny on IPv6");
    daemon.allow("frontend", "backend", "tcp", "8080");
    assert!(tcp_echo_works(front, ips6[1], 8080, LONG), "the policy allows IPv6 too");
    assert!(!tcp_echo_works(back, ips6[0], 8080, SHORT), "not the reverse");
    // A bad prefix is refused before anything is made.
    let mut bad = dual("frontend");
    bad["ipv6_prefix"] = json!("fd00:255::/64");
    let extra = NetNs::new(integration_tests::unique_name("c"));
    let refused = run_plugin(&host, "ADD", "dual-bad", Some(&extra.path()), "eth0", &bad);
    assert_failed(&refused, 7, "/96");
    for (i, ns) in namespaces.iter().enumerate() {
        let del =
            run_plugin(&host, "DEL", &format!("dual-{i}"), Some(&ns.path()), "eth0", &dual("x"));
        assert!(del.ok, "{} {}", del.out, del.stderr);
    }
    assert_nothing_left(&daemon, &host);
}

#[test]
fn failures_name_the_problem_and_leave_nothing_behind() {
    require_root();
    let (host, mut daemon) = host_with_agent("");
    let ns = NetNs::new(integration_tests::unique_name("c"));
    let conf = config(&daemon, "1.0.0", Some("app"));
    // The container already has an interface of that name: the veth was
    // made and moved before that showed; all of it is undone.
    let o = run_plugin(&host, "ADD", "c-1", Some(&ns.path()), "lo", &conf);
    assert_failed(&o, 4, "already has an interface lo");
    assert!(
        plugin_links(&host).is_empty()
            && leases(&daemon).is_empty()
            && endpoints(&daemon).is_empty()
    );
    // Not a network namespace.
    let o = run_plugin(&host, "ADD", "c-1", Some(Path::new("/etc/hostname")), "eth0", &conf);
    assert_failed(&o, 4, "not a network namespace");
    // Bad configuration, unknown command, unsupported version.
    let o = run_plugin(
        &host,
        "ADD",
        "c-1",
        Some(&ns.path()),
        "eth0",
        &json!({"cniVersion": "0.1.0", "name": "x"}),
    );
    assert_failed(&o, 1, "cniVersion 0.1.0 is not supported");
    let o = run_plugin(&host, "FROB", "c-1", Some(&ns.path()), "eth0", &conf);
    assert_failed(&o, 4, "FROB");
    let v = run_plugin(&host, "VERSION", "", None, "", &json!({"cniVersion": "1.0.0"}));
    assert!(v.out["supportedVersions"].as_array().unwrap().contains(&json!("0.3.1")));
    // The agent not running.
    daemon.stop();
    let o = run_plugin(&host, "ADD", "c-1", Some(&ns.path()), "eth0", &conf);
    assert_failed(&o, 11, "is it running?");
    let o = run_plugin(&host, "STATUS", "", None, "", &conf);
    assert_failed(&o, 50, "not answering");
    assert!(plugin_links(&host).is_empty() && leases(&daemon).is_empty());
}

#[test]
fn add_again_after_a_crash_between_the_veth_and_the_registration() {
    require_root();
    let (host, daemon) = host_with_agent("");
    let ns = NetNs::new(integration_tests::unique_name("c"));
    let conf = config(&daemon, "1.0.0", None);
    let first = run_plugin(&host, "ADD", "c-1", Some(&ns.path()), "eth0", &conf);
    assert!(first.ok, "{}", first.out);
    let ip = result_ip(&first.out);
    // No app named: the documented default app, policed like any other.
    assert_eq!(endpoints(&daemon)[0]["app"], "unassigned");
    // The crash: the veth and the lease are there, the registration is not.
    assert_eq!(daemon.curl("DELETE", &format!("/v1/endpoints/{ip}"), None).0, 200);
    let again = run_plugin(&host, "ADD", "c-1", Some(&ns.path()), "eth0", &conf);
    assert!(again.ok, "{} {}", again.out, again.stderr);
    assert_eq!(result_ip(&again.out), ip, "the same lease");
    assert_eq!(endpoints(&daemon).len(), 1);
    assert_eq!(plugin_links(&host).len(), 1);
    let check = run_plugin(&host, "CHECK", "c-1", Some(&ns.path()), "eth0", &conf);
    assert!(check.ok, "{}", check.out);
    // Another runtime names the app in CNI_ARGS.
    let other = NetNs::new(integration_tests::unique_name("c"));
    let o = run_plugin_with(
        &host,
        "ADD",
        "c-2",
        Some(&other.path()),
        "eth0",
        "IgnoreUnknown=1;POLICY_APP_ID=worker",
        &conf,
    );
    assert!(o.ok, "{}", o.out);
    assert!(endpoints(&daemon).iter().any(|e| e["app"] == "worker"));
    for (id, n) in [("c-1", &ns), ("c-2", &other)] {
        assert!(run_plugin(&host, "DEL", id, Some(&n.path()), "eth0", &conf).ok);
    }
    assert_nothing_left(&daemon, &host);
}

#[test]
fn a_hundred_containers_in_parallel_get_distinct_addresses_and_leave_nothing() {
    require_root();
    let (host, daemon) = host_with_agent("log_level = \"info\"");
    let namespaces: Vec<NetNs> =
        (0..100).map(|_| NetNs::new(integration_tests::unique_name("c"))).collect();
    let conf = config(&daemon, "1.0.0", Some("app"));
    let started = std::time::Instant::now();
    let ips: Vec<Ipv4Addr> = std::thread::scope(|scope| {
        let handles: Vec<_> = namespaces
            .iter()
            .enumerate()
            .map(|(i, ns)| {
                let (host, conf) = (&host, &conf);
                scope.spawn(move || {
                    let o =
                        run_plugin(host, "ADD", &format!("p-{i}"), Some(&ns.path()), "eth0", conf);
                    assert!(o.ok, "ADD {i}: {} {}", o.out, o.stderr);
                    result_ip(&o.out)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let added = started.elapsed();
    let distinct: BTreeSet<_> = ips.iter().collect();
    assert_eq!(distinct.len(), 100, "no address given twice");
    assert_eq!(endpoints(&daemon).len(), 100);
    assert_eq!(plugin_links(&host).len(), 100);
    let started = std::time::Instant::now();
    std::thread::scope(|scope| {
        for (i, ns) in namespaces.iter().enumerate() {
            let (host, conf) = (&host, &conf);
            scope.spawn(move || {
                let o = run_plugin(host, "DEL", &format!("p-{i}"), Some(&ns.path()), "eth0", conf);
                assert!(o.ok, "DEL {i}: {} {}", o.out, o.stderr);
            });
        }
    });
    println!(
        "100 containers in parallel: ADD all in {:.2} s, DEL all in {:.2} s",
        added.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    assert_nothing_left(&daemon, &host);
}

#[test]
fn podman_containers_on_our_network_are_policed_and_leave_no_trace() {
    require_root();
    let (host, daemon) = host_with_agent("log_level = \"info\"");
    let podman = integration_tests::cni::Podman::new(&host, &daemon.socket);
    let mut args = podman.run_args("back", "backend");
    args.insert(3, "-d".into());
    args.extend(["/bin/httpd", "-f", "-p", "8080", "-h", "/www"].map(String::from));
    let (ok, out) = podman.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(ok, "podman run backend: {out}");
    let listed = endpoints(&daemon);
    let backend =
        listed.iter().find(|e| e["app"] == "backend").unwrap_or_else(|| panic!("{listed:?}"));
    let back_ip = backend["ip"].as_str().unwrap().to_owned();
    let fetch = |podman: &integration_tests::cni::Podman| {
        let mut args = podman.run_args("front", "frontend");
        args.insert(3, "--rm".into());
        // busybox's static wget crashes resolving even a literal address
        // (glibc's static NSS); nc takes the address as it is.
        let request = format!("printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {back_ip} 8080");
        args.extend(["/bin/sh", "-c", &request].map(String::from));
        podman.run(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let started = std::time::Instant::now();
    let (ok, out) = fetch(&podman);
    assert!(!ok && !out.contains("hello"), "denied by default: {out}");
    println!("podman run --rm, denied: {:.2} s", started.elapsed().as_secs_f64());
    daemon.allow("frontend", "backend", "tcp", "8080");
    let started = std::time::Instant::now();
    let (ok, out) = fetch(&podman);
    assert!(ok && out.contains("hello from a podman container"), "allowed by the policy: {out}");
    println!("podman run --rm to a fetched page: {:.2} s", started.elapsed().as_secs_f64());
    // The frontend container was removed (--rm): its endpoint, lease, veth.
    assert_eq!(endpoints(&daemon).len(), 1, "{:?}", endpoints(&daemon));
    let (ok, out) = podman.run(&["rm", "-f", "-t", "0", "back"]);
    assert!(ok, "{out}");
    assert!(endpoints(&daemon).is_empty(), "podman rm deregisters");
    assert!(plugin_links(&host).is_empty(), "podman rm removes the veth");
    let leases = std::fs::read_dir(podman.dir.join("leases").join(&podman.network))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok()?.parse::<Ipv4Addr>().ok())
                .count()
        })
        .unwrap_or(0);
    assert_eq!(leases, 0, "podman rm releases the lease");
}

#[test]
fn netin_port_mappings_reach_the_container_and_go_with_it() {
    require_root();
    // A client outside the host, on the host's uplink.
    let (host, client) = host_with_outside("uplink", "192.168.50.1/24", &["192.168.50.2/24"]);
    let daemon = Daemon::start(&host, "netin_interfaces = [\"uplink\"]");
    let host_ip = Ipv4Addr::new(192, 168, 50, 1);
    let (web_ns, other_ns) = (
        NetNs::new(integration_tests::unique_name("c")),
        NetNs::new(integration_tests::unique_name("c")),
    );
    // garden's keys for TCP, the CNI convention's for UDP.
    let mut conf = config(&daemon, "0.3.1", Some("web"));
    conf["runtimeConfig"]["portMappings"] = json!([
        {"host_port": 61001, "container_port": 8080},
        {"hostPort": 61002, "containerPort": 9000, "protocol": "udp"}
    ]);
    let web = run_plugin(&host, "ADD", "web-1", Some(&web_ns.path()), "eth0", &conf);
    assert!(web.ok, "{} {}", web.out, web.stderr);
    let web_ip = result_ip(&web.out);
    tcp_echo_server(&web_ns, web_ip, 8080);
    udp_echo_server(&web_ns, web_ip, 9000);
    let listed = endpoints(&daemon);
    assert_eq!(
        listed[0]["port_mappings"],
        json!([
            {"host_port": 61001, "container_port": 8080, "protocol": "tcp"},
            {"host_port": 61002, "container_port": 9000, "protocol": "udp"}
        ])
    );
    // The client reaches HOST_IP:host_port and lands on the container port.
    assert!(tcp_echo_works(&client, host_ip, 61001, LONG), "TCP through the port mapping");
    let socket = udp_socket(&client, None);
    assert!(udp_echo_works(&socket, host_ip, 61002, 64, LONG), "UDP through the port mapping");
    assert!(!tcp_echo_works(&client, host_ip, 61003, SHORT), "an unmapped port");
    // Another container cannot take the same host port: refused, nothing left.
    let o = run_plugin(&host, "ADD", "other-1", Some(&other_ns.path()), "eth0", &conf);
    assert_failed(&o, 101, "host port 61001/tcp already leads to");
    assert_eq!(endpoints(&daemon).len(), 1);
    assert_eq!(plugin_links(&host).len(), 1);
    // After DEL the mapping is gone.
    let del = run_plugin(&host, "DEL", "web-1", Some(&web_ns.path()), "eth0", &conf);
    assert!(del.ok, "{}", del.out);
    assert!(!tcp_echo_works(&client, host_ip, 61001, SHORT), "no mapping after DEL");
    assert_nothing_left(&daemon, &host);
}

/// Flow event reasons the agent has seen (`GET /v1/flows`).
fn flow_reasons(daemon: &Daemon) -> Vec<String> {
    daemon
        .flows()
        .iter()
        .filter_map(|v| v["data"]["packet"]["reason"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn netout_security_groups_allow_only_their_rules_and_follow_changes() {
    require_root();
    // An "external" network outside the overlay, behind the host.
    let (host, ext) =
        host_with_outside("extlink", "192.0.2.1/24", &["192.0.2.10/24", "192.0.2.21/24"]);
    ext.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    let daemon = Daemon::start(&host, "");
    let (inside, outside, far) =
        (Ipv4Addr::new(192, 0, 2, 10), Ipv4Addr::new(192, 0, 2, 21), Ipv4Addr::new(192, 0, 2, 10));
    for (ip, port) in [(inside, 443), (outside, 443), (far, 444)] {
        tcp_echo_server(&ext, ip, port);
    }
    udp_echo_server(&ext, inside, 53);
    // garden's shape: TCP 443 to .10-.20 (logged), ICMP echo to the /24.
    let web_ns = NetNs::new(integration_tests::unique_name("c"));
    let mut conf = config(&daemon, "0.3.1", Some("web"));
    conf["runtimeConfig"]["netOutRules"] = json!([
        {"protocol": 1, "networks": [{"start": "192.0.2.10", "end": "192.0.2.20"}],
         "ports": [{"start": 443, "end": 443}], "log": true},
        {"protocol": 3, "networks": [{"start": "192.0.2.0", "end": "192.0.2.255"}],
         "icmps": {"type": 8, "code": 0}}
    ]);
    let web = run_plugin(&host, "ADD", "web-1", Some(&web_ns.path()), "eth0", &conf);
    assert!(web.ok, "{} {}", web.out, web.stderr);
    let web_ip = result_ip(&web.out);
    assert!(tcp_echo_works(&web_ns, inside, 443, LONG), "allowed by the rule's range and port");
    assert!(!tcp_echo_works(&web_ns, outside, 443, SHORT), "just outside the range");
    assert!(!tcp_echo_works(&web_ns, far, 444, SHORT), "just outside the ports");
    assert!(ping(&web_ns, inside), "ICMP echo is allowed");
    let socket = udp_socket(&web_ns, None);
    assert!(!udp_echo_works(&socket, inside, 53, 16, SHORT), "no UDP rule");
    // A connection from outside to the container: its replies pass.
    ext.ip(&["route", "add", &format!("{web_ip}/32"), "via", "192.0.2.1"]);
    tcp_echo_server(&web_ns, web_ip, 8080);
    assert!(tcp_echo_works(&ext, web_ip, 8080, LONG), "replies to connections from outside");
    // The group changes: the running container follows, no restart.
    let mut rules = conf["runtimeConfig"]["netOutRules"].clone();
    rules.as_array_mut().unwrap().push(
        json!({"protocol": "tcp", "networks": [{"start": "192.0.2.10", "end": "192.0.2.10"}], "ports": [{"start": 444, "end": 444}]}),
    );
    let (status, reply) =
        daemon.curl("PUT", "/v1/asgs/web", Some(&json!({"rules": rules}).to_string()));
    assert_eq!(status, 200, "{reply}");
    assert!(tcp_echo_works(&web_ns, far, 444, LONG), "the added rule applies at once");
    assert_eq!(daemon.curl("GET", "/v1/asgs", None).1["asgs"]["web"].as_array().unwrap().len(), 3);
    // Bad rules are a 400 naming the field, and change nothing.
    let bad = json!({"rules": [{"protocol": "tcp", "networks": [{"start": "192.0.2.9", "end": "192.0.2.1"}]}]});
    let (status, reply) = daemon.curl("PUT", "/v1/asgs/web", Some(&bad.to_string()));
    assert_eq!(status, 400, "{reply}");
    assert_eq!(reply["field"], "rules[0].networks[0]");
    assert!(!tcp_echo_works(&web_ns, outside, 443, SHORT));
    // Denials and logged allowances are flow events.
    let reasons = flow_reasons(&daemon);
    assert!(reasons.iter().any(|r| r == "asg_denied"), "{reasons:?}");
    assert!(reasons.iter().any(|r| r == "asg_allowed"), "{reasons:?}");
    // Without security groups the app's egress is not checked.
    assert_eq!(daemon.curl("DELETE", "/v1/asgs/web", None).0, 200);
    assert!(tcp_echo_works(&web_ns, outside, 443, LONG), "no groups: unchecked");
    assert!(run_plugin(&host, "DEL", "web-1", Some(&web_ns.path()), "eth0", &conf).ok);
    assert_nothing_left(&daemon, &host);
}

#[test]
fn garden_fixture_is_taken_whole() {
    require_root();
    let (host, daemon) = host_with_agent("");
    let ns = NetNs::new(integration_tests::unique_name("c"));
    let mut garden: Value = serde_json::from_str(FIXTURE).unwrap();
    garden["agent_socket"] = json!(daemon.socket);
    garden["data_dir"] = json!(daemon.dir.join("cni"));
    let o = run_plugin(&host, "ADD", "instance-guid", Some(&ns.path()), "eth0", &garden);
    assert!(o.ok, "{} {}", o.out, o.stderr);
    let app = "5b8d7c1e-0c3f-4a52-9d1e-0f6a2b7c9e41";
    let listed = endpoints(&daemon);
    assert_eq!(listed[0]["app"], app);
    assert_eq!(listed[0]["port_mappings"].as_array().unwrap().len(), 2, "NetIn");
    let asgs = daemon.curl("GET", "/v1/asgs", None).1;
    assert_eq!(asgs["asgs"][app].as_array().unwrap().len(), 4, "NetOut: {asgs}");
    // CHECK came with spec 0.4.0: refused on garden's 0.3.1, as the
    // reference plugins do, and done on the same config at 1.0.0.
    let check = run_plugin(&host, "CHECK", "instance-guid", Some(&ns.path()), "eth0", &garden);
    assert_failed(&check, 1, "does not allow CHECK");
    let mut newer = garden.clone();
    newer["cniVersion"] = json!("1.0.0");
    let check = run_plugin(&host, "CHECK", "instance-guid", Some(&ns.path()), "eth0", &newer);
    assert!(check.ok, "{}", check.out);
    assert!(run_plugin(&host, "DEL", "instance-guid", Some(&ns.path()), "eth0", &garden).ok);
    assert_nothing_left(&daemon, &host);
}

#[test]
fn gc_releases_what_the_runtime_no_longer_has() {
    require_root();
    let (host, daemon) = host_with_agent("");
    let (keep, gone) = (
        NetNs::new(integration_tests::unique_name("c")),
        NetNs::new(integration_tests::unique_name("c")),
    );
    let conf = config(&daemon, "1.1.0", Some("app"));
    for (id, ns) in [("keep", &keep), ("gone", &gone)] {
        let o = run_plugin(&host, "ADD", id, Some(&ns.path()), "eth0", &conf);
        assert!(o.ok, "{} {}", o.out, o.stderr);
    }
    let mut gc = conf.clone();
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let o = run_plugin(&host, "GC", "", None, "", &gc);
    assert!(o.ok, "{} {}", o.out, o.stderr);
    assert_eq!(endpoints(&daemon).len(), 1, "the gone attachment's endpoint is removed");
    assert_eq!(leases(&daemon).len(), 1);
    assert_eq!(plugin_links(&host).len(), 1);
    assert!(run_plugin(&host, "CHECK", "keep", Some(&keep.path()), "eth0", &conf).ok);
    assert!(run_plugin(&host, "DEL", "keep", Some(&keep.path()), "eth0", &conf).ok);
    assert_nothing_left(&daemon, &host);
}

#[test]
fn in_a_cluster_containers_get_the_hosts_subnet_and_the_overlay_mtu() {
    use integration_tests::cluster::{Etcd, Underlay, hosts};
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let cells = hosts(&mut underlay, 2, 0);
    let mut added = Vec::new();
    for (cell, app) in cells.iter().zip(["frontend", "backend"]) {
        let ns = NetNs::new(integration_tests::unique_name("c"));
        let conf = config(&cell.daemon, "1.0.0", Some(app));
        let o = run_plugin(&cell.host.ns, "ADD", app, Some(&ns.path()), "eth0", &conf);
        assert!(o.ok, "{} {}", o.out, o.stderr);
        let ip = result_ip(&o.out);
        let ipam = cell.daemon.curl("GET", "/v1/ipam", None).1;
        let subnet = ipam["subnet"].as_str().unwrap().to_owned();
        assert!(subnet.ends_with("/24"), "{ipam}");
        let (net, _) = subnet.split_once('/').unwrap();
        let net: Ipv4Addr = net.parse().unwrap();
        assert_eq!(ip.octets()[..3], net.octets()[..3], "{ip} in the host's {subnet}");
        let mtu = ipam["mtu"].as_u64().expect("the overlay's MTU");
        assert!(mtu < 1500, "below the underlay's: {ipam}");
        let link = ns.command("ip").args(["-o", "link", "show", "eth0"]).output().unwrap();
        let link = String::from_utf8_lossy(&link.stdout).into_owned();
        assert!(link.contains(&format!("mtu {mtu} ")), "{link}");
        added.push((ns, ip, conf));
    }
    // Across hosts through the overlay: denied, then allowed by a policy.
    let (front_ns, back_ip) = (&added[0].0, added[1].1);
    tcp_echo_server(&added[1].0, back_ip, 8080);
    assert!(!tcp_echo_works(front_ns, back_ip, 8080, SHORT), "default deny across hosts");
    cells[0].daemon.allow("frontend", "backend", "tcp", "8080");
    let started = std::time::Instant::now();
    while !tcp_echo_works(front_ns, back_ip, 8080, SHORT) {
        assert!(started.elapsed() < LONG * 3, "the policy reaches the other host");
    }
    for ((ns, _, conf), (cell, app)) in added.iter().zip(cells.iter().zip(["frontend", "backend"]))
    {
        assert!(run_plugin(&cell.host.ns, "DEL", app, Some(&ns.path()), "eth0", conf).ok);
    }
}

/// The ifindex of `ifname` in the host namespace (None: not there).
fn ifindex(host: &NetNs, ifname: &str) -> Option<u32> {
    let name = ifname.to_owned();
    host.run(move || policy_agent::dataplane::nix_ifindex(&name))
}

/// Whether the agent binds the veth `ifname` of `host` to `ip` (its
/// anti-spoofing entry: the veth is policed as that endpoint).
fn veth_bound(daemon: &Daemon, host: &NetNs, ifname: &str, ip: Ipv4Addr) -> bool {
    let index = ifindex(host, ifname).expect("the veth");
    let maps = policy_agent::Maps::open_pinned(&daemon.maps_dir()).unwrap();
    maps.veths().iter().any(|(i, a, _)| (*i, *a) == (index, ip))
}

#[test]
fn an_add_never_takes_over_a_veth_another_container_holds() {
    require_root();
    let (host, daemon) = host_with_agent("");
    let conf = |app: &str| config(&daemon, "1.0.0", Some(app));
    // The host-side veth name of container "intruder", from a real ADD.
    let scratch = NetNs::new(integration_tests::unique_name("c"));
    let o = run_plugin(&host, "ADD", "intruder", Some(&scratch.path()), "eth0", &conf("x"));
    assert!(o.ok, "{} {}", o.out, o.stderr);
    let name = o.out["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert_eq!(name.len(), 15, "{name}");
    assert!(run_plugin(&host, "DEL", "intruder", Some(&scratch.path()), "eth0", &conf("x")).ok);
    // The victim: a running container whose host-side veth has that name
    // (what a name collision gave), registered, reached under a policy.
    let victim = container_on(&host, &name, Ipv4Addr::new(10, 255, 7, 7));
    daemon.register(&victim, "victim");
    let client_ns = NetNs::new(integration_tests::unique_name("c"));
    let client =
        run_plugin(&host, "ADD", "client", Some(&client_ns.path()), "eth0", &conf("client"));
    assert!(client.ok, "{} {}", client.out, client.stderr);
    daemon.allow("client", "victim", "tcp", "8080");
    tcp_echo_server(&victim.ns, victim.ip, 8080);
    tcp_echo_server(&victim.ns, victim.ip, 8081);
    assert!(tcp_echo_works(&client_ns, victim.ip, 8080, LONG));
    let index = ifindex(&host, &name);
    // The intruder's ADD: a CNI error naming the veth, and nothing made;
    // the runtime's DEL after it leaves the victim's veth alone too.
    let intruder_ns = NetNs::new(integration_tests::unique_name("c"));
    let o = run_plugin(&host, "ADD", "intruder", Some(&intruder_ns.path()), "eth0", &conf("x"));
    assert_failed(&o, 103, &format!("host-side veth {name} is held by another container"));
    let o = run_plugin(&host, "DEL", "intruder", Some(&intruder_ns.path()), "eth0", &conf("x"));
    assert!(o.ok, "{} {}", o.out, o.stderr);
    assert!(!links(&intruder_ns).contains(&"eth0".to_owned()));
    assert_eq!(leases(&daemon).len(), 1, "only the client's lease");
    // The victim keeps its veth (the same interface), its registration and
    // its network, policed as before.
    assert_eq!(ifindex(&host, &name), index, "the same veth");
    let listed = endpoints(&daemon);
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(listed.iter().any(|e| e["ip"] == victim.ip.to_string() && e["ifname"] == name));
    assert!(veth_bound(&daemon, &host, &name, victim.ip));
    assert!(tcp_echo_works(&client_ns, victim.ip, 8080, LONG), "the victim's network works");
    assert!(!tcp_echo_works(&client_ns, victim.ip, 8081, SHORT), "and is policed");
    // Controls. A runtime repeating ADD for its own container (a lost
    // result) starts over on a new veth of its own, policed.
    let again =
        run_plugin(&host, "ADD", "client", Some(&client_ns.path()), "eth0", &conf("client"));
    assert!(again.ok, "{} {}", again.out, again.stderr);
    let client_ip = result_ip(&client.out);
    assert_eq!(result_ip(&again.out), client_ip, "the same lease");
    let client_veth = again.out["interfaces"][0]["name"].as_str().unwrap().to_owned();
    assert!(veth_bound(&daemon, &host, &client_veth, client_ip), "the new veth is policed");
    assert!(tcp_echo_works(&client_ns, victim.ip, 8080, LONG));
    assert!(!tcp_echo_works(&client_ns, victim.ip, 8081, SHORT));
    // A half-made pair of the intruder's name that no container has (an
    // ADD stopped before moving its other end) is a leftover: removed.
    daemon.cli_ok(&["endpoint", "del", "--ip", &victim.ip.to_string()]);
    host.ip(&["link", "del", &name]);
    let peer = format!("pt{}", &name[2..]);
    host.ip(&["link", "add", &name, "type", "veth", "peer", "name", &peer]);
    let o = run_plugin(&host, "ADD", "intruder", Some(&intruder_ns.path()), "eth0", &conf("x"));
    assert!(o.ok, "{} {}", o.out, o.stderr);
    assert!(links(&intruder_ns).contains(&"eth0".to_owned()));
    for (id, ns) in [("intruder", &intruder_ns), ("client", &client_ns)] {
        assert!(run_plugin(&host, "DEL", id, Some(&ns.path()), "eth0", &conf("x")).ok);
    }
    assert_nothing_left(&daemon, &host);
}

#[test]
fn del_finds_a_veth_an_earlier_version_named_but_never_another_containers() {
    require_root();
    let (host, daemon) = host_with_agent("");
    let conf = config(&daemon, "1.0.0", Some("app"));
    // Two container ids whose CRC32 names (the earlier versions') collide.
    let (old, other, legacy) = ("victim-68", "victim-21326606", "pc0d1c4b06");
    let old_ns = NetNs::new(integration_tests::unique_name("c"));
    let o = run_plugin(&host, "ADD", old, Some(&old_ns.path()), "eth0", &conf);
    assert!(o.ok, "{} {}", o.out, o.stderr);
    let (ip, name) = (result_ip(&o.out), o.out["interfaces"][0]["name"].as_str().unwrap());
    // Made over into what an earlier version left: the host side named by
    // CRC32 and registered under that name.
    assert_eq!(daemon.curl("DELETE", &format!("/v1/endpoints/{ip}"), None).0, 200);
    host.ip(&["link", "set", name, "down"]);
    host.ip(&["link", "set", name, "name", legacy]);
    host.ip(&["link", "set", legacy, "up"]);
    host.ip(&["route", "replace", &format!("{ip}/32"), "dev", legacy, "scope", "link"]);
    let body =
        json!({"app": "app", "ip": ip.to_string(), "ifname": legacy, "netns": old_ns.path()});
    let (status, reply) = daemon.curl("POST", "/v1/endpoints", Some(&body.to_string()));
    assert_eq!(status, 200, "{reply}");
    let client_ns = NetNs::new(integration_tests::unique_name("c"));
    let client = config(&daemon, "1.0.0", Some("client"));
    assert!(run_plugin(&host, "ADD", "client", Some(&client_ns.path()), "eth0", &client).ok);
    daemon.allow("client", "app", "tcp", "8080");
    tcp_echo_server(&old_ns, ip, 8080);
    assert!(tcp_echo_works(&client_ns, ip, 8080, LONG), "the old container works");
    // The colliding id: its ADD gets a name of its own, and its DEL, twice
    // (the second without a lease), leaves the old container's veth alone.
    let other_ns = NetNs::new(integration_tests::unique_name("c"));
    let o = run_plugin(&host, "ADD", other, Some(&other_ns.path()), "eth0", &conf);
    assert!(o.ok, "{} {}", o.out, o.stderr);
    assert_ne!(o.out["interfaces"][0]["name"], legacy);
    for _ in 0..2 {
        assert!(run_plugin(&host, "DEL", other, Some(&other_ns.path()), "eth0", &conf).ok);
        assert!(links(&host).contains(&legacy.to_owned()), "{:?}", links(&host));
    }
    assert!(tcp_echo_works(&client_ns, ip, 8080, LONG), "the old container still works");
    // CHECK and DEL of the old container find its veth by the old name.
    let check = run_plugin(&host, "CHECK", old, Some(&old_ns.path()), "eth0", &conf);
    assert!(check.ok, "{} {}", check.out, check.stderr);
    assert!(run_plugin(&host, "DEL", old, Some(&old_ns.path()), "eth0", &conf).ok);
    assert!(!links(&host).contains(&legacy.to_owned()), "{:?}", links(&host));
    assert!(run_plugin(&host, "DEL", "client", Some(&client_ns.path()), "eth0", &client).ok);
    assert_nothing_left(&daemon, &host);
}

#[test]
fn a_refused_add_changes_no_security_groups() {
    require_root();
    // An "external" network outside the overlay, behind the host.
    let (host, ext) = host_with_outside("extlink", "192.0.2.1/24", &["192.0.2.10/24"]);
    ext.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    let daemon = Daemon::start(&host, "netin_interfaces = [\"extlink\"]");
    let dest = Ipv4Addr::new(192, 0, 2, 10);
    for port in [443, 444] {
        tcp_echo_server(&ext, dest, port);
    }
    udp_echo_server(&ext, dest, 53);
    // A running container of app web: its group allows TCP 443 only, and
    // it holds NetIn host port 61001.
    let with = |rules: Value, mappings: Value| {
        let mut c = config(&daemon, "0.3.1", Some("web"));
        c["runtimeConfig"]["netOutRules"] = rules;
        c["runtimeConfig"]["portMappings"] = mappings;
        c
    };
    let narrow = json!([{"protocol": "tcp", "networks": [{"start": "192.0.2.10", "end": "192.0.2.10"}],
                         "ports": [{"start": 443, "end": 443}]}]);
    let wide =
        json!([{"protocol": "all", "networks": [{"start": "192.0.2.0", "end": "192.0.2.255"}]}]);
    let mapping = json!([{"host_port": 61001, "container_port": 8080}]);
    let running_ns = NetNs::new(integration_tests::unique_name("c"));
    let running_conf = with(narrow, mapping.clone());
    let o = run_plugin(&host, "ADD", "web-1", Some(&running_ns.path()), "eth0", &running_conf);
    assert!(o.ok, "{} {}", o.out, o.stderr);
    let udp = udp_socket(&running_ns, None);
    let egress = || {
        (
            tcp_echo_works(&running_ns, dest, 443, LONG),
            tcp_echo_works(&running_ns, dest, 444, SHORT),
            udp_echo_works(&udp, dest, 53, 16, SHORT),
        )
    };
    assert_eq!(egress(), (true, false, false), "TCP 443 only");
    let asgs = daemon.curl("GET", "/v1/asgs", None);
    // Another container of the app, with wider groups, asking for the
    // same host port: refused, and nothing of it stays, groups included.
    let refused_ns = NetNs::new(integration_tests::unique_name("c"));
    let refused_conf = with(wide.clone(), mapping);
    let o = run_plugin(&host, "ADD", "web-2", Some(&refused_ns.path()), "eth0", &refused_conf);
    assert_failed(&o, 101, "host port 61001/tcp already leads to");
    assert_eq!(daemon.curl("GET", "/v1/asgs", None), asgs, "groups unchanged");
    assert_eq!(endpoints(&daemon).len(), 1);
    assert_eq!(plugin_links(&host).len(), 1);
    assert_eq!(leases(&daemon).len(), 1);
    assert_eq!(egress(), (true, false, false), "the running container's egress is unchanged");
    // The control: the same groups from an ADD that succeeds apply to the
    // running container at once (the app's groups: the last ADD's win).
    let ok_ns = NetNs::new(integration_tests::unique_name("c"));
    let ok_conf = with(wide, json!([]));
    let o = run_plugin(&host, "ADD", "web-3", Some(&ok_ns.path()), "eth0", &ok_conf);
    assert!(o.ok, "{} {}", o.out, o.stderr);
    assert_ne!(daemon.curl("GET", "/v1/asgs", None), asgs);
    assert_eq!(egress(), (true, true, true), "widened by the accepted ADD");
    for (id, ns) in [("web-1", &running_ns), ("web-3", &ok_ns)] {
        assert!(run_plugin(&host, "DEL", id, Some(&ns.path()), "eth0", &ok_conf).ok);
    }
    assert_nothing_left(&daemon, &host);
}
