//! The API's bodies into the agent's model, and the model into replies.
//! The JSON shapes themselves are `policy_api::wire`'s (shared with the CLI
//! and the CNI plugin); here a body is read into its shape — a value of the
//! wrong type is refused naming its field — and then checked
//! (`state/validate.rs`) into the model. The first problem found is
//! reported with the path of the field.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use policy_api::wire;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::state::{
    AddressRange, Endpoint, IcmpMatch, Invalid, NetOutProtocol, NetOutRule, Policy, PortMapping,
    PortSpan, Protocol, check_app_id, check_endpoint_ipv4, check_endpoint_ipv6, check_icmp_types,
    check_ports, parse_protocol, parse_transport,
};

/// `value` as the shape `T`, its fields named from `at` (a type error
/// names the field it is in: `policies[0].destination.ports.start`).
fn shape<T: DeserializeOwned>(value: &Value, at: &str) -> Result<T, Invalid> {
    serde_path_to_error::deserialize(value)
        .map_err(|e| shape_error(e.path().to_string(), &e.into_inner().to_string(), at))
}

/// [`shape`] from JSON text: text that is not JSON is `body`'s error, as
/// a request's would be.
fn shape_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Invalid> {
    // Read once without keeping the path (tracking it cost a few per cent
    // of a bulk load); read again keeping it only to name what is wrong.
    if let Ok(value) = serde_json::from_slice(bytes) {
        return Ok(value);
    }
    let not_json = |e: serde_json::Error| Invalid::new("body", format!("invalid JSON: {e}"));
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.classify() != serde_json::error::Category::Data {
            return not_json(inner);
        }
        // The text's position is not part of the API's messages.
        let place = format!(" at line {} column {}", inner.line(), inner.column());
        let message = inner.to_string();
        shape_error(path, message.strip_suffix(&place).unwrap_or(&message), "")
    })?;
    de.end().map_err(not_json)?;
    Ok(value)
}

/// A shape's error as the API gives it: the field (its `path` under
/// `at`) and what it must be.
fn shape_error(path: String, message: &str, at: &str) -> Invalid {
    let field = match (at, path.as_str()) {
        ("", ".") => "body".to_owned(),
        (at, ".") => at.to_owned(),
        ("", path) => path.to_owned(),
        (at, path) if path.starts_with('[') => format!("{at}{path}"),
        (at, path) => format!("{at}.{path}"),
    };
    if let Some(key) = message.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
        let field = if field == "body" { key.to_owned() } else { format!("{field}.{key}") };
        return Invalid::new(field, "missing");
    }
    let reason = match message.split_once(", expected ") {
        Some((_, expected)) => must_be(expected),
        None => message.to_owned(),
    };
    Invalid::new(field, reason)
}

/// What serde expected, as the API says it.
fn must_be(expected: &str) -> String {
    let what = match expected {
        "a string" => "a string",
        "path string" => "a path",
        "a sequence" => "a list",
        "a boolean" => "true or false",
        "i64" | "u64" | "u32" | "u16" | "u8" => "an integer",
        "a map" => "an object",
        e if e.starts_with("struct ") => "an object",
        other => return format!("expected {other}"),
    };
    format!("must be {what}")
}

/// Parses an IPv4 address named by `field`.
pub fn parse_ip(field: &str, text: &str) -> Result<Ipv4Addr, Invalid> {
    text.parse().map_err(|_| Invalid::new(field, format!("{text:?} is not an IPv4 address")))
}

/// An endpoint's addresses: `ip` (one address, either family) and/or
/// `ips` (a list), at most one per family. Returns its key (the IPv4
/// address, or the IPv6 one of an IPv6-only endpoint) and its IPv6 address.
fn endpoint_addresses(e: &wire::Endpoint) -> Result<(IpAddr, Option<Ipv6Addr>), Invalid> {
    let texts: Vec<(String, &str)> = e
        .ip
        .iter()
        .map(|ip| ("ip".to_owned(), ip.as_str()))
        .chain(e.ips.iter().flatten().enumerate().map(|(i, ip)| (format!("ips[{i}]"), ip.as_str())))
        .collect();
    if texts.is_empty() {
        return Err(Invalid::new("ip", "missing"));
    }
    let (mut v4, mut v6) = (None::<Ipv4Addr>, None::<Ipv6Addr>);
    for (field, text) in texts {
        match text.parse::<IpAddr>() {
            Ok(IpAddr::V4(a)) => {
                check_endpoint_ipv4(&field, a)?;
                if v4.is_some_and(|b| b != a) {
                    return Err(Invalid::new(field, "a second IPv4 address (one per family)"));
                }
                v4 = Some(a);
            }
            Ok(IpAddr::V6(a)) => {
                check_endpoint_ipv6(&field, a)?;
                if v6.is_some_and(|b| b != a) {
                    return Err(Invalid::new(field, "a second IPv6 address (one per family)"));
                }
                v6 = Some(a);
            }
            Err(_) => {
                return Err(Invalid::new(field, format!("{text:?} is not an IP address")));
            }
        }
    }
    match (v4, v6) {
        (Some(v4), v6) => Ok((IpAddr::V4(v4), v6)),
        (None, Some(v6)) => Ok((IpAddr::V6(v6), Some(v6))),
        (None, None) => unreachable!("at least one address was parsed"),
    }
}

