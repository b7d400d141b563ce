//! The same decision on IPv6: policies, replies, ICMPv6 echo, the
//! extension-header walk, fragments.

extern crate std;
use std::collections::{HashMap, HashSet};

use super::super::*;
use super::apply_to;
use crate::craft::{icmp_header, ipv6_frame, l4_header};
use crate::maps::{FragmentKey6, Ipv6Key, proto};
use crate::packet::{MAX_EXTENSION_HEADERS, icmp_port, parse_ethernet6};
use crate::ports::{Allowance, PairValues};

const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const LINK: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

fn key(a: [u8; 16]) -> Ipv6Key {
    Ipv6Key::from_octets(a)
}

#[derive(Default)]
struct Mem6 {
    endpoints: HashMap<Ipv6Key, EndpointValue>,
    /// `POLICIES` and, for pairs with more than one range, `PORT_SETS`.
    policies: HashMap<PairKey, PairValues>,
    conns: HashMap<ConnKey<Ipv6Key>, Conn>,
    fragments: HashSet<FragmentKey6>,
}

impl Lookups<Ipv6Key> for Mem6 {
    fn endpoint(&self, addr: Ipv6Key) -> Option<EndpointValue> {
        self.endpoints.get(&addr).copied()
    }
    fn pair_ports(&self, key: &PairKey) -> Option<&PairPorts> {
        self.policies.get(key).map(|v| &v.pair)
    }
    fn port_set(&self, key: &PairKey) -> Option<&SmallPortSet> {
        self.policies.get(key)?.set.as_ref()
    }
    fn wide_port_set(&self, key: &PairKey) -> Option<&PortRules> {
        self.policies.get(key)?.wide.as_ref()
    }
    fn conn(&self, key: &ConnKey<Ipv6Key>) -> Option<Conn> {
        self.conns.get(key).copied()
    }
    fn epoch(&self) -> u32 {
        0
    }
    fn fragment_allowed(&self, key: &FragmentKey6) -> bool {
        self.fragments.contains(key)
    }
}

impl Mem6 {
    fn new() -> Self {
        let mut t = Self::default();
        t.endpoints.insert(key(A6), EndpointValue { tag: 1, flags: 0 });
        t.endpoints.insert(key(B6), EndpointValue { tag: 2, flags: 0 });
        t
    }
    fn allow(&mut self, protocol: u8, start: u16, end: u16) {
        let rules = PortRules::build(&[Allowance { start, end, policy_id: 7 }]).unwrap();
        self.policies.insert(PairKey::new(1, 2, protocol), PairValues::of(&rules));
    }
    fn deliver(&mut self, frame: &[u8]) -> Verdict {
        let parsed = parse_ethernet6(frame);
        let decision = decide_destination(self, &parsed);
        apply_to(&mut self.conns, decision.conn);
        if let Some(f) = decision.record_fragment {
            self.fragments.insert(f);
        }
        decision.verdict
    }
}

