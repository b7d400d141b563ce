//! A host that comes back after `host_grace_seconds` — cut off from etcd,
//! or its agent stopped — finds its endpoints removed by the other hosts'
//! clean-up. Its containers are still there: they stay policed (held as
//! they were, never detached) and are registered again, at the same
//! addresses, as soon as the host is back.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use integration_tests::{
    cluster::{ClusterHost, Etcd, Underlay, hosts_with},
    eventually, require_root,
    topology::Container,
    traffic::{LONG, SHORT, tcp_echo_server, tcp_echo_works},
};
use serde_json::json;

const POLICIES: &str = "/networking/v1/external/policies";

/// The addresses `h` lists as endpoints of host `host`.
fn endpoints_of(h: &ClusterHost, host: &str) -> Vec<String> {
    let listed = h.daemon.get("/v1/endpoints");
    let mut ips: Vec<String> = listed["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .filter(|e| e["host"] == host)
        .filter_map(|e| e["ip"].as_str().map(str::to_owned))
        .collect();
    ips.sort();
    ips
}

/// Host B's containers: frontend (0), backend (1, echo on 8080), and a
/// stranger (2) no policy names.
struct Apps<'a> {
    frontend: &'a Container,
    backend: &'a Container,
    stranger: &'a Container,
}

impl Apps<'_> {
    fn allowed_passes(&self) -> bool {
        tcp_echo_works(&self.frontend.ns, self.backend.ip, 8080, SHORT)
    }

    fn stranger_passes(&self) -> bool {
        tcp_echo_works(&self.stranger.ns, self.backend.ip, 8080, Duration::from_millis(200))
    }
}

/// Until `done` holds (at most `within`), the stranger is never let
/// through to the backend; returns whether `done` held.
fn never_unpoliced(apps: &Apps, within: Duration, mut done: impl FnMut() -> bool) -> bool {
    let started = Instant::now();
    loop {
        assert!(
            !apps.stranger_passes(),
            "the stranger reached the backend: B's containers are unpoliced"
        );
        if done() {
            return true;
        }
        if started.elapsed() > within {
            return false;
        }
    }
}

/// Drops B's packets to etcd (nftables in B's namespace).
fn cut_from_etcd(b: &ClusterHost, cut: bool) {
    let ns = &b.host.ns;
    let nft = |args: &[&str]| {
        let out = ns.command("nft").args(args).output().expect("run nft");
        assert!(out.status.success(), "nft {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    if cut {
        nft(&["add", "table", "ip", "pdpcut"]);
        nft(&[
            "add", "chain", "ip", "pdpcut", "out", "{", "type", "filter", "hook", "output",
            "priority", "0", ";", "}",
        ]);
        let etcd = Underlay::ETCD_ADDRESS.to_string();
        nft(&[
            "add", "rule", "ip", "pdpcut", "out", "ip", "daddr", &etcd, "tcp", "dport", "2379",
            "drop",
        ]);
    } else {
        nft(&["delete", "table", "ip", "pdpcut"]);
    }
}

#[test]
fn a_host_back_after_its_grace_time_keeps_its_containers_policed_and_registers_them_again() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let mut cells = hosts_with(&mut underlay, 2, 3, "host_grace_seconds = 1\n");
    {
        let (a, b) = (&cells[0], &cells[1]);
        a.daemon.register(a.host.container(0), "frontend");
        b.daemon.register(b.host.container(0), "frontend");
        b.daemon.register(b.host.container(1), "backend");
        b.daemon.register(b.host.container(2), "stranger");
        tcp_echo_server(&b.host.container(1).ns, b.host.container(1).ip, 8080);
        let allow = json!({"policies": [{"source": {"id": "frontend"}, "destination": {"id": "backend", "protocol": "tcp", "ports": {"start": 8080, "end": 8080}}}]});
        assert_eq!(a.daemon.curl("POST", POLICIES, Some(&allow.to_string())).0, 200);
    }
    let backend: Ipv4Addr = cells[1].host.container(1).ip;
    let registered = endpoints_of(&cells[0], "cell-1");
    assert_eq!(registered.len(), 3);
    let cross_host = |cells: &[ClusterHost]| {
        tcp_echo_works(&cells[0].host.container(0).ns, backend, 8080, SHORT)
    };
    assert!(
        eventually(Duration::from_secs(10), || cross_host(&cells)),
        "A's frontend reaches B's backend"
    );
    {
        let b = &cells[1];
        let apps = Apps {
            frontend: b.host.container(0),
            backend: b.host.container(1),
            stranger: b.host.container(2),
        };
        assert!(eventually(LONG, || apps.allowed_passes()) && !apps.stranger_passes(), "policed");

        // 1. B is cut off from etcd past its lease and grace time: A's
        // agent removes B's endpoints and frees its /24.
        cut_from_etcd(b, true);
        let a = &cells[0];
        assert!(
            never_unpoliced(&apps, Duration::from_secs(30), || endpoints_of(a, "cell-1")
                .is_empty()),
            "A's agent removes the gone host's endpoints"
        );
        assert!(apps.allowed_passes(), "B's kernel is as it was");
        // B is back: it follows the removal but holds its containers as
        // they were, and registers them again at the same addresses.
        cut_from_etcd(b, false);
        assert!(
            never_unpoliced(&apps, Duration::from_secs(30), || endpoints_of(a, "cell-1")
                == registered),
            "B registers its endpoints again, at the same addresses"
        );
        assert!(apps.allowed_passes() && !apps.stranger_passes());
        assert!(b.daemon.log().contains("held"), "B says what it held");
    }
    assert!(eventually(Duration::from_secs(10), || cross_host(&cells)), "routes follow again");

    // 2. B's agent is stopped past its lease and grace time, then started
    // again: it finds its endpoints gone from etcd and its containers here.
    cells[1].daemon.kill9();
    assert!(
        eventually(Duration::from_secs(30), || endpoints_of(&cells[0], "cell-1").is_empty()),
        "A's agent removes the gone host's endpoints"
    );
    cells[1].daemon.spawn();
    {
        let (a, b) = (&cells[0], &cells[1]);
        let apps = Apps {
            frontend: b.host.container(0),
            backend: b.host.container(1),
            stranger: b.host.container(2),
        };
        assert!(
            never_unpoliced(&apps, Duration::from_secs(30), || endpoints_of(a, "cell-1")
                == registered),
            "B registers its endpoints again after a restart"
        );
        assert!(eventually(LONG, || apps.allowed_passes()), "its allowed traffic passes");
        assert!(!apps.stranger_passes());
        assert_eq!(endpoints_of(b, "cell-1"), registered);
    }
    assert!(eventually(Duration::from_secs(10), || cross_host(&cells)), "routes follow again");
}
