//! The agent at scale, measured through its API: what loading 10k to 1M
//! policies costs in time and memory, and a Cloud Foundry-sized deployment
//! (load, update latency while loaded, per-packet cost).

use std::time::{Duration, Instant};

use integration_tests::{daemon::Daemon, topology::Host};
use policy_common::{
    maps::{PairKey, proto},
    ports::Allowance,
};

use crate::{
    api::{policy, post, post_bytes},
    cf::cpu::CpuTime,
    report::{Report, count_name, ms, outln, percentile},
};
use policy_api::Client;
use serde_json::{Value, json};

pub fn run(quick: bool, report: &mut Report) {
    let counts: &[usize] = if quick { &[10_000, 100_000] } else { &[10_000, 100_000, 1_000_000] };
    let rows: Vec<Load> = counts.iter().map(|&n| load(n)).collect();
    let mut out = String::new();
    outln!(
        out,
        "\n### 5. Scale\n\nLoading policies through the agent's API (batches of 1000, distinct app pairs, one port each, the requests written out before the clock starts; agent CPU: its threads' time over the load; kernel memory: slab + vmalloc from before the agent starts to after the load, its maps and programs and every entry, per-policy counters on as by default), then {SINGLES} writes of one policy each with those in force (API round trip; more than the store's changes between snapshots, so at least one of them is due a snapshot), then restarting the agent on that state.\n"
    );
    outln!(
        out,
        "| policies | load time | agent CPU | policies/s | batch of 1000 p50 / max | one policy p50 / p99 / max | agent RSS before → after | kernel memory | stored state | restart (load state, reconcile pinned maps, serve) |"
    );
    outln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let n = count_name(r.n as u64);
        report.figure(format!("load_{n}_policies_s"), r.load_time.as_secs_f64(), "s");
        report.figure(format!("load_{n}_agent_cpu_s"), r.load_cpu.as_secs_f64(), "s");
        report.figure(format!("agent_kernel_memory_{n}_mib"), r.kernel_mib, "MiB");
        report.figure(format!("agent_rss_{n}_mib"), r.rss_after as f64 / 1024.0, "MiB");
        report.figure(format!("restart_{n}_s"), r.restart_time.as_secs_f64(), "s");
        report.figure(
            format!("batch_1000_p50_{n}_ms"),
            percentile(&r.batch_times, 0.5).as_secs_f64() * 1e3,
            "ms",
        );
        for (label, p) in [("p50", 0.5), ("p99", 0.99), ("max", 1.0)] {
            report.figure(
                format!("one_policy_write_{label}_{n}_ms"),
                percentile(&r.single_times, p).as_secs_f64() * 1e3,
                "ms",
            );
        }
        outln!(
            out,
            "| {} | {:.2} s | {:.2} s | {:.0} | {} / {} | {} / {} / {} | {} → {} MiB | {:.0} MiB | {:.1} MiB | {:.2} s |",
            r.n,
            r.load_time.as_secs_f64(),
            r.load_cpu.as_secs_f64(),
            r.n as f64 / r.load_time.as_secs_f64(),
            ms(percentile(&r.batch_times, 0.5)),
            ms(*r.batch_times.last().unwrap()),
            ms(percentile(&r.single_times, 0.5)),
            ms(percentile(&r.single_times, 0.99)),
            ms(*r.single_times.last().unwrap()),
            r.rss_before / 1024,
            r.rss_after / 1024,
            r.kernel_mib,
            r.state_bytes as f64 / (1 << 20) as f64,
            r.restart_time.as_secs_f64(),
        );
    }
    let largest = *counts.last().unwrap();
    let (pipelined, pipelined_cpu) = load_two_in_flight(largest);
    let n = count_name(largest as u64);
    report.figure(format!("load_{n}_two_in_flight_s"), pipelined.as_secs_f64(), "s");
    outln!(
        out,
        "\nThe load of {largest} with two requests in flight (two connections, each sending every other batch, as a bulk client may: one request is read and parsed while the other is written): {:.2} s ({:.0} policies/s), agent CPU {:.2} s.",
        pipelined.as_secs_f64(),
        largest as f64 / pipelined.as_secs_f64(),
        pipelined_cpu.as_secs_f64()
    );
    report.section(out);
    cloud_foundry_scale(quick, report);
}

