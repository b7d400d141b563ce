//! Endpoints in the maps: `ENDPOINTS` and its overlay slots, the veth and
//! cgroup bindings the anti-spoofing check reads (`VETHS` and its slots,
//! `CGROUPS`), their IPv6 twins, and the connections of an address gone.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::maps::{IterableMap as _, MapError};
use policy_common::maps::{Attachment, ConnKey, EndpointValue, FragmentKey, Ipv6Key, names};

use super::{Maps, addr_from_key, addr_key, insert_err, is_absent, map_err};
use crate::DataplaneError;

impl Maps {
    /// Registers (or re-tags) an endpoint: `ENDPOINTS` first, then its
    /// overlay slot, so a slot never names an endpoint the hash lacks.
    pub fn set_endpoint(&mut self, addr: Ipv4Addr, tag: u32) -> Result<(), DataplaneError> {
        self.set_endpoint_value(addr, EndpointValue { tag, flags: 0 })
    }

    /// [`Self::set_endpoint`] with flags (an endpoint on another host).
    pub fn set_endpoint_value(
        &mut self,
        addr: Ipv4Addr,
        endpoint: EndpointValue,
    ) -> Result<(), DataplaneError> {
        let tag = endpoint.tag;
        let previous = self.endpoints.get(&addr_key(addr), 0).ok();
        self.endpoints
            .insert(addr_key(addr), endpoint, 0)
            .map_err(insert_err(names::ENDPOINTS, self.endpoints.map()))?;
        if let Some(slot) = self.overlay_now.slot(addr_key(addr)) {
            self.slots.set(slot, endpoint, 0).map_err(map_err(names::ENDPOINT_SLOTS))?;
        }
        if previous.is_some_and(|p| p.tag != tag) {
            // Its connections were allowed for the old app.
            self.bump_epoch()?;
        }
        // On silk's overlay a container may record openings to addresses
        // that are no endpoint as decided by another cell
        // (`origin::DECIDED_ELSEWHERE`, held at any epoch): a new endpoint
        // at such an address of this cell would otherwise take their
        // packets as replies. Forgotten once it is an endpoint (after the
        // insert: no new one is recorded for it from then on).
        if previous.is_none()
            && self.config()?.tunnel.flags & policy_common::maps::tunnel_flags::SILK != 0
        {
            self.forget_address(addr)?;
        }
        Ok(())
    }

