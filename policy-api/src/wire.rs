//! The API's JSON shapes, both ways, in one place: Cloud Foundry's
//! policy-server bodies (taken and given unchanged; `tls_only` is our
//! documented extension), endpoints, routes, NetOut rules (garden's
//! NetOutRule), tags and addressing. The agent parses requests into these
//! and renders its replies from them; the CLI and the CNI plugin build their
//! requests with them.
//!
//! The shapes take what a client may send, loosely typed where the agent
//! names a problem more precisely than a type could (ports are any integer,
//! protocols any string): the agent checks them and turns them into its
//! model (`policy-agent`'s `api/wire.rs` and `state/validate.rs`). `null`
//! is taken as absent wherever a key is optional. Status, flows, explain
//! and the cluster's status are not here: they are read by people (the
//! CLI prints them), not by programs that build requests.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The domain internal routes are served under.
pub const INTERNAL_DOMAIN: &str = "apps.internal";

/// `{"policies": [...]}`: the body of a policy write (add or delete).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policies {
    pub policies: Vec<Policy>,
}

/// `{"total_policies": N, "policies": [...]}`: a policy listing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicyList<P = Policy> {
    pub total_policies: usize,
    pub policies: Vec<P>,
}

impl<P> From<Vec<P>> for PolicyList<P> {
    fn from(policies: Vec<P>) -> Self {
        Self { total_policies: policies.len(), policies }
    }
}

/// One policy in Cloud Foundry's shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Policy {
    pub source: PolicySource,
    pub destination: Destination,
    /// Our extension: allow only the platform TLS port fronting the
    /// destination's port (absent: false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_only: Option<bool>,
}

/// A policy's source app.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PolicySource {
    pub id: String,
    /// Cloud Foundry's clients may send one; the agent refuses it (tags
    /// are assigned by the agent) and never renders one here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
}

/// A policy's destination: the app, the protocol, and `ports` (tcp, udp)
/// or `icmp_type` and `icmp_code` where it names them (icmp, icmpv6).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Destination {
    pub id: String,
    /// `tcp`, `udp`, `icmp` or `icmpv6`.
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Ports>,
    /// The older single-port form (taken, never rendered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<i64>,
    /// As [`PolicySource::tag`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<Value>,
}

impl Destination {
    /// What it allows, as the CLI prints it: `8080`, `8080-8090`,
    /// `type 8`, `type 3 code 13`, `any`.
    pub fn text(&self) -> String {
        if self.protocol == "icmp" || self.protocol == "icmpv6" {
            return match (self.icmp_type, self.icmp_code) {
                (None, _) => "any".into(),
                (Some(t), None) => format!("type {t}"),
                (Some(t), Some(c)) => format!("type {t} code {c}"),
            };
        }
        match (&self.ports, self.port) {
            (Some(Ports { start, end }), _) if start == end => start.to_string(),
            (Some(Ports { start, end }), _) => format!("{start}-{end}"),
            (None, Some(port)) => port.to_string(),
            (None, None) => "?".into(),
        }
    }
}

/// An inclusive port range, `{"start", "end"}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    pub start: i64,
    pub end: i64,
}

/// A policy with its counters (`GET /v1/policies/stats`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CountedPolicy {
    #[serde(flatten)]
    pub policy: Policy,
    pub id: u32,
    pub packets: u64,
    pub bytes: u64,
}

/// `{"tags": [{"id", "tag"}]}` (Cloud Foundry's `/external/tags`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tags {
    pub tags: Vec<Tag>,
}

/// An app's tag, as hex text (`"0001"`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tag {
    pub id: String,
    pub tag: String,
}

/// `{"endpoints": [...]}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Endpoints {
    pub endpoints: Vec<Endpoint>,
}

/// An endpoint: what a CNI plugin registers (`POST /v1/endpoints`) and
/// the agent lists. Its addresses are `ip` (one, either family) and/or
/// `ips` (at most one per family); the agent renders both.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Endpoint {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ips: Option<Vec<String>>,
    pub app: String,
    /// The host-side veth.
    pub ifname: String,
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// Cluster mode: the host it runs on (rendered only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// NetIn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mappings: Option<Vec<PortMapping>>,
    /// Platform TLS fronting the app (Cloud Foundry's `CF_INSTANCE_PORTS`
    /// shape; rendered only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<InstancePorts>>,
    /// The instance identity platform TLS serves (rendered only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_cert: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_key: Option<PathBuf>,
    /// Cloud Foundry: the container's space, as garden's metadata names
    /// it; with the policy server's security groups synced
    /// (`enable_asg_syncing`) it picks the groups that hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub space_id: Option<String>,
    /// Cloud Foundry: `app`, `task` or `staging` (garden's metadata).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_workload: Option<String>,
}

/// A NetIn mapping: garden's `{"host_port", "container_port"}` or the CNI
/// convention's `{"hostPort", "containerPort", "protocol"}` (protocol
/// absent: tcp). Rendered in garden's keys, with the protocol.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    #[serde(alias = "hostPort")]
    pub host_port: i64,
    #[serde(alias = "containerPort")]
    pub container_port: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
}

