//! Identity that cannot be forged: the attacks an independent hostile check
//! made from inside a container, sent as real packets through the real
//! programs and agent, each refused and counted next to a control showing
//! the legitimate traffic still passes.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::Duration,
};

use integration_tests::{
    cluster::{Etcd, Underlay, hosts, vxlan_gbp},
    daemon::Daemon,
    eventually,
    raw::{Capture, send_ip},
    require_root,
    topology::{GATEWAY, Host},
    traffic::{
        LONG, SHORT, tcp_connect, tcp_echo_server, tcp_echo_works, udp_echo_server, udp_socket,
    },
};
use policy_common::{
    craft::{PacketSpec, icmp_header, ipv6_frame},
    maps::proto,
};
use serde_json::Value;

/// 1. A container sends tunnel packets naming another app to its own host
///    (the gateway address and the host's underlay address) and to another
///    host: none is decapsulated; each is dropped where it leaves the
///    container and counted as spoofed. The real cross-host traffic passes.
#[test]
fn a_container_cannot_send_tunnel_packets_to_any_host() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let cells = hosts(&mut underlay, 2, 2);
    let (b, c) = (&cells[0], &cells[1]);
    let (frontend, attacker_b) = (b.host.container(0), b.host.container(1));
    let (backend, attacker_c) = (c.host.container(0), c.host.container(1));
    b.daemon.register(frontend, "frontend");
    b.daemon.register(attacker_b, "intruder");
    c.daemon.register(backend, "backend");
    c.daemon.register(attacker_c, "intruder");
    b.daemon.allow("frontend", "backend", "udp", "7000");
    let rx = backend.ns.run(|| UdpSocket::bind((backend.ip, 7000))).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 64];
    // Control: the real thing, from frontend's host, arrives.
    let tx = frontend.ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            tx.send_to(b"real", (backend.ip, 7000)).unwrap();
            rx.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"real")
        }),
        "frontend on B reaches backend on C"
    );
    while rx.recv(&mut buf).is_ok() {}

    let status = c.daemon.get("/v1/cluster");
    let vtep = status["hosts"].as_array().unwrap().iter().find(|h| h["host"] == c.name).unwrap()
        ["vtep_mac"]
        .as_str()
        .unwrap()
        .to_owned();
    let tag = c.daemon.tag("frontend") as u16;
    let mut inner = PacketSpec::udp(frontend.ip.octets(), backend.ip.octets(), 40000, 7000);
    inner.payload = b"forged".to_vec();
    let forged = vxlan_gbp(tag, &vtep, &inner.ipv4());
    let sends = [
        (attacker_c, GATEWAY, &c.daemon),
        (attacker_c, c.underlay, &c.daemon),
        (attacker_b, c.underlay, &b.daemon),
    ];
    for (attacker, to, its_host) in sends {
        let spoofed_before = its_host.verdict_count("spoofed");
        let socket = attacker.ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap();
        for _ in 0..10 {
            socket.send_to(&forged, (to, 4789)).unwrap();
        }
        assert!(rx.recv(&mut buf).is_err(), "a tunnel packet sent to {to} reached the backend");
        assert!(
            eventually(LONG, || its_host.verdict_count("spoofed") >= spoofed_before + 10),
            "sent to {to}: dropped at the attacker's veth and counted as spoofed"
        );
    }
    // Container to container on the tunnel's port is ordinary traffic.
    c.daemon.allow("intruder", "backend", "udp", "4789");
    let rx4789 = backend.ns.run(|| UdpSocket::bind((backend.ip, 4789))).unwrap();
    rx4789.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let socket = attacker_c.ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || {
            socket.send_to(b"app", (backend.ip, 4789)).unwrap();
            rx4789.recv(&mut buf).is_ok()
        }),
        "an allowed datagram to an endpoint's port 4789"
    );
}

