//! Map keys and values: the ABI between the kernel programs and the agent.
//!
//! Byte order convention, everywhere in this module:
//! - IPv4 addresses are stored exactly as they appear on the wire, read as a
//!   native-endian `u32` (`u32::from_ne_bytes(addr.octets())`), so the kernel
//!   never swaps bytes on the fast path.
//! - Ports are host byte order (`u16::from_be_bytes` of the wire bytes): they
//!   are compared as numbers against ranges.
//!
//! Every struct is `#[repr(C)]` with its padding spelled out as `_pad` fields
//! that must be zero, so that a key hashes the same on both sides and `Pod` is
//! sound (no uninitialised bytes).

/// Map names, as they appear in `bpftool map` and under the pin directory.
pub mod names {
    pub const ENDPOINTS: &str = "ENDPOINTS";
    pub const VETHS: &str = "VETHS";
    pub const CGROUPS: &str = "CGROUPS";
    pub const POLICIES: &str = "POLICIES";
    pub const PORT_SETS: &str = "PORT_SETS";
    pub const PORT_SETS_WIDE: &str = "PORT_SETS_WIDE";
    pub const CONNTRACK: &str = "CONNTRACK";
    pub const FRAGMENTS: &str = "FRAGMENTS";
    pub const VERDICTS: &str = "VERDICTS";
    pub const FLOW_EVENTS: &str = "FLOW_EVENTS";
    pub const EVENT_LIMITS: &str = "EVENT_LIMITS";
    pub const EVENT_STATS: &str = "EVENT_STATS";
    pub const POLICY_STATS: &str = "POLICY_STATS";
    pub const ENDPOINT_SLOTS: &str = "ENDPOINT_SLOTS";
    pub const VETH_SLOTS: &str = "VETH_SLOTS";
    pub const PEERS: &str = "PEERS";
    pub const NETIN: &str = "NETIN";
    pub const NETIN_CONNS: &str = "NETIN_CONNS";
    pub const NETOUT: &str = "NETOUT";
    pub const REJECT_LIMITS: &str = "REJECT_LIMITS";
    pub const ENDPOINTS6: &str = "ENDPOINTS6";
    pub const VETHS6: &str = "VETHS6";
    pub const CONNTRACK6: &str = "CONNTRACK6";
    pub const FRAGMENTS6: &str = "FRAGMENTS6";
    pub const CONFIG: &str = "CONFIG";
    pub const FLOW_CACHE: &str = "FLOW_CACHE";
    pub const FLOW_CACHE_STATS: &str = "FLOW_CACHE_STATS";
    pub const FLOW_CACHE6: &str = "FLOW_CACHE6";
    /// Single-value arrays of versions before `CONFIG` held their values
    /// (the epoch, the settings, the overlay, the tunnel, NetIn's and
    /// NetOut's counts): read once by the loader when it creates `CONFIG`
    /// over their pins, then unpinned.
    pub const LEGACY_CONFIG: [&str; 6] =
        ["EPOCH", "SETTINGS", "OVERLAY", "TUNNEL", "NETIN_STATE", "NETOUT_STATE"];
    /// Every map the object defines, in a stable order.
    pub const ALL: [&str; 28] = [
        ENDPOINTS,
        VETHS,
        CGROUPS,
        POLICIES,
        PORT_SETS,
        PORT_SETS_WIDE,
        CONNTRACK,
        FRAGMENTS,
        VERDICTS,
        FLOW_EVENTS,
        EVENT_LIMITS,
        EVENT_STATS,
        POLICY_STATS,
        ENDPOINT_SLOTS,
        VETH_SLOTS,
        PEERS,
        NETIN,
        NETIN_CONNS,
        NETOUT,
        REJECT_LIMITS,
        ENDPOINTS6,
        VETHS6,
        CONNTRACK6,
        FRAGMENTS6,
        CONFIG,
        FLOW_CACHE,
        FLOW_CACHE_STATS,
        FLOW_CACHE6,
    ];
}

