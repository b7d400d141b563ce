//! Policy update latency with policies already in force: from an API write
//! to the first packet the new policy lets through (this project's agent),
//! against the time Cloud Foundry's agent needs to rebuild its iptables
//! chain (new chain, jump, delete old) and the first packet after it.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    iptables::{CfIptables, CfPolicy, CfRuleSet},
    nftables::CfNftables,
    topology::{Container, Host},
};
use policy_api::Client;
use serde_json::Value;

use crate::{
    api::{policy, post},
    report::{Plot, Report, Series, count_name, ms, outln, percentile},
};

pub const PROBE_PORT: u16 = 7000;
const POLICIES: &str = "/networking/v1/external/policies";

/// A probe pair: A sends to B:7000; `arrived` polls for it.
pub struct Probe {
    rx: UdpSocket,
    tx: UdpSocket,
    to: (std::net::Ipv4Addr, u16),
}

impl Probe {
    fn new(host: &Host) -> Self {
        Self::between(host.container(0), host.container(1))
    }

    /// From container `a` to container `b` (on any hosts).
    pub fn between(a: &Container, b: &Container) -> Self {
        let rx = b.ns.run(|| UdpSocket::bind((b.ip, PROBE_PORT))).expect("bind");
        let tx = a.ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).expect("bind");
        Self { rx, tx, to: (b.ip, PROBE_PORT) }
    }

    /// Asserts the probe does not get through now.
    pub fn blocked(&self) {
        let mut buf = [0u8; 16];
        self.rx.set_nonblocking(false).unwrap();
        self.rx.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        self.tx.send_to(b"probe", self.to).unwrap();
        while self.rx.recv(&mut buf).is_ok() {}
    }

    /// Probes every 50 µs until one arrives; the time since `start`.
    pub fn first_arrival(&self, start: Instant) -> Duration {
        let mut buf = [0u8; 16];
        self.rx.set_nonblocking(true).unwrap();
        loop {
            self.tx.send_to(b"probe", self.to).unwrap();
            if self.rx.recv(&mut buf).is_ok() {
                return start.elapsed();
            }
            assert!(start.elapsed() < Duration::from_secs(30), "the policy never took effect");
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// `n` policies between other apps, in API batches of 1000.
pub fn preload(client: &Client, n: usize) {
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let batch = chunk
            .iter()
            .map(|i| {
                policy(&format!("src-{}", i % 1000), &format!("dst-{}", i / 1000), "tcp", 8080)
            })
            .collect();
        post(client, POLICIES, batch);
    }
}

/// The agent with `n` policies: (single write → first packet, batch of 1k
/// → first packet), each sorted.
fn ours(n: usize, singles: usize, batches: usize) -> (Vec<Duration>, Vec<Duration>) {
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "log_level = \"warn\"");
    daemon.register(host.container(0), "frontend");
    daemon.register(host.container(1), "backend");
    let client = Client::new(&daemon.socket);
    preload(&client, n);
    agent_latency(&host, &client, ("frontend", "backend"), singles, batches)
}

/// With the agent serving `client` and containers 0 and 1 registered as
/// `apps`: `singles` writes of one policy and `batches` batches of 1000,
/// each timed to the first probe the policy lets through.
pub fn agent_latency(
    host: &Host,
    client: &Client,
    apps: (&str, &str),
    singles: usize,
    batches: usize,
) -> (Vec<Duration>, Vec<Duration>) {
    let probe = Probe::new(host);
    let allow = || vec![policy(apps.0, apps.1, "udp", PROBE_PORT)];
    let mut single = Vec::new();
    for _ in 0..singles {
        post(client, &format!("{POLICIES}/delete"), allow());
        probe.blocked();
        let start = Instant::now();
        single.push(std::thread::scope(|s| {
            s.spawn(|| post(client, POLICIES, allow()));
            probe.first_arrival(start)
        }));
    }
    let mut batch = Vec::new();
    for round in 0..batches {
        post(client, &format!("{POLICIES}/delete"), allow());
        probe.blocked();
        let mut policies: Vec<Value> =
            (0..999).map(|i| policy(&format!("b{round}-{i}"), apps.1, "tcp", 9000)).collect();
        policies.push(allow().remove(0));
        let sent = policies.clone();
        let start = Instant::now();
        batch.push(std::thread::scope(|s| {
            s.spawn(|| post(client, POLICIES, sent));
            probe.first_arrival(start)
        }));
        post(client, &format!("{POLICIES}/delete"), policies);
    }
    single.sort();
    batch.sort();
    (single, batch)
}