/// 2. ICMP errors pass only between the ends of the connection they quote:
///    E's errors to D quoting E's own allowed flow, and a forged port
///    unreachable quoting D's connection to B, are dropped and counted; the
///    real port unreachable from B still fails D's connected socket.
#[test]
fn icmp_errors_cross_no_policy() {
    require_root();
    let host = Host::new(4);
    let daemon = Daemon::start(&host.ns, "");
    let (d, b, e, c) = (host.container(0), host.container(1), host.container(2), host.container(3));
    for (container, app) in [(d, "d"), (b, "b"), (e, "e"), (c, "c")] {
        daemon.register(container, app);
    }
    daemon.allow("d", "b", "udp", "9000-9001");
    daemon.allow("e", "c", "udp", "9000");
    udp_echo_server(&b.ns, b.ip, 9000);
    udp_echo_server(&c.ns, c.ip, 9000);
    let connected = |to: Ipv4Addr, port| {
        let socket = d.ns.run(|| UdpSocket::bind((d.ip, 0))).unwrap();
        socket.connect((to, port)).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        socket
    };
    // Control: B has nothing on 9001; its kernel's port unreachable
    // reaches D's connected socket.
    let closed = connected(b.ip, 9001);
    closed.send(b"anyone?").unwrap();
    let refused = closed.recv(&mut [0u8; 16]).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");

    // E's own allowed flow to C, tracked.
    let e_socket = e.ns.run(|| UdpSocket::bind((e.ip, 41000))).unwrap();
    e_socket.set_read_timeout(Some(LONG)).unwrap();
    e_socket.send_to(b"hi", (c.ip, 9000)).unwrap();
    e_socket.recv(&mut [0u8; 16]).expect("e reaches c");
    // 20 errors of 1 KiB from E to D quoting that flow: a channel past the policy.
    let capture = Capture::start(&d.ns, "eth0");
    let spoofed_before = daemon.verdict_count("spoofed");
    let marker = b"quoted-elsewhere";
    let mut quoted = PacketSpec::udp(e.ip.octets(), c.ip.octets(), 41000, 9000).ipv4();
    quoted.truncate(28);
    let mut error = PacketSpec::icmp(e.ip.octets(), d.ip.octets(), 3, 3, 0);
    error.payload = quoted;
    error.payload.extend(marker.iter().cycle().take(1000));
    for _ in 0..20 {
        send_ip(&e.ns, &error.ipv4());
    }
    assert_eq!(capture.count(marker, Duration::from_millis(500)), 0, "errors reached D");
    // A forged port unreachable quoting D's live connection to B.
    let open = connected(b.ip, 9000);
    open.send(b"one").unwrap();
    open.recv(&mut [0u8; 16]).expect("d reaches b");
    let port = open.local_addr().unwrap().port();
    let mut quoted = PacketSpec::udp(d.ip.octets(), b.ip.octets(), port, 9000).ipv4();
    quoted.truncate(28);
    let mut forged = PacketSpec::icmp(e.ip.octets(), d.ip.octets(), 3, 3, 0);
    forged.payload = quoted;
    send_ip(&e.ns, &forged.ipv4());
    std::thread::sleep(SHORT);
    open.send(b"two").unwrap();
    let mut buf = [0u8; 16];
    let n = open.recv(&mut buf).expect("the forged port unreachable failed D's socket");
    assert_eq!(&buf[..n], b"two");
    assert!(
        eventually(LONG, || daemon.verdict_count("spoofed") >= spoofed_before + 21),
        "each forged error counted as spoofed"
    );
}

/// 3. Neighbour discovery and MLD from a container go only to its host: a
///    solicitation with another container's address as its source and an
///    MLD report from an arbitrary address, 800 bytes each, never reach
///    another container; IPv6 between containers (which needs the link's
///    own plumbing with the host) still works.
#[test]
fn neighbour_discovery_and_mld_stay_on_the_link() {
    require_root();
    let host = Host::dual_stack(3);
    let daemon = Daemon::start(&host.ns, "");
    let (d, e, c) = (host.container(0), host.container(1), host.container(2));
    for (container, app) in [(d, "d"), (e, "e"), (c, "c")] {
        daemon.register(container, app);
    }
    daemon.allow("e", "d", "tcp", "8080");
    let (d6, e6, c6) = (d.ipv6.unwrap(), e.ipv6.unwrap(), c.ipv6.unwrap());
    tcp_echo_server(&d.ns, d6, 8080);
    assert!(tcp_echo_works(&e.ns, d6, 8080, LONG), "control: e reaches d over IPv6");

    let capture = Capture::start(&d.ns, "eth0");
    let spoofed_before = daemon.verdict_count("spoofed");
    let marker = b"link-plumbing-smuggled";
    let message = |icmp_type| {
        let mut body = icmp_header(icmp_type, 0, 0);
        body.extend(marker.iter().cycle().take(800));
        body
    };
    let stranger = "fd00:255::99".parse::<std::net::Ipv6Addr>().unwrap();
    let solicitation = ipv6_frame(c6.octets(), d6.octets(), proto::ICMPV6, &[], &message(135));
    let report = ipv6_frame(stranger.octets(), d6.octets(), proto::ICMPV6, &[], &message(131));
    for _ in 0..20 {
        send_ip(&e.ns, &solicitation[14..]);
        send_ip(&e.ns, &report[14..]);
    }
    assert_eq!(capture.count(marker, Duration::from_millis(500)), 0, "ND/MLD reached D");
    assert!(
        eventually(LONG, || daemon.verdict_count("spoofed") >= spoofed_before + 40),
        "each counted as spoofed"
    );
    // From E's own address, to D: a flow no policy allows.
    let no_policy_before = daemon.verdict_count("no_policy");
    let own = ipv6_frame(e6.octets(), d6.octets(), proto::ICMPV6, &[], &message(135));
    for _ in 0..5 {
        send_ip(&e.ns, &own[14..]);
    }
    assert_eq!(capture.count(marker, Duration::from_millis(500)), 0, "E's own ND reached D");
    assert!(eventually(LONG, || daemon.verdict_count("no_policy") >= no_policy_before + 5));
    // The plumbing itself still works: a fresh connection after the attack.
    assert!(tcp_echo_works(&e.ns, d6, 8080, LONG), "e still reaches d over IPv6");
}

