//! The maps. Capacities here are the defaults; the loader overrides them.
//!
//! The hash maps only the agent writes are not preallocated: their memory
//! follows what is in force (a lookup costs the same either way). The maps
//! the programs write are LRU maps, which the kernel always preallocates.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    btf_maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    macros::btf_map,
};
use policy_common::{
    Parsed, Reason,
    maps::{
        Attachment, CONFIG_INDEX, Config, Conn, ConnKey, EndpointValue, EventLimit, FlowEvent,
        FragmentKey, FragmentKey6, Ipv6Key, NetInConn, NetInConnKey, NetInKey, NetInTarget,
        PairKey, PairPorts, PolicyCounters, PortRules, SmallPortSet, capacity, event_stat,
    },
    netout::NetOutRules,
};

/// Every per-packet setting, in one value (see `policy_common::maps::Config`;
/// written by the agent, all zero until then).
#[btf_map]
pub static CONFIG: Array<Config, 1> = Array::new();

/// This host's `CONFIG` value; None only if the map were empty, which an
/// array of one is not (an inlined array access: no helper call).
#[inline(always)]
pub fn config() -> Option<&'static Config> {
    CONFIG.get(CONFIG_INDEX)
}

/// Whether `daddr` (wire order), which is no endpoint of this host, is
/// another cell's container on Cloud Foundry's silk overlay: in the
/// overlay network, silk's tunnel in use. Such traffic stays in the
/// overlay: the other cell decides it (not NetOut, not this host).
#[inline(always)]
pub fn to_other_cell(daddr: u32) -> bool {
    config().is_some_and(|c| {
        c.tunnel.flags & policy_common::maps::tunnel_flags::SILK != 0
            && c.overlay.slot(daddr).is_some()
    })
}

