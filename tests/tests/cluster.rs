//! Cluster mode on a real etcd: one underlay, an etcd process started by
//! the test, hosts each running their own agent. A write through any
//! host's API is enforced on every host; tags agree; an etcd outage keeps
//! enforcement, refuses writes with 503, and is caught up after.

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use integration_tests::{
    cluster::{
        ClusterHost, Etcd, Underlay, body, dual_stack_hosts, frontend_and_backend, hosts,
        hosts_with, policy, reaches,
    },
    daemon::Daemon,
    eventually,
    netns::NetNs,
    require_root,
    topology::GATEWAY,
    traffic::{
        LONG, SHORT, curl_https, echo_once, http_server, tcp_connect, tcp_echo_server,
        tcp_echo_works,
    },
};
use serde_json::{Value, json};

const POLICIES: &str = "/networking/v1/external/policies";
const TAGS: &str = "/networking/v1/external/tags";

fn get(daemon: &Daemon, path: &str) -> Value {
    daemon.get(path)
}

#[test]
fn a_policy_written_on_one_host_is_enforced_on_every_host() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let cells = hosts(&mut underlay, 2, 2);
    let (a, b) = (&cells[0], &cells[1]);
    let (_, backend_a) = frontend_and_backend(a);
    let (_, backend_b) = frontend_and_backend(b);
    assert!(!reaches(a, backend_a, 8080) && !reaches(b, backend_b, 8080), "default deny");

    // Written through A's API, enforced on B.
    let post = body(&[policy("frontend", "backend", 8080)]);
    assert_eq!(a.daemon.curl("POST", POLICIES, Some(&post)), (200, json!({})));
    assert!(reaches(a, backend_a, 8080), "enforced on the host that took the write");
    assert!(eventually(LONG, || reaches(b, backend_b, 8080)), "enforced on the other host");
    assert!(!reaches(b, backend_b, 9000), "other ports stay denied");
    assert!(!tcp_echo_works(&b.host.container(1).ns, b.host.container(0).ip, 8080, SHORT));
    assert_eq!(get(&b.daemon, POLICIES)["total_policies"], 1);
    assert_eq!(get(&a.daemon, TAGS), get(&b.daemon, TAGS), "one tag per app everywhere");

    // Every host's DNS answers with the instances of every host.
    a.daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    let client = &b.host.container(0).ns;
    let want = [backend_a, backend_b];
    assert!(
        eventually(LONG, || {
            let mut got = dig(client, "backend.apps.internal");
            got.sort();
            got == want
        }),
        "B's DNS lists the backends of A and B"
    );
    let endpoints = get(&b.daemon, "/v1/endpoints");
    let hosts_of: Vec<&str> = endpoints["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["host"].as_str())
        .collect();
    assert_eq!(hosts_of.iter().filter(|h| **h == "cell-0").count(), 2, "{endpoints}");

    // Removed through B's API: an open connection on A is cut.
    let mut open = tcp_connect(&a.host.container(0).ns, None, backend_a, 8080, LONG).unwrap();
    assert!(echo_once(&mut open));
    assert_eq!(b.daemon.curl("POST", &format!("{POLICIES}/delete"), Some(&post)), (200, json!({})));
    open.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(eventually(LONG, || !echo_once(&mut open)), "the open connection on A is cut");
    assert!(!reaches(a, backend_a, 8080));

    // Every host is registered and has applied every change.
    assert!(eventually(Duration::from_secs(5), || {
        let status = get(&a.daemon, "/v1/cluster");
        let hosts = status["hosts"].as_array().cloned().unwrap_or_default();
        hosts.len() == 2 && hosts.iter().all(|h| h["lag"] == 0)
    }));
    let text = a.daemon.cli_ok(&["cluster", "status"]);
    assert!(
        text.contains("cell-0") && text.contains("cell-1") && text.contains("172.31.0.2"),
        "{text}"
    );
}

