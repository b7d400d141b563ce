//! A test cluster on one machine: an underlay (a bridge in a namespace of
//! its own), an etcd process on it started by the test, and hosts joined
//! to it, each a `Host` with its own agent daemon in cluster mode.

use std::{
    net::{Ipv4Addr, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::{
    daemon::Daemon,
    netns::NetNs,
    topology::{Host, IPV6_PREFIX},
};

/// The underlay network, 172.31.0.0/24; etcd listens on its bridge.
pub struct Underlay {
    pub ns: NetNs,
    joined: u8,
}

impl Underlay {
    /// The bridge's address: where etcd listens.
    pub const ETCD_ADDRESS: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 254);

    pub fn new() -> Self {
        let ns = NetNs::new(crate::unique_name("ul"));
        // A fixed address: a bridge without one takes its lowest port's,
        // which changes as hosts join and leaves stale ARP entries for etcd.
        ns.ip(&["link", "add", "br0", "address", "02:00:00:00:00:fe", "type", "bridge"]);
        ns.ip(&["addr", "add", &format!("{}/24", Self::ETCD_ADDRESS), "dev", "br0"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Self { ns, joined: 0 }
    }

    /// Joins `host` to the underlay; returns its underlay address
    /// (172.31.0.1, .2, ... in joining order), on its interface `ul0`.
    pub fn join(&mut self, host: &Host) -> Ipv4Addr {
        self.joined += 1;
        let address = Ipv4Addr::new(172, 31, 0, self.joined);
        let port = format!("u{}", self.joined);
        self.ns.ip(&[
            "link",
            "add",
            &port,
            "type",
            "veth",
            "peer",
            "name",
            "ul0",
            "netns",
            host.ns.name(),
        ]);
        self.ns.ip(&["link", "set", &port, "master", "br0"]);
        self.ns.ip(&["link", "set", &port, "up"]);
        host.ns.ip(&["addr", "add", &format!("{address}/24"), "dev", "ul0"]);
        host.ns.ip(&["link", "set", "ul0", "up"]);
        address
    }
}

impl Default for Underlay {
    fn default() -> Self {
        Self::new()
    }
}

/// An `etcd` process (Debian's etcd-server) in the underlay namespace, with
/// its data in a directory of its own; killed by its PID and removed on drop.
pub struct Etcd {
    child: Option<Child>,
    ns: PathBuf,
    dir: PathBuf,
}

impl Etcd {
    pub fn start(underlay: &Underlay) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name("etcd"));
        std::fs::create_dir_all(&dir).expect("etcd data dir");
        let mut etcd = Self { child: None, ns: underlay.ns.path(), dir };
        etcd.spawn();
        etcd
    }

    /// `http://ADDRESS:2379`, for the agents' `etcd_endpoints`.
    pub fn url() -> String {
        format!("http://{}:2379", Underlay::ETCD_ADDRESS)
    }

    /// (Re)starts etcd on the same data, and waits until it answers.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "etcd is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("etcd.log"))
            .expect("etcd log");
        let client = Self::url();
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.ns.display()))
            .args(["etcd", "--name", "test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-advertise-peer-urls", "http://127.0.0.1:2380"])
            .args(["--initial-cluster", "test=http://127.0.0.1:2380"])
            // Extra flags for experiments, e.g. "--unsafe-no-fsync" to see
            // what the disk's fsync costs a write.
            .args(std::env::var("POLICY_TEST_ETCD_ARGS").unwrap_or_default().split_whitespace())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian's etcd-server; `cargo xtask setup` installs it)");
        self.child = Some(child);
        let started = Instant::now();
        while crate::netns::run_in(&self.ns, || {
            TcpStream::connect_timeout(
                &(Underlay::ETCD_ADDRESS, 2379).into(),
                Duration::from_millis(200),
            )
        })
        .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "etcd did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGKILL (an etcd crash); `spawn` brings it back on the same data.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("etcd log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `[cluster]` section for host `name` at `underlay`.
pub fn cluster_config(name: &str, underlay: Ipv4Addr) -> String {
    format!(
        "[cluster]\netcd_endpoints = [\"{}\"]\netcd_allow_plaintext = true\nhost = \"{name}\"\nunderlay_address = \"{underlay}\"\nlease_seconds = 3\n",
        Etcd::url()
    )
}

/// A host of the test cluster: its namespaces, containers and agent.
pub struct ClusterHost {
    pub daemon: Daemon,
    pub host: Host,
    pub name: String,
    pub underlay: Ipv4Addr,
}

/// Hosts `cell-0`, `cell-1`, ... each with `containers` containers in its
/// own /24 (10.255.I.0), joined to `underlay`, each running an agent in
/// cluster mode against `etcd`.
pub fn hosts(underlay: &mut Underlay, count: u8, containers: usize) -> Vec<ClusterHost> {
    hosts_with(underlay, count, containers, "")
}

/// [`hosts`] with extra lines in each host's `[cluster]` section.
pub fn hosts_with(
    underlay: &mut Underlay,
    count: u8,
    containers: usize,
    cluster_extra: &str,
) -> Vec<ClusterHost> {
    make_hosts(underlay, count, |i| Host::with_subnet(containers, i), cluster_extra)
}

/// [`hosts`] with dual-stack containers (their IPv6 addresses under
/// [`IPV6_PREFIX`]), the agents routing IPv6 between hosts.
pub fn dual_stack_hosts(underlay: &mut Underlay, count: u8, containers: usize) -> Vec<ClusterHost> {
    let extra = format!("ipv6_prefix = \"{IPV6_PREFIX}\"\n");
    make_hosts(underlay, count, |i| Host::dual_stack_with_subnet(containers, i), &extra)
}

fn make_hosts(
    underlay: &mut Underlay,
    count: u8,
    host: impl Fn(u8) -> Host,
    cluster_extra: &str,
) -> Vec<ClusterHost> {
    (0..count)
        .map(|i| {
            let host = host(i);
            let address = underlay.join(&host);
            let name = format!("cell-{i}");
            let config = format!("{}{cluster_extra}", cluster_config(&name, address));
            let daemon = Daemon::start(&host.ns, &config);
            ClusterHost { daemon, host, name, underlay: address }
        })
        .collect()
}

/// A VXLAN packet's UDP payload as a forger writes it: Group Based Policy
/// flags (G|I) with `tag` as the group, VNI 1, then an Ethernet frame to
/// `mac` (`aa:bb:...`) carrying the IPv4 packet `inner`.
pub fn vxlan_gbp(tag: u16, mac: &str, inner: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x88, 0x00];
    frame.extend_from_slice(&tag.to_be_bytes());
    frame.extend_from_slice(&[0, 0, 1, 0]);
    frame.extend(mac.split(':').map(|b| u8::from_str_radix(b, 16).expect("hex MAC")));
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99, 0x08, 0x00]);
    frame.extend_from_slice(inner);
    frame
}
