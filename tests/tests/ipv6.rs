//! Dual stack: the same policies enforced on IPv4 and IPv6, with real
//! clients (`curl -6`, `nc -6`, `ping -6`, `dig AAAA`) between container
//! namespaces that have an IPv4 /32 and an IPv6 /128 each.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv6Addr},
    process::Stdio,
    time::Duration,
};

use integration_tests::{
    daemon::Daemon,
    netns::NetNs,
    require_root,
    topology::{GATEWAY, Host},
    traffic::{LONG, echo_once, http_server, ping, tcp_connect, tcp_echo_server, udp_echo_server},
};
use serde_json::Value;

/// `curl` from `ns` to `http://ip:port/`: the HTTP status, or curl's exit
/// code as a negative number (7: refused, 28: timed out).
fn curl(ns: &NetNs, ip: IpAddr, port: u16) -> i32 {
    let (family, url) = match ip {
        IpAddr::V4(a) => ("-4", format!("http://{a}:{port}/")),
        IpAddr::V6(a) => ("-6", format!("http://[{a}]:{port}/")),
    };
    let out = ns
        .command("curl")
        .args([family, "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "2", &url])
        .output()
        .expect("run curl");
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).parse().unwrap_or(0)
    } else {
        -out.status.code().unwrap_or(1)
    }
}

