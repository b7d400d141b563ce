//! Which security groups hold for a container and what they allow, as
//! vxlan-policy-agent decides it (silk-release v3.53.0,
//! `vxlan-policy-agent/planner/planner_linux.go` `GetASGRulesAndChains`;
//! `cni-wrapper-plugin/netrules`), as the agent's NetOut rules.
//!
//! Selection, for a container of `space`:
//!
//! 1. staging: every staging default, then every group whose staging
//!    spaces name `space`;
//! 2. app or task: the same with running defaults and running spaces.
//!
//! Conversion of each selected rule:
//!
//! 1. Its destinations first, for every selected rule: one CF cannot
//!    convert fails the whole container ([`BadDestination`]); CF then
//!    leaves the container's rules as they were.
//! 2. The protocol must be exactly `tcp`, `udp`, `icmp` or `all`; CF
//!    makes nothing of any other.
//! 3. `ports`: comma-separated `N` or `A-B`, spaces around numbers
//!    allowed; an item that is neither is dropped (CF drops it silently).
//! 4. tcp and udp need at least one port left, icmp and all must have
//!    none; otherwise CF skips the rule ("invalid-rule").
//! 5. icmp: `type` and `code`, -1 for any.
//!
//! IPv6 destinations are dropped: NetOut rules are IPv4 only. (CF's
//! converter passes them on to IPv4 iptables, which refuses the
//! container's whole chain; the container keeps its old rules.)
//!
//! What CF drops, this drops too, and says so in [`RulesFor::dropped`].
//! Where this differs from CF, it is said at the place.

use super::{AsgRule, SecurityGroup, destination::Destination};
use crate::state::{
    AddressRange, IcmpMatch, NetOutProtocol, NetOutRule, PortSpan, parse_port_range,
};

/// A container's workload, as garden's networker records it
/// (`container_workload`): CF picks its groups by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    App,
    Task,
    Staging,
}

impl Workload {
    /// `app`, `task` or `staging`. Anything else is None: CF gives such a
    /// container no group at all (its egress chain rejects everything).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "app" => Some(Workload::App),
            "task" => Some(Workload::Task),
            "staging" => Some(Workload::Staging),
            _ => None,
        }
    }
}

/// What a container's groups allow, and what of them was left out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RulesFor {
    /// Sorted, each once (CF removes duplicate iptables rules too).
    pub rules: Vec<NetOutRule>,
    /// Rules and parts of rules left out, and why; each once.
    pub dropped: Vec<String>,
}

/// A destination CF cannot convert: it leaves the container's rules as
/// they were, and so should the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "security group {group} ({guid}) rule {rule}: destination {item:?} is not an IP address, CIDR or range A-B (Cloud Foundry keeps the container's rules as they were; fix the group's rule in Cloud Controller)"
)]
pub struct BadDestination {
    pub group: String,
    pub guid: String,
    /// The rule's index in the group's rules, from 0.
    pub rule: usize,
    /// The item of the rule's destination list that is bad.
    pub item: String,
}

/// The NetOut rules of a `workload` container in `space`. A container
/// with no space (garden's `space_id` empty) gets no dynamic groups in
/// CF: its rules stay as they are; callers skip it.
pub fn rules_for(
    groups: &[SecurityGroup],
    space: &str,
    workload: Workload,
) -> Result<RulesFor, BadDestination> {
    let staging = workload == Workload::Staging;
    let holds_by_default =
        |g: &SecurityGroup| if staging { g.staging_default } else { g.running_default };
    let bound_to_space = |g: &SecurityGroup| {
        let spaces = if staging { &g.staging_space_guids } else { &g.running_space_guids };
        spaces.iter().any(|s| s == space)
    };
    // Defaults first, as CF lists them: the first bad destination named
    // is the one CF logs.
    let selected = groups
        .iter()
        .filter(|g| holds_by_default(g))
        .chain(groups.iter().filter(|g| !holds_by_default(g) && bound_to_space(g)));
    let mut out = RulesFor::default();
    for group in selected {
        for (index, rule) in group.rules.iter().enumerate() {
            let mut dropped = |why: String| {
                let why =
                    format!("security group {} ({}) rule {index}: {why}", group.name, group.guid);
                if !out.dropped.contains(&why) {
                    out.dropped.push(why);
                }
            };
            let networks = destinations(rule, &mut dropped).map_err(|item| BadDestination {
                group: group.name.clone(),
                guid: group.guid.clone(),
                rule: index,
                item,
            })?;
            if let Some(rule) = netout_rule(rule, networks, &mut dropped) {
                out.rules.push(rule);
            }
        }
    }
    out.rules.sort();
    out.rules.dedup();
    Ok(out)
}

