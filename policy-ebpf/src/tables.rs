//! The maps behind `policy_common::Tables`, and the effects of a decision.

use policy_common::{
    Verdict,
    decision::{ConnUpdate, Decision, Tables},
    maps::{Attachment, Conn, ConnKey, EPOCH_INDEX, Endpoint, FragmentKey, PairKey, PortRules},
};

use crate::maps::{CGROUPS, CONNTRACK, ENDPOINTS, EPOCH, FRAGMENTS, POLICIES, VERDICTS, VETHS};

pub struct MapTables;

impl Tables for MapTables {
    #[inline(always)]
    fn endpoint(&self, addr: u32) -> Option<Endpoint> {
        // SAFETY: values are read once, by copy; the agent replaces whole
        // elements, it never writes into one in place.
        unsafe { ENDPOINTS.get(addr).copied() }
    }

    #[inline(always)]
    fn port_rules(&self, key: &PairKey) -> Option<&PortRules> {
        // SAFETY: hash map updates swap in a new element (RCU), so the
        // reference stays valid and unchanged for this program run.
        unsafe { POLICIES.get(key) }
    }

    #[inline(always)]
    fn conn(&self, key: &ConnKey) -> Option<Conn> {
        // SAFETY: read by copy.
        unsafe { CONNTRACK.get(key).copied() }
    }

    #[inline(always)]
    fn epoch(&self) -> u32 {
        EPOCH.get(EPOCH_INDEX).copied().unwrap_or(0)
    }

    #[inline(always)]
    fn fragment_allowed(&self, key: &FragmentKey) -> bool {
        // SAFETY: only presence is checked.
        unsafe { FRAGMENTS.get(key).is_some() }
    }
}

#[inline(always)]
pub fn veth_endpoint(ifindex: u32) -> Option<Attachment> {
    // SAFETY: read by copy.
    unsafe { VETHS.get(ifindex).copied() }
}

#[inline(always)]
pub fn cgroup_endpoint(cgroup_id: u64) -> Option<Attachment> {
    // SAFETY: read by copy.
    unsafe { CGROUPS.get(cgroup_id).copied() }
}

/// Counts the verdict under its reason.
#[inline(always)]
pub fn count(verdict: Verdict) -> Verdict {
    if let Some(counter) = VERDICTS.get_ptr_mut(verdict.reason() as u32) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs mid-run.
        unsafe { *counter += 1 };
    }
    verdict
}

/// Performs the map changes a decision asks for, counts it, and returns its
/// verdict. A failed conntrack insert (the map is LRU, so only on memory
/// pressure) still passes the packet: its successor is simply checked again.
#[inline(always)]
pub fn apply(decision: &Decision) -> Verdict {
    match decision.conn {
        ConnUpdate::None => {}
        ConnUpdate::Insert(key, conn) => {
            let _ = CONNTRACK.insert(key, conn, 0);
        }
        ConnUpdate::Remove(key) => {
            let _ = CONNTRACK.remove(key);
        }
    }
    if let Some(key) = decision.record_fragment {
        let _ = FRAGMENTS.insert(key, 1u32, 0);
    }
    count(decision.verdict)
}
