//! A per-CPU cache of established connections in front of `CONNTRACK`
//! (and of IPv6 ones in front of `CONNTRACK6`, in `FLOW_CACHE6`).
//!
//! An established packet's `CONNTRACK` lookup hashes its 16-byte key
//! (jhash), reads a bucket and an element, and writes the element's
//! pending counts, a line other CPUs write too. Here it reads one line this
//! CPU alone writes: a set of two ways picked by a multiplicative hash of
//! the key. What a way holds is what the decision would have read from
//! `CONNTRACK` (policy, origin) and the epoch it was checked at; it answers
//! only while that epoch is the current one, so a revocation (the agent
//! bumps the epoch) sends every cached connection back to the full check at
//! its next packet, as it does for `CONNTRACK` itself.
//!
//! Per-policy counting goes on in the way, and moves to `POLICY_STATS`
//! every `COUNTER_FLUSH` packets and when the way is replaced. Every
//! `COUNTER_FLUSH` packets the way also looks the connection up in
//! `CONNTRACK`, counting on or off, so the LRU map sees it used (and gets
//! it back if it was pushed out meanwhile).
//!
//! The array has a region of `FLOW_CACHE_SETS` sets per CPU (the loader
//! sizes it for the possible CPUs; it is mmapable, so its values start on
//! a page and each set is one cache line). A program only touches its own
//! CPU's region, and TC programs do not nest on one CPU.

use aya_ebpf::bindings::__sk_buff;
use aya_ebpf::{bindings::BPF_F_MMAPABLE, btf_maps::Array, helpers::bpf_get_smp_processor_id};
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use policy_common::{
    Family, Flow, Lookups as _, Reason, Verdict,
    maps::{
        COUNTER_FLUSH, CachedFlow, Conn, ConnKey, FLOW_CACHE_SET_BITS, FLOW_CACHE_SETS,
        FLOW_CACHE6_SET_BITS, FLOW_CACHE6_SETS, FlowSet, FlowSet6, Ipv6Key, flow_cache_stat, proto,
        settings,
    },
    packet::ETH_HLEN,
};

use crate::{
    bytes::SkbBytes,
    counting::{add_policy_counts, count_verdict},
    kernel_maps::KernelMaps6,
    maps::{CONNTRACK, CONNTRACK6, config},
};

/// Sets, `FLOW_CACHE_SETS` per possible CPU (sized by the loader).
#[btf_map]
pub static FLOW_CACHE: Array<FlowSet, { FLOW_CACHE_SETS as usize }, { BPF_F_MMAPABLE as usize }> =
    Array::new();

/// IPv6 sets, `FLOW_CACHE6_SETS` per possible CPU (sized by the loader).
#[btf_map]
pub static FLOW_CACHE6: Array<
    FlowSet6,
    { FLOW_CACHE6_SETS as usize },
    { BPF_F_MMAPABLE as usize },
> = Array::new();

/// See `policy_common::maps::flow_cache_stat`.
#[btf_map]
pub static FLOW_CACHE_STATS: PerCpuArray<u64, { flow_cache_stat::COUNT as usize }> =
    PerCpuArray::new();

/// What differs between the families' caches: the array, the hash that
/// picks a set, the conntrack map, the statistics' indexes.
pub trait Cached: Family + 'static {
    const FILLS: u32;
    const EVICTIONS: u32;
    /// This CPU's two ways for `key`.
    fn ways(key: &ConnKey<Self>) -> Option<&'static mut [CachedFlow<Self>; 2]>;
    /// Whether `CONNTRACK` (`CONNTRACK6`) holds `key` (marking it used).
    fn tracked(key: &ConnKey<Self>) -> bool;
    fn track(key: &ConnKey<Self>, conn: &Conn);
}

/// Set `set` of this CPU's region of `array` (`sets` per CPU).
#[inline(always)]
fn cpu_set<T, const N: usize, const F: usize>(
    array: &Array<T, N, F>,
    sets: u32,
    set: u32,
) -> Option<*mut T> {
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    array.get_ptr_mut(cpu.wrapping_mul(sets).wrapping_add(set))
}

impl Cached for u32 {
    const FILLS: u32 = flow_cache_stat::FILLS;
    const EVICTIONS: u32 = flow_cache_stat::EVICTIONS;

