//! What the dataplane decided, seen through the agent: flow events, explain,
//! per-policy counters, Prometheus metrics. Real traffic, real clients.

use std::{
    io::{BufRead as _, BufReader},
    net::UdpSocket,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    require_root,
    topology::Host,
    traffic::{LONG, SHORT, echo_once, tcp_connect, tcp_echo_server, tcp_echo_works},
};
use serde_json::Value;

fn setup(extra: &str) -> (Host, Daemon) {
    require_root();
    let host = Host::new(3);
    let daemon = Daemon::start(&host.ns, extra);
    for (i, app) in ["frontend", "backend", "worker"].into_iter().enumerate() {
        let c = host.container(i);
        daemon.register(c, app);
    }
    (host, daemon)
}

/// Flow events (JSON) matching `filter`, once `count` of them are there
/// (waits up to 3 s: the reader polls every 200 ms).
fn wait_for_flows(daemon: &Daemon, args: &[&str], count: usize) -> Vec<Value> {
    let started = Instant::now();
    loop {
        let mut all = vec!["flows", "--json"];
        all.extend_from_slice(args);
        let events: Vec<Value> = daemon
            .cli_ok(&all)
            .lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect();
        if events.len() >= count || started.elapsed() > Duration::from_secs(3) {
            return events;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_denied_attempt_and_an_allowed_connection_produce_exactly_their_events() {
    let (host, daemon) = setup("");
    let (a, b) = (host.container(0), host.container(1));
    daemon.allow("frontend", "backend", "tcp", "8080");
    // A follower, started before the traffic.
    let mut follower = Command::new(integration_tests::agent::agent_bin())
        .args(["flows", "--follow", "--json", "--app", "backend"])
        .env("POLICY_AGENT_SOCKET", &daemon.socket)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));

    // One denied datagram.
    let socket = a.ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    socket.send_to(b"x", (b.ip, 9001)).unwrap();
    let denied = wait_for_flows(&daemon, &["--denied"], 1);
    assert_eq!(denied.len(), 1, "{denied:?}");
    let p = &denied[0]["data"]["packet"];
    assert_eq!(p["direction"], "ingress");
    assert_eq!(p["allowed"], false);
    assert_eq!(p["reason"], "no_policy");
    assert_eq!(p["protocol"], "UDP");
    assert_eq!(
        (p["src_ip"].as_str().unwrap(), p["dst_ip"].as_str().unwrap()),
        (a.ip.to_string().as_str(), b.ip.to_string().as_str())
    );
    assert_eq!(
        (p["src_port"].as_u64().unwrap(), p["dst_port"].as_u64().unwrap()),
        (u64::from(socket.local_addr().unwrap().port()), 9001)
    );
    assert_eq!(p["mark"], "0x1");
    assert_eq!(denied[0]["data"]["source"]["app_guid"], "frontend");
    assert_eq!(denied[0]["data"]["destination"]["app_guid"], "backend");
    assert!(denied[0]["timestamp"].as_str().unwrap().ends_with('Z'));

    // One allowed connection with many packets: one event.
    tcp_echo_server(&b.ns, b.ip, 8080);
    let mut stream = tcp_connect(&a.ns, None, b.ip, 8080, LONG).unwrap();
    for _ in 0..5 {
        assert!(echo_once(&mut stream));
    }
    let all = wait_for_flows(&daemon, &[], 2);
    assert_eq!(all.len(), 2, "{all:?}");
    let allowed = &all[1];
    assert_eq!(allowed["data"]["packet"]["allowed"], true);
    assert_eq!(allowed["data"]["packet"]["reason"], "new_allowed");
    assert_eq!(allowed["data"]["packet"]["dst_port"], 8080);
    assert!(allowed["data"]["policy_id"].as_u64().is_some());

    // The follower saw both, and the log file has them.
    let mut lines = BufReader::new(follower.stdout.take().unwrap()).lines();
    let first: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    let second: Value = serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap();
    assert_eq!(
        (first["data"]["packet"]["allowed"].clone(), second["data"]["packet"]["allowed"].clone()),
        (Value::Bool(false), Value::Bool(true))
    );
    let _ = follower.kill();
    let _ = follower.wait();
    let log = std::fs::read_to_string(daemon.dir.join("flows.log")).unwrap();
    assert_eq!(log.lines().count(), 2, "{log}");

    // Per-policy counters: the connection's packets both ways.
    let stats: Value =
        serde_json::from_str(&daemon.cli_ok(&["network-policies", "--stats", "--json"])).unwrap();
    let packets = stats["policies"][0]["packets"].as_u64().unwrap();
    assert!(packets >= 10, "{stats}");
    assert!(stats["policies"][0]["bytes"].as_u64().unwrap() > packets * 40);
}

#[test]
fn a_denied_flood_is_rate_limited_counted_and_the_agent_keeps_answering() {
    let (host, daemon) = setup("[flow_events]\ndenied_per_second = 50");
    let (a, b) = (host.container(0), host.container(1));
    let socket = a.ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        for _ in 0..100 {
            socket.send_to(b"flood", (b.ip, 9999)).unwrap();
            sent += 1;
        }
        // The agent answers while the flood goes on.
        daemon.cli_ok(&["status", "--json"]);
    }
    std::thread::sleep(Duration::from_millis(500));
    let events = wait_for_flows(&daemon, &["--denied"], 1);
    assert!(!events.is_empty());
    // At most 50 per second for this destination (the flood spans at most
    // three one-second windows).
    assert!(events.len() <= 150, "{} events for {sent} denied packets", events.len());
    let metrics = scrape_status_counts(&daemon);
    assert!(metrics.0 >= sent - 150, "rate-limited count {} for {sent} sent", metrics.0);
    assert_eq!(metrics.1, 0, "no event lost");
    println!("{sent} denied packets: {} events, {} rate-limited", events.len(), metrics.0);
}

