//! `BPF_PROG_TEST_RUN` table tests: crafted packets through the loaded
//! programs, verdicts and map effects checked (IPv6: `test_run_ipv6.rs`;
//! rejects: `test_run_reject.rs`; against a reference model:
//! `test_run_model.rs`; the fixture: `integration_tests::test_run`).

use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use integration_tests::{
    netns::NetNs, pin_this_thread_to_cpu0, pins::PinDir, require_root, test_run::*, unique_name,
};
use policy_agent::{Dataplane, Direction};
use policy_common::{
    Reason,
    craft::{PacketSpec, icmp_unreachable},
    maps::{PairKey, proto},
    ports::Allowance,
};

#[test]
fn port_range_edges_and_default_deny() {
    let mut f = Fixture::new();
    f.allow(TAG_A, TAG_B, proto::TCP, 8080, 8090, 1);
    f.allow(TAG_A, TAG_B, proto::UDP, 1, 1, 2);
    f.allow(TAG_A, TAG_B, proto::UDP, 65535, 65535, 3);
    let table: &[(PacketSpec, &str)] = &[
        (PacketSpec::tcp(A, B, 1000, 8079), "drop"),
        (PacketSpec::tcp(A, B, 1001, 8080), "pass"),
        (PacketSpec::tcp(A, B, 1002, 8090), "pass"),
        (PacketSpec::tcp(A, B, 1003, 8091), "drop"),
        (PacketSpec::udp(A, B, 1004, 1), "pass"),
        (PacketSpec::udp(A, B, 1005, 2), "drop"),
        (PacketSpec::udp(A, B, 1006, 65535), "pass"),
        (PacketSpec::udp(A, B, 1007, 65534), "drop"),
        // Same ports, other protocol / other direction / other source app.
        (PacketSpec::udp(A, B, 1008, 8080), "drop"),
        (PacketSpec::tcp(B, A, 1009, 8080), "drop"),
        // C has A's tag: the policy names apps, not instances.
        (PacketSpec::tcp(C, B, 1010, 8085), "pass"),
    ];
    for (spec, want) in table {
        let got = verdict(f.entering_container(&spec.frame()));
        assert_eq!(got, *want, "{spec:?}");
    }
    assert_eq!(f.count(Reason::NewAllowed), 5);
    assert_eq!(f.count(Reason::NoPolicy), 6);
    assert_eq!(f.dataplane.maps().connections().len(), 5);
}

