//! The API's JSON shapes, both ways, in one place: Cloud Foundry's
//! policy-server bodies (taken and given unchanged; `tls_only` is our
//! documented extension), endpoints and routes. The server parses and
//! renders with these; the CLI builds its requests with them.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
};

use serde_json::{Value, json};

use crate::state::{
    AddressRange, Endpoint, INTERNAL_DOMAIN, IcmpMatch, Invalid, NetOutProtocol, NetOutRule,
    Policy, PortMapping, PortSpan, Protocol, check_app_id, check_icmp_types, check_ports,
    parse_protocol, parse_transport,
};

fn str_field<'a>(value: &'a Value, key: &str, field: &str) -> Result<&'a str, Invalid> {
    match value.get(key) {
        None | Some(Value::Null) => Err(Invalid::new(field, "missing")),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(Invalid::new(field, "must be a string")),
    }
}

fn port_field(value: &Value, field: &str) -> Result<i64, Invalid> {
    match value {
        Value::Number(n) => n.as_i64().ok_or_else(|| Invalid::new(field, "must be an integer")),
        Value::Null => Err(Invalid::new(field, "missing")),
        _ => Err(Invalid::new(field, "must be an integer")),
    }
}

/// Parses an IPv4 address named by `field`.
pub fn parse_ip(field: &str, text: &str) -> Result<Ipv4Addr, Invalid> {
    text.parse().map_err(|_| Invalid::new(field, format!("{text:?} is not an IPv4 address")))
}

/// An endpoint's addresses: `ip` (one address, either family) and/or
/// `ips` (a list), at most one per family. Returns its key (the IPv4
/// address, or the IPv6 one of an IPv6-only endpoint) and its IPv6 address.
fn parse_endpoint_addresses(v: &Value) -> Result<(IpAddr, Option<Ipv6Addr>), Invalid> {
    let mut texts: Vec<(String, &str)> = Vec::new();
    match v.get("ip") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => texts.push(("ip".into(), s)),
        Some(_) => return Err(Invalid::new("ip", "must be a string")),
    }
    match v.get("ips") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for (i, item) in list.iter().enumerate() {
                let Value::String(s) = item else {
                    return Err(Invalid::new(format!("ips[{i}]"), "must be a string"));
                };
                texts.push((format!("ips[{i}]"), s));
            }
        }
        Some(_) => return Err(Invalid::new("ips", "must be a list of addresses")),
    }
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

fn not_an_endpoint_address(
    field: &str,
    a: impl std::fmt::Display,
    bad: Option<&str>,
) -> Result<(), Invalid> {
    match bad {
        Some(why) => Err(Invalid::new(field, format!("{a} is {why}: not an endpoint address"))),
        None => Ok(()),
    }
}

/// An IPv4 address a container can have: not unspecified (0.0.0.0 is how
/// the programs mark an endpoint without IPv4), broadcast, multicast or
/// loopback.
fn check_endpoint_ipv4(field: &str, a: Ipv4Addr) -> Result<(), Invalid> {
    let bad = if a.is_unspecified() || a.is_broadcast() {
        Some("unspecified or broadcast")
    } else if a.is_multicast() {
        Some("multicast")
    } else if a.is_loopback() {
        Some("loopback")
    } else {
        None
    };
    not_an_endpoint_address(field, a, bad)
}

/// An address a container can be reached at across hosts: not link-local
/// (every container has its own, which names no one), multicast, loopback,
/// unspecified or IPv4-mapped.
fn check_endpoint_ipv6(field: &str, a: Ipv6Addr) -> Result<(), Invalid> {
    let bad = if a.is_unspecified() || a.is_loopback() {
        Some("unspecified or loopback")
    } else if a.is_multicast() {
        Some("multicast")
    } else if a.segments()[0] & 0xffc0 == 0xfe80 {
        Some("link-local")
    } else if a.to_ipv4_mapped().is_some() {
        Some("IPv4-mapped (give the IPv4 address itself)")
    } else {
        None
    };
    not_an_endpoint_address(field, a, bad)
}

/// Parses `{"policies": [...]}` in Cloud Foundry's shape. The first problem
/// found is reported with the path of the field.
pub fn parse_policies(body: &Value) -> Result<Vec<Policy>, Invalid> {
    let list = match body.get("policies") {
        Some(Value::Array(list)) if !list.is_empty() => list,
        Some(Value::Array(_)) => return Err(Invalid::new("policies", "must not be empty")),
        Some(_) => return Err(Invalid::new("policies", "must be an array")),
        None => return Err(Invalid::new("policies", "missing")),
    };
    list.iter()
        .enumerate()
        .map(|(i, p)| parse_policy(p, &|f| format!("policies[{i}].{f}")))
        .collect()
}

