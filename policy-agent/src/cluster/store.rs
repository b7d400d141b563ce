//! The cluster's desired state in etcd: an ordered log of the changes the
//! agents accepted, replayed by every agent.
//!
//! Keys, under the configured prefix (default `/policy-agent`):
//! - `log/NNNNNNNNNNNNNNNNNNNN` (the change's sequence number, 20 digits, so
//!   keys sort in order): `{"seq":N,"change":...}`, the same record the local
//!   journal writes;
//! - `log/head`: N, the newest sequence number. It sorts after the entries,
//!   so one range read returns the entries and the head at one revision.
//!
//! An agent appends change N+1 in one transaction that also moves the head,
//! on condition that the head has not moved since it last read it. If
//! another agent got there first the transaction fails
//! ([`StoreError::Conflict`]): the agent applies the newer changes, checks
//! its request again against them and retries. So there is one total order
//! of changes, every agent replays the same sequence, and tags and policy
//! ids, which replay allocates, are the same on every host — two hosts
//! adding the same new app at once get one tag.
//!
//! One key per change whatever its size keeps a batch of 1,000 policies one
//! transaction of two operations (etcd allows 128) as long as it fits in a
//! request (1.5 MiB by default: about 10,000 policies).

use std::{
    collections::BTreeMap,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::etcd::{Etcd, EtcdError, ModRevisionIs, prefix_end};
use crate::{
    state::State,
    store::{Change, Position, Store, StoreError},
};

/// Changes between snapshots of the state in etcd.
pub const COMPACT_EVERY: u64 = 1000;

/// The largest part of a snapshot (etcd takes requests up to 1.5 MiB).
const SNAPSHOT_PART: usize = 512 << 10;

/// How often at most the local copy of a large state is rewritten.
pub const CACHE_EVERY: Duration = Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
struct Entry {
    seq: u64,
    change: Change,
}

pub struct EtcdStore {
    etcd: Etcd,
    prefix: String,
    /// A local copy of the state (`{"seq","state"}`), so an agent that
    /// starts while etcd is unreachable serves what it last knew.
    cache: Option<PathBuf>,
    cached_at: Option<Instant>,
    /// Loaded from the cache, not yet caught up with etcd.
    stale: bool,
    /// Changes applied (the newest one's sequence number).
    seq: u64,
    /// The head key's mod revision when last seen (0: no head yet).
    head_revision: i64,
    /// etcd's revision when last read or written.
    revision: i64,
    /// A snapshot of the state is written every this many changes.
    compact_every: u64,
}

impl EtcdStore {
    /// A store of the log under `prefix` (e.g. `/policy-agent`).
    pub fn new(etcd: Etcd, prefix: &str) -> Self {
        Self {
            etcd,
            prefix: prefix.trim_end_matches('/').to_owned(),
            cache: None,
            cached_at: None,
            stale: false,
            seq: 0,
            head_revision: 0,
            revision: 0,
            compact_every: COMPACT_EVERY,
        }
    }

    /// Snapshots every `n` changes instead of [`COMPACT_EVERY`].
    pub fn with_compaction(mut self, n: u64) -> Self {
        self.compact_every = n.max(1);
        self
    }

    fn snapshots_prefix(&self) -> String {
        format!("{}/snapshots/", self.prefix)
    }

    fn snapshot_dir(&self, seq: u64) -> String {
        format!("{}{seq:020}/", self.snapshots_prefix())
    }

    /// The complete snapshots in etcd (those whose `parts` key is written),
    /// oldest first.
    fn snapshots(&self) -> Result<Vec<u64>, StoreError> {
        let dir = self.snapshots_prefix();
        let keys = self.etcd.keys(&dir, &prefix_end(&dir))?;
        let mut complete: Vec<u64> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&dir)?.strip_suffix("/parts")?.parse().ok())
            .collect();
        complete.sort_unstable();
        Ok(complete)
    }

    /// The state of the snapshot at `seq`.
    fn read_snapshot(&self, seq: u64) -> Result<State, StoreError> {
        let dir = self.snapshot_dir(seq);
        let range = self.etcd.range(&dir, &prefix_end(&dir))?;
        let parts_key = format!("{dir}parts");
        let mut bytes = Vec::new();
        // Part keys sort in order, before `parts`.
        for kv in range.kvs.iter().filter(|kv| kv.key != parts_key) {
            bytes.extend_from_slice(&kv.value);
        }
        serde_json::from_slice(&bytes).map_err(|e| self.damaged(format!("snapshot {seq}: {e}")))
    }

    /// Writes the state at `self.seq` as a snapshot (parts of at most
    /// [`SNAPSHOT_PART`] bytes, then the `parts` key that completes it), then
    /// drops what the previous snapshot covers: older snapshots and log
    /// entries up to it. An agent less than `compact_every` changes behind
    /// still catches up change by change; one further behind reloads the
    /// newest snapshot.
    fn compact(&mut self, state: &State) -> Result<(), StoreError> {
        let seq = self.seq;
        let bytes = serde_json::to_vec(&state.stored()).expect("the state serializes");
        let dir = self.snapshot_dir(seq);
        let parts: Vec<&[u8]> = bytes.chunks(SNAPSHOT_PART).collect();
        for (i, part) in parts.iter().enumerate() {
            self.etcd.put_if(&[], &[(&format!("{dir}{i:06}"), part, 0)])?;
        }
        let count = parts.len().to_string();
        self.etcd.put_if(&[], &[(&format!("{dir}parts"), count.as_bytes(), 0)])?;
        let older: Vec<u64> = self.snapshots()?.into_iter().filter(|s| *s < seq).collect();
        if let Some(&previous) = older.last() {
            for old in older.iter().filter(|s| **s < previous) {
                let old_dir = self.snapshot_dir(*old);
                self.etcd.delete_range(&old_dir, &prefix_end(&old_dir))?;
            }
            self.etcd.delete_range(&self.entry_key(0), self.entry_key(previous + 1).as_bytes())?;
        }
        info!(
            seq,
            parts = parts.len(),
            bytes = bytes.len(),
            "snapshot of the cluster state written to etcd"
        );
        Ok(())
    }

    /// Keeps a copy of the state at `path` (written at most every
    /// [`CACHE_EVERY`]), loaded when etcd cannot be reached at start.
    pub fn with_cache(mut self, path: PathBuf) -> Self {
        self.cache = Some(path);
        self
    }

    /// Writes the cache if it is due (or `now`).
    fn cache(&mut self, state: &State, now: bool) {
        let Some(path) = &self.cache else { return };
        // Small states are cheap to write after every change; large ones at
        // most every CACHE_EVERY.
        let large = state.policy_count() > 10_000;
        if !now && large && self.cached_at.is_some_and(|at| at.elapsed() < CACHE_EVERY) {
            return;
        }
        #[derive(Serialize)]
        struct CachedRef<'a> {
            seq: u64,
            state: crate::state::StoredRef<'a>,
        }
        let tmp = path.with_extension("json.tmp");
        let written = (|| -> std::io::Result<()> {
            use std::os::unix::fs::OpenOptionsExt as _;
            let _ = std::fs::remove_file(&tmp);
            let file =
                std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
            let mut out = std::io::BufWriter::new(file);
            serde_json::to_writer(&mut out, &CachedRef { seq: self.seq, state: state.stored() })?;
            out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        match written {
            Ok(()) => self.cached_at = Some(Instant::now()),
            Err(e) => {
                warn!(path = %path.display(), error = %e, "cannot write the local copy of the cluster state")
            }
        }
    }

    /// The cached state, after etcd could not be reached.
    fn load_cache(&mut self, unreachable: StoreError) -> Result<State, StoreError> {
        #[derive(Deserialize)]
        struct Cached {
            seq: u64,
            state: State,
        }
        let Some(path) = &self.cache else { return Err(unreachable) };
        let Ok(bytes) = std::fs::read(path) else { return Err(unreachable) };
        let cached: Cached = serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::Corrupt { path: path.clone(), source })?;
        warn!(error = %unreachable, seq = cached.seq, cache = %path.display(),
              "etcd is unreachable: serving the last known cluster state until it answers");
        self.seq = cached.seq;
        self.stale = true;
        // Unknown: the first write conflicts, which makes the agent catch up
        // (from `seq`) before it writes.
        self.head_revision = -1;
        Ok(cached.state)
    }

    fn log_prefix(&self) -> String {
        format!("{}/log/", self.prefix)
    }

    fn entry_key(&self, seq: u64) -> String {
        format!("{}/log/{seq:020}", self.prefix)
    }

    fn head_key(&self) -> String {
        format!("{}/log/head", self.prefix)
    }

    /// The key the newest change moves: what followers watch.
    pub fn watched_key(&self) -> String {
        self.head_key()
    }

    fn damaged(&self, reason: String) -> StoreError {
        StoreError::Damaged {
            what: format!("the change log in etcd under {}", self.prefix),
            reason,
        }
    }

    /// The state from the newest snapshot and the log after it.
    fn load_from_etcd(&mut self) -> Result<State, StoreError> {
        let (mut state, from) = match self.snapshots()?.last() {
            Some(&seq) => (self.read_snapshot(seq)?, seq),
            None => (State::default(), 0),
        };
        self.seq = from;
        self.head_revision = 0;
        for change in self.read_from(from + 1)? {
            change.replay(&mut state);
        }
        Ok(state)
    }

    /// The changes after `self.seq`, in order, checked for gaps; moves the
    /// position to the newest.
    fn read_from(&mut self, first: u64) -> Result<Vec<Change>, StoreError> {
        let range = self.etcd.range(&self.entry_key(first), &prefix_end(&self.log_prefix()))?;
        let head_key = self.head_key();
        let mut entries = BTreeMap::new();
        let mut head = None;
        for kv in range.kvs {
            if kv.key == head_key {
                let text = String::from_utf8_lossy(&kv.value).into_owned();
                let n: u64 = text.parse().map_err(|_| self.damaged(format!("head is {text:?}")))?;
                head = Some((n, kv.mod_revision));
                continue;
            }
            let entry: Entry = serde_json::from_slice(&kv.value)
                .map_err(|e| self.damaged(format!("{}: {e}", kv.key)))?;
            entries.insert(entry.seq, entry.change);
        }
        let (head_seq, head_revision) = head.unwrap_or((self.seq, self.head_revision));
        let mut changes = Vec::with_capacity(entries.len());
        for (expected, (seq, change)) in (first..).zip(entries) {
            if seq != expected {
                return Err(self.damaged(format!("change {expected} is missing")));
            }
            changes.push(change);
        }
        let newest = first - 1 + changes.len() as u64;
        if head_seq > newest {
            return Err(self.damaged(format!("the head says {head_seq}, the log ends at {newest}")));
        }
        self.seq = newest;
        self.head_revision = head_revision;
        self.revision = range.revision;
        self.stale = false;
        Ok(changes)
    }
}

