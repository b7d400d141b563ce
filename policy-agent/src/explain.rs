//! `explain`: why a flow is allowed or denied, answered from the kernel maps
//! (through the same decision function the programs run) and named with the
//! agent's state.

use std::{collections::HashMap, net::Ipv4Addr};

use policy_common::{
    decision::{Check, Lookups, check_flow},
    maps::{Conn, ConnKey, EndpointValue, FragmentKey, PairKey, PortRules},
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
struct Snapshot {
    endpoints: HashMap<u32, EndpointValue>,
    rules: Option<PortRules>,
}

impl Lookups for Snapshot {
    fn endpoint(&self, addr: u32) -> Option<EndpointValue> {
        self.endpoints.get(&addr).copied()
    }
    fn port_rules(&self, _key: &PairKey) -> Option<&PortRules> {
        self.rules.as_ref()
    }
    fn conn(&self, _key: &ConnKey) -> Option<Conn> {
        None
    }
    fn epoch(&self) -> u32 {
        0
    }
    fn fragment_allowed(&self, _key: &FragmentKey) -> bool {
        false
    }
}

/// What a flow meets, step by step, and its verdict.
pub fn explain(maps: &Maps, state: &State, query: &FlowQuery) -> Value {
    let FlowQuery { src, dst, protocol, port, from } = *query;
    let key = |ip: Ipv4Addr| u32::from_ne_bytes(ip.octets());
    let (src_ep, dst_ep) = (maps.endpoint(src), maps.endpoint(dst));
    let app_of = |ip: Ipv4Addr, ep: Option<EndpointValue>| {
        state.endpoint(ip).map(|e| e.app.clone()).or_else(|| {
            let tag = ep?.tag;
            state.tags().iter().find(|(_, t)| **t == tag).map(|(a, _)| a.clone())
        })
    };
    let side = |ip: Ipv4Addr, ep: Option<EndpointValue>| {
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
    let name = |app: &Option<String>, ip: Ipv4Addr| app.clone().unwrap_or_else(|| ip.to_string());

    // 1. Anti-spoofing where the packet leaves its container.
    let sender = from.unwrap_or(src);
    if let Some(sender_ep) = maps.endpoint(sender) {
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
    let mut endpoints = HashMap::new();
    for (ip, ep) in [(src, src_ep), (dst, dst_ep)] {
        if let Some(ep) = ep {
            endpoints.insert(key(ip), ep);
        }
    }
    let rules = match (src_ep, dst_ep) {
        (Some(s), Some(d)) => maps.pair_rules(&PairKey::new(s.tag, d.tag, protocol.number())),
        _ => None,
    };
    let snapshot = Snapshot { endpoints, rules };
    let flow = Flow {
        saddr: key(src),
        daddr: key(dst),
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
