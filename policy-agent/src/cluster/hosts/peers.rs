//! The overlay in line with the registry: routes to every other host's
//! subnet through the VXLAN device, and the underlay addresses whose
//! tunnel packets the programs accept.
//!
//! A host whose record expired (its agent down longer than the lease: a
//! restart on a busy machine, an upgrade) keeps its routes and its trust
//! while its subnet is still leased to it, through `host_grace_seconds`:
//! its programs stay attached and keep policing its containers, so
//! traffic to them goes on; once it is gone for good (`gone` frees its
//! subnet) its routes go.

use std::{collections::BTreeSet, net::Ipv4Addr};

use tracing::warn;

use super::{HostRecord, Membership};
use crate::{
    agent::{self, SharedAgent},
    cluster::overlay::Peer,
};

/// Routes to every other host's subnet, and accepts tunnel packets from
/// every registered host and every host routed before whose subnet is in
/// `leased` (the subnet indices etcd holds); with `remove` false, keeps
/// those of hosts that are not registered too.
pub(super) fn follow(
    agent: &SharedAgent,
    membership: &mut Membership,
    me: &str,
    hosts: &[HostRecord],
    leased: &BTreeSet<u8>,
    remove: bool,
) {
    let mut peers: BTreeSet<Peer> = hosts
        .iter()
        .filter(|h| h.host != me)
        .filter_map(|h| {
            Some(Peer {
                subnet: h.subnet?,
                underlay: h.underlay_address,
                mac: policy_api::link::parse_mac(h.vtep_mac.as_deref()?)?,
            })
        })
        .collect();
    let Membership { overlay, runtime, .. } = membership;
    let named: BTreeSet<Ipv4Addr> = peers.iter().map(|p| p.subnet).collect();
    let kept = |p: &&Peer| {
        !named.contains(&p.subnet) && (!remove || leased.contains(&p.subnet.octets()[2]))
    };
    peers.extend(overlay.routed().iter().filter(kept).cloned());
    let addresses = hosts
        .iter()
        .filter(|h| h.host != me)
        .map(|h| h.underlay_address)
        .chain(peers.iter().map(|p| p.underlay))
        .collect();
    if let Err(e) = agent::lock(agent).set_peers(&addresses) {
        warn!(error = %e, "cannot update the cluster's peers in the kernel");
    }
    if let Err(e) = runtime.block_on(overlay.sync(&peers)) {
        warn!(error = %e, "cannot update the routes to the other hosts");
    }
}
