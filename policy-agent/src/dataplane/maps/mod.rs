//! Writing endpoints and policies into the kernel maps.
//!
//! Every write is one map update, so the kernel sees either the old or the
//! new value of an entry, never a mix. Whenever a change takes an allowance
//! away, the epoch is bumped *after* the change, so that tracked connections
//! are checked against the new rules at their next packet (see
//! `policy_common::decision::decide_destination`).
//!
//! Here: opening the maps, `CONFIG` (the overlay, the epoch, the tunnel,
//! settings) and the tunnel's peers. The entries by what they hold:
//! `endpoints` (endpoints, veth and cgroup bindings, both families),
//! `policies` (the port ranges of each app pair), `netin_netout` (NetIn's
//! mappings, NetOut's rules), `counters` (what the programs counted and
//! track), `limits` (the per-address rate limits).

mod batch;
mod counters;
mod endpoints;
mod limits;
mod netin_netout;
mod policies;

use std::{collections::BTreeSet, net::Ipv4Addr, path::Path};

use aya::maps::{
    Array, HashMap, IterableMap as _, Map, MapData, MapError, PerCpuArray, lpm_trie::LpmTrie,
};
use policy_common::{
    maps::{
        Attachment, CONFIG_INDEX, Config, Conn, ConnKey, EndpointValue, EventLimit, FlowSet,
        FlowSet6, FragmentKey, Ipv6Key, NetInConn, NetInConnKey, NetInKey, NetInTarget, Overlay,
        PairKey, PairPorts, PolicyCounters, PortRules, Settings, SmallPortSet, Tunnel, names,
    },
    netout::NetOutRules,
};

pub use counters::{EventStats, FlowCacheStats};
pub use limits::limits_clock_ns;

use super::OverlayNetwork;
use crate::DataplaneError;

/// The dataplane's maps, typed.
pub struct Maps {
    endpoints: HashMap<MapData, u32, EndpointValue>,
    veths: HashMap<MapData, u32, Attachment>,
    cgroups: HashMap<MapData, u64, Attachment>,
    policies: HashMap<MapData, PairKey, PairPorts>,
    port_sets: HashMap<MapData, PairKey, SmallPortSet>,
    port_sets_wide: HashMap<MapData, PairKey, PortRules>,
    /// Pairs whose `PORT_SETS` entry may be no longer needed (see
    /// `forget_port_sets`).
    retired_sets: BTreeSet<PairKey>,
    conntrack: HashMap<MapData, ConnKey, Conn>,
    fragments: HashMap<MapData, FragmentKey, u32>,
    verdicts: PerCpuArray<MapData, u64>,
    event_stats: PerCpuArray<MapData, u64>,
    event_limits: HashMap<MapData, u32, EventLimit>,
    reject_limits: HashMap<MapData, u32, EventLimit>,
    policy_stats: HashMap<MapData, u32, PolicyCounters>,
    peers: HashMap<MapData, u32, u32>,
    netin: HashMap<MapData, NetInKey, NetInTarget>,
    netin_conns: HashMap<MapData, NetInConnKey, NetInConn>,
    netout: LpmTrie<MapData, [u8; 8], NetOutRules>,
    config: Array<MapData, Config>,
    flow_cache: Array<MapData, FlowSet>,
    flow_cache6: Array<MapData, FlowSet6>,
    flow_cache_stats: PerCpuArray<MapData, u64>,
    slots: Array<MapData, EndpointValue>,
    veth_slots: Array<MapData, Attachment>,
    endpoints6: HashMap<MapData, Ipv6Key, EndpointValue>,
    veths6: HashMap<MapData, u32, Ipv6Key>,
    conntrack6: HashMap<MapData, ConnKey<Ipv6Key>, Conn>,
    /// What `Config::overlay` says (read at open, written by `set_overlay`).
    overlay_now: Overlay,
}

/// An address as the maps store it (wire order, see `policy_common::maps`).
pub fn addr_key(addr: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(addr.octets())
}

pub fn addr_from_key(key: u32) -> Ipv4Addr {
    Ipv4Addr::from(key.to_ne_bytes())
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { name, source: Box::new(source) }
}