    #[inline(always)]
    fn ways(key: &ConnKey) -> Option<&'static mut [CachedFlow; 2]> {
        let ports = (u32::from(key.port_lo) << 16) | u32::from(key.port_hi);
        let mixed = key.addr_lo ^ key.addr_hi.rotate_left(16) ^ ports.wrapping_mul(0x85eb_ca6b);
        let set = (mixed ^ key.protocol).wrapping_mul(0x9e37_79b1) >> (32 - FLOW_CACHE_SET_BITS);
        let set = cpu_set(&FLOW_CACHE, FLOW_CACHE_SETS, set)?;
        // SAFETY: this CPU's region of the array, which no other program
        // run touches meanwhile (see the module's doc).
        Some(unsafe { &mut (*set).ways })
    }

    #[inline(always)]
    fn tracked(key: &ConnKey) -> bool {
        // SAFETY: presence only.
        unsafe { CONNTRACK.get(key) }.is_some()
    }

    #[inline(always)]
    fn track(key: &ConnKey, conn: &Conn) {
        let _ = CONNTRACK.insert(key, conn, 0);
    }
}

impl Cached for Ipv6Key {
    const FILLS: u32 = flow_cache_stat::FILLS6;
    const EVICTIONS: u32 = flow_cache_stat::EVICTIONS6;

    #[inline(always)]
    fn ways(key: &ConnKey<Ipv6Key>) -> Option<&'static mut [CachedFlow<Ipv6Key>; 2]> {
        let fold = |a: &Ipv6Key| a.0[0] ^ a.0[1].rotate_left(8) ^ a.0[2] ^ a.0[3].rotate_left(24);
        let ports = (u32::from(key.port_lo) << 16) | u32::from(key.port_hi);
        let mixed = fold(&key.addr_lo)
            ^ fold(&key.addr_hi).rotate_left(16)
            ^ ports.wrapping_mul(0x85eb_ca6b);
        let set = (mixed ^ key.protocol).wrapping_mul(0x9e37_79b1) >> (32 - FLOW_CACHE6_SET_BITS);
        let set = cpu_set(&FLOW_CACHE6, FLOW_CACHE6_SETS, set)?;
        // SAFETY: as for IPv4.
        Some(unsafe { &mut (*set).ways })
    }

    #[inline(always)]
    fn tracked(key: &ConnKey<Ipv6Key>) -> bool {
        // SAFETY: presence only.
        unsafe { CONNTRACK6.get(key) }.is_some()
    }

    #[inline(always)]
    fn track(key: &ConnKey<Ipv6Key>, conn: &Conn) {
        let _ = CONNTRACK6.insert(key, conn, 0);
    }
}

/// Whether an established IPv6 packet was answered by this CPU's flow
/// cache, before the full parse: a TCP or UDP packet whose header follows
/// the fixed one (see [`plain_flow6`]), not forging an endpoint's address
/// (see `forges_endpoint6`), whose connection the cache holds at the
/// current epoch. Counted as the full path counts it; anything else goes
/// the full way (which fills the cache).
#[inline(never)]
pub fn answered6(skb: *mut __sk_buff) -> bool {
    let Some(config) = config() else { return false };
    if config.settings.flags & settings::FLOW_CACHE == 0 {
        return false;
    }
    let bytes = SkbBytes::new(skb);
    let Some(flow) = plain_flow6(&bytes) else { return false };
    if crate::unchecked_ingress(&bytes) && KernelMaps6::new().endpoint(flow.saddr).is_some() {
        return false;
    }
    let (key, side) = ConnKey::of(&flow);
    let count = config.settings.flags & settings::POLICY_COUNTERS != 0;
    match established(&key, side, config.epoch, count, bytes.len()) {
        Some(reason) => {
            count_verdict(Verdict::Pass(reason));
            true
        }
        None => false,
    }
}