fn parse_policy(p: &Value, at: &dyn Fn(&str) -> String) -> Result<Policy, Invalid> {
    let source = p
        .get("source")
        .filter(|s| s.is_object())
        .ok_or_else(|| Invalid::new(at("source"), "missing or not an object"))?;
    let dest = p
        .get("destination")
        .filter(|d| d.is_object())
        .ok_or_else(|| Invalid::new(at("destination"), "missing or not an object"))?;
    for (side, name) in [(source, "source"), (dest, "destination")] {
        if side.get("tag").is_some() {
            return Err(Invalid::new(
                at(&format!("{name}.tag")),
                "tags are assigned by the agent, not by clients",
            ));
        }
    }
    let source_id = str_field(source, "id", &at("source.id"))?;
    check_app_id(&at("source.id"), source_id)?;
    let dest_id = str_field(dest, "id", &at("destination.id"))?;
    check_app_id(&at("destination.id"), dest_id)?;
    let protocol_field = at("destination.protocol");
    let protocol = parse_protocol(&protocol_field, str_field(dest, "protocol", &protocol_field)?)?;
    let icmp_keys = ["icmp_type", "icmp_code"].map(|k| dest.get(k).filter(|v| !v.is_null()));
    let (start, end) = if protocol.has_ports() {
        if let Some(key) =
            ["icmp_type", "icmp_code"].iter().zip(icmp_keys).find(|(_, v)| v.is_some())
        {
            return Err(Invalid::new(
                at(&format!("destination.{}", key.0)),
                format!("only icmp policies have one ({} policies have ports)", protocol.name()),
            ));
        }
        transport_ports(dest, at)?
    } else {
        if dest.get("ports").is_some() || dest.get("port").is_some() {
            return Err(Invalid::new(
                at("destination.ports"),
                "icmp policies have no ports: give icmp_type (and icmp_code), or neither for all ICMP",
            ));
        }
        let number = |v: Option<&Value>, key: &str| {
            v.map(|v| port_field(v, &at(&format!("destination.{key}")))).transpose()
        };
        let icmp_type = number(icmp_keys[0], "icmp_type")?;
        let code = number(icmp_keys[1], "icmp_code")?;
        check_icmp_types(&at("destination"), icmp_type, code)?.range()
    };
    let tls_only = match p.get("tls_only") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Invalid::new(at("tls_only"), "must be true or false")),
    };
    if tls_only && !protocol.has_ports() {
        return Err(Invalid::new(at("tls_only"), "a TLS-only policy must be tcp"));
    }
    Ok(Policy {
        source: source_id.to_owned(),
        destination: dest_id.to_owned(),
        protocol,
        start,
        end,
        tls_only,
    })
}

/// A tcp or udp policy's `ports` (or the older single `port`).
fn transport_ports(dest: &Value, at: &dyn Fn(&str) -> String) -> Result<(u16, u16), Invalid> {
    Ok(match (dest.get("ports"), dest.get("port")) {
        (Some(ports @ Value::Object(_)), _) => {
            let start = port_field(
                ports.get("start").unwrap_or(&Value::Null),
                &at("destination.ports.start"),
            )?;
            let end =
                port_field(ports.get("end").unwrap_or(&Value::Null), &at("destination.ports.end"))?;
            check_ports(&at("destination.ports"), start, end)?
        }
        (Some(_), _) => {
            return Err(Invalid::new(
                at("destination.ports"),
                "must be an object with start and end",
            ));
        }
        // The older single-port form.
        (None, Some(port)) => {
            let port = port_field(port, &at("destination.port"))?;
            check_ports(&at("destination.port"), port, port)?
        }
        (None, None) => return Err(Invalid::new(at("destination.ports"), "missing")),
    })
}

/// One policy in Cloud Foundry's shape; an icmp policy has `icmp_type` and
/// `icmp_code` (where it names them) in place of `ports`.
pub fn policy_json(p: &Policy) -> Value {
    let mut destination = json!({"id": p.destination, "protocol": p.protocol.name()});
    match p.icmp_types() {
        Some(icmp) => {
            if let Some(t) = icmp.icmp_type {
                destination["icmp_type"] = json!(t);
            }
            if let Some(c) = icmp.code {
                destination["icmp_code"] = json!(c);
            }
        }
        None => destination["ports"] = json!({"start": p.start, "end": p.end}),
    }
    let mut v = json!({"source": {"id": p.source}, "destination": destination});
    if p.tls_only {
        v["tls_only"] = json!(true);
    }
    v
}

