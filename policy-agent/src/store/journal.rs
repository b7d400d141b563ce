//! The local store (single-host mode): a snapshot plus a journal of
//! changes in the state directory.
//!
//! - `journal.jsonl`: one line per acknowledged change, `{"seq":N,"change":...}`,
//!   appended and fsynced before the API replies. Appending is cheap whatever
//!   the size of the state, so a write costs the same with 10 or 1M policies.
//! - `state.json`: `{"seq":N,"state":...}`, the state after change N, written
//!   every [`COMPACT_EVERY`] changes atomically (temp file, fsync, rename,
//!   fsync the directory); the journal is then emptied.
//!
//! Loading reads the snapshot and replays journal lines with a higher seq. A
//! crash between the snapshot's rename and the journal's truncation leaves
//! lines the snapshot already holds: their seq says so. A crash in the middle
//! of an append leaves a torn last line; it was never acknowledged and is
//! ignored.

use std::{
    fs::{self, File, OpenOptions},
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{COMPACT_EVERY, Change, Store, StoreError, io};
use crate::state::State;

#[derive(Serialize, Deserialize)]
struct Snapshot {
    seq: u64,
    state: State,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    seq: u64,
    change: Change,
}

/// The local store: a snapshot plus a journal in the state directory.
pub struct Journal {
    dir: PathBuf,
    /// Seq of the last change made durable.
    seq: u64,
    /// Seq the snapshot holds.
    snapshot_seq: u64,
}

impl Journal {
    /// A store in `state_dir` (created if missing).
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(state_dir).map_err(io("create state directory", state_dir))?;
        Ok(Self { dir: state_dir.to_path_buf(), seq: 0, snapshot_seq: 0 })
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("journal.jsonl")
    }
}