/// Program names in the object.
pub mod programs {
    /// TC ingress of the host-side veth: packets *leaving* the container.
    pub const TC_FROM_CONTAINER: &str = "tc_from_container";
    /// TC egress of the host-side veth: packets *entering* the container.
    pub const TC_TO_CONTAINER: &str = "tc_to_container";
    /// cgroup_skb egress: packets leaving the workloads of a cgroup.
    pub const CGROUP_EGRESS: &str = "cgroup_egress";
    /// cgroup_skb ingress: packets delivered to the workloads of a cgroup.
    pub const CGROUP_INGRESS: &str = "cgroup_ingress";
    /// TC ingress of the underlay interface (cluster mode): tunnel packets
    /// from hosts outside the cluster are dropped.
    pub const TC_FROM_UNDERLAY: &str = "tc_from_underlay";
}

/// Default capacities (max_entries). The agent may override each at load time.
pub mod capacity {
    pub const ENDPOINTS: u32 = 65_536;
    pub const VETHS: u32 = 65_536;
    pub const CGROUPS: u32 = 65_536;
    /// Entries are (source tag, destination tag, protocol) pairs, 24 bytes
    /// each (up to two port ranges inline). Not preallocated: the default costs
    /// its 4 MiB bucket array, and fits four times Cloud Foundry's largest
    /// validated deployment (60k policies); past it, raise it in the config.
    pub const POLICIES: u32 = 1 << 18;
    /// Pairs with three to [`super::SET_RANGES`] port ranges (a few ports
    /// and the TLS one). Not preallocated.
    pub const PORT_SETS: u32 = 1 << 16;
    /// Pairs with more (up to [`super::MAX_PORT_RANGES`] each). Not
    /// preallocated.
    pub const PORT_SETS_WIDE: u32 = 1 << 12;
    pub const CONNTRACK: u32 = 262_144;
    pub const FRAGMENTS: u32 = 8_192;
    /// Bytes of the flow event ring buffer (a power of two).
    pub const FLOW_EVENTS: u32 = 1 << 22;
    /// Destinations tracked by the denied-event rate limit (LRU).
    pub const EVENT_LIMITS: u32 = 16_384;
    /// Policies with packet counters (per CPU, not preallocated).
    pub const POLICY_STATS: u32 = 1 << 18;
    /// Endpoint slots: a /16 overlay, Cloud Foundry's default.
    pub const ENDPOINT_SLOTS: u32 = 1 << 16;
    /// Hosts of the cluster whose tunnel packets are accepted.
    pub const PEERS: u32 = 4_096;
    /// NetIn port mappings (host address, host port, protocol).
    pub const NETIN: u32 = 65_536;
    /// Connections through NetIn port mappings, for their replies (LRU).
    pub const NETIN_CONNS: u32 = 65_536;
    /// NetOut trie entries: (app, destination prefix) pairs.
    pub const NETOUT: u32 = 65_536;
    /// Senders tracked by the reject rate limit (LRU).
    pub const REJECT_LIMITS: u32 = 16_384;
}

/// `ENDPOINTS` value, keyed by the endpoint's IPv4 address (wire order `u32`).
/// Every registered container instance has one entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EndpointValue {
    /// Tag of the endpoint's app (allocated by the agent, never 0).
    pub tag: u32,
    /// [`endpoint_flags`]; 0 for an endpoint on this host.
    pub flags: u32,
}

/// Bits of [`EndpointValue::flags`].
pub mod endpoint_flags {
    /// The endpoint runs on another host of the cluster: the source side
    /// tracks connections local containers open to it, so that its replies,
    /// which the other host checks against no conntrack of ours, are let in.
    pub const REMOTE: u32 = 1;
}
const _: () = assert!(size_of::<EndpointValue>() == 8);

