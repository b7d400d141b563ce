//! Writing endpoints and policies into the kernel maps.
//!
//! Every write is one map update, so the kernel sees either the old or the
//! new value of an entry, never a mix. Whenever a change takes an allowance
//! away, the epoch is bumped *after* the change, so that tracked connections
//! are checked against the new rules at their next packet (see
//! `policy_common::decision::decide_destination`).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use aya::maps::{
    Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray, PerCpuHashMap,
    lpm_trie::{Key as LpmKey, LpmTrie},
};
use policy_common::{
    Reason,
    maps::{
        Attachment, CONFIG_INDEX, Config, Conn, ConnKey, EndpointValue, FlowSet, FragmentKey,
        Ipv6Key, NatConn, NatConnKey, NatKey, NatTarget, Overlay, PairKey, PolicyCounters,
        PortRules, Settings, Tunnel, event_stat, flow_cache_stat, names,
    },
    netout::NetOutRules,
    ports::Allowance,
};

use super::OverlayNetwork;
use crate::Error;

/// The dataplane's maps, typed.
pub struct Maps {
    endpoints: HashMap<MapData, u32, EndpointValue>,
    veths: HashMap<MapData, u32, Attachment>,
    cgroups: HashMap<MapData, u64, Attachment>,
    policies: HashMap<MapData, PairKey, PortRules>,
    conntrack: HashMap<MapData, ConnKey, Conn>,
    fragments: HashMap<MapData, FragmentKey, u32>,
    verdicts: PerCpuArray<MapData, u64>,
    event_stats: PerCpuArray<MapData, u64>,
    policy_stats: PerCpuHashMap<MapData, u32, PolicyCounters>,
    peers: HashMap<MapData, u32, u32>,
    netin: HashMap<MapData, NatKey, NatTarget>,
    netin_conns: HashMap<MapData, NatConnKey, NatConn>,
    netout: LpmTrie<MapData, [u8; 8], NetOutRules>,
    config: Array<MapData, Config>,
    flow_cache: Array<MapData, FlowSet>,
    flow_cache_stats: PerCpuArray<MapData, u64>,
    slots: Array<MapData, EndpointValue>,
    veth_slots: Array<MapData, Attachment>,
    endpoints6: HashMap<MapData, Ipv6Key, EndpointValue>,
    veths6: HashMap<MapData, u32, Ipv6Key>,
    conntrack6: HashMap<MapData, ConnKey<Ipv6Key>, Conn>,
    /// What `Config::overlay` says (read at open, written by `set_overlay`).
    overlay_now: Overlay,
}

/// Flow event counters (`EVENT_STATS`, summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventStats {
    pub emitted: u64,
    pub lost: u64,
    pub rate_limited: u64,
}

/// An address as the maps store it (wire order, see `policy_common::maps`).
pub fn addr_key(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn addr_from_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> Error {
    move |source| Error::Map { name, source: Box::new(source) }
}

/// Turns `E2BIG` from an insert into [`Error::MapFull`].
fn insert_err(name: &'static str, capacity: u32) -> impl Fn(MapError) -> Error {
    move |source| match &source {
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
            Error::MapFull { name, capacity }
        }
        _ => Error::Map { name, source: Box::new(source) },
    }
}

