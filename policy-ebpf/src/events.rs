//! Reporting: flow events, and the counters of the events themselves. Off
//! the fast path of established connections.

use aya_ebpf::{
    btf_maps::LruHashMap,
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
};
use policy_common::{
    Family, Parsed, Reason,
    decision::Decision,
    limits::window_ended,
    maps::{EventLimit, FlowEvent, action, event_stat, settings},
};

use crate::maps::{EVENT_LIMITS, EVENT_STATS, FLOW_EVENTS, config};

#[inline(always)]
fn bump(stat: u32) {
    if let Some(counter) = EVENT_STATS.get_ptr_mut(stat) {
        // SAFETY: per-CPU slot.
        unsafe { *counter += 1 };
    }
}

/// Whether another event for `key` fits this second's budget in `limits`
/// (the denied-event limit per destination, the reject limit per source;
/// see `policy_common::limits` for who deletes the entries).
#[inline(always)]
pub fn within_limit<const N: usize>(
    limits: &LruHashMap<u32, EventLimit, N>,
    key: u32,
    now: u64,
    per_second: u32,
) -> bool {
    match limits.get_ptr_mut(key) {
        // SAFETY: the entry is ours for this run; concurrent CPUs may race on
        // the count, which only makes the limit approximate.
        Some(limit) => unsafe {
            if window_ended((*limit).window_start_ns, now) {
                (*limit).window_start_ns = now;
                (*limit).count = 1;
                true
            } else if (*limit).count < per_second {
                (*limit).count += 1;
                true
            } else {
                false
            }
        },
        None => {
            let _ = limits.insert(key, EventLimit { window_start_ns: now, count: 1, _pad: 0 }, 0);
            true
        }
    }
}

/// Reports a decision if it is a denial or a new allowed connection;
/// `rejected`: the denied packet was answered with a reject.
#[inline(always)]
pub fn report<A: Family>(
    parsed: &Parsed<A>,
    decision: &Decision<A>,
    direction: u8,
    ifindex: u32,
    rejected: bool,
) {
    let verdict = decision.verdict;
    // Plain integer compares: both variants carry a reason (comparing the
    // enums lets LLVM read a register some paths never set).
    let (passed, reason) = (verdict.is_pass(), verdict.reason() as u32);
    let new_connection = passed && reason == Reason::NewAllowed as u32;
    // A security group rule marked `log`: reported like a denial (rate-limited).
    let logged = passed && reason == Reason::AsgAllowed as u32;
    if passed && !new_connection && !logged {
        return;
    }
    let Some(settings) = config().map(|c| &c.settings) else { return };
    let (saddr, daddr, sport, dport, protocol) = match *parsed {
        Parsed::Flow { flow, .. } => {
            (flow.saddr, flow.daddr, flow.sport, flow.dport, flow.protocol)
        }
        Parsed::LaterFragment(k) => {
            let (saddr, daddr) = A::fragment_ends(&k);
            (saddr, daddr, 0, 0, A::fragment_protocol(&k))
        }
        Parsed::IcmpError { saddr, daddr, .. } => (saddr, daddr, 0, 0, A::ICMP),
        Parsed::OtherFamily | Parsed::Malformed | Parsed::LinkControl => {
            (A::default(), A::default(), 0, 0, 0)
        }
    };
    if new_connection {
        if settings.flags & settings::ALLOWED_EVENTS == 0 {
            return;
        }
    } else if settings.denied_events_per_second == 0 {
        return;
    } else {
        // The coarse clock (jiffies) is cheap and fine for one-second
        // windows; a flood spends most of its time on this path.
        // SAFETY: a helper without arguments.
        let coarse = unsafe { bpf_ktime_get_coarse_ns() };
        let key = daddr.limit_key();
        if !within_limit(&EVENT_LIMITS, key, coarse, settings.denied_events_per_second) {
            bump(event_stat::RATE_LIMITED);
            return;
        }
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let event = FlowEvent {
        time_ns: now,
        saddr,
        daddr,
        sport,
        dport,
        protocol,
        direction,
        allowed: if verdict.is_pass() {
            action::PASSED
        } else if rejected {
            action::REJECTED
        } else {
            action::DROPPED
        },
        reason: verdict.reason() as u8,
        src_tag: decision.src_tag,
        dst_tag: decision.dst_tag,
        policy_id: decision.policy_id,
        ifindex,
    };
    if FLOW_EVENTS.output_untyped::<FlowEvent<A>>(event, 0).is_ok() {
        bump(event_stat::EMITTED);
    } else {
        bump(event_stat::LOST);
    }
}
