//! `BPF_PROG_TEST_RUN` table tests: crafted packets through the loaded
//! programs, verdicts and map effects checked.

use std::net::Ipv4Addr;

use aya::programs::{TestRun as _, TestRunOptions};
use integration_tests::{netns::NetNs, pins::PinDir, require_root, unique_name};
use policy_agent::{Dataplane, Direction};
use policy_common::{
    Reason,
    craft::{PacketSpec, icmp_unreachable},
    maps::{PairKey, proto},
    ports::Allowance,
};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

const A: [u8; 4] = [10, 255, 0, 1];
const B: [u8; 4] = [10, 255, 0, 2];
const C: [u8; 4] = [10, 255, 0, 3];
const OUTSIDE: [u8; 4] = [169, 254, 0, 1];
const TAG_A: u32 = 1;
const TAG_B: u32 = 2;

/// A fresh namespace (test runs use its loopback as skb->dev) and a
/// dataplane with A (tag 1), B (tag 2) and C (tag 1) registered.
struct Fixture {
    dataplane: Dataplane,
    _pins: PinDir,
    _in_ns: integration_tests::netns::EnteredNetNs,
    _ns: NetNs,
}

impl Fixture {
    fn new() -> Self {
        require_root();
        let ns = NetNs::new(unique_name("tr"));
        let in_ns = ns.enter();
        let pins = PinDir::new();
        let mut dataplane = pins.open();
        let t = dataplane.maps_mut();
        t.set_endpoint(Ipv4Addr::from(A), TAG_A).unwrap();
        t.set_endpoint(Ipv4Addr::from(B), TAG_B).unwrap();
        t.set_endpoint(Ipv4Addr::from(C), TAG_A).unwrap();
        Self { dataplane, _pins: pins, _in_ns: in_ns, _ns: ns }
    }

    fn allow(&mut self, src: u32, dst: u32, protocol: u8, start: u16, end: u16, id: u32) {
        self.dataplane
            .maps_mut()
            .allow(PairKey::new(src, dst, protocol), Allowance { start, end, policy_id: id })
            .unwrap();
    }

    fn entering_container(&self, frame: &[u8]) -> u32 {
        let prog = self.dataplane.tc_program(Direction::ToContainer);
        prog.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() })
            .expect("test run")
            .return_value
    }

    fn leaving_container(&self, frame: &[u8]) -> u32 {
        let prog = self.dataplane.tc_program(Direction::FromContainer);
        prog.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() })
            .expect("test run")
            .return_value
    }

    /// Runs the destination side; its return value and the packet as the
    /// program left it.
    fn entering_container_out(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog = self.dataplane.tc_program(Direction::ToContainer);
        let mut out = vec![0u8; 1500];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..Default::default()
            })
            .expect("test run");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    /// Turns rejects on, at most `per_second` per sender.
    fn rejecting(mut self, per_second: u32) -> Self {
        use policy_agent::dataplane::{DataplaneConfig, DenyAction, DenySettings};
        let deny = DenySettings { action: DenyAction::Reject, rejects_per_second: per_second };
        let settings =
            DataplaneConfig { deny, ..DataplaneConfig::new("/unused") }.kernel_settings();
        self.dataplane.maps_mut().set_settings(settings).unwrap();
        self
    }

    fn count(&self, reason: Reason) -> u64 {
        self.dataplane.maps().verdict_count(reason).unwrap()
    }
}

fn verdict(ret: u32) -> &'static str {
    match ret {
        TC_ACT_OK => "pass",
        TC_ACT_SHOT => "drop",
        _ => "other",
    }
}

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
    let fills = |f: &Fixture| f.dataplane.maps().flow_cache_stats().unwrap().0;
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
    let conntrack_pin = f._pins.path().join("maps").join(names::CONNTRACK);
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

/// Keeps this test's thread on CPU 0, so its test runs share one CPU's
/// flow cache.
fn pin_this_thread_to_cpu0() {
    // SAFETY: a zeroed cpu_set_t is an empty set; 0 = the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(0, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set), 0);
    }
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
    assert_eq!(f.count(Reason::NotIpv4), 1);
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

/// (source, source port, destination, destination port, protocol).
type Tuple<A> = (A, u16, A, u16, u8);

