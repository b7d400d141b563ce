//! Cloud Foundry's real policy server for the tests, started by them:
//! Postgres 15 on a data directory of its own, `migrate-db`, the external
//! API (`policy-server`, plain HTTP, bearer tokens checked by a UAA
//! stand-in in this process) and the internal mutual-TLS API
//! (`policy-server-internal`) that every cell polls, all on the loopback of
//! the test process's own network namespace or of one a test made (where
//! a policy agent under test can reach them). Everything started here is
//! stopped by its PID and removed on drop, also when a test panics.
//! Security groups, which the server learns only from Cloud Controller,
//! are written into its database (`security_groups`).
//! [`PolicyServer::builder`] starts it for other cells to reach (its
//! internal API on another address, RSA keys), as Cloud Foundry's silk
//! ([`crate::silk`]) needs it.

mod builder;
mod bulk;
pub(crate) mod fixture;
pub(crate) mod network;
mod postgres;
mod rsa;
mod security_groups;
mod uaa;

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

pub use self::builder::PolicyServerBuilder;
use self::{builder::Keys, network::Network, postgres::Postgres, uaa::UaaStandIn};
use crate::{cluster::Pki, netns::NetNs};

/// The database the servers use.
const DATABASE: &str = "policy_server";
/// The server the cells poll (killed and restarted by fail-static tests).
const INTERNAL_SERVER: &str = "policy-server-internal";
/// The bearer token the UAA stand-in accepts (any other is refused).
pub const TOKEN: &str = "policy-test-admin-token";
/// The internal API's path prefix.
pub const INTERNAL_API: &str = "/networking/v1/internal";
/// The internal server certificate's name, as a cell's config names it.
pub const INTERNAL_HOST: &str = "policy-server.service.cf.internal";

/// A policy as `cf add-network-policy` writes it: source app, destination
/// app, protocol (`tcp`, `udp`), first and last port.
pub type Policy<'a> = (&'a str, &'a str, &'a str, u16, u16);

/// CF's policy server and its database, running for one test.
pub struct PolicyServer {
    /// The servers' configs and every log (root's).
    dir: PathBuf,
    /// The fixture's unpacked binaries.
    binaries: PathBuf,
    /// Where every process below runs and every request is made from.
    network: Network,
    postgres: Option<Postgres>,
    /// `policy-server`, `policy-server-internal`, in starting order.
    servers: Vec<(&'static str, Child)>,
    pki: Pki,
    uaa: Option<UaaStandIn>,
    ports: Ports,
    /// How it was started: where the internal API listens, the keys.
    options: PolicyServerBuilder,
    /// How long [`PolicyServer::start`] (or `start_in`) took.
    pub startup: Duration,
}

/// The loopback ports, picked in the servers' network at start and kept
/// for their life: a restarted server listens where it did.
struct Ports {
    postgres: u16,
    external: u16,
    internal: u16,
    internal_health: u16,
    external_debug: u16,
    internal_debug: u16,
    /// Nothing listens here: the servers' metrics go nowhere.
    metron: u16,
}

impl Ports {
    fn pick(network: &Network) -> Self {
        let [postgres, external, internal, internal_health, external_debug, internal_debug, metron] =
            network.free_ports();
        Self {
            postgres,
            external,
            internal,
            internal_health,
            external_debug,
            internal_debug,
            metron,
        }
    }
}

impl PolicyServer {
    /// Starts Postgres, migrates the database and starts both servers, in
    /// the test process's own network namespace; returns once both answer
    /// their health checks. Panics saying what failed (with the logs)
    /// otherwise.
    pub fn start() -> Self {
        Self::builder().start()
    }

    /// As [`PolicyServer::start`], but every process listens on the
    /// loopback of `ns` (whose `lo` [`NetNs::new`] brings up), and every
    /// request made here is made from there (so needs `ns`; dropping `ns`
    /// first still stops and removes everything).
    pub fn start_in(ns: &NetNs) -> Self {
        Self::builder().start_in(ns)
    }

