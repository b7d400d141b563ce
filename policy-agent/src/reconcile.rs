//! Desired state → kernel maps. The kernel is reached through [`Kernel`], so
//! the ordering and rollback rules here are tested without root against an
//! in-memory fake (see the tests), and against the real maps by the
//! integration tests.
//!
//! Rules:
//! 1. Adds before removes: every entry the new state needs is written before
//!    any entry it no longer needs is removed.
//! 2. Every map write replaces one whole entry, so the kernel sees each pair's
//!    port ranges either before or after a change, never half of it.
//! 3. A write that fails (a full map) is rolled back: entries already
//!    written for the same change get their old values again.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use policy_common::{
    maps::{EndpointValue, PairKey},
    ports::Allowance,
};
use tracing::warn;

use crate::{
    Error,
    state::{Endpoint, PortMapping, Protocol, State},
};

/// What the reconciler needs from the kernel.
pub trait Kernel {
    /// `ENDPOINTS`: address → tag.
    fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, EndpointValue>, Error>;
    fn set_endpoint(&mut self, ip: Ipv4Addr, value: EndpointValue) -> Result<(), Error>;
    /// Removes the endpoint and every entry naming its address.
    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), Error>;
    /// `ENDPOINTS6`: IPv6 address → tag (dual-stack endpoints).
    fn endpoints6(&self) -> Result<BTreeMap<Ipv6Addr, EndpointValue>, Error> {
        Ok(BTreeMap::new())
    }
    fn set_endpoint6(&mut self, _ip: Ipv6Addr, _value: EndpointValue) -> Result<(), Error> {
        Ok(())
    }
    fn remove_endpoint6(&mut self, _ip: Ipv6Addr) -> Result<(), Error> {
        Ok(())
    }
    /// Binds the attached `ifname` to the endpoint's IPv6 address for the
    /// IPv6 anti-spoofing check (None: the endpoint has none, and sends no
    /// IPv6 but link-local).
    fn bind_veth6(&mut self, _ifname: &str, _ip: Option<Ipv6Addr>) -> Result<(), Error> {
        Ok(())
    }
    /// `POLICIES`: pair → allowances.
    fn pairs(&self) -> Result<BTreeMap<PairKey, Vec<Allowance>>, Error>;
    /// Replaces a pair's allowances; empty removes the pair.
    fn set_pair(&mut self, key: PairKey, allowances: &[Allowance]) -> Result<(), Error>;
    /// Host-side veths with programs attached.
    fn attached(&self) -> Result<BTreeSet<String>, Error>;
    /// Whether the interface `ifname` exists (in the agent's namespace).
    fn interface_exists(&self, ifname: &str) -> bool;
    /// Binds `ifname` to the endpoint (anti-spoofing) and attaches to it.
    /// `ip` None: an IPv6-only endpoint, whose veth lets no IPv4 out.
    fn attach(&mut self, ifname: &str, ip: Option<Ipv4Addr>, tag: u32) -> Result<(), Error>;
    /// Detaches from `ifname` and drops the binding of `ip`.
    fn detach(&mut self, ifname: &str, ip: Option<Ipv4Addr>) -> Result<(), Error>;
    /// Forgets the counters of removed policies (ids are never reused).
    fn forget_policies(&mut self, _ids: &[u32]) {}
    /// NetIn: makes the port mappings exactly `wanted` (container address
    /// and its mapping, for every local endpoint).
    fn set_port_mappings(&mut self, _wanted: &[(Ipv4Addr, PortMapping)]) -> Result<(), Error> {
        Ok(())
    }
    /// NetOut: makes the security group trie exactly `wanted`.
    fn set_netout(
        &mut self,
        _wanted: &BTreeMap<crate::netout::TrieKey, policy_common::netout::NetOutRules>,
    ) -> Result<(), Error> {
        Ok(())
    }
}

