//! Real traffic between two container namespaces, three ways in the same
//! run: no filtering at all, this project's programs, and Cloud Foundry's
//! iptables rule set holding the same policies. UDP packets per second a
//! single pinned sender gets through, the latency of a small TCP exchange on
//! a new connection, and iperf3 TCP throughput.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    iptables::{CfIptables, CfPolicy, CfRuleSet},
    netns::NetNs,
    nftables::CfNftables,
    pins::PinDir,
    topology::Host,
};
use policy_agent::{Dataplane, Direction};
use policy_common::{
    maps::{PairKey, proto},
    ports::Allowance,
};

use crate::report::{Plot, Report, Series, outln, percentile};

pub const TAG_A: u32 = 1;
pub const TAG_B: u32 = 2;
pub const UDP_PORT: u16 = 5201;
const RR_PORT: u16 = 5202;
pub const IPERF_PORT: u16 = 5203;
/// The policies A -> B the traffic needs; the rest are between other apps.
const OWN: [(&str, u16); 3] = [("udp", UDP_PORT), ("tcp", RR_PORT), ("tcp", IPERF_PORT)];

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    None,
    Ours,
    Iptables,
    Nftables,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::None => "no filtering",
            Mode::Ours => "eBPF (this project)",
            Mode::Iptables => "iptables (Cloud Foundry rules)",
            Mode::Nftables => "nftables (one set lookup)",
        }
    }
}

/// Two containers, A (client) and B (server), enforced one of four ways
/// with `policies` policies, A's own among them.
pub struct Setup {
    host: Host,
    pub(crate) pins: Option<(PinDir, Dataplane)>,
    /// The empty program, attached where ours go (a control for the hooks'
    /// own cost).
    empty: Option<aya::Ebpf>,
    /// How long loading the policies took (nftables: the `nft -f` run),
    /// and the kernel memory it added, MiB (nftables).
    pub(crate) load: Duration,
    pub(crate) load_mib: f64,
}

/// The filler policies: other apps' sources to B's address, ports spread
/// (the cross-host sweep's too).
pub(crate) fn filler(i: u32) -> (u32, &'static str, u16) {
    (100 + i, if i.is_multiple_of(2) { "tcp" } else { "udp" }, 10_000 + (i % 50_000) as u16)
}

impl Setup {
    pub fn new(mode: Mode, policies: u32) -> Self {
        Self::on(Host::new(2), mode, policies)
    }

    /// [`Self::new`] with A and B dual-stack (their IPv6 addresses
    /// registered too, with the same tags).
    pub fn dual_stack(mode: Mode, policies: u32) -> Self {
        Self::on(Host::dual_stack(2), mode, policies)
    }

