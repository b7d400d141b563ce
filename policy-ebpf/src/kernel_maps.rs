//! The maps behind `policy_common::Lookups`, and the effects of a decision.
//! Counters are in `counting`.

use core::cell::Cell;

use policy_common::{
    Verdict,
    decision::{ConnUpdate, Decision, Lookups, conn_update},
    maps::{
        Attachment, Conn, ConnKey, EndpointValue, FragmentKey, FragmentKey6, Ipv6Key, PairKey,
        PairPorts, PortRules, SmallPortSet,
    },
};

use crate::{
    counting::count_verdict,
    maps::{
        CGROUPS, CONNTRACK, CONNTRACK6, ENDPOINT_SLOTS, ENDPOINTS, ENDPOINTS6, FRAGMENTS,
        FRAGMENTS6, POLICIES, PORT_SETS, PORT_SETS_WIDE, VETH_SLOTS, VETHS, VETHS6, config,
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
        if let Some(slot) = config().and_then(|c| c.overlay.slot(addr)) {
            // A u32 tag read by copy: an update is seen whole or not at all.
            return ENDPOINT_SLOTS.get(slot).copied().filter(|e| e.tag != 0);
        }
        // SAFETY: values are read once, by copy; the agent replaces whole
        // elements, it never writes into one in place.
        unsafe { ENDPOINTS.get(addr).copied() }
    }

    #[inline(always)]
    fn pair_ports(&self, key: &PairKey) -> Option<&PairPorts> {
        // SAFETY: hash map updates swap in a new element (RCU), so the
        // reference stays valid and unchanged for this program run.
        unsafe { POLICIES.get(key) }
    }

    #[inline(always)]
    fn port_set(&self, key: &PairKey) -> Option<&SmallPortSet> {
        // SAFETY: as for `POLICIES`.
        unsafe { PORT_SETS.get(key) }
    }

    #[inline(always)]
    fn wide_port_set(&self, key: &PairKey) -> Option<&PortRules> {
        // SAFETY: as for `POLICIES`.
        unsafe { PORT_SETS_WIDE.get(key) }
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
        config().map_or(0, |c| c.epoch)
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
    match update.kind {
        conn_update::INSERT => {
            let _ = CONNTRACK.insert(update.key, update.conn, 0);
        }
        conn_update::REMOVE => {
            let _ = CONNTRACK.remove(update.key);
        }
        _ => {}
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

/// The IPv6 maps behind `Lookups<Ipv6Key>` (policies and the epoch are
/// shared with IPv4).
pub struct KernelMaps6 {
    found: Cell<*mut Conn>,
}

impl KernelMaps6 {
    #[inline(always)]
    pub fn new() -> Self {
        Self { found: Cell::new(core::ptr::null_mut()) }
    }

    /// The `CONNTRACK6` entry the last `conn` lookup found (null if none).
    #[inline(always)]
    pub fn found_conn(&self) -> *mut Conn {
        self.found.get()
    }
}

impl Lookups<Ipv6Key> for KernelMaps6 {
    #[inline(always)]
    fn endpoint(&self, addr: Ipv6Key) -> Option<EndpointValue> {
        // SAFETY: read by copy; the agent replaces whole elements.
        unsafe { ENDPOINTS6.get(addr).copied() }
    }

    #[inline(always)]
    fn pair_ports(&self, key: &PairKey) -> Option<&PairPorts> {
        // SAFETY: as for IPv4: updates swap in a new element.
        unsafe { POLICIES.get(key) }
    }

    #[inline(always)]
    fn port_set(&self, key: &PairKey) -> Option<&SmallPortSet> {
        // SAFETY: as for IPv4.
        unsafe { PORT_SETS.get(key) }
    }

    #[inline(always)]
    fn wide_port_set(&self, key: &PairKey) -> Option<&PortRules> {
        // SAFETY: as for IPv4.
        unsafe { PORT_SETS_WIDE.get(key) }
    }

    #[inline(always)]
    fn conn(&self, key: &ConnKey<Ipv6Key>) -> Option<Conn> {
        let conn = CONNTRACK6.get_ptr_mut(key)?;
        self.found.set(conn);
        // SAFETY: read by copy; see `count_in_conn` for the pointer.
        Some(unsafe { *conn })
    }

    #[inline(always)]
    fn epoch(&self) -> u32 {
        config().map_or(0, |c| c.epoch)
    }

    #[inline(always)]
    fn fragment_allowed(&self, key: &FragmentKey6) -> bool {
        // SAFETY: only presence is checked.
        unsafe { FRAGMENTS6.get(key).is_some() }
    }
}

/// The IPv6 address of the endpoint behind veth `ifindex`, for the IPv6
/// anti-spoofing check: `::` (which nothing sends from, so every IPv6
/// packet from it is dropped) for an endpoint registered without one; None
/// where no endpoint is.
#[inline(always)]
pub fn veth_endpoint6(ifindex: u32, own4: Option<Attachment>) -> Option<Ipv6Key> {
    // SAFETY: read by copy.
    if let Some(addr) = unsafe { VETHS6.get(ifindex) } {
        return Some(*addr);
    }
    if own4.is_some() { Some(Ipv6Key::default()) } else { None }
}

/// Writes an IPv6 conntrack change.
#[inline(always)]
pub fn apply_conn6(update: ConnUpdate<Ipv6Key>) {
    match update.kind {
        conn_update::INSERT => {
            let _ = CONNTRACK6.insert(update.key, update.conn, 0);
        }
        conn_update::REMOVE => {
            let _ = CONNTRACK6.remove(update.key);
        }
        _ => {}
    }
}

/// [`apply`] for IPv6.
#[inline(always)]
pub fn apply6(decision: &Decision<Ipv6Key>) -> Verdict {
    apply_conn6(decision.conn);
    if let Some(key) = decision.record_fragment {
        let _ = FRAGMENTS6.insert(key, 1u32, 0);
    }
    count_verdict(decision.verdict)
}
