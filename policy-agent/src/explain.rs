//! `explain`: why a flow is allowed or denied, answered from the kernel maps
//! (through the same decision function the programs run) and named with the
//! agent's state. The answer is typed ([`Explanation`]); the API renders it
//! (`api::observe`).

use std::net::IpAddr;

use policy_common::{
    decision::{Check, Lookups, check_flow},
    family::Family,
    maps::{Conn, ConnKey, EndpointValue, Ipv6Key, PairKey, PairPorts, PortRules, SmallPortSet},
    packet::Flow,
    ports::PairValues,
};

use crate::{
    Maps,
    state::{Policy, Protocol, State},
};

/// A flow to explain: `src → dst`, `protocol`, destination `port` (for
/// ICMP: `type << 8 | code`); `from` is the endpoint whose veth the packet
/// leaves, if not `src`'s own. Source, destination and sender are of one
/// family.
#[derive(Clone, Copy, Debug)]
pub struct FlowQuery {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub protocol: Protocol,
    pub port: u16,
    pub from: Option<IpAddr>,
}

/// What a flow meets, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    pub source: Side,
    pub destination: Side,
    pub outcome: Outcome,
}

/// One end of the flow, as the maps and the state know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Side {
    pub ip: IpAddr,
    /// Whether the kernel maps hold it as an endpoint.
    pub registered: bool,
    /// Its app: the state's endpoint's, else the app holding its tag.
    pub app: Option<String>,
    /// Its tag in the maps.
    pub tag: Option<u32>,
}

impl Side {
    /// The app's name, or the address where it has none.
    pub fn name(&self) -> String {
        self.app.clone().unwrap_or_else(|| self.ip.to_string())
    }
}

/// Where the flow ends, in the order the programs check it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// 1. Dropped where it leaves its container: `sender`'s veth lets only
    ///    `sender` out (its app `sender_app`), not the source.
    Spoofed { sender: IpAddr, sender_app: Option<String> },
    /// 2. Checked by the destination's program.
    Checked {
        /// The sender named is not a registered endpoint: its packets are
        /// not checked for spoofing.
        unchecked_sender: Option<IpAddr>,
        /// The policies from the source's app to the destination's, with
        /// their ids (none unless both apps are known).
        policies: Vec<(Policy, u32)>,
        verdict: Verdict,
    },
}

/// The destination's check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `unregistered` is not a registered endpoint: not container-to-
    /// container traffic, no policy applies. `source_spoofed`: the source
    /// is no endpoint and no sender was named, so a container sending with
    /// it would be dropped as spoofed at its own veth.
    Unmanaged { unregistered: IpAddr, source_spoofed: bool },
    /// Policy `policy_id` allows it (`policy`: the state's, if found).
    Allowed { policy_id: u32, policy: Option<Policy> },
    /// No policy allows it; `on_protocol` are the policies between the two
    /// apps on the flow's protocol (none: no policy on it at all).
    Denied { on_protocol: Vec<Policy> },
}

impl Outcome {
    /// Whether the flow passes.
    pub fn allowed(&self) -> bool {
        matches!(
            self,
            Outcome::Checked { verdict: Verdict::Unmanaged { .. } | Verdict::Allowed { .. }, .. }
        )
    }

    /// Why, in one word: `spoofed`, `unmanaged`, `policy`, `no_policy` or
    /// `wrong_port`.
    pub fn reason(&self) -> &'static str {
        match self {
            Outcome::Spoofed { .. } => "spoofed",
            Outcome::Checked { verdict, .. } => match verdict {
                Verdict::Unmanaged { .. } => "unmanaged",
                Verdict::Allowed { .. } => "policy",
                Verdict::Denied { on_protocol } if on_protocol.is_empty() => "no_policy",
                Verdict::Denied { .. } => "wrong_port",
            },
        }
    }
}

/// The entries of the kernel maps one flow's check reads, fetched once.
struct Snapshot<A> {
    endpoints: Vec<(A, EndpointValue)>,
    /// The pair's values in the maps, as the agent writes them.
    pair: Option<PairValues>,
}

impl<A: Family> Lookups<A> for Snapshot<A> {
    fn endpoint(&self, addr: A) -> Option<EndpointValue> {
        self.endpoints.iter().find(|(a, _)| *a == addr).map(|(_, ep)| *ep)
    }
    fn pair_ports(&self, _key: &PairKey) -> Option<&PairPorts> {
        self.pair.as_ref().map(|v| &v.pair)
    }
    fn port_set(&self, _key: &PairKey) -> Option<&SmallPortSet> {
        self.pair.as_ref()?.set.as_ref()
    }
    fn wide_port_set(&self, _key: &PairKey) -> Option<&PortRules> {
        self.pair.as_ref()?.wide.as_ref()
    }
    fn conn(&self, _key: &ConnKey<A>) -> Option<Conn> {
        None
    }
    fn epoch(&self) -> u32 {
        0
    }
    fn fragment_allowed(&self, _key: &A::Fragment) -> bool {
        false
    }
}

