//! The overlay, silk-style: each host leases a /24 of the overlay network in
//! etcd (kept across restarts), and reaches the other hosts' containers
//! through one VXLAN device with Group Based Policy (`gbp`), which carries
//! `skb->mark` — the source app's tag, set by the source-side program — in
//! the tunnel header. For every other host: a route to its /24 via its
//! gateway address on the device, a permanent neighbour entry for that
//! address with the host's device MAC, and a forwarding entry sending that
//! MAC to the host's underlay address (as flannel's vxlan backend). All
//! through netlink (rtnetlink), no `ip` commands.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, LinkUnspec, LinkVxlan, RouteMessageBuilder,
    packet_route::{
        address::AddressAttribute,
        link::{InfoVxlan, LinkAttribute},
        neighbour::{NeighbourFlags, NeighbourState},
    },
};

use policy_api::{Ipv6Prefix, link::find_link};
use tracing::{info, warn};

use crate::etcd::{Etcd, EtcdError, ModRevisionIs, Range, keys::Keys, prefix_end};

/// The VXLAN device's name.
pub const DEVICE: &str = "pa-vxlan";
/// Its VXLAN network id.
pub const VNI: u32 = 1;
/// Its UDP port (IANA's).
pub const PORT: u16 = 4789;

#[derive(Debug, thiserror::Error)]
pub enum OverlayError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("cannot open a netlink socket: {0}")]
    Socket(std::io::Error),
    #[error("no interface holds the underlay address {0} - is underlay_address this host's?")]
    NoUnderlay(Ipv4Addr),
    #[error("the VXLAN device {DEVICE} has no index or address")]
    NoDevice,
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    #[error("every /24 of the overlay is leased")]
    NoSubnet,
}

/// Another host as the overlay needs it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Peer {
    /// Its /24 (the network address, 10.255.N.0).
    pub subnet: Ipv4Addr,
    pub underlay: Ipv4Addr,
    /// Its VXLAN device's MAC address.
    pub mac: [u8; 6],
}

/// This host's end of the overlay.
pub struct Overlay {
    handle: Handle,
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// The interface holding the underlay address (the underlay program
    /// goes on its ingress).
    pub underlay_ifname: String,
    /// The peer subnets routed now.
    routed: BTreeSet<Peer>,
    /// With it, each peer's /24 is routed on IPv6 too (its /120 of it).
    ipv6_prefix: Option<Ipv6Prefix>,
}

/// The /24 at `index` of the overlay network `base` (a /16).
pub fn subnet(base: Ipv4Addr, index: u8) -> Ipv4Addr {
    let [a, b, _, _] = base.octets();
    Ipv4Addr::new(a, b, index, 0)
}

/// The first index not in `taken` (0..=255).
pub fn first_free(taken: &BTreeSet<u8>) -> Option<u8> {
    (0..=255u8).find(|i| !taken.contains(i))
}

/// Which /24 a host takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// One etcd says it holds already.
    Held(u8),
    /// One nobody holds: to lease.
    Free(u8),
}

/// The /24 for `host`, which remembers holding `remembered` (its
/// `cluster-subnet`; its containers have addresses in it). `leased`: the
/// leases in etcd (index → holder); `claimed`: the /24s other hosts'
/// records name (theirs even where etcd lost their leases: a wiped or
/// restored etcd). In order:
///
/// 1. the remembered one, if it is this host's lease, or nobody's lease
///    and no other host's record names it;
/// 2. a lease etcd says is this host's;
/// 3. the first /24 that neither a lease nor another host's record names.
pub fn choose(
    host: &str,
    remembered: Option<u8>,
    leased: &BTreeMap<u8, String>,
    claimed: &BTreeSet<u8>,
) -> Option<Choice> {
    if let Some(index) = remembered {
        match leased.get(&index) {
            Some(holder) if holder == host => return Some(Choice::Held(index)),
            None if !claimed.contains(&index) => return Some(Choice::Free(index)),
            _ => {}
        }
    }
    if let Some((&index, _)) = leased.iter().find(|(_, holder)| *holder == host) {
        return Some(Choice::Held(index));
    }
    let taken: BTreeSet<u8> = leased.keys().chain(claimed).copied().collect();
    first_free(&taken).map(Choice::Free)
}

/// The leases in a read of `subnets/` (index → holder).
fn leases(keys: &Keys, range: &Range) -> BTreeMap<u8, String> {
    let dir = keys.subnets();
    range
        .kvs
        .iter()
        .filter_map(|kv| {
            let index = kv.key.strip_prefix(&dir)?.parse::<u8>().ok()?;
            Some((index, String::from_utf8_lossy(&kv.value).into_owned()))
        })
        .collect()
}

