//! NetOut (Application Security Groups) into the kernel's trie: each rule's
//! address ranges become CIDR blocks; each block of an app gets every rule
//! of that app covering it, so the longest-prefix match of a destination
//! finds all the rules that can allow it. An app with security groups also
//! gets an entry for all addresses (no rule: denied).

use std::{collections::BTreeMap, net::Ipv4Addr};

use policy_common::netout::{
    ICMP_ANY, MAX_NETOUT_RULES, NetOutMatch, NetOutRules, key_data, key_prefix,
};

use crate::state::{NetOutRule, State};

/// A trie key: (prefix length over tag and address, key data).
pub type TrieKey = (u32, [u8; 8]);

/// The smallest set of CIDR blocks covering `start..=end` (host order),
/// as (network, prefix length).
pub fn cidrs(start: Ipv4Addr, end: Ipv4Addr) -> Vec<(Ipv4Addr, u8)> {
    let (mut lo, hi) = (u64::from(u32::from(start)), u64::from(u32::from(end)));
    let mut out = Vec::new();
    while lo <= hi {
        // The largest block starting at lo that fits in lo..=hi.
        let mut size: u64 = if lo == 0 { 1 << 32 } else { 1 << lo.trailing_zeros().min(32) };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        out.push((Ipv4Addr::from(lo as u32), 32 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

/// The kernel's form of a rule: one per port span (TCP/UDP), else one.
fn kernel_rules(rule: &NetOutRule) -> Vec<NetOutMatch> {
    let base = NetOutMatch {
        protocol: rule.protocol.number(),
        log: u8::from(rule.log),
        icmp_type: rule.icmps.map_or(ICMP_ANY, |i| i.icmp_type),
        icmp_code: rule.icmps.and_then(|i| i.code).unwrap_or(ICMP_ANY),
        port_start: 0,
        port_end: 0,
    };
    if rule.ports.is_empty() || !matches!(rule.protocol.number(), 6 | 17) {
        return vec![base];
    }
    rule.ports
        .iter()
        .map(|p| NetOutMatch { port_start: p.start, port_end: p.end, ..base })
        .collect()
}

/// Whether block `outer` contains block `inner`.
fn contains((net, len): (Ipv4Addr, u8), (inner, inner_len): (Ipv4Addr, u8)) -> bool {
    if inner_len < len {
        return false;
    }
    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
    u32::from(inner) & mask == u32::from(net) & mask
}

/// The trie entries of one app (tag): every block of its rules with the
/// rules covering it, and the all-addresses entry.
pub fn app_entries(
    tag: u32,
    rules: &[NetOutRule],
) -> Result<BTreeMap<TrieKey, NetOutRules>, String> {
    let mut blocks: Vec<((Ipv4Addr, u8), NetOutMatch)> = Vec::new();
    for rule in rules {
        let krules = kernel_rules(rule);
        for range in &rule.networks {
            for block in cidrs(range.start, range.end) {
                blocks.extend(krules.iter().map(|k| (block, *k)));
            }
        }
    }
    let mut distinct: Vec<(Ipv4Addr, u8)> = blocks.iter().map(|(b, _)| *b).collect();
    distinct.push((Ipv4Addr::UNSPECIFIED, 0));
    distinct.sort();
    distinct.dedup();
    let mut out = BTreeMap::new();
    for block in distinct {
        let mut covering: Vec<NetOutMatch> =
            blocks.iter().filter(|(b, _)| contains(*b, block)).map(|(_, k)| *k).collect();
        covering.sort();
        covering.dedup();
        if covering.len() > MAX_NETOUT_RULES {
            return Err(format!(
                "more than {MAX_NETOUT_RULES} rules (a rule counts once per port range) cover {}/{}",
                block.0, block.1
            ));
        }
        let mut value = NetOutRules { count: covering.len() as u32, ..Default::default() };
        value.rules[..covering.len()].copy_from_slice(&covering);
        let data = key_data(tag, u32::from_ne_bytes(block.0.octets()));
        out.insert((key_prefix(block.1), data), value);
    }
    Ok(out)
}

/// The whole trie for the state: apps with security groups and a tag.
pub fn trie(state: &State) -> BTreeMap<TrieKey, NetOutRules> {
    let mut out = BTreeMap::new();
    for (app, rules) in state.netout() {
        let Some(tag) = state.tag(app) else { continue };
        match app_entries(tag, rules) {
            Ok(entries) => out.extend(entries),
            // Refused when the rules were set; a state from elsewhere that
            // breaks the limit keeps the app's default deny.
            Err(_) => {
                out.insert((key_prefix(0), key_data(tag, 0)), NetOutRules::default());
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{AddressRange, IcmpMatch, NetOutProtocol, PortSpan};

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn ranges_become_the_fewest_cidr_blocks() {
        assert_eq!(
            cidrs(ip("192.0.2.10"), ip("192.0.2.20")),
            [
                (ip("192.0.2.10"), 31),
                (ip("192.0.2.12"), 30),
                (ip("192.0.2.16"), 30),
                (ip("192.0.2.20"), 32),
            ]
        );
        assert_eq!(cidrs(ip("192.0.2.0"), ip("192.0.2.255")), [(ip("192.0.2.0"), 24)]);
        assert_eq!(cidrs(ip("0.0.0.0"), ip("255.255.255.255")), [(ip("0.0.0.0"), 0)]);
        assert_eq!(cidrs(ip("10.0.0.5"), ip("10.0.0.5")), [(ip("10.0.0.5"), 32)]);
        assert!(cidrs(ip("10.0.0.6"), ip("10.0.0.5")).is_empty());
    }

    fn rule(protocol: NetOutProtocol, range: (&str, &str), ports: &[(u16, u16)]) -> NetOutRule {
        NetOutRule {
            protocol,
            networks: vec![AddressRange { start: ip(range.0), end: ip(range.1) }],
            ports: ports.iter().map(|&(start, end)| PortSpan { start, end }).collect(),
            icmps: None,
            log: false,
        }
    }

    #[test]
    fn a_narrow_block_carries_the_rules_of_the_wide_ones_around_it() {
        let rules = [
            rule(NetOutProtocol::Tcp, ("192.0.2.0", "192.0.2.255"), &[(443, 443)]),
            rule(NetOutProtocol::Udp, ("192.0.2.53", "192.0.2.53"), &[(53, 53)]),
            NetOutRule {
                icmps: Some(IcmpMatch { icmp_type: 8, code: None }),
                ..rule(NetOutProtocol::Icmp, ("0.0.0.0", "255.255.255.255"), &[])
            },
        ];
        let entries = app_entries(7, &rules).unwrap();
        let at = |block: &str, len: u8| {
            entries[&(key_prefix(len), key_data(7, u32::from_ne_bytes(ip(block).octets())))]
        };
        let everywhere = at("0.0.0.0", 0);
        assert_eq!(everywhere.count, 1, "ICMP echo anywhere");
        let net = at("192.0.2.0", 24);
        assert_eq!(net.count, 2, "TCP 443 and ICMP echo");
        let dns = at("192.0.2.53", 32);
        assert_eq!(dns.count, 3, "and UDP 53 on the one address");
        assert_eq!(dns.allows(17, 53, (0, 0)), Some(false));
        assert_eq!(net.allows(17, 53, (0, 0)), None);
        assert_eq!(net.allows(1, 0, (8, 0)), Some(false));
        assert_eq!(entries.len(), 3);
        // Too many rules over one block is refused.
        let many: Vec<NetOutRule> = (0..17)
            .map(|p| rule(NetOutProtocol::Tcp, ("192.0.2.0", "192.0.2.255"), &[(p + 1, p + 1)]))
            .collect();
        assert!(app_entries(7, &many).unwrap_err().contains("more than 16 rules"));
    }
}
