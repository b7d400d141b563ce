//! Real traffic between "container" namespaces through the programs attached
//! to their host-side veths.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use integration_tests::{
    pins::PinDir,
    require_root,
    topology::{GATEWAY, Host},
    traffic::{
        LONG, SHORT, echo_once, tcp_connect, tcp_echo_server, tcp_echo_works, udp_echo_server,
        udp_echo_works, udp_socket,
    },
};
use policy_agent::Dataplane;
use policy_common::{
    Reason,
    maps::{PairKey, proto},
    ports::Allowance,
};

const FRONTEND: u32 = 1;
const BACKEND: u32 = 2;
const WORKER: u32 = 3;

/// Three containers: 0 = frontend, 1 = backend, 2 = worker, all registered
/// and attached.
struct Setup {
    dataplane: Dataplane,
    host: Host,
    _pins: PinDir,
}

impl Setup {
    fn new() -> Self {
        require_root();
        let host = Host::new(3);
        let pins = PinDir::new();
        let mut dataplane = pins.open();
        for (i, tag) in [FRONTEND, BACKEND, WORKER].into_iter().enumerate() {
            host.register(&mut dataplane, i, tag);
        }
        Self { dataplane, host, _pins: pins }
    }

    fn ip(&self, i: usize) -> Ipv4Addr {
        self.host.container(i).ip
    }

    fn allow(&mut self, src: u32, dst: u32, protocol: u8, start: u16, end: u16) {
        let id = start.into();
        self.dataplane
            .maps_mut()
            .allow(PairKey::new(src, dst, protocol), Allowance { start, end, policy_id: id })
            .unwrap();
    }

    fn revoke(&mut self, src: u32, dst: u32, protocol: u8, start: u16, end: u16) {
        self.dataplane.maps_mut().revoke(PairKey::new(src, dst, protocol), start, end).unwrap();
    }

    fn count(&self, reason: Reason) -> u64 {
        self.dataplane.maps().verdict_count(reason).unwrap()
    }
}

#[test]
fn tcp_denied_by_default_allowed_by_a_policy_and_cut_when_it_is_removed() {
    let mut s = Setup::new();
    let backend = s.ip(1);
    tcp_echo_server(&s.host.container(1).ns, backend, 8080);
    let frontend = &s.host.container(0).ns;

    assert!(!tcp_echo_works(frontend, backend, 8080, SHORT), "denied by default");
    assert!(s.count(Reason::NoPolicy) > 0);

    s.allow(FRONTEND, BACKEND, proto::TCP, 8080, 8080);
    let frontend = &s.host.container(0).ns;
    let mut stream = tcp_connect(frontend, None, backend, 8080, LONG).expect("allowed connect");
    assert!(echo_once(&mut stream), "allowed connection echoes");
    assert!(s.count(Reason::NewAllowed) >= 1);
    assert!(s.count(Reason::Reply) >= 1, "replies pass the frontend's veth");
    // The policy is one-way: the backend cannot open connections back.
    tcp_echo_server(&s.host.container(0).ns, s.ip(0), 8080);
    assert!(!tcp_echo_works(&s.host.container(1).ns, s.ip(0), 8080, SHORT));

    s.revoke(FRONTEND, BACKEND, proto::TCP, 8080, 8080);
    let revoked = Instant::now();
    stream.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    assert!(!echo_once(&mut stream), "the open connection must be cut");
    // The first packet after the removal was dropped as revoked; the read
    // above only bounds how long it took us to notice.
    assert!(s.count(Reason::Revoked) >= 1, "no packet was dropped as revoked");
    assert!(revoked.elapsed() < Duration::from_millis(1500));
    assert!(!tcp_echo_works(&s.host.container(0).ns, backend, 8080, SHORT), "no new connections");
}

#[test]
fn udp_port_range_edges() {
    let mut s = Setup::new();
    let backend = s.ip(1);
    for port in [4999, 5000, 5002, 5003] {
        udp_echo_server(&s.host.container(1).ns, backend, port);
    }
    s.allow(FRONTEND, BACKEND, proto::UDP, 5000, 5002);
    let socket = udp_socket(&s.host.container(0).ns, None);
    for (port, allowed) in [(4999, false), (5000, true), (5002, true), (5003, false)] {
        assert_eq!(udp_echo_works(&socket, backend, port, 32, SHORT), allowed, "udp port {port}");
    }
    // Other source apps get nothing from this policy.
    let worker = udp_socket(&s.host.container(2).ns, None);
    assert!(!udp_echo_works(&worker, backend, 5000, 32, SHORT));
}

