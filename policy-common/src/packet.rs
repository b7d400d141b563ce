//! Header parsing, written once for the kernel (over packet memory) and the
//! host tests (over a byte slice). Every read is bounds-checked by the
//! [`PacketBytes`] implementation; this module only decides what to read.

use crate::maps::{FragmentKey, proto};

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

/// The 5-tuple of a packet. Addresses in wire order, ports in host order
/// (see [`crate::maps`]). ICMP messages other than errors stand in ports'
/// place as policies match them: `dport` is `type << 8 | code` (what an icmp
/// policy's range holds, see [`icmp_port`]) and `sport` the query's
/// identifier (echo, timestamp, information and address-mask messages; 0 for
/// other types), which pairs a reply with its request. Other protocols
/// without ports (GRE, ...) have both ports 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Flow {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
}

/// What a packet is, as far as the policy is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// Not IPv4: ARP, IPv6, LLDP, ...
    NotIpv4,
    /// Cut short or inconsistent IPv4 / L4 headers.
    Malformed,
    /// A datagram, or the first fragment of one (then `fragment` is set so the
    /// later fragments can follow its verdict).
    Flow { flow: Flow, fragment: Option<FragmentKey> },
    /// A fragment other than the first: no L4 header.
    LaterFragment(FragmentKey),
    /// An ICMP error (unreachable, time exceeded, parameter problem) from
    /// `saddr` to `daddr` about the datagram `about` (as originally sent).
    IcmpError { saddr: u32, daddr: u32, about: Flow },
}

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;

const IPV4_MIN_HLEN: usize = 20;
const TCP_MIN_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const ICMP_HLEN: usize = 8;
const IP_MF: u16 = 0x2000;
const IP_OFFSET_MASK: u16 = 0x1fff;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;

/// The "port" an ICMP message of `icmp_type` and `code` has for policies:
/// an icmp policy allowing a type and code holds the range of one such
/// value, a type with any code `type << 8 ..= type << 8 | 0xff`.
#[inline(always)]
pub const fn icmp_port(icmp_type: u8, code: u8) -> u16 {
    (icmp_type as u16) << 8 | code as u16
}

/// ICMP query types that come in request/reply pairs with an identifier
/// (RFC 792, RFC 950): echo, timestamp, information, address mask. The
/// answer to `request` is `request - 8` for echo and `request + 1` for the
/// others.
#[inline(always)]
pub const fn icmp_query(icmp_type: u8) -> Option<IcmpQuery> {
    match icmp_type {
        8 | 13 | 15 | 17 => Some(IcmpQuery { request: icmp_type, is_reply: false }),
        0 => Some(IcmpQuery { request: 8, is_reply: true }),
        14 | 16 | 18 => Some(IcmpQuery { request: icmp_type - 1, is_reply: true }),
        _ => None,
    }
}

/// See [`icmp_query`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IcmpQuery {
    /// The type of the request of the pair.
    pub request: u8,
    /// This message is the answer.
    pub is_reply: bool,
}

impl Flow {
    /// Whether an allowed packet like this one starts something whose
    /// answers must pass: every TCP and UDP flow; of ICMP, only query
    /// requests (echo, ...). An ICMP answer or a one-way message (router
    /// advertisement, ...) that a policy allows passes on its own, tracking
    /// nothing.
    #[inline(always)]
    pub fn opens_connection(&self) -> bool {
        self.protocol != proto::ICMP
            || match icmp_query((self.dport >> 8) as u8) {
                Some(q) => !q.is_reply,
                None => false,
            }
    }
}

/// `sport` and `dport` of an ICMP message (see [`Flow`]) whose header
/// starts at `l4`, or `None` if its first 8 bytes are not there.
#[inline(always)]
fn icmp_ports<B: PacketBytes + ?Sized>(bytes: &B, l4: usize) -> Option<(u16, u16)> {
    let [icmp_type, code, _, _] = bytes.read::<4>(l4)?;
    let [id_hi, id_lo, _, _] = bytes.read::<4>(l4 + 4)?;
    let id = if icmp_query(icmp_type).is_some() { u16::from_be_bytes([id_hi, id_lo]) } else { 0 };
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
                _ => match icmp_ports(bytes, l4) {
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
        proto::ICMP => icmp_ports(bytes, inner + ip.hlen)?,
        _ => (0, 0),
    };
    Some(Flow { saddr: ip.saddr, daddr: ip.daddr, sport, dport, protocol: ip.protocol })
}
