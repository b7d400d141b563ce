//! A Diego cell: a network namespace on the underlay with silk-daemon and,
//! unless a test brings its own, CF's vxlan-policy-agent.

use std::{
    ffi::OsStr,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use super::{
    CellRecord, FORCE_POLL_PORT, Overlay, SILK_DAEMON_PORT,
    config::{self, CellFiles, Tls},
    processes::Processes,
};
use crate::{cf::network::Network, netns::NetNs};

/// What enforces container-to-container policy on a cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellAgent {
    /// CF's vxlan-policy-agent, with `two-cells.sh`'s config
    /// ([`Cell::vxlan_policy_agent_config`]).
    VxlanPolicyAgent,
    /// Nothing: the test starts its own agent, e.g. from
    /// [`Cell::vxlan_policy_agent_config`], and it must answer on
    /// [`Cell::force_poll_address`] before [`Cell::add_container`]:
    /// cni-wrapper-plugin's ADD calls `/force-policy-poll-cycle` (200) and
    /// `/force-asgs-for-container?container=HANDLE` (200, or 405 when ASG
    /// syncing is off), its DEL `/force-orphaned-asgs-cleanup?container=
    /// HANDLE` (200 or 405), and each fails otherwise (ADD after having
    /// written the metadata store and the container's veth). What
    /// cni-wrapper-plugin itself puts in iptables stays in force: per
    /// container, `overlay--HANDLE` in FORWARD rejects what reaches the
    /// container unless established or marked 0xffff0000, and
    /// `netout--HANDLE` rejects its traffic to the underlay (answered 200,
    /// ASG syncing counts as on: no garden NetOut rules either). Nothing
    /// marks what leaves, so a vxlan-policy-agent cell's allow rules (which
    /// match the source's tag from the VXLAN GBP field) do not admit it.
    None,
}

/// One cell, running until dropped. Its underlay address is
/// 10.99.0.(10+N), its lease a /24 of [`super::OVERLAY_NETWORK`].
pub struct Cell<'o> {
    /// silk-daemon and vxlan-policy-agent, the cell's directory.
    processes: Processes,
    ns: NetNs,
    network: Network,
    pub(super) overlay: &'o Overlay,
    n: u8,
    underlay_ip: Ipv4Addr,
    files: CellFiles,
    /// silk-daemon's lease, `10.255.X.0/24`.
    subnet: String,
    mtu: u32,
    /// How long [`Overlay::add_cell`] took.
    pub startup: Duration,
}

impl<'o> Cell<'o> {
    /// The namespace `PREFIXcellN` on the underlay, IP forwarding on,
    /// every config written (vxlan-policy-agent's too), silk-daemon
    /// started (it leases a subnet and makes `silk-vtep`), then
    /// vxlan-policy-agent for [`CellAgent::VxlanPolicyAgent`].
    pub(super) fn start(overlay: &'o Overlay, n: u8, agent: CellAgent) -> Self {
        assert!((1..=99).contains(&n), "cell {n}: cells are numbered 1 to 99");
        assert!(!overlay.cells.borrow().iter().any(|cell| cell.n == n), "cell {n} runs already");
        let started = Instant::now();
        let ns = NetNs::new(format!("{}cell{n}", overlay.prefix));
        let underlay_ip = Ipv4Addr::new(10, 99, 0, 10 + n);
        overlay.join_underlay(&ns, underlay_ip);
        // The cell routes between its containers and silk-vtep.
        ns.sysctl("net.ipv4.ip_forward", "1");
        let network = Network::new(Some(ns.path()));
        let mut processes = Processes::new(overlay.dir().join(format!("cell{n}")));
        let files = CellFiles { dir: processes.dir().to_owned() };
        files.create_dirs();

        let (ca, (cert, key)) = (overlay.ca_file(), overlay.client_identity());
        let client = Tls { ca: &ca, cert: &cert, key: &key };
        let silk_daemon =
            config::silk_daemon(underlay_ip, &overlay.controller_url, &client, &files);
        let silk_daemon = processes.write_config("silk-daemon", &silk_daemon);
        let policy_server_url = overlay.policy_server.internal_url();
        let agent_config =
            config::vxlan_policy_agent(underlay_ip, &policy_server_url, &client, &files);
        let agent_config = processes.write_config("vxlan-policy-agent", &agent_config);
        processes.write_config("cni-wrapper-plugin", &config::cni_wrapper(underlay_ip, &files));

        let binaries = &overlay.binaries;
        let args = [OsStr::new("-config"), silk_daemon.as_os_str()];
        processes.spawn("silk-daemon", &network, &binaries.join("silk-daemon"), &args);
        let within = Duration::from_secs(30);
        let (subnet, mtu) =
            processes.wait_for("silk-daemon's lease", within, || silk_daemon_answer(&network));
        processes.wait_for("silk-vtep up", within, || vtep_up(&ns).then_some(()));
        if agent == CellAgent::VxlanPolicyAgent {
            start_vxlan_policy_agent(&mut processes, &network, binaries, &agent_config);
        }
        overlay.cells.borrow_mut().push(CellRecord { n, ns: ns.name().to_owned() });
        Self {
            processes,
            ns,
            network,
            overlay,
            n,
            underlay_ip,
            files,
            subnet,
            mtu,
            startup: started.elapsed(),
        }
    }

