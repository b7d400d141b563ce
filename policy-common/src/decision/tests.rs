extern crate std;
use std::collections::{HashMap, HashSet};

use super::*;
use crate::craft::{PacketSpec, icmp_unreachable};
use crate::maps::{FragmentKey, proto};
use crate::packet::{icmp_port, parse_ethernet, parse_ipv4};
use crate::ports::{Allowance, PairValues};

/// What the kernel programs do with a decision's `CONNTRACK` change.
fn apply_to<A: Family + Eq + std::hash::Hash>(
    conns: &mut HashMap<ConnKey<A>, Conn>,
    update: ConnUpdate<A>,
) {
    match update.kind {
        conn_update::INSERT => {
            conns.insert(update.key, update.conn);
        }
        conn_update::REMOVE => {
            conns.remove(&update.key);
        }
        _ => {}
    }
}

/// In-memory maps, applying decisions the way the kernel program does.
#[derive(Default)]
struct MemLookups {
    endpoints: HashMap<u32, EndpointValue>,
    /// `POLICIES` and, for pairs with more than one range, `PORT_SETS`.
    policies: HashMap<PairKey, PairValues>,
    conns: HashMap<ConnKey, Conn>,
    fragments: HashSet<FragmentKey>,
    epoch: u32,
    /// Packets passed as established or reply at the current epoch.
    tracked_hits: u32,
}

impl Lookups for MemLookups {
    fn endpoint(&self, addr: u32) -> Option<EndpointValue> {
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
    fn conn(&self, key: &ConnKey) -> Option<Conn> {
        self.conns.get(key).copied()
    }
    fn epoch(&self) -> u32 {
        self.epoch
    }
    fn fragment_allowed(&self, key: &FragmentKey) -> bool {
        self.fragments.contains(key)
    }
}

const A: [u8; 4] = [10, 255, 0, 1];
const B: [u8; 4] = [10, 255, 0, 2];
const HOST: [u8; 4] = [169, 254, 0, 1];

fn addr(ip: [u8; 4]) -> u32 {
    u32::from_ne_bytes(ip)
}

impl MemLookups {
    fn with_endpoints() -> Self {
        let mut t = MemLookups::default();
        t.endpoints.insert(addr(A), EndpointValue { tag: 1, flags: 0 });
        t.endpoints.insert(addr(B), EndpointValue { tag: 2, flags: 0 });
        t
    }

    fn allow(&mut self, src_tag: u32, dst_tag: u32, protocol: u8, start: u16, end: u16, id: u32) {
        let key = PairKey::new(src_tag, dst_tag, protocol);
        let mut all: std::vec::Vec<Allowance> = self
            .policies
            .get(&key)
            .and_then(|v| v.rules())
            .map(|r| r.allowances().collect())
            .unwrap_or_default();
        all.push(Allowance { start, end, policy_id: id });
        let rules = PortRules::build(&all).unwrap();
        self.policies.insert(key, PairValues::of(&rules));
    }

