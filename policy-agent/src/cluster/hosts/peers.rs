//! The overlay in line with the registry: routes to every other host's
//! subnet through the VXLAN device, and the underlay addresses whose
//! tunnel packets the programs accept.

use std::{collections::BTreeSet, net::Ipv4Addr};

use tracing::warn;

use super::{HostRecord, Membership};
use crate::{
    agent::{self, SharedAgent},
    cluster::overlay::Peer,
};

/// Routes to every other host's subnet, and accepts tunnel packets from
/// every registered host; with `remove` false, keeps those of hosts that
/// are not registered too.
pub(super) fn follow(
    agent: &SharedAgent,
    membership: &mut Membership,
    me: &str,
    hosts: &[HostRecord],
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
    if !remove {
        let named: BTreeSet<Ipv4Addr> = peers.iter().map(|p| p.subnet).collect();
        peers.extend(overlay.routed().iter().filter(|p| !named.contains(&p.subnet)).cloned());
    }
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