/// Parses `{"policies": [...]}` in Cloud Foundry's shape from a JSON tree
/// (the tests hold the API's bytes parser to it).
#[cfg(test)]
pub fn parse_policies(body: &Value) -> Result<Vec<Policy>, Invalid> {
    policies_of(shape(body, "")?)
}

/// Parses `{"policies": [...]}` in Cloud Foundry's shape straight from a
/// request's bytes, without a JSON tree in between (a bulk load's batches
/// are large).
pub fn parse_policies_json(bytes: &[u8]) -> Result<Vec<Policy>, Invalid> {
    policies_of(shape_json(bytes)?)
}

fn policies_of(body: wire::Policies) -> Result<Vec<Policy>, Invalid> {
    if body.policies.is_empty() {
        return Err(Invalid::new("policies", "must not be empty"));
    }
    body.policies
        .iter()
        .enumerate()
        .map(|(i, p)| policy(p, &|f| format!("policies[{i}].{f}")))
        .collect()
}

fn policy(p: &wire::Policy, at: &dyn Fn(&str) -> String) -> Result<Policy, Invalid> {
    let dest = &p.destination;
    for (tag, name) in [(&p.source.tag, "source"), (&dest.tag, "destination")] {
        if tag.is_some() {
            return Err(Invalid::new(
                at(&format!("{name}.tag")),
                "tags are assigned by the agent, not by clients",
            ));
        }
    }
    // Checks run with an empty field name, named only on error: building
    // every field's name up front cost allocations on every policy.
    let within = |field: &'static str| {
        move |mut e: Invalid| {
            e.field = at(&format!("{field}{}", e.field));
            e
        }
    };
    check_app_id("", &p.source.id).map_err(within("source.id"))?;
    check_app_id("", &dest.id).map_err(within("destination.id"))?;
    let protocol = parse_protocol("", &dest.protocol).map_err(within("destination.protocol"))?;
    let icmp_keys = [("icmp_type", dest.icmp_type), ("icmp_code", dest.icmp_code)];
    let (start, end) = if protocol.has_ports() {
        if let Some((key, _)) = icmp_keys.iter().find(|(_, v)| v.is_some()) {
            return Err(Invalid::new(
                at(&format!("destination.{key}")),
                format!("only icmp policies have one ({} policies have ports)", protocol.name()),
            ));
        }
        match (dest.ports, dest.port) {
            (Some(ports), _) => {
                check_ports("", ports.start, ports.end).map_err(within("destination.ports"))?
            }
            // The older single-port form.
            (None, Some(port)) => {
                check_ports("", port, port).map_err(within("destination.port"))?
            }
            (None, None) => return Err(Invalid::new(at("destination.ports"), "missing")),
        }
    } else {
        if dest.ports.is_some() || dest.port.is_some() {
            return Err(Invalid::new(
                at("destination.ports"),
                "icmp policies have no ports: give icmp_type (and icmp_code), or neither for all ICMP",
            ));
        }
        check_icmp_types(&at("destination"), dest.icmp_type, dest.icmp_code)?.range()
    };
    let tls_only = p.tls_only.unwrap_or(false);
    if tls_only && !protocol.has_ports() {
        return Err(Invalid::new(at("tls_only"), "a TLS-only policy must be tcp"));
    }
    Ok(Policy {
        source: p.source.id.as_str().into(),
        destination: dest.id.as_str().into(),
        protocol,
        start,
        end,
        tls_only,
    })
}

