//! Running the real `policy-agent` binary.

use std::{path::PathBuf, process::Command};

use crate::netns::NetNs;

/// The `policy-agent` binary next to the test binary (built by `cargo xtask
/// test`), or `$POLICY_AGENT_BIN`.
pub fn agent_bin() -> PathBuf {
    if let Some(bin) = std::env::var_os("POLICY_AGENT_BIN") {
        return bin.into();
    }
    let exe = std::env::current_exe().expect("current exe");
    // Tests run from target/<profile>/deps/, binaries from target/<profile>/.
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join("policy-agent"))
        .find(|bin| bin.exists())
        .unwrap_or_else(|| {
            panic!("no policy-agent binary near {}: run through `cargo xtask`", exe.display())
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
