//! Cloud Foundry's container networking for real, as the cf-silk
//! fixture's `two-cells.sh` brings it up: Diego-cell-like network
//! namespaces on one underlay, each with silk-daemon (a leased /24 of the
//! overlay, the `silk-vtep` VXLAN device with Group Based Policy) and,
//! where a test asks, CF's vxlan-policy-agent; containers made by CF's
//! cni-wrapper-plugin → silk-cni → host-local; CF's policy server and
//! silk-controller in a control-plane namespace. For tests of an agent
//! that takes vxlan-policy-agent's place on a cell ([`CellAgent::None`]).
//!
//! ```text
//! PREFIXul   br0 (the underlay bridge)
//!   ├─ PREFIXctl    10.99.0.1   Postgres, policy-server (external API on lo),
//!   │                           policy-server-internal and silk-controller
//!   │                           (mutual TLS) on 10.99.0.1
//!   ├─ PREFIXcell1  10.99.0.11  silk-daemon [+ vxlan-policy-agent]
//!   │     └─ containers (PREFIXNAME): 10.255.X.2, .3, ... of cell 1's lease
//!   └─ PREFIXcell2  10.99.0.12  ...
//! ```
//!
//! Every process runs in its namespace through nsenter (not `ip netns
//! exec`, which remounts /sys): the PIDs held are the programs' own. All
//! of it is killed by those PIDs, and every namespace and directory
//! removed, on drop, also when a test panics: containers and cells (which
//! borrow their overlay) before the overlay.

mod cell;
mod config;
mod container;
mod processes;

use std::{
    cell::RefCell,
    ffi::OsStr,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

pub use self::{
    cell::{Cell, CellAgent},
    container::SilkContainer,
};
use self::{config::Tls, processes::Processes};
use crate::{
    cf::{PolicyServer, fixture, network::Network},
    netns::NetNs,
};

/// The control plane's underlay address: policy-server-internal and
/// silk-controller listen here. Cell N is at 10.99.0.(10+N).
pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
/// The overlay silk-controller leases a /24 of to each cell.
pub const OVERLAY_NETWORK: &str = "10.255.0.0/16";
/// silk-daemon's `health_check_port` in each cell (127.0.0.1): `GET /`
/// gives the cell's lease; silk-cni's `daemonPort`.
pub const SILK_DAEMON_PORT: u16 = 23954;
/// vxlan-policy-agent's force endpoints in each cell (127.0.0.1), which
/// cni-wrapper-plugin calls.
pub const FORCE_POLL_PORT: u16 = 8722;
/// The name silk-controller's certificate has besides the policy server's.
pub const SILK_CONTROLLER_NAME: &str = "silk-controller.service.cf.internal";

const SUBNET_PREFIX_LENGTH: u8 = 24;
/// UDP on 127.0.0.1 for dropsonde metrics; nothing listens.
const METRON_PORT: u16 = 3457;
/// silk-controller's database, beside the policy server's.
const DATABASE: &str = "silk_controller";

/// The control plane and the underlay; cells join it with
/// [`Overlay::add_cell`].
pub struct Overlay {
    /// silk-controller, and the directory of the overlay's files (the
    /// cells' below it).
    controller: Processes,
    policy_server: PolicyServer,
    control: NetNs,
    underlay: NetNs,
    /// Of every namespace's name: 8 characters, so that a cell's underlay
    /// veth (`PREFIXcellNNu`) fits in 15.
    prefix: String,
    binaries: PathBuf,
    controller_url: String,
    /// The cells running now.
    cells: RefCell<Vec<CellRecord>>,
    /// How long [`Overlay::start`] took.
    pub startup: Duration,
}

/// What the overlay knows of a running cell, to check its routes.
struct CellRecord {
    n: u8,
    ns: String,
}

/// One of silk-controller's active leases (`GET /leases`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    pub underlay_ip: Ipv4Addr,
    /// `10.255.X.0/24`.
    pub overlay_subnet: String,
    /// The VTEP's MAC: `ee:ee:` and the subnet's address.
    pub overlay_hardware_addr: String,
}