/// One policy in Cloud Foundry's shape; an icmp policy has `icmp_type` and
/// `icmp_code` (where it names them) in place of `ports`.
pub fn policy_shape(p: &Policy) -> wire::Policy {
    let icmp = p.icmp_types();
    let ports = icmp.is_none().then_some(wire::Ports { start: p.start.into(), end: p.end.into() });
    wire::Policy {
        source: wire::PolicySource { id: p.source.to_string(), tag: None },
        destination: wire::Destination {
            id: p.destination.to_string(),
            protocol: p.protocol.name().to_owned(),
            ports,
            port: None,
            icmp_type: icmp.and_then(|i| i.icmp_type).map(i64::from),
            icmp_code: icmp.and_then(|i| i.code).map(i64::from),
            tag: None,
        },
        tls_only: p.tls_only.then_some(true),
    }
}

/// [`policy_shape`] as JSON.
pub fn policy_json(p: &Policy) -> Value {
    to_json(&policy_shape(p))
}

/// What a policy's destination (JSON) allows, as the CLI prints it:
/// [`wire::Destination::text`].
pub fn destination_text(destination: &Value) -> String {
    serde_json::from_value::<wire::Destination>(destination.clone())
        .map(|d| d.text())
        .unwrap_or_else(|_| "?".to_owned())
}

/// `{"policies": [...]}`: the body of a policy write.
pub fn policies_body(policies: &[Policy]) -> Value {
    to_json(&wire::Policies { policies: policies.iter().map(policy_shape).collect() })
}

/// An endpoint as the API lists it (without its platform TLS).
pub fn endpoint_shape(e: &Endpoint) -> wire::Endpoint {
    wire::Endpoint {
        ip: Some(e.ip.to_string()),
        ips: Some(e.addresses().map(|a| a.to_string()).collect()),
        app: e.app.to_string(),
        ifname: e.ifname.clone(),
        netns: e.netns.clone(),
        host: e.host.clone(),
        port_mappings: (!e.port_mappings.is_empty())
            .then(|| e.port_mappings.iter().map(port_mapping_shape).collect()),
        ports: None,
        instance_cert: None,
        instance_key: None,
        space_id: e.space_id.clone(),
        container_workload: e.workload.clone(),
    }
}

/// [`endpoint_shape`] as JSON.
pub fn endpoint_json(e: &Endpoint) -> Value {
    to_json(&endpoint_shape(e))
}

fn port_mapping_shape(m: &PortMapping) -> wire::PortMapping {
    wire::PortMapping {
        host_port: m.host_port.into(),
        container_port: m.container_port.into(),
        protocol: Some(m.protocol.name().to_owned()),
    }
}

/// A shape as JSON (the shapes are plain data: this cannot fail).
pub fn to_json(shape: &impl serde::Serialize) -> Value {
    serde_json::to_value(shape).unwrap_or(Value::Null)
}

/// Security group rules in garden's NetOutRule shape, `{"rules": [...]}`
/// or the list itself.
pub fn parse_net_out_rules(body: &Value) -> Result<Vec<NetOutRule>, Invalid> {
    let list = match body {
        Value::Object(o) => o.get("rules").unwrap_or(&Value::Null),
        other => other,
    };
    let rules: Vec<wire::NetOutRule> = shape(list, "rules")?;
    rules.iter().enumerate().map(|(i, r)| net_out_rule(&format!("rules[{i}]"), r)).collect()
}