/// 7. An opening to another host's endpoint that no policy allows is
///    decided, refused, counted and reported on the sender's host.
#[test]
fn a_denied_opening_to_another_host_is_recorded_where_it_is_decided() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let cells = hosts(&mut underlay, 2, 1);
    let (b, c) = (&cells[0], &cells[1]);
    let (frontend, backend) = (b.host.container(0), c.host.container(0));
    b.daemon.register(frontend, "frontend");
    c.daemon.register(backend, "backend");
    tcp_echo_server(&backend.ns, backend.ip, 8080);
    // Wait until B knows backend (its entry for the other host's endpoint).
    assert!(eventually(Duration::from_secs(5), || {
        let out = b.daemon.cli_ok(&[
            "explain",
            &frontend.ip.to_string(),
            &backend.ip.to_string(),
            "tcp",
            "8080",
        ]);
        out.contains("denied")
    }));
    let no_policy_before = b.daemon.verdict_count("no_policy");
    for _ in 0..5 {
        let refused = tcp_connect(&frontend.ns, None, backend.ip, 8080, LONG).unwrap_err();
        assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");
    }
    assert!(
        eventually(LONG, || b.daemon.verdict_count("no_policy") >= no_policy_before + 5),
        "counted on the sender's host"
    );
    let reported = b.daemon.flows().into_iter().any(|f: Value| {
        let p = &f["data"]["packet"];
        p["src_ip"] == frontend.ip.to_string()
            && p["dst_ip"] == backend.ip.to_string()
            && p["dst_port"] == 8080
            && p["action"] == "reject"
    });
    assert!(reported, "a denied event on the sender's host: {:?}", b.daemon.flows());
    let denied = b.daemon.cli_ok(&["flows", "--denied"]);
    assert!(denied.contains(&backend.ip.to_string()), "flows --denied: {denied}");
    // Control: allowed, it passes and nothing more is denied.
    b.daemon.allow("frontend", "backend", "tcp", "8080");
    assert!(eventually(Duration::from_secs(5), || tcp_echo_works(
        &frontend.ns,
        backend.ip,
        8080,
        SHORT
    )));
}

