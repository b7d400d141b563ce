//! What the programs counted and track: packets per verdict reason, flow
//! events, packets and bytes per policy (with what connections and the
//! flow cache hold back), the flow cache's fills, tracked connections.

use std::collections::{BTreeSet, HashMap};

use aya::maps::{Array, IterableMap as _, MapData, MapError};
use policy_common::{
    Reason,
    maps::{
        Conn, ConnKey, FlowSet, FlowSet6, Ipv6Key, PolicyCounters, event_stat, flow_cache_stat,
        names, settings,
    },
};

use super::{Maps, batch, batch_err, insert_err, is_absent, map_err};
use crate::DataplaneError;

/// `BPF_NOEXIST`: an update that fails with `EEXIST` rather than replace
/// an entry (include/uapi/linux/bpf.h).
const BPF_NOEXIST: u64 = 1;

/// The flow caches' statistics (`FLOW_CACHE_STATS`, summed over CPUs):
/// established packets each family's cache did not answer (fills) and
/// fills that pushed out a live connection (evictions).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowCacheStats {
    pub fills: u64,
    pub evictions: u64,
    pub fills6: u64,
    pub evictions6: u64,
}

/// Flow event counters (`EVENT_STATS`, summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    pub emitted: u64,
    pub lost: u64,
    pub rate_limited: u64,
}

impl Maps {
    /// Packets per verdict reason, summed over CPUs.
    pub fn verdicts(&self) -> Result<Vec<(Reason, u64)>, DataplaneError> {
        Reason::ALL
            .iter()
            .map(|&reason| {
                let per_cpu =
                    self.verdicts.get(&(reason as u32), 0).map_err(map_err(names::VERDICTS))?;
                Ok((reason, per_cpu.iter().sum()))
            })
            .collect()
    }

    /// Packets counted under one reason, summed over CPUs.
    pub fn verdict_count(&self, reason: Reason) -> Result<u64, DataplaneError> {
        let per_cpu = self.verdicts.get(&(reason as u32), 0).map_err(map_err(names::VERDICTS))?;
        Ok(per_cpu.iter().sum())
    }

    pub fn event_stats(&self) -> Result<EventStats, DataplaneError> {
        let sum = |i: u32| -> Result<u64, DataplaneError> {
            Ok(self.event_stats.get(&i, 0).map_err(map_err(names::EVENT_STATS))?.iter().sum())
        };
        Ok(EventStats {
            emitted: sum(event_stat::EMITTED)?,
            lost: sum(event_stat::LOST)?,
            rate_limited: sum(event_stat::RATE_LIMITED)?,
        })
    }

    /// Packets and bytes per policy: the counters plus what live
    /// connections have counted but not yet moved there (one walk of each
    /// conntrack map and flow cache: for reports, not hot paths).
    pub fn policy_counters_all(&self) -> HashMap<u32, PolicyCounters> {
        let mut all: HashMap<u32, PolicyCounters> =
            super::batch::read_all::<u32, PolicyCounters>(self.policy_stats.map())
                .unwrap_or_else(|_| self.policy_stats.iter().filter_map(Result::ok).collect())
                .into_iter()
                .collect();
        let conns6 = self.connections6().into_iter().map(|(_, conn)| conn);
        for conn in self.connections().into_iter().map(|(_, conn)| conn).chain(conns6) {
            if conn.policy_id != 0 && conn.pending_packets != 0 {
                let entry = all.entry(conn.policy_id).or_default();
                entry.packets += u64::from(conn.pending_packets);
                entry.bytes += conn.pending_bytes;
            }
        }
        let mut add = |policy_id: u32, packets: u16, bytes: u32| {
            if policy_id != 0 && packets != 0 {
                let entry = all.entry(policy_id).or_default();
                entry.packets += u64::from(packets);
                entry.bytes += u64::from(bytes);
            }
        };
        Self::for_each_set(&self.flow_cache, names::FLOW_CACHE, |set: &FlowSet| {
            set.ways.iter().for_each(|w| add(w.policy_id, w.pending_packets, w.pending_bytes));
        });
        Self::for_each_set(&self.flow_cache6, names::FLOW_CACHE6, |set: &FlowSet6| {
            set.ways.iter().for_each(|w| add(w.policy_id, w.pending_packets, w.pending_bytes));
        });
        all
    }

