//! The local copy of the cluster state in the state directory:
//!
//! - `cluster-state.json`: `{"seq","log_id","stamp","state"}`, the state
//!   and the newest change it holds, rewritten after changes (at most every
//!   [`super::CACHE_EVERY`] past 10,000 policies);
//! - `cluster-applied.json`: `{"seq","log_id","stamp"}` alone, written
//!   instead where the state's copy was not (a large state between two
//!   copies), so that what this host applied is always known.
//!
//! What this host applied is whichever of the two is further: an agent's
//! position only moves forward (a republish or a superseding log moves it
//! past every change it had).

use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    state::State,
    store::{StoreError, lineage::Applied},
};

pub(super) struct LocalCopy {
    /// `cluster-state.json`.
    state: PathBuf,
    /// `cluster-applied.json`, beside it.
    applied: PathBuf,
    written_at: Option<Instant>,
    /// A write of the state's copy failed (a full disk): the next chance
    /// writes it whole, whatever is due.
    owed: bool,
}

/// Room kept free beyond the copy's own size before a change is committed.
const MARGIN: u64 = 256 << 10;

#[derive(Serialize)]
struct CopyRef<'a> {
    #[serde(flatten)]
    applied: &'a Applied,
    state: crate::state::StoredRef<'a>,
}

#[derive(Deserialize)]
struct Copy {
    #[serde(flatten)]
    applied: Applied,
    state: State,
}

impl LocalCopy {
    pub(super) fn new(state: PathBuf) -> Self {
        let applied = state.with_file_name("cluster-applied.json");
        Self { state, applied, written_at: None, owed: false }
    }

    pub(super) fn path(&self) -> &Path {
        &self.state
    }

    /// The newest change this host applied, if it ever applied one.
    pub(super) fn remembered(&self) -> Option<Applied> {
        // Only the position is parsed out of the state's copy.
        let read = |path: &Path| -> Option<Applied> {
            let bytes = std::fs::read(path).ok()?;
            match serde_json::from_slice(&bytes) {
                Ok(applied) => Some(applied),
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "cannot read what this host applied");
                    None
                }
            }
        };
        match (read(&self.state), read(&self.applied)) {
            (Some(a), Some(b)) => Some(if b.seq > a.seq { b } else { a }),
            (a, b) => a.or(b),
        }
    }

    /// The state's copy and the change it holds (None: there is none).
    pub(super) fn read_state(&self) -> Result<Option<(Applied, State)>, StoreError> {
        let Ok(bytes) = std::fs::read(&self.state) else { return Ok(None) };
        let copy: Copy = serde_json::from_slice(&bytes)
            .map_err(|source| StoreError::Corrupt { path: self.state.clone(), source })?;
        Ok(Some((copy.applied, copy.state)))
    }

    /// Writes the state's copy if it is due (or `now`), else what was
    /// applied alone. Small states are cheap to write after every change;
    /// large ones at most every [`super::CACHE_EVERY`].
    pub(super) fn write(&mut self, applied: &Applied, state: &State, now: bool) {
        let large = state.policy_count() > 10_000;
        let due = now
            || self.owed
            || !large
            || self.written_at.is_none_or(|at| at.elapsed() >= super::CACHE_EVERY);
        let written = if due {
            write_synced(&self.state, &CopyRef { applied, state: state.stored() })
                .inspect(|()| self.written_at = Some(Instant::now()))
        } else {
            write_synced(&self.applied, applied)
        };
        match written {
            Err(e) => {
                warn!(dir = %self.dir().display(), error = %e,
                      "cannot write the local copy of the cluster state; trying again");
                self.owed = true;
            }
            Ok(()) if due && self.owed => {
                info!(path = %self.state.display(), "the local copy of the cluster state is written again");
                self.owed = false;
            }
            Ok(()) => {}
        }
    }

    /// Whether a failed write of the state's copy is still to be made good.
    pub(super) fn owed(&self) -> bool {
        self.owed
    }

    fn dir(&self) -> &Path {
        self.state.parent().unwrap_or(&self.state)
    }

    /// Refuses (ENOSPC, before anything is committed) when the directory
    /// has not room for the copy rewritten with `more` bytes: a change is
    /// acknowledged only if this host can keep what it must.
    pub(super) fn has_room(&self, more: usize) -> std::io::Result<()> {
        let copy = std::fs::metadata(&self.state).map_or(0, |m| m.len());
        let need = copy + more as u64 * 2 + MARGIN;
        let free = free_bytes(self.dir())?;
        if free < need {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        Ok(())
    }
}

/// Bytes an unprivileged writer may still use on `dir`'s filesystem.
fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
    // SAFETY: `path` is NUL-terminated; `stat` is written by the call.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stat.f_bavail as u64 * stat.f_frsize as u64)
}

/// Replaces `path` with `value` as JSON, streamed, synced before the rename.
fn write_synced(path: &Path, value: &impl Serialize) -> std::io::Result<()> {
    policy_api::files::replace_with(path, 0o600, |out| Ok(serde_json::to_writer(out, value)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Policy;

    #[test]
    fn what_was_applied_is_the_further_of_the_two_files() {
        let dir = std::env::temp_dir().join(format!("local-copy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut copy = LocalCopy::new(dir.join("cluster-state.json"));
        assert_eq!(copy.remembered(), None);
        assert!(copy.read_state().unwrap().is_none());
        let mut state = State::default();
        state.insert_policies(&[Policy::tcp("a", "b", 80)]);
        let at = |seq| Applied { seq, log: Some("abc".into()), stamp: Some(seq * 7) };
        copy.write(&at(3), &state, false);
        assert_eq!(copy.remembered(), Some(at(3)));
        assert_eq!(copy.read_state().unwrap(), Some((at(3), state.clone())));
        // A large state between copies: the position alone.
        let large: Vec<Policy> = (1..=10_001).map(|p| Policy::tcp("a", "c", p as u16)).collect();
        let mut big = state.clone();
        big.insert_policies(&large);
        copy.write(&at(4), &big, false);
        copy.write(&at(5), &big, false);
        assert_eq!(copy.remembered(), Some(at(5)));
        assert_eq!(copy.read_state().unwrap().unwrap().0, at(3), "the state's copy lags");
        copy.write(&at(6), &state, true);
        assert_eq!(copy.remembered(), Some(at(6)));
        // A copy from before positions had a log id and stamp.
        std::fs::write(dir.join("cluster-state.json"), br#"{"seq":9,"state":{}}"#).unwrap();
        std::fs::remove_file(dir.join("cluster-applied.json")).unwrap();
        assert_eq!(copy.remembered(), Some(Applied { seq: 9, log: None, stamp: None }));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
