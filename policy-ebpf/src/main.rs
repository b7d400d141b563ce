//! The policy programs. Entry points are thin: parse, look up, count, return.
//! The decision itself lives in `policy_common::decision`, shared with the
//! host tests.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

mod bytes;
mod counting;
mod events;
mod flow_cache;
mod kernel_maps;
mod maps;
mod netin;
mod netout;
mod reject;

use aya_ebpf::{
    bindings::__sk_buff,
    macros::{cgroup_skb, classifier},
    programs::{SkBuffContext, TcContext},
};
use policy_common::{
    Parsed, Reason, Verdict, decide_destination, decide_source,
    decision::{
        Decision, Outgoing, TunnelPort, TunnelSource, conn_update, decide_source6, decide_underlay,
        source_address, track_outgoing,
    },
    hint::opaque,
    maps::{
        Attachment, ConnKey, Ipv6Key, TUNNEL_TAG_MASK, UNTAGGED_TAG, direction, proto, settings,
        tunnel_flags,
    },
    packet::{ETH_HLEN, ETH_P_IP, ETH_P_IPV6, Ipv6Parts, ipv6_kind, parse_ethernet, parse_ipv4},
};

use crate::{
    bytes::SkbBytes,
    counting::{count_for_policy, count_verdict},
    kernel_maps::{KernelMaps, KernelMaps6},
    maps::{PEERS, SCRATCH6, config, scratch},
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
///
/// Each family's path is its own BPF function: one call deep, each within
/// the 512-byte stack, which the two inlined together would exceed.
#[classifier]
pub fn tc_from_container(ctx: TcContext) -> i32 {
    if is_ipv6(ctx.skb.skb) {
        if source_verified6(ctx.skb.skb) {
            return TC_ACT_OK;
        }
        return from_container6(ctx.skb.skb);
    }
    from_container4(ctx.skb.skb)
}

/// Whether an IPv6 packet leaving a container passed the anti-spoofing
/// check before the full parse: on a single host (in cluster mode the full
/// path also marks the packet and tracks openings to other hosts), a TCP
/// or UDP packet whose header follows the fixed one (see
/// `flow_cache::plain_flow6`) from exactly the IPv6 address registered for
/// this veth. That is the full check's verdict for such a packet (with no
/// tunnel port, rule 6 of `decide_source6`), counted as it counts it;
/// anything else goes the full way.
#[inline(never)]
fn source_verified6(skb: *mut __sk_buff) -> bool {
    if config().is_none_or(|c| c.tunnel.ifindex != 0) {
        return false;
    }
    let bytes = SkbBytes::new(skb);
    let Some(flow) = flow_cache::plain_flow6(&bytes) else { return false };
    // SAFETY: read by copy; the agent replaces whole values.
    let Some(own) = (unsafe { maps::VETHS6.get(bytes.ifindex()) }).copied() else {
        return false;
    };
    if own != flow.saddr || own.is_unspecified() {
        return false;
    }
    count_verdict(Verdict::Pass(Reason::SourceVerified));
    true
}

/// Whether the skb carries IPv6 (`skb->protocol`, a context field: no
/// packet read).
#[inline(always)]
fn is_ipv6(skb: *mut __sk_buff) -> bool {
    SkbBytes::new(skb).protocol() == u32::from(ETH_P_IPV6.to_be())
}

/// The IPv6 packet, parsed into this CPU's scratch `slot` (see `SCRATCH6`).
#[inline(always)]
fn parsed6(skb: *mut __sk_buff, l3: usize, slot: u32) -> Option<&'static Parsed<Ipv6Key>> {
    let out = SCRATCH6.get_ptr_mut(slot)?;
    // SAFETY: this CPU's slot, which no other program run uses meanwhile.
    unsafe {
        parse6_into(skb, l3, &mut *out);
        Some(&*out)
    }
}

