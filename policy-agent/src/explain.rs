//! `explain`: why a flow is allowed or denied, answered from the kernel maps
//! (through the same decision function the programs run) and named with the
//! agent's state.

use std::net::IpAddr;

use policy_common::{
    decision::{Check, Lookups, check_flow},
    family::Family,
    maps::{Conn, ConnKey, EndpointValue, Ipv6Key, PairKey, PortRules},
    packet::Flow,
};
use serde_json::{Value, json};

use crate::{
    Maps,
    agent::FlowQuery,
    api::wire,
    state::{State, tag_text},
};

/// The entries of the kernel maps one flow's check reads, fetched once.
struct Snapshot<A> {
    endpoints: Vec<(A, EndpointValue)>,
    rules: Option<PortRules>,
}

impl<A: Family> Lookups<A> for Snapshot<A> {
    fn endpoint(&self, addr: A) -> Option<EndpointValue> {
        self.endpoints.iter().find(|(a, _)| *a == addr).map(|(_, ep)| *ep)
    }
    fn port_rules(&self, _key: &PairKey) -> Option<&PortRules> {
        self.rules.as_ref()
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
pub fn explain(maps: &Maps, state: &State, query: &FlowQuery) -> Value {
    if query.src.is_ipv6() {
        explain_in::<Ipv6Key>(maps, state, query)
    } else {
        explain_in::<u32>(maps, state, query)
    }
}

fn explain_in<A: Family + From<IpKey>>(maps: &Maps, state: &State, query: &FlowQuery) -> Value {
    let FlowQuery { src, dst, protocol, port, from } = *query;
    let (src_ep, dst_ep) = (maps.endpoint_at(src), maps.endpoint_at(dst));
    let app_of = |ip: IpAddr, ep: Option<EndpointValue>| {
        state.endpoint_at(ip).map(|e| e.app.clone()).or_else(|| {
            let tag = ep?.tag;
            state.tags().iter().find(|(_, t)| **t == tag).map(|(a, _)| a.clone())
        })
    };
    let side = |ip: IpAddr, ep: Option<EndpointValue>| {
        json!({
            "ip": ip.to_string(),
            "registered": ep.is_some(),
            "app": app_of(ip, ep),
            "tag": ep.map(|e| tag_text(e.tag)),
        })
    };
    let mut answer = json!({
        "source": side(src, src_ep),
        "destination": side(dst, dst_ep),
        "protocol": protocol.name(),
    });
    let what = if protocol.has_ports() {
        answer["port"] = json!(port);
        port.to_string()
    } else {
        let [icmp_type, code] = port.to_be_bytes();
        answer["icmp_type"] = json!(icmp_type);
        answer["icmp_code"] = json!(code);
        format!("type {icmp_type} code {code}")
    };
    let (src_app, dst_app) = (app_of(src, src_ep), app_of(dst, dst_ep));
    let name = |app: &Option<String>, ip: IpAddr| app.clone().unwrap_or_else(|| ip.to_string());

    // 1. Anti-spoofing where the packet leaves its container.
    let sender = from.unwrap_or(src);
    if let Some(sender_ep) = maps.endpoint_at(sender) {
        if sender != src {
            answer["verdict"] = json!("denied");
            answer["reason"] = json!("spoofed");
            answer["message"] = json!(format!(
                "denied: spoofed source - {sender}'s veth only lets {sender} out (app {}), not {src}",
                app_of(sender, Some(sender_ep)).unwrap_or_default()
            ));
            return answer;
        }
    } else if from.is_some() {
        answer["note"] = json!(format!(
            "{sender} is not a registered endpoint: its packets are not checked for spoofing"
        ));
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
    let snapshot = Snapshot { endpoints, rules };
    let flow = Flow {
        saddr: key::<A>(src),
        daddr: key::<A>(dst),
        sport: 0,
        dport: port,
        protocol: protocol.number(),
    };
    let between: Vec<Value> = match (&src_app, &dst_app) {
        (Some(s), Some(d)) => state
            .policies()
            .filter(|(p, _)| &p.source == s && &p.destination == d)
            .map(|(p, id)| {
                // The policy's destination in the API's shape, its id the
                // policy's.
                let mut v = wire::policy_json(p)["destination"].take();
                v["id"] = json!(id);
                v
            })
            .collect(),
        _ => Vec::new(),
    };
    answer["policies"] = json!(between);
    let (verdict, reason, message) = match check_flow(&snapshot, &flow) {
        Check::Unmanaged => {
            let who = if dst_ep.is_none() { dst } else { src };
            (
                "allowed",
                "unmanaged",
                format!(
                    "allowed: {who} is not a registered endpoint, so this is not container-to-container traffic and no policy applies{}",
                    if src_ep.is_none() && from.is_none() {
                        format!(
                            " (a container sending with source {src} would be dropped as spoofed at its own veth)"
                        )
                    } else {
                        String::new()
                    }
                ),
            )
        }
        Check::Allowed { policy_id, .. } => {
            let policy = state.policies().find(|(_, id)| *id == policy_id).map(|(p, _)| p.clone());
            let ports = policy.as_ref().map_or(String::new(), |p| {
                let destination = wire::policy_json(p)["destination"].take();
                format!(" {} {}", p.protocol.name(), wire::destination_text(&destination))
            });
            answer["policy_id"] = json!(policy_id);
            (
                "allowed",
                "policy",
                format!(
                    "allowed: {} allows {}{ports} (policy {policy_id})",
                    name(&dst_app, dst),
                    name(&src_app, src)
                ),
            )
        }
        Check::Denied { .. } => {
            let same_protocol: Vec<String> = between
                .iter()
                .filter(|p| p["protocol"] == protocol.name())
                .map(wire::destination_text)
                .collect();
            let message = if same_protocol.is_empty() && between.is_empty() {
                format!(
                    "denied: no policy lets {} reach {}",
                    name(&src_app, src),
                    name(&dst_app, dst)
                )
            } else if same_protocol.is_empty() {
                format!(
                    "denied: {} allows {} only on other protocols, not {}",
                    name(&dst_app, dst),
                    name(&src_app, src),
                    protocol.name()
                )
            } else {
                format!(
                    "denied: {} allows {} on {} {}, not {what}",
                    name(&dst_app, dst),
                    name(&src_app, src),
                    protocol.name(),
                    same_protocol.join(", ")
                )
            };
            ("denied", if same_protocol.is_empty() { "no_policy" } else { "wrong_port" }, message)
        }
    };
    answer["verdict"] = json!(verdict);
    answer["reason"] = json!(reason);
    answer["message"] = json!(message);
    answer
}
