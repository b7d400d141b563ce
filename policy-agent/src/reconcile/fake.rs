//! An in-memory kernel: every map the [`Kernel`] trait writes (IPv4 and
//! IPv6 endpoints, veth bindings of both families, pairs, NetIn mappings,
//! the NetOut trie, policy counters and those forgotten, the per-address
//! rate limits), a capacity for pairs, a write that fails on demand, and a
//! log of the writes.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use policy_common::{
    maps::{EndpointValue, PairKey},
    ports::Allowance,
};

use super::{Kernel, NetOutTrie};
use crate::{DataplaneError, state::PortMapping};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct FakeKernel {
    /// `ENDPOINTS`.
    pub endpoints: BTreeMap<Ipv4Addr, EndpointValue>,
    /// `ENDPOINTS6`.
    pub endpoints6: BTreeMap<Ipv6Addr, EndpointValue>,
    /// `POLICIES`.
    pub pairs: BTreeMap<PairKey, Vec<Allowance>>,
    /// Veths with programs attached, and the address given at the attach.
    pub attached: BTreeMap<String, Option<Ipv4Addr>>,
    /// `VETHS`, by interface name: the veth's address and tag.
    pub veths: BTreeMap<String, (Option<Ipv4Addr>, u32)>,
    /// `VETHS6`, by interface name.
    pub veths6: BTreeMap<String, Ipv6Addr>,
    /// NetIn: the mappings last set.
    pub port_mappings: Vec<(Ipv4Addr, PortMapping)>,
    /// NetOut: the trie last set.
    pub netout: NetOutTrie,
    /// Whether the programs count per policy ([`Self::new`]: they do).
    pub counting: bool,
    /// `POLICY_STATS`: policy ids with counters.
    pub counters: BTreeSet<u32>,
    /// Policy ids whose counters were forgotten, in order.
    pub forgotten: Vec<u32>,
    /// `EVENT_LIMITS` and `REJECT_LIMITS` as one: key → whether its window
    /// has ended.
    pub limits: BTreeMap<u32, bool>,
    /// Interfaces that exist.
    pub interfaces: BTreeSet<String>,
    pub pair_capacity: usize,
    /// Writes that succeed before one fails (None: every write succeeds).
    /// The failing write clears it, so the undo that follows succeeds.
    pub fail_after: Option<usize>,
    /// Every write that changes a map, and every attach, in order:
    /// ("set_pair", ...), ("remove_pair", ...).
    pub log: Vec<String>,
}

impl FakeKernel {
    pub fn new(pair_capacity: usize) -> Self {
        Self { pair_capacity, counting: true, ..Self::default() }
    }

    /// The maps alone (no log, no injected failure, no record of what was
    /// forgotten): what a test compares before and after a change that was
    /// taken back.
    pub fn maps(&self) -> Self {
        Self { log: Vec::new(), fail_after: None, forgotten: Vec::new(), ..self.clone() }
    }

