//! Cluster mode: how fast a write on one host is enforced between
//! containers on two others (Cloud Foundry's agents poll every 5 s), with
//! and without 60,000 policies in force; and how the time for one write to
//! reach every watcher grows with their number (the agent's own watch and
//! catch-up code, without a dataplane), the figure that says how this
//! scales to hundreds of hosts.

use std::{
    sync::{
        Arc, Barrier, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use integration_tests::{
    cluster::{Etcd, EtcdOptions, Underlay, hosts},
    iptables::{CfIptables, CfPolicy, CfRuleSet},
    topology::Container,
};
use policy_agent::{
    etcd::prefix_end,
    state::{Policy, Protocol, State},
    store::{Change, Store as _, etcd::EtcdStore},
};
use policy_api::Client;

use crate::{
    api::{policy, post},
    compare::{IPERF_PORT, UDP_PORT, filler, iperf_between, median, udp_pps_between},
    report::{Report, count_name, ms, outln, percentile},
    update::{PROBE_PORT, Probe, preload},
};

const POLICIES: &str = "/networking/v1/external/policies";

/// Write on host A → first probe from frontend on B to backend on C that
/// the new policy lets through, and → A's reply (committed to etcd and
/// enforced on A); `writes` times each, sorted. etcd over mutual TLS with
/// role-based access, or (`tls` false) plain HTTP without authentication.
fn cross_host(in_force: usize, writes: usize, tls: bool) -> (Vec<Duration>, Vec<Duration>) {
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start_with(&underlay, EtcdOptions { members: 1, tls });
    let cells = hosts(&mut underlay, 3, 1);
    let (frontend, backend) = (cells[1].host.container(0), cells[2].host.container(0));
    cells[1].daemon.register(frontend, "frontend");
    cells[2].daemon.register(backend, "backend");
    let client = Client::new(&cells[0].daemon.socket);
    preload(&client, in_force);
    let probe = Probe::between(frontend, backend);
    let allow = || vec![policy("frontend", "backend", "udp", PROBE_PORT)];
    // The overlay routes follow the host registry (a renewal or two).
    post(&client, POLICIES, allow());
    probe.first_arrival(Instant::now());
    let (mut times, mut replies) = (Vec::with_capacity(writes), Vec::with_capacity(writes));
    for _ in 0..writes {
        post(&client, &format!("{POLICIES}/delete"), allow());
        probe.blocked();
        let start = Instant::now();
        let (arrived, replied) = std::thread::scope(|s| {
            let write = s.spawn(|| {
                post(&client, POLICIES, allow());
                start.elapsed()
            });
            let arrived = probe.first_arrival(start);
            (arrived, write.join().expect("write"))
        });
        times.push(arrived);
        replies.push(replied);
    }
    times.sort();
    replies.sort();
    (times, replies)
}

/// One writer and `watchers` followers of the change log, each its own
/// etcd client watching the head and reading what is new, as an agent's
/// follower does: the time from a write's commit to each follower having
/// read it, over `writes` writes, sorted.
fn fan_out(watchers: usize, writes: usize) -> Vec<Duration> {
    let underlay = Underlay::new();
    let server = Etcd::start(&underlay);
    let settings = server.client_settings("root");
    let etcd = || policy_agent::etcd::Etcd::with_settings(settings.clone()).unwrap();
    let prefix = "/bench";
    let committed: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let done = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(Barrier::new(watchers + 1));
    let mut threads = Vec::new();
    for _ in 0..watchers {
        let (committed, seen, done, ready) =
            (committed.clone(), seen.clone(), done.clone(), ready.clone());
        let ns = underlay.ns.path();
        let client = etcd();
        threads.push(std::thread::spawn(move || {
            integration_tests::netns::run_in(&ns, || {
                let mut store = EtcdStore::new(client.clone(), prefix);
                store.load().unwrap();
                let key = store.watched_key();
                let from = store.position().revision + 1;
                ready.wait();
                let _ = client.watch(&key, &prefix_end(&key), from, |_| {
                    let before = store.position().seq as usize;
                    let new = store.pending().unwrap_or_default().len();
                    let now = Instant::now();
                    let committed = committed.lock().unwrap();
                    let mut seen = seen.lock().unwrap();
                    // The first write warms the connections up: not counted.
                    for seq in (before + 1..=before + new).filter(|s| *s > 1) {
                        if let Some(at) = committed.get(seq - 1) {
                            seen.push(now.saturating_duration_since(*at));
                        }
                    }
                    !done.load(Ordering::Relaxed) || store.position().seq < writes as u64
                });
            });
        }));
    }
    let ns = underlay.ns.path();
    integration_tests::netns::run_in(&ns, || {
        let mut writer = EtcdStore::new(etcd(), prefix);
        let mut state = writer.load().unwrap();
        ready.wait();
        for i in 0..writes {
            let change = Change::AddPolicies(vec![Policy {
                source: format!("app-{i}").into(),
                destination: "backend".into(),
                protocol: Protocol::Tcp,
                start: 8080,
                end: 8080,
                tls_only: false,
            }]);
            change.replay(&mut state);
            writer.append(&change, &State::default()).unwrap();
            committed.lock().unwrap().push(Instant::now());
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    done.store(true, Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while seen.lock().unwrap().len() < watchers * (writes - 1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(threads); // the watchers end with etcd
    let mut times = seen.lock().unwrap().clone();
    times.sort();
    times
}

/// Medians of `rounds` measurements of one flow from `a` to `b`: (UDP
/// packets/s, iperf3 Gbit/s).
fn medians(a: &Container, b: &Container, rounds: usize, secs: f64) -> (f64, f64) {
    let (mut pps, mut gbps) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        pps.push(udp_pps_between(&a.ns, &b.ns, b.ip, secs));
        gbps.push(iperf_between(&a.ns, &b.ns, b.ip, secs.ceil() as u32));
    }
    (median(pps), median(gbps))
}

/// One row of the sweep: policies in force, then (UDP packets/s, iperf3
/// Gbit/s) medians with this project and with Cloud Foundry's iptables.
struct SweepRow {
    policies: usize,
    ours: (f64, f64),
    iptables: (f64, f64),
}

/// Cross-host throughput through the overlay, frontend on host A to backend
/// on host B, with `counts` policies in force (the flow's own among them),
/// `rounds` measurements each, medians: this project enforcing (the
/// policies written on A, followed by B through etcd), then nothing
/// attached (the agents stopped and their programs detached; the overlay
/// stays as they left it), then Cloud Foundry's iptables rules on both
/// hosts with the same number of policies, the flow's in the middle of the
/// chain (the source's MARK travels in the same VXLAN GBP field, as with
/// silk).
fn sweep(counts: &[usize], rounds: usize, secs: f64) -> ((f64, f64), Vec<SweepRow>) {
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let mut cells = hosts(&mut underlay, 2, 1);
    cells[0].daemon.register(cells[0].host.container(0), "frontend");
    cells[1].daemon.register(cells[1].host.container(0), "backend");
    let client = Client::new(&cells[0].daemon.socket);
    let own = [("udp", UDP_PORT), ("tcp", IPERF_PORT), ("udp", PROBE_PORT)];
    post(
        &client,
        POLICIES,
        own.iter().map(|&(protocol, port)| policy("frontend", "backend", protocol, port)).collect(),
    );
    let (a, b) = (cells[0].host.container(0), cells[1].host.container(0));
    // The routes to the other host follow the registry (a renewal or two).
    let probe = Probe::between(a, b);
    probe.first_arrival(Instant::now());
    drop(probe);
    let mut ours = Vec::new();
    let mut written = own.len();
    for &n in counts {
        // Table 2's fillers: other apps to backend, ports and protocols spread.
        let fillers: Vec<u32> = (written as u32..n.max(written) as u32).collect();
        for chunk in fillers.chunks(1000) {
            let batch = chunk
                .iter()
                .map(|&i| {
                    let (_, protocol, port) = filler(i);
                    policy(&format!("src-{i}"), "backend", protocol, port)
                })
                .collect();
            post(&client, POLICIES, batch);
        }
        written = n.max(written);
        // Measured once B holds them all.
        let deadline = Instant::now() + Duration::from_secs(60);
        while cells[1].daemon.get("/v1/status")["policies"].as_u64() != Some(written as u64) {
            assert!(Instant::now() < deadline, "host B did not reach {written} policies");
            std::thread::sleep(Duration::from_millis(50));
        }
        ours.push(medians(a, b, rounds, secs));
    }
    for cell in &mut cells {
        cell.daemon.kill9();
        policy_agent::Dataplane::remove_all(cell.daemon.pin_dir()).expect("detach");
    }
    let (a, b) = (cells[0].host.container(0), cells[1].host.container(0));
    let none = medians(a, b, rounds, secs);
    let mut rules: Vec<CfIptables> =
        cells.iter().map(|c| CfIptables::install(&c.host.ns)).collect();
    let rows = counts
        .iter()
        .zip(ours)
        .map(|(&n, ours)| {
            let mut policies: Vec<CfPolicy> = (own.len() as u32..n.max(own.len()) as u32)
                .map(|i| {
                    let (source_tag, protocol, port) = filler(i);
                    CfPolicy { source_tag, destination: b.ip, protocol, start: port, end: port }
                })
                .collect();
            // The flow's own in the middle of the chain: an average walk.
            let middle = policies.len() / 2;
            for (protocol, port) in [("udp", UDP_PORT), ("tcp", IPERF_PORT)] {
                let own =
                    CfPolicy { source_tag: 1, destination: b.ip, protocol, start: port, end: port };
                policies.insert(middle, own);
            }
            let set = CfRuleSet { sources: vec![(a.ip, 1), (b.ip, 2)], policies };
            for r in &mut rules {
                r.enforce(&set);
            }
            SweepRow { policies: n, ours, iptables: medians(a, b, rounds, secs) }
        })
        .collect();
    (none, rows)
}

pub fn run(quick: bool, report: &mut Report) {
    let (writes, loaded) = if quick { (50, 10_000) } else { (200, 60_000) };
    let fan: &[usize] = if quick { &[10, 50] } else { &[10, 50, 100] };
    let empty = cross_host(0, writes, true);
    let plain = cross_host(0, writes, false);
    let full = cross_host(loaded, writes, true);
    let mut out = String::new();
    outln!(
        out,
        "\n### 7. Cluster mode\n\nA write through host A's API to the first UDP probe that the new policy lets through from frontend on host B to backend on host C (three hosts on one underlay, one etcd, probes every 50 µs through the VXLAN overlay), {writes} writes each; etcd over mutual TLS with role-based access (as the README asks operators to run it), and once over plain HTTP without authentication for what TLS costs. Cloud Foundry's agents poll the policy server every 5 s, so its figure is up to 5,000 ms plus its own rebuild. Goal: p99 ≤ 50 ms.\n"
    );
    outln!(
        out,
        "| policies in force | etcd | first packet B → C p50 | p99 | max | A's reply (etcd commit + A's kernel) p50 | p99 | max |"
    );
    outln!(out, "|---:|---|---:|---:|---:|---:|---:|---:|");
    for (n, etcd, (times, replies)) in
        [(0, "mutual TLS", &empty), (0, "plain HTTP", &plain), (loaded, "mutual TLS", &full)]
    {
        outln!(
            out,
            "| {n} | {etcd} | {} | {} | {} | {} | {} | {} |",
            ms(percentile(times, 0.5)),
            ms(percentile(times, 0.99)),
            ms(*times.last().unwrap()),
            ms(percentile(replies, 0.5)),
            ms(percentile(replies, 0.99)),
            ms(*replies.last().unwrap())
        );
    }
    outln!(
        out,
        "\nFan-out: one writer commits a change every 20 ms; N followers, each its own etcd client running the agent's follow code (watch the log's head, read what is new) without a dataplane; time from the commit to each follower having read it (the first write, which warms the connections up, not counted).\n"
    );
    outln!(out, "| followers | deliveries | p50 | p99 |");
    outln!(out, "|---:|---:|---:|---:|");
    for &n in fan {
        let times = fan_out(n, if quick { 20 } else { 50 });
        if times.is_empty() {
            outln!(out, "| {n} | 0 | - | - |");
            continue;
        }
        outln!(
            out,
            "| {n} | {} | {} | {} |",
            times.len(),
            ms(percentile(&times, 0.5)),
            ms(percentile(&times, 0.99))
        );
    }
    let (counts, rounds, secs): (&[usize], usize, f64) =
        if quick { (&[10, 1_000, 10_000], 1, 1.0) } else { (&[10, 100, 1_000, 10_000], 3, 3.0) };
    let (none, rows) = sweep(counts, rounds, secs);
    outln!(
        out,
        "\nThroughput across hosts through the VXLAN overlay (frontend on A to backend on B, one flow) with 10 to 10,000 policies in force, the flow's own among them (the others: other apps to backend, ports and protocols spread): UDP packets/s from one pinned sender, and iperf3; the median of {rounds} run(s) of {secs} s each. Ours: the policies written on A, B following them through etcd. Nothing attached: the same overlay after the agents stopped and their programs were detached. iptables: then Cloud Foundry's rules (`tests/src/iptables.rs`) on both hosts with as many policies, the flow's in the middle of the chain, the source's MARK carried in the VXLAN GBP field as with silk.\n"
    );
    outln!(out, "nothing attached: {:.0} UDP packets/s, iperf3 {:.2} Gbit/s\n", none.0, none.1);
    outln!(
        out,
        "| policies | ours UDP packets/s | iptables | ours / iptables | ours iperf3 | iptables |"
    );
    outln!(out, "|---:|---:|---:|---:|---:|---:|");
    for row in &rows {
        let ((pps, gbps), (ipt_pps, ipt_gbps)) = (row.ours, row.iptables);
        outln!(
            out,
            "| {} | {pps:.0} ({:.2}x) | {ipt_pps:.0} ({:.2}x) | {:.2} | {gbps:.2} Gbit/s ({:+.1} %) | {ipt_gbps:.2} Gbit/s ({:+.1} %) |",
            row.policies,
            pps / none.0,
            ipt_pps / none.0,
            pps / ipt_pps,
            (gbps / none.1 - 1.0) * 100.0,
            (ipt_gbps / none.1 - 1.0) * 100.0
        );
        let at = count_name(row.policies as u64);
        report.figure_vs(
            format!("cross_host_udp_pps_{at}"),
            pps,
            "packets/s",
            "iptables (Cloud Foundry rules)",
            ipt_pps,
        );
        report.figure_vs(
            format!("cross_host_iperf3_{at}_gbit_s"),
            gbps,
            "Gbit/s",
            "iptables (Cloud Foundry rules)",
            ipt_gbps,
        );
    }
    report.section(out);
}