/// (rate_limited, lost) flow events from the pinned maps.
fn scrape_status_counts(daemon: &Daemon) -> (u64, u64) {
    let tables = policy_agent::Maps::open_pinned(&daemon.maps_dir()).unwrap();
    let stats = tables.event_stats().unwrap();
    (stats.rate_limited, stats.lost)
}

#[test]
fn explain_agrees_with_real_traffic() {
    let (host, daemon) = setup("");
    let (a, b, w) = (host.container(0), host.container(1), host.container(2));
    daemon.allow("frontend", "backend", "tcp", "8080-8090");
    tcp_echo_server(&b.ns, b.ip, 8085);
    tcp_echo_server(&b.ns, b.ip, 9000);
    let explain = |args: &[&str]| -> Value {
        let mut all = vec!["explain"];
        all.extend_from_slice(args);
        all.push("--json");
        serde_json::from_str(&daemon.cli_ok(&all)).unwrap()
    };
    let (ai, bi, wi) = (a.ip.to_string(), b.ip.to_string(), w.ip.to_string());

    let allowed = explain(&[&ai, &bi, "tcp", "8085"]);
    assert_eq!(
        (allowed["verdict"].as_str(), allowed["reason"].as_str()),
        (Some("allowed"), Some("policy"))
    );
    assert!(tcp_echo_works(&a.ns, b.ip, 8085, LONG));

    let wrong_port = explain(&[&ai, &bi, "tcp", "9000"]);
    assert_eq!(
        (wrong_port["verdict"].as_str(), wrong_port["reason"].as_str()),
        (Some("denied"), Some("wrong_port"))
    );
    assert_eq!(wrong_port["message"], "denied: backend allows frontend on tcp 8080-8090, not 9000");
    assert!(!tcp_echo_works(&a.ns, b.ip, 9000, SHORT));

    let no_policy = explain(&[&wi, &bi, "tcp", "8085"]);
    assert_eq!(
        (no_policy["verdict"].as_str(), no_policy["reason"].as_str()),
        (Some("denied"), Some("no_policy"))
    );
    assert_eq!(no_policy["message"], "denied: no policy lets worker reach backend");
    assert!(!tcp_echo_works(&w.ns, b.ip, 8085, SHORT));

    // The worker sends with the frontend's address: dropped where it leaves.
    let spoofed = explain(&[&ai, &bi, "tcp", "8085", "--from", &wi]);
    assert_eq!(
        (spoofed["verdict"].as_str(), spoofed["reason"].as_str()),
        (Some("denied"), Some("spoofed"))
    );
    w.ns.ip(&["addr", "add", &format!("{ai}/32"), "dev", "eth0"]);
    assert!(integration_tests::traffic::tcp_connect(&w.ns, Some(a.ip), b.ip, 8085, SHORT).is_err());

    // The human form says the same.
    let text = daemon.cli_ok(&["explain", &ai, &bi, "tcp", "9000"]);
    assert!(text.contains("denied: backend allows frontend on tcp 8080-8090, not 9000"), "{text}");
}