    /// Counts a write against [`Self::fail_after`].
    fn write(&mut self, what: &'static str) -> Result<(), DataplaneError> {
        match self.fail_after {
            Some(0) => {
                self.fail_after = None;
                Err(DataplaneError::MapFull { name: what, capacity: 0 })
            }
            Some(n) => {
                self.fail_after = Some(n - 1);
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn log_if(&mut self, changed: bool, line: String) {
        if changed {
            self.log.push(line);
        }
    }

    fn has_interface(&self, ifname: &str) -> Result<(), DataplaneError> {
        match self.interfaces.contains(ifname) {
            true => Ok(()),
            false => Err(DataplaneError::NoInterface { ifname: ifname.to_owned() }),
        }
    }
}

impl Kernel for FakeKernel {
    fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, EndpointValue>, DataplaneError> {
        Ok(self.endpoints.clone())
    }
    fn set_endpoint(&mut self, ip: Ipv4Addr, value: EndpointValue) -> Result<(), DataplaneError> {
        self.write("ENDPOINTS")?;
        self.log.push(format!("set_endpoint {ip}"));
        self.endpoints.insert(ip, value);
        Ok(())
    }
    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DataplaneError> {
        self.write("ENDPOINTS")?;
        self.log.push(format!("remove_endpoint {ip}"));
        self.endpoints.remove(&ip);
        self.veths.retain(|_, (addr, _)| *addr != Some(ip));
        Ok(())
    }
    fn endpoints6(&self) -> Result<BTreeMap<Ipv6Addr, EndpointValue>, DataplaneError> {
        Ok(self.endpoints6.clone())
    }
    fn set_endpoint6(&mut self, ip: Ipv6Addr, value: EndpointValue) -> Result<(), DataplaneError> {
        self.write("ENDPOINTS6")?;
        self.log.push(format!("set_endpoint6 {ip}"));
        self.endpoints6.insert(ip, value);
        Ok(())
    }
    fn remove_endpoint6(&mut self, ip: Ipv6Addr) -> Result<(), DataplaneError> {
        self.write("ENDPOINTS6")?;
        self.log.push(format!("remove_endpoint6 {ip}"));
        self.endpoints6.remove(&ip);
        self.veths6.retain(|_, addr| *addr != ip);
        Ok(())
    }
    fn bind_veth6(&mut self, ifname: &str, ip: Option<Ipv6Addr>) -> Result<(), DataplaneError> {
        self.has_interface(ifname)?;
        self.write("VETHS6")?;
        let changed = match ip {
            Some(ip) => self.veths6.insert(ifname.to_owned(), ip) != Some(ip),
            None => self.veths6.remove(ifname).is_some(),
        };
        self.log_if(changed, format!("bind_veth6 {ifname} {ip:?}"));
        Ok(())
    }
    fn pairs(&self) -> Result<BTreeMap<PairKey, Vec<Allowance>>, DataplaneError> {
        Ok(self.pairs.clone())
    }
    fn set_pair(&mut self, key: PairKey, allowances: &[Allowance]) -> Result<(), DataplaneError> {
        if allowances.is_empty() {
            self.write("POLICIES")?;
            self.log.push(format!("remove_pair {}->{}", key.src_tag, key.dst_tag));
            self.pairs.remove(&key);
            return Ok(());
        }
        if !self.pairs.contains_key(&key) && self.pairs.len() >= self.pair_capacity {
            return Err(DataplaneError::MapFull {
                name: "POLICIES",
                capacity: self.pair_capacity as u32,
            });
        }
        self.write("POLICIES")?;
        self.log.push(format!("set_pair {}->{}", key.src_tag, key.dst_tag));
        self.pairs.insert(key, allowances.to_vec());
        Ok(())
    }
    fn attached(&self) -> Result<BTreeSet<String>, DataplaneError> {
        Ok(self.attached.keys().cloned().collect())
    }
    fn interface_exists(&self, ifname: &str) -> bool {
        self.interfaces.contains(ifname)
    }
    fn attach(
        &mut self,
        ifname: &str,
        ip: Option<Ipv4Addr>,
        tag: u32,
    ) -> Result<(), DataplaneError> {
        self.has_interface(ifname)?;
        self.write("VETHS")?;
        self.log.push(format!("attach {ifname}"));
        self.veths.insert(ifname.to_owned(), (ip, tag));
        self.attached.insert(ifname.to_owned(), ip);
        Ok(())
    }
    fn detach(&mut self, ifname: &str, ip: Option<Ipv4Addr>) -> Result<(), DataplaneError> {
        self.write("VETHS")?;
        self.log.push(format!("detach {ifname}"));
        self.attached.remove(ifname);
        self.veths.retain(|name, (addr, _)| name != ifname && (ip.is_none() || *addr != ip));
        self.veths6.remove(ifname);
        Ok(())
    }
    fn counts_policies(&self) -> bool {
        self.counting
    }
    fn policy_counters(&self) -> Result<BTreeSet<u32>, DataplaneError> {
        Ok(self.counters.clone())
    }
    fn add_policy_counters(&mut self, ids: &[u32]) -> Result<(), DataplaneError> {
        self.write("POLICY_STATS")?;
        self.log.push(format!("add_policy_counters {ids:?}"));
        self.counters.extend(ids);
        Ok(())
    }
    fn forget_policies(&mut self, ids: &[u32]) {
        self.log.push(format!("forget_policies {ids:?}"));
        self.forgotten.extend_from_slice(ids);
        self.counters.retain(|id| !ids.contains(id));
    }
    fn forget_port_sets(&mut self, _all: bool) {
        // The fake keeps each pair's allowances whole: it has no PORT_SETS.
    }
    fn forget_limits(&mut self, keys: &BTreeSet<u32>) {
        let before = self.limits.len();
        self.limits.retain(|key, ended| !keys.contains(key) && !*ended);
        self.log_if(self.limits.len() != before, format!("forget_limits {keys:?}"));
    }
    fn set_netin(&mut self, wanted: &[(Ipv4Addr, PortMapping)]) -> Result<(), DataplaneError> {
        self.write("NETIN")?;
        let changed = self.port_mappings != wanted;
        self.log_if(changed, format!("set_netin {}", wanted.len()));
        self.port_mappings = wanted.to_vec();
        Ok(())
    }
    fn set_netout(&mut self, wanted: &NetOutTrie) -> Result<(), DataplaneError> {
        self.write("NETOUT")?;
        let changed = self.netout != *wanted;
        self.log_if(changed, format!("set_netout {}", wanted.len()));
        self.netout = wanted.clone();
        Ok(())
    }
}
