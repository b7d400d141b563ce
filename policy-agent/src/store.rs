//! Durable desired state: one JSON file, replaced atomically (write a
//! temporary file, fsync it, rename it over the old one, fsync the
//! directory), so a crash at any point leaves either the old or the new
//! state, never a torn one.

use std::{
    fs::{self, File},
    io::Write as _,
    path::{Path, PathBuf},
};

use crate::state::State;

pub struct Store {
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("state file {path} is corrupt: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
}

impl Store {
    /// A store in `state_dir` (created if missing).
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        fs::create_dir_all(state_dir).map_err(|source| StoreError::Io {
            what: "create state directory",
            path: state_dir.to_path_buf(),
            source,
        })?;
        Ok(Self { path: state_dir.join("state.json") })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored state, or the empty state if none was ever saved.
    pub fn load(&self) -> Result<State, StoreError> {
        match fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| StoreError::Corrupt { path: self.path.clone(), source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(StoreError::Io { what: "read", path: self.path.clone(), source }),
        }
    }

    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { what, path, source }
        };
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        let mut file = File::create(&tmp).map_err(io("create", &tmp))?;
        file.write_all(&bytes).map_err(io("write", &tmp))?;
        file.sync_all().map_err(io("fsync", &tmp))?;
        fs::rename(&tmp, &self.path).map_err(io("rename into", &self.path))?;
        let dir = self.path.parent().unwrap_or(Path::new("."));
        File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync", dir))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Policy, Protocol};

    #[test]
    fn saves_and_loads() {
        let dir = std::env::temp_dir().join(format!("policy-store-{}", std::process::id()));
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap(), State::default());
        let mut state = State::default();
        state
            .add_policies(
                &[Policy {
                    source: "a".into(),
                    destination: "b".into(),
                    protocol: Protocol::Tcp,
                    start: 1,
                    end: 2,
                }],
                None,
            )
            .unwrap();
        store.save(&state).unwrap();
        assert_eq!(Store::open(&dir).unwrap().load().unwrap(), state);
        fs::write(store.path(), b"{not json").unwrap();
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }
}