/// Established IPv4 packets are answered from the CPU's flow cache: one
/// fill, then hits, counted for their policy exactly; a revocation sends
/// them back to the full check; a conntrack entry pushed out while the
/// cache answered comes back within 64 packets (per-policy counting on or
/// off); with the cache switched off nothing is filled.
#[test]
fn the_flow_cache_answers_established_packets_until_a_revocation() {
    use aya::maps::{HashMap, MapData};
    use policy_common::maps::{COUNTER_FLUSH, Conn, ConnKey, names, settings};
    let mut f = Fixture::new();
    pin_this_thread_to_cpu0();
    let fills = |f: &Fixture| f.dataplane.maps().flow_cache_stats().unwrap().fills;
    f.allow(TAG_A, TAG_B, proto::TCP, 8080, 8080, 7);
    let request = PacketSpec::tcp(A, B, 40000, 8080).frame();
    let reply = PacketSpec::tcp(B, A, 8080, 40000).frame();
    assert_eq!(f.entering_container(&request), TC_ACT_OK); // new: tracked
    assert_eq!(fills(&f), 0);
    assert_eq!(f.entering_container(&request), TC_ACT_OK); // established: filled
    assert_eq!(fills(&f), 1);
    for _ in 0..100 {
        assert_eq!(f.entering_container(&request), TC_ACT_OK);
        assert_eq!(f.entering_container(&reply), TC_ACT_OK);
    }
    assert_eq!(fills(&f), 1, "one connection, one fill: every other packet was a hit");
    assert_eq!((f.count(Reason::Established), f.count(Reason::Reply)), (101, 100));
    assert_eq!(f.dataplane.maps().policy_counters(7).packets, 202, "counted exactly");

    // The conntrack entry pushed out (as LRU pressure would): the cache
    // goes on answering, and the next flush puts the entry back.
    let conntrack_pin = f.pins.path().join("maps").join(names::CONNTRACK);
    let mut conntrack: HashMap<MapData, ConnKey, Conn> =
        HashMap::try_from(aya::maps::Map::HashMap(MapData::from_pin(conntrack_pin).unwrap()))
            .unwrap();
    let (key, _) = f.dataplane.maps().connections()[0];
    conntrack.remove(&key).unwrap();
    for _ in 0..COUNTER_FLUSH {
        assert_eq!(f.entering_container(&request), TC_ACT_OK);
    }
    assert_eq!(f.dataplane.maps().connections().len(), 1, "back in conntrack");
    assert_eq!(f.dataplane.maps().connections()[0].1.policy_id, 7);
    assert_eq!(fills(&f), 1);
    // The same with per-policy counting off: the cache still refreshes it.
    let on = f.dataplane.maps().settings().unwrap();
    let counting_off =
        policy_common::maps::Settings { flags: on.flags & !settings::POLICY_COUNTERS, ..on };
    f.dataplane.maps_mut().set_settings(counting_off).unwrap();
    conntrack.remove(&key).unwrap();
    for _ in 0..COUNTER_FLUSH {
        assert_eq!(f.entering_container(&request), TC_ACT_OK);
    }
    assert_eq!(f.dataplane.maps().connections().len(), 1, "back in conntrack, counting off");
    f.dataplane.maps_mut().set_settings(on).unwrap();
    assert_eq!(fills(&f), 1);

    // Revoked: the next packet is checked in full and dropped.
    f.dataplane.maps_mut().revoke(PairKey::new(TAG_A, TAG_B, proto::TCP), 8080, 8080).unwrap();
    let counters = f.dataplane.maps().policy_counter_ids().unwrap();
    assert!(!counters.contains(&7), "revoked with the last allowance naming it: {counters:?}");
    assert_eq!(f.entering_container(&request), TC_ACT_SHOT);
    assert_eq!(f.count(Reason::Revoked), 1);
    assert_eq!(f.entering_container(&reply), TC_ACT_SHOT);

    // Switched off: established packets are decided from conntrack alone.
    let mut off = f.dataplane.maps().settings().unwrap();
    off.flags &= !settings::FLOW_CACHE;
    f.dataplane.maps_mut().set_settings(off).unwrap();
    f.allow(TAG_A, TAG_B, proto::TCP, 8080, 8080, 8);
    let other = PacketSpec::tcp(A, B, 40001, 8080).frame();
    for _ in 0..10 {
        assert_eq!(f.entering_container(&other), TC_ACT_OK);
    }
    assert_eq!(fills(&f), 1, "nothing filled with the cache off");
    assert_eq!(f.dataplane.maps().policy_counters(8).packets, 10);
}

#[test]
fn replies_pass_and_revocation_cuts() {
    let mut f = Fixture::new();
    f.allow(TAG_A, TAG_B, proto::TCP, 443, 443, 7);
    let request = PacketSpec::tcp(A, B, 40000, 443).frame();
    let reply = PacketSpec::tcp(B, A, 443, 40000).frame();
    assert_eq!(f.entering_container(&reply), TC_ACT_SHOT, "no connection yet");
    assert_eq!(f.entering_container(&request), TC_ACT_OK);
    assert_eq!(f.entering_container(&reply), TC_ACT_OK);
    assert_eq!(f.entering_container(&request), TC_ACT_OK);
    assert_eq!(f.count(Reason::Reply), 1);
    assert_eq!(f.count(Reason::Established), 1);
    let conns = f.dataplane.maps().connections();
    assert_eq!(conns.len(), 1);
    assert_eq!(conns[0].1.policy_id, 7);

    f.dataplane.maps_mut().revoke(PairKey::new(TAG_A, TAG_B, proto::TCP), 443, 443).unwrap();
    assert_eq!(f.entering_container(&reply), TC_ACT_SHOT, "revoked connection must be cut");
    assert_eq!(f.count(Reason::Revoked), 1);
    assert!(f.dataplane.maps().connections().is_empty());
    assert_eq!(f.entering_container(&request), TC_ACT_SHOT);
}