/// `Config::overlay`: the container network whose endpoints also sit in
/// `ENDPOINT_SLOTS`, an array indexed by address offset — an inlined array
/// access instead of a hash lookup for the two endpoint lookups of every new
/// flow. `ENDPOINTS` still holds every endpoint: addresses outside the
/// overlay are looked up there, and so is every address while `slots` is 0
/// (the loader's state while it rebuilds the slots).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Overlay {
    /// First address of the overlay network, host byte order.
    pub base: u32,
    /// Addresses covered, from `base` (at most the array's size).
    pub slots: u32,
}
const _: () = assert!(size_of::<Overlay>() == 8);

impl Overlay {
    /// The slot of `addr` (wire order, as the maps key addresses), if the
    /// overlay covers it.
    #[inline(always)]
    pub fn slot(&self, addr: u32) -> Option<u32> {
        let offset = u32::from_be(addr).wrapping_sub(self.base);
        if offset < self.slots { Some(offset) } else { None }
    }
}

/// `Config::tunnel`: the overlay's VXLAN device (cluster mode, or silk's).
/// Its packets carry their source app's tag in the Group Based Policy id,
/// which the kernel hands over as the low 16 bits of `skb->mark` (the D and
/// A flag bits land in bits 22 and 19: masked with [`TUNNEL_TAG_MASK`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Tunnel {
    /// The VXLAN device's ifindex; 0: no overlay (a single host).
    pub ifindex: u32,
    /// Its UDP port, host byte order (4789).
    pub port: u16,
    /// [`tunnel_flags`]. With `port`, the older `u32` port: reads the same.
    pub flags: u16,
}
const _: () = assert!(size_of::<Tunnel>() == 8);

/// [`Tunnel::flags`].
pub mod tunnel_flags {
    /// Cloud Foundry's silk overlay (`silk-vtep`): a packet with no tag
    /// (GBP id 0) is from an app no policy names (vxlan-policy-agent marks
    /// sources of policies only), judged as [`super::UNTAGGED_TAG`] (every
    /// opening denied, as CF's `overlay--HANDLE` rejects it). Without it,
    /// no tag means "judge by the source address".
    pub const SILK: u16 = 1;
}

/// The tag of a packet from Cloud Foundry's overlay that carries none
/// (see [`tunnel_flags::SILK`]): no app has it, so no pair names it.
pub const UNTAGGED_TAG: u32 = u32::MAX;

/// `NETIN` key: a host address and port a NetIn mapping listens on
/// (address in wire order, port in host order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct NetInKey {
    pub addr: u32,
    pub port: u16,
    pub protocol: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<NetInKey>() == 8);

/// `NETIN` value: the container address and port the mapping leads to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetInTarget {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
}
const _: () = assert!(size_of::<NetInTarget>() == 8);

/// `NETIN_CONNS` key: a connection through a NetIn mapping, as its replies
/// leave the container (container end first).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetInConnKey {
    pub container: u32,
    pub client: u32,
    pub container_port: u16,
    pub client_port: u16,
    pub protocol: u32,
}
const _: () = assert!(size_of::<NetInConnKey>() == 16);

/// `NETIN_CONNS` value: what the replies' source is rewritten to, and the
/// interface the connection came in by (the replies leave by it).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NetInConn {
    pub host_addr: u32,
    pub host_port: u16,
    pub _pad: u16,
    pub ifindex: u32,
}
const _: () = assert!(size_of::<NetInConn>() == 12);

/// The bits of `skb->mark` the VXLAN GBP id travels in: tags above 65,535
/// do not fit and travel as "no identity" (the receiver then uses its
/// endpoint map), as Cloud Foundry's 2-byte `tag_length`.
pub const TUNNEL_TAG_MASK: u32 = 0xFFFF;

/// Value of `VETHS` (keyed by the host-side veth's ifindex, `u32`) and of
/// `CGROUPS` (keyed by the cgroup id, `u64`): the one endpoint whose traffic
/// passes there, for the anti-spoofing check on the source side.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Attachment {
    /// The endpoint's address (wire order `u32`).
    pub addr: u32,
    /// The endpoint's app tag.
    pub tag: u32,
}
const _: () = assert!(size_of::<Attachment>() == 8);

