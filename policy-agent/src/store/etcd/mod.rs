//! The cluster's desired state in etcd: an ordered log of the changes the
//! agents accepted, replayed by every agent.
//!
//! Keys (see [`crate::etcd::keys`]): `log/NNNNNNNNNNNNNNNNNNNN` holds change N,
//! `{"seq":N,"change":...,"stamp":S}` (the record the local journal writes,
//! plus a random stamp); `log/head` is N, the newest; `log/id` the log's
//! identity, written with its first change. The head and id sort after the
//! entries, so one range read returns entries, head and id at one revision.
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
//!
//! Every read of the log is checked against what this agent applied last
//! ([`crate::store::lineage`]): a log that went back, vanished or was
//! replaced is never followed ([`StoreError::Diverged`]) until it is
//! republished ([`EtcdStore::republish`] in `snapshots`).

mod local;
mod snapshots;
#[cfg(test)]
mod tests;

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::{
    etcd::{Etcd, EtcdError, ModRevisionIs, keys::Keys, prefix_end},
    state::State,
    store::{
        COMPACT_EVERY, Change, Position, Store, StoreError,
        lineage::{self, Applied, Divergence, LogId, Republished, Seen, Verdict},
    },
};

/// How often at most the local copy of a large state is rewritten.
pub const CACHE_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Serialize, Deserialize)]
struct Entry {
    seq: u64,
    change: Change,
    /// Random: tells this change from another change `seq` written after
    /// the log went back (see [`lineage::check`], rule 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stamp: Option<u64>,
}

pub struct EtcdStore {
    etcd: Etcd,
    keys: Keys,
    /// This agent's host: named in the identity of a log it begins.
    host: String,
    /// The local copy of the state and of the newest change applied, so an
    /// agent that starts while etcd is unreachable (or diverged) serves
    /// what it last knew, and knows what it applied.
    local: Option<local::LocalCopy>,
    /// Loaded from the local copy, not yet caught up with etcd.
    stale: bool,
    /// Changes applied (the newest one's sequence number).
    seq: u64,
    /// The stamp of change `seq` (None: a snapshot's position, or unknown).
    stamp: Option<u64>,
    /// The identity of the log followed (None: none known yet).
    log_id: Option<String>,
    /// The newest change this host applied, as its local copy remembers
    /// it, where that is past `seq` (a large state's copy lags): checked
    /// against etcd until `seq` reaches it.
    remembered: Option<Applied>,
    /// The head key's mod revision when last seen (0: no head yet).
    head_revision: i64,
    /// The id key's mod revision when last seen (0: no id yet).
    id_revision: i64,
    /// etcd's revision when last read or written.
    revision: i64,
    /// A snapshot of the state is written every this many changes.
    compact_every: u64,
    /// Why the log in etcd is not the one applied (None: it is).
    diverged: Option<Divergence>,
}

/// One read of the log from some change on.
struct LogView {
    entries: BTreeMap<u64, Entry>,
    /// The head and its mod revision.
    head: Option<(u64, i64)>,
    /// The log's identity and its mod revision.
    id: Option<(LogId, i64)>,
    revision: i64,
}

impl LogView {
    /// What the lineage check needs, for an agent that applied `seq`.
    fn seen(&self, seq: u64) -> Seen {
        Seen {
            head: self.head.map(|(n, _)| n),
            log: self.id.as_ref().map(|(id, _)| id.clone()),
            entry: self.entries.get(&seq).map(|e| e.stamp),
        }
    }
}

impl EtcdStore {
    /// A store of the log under `prefix` (e.g. `/policy-agent`).
    pub fn new(etcd: Etcd, prefix: &str) -> Self {
        Self {
            etcd,
            keys: Keys::new(prefix),
            host: String::new(),
            local: None,
            stale: false,
            seq: 0,
            stamp: None,
            log_id: None,
            remembered: None,
            head_revision: 0,
            id_revision: 0,
            revision: 0,
            compact_every: COMPACT_EVERY,
            diverged: None,
        }
    }

