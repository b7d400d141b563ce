//! The maps behind `policy_common::Tables`, and the effects of a decision.

use core::cell::Cell;

use policy_common::{
    Verdict,
    decision::{ConnUpdate, Decision, Tables},
    maps::{
        Attachment, COUNTER_FLUSH, Conn, ConnKey, EPOCH_INDEX, Endpoint, FragmentKey, PairKey,
        PortRules,
    },
};

use crate::maps::{
    CGROUPS, CONNTRACK, ENDPOINT_SLOTS, ENDPOINTS, EPOCH, FRAGMENTS, OVERLAY, POLICIES, VERDICTS,
    VETH_SLOTS, VETHS,
};

/// The maps, remembering where the connection entry the decision read lives,
/// so the packet can be counted in it without a second lookup.
pub struct MapTables {
    found: Cell<*mut Conn>,
}

impl MapTables {
    #[inline(always)]
    pub fn new() -> Self {
        Self { found: Cell::new(core::ptr::null_mut()) }
    }

    /// Counts a packet of an established connection in its entry; every
    /// `COUNTER_FLUSH` packets the count moves to the policy's counters.
    #[inline(always)]
    pub fn count_in_conn(&self, policy_id: u32, len: u32) {
        let conn = self.found.get();
        if conn.is_null() {
            return;
        }
        // SAFETY: the pointer came from a lookup in this program run; hash
        // map elements stay valid for the run (RCU). Concurrent CPUs may
        // race on the counts, which only makes them approximate.
        unsafe {
            (*conn).pending_packets += 1;
            (*conn).pending_bytes += u64::from(len);
            if (*conn).pending_packets >= COUNTER_FLUSH {
                crate::events::add_policy_counts(
                    policy_id,
                    (*conn).pending_packets,
                    (*conn).pending_bytes,
                );
                (*conn).pending_packets = 0;
                (*conn).pending_bytes = 0;
            }
        }
    }
}

impl Tables for MapTables {
    /// In the overlay: an array slot (an inlined access); elsewhere, or
    /// while the loader rebuilds the slots, the hash map.
    #[inline(always)]
    fn endpoint(&self, addr: u32) -> Option<Endpoint> {
        if let Some(slot) = OVERLAY.get(0).and_then(|overlay| overlay.slot(addr)) {
            // A u32 tag read by copy: an update is seen whole or not at all.
            return ENDPOINT_SLOTS.get(slot).copied().filter(|e| e.tag != 0);
        }
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
        let conn = CONNTRACK.get_ptr_mut(key)?;
        self.found.set(conn);
        // SAFETY: read by copy; see `count_in_conn` for the pointer.
        Some(unsafe { *conn })
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
    if let Some(slot) = VETH_SLOTS.get(ifindex).copied().filter(|a| a.tag != 0) {
        return Some(slot);
    }
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