/// The family a reference-model run sends: its ICMP protocol and echo
/// request/reply (as `icmp_port`s), its addresses, how an endpoint is
/// registered and how a packet is framed.
struct ModelFamily<A> {
    icmp: u8,
    echo_request: u16,
    echo_reply: u16,
    /// The `i`th address of round `round`.
    address: fn(round: u8, i: u8) -> A,
    register: fn(&mut Dataplane, A, u32),
    /// The frames of (src, sport, dst, dport, protocol): one packet, or its
    /// fragments; `rng` may vary their shape (IPv6: extension headers,
    /// fragments) but never their meaning. Each gets the model's verdict.
    frames: fn(&mut rand::rngs::StdRng, &Tuple<A>) -> Vec<Vec<u8>>,
    /// An ICMP message that is neither a query nor an error (IPv4: router
    /// advertisement; IPv6: neighbour solicitation, here between global
    /// addresses, where it is an ordinary flow), as an `icmp_port`.
    one_way: u16,
    /// An ICMP destination unreachable from `from` to `to` quoting the
    /// datagram `about`.
    error_frame: fn(from: A, to: A, about: &Tuple<A>) -> Vec<u8>,
}

/// A deliberately naive model of the policy: a list of policies scanned
/// linearly and the open connections, each with the revocation count it
/// was last checked at. It shares no code with the program's decision
/// logic.
struct Model<A> {
    tags: std::collections::HashMap<A, u32>,
    policies: Vec<(u32, u32, u8, u16, u16)>,
    conns: std::collections::HashMap<Tuple<A>, u32>,
    /// How many revocations took something away (the program's epoch).
    epoch: u32,
    /// The ICMP protocol and echo request/reply ports of the family.
    icmp: (u8, u16, u16),
}

impl<A: Copy + Eq + std::hash::Hash> Model<A> {
    fn allowed(&self, src: A, dst: A, protocol: u8, dport: u16) -> bool {
        let (Some(&s), Some(&d)) = (self.tags.get(&src), self.tags.get(&dst)) else {
            return true;
        };
        self.policies.iter().any(|&(ps, pd, pp, lo, hi)| {
            ps == s && pd == d && pp == protocol && lo <= dport && dport <= hi
        })
    }

    /// Takes a policy away (the agent's semantics: the exact range). The
    /// epoch moves when a port it allowed is allowed no more.
    fn revoke(&mut self, (s, d, p, lo, hi): (u32, u32, u8, u16, u16)) {
        self.policies.retain(|&(ps, pd, pp, plo, phi)| {
            !(ps == s && pd == d && pp == p && plo == lo && phi == hi)
        });
        let still = |port: u16| {
            self.policies.iter().any(|&(ps, pd, pp, plo, phi)| {
                ps == s && pd == d && pp == p && plo <= port && port <= phi
            })
        };
        if !(lo..=hi).all(still) {
            self.epoch += 1;
        }
    }

    /// Pass or drop, updating the open connections as a stateful firewall
    /// that re-checks a connection's opening packet would.
    fn deliver(&mut self, src: A, sport: u16, dst: A, dport: u16, protocol: u8) -> bool {
        if !self.tags.contains_key(&src) || !self.tags.contains_key(&dst) {
            return true;
        }
        if protocol == self.icmp.0 {
            return self.deliver_icmp(src, sport, dst, dport);
        }
        for opening in [(src, sport, dst, dport, protocol), (dst, dport, src, sport, protocol)] {
            if self.conns.contains_key(&opening) {
                if self.allowed(opening.0, opening.2, protocol, opening.3) {
                    self.conns.insert(opening, self.epoch);
                    return true;
                }
                self.conns.remove(&opening);
                return false;
            }
        }
        if self.allowed(src, dst, protocol, dport) {
            self.conns.insert((src, sport, dst, dport, protocol), self.epoch);
            return true;
        }
        false
    }

    /// An ICMP error from `from` to `to` about the TCP or UDP datagram
    /// `about`: it must go back to the datagram's sender, from its
    /// destination or from an address that is no endpoint (a router), and
    /// then passes if its connection was checked since the last revocation,
    /// or if either end is no endpoint.
    fn deliver_error(&self, from: A, to: A, about: &Tuple<A>) -> bool {
        let &(p, ps, q, qs, protocol) = about;
        if to != p || (from != q && self.tags.contains_key(&from)) {
            return false;
        }
        let tracked = [(p, ps, q, qs, protocol), (q, qs, p, ps, protocol)]
            .iter()
            .any(|c| self.conns.get(c) == Some(&self.epoch));
        tracked || !self.tags.contains_key(&from) || !self.tags.contains_key(&to)
    }

