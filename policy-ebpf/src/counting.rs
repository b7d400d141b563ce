//! Every counter the programs keep: packets per verdict reason
//! (`VERDICTS`) and packets and bytes per policy (`POLICY_STATS`, through
//! the pending counts in each connection's `CONNTRACK` entry).

use policy_common::{
    Family, Verdict,
    decision::{Decision, conn_update},
    maps::{COUNTER_FLUSH, Conn, settings},
};

use crate::maps::{POLICY_STATS, VERDICTS, config};

/// Counts the verdict under its reason.
#[inline(always)]
pub fn count_verdict(verdict: Verdict) -> Verdict {
    if let Some(counter) = VERDICTS.get_ptr_mut(verdict.reason() as u32) {
        // SAFETY: per-CPU slot; programs do not migrate CPUs mid-run.
        unsafe { *counter += 1 };
    }
    verdict
}

/// Counts an allowed packet for its policy, if per-policy counting is on:
/// in the connection entry the decision read (`found`, an established
/// connection) or in the entry it is about to write (a new or re-checked
/// one). Counting in the entry costs the fast path no extra map lookup.
#[inline(always)]
pub fn count_for_policy<A: Family>(decision: &mut Decision<A>, found: *mut Conn, len: u32) {
    if decision.policy_id == 0 || !decision.verdict.is_pass() || !policy_counters_on() {
        return;
    }
    match decision.conn.kind {
        conn_update::NONE => count_in_conn(found, decision.policy_id, len),
        conn_update::INSERT => {
            decision.conn.conn.pending_packets += 1;
            decision.conn.conn.pending_bytes += u64::from(len);
        }
        _ => {}
    }
}

/// Whether packets are counted per policy.
#[inline(always)]
fn policy_counters_on() -> bool {
    config().is_some_and(|c| c.settings.flags & settings::POLICY_COUNTERS != 0)
}

/// Counts a packet of an established connection in its entry; every
/// `COUNTER_FLUSH` packets the count moves to the policy's counters.
#[inline(always)]
fn count_in_conn(conn: *mut Conn, policy_id: u32, len: u32) {
    if conn.is_null() {
        return;
    }
    // SAFETY: the pointer came from a lookup in this program run; hash map
    // elements stay valid for the run (RCU). Concurrent CPUs may race on
    // the counts, which only makes them approximate.
    unsafe {
        (*conn).pending_packets += 1;
        (*conn).pending_bytes += u64::from(len);
        if (*conn).pending_packets >= COUNTER_FLUSH {
            add_policy_counts(policy_id, (*conn).pending_packets, (*conn).pending_bytes);
            (*conn).pending_packets = 0;
            (*conn).pending_bytes = 0;
        }
    }
}

/// Adds a connection's counted packets to its policy's counters. Only an
/// entry the agent made is updated: it makes a policy's entry before the
/// policy reaches `POLICIES` and deletes it once the policy is gone, so
/// counts for a policy with no entry belong to a removed policy (flushed
/// late by a connection or a flow cache way that still names it) and are
/// dropped. Inserting here would bring a removed policy's entry back for
/// good. Policy id 0 (no policy: NetOut, `origin::DECIDED_ELSEWHERE`) never
/// gets here.
///
/// The value is shared by all CPUs: each add is atomic (a BPF atomic add,
/// its result unused). A flush comes once per `COUNTER_FLUSH` packets of a
/// connection, so the line is rarely contended, and an entry costs the
/// same on a host of two CPUs as of a hundred (a per-CPU value would cost
/// 16 bytes per possible CPU, and the kernel's per-CPU allocator made
/// every insert the agent's largest cost in a bulk load).
#[inline(always)]
pub fn add_policy_counts(policy_id: u32, packets: u32, bytes: u64) {
    if let Some(c) = POLICY_STATS.get_ptr_mut(policy_id) {
        // SAFETY: a map value, valid for this run (RCU), 8-byte aligned
        // fields; every writer adds atomically.
        unsafe {
            atomic_add(&raw mut (*c).packets, u64::from(packets));
            atomic_add(&raw mut (*c).bytes, bytes);
        }
    }
}

/// `*addr += value` as one BPF atomic add (`lock ... +=`, no result
/// fetched). Asm: the BPF target's `core` has no atomic read-modify-write.
///
/// # Safety
/// `addr` points into a map value, 8-byte aligned.
#[inline(always)]
unsafe fn atomic_add(addr: *mut u64, value: u64) {
    // SAFETY: as the caller promises.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({0} + 0) += {1}",
            in(reg) addr,
            in(reg) value,
            options(nostack, preserves_flags)
        );
    }
}
