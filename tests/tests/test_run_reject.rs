//! `BPF_PROG_TEST_RUN` tests of rejects: a denied TCP segment answered with
//! a RST, a denied UDP datagram with an ICMP port unreachable, both limited
//! per sender (IPv6: `test_run_ipv6.rs`).

use integration_tests::test_run::*;
use policy_common::{Reason, craft::PacketSpec, maps::proto};

#[test]
fn a_denied_tcp_segment_is_answered_with_a_rst_that_passes_at_its_sender_once() {
    let f = Fixture::new().rejecting(100);
    let syn = PacketSpec::tcp(A, B, 40000, 8080);
    let frame = syn.frame();
    let (ret, rst) = f.entering_container_out(&frame);
    assert_eq!(ret, TC_ACT_REDIRECT, "{}", verdict(ret));
    assert_eq!(rst.len(), 54, "Ethernet, IPv4 and TCP headers: {rst:02x?}");
    assert_eq!((&rst[0..6], &rst[6..12]), (&frame[6..12], &frame[0..6]), "MACs swapped");
    let (ip, tcp) = (&rst[14..34], &rst[34..54]);
    assert_eq!((ip[0], ip[9]), (0x45, proto::TCP));
    assert_eq!((&ip[12..16], &ip[16..20]), (&B[..], &A[..]), "from the destination to the sender");
    assert_eq!(u16::from_be_bytes([ip[2], ip[3]]), 40);
    assert_eq!(checksum(ip), 0, "IPv4 header checksum");
    assert_eq!(u16::from_be_bytes([tcp[0], tcp[1]]), 8080);
    assert_eq!(u16::from_be_bytes([tcp[2], tcp[3]]), 40000);
    // No ACK in the SYN: RST+ACK, sequence 0, acknowledging the SYN's
    // sequence number 1, its 8 payload bytes and the SYN itself.
    assert_eq!(u32::from_be_bytes(tcp[4..8].try_into().unwrap()), 0);
    assert_eq!(u32::from_be_bytes(tcp[8..12].try_into().unwrap()), 10);
    assert_eq!(tcp[13], 0x14, "RST|ACK");
    let mut pseudo = Vec::from(&ip[12..20]);
    pseudo.extend_from_slice(&[0, proto::TCP, 0, 20]);
    pseudo.extend_from_slice(tcp);
    assert_eq!(checksum(&pseudo), 0, "TCP checksum");
    assert_eq!(f.count(Reason::NoPolicy), 1);
    // Entering A: the recorded entry lets the RST in, once; a RST is never
    // answered.
    assert_eq!(f.entering_container(&rst), TC_ACT_OK, "the reject reaches its sender");
    assert_eq!(f.count(Reason::Related), 1);
    assert_eq!(f.entering_container(&rst), TC_ACT_SHOT, "only once, and not answered");
    assert!(f.dataplane.maps().connections().is_empty(), "nothing tracked");

    // A segment with ACK (a connection whose policy went): RST with its
    // acknowledgment number as sequence number.
    let mut data = frame.clone();
    data[14 + 20 + 8..14 + 20 + 12].copy_from_slice(&0x0102_0304u32.to_be_bytes());
    data[14 + 20 + 13] = 0x18; // PSH|ACK
    let (ret, rst) = f.entering_container_out(&data);
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(u32::from_be_bytes(rst[38..42].try_into().unwrap()), 0x0102_0304);
    assert_eq!(rst[34 + 13], 0x04, "RST alone");
}

#[test]
fn a_denied_udp_datagram_is_answered_with_a_port_unreachable_quoting_it() {
    let f = Fixture::new().rejecting(100);
    let datagram = PacketSpec::udp(A, B, 5000, 53);
    let (ret, icmp) = f.entering_container_out(&datagram.frame());
    assert_eq!(ret, TC_ACT_REDIRECT);
    assert_eq!(icmp.len(), 14 + 20 + 8 + 28);
    let ip = &icmp[14..34];
    assert_eq!((ip[9], &ip[12..16], &ip[16..20]), (proto::ICMP, &B[..], &A[..]));
    assert_eq!(checksum(ip), 0);
    assert_eq!((icmp[34], icmp[35]), (3, 3), "destination unreachable, port unreachable");
    assert_eq!(checksum(&icmp[34..]), 0, "ICMP checksum");
    assert_eq!(&icmp[42..], &datagram.ipv4()[..28], "quotes the IP header and 8 bytes");
    // It passes where it enters A as an error about the rejected datagram.
    assert_eq!(f.entering_container(&icmp), TC_ACT_OK);
    assert_eq!(f.count(Reason::Related), 1);
}

#[test]
fn rejects_are_limited_per_sender_and_not_sent_for_what_must_not_be_answered() {
    let f = Fixture::new().rejecting(3);
    let redirected = (0..10)
        .filter(|i| {
            let ret = f.entering_container(&PacketSpec::tcp(A, B, 41000 + i, 8080).frame());
            assert!(ret == TC_ACT_REDIRECT || ret == TC_ACT_SHOT, "{}", verdict(ret));
            ret == TC_ACT_REDIRECT
        })
        .count();
    assert_eq!(redirected, 3, "at most 3 per second to one sender");
    assert_eq!(f.count(Reason::NoPolicy), 10, "all denied");
    // Another sender has its own budget.
    assert_eq!(f.entering_container(&PacketSpec::tcp(C, B, 1, 8080).frame()), TC_ACT_REDIRECT);

    let f = Fixture::new().rejecting(100);
    let mut rst = PacketSpec::tcp(C, B, 2, 8080).frame();
    rst[14 + 20 + 13] = 0x04;
    let mut with_options = PacketSpec::tcp(C, B, 3, 8080);
    with_options.ip_options = vec![1, 1, 1, 1];
    for frame in [
        rst,
        with_options.frame(),
        PacketSpec::icmp(C, B, 8, 0, 1).frame(),
        PacketSpec::new(C, B, 47, 0, 0).frame(),
    ] {
        assert_eq!(f.entering_container(&frame), TC_ACT_SHOT);
    }
    // Allowed traffic is untouched.
    let mut f = f;
    f.allow(TAG_A, TAG_B, proto::TCP, 8080, 8080, 1);
    let (ret, out) = f.entering_container_out(&PacketSpec::tcp(C, B, 4, 8080).frame());
    assert_eq!((ret, out), (TC_ACT_OK, PacketSpec::tcp(C, B, 4, 8080).frame()));
}
