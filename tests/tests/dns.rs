//! apps.internal DNS and internal routes, from inside container namespaces
//! with `dig`, against the agent daemon.

use std::{collections::BTreeSet, net::Ipv4Addr, process::Output};

use integration_tests::{
    daemon::Daemon,
    netns::NetNs,
    require_root,
    topology::{GATEWAY, Host},
};

fn dig(ns: &NetNs, args: &[&str]) -> String {
    let out: Output = ns
        .command("dig")
        .arg(format!("@{GATEWAY}"))
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("run dig");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn addresses(ns: &NetNs, name: &str) -> Vec<Ipv4Addr> {
    dig(ns, &["+short", name]).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

fn status(ns: &NetNs, args: &[&str]) -> String {
    let out = dig(ns, args);
    out.split("status: ").nth(1).and_then(|s| s.split(',').next()).unwrap_or("no answer").to_owned()
}

#[test]
fn routes_resolve_to_every_instance_in_varying_order() {
    require_root();
    let host = Host::new(4);
    let daemon = Daemon::start(&host.ns, "");
    for (i, app) in [(0, "frontend"), (1, "backend"), (2, "backend")] {
        let c = host.container(i);
        daemon.register(c, app);
    }
    let client = &host.container(0).ns;
    assert_eq!(status(client, &["backend.apps.internal"]), "NXDOMAIN", "no route yet");
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    let want: BTreeSet<Ipv4Addr> = [host.container(1).ip, host.container(2).ip].into();
    assert_eq!(
        addresses(client, "backend.apps.internal").into_iter().collect::<BTreeSet<_>>(),
        want
    );
    // Shuffled: over many queries both orders show up.
    let orders: BTreeSet<Vec<Ipv4Addr>> =
        (0..30).map(|_| addresses(client, "backend.apps.internal")).collect();
    assert!(orders.len() >= 2, "always the same order: {orders:?}");
    // TCP too, and case does not matter.
    let tcp: BTreeSet<Ipv4Addr> = dig(client, &["+tcp", "+short", "BACKEND.Apps.Internal"])
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    assert_eq!(tcp, want);

    // Unknown names in the zone, other zones.
    assert_eq!(status(client, &["nope.apps.internal"]), "NXDOMAIN");
    assert_eq!(status(client, &["example.com"]), "REFUSED");
    assert_eq!(status(client, &["+tcp", "example.com"]), "REFUSED");

    // A new instance shows at the next query; a second hostname works.
    let c3 = host.container(3);
    daemon.register(c3, "backend");
    assert_eq!(addresses(client, "backend.apps.internal").len(), 3);
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "api"]);
    assert_eq!(addresses(client, "api.apps.internal").len(), 3);
    daemon.cli_ok(&["unmap-route", "backend", "apps.internal", "--hostname", "backend"]);
    assert_eq!(status(client, &["backend.apps.internal"]), "NXDOMAIN");
    assert_eq!(addresses(client, "api.apps.internal").len(), 3);
    let routes = daemon.cli_ok(&["routes"]);
    assert!(
        routes.contains("api.apps.internal") && !routes.contains("backend.apps.internal"),
        "{routes}"
    );
}

#[test]
fn bad_routes_are_refused_and_routes_survive_a_restart() {
    require_root();
    let host = Host::new(2);
    let mut daemon = Daemon::start(&host.ns, "");
    let c = host.container(1);
    daemon.register(c, "backend");
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    for (args, says) in [
        (
            vec!["map-route", "backend", "apps.internal", "--hostname", "bad_name"],
            "letters, digits and hyphens",
        ),
        (vec!["map-route", "backend", "apps.internal", "--hostname=-x"], "hyphen"),
        (
            vec!["map-route", "backend", "example.com", "--hostname", "x"],
            "only the apps.internal domain",
        ),
        (
            vec!["map-route", "other", "apps.internal", "--hostname", "backend"],
            "is mapped to app backend",
        ),
    ] {
        let out = daemon.cli(&args);
        assert!(!out.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    let (status, reply) =
        daemon.curl("POST", "/v1/routes", Some(&"x".repeat(64).replace('x', "{")));
    assert_eq!(status, 400, "{reply}");
    daemon.kill9();
    daemon.spawn();
    assert_eq!(addresses(&host.container(0).ns, "backend.apps.internal"), vec![c.ip]);
}

#[test]
fn garbage_queries_do_not_hurt_the_server() {
    require_root();
    let host = Host::new(2);
    let daemon = Daemon::start(&host.ns, "");
    let c = host.container(1);
    daemon.register(c, "backend");
    daemon.cli_ok(&["map-route", "backend", "apps.internal", "--hostname", "backend"]);
    let client = &host.container(0).ns;
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff],
        vec![0; 12],
        (0..=255u8).collect(),
        vec![0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xc0, 0x0c],
        vec![0xab; 4096],
    ];
    let socket = client.run(|| std::net::UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    for datagram in &junk {
        socket.send_to(datagram, (GATEWAY, 53)).unwrap();
    }
    // Garbage over TCP as well.
    let mut tcp = client.run(|| std::net::TcpStream::connect((GATEWAY, 53))).unwrap();
    use std::io::Write as _;
    let _ = tcp.write_all(&[0x00, 0x05, 1, 2, 3]);
    drop(tcp);
    assert_eq!(addresses(client, "backend.apps.internal"), vec![c.ip], "still answering");
    assert!(daemon.cli(&["status"]).status.success());
}

#[test]
fn a_busy_dns_port_stops_the_agent_with_a_clear_error() {
    require_root();
    let host = Host::new(1);
    // Something else already answers on the gateway's port 53.
    let _other = host.ns.run(|| std::net::UdpSocket::bind((GATEWAY, 53))).unwrap();
    let dir = std::env::temp_dir().join(integration_tests::unique_name("busy"));
    std::fs::create_dir_all(&dir).unwrap();
    let pin_dir =
        std::path::PathBuf::from("/sys/fs/bpf").join(integration_tests::unique_name("busy"));
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{0}/state\"\nsocket = \"{0}/agent.sock\"\npin_dir = \"{1}\"\nflow_log = \"{0}/flows.log\"\n",
            dir.display(),
            pin_dir.display()
        ),
    )
    .unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", host.ns.path().display()))
        .arg(integration_tests::agent::agent_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let _ = policy_agent::Dataplane::remove_all(&pin_dir);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot serve DNS on 169.254.0.1:53"), "{stderr}");
}
