//! `BPF_PROG_TEST_RUN` against a reference model: random policies,
//! revocations and traffic, each verdict compared with the model's
//! (`integration_tests::model`), IPv4 and IPv6.

use std::net::{Ipv4Addr, Ipv6Addr};

use integration_tests::model::{ModelFamily, Tuple, agrees_with_the_model, model_seed};
use policy_common::{
    craft::{PacketSpec, icmp_header, ipv6_frame, l4_header},
    maps::proto,
    packet::icmp_port,
};

#[test]
fn program_agrees_with_a_reference_model_on_random_traffic() {
    let ipv4 = ModelFamily {
        icmp: proto::ICMP,
        echo_request: policy_common::packet::icmp_port(8, 0),
        echo_reply: policy_common::packet::icmp_port(0, 0),
        // Half in the overlay (array slots), half outside it (hashed).
        address: |round, i| {
            if i % 2 == 0 { [10, 100 + round, 0, i] } else { [10, 255, 100 + round, i] }
        },
        register: |dataplane, a, tag| {
            dataplane.maps_mut().set_endpoint(Ipv4Addr::from(a), tag).unwrap()
        },
        frames: |_, &(src, sport, dst, dport, protocol)| {
            vec![PacketSpec::new(src, dst, protocol, sport, dport).frame()]
        },
        one_way: policy_common::packet::icmp_port(9, 0),
        error_frame: |from, to, &(src, sport, dst, dport, protocol)| {
            let mut quoted = PacketSpec::new(src, dst, protocol, sport, dport).ipv4();
            quoted.truncate(28);
            let mut error = PacketSpec::icmp(from, to, 3, 3, 0);
            error.payload = quoted;
            error.frame()
        },
    };
    let checked = agrees_with_the_model(&ipv4, model_seed());
    assert!(checked > 3000, "only {checked} packets checked");
}

/// An IPv6 packet with extension headers chosen at random (none of
/// which changes its meaning: hop-by-hop first, destination options, a
/// routing header with no segments left), sometimes as two fragments.
fn random_ipv6_frames(
    rng: &mut rand::rngs::StdRng,
    &(src, sport, dst, dport, protocol): &Tuple<[u8; 16]>,
) -> Vec<Vec<u8>> {
    use rand::Rng as _;
    let [icmp_type, code] = dport.to_be_bytes();
    let upper = if protocol == proto::ICMPV6 {
        icmp_header(icmp_type, code, sport)
    } else {
        l4_header(protocol, sport, dport)
    };
    let mut kinds: Vec<u8> = Vec::new();
    for (kind, p) in [(0u8, 0.25), (60, 0.25), (43, 0.15)] {
        if rng.random_bool(p) {
            kinds.push(kind);
        }
    }
    let id: u32 = rng.random();
    let fragmented = rng.random_bool(0.2);
    if fragmented {
        kinds.push(44);
    }
    let chain = |offset: u16, more: bool| -> (u8, Vec<u8>) {
        let mut bytes = Vec::new();
        for (i, kind) in kinds.iter().enumerate() {
            let next = kinds.get(i + 1).copied().unwrap_or(protocol);
            match kind {
                44 => {
                    bytes.extend_from_slice(&[next, 0]);
                    bytes.extend_from_slice(&((offset << 3) | u16::from(more)).to_be_bytes());
                    bytes.extend_from_slice(&id.to_be_bytes());
                }
                43 => bytes.extend_from_slice(&[next, 0, 4, 0, 0, 0, 0, 0]),
                _ => bytes.extend_from_slice(&[next, 0, 1, 4, 0, 0, 0, 0]),
            }
        }
        (kinds.first().copied().unwrap_or(protocol), bytes)
    };
    let (first_next, ext) = chain(0, fragmented);
    let mut frames = vec![ipv6_frame(src, dst, first_next, &ext, &upper)];
    if fragmented {
        let offset = upper.len().div_ceil(8) as u16;
        let (first_next, ext) = chain(offset, false);
        frames.push(ipv6_frame(src, dst, first_next, &ext, &[0; 16]));
    }
    frames
}

#[test]
fn program_agrees_with_a_reference_model_on_random_ipv6_traffic() {
    let ipv6 = ModelFamily {
        icmp: proto::ICMPV6,
        echo_request: icmp_port(128, 0),
        echo_reply: icmp_port(129, 0),
        address: |round, i| [0xfd, 0, 0, 100 + round, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, i],
        register: |dataplane, a, tag| {
            dataplane.maps_mut().set_endpoint6(Ipv6Addr::from(a), tag).unwrap()
        },
        frames: random_ipv6_frames,
        one_way: icmp_port(135, 0),
        error_frame: |from, to, &(src, sport, dst, dport, protocol)| {
            let quoted = ipv6_frame(src, dst, protocol, &[], &l4_header(protocol, sport, dport));
            let mut body = icmp_header(1, 4, 0);
            body.extend_from_slice(&quoted[14..14 + 48]);
            ipv6_frame(from, to, proto::ICMPV6, &[], &body)
        },
    };
    let checked = agrees_with_the_model(&ipv6, model_seed());
    assert!(checked > 3000, "only {checked} packets checked");
}