#[test]
fn metrics_parse_as_prometheus_text_and_move_with_traffic() {
    let (host, daemon) = setup("metrics_listen = \"127.0.0.1:9100\"");
    let (a, b) = (host.container(0), host.container(1));
    let scrape = || -> prometheus_parse::Scrape {
        let out = host
            .ns
            .command("curl")
            .args(["-s", "-f", "http://127.0.0.1:9100/metrics"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
            .expect("Prometheus text format")
    };
    let value =
        |scrape: &prometheus_parse::Scrape, name: &str, label: Option<(&str, &str)>| -> f64 {
            scrape
                .samples
                .iter()
                .filter(|s| s.metric == name)
                .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
                .map(|s| match s.value {
                    prometheus_parse::Value::Counter(v)
                    | prometheus_parse::Value::Gauge(v)
                    | prometheus_parse::Value::Untyped(v) => v,
                    _ => 0.0,
                })
                .sum()
        };
    let before = scrape();
    for name in [
        "policy_verdict_packets_total",
        "policy_flow_events_total",
        "policy_map_entries",
        "policy_map_capacity",
        "policy_map_bytes",
        "totalPolicies",
        "policy_endpoints",
        "policy_api_requests_total",
    ] {
        assert!(before.samples.iter().any(|s| s.metric == name), "{name} missing");
    }
    assert_eq!(value(&before, "policy_endpoints", None), 3.0);
    assert_eq!(value(&before, "policy_map_capacity", Some(("map", "ENDPOINTS"))), 65536.0);
    // What the kernel charges: at least a key and a value per slot of a
    // preallocated hash map (a 4-byte key and an 8-byte value).
    let endpoints_bytes = value(&before, "policy_map_bytes", Some(("map", "ENDPOINTS")));
    assert!(endpoints_bytes >= 65536.0 * 12.0, "{endpoints_bytes}");

    daemon.allow("frontend", "backend", "udp", "53");
    let socket = a.ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    for _ in 0..20 {
        socket.send_to(b"x", (b.ip, 54)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = scrape();
    assert_eq!(value(&after, "totalPolicies", None), 1.0);
    let denied = |s: &prometheus_parse::Scrape| {
        value(s, "policy_verdict_packets_total", Some(("reason", "no_policy")))
    };
    assert!(denied(&after) >= denied(&before) + 20.0, "{} -> {}", denied(&before), denied(&after));
    let requests = |s: &prometheus_parse::Scrape| value(s, "policy_api_requests_total", None);
    assert!(requests(&after) > requests(&before));
    assert!(value(&after, "policy_flow_events_total", Some(("outcome", "emitted"))) >= 1.0);
    // An allowed flow's second packet is established: the CPU that sees it
    // caches its connection.
    let fills = |s: &prometheus_parse::Scrape| {
        value(s, "policy_flow_cache_total", Some(("event", "fills")))
    };
    for _ in 0..5 {
        socket.send_to(b"x", (b.ip, 53)).unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let cached = scrape();
    assert!(fills(&cached) >= fills(&before) + 1.0, "{} -> {}", fills(&before), fills(&cached));
    assert!(
        after.samples.iter().any(|s| s.metric.starts_with("enforceTime")),
        "enforce-time histogram"
    );
}

/// `status` reads every map in batches of up to a few MiB. Polled again
/// and again (as an operator's dashboard or the soak does), the agent
/// must not keep those buffers: with glibc's moving mmap threshold the
/// third call left 12 MiB more resident, and it stayed.
#[test]
fn polling_status_does_not_grow_the_agent() {
    let (_host, daemon) = setup("");
    let rss_kib = || -> u64 {
        let pid = daemon.pid().expect("the agent runs");
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    // The first calls set up what every later call reuses.
    for _ in 0..2 {
        assert!(daemon.cli_ok(&["status"]).contains("maps:"));
    }
    let before = rss_kib();
    for _ in 0..20 {
        assert!(daemon.cli_ok(&["status"]).contains("maps:"));
    }
    let grown = rss_kib().saturating_sub(before);
    assert!(grown < 4 << 10, "the agent's RSS grew {grown} KiB over 20 status calls");
}
