//! The CNI plugin against the reference plugins (`ptp` + `host-local`, what
//! a runtime uses without policy) in the same run: ADD and DEL latency, and
//! with podman the time from `podman run` to the container's first packet
//! reaching a server (ours: allowed by a policy).

use std::{
    net::{Ipv4Addr, TcpListener},
    path::Path,
    sync::mpsc,
    time::{Duration, Instant},
};

use integration_tests::{
    cni::{Plugin, Podman, cni_bin, result_ip},
    daemon::Daemon,
    netns::NetNs,
};
use serde_json::{Value, json};

use crate::report::{Report, outln, percentile};

/// The `p` quantile of `v`, sorted in place first.
fn quantile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(v, p)
}

/// ADD then DEL `n` times (a fresh namespace each): the ms each took.
fn add_del(host: &NetNs, plugin: &Plugin, config: &Value, n: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut adds, mut dels) = (Vec::new(), Vec::new());
    for i in 0..n {
        let ns = NetNs::new(integration_tests::unique_name("b"));
        let id = format!("bench-{i}");
        let started = Instant::now();
        let o = plugin.run(host, "ADD", &id, Some(&ns.path()), "eth0", "", config);
        adds.push(started.elapsed().as_secs_f64() * 1e3);
        assert!(o.ok, "ADD: {} {}", o.out, o.stderr);
        let started = Instant::now();
        let o = plugin.run(host, "DEL", &id, Some(&ns.path()), "eth0", "", config);
        dels.push(started.elapsed().as_secs_f64() * 1e3);
        assert!(o.ok, "DEL: {} {}", o.out, o.stderr);
    }
    (adds, dels)
}

/// A server in `ns` at `ip:port` that reports when each connection arrives.
fn first_packet_server(ns: &NetNs, ip: Ipv4Addr, port: u16) -> mpsc::Receiver<Instant> {
    let listener = ns.run(move || TcpListener::bind((ip, port))).expect("bind");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stream.is_err() || tx.send(Instant::now()).is_err() {
                return;
            }
        }
    });
    rx
}

/// `podman run --rm` of a container on `network` that connects to
/// `to:8080`: ms from the start of `podman run` to the server's accept.
fn run_to_first_packet(
    podman: &Podman,
    network: &str,
    to: Ipv4Addr,
    arrived: &mpsc::Receiver<Instant>,
    n: usize,
) -> Vec<f64> {
    (0..n)
        .map(|i| {
            while arrived.try_recv().is_ok() {}
            let name = format!("first-{i}");
            let mut args = podman.run_args_on(network, &name, "frontend");
            args.insert(3, "--rm".into());
            let script = format!("printf x | nc -w 2 {to} 8080");
            args.extend(["/bin/sh", "-c", &script].map(String::from));
            let started = Instant::now();
            let (ok, out) = podman.run(&args.iter().map(String::as_str).collect::<Vec<_>>());
            assert!(ok, "podman run on {network}: {out}");
            let at = arrived.recv_timeout(Duration::from_secs(5)).expect("the connection arrived");
            (at - started).as_secs_f64() * 1e3
        })
        .collect()
}

pub fn run(quick: bool, report: &mut Report) {
    let mut out = String::new();
    let host = NetNs::new(integration_tests::unique_name("h"));
    host.sysctl("net.ipv4.ip_forward", "1");
    let daemon = Daemon::start(&host, "log_level = \"warn\"");
    let n = if quick { 10 } else { 50 };
    let ours = json!({
        "cniVersion": "1.0.0", "name": "bench-net", "type": "policy-cni",
        "agent_socket": daemon.socket, "data_dir": daemon.dir.join("cni"),
        "runtimeConfig": {"metadata": {"policy_group_id": "bench"}}
    });
    let reference = json!({
        "cniVersion": "1.0.0", "name": "ref-net", "type": "ptp",
        "ipam": {"type": "host-local", "subnet": "10.66.0.0/16", "dataDir": daemon.dir.join("ref")}
    });
    let (mut our_add, mut our_del) =
        add_del(&host, &Plugin { bin: &cni_bin(), cni_path: "/usr/lib/cni" }, &ours, n);
    let (mut ref_add, mut ref_del) = add_del(
        &host,
        &Plugin { bin: Path::new("/usr/lib/cni/ptp"), cni_path: "/usr/lib/cni" },
        &reference,
        n,
    );
    outln!(
        out,
        "\n### 8. The CNI plugin\n\n`policy-cni` (veth, lease, routes, registration with the agent, programs attached) against the reference `ptp` + `host-local` plugins (no policy), {n} ADD + DEL each, one at a time\n"
    );
    outln!(out, "| measure | policy-cni | ptp + host-local | ratio |");
    outln!(out, "|---|---:|---:|---:|");
    for (what, ours, theirs) in
        [("ADD", &mut our_add, &mut ref_add), ("DEL", &mut our_del, &mut ref_del)]
    {
        for (label, p) in [("p50", 0.5), ("p99", 0.99)] {
            let (a, b) = (quantile(ours, p), quantile(theirs, p));
            let name = format!("cni_{}_{label}_ms", what.to_lowercase());
            report.figure_vs(name, a, "ms", "ptp + host-local", b);
            outln!(out, "| {what} {label} (ms) | {a:.1} | {b:.1} | {:.2} |", a / b);
        }
    }

    // podman: from `podman run` to the first packet at a server.
    let podman = Podman::new(&host, &daemon.socket);
    let reference_net = podman.add_reference_network();
    let backend_ns = NetNs::new(integration_tests::unique_name("c"));
    let mut backend_conf = ours.clone();
    backend_conf["runtimeConfig"]["metadata"]["policy_group_id"] = json!("backend");
    let plugin = Plugin { bin: &cni_bin(), cni_path: "/usr/lib/cni" };
    let o =
        plugin.run(&host, "ADD", "backend", Some(&backend_ns.path()), "eth0", "", &backend_conf);
    assert!(o.ok, "{}", o.out);
    let backend_ip = result_ip(&o.out);
    let arrived = first_packet_server(&backend_ns, backend_ip, 8080);
    daemon.allow("frontend", "backend", "tcp", "8080");
    let runs = if quick { 3 } else { 10 };
    let mut ours_ms = run_to_first_packet(&podman, &podman.network, backend_ip, &arrived, runs);
    let mut ref_ms = run_to_first_packet(&podman, &reference_net, backend_ip, &arrived, runs);
    let (a, b) = (quantile(&mut ours_ms, 0.5), quantile(&mut ref_ms, 0.5));
    report.figure_vs("podman_run_first_packet_p50_ms", a, "ms", "ptp + host-local", b);
    outln!(
        out,
        "\n`podman run --rm` (runc, busybox root) of a container that connects to a server on this host: ms from the start of `podman run` to the server's accept, p50 of {runs}\n"
    );
    outln!(
        out,
        "| measure | policy-cni (allowed by a policy) | ptp + host-local (no policy) | ratio |"
    );
    outln!(out, "|---|---:|---:|---:|");
    outln!(
        out,
        "| podman run → first packet at the server, p50 (ms) | {a:.0} | {b:.0} | {:.2} |",
        a / b
    );
    let _ =
        plugin.run(&host, "DEL", "backend", Some(&backend_ns.path()), "eth0", "", &backend_conf);
    report.section(out);
}
