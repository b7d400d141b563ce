//! Cloud Foundry's real policy server for the tests, started by them:
//! Postgres 15 on a data directory of its own, `migrate-db`, the external
//! API (`policy-server`, plain HTTP, bearer tokens checked by a UAA
//! stand-in in this process) and the internal mutual-TLS API
//! (`policy-server-internal`) that every cell polls. The binaries come
//! from the shared fixture (`../shared/fixtures/cf-policy-server`, whose
//! README says how they were built and how to run them). Everything
//! started here is stopped by its PID and removed on drop, also when a
//! test panics.

use std::{
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{TcpListener, TcpStream},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use crate::cluster::Pki;

/// Debian's PostgreSQL 15 (`cargo xtask setup` installs `postgresql`).
const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";
/// The fixture's binaries, as `bin.tar.xz` holds them.
const BINARIES: [&str; 3] = ["policy-server", "policy-server-internal", "migrate-db"];
/// The database the servers use.
const DATABASE: &str = "policy_server";
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
    /// Postgres's data directory (the `postgres` user's).
    data: PathBuf,
    postgres: Option<Child>,
    /// `policy-server`, `policy-server-internal`, in starting order.
    servers: Vec<(&'static str, Child)>,
    pki: Pki,
    uaa: Option<UaaStandIn>,
    postgres_port: u16,
    external_port: u16,
    internal_port: u16,
    internal_health_port: u16,
    /// How long [`PolicyServer::start`] took.
    pub startup: Duration,
}

impl PolicyServer {
    /// Starts Postgres, migrates the database and starts both servers;
    /// returns once both answer their health checks. Panics saying what
    /// failed (with the logs) otherwise.
    pub fn start() -> Self {
        let started = Instant::now();
        let binaries = binaries();
        let dir = std::env::temp_dir().join(crate::unique_name("cfps"));
        fs::create_dir_all(&dir).expect("policy server temp dir");
        let mut server = Self {
            data: dir.with_extension("pgdata"),
            dir,
            postgres: None,
            servers: Vec::new(),
            pki: Pki::empty(),
            uaa: None,
            postgres_port: free_port(),
            external_port: free_port(),
            internal_port: free_port(),
            internal_health_port: free_port(),
            startup: Duration::ZERO,
        };
        server.make_pki();
        server.uaa = Some(UaaStandIn::start());
        server.start_postgres();
        let external = server.external_config();
        let internal = server.internal_config();
        server.run_to_end(&binaries.join("migrate-db"), &external, "migrate-db");
        server.spawn("policy-server", &binaries.join("policy-server"), &external);
        server.spawn("policy-server-internal", &binaries.join("policy-server-internal"), &internal);
        server.wait_healthy(&format!("http://127.0.0.1:{}/health", server.external_port));
        server.wait_healthy(&format!("http://127.0.0.1:{}/health", server.internal_health_port));
        server.startup = started.elapsed();
        server
    }

    /// The internal API's base URL (what a cell's `policy_server_url`
    /// says), by address: the certificate names 127.0.0.1 too.
    pub fn internal_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.internal_port)
    }

    /// The external API's base URL (plain HTTP on loopback).
    pub fn external_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.external_port)
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
        let (status, answer) = curl(&[
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
        let (status, body) = curl(&args)?;
        if status != 200 {
            return Err(format!("HTTP {status}: {body}"));
        }
        serde_json::from_str(&body).map_err(|e| format!("not JSON ({e}): {body}"))
    }

    /// The last lines of every log: Postgres's and the servers'.
    pub fn logs(&self) -> String {
        ["postgres", "migrate-db", "policy-server", "policy-server-internal"]
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

    /// The internal server's certificate (RSA is not needed: its only TLS
    /// 1.2 suite is ECDHE-RSA, but curl and rustls speak TLS 1.3, where the
    /// P-256 keys `Pki` makes are fine), a cell's client certificate, and
    /// one from another CA.
    fn make_pki(&self) {
        self.pki.make_ca("ca", "policy-test CF CA");
        self.pki.make_cert(
            "server",
            INTERNAL_HOST,
            &format!(
                "subjectAltName=DNS:{INTERNAL_HOST},IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
            ),
            "ca",
        );
        self.pki.make_cert("cell", "cell-0", "extendedKeyUsage=clientAuth\n", "ca");
        self.pki.make_ca("other-ca", "policy-test other CA");
        self.pki.make_cert("stranger", "cell-0", "extendedKeyUsage=clientAuth\n", "other-ca");
    }

    /// `initdb` and `postgres` as the `postgres` user (it refuses root) on
    /// a data directory of this server's, listening on loopback only
    /// (its unix socket in the data directory); then the database. No
    /// fsync: the data dies with the test.
    fn start_postgres(&mut self) {
        let (uid, gid) = postgres_user();
        fs::create_dir(&self.data).expect("postgres data dir");
        std::os::unix::fs::chown(&self.data, Some(uid), Some(gid)).expect("chown data dir");
        let data = self.data.display().to_string();
        let initdb = format!("{POSTGRES_BIN}/initdb");
        let out = as_postgres(&initdb)
            .args(["-D", &data, "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .output()
            .expect("run initdb (Debian's postgresql 15; `cargo xtask setup` installs it)");
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let log = self.log_file("postgres");
        let port = self.postgres_port.to_string();
        let child = as_postgres(&format!("{POSTGRES_BIN}/postgres"))
            .args(["-D", &data, "-p", &port, "-k", &data])
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .args(["-c", "synchronous_commit=off", "-c", "full_page_writes=off"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        self.postgres = Some(child);
        // createdb fails while Postgres is still starting up: retry.
        let started = Instant::now();
        loop {
            let out = as_postgres(&format!("{POSTGRES_BIN}/createdb"))
                .args(["-h", "127.0.0.1", "-p", &port, "-U", "postgres", DATABASE])
                .output()
                .expect("run createdb");
            if out.status.success() {
                break;
            }
            self.assert_running();
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "createdb: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// What both servers share: the database, 16-bit tags, a metron
    /// address nothing listens on, the debug server.
    fn common_config(&self) -> serde_json::Value {
        serde_json::json!({
            "log_prefix": "cfnetworking",
            "log_level": "info",
            "debug_server_host": "127.0.0.1",
            "debug_server_port": free_port(),
            "database": {
                "type": "postgres",
                "user": "postgres",
                "password": "",
                "host": "127.0.0.1",
                "port": self.postgres_port,
                "timeout": 5,
                "database_name": DATABASE,
            },
            "tag_length": 2,
            "metron_address": format!("127.0.0.1:{}", free_port()),
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
        let mut config = self.common_config();
        let uaa_port = self.uaa.as_ref().expect("UAA stand-in").port;
        let ca = self.ca_file().display().to_string();
        merge(
            &mut config,
            serde_json::json!({
                "listen_host": "127.0.0.1",
                "listen_port": self.external_port,
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
        let mut config = self.common_config();
        let (cert, key) = self.pki.identity("server");
        merge(
            &mut config,
            serde_json::json!({
                "listen_host": "127.0.0.1",
                "internal_listen_port": self.internal_port,
                "health_check_port": self.internal_health_port,
                "ca_cert_file": self.ca_file(),
                "server_cert_file": cert,
                "server_key_file": key,
            }),
        );
        self.write_config("policy-server-internal", &config)
    }

    fn write_config(&self, name: &str, config: &serde_json::Value) -> PathBuf {
        let path = self.dir.join(format!("{name}.json"));
        fs::write(&path, config.to_string()).expect("write config");
        path
    }

    fn log_file(&self, name: &str) -> fs::File {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("open log")
    }

    /// `binary -config-file CONFIG` (how every fixture binary takes its
    /// config), its output appended to `NAME.log`.
    fn fixture_command(&self, name: &str, binary: &Path, config: &Path) -> Command {
        let log = self.log_file(name);
        let mut cmd = Command::new(binary);
        cmd.arg("-config-file")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        cmd
    }

    /// Runs `binary` to its end (`migrate-db`).
    fn run_to_end(&self, binary: &Path, config: &Path, name: &str) {
        let status = self
            .fixture_command(name, binary, config)
            .status()
            .unwrap_or_else(|e| panic!("run {}: {e}", binary.display()));
        assert!(status.success(), "{name} failed: {status}\n{}", self.logs());
    }

    fn spawn(&mut self, name: &'static str, binary: &Path, config: &Path) {
        let child = self
            .fixture_command(name, binary, config)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
        self.servers.push((name, child));
    }

    fn wait_healthy(&mut self, url: &str) {
        let started = Instant::now();
        while !matches!(curl(&[url]), Ok((200, _))) {
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
        if let Some(Ok(Some(status))) = self.postgres.as_mut().map(Child::try_wait) {
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
        if let Some(mut postgres) = self.postgres.take() {
            stop_postgres(&mut postgres);
        }
        self.uaa = None;
        let _ = fs::remove_dir_all(&self.data);
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// Postgres's "fast shutdown" (SIGINT: its backends are told to exit and
/// its shared memory is released), SIGKILL if it takes more than 5 s.
fn stop_postgres(postgres: &mut Child) {
    if let Ok(pid) = i32::try_from(postgres.id()) {
        // SAFETY: kill has no memory preconditions; the PID is our child's,
        // not yet reaped, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGINT) };
    }
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        if !matches!(postgres.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = postgres.kill();
    let _ = postgres.wait();
}

/// The `postgres` user's uid and gid (Debian's postgresql-common makes it).
fn postgres_user() -> (u32, u32) {
    // SAFETY: the name is a valid C string; the entry is read at once,
    // before any other getpw* call could overwrite it.
    let entry = unsafe { libc::getpwnam(c"postgres".as_ptr()) };
    assert!(!entry.is_null(), "no `postgres` user: install postgresql (`cargo xtask setup`)");
    // SAFETY: not null, so a valid passwd entry.
    unsafe { ((*entry).pw_uid, (*entry).pw_gid) }
}

/// `program` as the `postgres` user, set directly in the child (no
/// `runuser` in between, so the PID we hold is the program's own).
fn as_postgres(program: &str) -> Command {
    let (uid, gid) = postgres_user();
    let mut cmd = Command::new(program);
    cmd.uid(uid).gid(gid).current_dir("/").env("HOME", "/var/lib/postgresql");
    cmd
}

/// The fixture's binaries, unpacked once into
/// `target/cf-fixtures/policy-server/` (the fixture itself is read-only).
/// Unpacked beside it and renamed into place, so that two test processes
/// never see half an unpacking.
fn binaries() -> PathBuf {
    let dir = target_dir().join("cf-fixtures/policy-server");
    let complete = |dir: &Path| BINARIES.iter().all(|b| dir.join(b).is_file());
    if complete(&dir) {
        return dir;
    }
    let archive = fixture_dir().join("bin.tar.xz");
    assert!(
        archive.is_file(),
        "Cloud Foundry's policy server fixture is missing: no {} (set POLICY_TEST_CF_FIXTURES \
         to the fixtures/ directory holding cf-policy-server/)",
        archive.display()
    );
    let parent = dir.parent().expect("cf-fixtures dir");
    fs::create_dir_all(parent).expect("target/cf-fixtures");
    let staging = parent.join(crate::unique_name("unpacking"));
    fs::create_dir_all(&staging).expect("unpacking dir");
    let status = Command::new("tar")
        .arg("xJf")
        .arg(&archive)
        .arg("-C")
        .arg(&staging)
        .status()
        .expect("run tar");
    assert!(status.success(), "tar xJf {}: {status}", archive.display());
    assert!(complete(&staging), "{} lacks one of {BINARIES:?}", archive.display());
    let _ = fs::remove_dir_all(&dir);
    if fs::rename(&staging, &dir).is_err() {
        // Another process renamed its unpacking into place first.
        let _ = fs::remove_dir_all(&staging);
    }
    assert!(complete(&dir), "could not unpack into {}", dir.display());
    dir
}

/// `POLICY_TEST_CF_FIXTURES/cf-policy-server`, or the shared fixture
/// beside the workspace.
fn fixture_dir() -> PathBuf {
    match std::env::var_os("POLICY_TEST_CF_FIXTURES") {
        Some(fixtures) => PathBuf::from(fixtures).join("cf-policy-server"),
        None => workspace_root().join("../shared/fixtures/cf-policy-server"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A loopback TCP port free now (the OS's pick; released at once).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// Adds `extra`'s keys to the object `config`.
fn merge(config: &mut serde_json::Value, extra: serde_json::Value) {
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

/// `curl -s ARGS`: the HTTP status and the body, or curl's error (a
/// refused handshake, a connection refused).
fn curl<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Result<(u16, String), String> {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .map_err(|e| format!("run curl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "curl {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = status.trim().parse().map_err(|_| format!("no HTTP status in {text:?}"))?;
    Ok((status, body.to_owned()))
}

/// UAA's `check_token`, as Cloud Foundry's own integration tests stand it
/// in: a loopback HTTP server in the test process that finds [`TOKEN`]
/// admin with `network.admin` and refuses any other token. The policy
/// server reaches it over plain HTTP (its `uaa_url` says the scheme).
struct UaaStandIn {
    port: u16,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UaaStandIn {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("UAA stand-in listener");
        let port = listener.local_addr().expect("UAA stand-in address").port();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if stopped.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(stream) = stream {
                    let _ = answer_check_token(stream);
                }
            }
        });
        Self { port, stop, thread: Some(thread) }
    }
}

impl Drop for UaaStandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop, which then sees `stop`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One request, one answer, then the connection closes.
fn answer_check_token(stream: TcpStream) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut length = 0;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 || header.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    let body = String::from_utf8_lossy(&body);
    let (status, answer) = if !request_line.starts_with("POST /check_token ") {
        ("404 Not Found", r#"{"error":"not_found"}"#)
    } else if body.split('&').any(|field| field == format!("token={TOKEN}")) {
        ("200 OK", r#"{"scope":["network.admin"],"user_name":"admin","client_id":"cf"}"#)
    } else {
        ("400 Bad Request", r#"{"error":"invalid_token"}"#)
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{answer}",
        answer.len()
    )?;
    stream.flush()
}
