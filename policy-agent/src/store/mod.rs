//! Durable desired state behind a small seam: the agent loads the state
//! once, then appends each change it accepts (and may ask for a snapshot).
//! `Journal` is the local store; `etcd::EtcdStore`, cluster mode's change
//! log in etcd, plugs in the same way without touching the agent's logic.
//! `lineage` decides whether a shared log is still the one this host
//! applied.
//!
//! The store sits below the agent and cluster mode and imports neither:
//! it uses the etcd client and key names of `crate::etcd`, and the state.

pub mod etcd;
mod journal;
pub mod lineage;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

pub use journal::Journal;
use lineage::{Divergence, Republished};
use serde::{Deserialize, Serialize};

use crate::state::{Endpoint, Policy, State};

/// Where desired state is kept durably.
pub trait Store: Send {
    /// The stored state (empty if nothing was stored yet).
    fn load(&mut self) -> Result<State, StoreError>;
    /// Makes `change` durable before the agent answers; `state` is the state
    /// after it (a store may snapshot it). Once this returns Ok the change is
    /// committed; on error nothing of it may be loaded later.
    fn append(&mut self, change: &Change, state: &State) -> Result<(), StoreError>;
    /// Writes `state` whole (compaction).
    fn snapshot(&mut self, state: &State) -> Result<(), StoreError>;
    /// Makes good what a write could not keep locally (a full disk), if
    /// anything; called whenever the agent catches up.
    fn settle(&mut self, _state: &State) {}
    /// Changes other agents committed since this store last loaded,
    /// appended or caught up, in order (a shared store's; a local store
    /// has none). After a [`StoreError::Conflict`] the agent applies these
    /// and tries its change again.
    fn pending(&mut self) -> Result<Vec<Change>, StoreError> {
        Ok(Vec::new())
    }
    /// Whether the loaded state may be older than what the kernel enforces
    /// (a shared store read from its local copy while the backend was
    /// unreachable): the agent then leaves the kernel as it is until the
    /// store has caught up.
    fn is_stale(&self) -> bool {
        false
    }
    /// How far this store has read: the number of changes, and the
    /// backend's revision (etcd's; 0 for a local store).
    fn position(&self) -> Position {
        Position::default()
    }
    /// Why a shared store's log is not the one this store applied (went
    /// back, vanished, replaced): writes are refused and nothing of it is
    /// applied while it is. None for a local store.
    fn diverged(&self) -> Option<&Divergence> {
        None
    }
    /// The identity of the shared log this store follows.
    fn log_id(&self) -> Option<&str> {
        None
    }
    /// Publishes `state` as the newest state of a shared store, past change
    /// `floor`, if the backend's head is still at `expected_head` (see
    /// `cluster::republish`).
    fn republish(
        &mut self,
        _state: &State,
        _floor: u64,
        _expected_head: u64,
    ) -> Result<Republished, StoreError> {
        Err(StoreError::Unsupported("a local store has no shared log to republish"))
    }
}

/// How far a store has read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Position {
    /// Changes applied, counted from the first.
    pub seq: u64,
    /// The backend's revision when last read or written (etcd's).
    pub revision: i64,
}

/// Changes between snapshots: of the local journal, and of the state in
/// etcd in cluster mode.
pub const COMPACT_EVERY: u64 = 1000;

/// One acknowledged change, as journaled. Replaying it on the state it was
/// made on gives the same state (tags and ids included).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    AddPolicies(Vec<Policy>),
    RemovePolicies(Vec<Policy>),
    AddEndpoint(Endpoint),
    RemoveEndpoint(IpAddr),
    MapRoute {
        app: String,
        hostname: String,
    },
    UnmapRoute {
        app: String,
        hostname: String,
    },
    /// An app's security groups (NetOut) set (Some) or removed (None);
    /// journaled as `set_asgs`, its name before.
    #[serde(rename = "set_asgs")]
    SetNetOut {
        app: String,
        rules: Option<Vec<crate::state::NetOutRule>>,
    },
    /// The policies Cloud Foundry's policy server serves for this host's
    /// apps changed (`[cf]`): policies and tags as it says.
    PolicyServer(crate::state::ServerPolicies),
    /// The whole state, replacing what the agent holds: what a shared store
    /// hands an agent that fell behind its compacted log. Never journaled.
    Reset(Box<State>),
}

impl Change {
    /// Applies the change without the checks the API made when it was
    /// accepted (a per-source limit may have changed since).
    pub fn replay(&self, state: &mut State) {
        match self {
            Change::AddPolicies(p) => state.insert_policies(p),
            Change::RemovePolicies(p) => state.remove_policies(p),
            Change::AddEndpoint(e) => {
                state.add_endpoint(e.clone());
            }
            Change::RemoveEndpoint(ip) => {
                state.remove_endpoint(*ip);
            }
            Change::MapRoute { app, hostname } => {
                let _ = state.map_route(app, hostname);
            }
            Change::UnmapRoute { app, hostname } => {
                let _ = state.unmap_route(app, hostname);
            }
            Change::SetNetOut { app, rules } => state.set_netout(app, rules.clone()),
            Change::PolicyServer(change) => state.follow_server(change),
            Change::Reset(new) => state.reset_to(new),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("stored state {path} is corrupt: {source}")]
    Corrupt { path: PathBuf, source: serde_json::Error },
    #[error("the state directory {dir} is in use by another running agent (or `state rebuild`)")]
    InUse { dir: PathBuf },
    /// Another agent committed a change first: catch up and try again.
    #[error("another agent committed a change at the same time; try again")]
    Conflict,
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    /// The stored history is not a gapless sequence of whole changes.
    #[error("{what} is damaged: {reason}")]
    Damaged { what: String, reason: String },
    /// The shared log is not the one this agent applied: nothing of it is
    /// applied and no write is made until it is republished.
    #[error("{0}")]
    Diverged(Divergence),
    #[error("{0}")]
    Unsupported(&'static str),
}

impl StoreError {
    /// The directory that is full, when the store failed for lack of space.
    pub fn no_space(&self) -> Option<&Path> {
        match self {
            StoreError::Io { path, source, .. }
                if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) =>
            {
                Some(path.parent().unwrap_or(path))
            }
            _ => None,
        }
    }
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { what, path, source }
}
