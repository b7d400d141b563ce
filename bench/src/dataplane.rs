//! Per-packet cost of the programs, measured with BPF_PROG_TEST_RUN in the
//! running kernel, next to an empty TC program measured the same way in the
//! same run.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::{
    Ebpf,
    programs::{SchedClassifier, TestRun as _, TestRunOptions},
};
use integration_tests::{netns::NetNs, pins::PinDir, unique_name};

use crate::report::{Plot, Report, Series, count_name, outln};
use policy_agent::{BASELINE_OBJECT, Dataplane, Direction};
use policy_common::{
    craft::{PacketSpec, ipv6_frame, l4_header},
    maps::{PairKey, proto},
    ports::Allowance,
};

const A: [u8; 4] = [10, 255, 0, 1];
const B: [u8; 4] = [10, 255, 0, 2];
const TAG_A: u32 = 1;
const TAG_B: u32 = 2;
/// A's and B's IPv6 addresses: fd00:255::1 and fd00:255::2 (A's other
/// instances fd00:255::N:1).
const A6: [u8; 16] = [0xfd, 0, 2, 0x55, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0xfd, 0, 2, 0x55, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// Which family a table's packets are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    /// A 64-byte-class TCP frame (74 bytes for IPv6) from A's instance
    /// `instance` to B.
    fn frame(self, instance: u8, sport: u16, dport: u16) -> Vec<u8> {
        match self {
            Family::V4 => {
                let mut spec = PacketSpec::tcp(A, B, sport, dport);
                spec.src[2] = instance;
                spec.frame()
            }
            Family::V6 => {
                let mut src = A6;
                src[13] = instance;
                ipv6_frame(src, B6, proto::TCP, &[], &l4_header(proto::TCP, sport, dport))
            }
        }
    }
}

struct Costs {
    /// ns per run with `repeat` runs of one packet.
    repeated: f64,
    /// ns per run, one run per distinct packet.
    single: f64,
}

/// ns per run of `prog` on `frame`: the kernel times `repeat` runs and
/// reports the mean (net/bpf/test_run.c, bpf_test_timer_leave).
fn repeated(prog: &SchedClassifier, frame: &[u8], repeat: u32) -> f64 {
    let result = prog
        .test_run(TestRunOptions { data_in: Some(frame), repeat, ..Default::default() })
        .expect("test run");
    result.duration.as_nanos() as f64
}

/// Median over `rounds` of `repeated`, to damp a noisy shared machine.
fn median_repeated(prog: &SchedClassifier, frame: &[u8], repeat: u32, rounds: usize) -> f64 {
    let mut samples: Vec<f64> = (0..rounds).map(|_| repeated(prog, frame, repeat)).collect();
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

/// Mean kernel-timed ns of one run per distinct packet (new connections;
/// packets a program rewrites).
pub fn one_run_each(prog: &SchedClassifier, frames: &[Vec<u8>]) -> f64 {
    let total: u128 = frames
        .iter()
        .map(|frame| {
            prog.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() })
                .expect("test run")
                .duration
                .as_nanos()
        })
        .sum();
    total as f64 / frames.len() as f64
}

/// `n` distinct frames A -> B tcp/`dport`, from distinct source ports of
/// the A app's instance 10.255.`instance`.1 (then the next instances once
/// ports run out). Distinct `instance`s give distinct flows.
fn new_flow_frames(family: Family, n: usize, instance: u8, dport: u16) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| family.frame(instance + (i / 60000) as u8, (i % 60000) as u16 + 1024, dport))
        .collect()
}

/// The baseline object (an empty TC program), loaded.
pub fn baseline() -> Ebpf {
    let mut baseline = Ebpf::load(BASELINE_OBJECT).expect("load baseline");
    let empty: &mut SchedClassifier =
        baseline.program_mut("tc_baseline").expect("tc_baseline").try_into().expect("classifier");
    empty.load().expect("load tc_baseline");
    baseline
}