impl Overlay {
    /// The underlay bridge, the control-plane namespace at [`CONTROL_IP`],
    /// Postgres with the databases `policy_server` and `silk_controller`,
    /// CF's policy server (its internal API on [`CONTROL_IP`]) and
    /// silk-controller, on ports picked free; all certificates RSA, as in
    /// a CF deployment (the servers' only TLS 1.2 suites are ECDHE-RSA; CF's
    /// Go clients negotiate TLS 1.3, where P-256 would do too), the server
    /// one naming both servers, 10.99.0.1 and 127.0.0.1. Returns once
    /// silk-controller answers; panics with the logs otherwise.
    pub fn start() -> Self {
        let started = Instant::now();
        let binaries = fixture::silk_binaries();
        let prefix = unique_prefix();
        let underlay = NetNs::new(format!("{prefix}ul"));
        underlay.ip(&["link", "add", "br0", "type", "bridge"]);
        underlay.ip(&["link", "set", "br0", "up"]);
        let control = NetNs::new(format!("{prefix}ctl"));
        join_underlay(&underlay, &control, CONTROL_IP);
        let policy_server = PolicyServer::builder()
            .internal_host(CONTROL_IP)
            .rsa_keys()
            .server_name(&format!("DNS:{SILK_CONTROLLER_NAME}"))
            .start_in(&control);
        policy_server.create_database(DATABASE);

        let network = Network::new(Some(control.path()));
        let [port, health_check_port, debug_server_port] = network.free_ports();
        let mut controller = Processes::new(std::env::temp_dir().join(&prefix));
        let (ca, (cert, key)) = (policy_server.ca_file(), policy_server.server_identity());
        let server = Tls { ca: &ca, cert: &cert, key: &key };
        let config = config::silk_controller(
            (CONTROL_IP, port),
            health_check_port,
            debug_server_port,
            &server,
            (policy_server.postgres_port(), DATABASE),
        );
        let config = controller.write_config("silk-controller", &config);
        let args = [OsStr::new("-config"), config.as_os_str()];
        controller.spawn("silk-controller", &network, &binaries.join("silk-controller"), &args);
        let controller_url = format!("https://{CONTROL_IP}:{port}");
        let (client_cert, client_key) = policy_server.client_identity();
        let client = Tls { ca: &ca, cert: &client_cert, key: &client_key };
        controller.wait_for("silk-controller's lease API", Duration::from_secs(30), || {
            fetch_leases(&network, &controller_url, &client).ok()
        });
        Self {
            controller,
            policy_server,
            control,
            underlay,
            prefix,
            binaries,
            controller_url,
            cells: RefCell::default(),
            startup: started.elapsed(),
        }
    }

    /// Cell `n` (1 to 99) at 10.99.0.(10+n), with silk-daemon and, for
    /// [`CellAgent::VxlanPolicyAgent`], CF's vxlan-policy-agent: see
    /// [`Cell`]. Panics (with the logs) unless they come up.
    pub fn add_cell(&self, n: u8, agent: CellAgent) -> Cell<'_> {
        Cell::start(self, n, agent)
    }

    /// Waits until every running cell's silk-daemon has converged on every
    /// other active lease (a route via `silk-vtep` to its subnet, and an
    /// FDB entry to its underlay address), which it does on its poll, once
    /// a second here; how long that took. Panics after 10 s naming what
    /// is missing.
    pub fn wait_for_peers(&self) -> Duration {
        let started = Instant::now();
        let mut missing = Vec::new();
        while started.elapsed() < Duration::from_secs(10) {
            missing = self.missing_peers();
            if missing.is_empty() {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("cells did not learn each other's leases within 10 s: {}", missing.join("; "));
    }

    /// What each cell lacks of the others' leases.
    fn missing_peers(&self) -> Vec<String> {
        let leases = self.leases();
        let mut missing = Vec::new();
        for cell in self.cells.borrow().iter() {
            let routes = json_lines(&["ip", "-n", &cell.ns, "-j", "route", "show", "dev"]);
            let fdb = json_lines(&["bridge", "-n", &cell.ns, "-j", "fdb", "show", "dev"]);
            let own = Ipv4Addr::new(10, 99, 0, 10 + cell.n);
            for lease in leases.iter().filter(|lease| lease.underlay_ip != own) {
                let has = |entries: &[serde_json::Value], value: &str| {
                    entries.iter().any(|entry| entry["dst"].as_str() == Some(value))
                };
                if !has(&routes, &lease.overlay_subnet)
                    || !has(&fdb, &lease.underlay_ip.to_string())
                {
                    missing.push(format!("cell {}: {lease:?}", cell.n));
                }
            }
        }
        missing
    }

    /// silk-controller's active leases, every cell's (and any other
    /// client's of it); panics if it does not answer.
    pub fn leases(&self) -> Vec<Lease> {
        let network = Network::new(Some(self.control.path()));
        let (ca, (cert, key)) = (self.ca_file(), self.client_identity());
        fetch_leases(&network, &self.controller_url, &Tls { ca: &ca, cert: &cert, key: &key })
            .unwrap_or_else(|e| panic!("GET {}/leases: {e}\n{}", self.controller_url, self.logs()))
    }

    /// CF's policy server: write policies with
    /// [`PolicyServer::add_policies`]; its internal API is on
    /// [`CONTROL_IP`].
    pub fn policy_server(&self) -> &PolicyServer {
        &self.policy_server
    }

    /// silk-controller's base URL (`https://10.99.0.1:PORT`, mutual TLS
    /// with [`Overlay::client_identity`]).
    pub fn controller_url(&self) -> &str {
        &self.controller_url
    }

    /// The CA of every certificate here (a cell's `ca_cert_file`).
    pub fn ca_file(&self) -> PathBuf {
        self.policy_server.ca_file()
    }

    /// The cells' client certificate and key (RSA; for both servers).
    pub fn client_identity(&self) -> (PathBuf, PathBuf) {
        self.policy_server.client_identity()
    }

    /// The control plane's namespace (10.99.0.1).
    pub fn control_ns(&self) -> &NetNs {
        &self.control
    }

    /// The underlay bridge's namespace (`br0`, a port per namespace).
    pub fn underlay_ns(&self) -> &NetNs {
        &self.underlay
    }

    /// The start of every namespace name here (8 characters).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The name and PID of every control-plane process (Postgres, the
    /// policy servers, silk-controller).
    pub fn processes(&self) -> Vec<(&str, u32)> {
        let mut all = self.policy_server.processes();
        all.extend(self.controller.pids());
        all
    }

    /// The last lines of silk-controller's and the policy server's logs.
    pub fn logs(&self) -> String {
        format!("{}{}", self.controller.logs(), self.policy_server.logs())
    }

    fn dir(&self) -> &Path {
        self.controller.dir()
    }

    fn join_underlay(&self, ns: &NetNs, ip: Ipv4Addr) {
        join_underlay(&self.underlay, ns, ip);
    }
}

/// A veth from `ns` (`eth0`, at `ip`/24) into the underlay bridge
/// (`NSu`), made in the underlay namespace: nothing passes through the
/// test's own.
fn join_underlay(underlay: &NetNs, ns: &NetNs, ip: Ipv4Addr) {
    let port = format!("{}u", ns.name());
    let veth = format!("link add {port} type veth peer name eth0 netns {}", ns.name());
    underlay.ip(&veth.split(' ').collect::<Vec<_>>());
    underlay.ip(&["link", "set", &port, "master", "br0", "up"]);
    ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "eth0"]);
    ns.ip(&["link", "set", "eth0", "up"]);
}