    fn on(host: Host, mode: Mode, policies: u32) -> Self {
        let fillers = policies.saturating_sub(OWN.len() as u32);
        let (a, b) = (host.container(0).ip, host.container(1).ip);
        let (mut load, mut load_mib) = (Duration::ZERO, 0.0);
        let pins = match mode {
            Mode::None => None,
            Mode::Ours => {
                // Measured as nftables' is: the maps, the programs and
                // every entry, from before the load to the last policy.
                let (before, started) = (kernel_kib(), Instant::now());
                let pins = PinDir::new();
                let mut dataplane = pins.open_for(policies);
                for (i, tag) in [(0, TAG_A), (1, TAG_B)] {
                    host.register(&mut dataplane, i, tag);
                    let c = host.container(i);
                    if let Some(ipv6) = c.ipv6 {
                        let tables = dataplane.maps_mut();
                        tables.set_endpoint6(ipv6, tag).expect("endpoint6");
                        tables.set_veth6(host.ifindex(&c.host_ifname), ipv6).expect("veth6");
                    }
                }
                let tables = dataplane.maps_mut();
                for i in 0..fillers {
                    let (tag, protocol, port) = filler(i);
                    let number = if protocol == "tcp" { proto::TCP } else { proto::UDP };
                    tables
                        .set_pair(
                            PairKey::new(tag, TAG_B, number),
                            &[Allowance { start: port, end: port, policy_id: i + 10 }],
                        )
                        .expect("fill");
                }
                for (id, (protocol, port)) in OWN.iter().enumerate() {
                    let number = if *protocol == "tcp" { proto::TCP } else { proto::UDP };
                    tables
                        .allow(
                            PairKey::new(TAG_A, TAG_B, number),
                            Allowance { start: *port, end: *port, policy_id: id as u32 + 1 },
                        )
                        .expect("allow");
                }
                load = started.elapsed();
                load_mib = (kernel_kib() - before) / 1024.0;
                Some((pins, dataplane))
            }
            Mode::Iptables => {
                let mut set = CfRuleSet {
                    sources: vec![(a, TAG_A), (b, TAG_B)],
                    policies: (0..fillers)
                        .map(|i| {
                            let (source_tag, protocol, port) = filler(i);
                            CfPolicy {
                                source_tag,
                                destination: b,
                                protocol,
                                start: port,
                                end: port,
                            }
                        })
                        .collect(),
                };
                // A's policies in the middle of the chain: an average walk.
                let middle = set.policies.len() / 2;
                for (protocol, port) in OWN {
                    set.policies.insert(
                        middle,
                        CfPolicy {
                            source_tag: TAG_A,
                            destination: b,
                            protocol,
                            start: port,
                            end: port,
                        },
                    );
                }
                CfIptables::install(&host.ns).enforce(&set);
                None
            }
            Mode::Nftables => {
                let policy = |source_tag, protocol, port| CfPolicy {
                    source_tag,
                    destination: b,
                    protocol,
                    start: port,
                    end: port,
                };
                let mut policies: Vec<CfPolicy> = (0..fillers)
                    .map(|i| {
                        let (tag, protocol, port) = filler(i);
                        policy(tag, protocol, port)
                    })
                    .collect();
                policies.extend(OWN.iter().map(|&(protocol, port)| policy(TAG_A, protocol, port)));
                // The table stays in the namespace; the handle is not needed.
                let (before, started) = (kernel_kib(), Instant::now());
                CfNftables::install(&host.ns, &[(a, TAG_A), (b, TAG_B)], &policies);
                load = started.elapsed();
                load_mib = (kernel_kib() - before) / 1024.0;
                None
            }
        };
        Self { host, pins, empty: None, load, load_mib }
    }

    /// The empty TC program on both veths' ingress and egress: the hooks
    /// this project's programs use, running nothing.
    pub fn attach_empty(&mut self) {
        let mut baseline = crate::dataplane::baseline();
        let program = crate::dataplane::empty_program(&mut baseline);
        let _in_host = self.host.ns.enter();
        for c in &self.host.containers {
            for hook in [aya::programs::TcAttachType::Ingress, aya::programs::TcAttachType::Egress]
            {
                program.attach(&c.host_ifname, hook).expect("attach the empty program");
            }
        }
        self.empty = Some(baseline);
    }

    /// How this project's programs answer denied packets (Mode::Ours).
    pub fn set_deny(&mut self, deny: policy_agent::dataplane::DenySettings) {
        self.set_settings(&policy_agent::dataplane::EventSettings::default(), &deny);
    }

    /// What this project's programs report and count, and how they deny.
    pub fn set_settings(
        &mut self,
        events: &policy_agent::dataplane::EventSettings,
        deny: &policy_agent::dataplane::DenySettings,
    ) {
        let (_, dataplane) = self.pins.as_mut().expect("this project's programs");
        let settings = policy_agent::dataplane::kernel_settings(events, deny);
        dataplane.maps_mut().set_settings(settings).expect("settings");
    }

    /// This project's dataplane (Mode::Ours).
    pub fn dataplane_mut(&mut self) -> &mut Dataplane {
        &mut self.pins.as_mut().expect("this project's programs").1
    }

    /// The empty program, if attached.
    pub fn empty_mut(&mut self) -> Option<&mut aya::Ebpf> {
        self.empty.as_mut()
    }

    pub fn a(&self) -> &NetNs {
        &self.host.container(0).ns
    }

    pub fn b(&self) -> (&NetNs, Ipv4Addr) {
        let b = self.host.container(1);
        (&b.ns, b.ip)
    }

    /// B's IPv6 address ([`Self::dual_stack`] only).
    pub fn b6(&self) -> Option<std::net::Ipv6Addr> {
        self.host.container(1).ipv6
    }
}