/// The empty program of a loaded baseline.
pub fn empty_program(baseline: &mut Ebpf) -> &mut SchedClassifier {
    baseline.program_mut("tc_baseline").expect("tc_baseline").try_into().expect("classifier")
}

/// The programs' costs with one set of maps, next to the empty program's.
pub struct Row {
    pub label: String,
    fill_time: std::time::Duration,
    empty: Costs,
    established: f64,
    denied: f64,
    new_allowed: f64,
    new_denied: f64,
    /// tc_from_container (anti-spoofing) on the same packet.
    source: f64,
}

struct Params {
    repeat: u32,
    rounds: usize,
    new_flows: usize,
}

impl Params {
    fn new(quick: bool) -> Self {
        if quick {
            Self { repeat: 200_000, rounds: 3, new_flows: 5_000 }
        } else {
            Self { repeat: 1_000_000, rounds: 5, new_flows: 20_000 }
        }
    }
}

/// Loads fresh maps with `fill` (which must register A and B and allow
/// A -> B tcp/8080-8090) and measures tc_to_container on them, and the empty
/// program on the same frames.
pub fn measure(label: String, quick: bool, fill: impl FnOnce(&mut Dataplane)) -> Row {
    measure_family(Family::V4, label, quick, fill)
}

/// [`measure`] on `family`'s packets (for IPv6, A and B and A's instances
/// are registered on IPv6 too, with the same tags).
pub fn measure_family(
    family: Family,
    label: String,
    quick: bool,
    fill: impl FnOnce(&mut Dataplane),
) -> Row {
    let p = Params::new(quick);
    let ns = NetNs::new(unique_name("bench"));
    let _in_ns = ns.enter();
    let mut baseline = baseline();
    let empty = empty_program(&mut baseline);

    let pins = PinDir::new();
    // Room for the largest table's million pairs.
    let mut dataplane = pins.open_for(1 << 20);
    let started = Instant::now();
    fill(&mut dataplane);
    let fill_time = started.elapsed();
    // Test runs see the namespace's loopback (ifindex 1) as the device: bind
    // it to A for the source side's anti-spoofing lookup.
    dataplane.maps_mut().set_veth(1, Ipv4Addr::from(A), TAG_A).expect("veth");
    if family == Family::V6 {
        let tables = dataplane.maps_mut();
        tables.set_veth6(1, Ipv6Addr::from(A6)).expect("veth6");
        tables.set_endpoint6(Ipv6Addr::from(B6), TAG_B).expect("endpoint6");
        for instance in 0..=20u8 {
            let mut addr = A6;
            addr[13] = instance;
            tables.set_endpoint6(Ipv6Addr::from(addr), TAG_A).expect("endpoint6");
        }
    }
    // The decision alone; `reporting` measures events and counters.
    dataplane
        .maps_mut()
        .set_settings(policy_agent::dataplane::kernel_settings(
            &policy_agent::dataplane::EventSettings::off(),
            &policy_agent::dataplane::DenySettings::drop(),
        ))
        .expect("settings");
    let prog = dataplane.tc_program(Direction::ToContainer);
    let established = family.frame(0, 40000, 8080);
    prog.test_run(TestRunOptions { data_in: Some(&established), ..Default::default() })
        .expect("open");
    let denied = family.frame(0, 40001, 9999);
    let frames = new_flow_frames(family, p.new_flows, 0, 8080);
    let denied_frames = new_flow_frames(family, p.new_flows, 0, 9999);
    let row = Row {
        label,
        fill_time,
        empty: Costs {
            repeated: median_repeated(empty, &established, p.repeat, p.rounds),
            single: one_run_each(empty, &frames),
        },
        established: median_repeated(prog, &established, p.repeat, p.rounds),
        denied: median_repeated(prog, &denied, p.repeat, p.rounds),
        new_allowed: one_run_each(prog, &frames),
        new_denied: one_run_each(prog, &denied_frames),
        source: median_repeated(
            dataplane.tc_program(Direction::FromContainer),
            &established,
            p.repeat,
            p.rounds,
        ),
    };
    drop(dataplane);
    row
}

