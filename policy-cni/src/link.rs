//! The veth pair, through netlink: the host side named from the container,
//! the container side made in its namespace under its name, a /32 address
//! with a default route via the link-local gateway (silk's layout), the
//! gateway address on the host side and a /32 route to the container.
//! The default routes come last ([`route_out`]), once the agent polices the
//! veth: until then the container reaches nothing but its gateway.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::{StreamExt as _, TryStreamExt as _};
use rtnetlink::{
    Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder,
    packet_core::{NLM_F_REQUEST, NetlinkMessage, NetlinkPayload},
    packet_route::{
        RouteNetlinkMessage,
        address::AddressAttribute,
        link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkInfo},
        nsid::{NsidAttribute, NsidMessage},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteScope},
    },
};

use policy_api::GATEWAY6;

use crate::error::{CniError, Result, code};

/// What ADD made: for the result.
pub struct Plumbing {
    pub host_mac: [u8; 6],
    pub container_mac: [u8; 6],
}

fn netlink(what: &str) -> impl FnOnce(rtnetlink::Error) -> CniError + '_ {
    move |e| CniError::io(format!("netlink: cannot {what}"), e)
}

/// A netlink handle in this namespace (None) or in `ns`.
fn connect(ns: Option<&File>) -> Result<Handle> {
    let made = match ns {
        None => rtnetlink::new_connection(),
        // The socket belongs to the namespace it is made in.
        Some(ns) => policy_api::netns::run_in(ns, rtnetlink::new_connection),
    };
    let (connection, handle, _) =
        made.map_err(|e| CniError::io("cannot open a netlink socket", e))?;
    tokio::spawn(connection);
    Ok(handle)
}

/// A link's index and MAC, if it exists.
async fn find(handle: &Handle, name: &str) -> Result<Option<(u32, [u8; 6])>> {
    policy_api::link::find_link(handle, name).await.map_err(netlink("look up a link"))
}

/// The host-side veth's index and MAC.
async fn host_side(host: &Handle, host_ifname: &str) -> Result<(u32, [u8; 6])> {
    find(host, host_ifname)
        .await?
        .ok_or_else(|| CniError::new(code::IO_FAILURE, "the host-side veth vanished"))
}

async fn add_address(
    handle: &Handle,
    index: u32,
    addr: IpAddr,
    prefix: u8,
    what: &'static str,
) -> Result<()> {
    handle.address().add(index, addr, prefix).execute().await.map_err(netlink(what))
}

/// Where the other end of an existing host-side veth is: what tells a
/// leftover of this container from another container's veth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// Still in the host's namespace: made by an ADD that stopped before
    /// moving it, so no container has it.
    Host,
    /// In the namespace this call is for: this container's own.
    ThisContainer,
    /// In another namespace: another container's.
    Elsewhere,
    /// The name is not a veth at all.
    NotVeth,
}

/// Where the peer of the host-side veth `host_ifname` is (None: there is
/// no such interface), `ns` being the container's namespace if known. The
/// host's view of the peer's namespace is an id (`IFLA_LINK_NETNSID`,
/// allocated as the link is dumped: net/core/rtnetlink.c,
/// `rtnl_fill_link_netnsid`); the id of `ns` comes from `RTM_GETNSID` with
/// its descriptor, so equal ids mean the same namespace.
pub async fn peer(host_ifname: &str, ns: Option<&File>) -> Result<Option<Peer>> {
    let host = connect(None)?;
    let mut links = host.link().get().match_name(host_ifname.to_owned()).execute();
    let link = match links.try_next().await {
        Ok(Some(link)) => link,
        Ok(None) => return Ok(None),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => {
            return Ok(None);
        }
        Err(e) => return Err(netlink("look up a link")(e)),
    };
    let is_veth = link.attributes.iter().any(|a| {
        matches!(a, LinkAttribute::LinkInfo(infos)
            if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
    });
    if !is_veth {
        return Ok(Some(Peer::NotVeth));
    }
    let peer_nsid = link.attributes.iter().find_map(|a| match a {
        LinkAttribute::LinkNetNsId(id) => Some(*id),
        _ => None,
    });
    let Some(peer_nsid) = peer_nsid else { return Ok(Some(Peer::Host)) };
    let Some(ns) = ns else { return Ok(Some(Peer::Elsewhere)) };
    Ok(Some(if nsid(&host, ns).await? == Some(peer_nsid) {
        Peer::ThisContainer
    } else {
        Peer::Elsewhere
    }))
}

/// The id the namespace `handle` is in gives `ns` (None: it has none, so
/// none of its links has a peer there).
async fn nsid(handle: &Handle, ns: &File) -> Result<Option<i32>> {
    use std::os::fd::AsRawFd as _;
    let mut message = NsidMessage::default();
    message.attributes.push(NsidAttribute::Fd(ns.as_raw_fd() as u32));
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(message));
    request.header.flags = NLM_F_REQUEST;
    let failed = |e: &dyn std::fmt::Display| CniError::io("netlink: cannot get a namespace id", e);
    let mut replies = handle.clone().request(request).map_err(|e| failed(&e))?;
    while let Some(reply) = replies.next().await {
        match reply.payload {
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(m)) => {
                // -1 (NETNSA_NSID_NOT_ASSIGNED): no id.
                return Ok(m.attributes.iter().find_map(|a| match a {
                    NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                    _ => None,
                }));
            }
            NetlinkPayload::Error(e) if e.code.is_some() => return Err(failed(&e)),
            _ => {}
        }
    }
    Ok(None)
}

