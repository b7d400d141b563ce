//! Desired state: apps and their tags, policies, endpoints, routes. Pure
//! data and rules; no kernel, no I/O. The agent changes it only through
//! the methods here, which validate first (see `validate`) and change
//! nothing on error.
//!
//! - `model`: the parts (policies, endpoints, protocols, TLS ports);
//! - `validate`: every check on input, made before any change;
//! - `undo`: changes made in place with a record that takes them back;
//! - `stored`: the on-disk shape.

mod model;
mod policy_set;
mod server;
mod stored;
mod undo;
mod validate;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub use model::{
    AddressRange, AppName, Endpoint, INTERNAL_DOMAIN, IcmpMatch, IcmpTypes, NetOutProtocol,
    NetOutRule, Policy, PortMapping, PortSpan, Protocol, TlsFront, TlsPorts, tag_text,
};
pub use policy_api::MAX_ID_LEN;
use policy_common::{
    maps::{EndpointValue, PairKey, endpoint_flags},
    ports::Allowance,
};
use policy_set::{PolicySet, Ports};
use serde::{Deserialize, Serialize};
pub use server::{LOCAL_TAG_BASE, ServerPolicies};
use stored::Stored;
pub use stored::StoredRef;
pub use undo::Undo;
pub use validate::{
    Invalid, check_app_id, check_domain, check_endpoint, check_endpoint_ipv4, check_endpoint_ipv6,
    check_hostname, check_icmp_types, check_ifname, check_ports, parse_port_range, parse_protocol,
    parse_transport,
};
pub use validate::{check_veth_exists, missing_veth};

/// The whole desired state, as stored on disk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "Stored", into = "Stored")]
pub struct State {
    next_tag: u32,
    next_policy_id: u32,
    tags: BTreeMap<String, u32>,
    /// Found by app pair and protocol (see `policy_set`).
    policies: PolicySet,
    /// By key: the IPv4 address, or the IPv6 one of an IPv6-only endpoint.
    endpoints: BTreeMap<IpAddr, Endpoint>,
    /// Internal routes: hostname (under [`INTERNAL_DOMAIN`]) → app.
    routes: BTreeMap<String, String>,
    /// NetOut: each app's security group rules (an app absent: egress out
    /// of the overlay unchecked; present with no rules: all denied).
    netout: BTreeMap<String, Vec<NetOutRule>>,
    /// Platform TLS: which TLS port fronts which app port (configuration,
    /// not stored).
    tls_ports: Option<TlsPorts>,
    /// This agent's host in cluster mode (configuration, not stored): its
    /// endpoints are the local ones.
    local_host: Option<String>,
    /// The policy server's tags (`[cf]`): app → tag, for the apps its
    /// policies name (see `server`). Empty without a policy server.
    server_tags: BTreeMap<String, u32>,
    /// How many policy ends and endpoints name each app (derived, not
    /// stored): an app whose count drops to zero loses its tag. Its keys
    /// are the interned names (see [`Self::intern`]).
    refs: HashMap<AppName, usize, foldhash::fast::RandomState>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            next_tag: 1,
            next_policy_id: 1,
            tags: BTreeMap::new(),
            policies: PolicySet::default(),
            endpoints: BTreeMap::new(),
            routes: BTreeMap::new(),
            netout: BTreeMap::new(),
            server_tags: BTreeMap::new(),
            tls_ports: None,
            local_host: None,
            refs: HashMap::default(),
        }
    }
}

impl State {
    pub fn tags(&self) -> &BTreeMap<String, u32> {
        &self.tags
    }

    pub fn tag(&self, app: &str) -> Option<u32> {
        self.tags.get(app).copied()
    }