#[test]
fn unmanaged_and_non_ip_traffic_passes() {
    let f = Fixture::new();
    let mut arp = PacketSpec::tcp(A, B, 1, 2).frame();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    let mut ipv6 = PacketSpec::tcp(A, B, 1, 2).frame();
    ipv6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    for frame in [
        arp,
        PacketSpec::tcp(OUTSIDE, B, 1, 22).frame(),
        PacketSpec::udp(B, OUTSIDE, 53, 53).frame(),
        PacketSpec::icmp(OUTSIDE, B, 8, 0, 1).frame(),
    ] {
        assert_eq!(f.entering_container(&frame), TC_ACT_OK);
    }
    assert_eq!(f.count(Reason::NotIp), 1);
    assert_eq!(f.count(Reason::Unmanaged), 3);
    // IPv6 is policed too: a frame labelled IPv6 that is not is malformed.
    assert_eq!(f.entering_container(&ipv6), TC_ACT_SHOT);
    assert_eq!(f.count(Reason::Malformed), 1);
    // Between endpoints, ICMP echo and other protocols without a policy.
    assert_eq!(f.entering_container(&PacketSpec::icmp(A, B, 8, 0, 1).frame()), TC_ACT_SHOT);
    assert_eq!(f.entering_container(&PacketSpec::new(A, B, 47, 0, 0).frame()), TC_ACT_SHOT);
}

#[test]
fn truncated_and_malformed_headers_are_dropped() {
    let f = Fixture::new();
    let good = PacketSpec::tcp(A, B, 1, 2).frame();
    // Cut inside the TCP header. (The kernel refuses to test-run an IPv4
    // frame shorter than an IP header; the host unit tests of the parser
    // cover those cuts.)
    for cut in [14 + 20, 14 + 20 + 4, 14 + 20 + 19] {
        assert_eq!(f.entering_container(&good[..cut]), TC_ACT_SHOT, "cut at {cut}");
        assert_eq!(f.leaving_container(&good[..cut]), TC_ACT_SHOT, "source side, cut at {cut}");
    }
    // IHL promises options that are not there.
    let mut with_options = PacketSpec::udp(A, B, 1, 2);
    with_options.ip_options = vec![1; 40];
    let frame = with_options.frame();
    assert_eq!(f.entering_container(&frame[..14 + 40]), TC_ACT_SHOT);
    // IHL below 5.
    let mut bad_ihl = good.clone();
    bad_ihl[14] = 0x43;
    assert_eq!(f.entering_container(&bad_ihl), TC_ACT_SHOT);
    // total_len shorter than the headers it claims (padding must not count).
    let mut short_len = good.clone();
    short_len[16..18].copy_from_slice(&24u16.to_be_bytes());
    assert_eq!(f.entering_container(&short_len), TC_ACT_SHOT);
    assert_eq!(f.count(Reason::Malformed), 9);
}

#[test]
fn ip_options_are_skipped() {
    let mut f = Fixture::new();
    f.allow(TAG_A, TAG_B, proto::UDP, 5000, 5000, 1);
    for options in [4usize, 20, 40] {
        let mut spec = PacketSpec::udp(A, B, 6000 + options as u16, 5000);
        spec.ip_options = vec![1; options];
        assert_eq!(f.entering_container(&spec.frame()), TC_ACT_OK, "{options} option bytes");
        spec.dport = 5001;
        assert_eq!(f.entering_container(&spec.frame()), TC_ACT_SHOT, "{options} option bytes");
    }
}

#[test]
fn fragments_follow_the_first_fragment() {
    let mut f = Fixture::new();
    f.allow(TAG_A, TAG_B, proto::UDP, 9000, 9000, 1);
    let fragment = |dport: u16, id: u16, offset: u16, more: bool| {
        let mut spec = PacketSpec::udp(A, B, 7000, dport);
        spec.ip_id = id;
        spec.frag_offset = offset;
        spec.more_fragments = more;
        spec.frame()
    };
    assert_eq!(
        f.entering_container(&fragment(9000, 1, 185, false)),
        TC_ACT_SHOT,
        "later fragment first"
    );
    assert_eq!(f.entering_container(&fragment(9000, 1, 0, true)), TC_ACT_OK);
    assert_eq!(f.entering_container(&fragment(9000, 1, 185, true)), TC_ACT_OK);
    assert_eq!(f.entering_container(&fragment(9000, 1, 370, false)), TC_ACT_OK);
    assert_eq!(f.entering_container(&fragment(9001, 2, 0, true)), TC_ACT_SHOT);
    assert_eq!(f.entering_container(&fragment(9001, 2, 185, false)), TC_ACT_SHOT);
    assert_eq!(f.count(Reason::Fragment), 2);
    assert_eq!(f.count(Reason::FragmentUnknown), 2);
}

