//! Header parsing, written once for the kernel (over packet memory) and the
//! host tests (over a byte slice). Every read is bounds-checked by the
//! [`PacketBytes`] implementation; this module only decides what to read.

use crate::{
    family::Family,
    maps::{FragmentKey, FragmentKey6, Ipv6Key, proto},
};

/// Bounds-checked access to the bytes of a packet.
pub trait PacketBytes {
    /// `N` bytes at `offset` from the start of the packet, or `None` if the
    /// packet is shorter.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;
}

impl PacketBytes for [u8] {
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.get(offset..offset.checked_add(N)?)?.try_into().ok()
    }
}

/// The 5-tuple of a packet; `A` is the address type ([`Family`]).
/// Addresses in wire order, ports in host order (see [`crate::maps`]). ICMP
/// messages other than errors stand in ports' place as policies match them:
/// `dport` is `type << 8 | code` (what an icmp policy's range holds, see
/// [`icmp_port`]) and `sport` the query's identifier (echo, timestamp,
/// information and address-mask messages; 0 for other types), which pairs a
/// reply with its request. Other protocols without ports (GRE, ...) have
/// both ports 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow<A = u32> {
    pub saddr: A,
    pub daddr: A,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
}

/// What a packet is, as far as the policy is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed<A: Family = u32> {
    /// Not this family: ARP, LLDP, ... (and IPv6 on the IPv4 path).
    NotIpv4,
    /// Cut short or inconsistent IP / L4 headers; for IPv6 also an extension
    /// header chain longer than the walk allows.
    Malformed,
    /// A datagram, or the first fragment of one (then `fragment` is set so the
    /// later fragments can follow its verdict).
    Flow { flow: Flow<A>, fragment: Option<A::Fragment> },
    /// A fragment other than the first: no L4 header.
    LaterFragment(A::Fragment),
    /// An ICMP error (unreachable, time exceeded, parameter problem, packet
    /// too big) from `saddr` to `daddr` about the datagram `about` (as
    /// originally sent).
    IcmpError { saddr: A, daddr: A, about: Flow<A> },
    /// ICMPv6 neighbour discovery, router solicitation and advertisement,
    /// redirects and multicast listener messages: the link's own plumbing,
    /// always passed (IPv6 does not work without it).
    LinkControl,
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;

const IPV4_MIN_HLEN: usize = 20;
const IPV6_HLEN: usize = 40;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// Extension headers walked before the upper-layer header; a longer chain
/// is dropped as malformed (RFC 8200 orders at most 7 kinds, but real
/// traffic carries one or two).
pub const MAX_EXTENSION_HEADERS: usize = 6;

/// The "port" an ICMP message of `icmp_type` and `code` has for policies:
/// an icmp policy allowing a type and code holds the range of one such
/// value, a type with any code `type << 8 ..= type << 8 | 0xff`.
#[inline(always)]
pub const fn icmp_port(icmp_type: u8, code: u8) -> u16 {
    (icmp_type as u16) << 8 | code as u16
}

impl<A: Family> Flow<A> {
    /// Whether an allowed packet like this one starts something whose
    /// answers must pass: every TCP and UDP flow; of ICMP, only query
    /// requests (echo, ...). An ICMP answer or a one-way message (router
    /// advertisement, ...) that a policy allows passes on its own, tracking
    /// nothing.
    #[inline(always)]
    pub fn opens_connection(&self) -> bool {
        self.protocol != A::ICMP
            || match A::icmp_query((self.dport >> 8) as u8) {
                Some(q) => !q.is_reply,
                None => false,
            }
    }
}

/// `sport` and `dport` of an ICMP message (see [`Flow`]) whose header
/// starts at `l4`, or `None` if its first 8 bytes are not there.
#[inline(always)]
fn icmp_ports<A: Family, B: PacketBytes + ?Sized>(bytes: &B, l4: usize) -> Option<(u16, u16)> {
    let [icmp_type, code, _, _] = bytes.read::<4>(l4)?;
    let [id_hi, id_lo, _, _] = bytes.read::<4>(l4 + 4)?;
    let id =
        if A::icmp_query(icmp_type).is_some() { u16::from_be_bytes([id_hi, id_lo]) } else { 0 };
    Some((id, icmp_port(icmp_type, code)))
}