/// What a policy's destination allows, as the CLI prints it: `8080`,
/// `8080-8090`, `type 8`, `type 3 code 13`, `any`.
pub fn destination_text(destination: &Value) -> String {
    if destination["protocol"] == "icmp" || destination["protocol"] == "icmpv6" {
        return match (&destination["icmp_type"], &destination["icmp_code"]) {
            (Value::Null, _) => "any".into(),
            (t, Value::Null) => format!("type {t}"),
            (t, c) => format!("type {t} code {c}"),
        };
    }
    let (start, end) = (&destination["ports"]["start"], &destination["ports"]["end"]);
    if start == end { start.to_string() } else { format!("{start}-{end}") }
}

/// `{"policies": [...]}`: the body of a policy write.
pub fn policies_body(policies: &[Policy]) -> Value {
    json!({"policies": policies.iter().map(policy_json).collect::<Vec<_>>()})
}

/// `{"total_policies": N, "policies": [...]}`: a policy listing.
pub fn policy_list(policies: Vec<Value>) -> Value {
    json!({"total_policies": policies.len(), "policies": policies})
}

/// `{"ip","app","ifname","netns"}`, and `"host"` in cluster mode.
pub fn endpoint_json(e: &Endpoint) -> Value {
    let ips: Vec<String> = e.addresses().map(|a| a.to_string()).collect();
    let mut v = json!({
        "ip": e.ip.to_string(),
        "ips": ips,
        "app": e.app,
        "ifname": e.ifname,
        "netns": e.netns,
    });
    if let Some(host) = &e.host {
        v["host"] = json!(host);
    }
    if !e.port_mappings.is_empty() {
        v["port_mappings"] = json!(e.port_mappings);
    }
    v
}

/// Security group rules in garden's NetOutRule shape: `protocol` 0-3 or
/// `all`/`tcp`/`udp`/`icmp`; `networks` `[{start, end}]`; `ports`
/// `[{start, end}]` (TCP/UDP); `icmps` `{type, code}` (ICMP); `log`.
pub fn parse_net_out_rules(v: &Value) -> Result<Vec<NetOutRule>, Invalid> {
    let Value::Array(list) = v else {
        return Err(Invalid::new("rules", "must be a list of rules"));
    };
    list.iter().enumerate().map(|(i, r)| parse_net_out_rule(&format!("rules[{i}]"), r)).collect()
}

fn parse_net_out_rule(field: &str, r: &Value) -> Result<NetOutRule, Invalid> {
    let protocol = match r.get("protocol") {
        Some(Value::Number(n)) => match n.as_u64() {
            Some(0) => NetOutProtocol::All,
            Some(1) => NetOutProtocol::Tcp,
            Some(2) => NetOutProtocol::Udp,
            Some(3) => NetOutProtocol::Icmp,
            _ => {
                return Err(Invalid::new(
                    format!("{field}.protocol"),
                    "must be 0-3 or all, tcp, udp, icmp",
                ));
            }
        },
        Some(Value::String(s)) => match s.as_str() {
            "all" => NetOutProtocol::All,
            "tcp" => NetOutProtocol::Tcp,
            "udp" => NetOutProtocol::Udp,
            "icmp" => NetOutProtocol::Icmp,
            _ => {
                return Err(Invalid::new(
                    format!("{field}.protocol"),
                    "must be 0-3 or all, tcp, udp, icmp",
                ));
            }
        },
        None => NetOutProtocol::All,
        Some(_) => {
            return Err(Invalid::new(format!("{field}.protocol"), "must be a number or a name"));
        }
    };
    let list = |key: &str| match r.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) => Ok(items.clone()),
        Some(_) => Err(Invalid::new(format!("{field}.{key}"), "must be a list")),
    };
    let networks = list("networks")?
        .iter()
        .enumerate()
        .map(|(j, n)| {
            let at = format!("{field}.networks[{j}]");
            let start = parse_ip(&format!("{at}.start"), n["start"].as_str().unwrap_or_default())?;
            let end = parse_ip(&format!("{at}.end"), n["end"].as_str().unwrap_or_default())?;
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
    let ports = list("ports")?
        .iter()
        .enumerate()
        .map(|(j, p)| {
            let at = format!("{field}.ports[{j}]");
            let (start, end) = check_ports(
                &at,
                p["start"].as_i64().unwrap_or(0),
                p["end"].as_i64().unwrap_or(p["start"].as_i64().unwrap_or(0)),
            )?;
            Ok(PortSpan { start, end })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if !ports.is_empty() && !matches!(protocol, NetOutProtocol::Tcp | NetOutProtocol::Udp) {
        return Err(Invalid::new(format!("{field}.ports"), "only tcp and udp rules have ports"));
    }
    let icmps = match r.get("icmps") {
        None | Some(Value::Null) => None,
        Some(i) => {
            if protocol != NetOutProtocol::Icmp {
                return Err(Invalid::new(format!("{field}.icmps"), "only icmp rules have icmps"));
            }
            let byte = |key: &str| i.get(key).and_then(Value::as_u64).map(u8::try_from);
            let icmp_type = match byte("type") {
                Some(Ok(t)) => t,
                _ => return Err(Invalid::new(format!("{field}.icmps.type"), "must be 0-255")),
            };
            let code = match byte("code") {
                None => None,
                Some(Ok(c)) => Some(c),
                Some(Err(_)) => {
                    return Err(Invalid::new(format!("{field}.icmps.code"), "must be 0-255"));
                }
            };
            Some(IcmpMatch { icmp_type, code })
        }
    };
    let log = match r.get("log") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(Invalid::new(format!("{field}.log"), "must be true or false")),
    };
    Ok(NetOutRule { protocol, networks, ports, icmps, log })
}

/// NetIn mappings: garden's `{"host_port", "container_port"}` or the CNI
/// convention's `{"hostPort", "containerPort", "protocol"}` (default tcp).
pub fn parse_port_mappings(v: &Value) -> Result<Vec<PortMapping>, Invalid> {
    let list = match v {
        Value::Null => return Ok(Vec::new()),
        Value::Array(list) => list,
        _ => return Err(Invalid::new("port_mappings", "must be a list")),
    };
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let field = format!("port_mappings[{i}]");
            let port = |keys: [&str; 2]| {
                let n = keys.iter().find_map(|k| m.get(*k)).and_then(Value::as_i64).ok_or_else(
                    || {
                        Invalid::new(
                            &field,
                            format!("{} (or {}) must be a number", keys[0], keys[1]),
                        )
                    },
                )?;
                u16::try_from(n).ok().filter(|p| *p != 0).ok_or_else(|| {
                    Invalid::new(&field, format!("{} {n} is not a port (1-65535)", keys[0]))
                })
            };
            let protocol = match m.get("protocol").and_then(Value::as_str) {
                None => Protocol::Tcp,
                Some(p) => parse_transport(&format!("{field}.protocol"), p)?,
            };
            Ok(PortMapping {
                host_port: port(["host_port", "hostPort"])?,
                container_port: port(["container_port", "containerPort"])?,
                protocol,
            })
        })
        .collect()
}

