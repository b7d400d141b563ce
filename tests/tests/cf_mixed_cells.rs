//! Mixed cells on CF's own silk overlay: cell 1 runs CF's
//! vxlan-policy-agent, cell 2 this agent (with the cell's rendered
//! vxlan-policy-agent config: it joins `silk-vtep`), policies from the
//! same policy server, containers from CF's cni-wrapper-plugin on both.
//! Both ways the policy holds on its port only, the tag in silk's VXLAN
//! GBP field: into cell 2 this agent decides by it, out of cell 2
//! vxlan-policy-agent does, and this agent lets the replies in as
//! replies (also after a policy change); an app without a tag (no
//! policy: vxlan-policy-agent marks nothing) is denied as CF denies it;
//! deleted, the policy is gone. A forged tunnel header is refused and counted,
//! from a container of cell 2 and from an underlay host that is no cell.

use std::{net::UdpSocket, process::Command, time::Duration};

use integration_tests::{
    cluster::vxlan_gbp,
    daemon::Daemon,
    eventually,
    netns::NetNs,
    require_root,
    silk::{CellAgent, Overlay, SilkContainer},
    traffic::{LONG, SHORT, echo_once, tcp_connect, tcp_echo_server, tcp_echo_works},
};
use policy_common::craft::PacketSpec;

const POLICY: (&str, &str, &str, u16, u16) = ("app-a", "app-b", "tcp", 8080, 8080);

fn serve(containers: &[&SilkContainer]) {
    for c in containers {
        for port in [8080, 9090] {
            tcp_echo_server(&c.ns, c.ip, port);
        }
    }
}

fn vtep_mac(ns_path: &std::path::Path) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns_path.display()))
        .args(["ip", "-j", "link", "show", "silk-vtep"])
        .output()
        .expect("ip link");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    links[0]["address"].as_str().expect("silk-vtep's MAC").to_owned()
}

#[test]
fn a_vxlan_policy_agent_cell_and_this_agents_cell_on_one_overlay() {
    require_root();
    let overlay = Overlay::start();
    let cell1 = overlay.add_cell(1, CellAgent::VxlanPolicyAgent);
    let cell2 = overlay.add_cell(2, CellAgent::None);
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cell2.vxlan_policy_agent_config()).unwrap()).unwrap();
    config["poll_interval"] = serde_json::json!(1);
    let config_file = cell2.dir().join("policy-agent-vpa.json");
    std::fs::write(&config_file, config.to_string()).unwrap();
    let daemon = Daemon::start_with(
        cell2.ns(),
        "dns_listen = \"\"\n",
        vec!["--vxlan-policy-agent-config".into(), config_file.into()],
    );
    let c1a = cell1.add_container("c1a", "app-a", "space-1");
    let c1b = cell1.add_container("c1b", "app-b", "space-1");
    let c1c = cell1.add_container("c1c", "app-c", "space-1");
    let c2a = cell2.add_container("c2a", "app-a", "space-1");
    let c2b = cell2.add_container("c2b", "app-b", "space-1");
    let c2c = cell2.add_container("c2c", "app-c", "space-1");
    serve(&[&c1a, &c1b, &c1c, &c2a, &c2b, &c2c]);
    overlay.wait_for_peers();
    assert!(
        eventually(Duration::from_secs(5), || daemon.log().contains("joined silk's overlay")),
        "the agent joins silk-vtep:\n{}",
        daemon.log()
    );
    assert!(!tcp_echo_works(&c1a.ns, c2b.ip, 8080, SHORT), "no policy yet");

    overlay.policy_server().add_policies(&[POLICY]);
    cell1.force_poll();
    cell2.force_poll();
    assert!(
        tcp_echo_works(&c1a.ns, c2b.ip, 8080, LONG),
        "app-a on cell 1 (vxlan-policy-agent) -> app-b on cell 2 (this agent):\n{}",
        daemon.log()
    );
    assert!(!tcp_echo_works(&c1a.ns, c2b.ip, 9090, SHORT), "another port");
    // The other way: from this agent's cell, app-a's tag in silk's header,
    // decided by vxlan-policy-agent on cell 1; the replies come back as
    // replies of the connection this cell recorded.
    assert!(
        tcp_echo_works(&c2a.ns, c1b.ip, 8080, LONG),
        "app-a on cell 2 (this agent) -> app-b on cell 1 (vxlan-policy-agent):\n{}",
        daemon.log()
    );
    assert!(!tcp_echo_works(&c2a.ns, c1b.ip, 9090, SHORT), "another port, refused on cell 1");
    assert!(!tcp_echo_works(&c2c.ns, c1b.ip, 8080, SHORT), "app-c: no tag, refused on cell 1");
    // An open connection across cells outlives a policy change here.
    let mut open = tcp_connect(&c2a.ns, None, c1b.ip, 8080, LONG).expect("connect");
    assert!(echo_once(&mut open));
    overlay.policy_server().add_policies(&[("app-c", "app-b", "tcp", 7070, 7070)]);
    cell2.force_poll();
    assert!(echo_once(&mut open), "kept across a policy change on this cell");
    assert!(!tcp_echo_works(&c1c.ns, c2b.ip, 8080, SHORT), "app-c carries no tag: denied");
    let denied = daemon.verdict_count("no_policy");
    assert!(denied > 0, "the denials were this agent's, counted");

    // Forged tunnel headers claiming app-a, to app-b's UDP port.
    let rx = c2b.ns.run(|| UdpSocket::bind((c2b.ip, 7000))).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let tag = daemon.tag("app-a") as u16;
    let mut inner = PacketSpec::udp(c1a.ip.octets(), c2b.ip.octets(), 40000, 7000);
    inner.payload = b"forged".to_vec();
    let forged = vxlan_gbp(tag, &vtep_mac(&cell2.ns().path()), &inner.ipv4());
    let mut buf = [0u8; 64];
    // Ten forged packets sent to cell 2's VXLAN socket from `ns`: none
    // reaches app-b, all are counted as spoofed.
    let mut refused = |ns: &NetNs, who: &str, where_dropped: &str| {
        let before = daemon.verdict_count("spoofed");
        let socket = ns.run(|| UdpSocket::bind(("0.0.0.0", 0))).unwrap();
        for _ in 0..10 {
            socket.send_to(&forged, (cell2.underlay_ip(), 4789)).unwrap();
        }
        assert!(rx.recv(&mut buf).is_err(), "{who}'s forged tunnel packet reached app-b");
        assert!(
            eventually(LONG, || daemon.verdict_count("spoofed") >= before + 10),
            "dropped at {where_dropped}, counted as spoofed"
        );
    };
    // From a container of cell 2, to its cell's VXLAN socket.
    refused(&c2c.ns, "a container", "the container's veth");
    // From the control plane's host on the underlay: no cell of the
    // overlay (not in silk-vtep's forwarding table).
    refused(overlay.control_ns(), "an underlay host", "cell 2's underlay interface");

    overlay.policy_server().delete_policies(&[POLICY]);
    cell1.force_poll();
    cell2.force_poll();
    assert!(!tcp_echo_works(&c1a.ns, c2b.ip, 8080, SHORT), "deleted at the server");
    assert!(!tcp_echo_works(&c2a.ns, c1b.ip, 8080, SHORT), "deleted, the other way");
}