/// Parses an Ethernet frame (TC programs see one).
#[inline(always)]
pub fn parse_ethernet<B: PacketBytes + ?Sized>(bytes: &B) -> Parsed {
    let Some(ethertype) = bytes.read::<2>(12) else {
        // Shorter than an Ethernet header: nothing the policy can judge.
        return Parsed::NotIpv4;
    };
    if u16::from_be_bytes(ethertype) != ETH_P_IP {
        return Parsed::NotIpv4;
    }
    parse_ipv4(bytes, ETH_HLEN)
}

/// The frame's ethertype (0 for a frame shorter than its Ethernet header).
#[inline(always)]
pub fn ethertype<B: PacketBytes + ?Sized>(bytes: &B) -> u16 {
    bytes.read::<2>(12).map_or(0, u16::from_be_bytes)
}

/// Parses an Ethernet frame carrying IPv6 (`NotIpv4` for anything else).
#[inline(always)]
pub fn parse_ethernet6<B: PacketBytes + ?Sized>(bytes: &B) -> Parsed<Ipv6Key> {
    if ethertype(bytes) != ETH_P_IPV6 {
        return Parsed::NotIpv4;
    }
    parse_ipv6(bytes, ETH_HLEN)
}

/// The fixed IPv6 header fields the policy uses.
struct Ipv6 {
    payload_len: usize,
    next: u8,
    saddr: Ipv6Key,
    daddr: Ipv6Key,
}

#[inline(always)]
fn ipv6_address<B: PacketBytes + ?Sized>(bytes: &B, at: usize) -> Option<Ipv6Key> {
    let word = |i: usize| bytes.read::<4>(at + i * 4).map(u32::from_ne_bytes);
    Some(Ipv6Key([word(0)?, word(1)?, word(2)?, word(3)?]))
}

#[inline(always)]
fn ipv6_header<B: PacketBytes + ?Sized>(bytes: &B, l3: usize) -> Option<Ipv6> {
    let [version, _, _, _] = bytes.read::<4>(l3)?;
    let [len_hi, len_lo, next, _hop_limit] = bytes.read::<4>(l3 + 4)?;
    if version >> 4 != 6 {
        return None;
    }
    Some(Ipv6 {
        payload_len: u16::from_be_bytes([len_hi, len_lo]) as usize,
        next,
        saddr: ipv6_address(bytes, l3 + 8)?,
        daddr: ipv6_address(bytes, l3 + 24)?,
    })
}

/// IPv6 extension header numbers the walk steps over (RFC 8200 4.1).
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
const IPV6_FRAG_OFFSET_MASK: u16 = 0xfff8;
const IPV6_FRAG_MORE: u16 = 1;

/// ICMPv6 errors (RFC 4443): destination unreachable, packet too big, time
/// exceeded, parameter problem.
const ICMPV6_ERROR_LAST: u8 = 4;

/// ICMPv6 messages of the link itself: multicast listener query, report,
/// done (130-132), router solicitation and advertisement, neighbour
/// solicitation and advertisement, redirect (133-137), MLDv2 report (143).
#[inline(always)]
fn is_link_control(icmp_type: u8) -> bool {
    matches!(icmp_type, 130..=137 | 143)
}