/// The rule's IPv4 ranges; Err: the item CF cannot convert.
fn destinations(
    rule: &AsgRule,
    dropped: &mut impl FnMut(String),
) -> Result<Vec<AddressRange>, String> {
    let mut networks = Vec::new();
    for item in rule.destination.split(',') {
        match super::destination::parse(item) {
            Some(Destination::Ipv4(range)) => networks.push(range),
            Some(Destination::Ipv6) => {
                dropped(format!("destination {item:?} is IPv6; egress rules are IPv4 only"))
            }
            Some(Destination::Reversed) => {
                dropped(format!("destination {item:?} ends before it starts; it matches nothing"))
            }
            None => return Err(item.to_owned()),
        }
    }
    Ok(networks)
}

/// The rule as the agent's, or None when CF makes nothing of it.
fn netout_rule(
    rule: &AsgRule,
    networks: Vec<AddressRange>,
    dropped: &mut impl FnMut(String),
) -> Option<NetOutRule> {
    let Some(protocol) = NetOutProtocol::parse(&rule.protocol) else {
        dropped(format!("protocol {:?} is not tcp, udp, icmp or all", rule.protocol));
        return None;
    };
    let ports = ports(&rule.ports, dropped);
    let mut icmps = None;
    match protocol {
        NetOutProtocol::Tcp | NetOutProtocol::Udp if ports.is_empty() => {
            // Here no ports would mean every port.
            dropped(format!(
                "a {} rule needs ports; ports {:?} has none",
                rule.protocol, rule.ports
            ));
            return None;
        }
        NetOutProtocol::Icmp | NetOutProtocol::All if !ports.is_empty() => {
            dropped(format!("an {} rule takes no ports; it has {:?}", rule.protocol, rule.ports));
            return None;
        }
        NetOutProtocol::Icmp => match icmp_match(rule.icmp_type, rule.code) {
            Ok(matched) => icmps = matched,
            Err(why) => {
                dropped(why);
                return None;
            }
        },
        _ => {}
    }
    if networks.is_empty() {
        // Only IPv6 or reversed destinations, each said already.
        return None;
    }
    Some(NetOutRule { protocol, networks, ports, icmps, log: rule.log })
}

/// `ports`: the items CF takes. CF casts the numbers to 16 bits unchecked
/// and passes a reversed range on to iptables; here an item outside
/// 1-65535 or reversed is dropped and said (Cloud Controller refuses both
/// when a group is written).
fn ports(text: &str, dropped: &mut impl FnMut(String)) -> Vec<PortSpan> {
    let mut spans = Vec::new();
    for item in text.split(',') {
        // An empty list is one empty item to CF: no port, nothing to say.
        if item.trim().is_empty() {
            continue;
        }
        match parse_port_range("ports", item) {
            Ok((start, end)) => spans.push(PortSpan { start, end }),
            Err(e) => dropped(format!("port {item:?} left out: {}", e.reason)),
        }
    }
    spans
}