/// `GET {url}/leases` with mutual TLS from `network`.
fn fetch_leases(network: &Network, url: &str, client: &Tls) -> Result<Vec<Lease>, String> {
    let url = format!("{url}/leases");
    let args = [
        OsStr::new("--cacert"),
        client.ca.as_os_str(),
        OsStr::new("--cert"),
        client.cert.as_os_str(),
        OsStr::new("--key"),
        client.key.as_os_str(),
        OsStr::new(&url),
    ];
    let (status, body) = network.curl(&args)?;
    if status != 200 {
        return Err(format!("HTTP {status}: {body}"));
    }
    let answer: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))?;
    let leases = answer["leases"].as_array().ok_or_else(|| format!("no leases in {body}"))?;
    leases
        .iter()
        .map(|lease| {
            let text = |key: &str| lease[key].as_str().map(str::to_owned);
            Some(Lease {
                underlay_ip: text("underlay_ip")?.parse().ok()?,
                overlay_subnet: text("overlay_subnet")?,
                overlay_hardware_addr: text("overlay_hardware_addr")?,
            })
        })
        .collect::<Option<_>>()
        .ok_or_else(|| format!("a lease unlike silk-controller's: {body}"))
}

/// `PROGRAM ARGS silk-vtep` (iproute2 with `-j`): its JSON array, empty if
/// the command fails (no `silk-vtep` yet).
fn json_lines(command: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new(command[0]).args(&command[1..]).arg("silk-vtep").output();
    out.ok()
        .filter(|out| out.status.success())
        .and_then(|out| serde_json::from_slice(&out.stdout).ok())
        .unwrap_or_default()
}

/// A prefix of exactly 8 characters no namespace has now: `s`, this
/// process's PID in 5 base-36 digits, a counter in 2. Fixed-length, so one
/// overlay's prefix never starts another's; checked against
/// `/run/netns`, so a namespace a killed run left behind is not reused.
fn unique_prefix() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % (36 * 36);
        let prefix = format!("s{}{}", base36(std::process::id(), 5), base36(n, 2));
        let taken = std::fs::read_dir("/run/netns").into_iter().flatten().any(|entry| {
            entry.is_ok_and(|entry| entry.file_name().to_string_lossy().starts_with(&prefix))
        });
        if !taken && !std::env::temp_dir().join(&prefix).exists() {
            return prefix;
        }
    }
}

/// `value` in `width` base-36 digits (lower case), the low ones if wider.
fn base36(mut value: u32, width: usize) -> String {
    let mut digits = vec![b'0'; width];
    for digit in digits.iter_mut().rev() {
        *digit = b"0123456789abcdefghijklmnopqrstuvwxyz"[(value % 36) as usize];
        value /= 36;
    }
    String::from_utf8(digits).expect("ASCII digits")
}
