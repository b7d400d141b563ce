//! NetIn and NetOut through the `policy-cni` plugin: port mappings reach
//! the container and go with it, security groups allow only their rules
//! and follow changes, and a refused ADD changes none.

use std::net::Ipv4Addr;

use integration_tests::{
    cni::*,
    daemon::Daemon,
    netns::NetNs,
    require_root,
    traffic::{
        LONG, SHORT, ping, tcp_echo_server, tcp_echo_works, udp_echo_server, udp_echo_works,
        udp_socket,
    },
};
use serde_json::{Value, json};

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