impl Store for EtcdStore {
    fn load(&mut self) -> Result<State, StoreError> {
        match self.load_from_etcd() {
            Ok(state) => {
                self.cache(&state, true);
                Ok(state)
            }
            Err(e @ StoreError::Etcd(EtcdError::Unreachable { .. })) => self.load_cache(e),
            Err(e) => Err(e),
        }
    }

    fn append(&mut self, change: &Change, state: &State) -> Result<(), StoreError> {
        let seq = self.seq + 1;
        let entry =
            serde_json::to_vec(&Entry { seq, change: change.clone() }).expect("changes serialize");
        let (key, head) = (self.entry_key(seq), self.head_key());
        let seq_text = seq.to_string();
        let (done, revision) = self.etcd.put_if(
            &[ModRevisionIs { key: head.clone(), mod_revision: self.head_revision }],
            &[(&key, &entry, 0), (&head, seq_text.as_bytes(), 0)],
        )?;
        if !done {
            return Err(StoreError::Conflict);
        }
        self.seq = seq;
        self.head_revision = revision;
        self.revision = revision;
        self.cache(state, false);
        if seq.is_multiple_of(self.compact_every) {
            // Committed already: a failed snapshot is retried at the next.
            if let Err(e) = self.compact(state) {
                warn!(error = %e, seq, "cannot write a snapshot of the cluster state to etcd");
            }
        }
        Ok(())
    }