/// `nc -6 -u` from `ns`: sends one line to `ip:port` and returns what came
/// back within a second (an echo server answers with the same line).
fn nc_udp6(ns: &NetNs, ip: Ipv6Addr, port: u16) -> String {
    let mut child = ns
        .command("nc")
        .args(["-6", "-u", "-w", "1", &ip.to_string(), &port.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run nc");
    child.stdin.take().expect("stdin").write_all(b"dual-stack\n").expect("write to nc");
    let out = child.wait_with_output().expect("nc output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn dig_aaaa(ns: &NetNs, name: &str) -> Vec<Ipv6Addr> {
    let out = ns
        .command("dig")
        .args([&format!("@{GATEWAY}"), "+time=2", "+tries=1", "+short", "AAAA", name])
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// The endpoint of `app` as `GET /v1/endpoints` lists it.
fn listed_endpoint(daemon: &Daemon, app: &str) -> Value {
    let (_, listed) = daemon.curl("GET", "/v1/endpoints", None);
    let found = listed["endpoints"].as_array().unwrap().iter().find(|e| e["app"] == app).cloned();
    found.unwrap_or_else(|| panic!("no endpoint of {app}: {listed}"))
}

/// Two dual-stack containers registered as `frontend` and `backend`.
fn frontend_and_backend() -> (Host, Daemon) {
    require_root();
    let host = Host::dual_stack(2);
    let daemon = Daemon::start(&host.ns, "");
    daemon.register(host.container(0), "frontend");
    daemon.register(host.container(1), "backend");
    (host, daemon)
}

#[test]
fn one_policy_allows_both_families_and_its_absence_denies_both() {
    require_root();
    let host = Host::dual_stack(3);
    let daemon = Daemon::start(&host.ns, "");
    let (a, b, c) = (host.container(0), host.container(1), host.container(2));
    daemon.register(a, "frontend");
    daemon.register(b, "backend");
    daemon.register(c, "other");
    let (b4, b6) = (IpAddr::V4(b.ip), IpAddr::V6(b.ipv6.unwrap()));
    http_server(&b.ns, b4, 8080, "v4");
    http_server(&b.ns, b6, 8080, "v6");

    // Default deny on both families, answered with a RST (curl: refused),
    // then one policy allows both.
    assert_eq!(curl(&a.ns, b4, 8080), -7, "IPv4: refused without a policy");
    assert_eq!(curl(&a.ns, b6, 8080), -7, "IPv6: refused without a policy");
    daemon.allow("frontend", "backend", "tcp", "8080");
    assert_eq!(curl(&a.ns, b4, 8080), 200);
    assert_eq!(curl(&a.ns, b6, 8080), 200, "the same policy allows IPv6");
    assert_eq!(curl(&c.ns, b6, 8080), -7, "another app is still denied on IPv6");

    // explain answers for IPv6 addresses, from the IPv6 maps.
    let (a6, c6) = (a.ipv6.unwrap().to_string(), c.ipv6.unwrap().to_string());
    let b6_text = b6.to_string();
    let explain = |args: &[&str]| -> Value {
        let args = [&["explain"], args, &["--json"]].concat();
        serde_json::from_str(&daemon.cli_ok(&args)).unwrap()
    };
    let allowed = explain(&[&a6, &b6_text, "tcp", "8080"]);
    assert_eq!(allowed["verdict"], "allowed", "{allowed}");
    assert_eq!(allowed["reason"], "policy", "{allowed}");
    assert_eq!(allowed["source"]["app"], "frontend", "{allowed}");
    assert_eq!(allowed["destination"]["ip"], b6_text, "{allowed}");
    let wrong_port = explain(&[&a6, &b6_text, "tcp", "9000"]);
    assert_eq!(wrong_port["reason"], "wrong_port", "{wrong_port}");
    let no_policy = explain(&[&c6, &b6_text, "tcp", "8080"]);
    assert_eq!(no_policy["reason"], "no_policy", "{no_policy}");
    let spoofed = explain(&[&c6, &b6_text, "tcp", "8080", "--from", &a6]);
    assert_eq!(spoofed["reason"], "spoofed", "{spoofed}");
    let mixed = format!("/v1/explain?src={}&dst={b6_text}&protocol=tcp&port=8080", a.ip);
    let (status, body) = daemon.curl("GET", &mixed, None);
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("dst"), "{body}");

    // The endpoint lists both addresses.
    let entry = listed_endpoint(&daemon, "backend");
    assert_eq!(entry["ips"], serde_json::json!([b.ip.to_string(), b.ipv6.unwrap().to_string()]));

    // Denied IPv6 packets are reported with their addresses.
    let denied = daemon.flows().into_iter().any(|f: Value| {
        f["data"]["packet"]["dst_ip"] == b.ipv6.unwrap().to_string()
            && f["data"]["packet"]["action"] == "reject"
    });
    assert!(denied, "a rejected IPv6 flow event");

    // UDP with nc -6, by a udp policy.
    let b6_addr = b.ipv6.unwrap();
    udp_echo_server(&b.ns, b6, 5353);
    assert_eq!(nc_udp6(&a.ns, b6_addr, 5353), "", "UDP denied without a policy");
    daemon.allow("frontend", "backend", "udp", "5353");
    assert_eq!(nc_udp6(&a.ns, b6_addr, 5353), "dual-stack\n");

    // ping -6 needs an icmpv6 policy (echo request is type 128); an icmp
    // (IPv4) policy does not allow it, and its reply passes.
    assert!(!ping(&a.ns, b6), "ICMPv6 echo denied without a policy");
    let icmp = |protocol: &str, icmp_type: &str| {
        daemon.cli_ok(&[
            "add-network-policy",
            "frontend",
            "--destination-app",
            "backend",
            "--protocol",
            protocol,
            "--icmp-type",
            icmp_type,
        ])
    };
    icmp("icmp", "8");
    assert!(ping(&a.ns, b4), "ping -4 by the icmp policy");
    assert!(!ping(&a.ns, b6), "an icmp policy is not an icmpv6 one");
    icmp("icmpv6", "128");
    assert!(ping(&a.ns, b6), "ping -6 by the icmpv6 policy, reply included");
    let echo = explain(&[&a6, &b6_text, "icmpv6", "128"]);
    assert_eq!(echo["verdict"], "allowed", "{echo}");
    assert!(!ping(&b.ns, IpAddr::V6(a.ipv6.unwrap())), "the other way needs its own policy");

    // DNS answers AAAA with the instances' IPv6 addresses.
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    assert_eq!(dig_aaaa(&a.ns, "backend.apps.internal"), vec![b6_addr]);
}

#[test]
fn revocation_cuts_ipv6_connections_and_spoofed_sources_are_dropped() {
    let (host, daemon) = frontend_and_backend();
    let (a, b) = (host.container(0), host.container(1));
    let b6 = IpAddr::V6(b.ipv6.unwrap());
    tcp_echo_server(&b.ns, b6, 7000);
    daemon.allow("frontend", "backend", "tcp", "7000");
    let mut stream = tcp_connect(&a.ns, None, b6, 7000, LONG).expect("connect over IPv6");
    assert!(echo_once(&mut stream), "echo over IPv6");
    daemon.disallow("frontend", "backend", "tcp", "7000");
    stream.set_read_timeout(Some(Duration::from_millis(800))).unwrap();
    assert!(!echo_once(&mut stream), "the open IPv6 connection is cut");

    // A source address that is not the container's own: dropped where it
    // leaves, even with a policy allowing its app.
    daemon.allow("frontend", "backend", "tcp", "7000");
    let forged: Ipv6Addr = "fd00:255::99".parse().unwrap();
    a.ns.ip(&["-6", "addr", "add", &format!("{forged}/128"), "dev", "eth0", "nodad"]);
    let out =
        a.ns.command("curl")
            .args(["-6", "-s", "--max-time", "1", "--interface", &forged.to_string()])
            .arg(format!("http://[{b6}]:7000/"))
            .output()
            .expect("run curl");
    assert_eq!(out.status.code(), Some(28), "spoofed IPv6 source dropped");
    let spoofed = daemon.flows().into_iter().any(|f: Value| {
        f["data"]["packet"]["src_ip"] == forged.to_string()
            && f["data"]["packet"]["reason"] == "spoofed"
    });
    assert!(spoofed, "the spoofed packet is reported");
}

#[test]
fn endpoint_addresses_are_checked_and_an_ipv6_address_is_owned_once() {
    require_root();
    let host = Host::dual_stack(2);
    let daemon = Daemon::start(&host.ns, "");
    let (a, b) = (host.container(0), host.container(1));
    daemon.register(a, "frontend");
    let a6 = a.ipv6.unwrap().to_string();
    let b4 = b.ip.to_string();
    let add = |ips: &[&str]| {
        let mut args = vec!["endpoint", "add", "--app", "backend", "--ifname", &b.host_ifname];
        for ip in ips {
            args.extend(["--ip", ip]);
        }
        daemon.cli(&args)
    };
    for (ips, says) in [
        (vec![b4.as_str(), "fe80::5"], "link-local"),
        (vec![b4.as_str(), "ff02::1"], "multicast"),
        (vec![b4.as_str(), "fd00::1", "fd00::2"], "one per family"),
        (vec!["0.0.0.0"], "unspecified"),
        (vec![b4.as_str(), a6.as_str()], "already the IPv6 address"),
    ] {
        let out = add(&ips);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{ips:?}: {stderr}");
    }
    let (_, listed) = daemon.curl("GET", "/v1/endpoints", None);
    assert_eq!(listed["endpoints"].as_array().unwrap().len(), 1, "nothing half-added");
    // The API takes `ips` too, and a re-add without the IPv6 address drops it.
    let body = serde_json::json!({
        "ips": [b4, b.ipv6.unwrap().to_string()],
        "app": "backend",
        "ifname": b.host_ifname,
    });
    let (status, reply) = daemon.curl("POST", "/v1/endpoints", Some(&body.to_string()));
    assert_eq!(status, 200, "{reply}");
    daemon.allow("frontend", "backend", "tcp", "8080");
    http_server(&b.ns, IpAddr::V6(b.ipv6.unwrap()), 8080, "v6");
    assert_eq!(curl(&a.ns, IpAddr::V6(b.ipv6.unwrap()), 8080), 200);
    let body = serde_json::json!({"ip": b4, "app": "backend", "ifname": b.host_ifname});
    let (status, reply) = daemon.curl("POST", "/v1/endpoints", Some(&body.to_string()));
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["ips"], serde_json::json!([b4]));
    assert_eq!(
        curl(&a.ns, IpAddr::V6(b.ipv6.unwrap()), 8080),
        -28,
        "its IPv6 address is no longer an endpoint's"
    );
}

#[test]
fn platform_tls_listens_on_the_ipv6_address_with_a_certificate_naming_it() {
    let (host, daemon) = frontend_and_backend();
    let (a, b) = (host.container(0), host.container(1));
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    http_server(&b.ns, b.ip, 8080, "hello over IPv6");
    daemon.allow("frontend", "backend", "tcp", "61443");
    let ca = daemon.state_dir().join("ca.pem");
    let b6 = b.ipv6.unwrap();
    let https = |extra: &[&str], url: &str| {
        let out =
            a.ns.command("curl")
                .args(["-6", "-sS", "--max-time", "3", "--cacert", ca.to_str().unwrap()])
                .args(extra)
                .arg(url)
                .output()
                .expect("run curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    // By name (resolved to the IPv6 address) and by the address itself: the
    // certificate names both.
    let resolve = format!("backend.apps.internal:61443:[{b6}]");
    let (ok, out) = https(&["--resolve", &resolve], "https://backend.apps.internal:61443/");
    assert!(ok && out.contains("hello over IPv6"), "{out}");
    let (ok, out) = https(&[], &format!("https://[{b6}]:61443/"));
    assert!(ok && out.contains("hello over IPv6"), "the IPv6 address is a SAN: {out}");
}

#[test]
fn an_ipv6_only_endpoint_is_policed_and_sends_no_ipv4() {
    require_root();
    let host = Host::dual_stack(2);
    let mut daemon = Daemon::start(&host.ns, "");
    let (a, b) = (host.container(0), host.container(1));
    daemon.register(a, "frontend");
    let (a6, b6) = (a.ipv6.unwrap(), b.ipv6.unwrap());
    let b6_text = b6.to_string();
    let netns = b.ns.path();
    daemon.cli_ok(&[
        "endpoint",
        "add",
        "--app",
        "backend",
        "--ip",
        &b6_text,
        "--ifname",
        &b.host_ifname,
        "--netns",
        netns.to_str().unwrap(),
    ]);
    let entry = listed_endpoint(&daemon, "backend");
    assert_eq!(entry["ip"], b6_text, "keyed by its IPv6 address: {entry}");
    assert_eq!(entry["ips"], serde_json::json!([b6_text]));

    // Policed like any endpoint: refused without a policy, allowed with one.
    http_server(&b.ns, IpAddr::V6(b6), 8080, "IPv6 only");
    assert_eq!(curl(&a.ns, IpAddr::V6(b6), 8080), -7, "refused without a policy");
    daemon.allow("frontend", "backend", "tcp", "8080");
    assert_eq!(curl(&a.ns, IpAddr::V6(b6), 8080), 200);
    let explained: Value = serde_json::from_str(&daemon.cli_ok(&[
        "explain",
        &a6.to_string(),
        &b6_text,
        "tcp",
        "8080",
        "--json",
    ]))
    .unwrap();
    assert_eq!(explained["destination"]["app"], "backend", "{explained}");
    assert_eq!(explained["verdict"], "allowed", "{explained}");

    // Its own traffic: IPv6 by policy; IPv4 (its namespace still has an
    // IPv4 address) dropped where it leaves, as from an address not its own.
    http_server(&a.ns, IpAddr::V6(a6), 9090, "frontend v6");
    http_server(&a.ns, IpAddr::V4(a.ip), 9090, "frontend v4");
    daemon.allow("backend", "frontend", "tcp", "9090");
    assert_eq!(curl(&b.ns, IpAddr::V6(a6), 9090), 200);
    assert_eq!(curl(&b.ns, IpAddr::V4(a.ip), 9090), -28, "no IPv4 out of an IPv6-only endpoint");
    let spoofed = daemon.flows().into_iter().any(|f: Value| {
        f["data"]["packet"]["src_ip"] == b.ip.to_string()
            && f["data"]["packet"]["reason"] == "spoofed"
    });
    assert!(spoofed, "its IPv4 packet is reported as spoofed");

    // DNS answers AAAA only; platform TLS listens on the IPv6 address and
    // forwards to the app there.
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    assert_eq!(dig_aaaa(&a.ns, "backend.apps.internal"), vec![b6]);
    daemon.allow("frontend", "backend", "tcp", "61443");
    let ca = daemon.state_dir().join("ca.pem");
    let out =
        a.ns.command("curl")
            .args(["-6", "-sS", "--max-time", "3", "--cacert", ca.to_str().unwrap()])
            .arg(format!("https://[{b6}]:61443/"))
            .output()
            .expect("run curl");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("IPv6 only"), "TLS to the app: {text}");

    // Restored as it was after a restart (keyed by its IPv6 address).
    assert!(daemon.stop().success());
    daemon.spawn();
    assert_eq!(curl(&a.ns, IpAddr::V6(b6), 8080), 200, "after a restart");
    assert_eq!(curl(&b.ns, IpAddr::V4(a.ip), 9090), -28, "still no IPv4 after a restart");

    // Removed by its address.
    let removed = daemon.cli_ok(&["endpoint", "del", "--ip", &b6_text]);
    assert!(removed.contains("removed"), "{removed}");
    let (_, listed) = daemon.curl("GET", "/v1/endpoints", None);
    assert_eq!(listed["endpoints"].as_array().unwrap().len(), 1, "{listed}");
}