/// Found looking for the same class of hole: a packet that enters the host
/// from outside (an uplink), with a container's address forged as its
/// source, is not checked by any container's source side. It must not
/// count as that container's app: dropped where it would enter the
/// destination container and counted as spoofed, IPv4 and IPv6. Outside
/// addresses of their own are not container-to-container traffic and
/// still pass.
#[test]
fn a_packet_from_outside_the_host_cannot_claim_an_endpoint_address() {
    require_root();
    let host = Host::dual_stack(2);
    let daemon = Daemon::start(&host.ns, "");
    let (frontend, backend) = (host.container(0), host.container(1));
    daemon.register(frontend, "frontend");
    daemon.register(backend, "backend");
    daemon.allow("frontend", "backend", "udp", "7000");
    let outside = outside_by_uplink(&host, 77);
    let rx = backend.ns.run(|| UdpSocket::bind((backend.ip, 7000))).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let mut buf = [0u8; 64];
    // Control: frontend itself.
    let tx = frontend.ns.run(|| UdpSocket::bind((frontend.ip, 0))).unwrap();
    tx.send_to(b"real", (backend.ip, 7000)).unwrap();
    assert_eq!(rx.recv(&mut buf).map(|n| buf[..n].to_vec()).unwrap(), b"real");
    // Forged from outside: frontend's addresses, frontend's allowed port.
    let capture = Capture::start(&backend.ns, "eth0");
    let spoofed_before = daemon.verdict_count("spoofed");
    let marker = b"forged-from-outside";
    let mut forged = PacketSpec::udp(frontend.ip.octets(), backend.ip.octets(), 40000, 7000);
    forged.payload = marker.to_vec();
    let (f6, b6) = (frontend.ipv6.unwrap().octets(), backend.ipv6.unwrap().octets());
    let mut udp6 = policy_common::craft::l4_header(proto::UDP, 40000, 7000);
    udp6.extend_from_slice(marker);
    let forged6 = ipv6_frame(f6, b6, proto::UDP, &[], &udp6);
    for _ in 0..10 {
        send_ip(&outside, &forged.ipv4());
        send_ip(&outside, &forged6[14..]);
    }
    assert_eq!(capture.count(marker, Duration::from_millis(500)), 0, "forged sources delivered");
    assert!(rx.recv(&mut buf).is_err(), "a forged endpoint address from outside was delivered");
    assert!(
        eventually(LONG, || daemon.verdict_count("spoofed") >= spoofed_before + 20),
        "counted as spoofed where they would enter the backend"
    );
    // The outside's own address is not an app: outside the policy.
    let mut own = PacketSpec::udp([192, 168, 77, 2], backend.ip.octets(), 40000, 7000);
    own.payload = b"outside".to_vec();
    send_ip(&outside, &own.ipv4());
    assert_eq!(rx.recv(&mut buf).map(|n| buf[..n].to_vec()).unwrap(), b"outside");
}

/// A namespace outside `host`, joined to it by the uplink `uplinkN`
/// (192.168.N.0/24, fd00:N::/64), with routes to the containers' networks
/// through it.
fn outside_by_uplink(host: &Host, n: u8) -> integration_tests::netns::NetNs {
    let uplink = format!("uplink{n}");
    let outside = integration_tests::topology::outside(
        &host.ns,
        &uplink,
        &format!("192.168.{n}.1/24"),
        &[&format!("192.168.{n}.2/24")],
    );
    host.ns.ip(&["-6", "addr", "add", &format!("fd00:{n}::1/64"), "dev", &uplink, "nodad"]);
    outside.ip(&["-6", "addr", "add", &format!("fd00:{n}::2/64"), "dev", "eth0", "nodad"]);
    outside.ip(&["route", "add", "10.255.0.0/16", "via", &format!("192.168.{n}.1")]);
    outside.ip(&["-6", "route", "add", "fd00:255::/96", "via", &format!("fd00:{n}::1")]);
    outside
}

/// The IPv6 flow cache answers established packets before the full parse;
/// what it believes is the connection's key, so a packet from outside the
/// host that forges a container's address and the ports of that
/// container's live, cached connection must still be refused: dropped
/// where it would enter the destination and counted as spoofed. Control:
/// the real connection's packets pass before and after, answered by the
/// cache.
#[test]
fn a_cached_ipv6_connection_cannot_be_joined_from_outside() {
    require_root();
    // The cache is per CPU: the real packets all leave from this one.
    integration_tests::pin_this_thread_to_cpu0();
    let host = Host::dual_stack(2);
    let daemon = Daemon::start(&host.ns, "");
    let (frontend, backend) = (host.container(0), host.container(1));
    daemon.register(frontend, "frontend");
    daemon.register(backend, "backend");
    daemon.allow("frontend", "backend", "udp", "7000");
    let outside = outside_by_uplink(&host, 78);
    let (f6, b6) = (frontend.ipv6.unwrap(), backend.ipv6.unwrap());
    let rx = backend.ns.run(|| UdpSocket::bind((b6, 7000))).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let tx = frontend.ns.run(|| UdpSocket::bind((f6, 40000))).unwrap();
    let mut buf = [0u8; 64];
    let maps = policy_agent::Maps::open_pinned(&daemon.maps_dir()).unwrap();
    let fills6 = || maps.flow_cache_stats().unwrap().fills6;
    // Control: the real connection, established and then in the cache.
    for i in 0..5u8 {
        tx.send_to(&[b'r', i], (b6, 7000)).unwrap();
        assert_eq!(rx.recv(&mut buf).map(|n| buf[..n].to_vec()).unwrap(), [b'r', i]);
    }
    let filled = fills6();
    assert!(filled >= 1, "the connection went into the IPv6 flow cache");
    // Forged from outside: frontend's address and its connection's ports.
    let capture = Capture::start(&backend.ns, "eth0");
    let spoofed_before = daemon.verdict_count("spoofed");
    let established_before = daemon.verdict_count("established");
    let marker = b"forged-into-a-cached-flow";
    let mut udp6 = policy_common::craft::l4_header(proto::UDP, 40000, 7000);
    udp6.extend_from_slice(marker);
    let forged6 = ipv6_frame(f6.octets(), b6.octets(), proto::UDP, &[], &udp6);
    for _ in 0..10 {
        send_ip(&outside, &forged6[14..]);
    }
    assert_eq!(capture.count(marker, Duration::from_millis(500)), 0, "forged packet delivered");
    assert!(rx.recv(&mut buf).is_err(), "a forged packet joined a cached connection");
    assert!(
        eventually(LONG, || daemon.verdict_count("spoofed") >= spoofed_before + 10),
        "counted as spoofed where they would enter the backend"
    );
    assert_eq!(
        daemon.verdict_count("established"),
        established_before,
        "a forged packet was let through as the cached connection's"
    );
    // Control: the real connection goes on, from the cache.
    tx.send_to(b"after", (b6, 7000)).unwrap();
    assert_eq!(rx.recv(&mut buf).map(|n| buf[..n].to_vec()).unwrap(), b"after");
    assert_eq!(fills6(), filled, "answered by the cache, not filled again");
}

