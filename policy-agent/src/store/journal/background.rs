//! The snapshot written off the write path: a thread rebuilds the state
//! after change `seq` from the files (the snapshot before it plus the
//! journal's records up to `seq`, all durable before it started) and writes
//! it as `state.json`. Nothing is copied on the write path: at 1M policies
//! a clone of the state costs about as much as writing it (0.4 s), and the
//! agent's copy keeps changing while the snapshot is written.
//!
//! Meanwhile appends go on into the current journal; the records after
//! `seq` are kept here, for the journal that replaces it once the snapshot
//! is durable (see `Journal::finish_snapshot`).

use std::{
    path::{Path, PathBuf},
    thread::JoinHandle,
};

use super::{Journal, StoreError, io};
use crate::state::State;

/// A snapshot being written in the background.
pub(super) struct InFlight {
    /// The change whose state it holds.
    pub(super) seq: u64,
    /// The whole record lines appended since `seq`, in order.
    pub(super) since: Vec<u8>,
    /// The state directory (named if the thread panics).
    dir: PathBuf,
    thread: JoinHandle<Result<(), StoreError>>,
}

impl InFlight {
    /// Starts writing the snapshot at `seq` of the store in `dir`; `hold`
    /// (tests) is locked before the thread reads anything.
    pub(super) fn start(
        dir: &Path,
        seq: u64,
        hold: Option<std::sync::Arc<std::sync::Mutex<()>>>,
    ) -> Result<Self, StoreError> {
        let store_dir = dir.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("snapshot".into())
            .spawn(move || {
                let _held = hold.as_ref().map(|h| h.lock());
                let state = state_at(&store_dir, seq)?;
                Journal::write_snapshot(&store_dir, seq, &state)
            })
            .map_err(io("start the snapshot thread for", dir))?;
        Ok(Self { seq, since: Vec::new(), dir: dir.to_path_buf(), thread })
    }

    pub(super) fn is_finished(&self) -> bool {
        self.thread.is_finished()
    }

    /// Waits for the thread: whether the snapshot at `self.seq` is durable.
    pub(super) fn join(self) -> (u64, Vec<u8>, Result<(), StoreError>) {
        let dir = self.dir;
        let result = self.thread.join().unwrap_or_else(|_| {
            Err(io("write the snapshot in", &dir)(std::io::Error::other(
                "the snapshot thread panicked",
            )))
        });
        (self.seq, self.since, result)
    }
}

/// The state after change `seq`, from the files in `dir`.
fn state_at(dir: &Path, seq: u64) -> Result<State, StoreError> {
    let files = Journal::unlocked(dir);
    let (mut state, mut at) = files.read_snapshot()?.unwrap_or_default();
    let records = files.read_journal()?.map(|read| read.records).unwrap_or_default();
    for (s, change) in records {
        if s > seq {
            break;
        }
        if s == at + 1 {
            change.replay(&mut state);
            at = s;
        }
    }
    if at != seq {
        return Err(StoreError::Damaged {
            what: files.journal_path().display().to_string(),
            reason: format!("the snapshot at change {seq} found the history only up to {at}"),
        });
    }
    Ok(state)
}
