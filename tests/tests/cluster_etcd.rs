//! The agents' etcd, run as an operator should: mutual TLS, a client
//! certificate's CN naming an etcd user, the agents' role reaching their
//! prefix only, and three members. Whoever else reaches etcd on the
//! underlay is refused (and etcd counts it); killing the leader during
//! writes loses no acknowledged write and the agents follow on without a
//! restart.

use std::{
    process::Output,
    sync::OnceLock,
    time::{Duration, Instant},
};

use integration_tests::{
    cluster::{
        AGENT_USER, ClusterHost, Etcd, EtcdOptions, Underlay, body, frontend_and_backend, hosts,
        policy, reaches,
    },
    eventually, require_root,
    traffic::LONG,
};
use serde_json::json;

const POLICIES: &str = "/networking/v1/external/policies";

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// `curl ARGS` run in the underlay's namespace, as a process on the network
/// between hosts would: (exit code, what it printed).
fn curl_on_underlay(underlay: &Underlay, args: &[&str]) -> (i32, String) {
    let out = underlay
        .ns
        .command("curl")
        .args(["-s", "-S", "--max-time", "5"])
        .args(args)
        .output()
        .expect("run curl");
    (out.status.code().unwrap_or(-1), text(&out))
}

/// The value of `key` as root reads it ("" when absent).
fn value_of(etcd: &Etcd, key: &str) -> String {
    let out = etcd.ctl(&["get", key, "--print-value-only"]);
    assert!(out.status.success(), "{}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// TLS handshakes etcd rejected (it logs each).
fn rejected_handshakes(etcd: &Etcd) -> usize {
    etcd.log().matches("rejected connection").count()
}

/// Requests etcd refused for want of permission.
fn permission_denied(etcd: &Etcd) -> f64 {
    etcd.metric("grpc_server_handled_total", &[("grpc_code", "PermissionDenied")])
}

#[test]
fn etcd_refuses_the_underlay_other_certificates_and_keys_outside_the_agents_prefix() {
    require_root();
    let mut underlay = Underlay::new();
    let etcd = Etcd::start(&underlay);
    let cells = hosts(&mut underlay, 2, 2);
    let (a, b) = (&cells[0], &cells[1]);
    let backend_a = frontend_and_backend(a).1;
    let backend_b = frontend_and_backend(b).1;
    // Control: the agents, with their certificate, write and follow.
    let allow = body(&[policy("frontend", "backend", 8080)]);
    assert_eq!(a.daemon.curl("POST", POLICIES, Some(&allow)).0, 200);
    assert!(eventually(LONG, || reaches(b, backend_b, 8080)), "enforced on the other host");
    let head = value_of(&etcd, "/policy-agent/log/head");
    assert!(!head.is_empty(), "the agents keep their log under their prefix");
    let (handshakes, denied) = (rejected_handshakes(&etcd), permission_denied(&etcd));

    // The attack that used to work: one unauthenticated request to etcd's
    // JSON gateway from the underlay, moving the log's head.
    let url = format!("{}/v3/kv/put", etcd.member_url(0));
    let put = json!({"key": "L3BvbGljeS1hZ2VudC9sb2cvaGVhZA==", "value": "OTk5"}).to_string();
    let plain = url.replace("https://", "http://");
    let (_, said) = curl_on_underlay(&underlay, &["-X", "POST", &plain, "-d", &put]);
    assert!(!said.contains("\"revision\""), "plain HTTP is not served: {said}");
    // Over TLS but without a client certificate: the handshake fails.
    let ca = underlay.pki.ca();
    let ca = ca.to_str().unwrap();
    let (code, said) =
        curl_on_underlay(&underlay, &["--cacert", ca, "-X", "POST", &url, "-d", &put]);
    assert_ne!(code, 0, "no client certificate, no connection: {said}");
    assert!(!said.contains("\"revision\""), "{said}");
    // A certificate from another CA, even with the agents' CN.
    underlay.pki.make_ca("rogue-ca", "rogue");
    underlay.pki.make_cert("rogue", AGENT_USER, "extendedKeyUsage=clientAuth\n", "rogue-ca");
    let rogue = etcd.ctl_as("rogue", &["put", "/policy-agent/log/head", "999"]);
    assert!(!rogue.status.success(), "a certificate etcd's CA did not sign: {}", text(&rogue));
    // etcd's CA signed it, but its CN is no etcd user.
    let stranger = etcd.ctl_as("intruder", &["put", "/policy-agent/log/head", "999"]);
    assert!(!stranger.status.success(), "a CN etcd has no user for: {}", text(&stranger));
    // The agents' own identity outside the agents' prefix.
    let outside = etcd.ctl_as(AGENT_USER, &["put", "/elsewhere", "x"]);
    assert!(!outside.status.success(), "outside the agents' prefix: {}", text(&outside));
    assert!(text(&outside).contains("permission denied"), "{}", text(&outside));

    // Nothing was written, and etcd counted every refusal.
    assert_eq!(value_of(&etcd, "/policy-agent/log/head"), head, "the head did not move");
    assert_eq!(value_of(&etcd, "/elsewhere"), "");
    assert!(
        rejected_handshakes(&etcd) >= handshakes + 2,
        "etcd logs the handshakes without a certificate its CA signed"
    );
    assert!(
        permission_denied(&etcd) >= denied + 2.0,
        "etcd counts the requests it refused: {} then {}",
        denied,
        permission_denied(&etcd)
    );

    // The agents go on: a write through B reaches A.
    let more = body(&[policy("frontend", "backend", 9000)]);
    assert_eq!(b.daemon.curl("POST", POLICIES, Some(&more)).0, 200);
    assert!(eventually(LONG, || reaches(a, backend_a, 9000)));
    assert!(reaches(a, backend_a, 8080) && reaches(b, backend_b, 9000));
}

/// The sources of the policies `h` lists.
fn sources(h: &ClusterHost) -> Vec<String> {
    let listed = h.daemon.get(POLICIES);
    listed["policies"]
        .as_array()
        .expect("policies")
        .iter()
        .filter_map(|p| p["source"]["id"].as_str().map(str::to_owned))
        .collect()
}

#[test]
fn writes_go_on_when_the_etcd_leader_is_killed_and_none_acknowledged_is_lost() {
    require_root();
    let mut underlay = Underlay::new();
    let mut etcd = Etcd::start_with(&underlay, EtcdOptions { members: 3, tls: true });
    let cells = hosts(&mut underlay, 2, 2);
    let (a, b) = (&cells[0], &cells[1]);
    let backend_a = frontend_and_backend(a).1;
    let backend_b = frontend_and_backend(b).1;
    let pids = (a.daemon.pid(), b.daemon.pid());
    let mut leader = None;
    assert!(eventually(Duration::from_secs(10), || {
        leader = etcd.leader();
        leader.is_some()
    }));
    let leader = leader.unwrap();

    // One writer on A, a policy per write; the leader is killed meanwhile.
    let started = Instant::now();
    let killed_at = OnceLock::new();
    let (acknowledged, refused) = std::thread::scope(|s| {
        let writer = s.spawn(|| {
            let (mut acknowledged, mut refused) = (Vec::new(), Vec::new());
            let after_kill = |acknowledged: &Vec<(String, Duration)>| {
                killed_at.get().map_or(0, |k| acknowledged.iter().filter(|(_, at)| at > k).count())
            };
            let mut i = 0;
            // Until 40 writes after the kill are acknowledged, or 20 s.
            while started.elapsed() < Duration::from_secs(20) && after_kill(&acknowledged) < 40 {
                let source = format!("app-{i}");
                let write = body(&[policy(&source, "backend", 7000)]);
                let (status, reply) = a.daemon.curl("POST", POLICIES, Some(&write));
                match status {
                    200 => acknowledged.push((source, started.elapsed())),
                    _ => refused.push((status, reply)),
                }
                i += 1;
            }
            (acknowledged, refused)
        });
        std::thread::sleep(Duration::from_millis(1500));
        etcd.kill_member(leader);
        killed_at.set(started.elapsed()).expect("killed once");
        writer.join().expect("writer")
    });
    let killed = *killed_at.get().expect("killed");
    let after: Vec<_> = acknowledged.iter().filter(|(_, at)| *at > killed).collect();
    let resumed = after.first().map(|(_, at)| *at - killed);
    eprintln!(
        "{} writes acknowledged ({} after the kill, the first {resumed:?} after it), {} refused",
        acknowledged.len(),
        after.len(),
        refused.len()
    );
    assert!(acknowledged.iter().any(|(_, at)| *at < killed), "writes worked before the kill");
    assert!(after.len() >= 40, "writes resume after the election: {refused:?}");
    // A write that failed was refused as etcd being unavailable, not lost.
    for (status, reply) in &refused {
        assert_eq!(*status, 503, "{reply}");
        assert!(reply["error"].as_str().is_some_and(|e| e.contains("etcd")), "{reply}");
    }

    // Every acknowledged write is in etcd and on both hosts, which followed
    // without a restart.
    for h in [a, b] {
        assert!(
            eventually(Duration::from_secs(10), || {
                let listed = sources(h);
                acknowledged.iter().all(|(source, _)| listed.contains(source))
            }),
            "{} lists every acknowledged policy",
            h.name
        );
    }
    assert_eq!((a.daemon.pid(), b.daemon.pid()), pids, "no agent restarted");
    // And a write through B is enforced on both (real traffic).
    let allow = body(&[policy("frontend", "backend", 8080)]);
    assert_eq!(b.daemon.curl("POST", POLICIES, Some(&allow)).0, 200);
    assert!(eventually(LONG, || reaches(a, backend_a, 8080)), "A follows B's write");
    assert!(reaches(b, backend_b, 8080));
    assert!(!reaches(a, backend_a, 9000), "what no policy allows stays denied");
    assert!(eventually(Duration::from_secs(10), || {
        let status = a.daemon.get("/v1/cluster");
        let hosts = status["hosts"].as_array().cloned().unwrap_or_default();
        hosts.len() == 2 && hosts.iter().all(|h| h["lag"] == 0)
    }));
    // The killed member comes back and catches up.
    etcd.spawn_member(leader);
    assert!(
        eventually(Duration::from_secs(10), || etcd.ctl(&["endpoint", "health"]).status.success()),
        "every member healthy again"
    );
}
