//! The state whole in etcd: snapshots that compact the log, and the
//! republish that makes this agent's state the newest after the log
//! diverged.

use tracing::{info, warn};

use super::EtcdStore;
use crate::{
    etcd::{ModRevisionIs, Write, prefix_end},
    state::State,
    store::{
        StoreError,
        lineage::{LogId, Republished},
    },
};

/// The largest part of a snapshot (etcd takes requests up to 1.5 MiB).
const SNAPSHOT_PART: usize = 512 << 10;

impl EtcdStore {
    /// The complete snapshots in etcd (those whose `parts` key is written),
    /// oldest first.
    pub(super) fn snapshots(&self) -> Result<Vec<u64>, StoreError> {
        let dir = self.keys.snapshots();
        let keys = self.etcd.keys(&dir, &prefix_end(&dir))?;
        let mut complete: Vec<u64> = keys
            .iter()
            .filter_map(|k| k.strip_prefix(&dir)?.strip_suffix("/parts")?.parse().ok())
            .collect();
        complete.sort_unstable();
        Ok(complete)
    }

    /// The state of the snapshot at `seq`.
    pub(super) fn read_snapshot(&self, seq: u64) -> Result<State, StoreError> {
        let dir = self.keys.snapshot(seq);
        let range = self.etcd.range(&dir, &prefix_end(&dir))?;
        let parts_key = format!("{dir}parts");
        let mut bytes = Vec::new();
        // Part keys sort in order, before `parts`.
        for kv in range.kvs.iter().filter(|kv| kv.key != parts_key) {
            bytes.extend_from_slice(&kv.value);
        }
        serde_json::from_slice(&bytes).map_err(|e| self.damaged(format!("snapshot {seq}: {e}")))
    }

    /// Writes the parts of a snapshot of `state` into the folder `dir`
    /// (without the `parts` key that completes it); returns their count.
    fn write_parts(&self, dir: &str, state: &State) -> Result<usize, StoreError> {
        let bytes = serde_json::to_vec(&state.stored()).expect("the state serializes");
        let parts: Vec<&[u8]> = bytes.chunks(SNAPSHOT_PART).collect();
        for (i, part) in parts.iter().enumerate() {
            self.etcd.put_if(&[], &[(&format!("{dir}{i:06}"), part, 0)])?;
        }
        info!(
            dir,
            parts = parts.len(),
            bytes = bytes.len(),
            "snapshot of the cluster state written to etcd"
        );
        Ok(parts.len())
    }

    /// Writes the state at `self.seq` as a snapshot (parts of at most
    /// [`SNAPSHOT_PART`] bytes, then the `parts` key that completes it), then
    /// drops what the previous snapshot covers: older snapshots and log
    /// entries up to it. An agent less than `compact_every` changes behind
    /// still catches up change by change; one further behind reloads the
    /// newest snapshot.
    pub(super) fn compact(&mut self, state: &State) -> Result<(), StoreError> {
        let seq = self.seq;
        let dir = self.keys.snapshot(seq);
        let count = self.write_parts(&dir, state)?.to_string();
        self.etcd.put_if(&[], &[(&format!("{dir}parts"), count.as_bytes(), 0)])?;
        let older: Vec<u64> = self.snapshots()?.into_iter().filter(|s| *s < seq).collect();
        if let Some(&previous) = older.last() {
            for old in older.iter().filter(|s| **s < previous) {
                let old_dir = self.keys.snapshot(*old);
                self.etcd.delete_range(&old_dir, &prefix_end(&old_dir))?;
            }
            let end = self.keys.entry(previous + 1);
            self.etcd.delete_range(&self.keys.entry(0), end.as_bytes())?;
        }
        Ok(())
    }

    /// Publishes `state` — this agent's, as it enforces it — as the newest
    /// state of the cluster: a snapshot at change N = `floor` + 1 (`floor`:
    /// at least every change any agent reported and etcd's head) that
    /// begins a new log (a new id whose `base` is N), replacing whatever
    /// log etcd holds. Every agent whose newest change is before N takes it
    /// (see [`crate::store::lineage::check`], rule 3) and reconciles its
    /// kernel to it, make-before-break.
    ///
    /// The snapshot's parts are written first (incomplete, so ignored);
    /// then one transaction, on condition that the head and the id are
    /// still what was read (and the head at `expected_head`: what the
    /// caller's checks saw, 0 for none), drops every change and every other
    /// snapshot, completes the snapshot and moves head and id. A concurrent
    /// write fails it ([`StoreError::Conflict`]): nothing changed.
    pub(super) fn republish_state(
        &mut self,
        state: &State,
        floor: u64,
        expected_head: u64,
    ) -> Result<Republished, StoreError> {
        let keys = self.keys.clone();
        let range = self.etcd.range(&keys.head(), &prefix_end(&keys.log()))?;
        let revision_of =
            |key: &str| range.kvs.iter().find(|kv| kv.key == key).map_or(0, |kv| kv.mod_revision);
        let head: u64 = range
            .kvs
            .iter()
            .find(|kv| kv.key == keys.head())
            .and_then(|kv| String::from_utf8_lossy(&kv.value).parse().ok())
            .unwrap_or(0);
        if head != expected_head {
            return Err(StoreError::Conflict);
        }
        let conditions = [
            ModRevisionIs { key: keys.head(), mod_revision: revision_of(&keys.head()) },
            ModRevisionIs { key: keys.log_id(), mod_revision: revision_of(&keys.log_id()) },
        ];
        let seq = floor.max(head).max(self.seq) + 1;
        let log = LogId::new(seq, &self.host);
        let dir = keys.snapshot(seq);
        // Leftovers of an attempt that did not complete would be read as parts.
        self.etcd.delete_range(&dir, &prefix_end(&dir))?;
        let count = self.write_parts(&dir, state)?;
        let snapshots = keys.snapshots();
        let writes = vec![
            Write::DeleteRange { key: keys.entry(0), end: keys.entries_end().into_bytes() },
            Write::DeleteRange { key: snapshots.clone(), end: dir.clone().into_bytes() },
            Write::DeleteRange {
                key: String::from_utf8_lossy(&prefix_end(&dir)).into_owned(),
                end: prefix_end(&snapshots),
            },
            Write::Put {
                key: format!("{dir}parts"),
                value: count.to_string().into_bytes(),
                lease: 0,
            },
            Write::Put { key: keys.head(), value: seq.to_string().into_bytes(), lease: 0 },
            Write::Put {
                key: keys.log_id(),
                value: serde_json::to_vec(&log).expect("ids serialize"),
                lease: 0,
            },
        ];
        let (done, revision) = self.etcd.write_if(&conditions, writes)?;
        if !done {
            warn!(seq, "the log moved while republishing; nothing was published");
            return Err(StoreError::Conflict);
        }
        let previous = self.applied();
        (self.seq, self.stamp, self.log_id) = (seq, None, Some(log.id.clone()));
        (self.head_revision, self.id_revision, self.revision) = (revision, revision, revision);
        self.stale = false;
        self.diverged = None;
        self.remembered = None;
        self.keep_local(state, true);
        info!(
            seq,
            log = log.id,
            from = previous.seq,
            "republished this host's state as the newest"
        );
        Ok(Republished { seq, log, previous })
    }
}