/// Parses an IPv6 packet whose header starts at `l3`: the fixed header, a
/// walk over at most [`MAX_EXTENSION_HEADERS`] extension headers (hop-by-hop
/// options, routing, destination options, authentication, fragment), then
/// the upper-layer header as for IPv4.
#[inline(always)]
pub fn parse_ipv6<B: PacketBytes + ?Sized>(bytes: &B, l3: usize) -> Parsed<Ipv6Key> {
    let Some(ip) = ipv6_header(bytes, l3) else {
        return Parsed::Malformed;
    };
    let end = l3 + IPV6_HLEN + ip.payload_len;
    let mut next = ip.next;
    let mut at = l3 + IPV6_HLEN;
    // Plain values, not an Option built up in the loop (see DESIGN.md on
    // registers LLVM may read unset).
    let mut first_fragment = false;
    let mut fragment_id = 0u32;
    let mut upper_layer = false;
    for _ in 0..MAX_EXTENSION_HEADERS {
        match next {
            IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_DEST_OPTS => {
                let Some([following, len]) = bytes.read::<2>(at) else {
                    return Parsed::Malformed;
                };
                next = following;
                at += (len as usize + 1) * 8;
            }
            IPV6_AUTH => {
                let Some([following, len]) = bytes.read::<2>(at) else {
                    return Parsed::Malformed;
                };
                next = following;
                at += (len as usize + 2) * 4;
            }
            IPV6_FRAGMENT => {
                let (Some([following, _, off_hi, off_lo]), Some(id)) =
                    (bytes.read::<4>(at), bytes.read::<4>(at + 4))
                else {
                    return Parsed::Malformed;
                };
                let offset = u16::from_be_bytes([off_hi, off_lo]);
                let key = FragmentKey6 {
                    saddr: ip.saddr,
                    daddr: ip.daddr,
                    id: u32::from_be_bytes(id),
                    protocol: u32::from(following),
                };
                if offset & IPV6_FRAG_OFFSET_MASK != 0 {
                    return Parsed::LaterFragment(key);
                }
                if offset & IPV6_FRAG_MORE != 0 {
                    first_fragment = true;
                    fragment_id = key.id;
                }
                next = following;
                at += 8;
            }
            _ => {
                upper_layer = true;
                break;
            }
        }
    }
    if !upper_layer || at > end {
        return Parsed::Malformed;
    }
    let fragment = if first_fragment {
        Some(FragmentKey6 {
            saddr: ip.saddr,
            daddr: ip.daddr,
            id: fragment_id,
            protocol: u32::from(next),
        })
    } else {
        None
    };
    let l4_len = end - at;
    let flow =
        |sport, dport| Flow { saddr: ip.saddr, daddr: ip.daddr, sport, dport, protocol: next };
    match next {
        proto::TCP | proto::UDP => {
            let need = if next == proto::TCP { TCP_MIN_HLEN } else { UDP_HLEN };
            if l4_len < need || bytes.read::<1>(at + need - 1).is_none() {
                return Parsed::Malformed;
            }
            match ports(bytes, at) {
                Some((sport, dport)) => Parsed::Flow { flow: flow(sport, dport), fragment },
                None => Parsed::Malformed,
            }
        }
        proto::ICMPV6 => {
            if l4_len < ICMP_HLEN {
                return Parsed::Malformed;
            }
            let Some([icmp_type, _code]) = bytes.read::<2>(at) else {
                return Parsed::Malformed;
            };
            if (1..=ICMPV6_ERROR_LAST).contains(&icmp_type) {
                return match icmpv6_error_subject(bytes, at + ICMP_HLEN) {
                    Some(about) => Parsed::IcmpError { saddr: ip.saddr, daddr: ip.daddr, about },
                    None => Parsed::Malformed,
                };
            }
            if is_link_control(icmp_type) {
                return Parsed::LinkControl;
            }
            match icmp_ports::<Ipv6Key, B>(bytes, at) {
                Some((sport, dport)) => Parsed::Flow { flow: flow(sport, dport), fragment },
                None => Parsed::Malformed,
            }
        }
        _ => Parsed::Flow { flow: flow(0, 0), fragment },
    }
}

/// The datagram an ICMPv6 error quotes: its IPv6 header and, if the
/// upper-layer header follows it directly, that header's ports.
#[inline(always)]
fn icmpv6_error_subject<B: PacketBytes + ?Sized>(bytes: &B, inner: usize) -> Option<Flow<Ipv6Key>> {
    let ip = ipv6_header(bytes, inner)?;
    let l4 = inner + IPV6_HLEN;
    let (sport, dport) = match ip.next {
        proto::TCP | proto::UDP => ports(bytes, l4)?,
        proto::ICMPV6 => icmp_ports::<Ipv6Key, B>(bytes, l4)?,
        _ => (0, 0),
    };
    Some(Flow { saddr: ip.saddr, daddr: ip.daddr, sport, dport, protocol: ip.next })
}

/// The fixed IPv4 header fields the policy uses.
struct Ipv4 {
    hlen: usize,
    total_len: usize,
    id: u16,
    frag: u16,
    protocol: u8,
    saddr: u32,
    daddr: u32,
}