/// Leases this host's /24 in etcd (`subnets/N` → host name), chosen by
/// [`choose`] and taken in a transaction that fails if another host took
/// it first (then the choice is made again). Leases of this host's other
/// than the chosen one are given back.
pub fn lease_subnet(
    etcd: &Etcd,
    keys: &Keys,
    host: &str,
    remembered: Option<u8>,
) -> Result<u8, OverlayError> {
    let dir = keys.subnets();
    loop {
        let range = etcd.range(&dir, &prefix_end(&dir))?;
        let leased = leases(keys, &range);
        let claimed: BTreeSet<u8> = super::hosts::list(etcd, keys)?
            .iter()
            .filter(|h| h.host != host)
            .filter_map(|h| Some(h.subnet?.octets()[2]))
            .collect();
        let index =
            match choose(host, remembered, &leased, &claimed).ok_or(OverlayError::NoSubnet)? {
                Choice::Held(index) => index,
                Choice::Free(index) => {
                    let key = keys.subnet(index);
                    let (won, _) = etcd.put_if(
                        &[ModRevisionIs { key: key.clone(), mod_revision: 0 }],
                        &[(&key, host.as_bytes(), 0)],
                    )?;
                    if !won {
                        continue;
                    }
                    index
                }
            };
        if let Some(kept) = remembered.filter(|r| *r != index) {
            warn!(
                kept,
                index,
                "the /24 this host had is another host's now: its containers need new addresses"
            );
        }
        for kv in range.kvs.iter().filter(|kv| kv.value == host.as_bytes()) {
            if kv.key != keys.subnet(index) {
                etcd.delete_if(
                    &[ModRevisionIs { key: kv.key.clone(), mod_revision: kv.mod_revision }],
                    &kv.key,
                )?;
            }
        }
        return Ok(index);
    }
}

/// Keeps this host's lease of the /24 `index` in etcd (`subnets` a read
/// of the leases): written again if etcd lost it (wiped, or restored from
/// before it was taken), so that no other host takes it.
pub fn keep_lease(
    etcd: &Etcd,
    keys: &Keys,
    host: &str,
    index: u8,
    subnets: &Range,
) -> Result<(), EtcdError> {
    match leases(keys, subnets).get(&index) {
        Some(holder) if holder == host => {}
        Some(holder) => {
            warn!(
                index,
                holder,
                "etcd says another host holds this host's /24; routing to one of them breaks"
            );
        }
        None => {
            let key = keys.subnet(index);
            let (won, _) = etcd.put_if(
                &[ModRevisionIs { key: key.clone(), mod_revision: 0 }],
                &[(&key, host.as_bytes(), 0)],
            )?;
            if won {
                info!(index, "leased this host's /24 in etcd again (its lease was gone)");
            }
        }
    }
    Ok(())
}