/// `Attachment::addr` of an IPv6-only endpoint (0.0.0.0): the binding names
/// its app (the tag), and its IPv4 packets are all dropped as spoofed.
pub const NO_IPV4: u32 = 0;

/// IP protocol numbers the policy understands.
pub mod proto {
    pub const ICMP: u8 = 1;
    pub const TCP: u8 = 6;
    pub const UDP: u8 = 17;
    pub const ICMPV6: u8 = 58;
}

/// An IPv6 address as the maps key it: its 16 wire bytes read as four
/// native-endian `u32` words (each word as an IPv4 address is stored).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Ipv6Key(pub [u32; 4]);
const _: () = assert!(size_of::<Ipv6Key>() == 16);

impl Ipv6Key {
    pub fn from_octets(octets: [u8; 16]) -> Self {
        let word =
            |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
        Self([word(0), word(4), word(8), word(12)])
    }

    /// fe80::/10: an address that names a host on one link only.
    #[inline(always)]
    pub fn is_link_local(self) -> bool {
        let [b0, b1, _, _] = self.0[0].to_ne_bytes();
        b0 == 0xfe && b1 & 0xc0 == 0x80
    }

    /// ::, the source of a host whose address is still tentative (duplicate
    /// address detection, RFC 4862 5.4.2).
    #[inline(always)]
    pub fn is_unspecified(self) -> bool {
        self.0[0] | self.0[1] | self.0[2] | self.0[3] == 0
    }

    pub fn octets(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        for (i, word) in self.0.iter().enumerate() {
            out[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
        }
        out
    }
}

pub use crate::ports::{
    MAX_PORT_RANGES, PairKey, PairPorts, PortRange, PortRules, PortSet, SET_RANGES, SmallPortSet,
};

/// `CONNTRACK` key (IPv4, `A` = `u32`) and `CONNTRACK6` key (IPv6, `A` =
/// [`Ipv6Key`]): a connection, the same for both of its directions.
///
/// The two (address, port) ends are stored in a canonical order (the lower
/// end first, comparing address then port), so a reply finds the entry its
/// request made with one lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct ConnKey<A = u32> {
    pub addr_lo: A,
    pub addr_hi: A,
    pub port_lo: u16,
    pub port_hi: u16,
    /// IP protocol number, 32 bits wide: no padding to zero per packet.
    pub protocol: u32,
}
const _: () = assert!(size_of::<ConnKey>() == 16);
const _: () = assert!(size_of::<ConnKey<Ipv6Key>>() == 40);

/// Which end of a [`ConnKey`] opened the connection.
pub mod origin {
    pub const LO: u32 = 0;
    pub const HI: u32 = 1;
    /// The end's bit ([`LO`] or [`HI`]) of an origin value.
    pub const END: u32 = 1;
    /// Set along with the end's bit: the connection was denied and that end
    /// was sent a reject (TCP RST, ICMP unreachable) from the other end's
    /// address. The entry allows nothing but the reject: its one packet from
    /// the other end passes (and removes it); the rejected end's next packet
    /// is checked as a new connection.
    pub const REJECTED: u32 = 2;
    /// Opened to another cell of silk's overlay, which decided it.
    pub const DECIDED_ELSEWHERE: u32 = 4;
}

/// `CONNTRACK` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Conn {
    /// Value of `Config::epoch` when the connection was last checked
    /// against policy. The agent bumps the epoch whenever it takes an
    /// allowance away; a packet of a connection with an older epoch is
    /// checked again (and the connection cut if no longer allowed).
    pub epoch: u32,
    /// Policy that allowed the connection.
    pub policy_id: u32,
    /// [`origin::LO`] or [`origin::HI`]: the end that sent the first packet
    /// (with [`origin::REJECTED`]: see there).
    pub origin: u32,
    /// Packets of this connection not yet added to `POLICY_STATS`: the
    /// programs count here (the entry is already at hand) and move the count
    /// to the per-policy counters every [`COUNTER_FLUSH`] packets, so the
    /// per-packet cost of the counters is a fraction of a map lookup. The
    /// agent adds what is pending when it reports counters.
    pub pending_packets: u32,
    pub pending_bytes: u64,
}
const _: () = assert!(size_of::<Conn>() == 24);

