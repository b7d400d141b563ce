//! The cgroup_skb programs with real traffic: processes in cgroups, sockets
//! they open, the same decisions as on veths.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use integration_tests::{cgroup::Cgroup, netns::NetNs, pins::PinDir, require_root, topology::Host};
use policy_common::{
    Reason,
    maps::{PairKey, proto},
    ports::Allowance,
};

/// `sh -c` in `ns`, joining `cgroup` before exec'ing `command`, so every
/// socket the command opens belongs to the cgroup. nsenter keeps /sys (and
/// so the cgroup mount) visible, unlike `ip netns exec`.
fn in_cgroup(ns: &NetNs, cgroup: &Path, command: &str) -> Command {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path().display())).args([
        "sh",
        "-c",
        &format!("echo $$ > {}/cgroup.procs && exec {command}", cgroup.display()),
    ]);
    cmd
}

/// Kills and reaps a child this test started.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `nc -z` from the client cgroup connects within a second.
fn connects(ns: &NetNs, cgroup: &Path, args: &str) -> bool {
    in_cgroup(ns, cgroup, &format!("nc -z -w 1 {args}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run nc")
        .success()
}

#[test]
fn cgroup_programs_enforce_policy_and_anti_spoofing_on_real_sockets() {
    require_root();
    let host = Host::new(2);
    let pins = PinDir::new();
    let mut dataplane = pins.open();
    let (client, server) = (host.container(0), host.container(1));
    let (client_cg, server_cg) = (Cgroup::new(), Cgroup::new());
    let tables = dataplane.maps_mut();
    tables.set_endpoint(client.ip, 1).unwrap();
    tables.set_endpoint(server.ip, 2).unwrap();
    for (cg, c, tag) in [(&client_cg, client, 1), (&server_cg, server, 2)] {
        let id = dataplane.attach_cgroup(&cg.path).unwrap();
        assert_eq!(id, cg.id());
        dataplane.maps_mut().set_cgroup(id, c.ip, tag).unwrap();
    }

    let _server = Reaped(
        in_cgroup(&server.ns, &server_cg.path, &format!("nc -lk {} 8080", server.ip))
            .stdout(Stdio::null())
            .spawn()
            .expect("start nc server"),
    );
    // Wait until it listens (from the host: not an endpoint, so unpoliced).
    let started = Instant::now();
    while !host
        .ns
        .command("nc")
        .args(["-z", "-w", "1", &server.ip.to_string(), "8080"])
        .status()
        .unwrap()
        .success()
    {
        assert!(started.elapsed() < Duration::from_secs(5), "nc server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let target = format!("{} 8080", server.ip);
    assert!(
        !connects(&client.ns, &client_cg.path, &target),
        "denied by default at the server's cgroup ingress"
    );
    assert!(dataplane.maps().verdict_count(Reason::NoPolicy).unwrap() > 0);

    dataplane
        .maps_mut()
        .allow(PairKey::new(1, 2, proto::TCP), Allowance { start: 8080, end: 8080, policy_id: 1 })
        .unwrap();
    assert!(connects(&client.ns, &client_cg.path, &target), "allowed by the policy");

    // A new load takes the pinned cgroup links over; enforcement goes on.
    drop(dataplane);
    let mut dataplane = pins.open();
    assert_eq!(dataplane.attachments().unwrap().len(), 4);
    assert!(connects(&client.ns, &client_cg.path, &target), "still allowed after the take-over");

    // The client claims another address: dropped at its cgroup's egress.
    let spoofed = "10.255.0.77";
    client.ns.ip(&["addr", "add", &format!("{spoofed}/32"), "dev", "eth0"]);
    assert!(!connects(&client.ns, &client_cg.path, &format!("-s {spoofed} {target}")));
    assert!(dataplane.maps().verdict_count(Reason::Spoofed).unwrap() > 0);

    dataplane.detach_cgroup(client_cg.id()).unwrap();
    dataplane.detach_cgroup(server_cg.id()).unwrap();
    assert!(dataplane.attachments().unwrap().is_empty());
}