    /// Calls `f` with every set of every CPU's region of a flow cache, read
    /// through a read-only mapping of the array (one pass over it, no
    /// syscall per set). Nothing if it cannot be mapped (the counts then
    /// lack what the cache holds, at most `COUNTER_FLUSH - 1` packets per
    /// connection).
    fn for_each_set<S: aya::Pod>(cache: &Array<MapData, S>, name: &str, mut f: impl FnMut(&S)) {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let sets = Self::capacity(cache.map()) as usize;
        let len = sets * size_of::<S>();
        if len == 0 {
            return;
        }
        let fd = cache.map().fd().as_fd().as_raw_fd();
        // SAFETY: a new read-only shared mapping of the map's fd, unmapped
        // below; nothing else refers to it.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0)
        };
        if base == libc::MAP_FAILED {
            tracing::warn!("cannot map {name}: {}", std::io::Error::last_os_error());
            return;
        }
        for i in 0..sets {
            // SAFETY: within the mapping; the kernel writes the sets
            // concurrently, so each is read by volatile copy.
            let set = unsafe { std::ptr::read_volatile(base.cast::<S>().add(i)) };
            f(&set);
        }
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(base, len) };
    }

    /// Flow cache entries written and live connections they pushed out,
    /// per family, summed over CPUs (see
    /// `policy_common::maps::flow_cache_stat`).
    pub fn flow_cache_stats(&self) -> Result<FlowCacheStats, DataplaneError> {
        let sum = |i: u32| -> Result<u64, DataplaneError> {
            let per_cpu =
                self.flow_cache_stats.get(&i, 0).map_err(map_err(names::FLOW_CACHE_STATS))?;
            Ok(per_cpu.iter().sum())
        };
        Ok(FlowCacheStats {
            fills: sum(flow_cache_stat::FILLS)?,
            evictions: sum(flow_cache_stat::EVICTIONS)?,
            fills6: sum(flow_cache_stat::FILLS6)?,
            evictions6: sum(flow_cache_stat::EVICTIONS6)?,
        })
    }

    /// Packets and bytes one policy let through (see [`Self::policy_counters_all`]).
    pub fn policy_counters(&self, policy_id: u32) -> PolicyCounters {
        self.policy_counters_all().remove(&policy_id).unwrap_or_default()
    }

    /// Whether the programs count packets and bytes per policy (the
    /// `POLICY_COUNTERS` setting); false if `CONFIG` cannot be read.
    pub fn counts_policies(&self) -> bool {
        self.settings().is_ok_and(|s| s.flags & settings::POLICY_COUNTERS != 0)
    }

    /// Policy ids with counters in `POLICY_STATS`.
    pub fn policy_counter_ids(&self) -> Result<BTreeSet<u32>, DataplaneError> {
        let entries = super::batch::read_all::<u32, PolicyCounters>(self.policy_stats.map())
            .map_err(|e| map_err(names::POLICY_STATS)(MapError::IoError(e)))?;
        Ok(entries.into_iter().map(|(id, _)| id).collect())
    }

    /// Zeroed counters for policies that have none, in one syscall: `ids`
    /// are those of new policies (whose ids nothing counts on yet) or of
    /// ones a read found missing, so a counter found there is replaced,
    /// not kept. All or nothing: on error none of them is left.
    pub fn add_new_policy_counters(&mut self, ids: &[u32]) -> Result<(), DataplaneError> {
        let entries: Vec<(u32, PolicyCounters)> =
            ids.iter().map(|id| (*id, PolicyCounters::default())).collect();
        let map = self.policy_stats.map();
        batch::update_all(map, &entries).map_err(|stopped| {
            if let Err(e) = batch::delete_all(map, &ids[..stopped.written]) {
                tracing::warn!(error = %e.error, "cannot take back the counters of a failed write");
            }
            batch_err(names::POLICY_STATS, map, stopped)
        })
    }

    /// Makes zeroed counters for a policy that has none (counters it has
    /// are kept). The programs only add to counters that are there, so a
    /// policy's are made before the policy reaches `POLICIES`.
    pub fn add_policy_counters(&mut self, policy_id: u32) -> Result<(), DataplaneError> {
        match self.policy_stats.insert(policy_id, PolicyCounters::default(), BPF_NOEXIST) {
            Ok(()) => Ok(()),
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                Ok(())
            }
            Err(e) => Err(insert_err(names::POLICY_STATS, self.policy_stats.map())(e)),
        }
    }

    /// Sets a policy's counters (carried over from an older layout).
    pub(crate) fn set_policy_counters(
        &mut self,
        policy_id: u32,
        counters: PolicyCounters,
    ) -> Result<(), DataplaneError> {
        self.policy_stats
            .insert(policy_id, counters, 0)
            .map_err(insert_err(names::POLICY_STATS, self.policy_stats.map()))
    }

    /// Forgets removed policies' counters in batches (ids without any are
    /// passed over).
    pub fn forget_policy_counters(&mut self, ids: &[u32]) -> Result<(), DataplaneError> {
        batch::delete_present(self.policy_stats.map(), ids)
            .map(|_| ())
            .map_err(|stopped| super::delete_err(names::POLICY_STATS, stopped))
    }

    /// Forgets a removed policy's counters (its id is never reused).
    pub fn remove_policy_counters(&mut self, policy_id: u32) -> Result<(), DataplaneError> {
        match self.policy_stats.remove(&policy_id) {
            Ok(()) => Ok(()),
            // None: counting was off when the policy came, or a version
            // before this one never made them.
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(map_err(names::POLICY_STATS)(e)),
        }
    }

    /// Tracked connections (walks the map: for tests and status, not hot paths).
    pub fn connections(&self) -> Vec<(ConnKey, Conn)> {
        super::batch::read_all(self.conntrack.map())
            .unwrap_or_else(|_| self.conntrack.iter().filter_map(Result::ok).collect())
    }

    pub fn connections6(&self) -> Vec<(ConnKey<Ipv6Key>, Conn)> {
        super::batch::read_all(self.conntrack6.map())
            .unwrap_or_else(|_| self.conntrack6.iter().filter_map(Result::ok).collect())
    }

    pub fn fragments_tracked(&self) -> usize {
        self.fragments.keys().filter_map(Result::ok).count()
    }
}
