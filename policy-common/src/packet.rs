//! Header parsing, written once for the kernel (over packet memory) and the
//! host tests (over a byte slice). Every read is bounds-checked by the
//! [`PacketBytes`] implementation; this module only decides what to read.

use crate::{
    family::Family,
    hint::opaque,
    maps::{FragmentKey, FragmentKey6, Ipv6Key, proto},
};

/// Bounds-checked access to the bytes of a packet.
pub trait PacketBytes {
    /// `N` bytes at `offset` from the start of the packet, or `None` if the
    /// packet is shorter.
    fn read<const N: usize>(&self, offset: usize) -> Option<[u8; N]>;

    /// [`read`](Self::read) by copy only, one way for all bytes: the kernel
    /// programs read IPv6 extension headers so, where a second (direct
    /// access) path per header would double the paths a verifier follows.
    #[inline(always)]
    fn read_copy<const N: usize>(&self, offset: usize) -> Option<[u8; N]> {
        self.read::<N>(offset)
    }
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
    /// Not the family this path parses: ARP, LLDP, ... (and IPv6 on the
    /// IPv4 path, IPv4 on the IPv6 path).
    OtherFamily,
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
    /// redirects and multicast listener messages between link-local (or
    /// unspecified) and link-scoped addresses: the link's own plumbing,
    /// always passed (IPv6 does not work without it), never forwarded.
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
        return Parsed::OtherFamily;
    };
    if u16::from_be_bytes(ethertype) != ETH_P_IP {
        return Parsed::OtherFamily;
    }
    parse_ipv4(bytes, ETH_HLEN)
}

/// The frame's ethertype (0 for a frame shorter than its Ethernet header).
#[inline(always)]
pub fn ethertype<B: PacketBytes + ?Sized>(bytes: &B) -> u16 {
    bytes.read::<2>(12).map_or(0, u16::from_be_bytes)
}

