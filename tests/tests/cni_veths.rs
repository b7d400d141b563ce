//! Which host veth belongs to which container: an ADD never takes over a
//! veth another container holds, a DEL finds the veth an earlier version
//! named and never another container's.

use std::net::Ipv4Addr;

use integration_tests::{
    cni::*,
    daemon::Daemon,
    netns::NetNs,
    require_root,
    topology::container_on,
    traffic::{LONG, SHORT, tcp_echo_server, tcp_echo_works},
};
use serde_json::json;

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