/// Packets a connection counts before its count moves to `POLICY_STATS`.
pub const COUNTER_FLUSH: u32 = 64;

/// Sets of `FLOW_CACHE` per CPU (a power of two): 16,384 sets of two ways,
/// 32,768 connections and 1 MiB per CPU.
pub const FLOW_CACHE_SETS: u32 = 16_384;
/// `log2(FLOW_CACHE_SETS)`.
pub const FLOW_CACHE_SET_BITS: u32 = 14;
const _: () = assert!(1 << FLOW_CACHE_SET_BITS == FLOW_CACHE_SETS);

/// One flow cache entry: an established connection as `CONNTRACK` (IPv4,
/// `A` = `u32`, in `FLOW_CACHE`) or `CONNTRACK6` (IPv6, in `FLOW_CACHE6`)
/// holds it, valid while `epoch` is the current one. 32 bytes for IPv4 (a
/// set of two is one cache line), 56 for IPv6.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CachedFlow<A = u32> {
    /// All zero: an empty way (no connection has two zero addresses).
    pub key: ConnKey<A>,
    pub epoch: u32,
    pub policy_id: u32,
    /// Packets and bytes counted here and not yet in `POLICY_STATS`
    /// (moved there every [`COUNTER_FLUSH`] packets and when the entry is
    /// replaced; the agent adds what is pending when it reports).
    pub pending_packets: u16,
    /// [`Conn::origin`] ([`origin::LO`] or [`origin::HI`]).
    pub origin: u8,
    /// Packets answered since `CONNTRACK` last saw the connection used
    /// (every [`COUNTER_FLUSH`] the entry is looked up, counting on or off).
    pub unrefreshed: u8,
    pub pending_bytes: u32,
}
const _: () = assert!(size_of::<CachedFlow>() == 32);
const _: () = assert!(size_of::<CachedFlow<Ipv6Key>>() == 56);

/// `FLOW_CACHE` value: one set, two ways, the most recently filled first.
/// (Not `align(64)`: BPF's LLVM backend aborts on a copy aligned above 8
/// bytes; the array's values start on a page, so each set is one line.)
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSet {
    pub ways: [CachedFlow; 2],
}
const _: () = assert!(size_of::<FlowSet>() == 64);

/// Sets of `FLOW_CACHE6` per CPU (a power of two): 8,192 sets of two ways,
/// 16,384 connections and 1 MiB per CPU, as much memory as IPv4's.
pub const FLOW_CACHE6_SETS: u32 = 8_192;
/// `log2(FLOW_CACHE6_SETS)`.
pub const FLOW_CACHE6_SET_BITS: u32 = 13;
const _: () = assert!(1 << FLOW_CACHE6_SET_BITS == FLOW_CACHE6_SETS);

/// `FLOW_CACHE6` value: [`FlowSet`] for IPv6, padded to two whole cache
/// lines (the array's values start on a page).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowSet6 {
    pub ways: [CachedFlow<Ipv6Key>; 2],
    pub _pad: [u64; 2],
}
const _: () = assert!(size_of::<FlowSet6>() == 128);

/// Indexes of `FLOW_CACHE_STATS` (per CPU).
pub mod flow_cache_stat {
    /// Entries written: established packets the cache did not answer.
    pub const FILLS: u32 = 0;
    /// Fills that pushed another live connection out of its set.
    pub const EVICTIONS: u32 = 1;
    /// The same for `FLOW_CACHE6`.
    pub const FILLS6: u32 = 2;
    pub const EVICTIONS6: u32 = 3;
    pub const COUNT: u32 = 4;
}

/// `FRAGMENTS` key: one fragmented datagram whose first fragment was allowed.
/// Later fragments carry no ports; they pass if their datagram is here.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragmentKey {
    pub saddr: u32,
    pub daddr: u32,
    /// IPv4 identification field, host order.
    pub id: u16,
    pub protocol: u8,
    pub _pad: u8,
}
const _: () = assert!(size_of::<FragmentKey>() == 12);