impl Overlay {
    /// Creates (or reuses) the VXLAN device on the interface holding
    /// `underlay`.
    pub async fn open(
        underlay: Ipv4Addr,
        ipv6_prefix: Option<Ipv6Prefix>,
    ) -> Result<Self, OverlayError> {
        let (connection, handle, _) = rtnetlink::new_connection().map_err(OverlayError::Socket)?;
        tokio::spawn(connection);
        let mut addresses = handle.address().get().execute();
        let mut underlay_index = None;
        while let Some(message) = addresses.try_next().await? {
            if message
                .attributes
                .iter()
                .any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(ip)) if *ip == underlay))
            {
                underlay_index = Some(message.header.index);
                break;
            }
        }
        let underlay_index = underlay_index.ok_or(OverlayError::NoUnderlay(underlay))?;
        let underlay_ifname = link_name(&handle, underlay_index).await?;
        if find_link(&handle, DEVICE).await?.is_none() {
            let device = LinkVxlan::new(DEVICE, VNI)
                .dev(underlay_index)
                .port(PORT)
                .local(underlay)
                .learning(false)
                .append_info_data(InfoVxlan::Gbp(true))
                .up()
                .build();
            handle.link().add(device).execute().await?;
        }
        let (ifindex, mac) = find_link(&handle, DEVICE).await?.ok_or(OverlayError::NoDevice)?;
        handle.link().set(LinkUnspec::new_with_index(ifindex).up().build()).execute().await?;
        Ok(Self { handle, ifindex, mac, underlay_ifname, routed: BTreeSet::new(), ipv6_prefix })
    }

    /// The peers routed now.
    pub fn routed(&self) -> &BTreeSet<Peer> {
        &self.routed
    }

    /// Makes the routes, neighbour and forwarding entries exactly those of
    /// `peers`: new ones first, then the ones of hosts that left.
    pub async fn sync(&mut self, peers: &BTreeSet<Peer>) -> Result<(), OverlayError> {
        for peer in peers.difference(&self.routed.clone()) {
            // The peer's gateway on each family: its subnet's network
            // address (an address nothing holds: a name for its MAC).
            let gateways = std::iter::once(IpAddr::V4(peer.subnet))
                .chain(self.ipv6_prefix.map(|p| IpAddr::V6(p.address_of(peer.subnet))));
            for gateway in gateways {
                self.handle
                    .neighbours()
                    .add(self.ifindex, gateway)
                    .link_layer_address(&peer.mac)
                    .state(NeighbourState::Permanent)
                    .replace()
                    .execute()
                    .await?;
            }
            self.handle
                .neighbours()
                .add_bridge(self.ifindex, &peer.mac)
                .destination(IpAddr::V4(peer.underlay))
                .flags(NeighbourFlags::Own)
                .state(NeighbourState::Permanent)
                .replace()
                .execute()
                .await?;
            for route in self.routes(peer) {
                self.handle.route().add(route).replace().execute().await?;
            }
            self.routed.insert(peer.clone());
        }
        for peer in self.routed.clone().difference(peers) {
            // Gone already (e.g. removed by hand) is fine.
            for route in self.routes(peer) {
                let _ = self.handle.route().del(route).execute().await;
            }
            self.routed.remove(peer);
        }
        Ok(())
    }

    /// The routes to a peer's containers: its /24 via its gateway on the
    /// device, and with an IPv6 prefix the /120 of the same addresses.
    fn routes(&self, peer: &Peer) -> Vec<rtnetlink::packet_route::route::RouteMessage> {
        let mut routes = vec![
            RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(peer.subnet, 24)
                .gateway(peer.subnet)
                .output_interface(self.ifindex)
                .onlink()
                .build(),
        ];
        if let Some(prefix) = self.ipv6_prefix {
            let network = prefix.address_of(peer.subnet);
            routes.push(
                RouteMessageBuilder::<Ipv6Addr>::new()
                    .destination_prefix(network, 120)
                    .gateway(network)
                    .output_interface(self.ifindex)
                    .onlink()
                    .build(),
            );
        }
        routes
    }
}

async fn link_name(handle: &Handle, index: u32) -> Result<String, OverlayError> {
    let mut links = handle.link().get().match_index(index).execute();
    let link = links.try_next().await?.ok_or(OverlayError::NoDevice)?;
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::IfName(name) => Some(name.clone()),
            _ => None,
        })
        .ok_or(OverlayError::NoDevice)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets() {
        assert_eq!(subnet(Ipv4Addr::new(10, 255, 0, 0), 7), Ipv4Addr::new(10, 255, 7, 0));
        assert_eq!(first_free(&BTreeSet::new()), Some(0));
        assert_eq!(first_free(&[0, 1, 3].into()), Some(2));
        assert_eq!(first_free(&(0..=255).collect()), None);
    }

    #[test]
    fn a_host_keeps_the_subnet_it_remembers_and_never_takes_another_hosts() {
        let leased: BTreeMap<u8, String> =
            [(0, "cell-0".to_owned()), (2, "cell-2".to_owned())].into();
        // Its own lease, or a free one it remembers.
        assert_eq!(choose("cell-0", Some(0), &leased, &BTreeSet::new()), Some(Choice::Held(0)));
        assert_eq!(choose("cell-1", Some(1), &leased, &BTreeSet::new()), Some(Choice::Free(1)));
        // A wiped etcd: no leases, but the other hosts' records name theirs.
        let (none, claimed) = (BTreeMap::new(), BTreeSet::from([0, 1]));
        assert_eq!(choose("cell-1", Some(1), &none, &BTreeSet::from([0])), Some(Choice::Free(1)));
        assert_eq!(choose("cell-9", None, &none, &claimed), Some(Choice::Free(2)));
        // Remembered, but another host's now (it was away past its grace).
        assert_eq!(choose("cell-1", Some(2), &leased, &BTreeSet::new()), Some(Choice::Free(1)));
        assert_eq!(choose("cell-1", Some(1), &none, &claimed), Some(Choice::Free(2)));
        // Nothing remembered: the lease etcd holds, else the first free.
        assert_eq!(choose("cell-2", None, &leased, &BTreeSet::new()), Some(Choice::Held(2)));
        assert_eq!(choose("cell-3", None, &leased, &BTreeSet::new()), Some(Choice::Free(1)));
        let all: BTreeMap<u8, String> = (0..=255).map(|i| (i, "x".to_owned())).collect();
        assert_eq!(choose("cell-3", None, &all, &BTreeSet::new()), None);
    }
}