    /// N.
    pub fn n(&self) -> u8 {
        self.n
    }

    /// The cell's namespace (`PREFIXcellN`): `eth0` on the underlay,
    /// `silk-vtep`, the containers' host-side veths.
    pub fn ns(&self) -> &NetNs {
        &self.ns
    }

    /// 10.99.0.(10+N), on `eth0`.
    pub fn underlay_ip(&self) -> Ipv4Addr {
        self.underlay_ip
    }

    /// The subnet silk-daemon leased (`10.255.X.0/24`), as it answers
    /// `GET http://127.0.0.1:23954/` in the cell; containers get `.2`,
    /// `.3`, ... of it.
    pub fn subnet(&self) -> &str {
        &self.subnet
    }

    /// `silk-vtep`'s MTU, as silk-daemon answers it (the containers').
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The container metadata store cni-wrapper-plugin writes (with
    /// `_lock` and `_version` beside it) and a policy agent reads.
    pub fn metadata_store(&self) -> PathBuf {
        self.files.metadata_store()
    }

    /// vxlan-policy-agent's JSON config for this cell (written also for
    /// [`CellAgent::None`], for another agent to start with): the policy
    /// server's internal URL, the client certificate, the metadata store,
    /// the iptables lock, `underlay_ips`, the force address.
    pub fn vxlan_policy_agent_config(&self) -> PathBuf {
        self.processes.dir().join("vxlan-policy-agent.json")
    }

    /// cni-wrapper-plugin's config for this cell, without the
    /// per-container `metadata` and `runtimeConfig`.
    pub fn cni_config(&self) -> PathBuf {
        self.processes.dir().join("cni-wrapper-plugin.json")
    }

    /// The flock cni-wrapper-plugin takes around its iptables changes.
    pub fn iptables_lock_file(&self) -> PathBuf {
        self.files.iptables_lock()
    }

    /// Where cni-wrapper-plugin calls the policy agent (in the cell's
    /// namespace): 127.0.0.1:8722.
    pub fn force_poll_address(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, FORCE_POLL_PORT))
    }

    /// The CA of the policy server's (and silk-controller's) certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.overlay.ca_file()
    }

    /// The cell's client certificate and key for both servers.
    pub fn client_identity(&self) -> (PathBuf, PathBuf) {
        self.overlay.client_identity()
    }

    /// `GET /force-policy-poll-cycle` on [`Cell::force_poll_address`]: a
    /// full policy cycle, done when it answers. Panics unless it answers
    /// 200.
    pub fn force_poll(&self) {
        if let Err(e) = force_poll(&self.network) {
            panic!("force-policy-poll-cycle on cell {}: {e}\n{}", self.n, self.logs());
        }
    }

    /// Restarts CF's vxlan-policy-agent with `poll_interval` seconds in
    /// its config (which [`Cell::vxlan_policy_agent_config`] says from
    /// now on): killed by its PID, started again, returns once its force
    /// endpoint answers (a forced cycle). Its iptables chain stays in
    /// force meanwhile; the new process replaces it on its first cycle.
    /// Panics unless the cell runs vxlan-policy-agent.
    pub fn restart_vxlan_policy_agent(&mut self, poll_interval: u64) {
        let path = self.vxlan_policy_agent_config();
        let text = std::fs::read(&path).expect("vxlan-policy-agent's config");
        let mut config: serde_json::Value = serde_json::from_slice(&text).expect("JSON");
        config["poll_interval"] = poll_interval.into();
        self.processes.stop("vxlan-policy-agent");
        let path = self.processes.write_config("vxlan-policy-agent", &config);
        let binaries = &self.overlay.binaries;
        start_vxlan_policy_agent(&mut self.processes, &self.network, binaries, &path);
    }

    /// The cell's directory: configs, data (`silk/`, `container-metadata/`,
    /// `host-local/`, `garden-cni/`) and logs.
    pub fn dir(&self) -> &Path {
        self.processes.dir()
    }

    /// The name and PID of every process started for the cell.
    pub fn processes(&self) -> Vec<(&str, u32)> {
        self.processes.pids()
    }

    /// The last lines of silk-daemon's, vxlan-policy-agent's and the CNI
    /// calls' logs.
    pub fn logs(&self) -> String {
        self.processes.logs()
    }

    pub(super) fn network(&self) -> &Network {
        &self.network
    }
}

