//! Denied connections fail fast: the agent's default `deny_action =
//! "reject"` answers a denied TCP connection with a RST and a denied UDP
//! datagram with an ICMP port unreachable, within a per-sender budget;
//! `"drop"` keeps silence. Real clients (curl, sockets) in container
//! namespaces.

use std::{
    net::{Ipv4Addr, UdpSocket},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    netns::NetNs,
    require_root,
    topology::Host,
    traffic::{LONG, SHORT, tcp_connect, tcp_echo_server, tcp_echo_works, udp_echo_server},
};

/// curl from `ns` to `http://to:port/`: its exit code, stderr and time.
fn curl(ns: &NetNs, to: Ipv4Addr, port: u16, max_time: u32) -> (i32, String, Duration) {
    let start = Instant::now();
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", &max_time.to_string(), &format!("http://{to}:{port}/")])
        .output()
        .expect("curl");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out.status.code().unwrap_or(-1), stderr, start.elapsed())
}

/// A connected UDP socket in `ns` sends to `to:port` and waits for an
/// answer: the error a client sees.
fn udp_exchange(ns: &NetNs, to: Ipv4Addr, port: u16, wait: Duration) -> std::io::Result<usize> {
    let socket = ns.run(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))).expect("bind a UDP client");
    socket.connect((to, port))?;
    socket.set_read_timeout(Some(wait))?;
    socket.send(b"query")?;
    let mut buf = [0u8; 64];
    socket.recv(&mut buf)
}

fn two_apps(extra_config: &str) -> (Host, Daemon) {
    let host = Host::new(3);
    let daemon = Daemon::start(&host.ns, extra_config);
    daemon.register(host.container(0), "frontend");
    daemon.register(host.container(1), "backend");
    (host, daemon)
}

#[test]
fn a_denied_connection_is_refused_at_once_and_the_flow_event_says_rejected() {
    require_root();
    let (host, daemon) = two_apps("");
    let (a, b) = (host.container(0), host.container(1));
    tcp_echo_server(&b.ns, b.ip, 8080);
    udp_echo_server(&b.ns, b.ip, 5353);

    let (code, stderr, took) = curl(&a.ns, b.ip, 8080, 10);
    println!("denied curl failed after {took:?}: {}", stderr.trim());
    // Exit 7: could not connect (curl 7.88 words ECONNREFUSED "Couldn't
    // connect to server"); a timeout would be 28.
    assert_eq!(code, 7, "curl could not connect: {stderr}");
    assert!(took < Duration::from_secs(5), "refused, not timed out ({took:?})");
    let err = tcp_connect(&a.ns, None, b.ip, 8080, LONG).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    let answer = udp_exchange(&a.ns, b.ip, 5353, LONG);
    assert!(
        matches!(&answer, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "a UDP client gets ECONNREFUSED: {answer:?}"
    );

    // Reported as rejected, with the policy's reason.
    let flows = daemon.flows();
    let rejected: Vec<_> =
        flows.iter().filter(|f| f["data"]["packet"]["action"] == "reject").collect();
    assert!(
        rejected.iter().any(|f| f["data"]["packet"]["protocol"] == "TCP"
            && f["data"]["packet"]["dst_port"] == 8080
            && f["data"]["packet"]["reason"] == "no_policy"
            && f["data"]["packet"]["allowed"] == false),
        "{flows:?}"
    );
    assert!(rejected.iter().any(|f| f["data"]["packet"]["protocol"] == "UDP"), "{flows:?}");

    // With a policy the same connections work, and the answers to a denial
    // left nothing behind that would let anything else through.
    assert!(!tcp_echo_works(&b.ns, a.ip, 8080, SHORT), "the other way is still denied");
    daemon.allow("frontend", "backend", "tcp", "8080");
    assert!(tcp_echo_works(&a.ns, b.ip, 8080, LONG));
    let (code, _, _) = curl(&a.ns, b.ip, 8081, 10);
    assert_eq!(code, 7, "another port: refused");
}

#[test]
fn with_deny_action_drop_a_denied_connection_times_out() {
    require_root();
    let (host, _daemon) = two_apps("deny_action = \"drop\"");
    let (a, b) = (host.container(0), host.container(1));
    tcp_echo_server(&b.ns, b.ip, 8080);
    udp_echo_server(&b.ns, b.ip, 5353);
    let (code, stderr, took) = curl(&a.ns, b.ip, 8080, 2);
    println!("denied curl with drop: exit {code} after {took:?}");
    assert_eq!(code, 28, "curl timed out: {stderr}");
    let answer = udp_exchange(&a.ns, b.ip, 5353, SHORT);
    assert!(
        matches!(&answer, Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)),
        "{answer:?}"
    );
}

