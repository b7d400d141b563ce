//! The benchmarks' nftables baseline is a real policy set: in the same
//! namespace layout as ours, it lets allowed traffic and its replies through
//! and rejects the rest, and element updates change what it enforces.

use std::time::Duration;

use integration_tests::{
    iptables::CfPolicy,
    nftables::CfNftables,
    require_root,
    topology::Host,
    traffic::{tcp_echo_server, tcp_echo_works, udp_echo_server, udp_echo_works, udp_socket},
};

const WAIT: Duration = Duration::from_millis(300);

#[test]
fn the_nftables_rule_set_enforces_policies_and_updates_in_place() {
    require_root();
    assert!(integration_tests::nftables::available(), "nft is missing: run `cargo xtask setup`");
    let host = Host::new(3);
    let (a, b, c) = (host.container(0), host.container(1), host.container(2));
    udp_echo_server(&b.ns, b.ip, 7000);
    udp_echo_server(&b.ns, b.ip, 7001);
    tcp_echo_server(&b.ns, b.ip, 7002);
    tcp_echo_server(&b.ns, b.ip, 7010);
    let policy = |source_tag, protocol, start, end| CfPolicy {
        source_tag,
        destination: b.ip,
        protocol,
        start,
        end,
    };
    // 10,000 policies from apps elsewhere, and A's: UDP 7000, TCP 7002-7005.
    let mut policies: Vec<CfPolicy> =
        (0..10_000).map(|i| policy(100 + i, "udp", 7000, 7001)).collect();
    let a_udp = policy(1, "udp", 7000, 7000);
    policies.push(a_udp.clone());
    policies.push(policy(1, "tcp", 7002, 7005));
    let (from_a, from_c) = (udp_socket(&a.ns, None), udp_socket(&c.ns, None));
    let rules = CfNftables::install(&host.ns, &[(a.ip, 1), (b.ip, 2), (c.ip, 3)], &policies);
    assert_eq!(rules.element_count(), 10_002);
    assert!(udp_echo_works(&from_a, b.ip, 7000, 32, WAIT), "allowed, reply through conntrack");
    assert!(tcp_echo_works(&a.ns, b.ip, 7002, WAIT), "TCP allowed, in the range");
    assert!(!tcp_echo_works(&a.ns, b.ip, 7010, WAIT), "past the range: rejected");
    assert!(!udp_echo_works(&from_a, b.ip, 7001, 32, WAIT), "another port: rejected");
    assert!(!udp_echo_works(&from_c, b.ip, 7000, 32, WAIT), "another app: rejected");

    // Element updates, one transaction each.
    rules.remove(std::slice::from_ref(&a_udp));
    let fresh = udp_socket(&a.ns, None);
    assert!(!udp_echo_works(&fresh, b.ip, 7000, 32, WAIT), "removed");
    assert!(tcp_echo_works(&a.ns, b.ip, 7002, WAIT), "the rest still allowed");
    rules.add(&[policy(3, "udp", 7000, 7000)]);
    assert!(udp_echo_works(&udp_socket(&c.ns, None), b.ip, 7000, 32, WAIT), "added for C");
    assert_eq!(rules.element_count(), 10_002);
}
