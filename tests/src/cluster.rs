//! A test cluster on one machine: an underlay (a bridge in a namespace of
//! its own), etcd on it started by the test (by default over mutual TLS
//! with role-based access, as an operator should run it), and hosts joined
//! to it, each a `Host` with its own agent daemon in cluster mode.

use std::{
    cell::RefCell,
    net::{Ipv4Addr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::Arc,
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
    /// The PKI etcd and the agents use, made for this underlay.
    pub pki: Arc<Pki>,
    /// The `etcd_*` lines of the agents' `[cluster]` sections, set by the
    /// etcd started on this underlay.
    etcd_lines: RefCell<String>,
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
        ns.ip(&["link", "set", "lo", "up"]);
        Self { ns, joined: 0, pki: Arc::new(Pki::new()), etcd_lines: RefCell::default() }
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

    /// The `[cluster]` section for host `name` at `underlay`, reaching the
    /// etcd started on this underlay as the agents' etcd user.
    pub fn cluster_config(&self, name: &str, underlay: Ipv4Addr) -> String {
        let etcd = self.etcd_lines.borrow();
        assert!(!etcd.is_empty(), "start etcd on the underlay before the hosts");
        format!(
            "[cluster]\n{etcd}host = \"{name}\"\nunderlay_address = \"{underlay}\"\nlease_seconds = 3\n"
        )
    }
}

impl Default for Underlay {
    fn default() -> Self {
        Self::new()
    }
}

/// A CA and certificates made with `openssl` for one test: etcd's serving
/// certificate (for 172.31.0.254 and 127.0.0.1) and client certificates
/// whose common names are etcd users (`policy-agent`, `root`) or nobody
/// etcd knows (`intruder`). Removed on drop.
pub struct Pki {
    dir: PathBuf,
}

/// A new P-256 key, unencrypted: one argument of `Pki::openssl`, which
/// splits it.
const NEW_KEY: &str = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";

impl Pki {
    /// The client identities made: etcd maps a certificate's CN to a user.
    pub const CLIENTS: [&str; 3] = ["policy-agent", "root", "intruder"];

    fn new() -> Self {
        let pki = Self::empty();
        pki.make_ca("ca", "policy-test etcd CA");
        pki.make_cert(
            "server",
            "etcd",
            &format!(
                "subjectAltName=IP:{},IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n",
                Underlay::ETCD_ADDRESS
            ),
            "ca",
        );
        for client in Self::CLIENTS {
            pki.make_cert(client, client, "extendedKeyUsage=clientAuth\n", "ca");
        }
        pki
    }

    /// A PKI without a CA or certificates yet, in a new temporary
    /// directory: for peers other than etcd, which make their own.
    pub fn empty() -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name("pki"));
        std::fs::create_dir_all(&dir).expect("pki dir");
        Self { dir }
    }

    /// A self-signed CA `NAME.pem`, `NAME-key.pem` in this PKI's directory
    /// (another CA than etcd's when `name` is not "ca").
    pub fn make_ca(&self, name: &str, subject: &str) {
        self.openssl(&[
            "req",
            "-x509",
            "-new",
            NEW_KEY,
            "-days",
            "2",
            "-subj",
            &format!("/CN={subject}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    /// A certificate `NAME.pem` + `NAME-key.pem` for CN `cn` with the
    /// extensions `ext`, signed by the CA `ca`.
    pub fn make_cert(&self, name: &str, cn: &str, ext: &str, ca: &str) {
        let ext_file = format!("{name}.ext");
        std::fs::write(
            self.dir.join(&ext_file),
            format!("basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n{ext}"),
        )
        .expect("extensions file");
        self.openssl(&[
            "req",
            "-new",
            NEW_KEY,
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}-key.pem"),
            "-out",
            &format!("{name}.csr"),
        ]);
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}-key.pem"),
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext_file,
            "-out",
            &format!("{name}.pem"),
        ]);
    }

    fn openssl(&self, args: &[&str]) {
        let out = Command::new("openssl")
            .args(args.iter().flat_map(|a| match *a {
                NEW_KEY => a.split(' ').collect(),
                _ => vec![*a],
            }))
            .current_dir(&self.dir)
            .output()
            .expect("run openssl (`cargo xtask setup` installs it)");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// etcd's CA certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The certificate and key named `name` (a client's CN, or "server").
    pub fn identity(&self, name: &str) -> (PathBuf, PathBuf) {
        (self.dir.join(format!("{name}.pem")), self.dir.join(format!("{name}-key.pem")))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How the test etcd is run.
#[derive(Clone, Copy, Debug)]
pub struct EtcdOptions {
    /// 1, or 3 for a cluster that survives a member's loss.
    pub members: usize,
    /// Client TLS with certificate authentication and role-based access
    /// (the agents' user reaches `/policy-agent/` only); plain HTTP and no
    /// authentication otherwise.
    pub tls: bool,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self { members: 1, tls: true }
    }
}

/// `etcd` processes (Debian's etcd-server) in the underlay namespace, each
/// member with its data in a directory of its own; killed by their PIDs
/// and removed on drop. Members listen for clients on the underlay address,
/// ports 2379, 2479, 2579; they talk to each other on loopback.
pub struct Etcd {
    members: Vec<Option<Child>>,
    options: EtcdOptions,
    ns: PathBuf,
    dir: PathBuf,
    pki: Arc<Pki>,
}

/// The agents' etcd user and the keys its role reaches.
pub const AGENT_USER: &str = "policy-agent";
pub const AGENT_PREFIX: &str = "/policy-agent/";

impl Etcd {
    /// One member, TLS with client certificates and role-based access.
    pub fn start(underlay: &Underlay) -> Self {
        Self::start_with(underlay, EtcdOptions::default())
    }

    pub fn start_with(underlay: &Underlay, options: EtcdOptions) -> Self {
        let dir = std::env::temp_dir().join(crate::unique_name("etcd"));
        std::fs::create_dir_all(&dir).expect("etcd data dir");
        let mut etcd = Self {
            members: (0..options.members).map(|_| None).collect(),
            options,
            ns: underlay.ns.path(),
            dir,
            pki: underlay.pki.clone(),
        };
        etcd.spawn();
        if options.tls {
            etcd.set_up_access();
        }
        *underlay.etcd_lines.borrow_mut() = etcd.agent_config();
        etcd
    }

    /// Member `i`'s client URL.
    pub fn member_url(&self, i: usize) -> String {
        let scheme = if self.options.tls { "https" } else { "http" };
        format!("{scheme}://{}:{}", Underlay::ETCD_ADDRESS, 2379 + 100 * i)
    }

    /// Every member's client URL.
    pub fn urls(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.member_url(i)).collect()
    }

    /// The `etcd_*` lines of an agent's `[cluster]` section.
    pub fn agent_config(&self) -> String {
        let urls: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        let mut lines = format!("etcd_endpoints = [{}]\n", urls.join(", "));
        if self.options.tls {
            let (cert, key) = self.pki.identity(AGENT_USER);
            lines += &format!(
                "etcd_ca_file = \"{}\"\netcd_cert_file = \"{}\"\netcd_key_file = \"{}\"\n",
                self.pki.ca().display(),
                cert.display(),
                key.display()
            );
        } else {
            lines += "etcd_allow_plaintext = true\n";
        }
        lines
    }

    /// Client settings for the agent's etcd client as `identity` (a
    /// client CN of the [`Pki`]).
    pub fn client_settings(&self, identity: &str) -> policy_agent::etcd::Settings {
        policy_agent::etcd::Settings {
            endpoints: self.urls(),
            tls: self.options.tls.then(|| policy_agent::etcd::TlsFiles {
                ca: self.pki.ca(),
                identity: Some(self.pki.identity(identity)),
            }),
            user: None,
            timeout: Duration::from_secs(5),
        }
    }

    /// (Re)starts every member that is not running, on the same data, and
    /// waits until each answers.
    pub fn spawn(&mut self) {
        for i in 0..self.members.len() {
            if self.members[i].is_none() {
                self.spawn_member(i);
            }
        }
    }

    /// (Re)starts member `i` on its data; waits until it listens.
    pub fn spawn_member(&mut self, i: usize) {
        assert!(self.members[i].is_none(), "etcd member {i} is running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("etcd-{i}.log")))
            .expect("etcd log");
        let client = self.member_url(i);
        let peer = |m: usize| format!("http://127.0.0.1:{}", 2380 + 100 * m);
        let initial: Vec<String> =
            (0..self.members.len()).map(|m| format!("m{m}={}", peer(m))).collect();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.display()))
            .args(["etcd", "--name", &format!("m{i}"), "--data-dir"])
            .arg(self.data(i))
            .args(["--listen-client-urls", &client, "--advertise-client-urls", &client])
            .args(["--listen-peer-urls", &peer(i), "--initial-advertise-peer-urls", &peer(i)])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &self.dir.display().to_string()])
            .args(["--listen-metrics-urls", &self.metrics_url(i)]);
        if self.options.tls {
            let (cert, key) = self.pki.identity("server");
            cmd.args(["--client-cert-auth", "--trusted-ca-file"])
                .arg(self.pki.ca())
                .arg("--cert-file")
                .arg(cert)
                .arg("--key-file")
                .arg(key);
        }
        let child = cmd
            // Extra flags for experiments, e.g. "--unsafe-no-fsync" to see
            // what the disk's fsync costs a write.
            .args(std::env::var("POLICY_TEST_ETCD_ARGS").unwrap_or_default().split_whitespace())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start etcd (Debian's etcd-server; `cargo xtask setup` installs it)");
        self.members[i] = Some(child);
        let port = u16::try_from(2379 + 100 * i).expect("port");
        let started = Instant::now();
        while crate::netns::run_in(&self.ns, || {
            TcpStream::connect_timeout(
                &(Underlay::ETCD_ADDRESS, port).into(),
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

    /// Where member `i` serves its Prometheus metrics (`/metrics`), on
    /// loopback without TLS.
    fn metrics_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", 2381 + 100 * i)
    }

    /// The sum over every running member of the samples of `metric` whose
    /// labels include every `labels` pair.
    pub fn metric(&self, metric: &str, labels: &[(&str, &str)]) -> f64 {
        let mut total = 0.0;
        for i in (0..self.members.len()).filter(|i| self.members[*i].is_some()) {
            let out = Command::new("nsenter")
                .arg(format!("--net={}", self.ns.display()))
                .args([
                    "curl",
                    "-s",
                    "--max-time",
                    "3",
                    &format!("{}/metrics", self.metrics_url(i)),
                ])
                .output()
                .expect("curl etcd metrics");
            let text = String::from_utf8_lossy(&out.stdout);
            let scrape = prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned())))
                .expect("etcd metrics");
            for sample in scrape.samples.iter().filter(|s| s.metric == metric) {
                if labels.iter().all(|(k, v)| sample.labels.get(k) == Some(*v)) {
                    total += match sample.value {
                        prometheus_parse::Value::Counter(v)
                        | prometheus_parse::Value::Gauge(v)
                        | prometheus_parse::Value::Untyped(v) => v,
                        _ => 0.0,
                    };
                }
            }
        }
        total
    }

    fn data(&self, i: usize) -> PathBuf {
        self.dir.join(format!("data-{i}"))
    }

    /// Users and roles as an operator sets them up: `root`, and the
    /// agents' user whose role reads and writes their prefix only; then
    /// authentication on (a client certificate's CN names its user).
    fn set_up_access(&self) {
        for args in [
            &["user", "add", "root", "--no-password"][..],
            &["user", "grant-role", "root", "root"],
            &["role", "add", AGENT_USER],
            &["role", "grant-permission", AGENT_USER, "--prefix=true", "readwrite", AGENT_PREFIX],
            &["user", "add", AGENT_USER, "--no-password"],
            &["user", "grant-role", AGENT_USER, AGENT_USER],
            &["auth", "enable"],
        ] {
            let out = self.ctl(args);
            assert!(
                out.status.success(),
                "etcdctl {args:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    /// Runs `etcdctl ARGS` against every member as `root`.
    pub fn ctl(&self, args: &[&str]) -> Output {
        self.ctl_as("root", args)
    }

    /// Runs `etcdctl ARGS` against every member with the client
    /// certificate `identity` (a file name in the [`Pki`]'s directory).
    pub fn ctl_as(&self, identity: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.ns.display()))
            .args(["etcdctl", "--dial-timeout", "3s", "--command-timeout", "5s", "--endpoints"])
            .arg(self.urls().join(","));
        if self.options.tls {
            let (cert, key) = self.pki.identity(identity);
            cmd.arg("--cacert").arg(self.pki.ca()).arg("--cert").arg(cert).arg("--key").arg(key);
        }
        cmd.args(args).env("ETCDCTL_API", "3").output().expect("run etcdctl")
    }

    /// The index of the member that is the leader now.
    pub fn leader(&self) -> Option<usize> {
        let out = self.ctl(&["endpoint", "status", "-w", "json"]);
        let statuses: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        statuses.as_array()?.iter().find_map(|s| {
            let status = &s["Status"];
            let leader = status["leader"].as_u64()?;
            (status["header"]["member_id"].as_u64()? == leader)
                .then(|| s["Endpoint"].as_str())
                .flatten()
                .and_then(|url| self.urls().iter().position(|u| u == url))
        })
    }

    /// SIGKILL every member (an etcd crash); `spawn` brings them back on
    /// the same data.
    pub fn kill(&mut self) {
        for i in 0..self.members.len() {
            self.kill_member(i);
        }
    }

    /// SIGKILL member `i`.
    pub fn kill_member(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        (0..self.members.len())
            .map(|i| {
                let log = std::fs::read_to_string(self.dir.join(format!("etcd-{i}.log")));
                format!("--- member {i}\n{}", log.unwrap_or_default())
            })
            .collect()
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
    make_hosts(underlay, count, |i| Host::with_subnet(containers, i), "", cluster_extra)
}

/// [`hosts`] with agent settings (top-level lines of the config, e.g.
/// `listen`, `mtls_apps`) for every host.
pub fn hosts_configured(
    underlay: &mut Underlay,
    count: u8,
    containers: usize,
    settings: &str,
) -> Vec<ClusterHost> {
    make_hosts(underlay, count, |i| Host::with_subnet(containers, i), settings, "")
}

/// [`hosts`] with dual-stack containers (their IPv6 addresses under
/// [`IPV6_PREFIX`]), the agents routing IPv6 between hosts.
pub fn dual_stack_hosts(underlay: &mut Underlay, count: u8, containers: usize) -> Vec<ClusterHost> {
    let extra = format!("ipv6_prefix = \"{IPV6_PREFIX}\"\n");
    make_hosts(underlay, count, |i| Host::dual_stack_with_subnet(containers, i), "", &extra)
}

fn make_hosts(
    underlay: &mut Underlay,
    count: u8,
    host: impl Fn(u8) -> Host,
    settings: &str,
    cluster_extra: &str,
) -> Vec<ClusterHost> {
    (0..count)
        .map(|i| {
            let host = host(i);
            let address = underlay.join(&host);
            let name = format!("cell-{i}");
            let cluster = underlay.cluster_config(&name, address);
            let config = format!("{settings}\n{cluster}{cluster_extra}");
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

/// What an operator does to etcd's data: a backup, a restore of it, a
/// wipe. Each stops every member (by its PID) and starts them again.
impl Etcd {
    /// A copy of every member's data directory as it is now (etcd stopped
    /// for the copy, then started again): a backup; kept until etcd is
    /// dropped.
    pub fn backup(&mut self) -> PathBuf {
        self.kill();
        let backup = self.dir.join(crate::unique_name("backup"));
        std::fs::create_dir_all(&backup).expect("backup dir");
        for i in 0..self.members.len() {
            copy_dir(&self.data(i), &backup.join(format!("data-{i}")));
        }
        self.spawn();
        backup
    }

    /// etcd started again on a copy of `backup` (a restore).
    pub fn restore(&mut self, backup: &Path) {
        self.kill();
        for i in 0..self.members.len() {
            let _ = std::fs::remove_dir_all(self.data(i));
            copy_dir(&backup.join(format!("data-{i}")), &self.data(i));
        }
        self.spawn();
    }

    /// etcd started again on empty data directories, its users and roles
    /// set up again as an operator would (the data is gone, not the rules).
    pub fn wipe(&mut self) {
        self.kill();
        for i in 0..self.members.len() {
            std::fs::remove_dir_all(self.data(i)).expect("remove etcd's data");
        }
        self.spawn();
        if self.options.tls {
            self.set_up_access();
        }
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let status = Command::new("cp").arg("-a").arg(from).arg(to).status().expect("run cp");
    assert!(status.success(), "cp -a {} {}", from.display(), to.display());
}

/// A policy in the external API's shape: `source` to `destination` on TCP
/// `port`.
pub fn policy(source: &str, destination: &str, port: u16) -> serde_json::Value {
    serde_json::json!({"source": {"id": source}, "destination": {"id": destination, "protocol": "tcp", "ports": {"start": port, "end": port}}})
}

/// The body of a policies write.
pub fn body(policies: &[serde_json::Value]) -> String {
    serde_json::json!({ "policies": policies }).to_string()
}

/// Host `h`'s frontend (container 0) and backend (container 1) with an echo
/// server on 8080 and 9000, registered with that host's agent.
pub fn frontend_and_backend(h: &ClusterHost) -> (Ipv4Addr, Ipv4Addr) {
    let (frontend, backend) = (h.host.container(0), h.host.container(1));
    h.daemon.register(frontend, "frontend");
    h.daemon.register(backend, "backend");
    crate::traffic::tcp_echo_server(&backend.ns, backend.ip, 8080);
    crate::traffic::tcp_echo_server(&backend.ns, backend.ip, 9000);
    (frontend.ip, backend.ip)
}

/// Whether `h`'s frontend (container 0) reaches `to` on TCP `port`.
pub fn reaches(h: &ClusterHost, to: Ipv4Addr, port: u16) -> bool {
    crate::traffic::tcp_echo_works(&h.host.container(0).ns, to, port, crate::traffic::SHORT)
}