/// Parses the IPv6 packet into `out`. A function of
/// its own, so its stack frame is not added to the decision's, and every
/// path through the header walk ends at its return: the verifier follows the
/// decision after it once, not once per path. Each variant is written by a
/// function of its own (see `Ipv6Parts`: one store of the enum where the
/// paths meet would read registers some paths never set).
#[inline(never)]
fn parse6_into(skb: *mut __sk_buff, l3: usize, out: &mut Parsed<Ipv6Key>) {
    let parts = Ipv6Parts::parse(&SkbBytes::new(skb), l3);
    match parts.kind {
        ipv6_kind::FLOW if parts.fragment => put_first_fragment(out, &parts),
        ipv6_kind::FLOW => put_flow(out, &parts),
        ipv6_kind::LATER_FRAGMENT => put_later_fragment(out, &parts),
        ipv6_kind::ICMP_ERROR => put_icmp_error(out, &parts),
        ipv6_kind::LINK_CONTROL => *out = Parsed::LinkControl,
        _ => *out = Parsed::Malformed,
    }
    clear_r0();
}

/// Ends a BPF function that returns nothing with R0 cleared: the verifier
/// rejects one whose R0 still points into its own stack (where LLVM may
/// leave an address it copied from), whether or not its caller reads it.
#[inline(always)]
fn clear_r0() {
    // SAFETY: writes only R0, which a function without a result leaves
    // undefined anyway.
    unsafe { core::arch::asm!("r0 = 0", out("r0") _, options(nostack, preserves_flags)) };
}

#[inline(never)]
fn put_flow(out: &mut Parsed<Ipv6Key>, parts: &Ipv6Parts) {
    *out = Parsed::Flow { flow: parts.flow(), fragment: None };
    clear_r0();
}

#[inline(never)]
fn put_first_fragment(out: &mut Parsed<Ipv6Key>, parts: &Ipv6Parts) {
    *out = Parsed::Flow { flow: parts.flow(), fragment: Some(parts.fragment_key()) };
    clear_r0();
}

#[inline(never)]
fn put_later_fragment(out: &mut Parsed<Ipv6Key>, parts: &Ipv6Parts) {
    *out = Parsed::LaterFragment(parts.fragment_key());
    clear_r0();
}

#[inline(never)]
fn put_icmp_error(out: &mut Parsed<Ipv6Key>, parts: &Ipv6Parts) {
    *out = Parsed::IcmpError { saddr: parts.saddr, daddr: parts.daddr, about: parts.about };
    clear_r0();
}

#[inline(never)]
fn from_container6(skb: *mut __sk_buff) -> i32 {
    let Some(parsed) = parsed6(skb, ETH_HLEN, scratch::TC) else { return TC_ACT_SHOT };
    let bytes = SkbBytes::new(skb);
    let ifindex = bytes.ifindex();
    // A plain value across the call (tag 0: no endpoint here): an Option's
    // payload register is unset when it is None, and the callee may spill it.
    let own = kernel_maps::veth_endpoint(ifindex).unwrap_or_default();
    match source_side6(parsed, &bytes, own, ifindex) {
        outcome::PASS => TC_ACT_OK,
        outcome::REJECT => reject6(skb, parsed, reject::Back::ToSender(ifindex)),
        _ => TC_ACT_SHOT,
    }
}

#[inline(never)]
fn from_container4(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let bytes = SkbBytes::new(skb);
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
    if verdict.is_pass() && config().is_some_and(|c| c.tunnel.ifindex != 0) {
        let tag = own.map_or(0, |a| a.tag);
        bytes.set_mark(if tag & !TUNNEL_TAG_MASK == 0 { tag } else { 0 });
        let outgoing = track_outgoing(&KernelMaps::new(), &parsed, maps::to_other_cell);
        kernel_maps::apply_conn(outgoing.conn);
        if outgoing.denied {
            let denial = denied_opening(&outgoing);
            let rejected = reject::wanted(&ctx, &parsed, denial.verdict);
            events::report(&parsed, &denial, direction::EGRESS, ifindex, rejected);
            if rejected {
                return reject::send(&ctx, &parsed, reject::Back::ToSender(ifindex));
            }
            return TC_ACT_SHOT;
        }
    }
    tc_action(verdict)
}