/// The table of `rows` under the common explanation.
pub fn table(out: &mut String, title: &str, first_column: &str, rows: &[Row], quick: bool) {
    let Params { repeat, rounds, new_flows } = Params::new(quick);
    outln!(
        out,
        "\n### {title}\n\ntc_to_container (destination side), BPF_PROG_TEST_RUN, 64-byte TCP frames, flow events and per-policy counters off; ns per packet, (x) = ratio to the empty TC program, [+ns] = above it. Established and denied: median of {rounds} runs of {repeat} repeats (warm caches); source side: tc_from_container, which every packet leaving a container also passes (anti-spoofing: one lookup of the veth's endpoint); \"one run each\": mean over {new_flows} distinct packets, one test run (one syscall) each, caches cold as after a syscall; its floor is the empty program run the same way.\n"
    );
    outln!(
        out,
        "| {first_column} | empty | established flow | new flow, denied (full lookup) | source side (anti-spoofing) | empty, one run each | new flow denied, one run each | new flow allowed + tracked, one run each | load time |"
    );
    outln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let cell = |ns: f64, floor: f64| format!("{ns:.1} ({:.2}x) [+{:.1}]", ns / floor, ns - floor);
    for r in rows {
        outln!(
            out,
            "| {} | {:.1} | {} | {} | {} | {:.1} | {} | {} | {:.2} s |",
            r.label,
            r.empty.repeated,
            cell(r.established, r.empty.repeated),
            cell(r.denied, r.empty.repeated),
            cell(r.source, r.empty.repeated),
            r.empty.single,
            cell(r.new_denied, r.empty.single),
            cell(r.new_allowed, r.empty.single),
            r.fill_time.as_secs_f64(),
        );
    }
}

/// Per-packet cost against the number of policy entries.
pub fn run(quick: bool, report: &mut Report) {
    let counts: &[u32] =
        if quick { &[10, 1_000, 100_000] } else { &[10, 100, 1_000, 10_000, 100_000, 1_000_000] };
    let rows: Vec<Row> = counts
        .iter()
        .map(|&n| measure(n.to_string(), quick, |dataplane| fill(dataplane, n)))
        .collect();
    let mut out = String::new();
    table(
        &mut out,
        "1. Per-packet cost against the number of policies",
        "policy entries",
        &rows,
        quick,
    );
    let worst = |f: fn(&Row) -> f64| rows.iter().map(f).fold(f64::MIN, f64::max);
    outln!(
        out,
        "\nAgainst the goals (+30 ns established, +80 ns new flow over the empty program, flat to 1M): worst established +{:.1} ns, worst new-flow verdict (full lookup) +{:.1} ns.",
        worst(|r| r.established - r.empty.repeated),
        worst(|r| r.denied - r.empty.repeated),
    );
    // The same table on IPv6 packets (the same policies: tags are
    // family-agnostic), for the IPv4 rows above.
    let rows6: Vec<Row> = counts
        .iter()
        .map(|&n| measure_family(Family::V6, n.to_string(), quick, |dataplane| fill(dataplane, n)))
        .collect();
    table(
        &mut out,
        "1b. The same on IPv6 (74-byte TCP frames; A and B registered on both families)",
        "policy entries",
        &rows6,
        quick,
    );
    let established_gap = |r4: &Row, r6: &Row| {
        (r6.established - r6.empty.repeated) - (r4.established - r4.empty.repeated)
    };
    let worst_gap =
        rows.iter().zip(&rows6).map(|(r4, r6)| established_gap(r4, r6)).fold(f64::MIN, f64::max);
    report.figure("ipv6_established_minus_ipv4_ns", worst_gap, "ns");
    for (&n, (r4, r6)) in counts.iter().zip(rows.iter().zip(&rows6)) {
        let n = count_name(u64::from(n));
        for (family, r) in [("ipv4", r4), ("ipv6", r6)] {
            let over = |v: f64| v - r.empty.repeated;
            report.figure(format!("{family}_established_{n}_ns"), over(r.established), "ns");
            report.figure(format!("{family}_new_flow_denied_{n}_ns"), over(r.denied), "ns");
        }
    }
    for (r4, r6) in rows.iter().zip(&rows6) {
        outln!(
            out,
            "\n{} policies: IPv6 − IPv4 over each one's empty program: established {:+.1} ns, new flow denied {:+.1} ns, source side {:+.1} ns.",
            r4.label,
            (r6.established - r6.empty.repeated) - (r4.established - r4.empty.repeated),
            (r6.denied - r6.empty.repeated) - (r4.denied - r4.empty.repeated),
            (r6.source - r6.empty.repeated) - (r4.source - r4.empty.repeated),
        );
    }
    ranges(quick, &mut out, report);
    report.section(out);
    let series = |label: &str, f: fn(&Row) -> f64| Series {
        label: label.to_owned(),
        points: counts.iter().zip(&rows).map(|(&n, r)| (f64::from(n), f(r))).collect(),
    };
    report.plot(Plot {
        file: "per_packet.png",
        title: "Per-packet cost vs policies (BPF_PROG_TEST_RUN)".into(),
        x_label: "policy entries",
        y_label: "ns per packet",
        log_y: false,
        series: vec![
            series("empty program", |r| r.empty.repeated),
            series("established flow", |r| r.established),
            series("new flow, full lookup (denied)", |r| r.denied),
            series("source side (anti-spoofing)", |r| r.source),
            series("new flow allowed + tracked (one syscall each)", |r| r.new_allowed),
            series("empty program (one syscall each)", |r| r.empty.single),
        ],
    });
}

