//! A per-CPU cache of established IPv4 connections in front of `CONNTRACK`.
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

use aya_ebpf::{bindings::BPF_F_MMAPABLE, btf_maps::Array, helpers::bpf_get_smp_processor_id};
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use policy_common::{
    Reason,
    maps::{
        COUNTER_FLUSH, CachedFlow, Conn, ConnKey, FLOW_CACHE_SET_BITS, FLOW_CACHE_SETS, FlowSet,
        flow_cache_stat,
    },
};

use crate::{counting::add_policy_counts, maps::CONNTRACK};

/// Sets, `FLOW_CACHE_SETS` per possible CPU (sized by the loader).
#[btf_map]
pub static FLOW_CACHE: Array<FlowSet, { FLOW_CACHE_SETS as usize }, { BPF_F_MMAPABLE as usize }> =
    Array::new();

/// See `policy_common::maps::flow_cache_stat`.
#[btf_map]
pub static FLOW_CACHE_STATS: PerCpuArray<u64, { flow_cache_stat::COUNT as usize }> =
    PerCpuArray::new();

/// This CPU's set for `key`.
#[inline(always)]
fn set_of(key: &ConnKey) -> Option<&'static mut FlowSet> {
    let ports = (u32::from(key.port_lo) << 16) | u32::from(key.port_hi);
    let mixed = key.addr_lo ^ key.addr_hi.rotate_left(16) ^ ports.wrapping_mul(0x85eb_ca6b);
    let set = (mixed ^ key.protocol).wrapping_mul(0x9e37_79b1) >> (32 - FLOW_CACHE_SET_BITS);
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let set = FLOW_CACHE.get_ptr_mut(cpu.wrapping_mul(FLOW_CACHE_SETS).wrapping_add(set))?;
    // SAFETY: this CPU's region of the array, which no other program run
    // touches meanwhile (see the module's doc).
    Some(unsafe { &mut *set })
}

/// The verdict reason for an established packet this CPU's cache knows at
/// `epoch` (`side`: which end sent it, see `ConnKey::of`), its packet
/// counted for its policy if `count`; None: decide it in full.
#[inline(always)]
pub fn established(key: &ConnKey, side: u32, epoch: u32, count: bool, len: u32) -> Option<Reason> {
    let set = set_of(key)?;
    let way = if set.ways[0].key == *key {
        &mut set.ways[0]
    } else if set.ways[1].key == *key {
        &mut set.ways[1]
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
pub fn fill(key: &ConnKey, conn: &Conn) {
    let Some(set) = set_of(key) else { return };
    if set.ways[0].key == *key {
        // The same connection at an older epoch: replaced in place.
        flush(&mut set.ways[0]);
    } else {
        let evicted = &mut set.ways[1];
        if evicted.key != ConnKey::default() && evicted.epoch == conn.epoch {
            count(flow_cache_stat::EVICTIONS);
        }
        flush(evicted);
        set.ways[1] = set.ways[0];
    }
    set.ways[0] = CachedFlow {
        key: *key,
        epoch: conn.epoch,
        policy_id: conn.policy_id,
        pending_packets: 0,
        origin: conn.origin as u8,
        unrefreshed: 0,
        pending_bytes: 0,
    };
    count(flow_cache_stat::FILLS);
}

/// Moves a way's pending counts to its policy's counters.
#[inline(always)]
fn flush(way: &mut CachedFlow) {
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
fn refresh_conntrack(way: &CachedFlow) {
    // SAFETY: presence only.
    if unsafe { CONNTRACK.get(way.key) }.is_none() {
        let conn = Conn {
            epoch: way.epoch,
            policy_id: way.policy_id,
            origin: u32::from(way.origin),
            pending_packets: 0,
            pending_bytes: 0,
        };
        let _ = CONNTRACK.insert(way.key, conn, 0);
    }
}

#[inline(always)]
fn count(stat: u32) {
    if let Some(counter) = FLOW_CACHE_STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs mid-run.
        unsafe { *counter += 1 };
    }
}
