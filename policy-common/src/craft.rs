//! Building packets for tests and benchmarks (userspace only).

extern crate std;
use std::vec::Vec;

use crate::maps::proto;

/// Options for one crafted IPv4 packet.
#[derive(Clone, Debug)]
pub struct PacketSpec {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub protocol: u8,
    pub sport: u16,
    pub dport: u16,
    /// Extra IPv4 option bytes (a multiple of 4, at most 40).
    pub ip_options: Vec<u8>,
    /// IPv4 fragment offset in 8-byte units, and the more-fragments flag.
    pub frag_offset: u16,
    pub more_fragments: bool,
    pub ip_id: u16,
    pub payload: Vec<u8>,
    /// The payload is the whole L4 part: no header is generated for it.
    pub raw_l4: bool,
}

impl PacketSpec {
    pub fn new(src: [u8; 4], dst: [u8; 4], protocol: u8, sport: u16, dport: u16) -> Self {
        Self {
            src,
            dst,
            protocol,
            sport,
            dport,
            ip_options: Vec::new(),
            frag_offset: 0,
            more_fragments: false,
            ip_id: 0x1234,
            payload: std::vec![0u8; 8],
            raw_l4: false,
        }
    }

    pub fn tcp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Self {
        Self::new(src, dst, proto::TCP, sport, dport)
    }

    pub fn udp(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Self {
        Self::new(src, dst, proto::UDP, sport, dport)
    }

    /// An ICMP message of `icmp_type` and `code` with identifier `id` (the
    /// ports as [`crate::packet::Flow`] has them for ICMP).
    pub fn icmp(src: [u8; 4], dst: [u8; 4], icmp_type: u8, code: u8, id: u16) -> Self {
        let port = crate::packet::icmp_port(icmp_type, code);
        Self::new(src, dst, proto::ICMP, id, port)
    }

    /// The L4 header (and payload) as it follows the IP header.
    fn l4(&self) -> Vec<u8> {
        let mut l4 = Vec::new();
        if self.raw_l4 {
            return self.payload.clone();
        }
        match self.protocol {
            proto::TCP => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0]); // seq, ack
                l4.extend_from_slice(&[0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]); // doff=5, SYN
            }
            proto::UDP => {
                l4.extend_from_slice(&self.sport.to_be_bytes());
                l4.extend_from_slice(&self.dport.to_be_bytes());
                let len = (8 + self.payload.len()) as u16;
                l4.extend_from_slice(&len.to_be_bytes());
                l4.extend_from_slice(&[0, 0]);
            }
            proto::ICMP => {
                // type, code, checksum, identifier, sequence 1; the
                // checksum covers the payload too.
                let [icmp_type, code] = self.dport.to_be_bytes();
                let [id_hi, id_lo] = self.sport.to_be_bytes();
                let mut message = std::vec![icmp_type, code, 0, 0, id_hi, id_lo, 0, 1];
                message.extend_from_slice(&self.payload);
                let sum = checksum(&message).to_be_bytes();
                message[2..4].copy_from_slice(&sum);
                return message;
            }
            _ => {}
        }
        l4.extend_from_slice(&self.payload);
        l4
    }

    /// The IPv4 packet, starting at the IP header.
    pub fn ipv4(&self) -> Vec<u8> {
        let body = if self.frag_offset > 0 { self.payload.clone() } else { self.l4() };
        ipv4_with_body(self, &body)
    }

    /// The packet in an Ethernet frame.
    pub fn frame(&self) -> Vec<u8> {
        ethernet(&self.ipv4())
    }
}

fn ipv4_with_body(spec: &PacketSpec, body: &[u8]) -> Vec<u8> {
    assert!(spec.ip_options.len().is_multiple_of(4) && spec.ip_options.len() <= 40);
    let hlen = 20 + spec.ip_options.len();
    let total = (hlen + body.len()) as u16;
    let mut frag = spec.frag_offset & 0x1fff;
    if spec.more_fragments {
        frag |= 0x2000;
    }
    let mut ip = Vec::with_capacity(hlen + body.len());
    ip.push(0x40 | (hlen / 4) as u8);
    ip.push(0);
    ip.extend_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&spec.ip_id.to_be_bytes());
    ip.extend_from_slice(&frag.to_be_bytes());
    ip.extend_from_slice(&[64, spec.protocol, 0, 0]);
    ip.extend_from_slice(&spec.src);
    ip.extend_from_slice(&spec.dst);
    ip.extend_from_slice(&spec.ip_options);
    let csum = checksum(&ip[..hlen]);
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    ip.extend_from_slice(body);
    ip
}

/// An ICMP destination-unreachable from `src` to `dst` quoting `about`.
pub fn icmp_unreachable(src: [u8; 4], dst: [u8; 4], about: &PacketSpec) -> PacketSpec {
    let quoted = about.ipv4();
    let quoted_len = quoted.len().min(20 + about.ip_options.len() + 8);
    let mut payload = std::vec![3, 3, 0, 0, 0, 0, 0, 0];
    payload.extend_from_slice(&quoted[..quoted_len]);
    PacketSpec { payload, raw_l4: true, ..PacketSpec::new(src, dst, proto::ICMP, 0, 0x0303) }
}

/// Wraps an IPv4 packet in an Ethernet header.
pub fn ethernet(ipv4: &[u8]) -> Vec<u8> {
    let mut frame = std::vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
    frame.extend_from_slice(ipv4);
    frame
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv6 packet in an Ethernet frame: the fixed header, `extensions`
/// (raw extension headers; the first one's type is `first_next`, each
/// names the next), and `upper` (the upper-layer header and payload) whose
/// protocol is `protocol`.
pub fn ipv6_frame(
    src: [u8; 16],
    dst: [u8; 16],
    first_next: u8,
    extensions: &[u8],
    upper: &[u8],
) -> Vec<u8> {
    let mut frame = std::vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x86, 0xdd];
    let payload_len = (extensions.len() + upper.len()) as u16;
    frame.extend_from_slice(&[0x60, 0, 0, 0]);
    frame.extend_from_slice(&payload_len.to_be_bytes());
    frame.extend_from_slice(&[first_next, 64]);
    frame.extend_from_slice(&src);
    frame.extend_from_slice(&dst);
    frame.extend_from_slice(extensions);
    frame.extend_from_slice(upper);
    frame
}

/// A TCP SYN or UDP header (8 payload bytes for UDP) from `sport` to `dport`.
pub fn l4_header(protocol: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.extend_from_slice(&sport.to_be_bytes());
    l4.extend_from_slice(&dport.to_be_bytes());
    if protocol == proto::TCP {
        l4.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    } else {
        l4.extend_from_slice(&[0, 16, 0, 0]);
        l4.extend_from_slice(&[0; 8]);
    }
    l4
}

/// An ICMP(v6) message header of `icmp_type`, `code`, identifier `id`.
pub fn icmp_header(icmp_type: u8, code: u8, id: u16) -> Vec<u8> {
    let [id_hi, id_lo] = id.to_be_bytes();
    std::vec![icmp_type, code, 0, 0, id_hi, id_lo, 0, 1]
}