    /// A policy server started other than by [`PolicyServer::start`]: its
    /// internal API elsewhere, RSA keys, more certificate names.
    pub fn builder() -> PolicyServerBuilder {
        PolicyServerBuilder::default()
    }

    fn start_on(netns: Option<PathBuf>, options: PolicyServerBuilder) -> Self {
        let started = Instant::now();
        let binaries = fixture::binaries();
        let network = Network::new(netns);
        let ports = Ports::pick(&network);
        let dir = std::env::temp_dir().join(crate::unique_name("cfps"));
        fs::create_dir_all(&dir).expect("policy server temp dir");
        let mut server = Self {
            dir,
            binaries,
            network,
            postgres: None,
            servers: Vec::new(),
            pki: Pki::empty(),
            uaa: None,
            ports,
            options,
            startup: Duration::ZERO,
        };
        server.make_pki();
        server.uaa = Some(UaaStandIn::start(&server.network));
        server.postgres = Some(Postgres::start(
            &server.network,
            server.dir.with_extension("pgdata"),
            server.ports.postgres,
            &server.dir.join("postgres.log"),
            DATABASE,
        ));
        let external = server.external_config();
        let internal = server.internal_config();
        server.run_to_end("migrate-db", &external);
        server.spawn("policy-server", &external);
        server.spawn(INTERNAL_SERVER, &internal);
        server.wait_healthy(&format!("http://127.0.0.1:{}/health", server.ports.external));
        server.wait_internal_healthy();
        server.startup = started.elapsed();
        server
    }

    /// Kills `policy-server-internal` (SIGKILL, as a crash): the cells'
    /// polls then find nothing listening. Panics unless it was running.
    pub fn kill_internal(&mut self) {
        let at = self.servers.iter().position(|(name, _)| *name == INTERNAL_SERVER);
        let (_, mut child) =
            self.servers.remove(at.unwrap_or_else(|| panic!("{INTERNAL_SERVER} is not running")));
        child.kill().unwrap_or_else(|e| panic!("kill {INTERNAL_SERVER}: {e}"));
        child.wait().unwrap_or_else(|e| panic!("wait for {INTERNAL_SERVER}: {e}"));
    }

    /// Starts `policy-server-internal` again, on the same port with the
    /// same certificates; returns once it answers its health check.
    /// Panics if it is running already.
    pub fn start_internal(&mut self) {
        assert!(
            !self.servers.iter().any(|(name, _)| *name == INTERNAL_SERVER),
            "{INTERNAL_SERVER} is running already"
        );
        self.spawn(INTERNAL_SERVER, &self.config_path(INTERNAL_SERVER));
        self.wait_internal_healthy();
    }

    /// The internal API's port (on loopback, or the builder's
    /// `internal_host`).
    pub fn internal_port(&self) -> u16 {
        self.ports.internal
    }

    /// The internal API's base URL (what a cell's `policy_server_url`
    /// says), by address (127.0.0.1 unless the builder said another): the
    /// certificate names it too.
    pub fn internal_url(&self) -> String {
        format!("https://{}:{}", self.options.internal_host, self.ports.internal)
    }