fn dig(ns: &NetNs, name: &str) -> Vec<Ipv4Addr> {
    let out = ns
        .command("dig")
        .args([&format!("@{GATEWAY}"), "+short", "+time=1", "+tries=1", name])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[test]
fn hosts_adding_the_same_new_apps_at_once_agree_on_their_tags() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let cells = hosts(&mut underlay, 2, 0);
    // Both hosts write batches naming the same new apps, concurrently.
    std::thread::scope(|scope| {
        for (i, cell) in cells.iter().enumerate() {
            scope.spawn(move || {
                for round in 0..10u16 {
                    let batch: Vec<Value> = (0..5)
                        .map(|k| {
                            policy(
                                &format!("app-{round}-{k}"),
                                &format!("app-{round}-x"),
                                1000 + i as u16,
                            )
                        })
                        .collect();
                    let (status, reply) = cell.daemon.curl("POST", POLICIES, Some(&body(&batch)));
                    assert_eq!(status, 200, "{reply}");
                }
            });
        }
    });
    let (tags_a, tags_b) = (get(&cells[0].daemon, TAGS), get(&cells[1].daemon, TAGS));
    assert!(eventually(LONG, || get(&cells[1].daemon, TAGS) == get(&cells[0].daemon, TAGS)));
    let tags = get(&cells[0].daemon, TAGS)["tags"].as_array().unwrap().clone();
    assert_eq!(tags.len(), 60, "every app once: {tags_a} / {tags_b}");
    let mut numbers: Vec<&str> = tags.iter().map(|t| t["tag"].as_str().unwrap()).collect();
    numbers.sort();
    numbers.dedup();
    assert_eq!(numbers.len(), 60, "no tag given twice");
    assert_eq!(get(&cells[0].daemon, POLICIES)["total_policies"], 100);
    assert!(eventually(LONG, || get(&cells[1].daemon, POLICIES)["total_policies"] == 100));
}

#[test]
fn an_etcd_outage_keeps_enforcement_refuses_writes_and_is_caught_up() {
    require_root();
    let mut underlay = Underlay::new();
    let mut etcd = Etcd::start(&underlay);
    let cells = hosts(&mut underlay, 2, 2);
    let (a, b) = (&cells[0], &cells[1]);
    let (_, backend_a) = frontend_and_backend(a);
    let (_, backend_b) = frontend_and_backend(b);
    let allow = body(&[policy("frontend", "backend", 8080)]);
    assert_eq!(a.daemon.curl("POST", POLICIES, Some(&allow)).0, 200);
    assert!(eventually(LONG, || reaches(b, backend_b, 8080)));

    etcd.kill();
    // Enforcement stays exactly as it was.
    assert!(reaches(a, backend_a, 8080) && reaches(b, backend_b, 8080));
    assert!(!reaches(a, backend_a, 9000) && !reaches(b, backend_b, 9000));
    // Writes are refused naming etcd; nothing of them is applied.
    let more = body(&[policy("frontend", "backend", 9000)]);
    let (status, reply) = b.daemon.curl("POST", POLICIES, Some(&more));
    assert_eq!(status, 503, "{reply}");
    assert!(reply["error"].as_str().unwrap().contains("etcd"), "{reply}");
    assert!(!reaches(b, backend_b, 9000));
    // Reads are served from the last known state, saying how old it is.
    let age = b.daemon.header(POLICIES, "x-state-age-seconds");
    assert!(age.as_ref().is_some_and(|a| a.parse::<f64>().is_ok()), "{age:?}");
    assert_eq!(get(&b.daemon, POLICIES)["total_policies"], 1);

    etcd.spawn();
    // The next write goes through once etcd answers, and reaches every host.
    assert!(
        eventually(Duration::from_secs(10), || b.daemon.curl("POST", POLICIES, Some(&more)).0
            == 200),
        "writes work again without a restart"
    );
    assert!(eventually(LONG, || reaches(a, backend_a, 9000)), "enforced on the other host");
    assert!(reaches(b, backend_b, 9000));
}