/// An opening to another host's endpoint that no policy allows: decided
/// here, where it leaves, and counted and reported here as a local denial
/// is where it enters (the other host would decide the same from the same
/// policies, and never sees the packet).
#[inline(always)]
fn denied_opening<A: policy_common::Family>(outgoing: &Outgoing<A>) -> Decision<A> {
    let verdict = count_verdict(Verdict::Drop(Reason::NoPolicy));
    Decision {
        src_tag: outgoing.src_tag,
        dst_tag: outgoing.dst_tag,
        ..Decision::from_verdict(verdict)
    }
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
    if is_ipv6(ctx.skb.skb) {
        if flow_cache::answered6(ctx.skb.skb) {
            return TC_ACT_OK;
        }
        return to_container6(ctx.skb.skb);
    }
    // Here, not in `to_container4`: its frame leaves no room for a call.
    // (The host's own packets, without an ingress interface, skip the call.)
    if SkbBytes::new(ctx.skb.skb).ingress_ifindex() != 0 && forges_endpoint4(ctx.skb.skb) {
        return refuse_spoofed4(ctx.skb.skb);
    }
    to_container4(ctx.skb.skb)
}

/// The cluster's tunnel port, which no container may send to (see
/// `TunnelPort`); 0 on a single host.
#[inline(always)]
fn tunnel_port() -> TunnelPort {
    TunnelPort(config().map_or(0, |c| if c.tunnel.ifindex != 0 { c.tunnel.port } else { 0 }))
}

/// The tag a packet that came through the cluster's tunnel carries, and
/// whether it did: the device's ingress, whose mark the VXLAN driver sets
/// from the GBP field of the header it took off. That header is believed
/// because only two kinds of packet reach the device's socket: from the
/// underlay, from a host of the cluster (`tc_from_underlay` drops the
/// rest), and from this host itself; no container's packet to the tunnel
/// port gets past its source side (`TunnelPort`).
#[inline(always)]
fn tunnel_source(bytes: &SkbBytes) -> (bool, u32) {
    match config().map(|c| &c.tunnel) {
        Some(t) if t.ifindex != 0 && bytes.ingress_ifindex() == t.ifindex => {
            let tag = bytes.mark() & TUNNEL_TAG_MASK;
            // Silk's overlay: no tag is an app no policy names (see
            // `tunnel_flags::SILK`), not "judge by the address".
            let untagged = tag == 0 && t.flags & tunnel_flags::SILK != 0;
            (true, if untagged { UNTAGGED_TAG } else { tag })
        }
        _ => (false, 0),
    }
}

#[inline(never)]
fn to_container6(skb: *mut __sk_buff) -> i32 {
    let bytes = SkbBytes::new(skb);
    let (from_tunnel, tunnel_tag) = tunnel_source(&bytes);
    let Some(parsed) = parsed6(skb, ETH_HLEN, scratch::TC) else { return TC_ACT_SHOT };
    // Packets from another host are never answered (as for IPv4).
    let ifindex = bytes.ifindex();
    if forges_endpoint6(skb, parsed) {
        return refuse_spoofed6(parsed, ifindex);
    }
    match destination_side6(parsed, &bytes, ifindex, tunnel_tag, !from_tunnel) {
        outcome::PASS => TC_ACT_OK,
        outcome::PASS_FILL => {
            fill6(parsed);
            TC_ACT_OK
        }
        outcome::REJECT => reject6(skb, parsed, reject::Back::FromDestination(ifindex)),
        _ => TC_ACT_SHOT,
    }
}

#[inline(never)]
fn to_container4(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let bytes = SkbBytes::new(skb);
    let (from_tunnel, tunnel_tag) = tunnel_source(&bytes);
    let parsed = parse_ethernet(&bytes);
    let ifindex = bytes.ifindex();
    let (verdict, rejected) =
        destination_side(Some(&ctx), &parsed, &bytes, ifindex, tunnel_tag, !from_tunnel);
    if rejected {
        return reject::send(&ctx, &parsed, reject::Back::FromDestination(ifindex));
    }
    tc_action(verdict)
}

/// Whether an IPv4 packet entering a container forges an endpoint's source
/// address: it came in by an interface that checked nothing (see
/// [`unchecked_ingress`]) and names an endpoint's address, so it claims that
/// endpoint's app. Established packets too: a forged copy of a tracked
/// connection's packet from outside is dropped. For a packet from a
/// container: one array read.
#[inline(never)]
fn forges_endpoint4(skb: *mut __sk_buff) -> bool {
    use policy_common::Lookups as _;
    let bytes = SkbBytes::new(skb);
    unchecked_ingress(&bytes)
        && source_address(&parse_ethernet(&bytes))
            .is_some_and(|saddr| KernelMaps::new().endpoint(saddr).is_some())
}

