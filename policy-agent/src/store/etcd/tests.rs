//! The store against a real etcd on loopback (Debian's etcd-server, which
//! `cargo xtask setup` installs), never a fake.

use std::{
    net::TcpListener,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::*;
use crate::state::{Endpoint, Policy};

struct TestEtcd {
    child: Child,
    dir: std::path::PathBuf,
    url: String,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl TestEtcd {
    /// An etcd on two free loopback ports. A port found free can be taken
    /// before etcd binds it (the tests run side by side, and etcd's own
    /// outgoing connections use the same range): an etcd that exits is
    /// started again on other ports.
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("etcd-store-{name}-{}", std::process::id()));
        for _ in 0..3 {
            let _ = std::fs::remove_dir_all(&dir);
            let (client, peer) = (free_port(), free_port());
            let url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let child = Command::new("etcd")
                .args(["--name", "unit", "--data-dir"])
                .arg(&dir)
                .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
                .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &format!("unit={peer_url}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("etcd (Debian's etcd-server) must be installed: cargo xtask setup");
            let mut etcd = Self { child, dir: dir.clone(), url };
            let started = Instant::now();
            while etcd.client().range("/", b"/0").is_err() {
                if etcd.child.try_wait().is_ok_and(|exited| exited.is_some()) {
                    break;
                }
                assert!(started.elapsed() < Duration::from_secs(15), "etcd did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
            if etcd.child.try_wait().is_ok_and(|exited| exited.is_none()) {
                return etcd;
            }
        }
        panic!("etcd exited three times on start (ports taken?)");
    }

    fn client(&self) -> Etcd {
        Etcd::new(std::slice::from_ref(&self.url), Duration::from_secs(2)).unwrap()
    }
}

impl Drop for TestEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn two_writers_share_one_ordered_log() {
    let etcd = TestEtcd::start("writers");
    let (mut a, mut b) = (EtcdStore::new(etcd.client(), "/t"), EtcdStore::new(etcd.client(), "/t"));
    let (mut state_a, mut state_b) = (a.load().unwrap(), b.load().unwrap());
    let first = Change::AddPolicies(vec![Policy::tcp("web", "api", 80)]);
    first.replay(&mut state_a);
    a.append(&first, &state_a).unwrap();
    // B has not seen it: its append is refused, nothing is written.
    let second = Change::AddPolicies(vec![Policy::tcp("api", "db", 5432)]);
    assert!(matches!(b.append(&second, &state_b), Err(StoreError::Conflict)));
    assert_eq!(b.pending().unwrap(), vec![first.clone()]);
    first.replay(&mut state_b);
    second.replay(&mut state_b);
    b.append(&second, &state_b).unwrap();
    assert_eq!(a.pending().unwrap(), vec![second.clone()]);
    second.replay(&mut state_a);
    assert_eq!(state_a, state_b, "the same tags and ids on both");
    assert_eq!(a.position().seq, 2);
    assert_eq!(a.pending().unwrap(), vec![], "nothing new");
    // A third agent loads the same state.
    assert_eq!(EtcdStore::new(etcd.client(), "/t").load().unwrap(), state_a);
    // Another prefix is another cluster.
    assert_eq!(EtcdStore::new(etcd.client(), "/other").load().unwrap(), State::default());
}

#[test]
fn snapshots_compact_the_log_and_reset_who_fell_behind() {
    let etcd = TestEtcd::start("compact");
    let mut lagging = EtcdStore::new(etcd.client(), "/c").with_compaction(5);
    lagging.load().unwrap();
    let mut writer = EtcdStore::new(etcd.client(), "/c").with_compaction(5);
    let mut state = writer.load().unwrap();
    for port in 1..=12 {
        let change = Change::AddPolicies(vec![Policy::tcp("web", "api", port)]);
        change.replay(&mut state);
        writer.append(&change, &state).unwrap();
    }
    // Snapshots at 5 and 10; the log keeps what follows the older one.
    let log = etcd.client().keys("/c/log/", b"/c/log0").unwrap();
    assert_eq!(log.len(), 7 + 2, "entries 6..=12, the head and the id: {log:?}");
    assert_eq!(writer.snapshots().unwrap(), [5, 10]);
    // A new agent loads the newest snapshot and the changes after it.
    let mut fresh = EtcdStore::new(etcd.client(), "/c");
    assert_eq!(fresh.load().unwrap(), state);
    assert_eq!(fresh.position().seq, 12);
    // One that fell behind the compacted log gets the whole state.
    match lagging.pending().unwrap().as_slice() {
        [Change::Reset(reset)] => assert_eq!(**reset, state),
        other => panic!("{other:?}"),
    }
    assert_eq!(lagging.position().seq, 12);
    // One a few changes behind catches up change by change.
    let change = Change::RemovePolicies(vec![Policy::tcp("web", "api", 1)]);
    change.replay(&mut state);
    writer.append(&change, &state).unwrap();
    assert_eq!(fresh.pending().unwrap(), vec![change]);
}

#[test]
fn a_damaged_log_is_refused_not_skipped() {
    let etcd = TestEtcd::start("damaged");
    let mut store = EtcdStore::new(etcd.client(), "/d");
    let mut state = store.load().unwrap();
    for port in 1..=3 {
        let change = Change::AddEndpoint(Endpoint {
            ip: std::net::Ipv4Addr::new(10, 255, 0, port).into(),
            ipv6: None,
            app: "web".into(),
            ifname: format!("hv{port}"),
            netns: None,
            host: Some("cell-0".into()),
            port_mappings: Vec::new(),
            space_id: None,
            workload: None,
        });
        change.replay(&mut state);
        store.append(&change, &state).unwrap();
    }
    etcd.client().put_if(&[], &[("/d/log/00000000000000000002", b"garbage", 0)]).unwrap();
    let err = EtcdStore::new(etcd.client(), "/d").load().unwrap_err();
    assert!(err.to_string().contains("/d/log/00000000000000000002"), "{err}");
}

/// A change that adds the policy `web` → `api` on `port`.
fn allow(port: u16) -> Change {
    Change::AddPolicies(vec![Policy::tcp("web", "api", port)])
}

/// Appends `changes` through `store`, keeping `state` in step.
fn write(store: &mut EtcdStore, state: &mut State, changes: impl IntoIterator<Item = Change>) {
    for change in changes {
        change.replay(state);
        store.append(&change, state).unwrap();
    }
}

/// A store under `prefix` with its local copy in a fresh directory.
fn with_copy(etcd: &TestEtcd, prefix: &str) -> (EtcdStore, std::path::PathBuf) {
    let name = prefix.trim_start_matches('/');
    let dir = std::env::temp_dir().join(format!("etcd-copy-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (reopen(etcd, prefix, &dir), dir)
}

/// The store of a host (`cell-0`) whose local copy is in `dir`, restarted.
fn reopen(etcd: &TestEtcd, prefix: &str, dir: &std::path::Path) -> EtcdStore {
    EtcdStore::new(etcd.client(), prefix)
        .with_host("cell-0")
        .with_cache(dir.join("cluster-state.json"))
}

fn cause(result: Result<Vec<Change>, StoreError>) -> &'static str {
    match result {
        Err(StoreError::Diverged(d)) => d.cause(),
        other => panic!("not diverged: {other:?}"),
    }
}

#[test]
fn a_log_that_went_back_is_never_followed_and_refuses_writes() {
    let etcd = TestEtcd::start("back");
    let (mut store, dir) = with_copy(&etcd, "/r");
    let mut state = store.load().unwrap();
    write(&mut store, &mut state, (1..=3).map(allow));
    // A restore to change 2: the head back, change 3 gone.
    let client = etcd.client();
    client.put_if(&[], &[("/r/log/head", b"2", 0)]).unwrap();
    client.delete_range("/r/log/00000000000000000003", b"/r/log/00000000000000000004").unwrap();
    assert_eq!(cause(store.pending()), "rolled_back");
    let refused = store.append(&allow(9), &state).unwrap_err();
    assert!(refused.to_string().contains("went back from 3 to 2"), "{refused}");
    assert_eq!(store.position().seq, 3);
    // Restarted: the local copy, not change 2, and the kernel left alone.
    let mut restarted = reopen(&etcd, "/r", &dir);
    assert_eq!(restarted.load().unwrap(), state);
    assert!(restarted.is_stale());
    assert_eq!(restarted.diverged().map(Divergence::cause), Some("rolled_back"));
    // Written again to 3 by a host that had applied no more than 2: change
    // 3 is another change than the one applied.
    let mut other = EtcdStore::new(etcd.client(), "/r");
    let mut theirs = other.load().unwrap();
    write(&mut other, &mut theirs, [allow(7)]);
    assert_eq!(cause(store.pending()), "rewritten");
    assert_eq!(cause(restarted.pending()), "rewritten");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_wiped_or_replaced_log_is_never_followed() {
    let etcd = TestEtcd::start("wiped");
    let (mut store, dir) = with_copy(&etcd, "/w");
    let mut state = store.load().unwrap();
    write(&mut store, &mut state, (1..=3).map(allow));
    etcd.client().delete_range("/w/", b"/w0").unwrap();
    assert_eq!(cause(store.pending()), "wiped");
    let mut restarted = reopen(&etcd, "/w", &dir);
    assert_eq!(restarted.load().unwrap(), state, "the local copy, not an empty state");
    assert_eq!(restarted.diverged().map(Divergence::cause), Some("wiped"));
    // A new host begins another log on the empty etcd.
    let mut new = EtcdStore::new(etcd.client(), "/w").with_host("cell-9");
    let mut theirs = new.load().unwrap();
    write(&mut new, &mut theirs, (1..=5).map(|p| allow(100 + p)));
    assert_eq!(cause(store.pending()), "another_log");
    let message = restarted.pending().unwrap_err().to_string();
    assert!(message.contains("another change log") && message.contains("cell-9"), "{message}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_republished_state_is_taken_by_every_host_behind_it_and_writes_resume() {
    let etcd = TestEtcd::start("republish");
    let (mut ahead, dir) = with_copy(&etcd, "/p");
    let mut state = ahead.load().unwrap();
    let mut behind = EtcdStore::new(etcd.client(), "/p");
    behind.load().unwrap();
    write(&mut ahead, &mut state, (1..=3).map(allow));
    assert_eq!(behind.pending().unwrap().len(), 3);
    write(&mut ahead, &mut state, [allow(4)]);
    // Restored to change 2: both diverged (the one at 3 too).
    let client = etcd.client();
    client.put_if(&[], &[("/p/log/head", b"2", 0)]).unwrap();
    client.delete_range("/p/log/00000000000000000003", b"/p/log/00000000000000000005").unwrap();
    assert_eq!(cause(ahead.pending()), "rolled_back");
    assert_eq!(cause(behind.pending()), "rolled_back");
    // Republished by the host at 4, past what anyone reported (say 6).
    assert!(matches!(ahead.republish(&state, 6, 3), Err(StoreError::Conflict)), "head moved");
    let republished = ahead.republish(&state, 6, 2).unwrap();
    assert_eq!((republished.seq, republished.log.base), (7, 7));
    assert_eq!(republished.previous.seq, 4);
    assert!(ahead.diverged().is_none() && ahead.log_id() == Some(republished.log.id.as_str()));
    let keys = client.keys("/p/", b"/p0").unwrap();
    assert_eq!(
        keys,
        [
            "/p/log/head",
            "/p/log/id",
            "/p/snapshots/00000000000000000007/000000",
            "/p/snapshots/00000000000000000007/parts"
        ],
        "the old log and snapshots are gone"
    );
    // The host behind takes it whole; writes resume on both, in one log.
    match behind.pending().unwrap().as_slice() {
        [Change::Reset(reset)] => assert_eq!(**reset, state),
        other => panic!("{other:?}"),
    }
    assert_eq!(behind.position().seq, 7);
    let mut theirs = state.clone();
    write(&mut behind, &mut theirs, [allow(8)]);
    assert_eq!(ahead.pending().unwrap(), vec![allow(8)]);
    allow(8).replay(&mut state);
    write(&mut ahead, &mut state, [allow(9)]);
    assert_eq!(behind.pending().unwrap(), vec![allow(9)]);
    allow(9).replay(&mut theirs);
    assert_eq!(theirs, state);
    assert_eq!(EtcdStore::new(etcd.client(), "/p").load().unwrap(), state, "a new host");
    // A host that applied change 7 or later of the old log is not behind
    // the republished state: another log for it.
    let mut later = EtcdStore::new(etcd.client(), "/p");
    (later.seq, later.log_id) = (7, Some("old".into()));
    assert_eq!(cause(later.pending()), "another_log");
    // The republishing host's local copy knows the new log, after a restart.
    let mut restarted = reopen(&etcd, "/p", &dir);
    assert_eq!(restarted.load().unwrap(), state);
    assert!(restarted.diverged().is_none() && !restarted.is_stale());
    let _ = std::fs::remove_dir_all(&dir);
}
