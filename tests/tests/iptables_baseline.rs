//! The benchmarks' iptables baseline is a real policy set: in the same
//! namespace layout as ours, it lets allowed traffic and its replies through
//! and rejects the rest, and a rebuild changes what it enforces.

use std::time::Duration;

use integration_tests::{
    iptables::{CfIptables, CfPolicy, CfRuleSet},
    require_root,
    topology::Host,
    traffic::{tcp_echo_server, tcp_echo_works, udp_echo_server, udp_echo_works, udp_socket},
};

const WAIT: Duration = Duration::from_millis(300);

#[test]
fn the_cloud_foundry_rule_set_enforces_policies_and_rebuilds() {
    require_root();
    assert!(integration_tests::iptables::available(), "iptables-legacy is missing");
    let host = Host::new(3);
    let (a, b, c) = (host.container(0), host.container(1), host.container(2));
    udp_echo_server(&b.ns, b.ip, 7000);
    udp_echo_server(&b.ns, b.ip, 7001);
    tcp_echo_server(&b.ns, b.ip, 7002);
    let policy = |source_tag, protocol, port| CfPolicy {
        source_tag,
        destination: b.ip,
        protocol,
        start: port,
        end: port,
    };
    // 500 policies from apps elsewhere, A's two in the middle.
    let mut policies: Vec<CfPolicy> = (0..500).map(|i| policy(100 + i, "udp", 9000)).collect();
    policies.insert(250, policy(1, "udp", 7000));
    policies.insert(250, policy(1, "tcp", 7002));
    let mut set =
        CfRuleSet { sources: vec![(a.ip, 1), (b.ip, 2), (c.ip, 3)], policies: policies.clone() };

    let mut rules = CfIptables::install(&host.ns);
    let (from_a, from_c) = (udp_socket(&a.ns, None), udp_socket(&c.ns, None));
    assert!(!udp_echo_works(&from_a, b.ip, 7000, 32, WAIT), "denied before any policy");
    rules.enforce(&set);
    assert_eq!(rules.rule_count(), 3 + 3 + 502, "FORWARD, marks, accepts");
    assert!(udp_echo_works(&from_a, b.ip, 7000, 32, WAIT), "allowed, reply through conntrack");
    assert!(tcp_echo_works(&a.ns, b.ip, 7002, WAIT), "TCP allowed");
    assert!(!udp_echo_works(&from_a, b.ip, 7001, 32, WAIT), "another port: rejected");
    assert!(!udp_echo_works(&from_c, b.ip, 7000, 32, WAIT), "another app: rejected");

    // A rebuild without A's UDP policy.
    set.policies.retain(|p| !(p.source_tag == 1 && p.protocol == "udp"));
    rules.enforce(&set);
    let fresh = udp_socket(&a.ns, None);
    assert!(!udp_echo_works(&fresh, b.ip, 7000, 32, WAIT), "removed by the rebuild");
    assert!(tcp_echo_works(&a.ns, b.ip, 7002, WAIT), "the rest still allowed");
}
