//! Desired state → kernel maps. The kernel is reached through [`Kernel`], so
//! the ordering and rollback rules here are tested without root against an
//! in-memory fake (`fake.rs`, which keeps every map the trait writes, IPv6,
//! NetIn and NetOut included), and against the real maps by the
//! integration tests.
//!
//! Two ways in: [`full`] brings the whole kernel to a state (the agent's
//! start, a state replaced whole); [`apply`] writes one change — the
//! agent's own writes and the changes it follows from the cluster alike,
//! so a change reaches the kernel through the same steps wherever it was
//! made.
//!
//! Rules:
//! 1. Adds before removes: every entry the new state needs is written before
//!    any entry it no longer needs is removed.
//! 2. Every map write replaces one whole entry, so the kernel sees each pair's
//!    port ranges either before or after a change, never half of it.
//! 3. A change reaches the kernel whole or not at all: [`apply`] keeps the
//!    undo of every write it makes; a write that fails (a full map) takes
//!    back those already made, last first, so the kernel is as it was
//!    before the change. A change the store then refuses is taken back the
//!    same way ([`Applied::undo`]).
//! 4. A change writes what it touches, computed from the state before it
//!    ([`before`]) and after it: the pairs of its policies' apps; one
//!    endpoint's addresses and veth; NetIn when a local endpoint's mappings
//!    come or go; NetOut when an app with security groups is touched (a
//!    tag may come or go with it). The undo of a write is the entry as the
//!    state before the change wanted it; the kernel is not read back.
//! 5. What cannot be taken back waits until the change is kept
//!    ([`Applied::keep`]): the counters of removed policies are forgotten
//!    only then, and so are the `PORT_SETS` entries of pairs left with two
//!    ranges or fewer (a program may still hold the pair's old count).
//! 6. A policy's counters (`POLICY_STATS`) are made before any pair names
//!    the policy, and forgotten after none does: the programs only add to
//!    counters that are there, so a connection that flushes its count after
//!    its policy went cannot bring the counters back. A full reconcile makes
//!    those of every policy in force and forgets every other (an older
//!    version's leftovers included); with per-policy counting off there are
//!    none.
//! 7. The per-address rate limits (`EVENT_LIMITS`, `REJECT_LIMITS`, see
//!    `policy_common::limits`) belong to addresses, not to the state: the
//!    programs make an entry for any address they limit. The entries of an
//!    endpoint's addresses are forgotten once the change that removed them
//!    is kept (after the `ENDPOINTS` entries, so no later lookup finds the
//!    endpoint), and with them every entry whose window has ended — those
//!    of addresses that are no endpoint (destinations denied by security
//!    groups, senders on other hosts, forged sources) have no other end,
//!    and the programs would start them afresh anyway. A full reconcile
//!    does the same for the endpoints it removes, and sweeps every ended
//!    window (a start after a churn). A packet past its lookup when the
//!    endpoint went may still make an entry after the delete: its window
//!    ends within a second, and the next sweep takes it.

mod apply;
#[cfg(test)]
pub(crate) mod fake;
mod pairs;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub use apply::{Applied, Before, apply, before};
pub use pairs::{AppPair, PairChange, pairs};
use policy_common::{
    limits::address_key,
    maps::{EndpointValue, PairKey},
    ports::Allowance,
};
use tracing::warn;

use crate::{
    DataplaneError,
    netout::TrieKey,
    state::{Endpoint, PortMapping, State},
};

/// The NetOut trie: key → the rules of the longest match.
pub type NetOutTrie = BTreeMap<TrieKey, policy_common::netout::NetOutRules>;

