//! How containers are addressed, as the agent and the CNI plugin must both
//! see it (silk's layout): every container routes through one gateway
//! address on its host-side veth, and a dual-stack container's IPv6
//! address is a /96 prefix with its IPv4 address in the last 32 bits.

use std::net::{Ipv4Addr, Ipv6Addr};

/// The IPv4 gateway every container routes through: on every host-side
/// veth (the agent answers DNS there).
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);

/// The IPv6 gateway of dual-stack containers: link-local, on every
/// host-side veth.
pub const GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// Why an `ipv6_prefix` is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("ipv6_prefix {text:?} {why}")]
pub struct Ipv6PrefixError {
    pub text: String,
    pub why: &'static str,
}

/// An IPv6 /96 whose addresses end in the overlay's IPv4 ones: a
/// container's IPv6 address is the prefix plus its IPv4 address (as the CNI
/// plugin's `ipv6_prefix` gives them), so a host's /24 is a /120 of it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Ipv6Prefix(Ipv6Addr);

impl Ipv6Prefix {
    /// `"fd00:255::/96"`; the error says what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, Ipv6PrefixError> {
        let bad = |why| Ipv6PrefixError { text: text.to_owned(), why };
        let (addr, bits) = text.split_once('/').ok_or_else(|| bad("is not an IPv6 /96"))?;
        let addr: Ipv6Addr = addr.parse().map_err(|_| bad("is not an IPv6 /96"))?;
        if bits != "96" {
            return Err(bad("must be a /96 (the container's IPv4 address fills the last 32 bits)"));
        }
        if u128::from(addr) & u128::from(u32::MAX) != 0 {
            return Err(bad("has bits set past /96"));
        }
        if addr.is_multicast() || addr.segments()[0] & 0xffc0 == 0xfe80 || addr.is_unspecified() {
            return Err(bad("is link-local, multicast or unspecified"));
        }
        Ok(Self(addr))
    }

    /// The IPv6 address under the prefix that ends in `ip`.
    pub fn address_of(self, ip: Ipv4Addr) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.0) | u128::from(u32::from(ip)))
    }
}

impl TryFrom<String> for Ipv6Prefix {
    type Error = Ipv6PrefixError;
    fn try_from(text: String) -> Result<Self, Ipv6PrefixError> {
        Self::parse(&text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_prefixes_are_a_96_that_ipv4_addresses_complete() {
        let prefix = Ipv6Prefix::parse("fd00:255::/96").unwrap();
        let address = prefix.address_of(Ipv4Addr::new(10, 255, 2, 7));
        assert_eq!(address, "fd00:255::aff:207".parse::<Ipv6Addr>().unwrap());
        for (text, says) in [
            ("fd00:255::", "not an IPv6 /96"),
            ("fd00:255::/64", "must be a /96"),
            ("fd00:255::1/96", "bits set past /96"),
            ("fe80::/96", "link-local"),
            ("10.0.0.0/96", "not an IPv6 /96"),
        ] {
            let err = Ipv6Prefix::parse(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
        }
        assert_eq!(GATEWAY6.to_string(), "fe80::1");
    }
}