impl Store for Journal {
    /// The stored state: snapshot plus journal (empty if nothing was stored).
    fn load(&mut self) -> Result<State, StoreError> {
        let snapshot_path = self.snapshot_path();
        let (mut state, snapshot_seq) = match fs::read(&snapshot_path) {
            Ok(bytes) => {
                let s: Snapshot = serde_json::from_slice(&bytes).map_err(|source| {
                    StoreError::Corrupt { path: snapshot_path.clone(), source }
                })?;
                (s.state, s.seq)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (State::default(), 0),
            Err(e) => return Err(io("read", &snapshot_path)(e)),
        };
        let mut seq = snapshot_seq;
        let journal_path = self.journal_path();
        match File::open(&journal_path) {
            Ok(file) => {
                let lines: Vec<String> = BufReader::new(file)
                    .lines()
                    .collect::<Result<_, _>>()
                    .map_err(io("read", &journal_path))?;
                for (i, line) in lines.iter().enumerate() {
                    match serde_json::from_str::<Entry>(line) {
                        Ok(entry) if entry.seq > seq => {
                            entry.change.replay(&mut state);
                            seq = entry.seq;
                        }
                        Ok(_) => {} // already in the snapshot
                        Err(e) if i + 1 == lines.len() => {
                            warn!(error = %e, "ignoring a torn last journal line (never acknowledged)");
                        }
                        Err(source) => {
                            return Err(StoreError::Corrupt { path: journal_path, source });
                        }
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("read", &journal_path)(e)),
        }
        self.seq = seq;
        self.snapshot_seq = snapshot_seq;
        Ok(state)
    }

    /// Makes `change` durable; `state` is the state after it (snapshotted
    /// every [`COMPACT_EVERY`] changes).
    fn append(&mut self, change: &Change, state: &State) -> Result<(), StoreError> {
        let path = self.journal_path();
        let seq = self.seq + 1;
        let mut line =
            serde_json::to_vec(&Entry { seq, change: change.clone() }).expect("changes serialize");
        line.push(b'\n');
        let mut file =
            OpenOptions::new().create(true).append(true).open(&path).map_err(io("open", &path))?;
        file.write_all(&line).map_err(io("append to", &path))?;
        file.sync_data().map_err(io("fsync", &path))?;
        self.seq = seq;
        if self.seq - self.snapshot_seq >= COMPACT_EVERY {
            self.snapshot(state)?;
        }
        Ok(())
    }

    /// Writes the snapshot of `state` (at the current seq) and empties the
    /// journal.
    fn snapshot(&mut self, state: &State) -> Result<(), StoreError> {
        let path = self.snapshot_path();
        let tmp = path.with_extension("json.tmp");
        // Streamed from a borrowed view: no copy of a large state in memory.
        #[derive(Serialize)]
        struct SnapshotRef<'a> {
            seq: u64,
            state: crate::state::StoredRef<'a>,
        }
        let file = File::create(&tmp).map_err(io("create", &tmp))?;
        let mut out = std::io::BufWriter::new(file);
        serde_json::to_writer(&mut out, &SnapshotRef { seq: self.seq, state: state.stored() })
            .map_err(|e| io("write", &tmp)(e.into()))?;
        let file = out.into_inner().map_err(|e| io("write", &tmp)(e.into_error()))?;
        file.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, &path).map_err(io("rename into", &path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(io("fsync", &self.dir))?;
        let journal = self.journal_path();
        match OpenOptions::new().write(true).open(&journal) {
            Ok(f) => {
                f.set_len(0).map_err(io("truncate", &journal))?;
                f.sync_all().map_err(io("fsync", &journal))?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("open", &journal)(e)),
        }
        self.snapshot_seq = self.seq;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    use crate::state::{Endpoint, Policy};

    #[test]
    fn the_borrowed_snapshot_is_the_stored_shape() {
        let mut state = State::default();
        state.add_policies(&[policy(80), policy(81)], None).unwrap();
        state.map_route("b", "b-route").unwrap();
        assert_eq!(
            serde_json::to_value(state.stored()).unwrap(),
            serde_json::to_value(&state).unwrap()
        );
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("policy-store-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn policy(port: u16) -> Policy {
        Policy::tcp("a", "b", port)
    }

    /// Applies `n` changes through a store, as the agent does.
    fn write(store: &mut Journal, state: &mut State, ports: std::ops::Range<u16>) {
        for port in ports {
            let change = Change::AddPolicies(vec![policy(port)]);
            change.replay(state);
            store.append(&change, state).unwrap();
        }
    }

    #[test]
    fn journal_and_snapshots_reload_the_same_state() {
        let dir = temp_dir("reload");
        let mut store = Journal::open(&dir).unwrap();
        let mut state = store.load().unwrap();
        assert_eq!(state, State::default());
        // Past one compaction, then some more.
        write(&mut store, &mut state, 1..(COMPACT_EVERY as u16 + 50));
        let endpoint = Endpoint {
            ip: Ipv4Addr::new(10, 0, 0, 1),
            app: "b".into(),
            ifname: "v".into(),
            netns: None,
            host: None,
        };
        for change in [Change::AddEndpoint(endpoint), Change::RemovePolicies(vec![policy(7)])] {
            change.replay(&mut state);
            store.append(&change, &state).unwrap();
        }
        assert!(fs::metadata(dir.join("state.json")).is_ok(), "compacted");
        assert_eq!(Journal::open(&dir).unwrap().load().unwrap(), state);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_last_line_is_ignored_and_old_lines_are_not_replayed_twice() {
        let dir = temp_dir("torn");
        let mut store = Journal::open(&dir).unwrap();
        let mut state = store.load().unwrap();
        write(&mut store, &mut state, 1..4);
        // A crash between the snapshot's rename and the journal truncation.
        let journal = fs::read(dir.join("journal.jsonl")).unwrap();
        store.snapshot(&state).unwrap();
        fs::write(dir.join("journal.jsonl"), &journal).unwrap();
        // And a torn append.
        let mut f = OpenOptions::new().append(true).open(dir.join("journal.jsonl")).unwrap();
        f.write_all(b"{\"seq\":4,\"change\":{\"add_po").unwrap();
        let reloaded = Journal::open(&dir).unwrap().load().unwrap();
        assert_eq!(reloaded, state);
        // A corrupt line in the middle is an error, not silently skipped.
        fs::write(
            dir.join("journal.jsonl"),
            b"garbage\n{\"seq\":9,\"change\":{\"remove_endpoint\":\"10.0.0.1\"}}\n",
        )
        .unwrap();
        assert!(matches!(Journal::open(&dir).unwrap().load(), Err(StoreError::Corrupt { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