fn tcp(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> std::vec::Vec<u8> {
    ipv6_frame(src, dst, proto::TCP, &[], &l4_header(proto::TCP, sport, dport))
}

#[test]
fn the_same_policies_decide_ipv6_with_replies_and_icmpv6_echo() {
    let mut t = Mem6::new();
    assert_eq!(t.deliver(&tcp(A6, B6, 40000, 8080)), Verdict::Drop(Reason::NoPolicy));
    t.allow(proto::TCP, 8080, 8080);
    assert_eq!(t.deliver(&tcp(A6, B6, 40000, 8080)), Verdict::Pass(Reason::NewAllowed));
    assert_eq!(t.deliver(&tcp(B6, A6, 8080, 40000)), Verdict::Pass(Reason::Reply));
    assert_eq!(t.deliver(&tcp(A6, B6, 40000, 8081)), Verdict::Drop(Reason::NoPolicy));
    // Echo (128) allowed by an icmpv6 policy; its reply (129) passes.
    let echo = |src, dst, ty| ipv6_frame(src, dst, proto::ICMPV6, &[], &icmp_header(ty, 0, 5));
    assert_eq!(t.deliver(&echo(A6, B6, 128)), Verdict::Drop(Reason::NoPolicy));
    t.allow(proto::ICMPV6, icmp_port(128, 0), icmp_port(128, 255));
    assert_eq!(t.deliver(&echo(A6, B6, 128)), Verdict::Pass(Reason::NewAllowed));
    assert_eq!(t.deliver(&echo(B6, A6, 129)), Verdict::Pass(Reason::Reply));
    assert_eq!(t.deliver(&echo(B6, A6, 128)), Verdict::Drop(Reason::NoPolicy));
    // Unregistered addresses are not container-to-container.
    assert_eq!(t.deliver(&tcp(LINK, B6, 1, 22)), Verdict::Pass(Reason::Unmanaged));
}

#[test]
fn extension_headers_are_walked_a_bounded_number_of_times() {
    let mut t = Mem6::new();
    t.allow(proto::UDP, 53, 53);
    let udp = l4_header(proto::UDP, 5000, 53);
    // Hop-by-hop (8 bytes) then destination options (16 bytes), then UDP.
    let mut ext = std::vec![60, 0, 1, 4, 0, 0, 0, 0];
    ext.extend_from_slice(&[proto::UDP, 1, 1, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let frame = ipv6_frame(A6, B6, 0, &ext, &udp);
    assert!(
        matches!(parse_ethernet6(frame.as_slice()), Parsed::Flow { flow, .. } if flow.dport == 53 && flow.protocol == proto::UDP)
    );
    assert_eq!(t.deliver(&frame), Verdict::Pass(Reason::NewAllowed));
    // A chain longer than the walk: malformed, dropped.
    let mut long = std::vec::Vec::new();
    for _ in 0..MAX_EXTENSION_HEADERS {
        long.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    let frame = ipv6_frame(A6, B6, 60, &long, &udp);
    assert_eq!(t.deliver(&frame), Verdict::Drop(Reason::Malformed));
    // Cut inside an extension header or the UDP header.
    let frame = ipv6_frame(A6, B6, 0, &ext, &udp);
    for cut in [14 + 39, 14 + 40 + 4, 14 + 40 + 24 + 4] {
        assert_eq!(t.deliver(&frame[..cut]), Verdict::Drop(Reason::Malformed), "cut {cut}");
    }
}

#[test]
fn fragments_follow_their_first_fragment() {
    let mut t = Mem6::new();
    t.allow(proto::UDP, 53, 53);
    let udp = l4_header(proto::UDP, 5000, 53);
    let fragment = |offset: u16, more: bool, id: u32| {
        let mut h = std::vec![proto::UDP, 0];
        h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        h.extend_from_slice(&id.to_be_bytes());
        h
    };
    let later = ipv6_frame(A6, B6, 44, &fragment(100, false, 9), &[0; 16]);
    assert_eq!(t.deliver(&later), Verdict::Drop(Reason::FragmentUnknown));
    let first = ipv6_frame(A6, B6, 44, &fragment(0, true, 9), &udp);
    assert_eq!(t.deliver(&first), Verdict::Pass(Reason::NewAllowed));
    assert_eq!(t.deliver(&later), Verdict::Pass(Reason::Fragment));
    let denied_first =
        ipv6_frame(A6, B6, 44, &fragment(0, true, 10), &l4_header(proto::UDP, 5000, 54));
    assert_eq!(t.deliver(&denied_first), Verdict::Drop(Reason::NoPolicy));
    let later = ipv6_frame(A6, B6, 44, &fragment(100, false, 10), &[0; 16]);
    assert_eq!(t.deliver(&later), Verdict::Drop(Reason::FragmentUnknown));
}

#[test]
fn icmpv6_errors_quote_connections_and_link_plumbing_always_passes() {
    let mut t = Mem6::new();
    t.allow(proto::TCP, 8080, 8080);
    let request = tcp(A6, B6, 40000, 8080);
    // Destination unreachable quoting the request's IPv6 and TCP headers.
    let mut error = icmp_header(1, 4, 0);
    error.extend_from_slice(&request[14..14 + 40 + 8]);
    let error = ipv6_frame(B6, A6, proto::ICMPV6, &[], &error);
    assert_eq!(t.deliver(&error), Verdict::Drop(Reason::NoPolicy));
    assert!(t.deliver(&request).is_pass());
    assert_eq!(t.deliver(&error), Verdict::Pass(Reason::Related));
    // Neighbour solicitation and router solicitation on the link: always.
    for ty in [135, 136, 133, 134, 143] {
        let nd = ipv6_frame(LINK, ALL_NODES, proto::ICMPV6, &[], &icmp_header(ty, 0, 0));
        assert_eq!(t.deliver(&nd), Verdict::Pass(Reason::LinkControl), "type {ty}");
        let parsed = parse_ethernet6(nd.as_slice());
        let verdict = decide_source6(&t, &parsed, Some(key(A6)), TunnelPort(0));
        assert_eq!(verdict, Verdict::Pass(Reason::LinkControl));
    }
}

#[test]
fn link_plumbing_stays_on_the_link() {
    const SOLICITED: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 1];
    const STRANGER: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x99];
    let t = Mem6::new();
    let nd = |src, dst, ty| {
        let mut body = icmp_header(ty, 0, 0);
        body.extend_from_slice(&[0x5a; 800]);
        parse_ethernet6(ipv6_frame(src, dst, proto::ICMPV6, &[], &body).as_slice())
    };
    let from_a =
        |parsed: &Parsed<Ipv6Key>| decide_source6(&t, parsed, Some(key(A6)), TunnelPort(0));
    // Duplicate address detection (from ::) and MLD from a link-local
    // address, to multicast: plumbing.
    assert_eq!(nd([0; 16], SOLICITED, 135), Parsed::LinkControl);
    assert_eq!(nd(LINK, ALL_NODES, 143), Parsed::LinkControl);
    // A solicitation with B's address forged as its source, an MLD
    // report from an arbitrary address, to B: flows, spoofed at A's side.
    for parsed in [nd(B6, B6, 135), nd(B6, SOLICITED, 135), nd(STRANGER, B6, 131)] {
        assert!(matches!(parsed, Parsed::Flow { .. }), "{parsed:?}");
        assert_eq!(from_a(&parsed), Verdict::Drop(Reason::Spoofed));
    }
    // From A's own address to B: a flow that B's side judges by policy.
    let mut t = Mem6::new();
    let own = nd(A6, B6, 135);
    assert_eq!(from_a(&own), Verdict::Pass(Reason::SourceVerified));
    let frame = ipv6_frame(A6, B6, proto::ICMPV6, &[], &icmp_header(135, 0, 0));
    assert_eq!(t.deliver(&frame), Verdict::Drop(Reason::NoPolicy));
    // Link-local, but to another container's address: never plumbing.
    assert_eq!(from_a(&nd(LINK, B6, 135)), Verdict::Drop(Reason::Spoofed));
    // The container's own global address to the gateway: its own.
    assert_eq!(from_a(&nd(A6, LINK, 136)), Verdict::Pass(Reason::SourceVerified));
    // An endpoint without IPv6 (::) claims nothing by sending from ::.
    let unspecified = Some(Ipv6Key::default());
    let udp = ipv6_frame([0; 16], B6, proto::UDP, &[], &l4_header(proto::UDP, 1, 2));
    let verdict = decide_source6(&t, &parse_ethernet6(udp.as_slice()), unspecified, TunnelPort(0));
    assert_eq!(verdict, Verdict::Drop(Reason::Spoofed));
}

#[test]
fn icmpv6_errors_pass_only_between_the_ends_of_what_they_quote() {
    const C6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3];
    let mut t = Mem6::new();
    t.endpoints.insert(key(C6), EndpointValue { tag: 3, flags: 0 });
    t.allow(proto::TCP, 8080, 8080);
    let request = tcp(A6, B6, 40000, 8080);
    assert!(t.deliver(&request).is_pass());
    let error = |src, dst| {
        let mut body = icmp_header(1, 4, 0);
        body.extend_from_slice(&request[14..14 + 40 + 8]);
        ipv6_frame(src, dst, proto::ICMPV6, &[], &body)
    };
    assert_eq!(t.deliver(&error(B6, A6)), Verdict::Pass(Reason::Related));
    assert_eq!(t.deliver(&error(LINK, A6)), Verdict::Pass(Reason::Related));
    assert_eq!(t.deliver(&error(C6, A6)), Verdict::Drop(Reason::Spoofed));
    assert_eq!(t.deliver(&error(A6, B6)), Verdict::Drop(Reason::Spoofed));
}

#[test]
fn the_source_side_checks_ipv6_sources() {
    let own = Some(key(A6));
    let t = Mem6::new();
    let verdict = |frame: std::vec::Vec<u8>, own| {
        decide_source6(&t, &parse_ethernet6(frame.as_slice()), own, TunnelPort(0))
    };
    assert_eq!(verdict(tcp(A6, B6, 1, 2), own), Verdict::Pass(Reason::SourceVerified));
    assert_eq!(verdict(tcp(B6, A6, 1, 2), own), Verdict::Drop(Reason::Spoofed));
    assert_eq!(verdict(tcp(LINK, B6, 1, 2), own), Verdict::Drop(Reason::Spoofed));
    assert_eq!(verdict(tcp(LINK, ALL_NODES, 1, 2), own), Verdict::Pass(Reason::Unmanaged));
    assert_eq!(verdict(tcp(B6, A6, 1, 2), None), Verdict::Pass(Reason::Unmanaged));
}
