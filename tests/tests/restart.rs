//! The loading process exits and a new one takes over the pinned state
//! while traffic flows: no allowed packet lost, no denied packet passed.

use std::time::Duration;

use aya::programs::{SchedClassifier, TcAttachType};
use integration_tests::{
    agent::DataplaneCli,
    pins::PinDir,
    require_root,
    topology::Host,
    traffic::{LONG, SteadyFlows, echo_once, tcp_connect, tcp_echo_server},
};

/// Program ids of the TC filters on a host-side veth, both directions, as
/// `tc filter show` lists them; none is attached through TCX.
fn attached_programs(host: &Host, ifname: &str) -> Vec<u32> {
    {
        let _in_host = host.ns.enter();
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            assert!(SchedClassifier::query_tcx(ifname, t).expect("query tcx").1.is_empty());
        }
    }
    ["ingress", "egress"]
        .into_iter()
        .flat_map(|hook| host.ns.tc_bpf_filters(ifname, hook))
        .map(|(_, _, id)| id)
        .collect()
}

#[test]
fn a_new_process_takes_over_without_losing_or_leaking_a_packet() {
    require_root();
    let host = Host::new(2);
    let pins = PinDir::new();
    let (frontend, backend) = (host.container(0), host.container(1));
    let cli = DataplaneCli::new(&host, &pins);
    // First process: attach both containers, allow frontend -> backend on
    // UDP 9000 and TCP 8080, exit.
    cli.attach(0, 1);
    cli.attach(1, 2);
    cli.policy("allow", 1, 2, "udp", "9000");
    cli.policy("allow", 1, 2, "tcp", "8080");
    let before = attached_programs(&host, &backend.host_ifname);
    assert_eq!(before.len(), 2, "both directions stay attached after the process exited");

    // A long-lived TCP connection and two UDP flows, one allowed, one denied.
    tcp_echo_server(&backend.ns, backend.ip, 8080);
    let mut stream = tcp_connect(&frontend.ns, None, backend.ip, 8080, LONG).expect("connect");
    assert!(echo_once(&mut stream));
    let flows = SteadyFlows::start(&frontend.ns, &backend.ns, backend.ip, 9000, 9001);

    // Two takeovers by new processes while packets flow.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(300));
        cli.run(&["load"]);
    }
    std::thread::sleep(Duration::from_millis(300));
    let counts = flows.finish();
    let (sent, allowed, denied) = (counts.sent, counts.allowed_received, counts.denied_received);

    let after = attached_programs(&host, &backend.host_ifname);
    assert_eq!(after.len(), 2);
    assert!(
        before.iter().all(|id| !after.contains(id)),
        "the new process's programs run now: {before:?} -> {after:?}"
    );
    assert!(sent > 500, "only {sent} packets sent");
    assert_eq!(allowed, sent, "allowed packets lost across the takeover");
    assert_eq!(denied, 0, "denied packets passed across the takeover");
    assert!(echo_once(&mut stream), "the TCP connection survived the takeover");
    println!(
        "sent {sent} allowed + {sent} denied datagrams across two takeovers: {allowed} allowed received, {denied} denied received"
    );
}