#[test]
fn icmp_errors_about_allowed_connections_pass() {
    let mut f = Fixture::new();
    f.allow(TAG_A, TAG_B, proto::UDP, 9000, 9000, 1);
    let request = PacketSpec::udp(A, B, 7000, 9000);
    let unreachable = icmp_unreachable(B, A, &request).frame();
    assert_eq!(f.entering_container(&unreachable), TC_ACT_SHOT);
    assert_eq!(f.entering_container(&request.frame()), TC_ACT_OK);
    assert_eq!(f.entering_container(&unreachable), TC_ACT_OK);
    assert_eq!(f.count(Reason::Related), 1);
}

#[test]
fn source_side_drops_spoofed_addresses() {
    let f = Fixture::new();
    // Test runs hand the program an skb on loopback (ifindex 1).
    let mut dp = f;
    assert_eq!(
        dp.leaving_container(&PacketSpec::tcp(B, A, 1, 2).frame()),
        TC_ACT_OK,
        "no endpoint behind lo yet"
    );
    dp.dataplane.maps_mut().set_veth(1, Ipv4Addr::from(A), TAG_A).unwrap();
    assert_eq!(dp.leaving_container(&PacketSpec::tcp(A, B, 1, 2).frame()), TC_ACT_OK);
    assert_eq!(dp.leaving_container(&PacketSpec::tcp(B, C, 1, 2).frame()), TC_ACT_SHOT);
    assert_eq!(dp.leaving_container(&PacketSpec::tcp(OUTSIDE, C, 1, 2).frame()), TC_ACT_SHOT);
    let mut arp = PacketSpec::tcp(B, A, 1, 2).frame();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(dp.leaving_container(&arp), TC_ACT_OK);
    assert_eq!(dp.count(Reason::Spoofed), 2);
    assert_eq!(dp.count(Reason::SourceVerified), 1);
    // Re-bound to B: A is now the spoofer (the slot follows the hash).
    dp.dataplane.maps_mut().set_veth(1, Ipv4Addr::from(B), TAG_B).unwrap();
    assert_eq!(dp.leaving_container(&PacketSpec::tcp(A, B, 1, 2).frame()), TC_ACT_SHOT);
    assert_eq!(dp.leaving_container(&PacketSpec::tcp(B, A, 1, 2).frame()), TC_ACT_OK);
    // Unbound: nothing to check against.
    dp.dataplane.maps_mut().remove_veth(1).unwrap();
    assert_eq!(dp.leaving_container(&PacketSpec::tcp(A, B, 1, 2).frame()), TC_ACT_OK);
    assert_eq!(dp.count(Reason::Spoofed), 3);
}

#[test]
fn veths_past_the_slot_array_are_checked_through_the_hash() {
    require_root();
    let ns = NetNs::new(unique_name("tr"));
    let _in_ns = ns.enter();
    let pins = PinDir::new();
    // One slot (ifindex 0): loopback's ifindex 1 is past the array.
    let capacities = policy_agent::Capacities { veths: 1, ..Default::default() };
    let mut dataplane =
        Dataplane::open(&policy_agent::DataplaneConfig { capacities, ..pins.config() }).unwrap();
    dataplane.maps_mut().set_veth(1, Ipv4Addr::from(A), TAG_A).unwrap();
    let prog = dataplane.tc_program(Direction::FromContainer);
    let run = |frame: Vec<u8>| {
        prog.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() })
            .unwrap()
            .return_value
    };
    assert_eq!(run(PacketSpec::tcp(A, B, 1, 2).frame()), TC_ACT_OK);
    assert_eq!(run(PacketSpec::tcp(B, A, 1, 2).frame()), TC_ACT_SHOT, "spoofed");
}