pub fn pin_to_cpu(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu % crate::machine::cpus(), &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// Datagrams per second B receives from one sender in A pinned to CPU 0
/// (the receiver on CPU 1), over `secs`.
pub(crate) fn udp_pps(setup: &Setup, secs: f64) -> f64 {
    let (b_ns, b_ip) = setup.b();
    udp_pps_between(setup.a(), b_ns, b_ip, secs)
}

/// Datagrams per second `b_ns` receives at `b_ip` from one sender in
/// `a_ns` pinned to CPU 0 (the receiver on CPU 1), over `secs`.
pub fn udp_pps_between(a_ns: &NetNs, b_ns: &NetNs, b_ip: Ipv4Addr, secs: f64) -> f64 {
    let rx = b_ns.run(|| UdpSocket::bind((b_ip, UDP_PORT))).expect("bind receiver");
    rx.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    let tx = a_ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).expect("bind sender");
    tx.connect((b_ip, UDP_PORT)).expect("connect");
    let (stop, received) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicU64::new(0)));
    let receiver = {
        let (stop, received) = (stop.clone(), received.clone());
        std::thread::spawn(move || {
            pin_to_cpu(1);
            let mut buf = [0u8; 64];
            while !stop.load(Ordering::Relaxed) {
                if rx.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };
    let counted = received.clone();
    let sender = std::thread::spawn(move || {
        pin_to_cpu(0);
        let send_until = |deadline: Instant| {
            let mut sent = 0;
            while Instant::now() < deadline {
                sent += send_batch(&tx);
            }
            sent
        };
        send_until(Instant::now() + Duration::from_millis(200)); // warm-up
        let (before, start) = (counted.load(Ordering::Relaxed), Instant::now());
        let sent = send_until(start + Duration::from_secs_f64(secs));
        (before, start.elapsed().as_secs_f64(), sent)
    });
    let (before, elapsed, _sent) = sender.join().expect("sender");
    std::thread::sleep(Duration::from_millis(50));
    let got = received.load(Ordering::Relaxed) - before;
    stop.store(true, Ordering::Relaxed);
    receiver.join().expect("receiver");
    got as f64 / elapsed
}

/// Sends 64 32-byte datagrams with one sendmmsg call on a connected
/// socket: the sender's own per-packet cost kept small, so the path's shows.
fn send_batch(socket: &UdpSocket) -> usize {
    use std::os::fd::AsRawFd as _;
    const BATCH: usize = 64;
    let mut payload = [0x5au8; 32];
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    // SAFETY: zeroed mmsghdrs are valid (no name, no control); each points
    // at the one iovec, which outlives the call.
    unsafe {
        let mut msgs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
        for m in &mut msgs {
            m.msg_hdr.msg_iov = &mut iov;
            m.msg_hdr.msg_iovlen = 1;
        }
        libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0).max(0) as usize
    }
}

/// B's request/response server: one exchange per connection, in order.
fn rr_server(ns: &NetNs, ip: Ipv4Addr) -> Arc<AtomicBool> {
    let listener = ns.run(|| TcpListener::bind((ip, RR_PORT))).expect("bind rr server");
    listener.set_nonblocking(true).expect("nonblocking");
    let stop = Arc::new(AtomicBool::new(false));
    let done = stop.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 32];
        while !done.load(Ordering::Relaxed) {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    if s.read_exact(&mut buf).is_ok() {
                        let _ = s.write_all(&buf);
                    }
                }
                Err(_) => std::thread::sleep(Duration::from_micros(50)),
            }
        }
    });
    stop
}

/// Latencies of `n` exchanges: connect, send 32 bytes, read 32 back, close.
fn tcp_rr(setup: &Setup, n: usize) -> Vec<Duration> {
    let (b_ns, b_ip) = setup.b();
    let stop = rr_server(b_ns, b_ip);
    let mut samples = setup.a().run(|| {
        let mut samples = Vec::with_capacity(n);
        let mut buf = [0u8; 32];
        for i in 0..n + 20 {
            let start = Instant::now();
            let mut s = TcpStream::connect((b_ip, RR_PORT)).expect("connect");
            s.set_nodelay(true).expect("nodelay");
            s.write_all(&[7u8; 32]).expect("request");
            s.read_exact(&mut buf).expect("response");
            drop(s);
            if i >= 20 {
                samples.push(start.elapsed()); // past the warm-up
            }
        }
        samples
    });
    stop.store(true, Ordering::Relaxed);
    samples.sort();
    samples
}

/// iperf3 TCP throughput A -> B over `secs`, in Gbit/s.
fn iperf(setup: &Setup, secs: u32) -> f64 {
    let (b_ns, b_ip) = setup.b();
    iperf_between(setup.a(), b_ns, b_ip, secs)
}

