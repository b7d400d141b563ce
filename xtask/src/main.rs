//! Project tasks: `cargo xtask <setup|build|demo|test|lint|bench|package>`.
//!
//! Every task that needs the toolchain runs `setup` first, so a fresh machine
//! needs nothing but `cargo xtask demo` or `cargo xtask test`.

mod layout;
mod package;
mod run;
mod setup;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, demo, test and benchmark the policy dataplane")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build and tests need (idempotent): nightly rust-src,
    /// bpf-linker, Debian packages.
    Setup,
    /// Set up and build everything in release mode.
    Build,
    /// Build, then show a denied connection become allowed by a policy and
    /// denied again, on veth pairs in network namespaces (needs root).
    Demo,
    /// Run every test: host unit tests, then the privileged integration tests
    /// against the running kernel (needs root).
    Test {
        /// Only run integration tests whose name contains this.
        filter: Option<String>,
    },
    /// rustfmt check and clippy (-D warnings) on userspace and on the eBPF
    /// crate (its own target, nightly).
    Lint,
    /// Print the per-packet cost of the programs (needs root).
    Bench {
        /// Fewer repetitions, for a quick look.
        #[arg(long)]
        quick: bool,
    },
    /// Build the Debian package (target/debian/policy-agent_VERSION_ARCH.deb):
    /// the agent, the CNI plugin, the systemd unit, the default configuration
    /// and the CNI network list. Prints its path.
    Package,
}

fn workspace_root() -> PathBuf {
    // xtask lives one level below the workspace root.
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.task {
        Task::Setup => setup::run(),
        Task::Build => {
            setup::run()?;
            run::build(&root)
        }
        Task::Demo => {
            setup::run()?;
            run::demo(&root)
        }
        Task::Test { filter } => {
            setup::run()?;
            run::test(&root, filter.as_deref())
        }
        Task::Lint => {
            setup::run()?;
            run::lint(&root)
        }
        Task::Bench { quick } => {
            setup::run()?;
            run::bench(&root, quick)
        }
        Task::Package => {
            setup::run()?;
            let deb = package::build(&root)?;
            println!("{}", deb.display());
            Ok(())
        }
    }
}
