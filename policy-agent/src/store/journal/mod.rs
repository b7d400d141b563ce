//! The local store (single-host mode): a snapshot plus a journal of
//! changes in the state directory.
//!
//! - `journal.jsonl` starts with a header line naming the snapshot it
//!   follows (`policy-agent journal 2 after S`), then one record per
//!   acknowledged change: `SEQ CRC32 {"change":...}`, the checksum covering
//!   the sequence number and the JSON. A record is appended and fsynced
//!   before the API replies; appending costs the same with 10 or 1M policies.
//! - `state.json`: `{"seq":N,"state":...}`, the state after change N, written
//!   every [`COMPACT_EVERY`] changes atomically (temp file, fsync, rename,
//!   fsync the directory) by a thread of its own (`background`): no write
//!   waits for it, appends go on into the journal meanwhile. At the first
//!   append after it is durable (or when the store closes), a new journal
//!   holding the records after N replaces the old one the same way. A crash
//!   in between leaves a journal that starts before the snapshot: loading
//!   skips the records the snapshot holds.
//!
//! Loading reads the snapshot and replays the records after it, and refuses
//! — naming the file and the changes missing — whatever is not a whole,
//! gapless history: a damaged or missing record before the last, a journal
//! that continues after a snapshot newer than the one present (a deleted
//! `state.json`), a journal without its header. Only bytes after the last
//! newline are a torn append (never acknowledged): ignored when loading, cut
//! off before the next append. A failed append is cut back at once, so a
//! write that was answered with an error never reappears; once a record is
//! durable the change is committed even if the snapshot after it fails (the
//! snapshot is tried again later). State files are created 0600.
//!
//! The lines' format is in `records`.

mod background;
mod records;

