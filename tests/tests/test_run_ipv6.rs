//! `BPF_PROG_TEST_RUN` tests of IPv6: the same policies, link plumbing,
//! extension-header chains, fragments, rejects and the source side.

use std::net::{Ipv4Addr, Ipv6Addr};

use integration_tests::test_run::*;
use policy_common::{
    Reason,
    craft::{icmp_header, ipv6_frame, l4_header},
    maps::{PairKey, proto},
    packet::{MAX_EXTENSION_HEADERS, icmp_port},
};

const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const LINK: [u8; 16] = [0xfe, 0x80, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9];
const ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// The IPv4 fixture with A and B also registered on IPv6 (same apps).
fn fixture() -> Fixture {
    let mut f = Fixture::new();
    let maps = f.dataplane.maps_mut();
    maps.set_endpoint6(Ipv6Addr::from(A6), TAG_A).unwrap();
    maps.set_endpoint6(Ipv6Addr::from(B6), TAG_B).unwrap();
    f
}

fn tcp(src: [u8; 16], dst: [u8; 16], sport: u16, dport: u16) -> Vec<u8> {
    ipv6_frame(src, dst, proto::TCP, &[], &l4_header(proto::TCP, sport, dport))
}

fn echo(src: [u8; 16], dst: [u8; 16], icmp_type: u8) -> Vec<u8> {
    ipv6_frame(src, dst, proto::ICMPV6, &[], &icmp_header(icmp_type, 0, 7))
}

#[test]
fn ipv6_is_policed_by_the_same_policies_with_replies_and_revocation() {
    let mut f = fixture();
    assert_eq!(f.entering_container(&tcp(A6, B6, 40000, 8080)), TC_ACT_SHOT, "default deny");
    f.allow(TAG_A, TAG_B, proto::TCP, 8080, 8090, 1);
    assert_eq!(f.entering_container(&tcp(A6, B6, 40000, 8080)), TC_ACT_OK);
    assert_eq!(f.entering_container(&tcp(B6, A6, 8080, 40000)), TC_ACT_OK, "reply");
    assert_eq!(f.entering_container(&tcp(A6, B6, 40001, 8091)), TC_ACT_SHOT, "range edge");
    assert_eq!(f.dataplane.maps().connections6().len(), 1);
    assert!(f.dataplane.maps().connections().is_empty(), "IPv4 conntrack untouched");
    // Revoked: the open connection is cut at its next packet.
    f.dataplane.maps_mut().revoke(PairKey::new(TAG_A, TAG_B, proto::TCP), 8080, 8090).unwrap();
    assert_eq!(f.entering_container(&tcp(B6, A6, 8080, 40000)), TC_ACT_SHOT);
    assert_eq!(f.count(Reason::Revoked), 1);
    // ICMPv6 echo by an icmp policy on protocol 58; the reply passes.
    assert_eq!(f.entering_container(&echo(A6, B6, 128)), TC_ACT_SHOT);
    f.allow(TAG_A, TAG_B, proto::ICMPV6, icmp_port(128, 0), icmp_port(128, 255), 2);
    assert_eq!(f.entering_container(&echo(A6, B6, 128)), TC_ACT_OK);
    assert_eq!(f.entering_container(&echo(B6, A6, 129)), TC_ACT_OK);
    // Unregistered addresses are not container-to-container.
    assert_eq!(f.entering_container(&tcp(LINK, B6, 1, 22)), TC_ACT_OK);
}

#[test]
fn ipv6_link_plumbing_passes_and_malformed_chains_are_dropped() {
    let f = fixture();
    for icmp_type in [133, 134, 135, 136, 143] {
        let frame = ipv6_frame(LINK, ALL_NODES, proto::ICMPV6, &[], &icmp_header(icmp_type, 0, 0));
        assert_eq!(f.entering_container(&frame), TC_ACT_OK, "type {icmp_type}");
        assert_eq!(f.leaving_container(&frame), TC_ACT_OK, "type {icmp_type}");
    }
    assert_eq!(f.count(Reason::LinkControl), 10);
    let udp = l4_header(proto::UDP, 5000, 53);
    let mut long = Vec::new();
    for _ in 0..MAX_EXTENSION_HEADERS {
        long.extend_from_slice(&[60, 0, 1, 4, 0, 0, 0, 0]);
    }
    assert_eq!(f.entering_container(&ipv6_frame(A6, B6, 60, &long, &udp)), TC_ACT_SHOT);
    let cut = ipv6_frame(A6, B6, proto::UDP, &[], &udp);
    assert_eq!(f.entering_container(&cut[..14 + 40 + 4]), TC_ACT_SHOT);
    assert_eq!(f.count(Reason::Malformed), 2);
}

