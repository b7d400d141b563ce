//! A Diego cell's own inputs, as vxlan-policy-agent reads them: the agent
//! started with vxlan-policy-agent's JSON config
//! (`--vxlan-policy-agent-config`), its containers from CF's container
//! metadata store written as garden's networker writes it (exclusive
//! `flock` on `store.json_lock`, the file rewritten, the version bumped),
//! policies from CF's real policy server, and cni-wrapper-plugin's call
//! to `/force-policy-poll-cycle` before a container's ADD returns.

use std::{
    fs::File,
    net::TcpListener,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use integration_tests::{
    cf::PolicyServer,
    daemon::Daemon,
    eventually,
    netns::NetNs,
    require_root,
    topology::{Container, Host},
    traffic::{LONG, SHORT, tcp_echo_server, tcp_echo_works},
};
use serde_json::json;

/// The metadata store as garden-external-networker keeps it.
struct MetadataStore {
    path: PathBuf,
}

impl MetadataStore {
    fn sibling(&self, suffix: &str) -> PathBuf {
        PathBuf::from(format!("{}{suffix}", self.path.display()))
    }

    /// Rewrites the store with `containers` (handle, container, app,
    /// space) under the writers' lock, then bumps the version (as
    /// `lib/datastore` does).
    fn write(&self, containers: &[(&str, &Container, &str, &str)]) {
        let lock = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.sibling("_lock"))
            .expect("lock file");
        // SAFETY: flock on a descriptor held for this scope.
        assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) }, 0);
        let entries: serde_json::Map<String, serde_json::Value> = containers
            .iter()
            .map(|(handle, c, app, space)| {
                let entry = json!({"handle": handle, "ip": c.ip.to_string(), "metadata": {
                    "policy_group_id": app, "app_id": app, "space_id": space, "org_id": "org-1",
                    "container_workload": "app", "ports": "8080"}});
                ((*handle).to_owned(), entry)
            })
            .collect();
        std::fs::write(&self.path, format!("{}\n", serde_json::Value::Object(entries)))
            .expect("write store.json");
        let version: u64 = std::fs::read_to_string(self.sibling("_version"))
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(1);
        std::fs::write(self.sibling("_version"), (version + 1).to_string()).expect("version");
    }
}

/// A loopback port free inside `ns`.
fn free_port_in(ns: &NetNs) -> u16 {
    ns.run(|| TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()))
        .expect("a free port")
        .port()
}

/// vxlan-policy-agent's config as its BOSH job renders it, pointing at
/// `server`, with the given store and force port.
fn vpa_config(server: &PolicyServer, store: &Path, force_port: u16) -> serde_json::Value {
    let (cert, key) = server.client_identity();
    json!({
        "policy_server_url": server.internal_url(), "ca_cert_file": server.ca_file(),
        "client_cert_file": cert, "client_key_file": key, "client_timeout_seconds": 5,
        "poll_interval": 5, "enable_asg_syncing": false, "asg_poll_interval": 60,
        "cni_datastore_path": store,
        "iptables_lock_file": store.with_file_name("iptables.lock"),
        "underlay_ips": ["10.99.0.11"], "overlay_network": "10.255.0.0/16", "vni": 1,
        "force_policy_poll_cycle_host": "127.0.0.1", "force_policy_poll_cycle_port": force_port,
        "debug_server_host": "127.0.0.1", "debug_server_port": 8721,
        "enable_overlay_ingress_rules": false, "disable_container_network_policy": false,
        "iptables_c2c_logging": false, "iptables_asg_logging": false,
        "iptables_accepted_udp_logs_per_sec": 100, "iptables_denied_logs_per_sec": 1,
        "deny_networks": {"always": [], "running": [], "staging": []},
        "outbound_connections": {"limit": false, "logging": false, "burst": 1000, "rate_per_sec": 100},
        "metron_address": "127.0.0.1:3457", "log_prefix": "cfnetworking", "log_level": "info",
        "loggregator": {"loggregator_use_v2_api": false}
    })
}

