//! Many concurrent flows: the established path with and without the per-CPU
//! flow cache, on real traffic that interleaves thousands of connections
//! over both CPUs, judged by the kernel's own run-time count of the
//! destination-side program.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use policy_agent::{Direction, dataplane::kernel_settings};
use policy_common::{
    Reason,
    maps::{FLOW_CACHE_SETS, FLOW_CACHE6_SETS, FlowSet, FlowSet6, PairKey, proto, settings},
    ports::Allowance,
};

use crate::{
    compare::{Mode, Setup, TAG_A, TAG_B, median, pin_to_cpu},
    report::{Report, count_name, outln},
};

/// The destination ports the flows go to (one flow per port and sender).
const FIRST_PORT: u16 = 10_000;

/// One measured set-up: the empty program, ours without the cache, ours
/// with it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Run {
    Empty,
    NoCache,
    Cache,
}

pub fn run(quick: bool, report: &mut Report) {
    let counts: &[usize] = if quick { &[2, 1_000, 10_000] } else { &[2, 1_000, 10_000, 50_000] };
    let (secs, rounds) = if quick { (1.0, 3) } else { (2.0, 5) };
    let mut out = String::new();
    outln!(
        out,
        "\n### 2d. Many concurrent flows: the established path and the flow cache\n\nThe set-up of table 2 (10 policies) and one more policy letting A reach B on UDP ports {FIRST_PORT}–{}. Two senders in A, pinned to CPU 0 and CPU 1, each send 32-byte datagrams round-robin over its half of the flows (one destination port per flow): consecutive packets on a CPU belong to different flows, and a flow's next packet comes after every other flow's on that CPU. Every flow is opened before the measurement, so every measured packet is established. Per round ({secs} s), interleaved: the empty TC program, ours with the per-CPU flow cache switched off (`CONNTRACK` alone), ours with it (the default), {rounds} rounds; ns per run of the destination-side program as the kernel counts it (BPF run-time statistics on; each run also pays two clock reads), medians. Hit rate: established packets the cache answered (1 − fills / established packets). The same over IPv6 (A and B dual-stack, the same 32-byte datagrams), where `FLOW_CACHE6` answers before the full parse and `CONNTRACK6` stands behind it.\n",
        FIRST_PORT as usize + counts.iter().max().unwrap_or(&0) - 1
    );
    outln!(
        out,
        "| family | flows | empty program | without cache [+ns over empty] | with cache [+ns over empty] | cache saves | hit rate | fills pushing out a live flow |"
    );
    outln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime).expect("BPF run-time stats");
    for (v6, &flows) in [false, true].into_iter().flat_map(|v6| counts.iter().map(move |n| (v6, n)))
    {
        let family = if v6 { "ipv6" } else { "ipv4" };
        let new_setup = |mode| if v6 { Setup::dual_stack(mode, 10) } else { Setup::new(mode, 10) };
        let mut empty = new_setup(Mode::None);
        empty.attach_empty();
        let mut ours = new_setup(Mode::Ours);
        let last = FIRST_PORT + u16::try_from(flows - 1).expect("flows fit the port range");
        ours.dataplane_mut()
            .maps_mut()
            .allow(
                PairKey::new(TAG_A, TAG_B, proto::UDP),
                Allowance { start: FIRST_PORT, end: last, policy_id: 99 },
            )
            .expect("allow the flows");
        // Open every flow (the first packet of each is a new connection).
        send(&ours, v6, flows, 0.3);
        let mut ns: [Vec<f64>; 3] = [vec![], vec![], vec![]];
        let (mut hits, mut established, mut evictions) = (0u64, 0u64, 0u64);
        for _ in 0..rounds {
            for run in [Run::Empty, Run::NoCache, Run::Cache] {
                let setup = if run == Run::Empty { &mut empty } else { &mut ours };
                if run != Run::Empty {
                    set_cache(setup, run == Run::Cache);
                }
                let before = counters(setup, v6);
                send(setup, v6, flows, secs);
                let after = counters(setup, v6);
                let runs = (after.runs - before.runs).max(1);
                ns[run as usize].push((after.run_ns - before.run_ns) as f64 / runs as f64);
                if run == Run::Cache {
                    let packets = after.established - before.established;
                    established += packets;
                    hits += packets.saturating_sub(after.fills - before.fills);
                    evictions += after.evictions - before.evictions;
                }
            }
        }
        let [e, off, on] = ns.map(median);
        let hit_rate = 100.0 * hits as f64 / established.max(1) as f64;
        outln!(
            out,
            "| {family} | {flows} | {e:.0} | {off:.0} [{:+.0}] | {on:.0} [{:+.0}] | {:.0} ns | {hit_rate:.1} % | {evictions} |",
            off - e,
            on - e,
            off - on,
        );
        let n = count_name(flows as u64);
        report.figure(format!("flow_cache_hit_rate_{family}_{n}_flows_pct"), hit_rate, "%");
        report.figure(format!("flow_cache_saves_{family}_{n}_flows_ns"), off - on, "ns");
    }
    drop(stats);
    let (sets, sets6) = (FLOW_CACHE_SETS, FLOW_CACHE6_SETS);
    outln!(
        out,
        "\nThe IPv4 cache is {sets} two-way sets per CPU ({} connections, {} KiB per CPU), the IPv6 one {sets6} ({} connections, {} KiB); a flow misses when two other flows of its CPU share its set, which round-robin traffic over about as many flows per CPU as there are sets makes common. A miss costs more than no cache (the set is read, then `CONNTRACK`, then the set written).",
        2 * sets,
        sets as usize * size_of::<FlowSet>() / 1024,
        2 * sets6,
        sets6 as usize * size_of::<FlowSet6>() / 1024
    );
    report.section(out);
}