/// `FRAGMENTS6` key: one fragmented IPv6 datagram whose first fragment was
/// allowed (the Fragment extension header's 32-bit identification).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FragmentKey6 {
    pub saddr: Ipv6Key,
    pub daddr: Ipv6Key,
    /// Identification, host order.
    pub id: u32,
    /// The protocol after the extension headers, 32 bits wide.
    pub protocol: u32,
}
const _: () = assert!(size_of::<FragmentKey6>() == 40);

/// Index of the only `CONFIG` entry.
pub const CONFIG_INDEX: u32 = 0;

/// `CONFIG[0]`: every per-packet setting in one 48-byte value, so a packet
/// touches one or two cache lines for them, not one per setting (they were
/// six single-value arrays until the real-traffic gap measurement showed
/// the programs' cost there is cache misses, not instructions). Written
/// only by the agent, field by field (read, change one field, write back);
/// the programs only read it.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// Policy epoch: bumped on every revocation, so that every tracked
    /// connection is checked against policy again at its next packet
    /// (`Conn::epoch`).
    pub epoch: u32,
    /// NetIn port mappings in `NETIN` (0: the programs skip NetIn).
    pub netin_mappings: u32,
    /// Apps with NetOut rules in `NETOUT` (0: the programs skip NetOut).
    pub netout_apps: u32,
    pub _pad: u32,
    /// The overlay network of `ENDPOINT_SLOTS`.
    pub overlay: Overlay,
    /// The cluster's tunnel device (cluster mode).
    pub tunnel: Tunnel,
    /// What the programs report, and whether they reject.
    pub settings: Settings,
}
const _: () = assert!(size_of::<Config>() == 48);

/// `Config::settings`: what the programs report. Written by the loader; all
/// zero (nothing reported) until then.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Settings {
    /// [`settings::ALLOWED_EVENTS`], ...
    pub flags: u32,
    /// Denied-packet events per destination address per second; 0: none.
    pub denied_events_per_second: u32,
    /// With [`settings::REJECT`]: rejects sent to one source address per
    /// second at most; denied packets past it are dropped unanswered.
    pub rejects_per_second: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<Settings>() == 16);

pub mod settings {
    /// Report the first packet of each allowed connection.
    pub const ALLOWED_EVENTS: u32 = 1;
    /// Count packets and bytes per policy (`POLICY_STATS`).
    pub const POLICY_COUNTERS: u32 = 2;
    /// Answer a denied TCP segment with a RST and a denied UDP datagram with
    /// an ICMP port unreachable, instead of dropping it silently.
    pub const REJECT: u32 = 4;
    /// Answer established packets from `FLOW_CACHE` and `FLOW_CACHE6` (on
    /// by default; off only to measure what they save).
    pub const FLOW_CACHE: u32 = 8;
}

/// [`FlowEvent::allowed`]: what was done with the packet.
pub mod action {
    pub const DROPPED: u8 = 0;
    pub const PASSED: u8 = 1;
    /// Dropped, and the sender was sent a reject.
    pub const REJECTED: u8 = 2;
}

/// Which way a reported packet was going, from the container's side (Cloud
/// Foundry's `packet.direction`).
pub mod direction {
    /// Entering the container (checked at the destination).
    pub const INGRESS: u8 = 0;
    /// Leaving the container (checked at the source: anti-spoofing).
    pub const EGRESS: u8 = 1;
}

