//! Where the policy server's processes (and silk's, [`crate::silk`]) live:
//! the test process's own (root's) network namespace, or one a test made,
//! where a policy agent under test can reach them on the namespace's
//! loopback.

use std::{
    ffi::OsStr,
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Stdio},
};

/// A network namespace by its path (`None`: the test process's own).
#[derive(Clone, Debug)]
pub(crate) struct Network {
    netns: Option<PathBuf>,
}

impl Network {
    pub(crate) fn new(netns: Option<PathBuf>) -> Self {
        Self { netns }
    }

    /// `program` in this network. Through `nsenter --net=PATH`, which
    /// enters a network namespace without forking (it forks only for a PID
    /// namespace or `--fork`) and then execs `program`: the PID a caller
    /// holds is the program's own, to be signalled as before.
    pub(crate) fn command(&self, program: impl AsRef<OsStr>) -> Command {
        match &self.netns {
            None => Command::new(program),
            Some(path) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", path.display())).arg(program);
                cmd
            }
        }
    }

    /// `program` in this network as the user `uid`:`gid`, with no
    /// supplementary groups. In a namespace nsenter drops the privileges
    /// after `setns` (which needs them); `Command::uid` would drop them
    /// before nsenter runs.
    pub(crate) fn command_as(&self, program: impl AsRef<OsStr>, (uid, gid): (u32, u32)) -> Command {
        match &self.netns {
            None => {
                let mut cmd = Command::new(program);
                // std clears the supplementary groups when root sets a uid.
                cmd.uid(uid).gid(gid);
                cmd
            }
            Some(path) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(format!("--net={}", path.display()))
                    .args(["--setuid", &uid.to_string(), "--setgid", &gid.to_string()])
                    .arg(program);
                cmd
            }
        }
    }

    /// Runs `f` in this network: a socket made in `f` stays there.
    pub(crate) fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        match &self.netns {
            None => f(),
            Some(path) => crate::netns::run_in(path, f),
        }
    }

    /// `N` distinct loopback TCP ports free now in this network (the OS's
    /// picks, all held until the last is picked, then released).
    pub(crate) fn free_ports<const N: usize>(&self) -> [u16; N] {
        self.run(|| {
            let listeners: Vec<TcpListener> = (0..N)
                .map(|_| TcpListener::bind("127.0.0.1:0").expect("a free loopback port"))
                .collect();
            std::array::from_fn(|i| {
                listeners[i].local_addr().expect("a bound listener's address").port()
            })
        })
    }

    /// `curl -sS ARGS` in this network: the HTTP status and the body, or
    /// curl's error (a refused handshake, a connection refused).
    pub(crate) fn curl<S: AsRef<OsStr>>(&self, args: &[S]) -> Result<(u16, String), String> {
        let out = self
            .command("curl")
            .args(["-sS", "--max-time", "10", "-w", "\n%{http_code}"])
            .args(args)
            .stdin(Stdio::null())
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
}
