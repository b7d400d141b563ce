//! The agent's hooks in the kernel beyond the reconcile: which device
//! tunnel packets arrive through and which hosts may send them (cluster
//! mode), NetIn's uplinks, and veths whose programs another tool removed.

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

    /// Attaches again to the veths among `candidates` (from
    /// [`Dataplane::detached_veths`], read without the agent's lock) that
    /// are still detached, checked again here, and still one of this host's
    /// endpoints' (a veth being detached for a CNI DEL is left alone).
    /// Returns those attached again.
    pub fn reattach_veths(
        &mut self,
        candidates: &BTreeSet<String>,
    ) -> Result<Vec<String>, DataplaneError> {
        let wanted: BTreeSet<&str> = self
            .state
            .local_endpoints()
            .chain(self.held.values())
            .map(|e| e.ifname.as_str())
            .collect();
        let still = Dataplane::detached_veths(self.kernel.pin_dir());
        let mut attached = Vec::new();
        for ifname in candidates.intersection(&still) {
            if wanted.contains(ifname.as_str()) {
                self.kernel.attach_veth(ifname)?;
                attached.push(ifname.clone());
            }
        }
        Ok(attached)
    }

    /// The underlay addresses tunnel packets are accepted from.
    pub fn set_peers(&mut self, peers: &BTreeSet<Ipv4Addr>) -> Result<(), DataplaneError> {
        self.kernel.maps_mut().set_peers(peers)
    }
}
