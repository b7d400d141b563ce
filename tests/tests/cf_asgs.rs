//! Cloud Foundry's dynamic security groups from the real policy server:
//! groups written into its database (as its Cloud Controller sync writes
//! them) are fetched by the agent's client as a cell asks for them, page
//! by page, and turn into the NetOut rules of an app in one space or
//! another and of a staging container, as vxlan-policy-agent picks and
//! converts them. Also what the server's endpoint really takes: `limit`
//! and `from` (not `per_page`, which vxlan-policy-agent sends), and no
//! spaces named gives the default groups only.
//!
//! And a container `policy-cni` adds with garden's `space_id`: its
//! space's groups hold when the ADD returns, in place of the static
//! `netOutRules` of the call, follow the server, and cannot be written
//! over through the API; a container without a space keeps its static
//! rules.

use std::{net::Ipv4Addr, time::Duration};

use integration_tests::{
    cf::PolicyServer,
    cni::{assert_nothing_left, config, host_with_outside, result_ip, run_plugin},
    daemon::Daemon,
    eventually,
    netns::NetNs,
    require_root,
    traffic::{LONG, SHORT, tcp_echo_server, tcp_echo_works},
};
use policy_agent::{
    cf::asgs::{SecurityGroup, Workload, rules_for},
    state::{AddressRange, IcmpMatch, NetOutProtocol, NetOutRule, PortSpan},
};
use serde_json::json;