    /// The log in etcd is the state; this refreshes the local copy.
    fn snapshot(&mut self, state: &State) -> Result<(), StoreError> {
        self.cache(state, false);
        Ok(())
    }

    fn pending(&mut self) -> Result<Vec<Change>, StoreError> {
        let behind = self.seq;
        match self.read_from(behind + 1) {
            // Fell behind the compacted log: the newest snapshot and what
            // follows it, as one reset.
            Err(StoreError::Damaged { .. })
                if self.snapshots()?.last().is_some_and(|s| *s > behind) =>
            {
                let state = self.load_from_etcd()?;
                Ok(vec![Change::Reset(Box::new(state))])
            }
            other => other,
        }
    }

    fn position(&self) -> Position {
        Position { seq: self.seq, revision: self.revision }
    }

    fn is_stale(&self) -> bool {
        self.stale
    }
}

#[cfg(test)]
mod tests {
    //! Against a real etcd on loopback (Debian's etcd-server, which
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
        fn start(name: &str) -> Self {
            let dir =
                std::env::temp_dir().join(format!("etcd-store-{name}-{}", std::process::id()));
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
            let etcd = Self { child, dir, url };
            let started = Instant::now();
            while etcd.client().range("/", b"/0").is_err() {
                assert!(started.elapsed() < Duration::from_secs(15), "etcd did not start");
                std::thread::sleep(Duration::from_millis(50));
            }
            etcd
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
        let (mut a, mut b) =
            (EtcdStore::new(etcd.client(), "/t"), EtcdStore::new(etcd.client(), "/t"));
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
        assert_eq!(log.len(), 7 + 1, "entries 6..=12 and the head: {log:?}");
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
            });
            change.replay(&mut state);
            store.append(&change, &state).unwrap();
        }
        etcd.client().put_if(&[], &[("/d/log/00000000000000000002", b"garbage", 0)]).unwrap();
        let err = EtcdStore::new(etcd.client(), "/d").load().unwrap_err();
        assert!(err.to_string().contains("/d/log/00000000000000000002"), "{err}");
    }
}