/// Turns `E2BIG` from an insert into `map` into [`DataplaneError::MapFull`]
/// (its capacity read then: a syscall no successful insert pays).
fn insert_err<'a>(
    name: &'static str,
    map: &'a MapData,
) -> impl Fn(MapError) -> DataplaneError + 'a {
    move |source| match &source {
        MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(libc::E2BIG) => {
            DataplaneError::MapFull { name, capacity: Maps::capacity(map) }
        }
        _ => DataplaneError::Map { name, source: Box::new(source) },
    }
}

/// [`insert_err`] for a batch write that stopped (see `batch::update_all`).
fn batch_err(name: &'static str, map: &MapData, stopped: batch::Stopped) -> DataplaneError {
    let source = MapError::SyscallError(aya::sys::SyscallError {
        call: "bpf_map_update_batch",
        io_error: stopped.error,
    });
    insert_err(name, map)(source)
}

/// The error of a batch delete that stopped.
fn delete_err(name: &'static str, stopped: batch::Stopped) -> DataplaneError {
    let call = "bpf_map_delete_batch";
    map_err(name)(MapError::SyscallError(aya::sys::SyscallError { call, io_error: stopped.error }))
}

fn typed<T: TryFrom<Map, Error = MapError>>(
    map: Map,
    name: &'static str,
) -> Result<T, DataplaneError> {
    T::try_from(map).map_err(map_err(name))
}

impl Maps {
    /// Takes the maps out of a loaded object.
    pub(crate) fn take(ebpf: &mut aya::Ebpf) -> Result<Self, DataplaneError> {
        Self::from_maps(|name| ebpf.take_map(name).ok_or(DataplaneError::MissingMap { name }))
    }