fn spaces(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn guids(groups: &[SecurityGroup]) -> Vec<&str> {
    groups.iter().map(|g| g.guid.as_str()).collect()
}

/// A rule allowing `protocol` to `start..=end` on `ports` (none: any).
fn allow(protocol: NetOutProtocol, start: &str, end: &str, ports: &[(u16, u16)]) -> NetOutRule {
    NetOutRule {
        protocol,
        networks: vec![AddressRange { start: start.parse().unwrap(), end: end.parse().unwrap() }],
        ports: ports.iter().map(|&(start, end)| PortSpan { start, end }).collect(),
        icmps: None,
        log: false,
    }
}

fn sorted(mut rules: Vec<NetOutRule>) -> Vec<NetOutRule> {
    rules.sort();
    rules
}

#[test]
fn security_groups_from_the_policy_server_become_netout_rules() {
    require_root();
    let server = PolicyServer::start();
    let client = server.cell_client();
    assert!(client.security_groups(&spaces(&["space-1"])).unwrap().is_empty());

    server.put_security_group(
        "asg-running-default",
        "public-https",
        r#"[{"protocol":"tcp","destination":"192.0.2.0/24","ports":"443","description":"web"}]"#,
        true,
        false,
        &[],
        &[],
    );
    server.put_security_group(
        "asg-space-1",
        "space-1-dns-and-ping",
        r#"[{"protocol":"udp","destination":"198.51.100.53","ports":"53","log":true},
            {"protocol":"icmp","destination":"198.51.100.1-198.51.100.9","type":8,"code":-1}]"#,
        false,
        false,
        &["space-1"],
        &[],
    );
    server.put_security_group(
        "asg-staging-default",
        "staging-everything",
        r#"[{"protocol":"all","destination":"203.0.113.7"}]"#,
        false,
        true,
        &[],
        &[],
    );
    server.put_security_group(
        "asg-space-2",
        "space-2-db",
        r#"[{"protocol":"tcp","destination":"10.10.0.0-10.10.0.255","ports":"5432-5433"}]"#,
        false,
        false,
        &["space-2"],
        &["space-2"],
    );
    // Groups of other spaces only, to make pages of what is left out.
    for i in 0..4 {
        server.put_security_group(
            &format!("asg-elsewhere-{i}"),
            "elsewhere",
            r#"[{"protocol":"all","destination":"10.99.0.1"}]"#,
            false,
            false,
            &["space-9"],
            &["space-9"],
        );
    }

    // What the endpoint takes: the groups of the spaces named and every
    // default; no space named: the defaults only.
    let space_1 = client.security_groups(&spaces(&["space-1"])).unwrap();
    assert_eq!(guids(&space_1), ["asg-running-default", "asg-space-1", "asg-staging-default"]);
    let defaults = client.security_groups(&[]).unwrap();
    assert_eq!(guids(&defaults), ["asg-running-default", "asg-staging-default"]);
    let both = client.security_groups(&spaces(&["space-1", "space-2"])).unwrap();
    assert_eq!(
        guids(&both),
        ["asg-running-default", "asg-space-1", "asg-staging-default", "asg-space-2"]
    );
    let served = &space_1[1];
    assert_eq!(served.name, "space-1-dns-and-ping");
    assert_eq!(served.running_space_guids, ["space-1"]);
    assert!(served.staging_space_guids.is_empty() && !served.running_default);
    assert_eq!(served.rules.len(), 2);

    // Paged: `limit` is honoured and `next` names the row to go on from.
    let first_page = server.internal_get("security_groups?space_guids=space-1,space-2&limit=1");
    println!("first page of one: {first_page}");
    assert_eq!(first_page["security_groups"].as_array().map(Vec::len), Some(1), "{first_page}");
    assert_ne!(first_page["next"], 0, "{first_page}");
    // `per_page`, which vxlan-policy-agent sends, is not read: one answer.
    let unpaged = server.internal_get("security_groups?space_guids=space-1,space-2&per_page=1");
    assert_eq!(unpaged["security_groups"].as_array().map(Vec::len), Some(4), "{unpaged}");
    assert_eq!(unpaged["next"], 0, "{unpaged}");
    for page_size in [1, 2, 3] {
        let paged =
            client.security_groups_in_pages(&spaces(&["space-1", "space-2"]), page_size).unwrap();
        assert_eq!(paged, both, "in pages of {page_size}");
    }
    // Every group of the table, in pages of 3 (the last one short).
    let every =
        client.security_groups_in_pages(&spaces(&["space-1", "space-2", "space-9"]), 3).unwrap();
    assert_eq!(every.len(), 8, "{:?}", guids(&every));

    // As vxlan-policy-agent picks them: apps and staging containers in
    // space-1 and space-2.
    let https = allow(NetOutProtocol::Tcp, "192.0.2.0", "192.0.2.255", &[(443, 443)]);
    let dns = NetOutRule {
        log: true,
        ..allow(NetOutProtocol::Udp, "198.51.100.53", "198.51.100.53", &[(53, 53)])
    };
    let ping = NetOutRule {
        icmps: Some(IcmpMatch { icmp_type: 8, code: None }),
        ..allow(NetOutProtocol::Icmp, "198.51.100.1", "198.51.100.9", &[])
    };
    let db = allow(NetOutProtocol::Tcp, "10.10.0.0", "10.10.0.255", &[(5432, 5433)]);
    let everything = allow(NetOutProtocol::All, "203.0.113.7", "203.0.113.7", &[]);
    let app_1 = rules_for(&both, "space-1", Workload::App).unwrap();
    assert_eq!(app_1.rules, sorted(vec![https.clone(), dns, ping]));
    assert!(app_1.dropped.is_empty(), "{:?}", app_1.dropped);
    let app_2 = rules_for(&both, "space-2", Workload::App).unwrap();
    assert_eq!(app_2.rules, sorted(vec![https, db.clone()]));
    let staging_1 = rules_for(&both, "space-1", Workload::Staging).unwrap();
    assert_eq!(staging_1.rules, std::slice::from_ref(&everything));
    let staging_2 = rules_for(&both, "space-2", Workload::Staging).unwrap();
    assert_eq!(staging_2.rules, sorted(vec![everything, db]));
    for rules in [&app_1.rules, &app_2.rules, &staging_1.rules, &staging_2.rules] {
        policy_agent::netout::app_entries(1, rules).expect("rules the kernel takes");
    }

    // Rewritten and deleted at the server: the next fetch says so.
    server.put_security_group(
        "asg-running-default",
        "public-https",
        r#"[{"protocol":"tcp","destination":"not-an-address","ports":"443"}]"#,
        true,
        false,
        &[],
        &[],
    );
    server.delete_security_group("asg-space-1");
    let now = client.security_groups(&spaces(&["space-1"])).unwrap();
    assert_eq!(guids(&now), ["asg-running-default", "asg-staging-default"]);
    let err = rules_for(&now, "space-1", Workload::App).unwrap_err();
    println!("a bad destination: {err}");
    assert_eq!(
        (err.guid.as_str(), err.rule, err.item.as_str()),
        ("asg-running-default", 0, "not-an-address")
    );
    // Staging does not take that group.
    assert_eq!(rules_for(&now, "space-1", Workload::Staging).unwrap().rules.len(), 1);
}

