//! Rejects: a denied TCP segment is answered with a RST, a denied UDP
//! datagram with an ICMP port unreachable, as Cloud Foundry's iptables rules
//! end in `REJECT`, so a client fails at once instead of waiting out its
//! timeout. The denied packet itself (dropped anyway) is rewritten into the
//! answer and redirected into the host's stack as if the destination
//! container had sent it (ingress of the same host-side veth): it then meets
//! that veth's source-side checks and the host's routing like any packet of
//! that container, and reaches the sender's veth, where the `CONNTRACK` entry
//! recorded here lets it (and only it) in.
//!
//! In cluster mode a denied opening to another host's endpoint is answered
//! by the sender's host, where it leaves the container (straight back out of
//! the veth); the destination's host drops such packets unanswered. At most
//! `rejects_per_second` per sender address (`REJECT_LIMITS`), so a flood of
//! denied packets cannot make the host a reflector; past the budget packets
//! are dropped silently.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{
        bpf_ktime_get_coarse_ns, bpf_redirect,
        generated::{bpf_skb_change_tail, bpf_skb_load_bytes},
    },
    programs::TcContext,
};
use policy_common::{
    Family, Flow, Parsed, Verdict,
    decision::{Lookups, reject_entry, rejectable},
    maps::{Ipv6Key, proto, settings},
};

use crate::{
    events::within_limit,
    kernel_maps::{KernelMaps, KernelMaps6},
    maps::{CONNTRACK, CONNTRACK6, REJECT_LIMITS, REJECT6_BUFFER, REJECT6_BUFFER_LEN, config},
};

const ETH_HLEN: usize = 14;
const IP_HLEN: usize = 20;
/// An IPv4 header without options (version 4, IHL 5): the only kind
/// answered (the answer is built at fixed offsets).
const VER_IHL: u8 = 0x45;
const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;
/// Ethernet, IPv4 and TCP headers of the RST.
const RST_LEN: usize = ETH_HLEN + IP_HLEN + 20;
/// Ethernet, IPv4 and ICMP headers, and the quoted IPv4 and UDP headers.
const UNREACH_LEN: usize = ETH_HLEN + IP_HLEN + 8 + IP_HLEN + 8;
const ICMP_DEST_UNREACH: u8 = 3;
/// "Port unreachable": the sender's socket reports ECONNREFUSED.
const ICMP_PORT_UNREACH: u8 = 3;

/// Whether this denied packet gets a reject: rejects are on, it is a TCP
/// segment other than a RST or a UDP datagram denied by policy
/// ([`rejectable`]), its IPv4 header has no options, and its sender is
/// within its budget.
#[inline(always)]
pub fn wanted(ctx: &TcContext, parsed: &Parsed, verdict: Verdict) -> bool {
    // Loads through the helper: the source side calls this after helpers
    // that may have moved the packet (direct packet pointers taken before
    // them are no longer valid).
    let plain_header = |_: &Flow| matches!(ctx.load::<u8>(ETH_HLEN), Ok(VER_IHL));
    wanted_in(ctx, parsed, verdict, plain_header, ETH_HLEN + IP_HLEN)
}