#[test]
fn cgroup_programs_make_the_same_decisions() {
    let mut f = Fixture::new();
    f.allow(TAG_A, TAG_B, proto::TCP, 8080, 8080, 1);
    let run = |f: &Fixture, dir, frame: &[u8]| {
        f.dataplane
            .cgroup_program(dir)
            .test_run(TestRunOptions { data_in: Some(frame), ..Default::default() })
            .expect("test run")
            .return_value
    };
    const PASS: u32 = 1;
    const DROP: u32 = 0;
    // The kernel strips the Ethernet header for cgroup_skb test runs.
    assert_eq!(run(&f, Direction::ToContainer, &PacketSpec::tcp(A, B, 1, 8080).frame()), PASS);
    assert_eq!(run(&f, Direction::ToContainer, &PacketSpec::tcp(A, B, 1, 8081).frame()), DROP);
    assert_eq!(
        run(&f, Direction::ToContainer, &PacketSpec::tcp(B, A, 8080, 1).frame()),
        PASS,
        "reply"
    );
    assert_eq!(run(&f, Direction::ToContainer, &PacketSpec::tcp(OUTSIDE, A, 1, 2).frame()), PASS);
    // Egress: a test run's skb belongs to a socket in the test's own cgroup.
    assert_eq!(run(&f, Direction::FromContainer, &PacketSpec::tcp(B, A, 1, 2).frame()), PASS);
    let own = integration_tests::cgroup::own_cgroup_id();
    f.dataplane.maps_mut().set_cgroup(own, Ipv4Addr::from(A), TAG_A).unwrap();
    assert_eq!(run(&f, Direction::FromContainer, &PacketSpec::tcp(B, A, 1, 2).frame()), DROP);
    assert_eq!(run(&f, Direction::FromContainer, &PacketSpec::tcp(A, B, 1, 2).frame()), PASS);
}

#[test]
fn endpoints_are_found_inside_and_outside_the_overlay_across_overlay_changes() {
    use policy_agent::dataplane::OverlayNetwork;
    require_root();
    let ns = NetNs::new(unique_name("tr"));
    let _in_ns = ns.enter();
    let pins = PinDir::new();
    // In the default overlay (slots), outside it (hashed).
    let (inside, outside) = ([10, 255, 7, 1], [192, 168, 7, 2]);
    let open = |overlay: Option<OverlayNetwork>| {
        Dataplane::open(&policy_agent::DataplaneConfig { overlay, ..pins.config() }).unwrap()
    };
    let check = |dataplane: &Dataplane, when: &str| {
        let prog = dataplane.tc_program(Direction::ToContainer);
        let run = |frame: Vec<u8>| {
            prog.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() })
                .unwrap()
                .return_value
        };
        for (src, dst) in [(A, inside), (A, outside), (inside, outside), (outside, inside)] {
            // Allowed both ways on 8080; 9999 denied: a lost endpoint would
            // make it pass as unmanaged.
            let allowed = PacketSpec::tcp(src, dst, 41000, 8080).frame();
            let denied = PacketSpec::tcp(src, dst, 41001, 9999).frame();
            assert_eq!(verdict(run(allowed)), "pass", "{when}: {src:?} -> {dst:?} allowed");
            assert_eq!(verdict(run(denied)), "drop", "{when}: {src:?} -> {dst:?} denied");
        }
    };
    let mut dataplane = open(Some(OverlayNetwork::default()));
    let t = dataplane.maps_mut();
    for (addr, tag) in [(A, TAG_A), (inside, TAG_A), (outside, TAG_A)] {
        t.set_endpoint(Ipv4Addr::from(addr), tag).unwrap();
    }
    t.allow(
        PairKey::new(TAG_A, TAG_A, proto::TCP),
        Allowance { start: 8080, end: 8080, policy_id: 1 },
    )
    .unwrap();
    assert_eq!(t.overlay().slots, 65536);
    check(&dataplane, "default overlay");
    drop(dataplane);
    // No overlay: every lookup hashed.
    let dataplane = open(None);
    assert_eq!(dataplane.maps().overlay().slots, 0);
    check(&dataplane, "no overlay");
    drop(dataplane);
    // Another network: the old slots are cleared, the new ones filled.
    let other = OverlayNetwork::parse("192.168.0.0/16").unwrap();
    let mut dataplane = open(Some(other));
    check(&dataplane, "192.168.0.0/16");
    // Endpoints written now land in the new slots; removal clears them.
    let t = dataplane.maps_mut();
    t.remove_endpoint(Ipv4Addr::from(outside)).unwrap();
    let prog = dataplane.tc_program(Direction::ToContainer);
    let frame = PacketSpec::tcp(A, outside, 41002, 9999).frame();
    let ret = prog.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() });
    assert_eq!(verdict(ret.unwrap().return_value), "pass", "removed: unmanaged");
    drop(dataplane);
    let dataplane = open(Some(OverlayNetwork::default()));
    check_removed(&dataplane, A, outside);
}