#[test]
fn a_cni_container_in_a_space_gets_its_spaces_groups_from_the_server() {
    require_root();
    let (host, ext) = host_with_outside("extlink", "192.0.2.1/24", &["192.0.2.10/24"]);
    ext.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    let dest = Ipv4Addr::new(192, 0, 2, 10);
    for port in [443, 444, 445] {
        tcp_echo_server(&ext, dest, port);
    }
    let server = PolicyServer::start_in(&host);
    // The running default: TCP 443; space-1's group: TCP 444.
    server.put_default_and_space_groups("444", &["space-1"]);
    let (cert, key) = server.client_identity();
    let daemon = Daemon::start(
        &host,
        &format!(
            "[cf]\npolicy_server_url = \"{}\"\nca_cert_file = \"{}\"\nclient_cert_file = \"{}\"\nclient_key_file = \"{}\"\nenable_asg_syncing = true\nasg_poll_interval = \"1s\"\n",
            server.internal_url(),
            server.ca_file().display(),
            cert.display(),
            key.display()
        ),
    );
    // garden's call: the space in the metadata, and static groups (TCP 445
    // only) that the server's replace.
    let static_rules = json!([{"protocol": 1, "networks": [{"start": "192.0.2.10", "end": "192.0.2.10"}],
                               "ports": [{"start": 445, "end": 445}]}]);
    let mut conf = config(&daemon, "0.3.1", Some("app-a"));
    conf["metadata"]["space_id"] = json!("space-1");
    conf["metadata"]["container_workload"] = json!("app");
    conf["runtimeConfig"]["netOutRules"] = static_rules.clone();
    let a_ns = NetNs::new(integration_tests::unique_name("c"));
    let a = run_plugin(&host, "ADD", "a-1", Some(&a_ns.path()), "eth0", &conf);
    assert!(a.ok, "{} {}", a.out, a.stderr);
    let egress = |ns: &NetNs| {
        [443, 444, 445].map(|p| tcp_echo_works(ns, dest, p, if p == 443 { LONG } else { SHORT }))
    };
    // In force when the ADD returned: the default and space-1's group.
    assert_eq!(egress(&a_ns), [true, true, false], "the server's groups:\n{}", daemon.log());
    let listed = daemon.curl("GET", "/v1/endpoints", None).1;
    let endpoint = &listed["endpoints"][0];
    assert_eq!(
        (endpoint["space_id"].as_str(), endpoint["container_workload"].as_str()),
        (Some("space-1"), Some("app")),
        "{listed}"
    );
    // Written through the API while the server's groups hold: refused,
    // nothing changed.
    let (status, reply) =
        daemon.curl("PUT", "/v1/asgs/app-a", Some(&json!({"rules": static_rules}).to_string()));
    assert_eq!(status, 409, "{reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains("policy server") && error.contains(&server.internal_url()), "{reply}");
    assert_eq!(daemon.curl("DELETE", "/v1/asgs/app-a", None).0, 409);
    assert_eq!(egress(&a_ns), [true, true, false], "unchanged by the refused writes");

    // The control: a container without a space keeps its static groups.
    let mut plain = config(&daemon, "0.3.1", Some("app-b"));
    plain["runtimeConfig"]["netOutRules"] = static_rules;
    let b_ns = NetNs::new(integration_tests::unique_name("c"));
    let b = run_plugin(&host, "ADD", "b-1", Some(&b_ns.path()), "eth0", &plain);
    assert!(b.ok, "{} {}", b.out, b.stderr);
    assert_ne!(result_ip(&b.out), result_ip(&a.out));
    assert_eq!(egress(&b_ns), [false, false, true], "no space: the call's static groups");

    // Changed at the server while the container runs: followed.
    server.put_space_group("445", &["space-1"]);
    assert!(
        eventually(Duration::from_secs(6), || egress(&a_ns) == [true, false, true]),
        "the changed group in force:\n{}",
        daemon.log()
    );
    // Its last container gone: the app's groups go with it, and the API
    // may set them again.
    assert!(run_plugin(&host, "DEL", "a-1", Some(&a_ns.path()), "eth0", &conf).ok);
    assert!(
        eventually(Duration::from_secs(6), || {
            daemon.curl("GET", "/v1/asgs", None).1["asgs"].get("app-a").is_none()
        }),
        "{}",
        daemon.log()
    );
    assert!(run_plugin(&host, "DEL", "b-1", Some(&b_ns.path()), "eth0", &plain).ok);
    assert_nothing_left(&daemon, &host);
}