fn typed<T: TryFrom<Map, Error = MapError>>(map: Map, name: &'static str) -> Result<T, Error> {
    T::try_from(map).map_err(map_err(name))
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub(crate) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, Error> {
        Self::from_maps(|name| ebpf.take_map(name).ok_or(Error::MissingMap { name }))
    }

    /// Opens the maps pinned under `maps_dir` without loading any program
    /// (for tools that only read or write entries).
    pub fn open_pinned(maps_dir: &Path) -> Result<Self, Error> {
        Self::from_maps(|name| {
            let data = MapData::from_pin(maps_dir.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    /// The typed maps, each got by name from `get`.
    fn from_maps(mut get: impl FnMut(&'static str) -> Result<Map, Error>) -> Result<Self, Error> {
        macro_rules! map {
            ($name:expr) => {
                typed(get($name)?, $name)?
            };
        }
        Ok(Self {
            endpoints: map!(names::ENDPOINTS),
            veths: map!(names::VETHS),
            cgroups: map!(names::CGROUPS),
            policies: map!(names::POLICIES),
            conntrack: map!(names::CONNTRACK),
            fragments: map!(names::FRAGMENTS),
            verdicts: map!(names::VERDICTS),
            event_stats: map!(names::EVENT_STATS),
            policy_stats: map!(names::POLICY_STATS),
            peers: map!(names::PEERS),
            netin: map!(names::NETIN),
            netin_conns: map!(names::NETIN_CONNS),
            netout: map!(names::NETOUT),
            config: map!(names::CONFIG),
            flow_cache: map!(names::FLOW_CACHE),
            flow_cache_stats: map!(names::FLOW_CACHE_STATS),
            slots: map!(names::ENDPOINT_SLOTS),
            veth_slots: map!(names::VETH_SLOTS),
            endpoints6: map!(names::ENDPOINTS6),
            veths6: map!(names::VETHS6),
            conntrack6: map!(names::CONNTRACK6),
            overlay_now: Overlay::default(),
        }
        .with_overlay_read())
    }

    fn with_overlay_read(mut self) -> Self {
        self.overlay_now = self.config().map(|c| c.overlay).unwrap_or_default();
        self
    }

    /// `CONFIG`'s value.
    pub fn config(&self) -> Result<Config, Error> {
        self.config.get(&CONFIG_INDEX, 0).map_err(map_err(names::CONFIG))
    }

    /// Writes `CONFIG` whole. The kernel copies the value in place, so a
    /// program may read a mix of the old and the new value: every caller
    /// here changes one field per write (see `set_overlay` for the two
    /// fields that must agree).
    pub fn set_config(&mut self, config: Config) -> Result<(), Error> {
        self.config.set(CONFIG_INDEX, config, 0).map_err(map_err(names::CONFIG))?;
        self.overlay_now = config.overlay;
        Ok(())
    }

    /// Changes one part of `CONFIG`, keeping the rest as it is.
    fn update_config(&mut self, change: impl FnOnce(&mut Config)) -> Result<(), Error> {
        let mut config = self.config()?;
        change(&mut config);
        self.set_config(config)
    }

    /// Points `Config::overlay` at `network` and fills its slots from `ENDPOINTS`.
    /// The programs use `ENDPOINTS` alone while the slots are rebuilt, so
    /// every lookup stays right throughout. The slots array keeps the size it
    /// was created with: a larger network than it holds gets slots for its
    /// first addresses only (the rest are hashed).
    pub fn set_overlay(&mut self, network: Option<OverlayNetwork>) -> Result<(), Error> {
        let capacity = Self::capacity(self.slots.map());
        let want = network.map_or(Overlay::default(), |n| Overlay {
            base: u32::from(n.network),
            slots: n.slots().min(capacity),
        });
        let old = self.overlay_now;
        self.update_config(|c| c.overlay = Overlay { slots: 0, ..old })?;
        self.overlay_now = Overlay { slots: 0, ..old };
        if old != want {
            // Slots of another network (or none): start from empty.
            for slot in 0..old.slots.min(capacity) {
                self.slots
                    .set(slot, EndpointValue::default(), 0)
                    .map_err(map_err(names::ENDPOINT_SLOTS))?;
            }
        }
        for (addr, endpoint) in self.endpoints() {
            if let Some(slot) = want.slot(addr_key(addr)) {
                self.slots.set(slot, endpoint, 0).map_err(map_err(names::ENDPOINT_SLOTS))?;
            }
        }
        // Base first, then the slot count: no mix of old and new names a
        // slot of the wrong network.
        self.update_config(|c| c.overlay = Overlay { slots: 0, ..want })?;
        self.update_config(|c| c.overlay = want)?;
        self.overlay_now = want;
        Ok(())
    }

    /// The overlay the programs use now.
    pub fn overlay(&self) -> Overlay {
        self.overlay_now
    }

    fn capacity(map: &MapData) -> u32 {
        map.info().map(|i| i.max_entries()).unwrap_or(0)
    }

    /// Registers (or re-tags) an endpoint: `ENDPOINTS` first, then its
    /// overlay slot, so a slot never names an endpoint the hash lacks.
    pub fn set_endpoint(&mut self, addr: Ipv4Addr, tag: u32) -> Result<(), Error> {
        self.set_endpoint_value(addr, EndpointValue { tag, flags: 0 })
    }

    /// [`Self::set_endpoint`] with flags (an endpoint on another host).
    pub fn set_endpoint_value(
        &mut self,
        addr: Ipv4Addr,
        endpoint: EndpointValue,
    ) -> Result<(), Error> {
        let tag = endpoint.tag;
        let previous = self.endpoints.get(&addr_key(addr), 0).ok();
        let capacity = Self::capacity(self.endpoints.map());
        self.endpoints
            .insert(addr_key(addr), endpoint, 0)
            .map_err(insert_err(names::ENDPOINTS, capacity))?;
        if let Some(slot) = self.overlay_now.slot(addr_key(addr)) {
            self.slots.set(slot, endpoint, 0).map_err(map_err(names::ENDPOINT_SLOTS))?;
        }
        if previous.is_some_and(|p| p.tag != tag) {
            // Its connections were allowed for the old app.
            self.bump_epoch()?;
        }
        Ok(())
    }

    /// Unregisters an endpoint; its tracked connections are checked again
    /// (and now pass as unmanaged or get dropped by the peer's policy).
    pub fn remove_endpoint(&mut self, addr: Ipv4Addr) -> Result<(), Error> {
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
    pub fn set_veth(&mut self, ifindex: u32, addr: Ipv4Addr, tag: u32) -> Result<(), Error> {
        let capacity = Self::capacity(self.veths.map());
        let attachment = Attachment { addr: addr_key(addr), tag };
        let previous = self.veths.get(&ifindex, 0).ok();
        if previous.is_some_and(|p| p != attachment) {
            self.set_veth_slot(ifindex, Attachment::default())?;
        }
        self.veths.insert(ifindex, attachment, 0).map_err(insert_err(names::VETHS, capacity))?;
        self.set_veth_slot(ifindex, attachment)
    }

    fn set_veth_slot(&mut self, ifindex: u32, attachment: Attachment) -> Result<(), Error> {
        if ifindex >= Self::capacity(self.veth_slots.map()) {
            return Ok(()); // past the array: the hash alone
        }
        self.veth_slots.set(ifindex, attachment, 0).map_err(map_err(names::VETH_SLOTS))
    }

    /// Fills the slots of every bound veth from `VETHS` (after a start:
    /// heals a slot left empty by a crash between the two writes).
    pub fn fill_veth_slots(&mut self) -> Result<(), Error> {
        for (ifindex, addr, tag) in self.veths() {
            self.set_veth_slot(ifindex, Attachment { addr: addr_key(addr), tag })?;
        }
        Ok(())
    }

    pub fn remove_veth(&mut self, ifindex: u32) -> Result<(), Error> {
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
    pub fn forget_address(&mut self, addr: Ipv4Addr) -> Result<usize, Error> {
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

    /// Entries and capacity of every map (for status).
    pub fn occupancy(&self) -> Vec<(&'static str, usize, u32)> {
        vec![
            (names::ENDPOINTS, self.endpoints.keys().count(), Self::capacity(self.endpoints.map())),
            (names::VETHS, self.veths.keys().count(), Self::capacity(self.veths.map())),
            (names::CGROUPS, self.cgroups.keys().count(), Self::capacity(self.cgroups.map())),
            (names::POLICIES, self.policies.keys().count(), Self::capacity(self.policies.map())),
            (names::CONNTRACK, self.conntrack.keys().count(), Self::capacity(self.conntrack.map())),
            (names::FRAGMENTS, self.fragments.keys().count(), Self::capacity(self.fragments.map())),
        ]
    }

    /// Binds a cgroup (by id) to its endpoint, for the anti-spoofing check.
    pub fn set_cgroup(&mut self, cgroup_id: u64, addr: Ipv4Addr, tag: u32) -> Result<(), Error> {
        let capacity = Self::capacity(self.cgroups.map());
        self.cgroups
            .insert(cgroup_id, Attachment { addr: addr_key(addr), tag }, 0)
            .map_err(insert_err(names::CGROUPS, capacity))
    }

    pub fn remove_cgroup(&mut self, cgroup_id: u64) -> Result<(), Error> {
        match self.cgroups.remove(&cgroup_id) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(names::CGROUPS)(e)),
        }
    }

    /// The `POLICIES` value of a pair.
    pub fn pair_rules(&self, key: &PairKey) -> Option<PortRules> {
        self.policies.get(key, 0).ok()
    }

    /// The allowances stored for a pair (empty if none).
    pub fn pair(&self, key: &PairKey) -> Vec<Allowance> {
        self.policies.get(key, 0).map(|r| r.allowances().collect()).unwrap_or_default()
    }

    /// All pairs and their allowances.
    pub fn pairs(&self) -> Vec<(PairKey, Vec<Allowance>)> {
        self.policies
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, v.allowances().collect()))
            .collect()
    }

    /// Replaces the allowances of one pair in one update. Bumps the epoch if
    /// a port that was allowed no longer is. An error leaves the entry as it
    /// was.
    pub fn set_pair(&mut self, key: PairKey, allowances: &[Allowance]) -> Result<(), Error> {
        let old = self.policies.get(&key, 0).ok();
        if allowances.is_empty() {
            if old.is_some() {
                match self.policies.remove(&key) {
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(e) => return Err(map_err(names::POLICIES)(e)),
                }
                self.bump_epoch()?;
            }
            return Ok(());
        }
        let new = PortRules::build(allowances)?;
        let capacity = Self::capacity(self.policies.map());
        self.policies.insert(key, new, 0).map_err(insert_err(names::POLICIES, capacity))?;
        if old.is_some_and(|old| !new.covers(&old)) {
            self.bump_epoch()?;
        }
        Ok(())
    }

    /// Adds one allowance to a pair (a no-op if the same range is there).
    pub fn allow(&mut self, key: PairKey, allowance: Allowance) -> Result<(), Error> {
        let mut all = self.pair(&key);
        if all.iter().any(|a| a.start == allowance.start && a.end == allowance.end) {
            return Ok(());
        }
        all.push(allowance);
        self.set_pair(key, &all)
    }

    /// Removes the allowance for exactly `start..=end` from a pair (a no-op if
    /// it is not there).
    pub fn revoke(&mut self, key: PairKey, start: u16, end: u16) -> Result<(), Error> {
        let mut all = self.pair(&key);
        let before = all.len();
        all.retain(|a| !(a.start == start && a.end == end));
        if all.len() == before {
            return Ok(());
        }
        self.set_pair(key, &all)
    }

    pub fn epoch(&self) -> Result<u32, Error> {
        self.config().map(|c| c.epoch)
    }

    /// Makes every tracked connection be checked against policy again at its
    /// next packet.
    pub fn bump_epoch(&mut self) -> Result<(), Error> {
        self.update_config(|c| c.epoch = c.epoch.wrapping_add(1))
    }

    /// Packets per verdict reason, summed over CPUs.
    pub fn verdicts(&self) -> Result<Vec<(Reason, u64)>, Error> {
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
    pub fn verdict_count(&self, reason: Reason) -> Result<u64, Error> {
        let per_cpu = self.verdicts.get(&(reason as u32), 0).map_err(map_err(names::VERDICTS))?;
        Ok(per_cpu.iter().sum())
    }

    /// What the programs report.
    /// Points the programs at this host's tunnel device (cluster mode).
    pub fn set_tunnel(&mut self, tunnel: Tunnel) -> Result<(), Error> {
        self.update_config(|c| c.tunnel = tunnel)
    }

    /// Makes `PEERS` exactly `peers` (underlay addresses): adds first, then
    /// removes the hosts that left.
    pub fn set_peers(&mut self, peers: &std::collections::BTreeSet<Ipv4Addr>) -> Result<(), Error> {
        let capacity = self.peers.map().info().map_or(0, |i| i.max_entries());
        for peer in peers {
            self.peers.insert(addr_key(*peer), 1, 0).map_err(insert_err(names::PEERS, capacity))?;
        }
        let gone: Vec<u32> = self
            .peers
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !peers.contains(&addr_from_key(*k)))
            .collect();
        for key in gone {
            self.peers.remove(&key).map_err(map_err(names::PEERS))?;
        }
        Ok(())
    }

    /// Makes `NETIN` hold exactly `wanted` (new entries before the count
    /// the programs check, gone ones after), and forgets the connections
    /// of mappings that are gone.
    pub fn set_netin(
        &mut self,
        wanted: &std::collections::BTreeMap<NatKey, NatTarget>,
    ) -> Result<(), Error> {
        let capacity = self.netin.map().info().map_or(0, |i| i.max_entries());
        for (key, target) in wanted {
            if self.netin.get(key, 0).ok().as_ref() != Some(target) {
                self.netin.insert(*key, *target, 0).map_err(insert_err(names::NETIN, capacity))?;
            }
        }
        let count = u32::try_from(wanted.len()).unwrap_or(u32::MAX);
        if count > 0 {
            self.update_config(|c| c.netin_mappings = count)?;
        }
        let gone: Vec<NatKey> =
            self.netin.keys().filter_map(Result::ok).filter(|k| !wanted.contains_key(k)).collect();
        for key in gone {
            self.netin.remove(&key).map_err(map_err(names::NETIN))?;
        }
        if count == 0 {
            self.update_config(|c| c.netin_mappings = 0)?;
        }
        let targets: std::collections::BTreeSet<(u32, u16)> =
            wanted.values().map(|t| (t.addr, t.port)).collect();
        let stale: Vec<NatConnKey> = self
            .netin_conns
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !targets.contains(&(k.container, k.container_port)))
            .collect();
        for key in stale {
            let _ = self.netin_conns.remove(&key);
        }
        Ok(())
    }

    /// Makes `NETOUT` hold exactly `wanted`; `Config::netout_apps` counts its
    /// apps (new entries before it turns on, gone ones after it turns off).
    pub fn set_netout(
        &mut self,
        wanted: &std::collections::BTreeMap<crate::netout::TrieKey, NetOutRules>,
    ) -> Result<(), Error> {
        let capacity = self.netout.map().info().map_or(0, |i| i.max_entries());
        let have: std::collections::BTreeMap<crate::netout::TrieKey, NetOutRules> = self
            .netout
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| ((k.prefix_len(), k.data()), v))
            .collect();
        for (key, rules) in wanted {
            if have.get(key) != Some(rules) {
                let k = LpmKey::new(key.0, key.1);
                self.netout.insert(&k, rules, 0).map_err(insert_err(names::NETOUT, capacity))?;
            }
        }
        let apps = wanted.keys().filter(|k| k.0 == policy_common::netout::key_prefix(0)).count();
        let apps = u32::try_from(apps).unwrap_or(u32::MAX);
        if apps > 0 {
            self.update_config(|c| c.netout_apps = apps)?;
        }
        for key in have.keys().filter(|k| !wanted.contains_key(k)) {
            let k = LpmKey::new(key.0, key.1);
            self.netout.remove(&k).map_err(map_err(names::NETOUT))?;
        }
        if apps == 0 {
            self.update_config(|c| c.netout_apps = 0)?;
        }
        Ok(())
    }

    /// `NETIN`'s entries.
    pub fn netin(&self) -> Vec<(NatKey, NatTarget)> {
        self.netin.iter().filter_map(Result::ok).collect()
    }

    pub fn set_settings(&mut self, settings: Settings) -> Result<(), Error> {
        self.update_config(|c| c.settings = settings)
    }

    pub fn settings(&self) -> Result<Settings, Error> {
        self.config().map(|c| c.settings)
    }

    pub fn event_stats(&self) -> Result<EventStats, Error> {
        let sum = |i: u32| -> Result<u64, Error> {
            Ok(self.event_stats.get(&i, 0).map_err(map_err(names::EVENT_STATS))?.iter().sum())
        };
        Ok(EventStats {
            emitted: sum(event_stat::EMITTED)?,
            lost: sum(event_stat::LOST)?,
            rate_limited: sum(event_stat::RATE_LIMITED)?,
        })
    }

    /// Packets and bytes per policy: the per-CPU counters plus what live
    /// connections have counted but not yet moved there (one walk of the
    /// conntrack map: for reports, not hot paths).
    pub fn policy_counters_all(&self) -> std::collections::HashMap<u32, PolicyCounters> {
        let mut all: std::collections::HashMap<u32, PolicyCounters> = self
            .policy_stats
            .iter()
            .filter_map(Result::ok)
            .map(|(id, per_cpu)| {
                let sum = per_cpu.iter().fold(PolicyCounters::default(), |acc, c| PolicyCounters {
                    packets: acc.packets + c.packets,
                    bytes: acc.bytes + c.bytes,
                });
                (id, sum)
            })
            .collect();
        for (_, conn) in self.connections() {
            if conn.policy_id != 0 && conn.pending_packets != 0 {
                let entry = all.entry(conn.policy_id).or_default();
                entry.packets += u64::from(conn.pending_packets);
                entry.bytes += conn.pending_bytes;
            }
        }
        self.for_each_cached_flow(|way| {
            if way.policy_id != 0 && way.pending_packets != 0 {
                let entry = all.entry(way.policy_id).or_default();
                entry.packets += u64::from(way.pending_packets);
                entry.bytes += u64::from(way.pending_bytes);
            }
        });
        all
    }

    /// Calls `f` with every way of every CPU's flow cache, read through a
    /// read-only mapping of the array (one pass over it, no syscall per
    /// set). Nothing if it cannot be mapped (the counts then lack what the
    /// cache holds, at most `COUNTER_FLUSH - 1` packets per connection).
    fn for_each_cached_flow(&self, mut f: impl FnMut(&policy_common::maps::CachedFlow)) {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let sets = Self::capacity(self.flow_cache.map()) as usize;
        let len = sets * size_of::<FlowSet>();
        if len == 0 {
            return;
        }
        let fd = self.flow_cache.map().fd().as_fd().as_raw_fd();
        // SAFETY: a new read-only shared mapping of the map's fd, unmapped
        // below; nothing else refers to it.
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_SHARED, fd, 0)
        };
        if base == libc::MAP_FAILED {
            tracing::warn!("cannot map {}: {}", names::FLOW_CACHE, std::io::Error::last_os_error());
            return;
        }
        for i in 0..sets {
            // SAFETY: within the mapping; the kernel writes the sets
            // concurrently, so each is read by volatile copy.
            let set = unsafe { std::ptr::read_volatile(base.cast::<FlowSet>().add(i)) };
            set.ways.iter().for_each(&mut f);
        }
        // SAFETY: the mapping made above, no longer used.
        unsafe { libc::munmap(base, len) };
    }

    /// Flow cache entries written and live connections they pushed out,
    /// summed over CPUs (see `policy_common::maps::flow_cache_stat`).
    pub fn flow_cache_stats(&self) -> Result<(u64, u64), Error> {
        let sum = |i: u32| -> Result<u64, Error> {
            let per_cpu =
                self.flow_cache_stats.get(&i, 0).map_err(map_err(names::FLOW_CACHE_STATS))?;
            Ok(per_cpu.iter().sum())
        };
        Ok((sum(flow_cache_stat::FILLS)?, sum(flow_cache_stat::EVICTIONS)?))
    }

    /// Packets and bytes one policy let through (see [`Self::policy_counters_all`]).
    pub fn policy_counters(&self, policy_id: u32) -> PolicyCounters {
        self.policy_counters_all().remove(&policy_id).unwrap_or_default()
    }

    /// Forgets a removed policy's counters (its id is never reused).
    pub fn remove_policy_counters(&mut self, policy_id: u32) -> Result<(), Error> {
        match self.policy_stats.remove(&policy_id) {
            // A policy no packet matched has no counters yet.
            Ok(()) => Ok(()),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(map_err(names::POLICY_STATS)(e)),
        }
    }

    /// Tracked connections (walks the map: for tests and status, not hot paths).
    pub fn connections(&self) -> Vec<(ConnKey, Conn)> {
        self.conntrack.iter().filter_map(Result::ok).collect()
    }

    /// Registers an endpoint's IPv6 address for app `tag` (`ENDPOINTS6`).
    pub fn set_endpoint6(&mut self, addr: Ipv6Addr, tag: u32) -> Result<(), Error> {
        self.set_endpoint6_value(addr, EndpointValue { tag, flags: 0 })
    }

    /// [`Self::set_endpoint6`] with the whole value (flags: see
    /// `endpoint_flags`). A changed tag bumps the epoch, as for IPv4.
    pub fn set_endpoint6_value(
        &mut self,
        addr: Ipv6Addr,
        endpoint: EndpointValue,
    ) -> Result<(), Error> {
        let key = Ipv6Key::from_octets(addr.octets());
        let previous = self.endpoints6.get(&key, 0).ok();
        let capacity = Self::capacity(self.endpoints6.map());
        self.endpoints6
            .insert(key, endpoint, 0)
            .map_err(insert_err(names::ENDPOINTS6, capacity))?;
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
    pub fn remove_endpoint6(&mut self, addr: Ipv6Addr) -> Result<(), Error> {
        match self.endpoints6.remove(&Ipv6Key::from_octets(addr.octets())) {
            Ok(()) => self.bump_epoch(),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(map_err(names::ENDPOINTS6)(e)),
        }
    }

    /// Binds a host-side veth to its endpoint's IPv6 address, for the IPv6
    /// anti-spoofing check (the veth's IPv4 binding, `set_veth`, names the
    /// endpoint; without this one its IPv6 packets are dropped).
    pub fn set_veth6(&mut self, ifindex: u32, addr: Ipv6Addr) -> Result<(), Error> {
        let capacity = Self::capacity(self.veths6.map());
        self.veths6
            .insert(ifindex, Ipv6Key::from_octets(addr.octets()), 0)
            .map_err(insert_err(names::VETHS6, capacity))
    }

    pub fn remove_veth6(&mut self, ifindex: u32) -> Result<(), Error> {
        match self.veths6.remove(&ifindex) {
            Ok(()) => Ok(()),
            Err(e) if is_absent(&e) => Ok(()),
            Err(e) => Err(map_err(names::VETHS6)(e)),
        }
    }

    pub fn connections6(&self) -> Vec<(ConnKey<Ipv6Key>, Conn)> {
        self.conntrack6.iter().filter_map(Result::ok).collect()
    }

    pub fn fragments_tracked(&self) -> usize {
        self.fragments.keys().filter_map(Result::ok).count()
    }
}

/// Whether a map delete failed only because the key was not there (aya
/// reports that as `KeyNotFound` or as the syscall's ENOENT).
fn is_absent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}
