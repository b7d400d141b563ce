//! The agent in vxlan-policy-agent's place on a cell of CF's own silk
//! overlay (`integration_tests::silk`): started with the cell's rendered
//! vxlan-policy-agent config, its containers made by CF's real
//! cni-wrapper-plugin → silk-cni (the metadata store, the force calls),
//! policies from the real policy server. Between the cell's containers
//! the eBPF programs decide (the agent's iptables chain lets them past
//! cni-wrapper-plugin's default REJECT); from another cell too, by the tag
//! in silk's VXLAN header (see `cf_mixed_cells.rs`).

use std::{io::ErrorKind, process::Command};

use integration_tests::{
    daemon::Daemon,
    require_root,
    silk::{CellAgent, Overlay, SilkContainer},
    traffic::{LONG, SHORT, tcp_connect, tcp_echo_server, tcp_echo_works},
};

const POLICY: (&str, &str, &str, u16, u16) = ("app-a", "app-b", "tcp", 8080, 8080);

fn refused(from: &SilkContainer, to: &SilkContainer, port: u16) -> bool {
    matches!(tcp_connect(&from.ns, None, to.ip, port, SHORT), Err(e) if e.kind() == ErrorKind::ConnectionRefused)
}

fn serve(containers: &[&SilkContainer]) {
    for c in containers {
        for port in [8080, 9090] {
            tcp_echo_server(&c.ns, c.ip, port);
        }
    }
}

#[test]
fn the_agent_in_vxlan_policy_agents_place_on_a_silk_cell() {
    require_root();
    let overlay = Overlay::start();
    let cell1 = overlay.add_cell(1, CellAgent::VxlanPolicyAgent);
    let cell2 = overlay.add_cell(2, CellAgent::None);
    let daemon = Daemon::start_with(
        cell2.ns(),
        "dns_listen = \"\"\n",
        vec!["--vxlan-policy-agent-config".into(), cell2.vxlan_policy_agent_config().into()],
    );
    let c1a = cell1.add_container("c1a", "app-a", "space-1");
    let c2a = cell2.add_container("c2a", "app-a", "space-1");
    let c2b = cell2.add_container("c2b", "app-b", "space-1");
    serve(&[&c1a, &c2a, &c2b]);
    overlay.wait_for_peers();
    let endpoints = daemon.get("/v1/endpoints");
    assert_eq!(endpoints["endpoints"].as_array().map(Vec::len), Some(2), "{endpoints}");

    assert!(refused(&c2a, &c2b, 8080), "no policy yet: the program's reject");
    overlay.policy_server().add_policies(&[POLICY]);
    cell1.force_poll();
    cell2.force_poll();
    assert!(
        tcp_echo_works(&c2a.ns, c2b.ip, 8080, LONG),
        "app-a -> app-b:8080 on the agent's cell:\n{}",
        daemon.log()
    );
    assert!(refused(&c2a, &c2b, 9090), "another port");
    assert!(refused(&c2b, &c2a, 8080), "the reverse");
    assert_eq!(daemon.tag("app-a"), daemon.tag("app-a") & 0xFFFF, "the server's 16-bit tag");
    overlay.wait_for_peers();
    assert!(
        tcp_echo_works(&c1a.ns, c2b.ip, 8080, LONG),
        "from app-a on the vxlan-policy-agent cell, by its tag in silk's header"
    );
    // iptables: the agent's chain first in FORWARD, its veths in it.
    let rules = Command::new("nsenter")
        .arg(format!("--net={}", cell2.ns().path().display()))
        .args(["iptables", "-S"])
        .output()
        .expect("iptables -S");
    let rules = String::from_utf8_lossy(&rules.stdout);
    let forward: Vec<&str> = rules.lines().filter(|l| l.starts_with("-A FORWARD")).collect();
    assert_eq!(forward.first(), Some(&"-A FORWARD -j policy-agent"), "{rules}");
    assert!(rules.contains("-A policy-agent -i silk-vtep -j policy-agent--to"), "{rules}");
    assert_eq!(
        rules.lines().filter(|l| l.starts_with("-A policy-agent--to -o")).count(),
        2,
        "{rules}"
    );

    overlay.policy_server().delete_policies(&[POLICY]);
    cell2.force_poll();
    assert!(refused(&c2a, &c2b, 8080), "deleted at the server");
    // A container deleted (CNI DEL): gone from the agent and its chain.
    cell2.remove_container(&c2a);
    cell2.force_poll();
    let endpoints = daemon.get("/v1/endpoints");
    assert_eq!(endpoints["endpoints"].as_array().map(Vec::len), Some(1), "{endpoints}");

    // `teardown` takes the agent's chains away: cni-wrapper-plugin's
    // rules hold alone again.
    let mut daemon = daemon;
    daemon.stop();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", cell2.ns().path().display()))
        .arg(integration_tests::agent::agent_bin())
        .arg("teardown")
        .arg("--config")
        .arg(&daemon.config)
        .output()
        .expect("policy-agent teardown");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && said.contains("removed the iptables chains"), "{said}");
    let rules = Command::new("nsenter")
        .arg(format!("--net={}", cell2.ns().path().display()))
        .args(["iptables", "-S"])
        .output()
        .expect("iptables -S");
    assert!(!String::from_utf8_lossy(&rules.stdout).contains("policy-agent"), "chains left");
}