/// Brings the kernel to `state` without clearing it first (the agent's start).
/// Interfaces that do not exist (a container deleted while the agent was
/// down) are reported, not fatal. Returns those warnings.
pub fn full<K: Kernel>(kernel: &mut K, state: &State) -> Result<Vec<String>, Error> {
    full_keeping(kernel, state, &BTreeMap::new())
}

/// [`full`], leaving the endpoints `held` exactly as the kernel has them
/// (attached, their addresses' entries kept): this host's endpoints the
/// cluster removed while their containers are still here (see
/// `agent::returning`).
pub fn full_keeping<K: Kernel>(
    kernel: &mut K,
    state: &State,
    held: &BTreeMap<IpAddr, Endpoint>,
) -> Result<Vec<String>, Error> {
    let mut warnings = Vec::new();
    let want_endpoints = state.endpoint_values();
    let have_endpoints = kernel.endpoints()?;
    // Adds and changes.
    for (ip, value) in &want_endpoints {
        if have_endpoints.get(ip) != Some(value) {
            kernel.set_endpoint(*ip, *value)?;
        }
    }
    let want_endpoints6 = state.endpoint6_values();
    let have_endpoints6 = kernel.endpoints6()?;
    for (ip, value) in &want_endpoints6 {
        if have_endpoints6.get(ip) != Some(value) {
            kernel.set_endpoint6(*ip, *value)?;
        }
    }
    for e in state.local_endpoints() {
        let Some(tag) = state.endpoint_value(e).map(|v| v.tag) else { continue };
        let attached = kernel
            .attach(&e.ifname, e.ipv4(), tag)
            .and_then(|()| kernel.bind_veth6(&e.ifname, e.ipv6));
        if let Err(err) = attached {
            warn!(ifname = %e.ifname, ip = %e.ip, error = %err, "endpoint's interface not attached");
            warnings.push(format!("endpoint {} ({}): {err}", e.ip, e.ifname));
        }
    }
    let want_pairs = state.pairs();
    let have_pairs = kernel.pairs()?;
    for (key, allowances) in &want_pairs {
        if !same_allowances(have_pairs.get(key), allowances) {
            kernel.set_pair(*key, allowances)?;
        }
    }
    // Removes.
    for key in have_pairs.keys().filter(|k| !want_pairs.contains_key(k)) {
        kernel.set_pair(*key, &[])?;
    }
    let wanted_ifnames: BTreeSet<&str> =
        state.local_endpoints().chain(held.values()).map(|e| e.ifname.as_str()).collect();
    let kept4: BTreeSet<Ipv4Addr> = held.values().filter_map(Endpoint::ipv4).collect();
    let kept6: BTreeSet<Ipv6Addr> = held.values().filter_map(|e| e.ipv6).collect();
    for ifname in kernel.attached()? {
        if !wanted_ifnames.contains(ifname.as_str()) {
            // The address is unknown here; detach drops the link only.
            kernel.detach(&ifname, None)?;
        }
    }
    for ip in have_endpoints.keys().filter(|ip| !want_endpoints.contains_key(ip)) {
        if !kept4.contains(ip) {
            kernel.remove_endpoint(*ip)?;
        }
    }
    for ip in
        have_endpoints6.keys().filter(|ip| !want_endpoints6.contains_key(ip) && !kept6.contains(ip))
    {
        kernel.remove_endpoint6(*ip)?;
    }
    port_mappings(kernel, state)?;
    netout(kernel, state)?;
    Ok(warnings)
}

/// An endpoint's addresses into `ENDPOINTS` and `ENDPOINTS6`, each it has.
pub fn set_endpoint_addresses<K: Kernel>(
    kernel: &mut K,
    e: &Endpoint,
    value: EndpointValue,
) -> Result<(), Error> {
    if let Some(ip) = e.ipv4() {
        kernel.set_endpoint(ip, value)?;
    }
    if let Some(ip) = e.ipv6 {
        kernel.set_endpoint6(ip, value)?;
    }
    Ok(())
}

