//! The loading process exits and a new one takes over the pinned state
//! while traffic flows: no allowed packet lost, no denied packet passed.

use std::{
    net::UdpSocket,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::programs::{SchedClassifier, TcAttachType};
use integration_tests::{
    agent::DataplaneCli,
    pins::PinDir,
    require_root,
    topology::Host,
    traffic::{LONG, echo_once, tcp_connect, tcp_echo_server},
};

/// Program ids attached (TCX) to a host-side veth, both directions.
fn attached_programs(host: &Host, ifname: &str) -> Vec<u32> {
    let _in_host = host.ns.enter();
    [TcAttachType::Ingress, TcAttachType::Egress]
        .into_iter()
        .flat_map(|t| SchedClassifier::query_tcx(ifname, t).expect("query tcx").1)
        .map(|p| p.id())
        .collect()
}

/// Counts datagrams received on a socket until told to stop.
fn count_received(socket: UdpSocket, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    socket.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    std::thread::spawn(move || {
        let mut received = 0u64;
        let mut buf = [0u8; 64];
        while !stop.load(Ordering::Relaxed) {
            if socket.recv(&mut buf).is_ok() {
                received += 1;
            }
        }
        // Drain what is still in flight.
        while socket.recv(&mut buf).is_ok() {
            received += 1;
        }
        received
    })
}

#[test]
fn a_new_process_takes_over_without_losing_or_leaking_a_packet() {
    require_root();
    let host = Host::new(2);
    let pins = PinDir::new();
    let (frontend, backend) = (host.container(0), host.container(1));
    let cli = DataplaneCli::new(&host, &pins);
    // First process: attach both containers, allow frontend -> backend on
    // UDP 9000 and TCP 8080, exit.
    cli.attach(0, 1);
    cli.attach(1, 2);
    cli.policy("allow", 1, 2, "udp", "9000");
    cli.policy("allow", 1, 2, "tcp", "8080");
    let before = attached_programs(&host, &backend.host_ifname);
    assert_eq!(before.len(), 2, "both directions stay attached after the process exited");

    // A long-lived TCP connection and two UDP flows, one allowed, one denied.
    tcp_echo_server(&backend.ns, backend.ip, 8080);
    let mut stream = tcp_connect(&frontend.ns, None, backend.ip, 8080, LONG).expect("connect");
    assert!(echo_once(&mut stream));
    let allowed_rx = backend.ns.run(|| UdpSocket::bind((backend.ip, 9000))).unwrap();
    let denied_rx = backend.ns.run(|| UdpSocket::bind((backend.ip, 9001))).unwrap();
    let sender = frontend.ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let allowed_count = count_received(allowed_rx, stop.clone());
    let denied_count = count_received(denied_rx, stop.clone());
    let sent = Arc::new(AtomicU64::new(0));
    let sending = {
        let (stop, sent, to) = (stop.clone(), sent.clone(), backend.ip);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                sender.send_to(b"allowed", (to, 9000)).expect("send");
                sender.send_to(b"denied", (to, 9001)).expect("send");
                sent.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_micros(500));
            }
        })
    };

    // Two takeovers by new processes while packets flow.
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(300));
        cli.run(&["load"]);
    }
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    sending.join().unwrap();
    let (allowed, denied) = (allowed_count.join().unwrap(), denied_count.join().unwrap());
    let sent = sent.load(Ordering::Relaxed);

    let after = attached_programs(&host, &backend.host_ifname);
    assert_eq!(after.len(), 2);
    assert!(
        before.iter().all(|id| !after.contains(id)),
        "the new process's programs run now: {before:?} -> {after:?}"
    );
    assert!(sent > 500, "only {sent} packets sent");
    assert_eq!(allowed, sent, "allowed packets lost across the takeover");
    assert_eq!(denied, 0, "denied packets passed across the takeover");
    assert!(echo_once(&mut stream), "the TCP connection survived the takeover");
    println!(
        "sent {sent} allowed + {sent} denied datagrams across two takeovers: {allowed} allowed received, {denied} denied received"
    );
}
