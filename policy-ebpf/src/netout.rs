//! NetOut (security groups) at the source side: a packet from a container
//! to a destination outside the overlay passes only if a rule of its app
//! allows it, or it belongs to a connection the container did not start
//! (a reply). Apps without security groups are not checked.

use aya_ebpf::programs::TcContext;
use policy_common::{
    Flow, Lookups as _, Parsed, Reason, Verdict,
    decision::{ConnUpdate, Decision},
    maps::{Conn, ConnKey, direction},
    netout::{is_link_local, key_data},
};

use crate::{
    counting::count_verdict,
    events,
    kernel_maps::{self, KernelMaps},
    maps::{NETOUT, config},
};

const ICMP: u8 = 1;

#[inline(always)]
pub fn active() -> bool {
    config().is_some_and(|c| c.netout_apps != 0)
}

/// The ICMP type and code of the packet (0, 0 if unreadable).
#[inline(always)]
fn icmp_type_code(ctx: &TcContext) -> (u8, u8) {
    let Ok(ver_ihl) = ctx.load::<u8>(14) else { return (0, 0) };
    let l4 = 14 + ((ver_ihl & 0x0f) as usize) * 4;
    match (ctx.load::<u8>(l4), ctx.load::<u8>(l4 + 1)) {
        (Ok(t), Ok(c)) => (t, c),
        _ => (0, 0),
    }
}

/// The verdict for a packet leaving a container of app `tag` (already
/// source-verified), None when NetOut does not apply to it.
#[inline(always)]
pub fn check(
    ctx: &TcContext,
    parsed: &Parsed,
    flow: &Flow,
    tag: u32,
    ifindex: u32,
) -> Option<Verdict> {
    if is_link_local(flow.daddr) {
        return None;
    }
    let maps = KernelMaps::new();
    if maps.endpoint(flow.daddr).is_some() || crate::maps::to_other_cell(flow.daddr) {
        return None; // container to container: policies decide
    }
    let key = aya_ebpf::maps::lpm_trie::Key::new(64, key_data(tag, flow.daddr));
    let rules = NETOUT.get(&key)?;
    let (conn, _) = ConnKey::of(flow);
    if maps.conn(&conn).is_some() {
        return None; // a reply to a connection from outside
    }
    let icmp = if flow.protocol == ICMP { icmp_type_code(ctx) } else { (0, 0) };
    let verdict = match rules.allows(flow.protocol, flow.dport, icmp) {
        Some(false) => return None,
        Some(true) => Verdict::Pass(Reason::AsgAllowed),
        None => Verdict::Drop(Reason::AsgDenied),
    };
    let decision = Decision { src_tag: tag, ..Decision::from_verdict(verdict) };
    events::report(parsed, &decision, direction::EGRESS, ifindex, false);
    Some(count_verdict(verdict))
}

/// At the destination side: a connection from outside the overlay to a
/// container is remembered (and kept fresh) while any app has security
/// groups, so the container's replies are not taken for new egress.
#[inline(always)]
pub fn track_inbound(parsed: &Parsed, verdict: Verdict) {
    // Integer compares (see `events::report`).
    if !verdict.is_pass() || verdict.reason() as u32 != Reason::Unmanaged as u32 || !active() {
        return;
    }
    let Parsed::Flow { flow, .. } = parsed else { return };
    let maps = KernelMaps::new();
    if maps.endpoint(flow.daddr).is_none() || maps.endpoint(flow.saddr).is_some() {
        return;
    }
    let (key, side) = ConnKey::of(flow);
    let epoch = maps.epoch();
    let conn = Conn { epoch, policy_id: 0, origin: side, pending_packets: 0, pending_bytes: 0 };
    kernel_maps::apply_conn(ConnUpdate::insert(key, conn));
}