/// Creates the pair and configures both sides (all but the default routes:
/// [`route_out`]). Never touches an interface it did not make: a name that
/// is taken fails the call. On error what it made is removed.
///
/// The container's side is made in its namespace under its final name, as
/// the reference `ptp` plugin makes its pair: moving a device between
/// namespaces waits for RCU grace periods while it holds the kernel's
/// netlink lock (made and then moved, the pair cost each ADD about 30 ms
/// more on a 2-vCPU VM, and every other netlink user on the host waited).
pub async fn create(
    host_ifname: &str,
    ifname: &str,
    ns: &File,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
    mtu: Option<u32>,
) -> Result<Plumbing> {
    let host = connect(None)?;
    let inside = connect(Some(ns))?;
    let taken_inside = |existing: u32| {
        CniError::new(
            code::INVALID_ENVIRONMENT,
            format!("the container already has an interface {ifname} (index {existing})"),
        )
    };
    if let Some((existing, _)) = find(&inside, ifname).await? {
        return Err(taken_inside(existing));
    }
    use std::os::fd::AsRawFd as _;
    // Not brought up in the same message: the kernel refuses a veth whose
    // peer is created up in another namespace (ENOTCONN on 6.18).
    let mut peer =
        LinkMessageBuilder::<LinkUnspec>::new().name(ifname.to_owned()).setns_by_fd(ns.as_raw_fd());
    let mut veth = LinkVeth::new(host_ifname, ifname);
    if let Some(mtu) = mtu {
        peer = peer.mtu(mtu);
        veth = veth.mtu(mtu);
    }
    let veth = veth.set_info_data(InfoData::Veth(InfoVeth::Peer(peer.build())));
    if let Err(e) = host.link().add(veth.build()).execute().await {
        if let rtnetlink::Error::NetlinkError(ref n) = e
            && n.raw_code() == -libc::EEXIST
        {
            // Either name: the container's, if another call made it since.
            if let Some((existing, _)) = find(&inside, ifname).await? {
                return Err(taken_inside(existing));
            }
            return Err(CniError::new(
                code::VETH_HELD,
                format!("cannot create the host-side veth {host_ifname}: the name is taken"),
            )
            .details(e));
        }
        return Err(netlink("create the veth pair")(e));
    }
    let configured = async {
        // Inside the container.
        let (index, container_mac) = find(&inside, ifname).await?.ok_or_else(|| {
            CniError::new(code::IO_FAILURE, "the veth did not arrive in the container")
        })?;
        inside
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(netlink("bring the container's interface up"))?;
        add_address(&inside, index, IpAddr::V4(ip), 32, "address the container's interface")
            .await?;
        let to_gateway = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(gateway, 32)
            .output_interface(index)
            .scope(RouteScope::Link)
            .build();
        inside.route().add(to_gateway).execute().await.map_err(netlink("route to the gateway"))?;

        // The host side.
        let (host_index, host_mac) = host_side(&host, host_ifname).await?;
        add_address(
            &host,
            host_index,
            IpAddr::V4(gateway),
            32,
            "put the gateway address on the host side",
        )
        .await?;
        host.link()
            .set(LinkUnspec::new_with_index(host_index).up().build())
            .execute()
            .await
            .map_err(netlink("bring the host side up"))?;
        let to_container = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(ip, 32)
            .output_interface(host_index)
            .scope(RouteScope::Link)
            .build();
        put_route(&host, to_container, "route to the container").await?;
        Ok(Plumbing { host_mac, container_mac })
    }
    .await;
    if configured.is_err() {
        let _ = remove(host_ifname).await;
    }
    configured
}

/// The container's default routes (IPv4's, and IPv6's when dual stack):
/// the last step of ADD, once the agent polices the veth and the app's
/// security groups are set. Before it the container reaches only its
/// gateway (the host), so nothing it sends can pass unpoliced.
pub async fn route_out(ifname: &str, ns: &File, gateway: Ipv4Addr, ipv6: bool) -> Result<()> {
    let inside = connect(Some(ns))?;
    let (index, _) = find(&inside, ifname)
        .await?
        .ok_or_else(|| CniError::new(code::IO_FAILURE, "the container's interface vanished"))?;
    let default =
        RouteMessageBuilder::<Ipv4Addr>::new().gateway(gateway).output_interface(index).build();
    inside.route().add(default).execute().await.map_err(netlink("add the default route"))?;
    if ipv6 {
        let gateway6 = GATEWAY6;
        let default = RouteMessageBuilder::<Ipv6Addr>::new()
            .gateway(gateway6)
            .output_interface(index)
            .build();
        inside
            .route()
            .add(default)
            .execute()
            .await
            .map_err(netlink("add the IPv6 default route"))?;
    }
    Ok(())
}