/// `count` policies of other apps (tags from `100 + from`) to `b`, tcp/8080.
fn other_policies(b: Ipv4Addr, count: usize, from: usize) -> Vec<CfPolicy> {
    (from..from + count)
        .map(|i| CfPolicy {
            source_tag: 100 + i as u32,
            destination: b,
            protocol: "tcp",
            start: 8080,
            end: 8080,
        })
        .collect()
}

/// The probe's policy: A (tag 1) to `b`, udp/7000.
fn probe_policy(b: Ipv4Addr) -> CfPolicy {
    CfPolicy { source_tag: 1, destination: b, protocol: "udp", start: PROBE_PORT, end: PROBE_PORT }
}

/// iptables with `n` policies: (rebuild for one more policy → first packet,
/// rebuild with 1k more → first packet), each sorted.
fn iptables(n: usize, rounds: usize) -> (Vec<Duration>, Vec<Duration>) {
    let host = Host::new(2);
    let (a, b) = (host.container(0).ip, host.container(1).ip);
    let mut rules = CfIptables::install(&host.ns);
    let probe = Probe::new(&host);
    let others = |count, from| other_policies(b, count, from);
    let own = probe_policy(b);
    let base = CfRuleSet { sources: vec![(a, 1), (b, 2)], policies: others(n, 0) };
    let mut time = |extra: usize| {
        rules.enforce(&base);
        probe.blocked();
        let mut set = base.clone();
        set.policies.extend(others(extra, n));
        // The new policy's rule where Cloud Foundry's ordering would put it:
        // anywhere; the middle.
        set.policies.insert(set.policies.len() / 2, own.clone());
        let start = Instant::now();
        rules.enforce(&set);
        probe.first_arrival(start)
    };
    let mut single: Vec<Duration> = (0..rounds).map(|_| time(0)).collect();
    let mut batch: Vec<Duration> = (0..rounds).map(|_| time(999)).collect();
    single.sort();
    batch.sort();
    (single, batch)
}

/// nftables with `n` policies in its set: (one element added → first
/// packet, 1k elements added in one transaction → first packet), each
/// sorted. The added elements are deleted again between rounds.
fn nftables(n: usize, rounds: usize) -> (Vec<Duration>, Vec<Duration>) {
    let host = Host::new(2);
    let (a, b) = (host.container(0).ip, host.container(1).ip);
    let others = |count, from| other_policies(b, count, from);
    let own = probe_policy(b);
    let rules = CfNftables::install(&host.ns, &[(a, 1), (b, 2)], &others(n, 0));
    let probe = Probe::new(&host);
    let time = |extra: usize| {
        probe.blocked();
        let mut added = others(extra, n);
        added.push(own.clone());
        let start = Instant::now();
        rules.add(&added);
        let took = probe.first_arrival(start);
        rules.remove(&added);
        took
    };
    let mut single: Vec<Duration> = (0..rounds).map(|_| time(0)).collect();
    let mut batch: Vec<Duration> = (0..rounds).map(|_| time(999)).collect();
    single.sort();
    batch.sort();
    (single, batch)
}

