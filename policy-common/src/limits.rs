//! The per-address rate limits: `EVENT_LIMITS` (denied events per
//! destination address) and `REJECT_LIMITS` (rejects per sender address),
//! both keyed by [`crate::Family::limit_key`] and holding a
//! `maps::EventLimit`. A budget lasts one window from the first packet that
//! used it; the programs make an entry for an address with none.
//!
//! The agent deletes entries (they would otherwise stay, up to the LRU's
//! capacity, for every address that ever had one): an entry whose window
//! has ended is one the programs would start afresh exactly as they make a
//! missing one, so deleting it changes no outcome; an entry whose window is
//! running goes only with its address (an endpoint removed).

use core::net::IpAddr;

use crate::{Family as _, maps::Ipv6Key};

/// How long a budget lasts, in nanoseconds of the programs' clock
/// (`bpf_ktime_get_coarse_ns`: `CLOCK_MONOTONIC_COARSE`).
pub const WINDOW_NS: u64 = 1_000_000_000;

/// Whether the window that started at `start` has ended at `now`: the next
/// packet starts a new one, as it would with no entry at all.
#[inline(always)]
pub fn window_ended(start: u64, now: u64) -> bool {
    now.wrapping_sub(start) >= WINDOW_NS
}

/// The key the programs use for `addr` ([`crate::Family::limit_key`] of
/// the address as the maps hold it): an IPv4 address itself, an IPv6
/// address's words folded, so another address may share it.
pub fn address_key(addr: IpAddr) -> u32 {
    match addr {
        IpAddr::V4(v4) => u32::from_ne_bytes(v4.octets()).limit_key(),
        IpAddr::V6(v6) => Ipv6Key::from_octets(v6.octets()).limit_key(),
    }
}

#[cfg(test)]
mod tests {
    use core::net::{Ipv4Addr, Ipv6Addr};

    use super::*;

    /// The keys the programs make: an IPv4 address in wire order, an IPv6
    /// address's four wire-order words folded with XOR.
    #[test]
    fn an_address_has_the_programs_key() {
        let v4 = Ipv4Addr::new(10, 255, 0, 1);
        assert_eq!(address_key(v4.into()), u32::from_ne_bytes([10, 255, 0, 1]));
        let v6 = Ipv6Addr::new(0xfd00, 0x255, 0, 0, 0, 0, 0, 1);
        let o = v6.octets();
        let word = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        assert_eq!(address_key(v6.into()), word(0) ^ word(4) ^ word(8) ^ word(12));
        // Folded: another IPv6 address may share a key.
        let twin = Ipv6Addr::new(0, 0, 0xfd00, 0x255, 0, 0, 0, 1);
        assert_eq!(address_key(twin.into()), address_key(v6.into()));
    }

    #[test]
    fn a_window_lasts_one_second_from_its_start() {
        let start = 5 * WINDOW_NS;
        assert!(!window_ended(start, start));
        assert!(!window_ended(start, start + WINDOW_NS - 1));
        assert!(window_ended(start, start + WINDOW_NS));
        assert!(window_ended(0, start), "an entry made long ago (or planted with 0)");
        // A start ahead of the clock (a clock that went back cannot, but a
        // bad entry can): ended, as the programs see it.
        assert!(window_ended(start + 1, start));
    }
}
