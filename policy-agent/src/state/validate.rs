//! Every check on input, in one place: ids, ports, hostnames, interface
//! names, and the checks a change must pass against the current state
//! (TLS-only policies, the per-source limit, the per-pair range limit) —
//! all made before anything changes, so a refused request changes nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, Ipv6Addr},
};

use policy_common::ports::{Allowance, MAX_PORT_RANGES, PortsError};

use super::{
    State,
    model::{AppName, Endpoint, INTERNAL_DOMAIN, IcmpTypes, Policy, Protocol},
};
use policy_common::maps::PortRules;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_IFNAME_LEN: usize = 15;

/// Why a change was refused. `field` names the offending input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

impl std::fmt::Display for Invalid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

impl std::error::Error for Invalid {}

/// Checks an app id (the rule is shared with the CNI plugin:
/// [`policy_api::check_app_id`]).
pub fn check_app_id(field: &str, id: &str) -> Result<(), Invalid> {
    policy_api::check_app_id(id).map_err(|e| Invalid::new(field, e.to_string()))
}

/// Checks a port range (1-65535, start <= end).
pub fn check_ports(field: &str, start: i64, end: i64) -> Result<(u16, u16), Invalid> {
    for (name, port) in [("start", start), ("end", end)] {
        if !(1..=65535).contains(&port) {
            return Err(Invalid::new(
                format!("{field}.{name}"),
                format!("{port} is not a port in 1-65535"),
            ));
        }
    }
    if start > end {
        return Err(Invalid::new(field, format!("start {start} is greater than end {end}")));
    }
    Ok((start as u16, end as u16))
}

/// Parses `PORT` or `START-END` (the CLI's form) and checks it like
/// [`check_ports`].
pub fn parse_port_range(field: &str, text: &str) -> Result<(u16, u16), Invalid> {
    let (start, end) = match text.split_once('-') {
        Some((a, b)) => (a.trim(), b.trim()),
        None => (text.trim(), text.trim()),
    };
    let number = |s: &str| -> Result<i64, Invalid> {
        s.parse().map_err(|_| {
            Invalid::new(field, format!("{text:?} is not PORT or START-END (ports 1-65535)"))
        })
    };
    check_ports(field, number(start)?, number(end)?)
}

/// Parses a policy's protocol name.
pub fn parse_protocol(field: &str, text: &str) -> Result<Protocol, Invalid> {
    Protocol::parse(text)
        .ok_or_else(|| Invalid::new(field, format!("{text:?} is not tcp, udp, icmp or icmpv6")))
}

/// Parses a transport protocol name (tcp or udp: NetIn mappings).
pub fn parse_transport(field: &str, text: &str) -> Result<Protocol, Invalid> {
    Protocol::parse(text)
        .filter(|p| p.has_ports())
        .ok_or_else(|| Invalid::new(field, format!("{text:?} is not tcp or udp")))
}

/// Checks an icmp policy's type and code (`field` names the policy's
/// destination): each 0-255, a code only with a type.
pub fn check_icmp_types(
    field: &str,
    icmp_type: Option<i64>,
    code: Option<i64>,
) -> Result<IcmpTypes, Invalid> {
    let byte = |name: &str, n: i64| {
        u8::try_from(n)
            .map_err(|_| Invalid::new(format!("{field}.{name}"), format!("{n} is not 0-255")))
    };
    let icmp_type = icmp_type.map(|t| byte("icmp_type", t)).transpose()?;
    let code = code.map(|c| byte("icmp_code", c)).transpose()?;
    if icmp_type.is_none() && code.is_some() {
        return Err(Invalid::new(format!("{field}.icmp_code"), "needs an icmp_type"));
    }
    Ok(IcmpTypes { icmp_type, code })
}

/// Checks a host-side interface name as Linux would take it.
pub fn check_ifname(field: &str, ifname: &str) -> Result<(), Invalid> {
    if ifname.is_empty()
        || ifname.len() > MAX_IFNAME_LEN
        || ifname.contains('/')
        || ifname.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(Invalid::new(field, "not a valid interface name"));
    }
    Ok(())
}

/// Checks an endpoint's fields.
pub fn check_endpoint(endpoint: &Endpoint) -> Result<(), Invalid> {
    check_app_id("app", &endpoint.app)?;
    check_ifname("ifname", &endpoint.ifname)
}

/// Checks that an endpoint's veth exists in the agent's network namespace
/// (`exists`: the kernel's answer), before anything changes.
pub fn check_veth_exists(
    endpoint: &Endpoint,
    exists: impl FnOnce(&str) -> bool,
) -> Result<(), Invalid> {
    if exists(&endpoint.ifname) { Ok(()) } else { Err(missing_veth(&endpoint.ifname)) }
}