#[test]
fn a_restarted_agent_catches_up_from_etcd() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let mut cells = hosts(&mut underlay, 2, 2);
    let (_, backend_b) = frontend_and_backend(&cells[1]);
    frontend_and_backend(&cells[0]);
    cells[1].daemon.kill9();
    let allow = body(&[policy("frontend", "backend", 8080)]);
    assert_eq!(cells[0].daemon.curl("POST", POLICIES, Some(&allow)).0, 200);
    cells[1].daemon.spawn();
    assert!(
        eventually(LONG, || reaches(&cells[1], backend_b, 8080)),
        "the write made while it was down"
    );
    assert_eq!(get(&cells[1].daemon, TAGS), get(&cells[0].daemon, TAGS));
}

#[test]
fn traffic_between_hosts_is_policed_by_the_tag_in_the_tunnel_header() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let cells = hosts(&mut underlay, 3, 2);
    let (a, b, c) = (&cells[0], &cells[1], &cells[2]);
    // Each host leased the /24 its containers use (10.255.I.0).
    assert!(eventually(Duration::from_secs(5), || {
        let status = get(&a.daemon, "/v1/cluster");
        let subnets: Vec<Value> = status["hosts"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|h| h["subnet"].clone())
            .collect();
        subnets == [json!("10.255.0.0"), json!("10.255.1.0"), json!("10.255.2.0")]
    }));
    // B routes to C's containers: a connection is refused by policy, not
    // by a route B's agent has yet to install (it follows the cluster on
    // its own, after A listed C).
    assert!(
        eventually(Duration::from_secs(5), || {
            let out = b.host.ns.command("ip").args(["route", "show", "10.255.2.0/24"]).output();
            out.is_ok_and(|o| !o.stdout.is_empty())
        }),
        "B has no route to C's containers"
    );
    let (frontend, other) = (b.host.container(0), b.host.container(1));
    let backend = c.host.container(0);
    b.daemon.register(frontend, "frontend");
    b.daemon.register(other, "other");
    c.daemon.register(backend, "backend");
    tcp_echo_server(&backend.ns, backend.ip, 8080);
    tcp_echo_server(&backend.ns, backend.ip, 9000);
    tcp_echo_server(&frontend.ns, frontend.ip, 8080);
    assert!(!tcp_echo_works(&frontend.ns, backend.ip, 8080, SHORT), "default deny across hosts");
    // Refused at once, by the sender's host, not left to time out.
    let refused = tcp_connect(&frontend.ns, None, backend.ip, 8080, LONG).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");

    // Written on A: frontend on B may reach backend on C, on 8080 only.
    let post = body(&[policy("frontend", "backend", 8080)]);
    assert_eq!(a.daemon.curl("POST", POLICIES, Some(&post)), (200, json!({})));
    assert!(
        eventually(Duration::from_secs(5), || tcp_echo_works(
            &frontend.ns,
            backend.ip,
            8080,
            SHORT
        )),
        "frontend on B reaches backend on C:\n{}",
        c.daemon.cli_ok(&["status"])
    );
    assert!(!tcp_echo_works(&frontend.ns, backend.ip, 9000, SHORT), "other ports");
    assert!(!tcp_echo_works(&other.ns, backend.ip, 8080, SHORT), "other apps");
    assert!(!tcp_echo_works(&backend.ns, frontend.ip, 8080, SHORT), "the reverse direction");
    // A mark a container sets claims nothing: the source side overwrites it.
    let frontend_tag = get(&a.daemon, TAGS)["tags"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == "frontend")
        .map(|t| u32::from_str_radix(t["tag"].as_str().unwrap(), 16).unwrap())
        .unwrap();
    assert!(!marked_connect_works(&other.ns, backend.ip, 8080, frontend_tag), "a forged mark");

    // Removed: the open cross-host connection is cut at its next packet.
    let mut open = tcp_connect(&frontend.ns, None, backend.ip, 8080, LONG).unwrap();
    assert!(echo_once(&mut open));
    assert_eq!(a.daemon.curl("POST", &format!("{POLICIES}/delete"), Some(&post)).0, 200);
    open.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(eventually(LONG, || !echo_once(&mut open)), "the open connection is cut");
    let explained = c.daemon.cli_ok(&[
        "explain",
        &frontend.ip.to_string(),
        &backend.ip.to_string(),
        "tcp",
        "8080",
    ]);
    assert!(explained.contains("denied"), "{explained}");
}

