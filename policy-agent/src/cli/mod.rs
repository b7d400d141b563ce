//! Command line: one file per subcommand.

mod dataplane;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// eBPF network policy dataplane for containers.
#[derive(Parser)]
#[command(version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Low-level control of the kernel dataplane: load, attach, write map
    /// entries, show state, unload.
    Dataplane(dataplane::DataplaneArgs),
}

impl Cli {
    pub fn run(self) -> Result<()> {
        match self.command {
            Command::Dataplane(args) => args.run(),
        }
    }
}