/// What the reconciler needs from the kernel. No method has a default: the
/// in-memory fake implements each, so the reconciler's tests see every map.
pub trait Kernel: Sync {
    /// `ENDPOINTS`: address → tag.
    fn endpoints(&self) -> Result<BTreeMap<Ipv4Addr, EndpointValue>, DataplaneError>;
    fn set_endpoint(&mut self, ip: Ipv4Addr, value: EndpointValue) -> Result<(), DataplaneError>;
    /// Removes the endpoint and every entry naming its address.
    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<(), DataplaneError>;
    /// `ENDPOINTS6`: IPv6 address → tag (dual-stack endpoints).
    fn endpoints6(&self) -> Result<BTreeMap<Ipv6Addr, EndpointValue>, DataplaneError>;
    fn set_endpoint6(&mut self, ip: Ipv6Addr, value: EndpointValue) -> Result<(), DataplaneError>;
    /// Removes the IPv6 endpoint and the veth bindings naming its address.
    fn remove_endpoint6(&mut self, ip: Ipv6Addr) -> Result<(), DataplaneError>;
    /// Binds the attached `ifname` to the endpoint's IPv6 address for the
    /// IPv6 anti-spoofing check (None: the endpoint has none, and sends no
    /// IPv6 but link-local).
    fn bind_veth6(&mut self, ifname: &str, ip: Option<Ipv6Addr>) -> Result<(), DataplaneError>;
    /// `POLICIES` (and `PORT_SETS`): pair → allowances.
    fn pairs(&self) -> Result<BTreeMap<PairKey, Vec<Allowance>>, DataplaneError>;
    /// Replaces a pair's allowances; empty removes the pair.
    fn set_pair(&mut self, key: PairKey, allowances: &[Allowance]) -> Result<(), DataplaneError>;
    /// Writes pairs new to the kernel (`(key, _, allowances)`: the state
    /// had no policy for them before this change, and the kernel has no
    /// entry for a pair the state has none for), all or nothing. One by
    /// one unless the kernel can do better.
    fn add_pairs(&mut self, pairs: &[PairChange]) -> Result<(), DataplaneError> {
        for (i, (key, _, allowances)) in pairs.iter().enumerate() {
            if let Err(e) = self.set_pair(*key, allowances) {
                for (key, _, _) in pairs[..i].iter().rev() {
                    if let Err(undo) = self.set_pair(*key, &[]) {
                        warn!(error = %undo, "taking back a new policy pair failed");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }
    /// Removes pairs that go (`(key, old, _)`: the allowances each held,
    /// put back on error), all or nothing. One by one unless the kernel
    /// can do better.
    fn remove_pairs(&mut self, pairs: &[PairChange]) -> Result<(), DataplaneError> {
        for (i, (key, _, _)) in pairs.iter().enumerate() {
            if let Err(e) = self.set_pair(*key, &[]) {
                for (key, old, _) in pairs[..i].iter().rev() {
                    if let Err(undo) = self.set_pair(*key, old) {
                        warn!(error = %undo, "putting back a removed policy pair failed");
                    }
                }
                return Err(e);
            }
        }
        Ok(())
    }
    /// Deletes the `PORT_SETS` entries of pairs that no longer have more
    /// than two ranges (removed, or left with two or fewer since the last call; `all`:
    /// every such entry, at a start). Called once a change is kept, so no
    /// program is still between its `POLICIES` and `PORT_SETS` lookups of
    /// the pair's old value (rule 5). Best effort: a failure is logged.
    fn forget_port_sets(&mut self, all: bool);
    /// Host-side veths with programs attached.
    fn attached(&self) -> Result<BTreeSet<String>, DataplaneError>;
    /// Whether the interface `ifname` exists (in the agent's namespace).
    fn interface_exists(&self, ifname: &str) -> bool;
    /// Binds `ifname` to the endpoint (anti-spoofing) and attaches to it.
    /// `ip` None: an IPv6-only endpoint, whose veth lets no IPv4 out.
    fn attach(
        &mut self,
        ifname: &str,
        ip: Option<Ipv4Addr>,
        tag: u32,
    ) -> Result<(), DataplaneError>;
    /// Detaches from `ifname` and drops its bindings (both families) and
    /// those of `ip`.
    fn detach(&mut self, ifname: &str, ip: Option<Ipv4Addr>) -> Result<(), DataplaneError>;
    /// Whether the programs count per policy (none need counters if not).
    fn counts_policies(&self) -> bool;
    /// `POLICY_STATS`: the policy ids that have counters.
    fn policy_counters(&self) -> Result<BTreeSet<u32>, DataplaneError>;
    /// Makes zeroed counters for policies that have none: `ids` are new
    /// policies' or ones a read found missing (a counter found there is
    /// zeroed). All or nothing.
    fn add_policy_counters(&mut self, ids: &[u32]) -> Result<(), DataplaneError>;
    /// Forgets the counters of removed policies (ids are never reused).
    fn forget_policies(&mut self, ids: &[u32]);
    /// `EVENT_LIMITS` and `REJECT_LIMITS`: forgets the entries keyed by
    /// `keys` (addresses gone, see `policy_common::limits::address_key`)
    /// and every entry whose window has ended (rule 7). Best effort: a
    /// failure is logged.
    fn forget_limits(&mut self, keys: &BTreeSet<u32>);
    /// NetIn: makes the port mappings exactly `wanted` (container address
    /// and its mapping, for every local endpoint).
    fn set_netin(&mut self, wanted: &[(Ipv4Addr, PortMapping)]) -> Result<(), DataplaneError>;
    /// NetOut: makes the security group trie exactly `wanted`.
    fn set_netout(&mut self, wanted: &NetOutTrie) -> Result<(), DataplaneError>;
}

/// Brings the kernel to `state` without clearing it first (the agent's start).
/// Interfaces that do not exist (a container deleted while the agent was
/// down) are reported, not fatal. Returns those warnings.
pub fn full<K: Kernel>(kernel: &mut K, state: &State) -> Result<Vec<String>, DataplaneError> {
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
) -> Result<Vec<String>, DataplaneError> {
    let Reconciled { warnings, stale_counters, gone_addresses } =
        full_reconcile(kernel, state, held)?;
    if !stale_counters.is_empty() {
        kernel.forget_policies(&stale_counters);
    }
    kernel.forget_limits(&gone_addresses);
    kernel.forget_port_sets(true);
    Ok(warnings)
}

/// What a full reconcile leaves to its caller.
struct Reconciled {
    /// What it could not do (an endpoint's veth is gone).
    warnings: Vec<String>,
    /// Counters of no policy in force, to forget (rule 6): at once at a
    /// start, once kept for a change (rule 5).
    stale_counters: Vec<u32>,
    /// The rate-limit keys of the endpoint addresses it removed, to
    /// forget with every ended window (rule 7), when the counters are.
    gone_addresses: BTreeSet<u32>,
}

/// [`full_keeping`] but for forgetting stale counters and rate limits.
fn full_reconcile<K: Kernel>(
    kernel: &mut K,
    state: &State,
    held: &BTreeMap<IpAddr, Endpoint>,
) -> Result<Reconciled, DataplaneError> {
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
    // What the state wants is worked out beside the kernel's reads (at a
    // million policies each takes a few hundred milliseconds).
    let counting = kernel.counts_policies();
    let (want, have) = std::thread::scope(|s| {
        let want = s.spawn(|| (counted_policies(counting, state), state.pairs()));
        let shared: &K = kernel;
        let counters = s.spawn(|| shared.policy_counters());
        let pairs = shared.pairs();
        let counters = counters.join().expect("reading the policy counters panicked");
        (
            want.join().expect("working out the wanted pairs panicked"),
            counters.and_then(|c| Ok((c, pairs?))),
        )
    });
    let ((want_counters, want_pairs), (have_counters, have_pairs)) = (want, have?);
    // Rule 6: counters before the pairs that name their policies.
    let missing: Vec<u32> = want_counters.difference(&have_counters).copied().collect();
    if !missing.is_empty() {
        kernel.add_policy_counters(&missing)?;
    }
    // Both ordered by key: one walk finds what to write and what to remove.
    let mut have = have_pairs.iter().peekable();
    let (mut fresh, mut gone): (Vec<PairChange>, Vec<PairChange>) = (Vec::new(), Vec::new());
    let going = |(k, v): (&PairKey, &Vec<Allowance>)| (*k, v.clone(), Vec::new());
    for (key, allowances) in &want_pairs {
        while let Some(entry) = have.next_if(|(k, _)| *k < key) {
            gone.push(going(entry));
        }
        match have.next_if(|(k, _)| *k == key).map(|(_, v)| v) {
            None => fresh.push((*key, Vec::new(), allowances.clone())),
            Some(current) if !pairs::same_allowances(Some(current), allowances) => {
                kernel.set_pair(*key, allowances)?;
            }
            Some(_) => {}
        }
    }
    gone.extend(have.map(going));
    kernel.add_pairs(&fresh)?;
    // A million pairs take a while to free: not on the way to serving.
    std::thread::spawn(move || {
        drop((want_pairs, have_pairs));
        // SAFETY: malloc_trim only releases memory malloc holds and no one uses.
        unsafe { libc::malloc_trim(0) };
    });
    // Removes.
    kernel.remove_pairs(&gone)?;
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
    let mut gone_addresses = BTreeSet::new();
    for ip in have_endpoints.keys().filter(|ip| !want_endpoints.contains_key(ip)) {
        if !kept4.contains(ip) {
            kernel.remove_endpoint(*ip)?;
            gone_addresses.insert(address_key(IpAddr::V4(*ip)));
        }
    }
    for ip in
        have_endpoints6.keys().filter(|ip| !want_endpoints6.contains_key(ip) && !kept6.contains(ip))
    {
        kernel.remove_endpoint6(*ip)?;
        gone_addresses.insert(address_key(IpAddr::V6(*ip)));
    }
    netin(kernel, state)?;
    netout(kernel, state)?;
    let stale_counters = have_counters.difference(&want_counters).copied().collect();
    Ok(Reconciled { warnings, stale_counters, gone_addresses })
}

/// The policies that need counters: every one in force, if the programs
/// count per policy.
fn counted_policies(counting: bool, state: &State) -> BTreeSet<u32> {
    match counting {
        true => state.policy_ids().collect(),
        false => BTreeSet::new(),
    }
}

/// NetOut: the kernel's security group trie made the state's (apps with
/// security groups and a tag).
fn netout<K: Kernel>(kernel: &mut K, state: &State) -> Result<(), DataplaneError> {
    kernel.set_netout(&crate::netout::trie(state))
}

/// NetIn: the kernel's port mappings made those of the local endpoints.
pub fn netin<K: Kernel>(kernel: &mut K, state: &State) -> Result<(), DataplaneError> {
    kernel.set_netin(&netin_wanted(state))
}

/// The port mappings of the local endpoints (NetIn), as the kernel takes
/// them.
pub(super) fn netin_wanted(state: &State) -> Vec<(Ipv4Addr, PortMapping)> {
    state
        .local_endpoints()
        .filter_map(|e| Some((e.ipv4()?, &e.port_mappings)))
        .flat_map(|(ip, mappings)| mappings.iter().map(move |m| (ip, *m)))
        .collect()
}