    /// ICMP echo request and echo reply (`dport` the type and code) with
    /// identifier `id`: a request a policy allows opens an exchange
    /// (requester, id, responder) whose replies pass while the request is
    /// still allowed; a reply outside any exchange passes only if a policy
    /// allows replies, and opens nothing.
    fn deliver_icmp(&mut self, src: A, id: u16, dst: A, dport: u16) -> bool {
        let (icmp, request, reply) = self.icmp;
        if dport != request && dport != reply {
            // A one-way message: its own policy, nothing to answer.
            return self.allowed(src, dst, icmp, dport);
        }
        let is_request = dport == request;
        let (requester, responder) = if is_request { (src, dst) } else { (dst, src) };
        let exchange = (requester, id, responder, request, icmp);
        if self.conns.contains_key(&exchange) {
            if self.allowed(requester, responder, icmp, request) {
                self.conns.insert(exchange, self.epoch);
                return true;
            }
            self.conns.remove(&exchange);
            return false;
        }
        if !self.allowed(src, dst, icmp, dport) {
            return false;
        }
        if is_request {
            self.conns.insert(exchange, self.epoch);
        }
        true
    }
}

/// Random policies, revocations and traffic (new flows, replies, ICMP
/// echo both ways, one-way ICMP messages, ICMP errors quoting earlier
/// datagrams from their far end, from a router or forged by anyone)
/// through the program entering a container, each packet's verdict
/// compared with the model's. Returns how many were checked.
fn agrees_with_the_model<A: Copy + Eq + std::hash::Hash + std::fmt::Debug>(
    family: &ModelFamily<A>,
    seed: u64,
) -> u32 {
    use rand::{Rng as _, SeedableRng as _, rngs::StdRng, seq::IndexedRandom as _};
    let mut f = Fixture::new();
    let mut rng = StdRng::seed_from_u64(seed);
    let edges = [1u16, 2, 79, 80, 81, 443, 8079, 8080, 8090, 8091, 65534, 65535];
    let (icmp, request, reply) = (family.icmp, family.echo_request, family.echo_reply);
    let mut checked = 0u32;
    for round in 0..12u8 {
        // Fresh addresses and tags each round, so earlier rounds' connections
        // cannot interfere.
        let base_tag = 100 * (u32::from(round) + 1);
        let addrs: Vec<A> = (1..=6).map(|i| (family.address)(round, i)).collect();
        let mut model = Model {
            tags: Default::default(),
            policies: Vec::new(),
            conns: Default::default(),
            epoch: 0,
            icmp: (icmp, request, reply),
        };
        for (i, a) in addrs.iter().enumerate().take(5) {
            // Five registered endpoints in three apps; the sixth address is
            // not registered.
            let tag = base_tag + (i as u32 % 3);
            (family.register)(&mut f.dataplane, *a, tag);
            model.tags.insert(*a, tag);
        }
        let mut next_id = 1u32;
        let mut random_policy = |rng: &mut StdRng| {
            let start = *edges.choose(rng).unwrap();
            let end = start.saturating_add(*[0u16, 1, 10, 1000].choose(rng).unwrap());
            let protocol = *[proto::TCP, proto::UDP, icmp].choose(rng).unwrap();
            // ICMP policies: every type, echo requests, echo replies.
            let (start, end) = if protocol == icmp {
                *[(0, u16::MAX), (request, request | 0xff), (reply, reply | 0xff)]
                    .choose(rng)
                    .unwrap()
            } else {
                (start, end)
            };
            let src = base_tag + rng.random_range(0..3);
            let dst = base_tag + rng.random_range(0..3);
            next_id += 1;
            (src, dst, protocol, start, end, next_id)
        };
        for _ in 0..rng.random_range(1..12) {
            let (s, d, p, lo, hi, id) = random_policy(&mut rng);
            f.allow(s, d, p, lo, hi, id);
            model.policies.push((s, d, p, lo, hi));
        }
        let mut sent: Vec<Tuple<A>> = Vec::new();
        for step in 0..300 {
            if step % 75 == 74 && !model.policies.is_empty() {
                // Take a policy away (same semantics as the agent: exact range).
                let i = rng.random_range(0..model.policies.len());
                let (s, d, p, lo, hi) = model.policies[i];
                f.dataplane.maps_mut().revoke(PairKey::new(s, d, p), lo, hi).unwrap();
                model.revoke((s, d, p, lo, hi));
            }
            let quotable: Vec<Tuple<A>> = sent.iter().filter(|t| t.4 != icmp).copied().collect();
            if !quotable.is_empty() && rng.random_bool(0.12) {
                let about = *quotable.choose(&mut rng).unwrap();
                let anyone = *addrs.choose(&mut rng).unwrap();
                let (from, to) = match rng.random_range(0..4) {
                    0 | 1 => (about.2, about.0),
                    2 => (anyone, about.0),
                    _ => (anyone, *addrs.choose(&mut rng).unwrap()),
                };
                if from != to {
                    let want = model.deliver_error(from, to, &about);
                    let frame = (family.error_frame)(from, to, &about);
                    let got = f.entering_container(&frame) == TC_ACT_OK;
                    assert_eq!(
                        got, want,
                        "seed {seed}, round {round}, step {step}: error {from:?} -> {to:?} \
                         about {about:?} as {frame:02x?}"
                    );
                    checked += 1;
                }
                continue;
            }
            let packet = if !sent.is_empty() && rng.random_bool(0.4) {
                let (a, ap, b, bp, p) = *sent.choose(&mut rng).unwrap();
                if p == icmp {
                    // The answer (or, to a reply, a request) with the same id.
                    (b, ap, a, if bp == request { reply } else { request }, p)
                } else {
                    (b, bp, a, ap, p) // a reply
                }
            } else {
                let src = *addrs.choose(&mut rng).unwrap();
                let dst = *addrs.choose(&mut rng).unwrap();
                let protocol = *[proto::TCP, proto::UDP, icmp].choose(&mut rng).unwrap();
                if protocol == icmp {
                    // Echo request or reply, identifier as the source port,
                    // or a one-way message.
                    let dport = *[request, reply, family.one_way].choose(&mut rng).unwrap();
                    (src, rng.random_range(1..4), dst, dport, protocol)
                } else {
                    (
                        src,
                        rng.random_range(30000..30008),
                        dst,
                        *edges.choose(&mut rng).unwrap(),
                        protocol,
                    )
                }
            };
            let (src, sport, dst, dport, protocol) = packet;
            if src == dst {
                continue;
            }
            sent.push(packet);
            let want = model.deliver(src, sport, dst, dport, protocol);
            for frame in (family.frames)(&mut rng, &packet) {
                let got = f.entering_container(&frame) == TC_ACT_OK;
                assert_eq!(
                    got, want,
                    "seed {seed}, round {round}, step {step}: {packet:?} as {frame:02x?}"
                );
                checked += 1;
            }
        }
    }
    checked
}