/// An endpoint's addresses out of `ENDPOINTS` and `ENDPOINTS6`.
pub fn remove_endpoint_addresses<K: Kernel>(kernel: &mut K, e: &Endpoint) -> Result<(), Error> {
    if let Some(ip) = e.ipv4() {
        kernel.remove_endpoint(ip)?;
    }
    if let Some(ip) = e.ipv6 {
        kernel.remove_endpoint6(ip)?;
    }
    Ok(())
}

/// NetOut: the kernel's security group trie made the state's (apps with
/// security groups and a tag).
pub fn netout<K: Kernel>(kernel: &mut K, state: &State) -> Result<(), Error> {
    kernel.set_netout(&crate::netout::trie(state))
}

/// NetIn: the kernel's port mappings made those of the local endpoints.
pub fn port_mappings<K: Kernel>(kernel: &mut K, state: &State) -> Result<(), Error> {
    let wanted: Vec<(Ipv4Addr, PortMapping)> = state
        .local_endpoints()
        .filter_map(|e| Some((e.ipv4()?, &e.port_mappings)))
        .flat_map(|(ip, mappings)| mappings.iter().map(move |m| (ip, *m)))
        .collect();
    kernel.set_port_mappings(&wanted)
}

fn same_allowances(have: Option<&Vec<Allowance>>, want: &[Allowance]) -> bool {
    let sorted = |v: &[Allowance]| {
        let mut v: Vec<_> = v.iter().map(|a| (a.start, a.end, a.policy_id)).collect();
        v.sort_unstable();
        v
    };
    have.is_some_and(|h| sorted(h) == sorted(want))
}

/// One pair entry to write: key, its old allowances, its new ones.
pub type PairChange = (PairKey, Vec<Allowance>, Vec<Allowance>);

/// Writes pair changes, adds and changes first, removals last. On error,
/// every pair already written is restored and the error returned.
fn write_pairs<K: Kernel>(kernel: &mut K, changes: &mut [PairChange]) -> Result<(), Error> {
    // Entries that remain (non-empty) before entries that go.
    changes.sort_by_key(|(_, _, new)| new.is_empty());
    for (i, (key, _, new)) in changes.iter().enumerate() {
        if let Err(err) = kernel.set_pair(*key, new) {
            for (key, old, _) in changes[..i].iter().rev() {
                if let Err(undo) = kernel.set_pair(*key, old) {
                    warn!(error = %undo, "rolling back a policy pair failed");
                }
            }
            return Err(err);
        }
    }
    Ok(())
}

/// Writes every pair that differs between two states (walks all policies:
/// for tests and small states; the agent uses [`touched_pairs`]).
pub fn pairs<K: Kernel>(kernel: &mut K, old: &State, new: &State) -> Result<(), Error> {
    let (old_pairs, new_pairs) = (old.pairs(), new.pairs());
    let mut changes: Vec<PairChange> = new_pairs
        .iter()
        .filter(|(k, v)| !same_allowances(old_pairs.get(k), v))
        .map(|(k, v)| (*k, old_pairs.get(k).cloned().unwrap_or_default(), v.clone()))
        .collect();
    changes.extend(
        old_pairs
            .iter()
            .filter(|(k, _)| !new_pairs.contains_key(k))
            .map(|(k, v)| (*k, v.clone(), Vec::new())),
    );
    write_pairs(kernel, &mut changes)
}

/// An app pair and protocol, by app id.
pub type AppPair = (String, String, Protocol);

/// The pairs a change will touch as they were before it: allowances and
/// the apps' tags (a removal may take an app's tag away).
pub struct Before(Vec<PairBefore>);

/// A pair, its allowances, and its source and destination apps' tags.
type PairBefore = (AppPair, Vec<Allowance>, Option<u32>, Option<u32>);