    /// Snapshots every `n` changes instead of [`COMPACT_EVERY`].
    pub fn with_compaction(mut self, n: u64) -> Self {
        self.compact_every = n.max(1);
        self
    }

    /// Names `host` as the one that began a log this store begins.
    pub fn with_host(mut self, host: &str) -> Self {
        self.host = host.to_owned();
        self
    }

    /// Keeps a copy of the state at `path` (`cluster-state.json`: written
    /// after each change, at most every [`CACHE_EVERY`] for a large state)
    /// and of the newest change applied (`cluster-applied.json` beside it,
    /// where the state's copy was not written): loaded when etcd cannot be
    /// reached at start, or holds a log that diverged from this host's.
    /// The state held by the local copy at `path`, as written by a store
    /// [`with_cache`](Self::with_cache) (None: none, or unreadable).
    pub fn local_state(path: PathBuf) -> Option<State> {
        local::LocalCopy::new(path).read_state().ok().flatten().map(|(_, state)| state)
    }

    pub fn with_cache(mut self, path: PathBuf) -> Self {
        self.local = Some(local::LocalCopy::new(path));
        self
    }

    /// The key the newest change moves: what followers watch.
    pub fn watched_key(&self) -> String {
        self.keys.head()
    }

    /// The newest change applied, as the lineage check compares it.
    fn applied(&self) -> Applied {
        let current = Applied { seq: self.seq, log: self.log_id.clone(), stamp: self.stamp };
        match &self.remembered {
            Some(remembered) if remembered.seq > current.seq => remembered.clone(),
            _ => current,
        }
    }

    fn damaged(&self, reason: String) -> StoreError {
        StoreError::Damaged {
            what: format!("the change log in etcd under {}", self.keys.prefix()),
            reason,
        }
    }

    /// Marks the log diverged (said once, loudly) and returns the error.
    fn diverge(&mut self, divergence: Divergence) -> StoreError {
        if self.diverged.as_ref() != Some(&divergence) {
            error!(
                cause = divergence.cause(),
                applied = self.applied().seq,
                "{divergence}; enforcement stays as this host last applied it, writes are refused"
            );
            self.diverged = Some(divergence.clone());
        }
        StoreError::Diverged(divergence)
    }

    /// Reads the log from change `first` on: entries, head and id.
    fn read_log(&self, first: u64) -> Result<LogView, StoreError> {
        let range = self.etcd.range(&self.keys.entry(first), &prefix_end(&self.keys.log()))?;
        let (head_key, id_key) = (self.keys.head(), self.keys.log_id());
        let mut view =
            LogView { entries: BTreeMap::new(), head: None, id: None, revision: range.revision };
        for kv in range.kvs {
            if kv.key == head_key {
                let text = String::from_utf8_lossy(&kv.value).into_owned();
                let n = text.parse().map_err(|_| self.damaged(format!("head is {text:?}")))?;
                view.head = Some((n, kv.mod_revision));
            } else if kv.key == id_key {
                let id = serde_json::from_slice(&kv.value)
                    .map_err(|e| self.damaged(format!("{}: {e}", kv.key)))?;
                view.id = Some((id, kv.mod_revision));
            } else if kv.key < self.keys.entries_end() {
                let entry: Entry = serde_json::from_slice(&kv.value)
                    .map_err(|e| self.damaged(format!("{}: {e}", kv.key)))?;
                view.entries.insert(entry.seq, entry);
            }
        }
        Ok(view)
    }

    /// The log from the newest change applied (or the first after `seq`,
    /// where the local copy remembers more than the state holds), and the
    /// lineage check's verdict on it.
    fn read_checked(&self) -> Result<(LogView, Verdict), StoreError> {
        let applied = self.applied();
        let view = self.read_log(applied.seq.min(self.seq + 1).max(1))?;
        let verdict = lineage::check(&applied, &view.seen(applied.seq));
        Ok((view, verdict))
    }