    /// Runs the destination decision on a frame and applies its effects. A
    /// packet of a connection checked at this epoch (established or reply)
    /// passes with its connection's policy and changes no map.
    fn deliver(&mut self, spec: &PacketSpec) -> Verdict {
        let frame = spec.frame();
        let parsed = parse_ethernet(frame.as_slice());
        let tracked = match parsed {
            Parsed::Flow { flow, fragment: None } => {
                // (A reject's entry tracks nothing.)
                self.conns
                    .get(&ConnKey::of(&flow).0)
                    .filter(|c| c.epoch == self.epoch && c.origin & origin::REJECTED == 0)
                    .copied()
            }
            _ => None,
        };
        let decision = decide_destination(self, &parsed);
        if let Some(conn) = tracked {
            assert!(
                matches!(decision.verdict, Verdict::Pass(Reason::Established | Reason::Reply)),
                "{spec:?}: {decision:?}"
            );
            assert_eq!(decision.policy_id, conn.policy_id, "{spec:?}");
            assert_eq!((decision.conn, decision.record_fragment), (ConnUpdate::none(), None));
            self.tracked_hits += 1;
        }
        apply_to(&mut self.conns, decision.conn);
        if let Some(f) = decision.record_fragment {
            self.fragments.insert(f);
        }
        decision.verdict
    }
}

#[test]
fn denied_by_default_allowed_by_policy_with_range_edges() {
    let mut t = MemLookups::with_endpoints();
    assert_eq!(t.deliver(&PacketSpec::tcp(A, B, 40000, 8080)), Verdict::Drop(Reason::NoPolicy));
    t.allow(1, 2, proto::TCP, 8080, 8090, 9);
    for (port, ok) in [(8079, false), (8080, true), (8090, true), (8091, false)] {
        let v = t.deliver(&PacketSpec::tcp(A, B, 40001 + port, port));
        assert_eq!(v.is_pass(), ok, "port {port}: {v:?}");
    }
    // The policy is directional and per protocol.
    assert_eq!(t.deliver(&PacketSpec::tcp(B, A, 40000, 8080)), Verdict::Drop(Reason::NoPolicy));
    assert_eq!(t.deliver(&PacketSpec::udp(A, B, 40000, 8080)), Verdict::Drop(Reason::NoPolicy));
}

#[test]
fn replies_and_established_packets_pass() {
    let mut t = MemLookups::with_endpoints();
    t.allow(1, 2, proto::TCP, 8080, 8080, 3);
    assert_eq!(t.deliver(&PacketSpec::tcp(A, B, 40000, 8080)), Verdict::Pass(Reason::NewAllowed));
    assert_eq!(t.deliver(&PacketSpec::tcp(A, B, 40000, 8080)), Verdict::Pass(Reason::Established));
    assert_eq!(t.deliver(&PacketSpec::tcp(B, A, 8080, 40000)), Verdict::Pass(Reason::Reply));
    // A reply-shaped packet of a connection never opened is denied.
    assert_eq!(t.deliver(&PacketSpec::tcp(B, A, 8080, 40001)), Verdict::Drop(Reason::NoPolicy));
    assert_eq!(t.tracked_hits, 2, "the established packet and the reply");
}

#[test]
fn removing_a_policy_revokes_its_connections_at_the_next_epoch() {
    let mut t = MemLookups::with_endpoints();
    t.allow(1, 2, proto::UDP, 53, 53, 1);
    assert!(t.deliver(&PacketSpec::udp(A, B, 5000, 53)).is_pass());
    t.policies.clear();
    // Same epoch: the agent has not bumped it yet, the entry still holds.
    assert_eq!(t.deliver(&PacketSpec::udp(B, A, 53, 5000)), Verdict::Pass(Reason::Reply));
    t.epoch += 1;
    assert_eq!(t.deliver(&PacketSpec::udp(B, A, 53, 5000)), Verdict::Drop(Reason::Revoked));
    assert!(t.conns.is_empty());
    assert_eq!(t.deliver(&PacketSpec::udp(A, B, 5000, 53)), Verdict::Drop(Reason::NoPolicy));
}

#[test]
fn a_new_epoch_keeps_connections_that_are_still_allowed() {
    let mut t = MemLookups::with_endpoints();
    t.allow(1, 2, proto::TCP, 80, 90, 1);
    assert!(t.deliver(&PacketSpec::tcp(A, B, 5000, 85)).is_pass());
    t.epoch += 1;
    assert_eq!(t.deliver(&PacketSpec::tcp(B, A, 85, 5000)), Verdict::Pass(Reason::Reply));
    assert_eq!(t.conns.values().next().unwrap().epoch, 1);
}

#[test]
fn traffic_not_between_two_endpoints_is_unmanaged() {
    let mut t = MemLookups::with_endpoints();
    assert_eq!(t.deliver(&PacketSpec::tcp(HOST, B, 1, 22)), Verdict::Pass(Reason::Unmanaged));
    assert_eq!(t.deliver(&PacketSpec::tcp(A, HOST, 1, 22)), Verdict::Pass(Reason::Unmanaged));
    // ICMP echo between endpoints: denied without an icmp policy.
    let ping = PacketSpec::icmp(A, B, 8, 0, 1);
    assert_eq!(t.deliver(&ping), Verdict::Drop(Reason::NoPolicy));
    assert_eq!(t.deliver(&PacketSpec::icmp(HOST, B, 8, 0, 1)), Verdict::Pass(Reason::Unmanaged));
}

/// An icmp policy's range for one type, any code.
fn icmp_type_range(icmp_type: u8) -> (u16, u16) {
    (icmp_port(icmp_type, 0), icmp_port(icmp_type, 0xff))
}

#[test]
fn icmp_policies_allow_their_type_and_the_replies() {
    let mut t = MemLookups::with_endpoints();
    let (start, end) = icmp_type_range(8);
    t.allow(1, 2, proto::ICMP, start, end, 4);
    assert_eq!(t.deliver(&PacketSpec::icmp(A, B, 8, 0, 77)), Verdict::Pass(Reason::NewAllowed));
    assert_eq!(t.deliver(&PacketSpec::icmp(B, A, 0, 0, 77)), Verdict::Pass(Reason::Reply));
    assert_eq!(t.deliver(&PacketSpec::icmp(A, B, 8, 0, 77)), Verdict::Pass(Reason::Established));
    // A reply with another identifier answers nothing that was sent.
    assert_eq!(t.deliver(&PacketSpec::icmp(B, A, 0, 0, 78)), Verdict::Drop(Reason::NoPolicy));
    // The other way needs its own policy, even with the tracked identifier:
    // an echo request from B is not a reply to A's.
    assert_eq!(t.deliver(&PacketSpec::icmp(B, A, 8, 0, 77)), Verdict::Drop(Reason::NoPolicy));
    assert_eq!(t.deliver(&PacketSpec::icmp(B, A, 0, 0, 77)), Verdict::Pass(Reason::Reply));
    // Other types stay denied: timestamp, and an unsolicited echo reply.
    assert_eq!(t.deliver(&PacketSpec::icmp(A, B, 13, 0, 5)), Verdict::Drop(Reason::NoPolicy));
    assert_eq!(t.deliver(&PacketSpec::icmp(A, B, 0, 0, 6)), Verdict::Drop(Reason::NoPolicy));
    // A policy for echo replies lets them pass, but they open nothing: B's
    // echo request (same identifier) after A's allowed reply is still denied.
    t.allow(1, 2, proto::ICMP, icmp_port(0, 0), icmp_port(0, 0), 7);
    let conns = t.conns.len();
    assert_eq!(t.deliver(&PacketSpec::icmp(A, B, 0, 0, 6)), Verdict::Pass(Reason::NewAllowed));
    assert_eq!(t.conns.len(), conns, "an answer tracks nothing");
    assert_eq!(t.deliver(&PacketSpec::icmp(B, A, 8, 0, 6)), Verdict::Drop(Reason::NoPolicy));
    // A code-specific policy matches that code only.
    t.allow(1, 2, proto::ICMP, icmp_port(13, 0), icmp_port(13, 0), 5);
    assert_eq!(t.deliver(&PacketSpec::icmp(A, B, 13, 1, 9)), Verdict::Drop(Reason::NoPolicy));
    assert_eq!(t.deliver(&PacketSpec::icmp(A, B, 13, 0, 9)), Verdict::Pass(Reason::NewAllowed));
    assert_eq!(t.deliver(&PacketSpec::icmp(B, A, 14, 0, 9)), Verdict::Pass(Reason::Reply));
    // A TCP policy allows no ICMP, an ICMP policy no TCP.
    t.allow(1, 2, proto::TCP, 1, 65535, 6);
    assert_eq!(t.deliver(&PacketSpec::icmp(A, B, 17, 0, 9)), Verdict::Drop(Reason::NoPolicy));
    assert_eq!(t.deliver(&PacketSpec::udp(A, B, 1, 2048)), Verdict::Drop(Reason::NoPolicy));
}

#[test]
fn icmp_exchanges_are_revoked_like_connections() {
    let mut t = MemLookups::with_endpoints();
    let (start, end) = icmp_type_range(8);
    t.allow(1, 2, proto::ICMP, start, end, 4);
    assert!(t.deliver(&PacketSpec::icmp(A, B, 8, 0, 3)).is_pass());
    t.policies.clear();
    t.epoch += 1;
    assert_eq!(t.deliver(&PacketSpec::icmp(B, A, 0, 0, 3)), Verdict::Drop(Reason::Revoked));
    // Re-checked against the request the key rebuilds, not the reply.
    t.allow(1, 2, proto::ICMP, start, end, 4);
    assert!(t.deliver(&PacketSpec::icmp(A, B, 8, 0, 3)).is_pass());
    t.epoch += 1;
    assert_eq!(t.deliver(&PacketSpec::icmp(B, A, 0, 0, 3)), Verdict::Pass(Reason::Reply));
}

#[test]
fn icmp_errors_about_an_echo_pass_when_it_is_tracked() {
    let mut t = MemLookups::with_endpoints();
    let (start, end) = icmp_type_range(8);
    t.allow(1, 2, proto::ICMP, start, end, 4);
    let request = PacketSpec::icmp(A, B, 8, 0, 21);
    let error = icmp_unreachable(B, A, &request);
    assert_eq!(t.deliver(&error), Verdict::Drop(Reason::NoPolicy));
    assert!(t.deliver(&request).is_pass());
    assert_eq!(t.deliver(&error), Verdict::Pass(Reason::Related));
}

#[test]
fn fragments_follow_their_first_fragment() {
    let mut t = MemLookups::with_endpoints();
    t.allow(1, 2, proto::UDP, 9000, 9000, 1);
    let mut first = PacketSpec::udp(A, B, 7000, 9000);
    first.more_fragments = true;
    first.ip_id = 77;
    let mut later = PacketSpec::udp(A, B, 0, 0);
    later.frag_offset = 10;
    later.ip_id = 77;
    // Before the first fragment was seen, a later one is unknown.
    assert_eq!(t.deliver(&later), Verdict::Drop(Reason::FragmentUnknown));
    assert_eq!(t.deliver(&first), Verdict::Pass(Reason::NewAllowed));
    assert_eq!(t.deliver(&later), Verdict::Pass(Reason::Fragment));
    // A denied first fragment lets none through.
    let mut denied = PacketSpec::udp(A, B, 7000, 9001);
    denied.more_fragments = true;
    denied.ip_id = 78;
    assert_eq!(t.deliver(&denied), Verdict::Drop(Reason::NoPolicy));
    later.ip_id = 78;
    assert_eq!(t.deliver(&later), Verdict::Drop(Reason::FragmentUnknown));
}

#[test]
fn icmp_errors_pass_only_for_tracked_connections() {
    let mut t = MemLookups::with_endpoints();
    t.allow(1, 2, proto::UDP, 9000, 9000, 1);
    let request = PacketSpec::udp(A, B, 7000, 9000);
    let error = icmp_unreachable(B, A, &request);
    assert_eq!(t.deliver(&error), Verdict::Drop(Reason::NoPolicy));
    assert!(t.deliver(&request).is_pass());
    assert_eq!(t.deliver(&error), Verdict::Pass(Reason::Related));
}

#[test]
fn icmp_errors_pass_only_between_the_ends_of_what_they_quote() {
    // E (app 3) has an allowed flow to C (app 2); A has one to B.
    const C: [u8; 4] = [10, 255, 0, 3];
    const E: [u8; 4] = [10, 255, 0, 5];
    let mut t = MemLookups::with_endpoints();
    t.endpoints.insert(addr(C), EndpointValue { tag: 2, flags: 0 });
    t.endpoints.insert(addr(E), EndpointValue { tag: 3, flags: 0 });
    t.allow(3, 2, proto::UDP, 9000, 9000, 1);
    t.allow(1, 2, proto::UDP, 9000, 9000, 2);
    let e_to_c = PacketSpec::udp(E, C, 7000, 9000);
    let a_to_b = PacketSpec::udp(A, B, 7000, 9000);
    assert!(t.deliver(&e_to_c).is_pass() && t.deliver(&a_to_b).is_pass());
    let spoofed = Verdict::Drop(Reason::Spoofed);
    // E quoting its own flow to a third app, sent to A: data past the policy.
    assert_eq!(t.deliver(&icmp_unreachable(E, A, &e_to_c)), spoofed);
    // E speaking for B about A's connection (a forged port unreachable).
    assert_eq!(t.deliver(&icmp_unreachable(E, A, &a_to_b)), spoofed);
    // An error going the wrong way: to the quoted datagram's destination.
    assert_eq!(t.deliver(&icmp_unreachable(A, B, &a_to_b)), spoofed);
    // The far end, and a router on the path (the host), are believed.
    let related = Verdict::Pass(Reason::Related);
    assert_eq!(t.deliver(&icmp_unreachable(B, A, &a_to_b)), related);
    assert_eq!(t.deliver(&icmp_unreachable(HOST, A, &a_to_b)), related);
    // The host's error about a flow nobody tracks is not c2c traffic.
    let untracked = PacketSpec::udp(A, C, 7001, 9001);
    assert_eq!(t.deliver(&icmp_unreachable(HOST, A, &untracked)), Verdict::Pass(Reason::Unmanaged));
    // Between the two ends, but about nothing tracked: no policy.
    assert_eq!(t.deliver(&icmp_unreachable(C, A, &untracked)), Verdict::Drop(Reason::NoPolicy));
}

#[test]
fn parse_rejects_truncated_and_inconsistent_headers() {
    let good = PacketSpec::tcp(A, B, 1, 2).ipv4();
    assert!(matches!(parse_ipv4(good.as_slice(), 0), Parsed::Flow { .. }));
    // Cut anywhere inside the IP or TCP header.
    for cut in [0, 1, 10, 19, 20, 25, 39] {
        assert_eq!(parse_ipv4(&good[..cut], 0), Parsed::Malformed, "cut at {cut}");
    }
    // total_len says the TCP header is cut, though padding follows.
    let mut short = good.clone();
    short[2..4].copy_from_slice(&30u16.to_be_bytes());
    assert_eq!(parse_ipv4(short.as_slice(), 0), Parsed::Malformed);
    // IHL below 5, wrong version.
    let mut bad = good.clone();
    bad[0] = 0x44;
    assert_eq!(parse_ipv4(bad.as_slice(), 0), Parsed::Malformed);
    bad[0] = 0x65;
    assert_eq!(parse_ipv4(bad.as_slice(), 0), Parsed::Malformed);
}

#[test]
fn parse_skips_ip_options_and_reads_ports_after_them() {
    let mut spec = PacketSpec::udp(A, B, 1111, 2222);
    spec.ip_options = std::vec![1; 12]; // NOPs
    match parse_ethernet(spec.frame().as_slice()) {
        Parsed::Flow { flow, fragment: None } => {
            assert_eq!((flow.sport, flow.dport, flow.protocol), (1111, 2222, proto::UDP));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn parse_non_ip_frames_as_other_family() {
    let mut arp = PacketSpec::tcp(A, B, 1, 2).frame();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(parse_ethernet(arp.as_slice()), Parsed::OtherFamily);
    assert_eq!(parse_ethernet(&arp[..10]), Parsed::OtherFamily);
}

#[test]
fn source_side_drops_spoofed_addresses() {
    let own = Some(Attachment { addr: addr(A), tag: 1 });
    let from_a = parse_ipv4(PacketSpec::tcp(A, B, 1, 2).ipv4().as_slice(), 0);
    let from_b = parse_ipv4(PacketSpec::tcp(B, A, 1, 2).ipv4().as_slice(), 0);
    let t = MemLookups::with_endpoints();
    let source = |parsed: &Parsed, own| decide_source(&t, parsed, own, TunnelPort(0));
    assert_eq!(source(&from_a, own), Verdict::Pass(Reason::SourceVerified));
    assert_eq!(source(&from_b, own), Verdict::Drop(Reason::Spoofed));
    assert_eq!(source(&from_b, None), Verdict::Pass(Reason::Unmanaged));
    assert_eq!(source(&Parsed::OtherFamily, own), Verdict::Pass(Reason::NotIp));
}

#[test]
fn no_container_sends_to_the_tunnel_port_of_the_host() {
    // A VXLAN header with an app's tag in it, to the host's gateway address
    // or to any address that is no endpoint: the host's (or another host's)
    // VXLAN socket would take it and believe the tag.
    const UNDERLAY: [u8; 4] = [172, 31, 0, 1];
    let own = Some(Attachment { addr: addr(A), tag: 1 });
    let t = MemLookups::with_endpoints();
    let udp = |dst, dport| parse_ethernet(PacketSpec::udp(A, dst, 40000, dport).frame().as_slice());
    let cluster = TunnelPort(4789);
    for dst in [HOST, UNDERLAY, [10, 255, 1, 9]] {
        assert_eq!(
            decide_source(&t, &udp(dst, 4789), own, cluster),
            Verdict::Drop(Reason::Spoofed)
        );
    }
    // The first fragment carries the port too.
    let mut first = PacketSpec::udp(A, HOST, 40000, 4789);
    first.more_fragments = true;
    let first = parse_ethernet(first.frame().as_slice());
    assert_eq!(decide_source(&t, &first, own, cluster), Verdict::Drop(Reason::Spoofed));
    // To an endpoint it is a datagram like any other: its policy decides.
    let to_b = udp(B, 4789);
    assert_eq!(decide_source(&t, &to_b, own, cluster), Verdict::Pass(Reason::SourceVerified));
    // Other ports and protocols, a single host, an interface with no endpoint.
    let verified = Verdict::Pass(Reason::SourceVerified);
    assert_eq!(decide_source(&t, &udp(HOST, 4790), own, cluster), verified);
    let tcp = parse_ethernet(PacketSpec::tcp(A, HOST, 40000, 4789).frame().as_slice());
    assert_eq!(decide_source(&t, &tcp, own, cluster), verified);
    assert_eq!(decide_source(&t, &udp(HOST, 4789), own, TunnelPort(0)), verified);
    let unmanaged = Verdict::Pass(Reason::Unmanaged);
    assert_eq!(decide_source(&t, &udp(HOST, 4789), None, cluster), unmanaged);
}

#[test]
fn an_ipv6_only_endpoint_sends_no_ipv4() {
    let own = Some(Attachment { addr: crate::maps::NO_IPV4, tag: 1 });
    let from_a = parse_ipv4(PacketSpec::tcp(A, B, 1, 2).ipv4().as_slice(), 0);
    let unspecified = [0, 0, 0, 0];
    let from_nothing = parse_ipv4(PacketSpec::tcp(unspecified, B, 68, 67).ipv4().as_slice(), 0);
    let t = MemLookups::with_endpoints();
    let source = |parsed: &Parsed| decide_source(&t, parsed, own, TunnelPort(0));
    assert_eq!(source(&from_a), Verdict::Drop(Reason::Spoofed));
    assert_eq!(source(&from_nothing), Verdict::Drop(Reason::Spoofed));
}

#[test]
fn conn_key_is_the_same_for_both_directions() {
    let there = Flow { saddr: addr(A), daddr: addr(B), sport: 40000, dport: 80, protocol: 6 };
    let back = Flow { saddr: addr(B), daddr: addr(A), sport: 80, dport: 40000, protocol: 6 };
    let (k1, s1) = ConnKey::of(&there);
    let (k2, s2) = ConnKey::of(&back);
    assert_eq!(k1, k2);
    assert_ne!(s1, s2);
    assert_eq!(k1.opening_flow(s1), there);
}

#[test]
fn a_tunnel_packet_is_checked_as_the_app_its_header_names() {
    // R is a container on another host; its host put tag 1 (A's app) in the
    // tunnel header. The endpoint map does not know R at all.
    const R: [u8; 4] = [10, 255, 1, 7];
    let mut t = MemLookups::with_endpoints();
    t.allow(1, 2, proto::TCP, 8080, 8080, 9);
    let parsed = parse_ethernet(PacketSpec::tcp(R, B, 40000, 8080).frame().as_slice());
    assert_eq!(decide_destination(&t, &parsed).verdict, Verdict::Pass(Reason::Unmanaged));
    let saddr = source_address(&parsed).unwrap();
    let tunneled = TunnelSource { lookups: &t, saddr, tag: 1 };
    let decision = decide_destination(&tunneled, &parsed);
    assert_eq!((decision.verdict, decision.src_tag), (Verdict::Pass(Reason::NewAllowed), 1));
    // Another app's tag, or another port: denied.
    let other = TunnelSource { lookups: &t, saddr, tag: 3 };
    assert_eq!(decide_destination(&other, &parsed).verdict, Verdict::Drop(Reason::NoPolicy));
    let wrong_port = parse_ethernet(PacketSpec::tcp(R, B, 40000, 9000).frame().as_slice());
    assert_eq!(decide_destination(&tunneled, &wrong_port).verdict, Verdict::Drop(Reason::NoPolicy));
    // The header overrides what the map says of the address.
    let claimed_a = parse_ethernet(PacketSpec::tcp(A, B, 40000, 8080).frame().as_slice());
    let as_three = TunnelSource { lookups: &t, saddr: addr(A), tag: 3 };
    assert_eq!(decide_destination(&as_three, &claimed_a).verdict, Verdict::Drop(Reason::NoPolicy));
}

#[test]
fn tunnel_packets_are_accepted_only_from_peers() {
    const PEER: [u8; 4] = [172, 31, 0, 2];
    const STRANGER: [u8; 4] = [172, 31, 0, 99];
    let is_peer = |a: u32| a == addr(PEER);
    let vxlan = |src| {
        parse_ethernet(
            PacketSpec::new(src, [172, 31, 0, 1], proto::UDP, 1234, 4789).frame().as_slice(),
        )
    };
    assert_eq!(decide_underlay(&vxlan(PEER), 4789, is_peer), Verdict::Pass(Reason::SourceVerified));
    assert_eq!(decide_underlay(&vxlan(STRANGER), 4789, is_peer), Verdict::Drop(Reason::Spoofed));
    // Other traffic on the underlay is none of this program's business.
    let ssh =
        parse_ethernet(PacketSpec::tcp(STRANGER, [172, 31, 0, 1], 1234, 22).frame().as_slice());
    assert_eq!(decide_underlay(&ssh, 4789, is_peer), Verdict::Pass(Reason::Unmanaged));
    let other_udp = parse_ethernet(
        PacketSpec::new(STRANGER, [172, 31, 0, 1], proto::UDP, 1, 53).frame().as_slice(),
    );
    assert_eq!(decide_underlay(&other_udp, 4789, is_peer), Verdict::Pass(Reason::Unmanaged));
}

#[test]
fn connections_to_other_hosts_are_tracked_where_they_leave() {
    const R: [u8; 4] = [10, 255, 1, 7];
    let mut t = MemLookups::with_endpoints();
    let parsed =
        |src, dst| parse_ethernet(PacketSpec::tcp(src, dst, 40000, 8080).frame().as_slice());
    let none = Outgoing { conn: ConnUpdate::none(), denied: false, src_tag: 0, dst_tag: 0 };
    // To a local endpoint or an unknown address: the destination side decides.
    assert_eq!(track_outgoing(&t, &parsed(A, B), |_| false), none);
    assert_eq!(track_outgoing(&t, &parsed(A, R), |_| false), none);
    // To an endpoint on another host: tracked only when a policy allows it
    // from this side, once, at the current epoch; denied without one.
    t.endpoints
        .insert(addr(R), EndpointValue { tag: 2, flags: crate::maps::endpoint_flags::REMOTE });
    let denied = track_outgoing(&t, &parsed(A, R), |_| false);
    let expected = Outgoing { conn: ConnUpdate::none(), denied: true, src_tag: 1, dst_tag: 2 };
    assert_eq!(denied, expected, "no policy, with both apps for the report");
    // A reject's entry does not count as tracked: still denied.
    let frame = PacketSpec::tcp(A, R, 40000, 8080).frame();
    let Parsed::Flow { flow, .. } = parse_ethernet(frame.as_slice()) else { panic!() };
    let (key, conn) = reject_entry(&flow, t.epoch);
    t.conns.insert(key, conn);
    assert!(track_outgoing(&t, &parsed(A, R), |_| false).denied);
    t.allow(1, 2, proto::TCP, 8080, 8080, 4);
    let outgoing = track_outgoing(&t, &parsed(A, R), |_| false);
    assert!(outgoing.conn.kind == conn_update::INSERT && !outgoing.denied, "not tracked");
    let (key, conn) = (outgoing.conn.key, outgoing.conn.conn);
    assert_eq!((conn.epoch, conn.policy_id), (t.epoch, 4));
    t.conns.insert(key, conn);
    assert_eq!(track_outgoing(&t, &parsed(A, R), |_| false), none);
    // The other end's connections are never recorded from this side.
    let from_server = parse_ethernet(PacketSpec::tcp(B, R, 8080, 40000).frame().as_slice());
    assert_eq!(track_outgoing(&t, &from_server, |_| false).conn, ConnUpdate::none());
    // Its reply is let in as a reply while a policy allows the opening flow.
    assert_eq!(t.deliver(&PacketSpec::tcp(R, A, 8080, 40000)), Verdict::Pass(Reason::Reply));
}

#[test]
fn connections_to_other_cells_of_silk_are_decided_there() {
    const R: [u8; 4] = [10, 255, 1, 7];
    let mut t = MemLookups::with_endpoints();
    let parsed =
        |src, dst| parse_ethernet(PacketSpec::tcp(src, dst, 40000, 8080).frame().as_slice());
    let remote = addr(R);
    let other_cell = move |a: u32| a == remote;
    // An endpoint's opening to another cell's container: recorded as
    // decided there, with no policy of this host's.
    let outgoing = track_outgoing(&t, &parsed(A, R), other_cell);
    assert_eq!(outgoing.conn.kind, conn_update::INSERT);
    assert!(!outgoing.denied);
    let conn = outgoing.conn.conn;
    assert_eq!(conn.policy_id, 0);
    assert_ne!(conn.origin & origin::DECIDED_ELSEWHERE, 0);
    // Not from an address that is no endpoint, not without silk.
    const STRANGER: [u8; 4] = [10, 255, 0, 99];
    assert_eq!(track_outgoing(&t, &parsed(STRANGER, R), other_cell).conn.kind, conn_update::NONE);
    assert_eq!(track_outgoing(&t, &parsed(A, R), |_| false).conn.kind, conn_update::NONE);
    // Its replies come in as replies, also after a policy change here.
    t.conns.insert(outgoing.conn.key, conn);
    assert_eq!(t.deliver(&PacketSpec::tcp(R, A, 8080, 40000)), Verdict::Pass(Reason::Reply));
    t.epoch += 1;
    assert_eq!(t.deliver(&PacketSpec::tcp(R, A, 8080, 40000)), Verdict::Pass(Reason::Reply));
    // Without the record, the same packet is a new flow from an unknown
    // source: what the endpoint map says (here: unmanaged).
    t.conns.clear();
    assert_ne!(t.deliver(&PacketSpec::tcp(R, A, 8080, 40000)), Verdict::Pass(Reason::Reply));
}

#[test]
fn a_reject_passes_once_and_the_rejected_end_is_checked_again() {
    let mut t = MemLookups::with_endpoints();
    let syn = PacketSpec::tcp(A, B, 40000, 8080);
    let frame = syn.frame();
    let parsed = parse_ethernet(frame.as_slice());
    let denied = decide_destination(&t, &parsed);
    assert_eq!(denied.verdict, Verdict::Drop(Reason::NoPolicy));
    let flow = rejectable(&parsed, denied.verdict).expect("a denied TCP SYN is rejectable");
    let (key, conn) = reject_entry(&flow, t.epoch);
    t.conns.insert(key, conn);
    // The RST from B's address passes once, and takes the entry with it.
    let rst = PacketSpec::tcp(B, A, 8080, 40000);
    assert_eq!(t.deliver(&rst), Verdict::Pass(Reason::Related));
    assert!(t.conns.is_empty());
    assert_eq!(t.deliver(&rst), Verdict::Drop(Reason::NoPolicy), "only once");
    // The rejected end's retry is not "established": checked, denied again.
    t.conns.insert(key, conn);
    assert_eq!(t.deliver(&syn), Verdict::Drop(Reason::NoPolicy));
    // And allowed once a policy is there, replacing the entry.
    t.allow(1, 2, proto::TCP, 8080, 8080, 3);
    assert_eq!(t.deliver(&syn), Verdict::Pass(Reason::NewAllowed));
    assert_eq!(t.deliver(&rst), Verdict::Pass(Reason::Reply));
}

#[test]
fn an_icmp_unreachable_for_a_rejected_datagram_passes() {
    let mut t = MemLookups::with_endpoints();
    let datagram = PacketSpec::udp(A, B, 5000, 53);
    let frame = datagram.frame();
    let parsed = parse_ethernet(frame.as_slice());
    let denied = decide_destination(&t, &parsed);
    let flow = rejectable(&parsed, denied.verdict).unwrap();
    let (key, conn) = reject_entry(&flow, t.epoch);
    t.conns.insert(key, conn);
    assert_eq!(t.deliver(&icmp_unreachable(B, A, &datagram)), Verdict::Pass(Reason::Related));
}

#[test]
fn only_policy_denials_of_tcp_and_udp_are_rejectable() {
    let t = MemLookups::with_endpoints();
    let verdict_of = |spec: &PacketSpec| {
        let frame = spec.frame();
        let parsed = parse_ethernet(frame.as_slice());
        (parsed, decide_destination(&t, &parsed).verdict)
    };
    for spec in [PacketSpec::icmp(A, B, 8, 0, 1), PacketSpec::new(A, B, 47, 0, 0)] {
        let (parsed, verdict) = verdict_of(&spec);
        assert!(!verdict.is_pass());
        assert_eq!(rejectable(&parsed, verdict), None, "{spec:?}");
    }
    let (parsed, verdict) = verdict_of(&PacketSpec::udp(HOST, B, 1, 2));
    assert!(verdict.is_pass() && rejectable(&parsed, verdict).is_none());
    let mut later = PacketSpec::udp(A, B, 0, 0);
    later.frag_offset = 10;
    let (parsed, verdict) = verdict_of(&later);
    assert_eq!(verdict, Verdict::Drop(Reason::FragmentUnknown));
    assert_eq!(rejectable(&parsed, verdict), None);
    let (parsed, _) = verdict_of(&PacketSpec::tcp(A, B, 1, 2));
    assert_eq!(rejectable(&parsed, Verdict::Drop(Reason::Spoofed)), None);
    assert_eq!(rejectable(&parsed, Verdict::Drop(Reason::Malformed)), None);
    assert!(rejectable(&parsed, Verdict::Drop(Reason::Revoked)).is_some());
}

mod ipv6;