/// `curl http://127.0.0.1:PORT/PATH` from inside `ns`, as cni-wrapper-plugin
/// calls the agent: (status, body).
fn force(ns: &NetNs, port: u16, path: &str) -> (u16, String) {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .args(["curl", "-sS", "--max-time", "20", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (status.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn containers_from_the_metadata_store_with_vxlan_policy_agents_config() {
    require_root();
    let host = Host::new(3);
    let server = PolicyServer::start_in(&host.ns);
    let dir = std::env::temp_dir().join(integration_tests::unique_name("cf-store"));
    std::fs::create_dir_all(dir.join("container-metadata")).expect("store dir");
    let store = MetadataStore { path: dir.join("container-metadata/store.json") };
    let port = free_port_in(&host.ns);
    let config = dir.join("vxlan-policy-agent.json");
    std::fs::write(&config, vpa_config(&server, &store.path, port).to_string()).expect("config");
    let daemon = Daemon::start_with(
        &host.ns,
        "",
        vec!["--vxlan-policy-agent-config".into(), config.clone().into()],
    );
    let log = daemon.log();
    assert!(log.contains("do not apply") && log.contains("metron_address"), "{log}");
    assert!(!log.contains("keys=\"ca_cert_file"), "{log}");

    let (a, b, c) = (host.container(0), host.container(1), host.container(2));
    tcp_echo_server(&b.ns, b.ip, 8080);
    server.add_policies(&[("app-a", "app-b", "tcp", 8080, 8080)]);
    // garden's networker: the store first, then the forced poll (the
    // plugin's ADD fails unless it answers 200).
    store.write(&[("handle-a", a, "app-a", "space-1"), ("handle-b", b, "app-b", "space-1")]);
    assert_eq!(force(&host.ns, port, "/force-policy-poll-cycle"), (200, String::new()));
    assert!(
        tcp_echo_works(&a.ns, b.ip, 8080, LONG),
        "allowed once the forced poll answered:\n{}",
        daemon.log()
    );
    let endpoints = daemon.get("/v1/endpoints");
    let listed = endpoints["endpoints"].as_array().expect("endpoints");
    assert_eq!(listed.len(), 2, "{endpoints}");
    assert!(
        listed.iter().any(|e| e["app"] == "app-a" && e["ifname"] == a.host_ifname.as_str()),
        "{endpoints}"
    );
    // A third container, no policy: registered, denied (the default deny
    // holds for every container in the store).
    tcp_echo_server(&c.ns, c.ip, 8080);
    store.write(&[
        ("handle-a", a, "app-a", "space-1"),
        ("handle-b", b, "app-b", "space-1"),
        ("handle-c", c, "app-c", "space-2"),
    ]);
    assert_eq!(force(&host.ns, port, "/force-policy-poll-cycle").0, 200);
    assert!(!tcp_echo_works(&c.ns, b.ip, 8080, SHORT), "app-c has no policy");
    assert!(!tcp_echo_works(&a.ns, c.ip, 8080, SHORT), "nor has app-a to app-c");
    // ASG syncing is off: the plugin applies the static rules itself.
    let (status, said) = force(&host.ns, port, "/force-asgs-for-container?container=handle-c");
    assert_eq!((status, said.as_str()), (405, "ASG syncing has been disabled administratively"));

    // Deleted from the store (cni-wrapper-plugin's DEL): unregistered at
    // the next poll, and not registered again after a restart.
    store.write(&[("handle-b", b, "app-b", "space-1"), ("handle-c", c, "app-c", "space-2")]);
    assert!(
        eventually(Duration::from_secs(12), || {
            daemon.get("/v1/endpoints")["endpoints"].as_array().is_some_and(|e| e.len() == 2)
        }),
        "handle-a not unregistered:\n{}",
        daemon.log()
    );
    let endpoints = daemon.get("/v1/endpoints");
    assert!(!endpoints.to_string().contains("app-a"), "{endpoints}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn security_groups_from_the_policy_server_follow_running_containers() {
    require_root();
    let host = Host::new(2);
    // An "external" network behind the host, outside the overlay.
    let ext = integration_tests::topology::outside(
        &host.ns,
        "extlink",
        "192.0.2.1/24",
        &["192.0.2.10/24"],
    );
    ext.ip(&["route", "add", "default", "via", "192.0.2.1"]);
    let dest = std::net::Ipv4Addr::new(192, 0, 2, 10);
    for port in [443, 444, 445] {
        tcp_echo_server(&ext, dest, port);
    }
    let server = PolicyServer::start_in(&host.ns);
    // The running default: TCP 443; space-1's group: TCP 444.
    server.put_default_and_space_groups("444", &["space-1"]);
    let dir = std::env::temp_dir().join(integration_tests::unique_name("cf-asgs"));
    std::fs::create_dir_all(dir.join("container-metadata")).expect("store dir");
    let store = MetadataStore { path: dir.join("container-metadata/store.json") };
    let port = free_port_in(&host.ns);
    let mut config = vpa_config(&server, &store.path, port);
    config["enable_asg_syncing"] = json!(true);
    config["asg_poll_interval"] = json!(1);
    let config_file = dir.join("vxlan-policy-agent.json");
    std::fs::write(&config_file, config.to_string()).expect("config");
    let daemon = Daemon::start_with(
        &host.ns,
        "",
        vec!["--vxlan-policy-agent-config".into(), config_file.into()],
    );
    let (a, b) = (host.container(0), host.container(1));
    store.write(&[("handle-a", a, "app-a", "space-1"), ("handle-b", b, "app-b", "space-2")]);
    // cni-wrapper-plugin's ADD: the forced poll, then the container's groups.
    assert_eq!(force(&host.ns, port, "/force-policy-poll-cycle").0, 200);
    assert_eq!(
        force(&host.ns, port, "/force-asgs-for-container?container=handle-a"),
        (200, "updated container handle-a".to_owned())
    );
    assert_eq!(force(&host.ns, port, "/force-asgs-for-container").0, 400);
    let egress = |c: &Container| {
        [443, 444, 445].map(|p| tcp_echo_works(&c.ns, dest, p, if p == 443 { LONG } else { SHORT }))
    };
    assert_eq!(
        egress(a),
        [true, true, false],
        "space-1: the default and its group:\n{}",
        daemon.log()
    );
    assert_eq!(egress(b), [true, false, false], "space-2: the default only");
    let status = daemon.get("/v1/status");
    let asgs = &status["policy_server"]["security_groups"];
    assert_eq!(
        (asgs["state"].as_str(), asgs["security_groups"].as_u64()),
        (Some("following"), Some(2)),
        "{status}"
    );

    // Changed at the server while the containers run: followed within
    // the poll interval (1 s), no restart.
    server.put_space_group("445", &["space-1", "space-2"]);
    assert!(
        eventually(Duration::from_secs(6), || egress(a) == [true, false, true]
            && egress(b) == [true, false, true]),
        "the changed group in force:\n{}",
        daemon.log()
    );
    server.delete_security_group("default-1");
    assert!(
        eventually(Duration::from_secs(6), || egress(b) == [false, false, true]),
        "the deleted default out of force:\n{}",
        daemon.log()
    );
    // The server down: the rules stay.
    let mut server = server;
    server.kill_internal();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(egress(b), [false, false, true], "unchanged while the server is down");
    let _ = std::fs::remove_dir_all(&dir);
}