/// Reads the touched pairs before the change: range queries, so the cost is
/// proportional to the change, not to the number of policies.
pub fn before_change(state: &State, touched: BTreeSet<AppPair>) -> Before {
    Before(
        touched
            .into_iter()
            .map(|pair| {
                let allowances = state.pair_allowances(&pair.0, &pair.1, pair.2);
                let (src, dst) = (state.tag(&pair.0), state.tag(&pair.1));
                (pair, allowances, src, dst)
            })
            .collect(),
    )
}

/// Writes the touched pairs that differ between `before` and `state` now;
/// returns what it wrote, for [`undo_pairs`]. On error nothing stays written.
pub fn touched_pairs<K: Kernel>(
    kernel: &mut K,
    state: &State,
    before: &Before,
) -> Result<Vec<PairChange>, Error> {
    let mut changes = Vec::new();
    for ((source, destination, protocol), old, old_src, old_dst) in &before.0 {
        let after = state.pair_allowances(source, destination, *protocol);
        if same_allowances(Some(old), &after) {
            continue;
        }
        let (Some(src), Some(dst)) =
            (state.tag(source).or(*old_src), state.tag(destination).or(*old_dst))
        else {
            continue;
        };
        changes.push((PairKey::new(src, dst, protocol.number()), old.clone(), after));
    }
    write_pairs(kernel, &mut changes)?;
    Ok(changes)
}

/// Puts back what [`touched_pairs`] wrote (best effort: failures are
/// logged; the next start reconciles).
pub fn undo_pairs<K: Kernel>(kernel: &mut K, written: Vec<PairChange>) {
    let mut reverse: Vec<PairChange> =
        written.into_iter().map(|(key, old, new)| (key, new, old)).collect();
    if let Err(e) = write_pairs(kernel, &mut reverse) {
        warn!(error = %e, "undoing policy pairs failed");
    }
}

#[cfg(test)]
pub(crate) mod fake {
    //! An in-memory kernel with a capacity for pairs, recording every write.

    use super::*;

    #[derive(Default)]
    pub struct FakeKernel {
        pub endpoints: BTreeMap<Ipv4Addr, u32>,
        pub pairs: BTreeMap<PairKey, Vec<Allowance>>,
        pub attached: BTreeMap<String, Option<Ipv4Addr>>,
        pub interfaces: BTreeSet<String>,
        pub pair_capacity: usize,
        /// Every write, in order: ("set_pair", ...), ("remove_pair", ...).
        pub log: Vec<String>,
    }

    impl FakeKernel {
        pub fn new(pair_capacity: usize) -> Self {
            Self { pair_capacity, ..Self::default() }
        }
    }