/// Starts `count` non-blocking connects from `ns` to `to:port` at once and
/// counts those refused (a RST came back) within `wait`.
fn refused_connects(ns: &NetNs, to: Ipv4Addr, port: u16, count: usize, wait: Duration) -> usize {
    ns.run(move || {
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(to.octets()) },
            sin_zero: [0; 8],
        };
        let mut fds = Vec::new();
        for _ in 0..count {
            // SAFETY: plain socket calls on descriptors this closure owns and
            // closes below.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK, 0);
                assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
                libc::connect(
                    fd,
                    (&raw const addr).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                fds.push(fd);
            }
        }
        std::thread::sleep(wait);
        let refused = fds
            .iter()
            .filter(|&&fd| {
                let mut error = 0i32;
                let mut len = size_of::<i32>() as libc::socklen_t;
                // SAFETY: reading an int option of an open socket.
                unsafe {
                    libc::getsockopt(
                        fd,
                        libc::SOL_SOCKET,
                        libc::SO_ERROR,
                        (&raw mut error).cast(),
                        &mut len,
                    );
                }
                error == libc::ECONNREFUSED
            })
            .count();
        for fd in fds {
            // SAFETY: closing descriptors opened above.
            unsafe { libc::close(fd) };
        }
        refused
    })
}

#[test]
fn a_flood_gets_at_most_the_configured_rate_of_rejects_and_a_spoofed_packet_none() {
    require_root();
    let (host, daemon) = two_apps("rejects_per_second = 5");
    let (a, b, c) = (host.container(0), host.container(1), host.container(2));
    daemon.register(c, "frontend");
    tcp_echo_server(&b.ns, b.ip, 8080);
    // 200 SYNs at once (their retransmissions come a second later, past
    // the wait): at most 5 are answered.
    let refused = refused_connects(&a.ns, b.ip, 8080, 200, Duration::from_millis(700));
    println!("200 denied SYNs in one burst: {refused} refused (limit 5 per second)");
    assert!((1..=5).contains(&refused), "{refused} rejects");
    // Another sender has its own budget.
    let refused = refused_connects(&c.ns, b.ip, 8080, 3, Duration::from_millis(300));
    assert_eq!(refused, 3);

    // A packet with a forged source address (not A's) is dropped at A's
    // own veth and never answered: the connect times out.
    std::thread::sleep(Duration::from_millis(1100)); // a fresh budget
    let forged = Ipv4Addr::new(10, 255, 9, 9);
    a.ns.ip(&["addr", "add", &format!("{forged}/32"), "dev", "eth0"]);
    let err = tcp_connect(&a.ns, Some(forged), b.ip, 8080, Duration::from_millis(800)).unwrap_err();
    assert_ne!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");
    let reasons: Vec<String> = daemon
        .flows()
        .iter()
        .filter(|f| f["data"]["packet"]["src_ip"] == forged.to_string())
        .map(|f| format!("{} {}", f["data"]["packet"]["reason"], f["data"]["packet"]["action"]))
        .collect();
    assert!(reasons.iter().all(|r| r == "\"spoofed\" \"drop\""), "{reasons:?}");
    assert!(!reasons.is_empty(), "the spoofed packet was reported");
}
