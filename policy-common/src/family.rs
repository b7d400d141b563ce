//! The two address families the programs police, as the maps key their
//! addresses: IPv4 as the 4 wire bytes read as a native-endian `u32`
//! (see [`crate::maps`]), IPv6 as the 16 wire bytes read as four such words
//! ([`Ipv6Key`]). The parsing and decision code is written once, generic
//! over the address type; each family is compiled into its own copy, so the
//! IPv4 path is the code it was before IPv6 existed.

use core::{fmt::Debug, hash::Hash};

use crate::maps::{FragmentKey, FragmentKey6, Ipv6Key, proto};

/// ICMP query types that come in request/answer pairs with an identifier.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpQuery {
    /// The type of the request of the pair.
    pub request: u8,
    /// This message is the answer.
    pub is_reply: bool,
}

/// An address family, implemented by its map key type.
pub trait Family: Copy + Eq + Ord + Default + Debug + Hash {
    /// The key of a fragmented datagram (`FRAGMENTS`, `FRAGMENTS6`).
    type Fragment: Copy + Eq + Debug + Hash;
    /// The family's ICMP protocol number (1, 58).
    const ICMP: u8;
    /// The query pair `icmp_type` belongs to, if any.
    fn icmp_query(icmp_type: u8) -> Option<IcmpQuery>;
    /// Source and destination of a fragmented datagram.
    fn fragment_ends(key: &Self::Fragment) -> (Self, Self);
    /// The upper-layer protocol of a fragmented datagram.
    fn fragment_protocol(key: &Self::Fragment) -> u8;
    /// Link-local unicast or multicast: traffic that stays on the link
    /// between a container and the host (IPv6 neighbour traffic), never
    /// container-to-container. Always false for IPv4.
    fn is_link_scoped(self) -> bool;
    /// The key of the per-address rate limits (`EVENT_LIMITS`,
    /// `REJECT_LIMITS`): the address itself, or its words folded.
    fn limit_key(self) -> u32;
}

impl Family for u32 {
    type Fragment = FragmentKey;
    const ICMP: u8 = proto::ICMP;

    /// RFC 792, RFC 950: echo, timestamp, information, address mask. The
    /// answer to `request` is `request - 8` for echo, `request + 1` for the
    /// others.
    #[inline(always)]
    fn icmp_query(icmp_type: u8) -> Option<IcmpQuery> {
        match icmp_type {
            8 | 13 | 15 | 17 => Some(IcmpQuery { request: icmp_type, is_reply: false }),
            0 => Some(IcmpQuery { request: 8, is_reply: true }),
            14 | 16 | 18 => Some(IcmpQuery { request: icmp_type - 1, is_reply: true }),
            _ => None,
        }
    }

    #[inline(always)]
    fn fragment_ends(key: &FragmentKey) -> (u32, u32) {
        (key.saddr, key.daddr)
    }

    #[inline(always)]
    fn fragment_protocol(key: &FragmentKey) -> u8 {
        key.protocol
    }

    #[inline(always)]
    fn is_link_scoped(self) -> bool {
        false
    }

    #[inline(always)]
    fn limit_key(self) -> u32 {
        self
    }
}

impl Family for Ipv6Key {
    type Fragment = FragmentKey6;
    const ICMP: u8 = proto::ICMPV6;

    /// RFC 4443: echo request (128) and reply (129).
    #[inline(always)]
    fn icmp_query(icmp_type: u8) -> Option<IcmpQuery> {
        match icmp_type {
            128 => Some(IcmpQuery { request: 128, is_reply: false }),
            129 => Some(IcmpQuery { request: 128, is_reply: true }),
            _ => None,
        }
    }

    #[inline(always)]
    fn fragment_ends(key: &FragmentKey6) -> (Ipv6Key, Ipv6Key) {
        (key.saddr, key.daddr)
    }

    #[inline(always)]
    fn fragment_protocol(key: &FragmentKey6) -> u8 {
        key.protocol as u8
    }

    /// fe80::/10 and ff00::/8.
    #[inline(always)]
    fn is_link_scoped(self) -> bool {
        let [b0, b1, _, _] = self.0[0].to_ne_bytes();
        b0 == 0xff || (b0 == 0xfe && b1 & 0xc0 == 0x80)
    }

    #[inline(always)]
    fn limit_key(self) -> u32 {
        self.0[0] ^ self.0[1] ^ self.0[2] ^ self.0[3]
    }
}