/// A policy set shaped like Cloud Foundry's largest validated deployment:
/// 20,000 apps, 60,000 policies between random pairs, TCP mostly, ports
/// 8080, other single ports and ranges. App `i` is `cf-app-i`.
pub fn cf_policies() -> Vec<(usize, usize, &'static str, u16, u16)> {
    use rand::{Rng as _, SeedableRng as _};
    let mut rng = rand::rngs::StdRng::seed_from_u64(2_000_060_000);
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::with_capacity(60_000);
    while out.len() < 60_000 {
        let (src, dst) = (rng.random_range(0..20_000), rng.random_range(0..20_000));
        let protocol = if rng.random_bool(0.85) { "tcp" } else { "udp" };
        let (start, end) = match rng.random_range(0..100) {
            0..60 => (8080, 8080),
            60..85 => {
                let p = rng.random_range(1024..=65535);
                (p, p)
            }
            _ => {
                let start = rng.random_range(1024..=64000u16);
                (start, start + rng.random_range(1..=1000))
            }
        };
        // Apps 0 and 1 are the measured pair; keep them free.
        if src == dst || src < 2 || dst < 2 || !seen.insert((src, dst, protocol, start, end)) {
            continue;
        }
        out.push((src, dst, protocol, start, end));
    }
    out
}

fn cloud_foundry_scale(quick: bool, report: &mut Report) {
    let set = cf_policies();
    let ranges = set.iter().filter(|p| p.3 != p.4).count();
    // Through the API: load time, memory, update latency while loaded.
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "log_level = \"warn\"");
    daemon.register(host.container(0), "cf-app-0");
    daemon.register(host.container(1), "cf-app-1");
    let client = Client::new(&daemon.socket);
    let rss_before = rss_kib(daemon.pid().unwrap());
    let start = Instant::now();
    for chunk in set.chunks(1000) {
        let batch = chunk
            .iter()
            .map(|&(s, d, protocol, start, end)| {
                json!({"source": {"id": format!("cf-app-{s}")}, "destination": {"id": format!("cf-app-{d}"), "protocol": protocol, "ports": {"start": start, "end": end}}})
            })
            .collect();
        post(&client, "/networking/v1/external/policies", batch);
    }
    let load_time = start.elapsed();
    let rss_after = rss_kib(daemon.pid().unwrap());
    let (singles, batches) = if quick { (20, 2) } else { (100, 5) };
    let (single, batch) =
        crate::update::agent_latency(&host, &client, ("cf-app-0", "cf-app-1"), singles, batches);
    drop(daemon);

    // The same policies in the maps: the programs' per-packet cost.
    let row = crate::dataplane::measure("20k apps, 60k policies".into(), quick, |dataplane| {
        crate::dataplane::fill(dataplane, 0);
        let tables = dataplane.maps_mut();
        let mut pairs: std::collections::BTreeMap<PairKey, Vec<Allowance>> = Default::default();
        for (id, &(s, d, protocol, start, end)) in set.iter().enumerate() {
            let number = if protocol == "tcp" { proto::TCP } else { proto::UDP };
            // Tags 10.. for the apps; 1 and 2 are the measured A and B.
            pairs
                .entry(PairKey::new(s as u32 + 10, d as u32 + 10, number))
                .or_default()
                .push(Allowance { start, end, policy_id: id as u32 + 10 });
        }
        for (key, allowances) in pairs {
            tables.set_pair(key, &allowances).expect("fill");
        }
    });

    let mut out = String::new();
    outln!(
        out,
        "\n### 5b. A Cloud Foundry-sized deployment\n\n20,000 apps, {} policies between random app pairs ({} port ranges, the rest single ports, 85 % TCP), loaded through the API; update latency measured while they are in force; per-packet cost with the same policies in the maps.\n",
        set.len(),
        ranges
    );
    outln!(out, "| measure | value |");
    outln!(out, "|---|---:|");
    outln!(
        out,
        "| load time (API, batches of 1000) | {:.2} s ({:.0} policies/s) |",
        load_time.as_secs_f64(),
        set.len() as f64 / load_time.as_secs_f64()
    );
    outln!(out, "| agent RSS before → after | {} → {} MiB |", rss_before / 1024, rss_after / 1024);
    outln!(
        out,
        "| one policy: write → first allowed packet, p50 / p99 | {} / {} |",
        ms(percentile(&single, 0.5)),
        ms(percentile(&single, 0.99))
    );
    outln!(
        out,
        "| batch of 1000: write → first allowed packet, p50 / max | {} / {} |",
        ms(percentile(&batch, 0.5)),
        ms(*batch.last().unwrap())
    );
    report.section(out);
    let mut out = String::new();
    crate::dataplane::table(
        &mut out,
        "5c. Per-packet cost with the Cloud Foundry-sized policy set",
        "policy set",
        &[row],
        quick,
    );
    report.section(out);
}

