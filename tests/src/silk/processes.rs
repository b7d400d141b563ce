//! The programs started for one part of the overlay (the control plane, a
//! cell), each in a network namespace, with the directory of their
//! configs, data and logs: killed by their PIDs, then the directory
//! removed, on drop, also when a test panics (their logs printed then).

use std::{
    ffi::OsStr,
    fs,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::cf::network::Network;

/// How many lines of each log a failure shows.
const LOG_TAIL: usize = 30;

pub(super) struct Processes {
    /// Configs, data, and `NAME.log` per program.
    dir: PathBuf,
    /// In starting order.
    running: Vec<(String, Child)>,
}

impl Processes {
    /// An empty directory `dir` for them (made here, removed on drop).
    pub(super) fn new(dir: PathBuf) -> Self {
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Self { dir, running: Vec::new() }
    }

    pub(super) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes `config` to `NAME.json` in the directory; its path.
    pub(super) fn write_config(&self, name: &str, config: &serde_json::Value) -> PathBuf {
        let path = self.dir.join(format!("{name}.json"));
        fs::write(&path, config.to_string()).expect("write config");
        path
    }

    /// Starts `program ARGS` in `network` (nsenter execs it: the PID is the
    /// program's own), its output appended to `NAME.log`.
    pub(super) fn spawn<S: AsRef<OsStr>>(
        &mut self,
        name: &str,
        network: &Network,
        program: &Path,
        args: &[S],
    ) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{name}.log")))
            .expect("open log");
        let child = network
            .command(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", program.display()));
        self.running.push((name.to_owned(), child));
    }

    /// Polls `ready` every 50 ms until it gives a value; panics with the
    /// logs, naming `what`, if a program here exits first or `within`
    /// passes.
    pub(super) fn wait_for<T>(
        &mut self,
        what: &str,
        within: Duration,
        mut ready: impl FnMut() -> Option<T>,
    ) -> T {
        let started = Instant::now();
        loop {
            if let Some(value) = ready() {
                return value;
            }
            let exited: Vec<String> = self
                .running
                .iter_mut()
                .filter_map(|(name, child)| {
                    Some(format!("{name}: {}", child.try_wait().ok().flatten()?))
                })
                .collect();
            assert!(exited.is_empty(), "{what}: exited: {}\n{}", exited.join(", "), self.logs());
            assert!(started.elapsed() < within, "{what}: not within {within:?}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills the program `name` started here (by its PID) and waits for
    /// it; panics unless it runs.
    pub(super) fn stop(&mut self, name: &str) {
        let at = self.running.iter().position(|(running, _)| running == name);
        let (_, mut child) =
            self.running.remove(at.unwrap_or_else(|| panic!("{name} is not running")));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// The name and PID of every program started here.
    pub(super) fn pids(&self) -> Vec<(&str, u32)> {
        self.running.iter().map(|(name, child)| (name.as_str(), child.id())).collect()
    }

    /// The last lines of every `*.log` in the directory.
    pub(super) fn logs(&self) -> String {
        let mut logs: Vec<PathBuf> = fs::read_dir(&self.dir)
            .into_iter()
            .flatten()
            .filter_map(|entry| Some(entry.ok()?.path()))
            .filter(|path| path.extension() == Some(OsStr::new("log")))
            .collect();
        logs.sort();
        logs.iter()
            .map(|path| {
                let log = fs::read_to_string(path).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(LOG_TAIL)..].join("\n");
                format!("--- {} (last {LOG_TAIL} lines)\n{tail}\n", path.display())
            })
            .collect()
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        for (_, child) in self.running.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}