#[inline(always)]
fn ipv4_header<B: PacketBytes + ?Sized>(bytes: &B, l3: usize) -> Option<Ipv4> {
    let [ver_ihl, _tos, len_hi, len_lo] = bytes.read::<4>(l3)?;
    let hlen = ((ver_ihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes([len_hi, len_lo]) as usize;
    if ver_ihl >> 4 != 4 || hlen < IPV4_MIN_HLEN || total_len < hlen {
        return None;
    }
    let [id_hi, id_lo, frag_hi, frag_lo] = bytes.read::<4>(l3 + 4)?;
    let [_ttl, protocol, _, _] = bytes.read::<4>(l3 + 8)?;
    let saddr = u32::from_ne_bytes(bytes.read::<4>(l3 + 12)?);
    let daddr = u32::from_ne_bytes(bytes.read::<4>(l3 + 16)?);
    // Options, if any, must be there too.
    bytes.read::<1>(l3 + hlen - 1)?;
    Some(Ipv4 {
        hlen,
        total_len,
        id: u16::from_be_bytes([id_hi, id_lo]),
        frag: u16::from_be_bytes([frag_hi, frag_lo]),
        protocol,
        saddr,
        daddr,
    })
}

/// Source and destination port of a TCP or UDP header at `l4`.
#[inline(always)]
fn ports<B: PacketBytes + ?Sized>(bytes: &B, l4: usize) -> Option<(u16, u16)> {
    let [s_hi, s_lo, d_hi, d_lo] = bytes.read::<4>(l4)?;
    Some((u16::from_be_bytes([s_hi, s_lo]), u16::from_be_bytes([d_hi, d_lo])))
}

/// Parses an IPv4 packet whose header starts at `l3`.
#[inline(always)]
pub fn parse_ipv4<B: PacketBytes + ?Sized>(bytes: &B, l3: usize) -> Parsed {
    let Some(ip) = ipv4_header(bytes, l3) else {
        return Parsed::Malformed;
    };
    let fragment_key =
        FragmentKey { saddr: ip.saddr, daddr: ip.daddr, id: ip.id, protocol: ip.protocol, _pad: 0 };
    if ip.frag & IP_OFFSET_MASK != 0 {
        return Parsed::LaterFragment(fragment_key);
    }
    let fragment = if ip.frag & IP_MF != 0 { Some(fragment_key) } else { None };
    let l4 = l3 + ip.hlen;
    // Bytes of the datagram after the IP header; Ethernet padding after
    // `total_len` must not pass for a header.
    let l4_len = ip.total_len - ip.hlen;
    let flow = |sport, dport| Flow {
        saddr: ip.saddr,
        daddr: ip.daddr,
        sport,
        dport,
        protocol: ip.protocol,
    };
    match ip.protocol {
        proto::TCP | proto::UDP => {
            let need = if ip.protocol == proto::TCP { TCP_MIN_HLEN } else { UDP_HLEN };
            if l4_len < need || bytes.read::<1>(l4 + need - 1).is_none() {
                return Parsed::Malformed;
            }
            match ports(bytes, l4) {
                Some((sport, dport)) => Parsed::Flow { flow: flow(sport, dport), fragment },
                None => Parsed::Malformed,
            }
        }
        proto::ICMP => {
            if l4_len < ICMP_HLEN {
                return Parsed::Malformed;
            }
            let Some([icmp_type, _code]) = bytes.read::<2>(l4) else {
                return Parsed::Malformed;
            };
            if bytes.read::<1>(l4 + ICMP_HLEN - 1).is_none() {
                return Parsed::Malformed;
            }
            match icmp_type {
                ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB => {
                    match icmp_error_subject(bytes, l4 + ICMP_HLEN) {
                        Some(about) => {
                            Parsed::IcmpError { saddr: ip.saddr, daddr: ip.daddr, about }
                        }
                        None => Parsed::Malformed,
                    }
                }
                _ => match icmp_ports::<u32, B>(bytes, l4) {
                    Some((sport, dport)) => Parsed::Flow { flow: flow(sport, dport), fragment },
                    None => Parsed::Malformed,
                },
            }
        }
        _ => Parsed::Flow { flow: flow(0, 0), fragment },
    }
}

/// The datagram an ICMP error quotes: its IP header and first 8 bytes.
#[inline(always)]
fn icmp_error_subject<B: PacketBytes + ?Sized>(bytes: &B, inner: usize) -> Option<Flow> {
    let ip = ipv4_header(bytes, inner)?;
    let (sport, dport) = match ip.protocol {
        proto::TCP | proto::UDP => ports(bytes, inner + ip.hlen)?,
        proto::ICMP => icmp_ports::<u32, B>(bytes, inner + ip.hlen)?,
        _ => (0, 0),
    };
    Some(Flow { saddr: ip.saddr, daddr: ip.daddr, sport, dport, protocol: ip.protocol })
}
