//! One change into the kernel, and its undo: the only place that turns a
//! [`Change`] into kernel steps (see the rules in `reconcile`).
//!
//! The agent's own write: validate → [`before`] → change the state
//! (undoable) → [`apply`] → commit to the store → [`Applied::keep`], or,
//! the commit failing, [`Applied::undo`] and the state's undo. A change
//! followed from the cluster: [`before`] → replay → [`apply`] →
//! [`Applied::keep`].

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use policy_common::{limits::address_key, maps::EndpointValue};
use tracing::warn;

use super::{
    Kernel, NetOutTrie, PairChange, Reconciled, full_reconcile, netin_wanted,
    pairs::{PairsBefore, before_change, touched, touched_pairs, undo_pairs},
};
use crate::{
    DataplaneError,
    state::{Endpoint, PortMapping, State},
    store::Change,
};

/// What a change's kernel steps need from the state before it: read before
/// the state changes, handed to [`apply`] after.
#[derive(Debug)]
#[must_use]
pub struct Before {
    step: Step,
    /// NetIn as it was, when the change alters a local endpoint's mappings.
    netin: Option<Vec<(Ipv4Addr, PortMapping)>>,
    /// The NetOut trie as it was, when the change touches an app with
    /// security groups.
    netout: Option<NetOutTrie>,
}

#[derive(Debug)]
enum Step {
    /// Policies added or removed: the pairs they touch, the first id the
    /// change can hand out (the policies it adds get ids from there on,
    /// and counters before the pairs are written), and the ids of the
    /// removed ones (whose counters go once the change is kept).
    Pairs { before: PairsBefore, first_new_id: u32, removed: Vec<u32> },
    /// The endpoint at `ip` added, replaced or removed: as it was.
    Endpoint { ip: IpAddr, old: Option<(Endpoint, EndpointValue)> },
    /// No entry but NetIn or NetOut (security groups), or none at all
    /// (routes are names: DNS and certificates, not the kernel).
    Tables,
    /// The state replaced whole, or apps given other tags: the full
    /// reconcile (the counters it finds stale go once the change is kept).
    Full,
}

/// Reads what `change`'s kernel steps need, before `state` changes.
pub fn before(state: &State, change: &Change) -> Before {
    let netout = state.netout();
    let first_new_id = state.next_policy_id();
    let (step, netin_changes, touches_netout) = match change {
        Change::AddPolicies(policies) | Change::RemovePolicies(policies) => {
            let removed = match change {
                Change::RemovePolicies(_) => {
                    policies.iter().filter_map(|p| state.policy_id(p)).collect()
                }
                _ => Vec::new(),
            };
            let mut apps = policies.iter().flat_map(|p| [&p.source, &p.destination]);
            let touches_netout = apps.any(|a| netout.contains_key(a.as_str()));
            let before = before_change(state, touched(policies));
            (Step::Pairs { before, first_new_id, removed }, false, touches_netout)
        }
        Change::AddEndpoint(endpoint) => endpoint_before(state, endpoint.ip, Some(endpoint)),
        Change::RemoveEndpoint(ip) => endpoint_before(state, *ip, None),
        Change::SetNetOut { .. } => (Step::Tables, false, true),
        Change::MapRoute { .. } | Change::UnmapRoute { .. } => (Step::Tables, false, false),
        Change::PolicyServer(change) => {
            if state.retags(change) {
                (Step::Full, false, false)
            } else {
                let removed = change.remove.iter().filter_map(|p| state.policy_id(p)).collect();
                let policies: Vec<_> = change.add.iter().chain(&change.remove).cloned().collect();
                let touches_netout = policies.iter().any(|p| {
                    [&p.source, &p.destination].iter().any(|a| netout.contains_key(a.as_str()))
                });
                let before = before_change(state, touched(&policies));
                (Step::Pairs { before, first_new_id, removed }, false, touches_netout)
            }
        }
        Change::Reset(_) => (Step::Full, false, false),
    };
    Before {
        step,
        netin: netin_changes.then(|| netin_wanted(state)),
        netout: touches_netout.then(|| crate::netout::trie(state)),
    }
}

/// The endpoint at `ip` as it is, whether replacing it with `new` (None: a
/// removal) changes NetIn, and whether it touches an app with security
/// groups.
fn endpoint_before(state: &State, ip: IpAddr, new: Option<&Endpoint>) -> (Step, bool, bool) {
    let old = state.endpoint(ip).and_then(|e| Some((e.clone(), state.endpoint_value(e)?)));
    let old_endpoint = old.as_ref().map(|(e, _)| e);
    let netin_of = |e: Option<&Endpoint>| {
        e.filter(|e| e.runs_on(state.local_host()) && !e.port_mappings.is_empty())
            .map(|e| (e.ipv4(), e.port_mappings.clone()))
    };
    let netin_changes = netin_of(old_endpoint) != netin_of(new);
    let touches_netout =
        old_endpoint.into_iter().chain(new).any(|e| state.netout().contains_key(e.app.as_str()));
    (Step::Endpoint { ip, old }, netin_changes, touches_netout)
}