/// [`wanted`] for either family: `plain_header` says whether the L4 header
/// follows the IP header at `l4` (what the answer is built on).
#[inline(always)]
fn wanted_in<A: Family>(
    ctx: &TcContext,
    parsed: &Parsed<A>,
    verdict: Verdict,
    plain_header: impl FnOnce(&Flow<A>) -> bool,
    l4: usize,
) -> bool {
    let Some(flow) = rejectable(parsed, verdict) else { return false };
    let Some(current) = config().map(|c| &c.settings) else { return false };
    if current.flags & settings::REJECT == 0 || !plain_header(&flow) {
        return false;
    }
    if flow.protocol == proto::TCP {
        match ctx.load::<u8>(l4 + 13) {
            Ok(flags) if flags & TCP_RST == 0 => {}
            _ => return false,
        }
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    within_limit(&REJECT_LIMITS, flow.saddr.limit_key(), now, current.rejects_per_second)
}

/// Where a reject goes.
#[derive(Clone, Copy)]
pub enum Back {
    /// Denied where it enters the destination (TC egress of the
    /// destination's veth, this ifindex): into the host's stack as if the
    /// destination had sent it.
    FromDestination(u32),
    /// Denied where it leaves the sender (TC ingress of the sender's veth,
    /// this ifindex; cluster mode, a destination on another host): straight
    /// back out of the veth to the sender.
    ToSender(u32),
}

/// Turns the packet into its reject, records the entry that lets the reject
/// in at the sender, and redirects it; `TC_ACT_SHOT` if the packet cannot
/// be rewritten.
#[inline(always)]
pub fn send(ctx: &TcContext, parsed: &Parsed, back: Back) -> i32 {
    let Parsed::Flow { flow, .. } = *parsed else { return TC_ACT_SHOT };
    let written = if flow.protocol == proto::TCP { tcp_reset(ctx) } else { port_unreachable(ctx) };
    if written.is_none() {
        return TC_ACT_SHOT;
    }
    let (key, conn) = reject_entry(&flow, KernelMaps::new().epoch());
    let _ = CONNTRACK.insert(key, conn, 0);
    redirect(back)
}

/// Sends the rewritten packet `back`.
#[inline(always)]
fn redirect(back: Back) -> i32 {
    let (ifindex, flags) = match back {
        Back::FromDestination(ifindex) => (ifindex, u64::from(BPF_F_INGRESS)),
        Back::ToSender(ifindex) => (ifindex, 0),
    };
    // SAFETY: plain helper call; the redirect happens when we return its value.
    let action = unsafe { bpf_redirect(ifindex, flags) };
    if action == i64::from(TC_ACT_REDIRECT) { TC_ACT_REDIRECT } else { TC_ACT_SHOT }
}

/// The one's complement sum of `bytes` (big-endian 16-bit words) added to
/// `sum`, not yet folded.
#[inline(always)]
fn add_words(bytes: &[u8], mut sum: u32) -> u32 {
    let mut i = 0;
    while i + 1 < bytes.len() {
        sum += u32::from(u16::from_be_bytes([bytes[i], bytes[i + 1]]));
        i += 2;
    }
    sum
}

/// The Internet checksum of a sum of words.
#[inline(always)]
fn fold(sum: u32) -> [u8; 2] {
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Writes Ethernet (addresses swapped) and IPv4 headers (`ip` the denied
/// packet's; addresses swapped) for an answer of `total_len` bytes of IP.
#[inline(always)]
fn headers(ctx: &TcContext, out: &mut [u8], protocol: u8, total_len: u16) -> Option<[u8; IP_HLEN]> {
    let eth: [u8; 12] = ctx.load(0).ok()?;
    let ip: [u8; IP_HLEN] = ctx.load(ETH_HLEN).ok()?;
    out[0..6].copy_from_slice(&eth[6..12]);
    out[6..12].copy_from_slice(&eth[0..6]);
    out[12] = 0x08; // ETH_P_IP
    out[13] = 0x00;
    let len = total_len.to_be_bytes();
    let mut hdr =
        [VER_IHL, 0, len[0], len[1], 0, 0, 0x40, 0, 64, protocol, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    hdr[12..16].copy_from_slice(&ip[16..20]);
    hdr[16..20].copy_from_slice(&ip[12..16]);
    let check = fold(add_words(&hdr, 0));
    hdr[10] = check[0];
    hdr[11] = check[1];
    out[ETH_HLEN..ETH_HLEN + IP_HLEN].copy_from_slice(&hdr);
    Some(ip)
}

/// The RST answering TCP header `tcp` (checksum 0) of a segment whose TCP
/// header and payload are `tcp_len` bytes: RFC 9293 3.10.7.1, to a segment
/// with ACK a RST with its acknowledgment number as sequence number, to one
/// without a RST+ACK acknowledging it. Both families.
#[inline(always)]
fn rst_header(tcp: &[u8; 20], tcp_len: u32) -> [u8; 20] {
    let payload = tcp_len.saturating_sub(u32::from(tcp[12] >> 4) * 4);
    let flags = tcp[13];
    let (seq, ack, out_flags) = if flags & TCP_ACK != 0 {
        (u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]), 0, TCP_RST)
    } else {
        let seq_in = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
        let ack = seq_in
            .wrapping_add(payload)
            .wrapping_add(u32::from(flags & TCP_SYN != 0))
            .wrapping_add(u32::from(flags & TCP_FIN != 0));
        (0, ack, TCP_RST | TCP_ACK)
    };
    let (s, a) = (seq.to_be_bytes(), ack.to_be_bytes());
    [
        tcp[2], tcp[3], tcp[0], tcp[1], s[0], s[1], s[2], s[3], a[0], a[1], a[2], a[3], 0x50,
        out_flags, 0, 0, 0, 0, 0, 0,
    ]
}

/// RFC 9293 3.10.7.1: to a segment with ACK, a RST with its acknowledgment
/// number as sequence number; to one without, a RST+ACK acknowledging it.
#[inline(always)]
fn tcp_reset(ctx: &TcContext) -> Option<()> {
    let mut out = [0u8; RST_LEN];
    let tcp: [u8; 20] = ctx.load(ETH_HLEN + IP_HLEN).ok()?;
    let ip = headers(ctx, &mut out, proto::TCP, (IP_HLEN + 20) as u16)?;
    let total_len = u32::from(u16::from_be_bytes([ip[2], ip[3]]));
    let mut rst = rst_header(&tcp, total_len.saturating_sub(IP_HLEN as u32));
    // Pseudo header: the answer's addresses, protocol, TCP length.
    let pseudo = add_words(&out[ETH_HLEN + 12..ETH_HLEN + 20], u32::from(proto::TCP) + 20);
    let check = fold(add_words(&rst, pseudo));
    rst[16] = check[0];
    rst[17] = check[1];
    out[ETH_HLEN + IP_HLEN..].copy_from_slice(&rst);
    resize_and_store(ctx, &out)
}

/// An ICMP destination unreachable (port unreachable) quoting the denied
/// datagram's IP header and first 8 bytes (RFC 792).
#[inline(always)]
fn port_unreachable(ctx: &TcContext) -> Option<()> {
    let mut out = [0u8; UNREACH_LEN];
    let quoted: [u8; IP_HLEN + 8] = ctx.load(ETH_HLEN).ok()?;
    headers(ctx, &mut out, proto::ICMP, (UNREACH_LEN - ETH_HLEN) as u16)?;
    let icmp = ETH_HLEN + IP_HLEN;
    out[icmp] = ICMP_DEST_UNREACH;
    out[icmp + 1] = ICMP_PORT_UNREACH;
    out[icmp + 8..].copy_from_slice(&quoted);
    let check = fold(add_words(&out[icmp..], 0));
    out[icmp + 2] = check[0];
    out[icmp + 3] = check[1];
    resize_and_store(ctx, &out)
}

/// Makes the packet exactly `out`'s length and writes `out` over it.
#[inline(always)]
fn resize_and_store<const N: usize>(ctx: &TcContext, out: &[u8; N]) -> Option<()> {
    // SAFETY: the context's skb; the helper checks the length.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, N as u32, 0) } != 0 {
        return None;
    }
    ctx.store(0, out, 0).ok()
}

/// The fixed IPv6 header; IPv6 rejects answer only packets whose upper-layer
/// header follows it directly (no extension headers).
const IP6_HLEN: usize = 40;
/// Ethernet, IPv6 and TCP headers of the RST.
const RST6_LEN: usize = ETH_HLEN + IP6_HLEN + 20;
/// Ethernet, IPv6 and ICMPv6 headers, and the quoted IPv6 and UDP headers.
const UNREACH6_LEN: usize = ETH_HLEN + IP6_HLEN + 8 + IP6_HLEN + 8;
const ICMPV6_DEST_UNREACH: u8 = 1;
/// "Port unreachable" (RFC 4443 3.1): the sender's socket reports
/// ECONNREFUSED.
const ICMPV6_PORT_UNREACH: u8 = 4;

/// [`wanted`] for IPv6: the same rules, and no extension headers.
#[inline(always)]
pub fn wanted6(ctx: &TcContext, parsed: &Parsed<Ipv6Key>, verdict: Verdict) -> bool {
    let no_extensions = |flow: &Flow<Ipv6Key>| matches!(ctx.load::<u8>(ETH_HLEN + 6), Ok(next) if next == flow.protocol);
    wanted_in(ctx, parsed, verdict, no_extensions, ETH_HLEN + IP6_HLEN)
}

/// [`send`] for IPv6, from where the packet enters its destination. The
/// answer, and the entry that lets it in, are each written by a function of
/// its own: one frame at a time on top of the caller's.
#[inline(always)]
pub fn send6(ctx: &TcContext, parsed: &Parsed<Ipv6Key>, back: Back) -> i32 {
    let Parsed::Flow { flow: Flow { protocol, .. }, .. } = *parsed else { return TC_ACT_SHOT };
    let written = if protocol == proto::TCP { tcp_reset6(ctx) } else { port_unreachable6(ctx) };
    if written.is_none() || !record6(parsed) {
        return TC_ACT_SHOT;
    }
    redirect(back)
}

/// Records the `CONNTRACK6` entry that lets the reject of `parsed` in at its
/// sender (see [`reject_entry`]).
#[inline(never)]
fn record6(parsed: &Parsed<Ipv6Key>) -> bool {
    let Parsed::Flow { flow, .. } = *parsed else { return false };
    let (key, conn) = reject_entry(&flow, KernelMaps6::new().epoch());
    let _ = CONNTRACK6.insert(key, conn, 0);
    true
}

/// The IPv6 answer is built in this CPU's slot of `REJECT6_BUFFER`, not on
/// the stack (with the decision before it, the stack would not hold it; TC
/// programs run with bottom halves off, so the slot is this run's).
#[inline(always)]
fn answer_buffer() -> Option<&'static mut [u8; REJECT6_BUFFER_LEN]> {
    // SAFETY: see above.
    REJECT6_BUFFER.get_ptr_mut(0).map(|b| unsafe { &mut *b })
}