    /// Every policy with its id, in order (source, destination, protocol,
    /// ports).
    pub fn policies(&self) -> impl Iterator<Item = (Policy, u32)> + use<'_> {
        self.policies.sorted().map(|r| (r.to_policy(), r.ports.id))
    }

    /// The policies from `source` to `destination` (every protocol), in
    /// order: a probe per protocol, not a walk of every policy.
    pub fn policies_between(&self, source: &str, destination: &str) -> Vec<(Policy, u32)> {
        let protocols = [Protocol::Tcp, Protocol::Udp, Protocol::Icmp, Protocol::Icmpv6];
        let mut found: Vec<(Policy, u32)> = protocols
            .into_iter()
            .flat_map(|protocol| {
                self.policies.pair(source, destination, protocol).iter().map(move |ports| {
                    let policy = Policy {
                        source: source.into(),
                        destination: destination.into(),
                        protocol,
                        start: ports.start,
                        end: ports.end,
                        tls_only: ports.tls_only,
                    };
                    (policy, ports.id)
                })
            })
            .collect();
        found.sort();
        found
    }

    /// The policy with id `id` (a walk, without ordering them).
    pub fn policy_by_id(&self, id: u32) -> Option<Policy> {
        self.policies.iter().find(|r| r.ports.id == id).map(|r| r.to_policy())
    }

    /// Every policy's id, in no particular order.
    pub fn policy_ids(&self) -> impl Iterator<Item = u32> + use<'_> {
        self.policies.iter().map(|r| r.ports.id)
    }

    pub fn policy_id(&self, policy: &Policy) -> Option<u32> {
        self.policies.get(policy)
    }

    pub fn policy_count(&self) -> usize {
        self.policies.len()
    }

    /// The id the next new policy gets: ids only grow, so the policies a
    /// change adds are those with an id from this one on.
    pub fn next_policy_id(&self) -> u32 {
        self.next_policy_id
    }

    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }

    /// The endpoints on this agent's host (all of them on a single host).
    pub fn local_endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values().filter(|e| e.runs_on(self.local_host.as_deref()))
    }

    /// This agent's host in cluster mode.
    pub fn local_host(&self) -> Option<&str> {
        self.local_host.as_deref()
    }

    /// Replaces the stored part of the state with `other`'s, keeping this
    /// agent's configuration (TLS ports, host).
    /// The security groups of every app.
    pub fn netout(&self) -> &BTreeMap<String, Vec<NetOutRule>> {
        &self.netout
    }

    /// Sets (Some) or removes (None) an app's security group rules.
    pub fn set_netout(&mut self, app: &str, rules: Option<Vec<NetOutRule>>) {
        match rules {
            Some(rules) => self.netout.insert(app.to_owned(), rules),
            None => self.netout.remove(app),
        };
    }

    pub fn reset_to(&mut self, other: &State) {
        let (tls_ports, local_host) = (self.tls_ports.take(), self.local_host.take());
        *self = other.clone();
        self.tls_ports = tls_ports;
        self.local_host = local_host;
    }

    /// Sets this agent's host (cluster mode). Not stored: the agent sets
    /// it from its configuration.
    pub fn set_local_host(&mut self, host: Option<String>) {
        self.local_host = host;
    }

    /// The endpoint whose key (see [`Endpoint::ip`]) is `ip`.
    pub fn endpoint(&self, ip: impl Into<IpAddr>) -> Option<&Endpoint> {
        self.endpoints.get(&ip.into())
    }

    /// Gives every app in `apps` that has none a tag, in id order (as Cloud
    /// Foundry's policy server does within one request): the policy
    /// server's, if it names the app, else the next of the agent's own.
    fn allocate_tags<'a>(&mut self, apps: impl IntoIterator<Item = &'a str>) {
        let new: BTreeSet<&str> =
            apps.into_iter().filter(|a| !self.tags.contains_key(*a)).collect();
        for app in new {
            let tag = match self.server_tags.get(app) {
                Some(&tag) => tag,
                None => {
                    self.next_tag += 1;
                    self.next_tag - 1
                }
            };
            self.tags.insert(app.to_owned(), tag);
        }
    }

    /// The state's own copy of `app`'s name if some policy or endpoint
    /// already names it (so they share one allocation), else `app`.
    fn intern(&self, app: &AppName) -> AppName {
        match self.refs.get_key_value(app.as_str()) {
            Some((name, _)) => name.clone(),
            None => app.clone(),
        }
    }

    /// `p` with its app names interned.
    fn interned(&self, p: &Policy) -> Policy {
        Policy {
            source: self.intern(&p.source),
            destination: self.intern(&p.destination),
            ..p.clone()
        }
    }

    /// [`Self::intern`] and [`Self::reference`] in one lookup.
    fn intern_referenced(&mut self, app: &AppName) -> AppName {
        match self.refs.entry(app.clone()) {
            std::collections::hash_map::Entry::Occupied(mut held) => {
                *held.get_mut() += 1;
                held.key().clone()
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                let name = slot.key().clone();
                slot.insert(1);
                name
            }
        }
    }

    fn reference(&mut self, app: &AppName) {
        match self.refs.get_mut(app.as_str()) {
            Some(n) => *n += 1,
            None => {
                self.refs.insert(app.clone(), 1);
            }
        }
    }

    /// Drops one reference to `app`; with none left it loses its tag. Tags
    /// are never handed out again (`next_tag` only grows), so a forgotten tag
    /// cannot be confused with a new app's.
    fn unreference(&mut self, app: &str) {
        if let Some(n) = self.refs.get_mut(app) {
            *n -= 1;
            if *n == 0 {
                self.refs.remove(app);
                self.tags.remove(app);
            }
        }
    }

    /// Adds policies (existing ones are not an error). `limit` caps the
    /// policies of one source app. All or nothing.
    pub fn add_policies(
        &mut self,
        policies: &[Policy],
        limit: Option<usize>,
    ) -> Result<(), Invalid> {
        self.check_add(policies, limit)?;
        self.insert_policies(policies);
        Ok(())
    }

    /// Adds policies without the checks of [`Self::add_policies`]: for
    /// replaying changes that were checked when they were accepted.
    pub fn insert_policies(&mut self, policies: &[Policy]) {
        self.insert_new_policies(policies, |_| {});
    }

    /// [`Self::insert_policies`], calling `added` with each policy it adds
    /// (those not in force yet, once each).
    pub(super) fn insert_new_policies(
        &mut self,
        policies: &[Policy],
        mut added: impl FnMut(&Policy),
    ) {
        self.allocate_tags(
            policies.iter().flat_map(|p| [p.source.as_str(), p.destination.as_str()]),
        );
        for p in policies {
            let p = self.interned(p);
            if !self.policies.insert(&p, self.next_policy_id) {
                continue;
            }
            added(&p);
            self.next_policy_id += 1;
            self.reference(&p.source);
            self.reference(&p.destination);
        }
    }

    /// Removes policies (missing ones are not an error).
    pub fn remove_policies(&mut self, policies: &[Policy]) {
        for p in policies {
            if self.policies.remove(p).is_some() {
                self.unreference(&p.source);
                self.unreference(&p.destination);
            }
        }
    }

    /// Adds or replaces the endpoint at `endpoint.ip`. Returns the endpoint
    /// it replaced.
    pub fn add_endpoint(&mut self, mut endpoint: Endpoint) -> Option<Endpoint> {
        endpoint.app = self.intern(&endpoint.app);
        self.allocate_tags([endpoint.app.as_str()]);
        self.reference(&endpoint.app);
        let old = self.endpoints.insert(endpoint.ip, endpoint);
        if let Some(old) = &old {
            self.unreference(&old.app);
        }
        old
    }

    pub fn remove_endpoint(&mut self, ip: IpAddr) -> Option<Endpoint> {
        let old = self.endpoints.remove(&ip);
        if let Some(old) = &old {
            self.unreference(&old.app);
        }
        old
    }

    /// Declares that TLS port `tls` fronts app port `app_port` on every
    /// instance (the agent's platform TLS); None: no TLS. Not stored: the
    /// agent sets it from its configuration.
    pub fn set_tls_ports(&mut self, ports: Option<TlsPorts>) {
        self.tls_ports = ports;
    }

    /// The TLS front of `app`'s instances (None: platform TLS is off).
    pub fn tls_front(&self, app: &str) -> Option<TlsFront> {
        self.tls_ports.as_ref().map(|t| TlsFront {
            app_port: t.per_app.get(app).copied().unwrap_or(t.default.app_port),
            tls_port: t.default.tls_port,
        })
    }

    /// The port ranges one policy allows: its own ports (unless TLS-only),
    /// and the TLS port fronting the app port if the policy covers it.
    pub(crate) fn allowances_of(
        &self,
        p: &Policy,
        policy_id: u32,
    ) -> impl Iterator<Item = Allowance> + use<> {
        let ports = Ports { start: p.start, end: p.end, tls_only: p.tls_only, id: policy_id };
        self.allowances_of_ports(&p.destination, p.protocol, ports)
    }

    /// [`Self::allowances_of`] a policy as the set holds it.
    pub(super) fn allowances_of_ports(
        &self,
        destination: &str,
        protocol: Protocol,
        p: Ports,
    ) -> impl Iterator<Item = Allowance> + use<> {
        let policy_id = p.id;
        let own = (!p.tls_only).then_some(Allowance { start: p.start, end: p.end, policy_id });
        let tls = self
            .tls_front(destination)
            .filter(|f| protocol == Protocol::Tcp && p.start <= f.app_port && f.app_port <= p.end)
            .map(|front| Allowance { start: front.tls_port, end: front.tls_port, policy_id });
        own.into_iter().chain(tls)
    }

    /// What `POLICIES` must hold: the allowances of every app pair.
    pub fn pairs(&self) -> BTreeMap<PairKey, Vec<Allowance>> {
        // Each app's tag looked up once, by its number in the set.
        let tags: Vec<Option<u32>> =
            self.policies.names().iter().map(|name| self.tag(name)).collect();
        let mut all: Vec<(PairKey, Allowance)> = Vec::with_capacity(self.policies.len());
        for (source, destination, r) in self.policies.iter_numbered() {
            let (Some(src), Some(dst)) = (tags[source as usize], tags[destination as usize]) else {
                continue; // unreachable: policies always have tags
            };
            let key = PairKey::new(src, dst, r.protocol.number());
            all.extend(
                self.allowances_of_ports(r.destination, r.protocol, r.ports).map(|a| (key, a)),
            );
        }
        all.sort_by_key(|(key, _)| *key);
        let mut pairs: Vec<(PairKey, Vec<Allowance>)> = Vec::new();
        for (key, a) in all {
            match pairs.last_mut() {
                Some((k, allowances)) if *k == key => allowances.push(a),
                _ => pairs.push((key, vec![a])),
            }
        }
        pairs.into_iter().collect()
    }

    /// The allowances of one app pair and protocol (one hash probe).
    pub fn pair_allowances(
        &self,
        source: &AppName,
        destination: &AppName,
        protocol: Protocol,
    ) -> Vec<Allowance> {
        self.policies
            .pair(source, destination, protocol)
            .iter()
            .flat_map(|&ports| self.allowances_of_ports(destination, protocol, ports))
            .collect()
    }

    /// Whether a policy lets `source` reach `port` of `destination`'s
    /// instances (the policy's own ports or the TLS port fronting them).
    pub fn allows(&self, source: &str, destination: &str, protocol: Protocol, port: u16) -> bool {
        self.pair_allowances(&source.into(), &destination.into(), protocol)
            .iter()
            .any(|a| a.start <= port && port <= a.end)
    }

    /// Maps `hostname.apps.internal` to `app`. A hostname belongs to one
    /// app at a time; mapping it again to the same app is not an error.
    pub fn map_route(&mut self, app: &str, hostname: &str) -> Result<(), Invalid> {
        match self.routes.get(hostname) {
            Some(owner) if owner != app => Err(Invalid::new(
                "hostname",
                format!("{hostname}.{INTERNAL_DOMAIN} is mapped to app {owner}; unmap it first"),
            )),
            _ => {
                self.routes.insert(hostname.to_owned(), app.to_owned());
                Ok(())
            }
        }
    }

    /// Unmaps a route; a route that is not mapped is not an error, one
    /// mapped to another app is.
    pub fn unmap_route(&mut self, app: &str, hostname: &str) -> Result<(), Invalid> {
        match self.routes.get(hostname) {
            Some(owner) if owner != app => Err(Invalid::new(
                "hostname",
                format!("{hostname}.{INTERNAL_DOMAIN} is mapped to app {owner}, not {app}"),
            )),
            Some(_) => {
                self.routes.remove(hostname);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// hostname → app.
    pub fn routes(&self) -> &BTreeMap<String, String> {
        &self.routes
    }

    /// The addresses of the instances of the app `hostname` names, or None
    /// if no app has that route.
    pub fn resolve(&self, hostname: &str) -> Option<Vec<IpAddr>> {
        let app = self.routes.get(hostname)?;
        Some(
            self.endpoints
                .values()
                .filter(|e| &e.app == app)
                .flat_map(Endpoint::addresses)
                .collect(),
        )
    }

    /// What `ENDPOINTS` must hold: address → app tag, and whether the
    /// endpoint runs on another host.
    pub fn endpoint_values(&self) -> BTreeMap<Ipv4Addr, EndpointValue> {
        self.endpoints.values().filter_map(|e| Some((e.ipv4()?, self.endpoint_value(e)?))).collect()
    }

    /// `ENDPOINTS6` as the state wants it: IPv6 address → the same value as
    /// the endpoint's IPv4 address (if it has one).
    pub fn endpoint6_values(&self) -> BTreeMap<Ipv6Addr, EndpointValue> {
        self.endpoints.values().filter_map(|e| Some((e.ipv6?, self.endpoint_value(e)?))).collect()
    }

    /// The endpoint with IPv6 address `addr`, if any.
    pub fn endpoint_by_ipv6(&self, addr: Ipv6Addr) -> Option<&Endpoint> {
        self.endpoints.values().find(|e| e.ipv6 == Some(addr))
    }

    /// The endpoint with this address, of either family.
    pub fn endpoint_at(&self, addr: IpAddr) -> Option<&Endpoint> {
        match addr {
            IpAddr::V4(_) => self.endpoint(addr),
            IpAddr::V6(v6) => self.endpoint(addr).or_else(|| self.endpoint_by_ipv6(v6)),
        }
    }

    /// One endpoint's `ENDPOINTS` value (None: its app has no tag yet).
    pub fn endpoint_value(&self, e: &Endpoint) -> Option<EndpointValue> {
        let remote = !e.runs_on(self.local_host.as_deref());
        let flags = if remote { endpoint_flags::REMOTE } else { 0 };
        Some(EndpointValue { tag: self.tag(&e.app)?, flags })
    }

    /// Policies per source app (for the per-source limit and status).
    pub fn policies_of(&self, source: &str) -> usize {
        self.policies.of_source(source)
    }
}

#[cfg(test)]
mod tests;
