//! NetIn, Cloud Foundry's port mappings: a connection to a host address and
//! port is rewritten at the host's ingress to the container's address and
//! port, and its replies are rewritten back as they leave the container and
//! sent straight out of the interface the connection came in by (through
//! the routing stack they would be dropped: their source is now a local
//! address arriving from outside).

use core::ptr::null_mut;

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::generated::bpf_redirect_neigh,
    programs::TcContext,
};
use policy_common::{
    Flow,
    maps::{NetInConn, NetInConnKey, NetInKey},
};

use crate::maps::{NETIN, NETIN_CONNS, config};

const ETH_HLEN: usize = 14;
const IP_CHECK: usize = ETH_HLEN + 10;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
const TCP: u8 = 6;
const UDP: u8 = 17;

#[inline(always)]
fn active() -> bool {
    config().is_some_and(|c| c.netin_mappings != 0)
}

/// The L4 header's offset and its checksum's offset within it, and the
/// checksum flags (UDP's 0 means "none" and must stay so).
#[inline(always)]
fn layout(ctx: &TcContext, protocol: u8) -> Option<(usize, usize, u64)> {
    let ver_ihl: u8 = ctx.load(ETH_HLEN).ok()?;
    let l4 = ETH_HLEN + ((ver_ihl & 0x0f) as usize) * 4;
    match protocol {
        TCP => Some((l4, 16, 0)),
        UDP => Some((l4, 6, u64::from(BPF_F_MARK_MANGLED_0))),
        _ => None,
    }
}

/// Rewrites one address (at `addr_at`) and one port (at `port_at`), with
/// both checksums. Values as they are on the wire.
#[inline(always)]
fn rewrite(
    ctx: &TcContext,
    (l4, check, flags): (usize, usize, u64),
    (addr_at, old_addr, new_addr): (usize, u32, u32),
    (port_at, old_port, new_port): (usize, u16, u16),
) -> Option<()> {
    let pseudo = u64::from(BPF_F_PSEUDO_HDR);
    ctx.l4_csum_replace(l4 + check, u64::from(old_addr), u64::from(new_addr), flags | pseudo | 4)
        .ok()?;
    ctx.l3_csum_replace(IP_CHECK, u64::from(old_addr), u64::from(new_addr), 4).ok()?;
    ctx.store(addr_at, &new_addr, 0).ok()?;
    ctx.l4_csum_replace(l4 + check, u64::from(old_port), u64::from(new_port), flags | 2).ok()?;
    ctx.store(l4 + port_at, &new_port, 0).ok()?;
    Some(())
}

/// At the host's ingress: a flow to a mapped host address and port goes to
/// its container instead, and is remembered for its replies.
#[inline(always)]
pub fn incoming(ctx: &TcContext, flow: &Flow, ifindex: u32) {
    if !active() {
        return;
    }
    let key = NetInKey { addr: flow.daddr, port: flow.dport, protocol: flow.protocol, _pad: 0 };
    // SAFETY: the value is copied out at once.
    let Some(target) = (unsafe { NETIN.get(key) }).copied() else { return };
    let Some(layout) = layout(ctx, flow.protocol) else { return };
    let rewritten = rewrite(
        ctx,
        layout,
        (IP_DADDR, flow.daddr, target.addr),
        (2, flow.dport.to_be(), target.port.to_be()),
    );
    if rewritten.is_none() {
        return;
    }
    let conn = NetInConnKey {
        container: target.addr,
        client: flow.saddr,
        container_port: target.port,
        client_port: flow.sport,
        protocol: u32::from(flow.protocol),
    };
    let nat = NetInConn { host_addr: flow.daddr, host_port: flow.dport, _pad: 0, ifindex };
    let _ = NETIN_CONNS.insert(conn, nat, 0);
}

/// As a packet leaves a container: a reply of a NetIn connection gets the
/// host address and port back as its source and is sent out where the
/// connection came in. Some(TC action) when it was one.
#[inline(always)]
pub fn reply(ctx: &TcContext, flow: &Flow) -> Option<i32> {
    if !active() {
        return None;
    }
    let key = NetInConnKey {
        container: flow.saddr,
        client: flow.daddr,
        container_port: flow.sport,
        client_port: flow.dport,
        protocol: u32::from(flow.protocol),
    };
    // SAFETY: the value is copied out at once.
    let nat = (unsafe { NETIN_CONNS.get(key) }).copied()?;
    let layout = layout(ctx, flow.protocol)?;
    rewrite(
        ctx,
        layout,
        (IP_SADDR, flow.saddr, nat.host_addr),
        (0, flow.sport.to_be(), nat.host_port.to_be()),
    )?;
    // SAFETY: no parameters; the neighbour is resolved by the kernel.
    Some(unsafe { bpf_redirect_neigh(nat.ifindex, null_mut(), 0, 0) } as i32)
}