/// An address as the programs key it (the IPv4 or the IPv6 maps).
fn key<A: From<IpKey>>(ip: IpAddr) -> A {
    A::from(IpKey(ip))
}

/// Conversion of an [`IpAddr`] to a family's map key; the caller has
/// checked the family.
struct IpKey(IpAddr);

impl From<IpKey> for u32 {
    fn from(IpKey(ip): IpKey) -> u32 {
        match ip {
            IpAddr::V4(v4) => u32::from_ne_bytes(v4.octets()),
            IpAddr::V6(_) => 0,
        }
    }
}

impl From<IpKey> for Ipv6Key {
    fn from(IpKey(ip): IpKey) -> Ipv6Key {
        match ip {
            IpAddr::V6(v6) => Ipv6Key::from_octets(v6.octets()),
            IpAddr::V4(_) => Ipv6Key::default(),
        }
    }
}

/// What a flow meets, step by step, and its verdict. The query's addresses
/// are of one family (the API checks it); IPv6 flows are checked against
/// the IPv6 maps with the same decision.
pub fn explain(maps: &Maps, state: &State, query: &FlowQuery) -> Explanation {
    if query.src.is_ipv6() {
        explain_in::<Ipv6Key>(maps, state, query)
    } else {
        explain_in::<u32>(maps, state, query)
    }
}

fn explain_in<A: Family + From<IpKey>>(
    maps: &Maps,
    state: &State,
    query: &FlowQuery,
) -> Explanation {
    let FlowQuery { src, dst, protocol, port, from } = *query;
    let (src_ep, dst_ep) = (maps.endpoint_at(src), maps.endpoint_at(dst));
    let app_of = |ip: IpAddr, ep: Option<EndpointValue>| {
        state.endpoint_at(ip).map(|e| e.app.to_string()).or_else(|| {
            let tag = ep?.tag;
            state.tags().iter().find(|(_, t)| **t == tag).map(|(a, _)| a.clone())
        })
    };
    let side = |ip: IpAddr, ep: Option<EndpointValue>| Side {
        ip,
        registered: ep.is_some(),
        app: app_of(ip, ep),
        tag: ep.map(|e| e.tag),
    };
    let (source, destination) = (side(src, src_ep), side(dst, dst_ep));
    let explained =
        |outcome| Explanation { source: source.clone(), destination: destination.clone(), outcome };

    // 1. Anti-spoofing where the packet leaves its container.
    let sender = from.unwrap_or(src);
    let mut unchecked_sender = None;
    if let Some(sender_ep) = maps.endpoint_at(sender) {
        if sender != src {
            let sender_app = app_of(sender, Some(sender_ep));
            return explained(Outcome::Spoofed { sender, sender_app });
        }
    } else if from.is_some() {
        unchecked_sender = Some(sender);
    }

    // 2. The destination's policy check, with the programs' own function.
    let endpoints = [(src, src_ep), (dst, dst_ep)]
        .into_iter()
        .filter_map(|(ip, ep)| Some((key::<A>(ip), ep?)))
        .collect();
    let rules = match (src_ep, dst_ep) {
        (Some(s), Some(d)) => maps.pair_rules(&PairKey::new(s.tag, d.tag, protocol.number())),
        _ => None,
    };
    let snapshot = Snapshot { endpoints, pair: rules.map(|r| PairValues::of(&r)) };
    let flow = Flow {
        saddr: key::<A>(src),
        daddr: key::<A>(dst),
        sport: 0,
        dport: port,
        protocol: protocol.number(),
    };
    let policies: Vec<(Policy, u32)> = match (&source.app, &destination.app) {
        (Some(s), Some(d)) => state.policies_between(s, d),
        _ => Vec::new(),
    };
    let verdict = match check_flow(&snapshot, &flow) {
        Check::Unmanaged => Verdict::Unmanaged {
            unregistered: if dst_ep.is_none() { dst } else { src },
            source_spoofed: src_ep.is_none() && from.is_none(),
        },
        Check::Allowed { policy_id, .. } => {
            Verdict::Allowed { policy_id, policy: state.policy_by_id(policy_id) }
        }
        Check::Denied { .. } => Verdict::Denied {
            on_protocol: policies
                .iter()
                .filter(|(p, _)| p.protocol == protocol)
                .map(|(p, _)| p.clone())
                .collect(),
        },
    };
    explained(Outcome::Checked { unchecked_sender, policies, verdict })
}
