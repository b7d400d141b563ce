//! `BENCH_ONLY=soak`: a cell's churn on one host for minutes (not part of
//! the tests). Containers come and go through `policy-cni` (ADD and DEL),
//! policies are added and removed through the API, and UDP between random
//! containers is checked against the policies in force all along. Every
//! so often it prints each map's entries, the agent's RSS and open
//! descriptors; at the end, with every container and policy gone, what
//! each map still holds (it should be nothing). `SOAK_SECONDS` sets the
//! length (default 300, 60 with `--quick`).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use integration_tests::{
    cni::{Plugin, cni_bin, result_ip},
    daemon::Daemon,
    netns::NetNs,
    traffic::{udp_echo_works, udp_socket},
    unique_name,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use serde_json::{Value, json};

use crate::report::{Report, outln};

const APPS: usize = 6;
const PORTS: [u16; 3] = [9000, 9001, 9002];
const MOST_CONTAINERS: usize = 10;
const POLICIES: &str = "/networking/v1/external/policies";

/// A container ADDed through the plugin, with a UDP echo server on each of
/// [`PORTS`] (stopped when the container goes).
struct Container {
    id: String,
    app: usize,
    ip: Ipv4Addr,
    ns: NetNs,
    stop: Arc<AtomicBool>,
    echoes: Vec<JoinHandle<()>>,
}

fn echo(ns: &NetNs, ip: Ipv4Addr, port: u16, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    let socket = ns.run(move || UdpSocket::bind((ip, port))).expect("bind echo");
    socket.set_read_timeout(Some(Duration::from_millis(100))).expect("timeout");
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((n, from)) = socket.recv_from(&mut buf) {
                let _ = socket.send_to(&buf[..n], from);
            }
        }
    })
}

fn policy(src: usize, dst: usize, port: u16) -> Value {
    json!({"source": {"id": format!("app-{src}")}, "destination": {"id": format!("app-{dst}"), "protocol": "udp", "ports": {"start": port, "end": port}}})
}

/// `/proc/PID/status` VmRSS, MiB, and the open descriptors.
fn rss_and_fds(pid: u32) -> (f64, usize) {
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")?.trim().trim_end_matches(" kB").trim().parse::<f64>().ok()
            })
        })
        .unwrap_or(0.0);
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
    (rss / 1024.0, fds)
}

/// Each map's entries as `status` reports them.
fn map_entries(daemon: &Daemon) -> BTreeMap<String, u64> {
    let status = daemon.get("/v1/status");
    status["maps"]
        .as_array()
        .map(|maps| {
            maps.iter()
                .filter_map(|m| Some((m["name"].as_str()?.to_owned(), m["entries"].as_u64()?)))
                .collect()
        })
        .unwrap_or_default()
}

