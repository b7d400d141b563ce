//! The `policy-cni` plugin driven as garden-external-networker drives it:
//! the network configuration on stdin, `CNI_*` in the environment, in the
//! host's namespace, with the real agent and real traffic (NetIn and NetOut:
//! `cni_netin_netout.rs`; which veth is whose: `cni_veths.rs`; the shared
//! steps: `integration_tests::cni`).

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use integration_tests::{
    cni::*,
    netns::NetNs,
    require_root,
    traffic::{LONG, SHORT, tcp_echo_server, tcp_echo_works},
};
use serde_json::{Value, json};

const FIXTURE: &str =
    include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/cf-cni/garden-add-config.json"));

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
    // The container already has an interface of that name: refused before
    // the veth is made, and nothing is left.
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
