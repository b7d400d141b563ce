//! Cloud Foundry's own container networking, brought up by the tests
//! (`integration_tests::silk`) as the cf-silk fixture's `two-cells.sh`
//! does, and that script's `test`: two cells running silk-daemon and
//! vxlan-policy-agent, containers made by cni-wrapper-plugin → silk-cni →
//! host-local; a policy written through the policy server's external API
//! opens app-a → app-b:8080 on the same cell and across cells (app-a's tag
//! travelling in the VXLAN GBP field) and nothing else; deleted, it is
//! closed again. A cell without vxlan-policy-agent takes containers once
//! something answers cni-wrapper-plugin's force calls, and its containers
//! then stay behind cni-wrapper-plugin's own default deny.

use std::{
    io::ErrorKind,
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, Instant},
};

use integration_tests::{
    require_root,
    silk::{Cell, CellAgent, Overlay, SilkContainer},
    traffic::{LONG, SHORT, http_server, tcp_connect, tcp_echo_server, tcp_echo_works},
};

const POLICY: (&str, &str, &str, u16, u16) = ("app-a", "app-b", "tcp", 8080, 8080);

/// Whether a connection from `from` to `to:port` is refused (a REJECT on
/// the way, answered back through the overlay), not merely lost.
fn refused(from: &SilkContainer, to: &SilkContainer, port: u16) -> bool {
    match tcp_connect(&from.ns, None, to.ip, port, SHORT) {
        Ok(_) => false,
        Err(e) => e.kind() == ErrorKind::ConnectionRefused,
    }
}

fn assert_open(from: &SilkContainer, to: &SilkContainer, port: u16, what: &str) {
    assert!(
        tcp_echo_works(&from.ns, to.ip, port, LONG),
        "{what}: {} -> {}:{port}",
        from.app,
        to.app
    );
}

fn assert_refused(from: &SilkContainer, to: &SilkContainer, port: u16, what: &str) {
    assert!(refused(from, to, port), "{what}: {} -> {}:{port} not refused", from.app, to.app);
}

/// TCP echo servers on 8080 and 9090 in each container.
fn serve(containers: &[&SilkContainer]) {
    for container in containers {
        for port in [8080, 9090] {
            tcp_echo_server(&container.ns, container.ip, port);
        }
    }
}

/// The handles in `cell`'s container metadata store.
fn stored_handles(cell: &Cell) -> Vec<String> {
    let store = std::fs::read(cell.metadata_store()).expect("the metadata store");
    let store: serde_json::Value = serde_json::from_slice(&store).expect("JSON");
    store.as_object().map(|entries| entries.keys().cloned().collect()).unwrap_or_default()
}

/// Each process is the program itself (nsenter exec'd it) and lives in
/// the namespace at `ns`.
fn assert_all_in(processes: &[(&str, u32)], ns: &Path) {
    let netns = std::fs::metadata(ns).expect("netns file").ino();
    for (name, pid) in processes {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .unwrap_or_else(|e| panic!("{name} (PID {pid}): {e}"));
        // The kernel keeps 15 bytes of a command's name.
        assert!(name.starts_with(comm.trim_end()), "PID {pid} is {comm:?}, not {name}");
        let inode = std::fs::metadata(format!("/proc/{pid}/ns/net")).expect("netns").ino();
        assert_eq!(inode, netns, "{name} (PID {pid}) is not in {}", ns.display());
    }
}

