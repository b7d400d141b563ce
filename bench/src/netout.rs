//! NetOut's per-packet cost with BPF_PROG_TEST_RUN: `tc_from_container` on
//! a packet leaving the overlay, for an app with 0 (no security groups), 10,
//! 100 and 1,000 rules, next to an empty program in the same run. Each rule
//! allows TCP 443 to one address; the allowed packet goes to the last one.

use std::net::Ipv4Addr;

use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use integration_tests::{netns::NetNs, pins::PinDir, unique_name};
use policy_agent::{
    Direction,
    state::{AddressRange, NetOutProtocol, NetOutRule, PortSpan},
};
use policy_common::craft::PacketSpec;

use crate::report::{Report, outln};

const A: [u8; 4] = [10, 255, 0, 1];
const TAG_A: u32 = 1;

/// The i-th rule's address: 198.18.0.0/15, the benchmarking range.
fn address(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + i)
}

fn median(prog: &SchedClassifier, frame: &[u8], repeat: u32, rounds: usize) -> f64 {
    let mut v: Vec<f64> = (0..rounds)
        .map(|_| {
            prog.test_run(TestRunOptions { data_in: Some(frame), repeat, ..Default::default() })
                .expect("test run")
                .duration
                .as_nanos() as f64
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(quick: bool, report: &mut Report) {
    let (repeat, rounds) = if quick { (200_000, 3) } else { (1_000_000, 5) };
    let ns = NetNs::new(unique_name("bench"));
    let _in_ns = ns.enter();
    let mut baseline = crate::dataplane::baseline();
    let empty = crate::dataplane::empty_program(&mut baseline);
    let mut out = String::new();
    outln!(
        out,
        "\n### 9. NetOut (security groups)\n\n`tc_from_container` on a TCP packet leaving the overlay (BPF_PROG_TEST_RUN, ns per packet, median of {rounds} × {repeat}), the app holding N rules (TCP 443 to one address each)\n"
    );
    outln!(
        out,
        "| rules | allowed (last rule's address) | denied (no rule's address) | empty program |"
    );
    outln!(out, "|---:|---:|---:|---:|");
    for n in [0u32, 10, 100, 1000] {
        let pins = PinDir::new();
        let mut dataplane = pins.open();
        let maps = dataplane.maps_mut();
        maps.set_endpoint(Ipv4Addr::from(A), TAG_A).expect("endpoint");
        maps.set_veth(1, Ipv4Addr::from(A), TAG_A).expect("veth");
        maps.set_settings(policy_agent::dataplane::EventSettings::off().kernel())
            .expect("settings");
        if n > 0 {
            let rules: Vec<NetOutRule> = (0..n)
                .map(|i| NetOutRule {
                    protocol: NetOutProtocol::Tcp,
                    networks: vec![AddressRange { start: address(i), end: address(i) }],
                    ports: vec![PortSpan { start: 443, end: 443 }],
                    icmps: None,
                    log: false,
                })
                .collect();
            let entries = policy_agent::netout::app_entries(TAG_A, &rules).expect("rules");
            maps.set_netout(&entries).expect("netout");
        }
        let allowed = PacketSpec::tcp(A, address(n.saturating_sub(1)).octets(), 40000, 443).frame();
        let denied = PacketSpec::tcp(A, [203, 0, 113, 1], 40001, 443).frame();
        let prog = dataplane.tc_program(Direction::FromContainer);
        let (a, d) =
            (median(prog, &allowed, repeat, rounds), median(prog, &denied, repeat, rounds));
        let e = median(empty, &allowed, repeat, rounds);
        let label = if n == 0 { "0 (no groups)".to_owned() } else { n.to_string() };
        outln!(out, "| {label} | {a:.0} | {d:.0} | {e:.0} |");
    }
    outln!(
        out,
        "\nOne trie lookup and at most 16 rule checks per packet, whatever the number of rules. Not measured yet: the same egress rules as iptables chains (silk's NetOut) under real traffic."
    );
    report.section(out);
}