/// Dual stack: `ip6`/128 on the container's interface (its default route
/// via [`GATEWAY6`] comes with [`route_out`]), the gateway on the host side
/// and a /128 route to the container. Duplicate address detection is off on
/// both ends (the
/// addresses are the plugin's to give; with it on they would not work for
/// the first second).
pub async fn add_ipv6(host_ifname: &str, ifname: &str, ns: &File, ip6: Ipv6Addr) -> Result<()> {
    let gateway = GATEWAY6;
    let no_dad =
        |name: &str| std::fs::write(format!("/proc/sys/net/ipv6/conf/{name}/accept_dad"), "0");
    policy_api::netns::run_in(ns, || no_dad(ifname))
        .map_err(|e| CniError::io("cannot turn off IPv6 DAD in the container", e))?;
    no_dad(host_ifname)
        .map_err(|e| CniError::io("cannot turn off IPv6 DAD on the host side", e))?;
    let inside = connect(Some(ns))?;
    let (index, _) = find(&inside, ifname)
        .await?
        .ok_or_else(|| CniError::new(code::IO_FAILURE, "the container's interface vanished"))?;
    add_address(&inside, index, IpAddr::V6(ip6), 128, "give the container its IPv6 address")
        .await?;
    let host = connect(None)?;
    let (host_index, _) = host_side(&host, host_ifname).await?;
    add_address(
        &host,
        host_index,
        IpAddr::V6(gateway),
        64,
        "put the IPv6 gateway on the host side",
    )
    .await?;
    let to_container = RouteMessageBuilder::<Ipv6Addr>::new()
        .destination_prefix(ip6, 128)
        .output_interface(host_index)
        .build();
    put_route(&host, to_container, "route to the container's IPv6 address").await
}

/// Adds `route`, or replaces one to the same destination.
async fn put_route(handle: &Handle, route: RouteMessage, what: &str) -> Result<()> {
    handle.route().add(route).replace().execute().await.map_err(netlink(what))
}

/// Whether the host routes `ip`/32 through the interface `host_ifname` (the
/// route ADD makes to each container).
pub async fn routes_to(host_ifname: &str, ip: Ipv4Addr) -> Result<bool> {
    let host = connect(None)?;
    let Some((index, _)) = find(&host, host_ifname).await? else { return Ok(false) };
    let mut routes = host.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    while let Some(r) = routes.try_next().await.map_err(netlink("list routes"))? {
        let to_ip = r.header.destination_prefix_length == 32
            && r.attributes.iter().any(
                |a| matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d)) if *d == ip),
            );
        if to_ip && r.attributes.iter().any(|a| matches!(a, RouteAttribute::Oif(i) if *i == index))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Deletes the host side (the pair goes with it); false if it was not there.
pub async fn remove(host_ifname: &str) -> Result<bool> {
    let host = connect(None)?;
    let Some((index, _)) = find(&host, host_ifname).await? else { return Ok(false) };
    match host.link().del(index).execute().await {
        Ok(()) => Ok(true),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(false),
        Err(e) => Err(netlink("delete the veth")(e)),
    }
}

/// Checks what ADD left: the host side up, the container's interface with
/// its /32 and a default route via the gateway.
pub async fn check(
    host_ifname: &str,
    ifname: &str,
    ns: &File,
    ip: Ipv4Addr,
    gateway: Ipv4Addr,
) -> Result<()> {
    let failed = |what: String| CniError::new(code::CHECK_FAILED, what);
    let host = connect(None)?;
    if find(&host, host_ifname).await?.is_none() {
        return Err(failed(format!("the host-side veth {host_ifname} is missing")));
    }
    let inside = connect(Some(ns))?;
    let (index, _) = find(&inside, ifname)
        .await?
        .ok_or_else(|| failed(format!("the container has no interface {ifname}")))?;
    let mut addresses = inside.address().get().set_link_index_filter(index).execute();
    let mut has_ip = false;
    while let Some(a) = addresses.try_next().await.map_err(netlink("list addresses"))? {
        has_ip |= a.header.prefix_len == 32
            && a.attributes
                .iter()
                .any(|x| matches!(x, AddressAttribute::Address(IpAddr::V4(v)) if *v == ip));
    }
    if !has_ip {
        return Err(failed(format!("{ifname} does not hold {ip}/32")));
    }
    let mut routes = inside.route().get(RouteMessageBuilder::<Ipv4Addr>::new().build()).execute();
    let mut has_default = false;
    while let Some(r) = routes.try_next().await.map_err(netlink("list routes"))? {
        has_default |= r.header.destination_prefix_length == 0
            && r.attributes.iter().any(
                |x| matches!(x, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == gateway),
            );
    }
    if !has_default {
        return Err(failed(format!("the container has no default route via {gateway}")));
    }
    Ok(())
}