/// The refusal of an endpoint whose veth is not in the agent's network
/// namespace (also when it vanished between the check and the attach).
pub fn missing_veth(ifname: &str) -> Invalid {
    Invalid::new("ifname", format!("interface {ifname} not found in the agent's network namespace"))
}

/// Checks and normalises a route hostname: one DNS label (RFC 1035: 1-63
/// letters, digits and hyphens, not starting or ending with a hyphen),
/// lower-cased.
pub fn check_hostname(field: &str, hostname: &str) -> Result<String, Invalid> {
    let label = hostname.to_ascii_lowercase();
    if label.is_empty() || label.len() > 63 {
        return Err(Invalid::new(field, "must be 1 to 63 characters (one DNS label)"));
    }
    if !label.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return Err(Invalid::new(
            field,
            format!("{hostname:?} may hold only letters, digits and hyphens"),
        ));
    }
    if label.starts_with('-') || label.ends_with('-') {
        return Err(Invalid::new(
            field,
            format!("{hostname:?} must not start or end with a hyphen"),
        ));
    }
    Ok(label)
}

/// Checks the domain of a route: only [`INTERNAL_DOMAIN`].
pub fn check_domain(field: &str, domain: &str) -> Result<(), Invalid> {
    if domain.trim_end_matches('.').eq_ignore_ascii_case(INTERNAL_DOMAIN) {
        Ok(())
    } else {
        Err(Invalid::new(field, format!("{domain:?}: only the {INTERNAL_DOMAIN} domain is served")))
    }
}

impl State {
    /// Everything registering `endpoint` (new, or replacing the endpoint
    /// with its key) must satisfy against the current state, checked before
    /// any change: its own fields, its NetIn ports, and that it takes
    /// nothing another endpoint holds — its key on another host, its IPv6
    /// address, its veth. Local writes in both modes come through here
    /// (changes other agents committed were checked where they were made).
    pub fn check_endpoint_add(&self, endpoint: &Endpoint) -> Result<(), Invalid> {
        check_endpoint(endpoint)?;
        self.check_port_mappings(endpoint)?;
        if let Some(other) = self.endpoint(endpoint.ip).and_then(|e| e.host.as_ref())
            && endpoint.host.as_ref() != Some(other)
        {
            return Err(Invalid::new(
                "ip",
                format!("{} is an endpoint on host {other}; remove it there first", endpoint.ip),
            ));
        }
        if let Some(ipv6) = endpoint.ipv6
            && let Some(other) = self.endpoint_by_ipv6(ipv6).filter(|e| e.ip != endpoint.ip)
        {
            return Err(Invalid::new(
                "ips",
                format!("{ipv6} is already the IPv6 address of endpoint {}", other.ip),
            ));
        }
        self.check_veth_free(endpoint)
    }

    /// One veth is one endpoint: the programs on a veth, its anti-spoofing
    /// binding (`VETHS`, keyed by ifindex) and its attachment belong to one
    /// endpoint, and removing an endpoint detaches its veth. A second
    /// endpoint on the same veth would overwrite the first's binding, and
    /// removing either would leave the other listed but unpoliced. So a
    /// veth another endpoint (another key) holds on the same host is
    /// refused; re-registering the holder itself (same key: a new app, a new
    /// IPv6 address, the same again) is not. Dual stack is one endpoint with
    /// both addresses, not two. Interface names are per host: in a cluster
    /// another host's endpoint may have the same name.
    fn check_veth_free(&self, endpoint: &Endpoint) -> Result<(), Invalid> {
        let holder = self.endpoints().find(|e| {
            e.ip != endpoint.ip && e.host == endpoint.host && e.ifname == endpoint.ifname
        });
        match holder {
            None => Ok(()),
            Some(holder) => {
                let addresses: Vec<String> = holder.addresses().map(|a| a.to_string()).collect();
                Err(Invalid::new(
                    "ifname",
                    format!(
                        "interface {} is the veth of endpoint {} (app {}); one veth is one endpoint: remove that endpoint first, or register both addresses as one endpoint (dual stack)",
                        endpoint.ifname,
                        addresses.join(" "),
                        holder.app
                    ),
                ))
            }
        }
    }

    /// NetIn: ports 1-65535, and a host port (per protocol) leads to one
    /// container on its host.
    pub fn check_port_mappings(&self, endpoint: &Endpoint) -> Result<(), Invalid> {
        let mut seen = BTreeSet::new();
        for (i, m) in endpoint.port_mappings.iter().enumerate() {
            let field = format!("port_mappings[{i}]");
            if m.host_port == 0 || m.container_port == 0 {
                return Err(Invalid::new(field, "host_port and container_port must be 1-65535"));
            }
            if !m.protocol.has_ports() {
                return Err(Invalid::new(field, "a port mapping is tcp or udp"));
            }
            let proto = m.protocol.name();
            if !seen.insert((m.host_port, m.protocol)) {
                return Err(Invalid::new(
                    field,
                    format!("host port {}/{proto} is listed twice", m.host_port),
                ));
            }
            let taken = self.endpoints().find(|e| {
                e.ip != endpoint.ip
                    && e.host == endpoint.host
                    && e.port_mappings
                        .iter()
                        .any(|o| o.host_port == m.host_port && o.protocol == m.protocol)
            });
            if let Some(other) = taken {
                return Err(Invalid::new(
                    field,
                    format!("host port {}/{proto} already leads to {}", m.host_port, other.ip),
                ));
            }
        }
        Ok(())
    }