/// `{"app","ip","ifname","netns"}`.
pub fn parse_endpoint(v: &Value) -> Result<Endpoint, Invalid> {
    let app = str_field(v, "app", "app")?;
    check_app_id("app", app)?;
    let (ip, ipv6) = parse_endpoint_addresses(v)?;
    let ifname = str_field(v, "ifname", "ifname")?;
    let netns = match v.get("netns") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(PathBuf::from(s)),
        Some(_) => return Err(Invalid::new("netns", "must be a path")),
    };
    let port_mappings = parse_port_mappings(v.get("port_mappings").unwrap_or(&Value::Null))?;
    if !port_mappings.is_empty() && ip.is_ipv6() {
        return Err(Invalid::new(
            "port_mappings",
            "NetIn port mappings lead to an IPv4 address; this endpoint has none",
        ));
    }
    Ok(Endpoint {
        ip,
        ipv6,
        app: app.to_owned(),
        ifname: ifname.to_owned(),
        netns,
        host: None,
        port_mappings,
    })
}

/// A route: app, domain, hostname.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    pub app: String,
    pub domain: String,
    pub hostname: String,
}

/// `{"app","domain","hostname"}` (domain defaults to `apps.internal`).
pub fn parse_route(v: &Value) -> Result<Route, Invalid> {
    let app = str_field(v, "app", "app")?;
    let domain = match v.get("domain") {
        None | Some(Value::Null) => INTERNAL_DOMAIN,
        Some(Value::String(d)) => d.as_str(),
        Some(_) => return Err(Invalid::new("domain", "must be a string")),
    };
    let hostname = str_field(v, "hostname", "hostname")?;
    Ok(Route { app: app.to_owned(), domain: domain.to_owned(), hostname: hostname.to_owned() })
}

pub fn route_json(route: &Route) -> Value {
    json!({"app": route.app, "domain": route.domain, "hostname": route.hostname})
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Protocol;

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
        assert_eq!(route.domain, INTERNAL_DOMAIN);
        assert_eq!(parse_route(&route_json(&route)).unwrap(), route);
        let endpoint = Endpoint {
            ip: Ipv4Addr::new(10, 255, 0, 2).into(),
            ipv6: None,
            app: "b".into(),
            ifname: "hv0".into(),
            netns: Some("/var/run/netns/x".into()),
            host: None,
            port_mappings: Vec::new(),
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
        ];
        for (body, field) in cases {
            assert_eq!(parse_policies(&body).unwrap_err().field, field, "{body}");
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
