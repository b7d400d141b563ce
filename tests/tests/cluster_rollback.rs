//! etcd's change log going back (a backup restored) or vanishing (etcd on
//! an empty data directory) under two hosts with real containers and real
//! traffic: enforcement stays as the hosts last applied it — a revoked
//! policy stays denied, a restarted agent keeps its containers attached,
//! policed and in its subnet — writes are refused naming the cause, both
//! hosts report it (cluster status, /metrics), and `cluster republish` on
//! the most advanced host brings every host to the newest state with
//! writes working again.

use std::{net::Ipv4Addr, time::Duration};

use integration_tests::{
    cluster::{ClusterHost, Etcd, Underlay},
    daemon::Daemon,
    eventually, require_root,
    topology::Host,
    traffic::{LONG, SHORT, tcp_echo_server, tcp_echo_works},
};
use serde_json::{Value, json};

const POLICIES: &str = "/networking/v1/external/policies";
const REPUBLISH: &str = "/v1/cluster/republish";
/// Where each host's agent serves /metrics (in its own namespace).
const METRICS: &str = "http://127.0.0.1:9100/metrics";

/// Hosts `cell-0` and `cell-1` (10.255.0.0/24 and 10.255.1.0/24), each
/// with a frontend (container 0) and a backend (container 1) whose echo
/// servers listen on every port the tests use, and an agent serving
/// /metrics.
fn two_hosts(underlay: &mut Underlay) -> Vec<ClusterHost> {
    (0..2)
        .map(|i| {
            let host = Host::with_subnet(2, i);
            let address = underlay.join(&host);
            let name = format!("cell-{i}");
            let config = format!(
                "metrics_listen = \"127.0.0.1:9100\"\n{}",
                underlay.cluster_config(&name, address)
            );
            let daemon = Daemon::start(&host.ns, &config);
            let cell = ClusterHost { daemon, host, name, underlay: address };
            let backend = cell.host.container(1);
            cell.daemon.register(cell.host.container(0), "frontend");
            cell.daemon.register(backend, "backend");
            for port in [6000, 7000, 8080, 9000] {
                tcp_echo_server(&backend.ns, backend.ip, port);
            }
            cell
        })
        .collect()
}

/// Two hosts on a new etcd, both enforcing frontend → backend on 8080 and
/// 9000 (written on `cell-0`).
fn allowing_8080_and_9000() -> (Underlay, Etcd, Vec<ClusterHost>) {
    require_root();
    let mut underlay = Underlay::new();
    let etcd = Etcd::start(&underlay);
    let cells = two_hosts(&mut underlay);
    cells[0].daemon.allow("frontend", "backend", "tcp", "8080");
    cells[0].daemon.allow("frontend", "backend", "tcp", "9000");
    assert!(eventually(LONG, || {
        enforced_everywhere(&cells, 8080, true) && enforced_everywhere(&cells, 9000, true)
    }));
    (underlay, etcd, cells)
}

fn backend(h: &ClusterHost) -> Ipv4Addr {
    h.host.container(1).ip
}

/// Whether `h`'s frontend reaches `to` on `port`.
fn reaches(h: &ClusterHost, to: Ipv4Addr, port: u16) -> bool {
    tcp_echo_works(&h.host.container(0).ns, to, port, SHORT)
}

/// Whether frontend → backend on `port` is allowed everywhere (`true`) or
/// denied everywhere (`false`): on each host and across the two.
fn enforced_everywhere(cells: &[ClusterHost], port: u16, allowed: bool) -> bool {
    let (a, b) = (&cells[0], &cells[1]);
    [(a, backend(a)), (b, backend(b)), (a, backend(b)), (b, backend(a))]
        .into_iter()
        .all(|(from, to)| reaches(from, to, port) == allowed)
}

fn policy(port: u16) -> String {
    json!({"policies": [{"source": {"id": "frontend"},
        "destination": {"id": "backend", "protocol": "tcp", "ports": {"start": port, "end": port}}}]})
    .to_string()
}

fn status(h: &ClusterHost) -> Value {
    h.daemon.get("/v1/cluster")
}