use std::{
    fs::{self, File, OpenOptions},
    io::{Read as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use background::InFlight;
use records::{HEADER, Read, parse, record};

use super::{COMPACT_EVERY, Change, Store, StoreError, io};
use crate::state::State;

/// Mode of every file the store writes.
const MODE: u32 = 0o600;
/// After a failed snapshot, how long before trying again.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
struct Snapshot {
    seq: u64,
    state: State,
}

/// The local store: a snapshot plus a journal in the state directory.
pub struct Journal {
    dir: PathBuf,
    /// Seq of the last change made durable.
    seq: u64,
    /// Seq the snapshot holds.
    snapshot_seq: u64,
    /// Length of the journal's whole records, when bytes after them (a torn
    /// or failed append) must be cut off before the next append.
    cut_to: Option<u64>,
    /// Whether the journal file exists with its header.
    has_journal: bool,
    /// When the last snapshot failed (not tried again before a while).
    snapshot_failed: Option<Instant>,
    /// The snapshot being written in the background, if any: at most one,
    /// and nothing else rewrites `state.json` or the journal meanwhile.
    in_flight: Option<InFlight>,
    /// Tests: held to keep a background snapshot from starting its work.
    #[cfg(test)]
    hold: Option<std::sync::Arc<std::sync::Mutex<()>>>,
    /// `lock` in the state directory, held exclusively while open: one
    /// writer per state directory (None: a read-only look).
    _lock: Option<File>,
}

impl Journal {
    /// A store in `state_dir` (created if missing).
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(state_dir).map_err(io("create state directory", state_dir))?;
        let lock_path = state_dir.join("lock");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(MODE)
            .open(&lock_path)
            .map_err(io("open", &lock_path))?;
        // SAFETY: flock on a descriptor we own.
        if unsafe {
            libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX | libc::LOCK_NB)
        } != 0
        {
            return Err(StoreError::InUse { dir: state_dir.to_path_buf() });
        }
        let mut store = Self::unlocked(state_dir);
        store._lock = Some(lock);
        Ok(store)
    }

    /// The stored state, read without taking the writer's lock and without
    /// writing anything (for inspection while an agent runs).
    pub fn peek(state_dir: &Path) -> Result<State, StoreError> {
        Self::unlocked(state_dir).load()
    }

    fn unlocked(state_dir: &Path) -> Self {
        Self {
            _lock: None,
            dir: state_dir.to_path_buf(),
            seq: 0,
            snapshot_seq: 0,
            cut_to: None,
            has_journal: false,
            snapshot_failed: None,
            in_flight: None,
            #[cfg(test)]
            hold: None,
        }
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join("journal.jsonl")
    }

    /// The snapshot: (state, seq), or None if there is none.
    fn read_snapshot(&self) -> Result<Option<(State, u64)>, StoreError> {
        let path = self.snapshot_path();
        match fs::read(&path) {
            Ok(bytes) => {
                let s: Snapshot = serde_json::from_slice(&bytes)
                    .map_err(|source| StoreError::Corrupt { path: path.clone(), source })?;
                Ok(Some((s.state, s.seq)))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io("read", &path)(e)),
        }
    }

    /// The journal, parsed up to its first damage; None if there is none.
    fn read_journal(&self) -> Result<Option<Read>, StoreError> {
        let path = self.journal_path();
        let mut bytes = Vec::new();
        match File::open(&path) {
            Ok(mut f) => f.read_to_end(&mut bytes).map_err(io("read", &path))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("read", &path)(e)),
        };
        Ok(Some(parse(&bytes)))
    }

    /// Writes a journal holding its header (after `after`) and `records`
    /// (whole lines, the changes after it) over the old one, atomically.
    /// Only with no snapshot in flight: its thread reads the journal.
    fn fresh_journal(&mut self, after: u64, records: &[u8]) -> Result<(), StoreError> {
        debug_assert!(self.in_flight.is_none(), "the journal is rewritten under a snapshot");
        let path = self.journal_path();
        policy_api::files::replace_with(&path, MODE, |out| {
            out.write_all(format!("{HEADER}{after}\n").as_bytes())?;
            out.write_all(records)
        })
        .map_err(io("write", &path))?;
        sync_dir(&self.dir)?;
        self.has_journal = true;
        self.cut_to = None;
        Ok(())
    }

    /// Appends one record and returns its line; on failure, cuts the
    /// journal back to where it was.
    fn append_record(&mut self, seq: u64, change: &Change) -> Result<Vec<u8>, StoreError> {
        if !self.has_journal {
            self.fresh_journal(self.snapshot_seq, &[])?;
        }
        let path = self.journal_path();
        let mut file =
            OpenOptions::new().write(true).mode(MODE).open(&path).map_err(io("open", &path))?;
        if let Some(len) = self.cut_to {
            file.set_len(len)
                .and_then(|()| file.sync_data())
                .map_err(io("cut the torn tail of", &path))?;
            warn!(path = %path.display(), len, "cut a torn journal tail back to its last whole record");
            self.cut_to = None;
        }
        let len = file.metadata().map_err(io("stat", &path))?.len();
        let line = record(seq, change);
        let written = (|| {
            use std::io::{Seek as _, SeekFrom};
            file.seek(SeekFrom::Start(len))?;
            file.write_all(&line)?;
            file.sync_data()
        })();
        if let Err(e) = written {
            // Not durable, not acknowledged: take the bytes back so that
            // recovery cannot find the change.
            if file.set_len(len).and_then(|()| file.sync_data()).is_err() {
                self.cut_to = Some(len);
            }
            return Err(io("append to", &path)(e));
        }
        Ok(line)
    }

    /// Writes `state`, the state after change `seq`, as the snapshot in
    /// `dir`.
    fn write_snapshot(dir: &Path, seq: u64, state: &State) -> Result<(), StoreError> {
        let path = dir.join("state.json");
        // Streamed from a borrowed view: no copy of a large state in memory.
        #[derive(Serialize)]
        struct SnapshotRef<'a> {
            seq: u64,
            state: crate::state::StoredRef<'a>,
        }
        let snapshot = SnapshotRef { seq, state: state.stored() };
        policy_api::files::replace_with(&path, MODE, |out| {
            Ok(serde_json::to_writer(out, &snapshot)?)
        })
        .map_err(io("write", &path))?;
        sync_dir(dir)
    }

    /// Waits for the snapshot in flight, if any; once it is durable, the
    /// journal is replaced by one that follows it. A failure is a failed
    /// snapshot: warned, tried again later, the journal keeps every change.
    fn finish_snapshot(&mut self) {
        let Some(flight) = self.in_flight.take() else { return };
        let (seq, since, result) = flight.join();
        let done = result.and_then(|()| {
            self.snapshot_seq = seq;
            self.fresh_journal(seq, &since)
        });
        match done {
            Ok(()) => self.snapshot_failed = None,
            Err(e) => {
                warn!(error = %e, "snapshot failed; the journal keeps every change, trying again later");
                self.snapshot_failed = Some(Instant::now());
            }
        }
    }

    /// Rebuilds the stored state from the snapshot and the journal's whole
    /// records up to its first damage (an operator's choice after a refused
    /// start): writes that state as the snapshot and moves the old journal
    /// aside. Returns what was kept.
    pub fn rebuild(state_dir: &Path) -> Result<Rebuilt, StoreError> {
        let mut store = Self::open(state_dir)?;
        let (mut state, snapshot_seq) = store.read_snapshot()?.unwrap_or_default();
        let mut seq = snapshot_seq;
        let mut replayed = 0;
        let mut damage = None;
        let mut moved = None;
        if let Some(read) = store.read_journal()? {
            for (s, change) in read.records {
                if s <= seq {
                    continue;
                }
                if s != seq + 1 {
                    damage = Some(format!("changes {} to {} are missing", seq + 1, s - 1));
                    break;
                }
                change.replay(&mut state);
                seq = s;
                replayed += 1;
            }
            damage = damage.or(read.damage);
            let aside = state_dir.join(format!(
                "journal.jsonl.replaced-{}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs()
            ));
            fs::rename(store.journal_path(), &aside).map_err(io("move aside", &aside))?;
            moved = Some(aside);
        }
        store.seq = seq;
        store.snapshot(&state)?;
        Ok(Rebuilt { snapshot_seq, replayed, seq, damage, moved, state })
    }
}