impl Drop for Cell<'_> {
    fn drop(&mut self) {
        self.overlay.cells.borrow_mut().retain(|cell| cell.n != self.n);
    }
}

/// Starts vxlan-policy-agent with `config` in the cell; returns once its
/// force endpoint answers (a forced cycle), panics with the logs if not
/// within 30 s.
fn start_vxlan_policy_agent(
    processes: &mut Processes,
    network: &Network,
    binaries: &Path,
    config: &Path,
) {
    let args = [OsStr::new("-config-file"), config.as_os_str()];
    processes.spawn("vxlan-policy-agent", network, &binaries.join("vxlan-policy-agent"), &args);
    processes.wait_for("vxlan-policy-agent's force endpoint", Duration::from_secs(30), || {
        force_poll(network).ok()
    });
}

/// silk-daemon's answer in the cell: the leased subnet and the MTU.
fn silk_daemon_answer(network: &Network) -> Option<(String, u32)> {
    let (status, body) = network.curl(&[format!("http://127.0.0.1:{SILK_DAEMON_PORT}/")]).ok()?;
    let answer: serde_json::Value = serde_json::from_str(&body).ok().filter(|_| status == 200)?;
    let mtu = answer["mtu"].as_u64()?.try_into().ok()?;
    Some((answer["overlay_subnet"].as_str()?.to_owned(), mtu))
}

/// Whether `silk-vtep` is up in `ns`.
fn vtep_up(ns: &NetNs) -> bool {
    let out =
        Command::new("ip").args(["-n", ns.name(), "-j", "link", "show", "silk-vtep"]).output();
    let Ok(out) = out else { return false };
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    links[0]["flags"].as_array().is_some_and(|flags| flags.iter().any(|flag| flag == "UP"))
}

/// `GET /force-policy-poll-cycle` in the cell: an error unless 200.
fn force_poll(network: &Network) -> Result<(), String> {
    let url = format!("http://127.0.0.1:{FORCE_POLL_PORT}/force-policy-poll-cycle");
    match network.curl(&[url])? {
        (200, _) => Ok(()),
        (status, body) => Err(format!("HTTP {status}: {body}")),
    }
}
