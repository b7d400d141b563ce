//! The build, demo, test and bench tasks: thin wrappers over cargo.

use std::{env, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

/// A cargo command in the workspace, without the variables `cargo run` gave
/// this process (`CARGO_PKG_NAME=xtask`, ...): cargo compares those a build
/// script tracks (ring's tracks `CARGO_PKG_*` and `CARGO_MANIFEST_*`) with its
/// own environment, so a build through xtask and one from a shell (or from a
/// test) would otherwise rebuild ring and everything above it in turn.
pub fn cargo(root: &Path) -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(root);
    for (name, _) in env::vars_os() {
        if let Some(text) = name.to_str()
            && (text.starts_with("CARGO_PKG_")
                || text.starts_with("CARGO_MANIFEST_")
                || ["CARGO_CRATE_NAME", "CARGO_BIN_NAME"].contains(&text))
        {
            cmd.env_remove(&name);
        }
    }
    cmd
}

/// Runs `cargo test ...`, echoing its output, and adds up its
/// `test result:` lines into `totals` (passed, failed).
fn run_tests(mut cmd: Command, what: &str, totals: &mut (u64, u64)) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start {what}"))?;
    let stdout = child.stdout.take().context("no stdout")?;
    for line in BufReader::new(stdout).lines() {
        let line = line.context("reading test output")?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |label: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| part.trim().strip_suffix(label))
                    .and_then(|n| n.trim().rsplit(' ').next().and_then(|n| n.parse().ok()))
                    .unwrap_or(0)
            };
            totals.0 += count(" passed");
            totals.1 += count(" failed");
        }
    }
    let status = child.wait().with_context(|| format!("waiting for {what}"))?;
    if !status.success() {
        println!("{} passed, {} failed", totals.0, totals.1.max(1));
        bail!("{what} failed: {status}");
    }
    Ok(())
}

pub fn run(mut cmd: Command, what: &str) -> Result<()> {
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

/// The packages every build and test step selects, always the same: cargo
/// unifies dependency features over the selected packages, so a step that
/// selected fewer (`-p policy-agent`) or more (`-p integration-tests`) would
/// build aya, tracing-subscriber and the agent again with other features. The
/// eBPF crate builds for its own target (through policy-agent's build.rs) and
/// the benchmark only through `cargo xtask bench`.
const PACKAGES: [&str; 5] =
    ["--workspace", "--exclude", "policy-ebpf", "--exclude", "policy-bench"];

pub fn build(root: &Path) -> Result<()> {
    let mut cmd = cargo(root);
    cmd.args(["build", "--release"]).args(PACKAGES).args(["--bins", "--tests"]);
    run(cmd, "cargo build")
}

/// The demo, the integration tests and the package use the real binaries
/// (target/release/policy-agent, policy-cni), built with the same package
/// set as the tests so that nothing is built twice.
pub fn build_agent(root: &Path) -> Result<()> {
    let mut agent = cargo(root);
    agent.args(["build", "--release"]).args(PACKAGES).arg("--bins");
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
    // Host unit tests (every library's and binary's own): decision logic, key
    // encoding, port ranges, loader pieces that need no kernel.
    let mut totals = (0, 0);
    let mut unit = cargo(root);
    unit.args(["test", "--release"]).args(PACKAGES).args(["--lib", "--bins"]);
    if filter.is_none() {
        // The whole run lints first, as CI runs it: rustfmt and clippy.
        lint(root)?;
        run_tests(unit, "the unit tests", &mut totals)?;
    }
    build_agent(root)?;
    // Privileged tests (tests/tests/*.rs), one at a time: they attach
    // programs and create namespaces, and some measure traffic.
    let mut integration = cargo(root);
    integration.args(["test", "--release"]).args(PACKAGES).args([
        "--test",
        "*",
        "--",
        "--test-threads=1",
    ]);
    if let Some(filter) = filter {
        integration.arg(filter);
    }
    run_tests(integration, "the integration tests", &mut totals)?;
    // One closing line for the whole run.
    println!("{} passed, {} failed", totals.0, totals.1);
    Ok(())
}

pub fn bench(root: &Path, quick: bool) -> Result<()> {
    require_root("the benchmark")?;
    build_agent(root)?;
    let mut cmd = cargo(root);
    cmd.args(["run", "--quiet", "--release", "-p", "policy-bench", "--bin", "bench", "--"]);
    if quick {
        cmd.arg("--quick");
    }
    run(cmd, "the benchmark")
}

pub fn lint(root: &Path) -> Result<()> {
    crate::layout::check(root)?;
    let mut fmt = cargo(root);
    fmt.args(["fmt", "--all", "--check"]);
    run(fmt, "cargo fmt --check")?;
    let mut clippy = cargo(root);
    clippy.args([
        "clippy",
        "--release",
        "--workspace",
        "--exclude",
        "policy-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy, "cargo clippy")?;
    let mut ebpf = Command::new("rustup");
    ebpf.current_dir(root.join("policy-ebpf"))
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--release",
            "--target",
            "bpfel-unknown-none",
            "-Z",
            "build-std=core",
            "--bins",
            "--",
            "-D",
            "warnings",
        ])
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER");
    run(ebpf, "cargo clippy (eBPF)")
}