    /// The external API's base URL (plain HTTP on loopback).
    pub fn external_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.ports.external)
    }

    /// The CA that signed the internal server's certificate and the
    /// cells' client certificates (a cell's `ca_cert_file`).
    pub fn ca_file(&self) -> PathBuf {
        self.pki.ca()
    }

    /// A cell's client certificate and key (`client_cert_file`,
    /// `client_key_file`).
    pub fn client_identity(&self) -> (PathBuf, PathBuf) {
        self.pki.identity("cell")
    }

    /// The internal server's certificate and key, for another server of
    /// the same cells to present (give it its names with
    /// [`PolicyServerBuilder::server_name`]).
    pub fn server_identity(&self) -> (PathBuf, PathBuf) {
        self.pki.identity("server")
    }

    /// Where Postgres listens on its network's loopback (user `postgres`,
    /// no password), for another server that keeps its data there too.
    pub fn postgres_port(&self) -> u16 {
        self.ports.postgres
    }

    /// Creates the database `name` beside the policy server's, for
    /// another server of the same deployment (silk-controller); panics
    /// if Postgres refuses.
    pub fn create_database(&self, name: &str) {
        let postgres = self.postgres.as_ref().expect("postgres runs while the server does");
        if let Err(e) = postgres.create_database(&self.network, name) {
            panic!("createdb {name}: {e}\n{}", self.logs());
        }
    }

    /// A client certificate and key of the same CN from another CA: the
    /// internal server must refuse it.
    pub fn stranger_identity(&self) -> (PathBuf, PathBuf) {
        self.pki.identity("stranger")
    }

    /// Adds `policies` through the external API, as `cf add-network-policy`
    /// does; panics unless the server answers 200.
    pub fn add_policies(&self, policies: &[Policy]) {
        self.external_write("policies", policies);
    }

    /// Deletes `policies` through the external API, as
    /// `cf remove-network-policy` does; panics unless the server answers 200.
    pub fn delete_policies(&self, policies: &[Policy]) {
        self.external_write("policies/delete", policies);
    }

    fn external_write(&self, path: &str, policies: &[Policy]) {
        let body = policies_body(policies);
        let url = format!("{}/networking/v1/external/{path}", self.external_url());
        let auth = format!("Authorization: Bearer {TOKEN}");
        let (status, answer) = self
            .network
            .curl(&[
                "-X",
                "POST",
                "-H",
                &auth,
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                &body,
                &url,
            ])
            .unwrap_or_else(|e| panic!("POST {url}: {e}\n{}", self.logs()));
        assert_eq!(status, 200, "POST {url} {body}: {answer}");
    }

    /// The agent's own client of the internal API, with the cell's
    /// client certificate. It connects from the network namespace of the
    /// thread that calls it: for a server started with
    /// [`PolicyServer::start_in`], call it within [`NetNs::run`].
    pub fn cell_client(&self) -> policy_agent::cf::PolicyServerClient {
        let (cert, key) = self.client_identity();
        let config: policy_agent::cf::CfConfig = serde_json::from_value(serde_json::json!({
            "policy_server_url": self.internal_url(),
            "ca_cert_file": self.ca_file(),
            "client_cert_file": cert,
            "client_key_file": key,
            "client_timeout": "5s",
        }))
        .expect("a [cf] section for the test's policy server");
        policy_agent::cf::PolicyServerClient::new(&config)
            .expect("a client of the test's policy server")
    }

    /// `GET {INTERNAL_API}/{path}` with the cell's client certificate; the
    /// answer as JSON. Panics if the request fails.
    pub fn internal_get(&self, path: &str) -> serde_json::Value {
        self.internal_get_as(path, Some(self.client_identity()))
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", self.logs()))
    }

    /// `GET {INTERNAL_API}/{path}` with the client certificate `identity`
    /// (none: no certificate); the TLS or HTTP error otherwise.
    pub fn internal_get_as(
        &self,
        path: &str,
        identity: Option<(PathBuf, PathBuf)>,
    ) -> Result<serde_json::Value, String> {
        let url = format!("{}{INTERNAL_API}/{path}", self.internal_url());
        let ca = self.ca_file();
        let mut args = vec!["--cacert".into(), ca.into_os_string()];
        if let Some((cert, key)) = identity {
            args.extend(["--cert".into(), cert.into_os_string()]);
            args.extend(["--key".into(), key.into_os_string()]);
        }
        args.push(url.into());
        let (status, body) = self.network.curl(&args)?;
        if status != 200 {
            return Err(format!("HTTP {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))
    }

    /// The name and PID of every process running for this server
    /// (Postgres's postmaster, then the servers): each the program's own,
    /// also in a namespace (nsenter execs it).
    pub fn processes(&self) -> Vec<(&'static str, u32)> {
        let postgres = self.postgres.as_ref().and_then(Postgres::pid).map(|pid| ("postgres", pid));
        postgres
            .into_iter()
            .chain(self.servers.iter().map(|(name, child)| (*name, child.id())))
            .collect()
    }

    /// The last lines of every log: Postgres's and the servers'.
    pub fn logs(&self) -> String {
        ["postgres", "migrate-db", "policy-server", INTERNAL_SERVER]
            .iter()
            .map(|name| {
                let log =
                    fs::read_to_string(self.dir.join(format!("{name}.log"))).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(30)..].join("\n");
                format!("--- {name}.log (last 30 lines)\n{tail}\n")
            })
            .collect()
    }

    /// The internal server's certificate (RSA is needed only by TLS 1.2
    /// clients: its only TLS 1.2 suite is ECDHE-RSA, but curl and rustls
    /// speak TLS 1.3, where the P-256 keys `Pki` makes are fine), a cell's
    /// client certificate, and one from another CA.
    fn make_pki(&self) {
        let mut names = vec![format!("DNS:{INTERNAL_HOST}"), "IP:127.0.0.1".to_owned()];
        let host = self.options.internal_host;
        if host != Ipv4Addr::LOCALHOST {
            names.push(format!("IP:{host}"));
        }
        names.extend(self.options.server_names.iter().cloned());
        self.make_ca("ca", "policy-test CF CA");
        self.make_cert(
            "server",
            INTERNAL_HOST,
            &format!("subjectAltName={}\nextendedKeyUsage=serverAuth\n", names.join(",")),
            "ca",
        );
        self.make_cert("cell", "cell-0", "extendedKeyUsage=clientAuth\n", "ca");
        self.make_ca("other-ca", "policy-test other CA");
        self.make_cert("stranger", "cell-0", "extendedKeyUsage=clientAuth\n", "other-ca");
    }

    fn make_ca(&self, name: &str, subject: &str) {
        match self.options.keys {
            Keys::P256 => self.pki.make_ca(name, subject),
            Keys::Rsa => rsa::make_ca(&self.pki, name, subject),
        }
    }

    fn make_cert(&self, name: &str, cn: &str, ext: &str, ca: &str) {
        match self.options.keys {
            Keys::P256 => self.pki.make_cert(name, cn, ext, ca),
            Keys::Rsa => rsa::make_cert(&self.pki, name, cn, ext, ca),
        }
    }

    /// What both servers share: the database, 16-bit tags, a metron
    /// address nothing listens on, the debug server.
    fn common_config(&self, debug_port: u16) -> serde_json::Value {
        serde_json::json!({
            "log_prefix": "cfnetworking",
            "log_level": "info",
            "debug_server_host": "127.0.0.1",
            "debug_server_port": debug_port,
            "database": {
                "type": "postgres",
                "user": "postgres",
                "password": "",
                "host": "127.0.0.1",
                "port": self.ports.postgres,
                "timeout": 5,
                "database_name": DATABASE,
            },
            "tag_length": 2,
            "metron_address": format!("127.0.0.1:{}", self.ports.metron),
            "max_idle_connections": 10,
            "max_open_connections": 20,
            "connections_max_lifetime_seconds": 3600,
        })
    }

    /// `policy-server`'s config (also `migrate-db`'s). Cloud Controller
    /// is unreachable on purpose (port 1): the periodic cleaner then only
    /// logs, where a reachable one would delete policies of apps it does
    /// not know.
    fn external_config(&self) -> PathBuf {
        let mut config = self.common_config(self.ports.external_debug);
        let uaa_port = self.uaa.as_ref().expect("UAA stand-in").port;
        let ca = self.ca_file().display().to_string();
        merge(
            &mut config,
            serde_json::json!({
                "listen_host": "127.0.0.1",
                "listen_port": self.ports.external,
                "uaa_client": "network-policy",
                "uaa_client_secret": "network-policy-secret",
                "uaa_url": "http://127.0.0.1",
                "uaa_port": uaa_port,
                "uaa_ca": ca,
                "cc_url": "http://127.0.0.1:1",
                "cc_ca_cert": ca,
                "database_migration_timeout": 60,
                "cleanup_interval": 3600,
                "max_policies": 1000,
                "enable_space_developer_self_service": false,
            }),
        );
        self.write_config("policy-server", &config)
    }

    /// `policy-server-internal`'s config: mutual TLS with this PKI.
    fn internal_config(&self) -> PathBuf {
        let mut config = self.common_config(self.ports.internal_debug);
        let (cert, key) = self.pki.identity("server");
        merge(
            &mut config,
            serde_json::json!({
                "listen_host": self.options.internal_host.to_string(),
                "internal_listen_port": self.ports.internal,
                "health_check_port": self.ports.internal_health,
                "ca_cert_file": self.ca_file(),
                "server_cert_file": cert,
                "server_key_file": key,
            }),
        );
        self.write_config(INTERNAL_SERVER, &config)
    }

    fn write_config(&self, name: &str, config: &serde_json::Value) -> PathBuf {
        let path = self.config_path(name);
        fs::write(&path, config.to_string()).expect("write config");
        path
    }

    fn config_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// `binary -config-file CONFIG` in the servers' network (how every
    /// fixture binary takes its config), its output appended to
    /// `BINARY.log`.
    fn fixture_command(&self, binary: &str, config: &Path) -> Command {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{binary}.log")))
            .expect("open log");
        let mut cmd = self.network.command(self.binaries.join(binary));
        cmd.arg("-config-file")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        cmd
    }

    /// Runs `binary` to its end (`migrate-db`).
    fn run_to_end(&self, binary: &str, config: &Path) {
        let status = self
            .fixture_command(binary, config)
            .status()
            .unwrap_or_else(|e| panic!("run {binary}: {e}"));
        assert!(status.success(), "{binary} failed: {status}\n{}", self.logs());
    }

    fn spawn(&mut self, binary: &'static str, config: &Path) {
        let child = self
            .fixture_command(binary, config)
            .spawn()
            .unwrap_or_else(|e| panic!("start {binary}: {e}"));
        self.servers.push((binary, child));
    }

    fn wait_internal_healthy(&mut self) {
        self.wait_healthy(&format!("http://127.0.0.1:{}/health", self.ports.internal_health));
    }

    fn wait_healthy(&mut self, url: &str) {
        let started = Instant::now();
        while !matches!(self.network.curl(&[url]), Ok((200, _))) {
            self.assert_running();
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "{url} not healthy after 30 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Panics with the logs if a process started here has exited.
    fn assert_running(&mut self) {
        let mut exited = Vec::new();
        if let Some(status) = self.postgres.as_mut().and_then(Postgres::exited) {
            exited.push(format!("postgres: {status}"));
        }
        for (name, child) in &mut self.servers {
            if let Ok(Some(status)) = child.try_wait() {
                exited.push(format!("{name}: {status}"));
            }
        }
        assert!(exited.is_empty(), "exited: {}\n{}", exited.join(", "), self.logs());
    }
}

impl Drop for PolicyServer {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("policy server logs:\n{}", self.logs());
        }
        for (_, child) in &mut self.servers {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.postgres = None;
        self.uaa = None;
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Adds `extra`'s keys to the object `config`.
pub(crate) fn merge(config: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(config), serde_json::Value::Object(extra)) = (config.as_object_mut(), extra) {
        config.extend(extra);
    }
}

/// The external API's body for `policies`.
pub fn policies_body(policies: &[Policy]) -> String {
    let policies: Vec<serde_json::Value> = policies
        .iter()
        .map(|(source, destination, protocol, start, end)| {
            serde_json::json!({
                "source": {"id": source},
                "destination": {
                    "id": destination,
                    "protocol": protocol,
                    "ports": {"start": start, "end": end},
                },
            })
        })
        .collect();
    serde_json::json!({ "policies": policies }).to_string()
}
