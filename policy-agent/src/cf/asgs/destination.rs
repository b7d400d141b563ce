//! One item of a rule's `destination`, as Cloud Foundry's rule converter
//! reads it (silk-release v3.53.0, cni-wrapper-plugin
//! `netrules/security_group_rule.go`, `toIPRange`): nothing is trimmed,
//! and the first `-` or `/` decides the form:
//!
//! 1. no `-` or `/`: one address (Go's `net.ParseIP`);
//! 2. `/` first: a network (`net.ParseCIDR`), its first to last address,
//!    host bits ignored;
//! 3. `-` first: a range `A-B`, both addresses as in 1.
//!
//! Addresses are IPv4 dotted quads without leading zeros, or IPv6; an
//! IPv4-mapped IPv6 address (`::ffff:A.B.C.D`) is the IPv4 one, as Go
//! prints it and iptables takes it.

use std::net::{IpAddr, Ipv4Addr};

use crate::state::AddressRange;

/// What one item stands for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Destination {
    Ipv4(AddressRange),
    /// An IPv6 address, network or range. NetOut rules are IPv4 only.
    /// (CF's converter takes it; its IPv4 iptables then refuses the
    /// container's chain, which keeps its old rules.)
    Ipv6,
    /// A range that ends before it starts: iptables installs it with a
    /// warning, and it never matches.
    Reversed,
}

/// The item, or None when it is none of the three forms (CF: "failed to
/// convert destination to ip range").
pub(super) fn parse(item: &str) -> Option<Destination> {
    let Some(at) = item.find(['-', '/']) else {
        return Some(match address(item)? {
            IpAddr::V4(ip) => Destination::Ipv4(AddressRange { start: ip, end: ip }),
            IpAddr::V6(_) => Destination::Ipv6,
        });
    };
    let (first, rest) = (&item[..at], &item[at + 1..]);
    if item[at..].starts_with('/') {
        return network(first, rest);
    }
    match (address(first)?, address(rest)?) {
        (IpAddr::V4(start), IpAddr::V4(end)) if start <= end => {
            Some(Destination::Ipv4(AddressRange { start, end }))
        }
        (IpAddr::V4(_), IpAddr::V4(_)) => Some(Destination::Reversed),
        (IpAddr::V6(_), IpAddr::V6(_)) => Some(Destination::Ipv6),
        // Go parses it; no iptables takes a range across families.
        _ => None,
    }
}

/// One address; IPv4-mapped IPv6 as IPv4.
fn address(text: &str) -> Option<IpAddr> {
    Some(match text.parse().ok()? {
        IpAddr::V6(ip) => ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4),
        v4 => v4,
    })
}

/// `ADDRESS/BITS`: BITS decimal digits, at most the address's length
/// (`net.ParseCIDR`).
fn network(text: &str, bits: &str) -> Option<Destination> {
    if bits.is_empty() || !bits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let bits: u32 = bits.parse().ok()?;
    match text.parse().ok()? {
        IpAddr::V4(ip) if bits <= 32 => Some(Destination::Ipv4(block(ip, bits))),
        IpAddr::V6(ip) if bits <= 128 => Some(match ip.to_ipv4_mapped() {
            // Masked, it is still IPv4-mapped: Go prints it as IPv4.
            Some(v4) if bits >= 96 => Destination::Ipv4(block(v4, bits - 96)),
            _ => Destination::Ipv6,
        }),
        _ => None,
    }
}

/// The addresses of the `bits`-long prefix of `ip`.
fn block(ip: Ipv4Addr, bits: u32) -> AddressRange {
    let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
    let start = u32::from(ip) & mask;
    AddressRange { start: Ipv4Addr::from(start), end: Ipv4Addr::from(start | !mask) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4(start: &str, end: &str) -> Option<Destination> {
        Some(Destination::Ipv4(AddressRange {
            start: start.parse().unwrap(),
            end: end.parse().unwrap(),
        }))
    }

    #[test]
    fn the_three_forms() {
        assert_eq!(parse("10.0.0.1"), v4("10.0.0.1", "10.0.0.1"));
        assert_eq!(parse("10.0.0.0/24"), v4("10.0.0.0", "10.0.0.255"));
        // Host bits are ignored, as net.ParseCIDR's network has none.
        assert_eq!(parse("10.0.0.77/24"), v4("10.0.0.0", "10.0.0.255"));
        assert_eq!(parse("10.0.0.1/32"), v4("10.0.0.1", "10.0.0.1"));
        assert_eq!(parse("10.1.2.3/0"), v4("0.0.0.0", "255.255.255.255"));
        assert_eq!(parse("10.0.0.1-10.0.1.10"), v4("10.0.0.1", "10.0.1.10"));
        assert_eq!(parse("10.0.0.1-10.0.0.1"), v4("10.0.0.1", "10.0.0.1"));
        assert_eq!(parse("0.0.0.0-255.255.255.255"), v4("0.0.0.0", "255.255.255.255"));
    }

    #[test]
    fn ipv4_mapped_ipv6_is_ipv4() {
        assert_eq!(parse("::ffff:10.0.0.1"), v4("10.0.0.1", "10.0.0.1"));
        assert_eq!(parse("::ffff:10.0.0.0/120"), v4("10.0.0.0", "10.0.0.255"));
        assert_eq!(parse("::ffff:10.0.0.1-10.0.0.9"), v4("10.0.0.1", "10.0.0.9"));
    }

    #[test]
    fn ipv6_and_reversed_ranges_are_told_apart() {
        assert_eq!(parse("2001:db8::1"), Some(Destination::Ipv6));
        assert_eq!(parse("2001:db8::/32"), Some(Destination::Ipv6));
        assert_eq!(parse("::ffff:10.0.0.0/64"), Some(Destination::Ipv6));
        assert_eq!(parse("10.0.0.9-10.0.0.1"), Some(Destination::Reversed));
    }

    #[test]
    fn what_cf_cannot_convert() {
        for item in [
            "",
            "invalid",
            " 10.0.0.1",
            "10.0.0.1 ",
            "010.0.0.1",
            "10.0.0",
            "10.0.0.1/33",
            "10.0.0.1/",
            "10.0.0.1/+8",
            "10.0.0.1/a",
            "10.0.0.1-123",
            "10.0.0.1-",
            "-10.0.0.1",
            "10.0.0.1-10.0.0.5/24",
            "10.0.0.1-2001:db8::1",
            "2001:db8::/129",
            "fe80::1%eth0",
            "example.com",
        ] {
            assert_eq!(parse(item), None, "{item:?}");
        }
    }
}