/// Where a pair's ranges live, and what a new flow costs there: A -> B
/// holding 1 and 2 ranges (in its `POLICIES` value), 4 (`PORT_SETS`) and 40
/// (`PORT_SETS_WIDE`), among 100k pairs (10k quick).
fn ranges(quick: bool, out: &mut String, report: &mut Report) {
    let n = if quick { 10_000 } else { 100_000 };
    let layouts = [
        (1u16, "1 (POLICIES)"),
        (2, "2 (POLICIES)"),
        (4, "4 (PORT_SETS)"),
        (40, "40 (PORT_SETS_WIDE)"),
    ];
    let rows: Vec<Row> = layouts
        .iter()
        .map(|&(k, label)| {
            measure(label.to_owned(), quick, |dataplane| {
                fill(dataplane, n);
                // More single ports, away from the frames' 8080 and 9999.
                for i in 1..k {
                    let port = 20_000 + 10 * i;
                    let allow =
                        Allowance { start: port, end: port, policy_id: 1_000_000 + u32::from(i) };
                    dataplane
                        .maps_mut()
                        .allow(PairKey::new(TAG_A, TAG_B, proto::TCP), allow)
                        .expect("range");
                }
            })
        })
        .collect();
    table(
        out,
        &format!("1c. A pair's ranges where they live ({n} pairs)"),
        "A -> B ranges",
        &rows,
        quick,
    );
    for (r, (k, _)) in rows.iter().zip(layouts) {
        let over = |v: f64| v - r.empty.repeated;
        report.figure(format!("ipv4_new_flow_denied_{k}_ranges_ns"), over(r.denied), "ns");
        report.figure(
            format!("ipv4_new_flow_allowed_{k}_ranges_ns"),
            r.new_allowed - r.empty.single,
            "ns",
        );
    }
}