/// Whether a TCP echo from `ns` to `to:port` works on a socket marked
/// `mark` (SO_MARK) by the container itself.
fn marked_connect_works(ns: &NetNs, to: Ipv4Addr, port: u16, mark: u32) -> bool {
    use std::{
        io::{Read as _, Write as _},
        os::fd::AsRawFd as _,
    };
    ns.run(move || {
        // SAFETY: a fresh socket, configured before connecting.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
        assert!(fd >= 0);
        let value = mark as libc::c_int;
        // SAFETY: setsockopt with a c_int option value.
        let set = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_MARK,
                (&raw const value).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "SO_MARK: {}", std::io::Error::last_os_error());
        // SAFETY: the socket is ours; the stream owns it from here.
        let socket = unsafe { <std::net::TcpStream as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.octets()) },
            sin_zero: [0; 8],
        };
        socket.set_nonblocking(true).unwrap();
        // SAFETY: a valid sockaddr_in for this socket.
        unsafe {
            libc::connect(
                socket.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
            )
        };
        let started = Instant::now();
        let mut socket = socket;
        loop {
            if socket.write_all(b"ping").is_ok() {
                break;
            }
            if started.elapsed() > SHORT {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        socket.set_nonblocking(false).unwrap();
        socket.set_read_timeout(Some(SHORT)).unwrap();
        let mut buf = [0u8; 4];
        socket.read_exact(&mut buf).is_ok()
    })
}

#[test]
fn platform_tls_works_across_hosts_each_with_its_own_ca() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let cells = hosts(&mut underlay, 2, 1);
    let (a, b) = (&cells[0], &cells[1]);
    let read =
        |h: &ClusterHost, file: &str| std::fs::read(h.daemon.state_dir().join(file)).unwrap();
    assert_ne!(read(a, "host-ca.pem"), read(b, "host-ca.pem"), "a CA per host");
    // The trust bundle: every host's CA, the same on every host.
    let one_bundle = || {
        let bundle = read(a, "ca.pem");
        bundle == read(b, "ca.pem")
            && bundle.windows(17).filter(|w| w == b"BEGIN CERTIFICATE").count() == 2
    };
    assert!(eventually(Duration::from_secs(5), one_bundle), "one bundle of both hosts' CAs");
    let (frontend, backend) = (a.host.container(0), b.host.container(0));
    a.daemon.register(frontend, "frontend");
    b.daemon.register(backend, "backend");
    http_server(&backend.ns, backend.ip, 8080, "hello from backend on another host");
    a.daemon.allow("frontend", "backend", "tcp", "8080");
    a.daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    frontend.ns.use_nameserver(GATEWAY);
    let bundle = a.daemon.state_dir().join("ca.pem");
    let url = "https://backend.apps.internal:61443/";
    let mut last = String::new();
    assert!(
        eventually(Duration::from_secs(5), || {
            last = curl_https(&frontend.ns, bundle.to_str().unwrap(), url, &[]).1;
            last.contains("hello from backend")
        }),
        "curl from A to backend.apps.internal:61443 on B, verified with A's bundle: {last}"
    );
}

