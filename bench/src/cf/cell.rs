//! The cells the part measures and what polices each: CF's
//! vxlan-policy-agent, or this agent started from the cell's rendered
//! vxlan-policy-agent config (or a copy with another poll interval), with
//! app-a and app-b in a container each; and the force call both answer.

use std::{
    ffi::OsString,
    io::{ErrorKind, Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    time::{Duration, Instant},
};

use integration_tests::{
    daemon::Daemon,
    silk::{Cell, SilkContainer},
};
use serde_json::Value;

/// One cell and its agent.
pub struct Subject<'o> {
    /// How the tables name the agent.
    pub label: &'static str,
    pub interval: Duration,
    /// This agent (None: the cell runs vxlan-policy-agent).
    pub daemon: Option<Daemon>,
    pub a: SilkContainer,
    pub b: SilkContainer,
    /// Last: dropped after the agent and the containers.
    pub cell: Cell<'o>,
}

impl<'o> Subject<'o> {
    /// vxlan-policy-agent's cell (started with it).
    pub fn vxlan_policy_agent(cell: Cell<'o>) -> Self {
        let interval = rendered_poll_interval(&cell);
        Self::with_containers("vxlan-policy-agent", interval, None, cell)
    }

    /// This agent on `cell` (started without an agent), from the cell's
    /// rendered vxlan-policy-agent config, or from a copy polling every
    /// `poll_interval` seconds.
    pub fn ours(cell: Cell<'o>, poll_interval: Option<u64>) -> Self {
        let config = match poll_interval {
            None => cell.vxlan_policy_agent_config(),
            Some(seconds) => config_copy(&cell, seconds),
        };
        let interval = poll_interval.map_or_else(|| rendered_poll_interval(&cell), secs);
        let daemon = Daemon::start_with(cell.ns(), OURS_TOML, run_args(config));
        Self::with_containers("policy-agent", interval, Some(daemon), cell)
    }

    /// app-a and app-b in a container each, through cni-wrapper-plugin
    /// (which asks the agent for a forced poll).
    fn with_containers(
        label: &'static str,
        interval: Duration,
        daemon: Option<Daemon>,
        cell: Cell<'o>,
    ) -> Self {
        let n = cell.n();
        let a = cell.add_container(&format!("c{n}a"), "app-a", "space-1");
        let b = cell.add_container(&format!("c{n}b"), "app-b", "space-1");
        Self { label, interval, daemon, a, b, cell }
    }

    /// The agent's PID.
    pub fn agent_pid(&self) -> u32 {
        match &self.daemon {
            Some(daemon) => daemon.pid().expect("policy-agent runs"),
            None => self
                .cell
                .processes()
                .into_iter()
                .find_map(|(name, pid)| (name == "vxlan-policy-agent").then_some(pid))
                .expect("vxlan-policy-agent runs"),
        }
    }

    /// Restarts the agent polling every `poll_interval` seconds (this
    /// agent: from a copy of the rendered config); returns once it has
    /// finished a forced poll.
    pub fn restart(&mut self, poll_interval: u64) {
        match &mut self.daemon {
            None => self.cell.restart_vxlan_policy_agent(poll_interval),
            Some(daemon) => {
                daemon.stop();
                daemon.run_args = run_args(config_copy(&self.cell, poll_interval));
                daemon.spawn();
            }
        }
        self.interval = secs(poll_interval);
        force_poll(&self.cell);
    }
}

/// This agent's TOML besides the vxlan-policy-agent config: info logs (as
/// vxlan-policy-agent's config says), no DNS (the test's cells have none).
const OURS_TOML: &str = "log_level = \"info\"\ndns_listen = \"\"\n";

fn run_args(config: PathBuf) -> Vec<OsString> {
    vec!["--vxlan-policy-agent-config".into(), config.into()]
}

fn secs(seconds: u64) -> Duration {
    Duration::from_secs(seconds)
}

fn rendered(cell: &Cell) -> Value {
    let text = std::fs::read(cell.vxlan_policy_agent_config()).expect("the rendered config");
    serde_json::from_slice(&text).expect("the rendered config is JSON")
}

/// `poll_interval` in the cell's rendered vxlan-policy-agent config.
pub fn rendered_poll_interval(cell: &Cell) -> Duration {
    secs(rendered(cell)["poll_interval"].as_u64().expect("poll_interval in seconds"))
}

/// A copy of the cell's rendered vxlan-policy-agent config polling every
/// `seconds`, in the cell's directory.
fn config_copy(cell: &Cell, seconds: u64) -> PathBuf {
    let mut config = rendered(cell);
    config["poll_interval"] = seconds.into();
    let path = cell.dir().join(format!("policy-agent-poll-{seconds}s.json"));
    std::fs::write(&path, config.to_string()).expect("write a config copy");
    path
}

/// `GET /force-policy-poll-cycle` from inside the cell, to whichever agent
/// serves it; both answer once the cycle is done. How long that took.
/// Retries a refused connection for 20 s (an agent starting); panics
/// unless it answers 200 within 10 minutes.
pub fn force_poll(cell: &Cell) -> Duration {
    let address = cell.force_poll_address();
    let answer = cell.ns().run(|| {
        let tried = Instant::now();
        let mut stream = loop {
            match TcpStream::connect(address) {
                Ok(stream) => break stream,
                Err(e) if e.kind() == ErrorKind::ConnectionRefused && tried.elapsed().as_secs() < 20 => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => return Err(e),
            }
        };
        let start = Instant::now();
        stream.set_read_timeout(Some(Duration::from_secs(600)))?;
        stream.write_all(
            b"GET /force-policy-poll-cycle HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )?;
        let mut text = String::new();
        stream.read_to_string(&mut text)?;
        Ok((start.elapsed(), text))
    });
    match answer {
        Ok((took, text)) if text.starts_with("HTTP/1.1 200") => took,
        Ok((_, text)) => panic!("force-policy-poll-cycle on cell {}: {text}", cell.n()),
        Err(e) => panic!("force-policy-poll-cycle on cell {}: {e}\n{}", cell.n(), cell.logs()),
    }
}