    impl Kernel for FakeKernel {
        fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, EndpointValue>, Error> {
            Ok(self
                .endpoints
                .iter()
                .map(|(ip, tag)| (*ip, EndpointValue { tag: *tag, flags: 0 }))
                .collect())
        }
        fn set_endpoint(&mut self, ip: Ipv4Addr, value: EndpointValue) -> Result<(), Error> {
            self.log.push(format!("set_endpoint {ip}"));
            self.endpoints.insert(ip, value.tag);
            Ok(())
        }
        fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), Error> {
            self.log.push(format!("remove_endpoint {ip}"));
            self.endpoints.remove(&ip);
            Ok(())
        }
        fn pairs(&self) -> Result<BTreeMap<PairKey, Vec<Allowance>>, Error> {
            Ok(self.pairs.clone())
        }
        fn set_pair(&mut self, key: PairKey, allowances: &[Allowance]) -> Result<(), Error> {
            if allowances.is_empty() {
                self.log.push(format!("remove_pair {}->{}", key.src_tag, key.dst_tag));
                self.pairs.remove(&key);
                return Ok(());
            }
            if !self.pairs.contains_key(&key) && self.pairs.len() >= self.pair_capacity {
                return Err(Error::MapFull {
                    name: "POLICIES",
                    capacity: self.pair_capacity as u32,
                });
            }
            self.log.push(format!("set_pair {}->{}", key.src_tag, key.dst_tag));
            self.pairs.insert(key, allowances.to_vec());
            Ok(())
        }
        fn attached(&self) -> Result<BTreeSet<String>, Error> {
            Ok(self.attached.keys().cloned().collect())
        }
        fn interface_exists(&self, ifname: &str) -> bool {
            self.interfaces.contains(ifname)
        }
        fn attach(&mut self, ifname: &str, ip: Option<Ipv4Addr>, _tag: u32) -> Result<(), Error> {
            if !self.interfaces.contains(ifname) {
                return Err(Error::NoInterface { ifname: ifname.to_owned() });
            }
            self.log.push(format!("attach {ifname}"));
            self.attached.insert(ifname.to_owned(), ip);
            Ok(())
        }
        fn detach(&mut self, ifname: &str, _ip: Option<Ipv4Addr>) -> Result<(), Error> {
            self.log.push(format!("detach {ifname}"));
            self.attached.remove(ifname);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{fake::FakeKernel, *};
    use crate::state::{Endpoint, Policy};

    fn policy(src: &str, dst: &str, port: u16) -> Policy {
        Policy::tcp(src, dst, port)
    }

    #[test]
    fn full_reconcile_adds_before_it_removes_and_keeps_what_matches() {
        let mut kernel = FakeKernel::new(100);
        kernel.interfaces.insert("hv0".into());
        let mut old = State::default();
        old.add_policies(&[policy("a", "b", 80), policy("c", "d", 81)], None).unwrap();
        full(&mut kernel, &old).unwrap();
        let mut new = old.clone();
        new.remove_policies(&[policy("c", "d", 81)]);
        new.add_policies(&[policy("a", "b", 82)], None).unwrap();
        new.add_endpoint(Endpoint {
            ip: Ipv4Addr::new(10, 0, 0, 1).into(),
            ipv6: None,
            app: "b".into(),
            ifname: "hv0".into(),
            netns: None,
            host: None,
            port_mappings: Vec::new(),
        });
        kernel.log.clear();
        full(&mut kernel, &new).unwrap();
        let first_remove = kernel.log.iter().position(|l| l.starts_with("remove")).unwrap();
        let last_add = kernel
            .log
            .iter()
            .rposition(|l| l.starts_with("set") || l.starts_with("attach"))
            .unwrap();
        assert!(last_add < first_remove, "adds before removes: {:?}", kernel.log);
        assert_eq!(kernel.pairs, new.pairs());
        // Reconciling again writes nothing.
        kernel.log.clear();
        full(&mut kernel, &new).unwrap();
        assert_eq!(kernel.log, ["attach hv0"], "only the idempotent attach");
    }

    #[test]
    fn a_missing_interface_is_a_warning_at_start() {
        let mut kernel = FakeKernel::new(10);
        let mut state = State::default();
        state.add_endpoint(Endpoint {
            ip: Ipv4Addr::new(10, 0, 0, 1).into(),
            ipv6: None,
            app: "b".into(),
            ifname: "gone".into(),
            netns: None,
            host: None,
            port_mappings: Vec::new(),
        });
        let warnings = full(&mut kernel, &state).unwrap();
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("gone"));
        assert_eq!(kernel.endpoints.len(), 1);
    }

    #[test]
    fn a_full_map_rolls_the_change_back() {
        let mut kernel = FakeKernel::new(2);
        let mut old = State::default();
        old.add_policies(&[policy("a", "b", 80)], None).unwrap();
        pairs(&mut kernel, &State::default(), &old).unwrap();
        let mut new = old.clone();
        new.add_policies(&[policy("a", "b", 81), policy("a", "c", 80), policy("a", "d", 80)], None)
            .unwrap();
        let err = pairs(&mut kernel, &old, &new).unwrap_err();
        assert!(matches!(err, Error::MapFull { .. }));
        assert_eq!(kernel.pairs, old.pairs(), "kernel back to the old state");
    }
}