#[test]
fn ipv6_fragments_follow_the_first_fragment() {
    let mut f = fixture();
    f.allow(TAG_A, TAG_B, proto::UDP, 53, 53, 1);
    let fragment = |offset: u16, more: bool| {
        let mut h = vec![proto::UDP, 0];
        h.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
        h.extend_from_slice(&77u32.to_be_bytes());
        h
    };
    let later = ipv6_frame(A6, B6, 44, &fragment(100, false), &[0; 16]);
    assert_eq!(f.entering_container(&later), TC_ACT_SHOT, "first not seen yet");
    let first = ipv6_frame(A6, B6, 44, &fragment(0, true), &l4_header(proto::UDP, 5000, 53));
    assert_eq!(f.entering_container(&first), TC_ACT_OK);
    assert_eq!(f.entering_container(&later), TC_ACT_OK);
    assert_eq!(f.count(Reason::Fragment), 1);
}

/// The Internet checksum of an IPv6 upper-layer message, pseudo header
/// included (0 when the message's checksum is right).
fn checksum6(ip: &[u8], upper: &[u8]) -> u16 {
    let mut pseudo = Vec::from(&ip[8..40]);
    pseudo.extend_from_slice(&(upper.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, ip[6]]);
    pseudo.extend_from_slice(upper);
    checksum(&pseudo)
}

#[test]
fn denied_ipv6_is_answered_with_a_rst_or_a_port_unreachable() {
    let f = fixture().rejecting(100);
    let syn = tcp(A6, B6, 40000, 8080);
    let (ret, rst) = f.entering_container_out(&syn);
    assert_eq!(ret, TC_ACT_REDIRECT, "{}", verdict(ret));
    assert_eq!(rst.len(), 14 + 40 + 20, "Ethernet, IPv6 and TCP headers: {rst:02x?}");
    assert_eq!((&rst[0..6], &rst[6..12]), (&syn[6..12], &syn[0..6]), "MACs swapped");
    assert_eq!(&rst[12..14], &[0x86, 0xdd]);
    let (ip, tcp_hdr) = (&rst[14..54], &rst[54..74]);
    assert_eq!((ip[0] >> 4, ip[6], u16::from_be_bytes([ip[4], ip[5]])), (6, proto::TCP, 20));
    assert_eq!((&ip[8..24], &ip[24..40]), (&B6[..], &A6[..]), "from B back to A");
    assert_eq!(u16::from_be_bytes([tcp_hdr[0], tcp_hdr[1]]), 8080);
    assert_eq!(u16::from_be_bytes([tcp_hdr[2], tcp_hdr[3]]), 40000);
    assert_eq!(tcp_hdr[13], 0x14, "RST|ACK to a SYN");
    assert_eq!(checksum6(ip, tcp_hdr), 0, "TCP checksum over the IPv6 pseudo header");
    // The answer passes where it enters A, once.
    assert_eq!(f.entering_container(&rst), TC_ACT_OK, "the reject reaches its sender");
    assert_eq!(f.entering_container(&rst), TC_ACT_SHOT, "only once, and not answered");

    let datagram = ipv6_frame(A6, B6, proto::UDP, &[], &l4_header(proto::UDP, 5000, 53));
    let (ret, icmp) = f.entering_container_out(&datagram);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(icmp.len(), 14 + 40 + 8 + 48);
    let (ip, message) = (&icmp[14..54], &icmp[54..]);
    assert_eq!((ip[6], &ip[8..24], &ip[24..40]), (proto::ICMPV6, &B6[..], &A6[..]));
    assert_eq!((message[0], message[1]), (1, 4), "destination unreachable, port unreachable");
    assert_eq!(checksum6(ip, message), 0, "ICMPv6 checksum");
    assert_eq!(&message[8..], &datagram[14..14 + 48], "quotes the IPv6 header and 8 bytes");
    assert_eq!(f.entering_container(&icmp), TC_ACT_OK, "an error about the datagram");

    // Behind an extension header: dropped unanswered.
    let hop_by_hop = [proto::TCP, 0, 0, 0, 0, 0, 0, 0];
    let chained = ipv6_frame(A6, B6, 0, &hop_by_hop, &l4_header(proto::TCP, 40001, 8080));
    assert_eq!(f.entering_container_out(&chained).0, TC_ACT_SHOT);
}

#[test]
fn the_source_side_checks_ipv6_sources() {
    let mut f = fixture();
    // Test runs see loopback (ifindex 1) as the device: A's veth.
    f.dataplane.maps_mut().set_veth(1, Ipv4Addr::from(A), TAG_A).unwrap();
    assert_eq!(
        f.leaving_container(&tcp(A6, B6, 1, 2)),
        TC_ACT_SHOT,
        "an endpoint with no IPv6 address sends none"
    );
    f.dataplane.maps_mut().set_veth6(1, Ipv6Addr::from(A6)).unwrap();
    assert_eq!(f.leaving_container(&tcp(A6, B6, 1, 2)), TC_ACT_OK);
    assert_eq!(f.count(Reason::SourceVerified), 1);
    // Behind an extension header (decided by the full parse): the same.
    let hop_by_hop = [proto::UDP, 0, 1, 4, 0, 0, 0, 0];
    let chained = ipv6_frame(A6, B6, 0, &hop_by_hop, &l4_header(proto::UDP, 5353, 53));
    assert_eq!(f.leaving_container(&chained), TC_ACT_OK);
    assert_eq!(f.count(Reason::SourceVerified), 2);
    // A payload length too short for its UDP header: malformed, not
    // verified, whatever its source.
    let mut short = ipv6_frame(A6, B6, proto::UDP, &[], &l4_header(proto::UDP, 5353, 53));
    short[18..20].copy_from_slice(&4u16.to_be_bytes());
    assert_eq!(f.leaving_container(&short), TC_ACT_SHOT);
    assert_eq!(f.count(Reason::Malformed), 1);
    assert_eq!(f.leaving_container(&tcp(B6, A6, 1, 2)), TC_ACT_SHOT, "spoofed");
    assert_eq!(f.leaving_container(&tcp(LINK, ALL_NODES, 1, 2)), TC_ACT_OK, "on the link");
    assert_eq!(f.leaving_container(&tcp(LINK, B6, 1, 2)), TC_ACT_SHOT);
    assert_eq!(f.count(Reason::Spoofed), 3);
}

