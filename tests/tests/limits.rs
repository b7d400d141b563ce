//! What a client may hold of the agent: connection floods from a container
//! against DNS over TCP and 61443, slow clients, large bodies. The API keeps
//! answering and the agent's CPU and memory stay bounded.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use integration_tests::{daemon::Daemon, require_root, topology::Host};

use integration_tests::topology::GATEWAY;

/// Lets this test process hold a few thousand sockets.
fn raise_nofile() {
    let limit = libc::rlimit { rlim_cur: 16384, rlim_max: 16384 };
    // SAFETY: setrlimit with a valid struct.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
}

/// CPU seconds (user + system) the process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// A `/proc/PID/status` field in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// Round trips of `GET /v1/status` on the API socket, in ms.
fn api_latencies(daemon: &Daemon, n: usize) -> Vec<f64> {
    let client = policy_api::Client::new(&daemon.socket);
    (0..n)
        .map(|_| {
            let started = Instant::now();
            let r = client.request("GET", "/v1/status", None).expect("the API answers");
            assert!(r.is_success());
            let ms = started.elapsed().as_secs_f64() * 1e3;
            std::thread::sleep(Duration::from_millis(20));
            ms
        })
        .collect()
}

fn max(v: &[f64]) -> f64 {
    v.iter().copied().fold(0.0, f64::max)
}

/// Opens up to `n` connections from the namespace to `addr`, kept open.
fn flood(host: &Host, i: usize, addr: (Ipv4Addr, u16), n: usize) -> Vec<TcpStream> {
    host.container(i).ns.run(move || {
        (0..n)
            .filter_map(|_| {
                TcpStream::connect_timeout(&addr.into(), Duration::from_millis(200)).ok()
            })
            .collect()
    })
}

#[test]
fn connection_floods_from_a_container_leave_the_api_answering() {
    require_root();
    raise_nofile();
    let host = Host::new(1);
    let daemon = Daemon::start(&host.ns, "log_level = \"info\"");
    let c = host.container(0);
    daemon.register(c, "app");
    let pid = daemon.pid().unwrap();
    let before = api_latencies(&daemon, 10);
    for (what, addr) in [("DNS over TCP", (GATEWAY, 53)), ("61443", (c.ip, 61443))] {
        let cpu = cpu_seconds(pid);
        let started = Instant::now();
        let held = flood(&host, 0, addr, 1100);
        let during = api_latencies(&daemon, 20);
        let cpu_share = (cpu_seconds(pid) - cpu) / started.elapsed().as_secs_f64();
        // The agent closes what is past the container's share.
        let open = held
            .iter()
            .filter(|s| {
                s.set_read_timeout(Some(Duration::from_millis(5))).unwrap();
                let mut b = [0u8; 1];
                !matches!((&**s).read(&mut b), Ok(0))
            })
            .count();
        println!(
            "{what}: 1,100 connections from one container, {} connected, {open} still open; \
             API max {:.1} ms (before {:.1} ms); agent CPU {:.0} %",
            held.len(),
            max(&during),
            max(&before),
            cpu_share * 100.0
        );
        assert!(open <= 32, "{what}: {open} connections held past the per-source share");
        assert!(max(&during) < 1000.0, "{what}: the API took {:.0} ms", max(&during));
        assert!(cpu_share < 0.5, "{what}: the agent used {:.0} % CPU", cpu_share * 100.0);
        drop(held);
    }
    // Its share given back, the container is served again.
    let mut dns = flood(&host, 0, (GATEWAY, 53), 1).pop().expect("a DNS connection");
    dns.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let query = hickory_query("app.apps.internal.");
    dns.write_all(&(query.len() as u16).to_be_bytes()).unwrap();
    dns.write_all(&query).unwrap();
    let mut len = [0u8; 2];
    dns.read_exact(&mut len).expect("a DNS answer after the flood");
}

/// A DNS query for an A record, wire format.
fn hickory_query(name: &str) -> Vec<u8> {
    let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

#[test]
fn slow_clients_are_closed_and_large_bodies_stay_within_the_budget() {
    require_root();
    raise_nofile();
    let host = Host::new(1);
    let daemon = Daemon::start(
        &host.ns,
        "log_level = \"info\"\n[limits]\nheader_timeout_seconds = 2\nrequest_timeout_seconds = 3\n",
    );
    let pid = daemon.pid().unwrap();
    // 200 slowloris clients: half a request header each, then nothing.
    let slow: Vec<UnixStream> = (0..200)
        .map(|_| {
            let mut s = UnixStream::connect(&daemon.socket).unwrap();
            s.write_all(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    let during = api_latencies(&daemon, 10);
    std::thread::sleep(Duration::from_secs(3));
    let closed = slow
        .iter()
        .filter(|s| {
            s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            let mut buf = Vec::new();
            // Closed: EOF (possibly after a 408).
            (&**s).read_to_end(&mut buf).is_ok()
        })
        .count();
    println!(
        "slowloris: 200 clients, {closed} closed by the agent after 2 s; API max {:.1} ms meanwhile",
        max(&during)
    );
    assert_eq!(closed, 200);
    drop(slow);

    // 60 clients each sending an 8 MB body at once.
    let rss_before = status_kib(pid, "VmRSS");
    let big = format!("{{\"policies\": \"{}\"}}", "x".repeat(8 << 20));
    let started = Instant::now();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..60)
            .map(|_| {
                let (socket, body) = (&daemon.socket, &big);
                scope.spawn(move || {
                    let mut s = UnixStream::connect(socket).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let head = format!(
                        "POST /networking/v1/external/policies HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len()
                    );
                    if s.write_all(head.as_bytes()).is_err() || s.write_all(body.as_bytes()).is_err() {
                        return 0;
                    }
                    let mut reply = String::new();
                    let _ = s.read_to_string(&mut reply);
                    reply.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let peak = status_kib(pid, "VmHWM");
    std::thread::sleep(Duration::from_millis(500));
    let after = status_kib(pid, "VmRSS");
    let refused = statuses.iter().filter(|s| **s == 400).count();
    let busy = statuses.iter().filter(|s| **s == 503).count();
    println!(
        "60 x 8 MB bodies in {:.1} s: {refused} answered 400, {busy} 503 (budget); RSS {} MB before, peak {} MB, {} MB after",
        started.elapsed().as_secs_f64(),
        rss_before / 1024,
        peak / 1024,
        after / 1024
    );
    assert_eq!(refused + busy, 60, "every request answered: {statuses:?}");
    // 32 MiB of bodies at once, each also parsed once: far below 60 x 8 MB.
    assert!(peak < rss_before + 200 * 1024, "peak RSS {} MB", peak / 1024);
    assert!(after < rss_before + 64 * 1024, "RSS after {} MB", after / 1024);
    assert!(max(&api_latencies(&daemon, 3)) < 1000.0);
}
