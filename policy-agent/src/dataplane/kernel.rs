//! The reconciler's view of the real dataplane: [`Kernel`] on the maps
//! and links of a loaded [`Dataplane`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use policy_common::{
    maps::{EndpointValue, NO_IPV4, NetInKey, NetInTarget, PairKey},
    ports::Allowance,
};
use tracing::{debug, warn};

use super::{Dataplane, nix_ifindex};
use crate::{
    DataplaneError,
    dataplane::{addr_key, limits_clock_ns},
    reconcile::{Kernel, PairChange},
    state::PortMapping,
};

impl Kernel for Dataplane {
    fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, EndpointValue>, DataplaneError> {
        Ok(self.maps().endpoints().into_iter().collect())
    }

    fn set_endpoint(&mut self, ip: Ipv4Addr, value: EndpointValue) -> Result<(), DataplaneError> {
        self.maps_mut().set_endpoint_value(ip, value)
    }

    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        let maps = self.maps_mut();
        let bindings: Vec<u32> = maps
            .veths()
            .into_iter()
            .filter(|(_, addr, _)| *addr == ip)
            .map(|(ifindex, _, _)| ifindex)
            .collect();
        for ifindex in bindings {
            maps.remove_veth(ifindex)?;
        }
        maps.remove_endpoint(ip)?;
        maps.forget_address(ip)?;
        Ok(())
    }

    fn endpoints6(&self) -> Result<BTreeMap<Ipv6Addr, EndpointValue>, DataplaneError> {
        Ok(self.maps().endpoints6().into_iter().collect())
    }

    fn set_endpoint6(&mut self, ip: Ipv6Addr, value: EndpointValue) -> Result<(), DataplaneError> {
        self.maps_mut().set_endpoint6_value(ip, value)
    }

    fn remove_endpoint6(&mut self, ip: Ipv6Addr) -> Result<(), DataplaneError> {
        let maps = self.maps_mut();
        let bindings: Vec<u32> =
            maps.veths6().into_iter().filter(|(_, a)| *a == ip).map(|(i, _)| i).collect();
        for ifindex in bindings {
            maps.remove_veth6(ifindex)?;
        }
        maps.remove_endpoint6(ip)
    }

    fn bind_veth6(&mut self, ifname: &str, ip: Option<Ipv6Addr>) -> Result<(), DataplaneError> {
        let ifindex = nix_ifindex(ifname)
            .ok_or_else(|| DataplaneError::NoInterface { ifname: ifname.to_owned() })?;
        match ip {
            Some(ip) => self.maps_mut().set_veth6(ifindex, ip),
            None => self.maps_mut().remove_veth6(ifindex),
        }
    }

    fn pairs(&self) -> Result<BTreeMap<PairKey, Vec<Allowance>>, DataplaneError> {
        Ok(self.maps().pairs().into_iter().collect())
    }

    fn set_pair(&mut self, key: PairKey, allowances: &[Allowance]) -> Result<(), DataplaneError> {
        self.maps_mut().set_pair(key, allowances)
    }

    fn add_pairs(&mut self, pairs: &[PairChange]) -> Result<(), DataplaneError> {
        self.maps_mut().add_pairs(pairs)
    }

    fn remove_pairs(&mut self, pairs: &[PairChange]) -> Result<(), DataplaneError> {
        self.maps_mut().remove_pairs(pairs)
    }

    fn attached(&self) -> Result<BTreeSet<String>, DataplaneError> {
        Ok(self
            .attachments()?
            .into_iter()
            .filter_map(|pin| {
                let rest = pin.strip_prefix("tc-")?;
                let (ifname, _hook) = rest.rsplit_once('-')?;
                Some(ifname.to_owned())
            })
            .collect())
    }

    fn interface_exists(&self, ifname: &str) -> bool {
        nix_ifindex(ifname).is_some()
    }

    fn attach(
        &mut self,
        ifname: &str,
        ip: Option<Ipv4Addr>,
        tag: u32,
    ) -> Result<(), DataplaneError> {
        let ifindex = nix_ifindex(ifname)
            .ok_or_else(|| DataplaneError::NoInterface { ifname: ifname.to_owned() })?;
        // An IPv6-only endpoint's binding names it (its tag) with an address
        // the programs let nothing out from.
        let own = ip.unwrap_or(Ipv4Addr::from(NO_IPV4.to_ne_bytes()));
        self.maps_mut().set_veth(ifindex, own, tag)?;
        self.attach_veth(ifname)
    }

    fn set_netin(&mut self, wanted: &[(Ipv4Addr, PortMapping)]) -> Result<(), DataplaneError> {
        let mut entries = BTreeMap::new();
        for host in self.netin_addresses() {
            for (container, m) in wanted {
                let key = NetInKey {
                    addr: addr_key(*host),
                    port: m.host_port,
                    protocol: m.protocol.number(),
                    _pad: 0,
                };
                let target =
                    NetInTarget { addr: addr_key(*container), port: m.container_port, _pad: 0 };
                entries.insert(key, target);
            }
        }
        self.maps_mut().set_netin(&entries)
    }

    fn set_netout(
        &mut self,
        wanted: &BTreeMap<crate::netout::TrieKey, policy_common::netout::NetOutRules>,
    ) -> Result<(), DataplaneError> {
        self.maps_mut().set_netout(wanted)
    }

    fn counts_policies(&self) -> bool {
        self.maps().counts_policies()
    }

    fn policy_counters(&self) -> Result<BTreeSet<u32>, DataplaneError> {
        self.maps().policy_counter_ids()
    }

    fn add_policy_counters(&mut self, ids: &[u32]) -> Result<(), DataplaneError> {
        self.maps_mut().add_new_policy_counters(ids)
    }

    fn forget_policies(&mut self, ids: &[u32]) {
        if let Err(e) = self.maps_mut().forget_policy_counters(ids) {
            warn!(policies = ids.len(), error = %e, "cannot forget removed policies' counters");
        }
    }

    fn forget_port_sets(&mut self, all: bool) {
        match self.maps_mut().forget_port_sets(all) {
            Ok(0) => {}
            Ok(forgotten) => debug!(forgotten, "port sets no pair needs forgotten"),
            Err(e) => warn!(error = %e, "cannot forget port sets no pair needs"),
        }
    }

    fn forget_limits(&mut self, keys: &BTreeSet<u32>) {
        match self.maps_mut().forget_limits(keys, limits_clock_ns()) {
            Ok(forgotten) => debug!(forgotten, "rate-limit entries forgotten"),
            Err(e) => warn!(error = %e, "cannot forget rate-limit entries"),
        }
    }

    fn detach(&mut self, ifname: &str, ip: Option<Ipv4Addr>) -> Result<(), DataplaneError> {
        self.detach_veth(ifname)?;
        let stale: Vec<u32> = self
            .maps()
            .veths()
            .into_iter()
            .filter(|(ifindex, addr, _)| Some(*addr) == ip || Some(*ifindex) == nix_ifindex(ifname))
            .map(|(ifindex, _, _)| ifindex)
            .collect();
        for ifindex in stale {
            self.maps_mut().remove_veth(ifindex)?;
        }
        if let Some(ifindex) = nix_ifindex(ifname) {
            self.maps_mut().remove_veth6(ifindex)?;
        }
        Ok(())
    }
}
