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
//!   fsync the directory); then a new journal holding only its header
//!   replaces the old one the same way.
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

use std::{
    fs::{self, File, OpenOptions},
    io::{Read as _, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tracing::warn;

use super::{COMPACT_EVERY, Change, Store, StoreError, io};
use crate::state::State;

/// Mode of every file the store writes.
const MODE: u32 = 0o600;
/// The first line of a journal: the snapshot seq it follows is appended.
const HEADER: &str = "policy-agent journal 2 after ";
/// After a failed snapshot, how long before trying again.
const SNAPSHOT_RETRY: Duration = Duration::from_secs(30);

#[derive(Serialize, Deserialize)]
struct Snapshot {
    seq: u64,
    state: State,
}

/// A record's JSON (after its seq and checksum).
#[derive(Serialize, Deserialize)]
struct Body {
    change: Change,
}

/// A journal line of the first format (no checksum), still read.
#[derive(Deserialize)]
struct LegacyEntry {
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
    /// Length of the journal's whole records, when bytes after them (a torn
    /// or failed append) must be cut off before the next append.
    cut_to: Option<u64>,
    /// Whether the journal file exists with its header.
    has_journal: bool,
    /// When the last snapshot failed (not tried again before a while).
    snapshot_failed: Option<Instant>,
    /// `lock` in the state directory, held exclusively while open: one
    /// writer per state directory (None: a read-only look).
    _lock: Option<File>,
}

/// What the journal holds, read and checked.
struct Read {
    /// The snapshot seq the header names (0 for a legacy journal).
    after: u64,
    /// The first format: no header, JSON lines without checksums.
    legacy: bool,
    /// Whole records, in order: (seq, change).
    records: Vec<(u64, Change)>,
    /// Length of the header and whole records.
    whole_len: u64,
    /// File length.
    len: u64,
    /// The first damage found (records stop before it).
    damage: Option<String>,
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
        Ok(Self { _lock: Some(lock), ..Self::unlocked(state_dir) })
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

    /// Writes a journal holding only its header (after `seq`) over the old
    /// one, atomically.
    fn fresh_journal(&mut self, after: u64) -> Result<(), StoreError> {
        let path = self.journal_path();
        crate::files::replace(&path, format!("{HEADER}{after}\n").as_bytes(), MODE)
            .map_err(io("write", &path))?;
        sync_dir(&self.dir)?;
        self.has_journal = true;
        self.cut_to = None;
        Ok(())
    }

    /// Appends one record; on failure, cuts the journal back to where it was.
    fn append_record(&mut self, seq: u64, change: &Change) -> Result<(), StoreError> {
        if !self.has_journal {
            self.fresh_journal(self.snapshot_seq)?;
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
        Ok(())
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

/// A record's line: `SEQ CRC {"change":...}\n`.
fn record(seq: u64, change: &Change) -> Vec<u8> {
    let json = serde_json::to_vec(&Body { change: change.clone() }).expect("changes serialize");
    let crc = checksum(seq, &json);
    let mut line = format!("{seq} {crc:08x} ").into_bytes();
    line.extend_from_slice(&json);
    line.push(b'\n');
    line
}

fn checksum(seq: u64, json: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(seq.to_string().as_bytes());
    h.update(b" ");
    h.update(json);
    h.finalize()
}

/// Parses one whole record line.
fn parse_record(line: &[u8]) -> Result<(u64, Change), String> {
    if line.first() == Some(&b'{') {
        let e: LegacyEntry =
            serde_json::from_slice(line).map_err(|e| format!("not a record: {e}"))?;
        return Ok((e.seq, e.change));
    }
    let mut parts = line.splitn(3, |b| *b == b' ');
    let (Some(seq), Some(crc), Some(json)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("not a record".into());
    };
    let seq: u64 = std::str::from_utf8(seq)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or("not a record (no sequence number)")?;
    let crc = std::str::from_utf8(crc)
        .ok()
        .and_then(|s| u32::from_str_radix(s, 16).ok())
        .ok_or(format!("record {seq} has no checksum"))?;
    if checksum(seq, json) != crc {
        return Err(format!("record {seq} fails its checksum"));
    }
    let body: Body =
        serde_json::from_slice(json).map_err(|e| format!("record {seq} does not parse: {e}"))?;
    Ok((seq, body.change))
}

/// Splits a journal into its header, whole records and torn tail.
fn parse(bytes: &[u8]) -> Read {
    let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let mut read = Read {
        after: 0,
        legacy: bytes.is_empty() || bytes[0] == b'{',
        records: Vec::new(),
        whole_len: whole as u64,
        len: bytes.len() as u64,
        damage: None,
    };
    let mut lines = bytes[..whole].split_inclusive(|b| *b == b'\n').map(|l| &l[..l.len() - 1]);
    let mut line_no = 0;
    if !read.legacy {
        // A journal is created with its header at once (renamed into place).
        let Some(header) = lines.next() else {
            read.damage = Some(if bytes.iter().all(|b| *b == 0) {
                format!("{} NUL bytes and no header line", bytes.len())
            } else {
                "no header line".into()
            });
            return read;
        };
        line_no = 1;
        match std::str::from_utf8(header).ok().and_then(|h| h.strip_prefix(HEADER)?.parse().ok()) {
            Some(after) => read.after = after,
            None => {
                read.damage = Some("line 1 is not the journal's header".into());
                return read;
            }
        }
    }
    for line in lines {
        line_no += 1;
        match parse_record(line) {
            Ok(r) => read.records.push(r),
            Err(e) => {
                read.damage = Some(format!("line {line_no}: {e}"));
                break;
            }
        }
    }
    read
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))
}

impl Store for Journal {
    /// The stored state: snapshot plus journal (empty if nothing was
    /// stored); refuses a history that is not whole.
    fn load(&mut self) -> Result<State, StoreError> {
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

    /// Makes `change` durable; `state` is the state after it (snapshotted
    /// every [`COMPACT_EVERY`] changes). A failed snapshot does not fail
    /// the change: the record is durable, the snapshot is tried again later.
    fn append(&mut self, change: &Change, state: &State) -> Result<(), StoreError> {
        let seq = self.seq + 1;
        self.append_record(seq, change)?;
        self.seq = seq;
        let due = self.seq - self.snapshot_seq >= COMPACT_EVERY
            && self.snapshot_failed.is_none_or(|t| t.elapsed() >= SNAPSHOT_RETRY);
        if due {
            match self.snapshot(state) {
                Ok(()) => self.snapshot_failed = None,
                Err(e) => {
                    warn!(error = %e, "snapshot failed; the journal keeps every change, trying again later");
                    self.snapshot_failed = Some(Instant::now());
                }
            }
        }
        Ok(())
    }

    /// Writes the snapshot of `state` (at the current seq), then a journal
    /// holding only its header.
    fn snapshot(&mut self, state: &State) -> Result<(), StoreError> {
        let path = self.snapshot_path();
        // Streamed from a borrowed view: no copy of a large state in memory.
        #[derive(Serialize)]
        struct SnapshotRef<'a> {
            seq: u64,
            state: crate::state::StoredRef<'a>,
        }
        let snapshot = SnapshotRef { seq: self.seq, state: state.stored() };
        crate::files::replace_with(&path, MODE, |out| Ok(serde_json::to_writer(out, &snapshot)?))
            .map_err(io("write", &path))?;
        sync_dir(&self.dir)?;
        self.snapshot_seq = self.seq;
        self.fresh_journal(self.seq)
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

    /// Applies changes through a store, as the agent does.
    fn write(store: &mut Journal, state: &mut State, ports: std::ops::Range<u16>) {
        for port in ports {
            let change = Change::AddPolicies(vec![policy(port)]);
            change.replay(state);
            store.append(&change, state).unwrap();
        }
    }

    fn journal(dir: &Path) -> PathBuf {
        dir.join("journal.jsonl")
    }

    fn load(dir: &Path) -> Result<State, StoreError> {
        Journal::open(dir).unwrap().load()
    }

    #[test]
    fn one_store_per_state_directory() {
        let dir = temp_dir("lock");
        let first = Journal::open(&dir).unwrap();
        assert!(matches!(Journal::open(&dir), Err(StoreError::InUse { .. })));
        drop(first);
        Journal::open(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    fn refused(dir: &Path) -> String {
        match load(dir) {
            Err(e @ StoreError::Damaged { .. }) => e.to_string(),
            other => panic!("expected a refusal, got {:?}", other.map(|s| s.policy_count())),
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
            ip: Ipv4Addr::new(10, 0, 0, 1).into(),
            ipv6: None,
            app: "b".into(),
            ifname: "v".into(),
            netns: None,
            host: None,
            port_mappings: Vec::new(),
        };
        for change in [Change::AddEndpoint(endpoint), Change::RemovePolicies(vec![policy(7)])] {
            change.replay(&mut state);
            store.append(&change, &state).unwrap();
        }
        assert!(fs::metadata(dir.join("state.json")).is_ok(), "compacted");
        drop(store);
        assert_eq!(load(&dir).unwrap(), state);
        use std::os::unix::fs::PermissionsExt as _;
        for file in ["state.json", "journal.jsonl"] {
            let mode = fs::metadata(dir.join(file)).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_tail_is_ignored_then_cut_before_the_next_append() {
        let dir = temp_dir("torn");
        let mut store = Journal::open(&dir).unwrap();
        let mut state = store.load().unwrap();
        write(&mut store, &mut state, 1..4);
        drop(store);
        for (port, tail) in
            [(100, &b"4 0badc0de {\"change\":{\"add_po"[..]), (101, &[0u8; 700][..])]
        {
            let mut f = OpenOptions::new().append(true).open(journal(&dir)).unwrap();
            f.write_all(tail).unwrap();
            // Loaded without the torn record; the next write is kept.
            let mut store = Journal::open(&dir).unwrap();
            let mut reloaded = store.load().unwrap();
            assert_eq!(reloaded, state);
            write(&mut store, &mut reloaded, port..port + 1);
            write(&mut store, &mut state, port..port + 1);
            drop(store);
            assert_eq!(load(&dir).unwrap(), state, "the write after the torn tail survives");
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_crash_between_snapshot_and_new_journal_replays_nothing_twice() {
        let dir = temp_dir("between");
        let mut store = Journal::open(&dir).unwrap();
        let mut state = store.load().unwrap();
        write(&mut store, &mut state, 1..4);
        let old = fs::read(journal(&dir)).unwrap();
        store.snapshot(&state).unwrap();
        drop(store);
        fs::write(journal(&dir), &old).unwrap();
        assert_eq!(load(&dir).unwrap(), state);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn damaged_histories_are_refused_naming_the_gap() {
        let dir = temp_dir("damaged");
        let mut store = Journal::open(&dir).unwrap();
        let mut state = store.load().unwrap();
        write(&mut store, &mut state, 1..(COMPACT_EVERY as u16 + 5));
        drop(store);
        let good = fs::read(journal(&dir)).unwrap();
        let text = String::from_utf8(good.clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!("{HEADER}{COMPACT_EVERY}"));

        // A middle record deleted.
        let mut cut = lines.clone();
        cut.remove(2);
        fs::write(journal(&dir), cut.join("\n") + "\n").unwrap();
        let e = refused(&dir);
        assert!(
            e.contains("record 1003 follows record 1001: changes 1002 to 1002 are missing"),
            "{e}"
        );

        // A garbled complete last line (one byte changed).
        let mut garbled = good.clone();
        let at = garbled.len() - 10;
        garbled[at] ^= 1;
        fs::write(journal(&dir), &garbled).unwrap();
        let e = refused(&dir);
        assert!(e.contains("line 5: record 1004 fails its checksum"), "{e}");

        // A journal of NUL bytes.
        fs::write(journal(&dir), vec![0u8; good.len()]).unwrap();
        let e = refused(&dir);
        assert!(e.contains("NUL bytes and no header line"), "{e}");

        // The snapshot deleted while the journal follows it.
        fs::write(journal(&dir), &good).unwrap();
        let snapshot = fs::read(dir.join("state.json")).unwrap();
        fs::remove_file(dir.join("state.json")).unwrap();
        let e = refused(&dir);
        assert!(e.contains("continues after change 1000 but state.json is missing"), "{e}");
        assert!(e.contains("journal.jsonl is damaged"), "{e}");

        // Put back, all is well again.
        fs::write(dir.join("state.json"), &snapshot).unwrap();
        assert_eq!(load(&dir).unwrap(), state);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rebuild_keeps_the_snapshot_and_the_records_before_the_damage() {
        let dir = temp_dir("rebuild");
        let mut store = Journal::open(&dir).unwrap();
        let mut state = store.load().unwrap();
        write(&mut store, &mut state, 1..4);
        drop(store);
        let text = fs::read_to_string(journal(&dir)).unwrap();
        let mut lines: Vec<&str> = text.lines().collect();
        lines[2] = "2 00000000 {}";
        fs::write(journal(&dir), lines.join("\n") + "\n").unwrap();
        refused(&dir);
        let rebuilt = Journal::rebuild(&dir).unwrap();
        assert_eq!((rebuilt.snapshot_seq, rebuilt.replayed, rebuilt.seq), (0, 1, 1));
        assert!(rebuilt.damage.unwrap().contains("record 2 fails its checksum"));
        assert!(rebuilt.moved.unwrap().exists());
        let reloaded = load(&dir).unwrap();
        assert_eq!(reloaded.policy_count(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_journal_of_the_first_format_is_read_and_rewritten() {
        let dir = temp_dir("legacy");
        fs::create_dir_all(&dir).unwrap();
        let lines: Vec<String> = (1..4u64)
            .map(|seq| {
                serde_json::json!({"seq": seq, "change": Change::AddPolicies(vec![policy(seq as u16)])})
                    .to_string()
            })
            .collect();
        fs::write(journal(&dir), lines.join("\n") + "\n").unwrap();
        let state = load(&dir).unwrap();
        assert_eq!(state.policy_count(), 3);
        assert!(fs::read_to_string(journal(&dir)).unwrap().starts_with(HEADER));
        assert_eq!(load(&dir).unwrap(), state);
        fs::remove_dir_all(&dir).unwrap();
    }
}
