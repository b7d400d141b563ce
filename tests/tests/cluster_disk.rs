//! Acknowledged means stored, in cluster mode too: a write this host could
//! not keep in its local copy (a full state directory) is refused with 507
//! before it is committed, so no host applies it; with space again writes
//! work, and a restart with etcd down serves every acknowledged write.

use std::time::Duration;

use integration_tests::{
    cluster::{ClusterHost, Etcd, Underlay, hosts},
    eventually, require_root,
    tmpfs::{Tmpfs, tmp_files},
};
use serde_json::json;

const POLICIES: &str = "/networking/v1/external/policies";

fn one(port: u16) -> String {
    json!({"policies": [{"source": {"id": "web"}, "destination": {"id": "api", "protocol": "tcp", "ports": {"start": port, "end": port}}}]})
        .to_string()
}

fn total(h: &ClusterHost) -> u64 {
    h.daemon.get(POLICIES)["total_policies"].as_u64().unwrap()
}

#[test]
fn a_write_this_host_could_not_keep_gets_507_and_reaches_no_host() {
    require_root();
    let mut underlay = Underlay::new();
    let mut etcd = Etcd::start(&underlay);
    let mut cells = hosts(&mut underlay, 2, 1);
    cells[0].daemon.stop();
    let tmpfs = Tmpfs::mount(&cells[0].daemon.state_dir(), "1m");
    cells[0].daemon.spawn();
    let (a, b) = (&cells[0], &cells[1]);
    assert_eq!(a.daemon.curl("POST", POLICIES, Some(&one(8080))).0, 200);
    assert!(eventually(Duration::from_secs(5), || total(b) == 1), "the control reaches B");
    let head = || {
        let out = etcd.ctl(&["get", "/policy-agent/log/head", "--print-value-only"]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let before = head();

    // A's state directory is full: refused, naming it; not committed.
    let filler = tmpfs.fill();
    let (status, reply) = a.daemon.curl("POST", POLICIES, Some(&one(9090)));
    assert_eq!(status, 507, "{reply}");
    let error = reply["error"].as_str().unwrap();
    assert!(error.contains("no space left in the state directory"), "{error}");
    assert!(error.contains(a.daemon.state_dir().to_str().unwrap()), "{error}");
    assert_eq!(head(), before, "nothing committed to etcd");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!((total(a), total(b)), (1, 1), "no host applied it");
    let leftovers = tmp_files(&a.daemon.state_dir());
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Space again: the write goes through and is kept here.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(a.daemon.curl("POST", POLICIES, Some(&one(9090))).0, 200);
    assert!(eventually(Duration::from_secs(5), || total(b) == 2));
    let copy = std::fs::read_to_string(a.daemon.state_dir().join("cluster-state.json")).unwrap();
    assert!(copy.contains("9090"), "the local copy holds the acknowledged write");
    // Restarted while etcd is down: every acknowledged write is served.
    etcd.kill();
    cells[0].daemon.kill9();
    cells[0].daemon.spawn();
    assert_eq!(total(&cells[0]), 2, "served from the local copy");
    cells[0].daemon.kill9();
    drop(tmpfs);
}