/// Copies `N` packet bytes at `offset` into `buf[at..at + N]`.
#[inline(always)]
fn load_into<const N: usize>(
    ctx: &TcContext,
    offset: usize,
    buf: &mut [u8; REJECT6_BUFFER_LEN],
    at: usize,
) -> Option<()> {
    if at + N > REJECT6_BUFFER_LEN {
        return None;
    }
    // SAFETY: `buf[at..at + N]` is in bounds (checked above).
    let ret = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb.cast(),
            offset as u32,
            buf.as_mut_ptr().add(at).cast(),
            N as u32,
        )
    };
    if ret == 0 { Some(()) } else { None }
}

/// Writes the answer's Ethernet and IPv6 headers into `buf[..54]`: the
/// denied packet's, with MAC and IP addresses swapped, for an upper layer
/// `next` of `payload_len` bytes.
#[inline(always)]
fn headers6(
    ctx: &TcContext,
    buf: &mut [u8; REJECT6_BUFFER_LEN],
    next: u8,
    payload_len: u16,
) -> Option<()> {
    load_into::<{ ETH_HLEN + IP6_HLEN }>(ctx, 0, buf, 0)?;
    for i in 0..6 {
        buf.swap(i, i + 6);
    }
    for i in 0..16 {
        buf.swap(ETH_HLEN + 8 + i, ETH_HLEN + 24 + i);
    }
    let len = payload_len.to_be_bytes();
    buf[ETH_HLEN..ETH_HLEN + 8].copy_from_slice(&[0x60, 0, 0, 0, len[0], len[1], next, 64]);
    Some(())
}