struct Load {
    n: usize,
    load_time: Duration,
    /// The agent's CPU time over the load (its threads').
    load_cpu: Duration,
    /// Slab + vmalloc grown from before the agent started to after the load.
    kernel_mib: f64,
    batch_times: Vec<Duration>,
    /// Writes of one policy with the `n` in force, sorted.
    single_times: Vec<Duration>,
    rss_before: u64,
    rss_after: u64,
    state_bytes: u64,
    restart_time: Duration,
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches(" kB").trim().parse().unwrap_or(0))
            })
        })
        .unwrap_or(0)
}

/// The load's requests as a client holding them sends them: written out
/// before the clock starts (making them is the client's work). Batches of
/// 1000 distinct app pairs, one port each.
fn load_bodies(n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .collect::<Vec<_>>()
        .chunks(1000)
        .map(|chunk| {
            let batch: Vec<Value> = chunk
                .iter()
                .map(|i| {
                    policy(&format!("app-{}", i % 1000), &format!("dest-{}", i / 1000), "tcp", 8080)
                })
                .collect();
            json!({ "policies": batch }).to_string().into_bytes()
        })
        .collect()
}

/// The agent's config for `n` policies: room for them (and their
/// counters) past the default, as an operator configures it.
fn load_config(n: usize) -> String {
    let room = (n + SINGLES).next_power_of_two().max(1 << 18);
    format!("log_level = \"warn\"\n[capacities]\npolicies = {room}\npolicy_stats = {room}")
}

/// The same load with two requests in flight (two connections, each
/// sending every other batch), as a bulk client may: one request's body
/// is read and parsed while the other is written. Returns the load time
/// and the agent's CPU time over it.
fn load_two_in_flight(n: usize) -> (Duration, Duration) {
    let host = Host::new(1);
    let mut daemon = Daemon::start(&host.ns, &load_config(n));
    let bodies = load_bodies(n);
    let socket = daemon.socket.clone();
    let cpu_before = CpuTime::of(daemon.pid().unwrap());
    let start = Instant::now();
    std::thread::scope(|s| {
        for first in 0..2 {
            let (bodies, socket) = (&bodies, &socket);
            s.spawn(move || {
                let client = Client::new(socket);
                for body in bodies.iter().skip(first).step_by(2) {
                    post_bytes(&client, "/networking/v1/external/policies", body);
                }
            });
        }
    });
    let elapsed = start.elapsed();
    let cpu = CpuTime::of(daemon.pid().unwrap()).since(cpu_before).threads;
    daemon.stop();
    (elapsed, cpu)
}

/// One-policy writes timed after a load: more than the store's changes
/// between snapshots (1000), so that a snapshot falls among them.
const SINGLES: usize = 1200;

/// Loads `n` policies (distinct app pairs) in batches of 1000 through the
/// API, times [`SINGLES`] writes of one policy, then restarts the agent on
/// that state.
fn load(n: usize) -> Load {
    let host = Host::new(1);
    let config = load_config(n);
    // The kernel's memory as table 2c measures it, from before the agent
    // loads its programs and maps to after the last policy (counters on,
    // as by default).
    let kernel_before = crate::compare::kernel_kib();
    let mut daemon = Daemon::start(&host.ns, &config);
    let client = Client::new(&daemon.socket);
    let rss_before = rss_kib(daemon.pid().unwrap());
    let bodies = load_bodies(n);
    let cpu_before = CpuTime::of(daemon.pid().unwrap());
    let start = Instant::now();
    let mut batch_times = Vec::new();
    for body in &bodies {
        let t = Instant::now();
        post_bytes(&client, "/networking/v1/external/policies", body);
        batch_times.push(t.elapsed());
    }
    let load_time = start.elapsed();
    let load_cpu = CpuTime::of(daemon.pid().unwrap()).since(cpu_before).threads;
    let kernel_mib = (crate::compare::kernel_kib() - kernel_before) / 1024.0;
    drop(bodies);
    let rss_after = rss_kib(daemon.pid().unwrap());
    let mut single_times: Vec<Duration> = (0..SINGLES)
        .map(|i| {
            let t = Instant::now();
            post(
                &client,
                "/networking/v1/external/policies",
                vec![policy("app-0", &format!("single-{i}"), "tcp", 9000)],
            );
            t.elapsed()
        })
        .collect();
    single_times.sort();
    daemon.stop();
    // After the stop: a snapshot written in the background is complete.
    let state_bytes: u64 = std::fs::read_dir(daemon.state_dir())
        .map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    let restart = Instant::now();
    daemon.spawn();
    let restart_time = restart.elapsed();
    batch_times.sort();
    Load {
        n,
        load_time,
        load_cpu,
        kernel_mib,
        batch_times,
        single_times,
        rss_before,
        rss_after,
        state_bytes,
        restart_time,
    }
}