    /// Unregisters an endpoint; its tracked connections are checked again
    /// (and now pass as unmanaged or get dropped by the peer's policy).
    pub fn remove_endpoint(&mut self, addr: Ipv4Addr) -> Result<(), DataplaneError> {
        // The slot first: a slot never outlives the hash entry.
        if let Some(slot) = self.overlay_now.slot(addr_key(addr)) {
            self.slots
                .set(slot, EndpointValue::default(), 0)
                .map_err(map_err(names::ENDPOINT_SLOTS))?;
        }
        match self.endpoints.remove(&addr_key(addr)) {
            Ok(()) => self.bump_epoch(),
            Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::ENDPOINTS)(e)),
        }
    }

    pub fn endpoint(&self, addr: Ipv4Addr) -> Option<EndpointValue> {
        self.endpoints.get(&addr_key(addr), 0).ok()
    }

    /// The `ENDPOINTS` or `ENDPOINTS6` entry of an address.
    pub fn endpoint_at(&self, addr: IpAddr) -> Option<EndpointValue> {
        match addr {
            IpAddr::V4(v4) => self.endpoint(v4),
            IpAddr::V6(v6) => self.endpoints6.get(&Ipv6Key::from_octets(v6.octets()), 0).ok(),
        }
    }

    pub fn endpoints(&self) -> Vec<(Ipv4Addr, EndpointValue)> {
        self.endpoints.iter().filter_map(Result::ok).map(|(k, v)| (addr_from_key(k), v)).collect()
    }

    /// Binds a host-side veth to its endpoint, for the anti-spoofing check.
    /// The hash first, its slot (if the ifindex has one) after; a changed
    /// binding's slot is emptied before the hash changes. So a slot is
    /// either empty (the programs then read the hash) or equal to the hash.
    pub fn set_veth(
        &mut self,
        ifindex: u32,
        addr: Ipv4Addr,
        tag: u32,
    ) -> Result<(), DataplaneError> {
        let attachment = Attachment { addr: addr_key(addr), tag };
        let previous = self.veths.get(&ifindex, 0).ok();
        if previous.is_some_and(|p| p != attachment) {
            self.set_veth_slot(ifindex, Attachment::default())?;
        }
        self.veths
            .insert(ifindex, attachment, 0)
            .map_err(insert_err(names::VETHS, self.veths.map()))?;
        self.set_veth_slot(ifindex, attachment)
    }

    fn set_veth_slot(
        &mut self,
        ifindex: u32,
        attachment: Attachment,
    ) -> Result<(), DataplaneError> {
        if ifindex >= Self::capacity(self.veth_slots.map()) {
            return Ok(()); // past the array: the hash alone
        }
        self.veth_slots.set(ifindex, attachment, 0).map_err(map_err(names::VETH_SLOTS))
    }

    /// Fills the slots of every bound veth from `VETHS` (after a start:
    /// heals a slot left empty by a crash between the two writes).
    pub fn fill_veth_slots(&mut self) -> Result<(), DataplaneError> {
        for (ifindex, addr, tag) in self.veths() {
            self.set_veth_slot(ifindex, Attachment { addr: addr_key(addr), tag })?;
        }
        Ok(())
    }

    pub fn remove_veth(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        self.set_veth_slot(ifindex, Attachment::default())?;
        match self.veths.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(map_err(names::VETHS)(e)),
        }
    }

    /// Host-side veth bindings: ifindex → (address, tag).
    pub fn veths(&self) -> Vec<(u32, Ipv4Addr, u32)> {
        self.veths
            .iter()
            .filter_map(Result::ok)
            .map(|(ifindex, a)| (ifindex, addr_from_key(a.addr), a.tag))
            .collect()
    }

    /// Deletes every conntrack and fragment entry naming `addr` (an endpoint
    /// that went away: a new container may get its address), and bumps the
    /// epoch if it deleted any connection, so the CPUs' flow caches stop
    /// answering for them too.
    pub fn forget_address(&mut self, addr: Ipv4Addr) -> Result<usize, DataplaneError> {
        let key = addr_key(addr);
        let conns: Vec<ConnKey> = self
            .conntrack
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.addr_lo == key || k.addr_hi == key)
            .collect();
        let fragments: Vec<FragmentKey> = self
            .fragments
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.saddr == key || k.daddr == key)
            .collect();
        let forgotten = conns.len() + fragments.len();
        let any_conn = !conns.is_empty();
        for k in conns {
            match self.conntrack.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::CONNTRACK)(e)),
            }
        }
        for k in fragments {
            match self.fragments.remove(&k) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(map_err(names::FRAGMENTS)(e)),
            }
        }
        if any_conn {
            self.bump_epoch()?;
        }
        Ok(forgotten)
    }

    /// Binds a cgroup (by id) to its endpoint, for the anti-spoofing check.
    pub fn set_cgroup(
        &mut self,
        cgroup_id: u64,
        addr: Ipv4Addr,
        tag: u32,
    ) -> Result<(), DataplaneError> {
        self.cgroups
            .insert(cgroup_id, Attachment { addr: addr_key(addr), tag }, 0)
            .map_err(insert_err(names::CGROUPS, self.cgroups.map()))
    }

    pub fn remove_cgroup(&mut self, cgroup_id: u64) -> Result<(), DataplaneError> {
        match self.cgroups.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::CGROUPS)(e)),
        }
    }

    /// Registers an endpoint's IPv6 address for app `tag` (`ENDPOINTS6`).
    pub fn set_endpoint6(&mut self, addr: Ipv6Addr, tag: u32) -> Result<(), DataplaneError> {
        self.set_endpoint6_value(addr, EndpointValue { tag, flags: 0 })
    }

    /// [`Self::set_endpoint6`] with the whole value (flags: see
    /// `endpoint_flags`). A changed tag bumps the epoch, as for IPv4.
    pub fn set_endpoint6_value(
        &mut self,
        addr: Ipv6Addr,
        endpoint: EndpointValue,
    ) -> Result<(), DataplaneError> {
        let key = Ipv6Key::from_octets(addr.octets());
        let previous = self.endpoints6.get(&key, 0).ok();
        self.endpoints6
            .insert(key, endpoint, 0)
            .map_err(insert_err(names::ENDPOINTS6, self.endpoints6.map()))?;
        if previous.is_some_and(|p| p.tag != endpoint.tag) {
            self.bump_epoch()?;
        }
        Ok(())
    }

    pub fn endpoints6(&self) -> Vec<(Ipv6Addr, EndpointValue)> {
        self.endpoints6
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv6Addr::from(k.octets()), v))
            .collect()
    }

    pub fn veths6(&self) -> Vec<(u32, Ipv6Addr)> {
        self.veths6
            .iter()
            .filter_map(Result::ok)
            .map(|(ifindex, k)| (ifindex, Ipv6Addr::from(k.octets())))
            .collect()
    }

    /// Unregisters an endpoint's IPv6 address; its connections are checked
    /// again.
    pub fn remove_endpoint6(&mut self, addr: Ipv6Addr) -> Result<(), DataplaneError> {
        match self.endpoints6.remove(&Ipv6Key::from_octets(addr.octets())) {
            Ok(()) => self.bump_epoch(),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(map_err(names::ENDPOINTS6)(e)),
        }
    }

    /// Binds a host-side veth to its endpoint's IPv6 address, for the IPv6
    /// anti-spoofing check (the veth's IPv4 binding, `set_veth`, names the
    /// endpoint; without this one its IPv6 packets are dropped).
    pub fn set_veth6(&mut self, ifindex: u32, addr: Ipv6Addr) -> Result<(), DataplaneError> {
        self.veths6
            .insert(ifindex, Ipv6Key::from_octets(addr.octets()), 0)
            .map_err(insert_err(names::VETHS6, self.veths6.map()))
    }

    pub fn remove_veth6(&mut self, ifindex: u32) -> Result<(), DataplaneError> {
        match self.veths6.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(map_err(names::VETHS6)(e)),
        }
    }
}
