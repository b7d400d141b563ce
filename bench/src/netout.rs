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
        maps.set_settings(policy_agent::dataplane::kernel_settings(
            &policy_agent::dataplane::EventSettings::off(),
            &policy_agent::dataplane::DenySettings::drop(),
        ))
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
        "\nOne trie lookup and at most 16 rule checks per packet, whatever the number of rules."
    );
    report.section(out);
}

/// The destination the measured traffic goes to (the last rule's).
const TARGET: Ipv4Addr = Ipv4Addr::new(198, 19, 255, 1);

/// A host with one container and an "external" namespace behind it at
/// `TARGET`: (host, container namespace, external namespace).
fn outside_topology() -> (integration_tests::topology::Host, NetNs) {
    let host = integration_tests::topology::Host::new(1);
    let target = format!("{TARGET}/24");
    let ext =
        integration_tests::topology::outside(&host.ns, "extlink", "198.19.255.254/24", &[&target]);
    ext.ip(&["route", "add", "default", "via", "198.19.255.254"]);
    (host, ext)
}

/// N UDP rules: N - 1 to other addresses, then the one the traffic matches.
fn udp_rules(n: u32) -> Vec<NetOutRule> {
    let port = crate::compare::UDP_PORT;
    (0..n)
        .map(|i| {
            let to = if i + 1 == n { TARGET } else { address(i) };
            NetOutRule {
                protocol: NetOutProtocol::Udp,
                networks: vec![AddressRange { start: to, end: to }],
                ports: vec![PortSpan { start: port, end: port }],
                icmps: None,
                log: false,
            }
        })
        .collect()
}

/// The same rules as silk writes NetOut: conntrack first, then a chain for
/// the container's source address walked rule by rule, a final REJECT.
fn iptables_rules(container: Ipv4Addr, n: u32) -> String {
    let port = crate::compare::UDP_PORT;
    let mut r = String::from(
        "*filter\n:netout - [0:0]\n-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n",
    );
    r += &format!("-A FORWARD -s {container}/32 -j netout\n");
    for i in 0..n {
        let to = if i + 1 == n { TARGET } else { address(i) };
        r += &format!("-A netout -d {to}/32 -p udp --dport {port} -j ACCEPT\n");
    }
    r += "-A netout -j REJECT --reject-with icmp-port-unreachable\nCOMMIT\n";
    r
}

/// Real traffic: UDP packets/s from a container to a destination outside
/// the overlay allowed by the last of N rules, no filtering vs ours vs
/// iptables (silk's NetOut).
pub fn traffic(quick: bool, report: &mut Report) {
    use std::io::Write as _;
    let secs = if quick { 1.0 } else { 3.0 };
    let mut out = String::new();
    outln!(
        out,
        "\nReal traffic: UDP packets/s from a container to an address outside the overlay allowed by the last of N rules (one sender, {secs} s): no filtering, this project's NetOut, iptables rules as silk writes NetOut (a chain walked rule by rule)\n"
    );
    outln!(out, "| rules | no filtering | NetOut (eBPF) | iptables | eBPF / iptables |");
    outln!(out, "|---:|---:|---:|---:|---:|");
    for n in [10u32, 100, 1000] {
        let pps = |mode: u8| {
            let (host, ext) = outside_topology();
            let c = host.container(0);
            let _daemon = (mode == 1).then(|| {
                let daemon =
                    integration_tests::daemon::Daemon::start(&host.ns, "log_level = \"warn\"");
                daemon.register(c, "app");
                let body = serde_json::json!({ "rules": udp_rules(n) }).to_string();
                assert_eq!(daemon.curl("PUT", "/v1/asgs/app", Some(&body)).0, 200);
                daemon
            });
            if mode == 2 {
                let mut child = host
                    .ns
                    .command("iptables-legacy-restore")
                    .stdin(std::process::Stdio::piped())
                    .spawn()
                    .expect("iptables-legacy-restore");
                child.stdin.take().unwrap().write_all(iptables_rules(c.ip, n).as_bytes()).unwrap();
                assert!(child.wait().unwrap().success(), "iptables rules");
            }
            crate::compare::udp_pps_between(&c.ns, &ext, TARGET, secs)
        };
        let (none, ours, ipt) = (pps(0), pps(1), pps(2));
        outln!(out, "| {n} | {none:.0} | {ours:.0} | {ipt:.0} | {:.2}x |", ours / ipt);
    }
    report.section(out);
}
