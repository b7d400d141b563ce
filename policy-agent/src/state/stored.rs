//! The state's on-disk shape (JSON): lists instead of maps keyed by
//! structs, and a borrowed view that serializes the same without a copy.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use super::{AppName, Endpoint, NetOutRule, Policy, PolicySet, Protocol, State};

/// The on-disk shape, borrowed from a state: serializes exactly like
/// [`State`] (through `Stored`) without copying it, for snapshots of
/// large states.
#[derive(Serialize)]
pub struct StoredRef<'a> {
    version: u32,
    next_tag: u32,
    next_policy_id: u32,
    tags: &'a BTreeMap<String, u32>,
    #[serde(serialize_with = "policies_as_list")]
    policies: &'a PolicySet,
    #[serde(serialize_with = "endpoints_as_list")]
    endpoints: &'a BTreeMap<IpAddr, Endpoint>,
    routes: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    asgs: &'a BTreeMap<String, Vec<NetOutRule>>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    server_tags: &'a BTreeMap<String, u32>,
}

fn policies_as_list<S: serde::Serializer>(policies: &&PolicySet, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Item<'a> {
        id: u32,
        source: &'a AppName,
        destination: &'a AppName,
        protocol: Protocol,
        start: u16,
        end: u16,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        tls_only: bool,
    }
    // In order, as the snapshots have always been written.
    s.collect_seq(policies.sorted().map(|r| Item {
        id: r.ports.id,
        source: r.source,
        destination: r.destination,
        protocol: r.protocol,
        start: r.ports.start,
        end: r.ports.end,
        tls_only: r.ports.tls_only,
    }))
}

fn endpoints_as_list<S: serde::Serializer>(
    endpoints: &&BTreeMap<IpAddr, Endpoint>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(endpoints.values())
}

impl State {
    /// The state in its stored shape, borrowed.
    pub fn stored(&self) -> StoredRef<'_> {
        StoredRef {
            version: 1,
            next_tag: self.next_tag,
            next_policy_id: self.next_policy_id,
            tags: &self.tags,
            policies: &self.policies,
            endpoints: &self.endpoints,
            routes: &self.routes,
            asgs: &self.netout,
            server_tags: &self.server_tags,
        }
    }
}

/// On-disk shape (JSON): lists instead of maps keyed by structs.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Stored {
    version: u32,
    next_tag: u32,
    next_policy_id: u32,
    tags: BTreeMap<String, u32>,
    policies: Vec<StoredPolicy>,
    endpoints: Vec<Endpoint>,
    #[serde(default)]
    routes: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    asgs: BTreeMap<String, Vec<NetOutRule>>,
    /// The policy server's tags (`[cf]`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    server_tags: BTreeMap<String, u32>,
}

/// A policy and its id, spelled out rather than `#[serde(flatten)]`: a
/// flattened struct is buffered field by field before it is read, which
/// at a million policies was most of the time a restart took to parse.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct StoredPolicy {
    id: u32,
    source: AppName,
    destination: AppName,
    protocol: Protocol,
    start: u16,
    end: u16,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    tls_only: bool,
}

impl StoredPolicy {
    fn new(p: Policy, id: u32) -> Self {
        let Policy { source, destination, protocol, start, end, tls_only } = p;
        Self { id, source, destination, protocol, start, end, tls_only }
    }

    fn into_policy(self) -> (Policy, u32) {
        let Self { id, source, destination, protocol, start, end, tls_only } = self;
        (Policy { source, destination, protocol, start, end, tls_only }, id)
    }
}

impl From<Stored> for State {
    fn from(s: Stored) -> Self {
        let mut state = Self {
            next_tag: s.next_tag,
            next_policy_id: s.next_policy_id,
            tags: s.tags,
            policies: PolicySet::with_capacity(s.policies.len()),
            endpoints: s.endpoints.into_iter().map(|e| (e.ip, e)).collect(),
            routes: s.routes,
            netout: s.asgs,
            server_tags: s.server_tags,
            tls_ports: None,
            local_host: None,
            refs: Default::default(),
        };
        // Interned as they are taken in: one allocation per app name.
        let mut set = std::mem::take(&mut state.policies);
        let policies = s.policies.into_iter().map(|stored| {
            let (p, id) = stored.into_policy();
            let source = state.intern_referenced(&p.source);
            let destination = state.intern_referenced(&p.destination);
            (Policy { source, destination, ..p }, id)
        });
        let held = set.extend(policies);
        state.policies = set;
        for p in held {
            state.unreference(&p.source);
            state.unreference(&p.destination);
        }
        let endpoints = std::mem::take(&mut state.endpoints);
        for (ip, mut e) in endpoints {
            e.app = state.intern(&e.app);
            state.reference(&e.app);
            state.endpoints.insert(ip, e);
        }
        state
    }
}

impl From<State> for Stored {
    fn from(s: State) -> Self {
        Self {
            version: 1,
            next_tag: s.next_tag,
            next_policy_id: s.next_policy_id,
            tags: s.tags,
            policies: s
                .policies
                .sorted()
                .map(|r| StoredPolicy::new(r.to_policy(), r.ports.id))
                .collect(),
            endpoints: s.endpoints.into_values().collect(),
            routes: s.routes,
            asgs: s.netout,
            server_tags: s.server_tags,
        }
    }
}