/// `{"internal": APP_PORT, "internal_tls_proxy": TLS_PORT}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstancePorts {
    pub internal: u16,
    pub internal_tls_proxy: u16,
}

/// `{"routes": [...]}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routes {
    pub routes: Vec<Route>,
}

/// An internal route, `HOSTNAME.DOMAIN` → app (domain absent:
/// [`INTERNAL_DOMAIN`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub app: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    pub hostname: String,
}

impl Route {
    /// The domain, [`INTERNAL_DOMAIN`] when it names none.
    pub fn domain(&self) -> &str {
        self.domain.as_deref().unwrap_or(INTERNAL_DOMAIN)
    }
}

/// `{"rules": [...]}`: an app's security groups (`PUT /v1/asgs/{app}`
/// also takes the list itself).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetOutRules {
    pub rules: Vec<NetOutRule>,
}

/// One Application Security Group rule in garden's NetOutRule shape.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NetOutRule {
    /// Absent: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<NetOutProtocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub networks: Option<Vec<Network>>,
    /// TCP and UDP only; absent or empty: any port. `end` absent: `start`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<Vec<NetOutPorts>>,
    /// ICMP only; absent: any type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmps: Option<Icmps>,
    /// Report the packets it allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<bool>,
}

/// garden's protocol: a number (0 all, 1 tcp, 2 udp, 3 icmp) or a name
/// (`all`, `tcp`, `udp`, `icmp`); the agent renders names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NetOutProtocol {
    Number(u64),
    Name(String),
}

/// An inclusive IPv4 address range.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub start: String,
    pub end: String,
}

/// A NetOut rule's port range (`end` absent: `start` alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetOutPorts {
    pub start: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<i64>,
}

/// A NetOut rule's ICMP match (code absent: any code). garden serializes
/// it with `omitempty`: a type of 0 (echo reply) is left out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Icmps {
    #[serde(rename = "type", default)]
    pub icmp_type: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
}

/// `GET /v1/ipam`: where this host's containers get addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ipam {
    /// This host's part of the overlay, `A.B.C.D/N` (absent: the overlay
    /// is off; the plugin's config must name a subnet).
    pub subnet: Option<String>,
    pub gateway: String,
    /// The containers' MTU when traffic leaves through the VXLAN device.
    pub mtu: Option<u32>,
}

/// An error reply: `{"error": "...", "field": "...", "reason": "..."}`
/// (`field` and `reason` on a 400 for bad input).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn cloud_foundrys_documented_bodies_parse_and_render_unchanged() {
        let post: Value = serde_json::from_str(include_str!(
            "../../fixtures/cf-policy-server/external-policies-post.json"
        ))
        .unwrap();
        let body: Policies = serde_json::from_value(post.clone()).unwrap();
        assert_eq!(serde_json::to_value(&body).unwrap(), post);
        let get: Value = serde_json::from_str(include_str!(
            "../../fixtures/cf-policy-server/external-policies-get-response.json"
        ))
        .unwrap();
        let list: PolicyList = serde_json::from_value(get.clone()).unwrap();
        assert_eq!(serde_json::to_value(&list).unwrap(), get);
        let tags: Value = serde_json::from_str(include_str!(
            "../../fixtures/cf-policy-server/external-tags-response.json"
        ))
        .unwrap();
        let parsed: Tags = serde_json::from_value(tags.clone()).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), tags);
    }

    #[test]
    fn destinations_as_the_cli_prints_them() {
        let d = |v: Value| serde_json::from_value::<Destination>(v).unwrap().text();
        assert_eq!(
            d(json!({"id": "b", "protocol": "tcp", "ports": {"start": 80, "end": 80}})),
            "80"
        );
        assert_eq!(
            d(json!({"id": "b", "protocol": "udp", "ports": {"start": 1, "end": 9}})),
            "1-9"
        );
        assert_eq!(d(json!({"id": "b", "protocol": "icmp"})), "any");
        assert_eq!(d(json!({"id": "b", "protocol": "icmp", "icmp_type": 8})), "type 8");
        assert_eq!(
            d(json!({"id": "b", "protocol": "icmpv6", "icmp_type": 1, "icmp_code": 4})),
            "type 1 code 4"
        );
    }

    #[test]
    fn both_port_mapping_spellings_are_taken() {
        let garden: PortMapping =
            serde_json::from_value(json!({"host_port": 61001, "container_port": 8080})).unwrap();
        let cni: PortMapping = serde_json::from_value(
            json!({"hostPort": 61001, "containerPort": 8080, "protocol": "udp", "hostIP": ""}),
        )
        .unwrap();
        assert_eq!((garden.host_port, garden.container_port, garden.protocol), (61001, 8080, None));
        assert_eq!(cni.protocol.as_deref(), Some("udp"));
        // NetOut protocols come as numbers or names.
        let rule: NetOutRule = serde_json::from_value(
            json!({"protocol": 1, "networks": [{"start": "10.0.0.1", "end": "10.0.0.9"}]}),
        )
        .unwrap();
        assert_eq!(rule.protocol, Some(NetOutProtocol::Number(1)));
    }
}
