//! Running the real `policy-agent` binary.

use std::{path::PathBuf, process::Command};

use crate::netns::NetNs;

/// The `policy-agent` binary next to the test binary (built by `cargo xtask
/// test`), or `$POLICY_AGENT_BIN`.
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("POLICY_AGENT_BIN") {
        return bin.into();
    }
    built_bin("policy-agent")
}

/// A workspace binary next to the test binary (built by `cargo xtask test`).
pub fn built_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(name))
        .find(|bin| bin.exists())
        .unwrap_or_else(|| {
            panic!("no {name} binary near {}: run through `cargo xtask`", exe.display())
        })
}

/// Runs `policy-agent ARGS...` inside `ns` (with nsenter, which unlike
/// `ip netns exec` keeps /sys and so bpffs visible) and returns its stdout.
pub fn run_agent(ns: &NetNs, args: &[&str]) -> String {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path().display()))
        .arg(agent_bin())
        .args(args)
        .output()
        .expect("run policy-agent");
    assert!(
        out.status.success(),
        "policy-agent {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `policy-agent dataplane --pin-dir DIR ...` run in a test host's
/// namespace; optionally echoing each command and its output, as a user
/// would see them.
pub struct DataplaneCli<'a> {
    host: &'a crate::topology::Host,
    pin_dir: String,
    echo: bool,
}

impl<'a> DataplaneCli<'a> {
    pub fn new(host: &'a crate::topology::Host, pins: &crate::pins::PinDir) -> Self {
        Self { host, pin_dir: pins.path().display().to_string(), echo: false }
    }

    pub fn echoing(mut self) -> Self {
        self.echo = true;
        self
    }

    pub fn run(&self, args: &[&str]) -> String {
        let mut all = vec!["dataplane", "--pin-dir", self.pin_dir.as_str()];
        all.extend_from_slice(args);
        if self.echo {
            println!("$ policy-agent {}", all.join(" "));
        }
        let out = run_agent(&self.host.ns, &all);
        if self.echo {
            for line in out.lines() {
                println!("  {line}");
            }
        }
        out
    }

    /// Registers container `i` with app tag `tag` and attaches to its veth.
    pub fn attach(&self, i: usize, tag: u32) {
        let c = self.host.container(i);
        let (ip, tag) = (c.ip.to_string(), tag.to_string());
        self.run(&["attach", "--ifname", &c.host_ifname, "--ip", &ip, "--tag", &tag]);
    }

    /// `allow` or `revoke` (`verb`) SRC_TAG -> DST_TAG on PROTOCOL PORTS.
    pub fn policy(&self, verb: &str, src_tag: u32, dst_tag: u32, protocol: &str, ports: &str) {
        let (src, dst) = (src_tag.to_string(), dst_tag.to_string());
        self.run(&[
            verb,
            "--src-tag",
            &src,
            "--dst-tag",
            &dst,
            "--protocol",
            protocol,
            "--ports",
            ports,
        ]);
    }
}