/// Parses an Ethernet frame carrying IPv6 (`OtherFamily` for anything else).
#[inline(always)]
pub fn parse_ethernet6<B: PacketBytes + ?Sized>(bytes: &B) -> Parsed<Ipv6Key> {
    if ethertype(bytes) != ETH_P_IPV6 {
        return Parsed::OtherFamily;
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

/// The fixed IPv6 header at `l3`, read in one copy (the IPv6 parse reads
/// only by copy: see [`PacketBytes::read_copy`]).
#[inline(always)]
fn ipv6_header<B: PacketBytes + ?Sized>(bytes: &B, l3: usize) -> Option<Ipv6> {
    let h = bytes.read_copy::<IPV6_HLEN>(l3)?;
    if h[0] >> 4 != 6 {
        return None;
    }
    let word = |at: usize| u32::from_ne_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
    Some(Ipv6 {
        payload_len: u16::from_be_bytes([h[4], h[5]]) as usize,
        next: h[6],
        saddr: Ipv6Key([word(8), word(12), word(16), word(20)]),
        daddr: Ipv6Key([word(24), word(28), word(32), word(36)]),
    })
}

/// IPv6 extension header numbers the walk steps over (RFC 8200 4.1).
const IPV6_HOP_BY_HOP: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_AUTH: u8 = 51;
const IPV6_DEST_OPTS: u8 = 60;
/// The extension headers as a bit set over their numbers (all below 64).
const EXTENSION_HEADERS: u64 = 1 << IPV6_HOP_BY_HOP
    | 1 << IPV6_ROUTING
    | 1 << IPV6_FRAGMENT
    | 1 << IPV6_AUTH
    | 1 << IPV6_DEST_OPTS;
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

/// Whether a link-plumbing message (see [`is_link_control`]) stays on its
/// link: from a link-local or unspecified source (neighbour discovery and
/// MLD use these, RFC 4861 4.3, RFC 3590) to a link-local or multicast
/// destination, which the host never forwards (it routes no multicast).
/// Such a message cannot reach another container, and claims no address
/// another container holds. Anything else with these types (a neighbour
/// solicitation to another container's address, an MLD report from a
/// global address) is parsed as the ordinary ICMPv6 flow it is: the
/// source's anti-spoofing check and the destination's policy apply to it.
#[inline(always)]
fn stays_on_link(saddr: Ipv6Key, daddr: Ipv6Key) -> bool {
    (saddr.is_link_local() || saddr.is_unspecified()) && daddr.is_link_scoped()
}

/// Parses an IPv6 packet whose header starts at `l3`: the fixed header, a
/// walk over at most [`MAX_EXTENSION_HEADERS`] extension headers (hop-by-hop
/// options, routing, destination options, authentication, fragment), then
/// the upper-layer header as for IPv4.
#[inline(always)]
pub fn parse_ipv6<B: PacketBytes + ?Sized>(bytes: &B, l3: usize) -> Parsed<Ipv6Key> {
    Ipv6Parts::parse(bytes, l3).build()
}

/// What [`parse_ipv6`] found, as plain values that are set on every path
/// (zero until known). The kernel programs turn it into a [`Parsed`] with
/// one function per variant (see `policy-ebpf`): built as one enum where
/// the paths meet, the fields a variant lacks are undefined on its paths,
/// and where LLVM merges the paths' stores it reads registers those paths
/// never set, which the verifier rejects (`!read_ok`).
#[derive(Clone, Copy, Default)]
pub struct Ipv6Parts {
    /// One of [`ipv6_kind`].
    pub kind: u8,
    pub saddr: Ipv6Key,
    pub daddr: Ipv6Key,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    /// A first fragment (kind `FLOW`; a later one is kind `LATER_FRAGMENT`).
    pub fragment: bool,
    pub fragment_id: u32,
    /// The datagram an ICMPv6 error quotes.
    pub about: Flow<Ipv6Key>,
}

impl Default for Flow<Ipv6Key> {
    fn default() -> Self {
        Flow {
            saddr: Ipv6Key::default(),
            daddr: Ipv6Key::default(),
            sport: 0,
            dport: 0,
            protocol: 0,
        }
    }
}

/// [`Ipv6Parts::kind`].
pub mod ipv6_kind {
    pub const MALFORMED: u8 = 0;
    pub const FLOW: u8 = 1;
    pub const LATER_FRAGMENT: u8 = 2;
    pub const ICMP_ERROR: u8 = 3;
    pub const LINK_CONTROL: u8 = 4;
}

impl Ipv6Parts {
    #[inline(always)]
    pub fn parse<B: PacketBytes + ?Sized>(bytes: &B, l3: usize) -> Self {
        let mut parts = Self::default();
        walk_ipv6(bytes, l3, &mut parts);
        parts
    }

    #[inline(always)]
    pub fn flow(&self) -> Flow<Ipv6Key> {
        Flow {
            saddr: self.saddr,
            daddr: self.daddr,
            sport: self.sport,
            dport: self.dport,
            protocol: self.protocol,
        }
    }

    /// The key of the fragmented datagram (first or later fragment).
    #[inline(always)]
    pub fn fragment_key(&self) -> FragmentKey6 {
        FragmentKey6 {
            saddr: self.saddr,
            daddr: self.daddr,
            id: self.fragment_id,
            protocol: u32::from(self.protocol),
        }
    }

    /// The parsed packet (host code; see above for the kernel programs).
    #[inline(always)]
    pub fn build(&self) -> Parsed<Ipv6Key> {
        match self.kind {
            ipv6_kind::FLOW => Parsed::Flow {
                flow: self.flow(),
                fragment: self.fragment.then(|| self.fragment_key()),
            },
            ipv6_kind::LATER_FRAGMENT => Parsed::LaterFragment(self.fragment_key()),
            ipv6_kind::ICMP_ERROR => {
                Parsed::IcmpError { saddr: self.saddr, daddr: self.daddr, about: self.about }
            }
            ipv6_kind::LINK_CONTROL => Parsed::LinkControl,
            _ => Parsed::Malformed,
        }
    }
}

/// Fills `parts`; returning early leaves it malformed.
#[inline(always)]
fn walk_ipv6<B: PacketBytes + ?Sized>(bytes: &B, l3: usize, parts: &mut Ipv6Parts) {
    let Some(ip) = ipv6_header(bytes, l3) else {
        return;
    };
    parts.saddr = ip.saddr;
    parts.daddr = ip.daddr;
    let end = l3 + IPV6_HLEN + ip.payload_len;
    let mut next = ip.next;
    let mut at = l3 + IPV6_HLEN;
    // The walk is arithmetic, not a branch per header kind: a verifier
    // follows every path through a loop separately, and three kinds over six
    // headers would be 3^6 paths.
    let mut fragment_headers = 0u64;
    let mut fragment_more = 0u64;
    let mut fragment_id = 0u32;
    let mut upper_layer = false;
    for _ in 0..MAX_EXTENSION_HEADERS {
        if next >= 64 || (EXTENSION_HEADERS >> next) & 1 == 0 {
            upper_layer = true;
            break;
        }
        // Every extension header is at least 8 bytes: next header, length
        // (reserved in a fragment header), then for a fragment header the
        // offset and flags and the identification.
        let Some(h) = bytes.read_copy::<8>(at) else {
            return;
        };
        // Each value the compiler could tell is 0 or 1 passes through
        // `opaque`, or it picks between two values with a branch.
        let kind = u64::from(next);
        let is_fragment = opaque((1u64 << IPV6_FRAGMENT >> kind) & 1);
        let is_auth = opaque((1u64 << IPV6_AUTH >> kind) & 1);
        let fragment_mask = opaque(0u64.wrapping_sub(is_fragment));
        let flags = u64::from(u16::from_be_bytes([h[2], h[3]])) & fragment_mask;
        let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
        if flags & u64::from(IPV6_FRAG_OFFSET_MASK) != 0 {
            parts.kind = ipv6_kind::LATER_FRAGMENT;
            parts.fragment = true;
            parts.fragment_id = id;
            parts.protocol = h[0];
            return;
        }
        fragment_headers += is_fragment;
        fragment_more |= flags & u64::from(IPV6_FRAG_MORE);
        fragment_id |= id & fragment_mask as u32;
        // Length: 8-byte units not counting the first (hop-by-hop, routing,
        // destination options); 4-byte units not counting the first two
        // (authentication); always 8 (fragment).
        let units = (u64::from(h[1]) & !fragment_mask) + 1 + is_auth;
        at += (units << (3 - is_auth)) as usize;
        next = h[0];
    }
    if !upper_layer || at > end || fragment_headers > 1 {
        return;
    }
    parts.protocol = next;
    parts.fragment = fragment_more != 0;
    parts.fragment_id = fragment_id;
    let l4_len = end - at;
    // The upper-layer header's first bytes, in one copy: the ports (and
    // the rest of a minimal TCP header, which must be there), or ICMPv6's
    // type, code and identifier.
    let (sport, dport) = match next {
        proto::TCP => {
            let Some(h) = bytes.read_copy::<TCP_MIN_HLEN>(at).filter(|_| l4_len >= TCP_MIN_HLEN)
            else {
                return;
            };
            (u16::from_be_bytes([h[0], h[1]]), u16::from_be_bytes([h[2], h[3]]))
        }
        proto::UDP => {
            let Some(h) = bytes.read_copy::<UDP_HLEN>(at).filter(|_| l4_len >= UDP_HLEN) else {
                return;
            };
            (u16::from_be_bytes([h[0], h[1]]), u16::from_be_bytes([h[2], h[3]]))
        }
        proto::ICMPV6 => {
            let Some(h) = bytes.read_copy::<ICMP_HLEN>(at).filter(|_| l4_len >= ICMP_HLEN) else {
                return;
            };
            if (1..=ICMPV6_ERROR_LAST).contains(&h[0]) {
                if let Some(about) = icmpv6_error_subject(bytes, at + ICMP_HLEN) {
                    (parts.about, parts.kind) = (about, ipv6_kind::ICMP_ERROR);
                }
                return;
            }
            if is_link_control(h[0]) && stays_on_link(ip.saddr, ip.daddr) {
                parts.kind = ipv6_kind::LINK_CONTROL;
                return;
            }
            icmpv6_ports(&h)
        }
        _ => (0, 0),
    };
    (parts.sport, parts.dport, parts.kind) = (sport, dport, ipv6_kind::FLOW);
}

/// `sport` and `dport` of the ICMPv6 message whose first 8 bytes are `h`
/// (see [`Flow`]).
#[inline(always)]
fn icmpv6_ports(h: &[u8; ICMP_HLEN]) -> (u16, u16) {
    let id = if Ipv6Key::icmp_query(h[0]).is_some() { u16::from_be_bytes([h[4], h[5]]) } else { 0 };
    (id, icmp_port(h[0], h[1]))
}

/// The datagram an ICMPv6 error quotes: its IPv6 header and, if the
/// upper-layer header follows it directly, that header's ports.
#[inline(always)]
fn icmpv6_error_subject<B: PacketBytes + ?Sized>(bytes: &B, inner: usize) -> Option<Flow<Ipv6Key>> {
    let ip = ipv6_header(bytes, inner)?;
    let l4 = inner + IPV6_HLEN;
    let (sport, dport) = match ip.next {
        proto::TCP | proto::UDP => {
            let [s_hi, s_lo, d_hi, d_lo] = bytes.read_copy::<4>(l4)?;
            (u16::from_be_bytes([s_hi, s_lo]), u16::from_be_bytes([d_hi, d_lo]))
        }
        proto::ICMPV6 => icmpv6_ports(&bytes.read_copy::<ICMP_HLEN>(l4)?),
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