#[test]
fn a_host_gone_past_its_grace_time_leaves_the_cluster() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let mut cells = hosts_with(&mut underlay, 2, 1, "host_grace_seconds = 2\n");
    cells[0].daemon.register(cells[0].host.container(0), "backend");
    cells[1].daemon.register(cells[1].host.container(0), "backend");
    cells[0].daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    let (here, there) = (cells[0].host.container(0).ip, cells[1].host.container(0).ip);
    let names =
        |cells: &[ClusterHost]| dig(&cells[0].host.container(0).ns, "backend.apps.internal");
    assert!(eventually(LONG, || names(&cells).len() == 2));
    cells[1].daemon.kill9();
    // Lease (3 s) and grace (2 s) pass, then the next renewal (1 s) acts.
    assert!(
        eventually(Duration::from_secs(15), || names(&cells) == [here]),
        "the gone host's instance left DNS"
    );
    let endpoints = get(&cells[0].daemon, "/v1/endpoints");
    assert!(!endpoints.to_string().contains(&there.to_string()), "{endpoints}");
    let status = get(&cells[0].daemon, "/v1/cluster");
    assert_eq!(status["hosts"].as_array().unwrap().len(), 1, "{status}");
    // Gone for good, it is no longer trusted: tunnel packets from its
    // underlay address (one tagged as an app the other host knows) are
    // refused as spoofed. (While its record had expired but its grace
    // ran, its traffic still passed: agents_killed_under_cross_host_...)
    let frame = forged_tunnel_frame(&cells[0], "backend", there, here, 7000);
    // (Its routes and trust go at the renewal after its subnet is freed.)
    let before = verdict_count(&cells[0].daemon, "spoofed");
    let forger = cells[1].host.ns.run(|| std::net::UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    assert!(
        eventually(LONG, || {
            forger.send_to(&frame, (cells[0].underlay, 4789)).unwrap();
            verdict_count(&cells[0].daemon, "spoofed") > before
        }),
        "a gone host's tunnel packets are dropped as spoofed:\n{}",
        cells[0].daemon.log()
    );
    // Back again: it takes a subnet and registers again.
    cells[1].daemon.spawn();
    assert!(eventually(Duration::from_secs(5), || {
        get(&cells[0].daemon, "/v1/cluster")["hosts"].as_array().is_some_and(|h| h.len() == 2)
    }));
}

#[test]
fn tunnel_packets_from_outside_the_cluster_grant_nothing() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let cells = hosts(&mut underlay, 2, 1);
    let (b, c) = (&cells[0], &cells[1]);
    let (frontend, backend) = (b.host.container(0), c.host.container(0));
    b.daemon.register(frontend, "frontend");
    c.daemon.register(backend, "backend");
    a_policy_between(b, "frontend", "backend", "udp", 7000);
    let rx = backend.ns.run(|| std::net::UdpSocket::bind((backend.ip, 7000))).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    // The real thing, from frontend's own host, arrives.
    let tx = frontend.ns.run(|| std::net::UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        eventually(Duration::from_secs(5), || {
            tx.send_to(b"real", (backend.ip, 7000)).unwrap();
            rx.recv(&mut buf).is_ok()
        }),
        "frontend on B reaches backend on C"
    );
    while rx.recv(&mut buf).is_ok() {}

    // An intruder on the underlay, not a host of the cluster, forges the
    // same datagram in a tunnel header naming frontend's app.
    let intruder = integration_tests::topology::Host::with_subnet(0, 99);
    underlay.join(&intruder);
    let frame = forged_tunnel_frame(c, "frontend", frontend.ip, backend.ip, 7000);
    let spoofed_before = verdict_count(&c.daemon, "spoofed");
    let forger = intruder.ns.run(|| std::net::UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    for _ in 0..5 {
        forger.send_to(&frame, (c.underlay, 4789)).unwrap();
    }
    assert!(rx.recv(&mut buf).is_err(), "a forged tunnel packet reached the backend");
    assert!(
        eventually(LONG, || verdict_count(&c.daemon, "spoofed") >= spoofed_before + 5),
        "dropped at C's underlay interface as spoofed"
    );
}