/// [`forges_endpoint4`] for an IPv6 packet (the parse in its scratch slot).
#[inline(never)]
fn forges_endpoint6(skb: *mut __sk_buff, parsed: &Parsed<Ipv6Key>) -> bool {
    use policy_common::Lookups as _;
    unchecked_ingress(&SkbBytes::new(skb))
        && source_address(parsed).is_some_and(|saddr| KernelMaps6::new().endpoint(saddr).is_some())
}

/// Whether a packet entering a container came in by an interface that
/// checked nothing of its source address. Not so for a packet from this
/// host itself (no ingress interface), through the cluster's tunnel (the
/// sending host checked it), or by an endpoint's veth (its source side
/// drops every packet not from the endpoint's own addresses). So: an
/// uplink, or a veth without an endpoint.
#[inline(always)]
pub(crate) fn unchecked_ingress(bytes: &SkbBytes) -> bool {
    let via = bytes.ingress_ifindex();
    via != 0 && !tunnel_source(bytes).0 && kernel_maps::veth_endpoint(via).is_none()
}

/// Drops an IPv4 packet that forges an endpoint's source address, counted
/// and reported as spoofed where it would have entered the container.
#[inline(never)]
fn refuse_spoofed4(skb: *mut __sk_buff) -> i32 {
    let bytes = SkbBytes::new(skb);
    refuse_spoofed(&parse_ethernet(&bytes), bytes.ifindex())
}

/// [`refuse_spoofed4`] for IPv6 (a function of its own: the event it
/// builds is not added to `to_container6`'s frame, under the decision's).
#[inline(never)]
fn refuse_spoofed6(parsed: &Parsed<Ipv6Key>, ifindex: u32) -> i32 {
    refuse_spoofed(parsed, ifindex)
}

/// [`refuse_spoofed4`] for either family.
#[inline(always)]
fn refuse_spoofed<A: policy_common::Family>(parsed: &Parsed<A>, ifindex: u32) -> i32 {
    let decision = Decision::from_verdict(count_verdict(Verdict::Drop(Reason::Spoofed)));
    events::report(parsed, &decision, direction::INGRESS, ifindex, false);
    TC_ACT_SHOT
}