/// What [`Journal::rebuild`] kept.
pub struct Rebuilt {
    pub snapshot_seq: u64,
    pub replayed: u64,
    pub seq: u64,
    pub damage: Option<String>,
    pub moved: Option<PathBuf>,
    pub state: State,
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))
}

impl Store for Journal {
    /// The stored state: snapshot plus journal (empty if nothing was
    /// stored); refuses a history that is not whole.
    fn load(&mut self) -> Result<State, StoreError> {
        self.finish_snapshot();
        let snapshot = self.read_snapshot()?;
        let has_snapshot = snapshot.is_some();
        let (mut state, snapshot_seq) = snapshot.unwrap_or_default();
        let journal = self.journal_path();
        let damaged = |reason: String| StoreError::Damaged {
            what: journal.display().to_string(),
            reason: format!(
                "{reason}; the agent will not start on a partial state (`policy-agent state \
                 rebuild` keeps the snapshot and the records before the damage)"
            ),
        };
        let mut seq = snapshot_seq;
        let mut legacy = false;
        self.has_journal = false;
        self.cut_to = None;
        if let Some(read) = self.read_journal()? {
            if let Some(damage) = read.damage {
                return Err(damaged(damage));
            }
            if read.after > snapshot_seq {
                return Err(damaged(if has_snapshot {
                    format!(
                        "it continues after change {} but state.json holds changes up to {}",
                        read.after, snapshot_seq
                    )
                } else {
                    format!("it continues after change {} but state.json is missing", read.after)
                }));
            }
            let mut prev: Option<u64> = None;
            for (s, change) in read.records {
                match prev {
                    Some(p) if s != p + 1 => {
                        return Err(damaged(format!(
                            "record {s} follows record {p}: changes {} to {} are missing",
                            p + 1,
                            s.saturating_sub(1)
                        )));
                    }
                    None if !read.legacy && s != read.after + 1 => {
                        return Err(damaged(format!(
                            "its first record is change {s} but its header says it follows change {}",
                            read.after
                        )));
                    }
                    None if read.legacy && s > snapshot_seq + 1 => {
                        return Err(damaged(if has_snapshot {
                            format!(
                                "it starts at change {s} but state.json holds changes up to {snapshot_seq}"
                            )
                        } else {
                            format!("it starts at change {s} but state.json is missing")
                        }));
                    }
                    _ => {}
                }
                prev = Some(s);
                if s > seq {
                    change.replay(&mut state);
                    seq = s;
                }
            }
            if read.whole_len < read.len {
                warn!(
                    path = %journal.display(),
                    bytes = read.len - read.whole_len,
                    "ignoring a torn journal tail (never acknowledged); it is cut off at the next write"
                );
                self.cut_to = Some(read.whole_len);
            }
            self.has_journal = !read.legacy;
            legacy = read.legacy && read.len > 0;
        }
        self.seq = seq;
        self.snapshot_seq = snapshot_seq;
        if legacy && self._lock.is_some() {
            // The first format: rewrite it as a snapshot and a new journal.
            self.snapshot(&state)?;
        }
        Ok(state)
    }

    /// Makes `change` durable; every [`COMPACT_EVERY`] changes a snapshot
    /// is started in the background (from the files: `_state` is not
    /// copied). A failed snapshot does not fail the change: the record is
    /// durable, the snapshot is tried again later.
    fn append(&mut self, change: &Change, _state: &State) -> Result<(), StoreError> {
        let seq = self.seq + 1;
        let line = self.append_record(seq, change)?;
        self.seq = seq;
        if let Some(flight) = &mut self.in_flight {
            flight.since.extend_from_slice(&line);
            if flight.is_finished() {
                self.finish_snapshot();
            }
        }
        let due = self.in_flight.is_none()
            && self.seq - self.snapshot_seq >= COMPACT_EVERY
            && self.snapshot_failed.is_none_or(|t| t.elapsed() >= SNAPSHOT_RETRY);
        if due {
            #[cfg(not(test))]
            let hold = None;
            #[cfg(test)]
            let hold = self.hold.clone();
            match InFlight::start(&self.dir, self.seq, hold) {
                Ok(flight) => self.in_flight = Some(flight),
                Err(e) => {
                    warn!(error = %e, "snapshot failed; the journal keeps every change, trying again later");
                    self.snapshot_failed = Some(Instant::now());
                }
            }
        }
        Ok(())
    }

    /// Writes the snapshot of `state` (at the current seq) here and now,
    /// after the one in flight, then a journal holding only its header.
    fn snapshot(&mut self, state: &State) -> Result<(), StoreError> {
        self.finish_snapshot();
        Self::write_snapshot(&self.dir, self.seq, state)?;
        self.snapshot_seq = self.seq;
        self.fresh_journal(self.seq, &[])
    }
}

impl Drop for Journal {
    /// Waits for the snapshot in flight and rotates the journal after it.
    fn drop(&mut self) {
        self.finish_snapshot();
    }
}

#[cfg(test)]
mod tests;