/// iperf3 TCP throughput from `a_ns` to `b_ip` in `b_ns`, Gbit/s.
pub fn iperf_between(a_ns: &NetNs, b_ns: &NetNs, b_ip: Ipv4Addr, secs: u32) -> f64 {
    let mut server = b_ns
        .command("iperf3")
        .args(["-s", "-1", "-B", &b_ip.to_string(), "-p", &IPERF_PORT.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    std::thread::sleep(Duration::from_millis(300));
    let out = a_ns
        .command("iperf3")
        .args(["-c", &b_ip.to_string(), "-p", &IPERF_PORT.to_string()])
        .args(["-t", &secs.to_string(), "-J"])
        .output()
        .expect("iperf3 client");
    let _ = server.wait();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    json["end"]["sum_received"]["bits_per_second"].as_f64().expect("iperf3 result") / 1e9
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

pub fn run(quick: bool, report: &mut Report) {
    let counts: &[u32] = if quick { &[10, 1_000, 10_000] } else { &[10, 100, 1_000, 10_000] };
    let (secs, exchanges, rounds) = if quick { (1.0, 300, 1) } else { (3.0, 2_000, 3) };
    let modes = [Mode::None, Mode::Ours, Mode::Iptables, Mode::Nftables];
    struct Point {
        pps: [f64; 4],
        p50: [Duration; 4],
        p99: [Duration; 4],
    }
    let mut points = Vec::new();
    for &n in counts {
        let setups: Vec<Setup> = modes.iter().map(|&m| Setup::new(m, n)).collect();
        // Modes interleaved, medians over rounds: drift hits all alike.
        let mut pps = [vec![], vec![], vec![], vec![]];
        for _ in 0..rounds {
            for (i, s) in setups.iter().enumerate() {
                pps[i].push(udp_pps(s, secs));
            }
        }
        let latency: Vec<Vec<Duration>> = setups.iter().map(|s| tcp_rr(s, exchanges)).collect();
        points.push(Point {
            pps: pps.map(median),
            p50: [0, 1, 2, 3].map(|i| percentile(&latency[i], 0.5)),
            p99: [0, 1, 2, 3].map(|i| percentile(&latency[i], 0.99)),
        });
    }

    let mut out = String::new();
    outln!(
        out,
        "\n### 2. Against iptables and nftables, real traffic\n\nTwo container namespaces joined to a host namespace by veth pairs (silk layout); the same policies enforced by this project's TC programs (default settings: flow events and per-policy counters on), by Cloud Foundry's iptables rules (`iptables-legacy`: per source container a MARK rule, per destination and policy an ACCEPT rule on address, protocol, port range and mark, conntrack for replies, a final REJECT; the measured flows' rules in the middle of the chain), by nftables as an expert would write them (`tests/src/nftables.rs`: a map from source address to mark, one concatenated-range set `mark . daddr . l4proto . dport` matched in one rule, conntrack for replies, a final reject), or not at all. One UDP sender pinned to CPU 0 sends 32-byte datagrams as fast as it can (sendmmsg, 64 per call) for {secs} s (median of {rounds}); the receiver on CPU 1 counts what arrives. TCP: {exchanges} exchanges, each a new connection (connect, 32 bytes each way, close).\n"
    );
    outln!(
        out,
        "| policies | UDP pkt/s, no filtering | UDP pkt/s, eBPF | UDP pkt/s, iptables | UDP pkt/s, nftables | eBPF / iptables | eBPF / nftables | µs added per packet, eBPF / iptables / nftables | TCP exchange p50 / p99, no filtering | eBPF | iptables | nftables |"
    );
    outln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    // What enforcement adds to each packet's time on the sender's CPU.
    let added = |pps: f64, none: f64| 1e6 / pps - 1e6 / none;
    let us = |d: Duration| format!("{:.0}", d.as_secs_f64() * 1e6);
    for (&n, p) in counts.iter().zip(&points) {
        outln!(
            out,
            "| {n} | {:.0} | {:.0} ({:.2}x) | {:.0} ({:.2}x) | {:.0} ({:.2}x) | **{:.1}x** | **{:.2}x** | {:+.2} / {:+.2} / {:+.2} | {} / {} µs | {} / {} µs | {} / {} µs | {} / {} µs |",
            p.pps[0],
            p.pps[1],
            p.pps[1] / p.pps[0],
            p.pps[2],
            p.pps[2] / p.pps[0],
            p.pps[3],
            p.pps[3] / p.pps[0],
            p.pps[1] / p.pps[2],
            p.pps[1] / p.pps[3],
            added(p.pps[1], p.pps[0]),
            added(p.pps[2], p.pps[0]),
            added(p.pps[3], p.pps[0]),
            us(p.p50[0]),
            us(p.p99[0]),
            us(p.p50[1]),
            us(p.p99[1]),
            us(p.p50[2]),
            us(p.p99[2]),
            us(p.p50[3]),
            us(p.p99[3]),
        );
    }
    outln!(
        out,
        "\n(x) = ratio to no filtering in the same run. µs added per packet = 1/rate - 1/rate without filtering: the time enforcement adds on the sender's CPU (noisy where it is small; the per-packet table above measures the programs precisely)."
    );
    report.section(out);
    let series = |mode: usize, f: &dyn Fn(&Point, usize) -> f64| Series {
        label: modes[mode].name().to_owned(),
        points: counts.iter().zip(&points).map(|(&n, p)| (f64::from(n), f(p, mode))).collect(),
    };
    report.plot(Plot {
        file: "udp_pps.png",
        title: "UDP packets/s through, one pinned sender".into(),
        x_label: "policies",
        y_label: "packets per second",
        log_y: true,
        series: (0..4).map(|m| series(m, &|p, m| p.pps[m])).collect(),
    });
    let mut latency_series = Vec::new();
    for (m, mode) in modes.iter().enumerate() {
        let mut s = series(m, &|p, m| p.p50[m].as_secs_f64() * 1e6);
        s.label = format!("{} p50", mode.name());
        latency_series.push(s);
        let mut s = series(m, &|p, m| p.p99[m].as_secs_f64() * 1e6);
        s.label = format!("{} p99", mode.name());
        latency_series.push(s);
    }
    report.plot(Plot {
        file: "tcp_latency.png",
        title: "TCP exchange on a new connection: latency".into(),
        x_label: "policies",
        y_label: "µs",
        log_y: true,
        series: latency_series,
    });

    throughput(quick, report);
}

/// Where real traffic's added time per packet goes: the same UDP stream
/// with no program, the empty program on the same hooks (what the hooks
/// cost), this project's programs with nothing reported or counted, and
/// with the default reporting; the differences, medians of interleaved
/// rounds.
pub fn gap(quick: bool, report: &mut Report) {
    use policy_agent::dataplane::{DenySettings, EventSettings};
    let (secs, rounds) = if quick { (1.0, 3) } else { (2.0, 9) };
    let mut empty = Setup::new(Mode::None, 10);
    empty.attach_empty();
    let mut quiet = Setup::new(Mode::Ours, 10);
    quiet.set_settings(&EventSettings::off(), &DenySettings::default());
    let setups = [Setup::new(Mode::None, 10), empty, quiet, Setup::new(Mode::Ours, 10)];
    let mut ns = [vec![], vec![], vec![], vec![]];
    for _ in 0..rounds {
        for (i, s) in setups.iter().enumerate() {
            ns[i].push(1e9 / udp_pps(s, secs));
        }
    }
    // Per round, each step's cost over the one before it (the rounds'
    // setups ran back to back, so drift hits them alike).
    let step = |i: usize| median((0..rounds).map(|r| ns[i][r] - ns[i - 1][r]).collect());
    let total = median((0..rounds).map(|r| ns[3][r] - ns[0][r]).collect());
    let spread = {
        let mut totals: Vec<f64> = (0..rounds).map(|r| ns[3][r] - ns[0][r]).collect();
        totals.sort_by(f64::total_cmp);
        (totals[0], totals[rounds - 1])
    };
    // The programs' own time on this traffic, as the kernel counts it: one
    // more round with BPF run-time statistics on (they cost each run two
    // clock reads, so the rounds above ran without them).
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF run-time stats");
    for s in &setups {
        udp_pps(s, secs);
    }
    drop(stats);
    let per_run = |info: aya::programs::ProgramInfo| {
        (info.run_time().as_nanos() as f64 / info.run_count().max(1) as f64, info.run_count())
    };
    let mut setups = setups;
    let empty = setups[1].empty.as_mut().expect("the empty program");
    let empty_run = per_run(crate::dataplane::empty_program(empty).info().expect("info"));
    let ours_runs = |s: &Setup| {
        let (_, dataplane) = s.pins.as_ref().expect("ours");
        [Direction::FromContainer, Direction::ToContainer]
            .map(|d| per_run(dataplane.tc_program(d).info().expect("info")))
    };
    let (quiet_runs, default_runs) = (ours_runs(&setups[2]), ours_runs(&setups[3]));
    let mut out = String::new();
    outln!(
        out,
        "\n### 2b. Where real traffic's added time goes\n\nThe UDP stream of table 2 (10 policies, one pinned sender, 32-byte datagrams) {rounds} times over, {secs} s each, the four set-ups interleaved: no program; the empty TC program attached where ours go (ingress and egress of both host-side veths, TCX); this project's programs with flow events and per-policy counters off; and with them on (the default). Each packet meets two programs (the source side where it leaves A, the destination side where it enters B). Medians of the per-round differences, ns per packet on the sender's CPU:\n"
    );
    outln!(out, "| step | ns added per packet |");
    outln!(out, "|---|---:|");
    outln!(out, "| the hooks themselves (empty program, vs none) | {:+.0} |", step(1));
    outln!(out, "| the programs' work (nothing reported or counted, vs empty) | {:+.0} |", step(2));
    outln!(
        out,
        "| flow events and per-policy counters (default, vs nothing reported) | {:+.0} |",
        step(3)
    );
    outln!(
        out,
        "| total, default vs none (range over rounds) | {total:+.0} ({:+.0} … {:+.0}) |",
        spread.0,
        spread.1
    );
    outln!(
        out,
        "\nThe programs' own run time on the same traffic, as the kernel counts it (one more round with BPF run-time statistics on; each run then also pays two clock reads):\n"
    );
    outln!(out, "| program | ns per run | runs |");
    outln!(out, "|---|---:|---:|");
    outln!(out, "| empty program (per hook) | {:.0} | {} |", empty_run.0, empty_run.1);
    for (label, runs) in [("nothing reported", quiet_runs), ("default", default_runs)] {
        for (hook, (ns, count)) in ["tc_from_container", "tc_to_container"].iter().zip(runs) {
            outln!(out, "| {hook}, {label} | {ns:.0} | {count} |");
        }
    }
    let over_empty = |(ns, _): (f64, u64)| ns - empty_run.0;
    outln!(
        out,
        "\nPer packet (one run of each program): {:.0} ns in the default programs against {:.0} ns in two empty ones: the source side adds {:+.0} ns, the destination side {:+.0} ns, of which reporting (default vs nothing reported, both programs) {:+.0} ns. In BPF_PROG_TEST_RUN (table 1: source side, established flow) the same code costs far less over the empty program: there one packet repeats with every line it touches in cache; between two packets of real traffic the kernel's own path (~5 µs) runs, and the maps' lines are cold again. The packets/s differences above move by more than that from round to round on this machine.",
        default_runs[0].0 + default_runs[1].0,
        2.0 * empty_run.0,
        over_empty(default_runs[0]),
        over_empty(default_runs[1]),
        default_runs[0].0 + default_runs[1].0 - quiet_runs[0].0 - quiet_runs[1].0
    );
    report.section(out);
}

/// iperf3 over the veth pair: no program, ours, iptables with 1k policies.
fn throughput(quick: bool, report: &mut Report) {
    let (secs, rounds) = if quick { (2, 1) } else { (5, 3) };
    let modes = [Mode::None, Mode::Ours, Mode::Iptables, Mode::Nftables];
    let setups: Vec<Setup> = modes.iter().map(|&m| Setup::new(m, 1_000)).collect();
    let mut gbits = [vec![], vec![], vec![], vec![]];
    for _ in 0..rounds {
        for (i, s) in setups.iter().enumerate() {
            gbits[i].push(iperf(s, secs));
        }
    }
    let gbits = gbits.map(median);
    let mut out = String::new();
    outln!(
        out,
        "\n### 3. Throughput\n\niperf3 TCP A -> B over the veth pair, {secs} s per run, modes interleaved, median of {rounds}; 1k policies for each enforcer.\n"
    );
    outln!(out, "| enforcement | Gbit/s | vs no filtering |");
    outln!(out, "|---|---:|---:|");
    for (m, g) in modes.iter().zip(gbits) {
        outln!(out, "| {} | {g:.2} | {:+.1} % |", m.name(), (g / gbits[0] - 1.0) * 100.0);
    }
    report.section(out);
}

/// Kernel memory in use outside page caches: slab plus vmalloc (nftables'
/// large set tables are vmalloc'd), KiB, from /proc/meminfo.
pub(crate) fn kernel_kib() -> f64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("meminfo");
    let field = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0.0)
    };
    field("Slab:") + field("VmallocUsed:")
}
