//! The agent, measured through its API: how long from an API write to the
//! first packet the new policy lets through, and what loading 100k policies
//! costs in time and memory.

use std::{
    net::UdpSocket,
    time::{Duration, Instant},
};

use integration_tests::{daemon::Daemon, topology::Host};
use policy_agent::client::Client;
use serde_json::{Value, json};

fn policy(src: &str, dst: &str, protocol: &str, port: u16) -> Value {
    json!({"source": {"id": src}, "destination": {"id": dst, "protocol": protocol, "ports": {"start": port, "end": port}}})
}

fn post(client: &Client, path: &str, policies: Vec<Value>) {
    let reply =
        client.request("POST", path, Some(&json!({"policies": policies}))).expect("API request");
    assert_eq!(reply.status, 200, "{}", reply.body);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

pub fn run(quick: bool) {
    write_to_enforcement(if quick { 30 } else { 200 });
    load(if quick { 20_000 } else { 100_000 });
}

/// Repeatedly: revoke, check a probe is dropped, then time from sending the
/// allow request to the first probe that arrives (probes every 50 µs).
fn write_to_enforcement(rounds: usize) {
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "log_level = \"warn\"");
    let (a, b) = (host.container(0), host.container(1));
    for (c, app) in [(a, "frontend"), (b, "backend")] {
        daemon.register(c, app);
    }
    let client = Client::new(&daemon.socket);
    let rx = b.ns.run(|| UdpSocket::bind((b.ip, 7000))).expect("bind");
    let tx = a.ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).expect("bind");
    let allow = || vec![policy("frontend", "backend", "udp", 7000)];
    let (mut to_enforced, mut api) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 16];
    for _ in 0..rounds {
        post(&client, "/networking/v1/external/policies/delete", allow());
        rx.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        tx.send_to(b"probe", (b.ip, 7000)).unwrap();
        while rx.recv(&mut buf).is_ok() {} // drain; the probe must not arrive
        rx.set_nonblocking(true).unwrap();
        let start = Instant::now();
        let request = std::thread::scope(|s| {
            let request = s.spawn(|| {
                post(&client, "/networking/v1/external/policies", allow());
                start.elapsed()
            });
            loop {
                tx.send_to(b"probe", (b.ip, 7000)).unwrap();
                if rx.recv(&mut buf).is_ok() {
                    to_enforced.push(start.elapsed());
                    break;
                }
                assert!(start.elapsed() < Duration::from_secs(10), "the policy never took effect");
                std::thread::sleep(Duration::from_micros(50));
            }
            request.join().expect("request thread")
        });
        rx.set_nonblocking(false).unwrap();
        api.push(request);
    }
    to_enforced.sort();
    api.sort();
    println!(
        "\nAgent: API write to enforcement ({rounds} writes, one policy each; probes every 50 µs through the real veths)\n"
    );
    println!("| measure | p50 | p99 | max |");
    println!("|---|---:|---:|---:|");
    for (name, v) in [
        ("write sent → first allowed probe arrives", &to_enforced),
        ("API request round trip (reply = enforced + durable)", &api),
    ] {
        println!(
            "| {name} | {} | {} | {} |",
            ms(percentile(v, 0.5)),
            ms(percentile(v, 0.99)),
            ms(*v.last().unwrap())
        );
    }
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

/// Loads `n` policies (distinct app pairs) in batches of 1000 through the
/// API, then restarts the agent on that state.
fn load(n: usize) {
    let host = Host::new(1);
    let mut daemon = Daemon::start(&host.ns, "log_level = \"warn\"");
    let client = Client::new(&daemon.socket);
    let rss_before = rss_kib(daemon.pid().unwrap());
    let start = Instant::now();
    let mut batch_times = Vec::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(1000) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|i| {
                policy(&format!("app-{}", i % 1000), &format!("dest-{}", i / 1000), "tcp", 8080)
            })
            .collect();
        let t = Instant::now();
        post(&client, "/networking/v1/external/policies", batch);
        batch_times.push(t.elapsed());
    }
    let load_time = start.elapsed();
    let rss_after = rss_kib(daemon.pid().unwrap());
    let state_bytes: u64 = std::fs::read_dir(daemon.state_dir())
        .map(|d| d.filter_map(|e| e.ok()?.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    daemon.stop();
    let restart = Instant::now();
    daemon.spawn();
    let restart_time = restart.elapsed();
    batch_times.sort();
    println!(
        "\nAgent: loading {n} policies through the API (batches of 1000, distinct app pairs)\n"
    );
    println!("| measure | value |");
    println!("|---|---:|");
    println!(
        "| total time | {:.2} s ({:.0} policies/s) |",
        load_time.as_secs_f64(),
        n as f64 / load_time.as_secs_f64()
    );
    println!(
        "| batch of 1000, p50 / max | {} / {} |",
        ms(percentile(&batch_times, 0.5)),
        ms(*batch_times.last().unwrap())
    );
    println!("| agent RSS before → after | {} MiB → {} MiB |", rss_before / 1024, rss_after / 1024);
    println!("| stored state | {:.1} MiB |", state_bytes as f64 / (1 << 20) as f64);
    println!(
        "| restart (load state, reconcile {n} pinned entries, serve) | {:.2} s |",
        restart_time.as_secs_f64()
    );
}