/// TC ingress of the host's uplinks (the underlay interface in cluster
/// mode, `netin_interfaces`) = packets from outside the host: tunnel
/// packets only from the cluster's hosts (`PEERS`); connections to a NetIn
/// port mapping go to their container.
#[classifier]
pub fn tc_from_underlay(ctx: TcContext) -> i32 {
    let bytes = SkbBytes::new(ctx.skb.skb);
    let parsed = parse_ethernet(&bytes);
    if let Some(tunnel) = config().map(|c| c.tunnel)
        && tunnel.ifindex != 0
    {
        // SAFETY: presence only.
        let is_peer = |addr: u32| unsafe { PEERS.get(addr).is_some() };
        let verdict = decide_underlay(&parsed, tunnel.port, is_peer);
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
    // The verdict leaves each family's function as a plain value and
    // becomes the return code here: the verifier checks that code's range,
    // which it does not follow through a function's result (and `opaque`
    // keeps LLVM, which does, from folding the check away).
    let verdict = if is_ipv6(ctx.skb.skb) {
        cgroup_egress6(ctx.skb.skb)
    } else {
        cgroup_egress4(ctx.skb.skb)
    };
    if opaque(verdict as u64) == CGROUP_SKB_PASS as u64 { CGROUP_SKB_PASS } else { CGROUP_SKB_DROP }
}

#[inline(never)]
fn cgroup_egress4(skb: *mut __sk_buff) -> i32 {
    let bytes = SkbBytes::new(skb);
    let own = kernel_maps::cgroup_endpoint(bytes.cgroup_id());
    cgroup_action(source_side(&parse_l3(&bytes), own, 0))
}

/// Cgroups register no IPv6 address: their endpoint sends none (but
/// link-local neighbour traffic). Egress runs in process context, so its
/// parse stays on its own stack (no shared scratch slot); the verdict is
/// all it needs, so the parse is never stored as a `Parsed`.
#[inline(never)]
fn cgroup_egress6(skb: *mut __sk_buff) -> i32 {
    let bytes = SkbBytes::new(skb);
    let own6 = kernel_maps::cgroup_endpoint(bytes.cgroup_id()).map(|_| Ipv6Key::default());
    let parts = Ipv6Parts::parse(&bytes, 0);
    let verdict = decide_source6(&KernelMaps6::new(), &parts.build(), own6, tunnel_port());
    cgroup_action(count_verdict(verdict))
}

/// cgroup_skb ingress = packets delivered to the cgroup's workloads.
/// Denied packets are dropped (a cgroup_skb program cannot send a reject).
#[cgroup_skb(ingress)]
pub fn cgroup_ingress(ctx: SkBuffContext) -> i32 {
    let verdict = if is_ipv6(ctx.skb.skb) {
        cgroup_ingress6(ctx.skb.skb)
    } else {
        cgroup_ingress4(ctx.skb.skb)
    };
    if opaque(verdict as u64) == CGROUP_SKB_PASS as u64 { CGROUP_SKB_PASS } else { CGROUP_SKB_DROP }
}

#[inline(never)]
fn cgroup_ingress4(skb: *mut __sk_buff) -> i32 {
    let bytes = SkbBytes::new(skb);
    cgroup_action(destination_side(None, &parse_l3(&bytes), &bytes, 0, 0, false).0)
}

#[inline(never)]
fn cgroup_ingress6(skb: *mut __sk_buff) -> i32 {
    let Some(parsed) = parsed6(skb, 0, scratch::CGROUP_INGRESS) else { return CGROUP_SKB_DROP };
    let outcome = destination_side6(parsed, &SkbBytes::new(skb), 0, 0, false);
    if outcome == outcome::PASS || outcome == outcome::PASS_FILL {
        CGROUP_SKB_PASS
    } else {
        CGROUP_SKB_DROP
    }
}

/// The IPv6 anti-spoofing check, counted and reported; in cluster mode the
/// mark for the tunnel and connections to other hosts' endpoints, as for
/// IPv4: an opening to another host that no policy allows is rejected here,
/// back into the container. (NetIn and NetOut are IPv4 only.)
#[inline(never)]
fn source_side6(parsed: &Parsed<Ipv6Key>, bytes: &SkbBytes, own: Attachment, ifindex: u32) -> u32 {
    let own = (own.tag != 0).then_some(own);
    let own6 = kernel_maps::veth_endpoint6(ifindex, own);
    let verdict = decide_source6(&KernelMaps6::new(), parsed, own6, tunnel_port());
    if !verdict.is_pass() {
        let decision =
            Decision { src_tag: own.map_or(0, |a| a.tag), ..Decision::from_verdict(verdict) };
        events::report(parsed, &decision, direction::EGRESS, ifindex, false);
        count_verdict(verdict);
        return outcome::DROP;
    }
    count_verdict(verdict);
    if config().is_some_and(|c| c.tunnel.ifindex != 0) {
        let tag = own.map_or(0, |a| a.tag);
        bytes.set_mark(if tag & !TUNNEL_TAG_MASK == 0 { tag } else { 0 });
        let outgoing = track_outgoing(&KernelMaps6::new(), parsed, |_| false);
        kernel_maps::apply_conn6(outgoing.conn);
        if outgoing.denied {
            let denial = denied_opening(&outgoing);
            let rejected = wants_reject6(bytes.skb(), parsed, denial.verdict);
            events::report(parsed, &denial, direction::EGRESS, ifindex, rejected);
            return if rejected { outcome::REJECT } else { outcome::DROP };
        }
    }
    outcome::PASS
}

/// [`destination_side`] for IPv6 (denied packets are dropped). A function
/// of its own: its stack frame is not added to the parser's.
#[inline(never)]
fn destination_side6(
    parsed: &Parsed<Ipv6Key>,
    bytes: &SkbBytes,
    ifindex: u32,
    tunnel_tag: u32,
    may_reject: bool,
) -> u32 {
    let maps = KernelMaps6::new();
    let saddr = if tunnel_tag != 0 {
        source_address(parsed).unwrap_or_default()
    } else {
        Ipv6Key::default()
    };
    let lookups = TunnelSource { lookups: &maps, saddr, tag: tunnel_tag };
    let mut decision = decide_destination(&lookups, parsed);
    count_for_policy(&mut decision, maps.found_conn(), bytes.len());
    // TC only (cgroup programs have no interface): an established packet
    // the cache did not know goes into it, as for IPv4, by the caller (a
    // call from here would stack its frame on this one's).
    let reason = decision.verdict.reason() as u32;
    let fill = ifindex != 0
        && decision.conn.kind == conn_update::NONE
        && (reason == Reason::Established as u32 || reason == Reason::Reply as u32)
        && !maps.found_conn().is_null();
    let rejected = may_reject && wants_reject6(bytes.skb(), parsed, decision.verdict);
    events::report(parsed, &decision, direction::INGRESS, ifindex, rejected);
    match kernel_maps::apply6(&decision).is_pass() {
        true if fill => outcome::PASS_FILL,
        true => outcome::PASS,
        false if rejected => outcome::REJECT,
        false => outcome::DROP,
    }
}

/// Puts an established IPv6 TCP or UDP connection into this CPU's flow
/// cache, as `CONNTRACK6` holds it.
#[inline(never)]
fn fill6(parsed: &Parsed<Ipv6Key>) {
    if let Parsed::Flow { flow, fragment: None } = parsed
        && (flow.protocol == proto::TCP || flow.protocol == proto::UDP)
        && config().is_some_and(|c| c.settings.flags & settings::FLOW_CACHE != 0)
    {
        let key = ConnKey::of(flow).0;
        // SAFETY: read by copy.
        if let Some(conn) = unsafe { maps::CONNTRACK6.get(key) } {
            flow_cache::fill(&key, conn);
        }
    }
    clear_r0();
}

/// What [`destination_side6`] decided (a plain value: it leaves a BPF
/// function).
mod outcome {
    pub const PASS: u32 = 0;
    pub const DROP: u32 = 1;
    pub const REJECT: u32 = 2;
    /// Passed, and its connection is to go into the flow cache.
    pub const PASS_FILL: u32 = 3;
}

/// Whether a denied IPv6 packet gets a reject (see `reject::wanted6`).
#[inline(always)]
fn wants_reject6(skb: *mut __sk_buff, parsed: &Parsed<Ipv6Key>, verdict: Verdict) -> bool {
    reject::wanted6(&TcContext::new(skb), parsed, verdict)
}

/// Answers a denied IPv6 packet (see `reject`).
#[inline(always)]
fn reject6(skb: *mut __sk_buff, parsed: &Parsed<Ipv6Key>, back: reject::Back) -> i32 {
    reject::send6(&TcContext::new(skb), parsed, back)
}

/// Anti-spoofing, counted; a spoofed packet is reported.
#[inline(always)]
fn source_side(parsed: &Parsed, own: Option<Attachment>, ifindex: u32) -> Verdict {
    let verdict = decide_source(&KernelMaps::new(), parsed, own, tunnel_port());
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
    // TC only: an established connection this CPU's flow cache knows.
    let mut cached = None;
    if ctx.is_some()
        && let Parsed::Flow { flow, fragment: None } = parsed
        && let Some(config) = config()
        && config.settings.flags & settings::FLOW_CACHE != 0
    {
        let (key, side) = ConnKey::of(flow);
        let count = config.settings.flags & settings::POLICY_COUNTERS != 0;
        if let Some(reason) = flow_cache::established(&key, side, config.epoch, count, bytes.len())
        {
            return (count_verdict(Verdict::Pass(reason)), false);
        }
        cached = Some(key);
    }
    let maps = KernelMaps::new();
    // Only a tunnel packet's source is looked up differently.
    let saddr = if tunnel_tag != 0 { source_address(parsed).unwrap_or(0) } else { 0 };
    let lookups = TunnelSource { lookups: &maps, saddr, tag: tunnel_tag };
    let mut decision = decide_destination(&lookups, parsed);
    netout::track_inbound(parsed, decision.verdict);
    count_for_policy(&mut decision, maps.found_conn(), bytes.len());
    // An established packet the cache did not know (integer compares, see
    // `events::report`): its connection goes into the cache.
    let reason = decision.verdict.reason() as u32;
    if let Some(key) = cached
        && decision.conn.kind == conn_update::NONE
        && (reason == Reason::Established as u32 || reason == Reason::Reply as u32)
        && !maps.found_conn().is_null()
    {
        // SAFETY: the entry the decision read, valid for this run (RCU).
        flow_cache::fill(&key, unsafe { &*maps.found_conn() });
    }
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
        return Parsed::OtherFamily;
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