fn model_seed() -> u64 {
    std::env::var("MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x00c0_ffee)
}

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

/// The Internet checksum over `bytes` (0 when they hold a correct one).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

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

mod ipv6 {
    use std::net::Ipv6Addr;

    use policy_common::{
        craft::{icmp_header, ipv6_frame, l4_header},
        maps::proto,
        packet::{MAX_EXTENSION_HEADERS, icmp_port},
    };

    use super::*;

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

    /// An IPv6 packet with extension headers chosen at random (none of
    /// which changes its meaning: hop-by-hop first, destination options, a
    /// routing header with no segments left), sometimes as two fragments.
    fn random_ipv6_frames(
        rng: &mut rand::rngs::StdRng,
        &(src, sport, dst, dport, protocol): &super::Tuple<[u8; 16]>,
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
        let ipv6 = super::ModelFamily {
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
                let quoted =
                    ipv6_frame(src, dst, protocol, &[], &l4_header(protocol, sport, dport));
                let mut body = icmp_header(1, 4, 0);
                body.extend_from_slice(&quoted[14..14 + 48]);
                ipv6_frame(from, to, proto::ICMPV6, &[], &body)
            },
        };
        let checked = super::agrees_with_the_model(&ipv6, super::model_seed());
        assert!(checked > 3000, "only {checked} packets checked");
    }

    #[test]
    fn ipv6_link_plumbing_passes_and_malformed_chains_are_dropped() {
        let f = fixture();
        for icmp_type in [133, 134, 135, 136, 143] {
            let frame =
                ipv6_frame(LINK, ALL_NODES, proto::ICMPV6, &[], &icmp_header(icmp_type, 0, 0));
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
        assert_eq!(f.leaving_container(&tcp(B6, A6, 1, 2)), TC_ACT_SHOT, "spoofed");
        assert_eq!(f.leaving_container(&tcp(LINK, ALL_NODES, 1, 2)), TC_ACT_OK, "on the link");
        assert_eq!(f.leaving_container(&tcp(LINK, B6, 1, 2)), TC_ACT_SHOT);
        assert_eq!(f.count(Reason::Spoofed), 3);
    }
}