    /// Opens the maps pinned under `maps_dir` without loading any program
    /// (for tools that only read or write entries).
    pub fn open_pinned(maps_dir: &Path) -> Result<Self, DataplaneError> {
        Self::from_maps(|name| {
            let data = MapData::from_pin(maps_dir.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        })
    }

    /// The typed maps, each got by name from `get`.
    fn from_maps(
        mut get: impl FnMut(&'static str) -> Result<Map, DataplaneError>,
    ) -> Result<Self, DataplaneError> {
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
            port_sets: map!(names::PORT_SETS),
            port_sets_wide: map!(names::PORT_SETS_WIDE),
            retired_sets: BTreeSet::new(),
            conntrack: map!(names::CONNTRACK),
            fragments: map!(names::FRAGMENTS),
            verdicts: map!(names::VERDICTS),
            event_stats: map!(names::EVENT_STATS),
            event_limits: map!(names::EVENT_LIMITS),
            reject_limits: map!(names::REJECT_LIMITS),
            policy_stats: map!(names::POLICY_STATS),
            peers: map!(names::PEERS),
            netin: map!(names::NETIN),
            netin_conns: map!(names::NETIN_CONNS),
            netout: map!(names::NETOUT),
            config: map!(names::CONFIG),
            flow_cache: map!(names::FLOW_CACHE),
            flow_cache6: map!(names::FLOW_CACHE6),
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
    pub fn config(&self) -> Result<Config, DataplaneError> {
        self.config.get(&CONFIG_INDEX, 0).map_err(map_err(names::CONFIG))
    }

    /// Writes `CONFIG` whole. The kernel copies the value in place, so a
    /// program may read a mix of the old and the new value: every caller
    /// here changes one field per write (see `set_overlay` for the two
    /// fields that must agree).
    pub fn set_config(&mut self, config: Config) -> Result<(), DataplaneError> {
        self.config.set(CONFIG_INDEX, config, 0).map_err(map_err(names::CONFIG))?;
        self.overlay_now = config.overlay;
        Ok(())
    }

    /// Changes one part of `CONFIG`, keeping the rest as it is.
    fn update_config(&mut self, change: impl FnOnce(&mut Config)) -> Result<(), DataplaneError> {
        let mut config = self.config()?;
        change(&mut config);
        self.set_config(config)
    }

    /// Points `Config::overlay` at `network` and fills its slots from `ENDPOINTS`.
    /// The programs use `ENDPOINTS` alone while the slots are rebuilt, so
    /// every lookup stays right throughout. The slots array keeps the size it
    /// was created with: a larger network than it holds gets slots for its
    /// first addresses only (the rest are hashed).
    pub fn set_overlay(&mut self, network: Option<OverlayNetwork>) -> Result<(), DataplaneError> {
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

    /// Capacity and the bytes the kernel charges for `map` (its
    /// `memlock` in `/proc/self/fdinfo`, what `bpftool` shows as
    /// `bytes_memlock`; 0 if unreadable).
    fn size(map: &MapData) -> (u32, u64) {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let capacity = Self::capacity(map);
        let fd = map.fd().as_fd().as_raw_fd();
        let bytes = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}"))
            .ok()
            .and_then(|info| {
                let line = info.lines().find(|l| l.starts_with("memlock:"))?;
                line["memlock:".len()..].trim().parse().ok()
            })
            .unwrap_or(0);
        (capacity, bytes)
    }

    /// Entries, capacity and kernel bytes of every map (for status).
    /// How many entries a hash map holds (counted in batches; 0 if it
    /// cannot be read).
    fn entries(map: &MapData) -> usize {
        batch::count(map).unwrap_or(0)
    }

    pub fn occupancy(&self) -> Vec<(&'static str, usize, (u32, u64))> {
        vec![
            (
                names::ENDPOINTS,
                Self::entries(self.endpoints.map()),
                Self::size(self.endpoints.map()),
            ),
            (names::VETHS, Self::entries(self.veths.map()), Self::size(self.veths.map())),
            (names::CGROUPS, Self::entries(self.cgroups.map()), Self::size(self.cgroups.map())),
            (names::POLICIES, Self::entries(self.policies.map()), Self::size(self.policies.map())),
            (
                names::PORT_SETS,
                Self::entries(self.port_sets.map()),
                Self::size(self.port_sets.map()),
            ),
            (
                names::PORT_SETS_WIDE,
                Self::entries(self.port_sets_wide.map()),
                Self::size(self.port_sets_wide.map()),
            ),
            (
                names::CONNTRACK,
                Self::entries(self.conntrack.map()),
                Self::size(self.conntrack.map()),
            ),
            (
                names::FRAGMENTS,
                Self::entries(self.fragments.map()),
                Self::size(self.fragments.map()),
            ),
            (
                names::POLICY_STATS,
                Self::entries(self.policy_stats.map()),
                Self::size(self.policy_stats.map()),
            ),
            (
                names::EVENT_LIMITS,
                Self::entries(self.event_limits.map()),
                Self::size(self.event_limits.map()),
            ),
            (
                names::REJECT_LIMITS,
                Self::entries(self.reject_limits.map()),
                Self::size(self.reject_limits.map()),
            ),
        ]
    }

    pub fn epoch(&self) -> Result<u32, DataplaneError> {
        self.config().map(|c| c.epoch)
    }

    /// Makes every tracked connection be checked against policy again at its
    /// next packet.
    pub fn bump_epoch(&mut self) -> Result<(), DataplaneError> {
        self.update_config(|c| c.epoch = c.epoch.wrapping_add(1))
    }

    /// Points the programs at this host's tunnel device (cluster mode).
    pub fn set_tunnel(&mut self, tunnel: Tunnel) -> Result<(), DataplaneError> {
        self.update_config(|c| c.tunnel = tunnel)
    }

    /// Makes `PEERS` exactly `peers` (underlay addresses): adds first, then
    /// removes the hosts that left.
    pub fn set_peers(&mut self, peers: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError> {
        for peer in peers {
            self.peers
                .insert(addr_key(*peer), 1, 0)
                .map_err(insert_err(names::PEERS, self.peers.map()))?;
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

    pub fn set_settings(&mut self, settings: Settings) -> Result<(), DataplaneError> {
        self.update_config(|c| c.settings = settings)
    }

    pub fn settings(&self) -> Result<Settings, DataplaneError> {
        self.config().map(|c| c.settings)
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