#[derive(Default)]
struct Counters {
    run_ns: u64,
    runs: u64,
    established: u64,
    fills: u64,
    evictions: u64,
}

/// The destination-side program's run-time count (the empty program's
/// for the empty set-up), and the established packets and cache fills.
fn counters(setup: &mut Setup, v6: bool) -> Counters {
    if let Some(empty) = setup.empty_mut() {
        let info = crate::dataplane::empty_program(empty).info().expect("info");
        return Counters {
            run_ns: info.run_time().as_nanos() as u64,
            runs: info.run_count(),
            ..Counters::default()
        };
    }
    let dataplane = setup.dataplane_mut();
    let info = dataplane.tc_program(Direction::ToContainer).info().expect("info");
    let maps = dataplane.maps();
    let count = |r| maps.verdict_count(r).expect("verdicts");
    let stats = maps.flow_cache_stats().expect("flow cache stats");
    let (fills, evictions) =
        if v6 { (stats.fills6, stats.evictions6) } else { (stats.fills, stats.evictions) };
    Counters {
        run_ns: info.run_time().as_nanos() as u64,
        runs: info.run_count(),
        established: count(Reason::Established) + count(Reason::Reply),
        fills,
        evictions,
    }
}

fn set_cache(setup: &mut Setup, on: bool) {
    use policy_agent::dataplane::{DenySettings, EventSettings};
    let mut wanted = kernel_settings(&EventSettings::default(), &DenySettings::default());
    if !on {
        wanted.flags &= !settings::FLOW_CACHE;
    }
    setup.dataplane_mut().maps_mut().set_settings(wanted).expect("settings");
}

/// Two senders in A (CPU 0 and CPU 1), each round-robin over its half of
/// `flows` destination ports on B (its IPv6 address if `v6`), for `secs`.
fn send(setup: &Setup, v6: bool, flows: usize, secs: f64) {
    let b_ip: IpAddr = if v6 { setup.b6().expect("dual stack").into() } else { setup.b().1.into() };
    let any: IpAddr = if v6 { Ipv6Addr::UNSPECIFIED.into() } else { Ipv4Addr::UNSPECIFIED.into() };
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..2)
        .map(|cpu| {
            let socket = setup.a().run(move || UdpSocket::bind((any, 0))).expect("bind sender");
            let ports: Vec<u16> =
                (0..flows).filter(|i| i % 2 == cpu).map(|i| FIRST_PORT + i as u16).collect();
            let stop = stop.clone();
            std::thread::spawn(move || {
                pin_to_cpu(cpu);
                let mut next = 0;
                while !stop.load(Ordering::Relaxed) {
                    send_batch(&socket, b_ip, &ports, &mut next);
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs_f64(secs));
    stop.store(true, Ordering::Relaxed);
    for sender in senders {
        sender.join().expect("sender");
    }
}

/// 64 datagrams with one sendmmsg call, each to the next port in turn.
fn send_batch(socket: &UdpSocket, to: IpAddr, ports: &[u16], next: &mut usize) {
    use std::os::fd::AsRawFd as _;
    const BATCH: usize = 64;
    let mut payload = [0x5au8; 32];
    let mut iov = libc::iovec { iov_base: payload.as_mut_ptr().cast(), iov_len: payload.len() };
    // SAFETY: zeroed socket addresses and mmsghdrs are valid; each header
    // points at its address and the one iovec, which outlive the call.
    unsafe {
        let mut addrs: [libc::sockaddr_in6; BATCH] = std::mem::zeroed();
        let mut msgs: [libc::mmsghdr; BATCH] = std::mem::zeroed();
        for (i, (addr, msg)) in addrs.iter_mut().zip(msgs.iter_mut()).enumerate() {
            let port = ports[(*next + i) % ports.len()].to_be();
            msg.msg_hdr.msg_namelen = match to {
                IpAddr::V4(v4) => {
                    let addr = (addr as *mut libc::sockaddr_in6).cast::<libc::sockaddr_in>();
                    (*addr).sin_family = libc::AF_INET as u16;
                    (*addr).sin_port = port;
                    (*addr).sin_addr = libc::in_addr { s_addr: u32::from_ne_bytes(v4.octets()) };
                    size_of::<libc::sockaddr_in>() as u32
                }
                IpAddr::V6(v6) => {
                    addr.sin6_family = libc::AF_INET6 as u16;
                    addr.sin6_port = port;
                    addr.sin6_addr = libc::in6_addr { s6_addr: v6.octets() };
                    size_of::<libc::sockaddr_in6>() as u32
                }
            };
            msg.msg_hdr.msg_name = (addr as *mut libc::sockaddr_in6).cast();
            msg.msg_hdr.msg_iov = &mut iov;
            msg.msg_hdr.msg_iovlen = 1;
        }
        libc::sendmmsg(socket.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0);
    }
    *next = (*next + BATCH) % ports.len();
}
