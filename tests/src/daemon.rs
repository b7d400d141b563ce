//! A `policy-agent run` daemon inside a test host's namespace, with its own
//! state directory, socket and pin directory; killed (by its PID) and torn
//! down on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{agent::agent_bin, netns::NetNs};

pub struct Daemon {
    child: Option<Child>,
    netns: PathBuf,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    /// Arguments after `run --config FILE` (e.g. `--vxlan-policy-agent-config`).
    pub run_args: Vec<std::ffi::OsString>,
}

impl Daemon {
    /// Starts a daemon in `ns` with extra TOML lines appended to its config.
    pub fn start(ns: &NetNs, extra_config: &str) -> Self {
        Self::start_with(ns, extra_config, Vec::new())
    }

    /// [`Self::start`], with more arguments to `run`.
    pub fn start_with(ns: &NetNs, extra_config: &str, run_args: Vec<std::ffi::OsString>) -> Self {
        let name = crate::unique_name("agent");
        let dir = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&dir).expect("daemon dir");
        let socket = dir.join("agent.sock");
        let pin_dir = PathBuf::from("/sys/fs/bpf").join(&name);
        let config = dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\nsocket = \"{}\"\npin_dir = \"{}\"\nflow_log = \"{}\"\n{}{extra_config}\n",
                dir.join("state").display(),
                socket.display(),
                pin_dir.display(),
                dir.join("flows.log").display(),
                if extra_config.contains("log_level") { "" } else { "log_level = \"debug\"\n" },
            ),
        )
        .expect("write config");
        let mut daemon =
            Self { child: None, netns: ns.path(), dir, config, socket, pin_dir, run_args };
        daemon.spawn();
        daemon
    }

    /// (Re)starts the process and waits for its socket.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("agent.log"))
            .expect("log file");
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg(agent_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .args(&self.run_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start policy-agent run");
        self.child = Some(child);
        let started = Instant::now();
        while !self.socket.exists() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("policy-agent exited with {status}:\n{}", self.log());
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "policy-agent did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the process expecting it to refuse to start; returns what it
    /// logged.
    pub fn spawn_fails(&mut self) -> String {
        assert!(self.child.is_none(), "already running");
        let before = self.log().len();
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .arg(agent_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .expect("start policy-agent run");
        assert!(
            !out.status.success(),
            "policy-agent started:\n{}",
            self.log()[before..].to_owned()
        );
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
    }

    /// The daemon's PID (the nsenter'd process execs the agent).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().expect("wait for policy-agent")
    }

    /// `policy-agent ARGS...` against this daemon's socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(agent_bin())
            .args(args)
            .env("POLICY_AGENT_SOCKET", &self.socket)
            .output()
            .expect("run policy-agent")
    }

    /// Like `cli`, asserting success; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "policy-agent {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `policy-agent api-identity --role ROLE --name NAME` from this
    /// daemon's CA (by its `--config`), written in its directory: the
    /// identity's certificate and key.
    pub fn api_identity(&self, role: &str, name: &str) -> (PathBuf, PathBuf) {
        let out = self.dir.join("identities");
        let text = |p: &Path| p.to_str().expect("a UTF-8 path").to_owned();
        let (out_s, config) = (text(&out), text(&self.config));
        let said = self.cli_ok(&[
            "api-identity",
            "--role",
            role,
            "--name",
            name,
            "--out",
            &out_s,
            "--config",
            &config,
        ]);
        assert!(said.contains(&format!("{role} identity")), "{said}");
        (out.join(format!("{name}.pem")), out.join(format!("{name}-key.pem")))
    }

    /// `policy-agent endpoint add` for a test container: its app, address,
    /// host-side veth and network namespace.
    pub fn register(&self, container: &crate::topology::Container, app: &str) {
        let args = register_args(container, app);
        self.cli_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    }

    /// `policy-agent add-network-policy SOURCE --destination-app DEST
    /// --protocol PROTOCOL --port PORT`.
    pub fn allow(&self, source: &str, destination: &str, protocol: &str, port: &str) {
        self.cli_ok(&policy_args("add-network-policy", source, destination, protocol, port));
    }

    /// `policy-agent remove-network-policy SOURCE --destination-app DEST
    /// --protocol PROTOCOL --port PORT`.
    pub fn disallow(&self, source: &str, destination: &str, protocol: &str, port: &str) {
        self.cli_ok(&policy_args("remove-network-policy", source, destination, protocol, port));
    }

    /// An instance's port mapping as the agent wrote it (`CF_INSTANCE_PORTS`).
    pub fn instance_ports(&self, ip: std::net::Ipv4Addr) -> Value {
        let path = self.state_dir().join(format!("instances/{ip}.json"));
        serde_json::from_slice(&std::fs::read(path).expect("instance ports file")).expect("JSON")
    }

    /// `curl` against the API socket: (HTTP status, JSON body).
    pub fn curl(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-S", "-X", method, "--unix-socket"]).arg(&self.socket).args([
            "-H",
            "Content-Type: application/json",
            "-w",
            "\n%{http_code}",
        ]);
        if body.is_some() {
            cmd.args(["--data-binary", "@-"]).stdin(Stdio::piped());
        }
        cmd.arg(format!("http://localhost{path}")).stdout(Stdio::piped());
        let mut child = cmd.spawn().expect("run curl");
        if let Some(body) = body {
            use std::io::Write as _;
            child.stdin.take().expect("stdin").write_all(body.as_bytes()).expect("write body");
        }
        let out = child.wait_with_output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let (json, code) = text.rsplit_once('\n').expect("curl output with status");
        let status = code.trim().parse().unwrap_or_else(|_| panic!("curl: {text}"));
        (status, serde_json::from_str(json).unwrap_or(Value::Null))
    }

    /// `GET path` on the API socket, which must answer 200: its JSON body.
    pub fn get(&self, path: &str) -> Value {
        let (status, value) = self.curl("GET", path, None);
        assert_eq!(status, 200, "{path}: {value}");
        value
    }

    /// Packets the programs counted under the verdict `reason` (`/v1/status`).
    pub fn verdict_count(&self, reason: &str) -> u64 {
        self.get("/v1/status")["verdicts"]
            .as_array()
            .expect("verdicts")
            .iter()
            .find(|v| v["reason"] == reason)
            .and_then(|v| v["packets"].as_u64())
            .unwrap_or(0)
    }

    /// The tag of `app` (hex in `.../tags`, as Cloud Foundry lists it).
    pub fn tag(&self, app: &str) -> u32 {
        let tags = self.get("/networking/v1/external/tags");
        let tag = tags["tags"].as_array().expect("tags").iter().find(|t| t["id"] == app);
        let tag = tag.unwrap_or_else(|| panic!("no tag for {app}: {tags}"));
        u32::from_str_radix(tag["tag"].as_str().expect("tag"), 16).expect("hex tag")
    }

    /// A response header of `GET path` on the API socket, if present.
    pub fn header(&self, path: &str, name: &str) -> Option<String> {
        let out = Command::new("curl")
            .args(["-s", "-S", "-o", "/dev/null", "-D", "-", "--unix-socket"])
            .arg(&self.socket)
            .arg(format!("http://localhost{path}"))
            .output()
            .expect("run curl");
        String::from_utf8_lossy(&out.stdout).lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim().to_owned())
        })
    }

    /// The flow events the agent holds (`GET /v1/flows`), parsed.
    pub fn flows(&self) -> Vec<Value> {
        let out = std::process::Command::new("curl")
            .args(["-s", "--unix-socket"])
            .arg(&self.socket)
            .arg("http://localhost/v1/flows")
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .collect()
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The desired state as the daemon stored it (snapshot + journal).
    pub fn stored_state(&self) -> policy_agent::state::State {
        policy_agent::store::Journal::peek(&self.state_dir()).expect("load stored state")
    }

    pub fn maps_dir(&self) -> PathBuf {
        self.pin_dir.join("maps")
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
        if let Err(e) = policy_agent::Dataplane::remove_all(&self.pin_dir) {
            eprintln!("warning: cleaning up {}: {e}", self.pin_dir.display());
        }
        if std::thread::panicking() {
            eprintln!("policy-agent log:\n{}", self.log());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The arguments of `policy-agent endpoint add` for a test container.
pub fn register_args(container: &crate::topology::Container, app: &str) -> Vec<String> {
    let netns = container.ns.path();
    [
        "endpoint",
        "add",
        "--app",
        app,
        "--ip",
        &container.ip.to_string(),
        "--ifname",
        &container.host_ifname,
        "--netns",
        netns.to_str().expect("netns path"),
    ]
    .map(str::to_owned)
    .into_iter()
    .chain(container.ipv6.iter().flat_map(|a| ["--ip".to_owned(), a.to_string()]))
    .collect()
}

/// The arguments of `policy-agent VERB SOURCE --destination-app DEST
/// --protocol PROTOCOL --port PORT` (VERB: add- or remove-network-policy).
pub fn policy_args<'a>(
    verb: &'a str,
    source: &'a str,
    destination: &'a str,
    protocol: &'a str,
    port: &'a str,
) -> [&'a str; 8] {
    [verb, source, "--destination-app", destination, "--protocol", protocol, "--port", port]
}