pub fn run(quick: bool, report: &mut Report) {
    let counts: &[usize] = if quick { &[10, 1_000, 10_000] } else { &[10, 100, 1_000, 10_000] };
    // Our batches take milliseconds: enough of them for a p50 even in a
    // quick run (iptables' rebuilds at 10k take seconds each).
    let (singles, batches, rounds) = if quick { (20, 7, 2) } else { (100, 9, 5) };
    let rows: Vec<_> =
        counts.iter().map(|&n| (n, ours(n, singles, batches), iptables(n, rounds))).collect();
    let nft_rows: Vec<_> = counts.iter().map(|&n| (n, nftables(n, singles.min(20)))).collect();
    let mut out = String::new();
    outln!(
        out,
        "\n### 4. Policy update latency\n\nFrom the write to the first UDP probe the new policy lets through (probes every 50 µs through the real veths), with `policies` other policies already in force. This project: an API request to the agent (the reply means enforced and durable); {singles} single writes, {batches} batches of 1000 (the probe's policy last). iptables: Cloud Foundry's rebuild (new chain filled by `iptables-restore --noflush`, jump inserted, old jump deleted, old chain flushed and deleted), {rounds} rounds each; a batch is one rebuild with 1000 more rules. Cloud Foundry's agent also waits for its next poll of the policy server (every 5 s by default), not counted here.\n"
    );
    outln!(
        out,
        "| policies | eBPF, one policy p50 / p99 | iptables, one policy p50 / max | ratio (p50) | eBPF, batch of 1k p50 / max | iptables, batch of 1k p50 / max | ratio (p50) |"
    );
    outln!(out, "|---:|---:|---:|---:|---:|---:|---:|");
    for (n, (single, batch), (ip_single, ip_batch)) in &rows {
        outln!(
            out,
            "| {n} | {} / {} | {} / {} | {:.0}x | {} / {} | {} / {} | {:.1}x |",
            ms(percentile(single, 0.5)),
            ms(percentile(single, 0.99)),
            ms(percentile(ip_single, 0.5)),
            ms(*ip_single.last().unwrap()),
            percentile(ip_single, 0.5).as_secs_f64() / percentile(single, 0.5).as_secs_f64(),
            ms(percentile(batch, 0.5)),
            ms(*batch.last().unwrap()),
            ms(percentile(ip_batch, 0.5)),
            ms(*ip_batch.last().unwrap()),
            percentile(ip_batch, 0.5).as_secs_f64() / percentile(batch, 0.5).as_secs_f64(),
        );
    }
    outln!(
        out,
        "\nnftables (`tests/src/nftables.rs`): the policy set updated in place, one `nft -f` transaction adding the element(s) — the process start of `nft` included, as a Cloud Foundry agent shelling out to it would pay it — to the first probe through.\n"
    );
    outln!(
        out,
        "| policies | nftables, one policy p50 / max | nftables / eBPF (p50) | nftables, batch of 1k p50 / max | nftables / eBPF (p50) |"
    );
    outln!(out, "|---:|---:|---:|---:|---:|");
    for ((n, (single, batch), _), (_, (nft_single, nft_batch))) in rows.iter().zip(&nft_rows) {
        let at = count_name(*n as u64);
        let p50_ms = |v: &[Duration]| percentile(v, 0.5).as_secs_f64() * 1e3;
        report.figure_vs(
            format!("update_one_policy_p50_{at}_ms"),
            p50_ms(single),
            "ms",
            "nftables",
            p50_ms(nft_single),
        );
        report.figure_vs(
            format!("update_batch_1000_p50_{at}_ms"),
            p50_ms(batch),
            "ms",
            "nftables",
            p50_ms(nft_batch),
        );
        outln!(
            out,
            "| {n} | {} / {} | {:.1}x | {} / {} | {:.1}x |",
            ms(percentile(nft_single, 0.5)),
            ms(*nft_single.last().unwrap()),
            percentile(nft_single, 0.5).as_secs_f64() / percentile(single, 0.5).as_secs_f64(),
            ms(percentile(nft_batch, 0.5)),
            ms(*nft_batch.last().unwrap()),
            percentile(nft_batch, 0.5).as_secs_f64() / percentile(batch, 0.5).as_secs_f64(),
        );
    }
    report.section(out);
    // Which of (eBPF single, iptables single, eBPF batch, iptables batch).
    let series = |label: &str, which: usize| Series {
        label: label.to_owned(),
        points: rows
            .iter()
            .map(|(n, ours, ipt)| {
                let v = [&ours.0, &ipt.0, &ours.1, &ipt.1][which];
                (*n as f64, percentile(v, 0.5).as_secs_f64() * 1e3)
            })
            .collect(),
    };
    report.plot(Plot {
        file: "update_latency.png",
        title: "Policy update: write to first allowed packet (p50)".into(),
        x_label: "policies already in force",
        y_label: "ms",
        log_y: true,
        series: vec![
            series("eBPF agent, one policy", 0),
            series("iptables rebuild, one policy", 1),
            series("eBPF agent, batch of 1k", 2),
            series("iptables rebuild, batch of 1k", 3),
            Series {
                label: "nftables element add, one policy".into(),
                points: nft_rows
                    .iter()
                    .map(|(n, (single, _))| {
                        (*n as f64, percentile(single, 0.5).as_secs_f64() * 1e3)
                    })
                    .collect(),
            },
            Series {
                label: "nftables element add, batch of 1k".into(),
                points: nft_rows
                    .iter()
                    .map(|(n, (_, batch))| (*n as f64, percentile(batch, 0.5).as_secs_f64() * 1e3))
                    .collect(),
            },
        ],
    });
}