/// `policy_cluster_log_diverged{cause}` on `h`'s /metrics.
fn diverged_metric(h: &ClusterHost, cause: &str) -> Option<f64> {
    let out = h.host.ns.command("curl").args(["-s", "-f", METRICS]).output().expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let name = format!("policy_cluster_log_diverged{{cause=\"{cause}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(&name)?.trim().parse().ok())
}

/// The change every host has applied, once all agree with etcd's newest.
fn settled(cells: &[ClusterHost]) -> u64 {
    let mut seq = 0;
    assert!(
        eventually(LONG, || {
            let s = status(&cells[0]);
            seq = s["newest"]["seq"].as_u64().unwrap_or(0);
            let hosts = s["hosts"].as_array().cloned().unwrap_or_default();
            hosts.len() == cells.len()
                && hosts.iter().all(|h| h["applied_seq"] == seq && h["lag"] == 0)
        }),
        "the hosts did not settle: {}",
        status(&cells[0])
    );
    seq
}

/// Waits until `h` reports the log diverged by `cause` — in cluster status
/// (with the change it applied and how far ahead of etcd it is) and in
/// /metrics — and returns the message.
fn reports_divergence(h: &ClusterHost, cause: &str, applied: u64, ahead: u64) -> String {
    assert!(
        eventually(Duration::from_secs(10), || status(h)["diverged"]["cause"] == cause),
        "{} does not report {cause}: {}",
        h.name,
        status(h)
    );
    let s = status(h);
    assert_eq!(s["applied"]["seq"], applied, "{s}");
    assert_eq!((s["lag"].clone(), s["ahead"].clone()), (Value::Null, json!(ahead)), "{s}");
    assert_eq!(diverged_metric(h, cause), Some(1.0), "{}", h.name);
    let text = h.daemon.cli_ok(&["cluster", "status"]);
    assert!(text.contains("DIVERGED") && text.contains(&format!("{ahead} ahead")), "{text}");
    s["diverged"]["message"].as_str().expect("a message").to_owned()
}

/// A write on `h` is refused with 503, naming `says`.
fn writes_refused(h: &ClusterHost, says: &str) {
    let (code, reply) = h.daemon.curl("POST", POLICIES, Some(&policy(6000)));
    assert_eq!(code, 503, "{reply}");
    let error = reply["error"].as_str().unwrap_or_default();
    assert!(error.contains(says) && error.contains("cluster republish"), "{reply}");
}

/// A write on `h` (allowing 6000) goes through, once `h` follows the log.
fn writes_work(h: &ClusterHost) {
    let write = || h.daemon.curl("POST", POLICIES, Some(&policy(6000))).0 == 200;
    assert!(
        eventually(Duration::from_secs(10), write),
        "writes on {} stay refused: {}",
        h.name,
        status(h)
    );
}

/// Both hosts follow one log again, with nothing diverged.
fn converged(cells: &[ClusterHost]) {
    let seq = settled(cells);
    for h in cells {
        let s = status(h);
        assert_eq!((s["diverged"].clone(), s["applied"]["seq"].clone()), (Value::Null, json!(seq)));
        assert_eq!(s["log_id"], s["newest"]["log_id"], "{s}");
        assert_eq!(diverged_metric(h, "rolled_back").unwrap_or(1.0), 0.0);
        assert_eq!(diverged_metric(h, "wiped").unwrap_or(1.0), 0.0);
    }
}

#[test]
fn a_restored_backup_never_reaches_the_kernel_and_republish_recovers() {
    let (_underlay, mut etcd, mut cells) = allowing_8080_and_9000();
    let backed_up = settled(&cells);
    let backup = etcd.backup();

    // After the backup: 8080 revoked, 7000 allowed.
    cells[1].daemon.disallow("frontend", "backend", "tcp", "8080");
    cells[0].daemon.allow("frontend", "backend", "tcp", "7000");
    assert!(eventually(LONG, || enforced_everywhere(&cells, 7000, true)));
    assert!(enforced_everywhere(&cells, 8080, false));
    let applied = settled(&cells);
    assert_eq!(applied, backed_up + 2);

    etcd.restore(&backup);
    for h in &cells {
        let message = reports_divergence(h, "rolled_back", applied, 2);
        assert!(message.contains(&format!("went back from {applied} to {backed_up}")), "{message}");
        writes_refused(h, &format!("went back from {applied} to {backed_up}"));
    }
    // Enforcement stays as the hosts last applied it: the revoked policy
    // stays denied, the newer one allowed, on real traffic.
    assert!(enforced_everywhere(&cells, 8080, false), "a revoked policy came back");
    assert!(enforced_everywhere(&cells, 7000, true) && enforced_everywhere(&cells, 9000, true));
    // Restarted against the restored etcd, an agent still denies it.
    cells[1].daemon.kill9();
    cells[1].daemon.spawn();
    reports_divergence(&cells[1], "rolled_back", applied, 2);
    assert!(enforced_everywhere(&cells, 8080, false), "a restarted agent re-allowed 8080");
    assert!(enforced_everywhere(&cells, 7000, true));
    assert_eq!(cells[1].daemon.get(POLICIES)["total_policies"], 2);

    // Republished from cell-0: past every change either host applied.
    let out = cells[0].daemon.cli_ok(&["cluster", "republish", "--json"]);
    let republished: Value = serde_json::from_str(&out).expect("JSON");
    assert!(republished["seq"].as_u64().unwrap() > applied, "{republished}");
    assert_eq!(republished["previous"]["seq"], applied, "{republished}");
    // Writes work again on both hosts, and both enforce the newest state.
    for h in &cells {
        writes_work(h);
    }
    assert!(eventually(LONG, || enforced_everywhere(&cells, 6000, true)), "a new policy");
    assert!(enforced_everywhere(&cells, 8080, false), "the revoked policy stays denied");
    assert!(enforced_everywhere(&cells, 7000, true) && enforced_everywhere(&cells, 9000, true));
    converged(&cells);
}

#[test]
fn a_wiped_etcd_never_detaches_and_the_most_advanced_host_republishes() {
    let (_underlay, mut etcd, mut cells) = allowing_8080_and_9000();
    cells[1].daemon.disallow("frontend", "backend", "tcp", "9000");
    assert!(eventually(LONG, || enforced_everywhere(&cells, 9000, false)));
    let before = settled(&cells);

    // cell-1's agent is down while cell-0 goes two changes further.
    cells[1].daemon.kill9();
    cells[0].daemon.disallow("frontend", "backend", "tcp", "8080");
    cells[0].daemon.allow("frontend", "backend", "tcp", "7000");
    let a = &cells[0];
    assert!(!reaches(a, backend(a), 8080) && reaches(a, backend(a), 7000));

    etcd.wipe();
    let message = reports_divergence(a, "wiped", before + 2, before + 2);
    assert!(message.contains("is gone"), "{message}");
    writes_refused(a, "is gone");
    assert!(!reaches(a, backend(a), 9000) && !reaches(a, backend(a), 8080), "revoked stays denied");
    assert!(reaches(a, backend(a), 7000));

    // cell-1 restarted against the empty etcd: its local copy, its
    // containers attached and policed as before, its /24 kept.
    cells[1].daemon.spawn();
    let (a, b) = (&cells[0], &cells[1]);
    reports_divergence(b, "wiped", before, before);
    writes_refused(b, "is gone");
    assert!(!reaches(b, backend(b), 9000), "a revoked policy came back on a restarted agent");
    assert!(reaches(b, backend(b), 8080), "the restarted agent lost what it enforced");
    let endpoints = b.daemon.get("/v1/endpoints")["endpoints"].as_array().cloned().unwrap();
    assert_eq!(endpoints.iter().filter(|e| e["host"] == "cell-1").count(), 2, "{endpoints:?}");
    assert_eq!(b.daemon.get("/v1/ipam")["subnet"], "10.255.1.0/24");

    // Republishing on the less advanced host is refused, naming the other.
    assert!(
        eventually(Duration::from_secs(10), || {
            let hosts = status(b)["hosts"].as_array().cloned().unwrap_or_default();
            hosts.iter().any(|h| h["host"] == "cell-0" && h["applied_seq"] == before + 2)
        }),
        "cell-0 is not registered again: {}",
        status(b)
    );
    let (code, reply) = b.daemon.curl("POST", REPUBLISH, Some(r#"{"force":false}"#));
    assert_eq!(code, 409, "{reply}");
    assert!(reply["error"].as_str().unwrap_or_default().contains("cell-0"), "{reply}");
    assert!(reaches(b, backend(b), 8080), "a refused republish changed something");

    let (code, reply) = a.daemon.curl("POST", REPUBLISH, Some(r#"{"force":false}"#));
    assert_eq!(code, 200, "{reply}");
    // cell-1 converges to cell-0's state: 8080 revoked, 7000 allowed, and
    // traffic between the hosts flows in the subnets they kept.
    assert!(eventually(LONG, || enforced_everywhere(&cells, 7000, true)), "{}", status(b));
    assert!(enforced_everywhere(&cells, 8080, false) && enforced_everywhere(&cells, 9000, false));
    writes_work(b);
    assert!(eventually(LONG, || enforced_everywhere(&cells, 6000, true)), "a new policy");
    converged(&cells);
    let subnets: Vec<Value> =
        status(a)["hosts"].as_array().unwrap().iter().map(|h| h["subnet"].clone()).collect();
    assert_eq!(subnets, [json!("10.255.0.0"), json!("10.255.1.0")]);
}
