//! The policy programs. Entry points are thin: parse, look up, count, return.
//! The decision itself lives in `policy_common::decision`, shared with the
//! host tests.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod bytes;
mod counting;
mod events;
mod kernel_maps;
mod maps;
mod netin;
mod netout;
mod reject;

use aya_ebpf::{
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};
use policy_common::{
    Parsed, Reason, Verdict, decide_destination, decide_source,
    decision::{Decision, TunnelSource, decide_underlay, source_address, track_outgoing},
    maps::{Attachment, TUNNEL_TAG_MASK, direction},
    packet::{ETH_P_IP, parse_ethernet, parse_ipv4},
};

use crate::{
    bytes::SkbBytes,
    counting::{count_for_policy, count_verdict},
    kernel_maps::KernelMaps,
    maps::{PEERS, TUNNEL},
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const CGROUP_SKB_DROP: i32 = 0;
const CGROUP_SKB_PASS: i32 = 1;

/// TC ingress of the host-side veth = packets leaving the container.
/// Anti-spoofing only; the policy is enforced where the packet enters its
/// destination, so that replies and cross-host traffic meet the same check.
/// A verified packet carries its app's tag in `skb->mark`, which a VXLAN
/// device with GBP puts in the tunnel header for the destination's host;
/// whatever mark the container set is overwritten, so it can claim nothing.
#[classifier]
pub fn tc_from_container(ctx: TcContext) -> i32 {
    let bytes = SkbBytes::new(ctx.skb.skb);
    let ifindex = bytes.ifindex();
    let own = kernel_maps::veth_endpoint(ifindex);
    let parsed = parse_ethernet(&bytes);
    let verdict = source_side(&parsed, own, ifindex);
    // A reply through a NetIn port mapping leaves as the host's address.
    if verdict.is_pass()
        && let Parsed::Flow { flow, fragment: None } = parsed
        && let Some(action) = netin::reply(&ctx, &flow)
    {
        return action;
    }
    // Leaving the overlay: the app's security groups, if it has any.
    if verdict.is_pass()
        && netout::active()
        && let Some(own) = own
        && let Parsed::Flow { flow, .. } = parsed
        && let Some(netout) = netout::check(&ctx, &parsed, &flow, own.tag, ifindex)
        && !netout.is_pass()
    {
        return TC_ACT_SHOT;
    }
    // Cluster mode only (one array read otherwise): the mark the tunnel
    // carries, and connections to other hosts' endpoints. An opening to
    // another host that no policy allows is rejected here, back into the
    // container (the other host drops it unanswered).
    if verdict.is_pass() && TUNNEL.get(0).is_some_and(|t| t.ifindex != 0) {
        let tag = own.map_or(0, |a| a.tag);
        bytes.set_mark(if tag & !TUNNEL_TAG_MASK == 0 { tag } else { 0 });
        let outgoing = track_outgoing(&KernelMaps::new(), &parsed);
        kernel_maps::apply_conn(outgoing.conn);
        if outgoing.denied && reject::wanted(&ctx, &parsed, Verdict::Drop(Reason::NoPolicy)) {
            return reject::send(&ctx, &parsed, reject::Back::ToSender(ifindex));
        }
    }
    tc_action(verdict)
}

/// TC egress of the host-side veth = packets entering the container. A
/// packet that came through the cluster's tunnel is checked as the app its
/// tunnel header names (its sender's host verified it); others as the app
/// their source address is registered to.
///
/// A packet denied by policy from a local sender may be answered with a
/// reject (see `reject`); one from another host is dropped unanswered (its
/// sender's host rejects what its own check denies).
#[classifier]
pub fn tc_to_container(ctx: TcContext) -> i32 {
    let bytes = SkbBytes::new(ctx.skb.skb);
    let (from_tunnel, tunnel_tag) = match TUNNEL.get(0) {
        Some(t) if t.ifindex != 0 && bytes.ingress_ifindex() == t.ifindex => {
            (true, bytes.mark() & TUNNEL_TAG_MASK)
        }
        _ => (false, 0),
    };
    let parsed = parse_ethernet(&bytes);
    let ifindex = bytes.ifindex();
    let (verdict, rejected) =
        destination_side(Some(&ctx), &parsed, &bytes, ifindex, tunnel_tag, !from_tunnel);
    if rejected {
        return reject::send(&ctx, &parsed, reject::Back::FromDestination(ifindex));
    }
    tc_action(verdict)
}

/// TC ingress of the host's uplinks (the underlay interface in cluster
/// mode, `netin_interfaces`) = packets from outside the host: tunnel
/// packets only from the cluster's hosts (`PEERS`); connections to a NetIn
/// port mapping go to their container.
#[classifier]
pub fn tc_from_underlay(ctx: TcContext) -> i32 {
    let bytes = SkbBytes::new(ctx.skb.skb);
    let parsed = parse_ethernet(&bytes);
    if let Some(tunnel) = TUNNEL.get(0).copied()
        && tunnel.ifindex != 0
    {
        // SAFETY: presence only.
        let is_peer = |addr: u32| unsafe { PEERS.get(addr).is_some() };
        let verdict = decide_underlay(&parsed, tunnel.port as u16, is_peer);
        if !verdict.is_pass() {
            return tc_action(count_verdict(verdict));
        }
    }
    if let Parsed::Flow { flow, fragment: None } = parsed {
        netin::incoming(&ctx, &flow, bytes.ifindex());
    }
    TC_ACT_OK
}

/// cgroup_skb egress = packets sent by the cgroup's workloads.
#[cgroup_skb(egress)]
pub fn cgroup_egress(ctx: SkBuffContext) -> i32 {
    let bytes = SkbBytes::new(ctx.skb.skb);
    let own = kernel_maps::cgroup_endpoint(bytes.cgroup_id());
    cgroup_action(source_side(&parse_l3(&bytes), own, 0))
}

/// cgroup_skb ingress = packets delivered to the cgroup's workloads.
/// Denied packets are dropped (a cgroup_skb program cannot send a reject).
#[cgroup_skb(ingress)]
pub fn cgroup_ingress(ctx: SkBuffContext) -> i32 {
    let bytes = SkbBytes::new(ctx.skb.skb);
    cgroup_action(destination_side(None, &parse_l3(&bytes), &bytes, 0, 0, false).0)
}

/// Anti-spoofing, counted; a spoofed packet is reported.
#[inline(always)]
fn source_side(parsed: &Parsed, own: Option<Attachment>, ifindex: u32) -> Verdict {
    let verdict = decide_source(parsed, own);
    if !verdict.is_pass() {
        let decision =
            Decision { src_tag: own.map_or(0, |a| a.tag), ..Decision::from_verdict(verdict) };
        events::report(parsed, &decision, direction::EGRESS, ifindex, false);
    }
    count_verdict(verdict)
}

/// The policy decision, its map effects, counters and report. `tunnel_tag`:
/// the source app's tag from the tunnel header (0: none). Also says whether
/// a denied packet is to be answered with a reject (only if `may_reject`).
#[inline(always)]
fn destination_side(
    ctx: Option<&TcContext>,
    parsed: &Parsed,
    bytes: &SkbBytes,
    ifindex: u32,
    tunnel_tag: u32,
    may_reject: bool,
) -> (Verdict, bool) {
    let maps = KernelMaps::new();
    // Only a tunnel packet's source is looked up differently.
    let saddr = if tunnel_tag != 0 { source_address(parsed).unwrap_or(0) } else { 0 };
    let lookups = TunnelSource { lookups: &maps, saddr, tag: tunnel_tag };
    let mut decision = decide_destination(&lookups, parsed);
    netout::track_inbound(parsed, decision.verdict);
    count_for_policy(&mut decision, maps.found_conn(), bytes.len());
    let rejected = match ctx {
        Some(ctx) if may_reject => reject::wanted(ctx, parsed, decision.verdict),
        _ => false,
    };
    events::report(parsed, &decision, direction::INGRESS, ifindex, rejected);
    (kernel_maps::apply(&decision), rejected)
}

/// cgroup_skb programs see the packet from its network header on.
#[inline(always)]
fn parse_l3(bytes: &SkbBytes) -> Parsed {
    if bytes.protocol() != u32::from(ETH_P_IP.to_be()) {
        return Parsed::NotIpv4;
    }
    parse_ipv4(bytes, 0)
}

#[inline(always)]
fn tc_action(verdict: Verdict) -> i32 {
    if verdict.is_pass() { TC_ACT_OK } else { TC_ACT_SHOT }
}

#[inline(always)]
fn cgroup_action(verdict: Verdict) -> i32 {
    if verdict.is_pass() { CGROUP_SKB_PASS } else { CGROUP_SKB_DROP }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
