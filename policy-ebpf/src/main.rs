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

use aya_ebpf::{
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};
use policy_common::{
    Parsed, Verdict, decide_destination, decide_source,
    decision::Decision,
    maps::{Attachment, direction},
    packet::{ETH_P_IP, parse_ethernet, parse_ipv4},
};

use crate::{
    bytes::SkbBytes,
    counting::{count_for_policy, count_verdict},
    kernel_maps::KernelMaps,
};

const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const CGROUP_SKB_DROP: i32 = 0;
const CGROUP_SKB_PASS: i32 = 1;

/// TC ingress of the host-side veth = packets leaving the container.
/// Anti-spoofing only; the policy is enforced where the packet enters its
/// destination, so that replies and cross-host traffic meet the same check.
#[classifier]
pub fn tc_from_container(ctx: TcContext) -> i32 {
    let bytes = SkbBytes::new(ctx.skb.skb);
    let ifindex = bytes.ifindex();
    tc_action(source_side(&parse_ethernet(&bytes), kernel_maps::veth_endpoint(ifindex), ifindex))
}

/// TC egress of the host-side veth = packets entering the container.
#[classifier]
pub fn tc_to_container(ctx: TcContext) -> i32 {
    let bytes = SkbBytes::new(ctx.skb.skb);
    tc_action(destination_side(&parse_ethernet(&bytes), &bytes, bytes.ifindex()))
}

/// cgroup_skb egress = packets sent by the cgroup's workloads.
#[cgroup_skb(egress)]
pub fn cgroup_egress(ctx: SkBuffContext) -> i32 {
    let bytes = SkbBytes::new(ctx.skb.skb);
    let own = kernel_maps::cgroup_endpoint(bytes.cgroup_id());
    cgroup_action(source_side(&parse_l3(&bytes), own, 0))
}

/// cgroup_skb ingress = packets delivered to the cgroup's workloads.
#[cgroup_skb(ingress)]
pub fn cgroup_ingress(ctx: SkBuffContext) -> i32 {
    let bytes = SkbBytes::new(ctx.skb.skb);
    cgroup_action(destination_side(&parse_l3(&bytes), &bytes, 0))
}

/// Anti-spoofing, counted; a spoofed packet is reported.
#[inline(always)]
fn source_side(parsed: &Parsed, own: Option<Attachment>, ifindex: u32) -> Verdict {
    let verdict = decide_source(parsed, own);
    if !verdict.is_pass() {
        let decision =
            Decision { src_tag: own.map_or(0, |a| a.tag), ..Decision::from_verdict(verdict) };
        events::report(parsed, &decision, direction::EGRESS, ifindex);
    }
    count_verdict(verdict)
}

/// The policy decision, its map effects, counters and report.
#[inline(always)]
fn destination_side(parsed: &Parsed, bytes: &SkbBytes, ifindex: u32) -> Verdict {
    let maps = KernelMaps::new();
    let mut decision = decide_destination(&maps, parsed);
    count_for_policy(&mut decision, maps.found_conn(), bytes.len());
    events::report(parsed, &decision, direction::INGRESS, ifindex);
    kernel_maps::apply(&decision)
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