/// 7. Another tool on the host deletes a container's TC filters (`tc qdisc
///    del dev VETH clsact`): its packets would go unchecked, its source
///    address unverified. The agent finds this within seconds and attaches
///    again; the container's packets claiming another app's address are
///    then refused and counted, the re-attachment counted and logged, and
///    the real app's packets still pass.
#[test]
fn a_veth_whose_filters_another_tool_removed_is_attached_again() {
    require_root();
    let host = Host::new(3);
    let daemon = Daemon::start(&host.ns, "metrics_listen = \"127.0.0.1:9100\"");
    for (i, app) in ["frontend", "backend", "intruder"].into_iter().enumerate() {
        daemon.register(host.container(i), app);
    }
    daemon.allow("frontend", "backend", "udp", "9000");
    let (frontend, backend, intruder) = (host.container(0), host.container(1), host.container(2));
    let veth = intruder.host_ifname.as_str();
    let ours = |hook| host.ns.tc_bpf_filters(veth, hook).iter().any(|f| f.0 == 1);
    assert!(ours("ingress") && ours("egress"));

    let deleted =
        host.ns.command("tc").args(["qdisc", "del", "dev", veth, "clsact"]).output().unwrap();
    assert!(deleted.status.success(), "{}", String::from_utf8_lossy(&deleted.stderr));
    assert!(!ours("ingress") && !ours("egress"), "the filters went with the qdisc");
    assert!(
        eventually(Duration::from_secs(10), || ours("ingress") && ours("egress")),
        "the agent attached again: {}",
        daemon.log()
    );

    // The attack: the intruder claims the frontend's address.
    let capture = Capture::start(&backend.ns, "eth0");
    intruder.ns.ip(&["addr", "add", &format!("{}/32", frontend.ip), "dev", "eth0"]);
    let spoofed_before = daemon.verdict_count("spoofed");
    let spoofer = udp_socket(&intruder.ns, Some(frontend.ip));
    for _ in 0..5 {
        spoofer.send_to(b"CLAIMED-FRONTEND", (backend.ip, 9000)).unwrap();
    }
    assert_eq!(capture.count(b"CLAIMED-FRONTEND", SHORT), 0, "a spoofed packet got through");
    assert!(daemon.verdict_count("spoofed") >= spoofed_before + 5);
    // Control: the frontend's own packets pass.
    let real = udp_socket(&frontend.ns, None);
    for _ in 0..3 {
        real.send_to(b"REAL-FRONTEND", (backend.ip, 9000)).unwrap();
    }
    assert!(capture.count(b"REAL-FRONTEND", SHORT) >= 1, "the real frontend is cut off");

    let metrics = host
        .ns
        .command("curl")
        .args(["-s", "-f", "http://127.0.0.1:9100/metrics"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(metrics.contains("policy_veths_reattached_total 1"), "{metrics}");
    assert!(daemon.log().contains("attached again"));
}
