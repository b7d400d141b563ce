//! The build, demo, test and bench tasks: thin wrappers over cargo.

use std::{env, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    cmd
}

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("failed to start {what}"))?;
    if !status.success() {
        bail!("{what} failed: {status}");
    }
    Ok(())
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc_geteuid() } != 0 {
        bail!(
            "{what} loads BPF programs and creates network namespaces: it needs root \
             (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN); run it as root, e.g. `sudo -E cargo xtask ...`"
        );
    }
    Ok(())
}

unsafe extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}

pub fn build(root: &Path) -> Result<()> {
    let mut cmd = cargo(root);
    cmd.args(["build", "--release", "--workspace", "--bins", "--tests"]);
    run(cmd, "cargo build")
}

/// The demo and the integration tests drive the real `policy-agent` binary.
fn build_agent(root: &Path) -> Result<()> {
    let mut agent = cargo(root);
    agent.args(["build", "--release", "-p", "policy-agent", "--bins"]);
    run(agent, "building policy-agent")
}

pub fn demo(root: &Path) -> Result<()> {
    require_root("the demo")?;
    build_agent(root)?;
    let mut cmd = cargo(root);
    cmd.args(["run", "--quiet", "--release", "-p", "integration-tests", "--bin", "demo"]);
    run(cmd, "the demo")
}

pub fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    require_root("the integration tests")?;
    // Host unit tests: decision logic, key encoding, port ranges, loader
    // pieces that need no kernel.
    let mut unit = cargo(root);
    unit.args(["test", "--release"]);
    if filter.is_none() {
        run(unit, "the unit tests")?;
    }
    build_agent(root)?;
    // Privileged tests, one at a time: they attach programs and create
    // namespaces, and some measure traffic.
    let mut integration = cargo(root);
    integration.args(["test", "--release", "-p", "integration-tests", "--", "--test-threads=1"]);
    if let Some(filter) = filter {
        integration.arg(filter);
    }
    run(integration, "the integration tests")
}

pub fn bench(root: &Path, quick: bool) -> Result<()> {
    require_root("the benchmark")?;
    let mut cmd = cargo(root);
    cmd.args(["run", "--quiet", "--release", "-p", "integration-tests", "--bin", "bench", "--"]);
    if quick {
        cmd.arg("--quick");
    }
    run(cmd, "the benchmark")
}