/// The IPv6 pseudo header's sum (RFC 8200 8.1): the answer's addresses,
/// upper-layer length, next header.
#[inline(always)]
fn pseudo6(buf: &[u8; REJECT6_BUFFER_LEN], upper_len: u32, next: u8) -> u32 {
    add_words(&buf[ETH_HLEN + 8..ETH_HLEN + IP6_HLEN], upper_len + u32::from(next))
}

/// Makes the packet `len` bytes and writes `buf[..len]` over it.
#[inline(always)]
fn resize_and_store6(ctx: &TcContext, buf: &[u8; REJECT6_BUFFER_LEN], len: usize) -> Option<()> {
    // SAFETY: the context's skb; the helper checks the length.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, len as u32, 0) } != 0 {
        return None;
    }
    // SAFETY: `len` is at most the buffer's length (the callers' constants).
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_skb_store_bytes(
            ctx.skb.skb.cast(),
            0,
            buf.as_ptr().cast(),
            len as u32,
            0,
        )
    };
    if ret == 0 { Some(()) } else { None }
}

/// [`tcp_reset`] for IPv6. Each IPv6 answer is a function of its own.
#[inline(never)]
fn tcp_reset6(ctx: &TcContext) -> Option<()> {
    let tcp: [u8; 20] = ctx.load(ETH_HLEN + IP6_HLEN).ok()?;
    let [len_hi, len_lo]: [u8; 2] = ctx.load(ETH_HLEN + 4).ok()?;
    let buf = answer_buffer()?;
    headers6(ctx, buf, proto::TCP, 20)?;
    let payload_len = u32::from(u16::from_be_bytes([len_hi, len_lo]));
    let at = ETH_HLEN + IP6_HLEN;
    buf[at..at + 20].copy_from_slice(&rst_header(&tcp, payload_len));
    let check = fold(add_words(&buf[at..at + 20], pseudo6(buf, 20, proto::TCP)));
    buf[at + 16] = check[0];
    buf[at + 17] = check[1];
    resize_and_store6(ctx, buf, RST6_LEN)
}

/// An ICMPv6 destination unreachable (port unreachable) quoting the denied
/// datagram's IPv6 header and first 8 bytes.
#[inline(never)]
fn port_unreachable6(ctx: &TcContext) -> Option<()> {
    const QUOTE_AT: usize = ETH_HLEN + IP6_HLEN + 8;
    let buf = answer_buffer()?;
    // The quote first: the headers are then written over the packet's copy.
    load_into::<{ IP6_HLEN + 8 }>(ctx, ETH_HLEN, buf, QUOTE_AT)?;
    let icmp_len = (UNREACH6_LEN - ETH_HLEN - IP6_HLEN) as u16;
    headers6(ctx, buf, proto::ICMPV6, icmp_len)?;
    let icmp = ETH_HLEN + IP6_HLEN;
    buf[icmp..QUOTE_AT].copy_from_slice(&[
        ICMPV6_DEST_UNREACH,
        ICMPV6_PORT_UNREACH,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    let sum = pseudo6(buf, u32::from(icmp_len), proto::ICMPV6);
    let check = fold(add_words(&buf[icmp..UNREACH6_LEN], sum));
    buf[icmp + 2] = check[0];
    buf[icmp + 3] = check[1];
    resize_and_store6(ctx, buf, UNREACH6_LEN)
}