/// ICMP `type` and `code`, -1 for any (CF passes them to iptables as
/// `--icmp-type T/C`, cast to 8 bits; type 255 is iptables' "any"). None:
/// every message.
///
/// CF's iptables differs on one point: there code 255 (so -1) with a type
/// matches code 255 only, so `type: 8, code: -1` allows no echo request;
/// here it allows every code of the type, as Cloud Foundry documents -1.
fn icmp_match(icmp_type: i64, code: i64) -> Result<Option<IcmpMatch>, String> {
    let byte = |name: &str, n: i64| match n {
        -1 => Ok(None),
        0..=255 => Ok(Some(n as u8)),
        _ => Err(format!("icmp {name} {n} is not -1 (any) or 0-255")),
    };
    let (icmp_type, code) = (byte("type", icmp_type)?, byte("code", code)?);
    Ok(match icmp_type {
        None | Some(u8::MAX) => None,
        Some(icmp_type) => Some(IcmpMatch { icmp_type, code }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str, rules: &str) -> SecurityGroup {
        SecurityGroup {
            guid: format!("{name}-guid"),
            name: name.to_owned(),
            rules: serde_json::from_str(rules).unwrap(),
            ..SecurityGroup::default()
        }
    }

    fn range(start: &str, end: &str) -> AddressRange {
        AddressRange { start: start.parse().unwrap(), end: end.parse().unwrap() }
    }

    fn tcp(networks: &[(&str, &str)], ports: &[(u16, u16)]) -> NetOutRule {
        NetOutRule {
            protocol: NetOutProtocol::Tcp,
            networks: networks.iter().map(|(s, e)| range(s, e)).collect(),
            ports: ports.iter().map(|&(start, end)| PortSpan { start, end }).collect(),
            icmps: None,
            log: false,
        }
    }

    /// The rules of one running default group, for an app anywhere.
    fn converted(rules: &str) -> RulesFor {
        let mut g = group("g", rules);
        g.running_default = true;
        let out = rules_for(&[g], "space-1", Workload::App).unwrap();
        // Whatever comes out, the kernel takes.
        crate::netout::app_entries(1, &out.rules).unwrap();
        out
    }

    #[test]
    fn workloads_by_their_garden_names() {
        assert_eq!(Workload::parse("app"), Some(Workload::App));
        assert_eq!(Workload::parse("task"), Some(Workload::Task));
        assert_eq!(Workload::parse("staging"), Some(Workload::Staging));
        assert_eq!(Workload::parse("App"), None);
        assert_eq!(Workload::parse(""), None);
    }

    #[test]
    fn every_rule_form() {
        let out = converted(
            r#"[
            {"protocol":"tcp","destination":"10.0.0.1,10.1.0.0/16,10.2.0.1-10.2.0.9","ports":"80,443, 8000 - 8080"},
            {"protocol":"udp","destination":"192.0.2.53","ports":"53","log":true},
            {"protocol":"icmp","destination":"192.0.2.0/24","type":8,"code":0},
            {"protocol":"icmp","destination":"192.0.2.1","type":3,"code":-1},
            {"protocol":"icmp","destination":"192.0.2.2","type":-1,"code":-1},
            {"protocol":"icmp","destination":"192.0.2.3"},
            {"protocol":"all","destination":"198.51.100.0/24","description":"everything"}
        ]"#,
        );
        assert!(out.dropped.is_empty(), "{:?}", out.dropped);
        let icmp = |network: AddressRange, icmps| NetOutRule {
            protocol: NetOutProtocol::Icmp,
            networks: vec![network],
            ports: vec![],
            icmps,
            log: false,
        };
        let mut want = vec![
            tcp(
                &[("10.0.0.1", "10.0.0.1"), ("10.1.0.0", "10.1.255.255"), ("10.2.0.1", "10.2.0.9")],
                &[(80, 80), (443, 443), (8000, 8080)],
            ),
            NetOutRule {
                protocol: NetOutProtocol::Udp,
                log: true,
                ..tcp(&[("192.0.2.53", "192.0.2.53")], &[(53, 53)])
            },
            icmp(
                range("192.0.2.0", "192.0.2.255"),
                Some(IcmpMatch { icmp_type: 8, code: Some(0) }),
            ),
            icmp(range("192.0.2.1", "192.0.2.1"), Some(IcmpMatch { icmp_type: 3, code: None })),
            icmp(range("192.0.2.2", "192.0.2.2"), None),
            // Type and code absent are 0 and 0 (Go's zero values): echo
            // reply.
            icmp(range("192.0.2.3", "192.0.2.3"), Some(IcmpMatch { icmp_type: 0, code: Some(0) })),
            NetOutRule {
                protocol: NetOutProtocol::All,
                networks: vec![range("198.51.100.0", "198.51.100.255")],
                ports: vec![],
                icmps: None,
                log: false,
            },
        ];
        want.sort();
        assert_eq!(out.rules, want);
    }

    #[test]
    fn running_and_staging_defaults_and_spaces() {
        let rule =
            |net: &str| format!(r#"[{{"protocol":"tcp","destination":"{net}","ports":"443"}}]"#);
        let mut running_default = group("running-default", &rule("10.0.0.1"));
        running_default.running_default = true;
        let mut running_1 = group("running-1", &rule("10.0.0.2"));
        running_1.running_space_guids = vec!["space-0".into(), "space-1".into()];
        let mut running_2 = group("running-2", &rule("10.0.0.3"));
        running_2.running_space_guids = vec!["space-2".into()];
        let mut staging_default = group("staging-default", &rule("10.0.0.4"));
        staging_default.staging_default = true;
        // Bound to space-1 for staging only: not an app's.
        let mut staging_1 = group("staging-1", &rule("10.0.0.5"));
        staging_1.staging_space_guids = vec!["space-1".into()];
        let groups = [running_default, running_1, running_2, staging_default, staging_1];
        let hosts = |space: &str, workload| -> Vec<String> {
            let out = rules_for(&groups, space, workload).unwrap();
            out.rules.iter().map(|r| r.networks[0].start.to_string()).collect()
        };
        assert_eq!(hosts("space-1", Workload::App), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(hosts("space-1", Workload::Task), ["10.0.0.1", "10.0.0.2"]);
        assert_eq!(hosts("space-2", Workload::App), ["10.0.0.1", "10.0.0.3"]);
        assert_eq!(hosts("space-9", Workload::App), ["10.0.0.1"]);
        assert_eq!(hosts("space-1", Workload::Staging), ["10.0.0.4", "10.0.0.5"]);
        assert_eq!(hosts("space-2", Workload::Staging), ["10.0.0.4"]);
        assert!(rules_for(&[], "space-1", Workload::App).unwrap().rules.is_empty());
    }

    #[test]
    fn the_same_rule_twice_is_one() {
        let rules = r#"[{"protocol":"tcp","destination":"10.0.0.1","ports":"443"},
                        {"protocol":"tcp","destination":"10.0.0.1","ports":"443","description":"again"}]"#;
        let mut default = group("default", rules);
        default.running_default = true;
        // A default bound to the space as well counts once, as in CF.
        default.running_space_guids = vec!["space-1".into()];
        let mut bound = group("bound", rules);
        bound.running_space_guids = vec!["space-1".into(), "space-1".into()];
        let out = rules_for(&[default, bound], "space-1", Workload::App).unwrap();
        assert_eq!(out.rules, [tcp(&[("10.0.0.1", "10.0.0.1")], &[(443, 443)])]);
    }

    #[test]
    fn a_bad_destination_fails_the_container() {
        let mut good = group("good", r#"[{"protocol":"all","destination":"10.0.0.1"}]"#);
        good.running_default = true;
        // The protocol is unknown too: CF reads every destination first.
        let mut bad = group(
            "bad",
            r#"[{"protocol":"all","destination":"10.0.0.2"},
                {"protocol":"sctp","destination":"10.0.0.3,10.0.0.999"}]"#,
        );
        bad.running_space_guids = vec!["space-1".into()];
        let groups = [good, bad];
        let err = rules_for(&groups, "space-1", Workload::App).unwrap_err();
        assert_eq!(
            err,
            BadDestination {
                group: "bad".into(),
                guid: "bad-guid".into(),
                rule: 1,
                item: "10.0.0.999".into()
            }
        );
        let message = err.to_string();
        assert!(message.contains("security group bad (bad-guid) rule 1"), "{message}");
        assert!(message.contains("\"10.0.0.999\""), "{message}");
        // Containers that do not take the group are not affected.
        assert_eq!(rules_for(&groups, "space-2", Workload::App).unwrap().rules.len(), 1);
        assert!(rules_for(&groups, "space-1", Workload::Staging).unwrap().rules.is_empty());
        for destination in ["", "10.0.0.1, 10.0.0.2", "10.0.0.1,", "host.example"] {
            let rules = format!(r#"[{{"protocol":"all","destination":"{destination}"}}]"#);
            let mut g = group("g", &rules);
            g.running_default = true;
            assert!(rules_for(&[g], "s", Workload::App).is_err(), "{destination:?}");
        }
    }

    #[test]
    fn what_cf_drops_is_dropped_and_said() {
        let out = converted(
            r#"[
            {"protocol":"TCP","destination":"10.0.0.1","ports":"80"},
            {"protocol":"sctp","destination":"10.0.0.1","ports":"80"},
            {"protocol":"tcp","destination":"10.0.0.2","ports":"x,80-90-100,0,70000,90-80,443"},
            {"protocol":"tcp","destination":"10.0.0.3"},
            {"protocol":"udp","destination":"10.0.0.3","ports":"dns"},
            {"protocol":"all","destination":"10.0.0.4","ports":"80"},
            {"protocol":"icmp","destination":"10.0.0.5","ports":"80"},
            {"protocol":"all","destination":"10.0.0.6","ports":"any"},
            {"protocol":"icmp","destination":"10.0.0.7","type":256},
            {"protocol":"icmp","destination":"10.0.0.7","type":8,"code":-2},
            {"protocol":"all","destination":"2001:db8::1,10.0.0.8,10.0.0.9-10.0.0.1"},
            {"protocol":"all","destination":"2001:db8::/64"}
        ]"#,
        );
        let all = |network: AddressRange| NetOutRule {
            protocol: NetOutProtocol::All,
            networks: vec![network],
            ports: vec![],
            icmps: None,
            log: false,
        };
        assert_eq!(
            out.rules,
            [
                all(range("10.0.0.6", "10.0.0.6")),
                all(range("10.0.0.8", "10.0.0.8")),
                tcp(&[("10.0.0.2", "10.0.0.2")], &[(443, 443)]),
            ]
        );
        let said = |rule: usize, what: &str| {
            let prefix = format!("security group g (g-guid) rule {rule}: ");
            assert!(
                out.dropped.iter().any(|d| d.starts_with(&prefix) && d.contains(what)),
                "rule {rule} {what:?} not in {:#?}",
                out.dropped
            );
        };
        said(0, "protocol \"TCP\"");
        said(1, "protocol \"sctp\"");
        for item in ["\"x\"", "\"80-90-100\"", "\"0\"", "\"70000\"", "\"90-80\""] {
            said(2, &format!("port {item}"));
        }
        said(3, "needs ports");
        said(4, "port \"dns\"");
        said(4, "needs ports");
        said(5, "takes no ports");
        said(6, "takes no ports");
        said(7, "port \"any\"");
        said(8, "type 256");
        said(9, "code -2");
        said(10, "\"2001:db8::1\" is IPv6");
        said(10, "\"10.0.0.9-10.0.0.1\" ends before it starts");
        said(11, "is IPv6");
        assert_eq!(out.dropped.len(), 18, "{:#?}", out.dropped);
    }
}