/// One `FLOW_EVENTS` record: a denied packet, or the first packet of an
/// allowed connection. Addresses wire order, ports host order. IPv4
/// records (`A` = `u32`) are 40 bytes, IPv6 records (`A` = [`Ipv6Key`]) 64:
/// the reader tells them apart by size.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct FlowEvent<A = u32> {
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC).
    pub time_ns: u64,
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// [`direction::INGRESS`] or [`direction::EGRESS`].
    pub direction: u8,
    /// An [`action`]: passed, dropped, or dropped and rejected.
    pub allowed: u8,
    /// A `crate::Reason` discriminant.
    pub reason: u8,
    /// App tags, 0 where not known.
    pub src_tag: u32,
    pub dst_tag: u32,
    /// The policy that allowed it, 0 if none.
    pub policy_id: u32,
    /// Interface (or 0 for cgroup programs) the packet was seen on.
    pub ifindex: u32,
}
const _: () = assert!(size_of::<FlowEvent>() == 40);
const _: () = assert!(size_of::<FlowEvent<Ipv6Key>>() == 64);

/// `EVENT_LIMITS` and `REJECT_LIMITS` value (see [`crate::limits`]): events
/// (or rejects) for one address in its current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct EventLimit {
    pub window_start_ns: u64,
    pub count: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<EventLimit>() == 16);

/// `EVENT_STATS` indices (per-CPU counters).
pub mod event_stat {
    /// Events written to the ring buffer.
    pub const EMITTED: u32 = 0;
    /// Events lost: the ring buffer was full.
    pub const LOST: u32 = 1;
    /// Denied-packet events not reported because of the per-destination limit.
    pub const RATE_LIMITED: u32 = 2;
    pub const COUNT: u32 = 3;
}

/// `POLICY_STATS` value (by policy id, one for all CPUs; the agent makes and deletes it, the
/// programs only add to it, atomically): packets and bytes the policy let through, its
/// connections' replies included.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PolicyCounters {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<PolicyCounters>() == 16);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are `#[repr(C)]`, contain only integers and arrays
    // of integers, and have no implicit padding (sizes asserted above), so
    // every bit pattern is a valid value.
    unsafe impl aya::Pod for EndpointValue {}
    unsafe impl aya::Pod for Attachment {}
    unsafe impl aya::Pod for PairKey {}
    unsafe impl aya::Pod for PortRange {}
    unsafe impl<const N: usize> aya::Pod for PortSet<N> {}
    unsafe impl aya::Pod for PairPorts {}
    unsafe impl aya::Pod for ConnKey {}
    unsafe impl aya::Pod for ConnKey<Ipv6Key> {}
    unsafe impl aya::Pod for Ipv6Key {}
    unsafe impl aya::Pod for FragmentKey6 {}
    unsafe impl aya::Pod for Conn {}
    unsafe impl aya::Pod for FragmentKey {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for FlowSet {}
    unsafe impl aya::Pod for FlowSet6 {}
    unsafe impl aya::Pod for Overlay {}
    unsafe impl aya::Pod for Tunnel {}
    unsafe impl aya::Pod for NetInKey {}
    unsafe impl aya::Pod for NetInTarget {}
    unsafe impl aya::Pod for NetInConnKey {}
    unsafe impl aya::Pod for NetInConn {}
    unsafe impl aya::Pod for FlowEvent {}
    unsafe impl aya::Pod for FlowEvent<Ipv6Key> {}
    unsafe impl aya::Pod for EventLimit {}
    unsafe impl aya::Pod for PolicyCounters {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(a: [u8; 4]) -> u32 {
        u32::from_ne_bytes(a)
    }

    #[test]
    fn overlay_slots_cover_exactly_the_network() {
        let overlay = Overlay { base: u32::from_be_bytes([10, 255, 0, 0]), slots: 1 << 16 };
        assert_eq!(overlay.slot(wire([10, 255, 0, 0])), Some(0));
        assert_eq!(overlay.slot(wire([10, 255, 1, 2])), Some(258));
        assert_eq!(overlay.slot(wire([10, 255, 255, 255])), Some(65535));
        assert_eq!(overlay.slot(wire([10, 254, 255, 255])), None, "below the base");
        assert_eq!(overlay.slot(wire([11, 0, 0, 0])), None, "past the end");
        assert_eq!(overlay.slot(wire([0, 0, 0, 0])), None);
        let off = Overlay { slots: 0, ..overlay };
        assert_eq!(off.slot(wire([10, 255, 0, 1])), None, "no slots: every address hashed");
    }
}