    /// Everything adding `policies` must satisfy, checked before any change:
    /// TLS-only policies cover the port platform TLS fronts; no source app
    /// goes past `limit` policies; no app pair and protocol needs more port
    /// ranges than its kernel entry holds.
    pub(super) fn check_add(
        &self,
        policies: &[Policy],
        limit: Option<usize>,
    ) -> Result<(), Invalid> {
        for (i, p) in policies.iter().enumerate() {
            let well_formed = if p.protocol.has_ports() {
                p.start >= 1 && p.start <= p.end
            } else {
                p.icmp_types().is_some() && !p.tls_only
            };
            if !well_formed {
                return Err(Invalid::new(
                    format!("policies[{i}].destination"),
                    format!("{}-{} is not a {} policy's range", p.start, p.end, p.protocol.name()),
                ));
            }
        }
        for (i, p) in policies.iter().enumerate().filter(|(_, p)| p.tls_only) {
            let field = format!("policies[{i}].tls_only");
            let Some(front) = self.tls_front(&p.destination) else {
                return Err(Invalid::new(field, "platform TLS is off on this agent"));
            };
            if p.protocol != Protocol::Tcp || p.start > front.app_port || front.app_port > p.end {
                return Err(Invalid::new(
                    field,
                    format!(
                        "a TLS-only policy must be tcp and cover port {}, the port platform TLS fronts",
                        front.app_port
                    ),
                ));
            }
        }
        // Per app pair: its policies held (one probe of the set), the
        // request's new ones, and whether they all fit one entry.
        let mut per_pair: BTreeMap<(&AppName, &AppName, Protocol), Vec<&Policy>> = BTreeMap::new();
        for p in policies {
            per_pair.entry((&p.source, &p.destination, p.protocol)).or_default().push(p);
        }
        let mut new_per_source: BTreeMap<&str, usize> = BTreeMap::new();
        // The limit's error first, where both apply (as before).
        let mut unfit = None;
        for ((source, destination, protocol), mut requested) in per_pair {
            let held = self.policies.pair(source, destination, protocol);
            requested.sort_unstable();
            requested.dedup();
            requested.retain(|p| !held.iter().any(|h| h.same_policy(p)));
            if requested.is_empty() {
                continue;
            }
            *new_per_source.entry(source.as_str()).or_default() += requested.len();
            let mut allowances: Vec<Allowance> = held
                .iter()
                .flat_map(|&h| self.allowances_of_ports(destination, protocol, h))
                .collect();
            // Ids do not matter for the count: identical ranges share an entry.
            allowances.extend(requested.iter().flat_map(|p| self.allowances_of(p, u32::MAX)));
            if let Err(e) = check_pair_fits(&allowances) {
                unfit.get_or_insert_with(|| {
                    Invalid::new(
                        "policies",
                        format!("{e} ({source} to {destination}, {})", protocol.name()),
                    )
                });
            }
        }
        if let Some(limit) = limit {
            for (source, added) in new_per_source {
                let total = self.policies_of(source) + added;
                if total > limit {
                    return Err(Invalid::new(
                        "policies",
                        format!(
                            "source app {source} would have {total} policies; the limit per source app is {limit}"
                        ),
                    ));
                }
            }
        }
        unfit.map_or(Ok(()), Err)
    }
}

/// Whether one app pair's allowances fit its kernel entry (the same
/// function builds the entry).
fn check_pair_fits(allowances: &[Allowance]) -> Result<(), PortsError> {
    // What the build refuses: a reversed range, or more distinct ranges
    // than the entry holds; far fewer need no 2 KiB entry built to know.
    if allowances.len() <= MAX_PORT_RANGES && allowances.iter().all(|a| a.start <= a.end) {
        return Ok(());
    }
    PortRules::build(allowances).map(|_| ())
}

/// An IPv4 address a container can have: not unspecified (0.0.0.0 is how
/// the programs mark an endpoint without IPv4), broadcast, multicast or
/// loopback.
pub fn check_endpoint_ipv4(field: &str, a: Ipv4Addr) -> Result<(), Invalid> {
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
pub fn check_endpoint_ipv6(field: &str, a: Ipv6Addr) -> Result<(), Invalid> {
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