/// Registered endpoints by address.
#[btf_map]
pub static ENDPOINTS: HashMap<
    u32,
    EndpointValue,
    { capacity::ENDPOINTS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Endpoints in the overlay by address offset (tag 0: none); see
/// `policy_common::maps::Overlay`. Sized by the loader.
#[btf_map]
pub static ENDPOINT_SLOTS: Array<EndpointValue, { capacity::ENDPOINT_SLOTS as usize }> =
    Array::new();

/// Host-side veth ifindex → the endpoint behind it.
#[btf_map]
pub static VETHS: HashMap<
    u32,
    Attachment,
    { capacity::VETHS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// `VETHS` again as an array indexed by ifindex (tag 0: empty), for the
/// source side's lookup of every packet: an inlined array access. Holds a
/// subset of `VETHS` (the agent writes the hash first and clears the slot
/// first); ifindexes past its end and empty slots fall back to the hash.
#[btf_map]
pub static VETH_SLOTS: Array<Attachment, { capacity::VETHS as usize }> = Array::new();

/// cgroup id → the endpoint whose workloads it holds.
#[btf_map]
pub static CGROUPS: HashMap<
    u64,
    Attachment,
    { capacity::CGROUPS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// (source tag, destination tag, protocol) → the pair's port ranges, or
/// how many it has (see `PairPorts`). Not preallocated: memory follows the
/// pairs in force, 24 bytes of value each.
#[btf_map]
pub static POLICIES: HashMap<
    PairKey,
    PairPorts,
    { capacity::POLICIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// The port ranges of the pairs with three to `SET_RANGES`, under their
/// `POLICIES` key. Not preallocated.
#[btf_map]
pub static PORT_SETS: HashMap<
    PairKey,
    SmallPortSet,
    { capacity::PORT_SETS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// The port ranges of the pairs with more. Not preallocated.
#[btf_map]
pub static PORT_SETS_WIDE: HashMap<
    PairKey,
    PortRules,
    { capacity::PORT_SETS_WIDE as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Tracked connections. LRU: a full table forgets the least recently used
/// connection, whose next packet is then checked against policy again.
#[btf_map]
pub static CONNTRACK: LruHashMap<ConnKey, Conn, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();

/// Datagrams whose first fragment passed; the value is unused (1).
#[btf_map]
pub static FRAGMENTS: LruHashMap<FragmentKey, u32, { capacity::FRAGMENTS as usize }> =
    LruHashMap::new();

/// Registered endpoints by IPv6 address.
#[btf_map]
pub static ENDPOINTS6: HashMap<
    Ipv6Key,
    EndpointValue,
    { capacity::ENDPOINTS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Host-side veth ifindex → the IPv6 address of the endpoint behind it.
#[btf_map]
pub static VETHS6: HashMap<
    u32,
    Ipv6Key,
    { capacity::VETHS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Tracked IPv6 connections (see `CONNTRACK`).
#[btf_map]
pub static CONNTRACK6: LruHashMap<ConnKey<Ipv6Key>, Conn, { capacity::CONNTRACK as usize }> =
    LruHashMap::new();

/// IPv6 datagrams whose first fragment passed (value unused, 1).
#[btf_map]
pub static FRAGMENTS6: LruHashMap<FragmentKey6, u32, { capacity::FRAGMENTS as usize }> =
    LruHashMap::new();

/// The parsed IPv6 packet, per CPU: slot [`scratch::TC`] for the TC
/// programs, [`scratch::CGROUP_INGRESS`] for cgroup ingress. In map memory,
/// not on the stack: its bytes are then unknown to the verifier, so the
/// many paths through the IPv6 header walk meet in one state where the
/// parse returns and the decision after it is verified once (what the parse
/// wrote on the stack, it would tell apart path by path). Programs of one
/// slot never interleave on a CPU: TC programs run with bottom halves
/// disabled, cgroup ingress in softirq context.
#[btf_map]
pub static SCRATCH6: PerCpuArray<Parsed<Ipv6Key>, 2> = PerCpuArray::new();

/// Where an IPv6 reject is built (see `reject`), per CPU; TC programs only.
#[btf_map]
pub static REJECT6_BUFFER: PerCpuArray<[u8; REJECT6_BUFFER_LEN], 1> = PerCpuArray::new();

/// Ethernet, IPv6 and ICMPv6 headers and the quoted IPv6 and UDP headers,
/// the longer IPv6 answer, rounded up to 8.
pub const REJECT6_BUFFER_LEN: usize = 112;

pub mod scratch {
    pub const TC: u32 = 0;
    pub const CGROUP_INGRESS: u32 = 1;
}

/// Packets per verdict reason.
#[btf_map]
pub static VERDICTS: PerCpuArray<u64, { Reason::COUNT as usize }> = PerCpuArray::new();

/// Flow events for the agent: denied packets (rate-limited per destination)
/// and first packets of allowed connections.
#[btf_map]
pub static FLOW_EVENTS: RingBuf<FlowEvent, { capacity::FLOW_EVENTS as usize }> = RingBuf::new();

/// Denied-event budget per destination address for the current second.
#[btf_map]
pub static EVENT_LIMITS: LruHashMap<u32, EventLimit, { capacity::EVENT_LIMITS as usize }> =
    LruHashMap::new();

/// Reject budget per source address for the current second.
#[btf_map]
pub static REJECT_LIMITS: LruHashMap<u32, EventLimit, { capacity::REJECT_LIMITS as usize }> =
    LruHashMap::new();

/// Events emitted, lost to a full ring buffer, held back by the rate limit.
#[btf_map]
pub static EVENT_STATS: PerCpuArray<u64, { event_stat::COUNT as usize }> = PerCpuArray::new();

/// Packets and bytes per policy, one value for all CPUs (the programs add
/// atomically, once per `COUNTER_FLUSH` packets of a connection). The agent
/// makes and deletes the entries; the programs only add to them.
#[btf_map]
pub static POLICY_STATS: HashMap<
    u32,
    PolicyCounters,
    { capacity::POLICY_STATS as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Underlay addresses of the cluster's hosts (value unused, 1): tunnel
/// packets from anywhere else are dropped.
#[btf_map]
pub static PEERS: HashMap<u32, u32, { capacity::PEERS as usize }, { BPF_F_NO_PREALLOC as usize }> =
    HashMap::new();

/// NetIn: (host address, host port, protocol) → the container's address and
/// port (written by the agent from the endpoints' port mappings).
#[btf_map]
pub static NETIN: HashMap<
    NetInKey,
    NetInTarget,
    { capacity::NETIN as usize },
    { BPF_F_NO_PREALLOC as usize },
> = HashMap::new();

/// Connections through a NetIn mapping, so their replies leave as the host
/// address and port the client used. LRU: a forgotten connection's replies
/// go out unrewritten and the client resets it.
#[btf_map]
pub static NETIN_CONNS: LruHashMap<NetInConnKey, NetInConn, { capacity::NETIN_CONNS as usize }> =
    LruHashMap::new();

/// NetOut (security groups): (app tag, destination prefix) → the rules
/// covering it. An app without an entry has no security groups.
#[btf_map]
pub static NETOUT: LpmTrie<[u8; 8], NetOutRules, { capacity::NETOUT as usize }> = LpmTrie::new();