/// A change written to the kernel: the undo of each write, in order.
#[derive(Debug, Default)]
#[must_use]
pub struct Applied {
    undo: Vec<Write>,
    /// Removed policies whose counters go when the change is kept.
    forget: Vec<u32>,
    /// The change removed endpoint addresses: the rate-limit keys whose
    /// entries go, with every ended window, when it is kept (rule 7).
    forget_limits: Option<BTreeSet<u32>>,
    /// What a full reconcile could not do (an endpoint's veth is gone).
    pub warnings: Vec<String>,
}

/// One write that puts back what [`apply`] changed.
#[derive(Debug)]
enum Write {
    Pairs(Vec<PairChange>),
    /// `ENDPOINTS`: this value again, or no entry.
    Endpoint(Ipv4Addr, Option<EndpointValue>),
    /// `ENDPOINTS6`: this value again, or no entry.
    Endpoint6(Ipv6Addr, Option<EndpointValue>),
    /// A veth as it was: attached and bound to an endpoint, or not at all.
    Veth {
        ifname: String,
        was: Option<Box<(Endpoint, EndpointValue)>>,
    },
    Netin(Vec<(Ipv4Addr, PortMapping)>),
    Netout(NetOutTrie),
    /// `POLICY_STATS`: no counters for these policies.
    Counters(Vec<u32>),
}

impl Write {
    fn run<K: Kernel>(self, kernel: &mut K) -> Result<(), DataplaneError> {
        match self {
            Write::Pairs(written) => {
                undo_pairs(kernel, written);
                Ok(())
            }
            Write::Endpoint(ip, Some(value)) => kernel.set_endpoint(ip, value),
            Write::Endpoint(ip, None) => kernel.remove_endpoint(ip),
            Write::Endpoint6(ip, Some(value)) => kernel.set_endpoint6(ip, value),
            Write::Endpoint6(ip, None) => kernel.remove_endpoint6(ip),
            Write::Veth { ifname, was: Some(was) } => attach(kernel, &ifname, &was.0, was.1),
            Write::Veth { ifname, was: None } => kernel.detach(&ifname, None),
            Write::Netin(wanted) => kernel.set_netin(&wanted),
            Write::Netout(wanted) => kernel.set_netout(&wanted),
            Write::Counters(ids) => {
                kernel.forget_policies(&ids);
                Ok(())
            }
        }
    }
}

impl Applied {
    /// The change is committed: what waited for that is done (removed
    /// policies' counters and removed addresses' rate limits are
    /// forgotten).
    pub fn keep<K: Kernel>(self, kernel: &mut K) {
        if !self.forget.is_empty() {
            kernel.forget_policies(&self.forget);
        }
        if let Some(keys) = &self.forget_limits {
            kernel.forget_limits(keys);
        }
        kernel.forget_port_sets(false);
    }

    /// Takes the change back out of the kernel, last write first (best
    /// effort: a failure is logged, and the next start reconciles).
    pub fn undo<K: Kernel>(self, kernel: &mut K) {
        for write in self.undo.into_iter().rev() {
            if let Err(e) = write.run(kernel) {
                warn!(error = %e, "taking a change back out of the kernel failed");
            }
        }
    }
}

/// Writes the change `state` now holds (`before` was read before it) to the
/// kernel, adds before removes. On error the writes already made are taken
/// back and the kernel is as it was. `held`: endpoints a full reconcile
/// leaves as they are (see `agent::returning`).
pub fn apply<K: Kernel>(
    kernel: &mut K,
    state: &State,
    before: Before,
    held: &BTreeMap<IpAddr, Endpoint>,
) -> Result<Applied, DataplaneError> {
    let mut applied = Applied::default();
    match steps(kernel, state, before, held, &mut applied) {
        Ok(()) => Ok(applied),
        Err(e) => {
            applied.undo(kernel);
            Err(e)
        }
    }
}

fn steps<K: Kernel>(
    kernel: &mut K,
    state: &State,
    before: Before,
    held: &BTreeMap<IpAddr, Endpoint>,
    applied: &mut Applied,
) -> Result<(), DataplaneError> {
    // Rule 1: the new endpoint's entries, then the whole-table writes
    // (NetIn, NetOut), then what the old endpoint leaves behind.
    let mut removes = None;
    match before.step {
        Step::Pairs { before, first_new_id, removed } => {
            // Rule 6: the new policies' counters before their pairs. Ids
            // are handed out in order, so the change's new policies are
            // those with an id from `first_new_id` on.
            let new: Vec<u32> = (first_new_id..state.next_policy_id()).collect();
            if !new.is_empty() && kernel.counts_policies() {
                // Before the write: a failed write may have made some.
                applied.undo.push(Write::Counters(new.clone()));
                kernel.add_policy_counters(&new)?;
            }
            applied.undo.push(Write::Pairs(touched_pairs(kernel, state, &before)?));
            applied.forget = removed;
        }
        Step::Endpoint { ip, old } => {
            let new = state.endpoint(ip).and_then(|e| Some((e.clone(), state.endpoint_value(e)?)));
            add_endpoint(kernel, state, old.as_ref(), new.as_ref(), applied)?;
            removes = Some((old, new));
        }
        Step::Tables => {}
        Step::Full => {
            // Make-before-break over the whole state; there is no state
            // before it to go back to, so nothing to undo.
            let Reconciled { warnings, stale_counters, gone_addresses } =
                full_reconcile(kernel, state, held)?;
            applied.warnings = warnings;
            applied.forget = stale_counters;
            applied.forget_limits = Some(gone_addresses);
        }
    }
    if let Some(old) = before.netin {
        applied.undo.push(Write::Netin(old));
        kernel.set_netin(&netin_wanted(state))?;
    }
    if let Some(old) = before.netout {
        let new = crate::netout::trie(state);
        if new != old {
            applied.undo.push(Write::Netout(old));
            kernel.set_netout(&new)?;
        }
    }
    if let Some((old, new)) = removes {
        remove_endpoint(kernel, state, old, new.as_ref().map(|(e, _)| e), applied)?;
    }
    Ok(())
}