#[test]
fn fragmented_udp_follows_the_policy() {
    let mut s = Setup::new();
    let backend = s.ip(1);
    udp_echo_server(&s.host.container(1).ns, backend, 9000);
    udp_echo_server(&s.host.container(1).ns, backend, 9001);
    s.allow(FRONTEND, BACKEND, proto::UDP, 9000, 9000);
    let socket = udp_socket(&s.host.container(0).ns, None);
    // 4000 bytes over a 1500-byte MTU: three fragments each way.
    assert!(udp_echo_works(&socket, backend, 9000, 4000, LONG), "allowed fragmented datagram");
    assert!(s.count(Reason::Fragment) >= 2, "later fragments passed on the first one's verdict");
    assert!(!udp_echo_works(&socket, backend, 9001, 4000, SHORT));
}

#[test]
fn spoofed_source_addresses_are_dropped_where_they_leave() {
    let mut s = Setup::new();
    let backend = s.ip(1);
    let worker = s.ip(2);
    tcp_echo_server(&s.host.container(1).ns, backend, 8080);
    // The worker may reach the backend; the frontend claims the worker's
    // address.
    s.allow(WORKER, BACKEND, proto::TCP, 8080, 8080);
    assert!(
        tcp_echo_works(&s.host.container(2).ns, backend, 8080, LONG),
        "the real worker gets in"
    );
    let frontend = &s.host.container(0).ns;
    frontend.ip(&["addr", "add", &format!("{worker}/32"), "dev", "eth0"]);
    let spoofed = tcp_connect(frontend, Some(worker), backend, 8080, SHORT);
    assert!(spoofed.is_err(), "a spoofed source must not connect");
    assert!(s.count(Reason::Spoofed) >= 1);
}

#[test]
fn traffic_with_the_host_and_unregistered_addresses_is_unaffected() {
    let s = Setup::new();
    let backend = s.ip(1);
    tcp_echo_server(&s.host.container(1).ns, backend, 8080);
    // Host → container and container → host, with no policy at all.
    assert!(tcp_echo_works(&s.host.ns, backend, 8080, LONG), "host reaches a container");
    tcp_echo_server(&s.host.ns, GATEWAY, 7000);
    assert!(
        tcp_echo_works(&s.host.container(0).ns, GATEWAY, 7000, LONG),
        "container reaches the host"
    );
    // ping, both ways (ICMP is outside c2c policy when the host is an end).
    for (ns, target) in [(&s.host.ns, backend), (&s.host.container(0).ns, GATEWAY)] {
        let out =
            ns.command("ping").args(["-c", "1", "-W", "2", &target.to_string()]).output().unwrap();
        assert!(out.status.success(), "ping {target}: {}", String::from_utf8_lossy(&out.stdout));
    }
    // ARP kept working throughout (the pings above needed it), and an
    // address that is not registered is not policed.
    let frontend = &s.host.container(0).ns;
    let extra = Ipv4Addr::new(10, 255, 9, 9);
    frontend.ip(&["addr", "add", &format!("{extra}/32"), "dev", "eth0"]);
    // Not registered, but still spoofing from the frontend's veth: dropped.
    assert!(tcp_connect(frontend, Some(extra), backend, 8080, SHORT).is_err());
    assert!(s.count(Reason::Unmanaged) > 0);
    assert!(s.count(Reason::NotIp) > 0, "ARP passed");
}

#[test]
fn unregistered_container_is_not_policed() {
    require_root();
    let host = Host::new(2);
    let pins = PinDir::new();
    let mut dataplane = pins.open();
    // Only container 1 is registered; container 0 has no endpoint.
    host.register(&mut dataplane, 1, BACKEND);
    let backend = host.container(1).ip;
    tcp_echo_server(&host.container(1).ns, backend, 8080);
    assert!(tcp_echo_works(&host.container(0).ns, backend, 8080, LONG));
    assert!(dataplane.maps().verdict_count(Reason::Unmanaged).unwrap() > 0);
}