/// `dst` is no endpoint any more: traffic to it passes as unmanaged.
fn check_removed(dataplane: &Dataplane, src: [u8; 4], dst: [u8; 4]) {
    let prog = dataplane.tc_program(Direction::ToContainer);
    let frame = PacketSpec::tcp(src, dst, 41003, 9999).frame();
    let ret = prog.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() });
    assert_eq!(verdict(ret.unwrap().return_value), "pass");
}

/// Events waiting in the ring buffer.
fn drain_events(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
) -> Vec<policy_common::maps::FlowEvent> {
    let mut events = Vec::new();
    while let Some(item) = ring.next() {
        assert_eq!(item.len(), size_of::<policy_common::maps::FlowEvent>());
        // SAFETY: the program writes exactly one FlowEvent per record.
        events.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
    }
    events
}

#[test]
fn denials_and_new_connections_are_reported_and_policies_counted() {
    use policy_common::maps::{FlowEvent, direction};
    let mut f = Fixture::new();
    let mut ring = f.dataplane.take_flow_events().expect("ring buffer");
    f.allow(TAG_A, TAG_B, proto::TCP, 8080, 8080, 42);
    let request = PacketSpec::tcp(A, B, 40000, 8080).frame();
    assert_eq!(f.entering_container(&request), TC_ACT_OK);
    assert_eq!(f.entering_container(&request), TC_ACT_OK); // established: not reported
    assert_eq!(f.entering_container(&PacketSpec::tcp(B, A, 8080, 40000).frame()), TC_ACT_OK);
    assert_eq!(f.entering_container(&PacketSpec::udp(A, B, 5000, 53).frame()), TC_ACT_SHOT);
    let events = drain_events(&mut ring);
    assert_eq!(events.len(), 2, "{events:?}");
    let addr = |ip: [u8; 4]| u32::from_ne_bytes(ip);
    let allowed = FlowEvent { time_ns: events[0].time_ns, ..events[0] };
    assert_eq!(
        allowed,
        FlowEvent {
            time_ns: events[0].time_ns,
            saddr: addr(A),
            daddr: addr(B),
            sport: 40000,
            dport: 8080,
            protocol: proto::TCP,
            direction: direction::INGRESS,
            allowed: 1,
            reason: Reason::NewAllowed as u8,
            src_tag: TAG_A,
            dst_tag: TAG_B,
            policy_id: 42,
            ifindex: 1,
        }
    );
    let denied = events[1];
    assert_eq!((denied.allowed, denied.reason, denied.dport), (0, Reason::NoPolicy as u8, 53));
    assert_eq!((denied.src_tag, denied.dst_tag, denied.policy_id), (TAG_A, TAG_B, 0));
    // Three packets of the connection, requests and reply, counted under the policy.
    let counters = f.dataplane.maps().policy_counters(42);
    assert_eq!(counters.packets, 3);
    assert_eq!(counters.bytes, 3 * request.len() as u64);
    // Past the flush threshold the count moves to the per-CPU counters; the
    // total stays exact.
    for _ in 0..70 {
        f.entering_container(&request);
    }
    assert_eq!(f.dataplane.maps().policy_counters(42).packets, 73);

    // A flood of denied packets to one destination: 100 reported, the rest
    // counted as rate-limited.
    for i in 0..500u16 {
        f.entering_container(&PacketSpec::udp(A, B, 1000 + i, 53).frame());
    }
    let flood = drain_events(&mut ring);
    assert_eq!(flood.len(), 99, "one of this second's 100 was the first denial");
    let stats = f.dataplane.maps().event_stats().unwrap();
    assert_eq!(stats.rate_limited, 401);
    assert_eq!(stats.emitted, 101);
    assert_eq!(stats.lost, 0);
    // Spoofing is reported from the source side (to another destination:
    // B's budget for this second is spent).
    f.dataplane.maps_mut().set_veth(1, Ipv4Addr::from(A), TAG_A).unwrap();
    assert_eq!(f.leaving_container(&PacketSpec::tcp(C, OUTSIDE, 1, 2).frame()), TC_ACT_SHOT);
    let spoofed = drain_events(&mut ring);
    assert_eq!(spoofed.len(), 1);
    assert_eq!(
        (spoofed[0].direction, spoofed[0].reason, spoofed[0].src_tag),
        (direction::EGRESS, Reason::Spoofed as u8, TAG_A)
    );
}