/// An IPv6 TCP or UDP packet whose upper-layer header follows the fixed
/// header directly, read by direct access alone; None for anything else
/// (extension headers, other protocols, bytes outside the linear part).
/// For what it accepts, `Ipv6Parts::parse` reads the same flow: version 6,
/// a payload length that holds the minimal TCP or UDP header, and that
/// header's bytes in the packet.
#[inline(always)]
pub(crate) fn plain_flow6(bytes: &SkbBytes) -> Option<Flow<Ipv6Key>> {
    const L4: usize = ETH_HLEN + 40;
    let [version, _, _, _] = bytes.direct::<4>(ETH_HLEN)?;
    let [len_hi, len_lo, next, _] = bytes.direct::<4>(ETH_HLEN + 4)?;
    let payload = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let whole = match next {
        proto::TCP => payload >= 20 && bytes.direct::<1>(L4 + 19).is_some(),
        proto::UDP => payload >= 8 && bytes.direct::<1>(L4 + 7).is_some(),
        _ => false,
    };
    if !whole || version >> 4 != 6 {
        return None;
    }
    let word = |at: usize| bytes.direct::<4>(ETH_HLEN + at).map(u32::from_ne_bytes);
    let saddr = Ipv6Key([word(8)?, word(12)?, word(16)?, word(20)?]);
    let daddr = Ipv6Key([word(24)?, word(28)?, word(32)?, word(36)?]);
    let [s_hi, s_lo, d_hi, d_lo] = bytes.direct::<4>(L4)?;
    Some(Flow {
        saddr,
        daddr,
        sport: u16::from_be_bytes([s_hi, s_lo]),
        dport: u16::from_be_bytes([d_hi, d_lo]),
        protocol: next,
    })
}

/// The verdict reason for an established packet this CPU's cache knows at
/// `epoch` (`side`: which end sent it, see `ConnKey::of`), its packet
/// counted for its policy if `count`; None: decide it in full.
#[inline(always)]
pub fn established<A: Cached>(
    key: &ConnKey<A>,
    side: u32,
    epoch: u32,
    count: bool,
    len: u32,
) -> Option<Reason> {
    let set = A::ways(key)?;
    let way = if set[0].key == *key {
        &mut set[0]
    } else if set[1].key == *key {
        &mut set[1]
    } else {
        return None;
    };
    if way.epoch != epoch {
        return None;
    }
    if count && way.policy_id != 0 {
        way.pending_packets += 1;
        way.pending_bytes = way.pending_bytes.wrapping_add(len);
        if u32::from(way.pending_packets) >= COUNTER_FLUSH {
            flush(way);
        }
    }
    way.unrefreshed += 1;
    if u32::from(way.unrefreshed) >= COUNTER_FLUSH {
        way.unrefreshed = 0;
        refresh_conntrack(way);
    }
    Some(if side == u32::from(way.origin) { Reason::Established } else { Reason::Reply })
}

/// Caches an established connection the full decision just passed, at
/// `conn`'s epoch: into the first way; what was there moves to the second,
/// and what was there is flushed and dropped.
#[inline(always)]
pub fn fill<A: Cached>(key: &ConnKey<A>, conn: &Conn) {
    let Some(set) = A::ways(key) else { return };
    if set[0].key == *key {
        // The same connection at an older epoch: replaced in place.
        flush(&mut set[0]);
    } else {
        let evicted = &mut set[1];
        if evicted.key != ConnKey::default() && evicted.epoch == conn.epoch {
            count(A::EVICTIONS);
        }
        flush(evicted);
        set[1] = set[0];
    }
    set[0] = CachedFlow {
        key: *key,
        epoch: conn.epoch,
        policy_id: conn.policy_id,
        pending_packets: 0,
        origin: conn.origin as u8,
        unrefreshed: 0,
        pending_bytes: 0,
    };
    count(A::FILLS);
}

/// Moves a way's pending counts to its policy's counters.
#[inline(always)]
fn flush<A>(way: &mut CachedFlow<A>) {
    if way.pending_packets == 0 {
        return;
    }
    add_policy_counts(way.policy_id, u32::from(way.pending_packets), u64::from(way.pending_bytes));
    way.pending_packets = 0;
    way.pending_bytes = 0;
}

/// Marks the connection used in `CONNTRACK` (its LRU), or puts it back
/// there if memory pressure pushed it out while the cache answered for it.
#[inline(always)]
fn refresh_conntrack<A: Cached>(way: &CachedFlow<A>) {
    if !A::tracked(&way.key) {
        let conn = Conn {
            epoch: way.epoch,
            policy_id: way.policy_id,
            origin: u32::from(way.origin),
            pending_packets: 0,
            pending_bytes: 0,
        };
        A::track(&way.key, &conn);
    }
}

#[inline(always)]
fn count(stat: u32) {
    if let Some(counter) = FLOW_CACHE_STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs mid-run.
        unsafe { *counter += 1 };
    }
}