/// Registers A and B and writes `policies` pair entries, one of which
/// allows A -> B tcp/8080; the others are between other apps.
pub fn fill(dataplane: &mut Dataplane, policies: u32) {
    let tables = dataplane.maps_mut();
    tables.set_endpoint(Ipv4Addr::from(A), TAG_A).expect("endpoint");
    tables.set_endpoint(Ipv4Addr::from(B), TAG_B).expect("endpoint");
    for i in 0..u16::MAX {
        // The A app has many instances: 10.255.<i>.1 for new-flow packets.
        let mut addr = A;
        addr[2] = i as u8;
        if i > 20 {
            break;
        }
        tables.set_endpoint(Ipv4Addr::from(addr), TAG_A).expect("endpoint");
    }
    tables
        .allow(
            PairKey::new(TAG_A, TAG_B, proto::TCP),
            Allowance { start: 8080, end: 8090, policy_id: 1 },
        )
        .expect("allow");
    for i in 1..policies {
        let key = PairKey::new(1000 + i / 1000, 1000 + i % 1000, proto::TCP);
        let port = (i % 60000) as u16 + 1;
        tables
            .set_pair(key, &[Allowance { start: port, end: port, policy_id: i + 1 }])
            .expect("fill");
    }
}

/// The cost of reporting: flow events and per-policy counters on versus off,
/// on the same dataplane, in the same run.
pub fn reporting(quick: bool, report: &mut Report) {
    let mut out = String::new();
    use policy_agent::dataplane::EventSettings;
    let (repeat, rounds, new_flows) =
        if quick { (200_000, 3, 5_000) } else { (1_000_000, 5, 20_000) };
    let ns = NetNs::new(unique_name("bench"));
    let _in_ns = ns.enter();
    let pins = PinDir::new();
    let mut dataplane = pins.open();
    fill(&mut dataplane, 10_000);
    let mut ring = dataplane.take_flow_events().expect("ring buffer");
    let mut drain = || while ring.next().is_some() {};
    let established = PacketSpec::tcp(A, B, 40000, 8080).frame();
    let denied = PacketSpec::tcp(A, B, 40001, 9999).frame();
    let mut rows = Vec::new();
    for (label, settings, instance) in
        [("off", EventSettings::off(), 1u8), ("on", EventSettings::default(), 2)]
    {
        dataplane
            .maps_mut()
            .set_settings(policy_agent::dataplane::kernel_settings(
                &settings,
                &policy_agent::dataplane::DenySettings::drop(),
            ))
            .expect("settings");
        let prog = dataplane.tc_program(Direction::ToContainer);
        prog.test_run(TestRunOptions { data_in: Some(&established), ..Default::default() })
            .expect("open");
        drain();
        let est = median_repeated(prog, &established, repeat, rounds);
        // The same denied packet over and over: past the first 100 events
        // of the second, every run takes the rate-limited path (a flood).
        let flood = median_repeated(prog, &denied, repeat, rounds);
        drain();
        let frames = new_flow_frames(Family::V4, new_flows, instance, 8080);
        let new = one_run_each(prog, &frames);
        drain();
        rows.push((label, est, flood, new));
    }
    let stats = dataplane.maps().event_stats().expect("event stats");
    outln!(
        out,
        "\n### Reporting cost\n\n10k policies: flow events and per-policy counters off vs on, ns per packet\n"
    );
    outln!(
        out,
        "| reporting | established flow (policy counter) | denied flood (rate-limited events) | new allowed flow + event, one run each |"
    );
    outln!(out, "|---|---:|---:|---:|");
    let (_, e0, f0, n0) = rows[0];
    for (label, e, f, n) in &rows {
        outln!(
            out,
            "| {label} | {e:.1} ({:+.1}) | {f:.1} ({:+.1}) | {n:.1} ({:+.1}) |",
            e - e0,
            f - f0,
            n - n0
        );
    }
    outln!(
        out,
        "\nevents emitted {}, rate-limited {}, lost {}",
        stats.emitted,
        stats.rate_limited,
        stats.lost
    );
    report.section(out);
}