/// A VXLAN-GBP frame to `to`'s VTEP carrying a UDP datagram `src` →
/// `dst:port` tagged as `app` (the tag `to` knows it by).
fn forged_tunnel_frame(
    to: &ClusterHost,
    app: &str,
    src: std::net::Ipv4Addr,
    dst: std::net::Ipv4Addr,
    port: u16,
) -> Vec<u8> {
    let status = get(&to.daemon, "/v1/cluster");
    let hosts = status["hosts"].as_array().unwrap();
    let vtep = hosts.iter().find(|h| h["host"] == to.name).unwrap()["vtep_mac"].as_str().unwrap();
    let tags = get(&to.daemon, TAGS);
    let tag = tags["tags"].as_array().unwrap().iter().find(|t| t["id"] == app).unwrap()["tag"]
        .as_str()
        .map(|t| u16::from_str_radix(t, 16).unwrap())
        .unwrap();
    let inner = policy_common::craft::PacketSpec::udp(src.octets(), dst.octets(), 40000, port);
    integration_tests::cluster::vxlan_gbp(tag, vtep, &inner.ipv4())
}

fn a_policy_between(h: &ClusterHost, source: &str, destination: &str, protocol: &str, port: u16) {
    h.daemon.allow(source, destination, protocol, &port.to_string());
}

fn verdict_count(daemon: &Daemon, reason: &str) -> u64 {
    daemon.verdict_count(reason)
}

#[test]
fn agents_killed_under_cross_host_traffic_lose_nothing() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let mut cells = hosts(&mut underlay, 2, 1);
    let (frontend_ip, backend_ip) = (cells[0].host.container(0).ip, cells[1].host.container(0).ip);
    cells[0].daemon.register(cells[0].host.container(0), "frontend");
    cells[1].daemon.register(cells[1].host.container(0), "backend");
    cells[0].daemon.allow("frontend", "backend", "udp", "9000");
    {
        let (from, to) = (&cells[0].host.container(0).ns, &cells[1].host.container(0).ns);
        let rx = to.run(|| std::net::UdpSocket::bind((backend_ip, 9000))).unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
        let tx = from.run(|| std::net::UdpSocket::bind((frontend_ip, 0))).unwrap();
        let mut buf = [0u8; 16];
        assert!(eventually(Duration::from_secs(5), || {
            tx.send_to(b"probe", (backend_ip, 9000)).unwrap();
            rx.recv(&mut buf).is_ok()
        }));
    }
    let flows = integration_tests::traffic::SteadyFlows::start(
        &cells[0].host.container(0).ns,
        &cells[1].host.container(0).ns,
        backend_ip,
        9000,
        9001,
    );
    std::thread::sleep(Duration::from_millis(300));
    // The destination's agent, then the source's, killed and restarted; a
    // write made while one is down reaches it when it is back. The first
    // stays down past its lease (3 s) and a renewal (1 s): its record
    // expires, but within host_grace_seconds its routes and trust stay
    // (its programs still police its containers).
    cells[1].daemon.kill9();
    cells[0].daemon.allow("frontend", "backend", "tcp", "443");
    std::thread::sleep(Duration::from_secs(5));
    assert_eq!(
        get(&cells[0].daemon, "/v1/cluster")["hosts"].as_array().map(Vec::len),
        Some(1),
        "the killed host's record expired"
    );
    cells[1].daemon.spawn();
    cells[0].daemon.kill9();
    std::thread::sleep(Duration::from_millis(300));
    cells[0].daemon.spawn();
    std::thread::sleep(Duration::from_millis(300));
    let counts = flows.finish();
    assert!(counts.sent > 500, "{counts:?}");
    let verdicts = |c: &ClusterHost| c.daemon.get("/v1/status")["verdicts"].to_string();
    assert_eq!(
        counts.allowed_received,
        counts.sent,
        "allowed packets lost: {counts:?}\nverdicts on the source's host: {}\non the destination's: {}\n{}\n{}",
        verdicts(&cells[0]),
        verdicts(&cells[1]),
        cells[0].daemon.log(),
        cells[1].daemon.log()
    );
    assert_eq!(counts.denied_received, 0, "denied packets passed: {counts:?}");
    assert!(eventually(LONG, || get(&cells[1].daemon, POLICIES)["total_policies"] == 2));
}