#[test]
fn vxlan_policy_agents_enforce_a_policy_within_and_across_cells() {
    require_root();
    let started = Instant::now();
    let overlay = Overlay::start();
    let cell1 = overlay.add_cell(1, CellAgent::VxlanPolicyAgent);
    let cell2 = overlay.add_cell(2, CellAgent::VxlanPolicyAgent);
    // Cell 2's silk-daemon found cell 1's lease on its first poll; cell 1's
    // learns cell 2's on its next one, a second later at most.
    let peers = overlay.wait_for_peers();
    assert!(peers < Duration::from_secs(3), "{peers:?}: is silk-daemon's 1 s poll in force?");
    let containers = Instant::now();
    let c1a = cell1.add_container("c1a", "app-a", "space-1");
    let c1b = cell1.add_container("c1b", "app-b", "space-1");
    let c2b = cell2.add_container("c2b", "app-b", "space-1");
    let c2c = cell2.add_container("c2c", "app-c", "space-1");
    let containers = containers.elapsed();
    serve(&[&c1a, &c1b, &c2b, &c2c]);
    println!(
        "up in {:.1?}: control plane {:.1?} (policy server {:.1?}), cells {:.1?} + {:.1?}, \
         peers learnt {peers:.1?} later, 4 containers {containers:.1?}",
        started.elapsed(),
        overlay.startup,
        overlay.policy_server().startup,
        cell1.startup,
        cell2.startup,
    );
    println!(
        "cell 1 {} (c1a {}, c1b {}), cell 2 {} (c2b {}, c2c {})",
        cell1.subnet(),
        c1a.ip,
        c1b.ip,
        cell2.subnet(),
        c2b.ip,
        c2c.ip
    );
    assert_all_in(&overlay.processes(), &overlay.control_ns().path());
    for cell in [&cell1, &cell2] {
        assert_all_in(&cell.processes(), &cell.ns().path());
        assert_eq!(cell.processes().len(), 2, "silk-daemon and vxlan-policy-agent");
    }
    let mut handles = stored_handles(&cell1);
    handles.sort();
    assert_eq!(handles, ["c1a-handle", "c1b-handle"]);

    assert_refused(&c1a, &c1b, 8080, "no policy, same cell");
    assert_refused(&c1a, &c2b, 8080, "no policy, other cell");

    overlay.policy_server().add_policies(&[POLICY]);
    cell1.force_poll();
    cell2.force_poll();
    assert_open(&c1a, &c1b, 8080, "policy, same cell");
    assert_open(&c1a, &c2b, 8080, "policy, other cell (app-a's tag in VXLAN GBP)");
    assert_refused(&c1a, &c1b, 9090, "another port, same cell");
    assert_refused(&c1a, &c2b, 9090, "another port, other cell");
    assert_refused(&c1b, &c1a, 8080, "the reverse");
    assert_refused(&c2c, &c2b, 8080, "another source app");
    assert_refused(&c1a, &c2c, 8080, "another destination app");

    overlay.policy_server().delete_policies(&[POLICY]);
    cell1.force_poll();
    cell2.force_poll();
    assert_refused(&c1a, &c1b, 8080, "policy deleted, same cell");
    assert_refused(&c1a, &c2b, 8080, "policy deleted, other cell");

    cell2.remove_container(&c2c);
    assert_eq!(stored_handles(&cell2), ["c2b-handle"], "CNI DEL empties the store");

    // Everything goes on drop: the processes (by PID) and the namespaces.
    let prefix = overlay.prefix().to_owned();
    let mut pids: Vec<u32> = overlay.processes().iter().map(|(_, pid)| *pid).collect();
    pids.extend(cell1.processes().iter().chain(&cell2.processes()).map(|(_, pid)| *pid));
    drop((c1a, c1b, c2b, c2c, cell1, cell2));
    drop(overlay);
    for pid in pids {
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "PID {pid} still runs");
    }
    let left: Vec<String> = std::fs::read_dir("/run/netns")
        .expect("/run/netns")
        .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(&prefix))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
}

#[test]
fn a_cell_without_vxlan_policy_agent_keeps_cni_wrapper_plugins_default_deny() {
    require_root();
    let overlay = Overlay::start();
    let cell1 = overlay.add_cell(1, CellAgent::VxlanPolicyAgent);
    let cell2 = overlay.add_cell(2, CellAgent::None);
    let names: Vec<&str> = cell2.processes().iter().map(|(name, _)| *name).collect();
    assert_eq!(names, ["silk-daemon"]);
    let config = std::fs::read(cell2.vxlan_policy_agent_config()).expect("the agent's config");
    let config: serde_json::Value = serde_json::from_slice(&config).expect("JSON");
    assert_eq!(config["underlay_ips"][0], cell2.underlay_ip().to_string());
    assert_eq!(config["policy_server_url"], overlay.policy_server().internal_url());
    let store = config["cni_datastore_path"].as_str().expect("the store's path");
    assert_eq!(Path::new(store), cell2.metadata_store());

    // A stand-in answers every force call 200, as an agent must: ADD and
    // DEL fail when nothing answers there.
    let address = cell2.force_poll_address();
    http_server(cell2.ns(), address.ip(), address.port(), "");
    let c1a = cell1.add_container("c1a", "app-a", "space-1");
    let c1b = cell1.add_container("c1b", "app-b", "space-1");
    let c2a = cell2.add_container("c2a", "app-a", "space-1");
    let c2b = cell2.add_container("c2b", "app-b", "space-1");
    serve(&[&c1a, &c1b, &c2a, &c2b]);
    overlay.wait_for_peers();
    let mut handles = stored_handles(&cell2);
    handles.sort();
    assert_eq!(handles, ["c2a-handle", "c2b-handle"], "the store a replacement agent reads");

    overlay.policy_server().add_policies(&[POLICY]);
    cell1.force_poll();
    assert_open(&c1a, &c1b, 8080, "cell 1's agent");
    // Nothing on cell 2 turns the policy into rules: cni-wrapper-plugin's
    // `overlay--HANDLE` chain rejects what is neither established nor
    // marked 0xffff0000, also with app-a's mark arriving in VXLAN GBP.
    assert_refused(&c2a, &c2b, 8080, "no agent, same cell");
    assert_refused(&c1a, &c2b, 8080, "no agent at the destination");
    // Nor does anything mark app-a's packets leaving cell 2, and cell 1's
    // agent admits app-a only by its mark.
    assert_refused(&c2a, &c1b, 8080, "no agent at the source");

    cell2.remove_container(&c2b);
    assert_eq!(stored_handles(&cell2), ["c2a-handle"], "CNI DEL with the stand-in");
}