pub fn run(quick: bool, report: &mut Report) {
    let secs: u64 = std::env::var("SOAK_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(if quick { 60 } else { 300 });
    let host = NetNs::new(unique_name("soak"));
    host.sysctl("net.ipv4.ip_forward", "1");
    let daemon = Daemon::start(&host, "log_level = \"warn\"");
    let pid = daemon.pid().expect("agent pid");
    let bin = cni_bin();
    let plugin = Plugin { bin: &bin, cni_path: "/usr/lib/cni" };
    let conf = |app: usize| {
        json!({
            "cniVersion": "1.0.0", "name": "soak-net", "type": "policy-cni",
            "agent_socket": daemon.socket, "data_dir": daemon.dir.join("cni"),
            "runtimeConfig": {"metadata": {"policy_group_id": format!("app-{app}")}}
        })
    };
    let mut rng = StdRng::seed_from_u64(0x50a6);
    let mut live: Vec<Container> = Vec::new();
    let mut in_force: BTreeSet<(usize, usize, u16)> = BTreeSet::new();
    let (mut adds, mut dels, mut writes, mut checks, mut mismatches) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut out = String::new();
    outln!(
        out,
        "\n### Soak: a cell's churn on one host\n\n{secs} s on one host: containers ADDed and DELeted through `policy-cni` (at most {MOST_CONTAINERS} at once, {APPS} apps), UDP policies between them added and removed through the API, and after every step a UDP datagram between two random containers checked against the policies in force (allowed: echoed; otherwise: refused). Every map's entries as `status` reports them, the agent's RSS and open descriptors over time; at the end, with every container and policy gone, what each map still holds.\n"
    );
    outln!(
        out,
        "| s | ADD / DEL | policy writes | checks (mismatches) | RSS MiB | descriptors | map entries (nonzero) |"
    );
    outln!(out, "|---:|---:|---:|---:|---:|---:|---|");
    let row = |out: &mut String, t: u64, counts: (u64, u64, u64, u64, u64)| {
        let (rss, fds) = rss_and_fds(pid);
        let maps: Vec<String> = map_entries(&daemon)
            .into_iter()
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| format!("{name} {n}"))
            .collect();
        let (a, d, w, c, m) = counts;
        outln!(
            out,
            "| {t} | {a} / {d} | {w} | {c} ({m}) | {rss:.1} | {fds} | {} |",
            maps.join(", ")
        );
        (rss, fds)
    };
    let (rss_start, fds_start) = row(&mut out, 0, (0, 0, 0, 0, 0));
    let started = Instant::now();
    let every = Duration::from_secs(secs.div_ceil(10).max(5));
    let mut next_row = every;
    while started.elapsed() < Duration::from_secs(secs) {
        match rng.random_range(0..3) {
            // A container comes (or, at the most, the oldest goes first).
            0 => {
                if live.len() >= MOST_CONTAINERS {
                    let c = live.remove(0);
                    let o = plugin.run(
                        &host,
                        "DEL",
                        &c.id,
                        Some(&c.ns.path()),
                        "eth0",
                        "",
                        &conf(c.app),
                    );
                    assert!(o.ok, "DEL: {} {}", o.out, o.stderr);
                    c.stop.store(true, Ordering::Relaxed);
                    c.echoes.into_iter().for_each(|e| e.join().expect("echo"));
                    dels += 1;
                }
                let (id, app) = (unique_name("c"), rng.random_range(0..APPS));
                let ns = NetNs::new(unique_name("sc"));
                let o = plugin.run(&host, "ADD", &id, Some(&ns.path()), "eth0", "", &conf(app));
                assert!(o.ok, "ADD: {} {}", o.out, o.stderr);
                let ip = result_ip(&o.out);
                let stop = Arc::new(AtomicBool::new(false));
                let echoes = PORTS.iter().map(|&p| echo(&ns, ip, p, stop.clone())).collect();
                live.push(Container { id, app, ip, ns, stop, echoes });
                adds += 1;
            }
            // A policy comes or goes.
            _ => {
                let p = (
                    rng.random_range(0..APPS),
                    rng.random_range(0..APPS),
                    PORTS[rng.random_range(0..PORTS.len())],
                );
                let body = json!({"policies": [policy(p.0, p.1, p.2)]}).to_string();
                let path = if in_force.remove(&p) {
                    format!("{POLICIES}/delete")
                } else {
                    in_force.insert(p);
                    POLICIES.to_owned()
                };
                let (status, reply) = daemon.curl("POST", &path, Some(&body));
                assert_eq!(status, 200, "{path}: {reply}");
                writes += 1;
            }
        }
        if live.len() >= 2 {
            let i = rng.random_range(0..live.len());
            let j = (i + rng.random_range(1..live.len())) % live.len();
            let (from, to) = (&live[i], &live[j]);
            let port = PORTS[rng.random_range(0..PORTS.len())];
            let allowed = in_force.contains(&(from.app, to.app, port));
            let socket = udp_socket(&from.ns, None);
            let passed = udp_echo_works(&socket, to.ip, port, 32, Duration::from_millis(300));
            checks += 1;
            if passed != allowed {
                mismatches += 1;
            }
        }
        if started.elapsed() >= next_row {
            let t = started.elapsed().as_secs();
            row(&mut out, t, (adds, dels, writes, checks, mismatches));
            next_row += every;
        }
    }
    // Everything goes.
    for c in live.drain(..) {
        let o = plugin.run(&host, "DEL", &c.id, Some(&c.ns.path()), "eth0", "", &conf(c.app));
        assert!(o.ok, "DEL: {} {}", o.out, o.stderr);
        c.stop.store(true, Ordering::Relaxed);
        c.echoes.into_iter().for_each(|e| e.join().expect("echo"));
        dels += 1;
    }
    let all: Vec<Value> = in_force.iter().map(|p| policy(p.0, p.1, p.2)).collect();
    if !all.is_empty() {
        let body = json!({ "policies": all }).to_string();
        let (status, reply) = daemon.curl("POST", &format!("{POLICIES}/delete"), Some(&body));
        assert_eq!(status, 200, "{reply}");
    }
    std::thread::sleep(Duration::from_secs(2));
    let t = started.elapsed().as_secs();
    let (rss_end, fds_end) = row(&mut out, t, (adds, dels, writes, checks, mismatches));
    let left: u64 = map_entries(&daemon).values().sum();
    outln!(
        out,
        "\nAfter everything was removed: {left} map entries left (every map should be empty), RSS {rss_start:.1} → {rss_end:.1} MiB, descriptors {fds_start} → {fds_end}; {mismatches} of {checks} checks disagreed with the policies in force."
    );
    report.figure("soak_checks", checks as f64, "checks");
    report.figure("soak_mismatches", mismatches as f64, "checks");
    report.figure("soak_map_entries_left", left as f64, "entries");
    report.figure("soak_rss_growth_mib", rss_end - rss_start, "MiB");
    report.figure("soak_descriptor_growth", fds_end as f64 - fds_start as f64, "descriptors");
    report.section(out);
}
