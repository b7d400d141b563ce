//! The agent's part of the overlay in the kernel (cluster mode): which
//! device tunnel packets arrive through, and which hosts may send them.

use std::{collections::BTreeSet, net::Ipv4Addr};

use policy_common::maps::Tunnel;

use super::Agent;
use crate::{Dataplane, DataplaneError};

impl Agent<Dataplane> {
    /// Points the programs at the tunnel device and guards the underlay
    /// interface (`tc_from_underlay`). `flags`: [`policy_common::maps::tunnel_flags`].
    pub fn set_tunnel(
        &mut self,
        ifindex: u32,
        port: u16,
        flags: u16,
        underlay_ifname: &str,
    ) -> Result<(), DataplaneError> {
        self.kernel.maps_mut().set_tunnel(Tunnel { ifindex, port, flags })?;
        self.kernel.attach_underlay(underlay_ifname)
    }

    /// NetIn through `ifname`: port mappings listen on its addresses (the
    /// kernel's mappings are rewritten to include them).
    pub fn attach_netin(&mut self, ifname: &str) -> Result<Vec<Ipv4Addr>, DataplaneError> {
        let addrs = self.kernel.attach_netin(ifname)?;
        crate::reconcile::netin(&mut self.kernel, &self.state)?;
        Ok(addrs)
    }

    /// The underlay addresses tunnel packets are accepted from.
    pub fn set_peers(&mut self, peers: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError> {
        self.kernel.maps_mut().set_peers(peers)
    }
}
