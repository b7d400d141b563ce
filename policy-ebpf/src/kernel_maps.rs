//! The maps behind `policy_common::Lookups`, and the effects of a decision.
//! Counters are in `counting`.

use core::cell::Cell;

use policy_common::{
    Verdict,
    decision::{ConnUpdate, Decision, Lookups},
    maps::{
        Attachment, Conn, ConnKey, EPOCH_INDEX, EndpointValue, FragmentKey, PairKey, PortRules,
    },
};

use crate::{
    counting::count_verdict,
    maps::{
        CGROUPS, CONNTRACK, ENDPOINT_SLOTS, ENDPOINTS, EPOCH, FRAGMENTS, OVERLAY, POLICIES,
        VETH_SLOTS, VETHS,
    },
};

/// The maps, remembering where the connection entry the decision read lives,
/// so the packet can be counted in it without a second lookup.
pub struct KernelMaps {
    found: Cell<*mut Conn>,
}

impl KernelMaps {
    #[inline(always)]
    pub fn new() -> Self {
        Self { found: Cell::new(core::ptr::null_mut()) }
    }

    /// The `CONNTRACK` entry the last `conn` lookup found (null if none).
    #[inline(always)]
    pub fn found_conn(&self) -> *mut Conn {
        self.found.get()
    }
}

impl Lookups for KernelMaps {
    /// In the overlay: an array slot (an inlined access); elsewhere, or
    /// while the loader rebuilds the slots, the hash map.
    #[inline(always)]
    fn endpoint(&self, addr: u32) -> Option<EndpointValue> {
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

/// Writes a conntrack change.
#[inline(always)]
pub fn apply_conn(update: ConnUpdate) {
    match update {
        ConnUpdate::None => {}
        ConnUpdate::Insert(key, conn) => {
            let _ = CONNTRACK.insert(key, conn, 0);
        }
        ConnUpdate::Remove(key) => {
            let _ = CONNTRACK.remove(key);
        }
    }
}

/// Performs the map changes a decision asks for, counts it, and returns its
/// verdict. A failed conntrack insert (the map is LRU, so only on memory
/// pressure) still passes the packet: its successor is simply checked again.
#[inline(always)]
pub fn apply(decision: &Decision) -> Verdict {
    apply_conn(decision.conn);
    if let Some(key) = decision.record_fragment {
        let _ = FRAGMENTS.insert(key, 1u32, 0);
    }
    count_verdict(decision.verdict)
}