    /// The state from the newest snapshot and the log after it.
    fn load_from_etcd(&mut self) -> Result<State, StoreError> {
        let (mut state, from) = match self.snapshots()?.last() {
            Some(&seq) => (self.read_snapshot(seq)?, seq),
            None => (State::default(), 0),
        };
        self.seq = from;
        self.stamp = None;
        let view = self.read_log(from + 1)?;
        for change in self.follow(view, from + 1)? {
            change.replay(&mut state);
        }
        Ok(state)
    }

    /// The changes from `first` on in `view`, in order, checked for gaps;
    /// moves the position to the newest. Entries past the head are not
    /// committed: left out.
    fn follow(&mut self, view: LogView, first: u64) -> Result<Vec<Change>, StoreError> {
        let (head_seq, head_revision) = view.head.unwrap_or((0, 0));
        let mut changes = Vec::new();
        // The stamp of the change before `first`, if the view holds it
        // (after a snapshot's position, where none was known).
        let mut stamp = view.entries.get(&(first - 1)).map_or(self.stamp, |e| e.stamp);
        for (expected, (seq, entry)) in
            (first..).zip(view.entries.range(first..).take_while(|(seq, _)| **seq <= head_seq))
        {
            if *seq != expected {
                return Err(self.damaged(format!("change {expected} is missing")));
            }
            changes.push(entry.change.clone());
            stamp = entry.stamp;
        }
        let newest = first - 1 + changes.len() as u64;
        if head_seq > newest {
            return Err(self.damaged(format!("the head says {head_seq}, the log ends at {newest}")));
        }
        (self.seq, self.stamp) = (newest, stamp);
        self.head_revision = head_revision;
        match view.id {
            Some((id, revision)) => (self.log_id, self.id_revision) = (Some(id.id), revision),
            None => self.id_revision = 0,
        }
        self.revision = view.revision;
        self.stale = false;
        if self.diverged.take().is_some() {
            info!(seq = self.seq, "the change log in etcd is this host's again: following it");
        }
        Ok(changes)
    }

    /// The state in the local copy, after etcd could not be read (`reason`)
    /// or holds a log that diverged: served until etcd is right again.
    fn load_local(&mut self, reason: StoreError) -> Result<State, StoreError> {
        let Some(local) = &self.local else { return Err(reason) };
        let Some((applied, state)) = local.read_state()? else { return Err(reason) };
        warn!(error = %reason, seq = applied.seq, copy = %local.path().display(),
              "serving the last known cluster state until etcd is right again");
        (self.seq, self.stamp, self.log_id) = (applied.seq, applied.stamp, applied.log);
        self.stale = true;
        // Unknown: the first write conflicts, which makes the agent catch up
        // (from `seq`) before it writes.
        self.head_revision = -1;
        Ok(state)
    }

    /// Writes the local copy if it is due (or `now`).
    fn keep_local(&mut self, state: &State, now: bool) {
        let applied = Applied { seq: self.seq, log: self.log_id.clone(), stamp: self.stamp };
        if let Some(local) = &mut self.local {
            local.write(&applied, state, now);
        }
    }
}

impl Store for EtcdStore {
    fn load(&mut self) -> Result<State, StoreError> {
        // Checked from what the local copy remembers: the whole state is
        // then read from the newest snapshot on.
        let applied =
            self.local.as_ref().and_then(local::LocalCopy::remembered).unwrap_or_default();
        let checked = self
            .read_log(applied.seq.max(1))
            .map(|view| lineage::check(&applied, &view.seen(applied.seq)));
        self.remembered = Some(applied);
        let loaded = match checked {
            Ok(Verdict::Diverged(divergence)) => Err(self.diverge(divergence)),
            Ok(Verdict::Follows | Verdict::Supersedes) => self.load_from_etcd(),
            Err(e) => Err(e),
        };
        match loaded {
            Ok(state) => {
                self.keep_local(&state, true);
                Ok(state)
            }
            Err(
                e @ (StoreError::Etcd(EtcdError::Unreachable { .. }) | StoreError::Diverged(_)),
            ) => self.load_local(e),
            Err(e) => Err(e),
        }
    }