fn net_out_rule(field: &str, r: &wire::NetOutRule) -> Result<NetOutRule, Invalid> {
    use wire::NetOutProtocol::{Name, Number};
    let protocol = match &r.protocol {
        None => NetOutProtocol::All,
        Some(Number(0)) => NetOutProtocol::All,
        Some(Number(1)) => NetOutProtocol::Tcp,
        Some(Number(2)) => NetOutProtocol::Udp,
        Some(Number(3)) => NetOutProtocol::Icmp,
        Some(Name(name)) if name == "all" => NetOutProtocol::All,
        Some(Name(name)) if name == "tcp" => NetOutProtocol::Tcp,
        Some(Name(name)) if name == "udp" => NetOutProtocol::Udp,
        Some(Name(name)) if name == "icmp" => NetOutProtocol::Icmp,
        Some(_) => {
            return Err(Invalid::new(
                format!("{field}.protocol"),
                "must be 0-3 or all, tcp, udp, icmp",
            ));
        }
    };
    let networks = r
        .networks
        .iter()
        .flatten()
        .enumerate()
        .map(|(j, n)| {
            let at = format!("{field}.networks[{j}]");
            let start = parse_ip(&format!("{at}.start"), &n.start)?;
            let end = parse_ip(&format!("{at}.end"), &n.end)?;
            if start > end {
                return Err(Invalid::new(at, format!("start {start} is after end {end}")));
            }
            Ok(AddressRange { start, end })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if networks.is_empty() {
        return Err(Invalid::new(
            format!("{field}.networks"),
            "must list at least one address range",
        ));
    }
    let ports = r
        .ports
        .iter()
        .flatten()
        .enumerate()
        .map(|(j, p)| {
            let at = format!("{field}.ports[{j}]");
            let (start, end) = check_ports(&at, p.start, p.end.unwrap_or(p.start))?;
            Ok(PortSpan { start, end })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !ports.is_empty() && !matches!(protocol, NetOutProtocol::Tcp | NetOutProtocol::Udp) {
        return Err(Invalid::new(format!("{field}.ports"), "only tcp and udp rules have ports"));
    }
    let icmps = match &r.icmps {
        None => None,
        Some(i) => {
            if protocol != NetOutProtocol::Icmp {
                return Err(Invalid::new(format!("{field}.icmps"), "only icmp rules have icmps"));
            }
            let byte = |key: &str, n: i64| {
                u8::try_from(n)
                    .map_err(|_| Invalid::new(format!("{field}.icmps.{key}"), "must be 0-255"))
            };
            let icmp_type = byte("type", i.icmp_type)?;
            let code = i.code.map(|c| byte("code", c)).transpose()?;
            Some(IcmpMatch { icmp_type, code })
        }
    };
    Ok(NetOutRule { protocol, networks, ports, icmps, log: r.log.unwrap_or(false) })
}

/// A rule as `GET /v1/asgs` lists it (protocols by name).
pub fn net_out_rule_shape(r: &NetOutRule) -> wire::NetOutRule {
    let protocol = match r.protocol {
        NetOutProtocol::All => "all",
        NetOutProtocol::Tcp => "tcp",
        NetOutProtocol::Udp => "udp",
        NetOutProtocol::Icmp => "icmp",
    };
    wire::NetOutRule {
        protocol: Some(wire::NetOutProtocol::Name(protocol.to_owned())),
        networks: Some(
            r.networks
                .iter()
                .map(|n| wire::Network { start: n.start.to_string(), end: n.end.to_string() })
                .collect(),
        ),
        ports: (!r.ports.is_empty()).then(|| {
            r.ports
                .iter()
                .map(|p| wire::NetOutPorts { start: p.start.into(), end: Some(p.end.into()) })
                .collect()
        }),
        icmps: r
            .icmps
            .map(|i| wire::Icmps { icmp_type: i.icmp_type.into(), code: i.code.map(i64::from) }),
        log: r.log.then_some(true),
    }
}

/// A NetIn mapping (protocol absent: tcp).
fn port_mapping(field: &str, m: &wire::PortMapping) -> Result<PortMapping, Invalid> {
    let port = |name: &str, n: i64| {
        u16::try_from(n)
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| Invalid::new(field, format!("{name} {n} is not a port (1-65535)")))
    };
    let protocol = match &m.protocol {
        None => Protocol::Tcp,
        Some(p) => parse_transport(&format!("{field}.protocol"), p)?,
    };
    Ok(PortMapping {
        host_port: port("host_port", m.host_port)?,
        container_port: port("container_port", m.container_port)?,
        protocol,
    })
}

/// `{"app","ip"/"ips","ifname","netns","port_mappings"}`.
pub fn parse_endpoint(v: &Value) -> Result<Endpoint, Invalid> {
    let e: wire::Endpoint = shape(v, "")?;
    check_app_id("app", &e.app)?;
    for (field, value) in [("space_id", &e.space_id), ("container_workload", &e.container_workload)]
    {
        if let Some(value) = value {
            check_app_id(field, value)?;
        }
    }
    let (ip, ipv6) = endpoint_addresses(&e)?;
    let port_mappings = e
        .port_mappings
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, m)| port_mapping(&format!("port_mappings[{i}]"), m))
        .collect::<Result<Vec<_>, _>>()?;
    if !port_mappings.is_empty() && ip.is_ipv6() {
        return Err(Invalid::new(
            "port_mappings",
            "NetIn port mappings lead to an IPv4 address; this endpoint has none",
        ));
    }
    Ok(Endpoint {
        ip,
        ipv6,
        app: e.app.into(),
        ifname: e.ifname,
        netns: e.netns,
        host: None,
        port_mappings,
        space_id: e.space_id,
        workload: e.container_workload,
    })
}

/// `{"app","domain","hostname"}` (domain absent: `apps.internal`; checked
/// where the route is mapped).
pub fn parse_route(v: &Value) -> Result<wire::Route, Invalid> {
    shape(v, "")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::state::{INTERNAL_DOMAIN, Protocol};

    #[test]
    fn takes_cloud_foundrys_documented_body_unchanged() {
        let body: Value = serde_json::from_str(include_str!(
            "../../../fixtures/cf-policy-server/external-policies-post.json"
        ))
        .unwrap();
        let policies = parse_policies(&body).unwrap();
        assert_eq!(policies.len(), 2);
        assert_eq!(policies[0].source, "1081ceac-f5c4-47a8-95e8-88e1e302efb5");
        assert_eq!(
            (policies[0].protocol, policies[0].start, policies[0].end),
            (Protocol::Tcp, 1234, 1235)
        );
        // And renders policies in the documented GET shape.
        let listed: Value = serde_json::from_str(include_str!(
            "../../../fixtures/cf-policy-server/external-policies-get-response.json"
        ))
        .unwrap();
        assert_eq!(listed["policies"][0], policy_json(&policies[0]));
        // What the CLI sends parses back to the same policies.
        assert_eq!(parse_policies(&policies_body(&policies)).unwrap(), policies);
    }

    #[test]
    fn icmp_policies_round_trip_with_type_and_code() {
        for destination in [
            json!({"id": "b", "protocol": "icmp"}),
            json!({"id": "b", "protocol": "icmp", "icmp_type": 0}),
            json!({"id": "b", "protocol": "icmp", "icmp_type": 8}),
            json!({"id": "b", "protocol": "icmp", "icmp_type": 3, "icmp_code": 13}),
        ] {
            let body = json!({"policies": [{"source": {"id": "a"}, "destination": destination}]});
            let policies = parse_policies(&body).unwrap();
            assert_eq!(policies[0].protocol, Protocol::Icmp);
            assert_eq!(policy_json(&policies[0])["destination"], destination);
        }
        let echo = json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "icmp", "icmp_type": 8}}]});
        let policy = &parse_policies(&echo).unwrap()[0];
        // What the kernel matches: type << 8 | code, any code.
        assert_eq!((policy.start, policy.end), (0x0800, 0x08ff));
        assert_eq!(destination_text(&policy_json(policy)["destination"]), "type 8");
    }

    #[test]
    fn routes_and_endpoints_round_trip() {
        let route = parse_route(&json!({"app": "b", "hostname": "api"})).unwrap();
        assert_eq!(route.domain(), INTERNAL_DOMAIN);
        assert_eq!(parse_route(&to_json(&route)).unwrap(), route);
        let endpoint = Endpoint {
            ip: Ipv4Addr::new(10, 255, 0, 2).into(),
            ipv6: None,
            app: "b".into(),
            ifname: "hv0".into(),
            netns: Some("/var/run/netns/x".into()),
            host: None,
            port_mappings: Vec::new(),
            space_id: None,
            workload: None,
        };
        assert_eq!(parse_endpoint(&endpoint_json(&endpoint)).unwrap(), endpoint);
        assert_eq!(
            parse_endpoint(&json!({"app": "b", "ip": "x", "ifname": "v"})).unwrap_err().field,
            "ip"
        );
    }

    #[test]
    fn bad_policies_name_the_field() {
        let cases = [
            (json!({}), "policies"),
            (json!({"policies": []}), "policies"),
            (
                json!({"policies": [{"destination": {"id": "b", "protocol": "tcp", "ports": {"start": 1, "end": 1}}}]}),
                "policies[0].source",
            ),
            (
                json!({"policies": [{"source": {"id": ""}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 1, "end": 1}}}]}),
                "policies[0].source.id",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "sctp", "ports": {"start": 1, "end": 1}}}]}),
                "policies[0].destination.protocol",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "icmp", "ports": {"start": 1, "end": 1}}}]}),
                "policies[0].destination.ports",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "icmp", "icmp_code": 1}}]}),
                "policies[0].destination.icmp_code",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "icmp", "icmp_type": -1}}]}),
                "policies[0].destination.icmp_type",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "udp", "port": 53, "icmp_type": 8}}]}),
                "policies[0].destination.icmp_type",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "icmp"}, "tls_only": true}]}),
                "policies[0].tls_only",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 0, "end": 1}}}]}),
                "policies[0].destination.ports.start",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 9, "end": 8}}}]}),
                "policies[0].destination.ports",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 1, "end": 65536}}}]}),
                "policies[0].destination.ports.end",
            ),
            (
                json!({"policies": [{"source": {"id": "a", "tag": "0001"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": 1, "end": 1}}}]}),
                "policies[0].source.tag",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "tcp"}}]}),
                "policies[0].destination.ports",
            ),
            (
                json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "tcp", "ports": {"start": "80", "end": 80}}}]}),
                "policies[0].destination.ports.start",
            ),
            (json!({"policies": {"source": "a"}}), "policies"),
            (json!("policies"), "body"),
        ];
        for (body, field) in cases {
            let from_tree = parse_policies(&body).unwrap_err();
            assert_eq!(from_tree.field, field, "{body}");
            // From the request's bytes: the same field and reason.
            let from_text = parse_policies_json(body.to_string().as_bytes()).unwrap_err();
            assert_eq!(from_text, from_tree, "{body}");
        }
        for text in ["", "{", "{\"policies\": []} x", "nope"] {
            let e = parse_policies_json(text.as_bytes()).unwrap_err();
            assert_eq!(e.field, "body", "{text}");
            assert!(e.reason.starts_with("invalid JSON: "), "{text}: {e:?}");
        }
        let single = json!({"policies": [{"source": {"id": "a"}, "destination": {"id": "b", "protocol": "udp", "port": 53}}]});
        assert_eq!(parse_policies(&single).unwrap()[0].start, 53);
    }

    #[test]
    fn endpoint_addresses_take_one_per_family() {
        let parse = |v: Value| parse_endpoint(&v).map(|e| (e.ip, e.ipv6));
        let base = |ips: Value| json!({"app": "a", "ifname": "hv0", "ips": ips});
        let v4: IpAddr = "10.255.0.2".parse().unwrap();
        let v6: Ipv6Addr = "fd00:255::2".parse().unwrap();
        assert_eq!(parse(json!({"app": "a", "ifname": "hv0", "ip": "10.255.0.2"})), Ok((v4, None)));
        assert_eq!(parse(base(json!(["fd00:255::2", "10.255.0.2"]))), Ok((v4, Some(v6))));
        // `ip` and `ips` together; the same address twice is one.
        let both = json!({"app": "a", "ifname": "hv0", "ip": "10.255.0.2", "ips": ["fd00:255::2", "10.255.0.2"]});
        assert_eq!(parse(both), Ok((v4, Some(v6))));
        // IPv6-only: keyed by its IPv6 address; NetIn needs an IPv4 one.
        assert_eq!(parse(base(json!(["fd00:255::2"]))), Ok((IpAddr::V6(v6), Some(v6))));
        let mapped = json!({"app": "a", "ifname": "hv0", "ip": "fd00:255::2",
            "port_mappings": [{"host_port": 8080, "container_port": 80}]});
        assert_eq!(parse(mapped).unwrap_err().field, "port_mappings");
        for (ips, field, says) in [
            (json!(["10.255.0.2", "10.255.0.3"]), "ips[1]", "one per family"),
            (json!(["10.255.0.2", "fd00::1", "fd00::2"]), "ips[2]", "one per family"),
            (json!(["10.255.0.2", "fe80::1"]), "ips[1]", "link-local"),
            (json!(["10.255.0.2", "ff02::1"]), "ips[1]", "multicast"),
            (json!(["10.255.0.2", "::"]), "ips[1]", "unspecified"),
            (json!(["10.255.0.2", "::ffff:10.0.0.1"]), "ips[1]", "IPv4-mapped"),
            (json!(["0.0.0.0"]), "ips[0]", "unspecified"),
            (json!(["fd00::1", "255.255.255.255"]), "ips[1]", "broadcast"),
            (json!(["224.0.0.1"]), "ips[0]", "multicast"),
            (json!(["127.0.0.1"]), "ips[0]", "loopback"),
            (json!(["10.255.0.2", "nope"]), "ips[1]", "not an IP address"),
            (json!(["10.255.0.2", 7]), "ips[1]", "must be a string"),
            (json!("10.255.0.2"), "ips", "must be a list"),
        ] {
            let err = parse(base(ips.clone())).unwrap_err();
            assert_eq!(err.field, field, "{ips}: {err}");
            assert!(err.reason.contains(says), "{ips}: {err}");
        }
        let err = parse(json!({"app": "a", "ifname": "hv0"})).unwrap_err();
        assert_eq!((err.field.as_str(), err.reason.as_str()), ("ip", "missing"));
    }
}
