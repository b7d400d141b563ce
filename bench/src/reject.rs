//! Rejects: what answering a denied packet costs the program (against
//! dropping it, `BPF_PROG_TEST_RUN`), and how long a denied `connect()`
//! takes to fail with real traffic: this project's reject, its drop, and
//! Cloud Foundry's iptables `REJECT`.

use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::{Duration, Instant},
};

use integration_tests::{netns::NetNs, pins::PinDir, unique_name};
use policy_agent::{
    Direction,
    dataplane::{DenyAction, DenySettings, EventSettings, kernel_settings},
};
use policy_common::craft::PacketSpec;

use crate::{
    compare::{Mode, Setup},
    dataplane::{baseline, empty_program, one_run_each},
    report::{Report, outln},
};

const A: [u8; 4] = [10, 255, 0, 1];
const B: [u8; 4] = [10, 255, 0, 2];
/// A port no policy allows.
const DENIED_PORT: u16 = 9999;

/// Rejects without a budget (the rate limit is its own measurement).
fn rejecting() -> DenySettings {
    DenySettings { action: DenyAction::Reject, rejects_per_second: u32::MAX }
}

/// Distinct denied packets A -> B: TCP SYNs, or UDP datagrams.
fn denied_frames(n: usize, udp: bool) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            let sport = 1024 + (i % 60_000) as u16;
            let spec = if udp {
                PacketSpec::udp(A, B, sport, DENIED_PORT)
            } else {
                PacketSpec::tcp(A, B, sport, DENIED_PORT)
            };
            spec.frame()
        })
        .collect()
}

pub fn run(quick: bool, report: &mut Report) {
    let mut out = String::new();
    let n = if quick { 20_000 } else { 100_000 };
    let ns = NetNs::new(unique_name("bench"));
    let _in_ns = ns.enter();
    let mut base = baseline();
    let empty = empty_program(&mut base);
    let pins = PinDir::new();
    let mut dataplane = pins.open();
    let maps = dataplane.maps_mut();
    maps.set_endpoint(Ipv4Addr::from(A), 1).expect("endpoint");
    maps.set_endpoint(Ipv4Addr::from(B), 2).expect("endpoint");
    let (syns, datagrams) = (denied_frames(n, false), denied_frames(n, true));
    let empty_ns = one_run_each(empty, &syns);
    let mut rows = Vec::new();
    for (label, deny) in [("drop", DenySettings::drop()), ("reject", rejecting())] {
        dataplane
            .maps_mut()
            .set_settings(kernel_settings(&EventSettings::off(), &deny))
            .expect("settings");
        let prog = dataplane.tc_program(Direction::ToContainer);
        rows.push((label, one_run_each(prog, &syns), one_run_each(prog, &datagrams)));
    }
    outln!(
        out,
        "\n### Rejects\n\n{n} distinct denied packets (no policy), one test run each, events off: dropped, or rewritten into its reject (TCP RST, ICMP port unreachable), a conntrack entry recorded and the packet redirected (`BPF_PROG_TEST_RUN`, mean kernel-timed ns of single runs, which include the test timer's own overhead; the empty program measured the same way: {empty_ns:.1} ns).\n"
    );
    outln!(out, "| deny_action | TCP SYN, ns per packet | UDP datagram, ns per packet |");
    outln!(out, "|---|---:|---:|");
    let (_, tcp0, udp0) = rows[0];
    for (label, tcp, udp) in &rows {
        outln!(out, "| {label} | {tcp:.1} ({:+.1}) | {udp:.1} ({:+.1}) |", tcp - tcp0, udp - udp0);
    }
    drop(_in_ns);
    connect_failures(quick, &mut out);
    report.section(out);
}

/// How long `n` denied connects from A to B take to fail (timeout: no
/// answer within `timeout`).
fn failures(setup: &Setup, n: usize, timeout: Duration) -> (Vec<Duration>, usize) {
    let (_, b_ip) = setup.b();
    let target = SocketAddr::from((b_ip, DENIED_PORT));
    setup.a().run(move || {
        let mut refused = Vec::new();
        let mut timed_out = 0;
        for _ in 0..n {
            let start = Instant::now();
            match TcpStream::connect_timeout(&target, timeout) {
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    refused.push(start.elapsed());
                }
                Err(_) => timed_out += 1,
                Ok(_) => panic!("a connect to the denied port succeeded"),
            }
        }
        refused.sort();
        (refused, timed_out)
    })
}

fn connect_failures(quick: bool, out: &mut String) {
    let n = if quick { 200 } else { 2_000 };
    let (drop_n, drop_timeout) = (5, Duration::from_millis(300));
    let mut ours = Setup::new(Mode::Ours, 10);
    ours.set_deny(rejecting());
    let iptables = Setup::new(Mode::Iptables, 10);
    let wait = Duration::from_millis(500);
    let (reject, _) = failures(&ours, n, wait);
    let (cf, cf_timed_out) = failures(&iptables, n, wait);
    ours.set_deny(DenySettings::drop());
    let (dropped, timed_out) = failures(&ours, drop_n, drop_timeout);
    let pct = |v: &[Duration], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .map_or("-".to_owned(), |d| format!("{:.0}", d.as_secs_f64() * 1e6))
    };
    outln!(
        out,
        "\nA denied `connect()` between two container namespaces (10 policies, none for the port), {n} in a row: the time until it fails.\n"
    );
    outln!(
        out,
        "| enforcement | refused (others: no answer within {} ms) | p50 µs | p99 µs |",
        wait.as_millis()
    );
    outln!(out, "|---|---:|---:|---:|");
    outln!(
        out,
        "| eBPF, deny_action = reject (RST) | {}/{n} | {} | {} |",
        reject.len(),
        pct(&reject, 0.5),
        pct(&reject, 0.99)
    );
    outln!(
        out,
        "| iptables, Cloud Foundry's final REJECT (ICMP port unreachable) | {}/{n} | {} | {} |",
        cf.len(),
        pct(&cf, 0.5),
        pct(&cf, 0.99)
    );
    outln!(
        out,
        "| eBPF, deny_action = drop | {}/{drop_n} | no answer: {timed_out}/{drop_n} waited out the client's {} ms timeout (without one, TCP retries for ~2 min) | |",
        dropped.len(),
        drop_timeout.as_millis()
    );
    if cf_timed_out > 0 {
        outln!(
            out,
            "
iptables' REJECT answers with ICMP errors, which the kernel rate-limits per destination (`net.ipv4.icmp_ratelimit`, a burst of 6 then one per second) and host-wide (`icmp_msgs_per_sec`): {cf_timed_out} of {n} connects in a row got no answer and waited out the timeout. The programs answer TCP with a RST, limited only by `rejects_per_second` per sender (unlimited here)."
        );
    }
}