    fn append(&mut self, change: &Change, state: &State) -> Result<(), StoreError> {
        if let Some(divergence) = &self.diverged {
            return Err(StoreError::Diverged(divergence.clone()));
        }
        let seq = self.seq + 1;
        let stamp = rand::random::<u64>();
        let entry = serde_json::to_vec(&Entry { seq, change: change.clone(), stamp: Some(stamp) })
            .expect("changes serialize");
        // Acknowledged means stored here too: no commit this host could not
        // keep in its local copy (507, nothing changed).
        if let Some(local) = &self.local {
            local.has_room(entry.len()).map_err(|source| StoreError::Io {
                what: "keep the local copy",
                path: local.path().to_owned(),
                source,
            })?;
        }
        let (key, head) = (self.keys.entry(seq), self.keys.head());
        let seq_text = seq.to_string();
        let mut conditions =
            vec![ModRevisionIs { key: head.clone(), mod_revision: self.head_revision }];
        let mut puts: Vec<(&str, &[u8], i64)> =
            vec![(key.as_str(), entry.as_slice(), 0), (head.as_str(), seq_text.as_bytes(), 0)];
        // The log's first change (or the first since logs had ids) names it.
        let begun = (self.id_revision == 0).then(|| LogId::new(0, &self.host));
        let id_key = self.keys.log_id();
        let id_json = begun.as_ref().map(|id| serde_json::to_vec(id).expect("ids serialize"));
        if let Some(id_json) = &id_json {
            conditions.push(ModRevisionIs { key: id_key.clone(), mod_revision: 0 });
            puts.push((id_key.as_str(), id_json.as_slice(), 0));
        }
        let (done, revision) = self.etcd.put_if(&conditions, &puts)?;
        if !done {
            return Err(StoreError::Conflict);
        }
        if let Some(begun) = begun {
            info!(log = begun.id, "began the cluster's change log");
            (self.log_id, self.id_revision) = (Some(begun.id), revision);
        }
        (self.seq, self.stamp) = (seq, Some(stamp));
        self.head_revision = revision;
        self.revision = revision;
        self.keep_local(state, false);
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
        self.keep_local(state, false);
        Ok(())
    }

    fn settle(&mut self, state: &State) {
        if self.local.as_ref().is_some_and(local::LocalCopy::owed) {
            self.keep_local(state, true);
        }
    }

    fn pending(&mut self) -> Result<Vec<Change>, StoreError> {
        let behind = self.seq;
        let (view, verdict) = self.read_checked()?;
        match verdict {
            Verdict::Diverged(divergence) => return Err(self.diverge(divergence)),
            Verdict::Supersedes => {
                info!(
                    from = behind,
                    "etcd holds a log republished past this host's state: loading it"
                );
            }
            Verdict::Follows => match self.follow(view, behind + 1) {
                // Fell behind the compacted log: reset as below.
                Err(StoreError::Damaged { .. })
                    if self.snapshots()?.last().is_some_and(|s| *s > behind) => {}
                other => return other,
            },
        }
        // The newest snapshot and what follows it, as one reset.
        let state = self.load_from_etcd()?;
        Ok(vec![Change::Reset(Box::new(state))])
    }

    fn position(&self) -> Position {
        Position { seq: self.seq, revision: self.revision }
    }

    fn is_stale(&self) -> bool {
        self.stale
    }

    fn diverged(&self) -> Option<&Divergence> {
        self.diverged.as_ref()
    }

    fn log_id(&self) -> Option<&str> {
        self.log_id.as_deref()
    }

    fn republish(
        &mut self,
        state: &State,
        floor: u64,
        expected_head: u64,
    ) -> Result<Republished, StoreError> {
        self.republish_state(state, floor, expected_head)
    }
}