#[test]
fn an_agent_restarted_while_etcd_is_down_serves_its_last_known_state() {
    require_root();
    let mut underlay = Underlay::new();
    let mut etcd = Etcd::start(&underlay);
    let mut cells = hosts(&mut underlay, 2, 2);
    let (_, backend) = frontend_and_backend(&cells[1]);
    cells[0].daemon.allow("frontend", "backend", "tcp", "8080");
    cells[0].daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    assert!(eventually(LONG, || reaches(&cells[1], backend, 8080)));
    assert!(eventually(LONG, || dig(&cells[1].host.container(0).ns, "backend.apps.internal")
        == [backend]));

    etcd.kill();
    cells[1].daemon.kill9();
    cells[1].daemon.spawn();
    // Up without etcd: the same verdicts, DNS and reads from its last state.
    assert!(reaches(&cells[1], backend, 8080) && !reaches(&cells[1], backend, 9000));
    assert_eq!(dig(&cells[1].host.container(0).ns, "backend.apps.internal"), [backend]);
    assert_eq!(get(&cells[1].daemon, POLICIES)["total_policies"], 1);
    let more = body(&[policy("frontend", "backend", 9000)]);
    assert_eq!(cells[1].daemon.curl("POST", POLICIES, Some(&more)).0, 503);

    etcd.spawn();
    assert!(eventually(Duration::from_secs(10), || cells[0]
        .daemon
        .curl("POST", POLICIES, Some(&more))
        .0
        == 200));
    assert!(eventually(Duration::from_secs(5), || reaches(&cells[1], backend, 9000)), "caught up");
    assert!(reaches(&cells[1], backend, 8080));
}

#[test]
fn ipv6_between_hosts_is_routed_and_policed_by_the_same_policies() {
    require_root();
    let mut underlay = Underlay::new();
    let _etcd = Etcd::start(&underlay);
    let cells = dual_stack_hosts(&mut underlay, 2, 2);
    let (a, b) = (&cells[0], &cells[1]);
    let (frontend, other) = (a.host.container(0), a.host.container(1));
    let backend = b.host.container(0);
    a.daemon.register(frontend, "frontend");
    a.daemon.register(other, "other");
    b.daemon.register(backend, "backend");
    let backend6 = IpAddr::V6(backend.ipv6.unwrap());
    tcp_echo_server(&backend.ns, backend6, 8080);
    tcp_echo_server(&backend.ns, backend.ip, 8080);

    // One policy, written on A, allows both families across hosts (the
    // IPv6 /120 of each host's /24 routed through the tunnel).
    a_policy_between(a, "frontend", "backend", "tcp", 8080);
    assert!(
        eventually(Duration::from_secs(5), || tcp_echo_works(&frontend.ns, backend6, 8080, SHORT)),
        "frontend on A reaches backend on B over IPv6:\n{}",
        b.daemon.cli_ok(&["status"])
    );
    assert!(tcp_echo_works(&frontend.ns, backend.ip, 8080, SHORT), "and over IPv4");
    // Another app is denied, refused at once by the sender's host (a RST
    // back into the container; B would drop it unanswered).
    assert!(!tcp_echo_works(&other.ns, backend6, 8080, SHORT), "other apps, over IPv6");
    let refused = tcp_connect(&other.ns, None, backend6, 8080, LONG).unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::ConnectionRefused, "{refused}");

    // Removed: the open IPv6 connection across hosts is cut.
    let mut open = tcp_connect(&frontend.ns, None, backend6, 8080, LONG).unwrap();
    assert!(echo_once(&mut open));
    a.daemon.disallow("frontend", "backend", "tcp", "8080");
    open.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    assert!(eventually(LONG, || !echo_once(&mut open)), "the open connection is cut");
}