/// Attaches to `ifname` as `endpoint`'s veth, bound to its addresses.
fn attach<K: Kernel>(
    kernel: &mut K,
    ifname: &str,
    endpoint: &Endpoint,
    value: EndpointValue,
) -> Result<(), DataplaneError> {
    kernel.attach(ifname, endpoint.ipv4(), value.tag)?;
    kernel.bind_veth6(ifname, endpoint.ipv6)
}

/// The adds of an endpoint change: the new endpoint's veth (on this host)
/// and its addresses.
fn add_endpoint<K: Kernel>(
    kernel: &mut K,
    state: &State,
    old: Option<&(Endpoint, EndpointValue)>,
    new: Option<&(Endpoint, EndpointValue)>,
    applied: &mut Applied,
) -> Result<(), DataplaneError> {
    let Some((endpoint, value)) = new else { return Ok(()) };
    let local = state.local_host();
    if endpoint.runs_on(local) {
        // The veth as it was: the old endpoint's, if it is the same one.
        let was = old
            .filter(|(o, _)| o.runs_on(local) && o.ifname == endpoint.ifname)
            .cloned()
            .map(Box::new);
        // Before the attach: a failed attach may have bound the veth.
        applied.undo.push(Write::Veth { ifname: endpoint.ifname.clone(), was });
        attach(kernel, &endpoint.ifname, endpoint, *value)?;
    }
    let old_value = |same: bool| old.filter(|_| same).map(|(_, v)| *v);
    if let Some(ip) = endpoint.ipv4() {
        let was = old_value(old.is_some_and(|(o, _)| o.ipv4() == Some(ip)));
        kernel.set_endpoint(ip, *value)?;
        applied.undo.push(Write::Endpoint(ip, was));
    }
    if let Some(ip) = endpoint.ipv6 {
        let was = old_value(old.is_some_and(|(o, _)| o.ipv6 == Some(ip)));
        kernel.set_endpoint6(ip, *value)?;
        applied.undo.push(Write::Endpoint6(ip, was));
    }
    Ok(())
}

/// The removes of an endpoint change: the old endpoint's IPv6 address if
/// the new one has another (or none), its veth if it is no longer one of
/// this host's endpoints' (gone, moved to another veth or host), and its
/// IPv4 entry if it is gone.
fn remove_endpoint<K: Kernel>(
    kernel: &mut K,
    state: &State,
    old: Option<(Endpoint, EndpointValue)>,
    new: Option<&Endpoint>,
    applied: &mut Applied,
) -> Result<(), DataplaneError> {
    let Some((endpoint, value)) = old else { return Ok(()) };
    let mut gone = BTreeSet::new();
    if let Some(ip) = endpoint.ipv6.filter(|a| new.and_then(|n| n.ipv6) != Some(*a)) {
        kernel.remove_endpoint6(ip)?;
        applied.undo.push(Write::Endpoint6(ip, Some(value)));
        gone.insert(address_key(IpAddr::V6(ip)));
    }
    let local = state.local_host();
    let kept_veth = new.is_some_and(|n| n.runs_on(local) && n.ifname == endpoint.ifname);
    if endpoint.runs_on(local) && !kept_veth {
        // The address's bindings go only with the endpoint: a moved one
        // keeps its address, bound to its new veth.
        let ip = if new.is_none() { endpoint.ipv4() } else { None };
        applied.undo.push(Write::Veth {
            ifname: endpoint.ifname.clone(),
            was: Some(Box::new((endpoint.clone(), value))),
        });
        kernel.detach(&endpoint.ifname, ip)?;
    }
    if new.is_none()
        && let Some(ip) = endpoint.ipv4()
    {
        kernel.remove_endpoint(ip)?;
        applied.undo.push(Write::Endpoint(ip, Some(value)));
        gone.insert(address_key(IpAddr::V4(ip)));
    }
    if !gone.is_empty() {
        applied.forget_limits = Some(gone);
    }
    Ok(())
}