/// Established IPv6 TCP and UDP packets whose upper-layer header follows
/// the fixed one are answered from the CPU's `FLOW_CACHE6` before the full
/// parse: one fill, then hits, counted for their policy exactly (what the
/// cache holds back is read through its mapping). What the full parse
/// would refuse or read differently is not answered there: a segment whose
/// payload length cannot hold a TCP header is dropped as malformed on a
/// cached connection, one behind an extension header goes the full way. A
/// revocation sends the connection back to the full check; with the cache
/// off nothing is filled.
#[test]
fn the_ipv6_flow_cache_answers_established_packets_until_a_revocation() {
    use policy_common::maps::settings;
    let mut f = fixture();
    integration_tests::pin_this_thread_to_cpu0();
    let stats = |f: &Fixture| f.dataplane.maps().flow_cache_stats().unwrap();
    f.allow(TAG_A, TAG_B, proto::TCP, 8080, 8080, 7);
    let request = tcp(A6, B6, 40000, 8080);
    let reply = tcp(B6, A6, 8080, 40000);
    assert_eq!(f.entering_container(&request), TC_ACT_OK); // new: tracked
    assert_eq!(stats(&f).fills6, 0);
    assert_eq!(f.entering_container(&request), TC_ACT_OK); // established: filled
    assert_eq!(stats(&f).fills6, 1);
    for _ in 0..100 {
        assert_eq!(f.entering_container(&request), TC_ACT_OK);
        assert_eq!(f.entering_container(&reply), TC_ACT_OK);
    }
    assert_eq!(stats(&f).fills6, 1, "one connection, one fill: every other packet was a hit");
    assert_eq!(stats(&f).fills, 0, "the IPv4 cache untouched");
    assert_eq!((f.count(Reason::Established), f.count(Reason::Reply)), (101, 100));
    assert_eq!(f.dataplane.maps().policy_counters(7).packets, 202, "counted exactly");

    // The same connection's ports in a segment too short for a TCP header
    // (the payload length says 8 bytes): the full parse's verdict.
    let mut short = request.clone();
    short[18..20].copy_from_slice(&8u16.to_be_bytes());
    assert_eq!(f.entering_container(&short), TC_ACT_SHOT, "not answered by the cache");
    assert_eq!(f.count(Reason::Malformed), 1);
    // Behind a hop-by-hop header: decided in full (and passed, established).
    let hop_by_hop = [proto::TCP, 0, 1, 4, 0, 0, 0, 0];
    let chained = ipv6_frame(A6, B6, 0, &hop_by_hop, &l4_header(proto::TCP, 40000, 8080));
    assert_eq!(f.entering_container(&chained), TC_ACT_OK);
    assert_eq!(f.count(Reason::Established), 102);

    // UDP too, in the same cache.
    f.allow(TAG_A, TAG_B, proto::UDP, 53, 53, 8);
    let udp = ipv6_frame(A6, B6, proto::UDP, &[], &l4_header(proto::UDP, 5353, 53));
    for _ in 0..10 {
        assert_eq!(f.entering_container(&udp), TC_ACT_OK);
    }
    let filled = stats(&f).fills6;
    assert_eq!(f.entering_container(&udp), TC_ACT_OK);
    assert_eq!(stats(&f).fills6, filled, "a hit");

    // Revoked: the next packet is checked in full and dropped.
    f.dataplane.maps_mut().revoke(PairKey::new(TAG_A, TAG_B, proto::TCP), 8080, 8080).unwrap();
    assert_eq!(f.entering_container(&request), TC_ACT_SHOT);
    assert_eq!(f.count(Reason::Revoked), 1);
    assert_eq!(f.entering_container(&reply), TC_ACT_SHOT);

    // Switched off: established packets are decided from conntrack alone.
    let mut off = f.dataplane.maps().settings().unwrap();
    off.flags &= !settings::FLOW_CACHE;
    f.dataplane.maps_mut().set_settings(off).unwrap();
    let before = stats(&f).fills6;
    for _ in 0..10 {
        assert_eq!(f.entering_container(&udp), TC_ACT_OK);
    }
    assert_eq!(stats(&f).fills6, before, "nothing filled with the cache off");
    assert_eq!(f.dataplane.maps().policy_counters(8).packets, 21);
}
